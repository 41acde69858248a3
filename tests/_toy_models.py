"""Small registered models for the pipeline tests (training from a feature cache, the vocabulary hook,
zero-shot text retrieval, the layers and keywords commands). Built locally; nothing is downloaded."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgskit.contract import Batch, StepOutput, TrainState
from vgskit.encoders.pretrained_speech import (
    PretrainedSpeechConfig,
    PretrainedSpeechEncoder,
    WeightedLayerSum,
)
from vgskit.errors import ConfigError
from vgskit.images import IMAGENET_MEAN, IMAGENET_STD
from vgskit.layers import ImageEncoderOutput, lengths_to_mask
from vgskit.losses import InfoNCELoss
from vgskit.models.base import RetrievalModel
from vgskit.models.registry import register_model

IMAGE_SIZE = 32


class FrozenPatchTower(nn.Module):
    """A frozen random patch embedding: pixels → 16 patch tokens + their mean (an image tower stand-in)."""

    def __init__(self, width: int = 12):
        super().__init__()
        generator = torch.Generator().manual_seed(1234)  # the same tower in every model instance
        self.patch = nn.Conv2d(3, width, kernel_size=8, stride=8)
        with torch.no_grad():
            self.patch.weight.copy_(torch.randn(self.patch.weight.shape, generator=generator) * 0.2)
            self.patch.bias.copy_(torch.randn(self.patch.bias.shape, generator=generator) * 0.1)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenPatchTower:
        return super().train(False)  # frozen: always in eval mode

    def forward(self, pixels: Tensor) -> ImageEncoderOutput:
        # Image caches store the pooled vector only: models read nothing else from a frozen image tower.
        tokens = torch.tanh(self.patch(pixels)).flatten(2).transpose(1, 2)  # [B, 16, width]
        return ImageEncoderOutput(tokens=tokens, pooled=tokens.mean(dim=1))


@dataclass
class FrozenTowersConfig:
    """``speech_tower``: a folder holding a tiny HuBERT (``save_pretrained`` layout). ``save_towers=False``
    leaves the frozen towers out of the state dict (rebuilt from their source on load), as SpeechCLIP does."""

    speech_tower: str = ""
    embed_dim: int = 16
    save_towers: bool = True


def _drop_towers(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith((f"{prefix}speech_tower.", f"{prefix}image_tower."))]:
        del state_dict[key]


def _keep_towers(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for attribute in ("speech_tower", "image_tower"):
        for key, value in getattr(module, attribute).state_dict().items():
            state_dict.setdefault(f"{prefix}{attribute}.{key}", value)


@register_model("test_frozen_towers")
class FrozenTowersModel(RetrievalModel):
    """Frozen HuBERT + frozen patch tower, trainable weighted layer sum and projections."""

    config_class = FrozenTowersConfig

    def __init__(self, config: FrozenTowersConfig):
        super().__init__(config)
        self.speech_tower: nn.Module = PretrainedSpeechEncoder(
            PretrainedSpeechConfig(config.speech_tower, freeze=True, local_files_only=True))
        self.image_tower: nn.Module = FrozenPatchTower()
        n_states = self.speech_tower.num_hidden_states
        self.layer_sum = WeightedLayerSum(n_states)
        self.speech_proj = nn.Linear(self.speech_tower.width, config.embed_dim)
        self.image_proj = nn.Linear(12, config.embed_dim)
        self.loss = InfoNCELoss(init_temperature=0.1, learnable_temperature=False)
        if not config.save_towers:
            (getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook)(_drop_towers)
            self.register_load_state_dict_pre_hook(_keep_towers)

    def frozen_towers(self) -> dict[str, nn.Module]:
        return {"speech": self.speech_tower, "image": self.image_tower}

    def set_tower(self, kind: str, module: nn.Module) -> None:
        setattr(self, {"speech": "speech_tower", "image": "image_tower"}[kind], module)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_transform(self) -> dict[str, Any]:
        return {"size": IMAGE_SIZE, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "resize_mode": "squash", "interpolation": "bilinear"}

    def encode_speech(self, wavs: Tensor, lengths: Tensor) -> Tensor:
        out = self.speech_tower(wavs, lengths)
        frames = self.layer_sum(out.hidden_states)  # [B, T, D]
        mask = lengths_to_mask(out.lengths.to(frames.device), frames.shape[1]).unsqueeze(-1).to(frames.dtype)
        pooled = (frames * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(self.speech_proj(pooled), dim=-1)

    def encode_image(self, pixels: Tensor) -> Tensor:
        return F.normalize(self.image_proj(self.image_tower(pixels).pooled), dim=-1)

    def layer_weights(self) -> dict[str, Tensor]:
        return {"parallel": torch.softmax(self.layer_sum.weights.detach(), dim=0)}

    def step(self, batch: Batch, state: TrainState) -> StepOutput:
        # Waveforms or cached tower states / outputs: the default embed_* route both through the towers.
        speech = self.embed_speech(batch.speech).pooled  # [B, E]
        image = self.embed_image(batch.image).pooled  # [B, E]
        return StepOutput(losses={"infonce": self.loss(speech, image, batch.image_ids)})


def _word_vector(word: str, dim: int) -> Tensor:
    seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


@dataclass
class ToyTextConfig:
    """``vocabulary``: filled from the training captions by :meth:`ToyTextModel.adapt_config_to_corpus`."""

    embed_dim: int = 8
    vocabulary: tuple[str, ...] = ()
    num_slots: int = 2


@register_model("test_toy_text")
class ToyTextModel(RetrievalModel):
    """A tiny speech/image dual encoder with a bag-of-words text tower, keywords and layer weights."""

    config_class = ToyTextConfig

    def __init__(self, config: ToyTextConfig):
        super().__init__(config)
        self.frame = 400
        self.speech_proj = nn.Linear(3, config.embed_dim)
        self.image_proj = nn.Linear(3 * 16, config.embed_dim)
        self.mix = nn.Parameter(torch.linspace(-1.0, 1.0, 5))  # "hidden-state" weights
        self.loss = InfoNCELoss(init_temperature=0.1, learnable_temperature=False)

    @classmethod
    def adapt_config_to_corpus(cls, config: dict[str, Any], train_texts: Sequence[str], *,
                               model_name: str | None = None,
                               corpus_texts: Sequence[str] | None = None) -> dict[str, Any]:
        if model_name != "test_toy_text":
            raise AssertionError(f"model_name {model_name!r} not passed")
        if not train_texts:
            raise ConfigError("no caption transcripts to build the keyword vocabulary from")
        config["vocabulary"] = sorted({w for t in train_texts for w in t.lower().split()})
        return config

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_transform(self) -> dict[str, Any]:
        return {"size": 16, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "resize_mode": "squash", "interpolation": "bilinear"}

    def _frames(self, wavs: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        n = wavs.shape[1] // self.frame
        x = wavs[:, : n * self.frame].reshape(wavs.shape[0], n, self.frame)
        feats = torch.stack([x.abs().mean(-1), x.std(-1), (x[..., 1:] * x[..., :-1]).mean(-1)], dim=-1)
        return feats, lengths_to_mask((lengths // self.frame).clamp(min=1), n)

    def encode_speech(self, wavs: Tensor, lengths: Tensor) -> Tensor:
        feats, mask = self._frames(wavs, lengths)
        m = mask.unsqueeze(-1).to(feats.dtype)
        return F.normalize(self.speech_proj((feats * m).sum(1) / m.sum(1).clamp(min=1)), dim=-1)

    def encode_image(self, pixels: Tensor) -> Tensor:
        return F.normalize(self.image_proj(F.adaptive_avg_pool2d(pixels, 4).flatten(1)), dim=-1)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        rows = [torch.stack([_word_vector(w, self.embed_dim) for w in t.lower().split()]).mean(0) for t in texts]
        return F.normalize(torch.stack(rows), dim=-1)

    def layer_weights(self) -> dict[str, Tensor]:
        return {"parallel": torch.softmax(self.mix.detach(), 0), "cascaded": torch.softmax(-self.mix.detach(), 0)}

    def keywords(self, wavs: Tensor, lengths: Tensor, top_k: int = 5) -> list[list[list[tuple[str, float]]]]:
        vocab = list(self.config.vocabulary) or ["<none>"]
        out = []
        for b in range(wavs.shape[0]):
            n = int(lengths[b])
            slots = []
            for s in range(self.config.num_slots):
                start = (n * 7 + s * 3) % len(vocab)
                slots.append([(vocab[(start + j) % len(vocab)], round(0.9 - 0.1 * j - 0.01 * s, 4))
                              for j in range(min(top_k, len(vocab)))])
            out.append(slots)
        return out

    def step(self, batch: Batch, state: TrainState) -> StepOutput:
        speech = self.embed_speech(batch.speech).pooled  # [B, E]
        image = self.embed_image(batch.image).pooled  # [B, E]
        return StepOutput(losses={"infonce": self.loss(speech, image, batch.image_ids)})


class NoExtrasModel(ToyTextModel):
    """The toy model without a text tower, keywords or layer weights (the error paths)."""

    encode_text = None  # type: ignore[assignment]
    keywords = None  # type: ignore[assignment]
    layer_weights = None  # type: ignore[assignment]

    @classmethod
    def adapt_config_to_corpus(cls, config: dict[str, Any], train_texts: Sequence[str], *,
                               model_name: str | None = None,
                               corpus_texts: Sequence[str] | None = None) -> dict[str, Any]:
        return config  # needs no transcripts: trains on a corpus without them


register_model("test_no_extras")(NoExtrasModel)
