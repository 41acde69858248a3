"""Three toy models that exercise the model contract through the generic trainer, evaluator and search engine.

* ``test_toy_regions`` reads region features, returns two named losses (coarse InfoNCE weighted 0.1 and a
  fine loss over its pair scorer) and has a fine scorer (``score_pairs``: MaxSim between speech frames and
  regions), so coarse-to-fine re-ranking can be checked against brute force;
* ``test_toy_ema`` keeps an EMA teacher that ``after_step`` updates after every optimizer update, and an
  auxiliary loss whose weight is 0 before ``aux_from_epoch`` (SG-MIM's λ from epoch 3, in miniature);
* ``test_toy_fixed`` has no trainable weights at all (evaluated as built, like an ASR cascade).

Nothing is downloaded; all three are small enough to train in a second.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgskit.contract import Batch, Embeddings, ImageInputs, SpeechInputs, StepOutput, TrainState
from vgskit.images import IMAGENET_MEAN, IMAGENET_STD
from vgskit.layers import lengths_to_mask
from vgskit.losses import InfoNCELoss, unique_images
from vgskit.models.base import RetrievalModel
from vgskit.models.registry import register_model

FRAME = 400  # samples per toy speech frame (25 ms)
REGION_DIM = 6  # mean and std of RGB of each region


def frame_stats(speech: SpeechInputs) -> tuple[Tensor, Tensor]:
    """Three statistics per 25 ms frame ``[B, T', 3]`` and the frame mask ``[B, T']``."""
    wavs, lengths = speech.values, speech.lengths
    n = max(wavs.shape[1] // FRAME, 1)
    x = F.pad(wavs, (0, max(n * FRAME - wavs.shape[1], 0)))[:, : n * FRAME].reshape(wavs.shape[0], n, FRAME)
    feats = torch.stack([x.abs().mean(-1), x.std(-1), (x[..., 1:] * x[..., :-1]).mean(-1)], dim=-1)  # [B, T', 3]
    return feats * 10.0, lengths_to_mask((lengths // FRAME).clamp(min=1, max=n).to(wavs.device), n)


def _pixel_transform(size: int) -> dict[str, Any]:
    return {"size": size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "resize_mode": "squash",
            "interpolation": "bilinear"}


# ------------------------------------------------------------------------------------------------ regions


@dataclass
class ToyRegionsConfig:
    embed_dim: int = 16
    coarse_weight: float = 0.1  # FaST-VGS's 0.1 * coarse + 1.0 * fine


@register_model("test_toy_regions")
class ToyRegionsModel(RetrievalModel):
    """Speech frames ⟷ region features; coarse = pooled dot product, fine = MaxSim over frames × regions."""

    config_class = ToyRegionsConfig
    image_input = "regions"
    has_fine_scores = True

    def __init__(self, config: ToyRegionsConfig):
        super().__init__(config)
        d = config.embed_dim
        self.frame_proj = nn.Sequential(nn.Linear(3, d), nn.Tanh(), nn.Linear(d, d))
        self.region_proj = nn.Linear(REGION_DIM, d)
        self.box_proj = nn.Linear(4, d)
        self.loss = InfoNCELoss(init_temperature=0.1, learnable_temperature=False)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_transform(self) -> dict[str, Any]:
        return _pixel_transform(32)  # unused: the images are region features

    def embed_speech(self, speech: SpeechInputs) -> Embeddings:
        feats, mask = frame_stats(speech)
        tokens = self.frame_proj(feats)  # [B, T', D]
        m = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = F.normalize((tokens * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)  # [B, D]
        return Embeddings(pooled, tokens, mask)

    def embed_image(self, image: ImageInputs) -> Embeddings:
        assert image.regions is not None and image.boxes is not None and image.region_mask is not None
        tokens = self.region_proj(image.regions) + self.box_proj(image.boxes)  # [B, N, D]
        m = image.region_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = F.normalize((tokens * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)  # [B, D]
        return Embeddings(pooled, tokens, image.region_mask)

    def score_pairs(self, speech: Embeddings, image: Embeddings) -> Tensor:
        assert speech.tokens is not None and image.tokens is not None
        assert speech.mask is not None and image.mask is not None
        sim = torch.einsum("ptd,pnd->ptn", F.normalize(speech.tokens, dim=-1),
                           F.normalize(image.tokens, dim=-1))  # [P, T, N]
        sim = sim.masked_fill(~image.mask[:, None, :], -2.0).amax(dim=2)  # [P, T] best region per frame
        m = speech.mask.to(sim.dtype)
        return (sim * m).sum(1) / m.sum(1).clamp(min=1)  # [P]

    def step(self, batch: Batch, state: TrainState) -> StepOutput:
        speech = self.embed_speech(batch.speech)
        first, target = unique_images(batch.image_ids)  # [M], [B]
        image = self.embed_image(batch.image.select(first))
        coarse = self.loss(speech.pooled, image.pooled[target], batch.image_ids)
        # Fine: every caption against every distinct image of the batch, cross-entropy on its own image.
        b, m = len(speech), len(image)
        rows = torch.arange(b).repeat_interleave(m)
        cols = torch.arange(m).repeat(b)
        fine = self.score_pairs(speech.select(rows), image.select(cols)).view(b, m) / 0.1
        fine_loss = F.cross_entropy(fine, target)
        return StepOutput(losses={"coarse": self.config.coarse_weight * coarse, "fine": fine_loss})


# -------------------------------------------------------------------------------------------------- EMA


@dataclass
class ToyEMAConfig:
    embed_dim: int = 8
    momentum: float = 0.9  # teacher momentum at the start, cosine to 1 at the end of the run (SG-MIM)
    aux_weight: float = 2.0
    aux_from_epoch: int = 1


def ema_momentum(base: float, fraction: float) -> float:
    """Cosine schedule of the teacher momentum from ``base`` (fraction 0) to 1 (fraction 1)."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * fraction) + 1.0) / 2.0


