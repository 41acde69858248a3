"""Sharing vgskit models on the Hugging Face Hub.

A model repository holds exactly what :func:`~vgskit.models.registry.save_pretrained` writes
(``config.json`` + ``model.safetensors``) plus a generated model card (``README.md``)::

    from vgskit.hub import push_to_hub
    from vgskit.models import load_pretrained

    push_to_hub(model, "me/spoken-scenes-dual-encoder", results="runs/demo/results.json", recipe="demo")
    model = load_pretrained("me/spoken-scenes-dual-encoder")              # or "owner/name@v1.0"

:func:`~vgskit.models.registry.load_pretrained` treats a string as a hub repository id only when it has the
form ``owner/name`` (optionally ``@revision``) and no such local path exists; anything that looks like a path
(``./``, ``/``, ``~``, a backslash, more than one slash) is always a local folder, and local folders never
touch the network. Downloads follow ``local_files_only`` and the offline switches ``HF_HUB_OFFLINE=1`` /
``TRANSFORMERS_OFFLINE=1`` (local cache only). A repository that cannot be fetched raises
:class:`HubModelError`, whose message names it and says how to get it. Needs the ``hub`` extra
(``pip install 'vgskit[hub]'``).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vgskit.encoders.hub import MissingWeightsError, _looks_like_path, offline_mode
from vgskit.errors import ConfigError, VGSKitError
from vgskit.models.registry import CONFIG_FILE, WEIGHTS_FILE

MODEL_CARD_FILE = "README.md"
#: The files a vgskit model repository holds; downloads fetch only these.
HUB_FILES: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE, MODEL_CARD_FILE)
DEFAULT_COMMIT_MESSAGE = "Upload vgskit model"
_TAGS = ("vgskit", "visually-grounded-speech", "speech-image-retrieval")
# owner/name as the hub spells them (letters, digits, "-", "_", "."), then an optional @revision.
_HUB_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([^\s@]+))?$")


class HubModelError(MissingWeightsError):
    """A model repository on the Hugging Face Hub that cannot be fetched; the message says how to get it."""


def split_hub_id(name: object) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``name`` is a hub repository id (``owner/name`` or ``owner/name@rev``).

    ``None`` for everything else: non-strings (a :class:`~pathlib.Path` is always local), strings that look like
    a path (leading ``.``, ``/`` or ``~``, a backslash, more than one slash) and strings naming an existing
    local file or folder.
    """
    if not isinstance(name, str) or _looks_like_path(name) or Path(name).exists():
        return None
    match = _HUB_ID.match(name)
    if match is None or not _valid_repo_id(match.group(1)):
        return None
    return match.group(1), match.group(2)


def _valid_repo_id(repo_id: str) -> bool:
    match = _HUB_ID.match(repo_id)
    return (match is not None and match.group(2) is None and not repo_id.endswith((".", "-"))
            and ".." not in repo_id and not _looks_like_path(repo_id))


def is_hub_id(name: object) -> bool:
    """True when :func:`~vgskit.models.registry.load_pretrained` would download ``name`` from the hub."""
    return split_hub_id(name) is not None


def _require_hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as exc:
        raise VGSKitError("sharing models on the Hugging Face Hub needs the huggingface_hub package: "
                          "pip install 'vgskit[hub]'") from exc
    return huggingface_hub


def _download_hint(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    target = f"/path/to/models/{repo_id.split('/')[-1]}"
    return (f"On a machine with network access run\n"
            f"    hf download {repo_id}{rev} {' '.join(HUB_FILES)} --local-dir {target}\n"
            f"(or `huggingface-cli download ...` with older huggingface_hub), copy that folder to this machine "
            f"and pass its path instead of the repository id. A private or "
            f"gated repository needs a token (`hf auth login` or HF_TOKEN). (No local folder {repo_id} exists "
            f"here; write ./{repo_id} to name a local path.)")


def _transport_errors() -> tuple[type[BaseException], ...]:
    # The HTTP client huggingface_hub uses differs across its versions; its errors are not all OSErrors.
    found = []
    for module in ("httpx", "httpx2", "requests"):
        base = getattr(sys.modules.get(module), "HTTPError", None)
        if isinstance(base, type) and issubclass(base, BaseException):
            found.append(base)
    return tuple(found)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def download_model(repo_id: str, *, revision: str | None = None, local_files_only: bool | None = None) -> Path:
    """Fetch a vgskit model repository (only ``config.json``, ``model.safetensors`` and ``README.md``) into the
    Hugging Face cache and return its folder.

    ``local_files_only=None`` follows the offline switches (:func:`~vgskit.encoders.hub.offline_mode`).
    Raises :class:`HubModelError` naming the repository when it is unknown, private, offline and not cached,
    or unreachable.
    """
    hf = _require_hub()
    from huggingface_hub import utils as errors  # where every supported version exports these exceptions

    offline = offline_mode() if local_files_only is None else bool(local_files_only)
    where = f"model repository {repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    hint = _download_hint(repo_id, revision)
    try:
        folder = hf.snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=list(HUB_FILES),
                                      local_files_only=offline)
    except errors.RevisionNotFoundError as exc:
        raise HubModelError(f"{where}: no such revision on the Hugging Face Hub. {hint}") from exc
    except errors.RepositoryNotFoundError as exc:
        raise HubModelError(f"{where}: not found on the Hugging Face Hub; check the name, or "
                            f"it is private or gated. {hint}") from exc
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as exc:
        state = ("offline mode is on (local_files_only, HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)" if offline
                 else "the Hugging Face Hub cannot be reached")
        raise HubModelError(f"{where}: not in the local Hugging Face cache and {state}. {hint}") from exc
    except (OSError, ValueError, *_transport_errors()) as exc:  # HTTP errors, invalid ids, network failures
        raise HubModelError(f"{where}: cannot be downloaded ({_first_line(exc)}). {hint}") from exc
    folder = Path(folder)
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise HubModelError(f"{where} has no {' and no '.join(missing)}: not a vgskit model repository "
                            f"(expected the files save_pretrained writes)")
    return folder


