"""Unpickling trusted reference checkpoints without the reference code installed (shared by the converters).

Released checkpoints of the reference implementations pickle their own classes (Lightning hyper-parameters,
``argparse.Namespace`` run arguments). None of that code is needed to convert weights, so every class that is not
installed here becomes an :class:`UnpickledObject` that keeps the pickled data and runs no code of the original.
Only for files the user trusts: converters reach this only behind an explicit allow-pickle flag.
"""

from __future__ import annotations

import argparse
import pickle
import types
from collections.abc import Mapping
from typing import Any


class UnpickledObject(dict):
    """Stands in for a class that is not installed while a trusted file is unpickled (no code of it runs).

    Items, constructor arguments and state are kept as data; a mapping state is also merged into the items.
    """

    origin = ""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, Mapping):
            self.update(state)
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.origin} (not installed): {dict(self)!r}>"


def _placeholder(module: str, name: str) -> type:
    return type(name, (UnpickledObject,), {"origin": f"{module}.{name}", "__module__": module})


class StandInUnpickler(pickle.Unpickler):
    """Resolves ``argparse.Namespace`` and installed classes; anything else becomes an :class:`UnpickledObject`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _placeholder(module, name)


def stand_in_pickle_module() -> types.ModuleType:
    """A module for ``torch.load(..., pickle_module=...)`` that unpickles with :class:`StandInUnpickler`."""
    # torch.load subclasses ``Unpickler`` and reads ``load`` (older file formats).
    module = types.ModuleType("vgskit_stand_in_pickle")
    module.Unpickler = StandInUnpickler  # type: ignore[attr-defined]
    module.load = lambda file, **kwargs: StandInUnpickler(file, **kwargs).load()  # type: ignore[attr-defined]
    return module


__all__ = ["StandInUnpickler", "UnpickledObject", "stand_in_pickle_module"]
