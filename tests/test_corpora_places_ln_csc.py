"""Places Audio 2020, Localized Narratives and CSC preparation on native-layout fixture trees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from vgskit.data.corpora import PrepareError, prepare_corpus
from vgskit.data.corpora.localized_narratives import parse_file_name
from vgskit.data.manifest import read_manifest, summarize

SPLITS = ("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen")


def _wav(path: Path, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.full(1600, 0.1, np.float32), 16000, format=fmt)


def _jpg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def _splits(manifest: Path) -> dict[str, tuple[int, int]]:
    return {k: (v["images"], v["captions"]) for k, v in summarize(read_manifest(manifest))["splits"].items()}


def build_places(root: Path) -> Path:
    meta = root / "PlacesAudio_400k_distro" / "metadata"
    meta.mkdir(parents=True)
    images = root / "data/vision/torralba/deeplearning/images256"
    for i, split in enumerate(SPLITS):
        data = []
        for j in range(2):
            image = f"a/airport_terminal/gsun_{i}{j}abc.jpg"
            wav = f"wavs/{i}/utterance_{j}.wav"
            if (i, j) != (0, 1):  # one listed recording absent from the distribution
                _wav(root / "PlacesAudio_400k_distro" / wav)
            _jpg(images / image)
            data.append({"uttid": f"A1{i}-GSUN_{i}{j}", "speaker": f"A1{i}", "asr_text": f"an airport {j}",
                         "wav": wav, "image": image})
        (meta / f"{split}_2020.json").write_text(json.dumps(
            {"image_base_path": "/nonexistent/images256", "audio_base_path": "/nonexistent/wavs", "data": data}))
    return root


def test_places_2020_splits(tmp_path: Path) -> None:
    manifest = prepare_corpus("places", build_places(tmp_path / "places"), tmp_path / "out")
    assert _splits(manifest) == {"train": (1, 1), **{s: (2, 2) for s in SPLITS[1:]}}
    r = next(r for r in read_manifest(manifest) if r.caption_id == "A13-GSUN_31")
    assert (r.split, r.image_id, r.speaker, r.text) == ("test_seen", "gsun_31abc", "A13", "an airport 1")
    assert r.audio.endswith("PlacesAudio_400k_distro/wavs/3/utterance_1.wav")
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["missing"][0]["captions"] == ["A10-GSUN_01"]


def test_places_missing_split_file_and_bad_entry(tmp_path: Path) -> None:
    root = build_places(tmp_path / "places")
    meta = root / "PlacesAudio_400k_distro" / "metadata"
    (meta / "dev_unseen_2020.json").unlink()
    with pytest.raises(PrepareError, match="dev_unseen_2020.json"):
        prepare_corpus("places", root, tmp_path / "out")
    manifest = prepare_corpus("places", root, tmp_path / "out", splits=["train", "test_unseen"])
    assert set(_splits(manifest)) == {"train", "test_unseen"}
    (meta / "train_2020.json").write_text(json.dumps({"data": [{"uttid": "u", "image": "x.jpg"}]}))
    with pytest.raises(PrepareError, match=r"train_2020\.json: data\[0\]: missing required key 'wav'"):
        prepare_corpus("places", root, tmp_path / "out", splits=["train"])


def test_ln_file_names() -> None:
    assert parse_file_name("open_images_train_v6_localized_narratives-00001-of-00010.jsonl") == (
        "open_images", "train")
    assert parse_file_name("coco_val_localized_narratives.jsonl") == ("coco", "val")
    assert parse_file_name("ade20k_validation_localized_narratives.jsonl") == ("ade20k", "validation")
    assert parse_file_name("flickr30k_test_localized_narratives.jsonl") == ("flickr30k", "test")
    assert parse_file_name("captions.jsonl") is None


def build_ln(root: Path) -> Path:
    def narr(ds: str, coll_split: str, image_id: str, annot: int) -> dict:
        return {"dataset_id": ds, "image_id": image_id, "annotator_id": annot, "caption": f"In this image {image_id}",
                "timed_caption": [{"utterance": "In", "start_time": 0.0, "end_time": 0.2}],
                "traces": [[{"x": 0.1, "y": 0.2, "t": 0.0}]],
                "voice_recording": f"{coll_split}/{coll_split}_{image_id}_{annot}.ogg"}

    shards = {
        "annotations/coco_val_localized_narratives.jsonl": [narr("mscoco_val2017", "coco_val", "137576", 93),
                                                             narr("mscoco_val2017", "coco_val", "137576", 12)],
        "annotations/open_images_train_v6_localized_narratives-00000-of-00002.jsonl":
            [narr("open_images", "open_images_train", "0000f8604a4e2cfe", 0)],
        "annotations/open_images_train_v6_localized_narratives-00001-of-00002.jsonl":
            [narr("open_images", "open_images_train", "00010bf498b64bab", 3)],
    }
    for rel, rows in shards.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("".join(json.dumps(r) + "\n" for r in rows))
        for r in rows:
            if r["image_id"] != "00010bf498b64bab":  # one recording never downloaded
                _wav(root / "voice-recordings" / r["voice_recording"], fmt="OGG")
    _jpg(root / "images/coco/val2017/000000137576.jpg")
    _jpg(root / "images/open_images/0000f8604a4e2cfe.jpg")
    _jpg(root / "images/open_images/00010bf498b64bab.jpg")
    return root


def test_localized_narratives(tmp_path: Path) -> None:
    root = build_ln(tmp_path / "ln")
    manifest = prepare_corpus("localized-narratives", root, tmp_path / "out")
    records = read_manifest(manifest)
    assert _splits(manifest) == {"val": (1, 2), "train": (1, 1)}
    r = next(r for r in records if r.caption_id == "coco_val_137576_93")
    assert (r.image_id, r.speaker, r.text) == ("coco_137576", "93", "In this image 137576")
    assert r.image.endswith("images/coco/val2017/000000137576.jpg")
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["missing"][0]["captions"] == ["open_images_train_00010bf498b64bab_3"]
    only = prepare_corpus("localized_narratives", root, tmp_path / "out2", collections=["coco"])
    assert _splits(only) == {"val": (1, 2)}
    (root / "annotations/coco_val_localized_narratives.jsonl").write_text('{"image_id": "1"}\n')
    with pytest.raises(PrepareError, match=r"coco_val_localized_narratives\.jsonl: line 1: missing required key "
                                           r"'voice_recording'"):
        prepare_corpus("localized_narratives", root, tmp_path / "out3")


def test_csc(tmp_path: Path) -> None:
    root = tmp_path / "csc"
    root.mkdir()
    (root / "Train_GCC-training.tsv").write_text(
        "a dog on a beach\thttp://x/1.jpg\nactor attends the premiere\thttp://x/2.jpg\nsunset\thttp://x/3.jpg\n")
    (root / "Validation_GCC-1.1.0-Validation.tsv").write_text("a red car\thttp://x/4.jpg\n")
    for row in range(3):
        _wav(root / f"audio/train/{row}.wav")
    _jpg(root / "images/train/00000/000000000.jpg")  # sharded, zero-padded downloader layout
    _jpg(root / "images/train/00000/000000002.jpg")  # row 1: dead URL, no image
    _wav(root / "audio/val/0.flac", fmt="FLAC")
    _jpg(root / "images/val/0.png")
    manifest = prepare_corpus("csc", root, tmp_path / "out")
    records = {r.caption_id: r for r in read_manifest(manifest)}
    assert sorted(records) == ["csc_train_0", "csc_train_2", "csc_val_0"]
    assert records["csc_train_2"].text == "sunset" and records["csc_train_2"].image_id == "cc_train_2"
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["missing"][0]["captions"] == ["csc_train_1"]
    (root / "Train_GCC-training.tsv").write_text("no tab here\n")
    with pytest.raises(PrepareError, match=r"Train_GCC-training\.tsv: line 1"):
        prepare_corpus("csc", root, tmp_path / "out")