def _directions(results: Mapping[str, Any]) -> list[str]:
    from vgskit.metrics import DIRECTION_LABELS

    return [key for key in DIRECTION_LABELS if isinstance(results.get(key), Mapping)]


def _recall_tables(results: Mapping[str, Any], ks: Sequence[int]) -> list[str]:
    """Markdown recall tables of ``vgskit eval --json`` output: one split, several (``--corpus``), or the
    ``results.json`` of ``vgskit demo`` (results under ``"results"``)."""
    if not _directions(results) and isinstance(results.get("results"), Mapping):
        results = results["results"]
    if _directions(results):
        parts: list[str] = []
        if isinstance(results.get("coarse"), Mapping) and _directions(results["coarse"]):
            parts += ["**Coarse (embeddings only)**", "", _recall_table(results["coarse"], ks), "",
                      "**Coarse-to-fine (re-ranked by the fine scorer)**", ""]
        return parts + [_recall_table(results, ks)]
    splits = {name: value for name, value in results.items() if isinstance(value, Mapping) and _directions(value)}
    if not splits:
        raise ConfigError("results: no recall found (expected the output of `vgskit eval --json`: "
                          "speech_to_image / image_to_speech with R@K, per split or for one split)")
    parts = []
    for name, split_results in splits.items():
        parts += [f"**{name}**", "", *_recall_tables(split_results, ks), ""]
    return parts[:-1]


