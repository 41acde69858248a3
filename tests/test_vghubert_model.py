"""VG-HuBERT on the model contract: presets, what trains, where the CLS enters, re-initialised layers, the loss,
and the per-head CLS attention against transformers' own eager attention.

Everything runs on a tiny random HuBERT and ViT saved locally (nothing is downloaded). The functions at the top are
shared with the other ``test_vghubert_*`` files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import HubertConfig, HubertModel, ViTConfig, ViTModel

from _tiny_speechclip import SPEECH
from vgskit.contract import Batch, ImageInputs, SpeechInputs, TrainState
from vgskit.errors import ConfigError
from vgskit.models import create_model, list_models, model_config
from vgskit.models.vg_hubert import VGHuBERT, VGHuBERTConfig, segment_words

#: A 3-layer tiny HuBERT (the preset keeps 2 and re-initialises the last kept one), 50 frames/s.
TINY_HUBERT = dict(SPEECH, num_hidden_layers=3)
#: A tiny ViT: 32x32 images in 8x8 patches, width 24.
TINY_VIT = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, image_size=32,
                patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def save_tiny_towers(folder: Path) -> tuple[Path, Path]:
    """Save the tiny HuBERT and ViT into ``folder`` (own seeded RNG; the global one is left alone)."""
    hubert, vit = folder / "hubert", folder / "vit"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        HubertModel(HubertConfig(**TINY_HUBERT)).eval().save_pretrained(hubert)
        ViTModel(ViTConfig(**TINY_VIT), add_pooling_layer=False).eval().save_pretrained(vit)
    return hubert, vit


def tiny_vghubert(towers: tuple[Path, Path], seed: int = 0, **overrides) -> VGHuBERT:
    torch.manual_seed(seed)
    model = create_model("vg_hubert_tiny", speech={"name_or_path": str(towers[0])},
                         image={"name_or_path": str(towers[1])}, **overrides)
    assert isinstance(model, VGHuBERT)
    return model


def random_batch(seed: int = 0) -> Batch:
    """Six captions of four images (two images with two captions each), 0.1-0.3 s of noise, 32x32 images."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([4800, 3200, 1600, 4000, 2400, 3600])
    wavs = torch.randn(6, int(lengths.max()), generator=g) * 0.1
    wavs = wavs * (torch.arange(wavs.shape[1]) < lengths[:, None])
    image_ids = torch.tensor([0, 0, 1, 2, 3, 3])
    pixels = torch.randn(4, 3, 32, 32, generator=g)[image_ids]
    return Batch(SpeechInputs.waveform(wavs, lengths), ImageInputs.from_pixels(pixels), image_ids, torch.arange(6))


