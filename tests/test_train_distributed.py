"""Data-parallel helpers, and 2-process gloo training (launched with torchrun) against one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _ddp_worker as worker
from vgskit.errors import ConfigError
from vgskit.train import distributed as D

WORKER = Path(__file__).with_name("_ddp_worker.py")


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    # The in-process runs must not pick up torchrun variables from whatever launched pytest.
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


def test_split_global_batch_is_contiguous_and_covers_the_batch():
    batch = list(range(10, 18))
    parts = [D.split_global_batch(batch, r, 4) for r in range(4)]
    assert parts == [[10, 11], [12, 13], [14, 15], [16, 17]]
    assert D.split_global_batch(batch, 0, 1) == batch
    with pytest.raises(ConfigError, match="batch_size"):
        D.split_global_batch(batch, 0, 3)


def test_single_process_helpers_are_identities():
    t = torch.randn(3, 2, requires_grad=True)
    assert D.all_gather_with_grad(t) is t
    assert D.all_gather_object({"a": 1}) == [{"a": 1}]
    assert D.broadcast_object(5) == 5
    assert D.is_main() and D.get_world_size() == 1 and not D.is_dist()
    assert D.any_rank(True) and not D.any_rank(False)
    info = D.init_distributed()
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)


def test_env_dist_info_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.env_dist_info() == D.DistInfo(3, 4, 1)
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        D.env_dist_info()


def test_two_gloo_processes_match_one_process(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The reference: the same model, data, batches and settings in this single process.
    model, summary, seen = worker.run(tmp_path / "single")
    grads = worker.first_batch_grads()
    assert summary["step"] == 5 and summary["finished"]

    # Each rank loaded exactly its contiguous half of every global batch the single process loaded.
    ranks = [json.loads((out / f"seen_rank{r}.json").read_text()) for r in (0, 1)]
    assert [a + b for a, b in zip(ranks[0]["seen"], ranks[1]["seen"], strict=True)] == seen
    assert all(len(s) == 4 for r in ranks for s in r["seen"])
    assert ranks[0]["summary"]["step"] == ranks[1]["summary"]["step"] == 5
    # Evaluation ran on rank 0 only; its broadcast result gave both ranks the same best step.
    assert summary["best_step"] is not None
    assert ranks[0]["summary"]["best_step"] == ranks[1]["summary"]["best_step"] == summary["best_step"]
    assert ranks[1]["summary"]["best_metric"] == pytest.approx(summary["best_metric"], abs=1e-5)

    # Gradient on the first global batch equals the single-process gradient (not W times or 1/W of it).
    ddp_grads = load_file(str(out / "grads.safetensors"))
    assert ddp_grads.keys() == grads.keys()
    assert sum(g.norm() for g in grads.values()) > 1e-2
    for k, g in grads.items():
        torch.testing.assert_close(ddp_grads[k], g, atol=1e-6, rtol=1e-5, msg=k)

    # Final weights after 5 Adam steps with warm-up, clipping and weight decay.
    ddp_weights = load_file(str(out / "weights.safetensors"))
    torch.manual_seed(0)
    init = worker.ToyDualEncoder().state_dict()
    moved = max((model.state_dict()[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3  # training actually changed the weights, so equality below means something
    for k, w in model.state_dict().items():
        torch.testing.assert_close(ddp_weights[k], w, atol=1e-5, rtol=0, msg=k)


def test_batchnorm_models_two_processes_equal_one_only_with_frozen_statistics(tmp_path):
    """What holds for BatchNorm under data parallelism: with ``train.batchnorm: frozen`` (running statistics,
    not updated) 2 gloo processes train exactly what 1 process trains; with per-process batch statistics
    (``batch``, the default) each process normalises its half batch, so the runs differ. (``sync`` needs CUDA.)"""

    def ddp(mode: str) -> dict[str, torch.Tensor]:
        out = tmp_path / f"ddp_{mode}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(WORKER), "--out", str(out), "--batchnorm", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return load_file(str(out / "weights.safetensors"))

    frozen_single, _, _ = worker.run(tmp_path / "single_frozen", batchnorm=True, batchnorm_mode="frozen")
    frozen_ddp = ddp("frozen")
    torch.manual_seed(0)
    init = worker.ToyDualEncoder(batchnorm=True).state_dict()
    for k, w in frozen_single.state_dict().items():
        torch.testing.assert_close(frozen_ddp[k], w, atol=1e-5, rtol=0, msg=k)
        if k.endswith(("running_mean", "running_var")):
            assert torch.equal(w, init[k])  # frozen: never updated
    batch_single, _, _ = worker.run(tmp_path / "single_batch", batchnorm=True, batchnorm_mode="batch")
    batch_ddp = ddp("batch")
    gap = max((batch_ddp[k] - w).abs().max().item() for k, w in batch_single.state_dict().items()
              if w.is_floating_point())
    assert gap > 1e-4  # per-process batch statistics: not the single-process model
