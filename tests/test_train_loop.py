"""Trainer: exact resume, metrics.jsonl, best-checkpoint selection, stops and failing steps."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import _ddp_worker as worker
from vgskit.errors import ConfigError
from vgskit.train.checkpoint import list_checkpoints, read_trainer_state
from vgskit.train.loop import RandomBatches, Trainer, TrainStepError, param_groups_for_decay
from vgskit.train.tracking import read_metrics


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def _trainer(out_dir, model_seed=0, dropout=0.2, data=None, evaluate_fn=None, **overrides):
    cfg = worker.make_config(out_dir, **overrides)
    torch.manual_seed(model_seed)
    model = worker.ToyDualEncoder(dropout=dropout)
    return Trainer(model, cfg, data if data is not None else worker.PairData(), worker.collate,
                   evaluate_fn=evaluate_fn, model_name="toy", model_config={"dropout": dropout})


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize(("stop_at", "amp"), [(3, False), (4, False), (3, True)])
def test_resume_gives_the_same_weights_as_one_run(tmp_path, stop_at, amp):
    # 6 steps of 8 over 32 captions = 1.5 epochs; stopping at 3 is mid-epoch, at 4 on the epoch boundary.
    common = dict(max_steps=6, ckpt_every=2, amp=amp)
    full = _trainer(tmp_path / "full", **common)
    assert full.fit()["step"] == 6

    first = _trainer(tmp_path / "split", **common, stop_after_steps=stop_at)
    s1 = first.fit()
    assert (s1["step"], s1["stopped_because"], s1["finished"]) == (stop_at, "stop_after_steps", False)
    state = read_trainer_state(tmp_path / "split")
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (stop_at, stop_at // 4, stop_at % 4)

    # A new process would build a new model: a different init proves the weights come from the checkpoint.
    second = _trainer(tmp_path / "split", model_seed=123, **common)
    s2 = second.fit(resume=True)
    assert (s2["resumed_from_step"], s2["step"], s2["steps_this_call"]) == (stop_at, 6, 6 - stop_at)

    a, b = _weights(full), _weights(second)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise: same batches, dropout masks, lr and Adam state
    for group_a, group_b in zip(full.optimizer.state_dict()["state"].values(),
                                second.optimizer.state_dict()["state"].values(), strict=True):
        assert all(torch.equal(group_a[k], group_b[k]) for k in group_a)
    # One train record per step, records of the repeated steps dropped.
    steps = [r["step"] for r in read_metrics(tmp_path / "split", kind="train")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert read_metrics(tmp_path / "split", "train")[-1]["loss"] == read_metrics(tmp_path / "full", "train")[-1]["loss"]


@pytest.mark.parametrize("native_bf16", [False, True])
def test_amp_on_a_cpu_without_native_bf16_trains_fp32(tmp_path, monkeypatch, caplog, native_bf16):
    import vgskit.precision as precision

    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: native_bf16)
    monkeypatch.setattr(precision, "_warned", set())
    fp32 = _trainer(tmp_path / "fp32", dropout=0.0, max_steps=3, amp=False)
    assert fp32.fit()["autocast"] is None
    with caplog.at_level("WARNING"):
        amp = _trainer(tmp_path / "amp", dropout=0.0, max_steps=3, amp=True)
        summary = amp.fit()
    a, b = _weights(fp32), _weights(amp)
    if native_bf16:  # bf16 autocast ran: its rounding shows in the weights
        assert summary["autocast"] == "bfloat16"
        assert any(not torch.equal(a[k], b[k]) for k in a)
    else:  # emulated bf16 would only be slower: the run is the fp32 run, bit for bit, and says why
        assert summary["autocast"] is None
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert "no native bf16" in caplog.text and "running fp32 instead" in caplog.text


def test_resume_detects_a_wrong_position(tmp_path):
    """Guard for the test above: resuming at another position in the epoch does change the result."""
    full = _trainer(tmp_path / "full", dropout=0.0, max_steps=6)
    full.fit()
    first = _trainer(tmp_path / "split", dropout=0.0, max_steps=6, stop_after_steps=3)
    first.fit()
    state_file = list_checkpoints(tmp_path / "split" / "checkpoints")[-1][1] / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["batch_in_epoch"] = 0  # replay the epoch from its start
    state_file.write_text(json.dumps(state))
    second = _trainer(tmp_path / "split", dropout=0.0, max_steps=6)
    second.fit(resume=True)
    assert not torch.equal(full.model.audio_tower[0].weight, second.model.audio_tower[0].weight)


def test_loader_workers_give_the_same_result(tmp_path):
    serial = _trainer(tmp_path / "w0", max_steps=5, num_workers=0)
    serial.fit()
    parallel = _trainer(tmp_path / "w2", max_steps=5, num_workers=2)
    parallel.fit()
    for k, v in _weights(serial).items():
        assert torch.equal(parallel.model.state_dict()[k], v), k


def test_metrics_and_best_checkpoint_by_metric(tmp_path):
    values = iter([0.2, 0.6, 0.4, 0.5])
    seen_modes = []

    def evaluate(model):
        seen_modes.append((model.training, torch.is_grad_enabled()))
        return {"mean_R@10": next(values), "loss": 1.0}

    t = _trainer(tmp_path, evaluate_fn=evaluate, max_steps=8, eval_every=2, log_every=2, ckpt_every=None,
                 keep_last=1, select_metric="mean_R@10")
    summary = t.fit()
    assert seen_modes == [(False, False)] * 4  # eval mode, no autograd
    assert (summary["best_metric"], summary["best_step"]) == (0.6, 4)

    ckpts = tmp_path / "checkpoints"
    best_state = json.loads((ckpts / "best" / "trainer_state.json").read_text())
    assert best_state["step"] == 4 and best_state["best_metric"] == 0.6
    assert [s for s, _ in list_checkpoints(ckpts)] == [8]  # keep_last=1 pruned step_4 but best/ stays
    # best/ holds the weights of step 4, which differ from the final ones.
    best_w = load_file(str(ckpts / "best" / "model.safetensors"))
    assert not torch.equal(best_w["audio_tower.0.weight"], t.model.audio_tower[0].weight)

    train = read_metrics(tmp_path, "train")
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    for r in train:
        assert {"loss", "lr", "samples_per_s", "epoch", "scale"} <= r.keys()
        assert r["samples_per_s"] > 0 and r["loss"] > 0
    assert train[0]["epoch"] == 0.5 and train[-1]["epoch"] == 2.0
    evals = read_metrics(tmp_path, "eval")
    assert [(r["step"], r["mean_R@10"]) for r in evals] == [(2, 0.2), (4, 0.6), (6, 0.4), (8, 0.5)]


def test_min_mode_epoch_evaluation_and_epochs_stop(tmp_path):
    values = iter([0.9, 0.3, 0.5])
    t = _trainer(tmp_path, evaluate_fn=lambda m: {"loss": next(values)}, max_steps=None, epochs=3,
                 eval_every="epoch", select_metric="loss", select_mode="min", ckpt_every=None, keep_last=None)
    summary = t.fit()
    assert (summary["step"], summary["epoch"], summary["stopped_because"]) == (12, 3, "epochs")
    assert (summary["best_metric"], summary["best_step"]) == (0.3, 8)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [4, 8, 12]  # one per epoch
    assert [r["step"] for r in read_metrics(tmp_path, "eval")] == [4, 8, 12]


def test_unknown_select_metric_is_an_error(tmp_path):
    t = _trainer(tmp_path, evaluate_fn=lambda m: {"R@1": 0.1}, max_steps=2, eval_every=1,
                 select_metric="mean_R@10")
    with pytest.raises(ConfigError, match=r"select_metric: 'mean_R@10' is not among .*R@1"):
        t.fit()


class _Broken(worker.PairData):
    def __getitem__(self, i):
        if i == 5:
            raise OSError("corrupt audio file x.wav")
        return super().__getitem__(i)


def test_failing_batch_names_the_step(tmp_path):
    cfg = worker.make_config(tmp_path, max_steps=8)
    batches = RandomBatches(32, cfg.batch_size)(0, cfg.seed) + RandomBatches(32, cfg.batch_size)(1, cfg.seed)
    bad_step = next(i + 1 for i, b in enumerate(batches) if 5 in b)
    t = _trainer(tmp_path, data=_Broken(), max_steps=8)
    with pytest.raises(TrainStepError) as e:
        t.fit()
    assert f"training step {bad_step} " in str(e.value)
    assert "corrupt audio file x.wav" in str(e.value) and "dataset indices" in str(e.value)
    assert e.value.step == bad_step and isinstance(e.value.__cause__, OSError)


def test_non_finite_loss_names_the_step(tmp_path):
    class Exploding(worker.ToyDualEncoder):
        calls = 0

        def forward(self, batch, state=None):
            out = super().forward(batch, state)
            Exploding.calls += 1
            if Exploding.calls == 3:
                out.losses["infonce"] = out.losses["infonce"] * float("nan")
            return out

    cfg = worker.make_config(tmp_path, max_steps=5)
    t = Trainer(Exploding(), cfg, worker.PairData(), worker.collate)
    with pytest.raises(TrainStepError, match=r"training step 3 .*loss is not finite"):
        t.fit()


def test_time_budget_stops_with_a_checkpoint_and_resume_finishes(tmp_path):
    t = _trainer(tmp_path, max_steps=6, time_budget_s=1e-9)
    s = t.fit()
    assert (s["step"], s["stopped_because"]) == (1, "time_budget")
    assert s["last_checkpoint"].endswith("step_1")
    s2 = _trainer(tmp_path, max_steps=6).fit(resume=True)
    assert (s2["step"], s2["stopped_because"]) == (6, "max_steps")
    # Resuming a finished run trains nothing.
    s3 = _trainer(tmp_path, max_steps=6).fit(resume=True)
    assert (s3["steps_this_call"], s3["step"]) == (0, 6)


def test_fresh_start_refuses_a_used_out_dir_and_resume_starts_fresh(tmp_path):
    assert _trainer(tmp_path, max_steps=2).fit(resume=True)["resumed_from_step"] is None
    with pytest.raises(ConfigError, match="out_dir: .* already holds checkpoints"):
        _trainer(tmp_path, max_steps=2).fit()


def test_checkpoint_config_and_tensorboard(tmp_path):
    t = _trainer(tmp_path, max_steps=2, tensorboard=True)
    t.fit()
    ckpt = list_checkpoints(tmp_path / "checkpoints")[-1][1]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model"] == "toy" and config["config"] == {"dropout": 0.2}
    assert config["train"]["max_steps"] == 2 and config["train"]["betas"] == [0.9, 0.999]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_no_weight_decay_on_biases_norms_and_temperature():
    model = worker.ToyDualEncoder()
    decay, no_decay = param_groups_for_decay(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "audio_tower.0.weight", "audio_tower.4.weight", "image_tower.0.weight", "image_tower.4.weight"}
    assert "logit_scale" in {names[id(p)] for p in no_decay["params"]}
    assert "audio_tower.3.weight" in {names[id(p)] for p in no_decay["params"]}  # LayerNorm scale


def test_random_batches_are_seeded_and_drop_last():
    rb = RandomBatches(10, 4)
    assert rb(0, 1) == rb(0, 1) and rb(0, 1) != rb(1, 1) and rb(0, 1) != rb(0, 2)
    assert len(rb(0, 1)) == rb.num_batches() == 2 and all(len(b) == 4 for b in rb(0, 1))
    assert len(set(sum(rb(0, 1), []))) == 8
    assert RandomBatches(10, 4, drop_last=False).num_batches() == 3
