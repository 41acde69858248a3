"""Training from frozen-tower feature caches through train_from_recipe: same losses as the live towers,
checkpoints that hold the real towers, nothing extracted twice, exact resume, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

import _toy_models  # noqa: F401  (registers the test models)
from _tiny_towers import TINY_SPEECH
from vgskit.errors import ConfigError
from vgskit.experiment import load_model, train_from_recipe
from vgskit.train.tracking import read_metrics

STEPS = 4


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hubert")
    torch.manual_seed(0)
    HubertModel(HubertConfig(**TINY_SPEECH)).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=False).save_pretrained(folder)
    return folder


def _recipe(hubert_dir: Path, manifest: Path, **data: object) -> dict:
    return {
        "model": {"name": "test_frozen_towers", "speech_tower": str(hubert_dir)},
        "data": {"manifest": str(manifest), "train_max_seconds": 1.0, "captions_per_image": 2, "val_max_images": 4,
                 "eval_batch_size": 16, **data},
        "train": {"optimizer": "adamw", "lr": 1e-2, "warmup_steps": 0, "max_steps": STEPS, "batch_size": 16,
                  "log_every": 1, "eval_every": STEPS, "ckpt_every": 2, "select_metric": "val/mean_R@10",
                  "tensorboard": False, "amp": False},
    }


def _losses(run: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run, kind="train")]


def _final(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


def test_cached_training_matches_live_towers(hubert_dir, tiny_manifest, tmp_path) -> None:
    cache = tmp_path / "features"
    live = train_from_recipe(_recipe(hubert_dir, tiny_manifest), out_dir=tmp_path / "live", progress=False)
    cached = train_from_recipe(_recipe(hubert_dir, tiny_manifest, feature_cache=str(cache)),
                               out_dir=tmp_path / "cached", progress=False)
    assert "feature_cache" not in live
    fc = cached["feature_cache"]
    assert fc["speech"]["extracted"] == 120 and fc["image"]["extracted"] == 24  # tiny train split
    assert Path(fc["speech"]["folder"]).parent == cache

    # Same losses step by step: the cache holds the towers' outputs in fp16, nothing else differs.
    a, b = _losses(tmp_path / "live"), _losses(tmp_path / "cached")
    assert len(a) == len(b) == STEPS and a[0] > a[-1]  # it trains
    assert a != b  # the cached run did read the fp16 features, not the live towers
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=2e-3, rtol=2e-3)

    # The checkpoints hold the real towers: same keys as the live run, tower weights untouched, and the
    # trained heads agree; validation (real towers) agrees as well.
    w_live, w_cached = _final(tmp_path / "live"), _final(tmp_path / "cached")
    assert w_live.keys() == w_cached.keys()
    assert any(k.startswith("speech_tower.") for k in w_cached) and any(k.startswith("image_tower.") for k in w_cached)
    for k in w_live:
        tol = 0 if k.startswith(("speech_tower.", "image_tower.")) else 5e-3
        torch.testing.assert_close(w_cached[k], w_live[k], atol=tol, rtol=tol, msg=k)
    (ev_live,), (ev_cached,) = read_metrics(tmp_path / "live", kind="eval"), read_metrics(tmp_path / "cached", kind="eval")
    assert ev_cached["val/mean_R@10"] == pytest.approx(ev_live["val/mean_R@10"], abs=5.0)
    model = load_model(tmp_path / "cached")  # loads with load_pretrained (strict): a plain model, real towers
    assert type(model.speech_tower).__name__ == "PretrainedSpeechEncoder"

    # A second run finds everything cached; interrupted and resumed, it ends where the first one did
    # (the resumed checkpoint loads through the cache readers).
    again = train_from_recipe(_recipe(hubert_dir, tiny_manifest, feature_cache=str(cache)),
                              out_dir=tmp_path / "again", overrides=["train.stop_after_steps=2"], progress=False)
    assert again["feature_cache"]["speech"]["extracted"] == 0 and again["feature_cache"]["image"]["extracted"] == 0
    assert again["feature_cache"]["speech"]["items"] == 120
    resumed = train_from_recipe(_recipe(hubert_dir, tiny_manifest, feature_cache=str(cache)),
                                out_dir=tmp_path / "again", resume=True, progress=False)
    assert resumed["resumed_from_step"] == 2 and resumed["step"] == STEPS
    assert _losses(tmp_path / "again") == pytest.approx(b, abs=1e-6)
    w_again = _final(tmp_path / "again")
    for k in w_cached:
        torch.testing.assert_close(w_again[k], w_cached[k], atol=1e-6, rtol=1e-6, msg=k)


def test_models_that_do_not_save_their_frozen_towers(hubert_dir, tiny_manifest, tmp_path) -> None:
    """A model whose state dict leaves its frozen towers out (SpeechCLIP) keeps doing so from a cache."""
    recipe = _recipe(hubert_dir, tiny_manifest, feature_cache=str(tmp_path / "features"))
    recipe["model"]["save_towers"] = False
    recipe["train"].update(max_steps=2, eval_every=None)
    train_from_recipe(recipe, out_dir=tmp_path / "run", overrides=["train.stop_after_steps=1"], progress=False)
    resumed = train_from_recipe(recipe, out_dir=tmp_path / "run", resume=True, progress=False)
    assert resumed["resumed_from_step"] == 1 and resumed["step"] == 2
    weights = _final(tmp_path / "run")
    assert weights and not any(k.startswith(("speech_tower.", "image_tower.")) for k in weights)
    model = load_model(tmp_path / "run")
    torch.testing.assert_close(model.speech_proj.weight, weights["speech_proj.weight"])


def test_image_cache_only_with_random_crops(hubert_dir, tiny_manifest, tmp_path) -> None:
    recipe = _recipe(hubert_dir, tiny_manifest, feature_cache=str(tmp_path / "features"), train_crop="random")
    with pytest.raises(ConfigError, match="data.train_crop.*random.*speech feature cache"):
        train_from_recipe(recipe, out_dir=tmp_path / "a", progress=False)
    recipe["data"]["feature_cache_towers"] = ["image"]
    recipe["train"].update(max_steps=1, eval_every=None)
    summary = train_from_recipe(recipe, out_dir=tmp_path / "b", progress=False)
    assert set(summary["feature_cache"]) == {"image"} and summary["step"] == 1


def test_feature_cache_needs_frozen_towers(tiny_manifest, tmp_path) -> None:
    with pytest.raises(ConfigError, match="data.feature_cache.*'dual_encoder_tiny' has no frozen towers"):
        train_from_recipe("demo_tiny", out_dir=tmp_path / "run", manifest=str(tiny_manifest),
                          overrides=[f"data.feature_cache={tmp_path / 'features'}"], progress=False)
    with pytest.raises(ConfigError, match="data.feature_cache_towers"):
        train_from_recipe("demo_tiny", out_dir=tmp_path / "run", manifest=str(tiny_manifest),
                          overrides=["data.feature_cache_towers=[text]"], progress=False)
