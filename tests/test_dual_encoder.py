"""Encoders, the dual encoder, and the model registry."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vgskit.contract import Batch, ImageInputs, SpeechInputs, StepOutput, TrainState
from vgskit.encoders import AudioCNNConfig, AudioCNNEncoder, ImageCNNConfig, ImageCNNEncoder
from vgskit.errors import ConfigError
from vgskit.features import LogMelConfig
from vgskit.models import (
    DualEncoder,
    create_model,
    create_model_from_config,
    list_models,
    load_pretrained,
    save_pretrained,
)
from vgskit.models.base import image_transform_of


def _batch(n_images: int = 4, caps: int = 2, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = n_images * caps
    lengths = torch.randint(4000, 12000, (n,), generator=g)
    wavs = torch.randn(n, int(lengths.max()), generator=g) * 0.1
    wavs *= torch.arange(wavs.shape[1])[None] < lengths[:, None]
    pixels = torch.randn(n_images, 3, size, size, generator=g).repeat_interleave(caps, dim=0)
    return {"wavs": wavs, "lengths": lengths, "pixels": pixels, "image_ids": torch.arange(n) // caps}


def _activate_residual_branches(module: torch.nn.Module) -> None:
    """Residual branches start at zero (zero-init conv or zero gain); make them count, as after training,
    so that every convolution can leak padding into the output if masking were wrong."""
    torch.manual_seed(123)
    with torch.no_grad():
        for m in module.modules():
            if getattr(m, "gain", None) is not None:
                m.gain.fill_(0.5)
            if hasattr(m, "conv2"):
                m.conv2.weight.normal_(0.0, 0.2)


@pytest.mark.parametrize("norm", [True, False])
def test_audio_encoder_contract_and_padding_invariance(norm: bool) -> None:
    torch.manual_seed(0)
    cfg = AudioCNNConfig(
        features=LogMelConfig(n_mels=20), stem_channels=(16, 24), channels=(24, 32), depths=(1, 2), strides=(1, 2),
        norm=norm,
    )
    # float64 so that any difference is a masking bug, not rounding
    enc = AudioCNNEncoder(cfg).double().eval()
    _activate_residual_branches(enc)
    lengths = torch.tensor([16000, 7001, 3333])
    wavs = torch.randn(3, 16000, dtype=torch.float64)
    with torch.no_grad():
        out = enc(wavs, lengths)
        assert out.last_hidden_state.shape[0] == 3 and out.last_hidden_state.shape[2] == 32
        assert out.frame_rate == pytest.approx(100 / 8)
        assert len(out.hidden_states) == 3  # stem + 2 stages
        for b in range(3):
            n = int(out.lengths[b])
            assert torch.count_nonzero(out.last_hidden_state[b, n:]) == 0
            alone = enc(wavs[b : b + 1, : lengths[b]], lengths[b : b + 1])
            assert int(alone.lengths) == n
            torch.testing.assert_close(alone.last_hidden_state[0, :n], out.last_hidden_state[b, :n], atol=1e-9, rtol=0)


def test_image_encoder_shapes_and_per_sample_independence() -> None:
    cfg = ImageCNNConfig(image_size=32, stem_channels=8, channels=(16, 24), depths=(1, 1), strides=(2, 2))
    enc = ImageCNNEncoder(cfg).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = enc(x)
        assert out.tokens.shape == (3, cfg.num_tokens, 24) and cfg.num_tokens == 16
        assert out.pooled.shape == (3, 24)
        # Batch of 1 vs batch of 3 runs other convolution kernels, whose float32 rounding differs between
        # CPUs; in float64 that rounding is ~1e-15, so any visible difference is a leak between samples.
        enc64, x64 = enc.double(), x.double()
        torch.testing.assert_close(enc64(x64[1:2]).pooled[0], enc64(x64).pooled[1], atol=1e-9, rtol=0)


def test_padding_does_not_change_speech_embedding() -> None:
    torch.manual_seed(0)
    # float64: other batch shapes run other kernels, whose float32 rounding differs between CPUs; in float64
    # it is ~1e-15, so any visible difference is padding leaking into the embedding.
    model = create_model("dual_encoder_tiny").double().eval()
    _activate_residual_branches(model)
    batch = _batch()
    wavs = batch["wavs"].double()
    with torch.no_grad():
        emb = model.encode_speech(wavs, batch["lengths"])
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(emb), dtype=torch.float64))
        for b in (0, 3):
            n = int(batch["lengths"][b])
            alone = model.encode_speech(wavs[b : b + 1, :n], batch["lengths"][b : b + 1])
            torch.testing.assert_close(alone[0], emb[b], atol=1e-9, rtol=0)
            padded = torch.cat([wavs[b : b + 1, :n], torch.zeros(1, 7777, dtype=torch.float64)], dim=1)
            torch.testing.assert_close(model.encode_speech(padded, batch["lengths"][b : b + 1])[0], emb[b],
                                       atol=1e-9, rtol=0)


def _masked_infonce_reference(speech: torch.Tensor, image: torch.Tensor, image_ids: list[int], scale: float,
                              mask_same_image: bool = True) -> float:
    """Symmetric InfoNCE written out term by term in float64, independently of ``vgskit.losses``.

    ``speech [N, D]`` are the caption embeddings, ``image [N, D]`` the embedding of each caption's image
    (rows of one image are equal) and ``image_ids`` the image of every caption. Speech→image: each caption
    against the distinct images. Image→speech: each caption's image against its caption and the captions of
    *other* images (the other captions of the same image are left out, unless ``mask_same_image`` is off).
    """
    s, v = speech.double(), image.double()
    n = len(image_ids)
    distinct = list(dict.fromkeys(image_ids))
    column = {g: image_ids.index(g) for g in distinct}  # a row holding that image's embedding
    logit = [[scale * float(s[i] @ v[k]) for k in range(n)] for i in range(n)]  # caption i vs image of row k
    s2i, i2s = [], []
    for i, g in enumerate(image_ids):
        positive = logit[i][column[g]]
        s2i.append(math.log(sum(math.exp(logit[i][column[h]]) for h in distinct)) - positive)
        others = [logit[k][column[g]] for k in range(n)
                  if k != i and (image_ids[k] != g or not mask_same_image)]
        i2s.append(math.log(math.exp(positive) + sum(math.exp(x) for x in others)) - positive)
    return 0.5 * (sum(s2i) / n + sum(i2s) / n)


def _as_batch(batch: dict[str, torch.Tensor]) -> Batch:
    """The typed training batch of the model contract, from the plain tensors this file builds."""
    return Batch(speech=SpeechInputs.waveform(batch["wavs"], batch["lengths"]),
                 image=ImageInputs.from_pixels(batch["pixels"]), image_ids=batch["image_ids"],
                 caption_ids=torch.arange(len(batch["lengths"])))


def _loss_and_logged_scale(model: DualEncoder, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of one step and the 1/τ it logs (one named loss, ``infonce``; metric ``logit_scale``)."""
    out = model(_as_batch(batch), TrainState())
    assert isinstance(out, StepOutput) and list(out.losses) == ["infonce"]
    return out.loss, out.metrics["logit_scale"]


