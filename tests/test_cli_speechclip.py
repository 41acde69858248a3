"""The pieces around SpeechCLIP-style models: the training-corpus vocabulary hook, ``vgskit layers`` (the
hidden-state weights plot) and ``vgskit keywords``, with small test models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import _toy_models  # noqa: F401  (registers the test models)
from vgskit.audio import save_wav
from vgskit.cli import main
from vgskit.data.manifest import read_manifest
from vgskit.errors import ConfigError
from vgskit.experiment import load_model, train_from_recipe
from vgskit.models.registry import create_model, save_pretrained
from vgskit.report import plot_layer_weights

TOY_RECIPE = {
    "model": {"name": "test_toy_text", "embed_dim": 8},
    "data": {"train_max_seconds": 2.0, "captions_per_image": 2},
    "train": {"lr": 1e-2, "max_steps": 2, "batch_size": 8, "eval_every": None, "ckpt_every": 2,
              "tensorboard": False},
}


@pytest.fixture(scope="module")
def toy_run(tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("toy") / "run"
    train_from_recipe(TOY_RECIPE, out_dir=run, manifest=str(tiny_manifest), progress=False)
    return run


def test_vocabulary_hook_adapts_the_saved_config(toy_run, tiny_manifest) -> None:
    words = sorted({w for r in read_manifest(tiny_manifest, split="train") for w in str(r.text).lower().split()})
    latest = (toy_run / "checkpoints" / "latest").read_text().strip()
    saved = json.loads((toy_run / "checkpoints" / latest / "config.json").read_text())
    assert saved["config"]["vocabulary"] == words and saved["config"]["embed_dim"] == 8  # training captions only
    model = load_model(toy_run)
    assert list(model.config.vocabulary) == words


def _without_transcripts(manifest: Path, out: Path) -> Path:
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        row["text"] = None
        row["audio"], row["image"] = str(manifest.parent / row["audio"]), str(manifest.parent / row["image"])
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_vocabulary_hook_error_names_the_manifest(tiny_manifest, tmp_path) -> None:
    bare = _without_transcripts(tiny_manifest, tmp_path / "bare.jsonl")
    with pytest.raises(ConfigError, match=rf"{bare} \(split 'train'\).*0 of 120 have a transcript.*no caption "
                                          "transcripts"):
        train_from_recipe(TOY_RECIPE, out_dir=tmp_path / "run", manifest=str(bare), progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was built or written
    # A model whose hook does not need transcripts trains on the same manifest.
    recipe = {**TOY_RECIPE, "model": {"name": "test_no_extras"},
              "train": {**TOY_RECIPE["train"], "max_steps": 1}}
    assert train_from_recipe(recipe, out_dir=tmp_path / "ok", manifest=str(bare), progress=False)["step"] == 1


# matplotlib's default colour cycle: the first branch's bars are C0, the second's C1.
BAR_COLOURS = ((31, 119, 180), (255, 127, 14))


def _bars(png: Path, colour: tuple[int, int, int]) -> list[tuple[float, int]]:
    """``(centre x, height in pixels)`` of every bar drawn in ``colour``, left to right.

    A bar is a run of columns whose pixels of that colour rise from the common baseline (the lowest row of
    that colour). Gaps of a few pixels are bridged (the dashed "uniform" line crosses the bars); the legend's
    patch of the same colour floats above the baseline and is not counted.
    """
    with Image.open(png) as img:
        rgb = np.asarray(img.convert("RGB")).astype(int)
    mask = np.abs(rgb - np.asarray(colour)).sum(-1) <= 30  # [H, W]
    if not mask.any():
        return []
    base = int(np.nonzero(mask.any(axis=1))[0].max())
    heights = []
    for x in range(mask.shape[1]):
        top, gap, y = None, 0, base
        while y >= 0 and gap <= 3:
            top, gap = (y, 0) if mask[y, x] else (top, gap + 1)
            y -= 1
        heights.append(0 if top is None else base - top + 1)
    bars, start = [], None
    for x, h in enumerate([*heights, 0]):
        if h and start is None:
            start = x
        elif not h and start is not None:
            bars.append(((start + x - 1) / 2, int(np.median(heights[start:x]))))
            start = None
    return bars


def _assert_bar_heights(bars: list[tuple[float, int]], weights: list[float]) -> None:
    """One bar per weight, each as tall as its weight on one common scale (to within 2 pixels)."""
    assert len(bars) == len(weights), bars
    heights = np.asarray([h for _, h in bars], dtype=float)
    values = np.asarray(weights)
    scale = float(heights @ values / (values @ values))  # pixels per unit of weight
    assert scale > 100  # bars are tens of pixels tall, so 2 pixels is a small fraction of a difference
    assert np.abs(heights - scale * values).max() <= 2, (heights, scale * values)


def test_plot_layer_weights(tmp_path) -> None:
    weights = {"parallel": [0.1, 0.2, 0.3, 0.4], "cascaded": [0.4, 0.1, 0.3, 0.2]}
    png = plot_layer_weights(weights, tmp_path / "sub" / "w.png", title="test")
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 100
    # The bars: their heights follow the weights; each hidden state's bars sit side by side, branch
    # order within the group, groups left to right by hidden-state index.
    parallel, cascaded = (_bars(png, colour) for colour in BAR_COLOURS)
    _assert_bar_heights(parallel, weights["parallel"])
    _assert_bar_heights(cascaded, weights["cascaded"])
    for i in range(4):
        assert parallel[i][0] < cascaded[i][0]
        if i:
            assert cascaded[i - 1][0] < parallel[i][0]
    # A single branch with another number of states.
    single = plot_layer_weights({"parallel": [0.5, 0.15, 0.35]}, tmp_path / "single.png")
    _assert_bar_heights(_bars(single, BAR_COLOURS[0]), [0.5, 0.15, 0.35])
    assert _bars(single, BAR_COLOURS[1]) == []

    # The same weights give the same picture; other weights another one.
    def pixels(path: Path) -> np.ndarray:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))

    again = plot_layer_weights(weights, tmp_path / "again.png", title="test")
    assert np.array_equal(pixels(again), pixels(png))
    other = plot_layer_weights({**weights, "cascaded": [0.1, 0.4, 0.3, 0.2]}, tmp_path / "other.png",
                               title="test")
    assert not np.array_equal(pixels(other), pixels(png))

    with pytest.raises(ValueError, match="no branches"):
        plot_layer_weights({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-finite"):
        plot_layer_weights({"a": [0.5, float("nan")]}, tmp_path / "x.png")


def test_layers_cli(toy_run, tmp_path, capsys) -> None:
    out, js = tmp_path / "layers.png", tmp_path / "layers.json"
    assert main(["layers", "--checkpoint", str(toy_run), "--out", str(out), "--json", str(js)]) == 0
    with Image.open(out) as img:
        img.verify()
    saved = json.loads(js.read_text())
    expected = {k: v.tolist() for k, v in load_model(toy_run).layer_weights().items()}
    assert saved.keys() == expected.keys() == {"parallel", "cascaded"}
    for branch in expected:
        assert saved[branch] == pytest.approx(expected[branch], abs=1e-7)
        assert sum(saved[branch]) == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert "parallel: 0:" in printed and str(out) in printed


def test_layers_cli_without_layer_weights(tmp_path, capsys) -> None:
    plain = save_pretrained(create_model("test_no_extras"), tmp_path / "plain")
    assert main(["layers", "--checkpoint", str(plain), "--out", str(tmp_path / "x.png")]) == 2
    assert "has no layer weights" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def _tone(path: Path, seconds: float, freq: float) -> Path:
    t = np.arange(int(seconds * 16000)) / 16000
    return save_wav(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)


def test_keywords_cli(tmp_path, capsys) -> None:
    model_dir = save_pretrained(create_model("test_toy_text", vocabulary=["red", "bag", "coat", "left"]),
                                tmp_path / "model")
    a, b = _tone(tmp_path / "a.wav", 0.5, 300), _tone(tmp_path / "b.wav", 0.8, 500)
    js = tmp_path / "kw.json"
    assert main(["keywords", "--checkpoint", str(model_dir), str(a), str(b), "-k", "3", "--json", str(js)]) == 0
    lines = capsys.readouterr().out.splitlines()
    model = load_model(model_dir)
    expected = model.keywords(torch.zeros(1, 8000), torch.tensor([8000]), top_k=3)[0]
    assert lines[0] == str(a)
    assert lines[1] == "  slot 1: " + " ".join(f"{t} ({c:.2f})" for t, c in expected[0])
    assert lines[2].startswith("  slot 2: ") and len(lines[2].split(") ")) == 3
    assert lines[3] == str(b) and len(lines) == 6
    report = json.loads(js.read_text())
    assert [r["audio"] for r in report] == [str(a), str(b)]
    assert report[0]["slots"][0] == [{"token": t, "cosine": c} for t, c in expected[0]]


def test_keywords_cli_bad_files(tmp_path, capsys) -> None:
    model_dir = save_pretrained(create_model("test_toy_text", vocabulary=["red"]), tmp_path / "model")
    good = _tone(tmp_path / "good.wav", 0.5, 300)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wav file")
    missing = tmp_path / "missing.flac"
    js = tmp_path / "kw.json"
    code = main(["keywords", "--checkpoint", str(model_dir), str(broken), str(good), str(missing), "--json", str(js)])
    assert code == 1  # the good file is still processed, the exit status reports the failures
    captured = capsys.readouterr()
    assert str(good) in captured.out and "slot 1: red (" in captured.out
    assert str(broken) in captured.err and str(missing) in captured.err and "2 of 3 file(s)" in captured.err
    report = json.loads(js.read_text())
    assert ["error" in r for r in report] == [True, False, True]
    plain = save_pretrained(create_model("test_no_extras"), tmp_path / "plain")
    assert main(["keywords", "--checkpoint", str(plain), str(good)]) == 2
    assert "has no keyword slots" in capsys.readouterr().err
