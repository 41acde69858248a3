"""Typed training configuration, YAML recipes and dotted command-line overrides.

A recipe is one YAML file with top-level sections, for example::

    model: {name: dual_encoder, embed_dim: 512}
    data: {manifest: data/flickr8k/manifest.jsonl}
    train: {optimizer: adamw, lr: 3.0e-4, batch_size: 128, epochs: 30}

Each section is turned into a dataclass by :func:`config_from_dict`, which checks every key against the
dataclass fields and raises :class:`~vgskit.errors.ConfigError` naming the key (``train.lr``) for unknown
keys, wrong types and out-of-range values. Overrides given as ``--set train.lr=3e-4`` are applied to the raw
dict before the dataclasses are built, so they are checked exactly like values from the file::

    recipe = load_recipe("recipes/flickr8k.yaml", overrides=["train.lr=3e-4", "train.epochs=2"])
    cfg = train_config_from_recipe(recipe)

A recipe may name a ``base:`` recipe whose sections it extends (merged key by key, see
:func:`resolve_recipe_bases`), so that a family of recipes states each shared setting once. Overrides apply
after that merge.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from vgskit.errors import ConfigError

T = TypeVar("T")

# PyYAML follows YAML 1.1, where ``3e-4`` (no dot, no exponent sign) is a *string*. Numeric fields therefore
# also accept strings that look like numbers, so that the most common way of writing a learning rate works.
_NUMBER_RE = re.compile(r"^[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][-+]?\d+)?$")


@dataclass
class TrainConfig:
    """Everything the :class:`~vgskit.train.loop.Trainer` needs besides the model and the data.

    ``batch_size`` is the GLOBAL batch: with ``W`` processes each one computes ``batch_size / W`` examples
    per step, so results do not depend on how many processes share the work.
    Training length is ``max_steps`` or ``epochs`` (if both are given, whichever ends first). Warm-up is
    ``warmup_steps`` or ``warmup_fraction`` of the total steps (not both; neither means no warm-up).

    Less obvious fields:

    * ``optimizer``: a name registered in :mod:`vgskit.train.optim` (``adam``, ``adamw``, ``bertadam``, see
      :func:`~vgskit.train.optim.list_optimizers`). ``bertadam`` is the FaST-VGS/VG-HuBERT optimizer: set
      ``eps: 1.0e-6`` (its reference value) and ``schedule: bert_warmup_linear`` to reproduce those trainers.
    * ``schedule``: a name registered in :mod:`vgskit.train.schedules` (``linear``, ``speechclip``,
      ``bert_warmup_linear``, see :func:`~vgskit.train.schedules.list_schedules`). ``bert_warmup_linear``
      needs ``warmup_fraction`` (an exact fraction of the run, not rounded to steps) and ignores ``end_lr``;
      ``speechclip`` needs a warm-up of at least one step; ``step_decay`` multiplies the lr by ``decay_gamma``
      every ``decay_every`` steps after the warm-up (MILAN: 0.999 every 1,000) and ignores ``end_lr``.
    * ``init_from``: a checkpoint folder whose model weights the run starts from (fine-tuning); unlike
      resuming, the optimizer, schedule and step start afresh.
    * ``amp``: bf16 autocast on CPU, fp16 autocast with a GradScaler on CUDA.
    * ``ckpt_every``: checkpoint every N steps; checkpoints are also written at each epoch end, when the
      selection metric improves and when training stops. ``keep_last`` step folders are kept (null: all).
    * ``eval_every``: ``'epoch'``, every N steps, or null; the final step is always evaluated.
    * ``select_metric``/``select_mode``: key of the evaluation dict that picks ``checkpoints/best``.
    * ``batchnorm``: how BatchNorm layers train. ``batch``: each process normalises with its own slice of the
      batch (so N processes do not train exactly what one process trains); ``frozen``: BatchNorm layers stay in
      eval mode (running statistics, which are not updated; their affine weights still train), which keeps
      "N processes = 1 process" exact; ``sync``: ``SyncBatchNorm`` across processes (CUDA only).
    * ``grad_cache_chunk``: gradient caching (:mod:`vgskit.train.gradcache`): embed each process's batch this
      many rows at a time, first without gradients, then again chunk by chunk back-propagating the gradients
      of the full-batch loss with respect to the embeddings. Activation memory is that of one chunk while the
      parameter gradients equal the plain large-batch step's (exactly with no BatchNorm in training mode or
      with ``batchnorm: frozen``; in training mode each chunk normalises with its own statistics, like
      per-process BatchNorm). Dropout masks are replayed between the two passes. Only models whose
      ``supports_grad_cache`` is True (``embed_for_loss`` + ``loss_from_embeddings``): the trainer refuses the
      others. Null: off.
    * ``stop_after_steps``: stop (with a checkpoint) after this many steps *of this call*, e.g. to split a
      run into jobs; ``time_budget_s`` does the same after this many seconds of training.
    """

    optimizer: str = "adamw"
    schedule: str = "linear"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int | None = None
    warmup_fraction: float | None = None
    max_steps: int | None = None
    epochs: int | None = None
    end_lr: float = 0.0
    decay_gamma: float = 0.999
    decay_every: int = 1000
    batch_size: int = 32
    grad_clip: float | None = 1.0
    amp: bool = False
    seed: int = 0
    log_every: int = 50
    ckpt_every: int | None = 1000
    keep_last: int | None = 3
    eval_every: Literal["epoch"] | int | None = "epoch"
    select_metric: str | None = None
    select_mode: Literal["max", "min"] = "max"
    num_workers: int = 0
    out_dir: str = "runs/default"
    stop_after_steps: int | None = None
    time_budget_s: float | None = None
    tensorboard: bool = True
    batchnorm: Literal["batch", "frozen", "sync"] = "batch"
    init_from: str | None = None
    grad_cache_chunk: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field whose value is out of range."""
        # Imported here: both registries import this module (for the TrainConfig type).
        from vgskit.train.optim import list_optimizers
        from vgskit.train.schedules import list_schedules

        optimizers, schedules = list_optimizers(), list_schedules()
        _check("optimizer", self.optimizer in optimizers,
               f"must be one of {', '.join(map(repr, optimizers))}", self.optimizer)
        _check("schedule", self.schedule in schedules,
               f"must be one of {', '.join(map(repr, schedules))}", self.schedule)
        _check("lr", self.lr > 0 and math.isfinite(self.lr), "must be a finite number > 0", self.lr)
        _check("weight_decay", self.weight_decay >= 0, "must be >= 0", self.weight_decay)
        _check("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               "must be two numbers in [0, 1)", self.betas)
        _check("eps", self.eps > 0, "must be > 0", self.eps)
        _check("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, "must be >= 0",
               self.warmup_steps)
        _check("warmup_fraction", self.warmup_fraction is None or 0 <= self.warmup_fraction < 1,
               "must be in [0, 1)", self.warmup_fraction)
        _check("warmup_fraction", self.warmup_steps is None or self.warmup_fraction is None,
               "give either warmup_steps or warmup_fraction, not both", self.warmup_fraction)
        _check("max_steps", self.max_steps is None or self.max_steps >= 1, "must be >= 1", self.max_steps)
        _check("epochs", self.epochs is None or self.epochs >= 1, "must be >= 1", self.epochs)
        _check("max_steps", self.max_steps is not None or self.epochs is not None,
               "set max_steps or epochs (or both)", self.max_steps)
        _check("end_lr", 0 <= self.end_lr <= self.lr, "must be in [0, lr]", self.end_lr)
        _check("warmup_fraction", self.schedule != "bert_warmup_linear" or self.warmup_fraction is not None,
               "the 'bert_warmup_linear' schedule needs warmup_fraction (a fraction of the run; warmup_steps "
               "is not used by it)", self.warmup_fraction)
        warmup_key = "warmup_fraction" if self.warmup_fraction is not None else "warmup_steps"
        _check(warmup_key, self.schedule != "speechclip" or bool(self.warmup_steps or self.warmup_fraction),
               "the 'speechclip' schedule needs a warm-up: set warmup_steps or warmup_fraction > 0",
               getattr(self, warmup_key))
        _check("decay_gamma", 0 < self.decay_gamma <= 1, "must be in (0, 1]", self.decay_gamma)
        _check("decay_every", self.decay_every >= 1, "must be >= 1", self.decay_every)
        _check("batch_size", self.batch_size >= 1, "must be >= 1", self.batch_size)
        _check("grad_clip", self.grad_clip is None or self.grad_clip > 0, "must be > 0 or null",
               self.grad_clip)
        _check("log_every", self.log_every >= 1, "must be >= 1", self.log_every)
        _check("ckpt_every", self.ckpt_every is None or self.ckpt_every >= 1, "must be >= 1 or null",
               self.ckpt_every)
        _check("keep_last", self.keep_last is None or self.keep_last >= 1, "must be >= 1 or null",
               self.keep_last)
        _check("eval_every", self.eval_every is None or self.eval_every == "epoch"
               or (isinstance(self.eval_every, int) and self.eval_every >= 1),
               "must be 'epoch', an integer >= 1 or null", self.eval_every)
        _check("num_workers", self.num_workers >= 0, "must be >= 0", self.num_workers)
        _check("batchnorm", self.batchnorm in ("batch", "frozen", "sync"), "must be 'batch', 'frozen' or 'sync'",
               self.batchnorm)
        _check("out_dir", bool(self.out_dir), "must not be empty", self.out_dir)
        _check("stop_after_steps", self.stop_after_steps is None or self.stop_after_steps >= 1,
               "must be >= 1 or null", self.stop_after_steps)
        _check("time_budget_s", self.time_budget_s is None or self.time_budget_s > 0, "must be > 0 or null",
               self.time_budget_s)
        _check("grad_cache_chunk", self.grad_cache_chunk is None or (
            isinstance(self.grad_cache_chunk, int) and not isinstance(self.grad_cache_chunk, bool)
            and self.grad_cache_chunk >= 1), "must be a positive integer (rows per chunk) or null",
            self.grad_cache_chunk)
        _check("init_from", self.init_from is None or bool(self.init_from.strip()),
               "must be a checkpoint folder or null", self.init_from)


def _check(key: str, ok: bool, problem: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem} (got {value!r})")


# --------------------------------------------------------------------------------------------- dict -> dataclass


def config_from_dict(cls: type[T], d: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` (possibly with nested dataclass fields) from a plain dict.

    Raises :class:`ConfigError` whose message starts with the dotted key (``prefix.key``) for unknown keys,
    missing required keys, values of the wrong type and values rejected by the dataclass's own checks.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    where = prefix or cls.__name__
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in d:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"{_join(prefix, str(key))}: unknown key{hint}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in d:
            kwargs[name] = _coerce(d[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: missing required key")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # Range checks in __post_init__ name the bare field; add the section so the message is a full key.
        raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to annotation ``tp``, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Union or origin is types.UnionType:
        # Try the members in order; None is matched exactly so that "null" never becomes a string.
        if value is None and type(None) in args:
            return None
        for member in args:
            if member is type(None):
                continue
            try:
                return _coerce(value, member, key)
            except ConfigError:
                continue
        names = " or ".join("null" if a is type(None) else _type_name(a) for a in args)
        raise ConfigError(f"{key}: expected {names}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: must be one of {', '.join(repr(a) for a in args)} (got {value!r})")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return config_from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _NUMBER_RE.match(value.strip()):
            as_float = float(value)
            if as_float.is_integer():
                return int(as_float)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER_RE.match(value.strip()):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        ktp, vtp = args if args else (Any, Any)
        return {_coerce(k, ktp, key): _coerce(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------- recipes, overrides


#: The built-in recipes (``vgskit/recipes``): where a ``base:`` name is looked up last.
BUILTIN_RECIPE_DIR = Path(__file__).parents[1] / "recipes"


def load_recipe(path: str | Path, overrides: Iterable[str] | None = None) -> dict[str, Any]:
    """Read a YAML recipe into a dict of sections, merge it over its ``base`` recipes, then apply ``overrides``.

    ``overrides`` are dotted ``KEY=VALUE`` strings (``"train.lr=3e-4"``); they apply to the merged recipe,
    so they can change a value that only a base recipe sets. See :func:`resolve_recipe_bases`.
    """
    path = Path(path)
    return apply_overrides(resolve_recipe_bases(_read_recipe_file(path), path), overrides or [])


def resolve_recipe_bases(d: Mapping[str, Any], origin: Path | None = None) -> dict[str, Any]:
    """Return recipe ``d`` merged over its ``base`` recipe (recursively), without the ``base`` key.

    A recipe may start from another one, so that shared settings are written once::

        base: _speechclip_flickr8k       # a name, or a path ending in .yaml/.yml
        model: {name: speechclip_parallel_base}

    The base (which may itself have a ``base``) is resolved first, then ``d``'s sections are merged over it:
    mappings merge key by key, recursively; any other value, lists and null included, replaces the base's.
    An empty section (``train:`` with nothing under it) changes nothing.

    ``origin`` is the file ``d`` was read from, or None for a recipe built in code. A ``base`` path is
    relative to ``origin``'s folder (the current directory without one) unless absolute; a ``base`` name is
    ``<origin's folder>/<name>.yaml`` if that exists, else the built-in ``vgskit/recipes/<name>.yaml``.

    Raises:
        ConfigError: a base that does not exist (naming the recipe and the base), a chain of bases that
            comes back to a recipe already in it (naming the chain), or a base file that is not a recipe.
    """
    label = str(origin) if origin is not None else "<recipe dict>"
    seen = [origin.resolve()] if origin is not None else []
    return _merge_bases(dict(d), origin, [label], seen)


def _merge_bases(d: dict[str, Any], origin: Path | None, chain: list[str], seen: list[Path]) -> dict[str, Any]:
    if "base" not in d:
        return copy.deepcopy(d)
    child = {k: v for k, v in d.items() if k != "base"}
    base_path = _find_base(d["base"], origin, chain[-1])
    key = base_path.resolve()
    if key in seen:
        raise ConfigError(f"recipe {chain[0]}: the chain of base recipes is a cycle: "
                          f"{' -> '.join([*chain, str(base_path)])}")
    base = _merge_bases(_read_recipe_file(base_path), base_path, [*chain, str(base_path)], [*seen, key])
    # An empty section is YAML's null: read it as "nothing to change", not as "remove the base's section".
    return _deep_merge(base, {k: ({} if v is None else v) for k, v in child.items()})


def _find_base(base: Any, origin: Path | None, where: str) -> Path:
    """The file a ``base:`` value names (see :func:`resolve_recipe_bases` for the rules)."""
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"recipe {where}: base: must be a recipe name or a .yaml path, got {base!r}")
    folder = origin.parent if origin is not None else None
    as_path = Path(base)
    if as_path.suffix.lower() in (".yaml", ".yml"):
        candidates = [as_path if as_path.is_absolute() or folder is None else folder / as_path]
    else:
        candidates = [folder / f"{base}.yaml"] if folder is not None else []
        if folder is None or folder.resolve() != BUILTIN_RECIPE_DIR.resolve():
            candidates.append(BUILTIN_RECIPE_DIR / f"{base}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"recipe {where}: base {base!r} not found (looked for "
                      f"{', '.join(str(c) for c in candidates)})")


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings key by key, recursively; anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_recipe_file(path: Path) -> dict[str, Any]:
    """One recipe file as a dict (``base`` not resolved), with a clear error for unreadable or odd files."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"recipe {path}: cannot read ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path}: not valid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: top level must be a mapping of sections, got {type(data).__name__}")
    for section, body in data.items():
        if section != "base" and body is not None and not isinstance(body, dict):
            raise ConfigError(f"{section}: recipe section must be a mapping, got {body!r}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``"train.lr=3e-4"`` into ``(["train", "lr"], 3e-4)``; the value is parsed with ``yaml.safe_load``."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key component in {key!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse override value {raw!r} ({e})") from None
    return parts, value


def apply_overrides(d: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a deep copy of ``d`` with each dotted ``KEY=VALUE`` override set (missing levels are created).

    Unknown keys are not rejected here: the dataclass built from the section does that, naming the key.
    """
    out = copy.deepcopy(dict(d))
    for item in overrides:
        parts, value = parse_override(item)
        node: dict[str, Any] = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"{where}: cannot set {'.'.join(parts)}, {where} is {child!r}, not a section")
            node = child
        node[parts[-1]] = value
    return out


def model_section(config: str, overrides: Iterable[str] = (), *, option: str = "--config",
                  family: str = "model") -> dict[str, Any]:
    """A model section for converters: a registered name (``{"name": config}``), or a JSON/YAML file holding a
    model section (a mapping with an optional ``name``, or a recipe whose ``model`` section is used); dotted
    ``overrides`` (``KEY=VALUE``) apply to it. Errors name ``option``, the file and the problem."""
    path = Path(config)
    if path.suffix.lower() not in (".json", ".yaml", ".yml"):
        return apply_overrides({"name": config}, overrides)
    if not path.is_file():
        raise ConfigError(f"{option} {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
        # Not YAML for JSON: YAML 1.1 reads numbers such as 1e-05 as strings.
        section = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"{option} {path}: cannot read it as {path.suffix[1:].upper()} ({err})") from None
    if isinstance(section, dict) and isinstance(section.get("model"), dict):
        section = section["model"]  # a recipe
    if not isinstance(section, dict):
        raise ConfigError(f"{option} {path}: expected a mapping of {family} config values, "
                          f"got {type(section).__name__}")
    return apply_overrides(section, overrides)


def train_config_from_recipe(recipe: Mapping[str, Any], section: str = "train") -> TrainConfig:
    """Build the :class:`TrainConfig` from the ``train`` section of a loaded recipe."""
    return config_from_dict(TrainConfig, recipe.get(section) or {}, prefix=section)


def to_jsonable(obj: Any, key: str = "config") -> Any:
    """Convert dataclasses, paths and tuples to JSON types; raise ConfigError naming anything else."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name), f"{key}.{f.name}") for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, f"{key}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{key}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    raise ConfigError(f"{key}: cannot be written as JSON ({type(obj).__name__})")


__all__ = [
    "BUILTIN_RECIPE_DIR",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "load_recipe",
    "model_section",
    "parse_override",
    "resolve_recipe_bases",
    "to_jsonable",
    "train_config_from_recipe",
]
