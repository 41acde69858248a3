"""LR schedules: values at their boundaries, alone and driven by LambdaLR, selection by config, state dicts."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vgskit.errors import ConfigError
from vgskit.train.config import TrainConfig, config_from_dict
from vgskit.train.schedules import (
    BertWarmupLinear,
    SpeechClipWarmupDecay,
    WarmupLinearDecay,
    bert_warmup_linear,
    build_scheduler,
    list_schedules,
    resolve_warmup_steps,
)

GOLDEN = Path(__file__).parent / "golden"


def test_factor_at_boundaries():
    f = WarmupLinearDecay(warmup_steps=4, max_steps=12, lr=1e-3, end_lr=1e-4)
    assert f(0) == 0.0
    assert f(1) == pytest.approx(0.25)
    assert f(3) == pytest.approx(0.75)
    assert f(4) == pytest.approx(1.0)  # peak exactly at the end of warm-up
    assert f(8) == pytest.approx(0.55)  # halfway through the decay: (1 + 0.1) / 2
    assert f(12) == pytest.approx(0.1)  # end_lr / lr at max_steps
    assert f(20) == pytest.approx(0.1)  # and constant afterwards
    values = [f(s) for s in range(13)]
    assert values[:5] == sorted(values[:5]) and values[4:] == sorted(values[4:], reverse=True)


def test_no_warmup_and_all_warmup():
    f = WarmupLinearDecay(0, 10, lr=1.0, end_lr=0.0)
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5) and f(10) == 0.0
    g = WarmupLinearDecay(5, 5, lr=1.0, end_lr=0.2)
    assert g(0) == 0.0 and g(4) == pytest.approx(0.8) and g(5) == pytest.approx(0.2)


def test_invalid_arguments():
    with pytest.raises(ConfigError, match="warmup_steps"):
        WarmupLinearDecay(11, 10, 1.0)
    with pytest.raises(ConfigError, match="max_steps"):
        WarmupLinearDecay(0, 0, 1.0)
    with pytest.raises(ConfigError, match="end_lr"):
        WarmupLinearDecay(0, 10, 1.0, end_lr=2.0)


def test_lambdalr_lr_per_update_and_state_dict():
    cfg = TrainConfig(lr=0.1, end_lr=0.01, warmup_fraction=0.2, max_steps=10)
    assert resolve_warmup_steps(cfg, 10) == 2
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total_steps=10)
    used = []
    for _ in range(11):
        used.append(opt.param_groups[0]["lr"])  # the lr this update runs with
        opt.step()
        sched.step()
    assert used[0] == 0.0 and used[1] == pytest.approx(0.05) and used[2] == pytest.approx(0.1)
    assert used[10] == pytest.approx(0.01)
    # The schedule's settings are plain numbers in the state dict (a closure would be dropped).
    [saved] = sched.state_dict()["lr_lambdas"]
    assert saved == {"warmup_steps": 2, "max_steps": 10, "end_ratio": pytest.approx(0.1)}


def test_resolve_warmup_steps_variants():
    assert resolve_warmup_steps(TrainConfig(max_steps=100), 100) == 0
    assert resolve_warmup_steps(TrainConfig(max_steps=100, warmup_steps=500), 100) == 100
    assert resolve_warmup_steps(TrainConfig(epochs=1, warmup_fraction=0.05), 1000) == 50


# ------------------------------------------------------------------------------------- schedule registry


def _lrs(cfg: TrainConfig, total_steps: int, n: int) -> tuple[list[float], torch.optim.lr_scheduler.LambdaLR]:
    """The lr each of the first ``n`` updates runs with."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total_steps=total_steps)
    used = []
    for _ in range(n):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return used, sched


def test_list_schedules_and_default():
    assert {"linear", "speechclip", "bert_warmup_linear"} <= set(list_schedules())
    assert list_schedules() == sorted(list_schedules())
    cfg = TrainConfig(max_steps=10)
    assert cfg.schedule == "linear"
    assert isinstance(build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr), cfg,
                                      10).lr_lambdas[0], WarmupLinearDecay)


