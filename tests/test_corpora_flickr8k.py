"""FACC preparation on a fixture tree laid out exactly like the distribution (with a few broken parts)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from vgskit.data.corpora import MissingFilesError, PrepareError, prepare_corpus
from vgskit.data.manifest import read_manifest, summarize

IMGS = {"train": ["1000268201_693b08cb0e", "1001773457_577c3a7d70"], "dev": ["1002674143_1b742ab4b8"],
        "test": ["1003163366_44323f5815"]}
OTHER = "2258277193_586949ec62"  # in the token file and wav2capt but in no split list


def _wav(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * np.sin(np.arange(1600) / 5)).astype(np.float32), 16000)


def _jpg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (200, 10, 10)).save(path)


def build_facc(root: Path, *, missing_wav: str | None = "1001773457_577c3a7d70_3.wav") -> Path:
    audio = root / "flickr_audio"
    capt, spk, token = [], [], []
    for img in [*sum(IMGS.values(), []), OTHER]:
        _jpg(root / "Flicker8k_Dataset" / f"{img}.jpg")
        for n in range(5):
            wav = f"{img}_{n}.wav"
            if wav != missing_wav:
                _wav(audio / "wavs" / wav)
            capt.append(f"{wav} {img}.jpg #{n}")
            spk.append(f"{wav} {n + 10}")
            token.append(f"{img}.jpg#{n}\tA dog number {n} runs .")
    (audio / "wav2capt.txt").write_text("\n".join(capt) + "\n")
    (audio / "wav2spk.txt").write_text("\n".join(spk) + "\n")
    text = root / "Flickr8k_text"
    text.mkdir()
    (text / "Flickr8k.token.txt").write_text("\n".join(token) + "\n")
    for split, imgs in IMGS.items():
        (text / f"Flickr_8k.{split}Images.txt").write_text("".join(f"{i}.jpg\n" for i in imgs))
    return root


def test_official_layout_gives_expected_splits_speakers_and_text(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    root = build_facc(tmp_path / "facc")
    with caplog.at_level(logging.WARNING):
        manifest = prepare_corpus("flickr8k", root, tmp_path / "out")
    records = read_manifest(manifest)  # also proves every path resolves to an existing file
    s = summarize(records)
    assert {k: (v["images"], v["captions"]) for k, v in s["splits"].items()} == {
        "train": (2, 9), "dev": (1, 5), "test": (1, 5)}
    by_id = {r.caption_id: r for r in records}
    r = by_id["1000268201_693b08cb0e_2"]
    assert r.image_id == "1000268201_693b08cb0e" and r.split == "train"
    assert r.text == "A dog number 2 runs ." and r.speaker == "12"
    assert r.audio.endswith("flickr_audio/wavs/1000268201_693b08cb0e_2.wav")
    # Paths in the file are relative to the manifest folder.
    first = json.loads(manifest.read_text().splitlines()[0])
    assert first["audio"].startswith("../facc/flickr_audio/wavs/")
    assert OTHER not in {r.image_id for r in records}
    report = json.loads((manifest.parent / "prepare_report.json").read_text())
    assert report["missing_files"] == 1 and report["dropped_captions"] == 1
    assert report["missing"][0]["captions"] == ["1001773457_577c3a7d70_3"]
    assert report["captions_not_in_any_split"] == 5
    assert "1001773457_577c3a7d70_3.wav" in caplog.text


def test_on_missing_error_lists_file_and_writes_nothing(tmp_path: Path) -> None:
    root = build_facc(tmp_path / "facc")
    with pytest.raises(MissingFilesError, match="1001773457_577c3a7d70_3.wav") as info:
        prepare_corpus("flickr8k", root, tmp_path / "out", on_missing="error")
    assert len(info.value.missing) == 1
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_karpathy_json_maps_val_to_dev_and_gives_text(tmp_path: Path) -> None:
    root = build_facc(tmp_path / "facc", missing_wav=None)
    for f in (root / "Flickr8k_text").iterdir():
        f.unlink()
    images = [{"filename": f"{i}.jpg", "split": {"dev": "val"}.get(s, s), "imgid": k,
               "sentences": [{"raw": f"karpathy {i} {n}", "tokens": []} for n in range(5)]}
              for k, (s, i) in enumerate((s, i) for s, imgs in IMGS.items() for i in imgs)]
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    records = read_manifest(prepare_corpus("flickr8k", root, tmp_path / "out"))
    assert summarize(records)["splits"]["dev"] == {"captions": 5, "images": 1}
    r = next(r for r in records if r.caption_id == "1003163366_44323f5815_4")
    assert (r.split, r.text) == ("test", "karpathy 1003163366_44323f5815 4")


def test_missing_and_malformed_index_files_are_named(tmp_path: Path) -> None:
    root = build_facc(tmp_path / "facc")
    (root / "Flickr8k_text" / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(PrepareError, match=r"Flickr_8k\.devImages\.txt"):
        prepare_corpus("flickr8k", root, tmp_path / "out")
    root2 = build_facc(tmp_path / "facc2")
    (root2 / "flickr_audio" / "wav2capt.txt").write_text("a.wav a.jpg #0\nbroken line\n")
    with pytest.raises(PrepareError, match=r"wav2capt\.txt: line 2"):
        prepare_corpus("flickr8k", root2, tmp_path / "out")
    (root2 / "flickr_audio" / "wav2capt.txt").unlink()
    with pytest.raises(PrepareError, match="wav2capt.txt not found"):
        prepare_corpus("flickr8k", root2, tmp_path / "out")


def test_cli_prepare_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vgskit.cli import main

    root = build_facc(tmp_path / "facc")
    assert main(["data", "prepare", "flickr8k", "--root", str(root), "--out", str(tmp_path / "o"),
                 "--splits", "official"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "1 missing file(s), 1 caption(s) dropped" in out
    assert main(["data", "prepare", "flickr8k", "--root", str(root), "--out", str(tmp_path / "o2"),
                 "--on-missing", "error"]) == 2
    assert "1001773457_577c3a7d70_3.wav" in capsys.readouterr().err
    # The fixture is far from the standard 6,000/1,000/1,000 images, so the comparison must fail.
    assert main(["data", "check", str(tmp_path / "o" / "manifest.jsonl"), "--expected", "flickr8k"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
