"""Analyses of the SpeechCLIP paper: keyword-to-frame attention maps (Fig. 3), the subwords each keyword slot
selects most often (Table 5) and the keyword BatchNorm ablation (Table 6, "w/o BN")."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from _tiny_speechclip import Towers, make_towers, perturb, tiny_batch, tiny_config
from vgskit.contract import Batch, ImageInputs, SpeechInputs, TrainState
from vgskit.errors import VGSKitError
from vgskit.experiment import load_experiment, make_dataset
from vgskit.models.registry import model_config, save_pretrained
from vgskit.models.speechclip import (
    SpeechCLIP,
    evaluate_keyword_hit_rate,
    format_keyword_hit_rate,
    keyword_slot_top_subwords,
    plot_keyword_attention,
)
from vgskit.models.speechclip.commands import run_keywords

RECIPES = Path(__file__).parents[1] / "src" / "vgskit" / "recipes"


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> Towers:
    return make_towers(tmp_path_factory)


@pytest.fixture(scope="module")
def cascaded(towers: Towers) -> SpeechCLIP:
    torch.manual_seed(0)
    model = SpeechCLIP(tiny_config(towers, "cascaded"))
    perturb(model)
    model.model_name = "speechclip_cascaded_base"  # the registered family, so that it saves and loads
    return model.eval()


def _attention_by_hand(model: SpeechCLIP, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Keyword-slot attention over the frames from the branch's weights: softmax(q k^T / sqrt(d)), padding masked."""
    branch = model.cascaded
    k = branch.config.num_keywords
    with torch.no_grad():
        feats, frames = model.speech_features(wavs, lengths)  # [B, T, d]
        src = torch.cat([branch.cls.expand(len(wavs), -1, -1), feats], dim=1)  # [B, K+T, d]
        d = src.shape[-1]
        w, b = branch.attention.attn.in_proj_weight, branch.attention.attn.in_proj_bias
        q = src @ w[:d].T + b[:d]
        key = src @ w[d:2 * d].T + b[d:2 * d]
        scores = q @ key.transpose(1, 2) / math.sqrt(d)  # one head
        pad = torch.arange(src.shape[1])[None] >= (frames + k)[:, None]  # [B, K+T]
        scores = scores.masked_fill(pad[:, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1)[:, :k, k:], frames


def test_keyword_attention_is_the_attention_block(cascaded: SpeechCLIP) -> None:
    batch = tiny_batch(3)
    att = cascaded.keyword_attention(batch["wavs"], batch["lengths"])
    want, frames = _attention_by_hand(cascaded, batch["wavs"], batch["lengths"])
    assert att.weights.shape == want.shape and torch.equal(att.lengths, frames)
    assert torch.allclose(att.weights, want, atol=1e-6)
    assert att.frame_rate == 50.0
    assert not cascaded.training
    for b, n in enumerate(frames.tolist()):  # padded frames get nothing
        assert torch.all(att.weights[b, :, n:] == 0)
        assert torch.all(att.weights[b, :, :n].sum(-1) <= 1 + 1e-6)


def test_attention_plot_draws_the_model_attention(cascaded: SpeechCLIP, tmp_path: Path) -> None:
    batch = tiny_batch(1)
    wav = batch["wavs"][0]
    att = cascaded.keyword_attention(wav[None], batch["lengths"])
    want, frames = _attention_by_hand(cascaded, wav[None], batch["lengths"])
    plot = plot_keyword_attention(wav, 16000, att.weights[0], att.frame_rate, tmp_path / "att.png",
                                  slot_labels=["a", "b", "c", "d"], dpi=50)
    assert plot.matrix.shape == (4, int(frames[0]))
    np.testing.assert_allclose(plot.matrix, want[0].numpy(), atol=1e-6)
    assert (plot.xlabel, plot.ylabel) == ("time (s)", "keyword slot")
    assert plot.extent[:2] == (0.0, int(frames[0]) / 50.0)
    with Image.open(plot.path) as png:
        assert png.size == plot.size == (500, 250)  # 10 x 5 inches at 50 dpi
    with pytest.raises(ValueError, match="slot labels"):
        plot_keyword_attention(wav, 16000, att.weights[0], 50.0, tmp_path / "x.png", slot_labels=["a"])


def test_keywords_cli_attention_plot(cascaded: SpeechCLIP, tmp_path: Path, capsys) -> None:
    model_dir = save_pretrained(cascaded, tmp_path / "model")
    wav = tmp_path / "a.wav"
    sf.write(wav, tiny_batch(1)["wavs"][0].numpy(), 16000)
    png = tmp_path / "out" / "att.png"
    args = argparse.Namespace(checkpoint=str(model_dir), k=2, max_seconds=60.0, json=None,
                              attention_plot=str(png), audio=[str(wav)])
    assert run_keywords(args) == 0
    assert str(png) in capsys.readouterr().out
    with Image.open(png) as image:
        assert image.size == (1000, 500)
    args.audio = [str(wav), str(wav)]
    with pytest.raises(VGSKitError, match="one audio file"):
        run_keywords(args)


# ---------------------------------------------------------------------------------------------------------
# Table 5: most frequent subwords per slot
# ---------------------------------------------------------------------------------------------------------


def test_top_subwords_per_slot() -> None:
    top1 = [["dog", "red", "a"], ["dog", "blue", "a"], ["cat", "red", "the"], ["dog", "red", "a"]]
    assert keyword_slot_top_subwords(top1, 2) == [
        [("dog", 3), ("cat", 1)], [("red", 3), ("blue", 1)], [("a", 3), ("the", 1)]]
    assert keyword_slot_top_subwords([[5, 7], [5, 8]], 5, decode=lambda t: f"t{t}") == [
        [("t5", 2)], [("t7", 1), ("t8", 1)]]
    assert keyword_slot_top_subwords([], 3) == []
    with pytest.raises(ValueError, match="one token per slot"):
        keyword_slot_top_subwords([[1, 2], [3]], 3)


def test_keyword_hit_rate_reports_top_subwords(cascaded: SpeechCLIP, tiny_manifest: Path) -> None:
    ds = make_dataset(tiny_manifest, "test", cascaded.image_transform, max_seconds=None, preload=True,
                      progress=False)
    result = evaluate_keyword_hit_rate(cascaded, ds, top_k=2, batch_size=16)
    tok = cascaded.text_tower.tokenizer
    counts: list[dict[str, int]] = [{} for _ in range(4)]
    with torch.no_grad():
        for i in range(len(ds)):
            wav = ds.waveform(i)
            ids = cascaded.keyword_ids(wav[None], torch.tensor([len(wav)]), top_k=1)[0][0, :, 0]
            for slot, t in enumerate(ids.tolist()):
                name = tok.convert_ids_to_tokens(int(t))
                counts[slot][name] = counts[slot].get(name, 0) + 1
    assert len(result["top_subwords"]) == 4
    for slot, top in enumerate(result["top_subwords"]):
        assert sum(n for _, n in top) <= len(ds)
        for name, n in top:
            assert counts[slot][name] == n
        assert top[0][1] == max(counts[slot].values())
    assert "most frequent selected subwords" in format_keyword_hit_rate(result)


# ---------------------------------------------------------------------------------------------------------
# Table 6: keyword BatchNorm ablation
# ---------------------------------------------------------------------------------------------------------


def test_without_keyword_batchnorm(towers: Towers) -> None:
    torch.manual_seed(0)
    model = SpeechCLIP(tiny_config(towers, "cascaded", cascaded={"keyword_batchnorm": False}))
    assert model.cascaded.batchnorm is None
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.cascaded.modules())
    assert not any("batchnorm" in k for k in model.state_dict())
    batch = tiny_batch(4)
    feats, frames = model.speech_features(batch["wavs"], batch["lengths"])
    out = model.cascaded(feats, frames)
    assert torch.equal(out.kw_bn, out.kw_proj)
    model.train()
    step = model.step(Batch(speech=SpeechInputs.waveform(batch["wavs"], batch["lengths"]),
                            image=ImageInputs.from_pixels(batch["pixels"]), image_ids=batch["image_ids"],
                            caption_ids=torch.arange(4)), TrainState())
    total = sum(step.losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.cascaded.proj.weight.grad is not None


def test_batchnorm_ablation_override_of_the_recipe() -> None:
    recipe = RECIPES / "speechclip_cascaded_base_flickr8k.yaml"
    assert "model.cascaded.keyword_batchnorm=false" in recipe.read_text()
    d = dict(load_experiment(recipe, ["model.cascaded.keyword_batchnorm=false"])["model"])
    config = model_config(d.pop("name"), **d)
    assert config.cascaded.keyword_batchnorm is False and config.cascaded.bn_reference_init is True
