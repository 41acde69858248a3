"""BertAdam + ``bert_warmup_linear`` against the FaST-VGS reference (``tests/golden/fastvgs_bertadam_*``).

Every argument (lr, warmup, t_total, betas, eps, weight decay) and every size is read from the case, so the
same test checks a case regenerated with other arguments or shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from vgskit.train.checkpoint import load_state, save_state
from vgskit.train.config import TrainConfig
from vgskit.train.optim import BertAdam, create_optimizer
from vgskit.train.schedules import BertWarmupLinear, bert_warmup_linear, build_scheduler

GOLDEN = Path(__file__).parent / "golden"
CASE = "fastvgs_bertadam_warmup_linear"


@pytest.fixture(scope="module")
def case() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = load_file(str(GOLDEN / f"{CASE}.safetensors"))
    meta = json.loads((GOLDEN / f"{CASE}.json").read_text())
    return tensors, meta


def _tol(meta: dict[str, Any]) -> dict[str, float]:
    rec = meta["tolerance"]["recommended"]
    return {"rtol": rec["rtol"], "atol": rec["atol"]}


def _config(meta: dict[str, Any]) -> TrainConfig:
    """The reference's BertAdam arguments as a TrainConfig (the run is t_total updates long)."""
    a = meta["constructor_args"]
    # Only the reference's warmup_linear is reproduced (its warmup_cosine raises a TypeError); the
    # reference's max_grad_norm is unused inside its optimizer (the trainer clips), so it has no counterpart.
    assert a["schedule"] == "warmup_linear"
    return TrainConfig(optimizer="bertadam", schedule="bert_warmup_linear", lr=a["lr"], betas=(a["b1"], a["b2"]),
                       eps=a["e"], weight_decay=a["weight_decay"], warmup_fraction=a["warmup"],
                       max_steps=a["t_total"], end_lr=0.0)


def _run(t: dict[str, Tensor], cfg: TrainConfig, steps: range, param: Tensor,
         state: tuple[dict[str, Any], dict[str, Any]] | None = None):
    """Feed ``input.grads[k]`` for k in ``steps``; return the parameter after each step, lrs, optimizer."""
    p = torch.nn.Parameter(param.clone())
    opt = create_optimizer([{"params": [p]}], cfg)
    sched = build_scheduler(opt, cfg, total_steps=cfg.max_steps)
    if state is not None:
        opt.load_state_dict(state[0])
        sched.load_state_dict(state[1])
    after, lr_used, lr_after = [], [], []
    for k in steps:
        lr_used.append(opt.param_groups[0]["lr"])
        p.grad = t["input.grads"][k].clone()
        opt.step()
        sched.step()
        after.append(p.detach().clone())
        lr_after.append(sched.get_last_lr()[0])
    return torch.stack(after), lr_used, lr_after, opt, sched


def test_warmup_linear_values(case):
    t, meta = case
    warmup = meta["constructor_args"]["warmup"]
    ours = torch.tensor([bert_warmup_linear(x, warmup) for x in t["input.x"].tolist()], dtype=torch.float64)
    torch.testing.assert_close(ours, t["output.warmup_linear"], **_tol(meta))
    # The readable copy in the JSON says the same (keys are the progress values).
    for x, want in meta["outputs_json"]["warmup_linear"].items():
        assert bert_warmup_linear(float(x), warmup) == pytest.approx(want, abs=_tol(meta)["atol"])


def test_trajectory_and_lrs_match_reference(case):
    t, meta = case
    cfg = _config(meta)
    n_steps = t["input.grads"].shape[0]
    assert t["output.p_after_step"].shape == (n_steps, *t["input.p0"].shape)
    after, lr_used, lr_after, opt, _ = _run(t, cfg, range(n_steps), t["input.p0"])
    assert isinstance(opt, BertAdam)
    tol = _tol(meta)
    torch.testing.assert_close(after, t["output.p_after_step"], **tol)
    torch.testing.assert_close(torch.tensor(lr_used, dtype=torch.float64), t["output.lr_scheduled_per_step"], **tol)
    torch.testing.assert_close(torch.tensor(lr_after, dtype=torch.float64), t["output.get_lr_after_step"], **tol)
    # The reference reads its step counter before incrementing it: the first update runs at lr 0 (if warm-up).
    if cfg.warmup_fraction:
        assert lr_used[0] == 0.0
    # The LambdaLR factor is the reference's warmup_linear of step / t_total.
    factor = BertWarmupLinear(cfg.warmup_fraction, cfg.max_steps)
    assert [cfg.lr * factor(k) for k in range(n_steps)] == pytest.approx(lr_used, rel=tol["rtol"], abs=tol["atol"])


def test_no_bias_correction_and_decoupled_decay_in_the_update(case):
    """Guard the formula itself: torch's Adam/AdamW (bias-corrected) would not reproduce the reference."""
    t, meta = case
    cfg = _config(meta)
    n_steps = t["input.grads"].shape[0]
    for name in ("adamw", "adam"):
        other = TrainConfig(**{**vars(cfg), "optimizer": name})
        after = _run(t, other, range(n_steps), t["input.p0"])[0]
        assert not torch.allclose(after, t["output.p_after_step"], **_tol(meta)), name


def test_state_dict_round_trip_continues_identically(case, tmp_path):
    t, meta = case
    cfg = _config(meta)
    n_steps = t["input.grads"].shape[0]
    half = n_steps // 2
    full = _run(t, cfg, range(n_steps), t["input.p0"])[0]

    first, _, _, opt, sched = _run(t, cfg, range(half), t["input.p0"])
    state = opt.state_dict()
    [param_state] = state["state"].values()
    assert param_state["step"] == half and set(param_state) == {"step", "exp_avg", "exp_avg_sq"}
    # Through the checkpoint format (JSON + safetensors, no pickling), as the trainer stores it.
    save_state(state, tmp_path, "optimizer")
    save_state(sched.state_dict(), tmp_path, "scheduler")
    restored = (load_state(tmp_path, "optimizer"), load_state(tmp_path, "scheduler"))
    second = _run(t, cfg, range(half, n_steps), first[-1], state=restored)[0]
    assert torch.equal(torch.cat([first, second]), full)
    torch.testing.assert_close(second, t["output.p_after_step"][half:], **_tol(meta))
