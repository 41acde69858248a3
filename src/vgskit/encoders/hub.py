"""Finding and loading pretrained towers: a hub name (online) or a local folder (offline).

A tower is named by a short alias (``"hubert-base"``), a hub repository id (``"facebook/hubert-base-ls960"``)
or a local folder laid out as ``save_pretrained`` writes it (``config.json``, weights, and optionally
``preprocessor_config.json``). Both routes go through :func:`load_hf_model`, so a folder a user copied from
a connected machine and a tiny random model written by a test are loaded by the same code.

Offline use: a local folder never touches the network. For hub names, ``local_files_only=True`` or the usual
switches ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1`` restrict loading to the local cache. Whatever
the route, a missing weight raises :class:`MissingWeightsError`, whose message says what to download and
where to put it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgskit.errors import ConfigError, VGSKitError

#: Short names of the towers the recipes use → hub repository ids (the weights the papers start from).
KNOWN_TOWERS: dict[str, str] = {
    "hubert-base": "facebook/hubert-base-ls960",
    "hubert-large": "facebook/hubert-large-ll60k",
    "wav2vec2-base": "facebook/wav2vec2-base",
    "clip-vit-b32": "openai/clip-vit-base-patch32",
    "clip-vit-l14": "openai/clip-vit-large-patch14",
    "mae-vit-b16": "facebook/vit-mae-base",
    "dino-vits8": "facebook/dino-vits8",
}

#: Files any one of which holds the weights of a ``save_pretrained`` folder.
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

_TRUE = {"1", "true", "yes", "on"}


class MissingWeightsError(VGSKitError, FileNotFoundError):
    """Pretrained weights (or their config) that cannot be found; the message says how to get them."""


def offline_mode() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to a true value (``1``, ``true``...)."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything with more parts, a leading dot/slash/tilde or a
    # Windows separator can only be a path, so a typo in it is reported as a missing folder.
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def download_hint(repo_id: str, folder: str | None = None) -> str:
    """The instructions a :class:`MissingWeightsError` gives for ``repo_id``."""
    target = folder or f"/path/to/towers/{repo_id.split('/')[-1]}"
    return (
        f"On a machine with network access run\n"
        f"    hf download {repo_id} --local-dir {target}\n"
        f"(or `huggingface-cli download ...` with older huggingface_hub), copy that folder to this machine "
        f"and pass its path instead of the hub name. Offline switches: HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1."
    )


@dataclass(frozen=True)
class TowerSource:
    """Where a tower's files come from.

    Attributes:
        name_or_path: hub repository id or absolute local folder.
        is_local: ``True`` for a local folder.
        local_files_only: never use the network (always ``True`` for local folders).
        alias: the short name or hub id the user gave (for messages).
    """

    name_or_path: str
    is_local: bool
    local_files_only: bool
    alias: str

    @property
    def repo_id(self) -> str:
        """Hub id to download from (the alias's id for local folders named after a known tower)."""
        return KNOWN_TOWERS.get(self.alias, self.alias) if self.is_local else self.name_or_path


def _check_folder(folder: Path, alias: str, need_weights: bool) -> None:
    repo = KNOWN_TOWERS.get(alias, "<hub id of the tower>")
    if not folder.is_dir():
        raise MissingWeightsError(f"pretrained tower folder {folder} does not exist. " + download_hint(repo, str(folder)))
    if not (folder / "config.json").is_file():
        raise MissingWeightsError(
            f"pretrained tower folder {folder} has no config.json (expected a folder written by "
            f"save_pretrained or downloaded from the hub). " + download_hint(repo, str(folder))
        )
    if need_weights and not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise MissingWeightsError(
            f"pretrained tower folder {folder} has a config.json but no weights (looked for "
            f"{', '.join(WEIGHT_FILES)}). " + download_hint(repo, str(folder))
        )


def resolve_tower(
    name_or_path: str | os.PathLike[str], *, local_files_only: bool | None = None, need_weights: bool = True
) -> TowerSource:
    """Turn an alias, hub id or folder into a :class:`TowerSource`, checking local folders eagerly.

    ``local_files_only=None`` follows the offline switches (:func:`offline_mode`).
    """
    alias = os.fspath(name_or_path)
    expanded = Path(alias).expanduser()
    if expanded.is_dir() or _looks_like_path(alias):
        _check_folder(expanded, alias, need_weights)
        return TowerSource(str(expanded.resolve()), True, True, alias)
    repo_id = KNOWN_TOWERS.get(alias, alias)
    offline = offline_mode() if local_files_only is None else bool(local_files_only)
    return TowerSource(repo_id, False, offline, alias)


def _missing(source: TowerSource, what: str, exc: BaseException) -> MissingWeightsError:
    mode = "offline (local cache only)" if source.local_files_only else "online"
    return MissingWeightsError(
        f"cannot load the {what} of pretrained tower {source.name_or_path!r} ({mode}): {exc}\n"
        + download_hint(source.repo_id)
    )


def load_hf_config(source: TowerSource, expected_types: tuple[str, ...] | None = None) -> Any:
    """Load the transformers config of ``source``; ``expected_types`` restricts its ``model_type``."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.name_or_path, local_files_only=source.local_files_only)
    except (OSError, ValueError) as exc:
        raise _missing(source, "config", exc) from exc
    if expected_types is not None and config.model_type not in expected_types:
        raise VGSKitError(
            f"pretrained tower {source.name_or_path!r} is a {config.model_type!r} model; expected one of "
            f"{expected_types}"
        )
    return config


def load_hf_model(source: TowerSource, model_cls: Any, config: Any | None = None, **kwargs: Any) -> Any:
    """``model_cls.from_pretrained`` on ``source`` (with ``config`` overriding the stored one if given).

    Any missing file (config, weights, shards) becomes a :class:`MissingWeightsError` with download hints.
    """
    kwargs["local_files_only"] = source.local_files_only
    if config is not None:
        kwargs["config"] = config
    try:
        return model_cls.from_pretrained(source.name_or_path, **kwargs)
    except OSError as exc:
        raise _missing(source, "weights", exc) from exc


def random_hf_config(architecture: Mapping[str, Any], expected_types: tuple[str, ...], where: str) -> Any:
    """A transformers config built from ``architecture`` (its ``model_type`` plus config fields), for a tower
    with random weights.

    Towers trained from scratch (no weights to download: tests, the embedded corpus) are described in the model
    config itself, so a checkpoint of such a model rebuilds its skeleton anywhere without a tower folder.
    ``where`` names the config field in error messages.
    """
    from transformers import AutoConfig

    if not isinstance(architecture, Mapping):
        raise ConfigError(f"{where} must be a mapping of transformers config fields, got {type(architecture).__name__}")
    fields = dict(architecture)
    model_type = fields.pop("model_type", None)
    if model_type not in expected_types:
        raise ConfigError(f"{where}.model_type must be one of {expected_types}, got {model_type!r}")
    # transformers keeps unknown keys as attributes, so a typo would silently build the default size.
    known = AutoConfig.for_model(model_type).to_dict()
    unknown = sorted(k for k in fields if k not in known)
    if unknown:
        raise ConfigError(f"{where}: unknown {model_type} config fields {unknown}")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def read_preprocessor_config(source: TowerSource) -> dict[str, Any] | None:
    """The tower's ``preprocessor_config.json`` as a dict, or ``None`` when it has none.

    This file is how preprocessing (sample rate, waveform normalisation, image size/mean/std) travels with
    the weights; a folder written by ``save_pretrained`` of a feature extractor or image processor has it.
    """
    name = "preprocessor_config.json"
    if source.is_local:
        path = Path(source.name_or_path) / name
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source.name_or_path, name, local_files_only=source.local_files_only))
        except Exception:  # noqa: BLE001 - absent file, no cache, no network: all mean "no preprocessor file"
            return None
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise VGSKitError(f"{path}: expected a JSON object")
    return data
