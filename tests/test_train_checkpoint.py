"""Checkpoint round trips, pickle-free encoding, atomic replacement, pruning, ``latest`` and ``best``."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from vgskit.train import checkpoint as C


class Tied(nn.Module):
    """Input and output embeddings share one tensor, which plain safetensors.save_file rejects."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 7, bias=True)
        self.out.weight = self.emb.weight
        self.register_buffer("count", torch.tensor(3))

    def forward(self, x):
        return self.out(self.norm(self.emb(x)))


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        loss = model(torch.arange(7)).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _save(root, step, model, opt=None, sched=None, **kw):
    return C.save_checkpoint(root, step, model=model, optimizer=opt, scheduler=sched,
                             trainer_state={"step": step, "epoch": 0, "batch_in_epoch": step}, **kw)


def test_encode_decode_keeps_types():
    state = {"state": {0: {"step": torch.tensor(3.0), "m": torch.randn(2, 3)}},
             "groups": [{"betas": (0.9, 0.99), "lr": 1e-3, "nan": float("nan"), "inf": -math.inf,
                         "params": [0, 1], "name": None, "flag": True}],
             "__odd": 1}
    structure, tensors = C.encode_state(state)
    text = json.dumps(structure, allow_nan=False)  # strict JSON, no pickled objects
    back = C.decode_state(json.loads(text), tensors)
    assert list(back["state"]) == [0]  # integer key survives
    assert torch.equal(back["state"][0]["m"], state["state"][0]["m"])
    g = back["groups"][0]
    assert g["betas"] == (0.9, 0.99) and isinstance(g["betas"], tuple)
    assert math.isnan(g["nan"]) and g["inf"] == -math.inf and g["name"] is None and g["flag"] is True
    assert back["__odd"] == 1
    with pytest.raises(TypeError, match=r"state entry obj: object"):
        C.encode_state({"obj": object()})


