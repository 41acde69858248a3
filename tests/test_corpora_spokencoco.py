"""SpokenCOCO preparation: Karpathy and original splits, per-image and unrolled JSON, on a native-layout tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from vgskit.data.corpora import PrepareError, prepare_corpus
from vgskit.data.manifest import read_manifest, summarize

# (COCO folder, numeric id, Karpathy split)
IMAGES = [("train2014", 9, "train"), ("train2014", 25, "train"), ("val2014", 42, "restval"),
          ("val2014", 73, "val"), ("val2014", 74, "test")]


def _entry(root: Path, folder: str, num: int, *, broken: bool = False) -> dict:
    image = f"{folder}/COCO_{folder}_{num:012d}.jpg"
    (root / folder).mkdir(parents=True, exist_ok=True)
    if not broken:
        Image.new("RGB", (8, 8)).save(root / image)
    caps = []
    for k in range(2):
        uttid = f"SPK{k}-HIT{num}_{num}_{100 + k}"
        wav = f"wavs/{folder[:-4]}/{num % 3}/{uttid}.wav"
        (root / "SpokenCOCO" / wav).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / "SpokenCOCO" / wav, np.full(800, 0.1, np.float32), 16000)
        caps.append({"text": f"A PHOTO {num} {k}", "speaker": f"SPK{k}", "uttid": uttid, "wav": wav})
    return {"image": image, "captions": caps}


def _write(path: Path, entries: list[dict], unrolled: bool) -> None:
    if unrolled:
        entries = [{"image": e["image"], "caption": c} for e in entries for c in e["captions"]]
    path.write_text(json.dumps({"data": entries}))


def build(root: Path, *, unrolled: bool = False, karpathy: bool = True, original: bool = False) -> Path:
    sc = root / "SpokenCOCO"
    sc.mkdir(parents=True)
    entries = {(f, n): _entry(root, f, n, broken=(n == 25)) for f, n, _ in IMAGES}
    suffix = "_unrolled" if unrolled else ""
    if karpathy:
        for split in ("train", "val", "test"):
            sel = [e for (f, n, s) in IMAGES for e in [entries[(f, n)]] if {"restval": "train"}.get(s, s) == split]
            _write(sc / f"SpokenCOCO_{split}{suffix}_karpathy.json", sel, unrolled)
    if original:
        for split in ("train", "val"):
            sel = [entries[(f, n)] for f, n, _ in IMAGES if f == f"{split}2014"]
            _write(sc / f"SpokenCOCO_{split}{suffix}.json", sel, unrolled)
    return root


def _splits(manifest: Path) -> dict[str, tuple[int, int]]:
    s = summarize(read_manifest(manifest))
    return {k: (v["images"], v["captions"]) for k, v in s["splits"].items()}


@pytest.mark.parametrize("unrolled", [False, True])
def test_karpathy_split_both_forms(tmp_path: Path, unrolled: bool) -> None:
    root = build(tmp_path / "coco", unrolled=unrolled)
    manifest = prepare_corpus("spokencoco", root, tmp_path / "out")
    # Image 25 is missing on disk: its two captions are dropped and reported; restval (42) is in train.
    assert _splits(manifest) == {"train": (2, 4), "val": (1, 2), "test": (1, 2)}
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["missing_files"] == 1 and report["dropped_captions"] == 2
    assert report["missing"][0]["file"].endswith("train2014/COCO_train2014_000000000025.jpg")
    r = next(r for r in read_manifest(manifest) if r.caption_id == "SPK1-HIT42_42_101")
    assert (r.image_id, r.split, r.speaker, r.text) == ("COCO_val2014_000000000042", "train", "SPK1", "A PHOTO 42 1")
    assert r.audio.endswith("SpokenCOCO/wavs/val/0/SPK1-HIT42_42_101.wav")


def test_original_split_and_root_given_as_spokencoco_folder(tmp_path: Path) -> None:
    root = build(tmp_path / "coco", karpathy=False, original=True)
    manifest = prepare_corpus("spokencoco", root / "SpokenCOCO", tmp_path / "out", scheme="original")
    assert _splits(manifest) == {"train": (1, 2), "val": (3, 6)}


def test_karpathy_resplit_from_original_files_and_dataset_coco(tmp_path: Path) -> None:
    root = build(tmp_path / "coco", karpathy=False, original=True, unrolled=True)
    images = [{"filename": f"COCO_{f}_{n:012d}.jpg", "split": s} for f, n, s in IMAGES]
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
    manifest = prepare_corpus("spokencoco", root, tmp_path / "out")
    assert _splits(manifest) == {"train": (2, 4), "val": (1, 2), "test": (1, 2)}


def test_errors_name_the_expected_files(tmp_path: Path) -> None:
    root = build(tmp_path / "coco")
    (root / "SpokenCOCO" / "SpokenCOCO_test_karpathy.json").unlink()
    with pytest.raises(PrepareError, match="SpokenCOCO_test_karpathy.json"):
        prepare_corpus("spokencoco", root, tmp_path / "out")
    (root / "SpokenCOCO" / "SpokenCOCO_test_karpathy.json").write_text('{"data": [{"image": "x.jpg"}]}')
    with pytest.raises(PrepareError, match=r"SpokenCOCO_test_karpathy\.json: data\[0\]: expected a 'captions'"):
        prepare_corpus("spokencoco", root, tmp_path / "out")
    (root / "SpokenCOCO" / "SpokenCOCO_test_karpathy.json").write_text('{"data": [')
    with pytest.raises(PrepareError, match="SpokenCOCO_test_karpathy.json: not valid JSON"):
        prepare_corpus("spokencoco", root, tmp_path / "out")
    with pytest.raises(PrepareError, match="unexpected keyword"):
        prepare_corpus("spokencoco", root, tmp_path / "out", collections=["coco"])
