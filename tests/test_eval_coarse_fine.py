"""Coarse, coarse-to-fine and exhaustive-fine recall from one evaluation (``evaluate`` and ``vgskit eval``).

The three numbers only mean something side by side if they rank the *same* embeddings: the coarse block must be
exactly an evaluation without re-ranking, the exhaustive block exactly the fine scorer over every pair, and
coarse-to-fine with a cut-off covering the gallery exactly the exhaustive one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import _contract_toys  # noqa: F401  (registers the toy models)
from _regions import write_grid_regions
from vgskit.cli import main
from vgskit.data.loader import RegionSource, SpokenCaptionDataset
from vgskit.errors import ConfigError
from vgskit.experiment import flatten_metrics, make_dataset, validation_metric_names
from vgskit.models import RetrievalModel, create_model, save_pretrained
from vgskit.retrieval.evaluate import embed_images, embed_speech, evaluate

KS = (1, 2, 3)
DIRECTIONS = ("speech_to_image", "image_to_speech")


@pytest.fixture(scope="module")
def region_file(tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Region features of every image of the tiny corpus: the 2×2 grid cells (mean and std of RGB)."""
    return write_grid_regions(tiny_manifest, tmp_path_factory.mktemp("regions") / "regions.h5", (0.2, 0.9, 0.5, 0.7))


@pytest.fixture(scope="module")
def region_model() -> RetrievalModel:
    torch.manual_seed(0)
    return create_model("test_toy_regions").eval()


@pytest.fixture(scope="module")
def region_ds(region_model: RetrievalModel, tiny_manifest: Path, region_file: Path) -> SpokenCaptionDataset:
    return make_dataset(tiny_manifest, "train", region_model.image_transform, max_seconds=None, preload=True,
                        progress=False, regions=RegionSource(region_file))


def _brute_force_fine(model: RetrievalModel, ds: SpokenCaptionDataset) -> dict[str, dict[str, float]]:
    """Fine-only recall written out pair by pair: every (caption, image) fine score, then each query's first hit."""
    speech, image = embed_speech(model, ds), embed_images(model, ds)
    labels = ds.caption_image_index
    n_c, n_i = len(speech), len(image)
    with torch.no_grad():
        fine = torch.tensor([[float(model.score_pairs(speech.select([c]), image.select([i])))
                              for i in range(n_i)] for c in range(n_c)])

    def first_hit(scores: list[float], relevant: set[int]) -> int:
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
        return next(rank for rank, j in enumerate(order, start=1) if j in relevant)

    s2i = [first_hit(fine[c].tolist(), {labels[c]}) for c in range(n_c)]
    i2s = [first_hit(fine[:, i].tolist(), {c for c in range(n_c) if labels[c] == i})
           for i in range(n_i) if i in labels]
    return {d: {f"R@{k}": 100.0 * sum(r <= k for r in ranks) / len(ranks) for k in KS}
            for d, ranks in (("speech_to_image", s2i), ("image_to_speech", i2s))}


