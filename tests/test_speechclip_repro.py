"""The SpeechCLIP recipes reproduce the reference's training set-up: its warm-up/decay schedule, weight decay on
every parameter, the order in which its branches draw their initial values (and its keyword BatchNorm init), its
batch composition as far as the trainer allows, and checkpoint selection on mean R@1 (base) / R@10 (large)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from _tiny_speechclip import Towers, make_towers, tiny_config
from vgskit.data.loader import paired_batch_sampler
from vgskit.experiment import data_config_from, load_experiment, validation_metric_names
from vgskit.models.registry import model_config
from vgskit.models.speechclip import (
    CascadedBranch,
    CascadedBranchConfig,
    ParallelBranch,
    ParallelBranchConfig,
    ShuffledCaptionBatches,
    SpeechCLIP,
    convert_speechclip_state_dict,
)
from vgskit.train.config import TrainConfig, config_from_dict
from vgskit.train.optim import create_optimizer
from vgskit.train.schedules import SpeechClipWarmupDecay, build_scheduler

RECIPES = sorted(p for p in (Path(__file__).parents[1] / "src" / "vgskit" / "recipes").glob("speechclip_*.yaml"))


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> Towers:
    return make_towers(tmp_path_factory)


def _train(recipe: Path, overrides: tuple[str, ...] = ()) -> TrainConfig:
    d = dict(load_experiment(recipe, overrides)["train"])
    d["out_dir"] = "unused"
    return config_from_dict(TrainConfig, d, prefix="train")


def _model(recipe: Path, overrides: tuple[str, ...] = ()):
    d = dict(load_experiment(recipe, overrides)["model"])
    return model_config(d.pop("name"), **d)


def test_there_are_eight_paper_recipes() -> None:
    assert len(RECIPES) == 8


# ---------------------------------------------------------------------------------------------------------
# (a) schedule
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_use_the_reference_schedule(recipe: Path) -> None:
    cfg = _train(recipe)
    assert (cfg.optimizer, cfg.schedule) == ("adam", "speechclip")
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.max_steps, cfg.end_lr) == (1e-4, 1e-6, 5000, 50000, 1e-8)
    assert (cfg.batch_size, cfg.grad_clip) == (256, 4.0)
    sched = build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr), cfg, cfg.max_steps)
    ref = SpeechClipWarmupDecay(5000, 50000, 1e-4, 1e-8)
    assert isinstance(sched.lr_lambdas[0], SpeechClipWarmupDecay)
    for step in (0, 1, 2500, 4999, 5000, 5001, 27500, 49998, 49999):
        assert sched.lr_lambdas[0](step) == ref(step)


def test_schedule_is_the_reference_curve() -> None:
    # linear_warmup_decay: lr * (step + 1) / warmup during the warm-up, then linear to final_lr at max_step.
    cfg = _train(RECIPES[0])
    sched = build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr), cfg, cfg.max_steps)
    lr = [cfg.lr * sched.lr_lambdas[0](s) for s in (0, 4999, 27499, 49999)]
    assert lr[0] == pytest.approx(1e-4 / 5000, rel=1e-6)
    assert lr[1] == pytest.approx(1e-4, rel=1e-6)
    assert 1e-8 < lr[2] < 1e-4
    assert lr[3] == pytest.approx(1e-8, rel=1e-3)


# ---------------------------------------------------------------------------------------------------------
# (b) weight decay on every parameter
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_reproduce_the_reference_model_settings(recipe: Path) -> None:
    config = _model(recipe)
    assert config.decay_all_parameters is True
    assert config.reference_init_order is True
    assert config.cascaded.bn_reference_init is True
    assert config.cascaded.keyword_batchnorm is True


def test_decay_on_every_parameter(towers: Towers) -> None:
    model = SpeechCLIP(tiny_config(towers, "both", learnable_temperature=True, decay_all_parameters=True))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(p.ndim < 2 for p in trainable)  # biases, norms, layer weights, temperature
    groups = model.param_groups(1e-6)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-6
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in trainable]
    opt = create_optimizer(groups, TrainConfig(optimizer="adam", weight_decay=1e-6, max_steps=10, out_dir="unused"))
    assert isinstance(opt, torch.optim.Adam)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 1e-6 for p in g["params"]}
    assert decayed == {id(p) for p in trainable}
    assert id(model.loss.logit_scale) in decayed and id(model.layer_sum.weights) in decayed

    # Our default leaves biases, norms and scalars undecayed.
    plain = SpeechCLIP(tiny_config(towers, "both", learnable_temperature=True))
    no_decay = {id(p) for g in plain.param_groups(1e-6) if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(plain.cascaded.proj.bias) in no_decay and id(plain.loss.logit_scale) in no_decay


# ---------------------------------------------------------------------------------------------------------
# (c) initial-value order and keyword BatchNorm init
# ---------------------------------------------------------------------------------------------------------

#: The reference KW_CascadedBranch's state-dict keys in order, without its shared CLIP (``clip.*``).
REFERENCE_CASCADED_KEYS = (
    "cls",
    "self_att.multihead_attn_layer.in_proj_weight",
    "self_att.multihead_attn_layer.in_proj_bias",
    "self_att.multihead_attn_layer.out_proj.weight",
    "self_att.multihead_attn_layer.out_proj.bias",
    "self_att.attentionBlock_Norm.weight",
    "self_att.attentionBlock_Norm.bias",
    "linear_proj.weight",
    "linear_proj.bias",
    "vector_quantizer.curr_temp",
    "bn_layer.bn_layer.weight",
    "bn_layer.bn_layer.bias",
    "bn_layer.bn_layer.running_mean",
    "bn_layer.bn_layer.running_var",
    "bn_layer.bn_layer.num_batches_tracked",
)


def _cascaded_config() -> CascadedBranchConfig:
    return CascadedBranchConfig(audio_dim=16, text_dim=8, vocab_size=30, num_keywords=3, masked_ids=(0,))


def test_cascaded_branch_follows_the_reference_order() -> None:
    torch.manual_seed(0)
    ours = CascadedBranch(_cascaded_config())
    names = [k for k in ours.state_dict() if not k.startswith("token_embedding")]
    assert names == list(convert_speechclip_state_dict(dict.fromkeys(REFERENCE_CASCADED_KEYS, torch.zeros(1))))
    assert [n for n, _ in ours.named_parameters() if n != "token_embedding.weight"] == [
        n for n in names if not n.endswith(("running_mean", "running_var", "num_batches_tracked", "temperature"))]

    # The reference draws: CLS (randn), MultiheadAttention, LayerNorm, Linear; the quantiser and BatchNorm draw
    # nothing. Rebuilt from stock modules under the same seed, the values agree.
    torch.manual_seed(0)
    cls = torch.randn(1, 3, 16)
    mha = nn.MultiheadAttention(16, 1, dropout=0.1, batch_first=True)
    nn.LayerNorm(16)
    lin = nn.Linear(16, 8)
    assert torch.equal(ours.cls, cls)
    assert torch.equal(ours.attention.attn.in_proj_weight, mha.in_proj_weight)
    assert torch.equal(ours.attention.attn.out_proj.weight, mha.out_proj.weight)
    assert torch.equal(ours.proj.weight, lin.weight) and torch.equal(ours.proj.bias, lin.bias)


def test_keyword_batchnorm_reference_init_order() -> None:
    cfg = _cascaded_config()
    ref = CascadedBranch(CascadedBranchConfig(**{**cfg.__dict__, "bn_reference_init": True}))
    table = ref.vocabulary  # [V, D]
    # Kw_BatchNorm(parallel=True): weight = std(E).repeat(K), bias = mean(E).repeat(K) on the d*K+k layout.
    assert torch.equal(ref.batchnorm.bn.weight.detach(), table.std(dim=0).repeat(3))
    assert torch.equal(ref.batchnorm.bn.bias.detach(), table.mean(dim=0).repeat(3))


def _parallel_config() -> ParallelBranchConfig:
    return ParallelBranchConfig(audio_dim=16, out_dim=8, num_heads=2, ffn_dim=32)


def test_parallel_branch_reference_order() -> None:
    torch.manual_seed(1)
    ours = ParallelBranch(_parallel_config(), reference_init_order=True)
    # The reference (KW_ParallelBranch): transformer (layer, final LayerNorm), then CLS (randn), then Linear.
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(16, 2, 32, 0.1, activation="gelu", batch_first=True)
    nn.LayerNorm(16)
    cls = torch.randn(1, 1, 16)
    lin = nn.Linear(16, 8)
    assert torch.equal(ours.cls, cls)
    assert torch.equal(ours.encoder.layers[0].self_attn.in_proj_weight, layer.self_attn.in_proj_weight)
    assert torch.equal(ours.encoder.layers[0].linear1.weight, layer.linear1.weight)
    assert torch.equal(ours.proj.weight, lin.weight)
    # Same parameters, same order; only the drawn values differ from our default order (CLS first).
    torch.manual_seed(1)
    default = ParallelBranch(_parallel_config())
    assert [n for n, _ in default.named_parameters()] == [n for n, _ in ours.named_parameters()]
    torch.manual_seed(1)
    assert torch.equal(default.cls, torch.randn(1, 1, 16)) and not torch.equal(default.cls, ours.cls)


def test_model_builds_the_cascaded_branch_first(towers: Towers) -> None:
    ref = SpeechCLIP(tiny_config(towers, "both", reference_init_order=True))
    ours = SpeechCLIP(tiny_config(towers, "both"))

    def branches(model: nn.Module) -> list[str]:
        return [n for n, _ in model.named_children() if n in ("parallel", "cascaded")]

    assert branches(ref) == ["cascaded", "parallel"]
    assert branches(ours) == ["parallel", "cascaded"]
    assert set(ref.state_dict()) == set(ours.state_dict())


# ---------------------------------------------------------------------------------------------------------
# (d) batch composition
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_batch_one_caption_per_image_unsorted(recipe: Path) -> None:
    data = data_config_from(load_experiment(recipe)["data"])
    # The reference's batches: every caption its own item, shuffled (data.batch_sampler: shuffled).
    assert data.batch_sampler == "shuffled"
    assert data.captions_per_image == 1 and data.length_bucketing is False
    assert data.train_crop == "random" and data.train_max_seconds == 6.4 and data.eval_max_seconds is None


def test_shuffled_caption_batches_are_the_reference_batches() -> None:
    image_of = [i // 5 for i in range(200)]  # 40 images x 5 captions
    sampler = ShuffledCaptionBatches(len(image_of), 32)
    batches = sampler(0, 7)
    assert len(batches) == sampler.num_batches() == 200 // 32
    flat = [c for b in batches for c in b]
    assert all(len(b) == 32 for b in batches) and len(set(flat)) == len(flat)
    assert sampler(0, 7) == batches and sampler(1, 7) != batches
    # Two captions of one image can share a batch (a uniform shuffle), unlike the trainer's paired batches.
    assert any(len({image_of[c] for c in b}) < len(b) for b in batches)
    paired = paired_batch_sampler(image_of, 32, 1, seed=7, epoch=0)
    assert all(len({image_of[c] for c in b}) == len(b) for b in paired)
    seen: list[tuple[int, int]] = []
    ShuffledCaptionBatches(200, 32, on_epoch=lambda e, s: seen.append((e, s)))(3, 9)
    assert seen == [(3, 9)]


# ---------------------------------------------------------------------------------------------------------
# (e) checkpoint selection
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_select_like_the_released_checkpoints(recipe: Path) -> None:
    cfg = _train(recipe)
    want = "val/mean_R@1" if "_base_" in recipe.stem else "val/mean_R@10"
    assert cfg.select_metric == want and cfg.select_mode == "max"
    assert want in validation_metric_names()