def test_roundtrip_model_optimizer_scheduler_scaler_rng(tmp_path):
    model, opt, sched = _trained(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    scaler.scale(torch.tensor(1.0))
    scaler.update(512.0)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    rng = C.capture_rng_state()
    expect = (random.random(), np.random.rand(), torch.rand(3))
    path = _save(tmp_path, 3, model, opt, sched, scaler=scaler, rng_states=[rng], config={"model": {"dim": 4}})
    assert path == tmp_path / "step_3"
    assert sorted(p.suffix for p in path.iterdir()) == sorted([".safetensors"] * 3 + [".json"] * 6)

    model2, opt2, sched2 = _trained(1)  # different weights and optimizer moments
    scaler2 = torch.amp.GradScaler("cpu")
    loaded = C.load_checkpoint(tmp_path, model=model2, optimizer=opt2, scheduler=sched2, scaler=scaler2)
    assert loaded.path == path and loaded.step == 3 and loaded.config == {"model": {"dim": 4}}
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert model2.out.weight is model2.emb.weight  # tying is kept
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i, st in s1["state"].items():
        for k, v in st.items():
            assert torch.equal(s2["state"][i][k], v), (i, k)
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"] == 3
    assert scaler2.state_dict() == scaler.state_dict()
    assert scaler2.state_dict()["scale"] == 512.0 and scaler2.state_dict()["growth_interval"] == 7

    # RNG: restoring the saved state reproduces the draws that followed the capture.
    C.restore_rng_state(loaded.rng_states[0])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expect[0] and got[1] == expect[1] and torch.equal(got[2], expect[2])


def test_load_into_a_different_model_names_the_checkpoint(tmp_path):
    model, _, _ = _trained()
    path = _save(tmp_path, 1, model)
    with pytest.raises(C.CheckpointError, match=r"checkpoint .*step_1: model weights do not fit"):
        C.load_checkpoint(path, model=nn.Linear(2, 2))
    with pytest.raises(C.CheckpointError, match="no checkpoint found"):
        C.resolve_checkpoint(tmp_path / "nothing")


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, _ = _trained(0)
    _save(tmp_path, 1, model, opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.emb.weight.add_(1.0)

    real_replace = C.os.replace

    def crash(src, dst):
        if str(src).endswith(f"step_2-{C.os.getpid()}"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(C.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, model, opt)
    monkeypatch.setattr(C.os, "replace", real_replace)

    assert not (tmp_path / "step_2").exists()
    assert (tmp_path / "latest").read_text().strip() == "step_1"
    fresh = Tied()
    C.load_checkpoint(tmp_path, model=fresh)
    for k, v in before.items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_killed_process_between_write_and_rename(tmp_path):
    """A process that dies (no cleanup at all) after writing the temp folder, before the rename."""
    model, opt, _ = _trained(0)
    _save(tmp_path, 1, model, opt)
    script = textwrap.dedent(f"""
        import os, torch
        from vgskit.train import checkpoint as C
        real = os.replace
        def die(src, dst):
            if ".tmp-step_2-" in str(src):
                os._exit(9)  # like SIGKILL: no exception handlers, no cleanup
            real(src, dst)
        C.os.replace = die
        model = torch.nn.Linear(3, 3)
        C.save_checkpoint({str(tmp_path)!r}, 2, model=model, trainer_state={{"step": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-step_2-")]
    assert leftovers and (tmp_path / leftovers[0] / "model.safetensors").is_file()  # it got that far

    assert C.resolve_checkpoint(tmp_path) == tmp_path / "step_1"
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [1]
    fresh = Tied()
    C.load_checkpoint(tmp_path, model=fresh)
    assert torch.equal(fresh.emb.weight, model.emb.weight)

    _save(tmp_path, 3, model)  # the next save clears the debris
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    assert (tmp_path / "latest").read_text().strip() == "step_3"


def test_keep_last_latest_fallback_and_best_copy(tmp_path):
    model, opt, _ = _trained()
    for step in (1, 2, 3, 4):
        path = _save(tmp_path, step, model, opt, keep_last=2)
        if step == 2:
            C.update_best(tmp_path, path)
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [3, 4]
    assert C.latest_checkpoint(tmp_path) == tmp_path / "step_4"
    assert json.loads((tmp_path / "best" / "trainer_state.json").read_text())["step"] == 2  # survives pruning
    C.update_best(tmp_path, tmp_path / "step_4")
    assert json.loads((tmp_path / "best" / "trainer_state.json").read_text())["step"] == 4
    assert C.read_trainer_state(tmp_path / "best")["step"] == 4

    # A stale pointer (folder removed by hand) falls back to the newest complete folder.
    (tmp_path / "latest").write_text("step_99\n")
    assert C.latest_checkpoint(tmp_path) == tmp_path / "step_4"
    # A run folder holding checkpoints/ resolves too.
    run = tmp_path / "run"
    _save(run / "checkpoints", 7, model)
    assert C.resolve_checkpoint(run) == run / "checkpoints" / "step_7"


def test_resaving_the_same_step_replaces_it(tmp_path):
    model, _, _ = _trained()
    _save(tmp_path, 5, model)
    with torch.no_grad():
        model.norm.bias.fill_(2.0)
    _save(tmp_path, 5, model)
    fresh = Tied()
    C.load_checkpoint(tmp_path / "step_5", model=fresh)
    assert torch.all(fresh.norm.bias == 2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_5"]


def test_kill_while_replacing_best_does_not_lose_it(tmp_path):
    model, opt, _ = _trained()
    C.update_best(tmp_path, _save(tmp_path, 1, model, opt))
    # What a process killed inside _replace_dir leaves: the old `best` moved aside, the new one not yet in.
    (tmp_path / "best").rename(tmp_path / ".old-best-4242")
    _save(tmp_path, 2, model, opt)  # the next save cleans up stale folders
    assert C.read_trainer_state(tmp_path / "best")["step"] == 1
    assert not list(tmp_path.glob(".old-*"))


def test_corrupt_checkpoint_json_names_the_file(tmp_path):
    model, opt, _ = _trained()
    path = _save(tmp_path, 3, model, opt)
    (path / "trainer_state.json").write_text("{not json")
    with pytest.raises(C.CheckpointError, match=r"step_3.*trainer_state.json is not valid JSON"):
        C.load_checkpoint(path, model=model)
    (path / "trainer_state.json").unlink()
    with pytest.raises(C.CheckpointError, match="step_3: no checkpoint found"):
        C.load_checkpoint(path, model=model)