def test_speechclip_schedule_starts_one_step_ahead():
    cfg = TrainConfig(schedule="speechclip", lr=0.1, end_lr=0.01, warmup_steps=2, max_steps=10)
    used, sched = _lrs(cfg, 10, 11)
    linear, _ = _lrs(TrainConfig(lr=0.1, end_lr=0.01, warmup_steps=2, max_steps=10), 10, 12)
    assert used[0] == pytest.approx(0.05) and used[1] == pytest.approx(0.1)  # lr/warmup first, not 0
    assert used[:9] == pytest.approx(linear[1:10])  # the generic curve, one step earlier
    assert used[9] == used[10] == pytest.approx(0.01)  # final lr at max_steps - 1, then held
    [saved] = sched.state_dict()["lr_lambdas"]
    assert saved == {"warmup": 2, "max_step": 10, "final_ratio": pytest.approx(0.1), "hold_final": True}
    assert isinstance(sched.lr_lambdas[0], SpeechClipWarmupDecay)


def test_speechclip_schedule_matches_reference_through_the_config():
    t = load_file(str(GOLDEN / "speechclip_linear_warmup_decay.safetensors"))
    meta = json.loads((GOLDEN / "speechclip_linear_warmup_decay.json").read_text())
    args = meta["constructor_args"]
    lr = float(re.search(r"lr=([0-9.e+-]+)", args["optimizer"]).group(1))
    cfg = TrainConfig(schedule="speechclip", lr=lr, end_lr=args["final_lr"], warmup_steps=args["warmup"],
                      max_steps=args["max_step"])
    sched = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr), cfg, cfg.max_steps)
    rec = meta["tolerance"]["recommended"]
    for step, want in zip(t["input.steps"].tolist(), t["output.lr"].tolist(), strict=True):
        if step < cfg.max_steps:  # past the run the reference turns negative; ours holds end_lr
            assert lr * sched.lr_lambdas[0](step) == pytest.approx(want, rel=rec["rtol"], abs=rec["atol"])


def test_bert_warmup_linear_factor():
    assert bert_warmup_linear(0.0, 0.1) == 0.0
    assert bert_warmup_linear(0.05, 0.1) == pytest.approx(0.5)
    assert bert_warmup_linear(0.1, 0.1) == 1.0
    assert bert_warmup_linear(0.55, 0.1) == pytest.approx(0.5)
    assert bert_warmup_linear(1.0, 0.1) == 0.0 and bert_warmup_linear(1.5, 0.1) == 0.0
    assert bert_warmup_linear(0.25, 0.0) == pytest.approx(0.75)  # no warm-up: straight decay from 1


def test_bert_warmup_linear_schedule_uses_the_exact_fraction():
    # warmup_fraction 0.25 of 10 steps is 2.5 steps: the peak falls between updates 2 and 3, where the
    # step-rounded 'linear' schedule would put it exactly at update 2.
    cfg = TrainConfig(schedule="bert_warmup_linear", lr=1.0, warmup_fraction=0.25, max_steps=10, end_lr=0.5)
    used, sched = _lrs(cfg, 10, 12)
    want = [0.0, 0.4, 0.8, 0.7 / 0.75, 0.6 / 0.75, 0.5 / 0.75, 0.4 / 0.75, 0.3 / 0.75, 0.2 / 0.75, 0.1 / 0.75,
            0.0, 0.0]  # end_lr is not used: the reference decays to 0 at the end of the run
    assert used == pytest.approx(want, abs=1e-15)
    assert used[0] == 0.0  # first update at lr 0, as the reference's BertAdam
    [saved] = sched.state_dict()["lr_lambdas"]
    assert saved == {"warmup": 0.25, "total_steps": 10}
    assert isinstance(sched.lr_lambdas[0], BertWarmupLinear)


def test_bert_warmup_linear_needs_warmup_fraction():
    with pytest.raises(ConfigError, match=r"^train\.warmup_fraction: the 'bert_warmup_linear' schedule needs"):
        config_from_dict(TrainConfig, {"schedule": "bert_warmup_linear", "max_steps": 10, "warmup_steps": 2},
                         prefix="train")
    cfg = TrainConfig(schedule="bert_warmup_linear", warmup_fraction=0.1, max_steps=10)
    cfg.warmup_fraction = None  # changed after the check: the builder says the same
    with pytest.raises(ConfigError, match="^warmup_fraction: the 'bert_warmup_linear' schedule needs"):
        _lrs(cfg, 10, 1)


