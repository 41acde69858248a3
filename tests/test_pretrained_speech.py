"""Pretrained speech towers: tiny random HuBERT/wav2vec2 checkpoints saved to a folder and loaded back."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from _tiny_towers import TINY_SPEECH
from vgskit.encoders.hub import MissingWeightsError, offline_mode, resolve_tower
from vgskit.encoders.pretrained_speech import (
    PretrainedSpeechConfig,
    PretrainedSpeechEncoder,
    WeightedLayerSum,
    normalize_waveforms,
)

TINY = TINY_SPEECH


def _save(folder: Path, kind: str, do_normalize: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "hubert":  # base-style: group-norm CNN, post-norm transformer
        model = HubertModel(HubertConfig(**TINY, feat_extract_norm="group", do_stable_layer_norm=False))
    else:  # large-style: layer-norm CNN, pre-norm transformer
        model = Wav2Vec2Model(Wav2Vec2Config(**TINY, feat_extract_norm="layer", do_stable_layer_norm=True))
    model.eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=do_normalize).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("hubert")
    return folder, _save(folder, "hubert")


@pytest.fixture(scope="module")
def w2v_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("w2v")
    return folder, _save(folder, "wav2vec2", do_normalize=True)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4000, generator=g), torch.tensor([4000, 2500])


@pytest.mark.parametrize("which", ["hubert", "w2v"])
def test_matches_transformers_forward(which: str, request: pytest.FixtureRequest) -> None:
    folder, ref = request.getfixturevalue(f"{which}_dir")
    # float64: our batched pass and transformers' single-utterance one run other kernels (batch shapes,
    # per-utterance CNN), whose float32 rounding differs between CPUs; in float64 it is ~1e-15.
    enc = PretrainedSpeechEncoder(PretrainedSpeechConfig(str(folder), freeze=True)).double()
    ref = copy.deepcopy(ref).double()  # the fixture's model stays float32 for the other tests
    wavs, lengths = _batch()
    wavs = wavs.double()
    out = enc(wavs, lengths)
    inp = normalize_waveforms(wavs[:1], lengths[:1]) if enc.preprocessing.normalize else wavs[:1]
    with torch.no_grad():
        want = ref(inp, output_hidden_states=True)
    assert out.frame_rate == 200.0 and out.lengths.tolist() == [49, 31]
    assert len(out.hidden_states) == enc.num_hidden_states == 4
    torch.testing.assert_close(out.last_hidden_state[:1], want.last_hidden_state, atol=1e-9, rtol=0)
    # Intermediate states follow transformers' convention (its last entry may skip the final pre-norm LN).
    for mine, theirs in zip(out.hidden_states[:-1], want.hidden_states[:-1], strict=True):
        torch.testing.assert_close(mine[:1], theirs, atol=1e-9, rtol=0)
    assert out.last_hidden_state[1, 31:].abs().max() == 0  # padding zeroed


def test_preprocessing_travels_with_weights(hubert_dir, w2v_dir) -> None:
    assert PretrainedSpeechEncoder(PretrainedSpeechConfig(str(hubert_dir[0]))).preprocessing.normalize is False
    assert PretrainedSpeechEncoder(PretrainedSpeechConfig(str(w2v_dir[0]))).preprocessing.normalize is True
    forced = PretrainedSpeechEncoder(PretrainedSpeechConfig(str(w2v_dir[0]), normalize_waveform=False))
    assert forced.preprocessing.normalize is False


@pytest.mark.parametrize("which", ["hubert", "w2v"])
def test_padding_invariance(which: str, request: pytest.FixtureRequest) -> None:
    folder, _ = request.getfixturevalue(f"{which}_dir")
    # float64, as in test_matches_transformers_forward: only padding leaking in can show at 1e-9.
    enc = PretrainedSpeechEncoder(
        PretrainedSpeechConfig(str(folder), freeze=True, cls_position="after_pos_conv")).double()
    wavs, lengths = _batch()
    wavs = wavs.double()
    batched = enc(wavs, lengths)
    alone = enc(wavs[1:, :2500], lengths[1:])
    n = int(alone.lengths[0])
    torch.testing.assert_close(batched.last_hidden_state[1, :n], alone.last_hidden_state[0], atol=1e-9, rtol=0)
    torch.testing.assert_close(batched.cls[1], alone.cls[0], atol=1e-9, rtol=0)


def test_group_norm_cnn_needs_per_utterance_pass(hubert_dir) -> None:
    # Without the per-utterance CNN pass, GroupNorm statistics include the padding: the result changes.
    enc = PretrainedSpeechEncoder(PretrainedSpeechConfig(str(hubert_dir[0]), freeze=True, exact_padding=False))
    wavs, lengths = _batch()
    batched, alone = enc(wavs, lengths), enc(wavs[1:, :2500], lengths[1:])
    assert (batched.last_hidden_state[1, :31] - alone.last_hidden_state[0]).abs().max() > 1e-3


def test_cls_position_matters_and_is_excluded_from_frames(hubert_dir) -> None:
    wavs, lengths = _batch()
    outs = {}
    for pos in ("before_pos_conv", "after_pos_conv"):
        torch.manual_seed(3)  # same CLS init for both
        enc = PretrainedSpeechEncoder(PretrainedSpeechConfig(str(hubert_dir[0]), cls_position=pos, num_cls=2))
        enc.eval()
        outs[pos] = enc(wavs, lengths)
        assert outs[pos].cls.shape == (2, 2, 32) and outs[pos].last_hidden_state.shape == (2, 49, 32)
        assert len(outs[pos].cls_hidden_states) == 4
        assert enc.cls_tokens.requires_grad
    # Before the positional convolution the CLS changes the first frames' positional terms.
    diff = (outs["before_pos_conv"].hidden_states[0] - outs["after_pos_conv"].hidden_states[0]).abs()
    assert diff[:, :2].max() > 1e-3


def test_keep_layers_and_reinit(hubert_dir) -> None:
    folder, ref = hubert_dir
    enc = PretrainedSpeechEncoder(PretrainedSpeechConfig(str(folder), num_layers=2, reinit_last=1, freeze_cnn=True))
    assert len(enc.model.encoder.layers) == 2 and enc.num_hidden_states == 3
    kept, reinit = enc.model.encoder.layers
    torch.testing.assert_close(kept.attention.q_proj.weight, ref.encoder.layers[0].attention.q_proj.weight)
    w = reinit.attention.q_proj.weight
    assert not torch.allclose(w, ref.encoder.layers[1].attention.q_proj.weight)
    assert abs(float(w.detach().std()) - 0.02) < 0.005 and reinit.attention.q_proj.bias.abs().max() == 0
    assert not any(p.requires_grad for p in enc.model.feature_extractor.parameters())
    assert all(p.requires_grad for p in enc.model.encoder.parameters())
    wavs, lengths = _batch()
    enc(wavs, lengths).last_hidden_state.sum().backward()
    assert enc.model.encoder.layers[0].attention.q_proj.weight.grad is not None


def test_frozen_tower_stays_in_eval(hubert_dir) -> None:
    enc = PretrainedSpeechEncoder(PretrainedSpeechConfig(str(hubert_dir[0]), freeze=True))
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())


def test_normalize_waveforms_ignores_padding() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.0]])
    padded = normalize_waveforms(torch.tensor([[1.0, 2.0, 3.0, 50.0, 50.0]]), torch.tensor([3]))
    torch.testing.assert_close(padded, normalize_waveforms(x, torch.tensor([3])))
    torch.testing.assert_close(padded[0, :3], torch.tensor([-1.2247, 0.0, 1.2247]), atol=1e-4, rtol=0)
    assert padded[0, 3:].abs().max() == 0


def test_weighted_layer_sum() -> None:
    states = [torch.full((1, 2, 4), float(i)) for i in range(3)]
    wls = WeightedLayerSum(3)
    torch.testing.assert_close(wls(states), torch.full((1, 2, 4), 1.0))  # zeros → plain average
    with torch.no_grad():
        wls.weights.copy_(torch.tensor([0.0, 0.0, 100.0]))
    torch.testing.assert_close(wls(states), torch.full((1, 2, 4), 2.0))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 2, 4, generator=g), torch.randn(1, 2, 4, generator=g)
    normed = WeightedLayerSum(2, layer_norm=True)([a * 100, b])
    expect = (torch.nn.functional.layer_norm(a, (4,)) + torch.nn.functional.layer_norm(b, (4,))) / 2
    torch.testing.assert_close(normed, expect)
    with pytest.raises(ValueError):
        wls(states[:2])


def test_missing_folder_and_weights_messages(tmp_path: Path, hubert_dir) -> None:
    with pytest.raises(MissingWeightsError, match="hf download"):
        PretrainedSpeechEncoder(PretrainedSpeechConfig(str(tmp_path / "nope" / "hubert")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((hubert_dir[0] / "config.json").read_text())
    with pytest.raises(MissingWeightsError, match="no weights"):
        PretrainedSpeechEncoder(PretrainedSpeechConfig(str(tmp_path / "empty")))


def test_offline_switches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not offline_mode() and resolve_tower("hubert-base").local_files_only is False
    assert resolve_tower("hubert-base").name_or_path == "facebook/hubert-base-ls960"
    assert resolve_tower("hubert-base", local_files_only=True).local_files_only is True
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert offline_mode() and resolve_tower("hubert-base").local_files_only is True
    # Offline with an empty cache: a clear message naming the repository to download, no network access.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(MissingWeightsError, match="hf download facebook/hubert-base-ls960"):
        PretrainedSpeechEncoder(PretrainedSpeechConfig("hubert-base"))
