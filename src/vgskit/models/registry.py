"""Build models by name from dataclass configs; save and load them without pickle.

A registry entry is a model class plus an optional preset config, so named sizes (``dual_encoder_tiny``,
``dual_encoder``) are just extra entries for the same class::

    model = create_model("dual_encoder", embed_dim=128, audio={"channels": [256, 256]})
    save_pretrained(model, "out/model")        # model.safetensors + config.json
    model = load_pretrained("out/model")

Overrides are merged into the preset field by field; a mapping given for a nested dataclass field is merged
into that nested config. Unknown model names and unknown keys raise :class:`~vgskit.errors.ConfigError`
listing the valid ones.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from vgskit.errors import ConfigError, InputFileError
from vgskit.models.base import RetrievalModel

M = TypeVar("M", bound=type[RetrievalModel])

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Keys that may sit beside "model"/"config" in a config.json (training checkpoints add the training settings
# under "train" and "extra"); they describe the run and do not change how the model is built.
_METADATA_KEYS = {"image_transform", "vgskit_version", "format_version", "train", "extra"}

_MODELS: dict[str, tuple[type[RetrievalModel], Any]] = {}


def register_model(name: str, config: Any | None = None) -> Callable[[M], M]:
    """Class decorator registering a :class:`RetrievalModel` under ``name``.

    Args:
        name: registry name.
        config: preset config instance for this name; ``None`` uses ``cls.config_class()`` defaults.
    """

    def decorator(cls: M) -> M:
        previous = _MODELS.get(name)
        if previous is not None and previous[0].__qualname__ != cls.__qualname__:
            raise ConfigError(f"model name {name!r} is already registered to {previous[0].__qualname__}")
        if config is not None and not isinstance(config, cls.config_class):
            raise ConfigError(f"preset for {name!r} must be a {cls.config_class.__name__}")
        _MODELS[name] = (cls, config)
        return cls

    return decorator


def list_models() -> list[str]:
    """Registered model names, sorted."""
    _import_builtin_models()
    return sorted(_MODELS)


def _import_builtin_models() -> None:
    # Registration happens on import of each model module; importing the package pulls them all in.
    import vgskit.models  # noqa: F401


def merge_config(base: Any, overrides: Mapping[str, Any], where: str = "config") -> Any:
    """Return a copy of dataclass ``base`` with ``overrides`` applied (nested mappings merge recursively)."""
    valid = [f.name for f in fields(base)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {valid}")
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        current = getattr(base, key)
        if is_dataclass(current) and not isinstance(current, type):
            if isinstance(value, Mapping):
                value = merge_config(current, value, f"{where}.{key}")
            elif not isinstance(value, type(current)):
                raise ConfigError(
                    f"{where}.{key}: expected a mapping or {type(current).__name__}, got {type(value).__name__}"
                )
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)  # JSON has no tuples
        changes[key] = value
    try:
        return replace(base, **changes)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from exc


def _entry(name: str) -> tuple[type[RetrievalModel], Any]:
    _import_builtin_models()
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; available models are {sorted(_MODELS)}")
    return _MODELS[name]


def get_model_class(name: str) -> type[RetrievalModel]:
    """The class registered as ``name`` (e.g. to call its class-level hooks before building it)."""
    return _entry(name)[0]


def model_config(name: str, **config_overrides: Any) -> Any:
    """The config ``create_model(name, **config_overrides)`` would build from, without building the model."""
    cls, preset = _entry(name)
    base = copy.deepcopy(preset) if preset is not None else cls.config_class()
    return merge_config(base, config_overrides, where=name)


def create_model(name: str, **config_overrides: Any) -> RetrievalModel:
    """Build the model registered as ``name``, its preset config updated with ``config_overrides``."""
    cls = get_model_class(name)
    model = cls(model_config(name, **config_overrides))
    model.model_name = name
    return model


def create_model_from_config(config: Mapping[str, Any]) -> RetrievalModel:
    """Build a model from ``{"model": name, "config": {...overrides}}`` (the layout of ``config.json``)."""
    if not isinstance(config, Mapping) or "model" not in config:
        raise ConfigError('model config must be a mapping with a "model" key (and optionally "config")')
    unknown = sorted(set(config) - {"model", "config"} - _METADATA_KEYS)
    if unknown:
        raise ConfigError(f"model config: unknown key(s) {unknown}; valid keys are ['config', 'model']")
    overrides = config.get("config") or {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f'model config: "config" must be a mapping, got {type(overrides).__name__}')
    return create_model(str(config["model"]), **overrides)


def model_config_dict(model: RetrievalModel) -> dict[str, Any]:
    """The JSON-serialisable description of ``model`` written to ``config.json``."""
    if not model.model_name:
        raise ConfigError("model has no registry name; build it with create_model() before saving")
    from vgskit import __version__

    return {
        "model": model.model_name,
        "config": asdict(model.config),
        "image_transform": model.image_transform,
        "vgskit_version": __version__,
    }


def save_pretrained(model: RetrievalModel, directory: str | Path) -> Path:
    """Write ``model.safetensors`` (weights, no pickle) and ``config.json`` into ``directory``."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    description = model_config_dict(model)
    save_model(model, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return directory


class ModelFileError(InputFileError):
    """A saved model folder whose weights file is unreadable or does not fit the model its config describes."""

    kind = "model"


def _short(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu", *, revision: str | None = None,
                    local_files_only: bool | None = None) -> RetrievalModel:
    """Rebuild a model saved by :func:`save_pretrained`; returned in eval mode.

    ``directory`` may also be a training checkpoint folder; a run's ``best/`` is first checked against the
    step the run recorded as best (see :func:`vgskit.train.checkpoint.check_best`). Weights that are
    unreadable, or that do not fit the model the config describes, raise :class:`ModelFileError` naming the
    folder and listing the missing, unexpected and mis-shaped tensors.

    A string of the form ``owner/name`` (or ``owner/name@revision``) that is not an existing local path is a
    Hugging Face Hub repository (pushed by :func:`vgskit.hub.push_to_hub`): its ``config.json`` and
    ``model.safetensors`` are downloaded into the hub cache first (:func:`vgskit.hub.download_model`; needs the
    ``hub`` extra), at ``revision`` if given, from the cache only when ``local_files_only`` is true or, when it
    is ``None``, when ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set. Strings that look like a path
    (``./``, ``/``, ``~``, more than one slash) and :class:`~pathlib.Path` objects are always local folders,
    which never touch the network.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_model

    from vgskit.hub import download_model, split_hub_id
    from vgskit.train.checkpoint import BEST, check_best

    hub_id = split_hub_id(directory)
    if hub_id is not None:
        repo_id, pinned = hub_id
        if pinned is not None and revision is not None and pinned != revision:
            raise ConfigError(f"{directory!r} pins revision {pinned!r} but revision={revision!r} was given")
        directory = download_model(repo_id, revision=pinned or revision, local_files_only=local_files_only)
    elif revision is not None:
        raise ConfigError(f"revision={revision!r} applies to a hub repository id, not to the local folder "
                          f"{directory}")
    directory = Path(directory)
    if directory.name == BEST:
        directory = check_best(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(f"{directory}: no {CONFIG_FILE} (not a saved vgskit model)")
    try:
        description = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_path}: invalid JSON ({exc})") from exc
    model = create_model_from_config(description)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"{directory}: no {WEIGHTS_FILE}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(directory, f"{WEIGHTS_FILE} is unreadable: truncated or not a safetensors file "
                                        f"({exc})") from exc
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    wrong = sorted(k for k in set(own) & set(stored) if own[k] != stored[k])
    problems = [f"other shape: {_short([f'{k} (file {stored[k]}, model {own[k]})' for k in wrong])}"]
    if not wrong:
        # safetensors' loader knows which names are tied copies that the file rightly stores once.
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
        problems = [f"{what}: {_short(sorted(keys))}" for what, keys in
                    (("missing", list(missing)), ("unexpected", list(unexpected))) if keys]
    if problems:
        name = description.get("model") if isinstance(description, Mapping) else None
        raise ModelFileError(directory, f"the weights in {WEIGHTS_FILE} do not fit the model {name!r} that "
                                        f"{CONFIG_FILE} describes ({'; '.join(problems)})")
    return model.to(device).eval()