def hand_margin_infonce(scores: torch.Tensor, image_ids: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Written out: diagonal minus the margin, other captions of the same image removed, two directions summed."""
    n = scores.shape[0]
    total = scores.new_zeros(())
    for s in (scores, scores.T):
        per_row = []
        for i in range(n):
            keep = [j for j in range(n) if j == i or image_ids[j] != image_ids[i]]
            logits = torch.stack([s[i, j] - (margin if j == i else 0.0) for j in keep])
            per_row.append(-F.log_softmax(logits, dim=0)[keep.index(i)])
        total = total + torch.stack(per_row).mean()
    return total


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run on one CPU thread: the tensors are tiny, and several threads only add start-up and oversubscription costs
    (which dominate when other processes share the cores); the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_tiny_towers(tmp_path_factory.mktemp("vghubert_towers"))


# ----------------------------------------------------------------------------------------------- presets


def test_presets_follow_the_reference_and_the_paper() -> None:
    assert {"vg_hubert", "vg_hubert_m", "vg_hubert_tiny"} <= set(list_models())
    ref = model_config("vg_hubert")  # no weights needed: towers load when a model is built
    assert isinstance(ref, VGHuBERTConfig)
    s = ref.speech
    assert (s.name_or_path, s.num_layers, s.reinit_last) == ("hubert-base", 12, 3)  # layer_use 11; layers 9-11 new
    assert (s.cls_position, s.num_cls, s.freeze_cnn, s.freeze, s.normalize_waveform) == (
        "after_pos_conv", 1, True, False, False)
    assert (ref.image.name_or_path, ref.image.pool, ref.image.freeze) == ("dino-vits8", "cls", False)
    assert (ref.embed_dim, ref.projection, ref.proj_hidden) == (2048, "mlp", None)
    assert (ref.margin, ref.segment_layer) == (1.0, 9)
    m = model_config("vg_hubert_m")
    assert (m.speech.num_layers, m.speech.reinit_last) == (12, 3)  # "we reinitialize the last 3 layers"
    assert (m.image.name_or_path, m.image.pool, m.embed_dim, m.projection) == ("mae-vit-b16", "mean", 768, "linear")


def test_config_errors_name_the_value() -> None:
    with pytest.raises(ConfigError, match="exactly one CLS"):
        model_config("vg_hubert", speech={"cls_position": "none"})
    with pytest.raises(ConfigError, match="projection"):
        model_config("vg_hubert", projection="conv")
    with pytest.raises(ConfigError, match="embed_dim"):
        model_config("vg_hubert", embed_dim=0)


def test_projection_sizes(towers) -> None:
    model = tiny_vghubert(towers)
    # Both MLPs take their hidden width from the audio side (proj_hidden 32 in the tiny preset; 2 x 768 in the
    # reference, also for the 384-wide ViT-S/8).
    assert [tuple(m.weight.shape) for m in model.audio_proj if isinstance(m, torch.nn.Linear)] == [(32, 32), (16, 32)]
    assert [tuple(m.weight.shape) for m in model.image_proj if isinstance(m, torch.nn.Linear)] == [(32, 24), (16, 32)]
    linear = tiny_vghubert(towers, projection="linear")
    assert [tuple(m.weight.shape) for m in linear.image_proj] == [(16, 24)]


# ---------------------------------------------------------------------------------------------- training


def test_only_trainable_parts_get_gradients(towers) -> None:
    model = tiny_vghubert(towers).train()
    out = model(random_batch(), TrainState())
    out.loss.backward()
    cnn = {n for n, _ in model.named_parameters() if ".feature_extractor." in n}
    assert cnn
    for name, p in model.named_parameters():
        if name in cnn:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), name
    # The ViT is fine-tuned, as in the reference (only the HuBERT CNN is frozen).
    assert any(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if n.startswith("image_tower."))


def test_cls_is_inserted_after_the_positional_convolution(towers) -> None:
    model = tiny_vghubert(towers).eval()
    hf = model.speech_tower.model
    wav = torch.randn(1, 4000) * 0.1
    with torch.no_grad():
        out = model.speech_tower(wav, torch.tensor([4000]))
        x = hf.feature_projection(hf.feature_extractor(wav).transpose(1, 2))
        x = x[0] if isinstance(x, tuple) else x  # [1, T, D]
        frames = hf.encoder.layer_norm(x + hf.encoder.pos_conv_embed(x))  # the pos conv sees the frames only
        cls = hf.encoder.layer_norm(model.speech_tower.cls_tokens)  # no positional term is added to the CLS
    torch.testing.assert_close(out.hidden_states[0], frames)
    torch.testing.assert_close(out.cls_hidden_states[0], cls)


def test_reinitialised_layers_differ_and_kept_ones_are_identical(towers) -> None:
    model = tiny_vghubert(towers)
    pretrained = HubertModel.from_pretrained(towers[0]).state_dict()
    ours = {k[len("speech_tower.model."):]: v for k, v in model.state_dict().items()
            if k.startswith("speech_tower.model.")}
    layer0 = [k for k in ours if k.startswith("encoder.layers.0.")]
    layer1 = [k for k in ours if k.startswith("encoder.layers.1.") and k.endswith("weight")
              and "layer_norm" not in k]
    assert layer0 and layer1
    for k in layer0:
        assert torch.equal(ours[k], pretrained[k]), k
    for k in layer1:
        assert not torch.allclose(ours[k], pretrained[k]), k
    assert not any(k.startswith("encoder.layers.2.") for k in ours)  # beyond num_layers: dropped
    assert torch.equal(ours["encoder.pos_conv_embed.conv.bias"], pretrained["encoder.pos_conv_embed.conv.bias"])


def test_loss_is_margin_infonce_on_raw_dot_products(towers) -> None:
    model = tiny_vghubert(towers).eval()
    batch = random_batch()
    with torch.no_grad():
        out = model(batch, TrainState())
        speech = model.encode_speech(batch.speech.values, batch.speech.lengths)
        image = model.encode_image(batch.image.pixels)
    assert set(out.losses) == {"margin_infonce"}
    expected = hand_margin_infonce(speech @ image.T, batch.image_ids)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)


def test_loss_goes_down_on_a_fixed_batch(towers) -> None:
    model = tiny_vghubert(towers).train()
    batch = random_batch()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(3):
        out = model(batch, TrainState(step=step, total_steps=3))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0], losses


# ---------------------------------------------------------------------------------------- CLS attention


def test_cls_attention_equals_transformers_eager_attention(towers) -> None:
    model = tiny_vghubert(towers).eval()
    batch = random_batch()
    wavs, lengths = batch.speech.values, batch.speech.lengths
    tower = model.speech_tower
    tower.model.config._attn_implementation = "eager"  # transformers' own softmax(QK^T)/sqrt(d), per head
    for layer in (0, 1):
        with torch.no_grad():
            ours = model.cls_attention(wavs, lengths, layer)
            out = tower(wavs, lengths)
            h = torch.cat([out.cls_hidden_states[layer], out.hidden_states[layer]], dim=1)  # [B, 1+T, D]
            valid = torch.cat([torch.ones(len(lengths), 1, dtype=torch.bool),
                               torch.arange(h.shape[1] - 1)[None] < out.lengths[:, None]], dim=1)
            additive = (~valid)[:, None, None, :].float() * torch.finfo(torch.float32).min
            _, weights = tower.model.encoder.layers[layer].attention(h, attention_mask=additive,
                                                                      output_attentions=True)
        reference = weights[:, :, 0, 1:]  # [B, H, T]: the CLS query, the CLS column dropped (golden convention)
        for b in range(len(lengths)):
            n = int(out.lengths[b])
            torch.testing.assert_close(ours.weights[b, :, :n], reference[b, :, :n], rtol=1e-5, atol=1e-6)
            assert torch.all(ours.weights[b, :, n:] == 0)  # padding gets no weight
            # Over the valid frames the row sums to 1 minus what the CLS keeps on itself.
            torch.testing.assert_close(ours.weights[b, :, :n].sum(-1) + ours.cls_self[b], torch.ones(2))
        assert ours.weights.shape == (6, 2, int(out.lengths.max()))
        torch.testing.assert_close(ours.features, out.hidden_states[layer + 1])
    expected_spf = lengths.double() / 16000 / ours.frames.double()
    torch.testing.assert_close(ours.seconds_per_frame, expected_spf)


def test_cls_attention_does_not_depend_on_batch_mates(towers) -> None:
    model = tiny_vghubert(towers).eval()
    batch = random_batch()
    with torch.no_grad():
        full = model.cls_attention(batch.speech.values, batch.speech.lengths, 1)
        n = int(batch.speech.lengths[2])
        alone = model.cls_attention(batch.speech.values[2:3, :n], batch.speech.lengths[2:3], 1)
    t = int(alone.frames[0])
    torch.testing.assert_close(full.weights[2, :, :t], alone.weights[0], rtol=1e-4, atol=1e-6)


def test_segment_applies_wordseg_to_the_attention(towers) -> None:
    model = tiny_vghubert(towers).eval()
    batch = random_batch()
    wavs, lengths = batch.speech.values, batch.speech.lengths
    segments = model.segment(wavs, lengths, quantile=0.8)  # default layer: the tiny preset's segment_layer (1)
    attn = model.cls_attention(wavs, lengths, 1)
    assert len(segments) == 6
    for b, seg in enumerate(segments):
        n = int(attn.frames[b])
        expected = segment_words(attn.weights[b, :, :n].detach(), 0.8, float(attn.seconds_per_frame[b]))
        assert torch.equal(seg.frames, expected.frames)
        assert torch.equal(seg.boundaries, expected.boundaries)
        assert len(seg) >= 1 and float(seg.boundaries.max()) <= float(lengths[b]) / 16000 + 1e-9
    with pytest.raises(ConfigError, match="layer must be an integer in 0..1"):
        model.cls_attention(wavs, lengths, 2)


def test_vg_hubert_m_pools_the_mae_tokens_through_a_linear_head(towers, tmp_path: Path) -> None:
    from transformers import ViTMAEConfig, ViTMAEModel

    mae = tmp_path / "mae"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ViTMAEModel(ViTMAEConfig(**TINY_VIT, mask_ratio=0.75)).eval().save_pretrained(mae)
    torch.manual_seed(0)
    model = create_model("vg_hubert_m", speech={"name_or_path": str(towers[0]), "num_layers": 2, "reinit_last": 1},
                         image={"name_or_path": str(mae)}).eval()
    assert model.embed_dim == 768 and [type(m) for m in model.image_proj] == [torch.nn.Linear]
    pixels = random_batch().image.pixels[:2]
    with torch.no_grad():
        tokens = model.image_tower(pixels).tokens  # [2, 16, 24]: every patch (no masking), CLS removed
        assert tokens.shape == (2, 16, 24)
        torch.testing.assert_close(model.encode_image(pixels), model.image_proj(tokens.mean(dim=1)))
