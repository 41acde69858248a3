"""Shared fixtures: a tiny spoken-scenes corpus generated once per pytest run."""

from __future__ import annotations

from pathlib import Path

import pytest

from vgskit.data.synthetic import PRESETS, generate_spoken_scenes


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vgskit cache folder holding the generated ``spoken-scenes-tiny`` corpus."""
    root = tmp_path_factory.mktemp("vgskit-cache")
    generate_spoken_scenes(root / "spoken-scenes-tiny", PRESETS["tiny"], workers=2, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_manifest(tiny_cache: Path) -> Path:
    return tiny_cache / "spoken-scenes-tiny" / "manifest.jsonl"
