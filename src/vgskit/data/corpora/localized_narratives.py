"""Localized Narratives: spoken image descriptions (≈40 s each) over COCO, Open Images, Flickr30k and ADE20k.

Layout::

    <collection>_<split>[_v6]_localized_narratives[-NNNNN-of-NNNNN].jsonl
        e.g. coco_train_localized_narratives-00000-of-00004.jsonl, coco_val_localized_narratives.jsonl,
        open_images_train_v6_localized_narratives-00000-of-00010.jsonl, open_images_validation_…,
        flickr30k_{train,val,test}_…, ade20k_{train,validation}_…
    voice-recordings/<collection>_<split>/<collection>_<split>_<image_id>_<annotator_id>.ogg
                                 (the ``voice_recording`` field, relative to the recordings folder)
    images: one folder per collection (``images={"coco": DIR, ...}``) or one folder for all

Each JSONL line holds ``dataset_id``, ``image_id``, ``annotator_id``, ``caption`` (the manual transcription),
``timed_caption``, ``traces`` and ``voice_recording``. Images are matched by file stem: ``<image_id>`` (Open Images,
Flickr30k, ADE20k) or the zero-padded COCO names (``000000137576.jpg``, ``COCO_val2014_000000137576.jpg``).

Splits keep the collection's own names (``train``, ``val``, ``validation``, ``test``); several collections can
be prepared together. ``caption_id`` is the recording's stem (unique: one recording per image and annotator),
``image_id`` is ``<collection>_<image_id>``, so ids never collide across collections, and ``speaker`` is the
annotator id.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from vgskit.data.corpora._common import (
    SEARCH_DEPTH,
    ManifestBuilder,
    PrepareError,
    as_path,
    decimal,
    empty_index,
    find_dir,
    get_str,
    read_json_lines,
    walk_limited,
)

COLLECTIONS = ("open_images", "flickr30k", "ade20k", "coco")
AUDIO_DIRS = ("voice-recordings", "voice_recordings", "recordings", "audio")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_FILE_RE = re.compile(r"^(?P<prefix>.+?)_localized_narratives(?:-\d+-of-\d+)?\.jsonl$")


def parse_file_name(name: str) -> tuple[str, str] | None:
    """``"open_images_train_v6_localized_narratives-00001-of-00010.jsonl"`` -> ``("open_images", "train")``."""
    m = _FILE_RE.match(name)
    if not m:
        return None
    prefix = m.group("prefix")
    for coll in COLLECTIONS:
        if prefix.startswith(coll + "_"):
            return coll, prefix[len(coll) + 1:].split("_")[0]
    return None


def _image_index(folder: Path) -> dict[str, Path]:
    """Map image stems (and, for numeric COCO names, their integer ids) to files below ``folder``."""
    index: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            stem, ext = os.path.splitext(f)
            if ext.lower() not in IMAGE_EXTS:
                continue
            path = Path(dirpath) / f
            index.setdefault(stem, path)
            digits = re.search(r"(\d+)$", stem)
            if digits:  # COCO: 000000137576 / COCO_val2014_000000137576 are image 137576
                index.setdefault(f"#{int(digits.group(1))}", path)
    return index


def prepare_localized_narratives(
    root: str | Path,
    out: str | Path,
    *,
    collections: Sequence[str] | None = None,
    audio: str | Path | None = None,
    images: str | Path | Mapping[str, str | Path] | None = None,
    on_missing: str = "drop",
    check_files: bool = True,
) -> Path:
    """Write ``out/manifest.jsonl`` for the Localized Narratives JSONL files found under ``root``.

    ``collections`` restricts to some of coco, open_images, flickr30k, ade20k. ``images`` is a folder (used for
    every collection) or a mapping collection -> folder; default: ``root/images/<collection>`` or
    ``root/images``. ``audio`` is the recordings folder (default ``root/voice-recordings`` or ``root``).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise PrepareError(f"corpus root {root} is not a folder")
    wanted = set(collections or COLLECTIONS)
    bad = wanted - set(COLLECTIONS)
    if bad:
        raise PrepareError(f"unknown Localized Narratives collection(s) {sorted(bad)}; choose from {COLLECTIONS}")
    files: list[tuple[Path, str, str]] = []
    for here, _dirs, names in walk_limited(root):
        for name in names:
            parsed = parse_file_name(name)
            if parsed and parsed[0] in wanted:
                files.append((here / name, *parsed))
    if not files:
        raise PrepareError(f"no Localized Narratives files for {sorted(wanted)} under {root} (expected names like "
                           f"coco_val_localized_narratives.jsonl, up to {SEARCH_DEPTH} folders deep)")

    audio_root = as_path(audio) or find_dir(root, AUDIO_DIRS) or root
    image_dirs: dict[str, Path] = {}
    for coll in {c for _, c, _ in files}:
        if isinstance(images, Mapping):
            if coll not in images:
                raise PrepareError(f"no image folder given for collection {coll!r} (images={dict(images)})")
            image_dirs[coll] = Path(images[coll]).expanduser()
        elif images is not None:
            image_dirs[coll] = Path(images).expanduser()
        else:
            image_dirs[coll] = next((d for d in (root / "images" / coll, root / "images", root / coll)
                                     if d.is_dir()), root / "images" / coll)
    indexes = {d: _image_index(d) for d in set(image_dirs.values()) if d.is_dir()}

    builder = ManifestBuilder("localized_narratives", Path(out), on_missing=on_missing, check_files=check_files)
    for path, coll, split in sorted(files):
        index = indexes.get(image_dirs[coll], {})
        lines = 0
        for lineno, obj in read_json_lines(path):
            lines += 1
            where = f"line {lineno}"
            image_id = get_str(obj, "image_id", path, where)
            recording = get_str(obj, "voice_recording", path, where)
            assert image_id is not None and recording is not None
            number = decimal(image_id)
            image = index.get(image_id)
            if image is None and number is not None:
                image = index.get(f"#{number}")
            if image is None:  # reported as missing under the most likely name
                name = f"{number:012d}.jpg" if coll == "coco" and number is not None else f"{image_id}.jpg"
                image = image_dirs[coll] / name
            builder.add(
                caption_id=Path(recording).stem,
                audio=audio_root / recording,
                image=image,
                image_id=f"{coll}_{image_id}",
                split=split,
                text=get_str(obj, "caption", path, where, required=False),
                speaker=get_str(obj, "annotator_id", path, where, required=False),
            )
        if not lines:
            raise empty_index(path, "narratives")
    builder.notes.update(index_files=[str(p) for p, _, _ in sorted(files)], audio_root=str(audio_root),
                         image_dirs={c: str(d) for c, d in sorted(image_dirs.items())})
    return builder.finish()
