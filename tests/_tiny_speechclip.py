"""Tiny local towers for SpeechCLIP tests: a random HuBERT, a random CLIP with a small real CLIP BPE tokenizer,
saved in ``save_pretrained`` layout so that the model's own tower configs load them; nothing is downloaded."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    HubertConfig,
    HubertModel,
    Wav2Vec2FeatureExtractor,
)

from _tiny_towers import TINY_SPEECH
from vgskit.encoders.pretrained_image import PretrainedImageConfig
from vgskit.encoders.pretrained_speech import PretrainedSpeechConfig
from vgskit.encoders.text import ClipTextConfig
from vgskit.models.registry import merge_config
from vgskit.models.speechclip import CascadedBranchConfig, ParallelBranchConfig, SpeechCLIPConfig

# The shared tiny speech tower with a fourth stride-4 convolution (50 frames/s, as HuBERT), two layers and no
# dropout: frozen towers run in eval mode anyway, and the unfrozen one trains faster on short sequences.
SPEECH = dict(TINY_SPEECH, conv_dim=(16,) * 4, conv_stride=(5, 4, 4, 4), conv_kernel=(10, 4, 4, 4),
              num_hidden_layers=2, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
              feat_proj_dropout=0.0)
# Words the tiny tokenizer knows whole; anything else is spelled out letter by letter.
WORDS = (
    "a the and of on in to is left right above below small large red blue green white black pink "
    "bag dog cat sneaker sandal dress coat shirt boot background corner top bottom"
).split()
CAPTIONS = ["a small red bag left of a blue dog", "the large green sneaker, on a white background"]


def write_clip_tokenizer(folder: Path, words: tuple[str, ...] | list[str]) -> int:
    """A CLIP BPE tokenizer over lowercase letters and ``words`` (id 0 is "!", SOT/EOT last, as in CLIP)."""
    chars = list(string.ascii_lowercase + ",.'")
    vocab = ["!", *chars, *(c + "</w>" for c in chars)]
    merges: list[str] = []
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: every prefix of a word is a token
            pair, merged = f"{parts[0]} {parts[1]}", parts[0] + parts[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in vocab:
                vocab.append(merged)
            parts = [merged, *parts[2:]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    return len(vocab)


@dataclass
class Towers:
    hubert: Path
    clip: Path
    vocab_size: int


def make_towers(tmp_path_factory: pytest.TempPathFactory) -> Towers:
    """Save a tiny HuBERT (2 layers, width 32) and a tiny CLIP (width 32, joint space 16) into temporary folders."""
    torch.manual_seed(0)
    hubert = tmp_path_factory.mktemp("hubert")
    HubertModel(HubertConfig(**SPEECH)).eval().save_pretrained(hubert)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(hubert)

    clip = tmp_path_factory.mktemp("clip")
    n = write_clip_tokenizer(clip, WORDS)
    vit = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text = dict(vit, vocab_size=n, max_position_embeddings=24, bos_token_id=n - 2, eos_token_id=n - 1,
                pad_token_id=n - 1)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(vit, image_size=32, patch_size=8),
                         projection_dim=16)).eval().save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    return Towers(hubert, clip, n)


def tiny_config(t: Towers, branches: str = "both", *, freeze: bool = True, **overrides) -> SpeechCLIPConfig:
    """A config on the tiny towers; ``overrides`` merge like registry overrides (nested dicts too)."""
    config = SpeechCLIPConfig(
        speech=PretrainedSpeechConfig(str(t.hubert), freeze=freeze),
        image=PretrainedImageConfig(str(t.clip), freeze=freeze),
        text=ClipTextConfig(str(t.clip)),
        branches=branches,  # type: ignore[arg-type]
        parallel=ParallelBranchConfig(num_heads=2, ffn_dim=64),
        cascaded=CascadedBranchConfig(num_keywords=4),
    )
    return merge_config(config, overrides)


def tiny_batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` (at most 6) random utterances of 0.1-0.2 s, zero beyond their lengths, with 32×32 images."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3200, 2400, 1600, 2800, 2000, 3000][:n])
    wavs = torch.randn(n, int(lengths.max()), generator=g) * 0.1
    wavs = wavs * (torch.arange(wavs.shape[1]) < lengths[:, None])
    return {"wavs": wavs, "lengths": lengths, "pixels": torch.randn(n, 3, 32, 32, generator=g),
            "image_ids": torch.tensor([0, 0, 1, 2, 3, 3][:n])}


def perturb(model: torch.nn.Module, seed: int = 3) -> None:
    """Move every trainable parameter away from its init (zero layer weights, unit BatchNorm...), so that a
    round trip that dropped one of them would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