def _recall_table(results: Mapping[str, Any], ks: Sequence[int]) -> str:
    from vgskit.metrics import DIRECTION_LABELS, GALLERY_UNITS

    keys = _directions(results)
    queries = any("n_queries" in results[key] for key in keys)
    gallery = any("n_gallery" in results[key] for key in keys)
    head = ["direction", *(f"R@{k}" for k in ks), *(["queries"] if queries else []), *(["gallery"] if gallery else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for key in keys:
        row = results[key]
        cells = [DIRECTION_LABELS[key]]
        cells += [f"{float(row[f'R@{k}']):.1f}" if f"R@{k}" in row else "–" for k in ks]
        if queries:
            cells.append(str(row.get("n_queries", "–")))
        if gallery:
            n = row.get("n_gallery")
            unit = GALLERY_UNITS.get(key, "items")
            cells.append("–" if n is None else f"{int(n)} {unit[:-1] if int(n) == 1 else unit}")
            big = [f"R@{k}" for k in ks if n is not None and k >= int(n)]
            if big:
                notes.append(f"{DIRECTION_LABELS[key]}: the gallery holds only {cells[-1]}, so "
                             f"{', '.join(big)} read 100 for any ranking.")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [f"\n> Warning: {note}" for note in notes])


def _read_results(results: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    if isinstance(results, Mapping):
        return results
    path = Path(results)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"results {path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"results {path}: expected a JSON object")
    return data


def _parameter_count(weights: Path) -> int | None:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            total = 0
            for key in f.keys():
                n = 1
                for dim in f.get_slice(key).get_shape():
                    n *= int(dim)
                total += n
            return total
    except Exception:  # noqa: BLE001 - the count is decoration; load_pretrained reports unreadable weights
        return None


def model_card(folder: str | Path, *, repo_id: str | None = None,
               results: Mapping[str, Any] | str | Path | None = None, recipe: str | None = None,
               training_data: str | Sequence[str] | None = None, ks: Sequence[int] = (1, 5, 10)) -> str:
    """The text of the model card :func:`write_model_card` writes for the saved model in ``folder``."""
    import yaml

    from vgskit.models.registry import get_model_class

    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    try:
        description = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_path}: cannot read the model config ({exc})") from exc
    if not isinstance(description, Mapping) or "model" not in description:
        raise ConfigError(f"{config_path}: not a vgskit model config (no \"model\" key)")
    name = str(description["model"])
    cls = get_model_class(name)
    module = cls.__module__.split(".")
    family = module[2] if module[:2] == ["vgskit", "models"] and len(module) > 2 else cls.__module__
    tags = list(dict.fromkeys([*_TAGS, family.replace("_", "-"), name.replace("_", "-")]))
    front = yaml.safe_dump({"library_name": "vgskit", "tags": tags}, sort_keys=False).strip()
    title = repo_id or name
    data = [training_data] if isinstance(training_data, str) else list(training_data or [])
    n_params = _parameter_count(folder / WEIGHTS_FILE)
    facts = [f"- **Model:** `{name}` (family `{family}`, class `{cls.__qualname__}`)"]
    if n_params is not None:
        facts.append(f"- **Parameters:** {n_params:,}")
    if recipe:
        facts.append(f"- **Recipe:** `{recipe}`")
    if data:
        facts.append(f"- **Training data:** {', '.join(data)}")
    if description.get("vgskit_version"):
        facts.append(f"- **vgskit version:** {description['vgskit_version']}")
    lines = ["---", front, "---", "", f"# {title}", "",
             "A visually grounded speech model trained with vgskit, for retrieval between spoken captions and "
             "images.", "", *facts, ""]
    if results is not None:
        lines += ["## Results", "", *_recall_tables(_read_results(results), ks), "",
                  "Recall in percent. speech to image: the gallery is the distinct test images; image to speech: "
                  "the gallery is every test caption, and a query counts as a hit when any caption of its image "
                  "is in the top K.", ""]
    source = repo_id or "path/to/this/folder"
    lines += ["## How to load it", "", "```python", "from vgskit.models import load_pretrained", "",
              f'model = load_pretrained("{source}")  # verified load; eval mode', "```", ""]
    if repo_id:
        lines += ["For the command line, download it first and pass the folder as `--checkpoint`:", "",
                  "```bash", f"hf download {repo_id} {' '.join(HUB_FILES)} --local-dir models/{repo_id.split('/')[-1]}",
                  f"vgskit eval --checkpoint models/{repo_id.split('/')[-1]} --manifest manifest.jsonl", "```", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, *, repo_id: str | None = None,
                     results: Mapping[str, Any] | str | Path | None = None, recipe: str | None = None,
                     training_data: str | Sequence[str] | None = None) -> Path:
    """Write ``README.md`` (YAML front matter + model card) next to the ``config.json`` in ``folder``.

    Args:
        folder: a folder written by :func:`~vgskit.models.registry.save_pretrained`.
        repo_id: the hub repository the card is for (title and loading instructions).
        results: recall as ``vgskit eval --json`` writes it (one split or ``{split: results}``), the
            ``results.json`` of ``vgskit demo``, or the path of such a JSON file.
        recipe: the training recipe (name or file).
        training_data: the corpus or corpora the model was trained on.
    Returns:
        the path of the card.
    """
    text = model_card(folder, repo_id=repo_id, results=results, recipe=recipe, training_data=training_data)
    path = Path(folder) / MODEL_CARD_FILE
    path.write_text(text, encoding="utf-8")
    return path


def push_to_hub(model: Any, repo_id: str, *, results: Mapping[str, Any] | str | Path | None = None,
                recipe: str | None = None, training_data: str | Sequence[str] | None = None,
                private: bool = False, token: str | None = None,
                commit_message: str = DEFAULT_COMMIT_MESSAGE) -> Any:
    """Upload ``model`` to the hub repository ``repo_id`` (created if needed) with a generated model card.

    The weights (``model.safetensors``), ``config.json`` and ``README.md`` (:func:`write_model_card`) are
    written to a temporary folder, which is then uploaded as one commit. Returns what
    ``HfApi.upload_folder`` returns (the commit info). ``token=None`` uses the stored login or ``HF_TOKEN``.
    """
    from vgskit.models.registry import save_pretrained

    if not isinstance(repo_id, str) or not _valid_repo_id(repo_id):
        raise ConfigError(f"repo_id must be a hub repository id of the form owner/name, got {repo_id!r}")
    if results is not None:
        results = _read_results(results)  # fail on bad results before anything is written or uploaded
    hf = _require_hub()
    with tempfile.TemporaryDirectory(prefix="vgskit-hub-") as tmp:
        folder = save_pretrained(model, tmp)
        write_model_card(folder, repo_id=repo_id, results=results, recipe=recipe, training_data=training_data)
        api = hf.HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=commit_message)
