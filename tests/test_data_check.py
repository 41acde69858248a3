"""vgskit.data.check: every bad file is reported, durations/speakers/splits summarised, expected counts compared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from vgskit.cli import main
from vgskit.data.check import EXPECTED_COUNTS, check_manifest, compare_expected, format_report
from vgskit.data.manifest import Record, write_manifest
from vgskit.errors import ConfigError


def _tone(n: int) -> np.ndarray:
    return (0.1 * np.sin(np.arange(n) / 5)).astype(np.float32)


def _corpus(root: Path) -> Path:
    root.mkdir(parents=True)
    for i, seconds in enumerate([0.5, 1.0, 1.5, 2.0]):
        sf.write(root / f"c{i}.wav", _tone(int(16000 * seconds)), 16000)
    sf.write(root / "short.wav", _tone(800), 16000)  # 0.05 s: listed as suspicious
    (root / "empty.wav").write_bytes(b"")
    (root / "garbage.wav").write_bytes(b"RIFF not really a wav file at all")
    for name in ("a", "b"):
        Image.new("RGB", (16, 16), (1, 2, 3)).save(root / f"{name}.jpg")
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "trunc.jpg")
    data = (root / "trunc.jpg").read_bytes()
    (root / "trunc.jpg").write_bytes(data[: len(data) // 2])  # header readable, pixel data cut
    (root / "notimg.jpg").write_text("hello")
    recs = [
        Record("r0", "c0.wav", "a.jpg", "a", "train", "x", "s1"),
        Record("r1", "c1.wav", "a.jpg", "a", "train", None, "s2"),
        Record("r2", "c2.wav", "b.jpg", "b", "test", None, "s1"),
        Record("r3", "c3.wav", "trunc.jpg", "t", "test"),
        Record("r4", "empty.wav", "b.jpg", "b", "test"),
        Record("r5", "garbage.wav", "notimg.jpg", "n", "train"),
        Record("r6", "gone.wav", "nothere.jpg", "g", "train"),
        Record("r7", "short.wav", "b.jpg", "b", "test"),
    ]
    manifest = write_manifest(recs, root / "manifest.jsonl")
    with open(manifest, "a") as f:  # malformed lines are reported, the rest is still checked
        f.write("{not json\n")
        f.write(json.dumps(recs[0].to_json()) + "\n")
    return manifest


def test_all_bad_files_listed_and_summary(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path / "c")
    report = check_manifest(manifest, workers=2, plot=tmp_path / "d.png")
    bad = {Path(b["file"]).name: b["problem"] for b in report["bad_files"]}
    assert set(bad) == {"empty.wav", "garbage.wav", "gone.wav", "notimg.jpg", "nothere.jpg", "trunc.jpg"}
    assert "empty" in bad["empty.wav"] and "not found" in bad["gone.wav"]
    assert report["bad_file_counts"] == {"audio": 3, "image": 3}
    assert len(report["manifest_problems"]) == 2  # invalid JSON line + duplicate caption_id
    d = report["durations"]
    assert d["files"] == 5 and d["max"] == 2.0 and d["min"] == 0.05
    assert sum(d["histogram"]["counts"]) == 5
    assert [Path(f).name for f in d["shorter_than"]["files"]] == ["short.wav"]
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    s = report["summary"]
    assert s["splits"] == {"test": {"captions": 4, "images": 2}, "train": {"captions": 4, "images": 3}}
    assert s["captions_per_image"] == {1: 3, 2: 1, 3: 1}
    assert report["speakers"]["count"] == 2 and report["speakers"]["captions_without_speaker"] == 5
    assert report["ok"] is False
    text = format_report(report)
    for name in bad:
        assert name in text
    assert "PROBLEMS FOUND" in text


def test_truncated_jpeg_found_by_end_marker_without_deep(tmp_path: Path) -> None:
    # The header of trunc.jpg parses; its missing EOI marker gives it away, so both modes refuse it, as
    # training (which decodes every image) would.
    manifest = _corpus(tmp_path / "c")
    shallow = {Path(b["file"]).name: b["problem"] for b in check_manifest(manifest)["bad_files"]}
    deep = {Path(b["file"]).name: b["problem"] for b in check_manifest(manifest, deep=True, workers=1)["bad_files"]}
    assert "trunc.jpg" in shallow and set(deep) == set(shallow)
    assert shallow["trunc.jpg"].startswith("truncated or corrupt image data")


def test_clean_manifest_is_ok_and_expected_counts_compare(tmp_path: Path) -> None:
    root = tmp_path / "ok"
    root.mkdir()
    sf.write(root / "a.wav", _tone(1600), 16000)
    Image.new("RGB", (4, 4)).save(root / "a.jpg")
    manifest = write_manifest([Record("r0", "a.wav", "a.jpg", "a", "dev")], root / "manifest.jsonl")
    report = check_manifest(manifest)
    assert report["ok"] and report["bad_files"] == [] and report["manifest_problems"] == []
    with_expected = check_manifest(manifest, expected="flickr8k")
    assert not with_expected["ok"]
    assert with_expected["expected"]["splits"]["dev"]["images"] == {"actual": 1, "expected": 1000, "ok": False}
    exact = {s: {"images": v["images"], "captions": v["captions"]} for s, v in EXPECTED_COUNTS["flickr8k"].items()}
    assert compare_expected(exact, "flickr8k")["ok"]  # type: ignore[arg-type]
    assert EXPECTED_COUNTS["spokencoco_karpathy"]["train"]["images"] == 113287
    with pytest.raises(ConfigError, match="known"):
        check_manifest(manifest, expected="nope")


def test_cli_check_and_prepare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _corpus(tmp_path / "c")
    rc = main(["data", "check", str(manifest), "--expected", "flickr8k", "--plot", str(tmp_path / "p.png"),
               "--json", str(tmp_path / "r.json"), "--workers", "2"])
    out = capsys.readouterr().out
    assert rc == 1 and "garbage.wav" in out and "MISMATCH" in out and (tmp_path / "p.png").is_file()
    assert len(json.loads((tmp_path / "r.json").read_text())["bad_files"]) == 6
    rc = main(["data", "check", str(manifest), "--no-files"])
    assert "files not checked" in capsys.readouterr().out
    rc = main(["data", "prepare", "places", "--root", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "train_2020.json" in capsys.readouterr().err
