"""Recipe → training → checkpoint → evaluation, through the same functions the CLI uses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vgskit.errors import ConfigError
from vgskit.experiment import (
    RECIPE_DIR,
    data_config_from,
    evaluate_checkpoint,
    load_experiment,
    load_model,
    train_from_recipe,
)
from vgskit.models.registry import create_model, model_config
from vgskit.train.config import TrainConfig, config_from_dict
from vgskit.train.tracking import read_metrics


@pytest.mark.parametrize("path", sorted(RECIPE_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_builtin_recipes_are_valid(path: Path):
    exp = load_experiment(path)
    model_d = dict(exp["model"])
    name = model_d.pop("name")
    config = model_config(name, **model_d)  # the model section merges into the model's config
    # Models on pretrained towers (SpeechCLIP) need downloaded weights to be built: checked up to the config.
    if not any(hasattr(value, "name_or_path") for value in vars(config).values()):
        create_model(name, **model_d)
    data_config_from(exp.get("data"))
    config_from_dict(TrainConfig, exp["train"], prefix="train")


def test_recipe_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*demo"):
        load_experiment("nope")
    with pytest.raises(ConfigError, match="missing.yaml: file not found"):
        load_experiment(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: dual_encoder_tiny}\ntrainer: {lr: 1}\n")
    with pytest.raises(ConfigError, match="unknown section.*trainer"):
        load_experiment(bad)
    with pytest.raises(ConfigError, match="data.captions_per_imag"):
        data_config_from({"captions_per_imag": 2})


def test_train_evaluate_resume(tiny_manifest, tmp_path):
    run = tmp_path / "run"
    first = train_from_recipe("demo_tiny", out_dir=run, manifest=str(tiny_manifest),
                              overrides=["train.stop_after_steps=6"], progress=False)
    assert first["step"] == 6 and not first["finished"]
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train_from_recipe("demo_tiny", out_dir=run, manifest=str(tiny_manifest), progress=False)
    second = train_from_recipe("demo_tiny", out_dir=run, manifest=str(tiny_manifest), resume=True,
                               progress=False)
    assert second["resumed_from_step"] == 6 and second["step"] == 12 and second["finished"]

    evals = read_metrics(run, kind="eval")
    assert [e["step"] for e in evals] == [6, 12]
    assert all(0.0 <= e["val/mean_R@10"] <= 100.0 for e in evals)

    results = evaluate_checkpoint(run, tiny_manifest, split="test")
    for direction in ("speech_to_image", "image_to_speech"):
        r = results[direction]
        assert 0.0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 100.0
    # 8 test images: R@10 speech→image is a full gallery, so every query hits.
    assert results["speech_to_image"]["R@10"] == 100.0
    assert results["speech_to_image"]["n_queries"] == 40

    model = load_model(run)
    assert model.model_name == "dual_encoder_tiny" and not model.training


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


def test_two_processes_train_the_same_dual_encoder_as_one(tiny_cache, tiny_manifest, tmp_path):
    """torchrun with 2 gloo processes on the real model, loss and sampler == one process, same global batch."""
    env = dict(os.environ, VGSKIT_CACHE=str(tiny_cache), OMP_NUM_THREADS="1")
    common = ["train", "--recipe", "demo_tiny", "--manifest", str(tiny_manifest),
              "--set", "train.max_steps=4", "--set", "train.eval_every=null", "--set", "train.ckpt_every=4",
              "--set", "train.amp=false"]
    single = subprocess.run([sys.executable, "-m", "vgskit.cli", *common, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "vgskit.cli", *common, "--out", str(tmp_path / "two")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    assert one.keys() == two.keys()
    torch.manual_seed(0)  # the recipe's seed: the initial weights both runs started from
    init = create_model("dual_encoder_tiny").state_dict()
    moved = max(float((one[k] - init[k]).abs().max()) for k in one if k in init)
    assert moved > 1e-3  # training changed the weights, so agreement below is not trivial
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-4, f"2-process weights differ from 1-process weights by {worst}"


def test_lengths_for_bucketing_without_preloading(tiny_manifest):
    from vgskit.experiment import make_dataset

    transform = create_model("dual_encoder_tiny").image_transform
    lazy = make_dataset(tiny_manifest, "train", transform, max_seconds=2.5, preload=False, progress=False)
    eager = make_dataset(tiny_manifest, "train", transform, max_seconds=2.5, preload=True, progress=False)
    assert lazy.num_samples() == eager.num_samples()
    assert max(eager.num_samples()) == 40000  # cropped to 2.5 s
    i = 3
    torch.testing.assert_close(lazy.waveform(i), eager.waveform(i), atol=1 / 32768, rtol=0)