@register_model("test_toy_ema")
class ToyEMAModel(RetrievalModel):
    """A dual encoder with an EMA teacher of its image projection and an auxiliary distillation loss."""

    config_class = ToyEMAConfig

    def __init__(self, config: ToyEMAConfig):
        super().__init__(config)
        self.speech_proj = nn.Linear(3, config.embed_dim)
        self.image_proj = nn.Linear(3 * 16, config.embed_dim)
        self.teacher = copy.deepcopy(self.image_proj).requires_grad_(False)
        self.loss = InfoNCELoss(init_temperature=0.1, learnable_temperature=False)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_transform(self) -> dict[str, Any]:
        return _pixel_transform(16)

    def encode_speech(self, wavs: Tensor, lengths: Tensor) -> Tensor:
        feats, mask = frame_stats(SpeechInputs.waveform(wavs, lengths))
        m = mask.unsqueeze(-1).to(feats.dtype)
        return F.normalize(self.speech_proj((feats * m).sum(1) / m.sum(1).clamp(min=1)), dim=-1)

    def _image_features(self, pixels: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(pixels, 4).flatten(1)  # [B, 48]

    def encode_image(self, pixels: Tensor) -> Tensor:
        return F.normalize(self.image_proj(self._image_features(pixels)), dim=-1)

    def step(self, batch: Batch, state: TrainState) -> StepOutput:
        speech = self.embed_speech(batch.speech).pooled
        first, target = unique_images(batch.image_ids)
        assert batch.image.pixels is not None
        pixels = batch.image.pixels[first]
        image = self.encode_image(pixels)[target]
        losses = {"infonce": self.loss(speech, image, batch.image_ids)}
        if state.epoch >= self.config.aux_from_epoch:  # weight 0 before: the loss is left out
            feats = self._image_features(pixels)
            losses["distill"] = self.config.aux_weight * F.mse_loss(self.image_proj(feats), self.teacher(feats))
        return StepOutput(losses=losses, metrics={"momentum": ema_momentum(self.config.momentum, state.fraction)})

    @torch.no_grad()
    def after_step(self, state: TrainState) -> None:
        m = ema_momentum(self.config.momentum, state.fraction)
        for t, s in zip(self.teacher.parameters(), self.image_proj.parameters(), strict=True):
            t.mul_(m).add_(s.detach(), alpha=1.0 - m)


# ------------------------------------------------------------------------------------------ no weights


@dataclass
class ToyFixedConfig:
    embed_dim: int = 8
    seed: int = 7


@register_model("test_toy_fixed")
class ToyFixedModel(RetrievalModel):
    """Fixed random projections of frame statistics and pooled pixels: nothing to train or save."""

    config_class = ToyFixedConfig
    trainable = False

    def __init__(self, config: ToyFixedConfig):
        super().__init__(config)
        g = torch.Generator().manual_seed(config.seed)
        # Not persistent: rebuilt from the seed, so the state dict is empty.
        self.register_buffer("speech_w", torch.randn(3, config.embed_dim, generator=g), persistent=False)
        self.register_buffer("image_w", torch.randn(48, config.embed_dim, generator=g), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_transform(self) -> dict[str, Any]:
        return _pixel_transform(16)

    def encode_speech(self, wavs: Tensor, lengths: Tensor) -> Tensor:
        feats, mask = frame_stats(SpeechInputs.waveform(wavs, lengths))
        m = mask.unsqueeze(-1).to(feats.dtype)
        return F.normalize(((feats * m).sum(1) / m.sum(1).clamp(min=1)) @ self.speech_w, dim=-1)

    def encode_image(self, pixels: Tensor) -> Tensor:
        return F.normalize(F.adaptive_avg_pool2d(pixels, 4).flatten(1) @ self.image_w, dim=-1)
