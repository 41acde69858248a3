"""``data.batch_sampler``: paired batches (distinct images) or shuffled captions (a plain shuffled loader)."""

from __future__ import annotations

import json

import pytest

from vgskit.data.loader import PairedBatches, ShuffledBatches
from vgskit.errors import ConfigError
from vgskit.experiment import batch_sampler_for, data_config_from, train_from_recipe

IMAGE_OF = [i // 5 for i in range(200)]  # 40 images x 5 captions


def test_the_config_names_the_sampler_the_trainer_gets() -> None:
    shuffled = batch_sampler_for(data_config_from({"batch_sampler": "shuffled", "length_bucketing": False}),
                                 IMAGE_OF, 32)
    paired = batch_sampler_for(data_config_from({"captions_per_image": 1}), IMAGE_OF, 32)
    assert isinstance(shuffled, ShuffledBatches) and isinstance(paired, PairedBatches)
    batches = shuffled(0, 7)
    assert batches == ShuffledBatches(200, 32)(0, 7) and len(batches) == 6
    # A uniform shuffle lets two captions of one image meet; paired batches never do.
    assert any(len({IMAGE_OF[c] for c in b}) < len(b) for b in batches)
    assert all(len({IMAGE_OF[c] for c in b}) == len(b) for b in paired(0, 7))


def test_bad_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="batch_sampler: must be one of 'paired', 'shuffled'"):
        data_config_from({"batch_sampler": "random"})
    with pytest.raises(ConfigError, match="length_bucketing: false"):
        data_config_from({"batch_sampler": "shuffled"})  # length bucketing is on by default
    with pytest.raises(ConfigError, match="cannot fill one batch"):
        ShuffledBatches(10, 32)


def test_training_runs_on_shuffled_batches(tiny_manifest, tmp_path) -> None:
    run = tmp_path / "run"
    summary = train_from_recipe("demo_tiny", out_dir=run, manifest=str(tiny_manifest), progress=False,
                                overrides=["data.batch_sampler=shuffled", "data.length_bucketing=false",
                                           "train.max_steps=3", "train.eval_every=3", "train.ckpt_every=3"])
    assert summary["step"] == 3 and summary["samples_seen"] == 3 * 16
    saved = json.loads((run / "checkpoints" / "step_3" / "config.json").read_text())
    assert "shuffled" in json.dumps(saved)  # the run records how its batches were formed