def test_speechclip_needs_a_warmup():
    with pytest.raises(ConfigError, match=r"^train\.warmup_steps: the 'speechclip' schedule needs a warm-up"):
        config_from_dict(TrainConfig, {"schedule": "speechclip", "max_steps": 10}, prefix="train")
    with pytest.raises(ConfigError, match=r"^train\.warmup_fraction: the 'speechclip' schedule needs"):
        config_from_dict(TrainConfig, {"schedule": "speechclip", "max_steps": 10, "warmup_fraction": 0.0},
                         prefix="train")
    # Known only once the run length is: a warm-up as long as the run leaves no decay step.
    cfg = TrainConfig(schedule="speechclip", warmup_steps=10, max_steps=10)
    with pytest.raises(ConfigError, match="^warmup_steps: the 'speechclip' schedule needs a warm-up of 1 to 9"):
        _lrs(cfg, 10, 1)
    cfg = TrainConfig(schedule="speechclip", warmup_fraction=0.01, epochs=1)
    with pytest.raises(ConfigError, match="^warmup_fraction: the 'speechclip' schedule"):
        _lrs(cfg, 20, 1)  # rounds to 0 steps


def test_unknown_schedule_and_other_config_fields():
    with pytest.raises(ConfigError, match=r"^train\.schedule: must be one of .*'linear'.*\(got 'cosine'\)"):
        config_from_dict(TrainConfig, {"schedule": "cosine", "max_steps": 10}, prefix="train")
    cfg = TrainConfig(max_steps=10)
    cfg.schedule = "cosine"
    with pytest.raises(ConfigError, match="^schedule: unknown schedule 'cosine'; must be one of"):
        _lrs(cfg, 10, 1)
    assert TrainConfig(max_steps=1).init_from is None
    assert config_from_dict(TrainConfig, {"max_steps": 1, "init_from": "runs/a/checkpoints/best"}).init_from == (
        "runs/a/checkpoints/best")
    for bad in ("", "  "):
        with pytest.raises(ConfigError, match=r"^train\.init_from: must be a checkpoint folder"):
            config_from_dict(TrainConfig, {"max_steps": 1, "init_from": bad}, prefix="train")
    with pytest.raises(ConfigError, match=r"^train\.init_from: expected"):
        config_from_dict(TrainConfig, {"max_steps": 1, "init_from": 3}, prefix="train")


@pytest.mark.parametrize("schedule", [WarmupLinearDecay(3, 10, 1.0, 0.1), SpeechClipWarmupDecay(3, 10, 1.0, 0.1),
                                      BertWarmupLinear(0.3, 10)], ids=lambda s: type(s).__name__)
def test_schedules_pickle_with_plain_number_attributes(schedule):
    copy = pickle.loads(pickle.dumps(schedule))
    assert [copy(k) for k in range(12)] == [schedule(k) for k in range(12)]
    assert all(isinstance(v, (int, float, bool)) for v in vars(schedule).values())


def test_speechclip_model_module_reexports_the_schedule():
    import vgskit.models.speechclip as speechclip

    assert speechclip.SpeechClipWarmupDecay is SpeechClipWarmupDecay


def test_step_decay_is_milans_staircase():
    # MILAN §4: lr 1e-3, multiplied by 0.999 every 1,000 steps (here after a 2-step warm-up).
    cfg = TrainConfig(schedule="step_decay", lr=1e-3, decay_gamma=0.999, decay_every=1000, warmup_steps=2,
                      max_steps=5000)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, 5000)
    lrs = []
    for _ in range(4000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5e-3) and lrs[1] == pytest.approx(1e-3)
    assert lrs[2] == lrs[1001] == pytest.approx(1e-3)  # steps 2 .. 1001: the first stair
    assert lrs[1002] == pytest.approx(1e-3 * 0.999) and lrs[3002] == pytest.approx(1e-3 * 0.999 ** 3)
    with pytest.raises(ConfigError, match="decay_gamma"):
        TrainConfig(schedule="step_decay", max_steps=10, decay_gamma=1.5)
