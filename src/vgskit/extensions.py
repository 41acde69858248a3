"""Registries through which a model family extends the generic rooms without editing them.

A family package (``vgskit/models/<family>/``) registers, when it is imported:

* **evaluations** it owns (SpeechCLIP's keyword hit rate, later word segmentation), requested by name from
  :func:`vgskit.retrieval.evaluate.evaluate` (``extras=[...]``) and ``vgskit eval --extra NAME``;
* a **converter** of released reference checkpoints, run by ``vgskit convert FAMILY ...``;
* **commands** of its own (``vgskit keywords``), added to the command line.

Example (in a family package)::

    @register_evaluation("keyword_hit_rate", require_model=require_keyword_branch, options={"top_k": 5},
                         help="per-slot keyword hit rate (cascaded SpeechCLIP)")
    def keyword_hit_rate(model, dataset, *, batch_size, source, options, speech_emb): ...

    register_converter("speechclip", add_arguments=add_convert_args, run=convert_command,
                       help="a released SpeechCLIP checkpoint -> vgskit model")
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vgskit.errors import ConfigError

#: ``fn(model, dataset, *, batch_size, source, options, speech_emb) -> dict``: ``source`` names the data (for
#: errors), ``options`` holds the evaluation's own settings, ``speech_emb`` the coarse speech embeddings
#: the recall pass computed (``[Nc, D]``, reuse them instead of a second pass).
EvaluationFn = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Evaluation:
    """A named evaluation a family offers.

    Attributes:
        fn: see :data:`EvaluationFn`; its ``options`` are the defaults below updated with the caller's.
        require_model: ``require_model(model)`` raising a clear error when the model cannot support the
            evaluation (checked once, before any data is read); ``None`` = any model.
        require_data: ``require_data(dataset, source)`` raising a clear error when the data cannot (e.g.
            captions without transcripts), checked before the long embedding pass; ``None`` = any data.
        format: ``format(result) -> str`` for the command line (``None``: JSON only).
        options: option name → default value.
        add_arguments: adds the evaluation's own ``vgskit eval`` flags; ``None`` adds ``--<name>``
            (underscores as dashes) that requests it with the default options.
        from_args: the options requested by the parsed flags, or ``None`` when the evaluation was not asked
            for; ``None`` reads the ``--<name>`` flag.
        help: one line for ``vgskit eval --help``.
    """

    name: str
    fn: EvaluationFn
    require_model: Callable[[Any], None] | None = None
    require_data: Callable[[Any, str], None] | None = None
    format: Callable[[Mapping[str, Any]], str] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    from_args: Callable[[argparse.Namespace], dict[str, Any] | None] | None = None
    help: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def add_cli_arguments(self, parser: argparse.ArgumentParser) -> None:
        if self.add_arguments is not None:
            self.add_arguments(parser)
        else:
            parser.add_argument(self.flag, action="store_true", help=self.help)

    def options_from_args(self, args: argparse.Namespace) -> dict[str, Any] | None:
        if self.from_args is not None:
            return self.from_args(args)
        return {} if getattr(args, self.name, False) else None


@dataclass(frozen=True)
class Command:
    """A command-line subcommand a family adds: ``add_arguments(parser)`` then ``run(args) -> exit code``."""

    name: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str = ""


_EVALUATIONS: dict[str, Evaluation] = {}
_CONVERTERS: dict[str, Command] = {}
_COMMANDS: dict[str, Command] = {}


def _load_families() -> None:
    import vgskit.models  # noqa: F401  (importing the package imports every family, which registers)


def register_evaluation(name: str, **fields: Any) -> Callable[[EvaluationFn], EvaluationFn]:
    """Decorator registering a family evaluation under ``name``; ``fields`` are :class:`Evaluation`'s."""

    def decorator(fn: EvaluationFn) -> EvaluationFn:
        previous = _EVALUATIONS.get(name)
        if previous is not None and previous.fn.__qualname__ != fn.__qualname__:
            raise ConfigError(f"evaluation {name!r} is already registered to {previous.fn.__qualname__}")
        _EVALUATIONS[name] = Evaluation(name, fn, **fields)
        return fn

    return decorator


def get_evaluation(name: str) -> Evaluation:
    _load_families()
    if name not in _EVALUATIONS:
        raise ConfigError(f"unknown evaluation {name!r}; available: {sorted(_EVALUATIONS)}")
    return _EVALUATIONS[name]


def list_evaluations() -> list[str]:
    _load_families()
    return sorted(_EVALUATIONS)


def _register_command(table: dict[str, Command], what: str, name: str, add_arguments: Any, run: Any,
                      help: str) -> None:
    previous = table.get(name)
    if previous is not None and previous.run.__qualname__ != run.__qualname__:
        raise ConfigError(f"{what} {name!r} is already registered")
    table[name] = Command(name, add_arguments, run, help)


def register_converter(family: str, *, add_arguments: Callable[[argparse.ArgumentParser], None],
                       run: Callable[[argparse.Namespace], int], help: str = "") -> None:
    """Register ``vgskit convert FAMILY``: ``add_arguments`` adds its options, ``run`` converts."""
    _register_command(_CONVERTERS, "converter", family, add_arguments, run, help)


def register_command(name: str, *, add_arguments: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int], help: str = "") -> None:
    """Register a family's own subcommand ``vgskit NAME``."""
    _register_command(_COMMANDS, "command", name, add_arguments, run, help)


def converters() -> dict[str, Command]:
    _load_families()
    return dict(sorted(_CONVERTERS.items()))


def commands() -> dict[str, Command]:
    _load_families()
    return dict(sorted(_COMMANDS.items()))


__all__ = [
    "Command",
    "Evaluation",
    "commands",
    "converters",
    "get_evaluation",
    "list_evaluations",
    "register_command",
    "register_converter",
    "register_evaluation",
]
