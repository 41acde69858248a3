"""The standard splits of each corpus: which split trains, which one selects checkpoints, and which ones the
papers report on. ``DataConfig(corpus=...)`` and ``vgskit train/eval --corpus NAME`` use this table so that a
prepared corpus goes to training and evaluation in one line::

    vgskit train --recipe demo --manifest data/facc/manifest.jsonl --corpus flickr8k --out runs/facc
    vgskit eval --checkpoint runs/facc --manifest data/facc/manifest.jsonl --corpus flickr8k   # split "test"
    vgskit eval --checkpoint runs/places --manifest data/places/manifest.jsonl --corpus places  # test_seen + test_unseen

Split names are those written by ``vgskit data prepare`` (:mod:`vgskit.data.corpora`).
"""

from __future__ import annotations

from dataclasses import dataclass

from vgskit.errors import ConfigError


@dataclass(frozen=True)
class CorpusSplits:
    train: str
    val: str
    test: tuple[str, ...]
    note: str = ""


STANDARD_SPLITS: dict[str, CorpusSplits] = {
    "spoken_scenes": CorpusSplits("train", "val", ("test",), "embedded corpus; 500 test images"),
    "flickr8k": CorpusSplits("train", "dev", ("test",), "1,000 test images / 5,000 captions"),
    "spokencoco_karpathy": CorpusSplits("train", "val", ("test",), "Karpathy test: 5,000 images / ~25,000 captions"),
    "spokencoco_original": CorpusSplits("train", "val", ("val",), "COCO-2014 val; papers report the Karpathy test"),
    "places": CorpusSplits("train", "dev_seen", ("test_seen", "test_unseen"), "2020 splits, one caption per image"),
    "localized_narratives": CorpusSplits("train", "validation", ("test",), "per collection; OpenImages has 'test'"),
    "csc": CorpusSplits("train", "val", (), "pretraining only: no test split is reported"),
}
ALIASES = {"spokencoco": "spokencoco_karpathy", "facc": "flickr8k"}


def corpus_splits(name: str) -> CorpusSplits:
    """The standard splits of corpus ``name`` (``-``/``_`` and a few short names are accepted)."""
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in STANDARD_SPLITS:
        raise ConfigError(f"unknown corpus {name!r} for split selection; known: {sorted(STANDARD_SPLITS)}")
    return STANDARD_SPLITS[key]
