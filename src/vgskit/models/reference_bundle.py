"""Reading the checkpoints of the jasonppy reference code (FaST-VGS-Family, word-discovery), shared by the converters.

Both repositories save a run as ``best_bundle.pth`` (a dict of state dicts: ``dual_encoder``, and for FaST-VGS
``cross_encoder``) next to a pickled ``args.pkl`` (the training ``argparse.Namespace``). The bundle is read with
``torch.load(weights_only=True)`` unless the caller trusts the file (``allow_pickle``); ``args.pkl`` is a plain
pickle and is read only then, with the inert stand-ins of :mod:`vgskit.models.stand_in_pickle`.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vgskit.errors import VGSKitError
from vgskit.models.stand_in_pickle import StandInUnpickler, stand_in_pickle_module

__all__ = ["ARGS_NAME", "BUNDLE_NAME", "ConversionReport", "bundle_parts", "read_bundle_parts", "read_reference_args",
           "resolve_bundle"]

BUNDLE_NAME = "best_bundle.pth"
ARGS_NAME = "args.pkl"


@dataclass
class ConversionReport:
    """What a converter did with a reference bundle (bundle keys are named by their state dict).

    Attributes:
        loaded: our keys filled from the bundle.
        missing: our keys the bundle does not provide (left at their initial / pretrained value); keys whose
            bundle tensor has another shape are listed in ``mismatched`` instead.
        unmapped: bundle keys that belong to no part of the model.
        mismatched: ``"<bundle key> -> <our key>: <shape> vs <shape>"`` for tensors of another size.
        dropped: bundle keys the reference holds but does not use for retrieval.
        config_source: where the sizes came from (``"config"`` or ``"config + args.pkl"``).
        notes: anything else worth telling (an ``args.pkl`` left unread, entries of the bundle not used).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    config_source: str = "config"
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether every trained tensor of the model came from the bundle and every bundle key found its place."""
        return not (self.missing or self.unmapped or self.mismatched)

    def summary(self, source: str, model_name: str) -> str:
        """What ``vgskit convert`` prints: the count loaded, every key that did not fit, the notes."""
        lines = [f"{source}: {len(self.loaded)} tensor(s) loaded into {model_name} (sizes from the "
                 f"{self.config_source})"]
        for what, keys in (("not in the bundle, left at their initial value", self.missing),
                           ("bundle keys with no place in the model", self.unmapped),
                           ("bundle tensors of another shape", self.mismatched)):
            if keys:
                lines.append(f"  {what} ({len(keys)}):")
                lines.extend(f"    {key}" for key in keys)
        if self.dropped:
            lines.append(f"  reference-only tensors not used: {len(self.dropped)}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def resolve_bundle(path: str | Path) -> tuple[Path, Path | None]:
    """``best_bundle.pth`` and the ``args.pkl`` next to it (``None`` if absent) for a file or a run folder.

    Raises:
        VGSKitError: the path does not exist, or the folder holds no ``best_bundle.pth``.
    """
    p = Path(path)
    if p.is_dir():
        bundle = p / BUNDLE_NAME
        if not bundle.is_file():
            raise VGSKitError(f"checkpoint {p}: folder holds no {BUNDLE_NAME} (the reference's saved model)")
    elif p.is_file():
        bundle = p
    else:
        raise VGSKitError(f"checkpoint {p}: file not found")
    args = bundle.parent / ARGS_NAME
    return bundle, args if args.is_file() else None


def _load(p: Path, allow_pickle: bool) -> Any:
    if not p.is_file():
        raise VGSKitError(f"checkpoint {p}: file not found")
    try:
        if allow_pickle:
            return torch.load(p, map_location="cpu", weights_only=False, pickle_module=stand_in_pickle_module())
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Only a refused class means "pickled objects besides tensors"; anything else is not a torch file at all.
        if allow_pickle or not any(w in str(err) for w in ("GLOBAL", "Unsupported global", "Unsupported class")):
            raise VGSKitError(f"checkpoint {p}: torch.load cannot read it (UnpicklingError: {err})") from None
        raise VGSKitError(f"checkpoint {p}: holds pickled Python objects besides tensors, which the safe loader "
                          "(torch.load(weights_only=True)) refuses; if you trust the file, pass --allow-pickle "
                          "(allow_pickle=True)") from None
    except Exception as err:  # a truncated or foreign file: torch raises RuntimeError, EOFError, ...
        raise VGSKitError(f"checkpoint {p}: torch.load cannot read it ({type(err).__name__}: {err})") from None


def bundle_parts(obj: Any, parts: Sequence[str], family: str, where: str) -> dict[str, dict[str, Tensor]]:
    """The state dicts ``parts`` of a loaded bundle ``obj`` (a DataParallel ``module.`` prefix removed).

    Raises:
        VGSKitError: naming ``where``: ``obj`` is not a mapping holding every part, or an entry is not a tensor.
    """
    if not isinstance(obj, Mapping) or not all(isinstance(obj.get(k), Mapping) for k in parts):
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        wanted = " and ".join(repr(k) for k in parts) + (" state dicts" if len(parts) > 1 else " state dict")
        raise VGSKitError(f"checkpoint {where}: expected a {family} bundle with {'a ' * (len(parts) == 1)}{wanted}, "
                          f"got {keys}")
    out: dict[str, dict[str, Tensor]] = {}
    for part in parts:
        state: dict[str, Tensor] = {}
        for key, value in obj[part].items():
            if not isinstance(key, str) or not isinstance(value, Tensor):
                raise VGSKitError(f"checkpoint {where}: {part} entry {key!r} is not a tensor")
            state[key[len("module."):] if key.startswith("module.") else key] = value
        out[part] = state
    return out


def read_bundle_parts(path: str | Path, parts: Sequence[str], family: str, *,
                      allow_pickle: bool = False) -> dict[str, dict[str, Tensor]]:
    """The state dicts ``parts`` (e.g. ``("dual_encoder", "cross_encoder")``) of a ``best_bundle.pth`` file.

    Raises:
        VGSKitError: the file is unreadable, refused by the safe loader, or lacks one of ``parts``.
    """
    return bundle_parts(_load(Path(path), allow_pickle), parts, family, str(path))


def read_reference_args(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """The training arguments pickled in a reference ``args.pkl``, as a plain dict.

    Unpickling can run code, so the file is read only with ``allow_pickle=True``; classes other than
    ``argparse.Namespace`` become inert stand-ins, so none of the reference's code is needed.

    Raises:
        VGSKitError: ``allow_pickle`` is not set, or the file is not a pickled Namespace / mapping.
    """
    p = Path(path)
    if not allow_pickle:
        raise VGSKitError(f"{p}: is a pickle (the reference's training arguments), which is read only with "
                          "--allow-pickle (allow_pickle=True), and only for files you trust; or give the sizes with "
                          "--config / --set")
    try:
        with open(p, "rb") as f:
            obj = StandInUnpickler(f).load()
    except Exception as err:  # OSError, UnpicklingError, EOFError, ...
        raise VGSKitError(f"{p}: cannot be unpickled ({type(err).__name__}: {err})") from None
    if isinstance(obj, argparse.Namespace):
        return dict(vars(obj))
    if isinstance(obj, Mapping):
        return dict(obj)
    raise VGSKitError(f"{p}: expected a pickled argparse.Namespace, got {type(obj).__name__}")