def _embeddings(model: DualEncoder, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption embeddings ``[N, E]`` and the embedding of each caption's image ``[N, E]``; each distinct image
    is encoded once (first caption of each id, ids ascending), the batch shapes a training step uses."""
    ids = batch["image_ids"].tolist()
    distinct = sorted(set(ids))
    with torch.no_grad():
        speech = model.encode_speech(batch["wavs"], batch["lengths"])
        image = model.encode_image(batch["pixels"][[ids.index(g) for g in distinct]])
    return speech, image[[distinct.index(g) for g in ids]]


def _shuffled_batch() -> dict[str, torch.Tensor]:
    """``_batch()`` with its rows shuffled (same-image captions apart) and image ids that are not 0..M-1."""
    batch = _batch()
    order = torch.randperm(len(batch["lengths"]), generator=torch.Generator().manual_seed(5))
    shuffled = {k: v[order] for k, v in batch.items()}
    shuffled["image_ids"] = shuffled["image_ids"] * 7 + 3
    return shuffled


def test_forward_returns_loss_and_scalars() -> None:
    torch.manual_seed(0)
    model = create_model("dual_encoder_tiny").eval()  # the loss is the same in both modes (no dropout)
    batch = _shuffled_batch()
    ids = batch["image_ids"].tolist()
    assert len(set(ids)) < len(ids) and ids != sorted(ids)
    for temperature in (0.05, 0.2):
        with torch.no_grad():
            model.loss.logit_scale.fill_(math.log(1 / temperature))
        loss, logged = _loss_and_logged_scale(model, batch)
        assert loss.ndim == 0 and loss.requires_grad
        assert logged.item() == pytest.approx(1 / temperature, rel=1e-6)  # the logged 1/τ
        speech, image = _embeddings(model, batch)
        assert image.shape == (8, model.embed_dim)
        want = _masked_infonce_reference(speech, image, ids, 1 / temperature)
        unmasked = _masked_infonce_reference(speech, image, ids, 1 / temperature, mask_same_image=False)
        # Tolerance: logits are dot products of unit vectors (D = 32) times 1/τ <= 20; float32 rounding of
        # the D-term dot products and of the scaling moves each logit by at most ~(D + 2)·eps·(1/τ) ≈ 1e-4,
        # and the loss, a mean of logsumexp differences, by about as much. A lost mask changes it far more.
        assert loss.item() == pytest.approx(want, abs=1e-4)
        assert abs(unmasked - want) > 1e-2
    # 1/τ above max_logit_scale is clamped, in the loss and in the logged value.
    with torch.no_grad():
        model.loss.logit_scale.fill_(math.log(2 * model.config.max_logit_scale))
    loss, logged = _loss_and_logged_scale(model, batch)
    assert logged.item() == pytest.approx(model.config.max_logit_scale, rel=1e-6)
    speech, image = _embeddings(model, batch)
    # At 1/τ = 100 the same rounding argument gives ~(D + 2)·eps·100 ≈ 5e-4.
    assert loss.item() == pytest.approx(
        _masked_infonce_reference(speech, image, ids, model.config.max_logit_scale), abs=5e-4)


def test_registry_names_and_errors() -> None:
    assert {"dual_encoder", "dual_encoder_tiny"} <= set(list_models())
    with pytest.raises(ConfigError, match="dual_encoder_tiny"):
        create_model("no_such_model")
    with pytest.raises(ConfigError, match="embed_dim"):
        create_model("dual_encoder_tiny", embed_dims=3)
    with pytest.raises(ConfigError, match="stem_channels"):
        create_model("dual_encoder_tiny", audio={"stem_channel": [8]})
    m = create_model("dual_encoder_tiny", embed_dim=16, audio={"channels": [20]})
    assert isinstance(m, DualEncoder) and m.embed_dim == 16 and m.audio_encoder.width == 20
    assert m.config.audio.stem_channels == (16,)  # untouched preset fields survive a nested override
    assert m.config.audio.features.n_mels == 20


def test_save_load_roundtrip_gives_identical_outputs(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("dual_encoder_tiny", audio_pool="attention").eval()
    with torch.no_grad():
        model.loss.logit_scale.fill_(2.5)
    save_pretrained(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    description = json.loads((tmp_path / "m" / "config.json").read_text())
    assert description["model"] == "dual_encoder_tiny"
    assert description["image_transform"]["size"] == 32 and len(description["image_transform"]["mean"]) == 3
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_speech(batch["wavs"], batch["lengths"]), model.encode_speech(batch["wavs"], batch["lengths"]),
            atol=0, rtol=0,
        )
        torch.testing.assert_close(loaded.encode_image(batch["pixels"]), model.encode_image(batch["pixels"]), atol=0, rtol=0)
        assert loaded(_as_batch(batch)).loss.item() == model(_as_batch(batch)).loss.item()
    rebuilt = create_model_from_config({**description, "train": {"lr": 1e-3}, "extra": {}})  # trainer layout
    assert rebuilt.config == model.config
    transform = image_transform_of(loaded)
    assert transform.size == 32 and transform.resize_mode == "squash"
    from PIL import Image

    assert transform(Image.new("RGB", (50, 40), (255, 0, 0))).shape == (3, 32, 32)
    with pytest.raises(ConfigError, match="unknown key"):
        create_model_from_config({"model": "dual_encoder_tiny", "weights": 1})


@pytest.fixture()
def one_thread():
    # Tiny tensors gain nothing from a second thread, and on a busy machine every parallel op would wait for it.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_model_overfits_a_small_batch(one_thread) -> None:
    torch.manual_seed(0)
    model = create_model("dual_encoder_tiny")
    batch = _batch(n_images=8, caps=2, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = model(_as_batch(batch)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def test_audio_context_layers_keep_padding_invariance_and_use_order() -> None:
    torch.manual_seed(0)
    # float64, as in test_padding_does_not_change_speech_embedding: only a leak can show at 1e-9.
    model = create_model("dual_encoder_tiny", audio_context_layers=1, audio_context_heads=2,
                         audio_context_ffn=32).double().eval()
    _activate_residual_branches(model)
    batch = _batch()
    wavs = batch["wavs"].double()
    with torch.no_grad():
        emb = model.encode_speech(wavs, batch["lengths"])
        for b in (0, 3):
            n = int(batch["lengths"][b])
            alone = model.encode_speech(wavs[b : b + 1, :n], batch["lengths"][b : b + 1])
            torch.testing.assert_close(alone[0], emb[b], atol=1e-9, rtol=0)
        # With positions, swapping the two halves of an utterance changes the embedding; mean pooling of a
        # position-free encoder over the same frames would be nearly blind to that.
        n = int(batch["lengths"][0]) // 2 * 2
        wav = wavs[0, :n]
        swapped = torch.cat([wav[n // 2 :], wav[: n // 2]])[None]
        lengths = torch.tensor([n])
        assert (model.encode_speech(wav[None], lengths) - model.encode_speech(swapped, lengths)).abs().max() > 1e-3


@pytest.mark.parametrize("pool", ["mean", "max", "flatten"])
def test_image_pooling_options(pool: str) -> None:
    torch.manual_seed(0)
    model = create_model("dual_encoder_tiny", image_pool=pool).eval()
    size = model.config.image.image_size
    pixels = torch.randn(3, 3, size, size)
    with torch.no_grad():
        emb = model.encode_image(pixels)
        tokens = model.image_encoder(pixels).tokens  # [B, N, D]
    assert emb.shape == (3, model.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    pooled = {"mean": tokens.mean(1), "max": tokens.amax(1), "flatten": tokens.flatten(1)}[pool]
    expected = torch.nn.functional.normalize(model.image_proj(pooled), dim=-1)
    torch.testing.assert_close(emb, expected)


@pytest.mark.parametrize(("pool", "heads"), [("mean", 1), ("max", 1), ("attention", 1), ("attention", 3)])
def test_audio_pooling_options_keep_padding_invariance(pool: str, heads: int) -> None:
    torch.manual_seed(0)
    # float64, as in test_padding_does_not_change_speech_embedding: only a leak can show at 1e-9.
    model = create_model("dual_encoder_tiny", audio_pool=pool, audio_pool_heads=heads).double().eval()
    _activate_residual_branches(model)
    with torch.no_grad():
        for p in model.parameters():  # a random score layer: a zero one would give every frame the same weight
            p.add_(0.3 * torch.randn_like(p))
    batch = _batch()
    wavs = batch["wavs"].double()
    with torch.no_grad():
        emb = model.encode_speech(wavs, batch["lengths"])
        out = model.audio_encoder(wavs, batch["lengths"])
    width = model.audio_encoder.width
    assert emb.shape == (len(wavs), model.embed_dim)
    for b in (0, 3):
        frames = out.last_hidden_state[b, : int(out.lengths[b])]  # [T_b, D]: valid frames only
        if pool == "mean":
            pooled = frames.mean(0)
        elif pool == "max":
            pooled = frames.amax(0)
        else:  # one softmax over time per head, each head a weighted average of the frames, concatenated
            weights = torch.softmax(frames @ model.audio_pool.score.weight.T + model.audio_pool.score.bias, dim=0)
            pooled = torch.cat([(weights[:, h : h + 1] * frames).sum(0) for h in range(heads)])
        assert pooled.shape == (heads * width,)
        expected = torch.nn.functional.normalize(model.audio_proj(pooled), dim=-1)
        torch.testing.assert_close(emb[b], expected, atol=1e-9, rtol=0)
        n = int(batch["lengths"][b])
        padded = torch.cat([wavs[b : b + 1, :n], torch.full((1, 7777), 5.0, dtype=torch.float64)], dim=1)
        with torch.no_grad():
            torch.testing.assert_close(model.encode_speech(padded, batch["lengths"][b : b + 1])[0], emb[b],
                                       atol=1e-9, rtol=0)
    if heads > 1:  # the heads attend differently, so the concatenated halves differ
        with torch.no_grad():
            pooled = model.audio_pool(out.last_hidden_state, torch.arange(out.last_hidden_state.shape[1])[None]
                                      < out.lengths[:, None])  # [B, H * D]
        assert (pooled[:, :width] - pooled[:, width : 2 * width]).abs().max() > 1e-3


def test_dual_encoder_option_errors() -> None:
    with pytest.raises(ConfigError, match="image_pool"):
        create_model("dual_encoder_tiny", image_pool="median")
    with pytest.raises(ConfigError, match="audio_context_layers"):
        create_model("dual_encoder_tiny", audio_context_layers=-1)
    with pytest.raises(ConfigError, match="audio_pool"):
        create_model("dual_encoder_tiny", audio_pool="median")
    with pytest.raises(ConfigError, match="audio_pool_heads"):
        create_model("dual_encoder_tiny", audio_pool="attention", audio_pool_heads=0)
    with pytest.raises(ConfigError, match="needs audio_pool='attention'"):
        create_model("dual_encoder_tiny", audio_pool="max", audio_pool_heads=4)


@pytest.mark.parametrize("batch", [9, 11, 13])
def test_image_tower_backward_for_odd_batches_on_two_threads(batch: int) -> None:
    """Batches of any size train: a strided 1x1 convolution's CPU backward once crashed the process for some odd
    batch sizes on two threads (shuffled batches give any number of distinct images); the shortcut is the same
    function computed another way."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(2); torch.manual_seed(0)\n"
            "from vgskit.models import create_model\n"
            "m = create_model('dual_encoder_tiny'); s = m.image_transform['size']\n"
            f"m.encode_image(torch.randn({batch}, 3, s, s)).sum().backward(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-500:]


def test_strided_shortcut_equals_a_strided_1x1_convolution() -> None:
    from torch import nn

    from vgskit.layers import ResBlock2d

    torch.manual_seed(0)
    block = ResBlock2d(8, 16, stride=2)
    x = torch.randn(3, 8, 16, 16)
    strided = nn.Conv2d(8, 16, 1, 2)
    strided.load_state_dict(block.shortcut.state_dict())  # the same parameters as before: checkpoints still load
    with torch.no_grad():
        torch.testing.assert_close(block.shortcut(x[:, :, ::2, ::2]), strided(x), rtol=0, atol=1e-6)
