"""A tiny Cross-Modal Denoising model (the ``cmd_large`` registry entry on tiny random HuBERT and CLIP towers,
both trained) learns the tiny spoken-scenes corpus through ``train_from_recipe``: retrieval far above chance,
the denoising loss logged and falling, and the saved model free of the fusion encoder."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from _recall_checks import assert_well_above_chance
from _tiny_speechclip import Towers, make_towers, tiny_config
from vgskit.experiment import load_model, make_dataset, train_from_recipe
from vgskit.models.registry import WEIGHTS_FILE
from vgskit.models.speechclip.cmd import CrossModalDenoising
from vgskit.retrieval.evaluate import evaluate
from vgskit.train.tracking import read_metrics

STEPS = 400


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> Towers:
    return make_towers(tmp_path_factory)


def cmd_recipe(towers: Towers) -> dict:
    section = {k: v for k, v in asdict(tiny_config(towers, "parallel", freeze=False)).items()
               if k in ("speech", "image", "parallel")}
    return {
        "model": {"name": "cmd_large", "cmd_weight": 0.5, "learnable_temperature": False, **section},
        # Two captions per image: the multi-positive targets and the donor rule see shared images.
        "data": {"train_max_seconds": 2.0, "train_crop": "head", "captions_per_image": 2, "preload": True,
                 "val_max_images": 4, "eval_batch_size": 32},
        "train": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-6, "warmup_steps": 0, "max_steps": STEPS,
                  "batch_size": 16, "log_every": 10, "eval_every": None, "ckpt_every": STEPS, "tensorboard": False,
                  "amp": False},
    }


def test_tiny_cmd_learns_the_tiny_corpus(towers: Towers, tiny_manifest: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    summary = train_from_recipe(cmd_recipe(towers), out_dir=tmp_path / "run", manifest=str(tiny_manifest),
                                progress=False)
    assert summary["step"] == STEPS
    rows = read_metrics(tmp_path / "run", kind="train")
    cmd = [row["loss/cmd"] for row in rows]
    assert len(cmd) == STEPS // 10 and all(torch.isfinite(torch.tensor(cmd)))
    assert sum(cmd[-3:]) < sum(cmd[:3])  # the denoising loss is trained, not only logged

    model = load_model(tmp_path / "run")
    assert isinstance(model, CrossModalDenoising)
    latest = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    with safe_open(str(latest / WEIGHTS_FILE), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith(("fusion.", "patch_projection."))]

    train = make_dataset(tiny_manifest, "train", model.image_transform, max_seconds=2.0, preload=True,
                         progress=False)
    res = evaluate(model, train)
    # 24 training images (chance R@1 4.2 %, R@5 20.8 %), 120 captions.
    assert_well_above_chance(res)
