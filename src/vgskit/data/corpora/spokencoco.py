"""SpokenCOCO: ~605k spoken captions of the 123,287 COCO-2014 images.

Layout as distributed (``--root`` is the COCO folder holding ``SpokenCOCO/``, ``train2014/`` and ``val2014/``,
or the ``SpokenCOCO`` folder itself)::

    SpokenCOCO/SpokenCOCO_{train,val}.json                 original split (COCO 2014 train / val)
    SpokenCOCO/SpokenCOCO_{train,val,test}_karpathy.json   Karpathy split
    SpokenCOCO/SpokenCOCO_{train,val}_unrolled.json        "unrolled" forms: one entry per caption
    SpokenCOCO/SpokenCOCO_{train,val,test}_unrolled_karpathy.json
    SpokenCOCO/wavs/{train,val}/<k>/<uttid>.wav
    train2014/COCO_train2014_<id>.jpg, val2014/COCO_val2014_<id>.jpg

Per-image JSON: ``{"data": [{"image": "val2014/COCO_val2014_….jpg", "captions": [{"text", "speaker", "uttid",
"wav"}, …]}]}``; unrolled JSON: ``{"data": [{"image": …, "caption": {"text", "speaker", "uttid", "wav"}}]}``.
``wav`` is relative to the JSON's folder, ``image`` to the COCO image root. Both forms are read (``form``).

Splits: ``scheme="karpathy"`` gives ``train`` / ``val`` / ``test`` with 113,287 / 5,000 / 5,000 images; Karpathy's
``restval`` (30,504 images of COCO val2014) is part of ``train``, as in the Karpathy SpokenCOCO files and in the
published retrieval results. When only the original files are present, Karpathy's ``dataset_coco.json``
(``images[].filename`` / ``.split``) is used to re-split them. ``scheme="original"`` gives ``train`` / ``val``
(82,783 / 40,504 images). ``caption_id`` is the ``uttid``, ``image_id`` the image file stem.
"""

from __future__ import annotations

from collections.abc import Iterator
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

SCHEMES = {"karpathy": ("train", "val", "test"), "original": ("train", "val")}
FORMS = ("auto", "per_image", "unrolled")
KARPATHY_SPLIT = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _names(scheme: str, split: str, form: str) -> list[str]:
    suffix = "_karpathy" if scheme == "karpathy" else ""
    per_image = f"SpokenCOCO_{split}{suffix}.json"
    unrolled = f"SpokenCOCO_{split}_unrolled{suffix}.json"
    return {"per_image": [per_image], "unrolled": [unrolled], "auto": [per_image, unrolled]}[form]


def _captions(path: Path, data: object) -> Iterator[tuple[str, dict, str]]:
    """Yield ``(image, caption dict, where)`` from either JSON form."""
    require(isinstance(data, dict) and isinstance(data.get("data"), list), path, "top level",
            'expected {"data": [...]} (a SpokenCOCO JSON)')
    assert isinstance(data, dict)
    require_entries(data["data"], path)
    for i, entry in enumerate(data["data"]):
        where = f"data[{i}]"
        image = get_str(entry, "image", path, where)
        assert image is not None
        if isinstance(entry.get("captions"), list):
            for j, cap in enumerate(entry["captions"]):
                yield image, cap, f"{where}.captions[{j}]"
        elif isinstance(entry.get("caption"), dict):
            yield image, entry["caption"], f"{where}.caption"
        else:
            raise PrepareError(f"{path}: {where}: expected a 'captions' list (per-image form) or a 'caption' "
                               f"object (unrolled form); keys present: {sorted(entry)}")


def _first_image(data: object) -> str | None:
    try:
        return str(data["data"][0]["image"])  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return None


