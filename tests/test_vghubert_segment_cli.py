"""``vgskit segment``: segments printed and written per file, clear errors for bad files, and a plot whose pixels
change exactly where the segments are shaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_vghubert_model import save_tiny_towers, tiny_vghubert
from vgskit.audio import save_wav
from vgskit.cli import main
from vgskit.models.registry import save_pretrained
from vgskit.models.vg_hubert.commands import PLOT_AXES_X, SegmentedUtterance, plot_segments


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run on one CPU thread: the tensors are tiny, and several threads only add start-up and oversubscription costs
    (which dominate when other processes share the cores); the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A saved tiny VG-HuBERT and two short noise recordings (the towers sit next to them, in hubert/ and vit/)."""
    root = tmp_path_factory.mktemp("vghubert_segment")
    model = tiny_vghubert(save_tiny_towers(root))
    folder = save_pretrained(model, root / "model")
    rng = np.random.default_rng(0)
    a, b = root / "a.wav", root / "b.wav"
    save_wav(a, (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)
    save_wav(b, (0.1 * rng.standard_normal(5600)).astype(np.float32), 16000)
    return Path(folder), a, b


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("vgskit: error:")]


def test_segment_prints_and_writes_the_model_segments(saved, tmp_path: Path, capsys) -> None:
    folder, a, b = saved
    js, png = tmp_path / "seg.json", tmp_path / "seg.png"
    assert main(["segment", "--checkpoint", str(folder), str(a), str(b), "--layer", "1", "--quantile", "0.8",
                 "--json", str(js), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    report = json.loads(js.read_text())
    assert [r["audio"] for r in report] == [str(a), str(b)]
    from vgskit.experiment import load_model

    model = load_model(folder)
    for path, entry in zip((a, b), report, strict=True):
        from vgskit.audio import load_audio

        wav = torch.from_numpy(load_audio(path, sample_rate=16000))
        (expected,) = model.segment(wav[None], torch.tensor([len(wav)]), layer=1, quantile=0.8)
        spans = [[e["start"], e["end"]] for e in entry["segments"]]
        assert spans == expected.boundaries.tolist() and spans
        assert f"{path}  ({len(spans)} segment(s), layer 1, quantile 0.8)" in out
        start, end = spans[0]
        assert f"  1: {start:.3f} - {end:.3f} s" in out
    assert Image.open(png).size[0] > 0


def test_bad_files_give_one_line_naming_them(saved, tmp_path: Path, capsys) -> None:
    folder, a, _ = saved
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wav")
    js = tmp_path / "seg.json"
    assert main(["segment", "--checkpoint", str(folder), str(broken), str(a), "--layer", "1", "--json", str(js)]) == 1
    captured = capsys.readouterr()
    errors = _errors(captured.err)
    assert len(errors) == 1 and str(broken) in errors[0]
    report = json.loads(js.read_text())
    assert "error" in report[0] and report[1]["segments"]
    # A layer the model does not have, and a model that has no CLS attention: one line each, exit status 2.
    assert main(["segment", "--checkpoint", str(folder), str(a), "--layer", "7"]) == 2
    assert "layer must be an integer in 0..1" in _errors(capsys.readouterr().err)[0]
    assert main(["segment", "--model", "dual_encoder_tiny", str(a)]) == 2
    assert "only VG-HuBERT models segment speech" in _errors(capsys.readouterr().err)[0]


def test_segment_a_registered_model_as_built(saved, capsys) -> None:
    folder, a, _ = saved
    towers = folder.parent
    assert main(["segment", "--model", "vg_hubert_tiny", "--set", f"speech.name_or_path={towers / 'hubert'}",
                 "--set", f"image.name_or_path={towers / 'vit'}", str(a)]) == 0
    out = capsys.readouterr().out
    assert f"{a}  (" in out and "layer 1, quantile 0.7)" in out  # the preset's segment_layer, the README's 0.7


def _columns_changed(with_segments: Path, without: Path) -> np.ndarray:
    x = np.asarray(Image.open(with_segments).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(without).convert("RGB"), dtype=np.int16)
    assert x.shape == y.shape
    return np.nonzero(np.abs(x - y).sum(axis=(0, 2)) > 0)[0]


def test_plot_shades_the_segments_where_they_are(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    wav = (0.2 * rng.standard_normal(16000)).astype(np.float32)  # 1 s
    attention = rng.random(50)

    def draw(name: str, segments: list[tuple[float, float]]) -> Path:
        return plot_segments([SegmentedUtterance("u.wav", wav, 16000, attention, 0.02, segments)], tmp_path / name)

    plain = draw("plain.png", [])
    width = Image.open(plain).size[0]
    left, right = PLOT_AXES_X
    for start, end in ((0.1, 0.3), (0.6, 0.75)):
        columns = _columns_changed(draw(f"s{start}.png", [(start, end)]), plain)
        lo, hi = width * (left + (right - left) * start), width * (left + (right - left) * end)
        assert columns.size > 0.8 * (hi - lo)  # the band is drawn ...
        assert columns.min() >= lo - 2 and columns.max() <= hi + 2  # ... and nowhere else