def _recall_only(block: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a recall block (directions and means), without the entries that are not recall blocks."""
    return {k: v for k, v in block.items() if k in DIRECTIONS or k.startswith("mean_R@")}


def test_coarse_block_is_the_plain_evaluation(region_model: RetrievalModel, region_ds: SpokenCaptionDataset) -> None:
    results = evaluate(region_model, region_ds, rerank_top=2, ks=KS)
    plain = evaluate(region_model, region_ds, ks=KS)
    assert results["coarse"] == plain  # exactly: same embeddings, same coarse scores
    assert results["rerank_top"] == 2 and "coarse" not in plain and "exhaustive_fine" not in results
    # The top level stays the re-ranked numbers, which differ from the coarse ones here.
    assert _recall_only(results) != _recall_only(plain)


def test_exhaustive_fine_is_the_pair_by_pair_brute_force(region_model: RetrievalModel,
                                                        region_ds: SpokenCaptionDataset) -> None:
    results = evaluate(region_model, region_ds, ks=KS, exhaustive_fine=True)
    expected = _brute_force_fine(region_model, region_ds)
    block = results["exhaustive_fine"]
    for direction in DIRECTIONS:
        for k in KS:
            assert block[direction][f"R@{k}"] == pytest.approx(expected[direction][f"R@{k}"], abs=1e-9)
        assert block[direction]["n_gallery"] == results[direction]["n_gallery"]
    # Without rerank_top the top level is the coarse evaluation.
    assert _recall_only(results) == _recall_only(evaluate(region_model, region_ds, ks=KS))


def test_rerank_beyond_the_gallery_equals_exhaustive_fine(region_model: RetrievalModel,
                                                          region_ds: SpokenCaptionDataset) -> None:
    everything = len(region_ds) + len(region_ds.image_keys)
    results = evaluate(region_model, region_ds, rerank_top=everything, ks=KS, exhaustive_fine=True)
    assert _recall_only(results) == _recall_only(results["exhaustive_fine"])
    small = evaluate(region_model, region_ds, rerank_top=1, ks=KS, exhaustive_fine=True)
    assert small["exhaustive_fine"] == results["exhaustive_fine"]
    # With one candidate, R@1 is coarse R@1 restricted to what the fine scorer keeps: never above coarse R@1.
    for direction in DIRECTIONS:
        assert small[direction]["R@1"] <= small["coarse"][direction]["R@1"]


def test_validation_names_include_the_coarse_block(region_model: RetrievalModel,
                                                   region_ds: SpokenCaptionDataset) -> None:
    results = evaluate(region_model, region_ds, rerank_top=2)
    names = validation_metric_names(rerank_top=2)
    assert names == sorted(flatten_metrics(results, "val/"))
    assert "val/coarse/mean_R@1" in names and "val/coarse/mean_R@1" not in validation_metric_names()


def test_models_without_a_fine_scorer_are_refused(region_ds: SpokenCaptionDataset) -> None:
    plain = create_model("test_toy_fixed")
    assert not plain.has_fine_scores
    with pytest.raises(ValueError, match="exhaustive_fine.*no fine scorer"):
        evaluate(plain, region_ds, exhaustive_fine=True)
    with pytest.raises(ValueError, match="rerank_top.*no fine scorer"):
        evaluate(plain, region_ds, rerank_top=2)


def test_cli_prints_and_writes_the_three_blocks(region_model: RetrievalModel, region_ds: SpokenCaptionDataset,
                                               tiny_manifest: Path, region_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    save_pretrained(region_model, tmp_path / "model")
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "model"), "--manifest", str(tiny_manifest), "--split",
                 "train", "--rerank-top", "2", "--exhaustive-fine", "--region-features", str(region_file),
                 "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    heads = [out.find("coarse:"), out.find("coarse-to-fine (top 2 re-ranked)"), out.find("exhaustive fine")]
    assert all(h >= 0 for h in heads) and heads == sorted(heads), out
    assert out.count("direction") == 3  # one table per block
    data = json.loads(out_json.read_text())
    direct = evaluate(region_model, region_ds, rerank_top=2, exhaustive_fine=True)
    assert data["rerank_top"] == 2
    for key in DIRECTIONS:
        assert data[key]["R@1"] == pytest.approx(direct[key]["R@1"])
        assert data["coarse"][key]["R@1"] == pytest.approx(direct["coarse"][key]["R@1"])
        assert data["exhaustive_fine"][key]["R@1"] == pytest.approx(direct["exhaustive_fine"][key]["R@1"])


def test_cli_plain_eval_has_a_single_table(region_model: RetrievalModel, tiny_manifest: Path, region_file: Path,
                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_pretrained(region_model, tmp_path / "model")
    assert main(["eval", "--checkpoint", str(tmp_path / "model"), "--manifest", str(tiny_manifest), "--split",
                 "train", "--region-features", str(region_file)]) == 0
    out = capsys.readouterr().out
    assert out.count("direction") == 1 and "coarse-to-fine" not in out and "exhaustive fine" not in out


def test_cli_exhaustive_fine_needs_a_fine_scorer_before_any_work(
        tiny_manifest: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import vgskit.experiment

    def no_data(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the data was read before the model was checked")

    monkeypatch.setattr(vgskit.experiment, "make_dataset", no_data)
    assert main(["eval", "--model", "test_toy_fixed", "--manifest", str(tiny_manifest), "--exhaustive-fine"]) == 2
    err = capsys.readouterr().err
    assert "--exhaustive-fine" in err and "no fine scorer" in err
    with pytest.raises(ConfigError, match="--exhaustive-fine"):
        vgskit.experiment.evaluate_splits(create_model("test_toy_fixed"), tiny_manifest, ["train"],
                                          exhaustive_fine=True)
