"""Places Audio Captions (400k) with the 2020 splits.

Layout::

    <split>_2020.json            split in train, dev_seen, dev_unseen, test_seen, test_unseen; looked for in
                                 --root, metadata/, PlacesAudio_400k_distro/metadata/, placesaudio_2020_splits/
    PlacesAudio_400k_distro/wavs/<k>/utterance_<n>.wav
    <Places205 images>/<letter>/<category>/gsun_<hash>.jpg
                                 e.g. data/vision/torralba/deeplearning/images256/ from the Places205 archive

Each JSON is ``{"image_base_path": …, "audio_base_path": …, "data": [{"uttid", "speaker", "asr_text", "wav",
"image"}, …]}``: ``wav`` is relative to the audio folder, ``image`` to the Places205 image folder. The base paths
stored in the JSON are those of the machine that wrote it and are used only if they exist here; otherwise the
audio folder is ``PlacesAudio_400k_distro`` (or ``--audio``) and the image folder is found by looking for the
first listed image (or ``--images``). ``text`` is the distribution's ``asr_text`` (an ASR transcript, not a
manual one). ``caption_id`` is the ``uttid``, ``image_id`` the image file stem.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vgskit.data.corpora._common import (
    ManifestBuilder,
    PrepareError,
    as_path,
    find_optional,
    get_str,
    load_json,
    pick_base,
    require,
    require_entries,
)

SPLITS = ("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen")
JSON_DIRS = ("metadata", "PlacesAudio_400k_distro/metadata", "placesaudio_2020_splits", "splits")
AUDIO_DIRS = ("PlacesAudio_400k_distro", "PlacesAudio", "audio")
IMAGE_DIRS = ("data/vision/torralba/deeplearning/images256", "images256", "Places205", "images", "data")


def _base(value: object) -> Path | None:
    return Path(value) if isinstance(value, str) and value else None


def prepare_places(
    root: str | Path,
    out: str | Path,
    *,
    splits: Sequence[str] = SPLITS,
    audio: str | Path | None = None,
    images: str | Path | None = None,
    on_missing: str = "drop",
    check_files: bool = True,
) -> Path:
    """Write ``out/manifest.jsonl`` for Places Audio with the 2020 splits (all five by default)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise PrepareError(f"corpus root {root} is not a folder")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise PrepareError(f"unknown Places split(s) {unknown}; choose from {', '.join(SPLITS)}")
    paths = {s: find_optional(root, [f"{s}_2020.json"], subdirs=JSON_DIRS) for s in splits}
    absent = [f"{s}_2020.json" for s, p in paths.items() if p is None]
    if absent:
        raise PrepareError(f"Places 2020 split file(s) not found: {', '.join(absent)}; expected in {root} or its "
                           f"{', '.join(JSON_DIRS)} folders")

    builder = ManifestBuilder("places", Path(out), on_missing=on_missing, check_files=check_files)
    audio_root, image_root = as_path(audio), as_path(images)
    for split, path in paths.items():
        assert path is not None
        data = load_json(path)
        require(isinstance(data, dict) and isinstance(data.get("data"), list), path, "top level",
                'expected {"data": [...]} (a Places audio 2020 split file)')
        entries = data["data"]
        require_entries(entries, path)
        first = entries[0] if isinstance(entries[0], dict) else {}
        if audio_root is None:
            audio_root = pick_base([_base(data.get("audio_base_path")), *(root / d for d in AUDIO_DIRS), root],
                                   first.get("wav"))
        if image_root is None:
            image_root = pick_base([_base(data.get("image_base_path")), *(root / d for d in IMAGE_DIRS), root],
                                   first.get("image"))
        assert audio_root is not None and image_root is not None  # root itself exists
        for i, entry in enumerate(entries):
            where = f"data[{i}]"
            uttid = get_str(entry, "uttid", path, where)
            wav = get_str(entry, "wav", path, where)
            image = get_str(entry, "image", path, where)
            assert uttid is not None and wav is not None and image is not None
            builder.add(
                caption_id=uttid,
                audio=audio_root / wav,
                image=image_root / image,
                image_id=Path(image).stem,
                split=split,
                text=get_str(entry, "asr_text", path, where, required=False),
                speaker=get_str(entry, "speaker", path, where, required=False),
            )
    builder.notes.update(index_files={s: str(p) for s, p in paths.items()}, audio_root=str(audio_root),
                         image_root=str(image_root))
    return builder.finish()
