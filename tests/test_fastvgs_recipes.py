"""The FaST-VGS recipes hold the paper's settings (Peng & Harwath, ICASSP 2022, §3; reference-code facts).

Every expected value below is written out from the paper (or the reference code where the paper is silent), not
read from the recipes, so a recipe edited away from the paper fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from vgskit.errors import ConfigError
from vgskit.experiment import RECIPE_DIR, data_config_from, load_experiment
from vgskit.models.fast_vgs.model import FastVGSConfig
from vgskit.models.registry import list_models, model_config
from vgskit.train.config import TrainConfig, config_from_dict
from vgskit.train.loop import load_init_weights
from vgskit.train.schedules import build_scheduler

README = Path(__file__).resolve().parents[1] / "README.md"

# Shared by every corpus (paper §3 "Implementation details"; weight decay, clipping, eps: reference code).
COMMON_TRAIN = {
    "optimizer": "bertadam",
    "schedule": "bert_warmup_linear",
    "lr": 1e-4,
    "warmup_fraction": 0.1,
    "warmup_steps": None,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "eps": 1e-6,
}
COMMON_MODEL = {"coarse_weight": 0.1, "fine_weight": 1.0, "margin": 1.0}  # (lambda_c, lambda_f) = (0.1, 1), delta = 1

# recipe -> (corpus, batch size, epochs, train crop s, eval crop s, init_from)
PAPER = {
    "fast_vgs_flickr8k": ("flickr8k", 96, 60, 8.0, 10.0, None),
    "fast_vgs_spokencoco": ("spokencoco", 64, 20, 8.0, 10.0, None),
    "fast_vgs_places": ("places", 48, 20, 18.0, 25.0, None),
    "fast_vgs_flickr8k_from_spokencoco": ("flickr8k", 96, 60, 8.0, 10.0, "runs/fast_vgs_spokencoco"),
}

# recipe -> the paper's coarse-to-fine R@1/5/10, speech -> image then image -> speech (Tables 2 and 3).
PAPER_RESULTS = {
    "fast_vgs_flickr8k": ("29.3 / 58.6 / 71.0", "37.9 / 68.5 / 79.9"),
    "fast_vgs_spokencoco": ("35.9 / 66.3 / 77.9", "48.8 / 78.2 / 87.0"),
    "fast_vgs_flickr8k_from_spokencoco": ("45.5 / 73.8 / 83.7", "59.8 / 84.1 / 90.7"),
}
PLACES_RESULTS = {  # Table 2, CTF: test-seen and test-unseen; Table 1: dev, (0.1, 1), CTF, mean of both directions
    "test_seen": ("64.0 / 88.3 / 93.7", "64.2 / 87.9 / 92.2"),
    "test_unseen": ("69.6 / 90.3 / 94.3", "66.0 / 90.4 / 94.1"),
    "dev": "67.8 / 90.5 / 94.6",
}


def _resolved(name: str):
    exp = load_experiment(name)
    model_d = dict(exp["model"])
    model_name = model_d.pop("name")
    return (exp, model_name, model_config(model_name, **model_d), data_config_from(exp["data"]),
            config_from_dict(TrainConfig, exp["train"], prefix="train"))


# The embedded-corpus recipe: not a paper setting, but it must keep the paper's losses and optimiser.
SCENES = "fast_vgs_scenes"


def test_every_fast_vgs_recipe_is_in_the_table():
    on_disk = {p.stem for p in RECIPE_DIR.glob("fast_vgs*.yaml")}
    assert on_disk == set(PAPER) | {SCENES}
    assert (RECIPE_DIR / "_fast_vgs_common.yaml").is_file()


def test_scenes_recipe_keeps_the_paper_objective_and_optimiser():
    exp, model_name, mcfg, data, train = _resolved(SCENES)
    assert model_name == "fast_vgs_scenes"
    assert (mcfg.coarse_weight, mcfg.fine_weight) == (1.0, 1.0)  # (1, 1): a point of the paper's grid (Table 1)
    assert mcfg.margin == 1.0
    assert (mcfg.audio_layers, mcfg.cross_layers) == (1, 2)  # the paper's speech and cross-encoder depths
    assert mcfg.speech_frontend == "logmel_cnn" and mcfg.region_feat_dim == 1280  # EfficientNet-Lite0 features
    for key, want in COMMON_TRAIN.items():
        if key in ("lr", "optimizer", "eps"):
            continue  # from scratch: AdamW at 1e-3 (the recipe says why); the schedule, decay and clip are the paper's
        got = getattr(train, key)
        assert got == (pytest.approx(want) if isinstance(want, float) else want), f"train.{key}: {got!r}"
    assert (train.optimizer, train.lr) == ("adamw", pytest.approx(1e-3))
    assert data.region_features == "scene_boxes" and data.num_regions == 5  # <= 4 objects + the whole image
    assert data.manifest is None and data.corpus_preset == "demo"
    assert data.rerank_top == 50


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_holds_the_paper_settings(name: str):
    corpus, batch, epochs, train_s, eval_s, init_from = PAPER[name]
    exp, model_name, mcfg, data, train = _resolved(name)

    assert model_name == "fast_vgs" and model_name in list_models()
    assert isinstance(mcfg, FastVGSConfig)
    for key, want in COMMON_MODEL.items():
        assert getattr(mcfg, key) == pytest.approx(want), f"model.{key}"
    # Paper §3: wav2vec2-base CNN frozen + its first 8 layers; audio mean/variance-normalised per utterance.
    assert mcfg.speech.num_layers == 8 and mcfg.speech.freeze_cnn and mcfg.speech.normalize_waveform
    assert (mcfg.audio_layers, mcfg.visual_layers, mcfg.cross_layers) == (1, 6, 2)
    assert mcfg.layer.hidden_size == 768

    assert data.corpus == corpus
    assert data.train_max_seconds == pytest.approx(train_s)
    assert data.eval_max_seconds == pytest.approx(eval_s)
    assert data.train_crop == "head"  # the first N seconds
    assert data.num_regions == 36  # top-36 Faster R-CNN regions
    assert data.region_features  # a region model: the recipe names where its HDF5 is expected

    for key, want in COMMON_TRAIN.items():
        got = getattr(train, key)
        assert got == (pytest.approx(want) if isinstance(want, float) else want), f"train.{key}: {got!r}"
    assert train.batch_size == batch
    assert train.epochs == epochs
    assert train.max_steps is None  # the length is the paper's epochs
    assert train.init_from == init_from
    # Every train key is written in the recipe, not left to a default that might change.
    for key in ("optimizer", "schedule", "lr", "warmup_fraction", "weight_decay", "grad_clip", "eps",
                "batch_size", "epochs"):
        assert key in exp["train"], f"train.{key} missing"
    for key in ("coarse_weight", "fine_weight", "margin"):
        assert key in exp["model"], f"model.{key} missing"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_schedule_is_ten_percent_warmup_then_linear_decay_to_zero(name: str):
    _, _, _, _, train = _resolved(name)
    total = 1000
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=train.lr)
    sched = build_scheduler(opt, train, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0
    assert max(lrs) == pytest.approx(1e-4) and lrs.index(max(lrs)) == 100  # peak at 10 % of the run
    assert lrs[50] == pytest.approx(0.5e-4)
    assert lrs[550] == pytest.approx(0.5e-4)  # halfway down the decay
    assert lrs[-1] == pytest.approx(1e-4 / 900, rel=1e-6)  # reaches 0 at the end of the run


def test_fast_vgs_star_is_the_flickr8k_recipe_from_spokencoco_weights():
    star = load_experiment("fast_vgs_flickr8k_from_spokencoco")
    flickr = load_experiment("fast_vgs_flickr8k")
    assert star["model"] == flickr["model"]
    assert star["data"] == flickr["data"]
    assert {k: v for k, v in star["train"].items() if k != "init_from"} == flickr["train"]
    assert "init_from" not in flickr["train"]
    # init_from names the pre-training run's folder; another one is given on the command line.
    assert star["train"]["init_from"] == "runs/fast_vgs_spokencoco"
    moved = load_experiment("fast_vgs_flickr8k_from_spokencoco", ["train.init_from=/ckpt/coco"])
    assert config_from_dict(TrainConfig, moved["train"], prefix="train").init_from == "/ckpt/coco"
    # A blank value is refused when the recipe is read.
    blank = load_experiment("fast_vgs_flickr8k_from_spokencoco", ["train.init_from=' '"])
    with pytest.raises(ConfigError, match=r"train\.init_from"):
        config_from_dict(TrainConfig, blank["train"], prefix="train")


def test_fast_vgs_star_refuses_a_missing_pretrained_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # no runs/fast_vgs_spokencoco here
    init_from = load_experiment("fast_vgs_flickr8k_from_spokencoco")["train"]["init_from"]
    with pytest.raises(ConfigError, match=r"train\.init_from runs/fast_vgs_spokencoco: not found"):
        load_init_weights(nn.Linear(2, 2), init_from)


def test_the_common_base_is_not_runnable():
    with pytest.raises(ConfigError, match=r"model\.name is required"):
        load_experiment("_fast_vgs_common")


def _readme_section() -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"^## FaST-VGS\n(.*?)^## ", text, flags=re.S | re.M)
    assert m, "README.md: no '## FaST-VGS' section followed by another section"
    return m.group(1)


def test_readme_lists_each_recipe_with_the_paper_numbers():
    section = _readme_section()
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`(fast_vgs[a-z0-9_]*)`\s*\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    assert set(rows) - {SCENES} == set(PAPER)
    for name, (s2i, i2s) in PAPER_RESULTS.items():
        assert s2i in rows[name] and i2s in rows[name], name
    places = " ".join(rows["fast_vgs_places"])
    for value in (*PLACES_RESULTS["test_seen"], *PLACES_RESULTS["test_unseen"]):
        assert value in places
    assert PLACES_RESULTS["dev"] in section
    for name in PAPER:
        corpus, batch, epochs, *_ = PAPER[name]
        assert str(batch) in rows[name] and str(epochs) in rows[name], name
    for command in ("vgskit data prepare flickr8k", "vgskit train --recipe fast_vgs_flickr8k",
                    "--rerank-top 100", "--region-features", "compute_region_features",
                    "--set train.init_from="):
        assert command in section, command