def prepare_spokencoco(
    root: str | Path,
    out: str | Path,
    *,
    scheme: str = "karpathy",
    form: str = "auto",
    images: str | Path | None = None,
    on_missing: str = "drop",
    check_files: bool = True,
) -> Path:
    """Write ``out/manifest.jsonl`` for SpokenCOCO (``scheme``: ``karpathy`` or ``original``; ``form``:
    ``per_image``, ``unrolled`` or ``auto``, which prefers per-image files). ``images`` is the COCO image root
    (the folder holding ``train2014/`` and ``val2014/``); by default it is looked for near the JSON files."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise PrepareError(f"corpus root {root} is not a folder")
    if scheme not in SCHEMES:
        raise PrepareError(f"scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    if form not in FORMS:
        raise PrepareError(f"form must be one of {FORMS}, got {form!r}")

    # (json path, split name or None = re-split with Karpathy's file)
    sources: list[tuple[Path, str | None]] = []
    resplit: dict[str, str] | None = None
    found = {s: find_optional(root, _names(scheme, s, form), subdirs=["SpokenCOCO"]) for s in SCHEMES[scheme]}
    if all(found.values()):
        sources = [(p, s) for s, p in found.items() if p is not None]
    elif scheme == "karpathy" and not any(found.values()):
        originals = {s: find_optional(root, _names("original", s, form), subdirs=["SpokenCOCO"])
                     for s in SCHEMES["original"]}
        kp = find_optional(root, ["dataset_coco.json"], subdirs=["SpokenCOCO"])
        if not all(originals.values()) or kp is None:
            wanted = " / ".join(n for s in SCHEMES["karpathy"] for n in _names("karpathy", s, form))
            raise PrepareError(
                f"SpokenCOCO Karpathy split not found under {root} (or {root / 'SpokenCOCO'}): expected {wanted}, "
                "or SpokenCOCO_{train,val}.json together with Karpathy's dataset_coco.json"
            )
        resplit = _karpathy_split(kp)
        sources = [(p, None) for p in originals.values() if p is not None]
    else:
        absent = [" or ".join(_names(scheme, s, form)) for s, p in found.items() if p is None]
        raise PrepareError(f"SpokenCOCO ({scheme} split): index file(s) not found under {root} "
                           f"(or {root / 'SpokenCOCO'}): {'; '.join(absent)}")

    builder = ManifestBuilder(f"spokencoco_{scheme}", Path(out), on_missing=on_missing, check_files=check_files)
    image_root = as_path(images)
    not_in_split = 0
    for path, split in sources:
        data = load_json(path)
        if image_root is None:
            image_root = pick_base([root, path.parent.parent, path.parent, root / "images", root.parent],
                                   _first_image(data))
            if image_root is None:
                raise PrepareError(f"COCO image root not found for {path}; pass images=DIR (--images)")
        for image, cap, where in _captions(path, data):
            uttid = get_str(cap, "uttid", path, where)
            wav = get_str(cap, "wav", path, where)
            assert uttid is not None and wav is not None
            stem = Path(image).stem
            name = split
            if resplit is not None:
                name = resplit.get(Path(image).name)
                if name is None:
                    not_in_split += 1
                    continue
            assert name is not None
            builder.add(
                caption_id=uttid,
                audio=path.parent / wav,
                image=image_root / image,
                image_id=stem,
                split=name,
                text=get_str(cap, "text", path, where, required=False),
                speaker=get_str(cap, "speaker", path, where, required=False),
            )
    builder.notes.update(
        scheme=scheme,
        index_files=[str(p) for p, _ in sources],
        image_root=str(image_root),
        karpathy_resplit=resplit is not None,
        captions_not_in_any_split=not_in_split,
    )
    return builder.finish()


def _karpathy_split(path: Path) -> dict[str, str]:
    data = load_json(path)
    require(isinstance(data, dict) and isinstance(data.get("images"), list), path, "top level",
            'expected {"images": [...]} (Karpathy\'s dataset_coco.json)')
    require_entries(data["images"], path, "images")
    out: dict[str, str] = {}
    for i, img in enumerate(data["images"]):
        name = get_str(img, "filename", path, f"images[{i}]")
        split = get_str(img, "split", path, f"images[{i}]")
        assert name is not None and split is not None
        if split not in KARPATHY_SPLIT:
            raise PrepareError(f"{path}: images[{i}]: unknown split {split!r} (expected train, restval, val, test)")
        out[name] = KARPATHY_SPLIT[split]
    return out
