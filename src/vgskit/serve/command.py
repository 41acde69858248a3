"""``vgskit serve``: its options, and loading the checkpoint and indices before the server starts.

This module imports nothing of the ``serve`` extra at import time, so that ``vgskit`` and its ``--help`` work
without it; the command checks the extra first and names it when missing.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from vgskit.errors import VGSKitError
from vgskit.serve.limits import ServeLimits, require_serve_extra

_DEFAULTS = ServeLimits()


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder, saved model folder or Hugging Face Hub id owner/name[@revision]")
    p.add_argument("--index", action="append", required=True, metavar="NAME=DIR",
                   help="a search index built by `vgskit index` with this checkpoint, served as NAME (repeat for "
                        "several; the first is the default; DIR alone is named after its folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (e.g. https://example.org, or '*') to call the service "
                        "(repeatable; default: none, no CORS header is sent)")
    p.add_argument("--max-upload-mb", type=float, default=_DEFAULTS.max_upload_bytes / 2**20,
                   help=f"largest request body in MiB (default: {_DEFAULTS.max_upload_bytes / 2**20:g})")
    p.add_argument("--max-audio-seconds", type=float, default=_DEFAULTS.max_audio_seconds,
                   help=f"longest spoken query in seconds (default: {_DEFAULTS.max_audio_seconds:g})")
    p.add_argument("--max-k", type=int, default=_DEFAULTS.max_k,
                   help=f"most hits a query may ask for (default: {_DEFAULTS.max_k})")
    p.add_argument("--max-concurrent", type=int, default=_DEFAULTS.max_concurrent_searches,
                   help="searches running at once; more are answered 503 with Retry-After "
                        f"(default: {_DEFAULTS.max_concurrent_searches})")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="embed queries in bf16 where the CPU has it natively (fp32 fallback with a warning)")
    p.add_argument("--max-connections", type=int, default=64,
                   help="open connections the server accepts before answering 503 (default: 64)")


def parse_index_options(values: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` (or ``DIR``, named after its folder) -> {name: folder}, refusing duplicates and non-folders."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep:
            name, folder = Path(value).resolve().name, value
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", name):
            raise VGSKitError(f"--index {value}: the name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                              "(it is part of URLs); give it as NAME=DIR")
        if name in out:
            raise VGSKitError(f"--index {value}: the name {name!r} is given twice")
        path = Path(folder)
        if not path.is_dir():
            raise VGSKitError(f"--index {value}: {path} " + ("is a file, not an index folder" if path.exists()
                                                             else "does not exist (build it with `vgskit index`)"))
        out[name] = path
    return out


def limits_from_args(args: argparse.Namespace) -> ServeLimits:
    if not args.max_upload_mb > 0:
        raise VGSKitError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    for option, value in (("--max-k", args.max_k), ("--max-concurrent", args.max_concurrent),
                          ("--max-connections", args.max_connections)):
        if value < 1:
            raise VGSKitError(f"{option} must be >= 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise VGSKitError(f"--port must be between 0 and 65535, got {args.port}")
    if not args.max_audio_seconds > 0:
        raise VGSKitError(f"--max-audio-seconds must be positive, got {args.max_audio_seconds}")
    return ServeLimits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_audio_seconds=args.max_audio_seconds,
                       max_k=args.max_k, default_k=min(_DEFAULTS.default_k, args.max_k),
                       max_concurrent_searches=args.max_concurrent, cors_origins=tuple(args.cors_origin))


def run_serve(args: argparse.Namespace) -> int:
    """Check the options, load the checkpoint and every index, then serve until interrupted."""
    require_serve_extra()
    limits = limits_from_args(args)
    folders = parse_index_options(args.index)

    from vgskit.experiment import load_model_named
    from vgskit.retrieval.engine import SearchEngine

    model = load_model_named(args.checkpoint)
    engines = {}
    for name, folder in folders.items():
        try:
            engines[name] = SearchEngine.load(folder, model, precision=getattr(args, "precision", "fp32"))
        except VGSKitError as err:
            raise VGSKitError(f"--index {name}={folder}: {err}") from None

    import uvicorn

    from vgskit.serve.app import create_app, image_paths_missing

    app = create_app(model, engines, limits=limits)
    for name, missing in image_paths_missing(app).items():
        if missing:
            print(f"vgskit: warning: index {name!r}: {len(missing)} of {len(engines[name].image_ids)} image files "
                  f"are missing (e.g. id {missing[0]!r}); their image URLs answer 404")
    print(f"vgskit: serving {', '.join(f'{n} ({len(e.image_ids)} images)' for n, e in engines.items())} "
          f"on http://{args.host}:{args.port} (docs: /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, limit_concurrency=args.max_connections,
                log_level="info", server_header=False)
    return 0
