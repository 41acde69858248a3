"""Turn public visually grounded speech corpora, as unpacked from their distributions, into vgskit manifests.

``prepare_corpus(name, root, out, **options)`` writes ``out/manifest.jsonl`` (paths relative to ``out`` when
possible) and ``out/prepare_report.json`` (split sizes, missing files, options found), and returns the manifest
path. Each corpus module documents the layout it reads; :data:`vgskit.data.check.EXPECTED_COUNTS` holds the
standard split sizes that ``vgskit data check --expected`` compares against.

Missing audio/image files are never skipped silently: ``on_missing="drop"`` (default) leaves the affected
captions out and logs a warning listing the files (all of them are in the report), ``on_missing="error"``
raises :class:`MissingFilesError` and writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vgskit.data.corpora._common import MANIFEST_NAME, REPORT_NAME, MissingFilesError, PrepareError
from vgskit.data.corpora.csc import prepare_csc
from vgskit.data.corpora.flickr8k import prepare_flickr8k
from vgskit.data.corpora.localized_narratives import prepare_localized_narratives
from vgskit.data.corpora.places import prepare_places
from vgskit.data.corpora.spokencoco import prepare_spokencoco

__all__ = [
    "MANIFEST_NAME",
    "PREPARERS",
    "REPORT_NAME",
    "MissingFilesError",
    "PrepareError",
    "prepare_corpus",
]

PREPARERS: dict[str, Callable[..., Path]] = {
    "flickr8k": prepare_flickr8k,
    "spokencoco": prepare_spokencoco,
    "places": prepare_places,
    "localized_narratives": prepare_localized_narratives,
    "csc": prepare_csc,
}


def prepare_corpus(name: str, root: str | Path, out: str | Path, **opts: Any) -> Path:
    """Prepare corpus ``name`` (a key of :data:`PREPARERS`; ``-`` and ``_`` are interchangeable) found under
    ``root`` into ``out``; return the manifest path. ``opts`` are the preparer's keyword options."""
    key = name.replace("-", "_").lower()
    if key not in PREPARERS:
        raise PrepareError(f"unknown corpus {name!r}; choose from {', '.join(PREPARERS)}")
    try:
        return PREPARERS[key](root, out, **opts)
    except TypeError as exc:
        # An option meant for another corpus (e.g. scheme= for places) would otherwise surface as a bare
        # Python TypeError from deep inside the call.
        if "unexpected keyword argument" in str(exc):
            raise PrepareError(f"{key}: {exc}") from exc
        raise
