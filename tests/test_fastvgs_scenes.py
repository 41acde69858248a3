"""FaST-VGS on the embedded corpus: the ``fast_vgs_scenes`` recipe at tiny widths trains on the tiny spoken-scenes
corpus (generator boxes + ImageNet EfficientNet-Lite0 region features) to far above chance, and coarse-to-fine over
the whole gallery is the exhaustive fine ranking."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vgskit.cli import main
from vgskit.data.loader import RegionSource
from vgskit.data.scene_regions import FEATURES_FILE
from vgskit.experiment import load_model, make_dataset
from vgskit.retrieval.evaluate import evaluate

TINY = [
    "model.layer.hidden_size=32", "model.layer.num_heads=2", "model.layer.ffn_dim=64",
    "model.resdavenet_widths=[16,16,16,32,32]", "model.speech_cnn.stem_channels=[32]",
    "model.speech_cnn.channels=[32]", "model.visual_layers=1",
    "train.batch_size=16", "train.max_steps=160", "train.lr=2e-3", "train.eval_every=1000", "train.ckpt_every=1000",
    "train.log_every=40", "train.time_budget_s=null", "data.val_max_images=8", "data.rerank_top=4",
    "data.preload=true",
]


def test_tiny_fast_vgs_demo_learns_the_tiny_corpus(tiny_cache: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    cache = tmp_path / "cache"  # a copy: the region file is written beside the corpus
    shutil.copytree(tiny_cache, cache)
    corpus = cache / "spoken-scenes-tiny"
    monkeypatch.setenv("VGSKIT_CACHE", str(cache))
    out = tmp_path / "demo"
    args = ["demo", "--preset", "tiny", "--recipe", "fast_vgs_scenes", "--out", str(out)]
    assert main(args + [a for o in TINY for a in ("--set", o)]) == 0
    printed = capsys.readouterr().out
    assert (corpus / FEATURES_FILE).is_file()  # data.region_features: scene_boxes made it

    # The demo evaluates a model with a fine scorer coarse and coarse-to-fine (the recipe's rerank_top) and says so.
    results = json.loads((out / "results.json").read_text())
    assert results["results"]["rerank_top"] == 4 and "coarse" in results["results"]
    assert "coarse (embeddings only)" in printed and "coarse-to-fine (top 4 re-ranked" in printed
    html = (out / "report.html").read_text()
    assert "Coarse (embeddings only)" in html and "Coarse-to-fine" in html
    for q in results["queries"]:  # the search answers with the gallery's image files
        assert all(Path(h["path"]).is_file() and h["path"].endswith(".png") for h in q["hits"])

    model = load_model(out / "train")
    manifest = corpus / "manifest.jsonl"
    train = make_dataset(manifest, "train", model.image_transform, max_seconds=None, preload=True, progress=False,
                         regions=RegionSource(corpus / FEATURES_FILE, 5))
    # K covering both galleries (the 120 captions are image -> speech's gallery).
    res = evaluate(model, train, rerank_top=len(train), exhaustive_fine=True)
    for name, r in (("coarse", res["coarse"]), ("fine", res["exhaustive_fine"])):
        s2i = r["speech_to_image"]
        # Far above chance on the images it was trained on (24 images: chance R@1 4.2 %, R@5 20.8 %).
        assert s2i["R@1"] >= 4 * s2i["chance_R@1"], (name, s2i)
        assert s2i["R@5"] >= 2.5 * s2i["chance_R@5"], (name, s2i)
    # Re-ranking the whole gallery is the exhaustive fine ranking.
    for direction in ("speech_to_image", "image_to_speech"):
        for k in (1, 5, 10):
            assert res[direction][f"R@{k}"] == pytest.approx(res["exhaustive_fine"][direction][f"R@{k}"])
