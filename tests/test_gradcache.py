"""Gradient caching (``train.grad_cache_chunk``, :mod:`vgskit.train.gradcache`): the gradients of a grad-cached
step are the plain step's, dropout replays between the two passes, BatchNorm statistics move once, every
registered model either supports it exactly or is refused, and the trainer ends where it ends without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from test_contract import MODELS, _dataset_for, _fixed_batch, build_tiny, region_file, towers  # noqa: F401
from vgskit.contract import Batch, StepOutput, TrainState
from vgskit.data.loader import collate_spoken_captions
from vgskit.errors import ConfigError
from vgskit.models import RetrievalModel, create_model
from vgskit.train import gradcache
from vgskit.train.config import TrainConfig, config_from_dict
from vgskit.train.gradcache import chunk_rows, grad_cache_step
from vgskit.train.loop import Trainer

STATE = TrainState(step=0, total_steps=10)


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _plain(model: RetrievalModel, batch: Batch) -> tuple[StepOutput, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model.step(batch, STATE)
    out.loss.backward()
    return out, _grads(model)


def _cached(model: RetrievalModel, batch: Batch, chunk: int) -> tuple[StepOutput, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    out = grad_cache_step(model, batch, STATE, chunk)
    return out, _grads(model)


def _chunked_reference(model: RetrievalModel, batch: Batch, chunk: int) -> tuple[StepOutput, dict[str, Tensor]]:
    """One graph over the batch embedded chunk by chunk (what the cache must reproduce when the chunking matters:
    dropout masks drawn per chunk, BatchNorm statistics per chunk)."""
    model.zero_grad(set_to_none=True)
    parts = [model.embed_for_loss(batch.select(torch.arange(s.start, s.stop))) for s in chunk_rows(len(batch), chunk)]
    out = model.loss_from_embeddings({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, batch, STATE)
    out.loss.backward()
    return out, _grads(model)


def _assert_same_grads(got: dict[str, Tensor], want: dict[str, Tensor], what: str) -> None:
    """float32 agreement up to reduction order: 1e-5 relative, plus 1e-5 of the model's largest gradient.

    A weight gradient is a sum over every row and frame (thousands of terms for a convolution kernel); summed per
    chunk instead of at once, an entry whose terms cancel (a bias before a norm, a CLS token) keeps an error of
    about float32's 1.2e-7 times the size of those terms, which can be far above its own value but stays below
    ~1e-6 of the largest gradient. A wrong cached gradient or dropout mask moves the gradients by O(1) of their
    size (the negative controls below check that this tolerance sees it)."""
    assert got.keys() == want.keys(), f"{what}: parameters with gradients differ"
    assert want, f"{what}: no gradients at all"
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 0, f"{what}: all gradients are zero"
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m, n=name: f"{what} {n}: {m}")


def _freeze_batchnorm(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


@pytest.fixture(scope="module")
def batches(tiny_manifest: Path) -> dict[int, Batch]:
    """Batches of the tiny corpus with two captions per image (so the chunks split images' caption pairs)."""
    probe = create_model("dual_encoder_tiny")
    return {n: _fixed_batch(probe, tiny_manifest, None, n=n) for n in (8, 12)}


# ---------------------------------------------------------------------------------------- exact gradients


@pytest.mark.parametrize("name", ["dual_encoder_tiny", "milan_small"])
def test_grad_cache_equals_the_large_batch_step(name: str, batches: dict[int, Batch]) -> None:
    torch.manual_seed(0)
    model = _freeze_batchnorm(create_model(name).train())
    batch = batches[12]
    plain_out, plain = _plain(model, batch)
    for chunk in (5, 4, 12):  # uneven last chunk, image pairs split across chunks, one chunk
        out, cached = _cached(model, batch, chunk)
        _assert_same_grads(cached, plain, f"{name} chunk {chunk}")
        assert out.losses.keys() == plain_out.losses.keys()
        for k in plain_out.losses:  # the logged values are the plain step's
            torch.testing.assert_close(out.losses[k], plain_out.losses[k].detach(), rtol=1e-6, atol=1e-7)
        assert float(out.metrics["logit_scale"]) == float(plain_out.metrics["logit_scale"])
    # Not vacuous: dropping one chunk's cached gradient (a wrong backward) moves the gradients.
    model.zero_grad(set_to_none=True)
    partial = batch.select(torch.arange(0, 8))
    grad_cache_step(model, partial, STATE, 4)
    with pytest.raises(AssertionError):
        _assert_same_grads(_grads(model), plain, "partial batch")


def test_dropout_replays_between_the_two_passes(batches: dict[int, Batch], monkeypatch: pytest.MonkeyPatch) -> None:
    """With dropout active, the cache equals one backward through the chunked forward with the same draws; the
    RNG continues from where that forward leaves it. Without the replay the gradients are wrong."""
    model = create_model("dual_encoder_tiny", audio_context_layers=1, audio_context_heads=2, audio_context_ffn=32,
                         audio_context_dropout=0.5).train()
    batch, chunk = batches[8], 3

    torch.manual_seed(123)
    ref_out, ref = _chunked_reference(model, batch, chunk)
    ref_rng = torch.get_rng_state()
    torch.manual_seed(123)
    out, cached = _cached(model, batch, chunk)
    _assert_same_grads(cached, ref, "dropout")
    torch.testing.assert_close(out.loss, ref_out.loss.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(torch.get_rng_state(), ref_rng)

    # Dropout matters here (another draw gives other gradients) ...
    torch.manual_seed(7)
    _, other = _chunked_reference(model, batch, chunk)
    assert any(not torch.allclose(other[k], ref[k], rtol=1e-3, atol=1e-6) for k in ref)
    # ... and a pass 2 that does not restore pass 1's RNG states breaks the equality.
    monkeypatch.setattr(gradcache, "_set_rng_state", lambda state: None)
    torch.manual_seed(123)
    _, unreplayed = _cached(model, batch, chunk)
    with pytest.raises(AssertionError):
        _assert_same_grads(unreplayed, ref, "no replay")


def test_batchnorm_statistics_move_once(towers, batches: dict[int, Batch]) -> None:  # noqa: F811
    """BatchNorm in training mode (MILAN's EfficientNet): per-chunk statistics, running stats updated by the
    replay only, i.e. exactly as by one chunked forward (not twice)."""
    model = build_tiny("milan", towers).train()
    batch, chunk = batches[8], 4  # two images per chunk: BatchNorm needs more than one per channel
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms

    def stats() -> list[Tensor]:
        return [t.clone() for m in norms for t in (m.running_mean, m.running_var, m.num_batches_tracked)]

    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, ref = _chunked_reference(model, batch, chunk)
    want = stats()
    model.load_state_dict(before)
    _, cached = _cached(model, batch, chunk)
    got = stats()
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert int(norms[0].num_batches_tracked) == len(chunk_rows(len(batch), chunk))  # once per chunk, not twice
    assert not torch.equal(got[0], before[next(k for k in before if k.endswith("running_mean"))])
    _assert_same_grads(cached, ref, "batchnorm")


# ----------------------------------------------------------------------------------------- every model


@pytest.mark.parametrize("name", MODELS)
def test_every_model_supports_it_exactly_or_is_refused(name: str, towers, tiny_manifest: Path,  # noqa: F811
                                                       region_file: Path, tmp_path: Path) -> None:  # noqa: F811
    model = build_tiny(name, towers)
    if not model.trainable:
        return
    if not model.supports_grad_cache:
        cfg = TrainConfig(batch_size=4, max_steps=1, out_dir=str(tmp_path / "run"), grad_cache_chunk=2)
        with pytest.raises(ConfigError, match=rf"train\.grad_cache_chunk: model '{name}' cannot train"):
            Trainer(model, cfg, list(range(8)), model_name=name, progress_bar=False)
        return
    # Eval mode: no dropout and BatchNorm on running statistics, so the cache must equal the plain step.
    model.eval()
    batch = _fixed_batch(model, tiny_manifest, region_file)
    plain_out, plain = _plain(model, batch)
    _, chunked = _chunked_reference(model, batch, 3)
    out, cached = _cached(model, batch, 3)
    assert float(out.loss) == pytest.approx(float(plain_out.loss.detach()), rel=1e-5)
    # The floor: the plain step computed with chunk-sized kernels instead of batch-sized ones. At random init some
    # losses are ill-conditioned (VG-HuBERT's margin loss on nearly equal raw embeddings turns a 4e-7 change of
    # an embedding into 5e-4 of the gradients), so the bound is that measured floor, per tensor, not a constant;
    # it must itself be small, so that the check below still catches a wrong gradient (an O(1) error).
    scale = max(float(g.abs().max()) for g in plain.values())
    assert scale > 0 and cached.keys() == plain.keys() == chunked.keys(), name
    for k, g in plain.items():
        floor = float((chunked[k] - g).abs().max())
        assert floor <= 1e-3 * scale, f"{name} {k}: chunked forward moves the gradient by {floor / scale:.2g}"
        torch.testing.assert_close(cached[k], g, rtol=1e-5, atol=1e-5 * scale + 2 * floor,
                                   msg=lambda m, k=k: f"{name} {k}: {m}")


def test_supported_families() -> None:
    """The families whose step is "embed, then a contrastive loss" claim support; a subclass with a step of its own
    does not inherit it."""
    for name in ("dual_encoder", "milan_small"):
        assert create_model(name).supports_grad_cache
    from vgskit.models.base import grad_cache_problem
    from vgskit.models.dual_encoder.model import DualEncoder

    class ExtraLoss(DualEncoder):
        def step(self, batch: Batch, state: TrainState) -> StepOutput:
            return super().step(batch, state)

    model = ExtraLoss(create_model("dual_encoder_tiny").config)
    assert not model.supports_grad_cache
    assert "ExtraLoss overrides step()" in (grad_cache_problem(model) or "")


def test_config_field() -> None:
    assert config_from_dict(TrainConfig, {"max_steps": 1, "grad_cache_chunk": 128}, "train").grad_cache_chunk == 128
    assert TrainConfig(max_steps=1).grad_cache_chunk is None
    for bad in (0, -4, 2.5, True, "many"):
        with pytest.raises(ConfigError, match=r"^train\.grad_cache_chunk:"):
            config_from_dict(TrainConfig, {"max_steps": 1, "grad_cache_chunk": bad}, "train")


def test_batch_select_keeps_extras(batches: dict[int, Batch]) -> None:
    batch = batches[8]
    batch.extras["words"] = [f"w{i}" for i in range(len(batch))]
    part = batch.select([5, 1])
    assert part.extras["words"] == ["w5", "w1"]
    assert torch.equal(part.image_ids, batch.image_ids[[5, 1]])
    assert torch.equal(part.caption_ids, batch.caption_ids[[5, 1]])
    assert torch.equal(part.speech.values, batch.speech.values[[5, 1]])
    assert torch.equal(part.image.pixels, batch.image.pixels[[5, 1]])  # type: ignore[index]
    del batch.extras["words"]


# ------------------------------------------------------------------------------------------- the trainer


def test_trainer_with_grad_cache_ends_with_the_same_weights(tiny_manifest: Path, tmp_path: Path) -> None:
    def run(out: Path, chunk: int | None) -> tuple[dict[str, Tensor], list[dict]]:
        torch.manual_seed(0)
        model = create_model("dual_encoder_tiny")
        ds = _dataset_for(model, tiny_manifest, "train", None)
        cfg = TrainConfig(lr=1e-3, batch_size=8, max_steps=2, log_every=1, out_dir=str(out), eval_every=None,
                          tensorboard=False, ckpt_every=None, grad_cache_chunk=chunk)
        Trainer(model, cfg, ds, collate_spoken_captions, model_name="dual_encoder_tiny", model_config=model.config,
                progress_bar=False).fit()
        logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {k: v.clone() for k, v in model.state_dict().items()}, logs

    plain, plain_log = run(tmp_path / "plain", None)
    cached, cached_log = run(tmp_path / "cached", 3)
    for k in plain:
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    train_plain = [r for r in plain_log if r.get("kind") == "train"]
    train_cached = [r for r in cached_log if r.get("kind") == "train"]
    assert len(train_plain) == len(train_cached) == 2
    for a, b in zip(train_plain, train_cached, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
