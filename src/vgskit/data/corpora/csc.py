"""Conceptual Spoken Captions (CSC): synthesised speech for the Conceptual Captions (CC3M) text, used only to
pretrain before fine-tuning on a target corpus.

There is no single public CSC archive, so the layout supported is Conceptual Captions' own index plus one audio
file and one downloaded image per index row::

    Train_GCC-training.tsv                   "<caption>\\t<url>" per line, no header (CC3M training set)
    Validation_GCC-1.1.0-Validation.tsv      the same for the validation set
    audio/{train,val}/<row>.{wav,flac,ogg,mp3}
    images/{train,val}/<row>.{jpg,jpeg,png,webp}

``<row>`` is the 0-based line number of the TSV, zero-padded or not, optionally inside sub-folders (as written
by downloaders that shard, e.g. ``00000/000000123.jpg``): files are matched by the integer value of their stem.
Conceptual Captions URLs die over time, so rows without an image are normal; they are reported and dropped
like any missing file. Splits: ``train`` / ``val``. ``caption_id`` is ``csc_<split>_<row>``, ``image_id`` is
``cc_<split>_<row>``; ``text`` is the caption that was synthesised.
"""

from __future__ import annotations

import os
from pathlib import Path

from vgskit.data.corpora._common import (
    ManifestBuilder,
    PrepareError,
    as_path,
    decimal,
    empty_index,
    find_optional,
    read_lines,
)

INDEX_FILES = {"train": "Train_GCC-training.tsv", "val": "Validation_GCC-1.1.0-Validation.tsv"}
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def _row_index(folder: Path, exts: tuple[str, ...]) -> dict[int, Path]:
    index: dict[int, Path] = {}
    if not folder.is_dir():
        return index
    for dirpath, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            row = decimal(stem)
            if ext.lower() in exts and row is not None:
                index.setdefault(row, Path(dirpath) / f)
    return index


def prepare_csc(
    root: str | Path,
    out: str | Path,
    *,
    audio: str | Path | None = None,
    images: str | Path | None = None,
    on_missing: str = "drop",
    check_files: bool = True,
) -> Path:
    """Write ``out/manifest.jsonl`` for CSC from whichever of the two Conceptual Captions TSVs are present.

    ``audio``/``images`` are the folders holding ``train/`` and ``val/`` (default ``root/audio``, ``root/images``).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise PrepareError(f"corpus root {root} is not a folder")
    tsvs = {s: find_optional(root, [name]) for s, name in INDEX_FILES.items()}
    if not any(tsvs.values()):
        raise PrepareError(f"Conceptual Captions index not found: expected {' and/or '.join(INDEX_FILES.values())} "
                           f"in {root}")
    audio_root = as_path(audio) or root / "audio"
    image_root = as_path(images) or root / "images"
    builder = ManifestBuilder("csc", Path(out), on_missing=on_missing, check_files=check_files)
    for split, tsv in tsvs.items():
        if tsv is None:
            continue
        wavs = _row_index(audio_root / split, AUDIO_EXTS)
        pics = _row_index(image_root / split, IMAGE_EXTS)
        rows = 0
        for lineno, line in read_lines(tsv):
            rows += 1
            caption, sep, _url = line.partition("\t")
            if not sep:
                raise PrepareError(f"{tsv}: line {lineno}: expected '<caption><TAB><url>', got {line[:80]!r}")
            row = lineno - 1
            builder.add(
                caption_id=f"csc_{split}_{row}",
                audio=wavs.get(row, audio_root / split / f"{row}.wav"),
                image=pics.get(row, image_root / split / f"{row}.jpg"),
                image_id=f"cc_{split}_{row}",
                split=split,
                text=caption,
            )
        if not rows:
            raise empty_index(tsv)
    builder.notes.update(index_files={s: str(p) for s, p in tsvs.items() if p}, audio_root=str(audio_root),
                         image_root=str(image_root), pretraining_only=True)
    return builder.finish()
