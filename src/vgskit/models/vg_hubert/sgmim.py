"""SG-MIM: Speech-Guided Masked Image Modelling for visually grounded speech (Woo, Ryu, Senocak, Chung, ICASSP 2024).

SG-MIM is VG-HuBERT (M) (:mod:`~vgskit.models.vg_hubert.model`, preset ``vg_hubert_m``: HuBERT-base with a CLS
token, MAE ViT-B/16, the mean image feature and the audio CLS each through a linear projection to 768) plus a
masked-image-modelling branch used only in training:

* **contrastive branch** (§2.2, Eq. 2): InfoNCE between the projected mean feature of the *full* image and the
  projected audio CLS. The paper is explicit that this branch sees the full image ("For contrastive learning, we
  extract audio and full image features [...]. Concurrently, we mask a large portion of the image and subsequently
  extract features from this masked image", §1; Fig. 2), so the retrieval embeddings never depend on masking;
* **masked branch** (§2.2, Eq. 3-4): 75 % of the patches are masked at random per image (§3.2, "in alignment with
  MAE"); the image encoder, shared with the contrastive branch, sees only the visible 25 %; a one-layer
  **cross-modal decoder** (cross-attention, self-attention, feed-forward; §3.2) places the visible features and a
  learnt mask token at every patch position, attends to a **speech summary** -- one vector per attention head of the
  last audio layer, ``W · Z_A`` with ``W`` the CLS query's attention weights over the frames (Eq. 3, Fig. 3) -- and
  predicts, at the masked positions, the features that a **momentum (EMA) image encoder** computes from the full
  image (MSE, Eq. 4);
* **momentum encoder** (§2.1, §3.2): a copy of the image encoder that never receives gradients, updated after every
  optimizer step as ``θ̄ ← α θ̄ + (1 - α) θ`` with ``α`` rising from 0.999 to 1 on a cosine schedule over training;
* **objective** (Eq. 5): ``L = L_NCE + λ L_MIM``, ``λ = 2.0`` once the reconstruction loss is introduced "after 3
  epochs" (§3.2), 0 before.

At inference the teacher and the decoder are dropped: :meth:`SGMIM.encode_speech` / :meth:`SGMIM.encode_image` are
VG-HuBERT (M)'s (inherited unchanged), so a trained SG-MIM is used exactly like VG-HuBERT (M).

Choices where the paper is silent or ambiguous (each is a config field):

* **λ start epoch** is counted from 0, as :class:`~vgskit.contract.TrainState.epoch`: "we introduce the
  reconstruction loss after 3 epochs" means after three complete epochs (0, 1, 2), so λ = 2.0 from epoch index 3
  (the fourth epoch) on;
* **contrastive loss**: Eq. 2 is InfoNCE on raw inner products without a margin or a temperature, both directions
  summed; :func:`vgskit.losses.margin_infonce_loss` with ``margin = 0`` is exactly that (other captions of the same
  image, which Eq. 2 does not consider, are removed from the negatives). It runs on the *global* batch (embeddings
  gathered across processes), so data-parallel training optimises the same loss as one process;
* **MIM loss reduction**: the text names it "Mean Square Error" while Eq. 4 writes a squared L2 norm per patch
  averaged over the masked patches; the two differ by the feature width (768). ``mim_reduction = "mean"`` (default,
  the text's MSE: mean over masked patches *and* feature dimensions) or ``"sum"`` (Eq. 4 literally);
* **targets**: the teacher's final-layernorm patch tokens (what the image encoder outputs, ``Z̄_I`` of Eq. 4);
* **decoder sizes**: not given; MAE's decoder width (512), heads (16) and MLP ratio (4), pre-norm residual
  sub-layers in the order the paper lists them, fixed 2-D sine-cosine positions (as MAE's decoder), a linear head to
  the teacher's width, and no CLS token (Eq. 4 indexes the N patch outputs only);
* **masks**: one per caption row (each row pairs an image with its own spoken caption, hence its own summary), drawn
  from a generator seeded by ``(mask_seed, step, caption id)`` so that several processes draw what one process
  draws and a resumed run draws what an uninterrupted one drew;
* **teacher schedule**: the teacher follows the student from the first step (also while λ = 0), so that when the
  loss is introduced it is the EMA of the recent student rather than the initial MAE weights;
* **while λ = 0** the masked branch is not computed at all (no teacher forward, no decoder): the decoder and the
  mask token then get no gradient, which is why :meth:`SGMIM.ddp_options` asks DistributedDataParallel for
  ``find_unused_parameters=True``. The alternative (computing the branch with weight 0) would spend a teacher and a
  decoder forward/backward per step for three epochs and let the optimizer's weight decay shrink the unused decoder.
  A parameter unused on every process keeps ``grad = None`` under DDP as in a single process, so the optimizer skips
  it in both cases (tested with two gloo processes against one).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vgskit.contract import Batch, StepOutput, TrainState
from vgskit.encoders.pretrained_image import PretrainedImageConfig
from vgskit.encoders.pretrained_speech import PretrainedSpeechOutput
from vgskit.errors import ConfigError
from vgskit.losses import margin_infonce_loss, unique_images
from vgskit.models.registry import register_model
from vgskit.models.vg_hubert.model import (
    SCENES_MAE,
    VGHuBERT,
    VGHuBERTConfig,
    default_speech_tower,
    scenes_speech_tower,
)

__all__ = [
    "MIM_REDUCTIONS",
    "CrossModalDecoder",
    "SGMIM",
    "SGMIMConfig",
    "momentum_at",
    "sincos_2d",
]

#: How the masked-patch errors are reduced: ``"mean"`` (MSE over patches and features) or ``"sum"`` (squared L2
#: norm per patch, averaged over the masked patches: Eq. 4 as printed).
MIM_REDUCTIONS: tuple[str, ...] = ("mean", "sum")


def mae_image_tower() -> PretrainedImageConfig:
    """MAE ViT-B/16 (§3.2, "pre-trained weights from [21]"), fine-tuned, mean of its output tokens (§2.2)."""
    return PretrainedImageConfig(name_or_path="mae-vit-b16", pool="mean", project=False, freeze=False)


def momentum_at(base: float, fraction: float) -> float:
    """Teacher momentum on a cosine schedule: ``base`` at ``fraction`` 0, 1 at ``fraction`` 1 (§3.2)."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * fraction) + 1.0) / 2.0


def sincos_2d(dim: int, grid: int) -> Tensor:
    """MAE's fixed 2-D sine-cosine position table ``[grid*grid, dim]`` (rows in raster order, no CLS row).

    Half the channels encode the row and half the column, each as ``[sin(p·ω), cos(p·ω)]`` with
    ``ω_k = 10000^(-k / (dim/4))``.
    """
    if dim % 4:
        raise ConfigError(f"the 2-D sine-cosine position table needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # [dim/4]
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # [grid, grid] each

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega[None]  # [N, dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [N, dim/2]

    # MAE's order: the first half from the grid's second axis (columns), the second half from rows.
    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # [N, dim]


@dataclass
class SGMIMConfig(VGHuBERTConfig):
    """Configuration of :class:`SGMIM`: a :class:`VGHuBERTConfig` (VG-HuBERT (M) defaults) plus the MIM branch.

    Inherited fields keep their meaning (see :class:`VGHuBERTConfig`); the defaults here are the SG-MIM paper's:
    MAE ViT-B/16 with mean pooling, linear projections to 768 (§2.2, §3.2), HuBERT-base with the last 3 layers
    re-initialised (§3.2), and ``margin = 0`` (Eq. 2 has none).

    Attributes:
        mask_ratio: fraction of patches masked per image (§3.2: 75 %, as MAE).
        mim_weight: λ of Eq. 5 once the reconstruction loss is on (§3.2: 2.0).
        mim_start_epoch: first 0-based epoch with λ > 0 (§3.2: "after 3 epochs", i.e. epoch index 3).
        momentum: teacher momentum at the start of training; it rises to 1 on a cosine schedule (§3.2: 0.999).
        summary_layer: 0-based speech layer whose CLS attention weights summarise the speech; ``None`` takes the
            last layer (§2.2: "from the last layer of the audio encoder").
        decoder_dim / decoder_heads / decoder_ffn: width, attention heads and feed-forward width of the one-layer
            cross-modal decoder (not in the paper; MAE's decoder: 512, 16, 2048).
        decoder_dropout: dropout inside the decoder (not in the paper; 0 as MAE).
        mim_reduction: see :data:`MIM_REDUCTIONS`.
        mask_seed: mixed into every mask's seed (with the step and the caption id).
    """

    image: PretrainedImageConfig = field(default_factory=mae_image_tower)
    embed_dim: int = 768
    projection: str = "linear"
    margin: float = 0.0
    mask_ratio: float = 0.75
    mim_weight: float = 2.0
    mim_start_epoch: int = 3
    momentum: float = 0.999
    summary_layer: int | None = None
    decoder_dim: int = 512
    decoder_heads: int = 16
    decoder_ffn: int = 2048
    decoder_dropout: float = 0.0
    mim_reduction: str = "mean"
    mask_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"SGMIMConfig.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not (math.isfinite(self.mim_weight) and self.mim_weight >= 0):
            raise ConfigError(f"SGMIMConfig.mim_weight must be a finite number >= 0, got {self.mim_weight}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"SGMIMConfig.momentum must be in [0, 1], got {self.momentum}")
        for name in ("mim_start_epoch", "mask_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"SGMIMConfig.{name} must be an integer >= 0, got {value!r}")
        for name in ("decoder_dim", "decoder_heads", "decoder_ffn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"SGMIMConfig.{name} must be a positive integer, got {value!r}")
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(f"SGMIMConfig.decoder_dim ({self.decoder_dim}) must be divisible by decoder_heads "
                              f"({self.decoder_heads})")
        if self.decoder_dim % 4:
            raise ConfigError(f"SGMIMConfig.decoder_dim must be divisible by 4 (2-D sine-cosine positions), got "
                              f"{self.decoder_dim}")
        if not 0.0 <= self.decoder_dropout < 1.0:
            raise ConfigError(f"SGMIMConfig.decoder_dropout must be in [0, 1), got {self.decoder_dropout}")
        if self.mim_reduction not in MIM_REDUCTIONS:
            raise ConfigError(f"SGMIMConfig.mim_reduction must be one of {MIM_REDUCTIONS}, got {self.mim_reduction!r}")
        if self.summary_layer is not None and (isinstance(self.summary_layer, bool)
                                               or not isinstance(self.summary_layer, int) or self.summary_layer < 0):
            raise ConfigError(f"SGMIMConfig.summary_layer must be None or an integer >= 0, got {self.summary_layer!r}")


class CrossModalDecoder(nn.Module):
    """The one-layer cross-modal decoder ``D_M`` (§2.2, §3.2): visible features + mask tokens → teacher features.

    One decoder layer of three pre-norm residual sub-layers, in the order the paper lists them: cross-attention
    from every patch position to the speech summary (keys and values), self-attention over the patch positions,
    feed-forward; then a layernorm and a linear head to the teacher's width.

    Args:
        image_width: width of the image encoder's tokens (input and target width).
        speech_width: width of the speech summary vectors.
        num_patches: patches per image (a square grid).
        dim / heads / ffn / dropout: the decoder's sizes.
        std: std of the ``N(0, std)`` init of the new Linear layers and the mask token.
    """

    def __init__(self, image_width: int, speech_width: int, num_patches: int, dim: int, heads: int, ffn: int,
                 dropout: float = 0.0, std: float = 0.02):
        super().__init__()
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ConfigError(f"the cross-modal decoder needs a square patch grid, got {num_patches} patches")
        self.num_patches = num_patches
        self.embed = nn.Linear(image_width, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed positions (MAE's decoder); not persistent: rebuilt from the sizes, never a checkpoint entry.
        self.register_buffer("positions", sincos_2d(dim, grid)[None], persistent=False)  # [1, N, dim]
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_speech = nn.LayerNorm(speech_width)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, kdim=speech_width, vdim=speech_width,
                                                batch_first=True)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.dropout = nn.Dropout(dropout)
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, image_width)
        for m in (self.embed, self.ffn[0], self.ffn[3], self.head):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, mean=0.0, std=std)

    def forward(self, visible: Tensor, visible_idx: Tensor, summary: Tensor) -> Tensor:
        """Predict every patch position's feature.

        Args:
            visible: ``[B, V, D_img]`` image-encoder features of the visible patches.
            visible_idx: ``[B, V]`` their patch indices (raster order, ``0 .. N-1``).
            summary: ``[B, S, D_speech]`` speech summary (one vector per speech attention head).

        Returns:
            ``[B, N, D_img]`` predictions (only the masked positions enter the loss).
        """
        b, v, _ = visible.shape
        x = self.embed(visible)  # [B, V, dim]
        tokens = self.mask_token.to(x.dtype).expand(b, self.num_patches, -1)  # [B, N, dim]
        # Out-of-place scatter: the visible rows take the encoder's features, the others stay mask tokens.
        x = tokens.scatter(1, visible_idx[..., None].expand(-1, -1, x.shape[-1]), x)  # [B, N, dim]
        x = x + self.positions.to(x.dtype)  # [B, N, dim]
        kv = self.norm_speech(summary)  # [B, S, D_speech]
        q = self.norm_cross(x)
        x = x + self.dropout(self.cross_attn(q, kv, kv, need_weights=False)[0])  # [B, N, dim]
        h = self.norm_self(x)
        x = x + self.dropout(self.self_attn(h, h, h, need_weights=False)[0])  # [B, N, dim]
        x = x + self.dropout(self.ffn(self.norm_ffn(x)))  # [B, N, dim]
        return self.head(self.norm_out(x))  # [B, N, D_img]


@contextlib.contextmanager
def _mae_mask_ratio(model: nn.Module, ratio: float) -> Iterator[None]:
    """Let transformers' ViT-MAE keep ``int(N * (1 - ratio))`` patches for the duration of one call.

    MAE's embedding layer reads the ratio from its config at call time and keeps the patches with the lowest
    ``noise``; setting it around the call (and restoring it, since the full-image path runs with ratio 0) reuses the
    library's own masked forward instead of re-implementing it against one version's internals.
    """
    config = model.embeddings.config
    before = config.mask_ratio
    config.mask_ratio = ratio
    try:
        yield
    finally:
        config.mask_ratio = before


class SGMIM(VGHuBERT):
    """SG-MIM: VG-HuBERT (M) trained with an extra speech-guided masked-image-modelling loss.

    Attributes (besides :class:`VGHuBERT`'s):
        teacher: the momentum image encoder (a copy of ``image_tower``; parameters with ``requires_grad=False``,
            so outside the optimizer and DDP's gradient sync, but saved in the state dict so a resumed run is exact).
        decoder: the :class:`CrossModalDecoder`.
        num_patches / num_visible: patches per image and how many stay visible in the masked branch.
    """

    config_class = SGMIMConfig

    def __init__(self, config: SGMIMConfig | None = None):
        config = config or SGMIMConfig()
        super().__init__(config)
        self.config: SGMIMConfig = config
        if self.image_tower.family != "vit_mae":
            raise ConfigError(f"SGMIMConfig.image: SG-MIM encodes only the visible patches, which needs an MAE ViT "
                              f"(model_type 'vit_mae'); {config.image.name_or_path!r} is a {self.image_tower.family!r}")
        if config.summary_layer is not None:
            self._check_layer(config.summary_layer)
        self.num_patches = int(self.image_tower.model.embeddings.patch_embeddings.num_patches)
        # The same rounding as transformers' MAE masking (int(N * (1 - ratio))), so both agree on the count.
        self.num_visible = int(self.num_patches * (1 - config.mask_ratio))
        if self.num_visible < 1 or self.num_visible >= self.num_patches:
            raise ConfigError(f"SGMIMConfig.mask_ratio {config.mask_ratio} leaves {self.num_visible} of "
                              f"{self.num_patches} patches visible; at least one must be visible and one masked")
        self.teacher = copy.deepcopy(self.image_tower)
        # A frozen config keeps the teacher in eval mode (PretrainedImageEncoder.train) and out of the optimizer.
        self.teacher.config = dataclasses.replace(self.teacher.config, freeze=True)
        self.teacher.requires_grad_(False).eval()
        self.decoder = CrossModalDecoder(
            image_width=self.image_tower.token_width, speech_width=self.speech_tower.width,
            num_patches=self.num_patches, dim=config.decoder_dim, heads=config.decoder_heads,
            ffn=config.decoder_ffn, dropout=config.decoder_dropout, std=config.initializer_range)

    # ------------------------------------------------------------------------------------------ schedules

    def mim_weight_at(self, epoch: int) -> float:
        """λ at 0-based ``epoch``: 0 before ``mim_start_epoch``, ``mim_weight`` from it on."""
        return self.config.mim_weight if epoch >= self.config.mim_start_epoch else 0.0

    def momentum_at(self, fraction: float) -> float:
        """Teacher momentum after ``fraction`` of training (cosine from ``config.momentum`` to 1)."""
        return momentum_at(self.config.momentum, fraction)

    @property
    def summary_layer(self) -> int:
        """0-based speech layer whose CLS attention summarises the speech (the last one by default)."""
        return self.num_layers - 1 if self.config.summary_layer is None else self.config.summary_layer

    # ------------------------------------------------------------------------------------------- masking

    def draw_visible(self, caption_ids: Tensor, step: int) -> Tensor:
        """Visible patch indices ``[B, V]`` (ascending), one random draw per caption.

        Each row's generator is seeded from ``(mask_seed, step, caption id)`` only, so the mask of a caption does
        not depend on which process holds it or on where a run was resumed.
        """
        ids = caption_ids.detach().cpu().tolist()
        if any(i < 0 for i in ids):
            raise ConfigError(f"SG-MIM seeds its masks from the caption ids, which must be >= 0; got {ids}")
        rows = []
        for cid in ids:
            seed = np.random.SeedSequence([self.config.mask_seed, int(step), int(cid)]).generate_state(1, np.uint64)
            g = torch.Generator().manual_seed(int(seed[0]) & ((1 << 63) - 1))
            rows.append(torch.randperm(self.num_patches, generator=g)[: self.num_visible].sort().values)
        return torch.stack(rows)  # [B, V]

    def encode_visible(self, pixels: Tensor, visible_idx: Tensor) -> Tensor:
        """Image-encoder features ``[B, V, D_img]`` of the visible patches only (the rest never enter the encoder).

        Args:
            pixels: ``[B, 3, S, S]`` normalised images.
            visible_idx: ``[B, V]`` patch indices to keep, in the order the output should have.
        """
        b, v = visible_idx.shape
        if v != self.num_visible:
            raise ConfigError(f"encode_visible: expected {self.num_visible} visible patches per row, got {v}")
        # MAE keeps the patches with the lowest noise, in increasing noise order: the visible ones get
        # 0, 1/V, 2/V, ... and every masked one gets 2 (above all of them).
        noise = torch.full((b, self.num_patches), 2.0, dtype=pixels.dtype, device=pixels.device)
        rank = torch.arange(v, dtype=pixels.dtype, device=pixels.device).expand(b, v) / v
        noise = noise.scatter(1, visible_idx.to(pixels.device), rank)  # [B, N]
        with _mae_mask_ratio(self.image_tower.model, self.config.mask_ratio):
            seq = self.image_tower.model(pixel_values=pixels, noise=noise).last_hidden_state  # [B, 1+V, D_img]
        if seq.shape[1] != v + 1:
            raise RuntimeError(f"the MAE image tower kept {seq.shape[1] - 1} patches, expected {v}")
        return seq[:, 1:]  # [B, V, D_img], final-layernorm features, CLS dropped

    # ------------------------------------------------------------------------------------------ training

    def speech_summary(self, out: PretrainedSpeechOutput, lengths: Tensor) -> Tensor:
        """``W · Z_A`` (Eq. 3): per speech head, the CLS attention-weighted sum of the summary layer's frames.

        Args:
            out: the speech tower's output on the batch.
            lengths: ``[B]`` valid samples.

        Returns:
            ``[B, H, D]`` one vector per attention head (padding frames carry weight 0).
        """
        attn = self.cls_attention_from_output(out, lengths, self.summary_layer)
        # weights: [B, H, T] (float32), features: [B, T, D] -> [B, H, D]
        return torch.einsum("bht,btd->bhd", attn.weights.to(attn.features.dtype), attn.features)

    def mim_loss(self, prediction: Tensor, target: Tensor, visible_idx: Tensor) -> Tensor:
        """Reconstruction error over the masked patches only (Eq. 4).

        Args:
            prediction: ``[B, N, D]`` decoder outputs at every position.
            target: ``[B, N, D]`` teacher features at every position.
            visible_idx: ``[B, V]`` visible positions (excluded from the loss).
        """
        masked = torch.ones(prediction.shape[:2], dtype=torch.bool, device=prediction.device)  # [B, N]
        masked[torch.arange(masked.shape[0], device=masked.device)[:, None], visible_idx.to(masked.device)] = False
        err = (prediction.float() - target.float()).pow(2)[masked]  # [B*(N-V), D]
        if self.config.mim_reduction == "sum":
            return err.sum(dim=-1).mean()
        return err.mean()

    def _contrastive(self, speech: Tensor, image: Tensor, image_ids: Tensor) -> Tensor:
        """Eq. 2 on the global batch: embeddings of every process gathered (with gradients to this process's)."""
        from vgskit.train.distributed import all_gather_no_grad, all_gather_with_grad

        ids = image_ids.to(speech.device)
        speech, image, ids = all_gather_with_grad(speech), all_gather_with_grad(image), all_gather_no_grad(ids)
        # float32 scores even under autocast: bf16 would round raw (unnormalised) dot products by whole units.
        with torch.autocast(speech.device.type, enabled=False):
            scores = speech.float() @ image.float().T  # [B_global, B_global], rows captions, columns their images
            return margin_infonce_loss(scores, ids, self.config.margin)

    def step(self, batch: Batch, state: TrainState) -> StepOutput:
        if batch.speech.kind != "waveform" or batch.image.kind != "pixels" or batch.image.pixels is None:
            raise ConfigError(f"SG-MIM trains both towers from waveforms and pixels, got {batch.speech.kind} speech "
                              f"and {batch.image.kind} images (no feature cache can stand in for them)")
        wavs, lengths = batch.speech.values, batch.speech.lengths.to(device=batch.speech.values.device,
                                                                        dtype=torch.long)
        pixels = batch.image.pixels  # [B, 3, S, S], row-aligned with the captions

        # Contrastive branch: the full image, each distinct image encoded once; one speech pass serves both branches.
        out = self.speech_tower(wavs, lengths)
        assert out.cls is not None  # the config requires one CLS token
        speech = self.audio_proj(out.cls[:, 0])  # [B, E]
        first, target = unique_images(batch.image_ids)  # [M], [B]
        first, target = first.to(pixels.device), target.to(pixels.device)
        image = self.image_proj(self.image_tower(pixels[first]).pooled)[target]  # [M, D_img] -> [B, E]
        losses = {"nce": self._contrastive(speech, image, batch.image_ids)}

        weight = self.mim_weight_at(state.epoch)
        if weight > 0:
            # Masked branch: the visible patches of every caption's image, guided by that caption's speech.
            visible_idx = self.draw_visible(batch.caption_ids, state.step).to(pixels.device)  # [B, V]
            visible = self.encode_visible(pixels, visible_idx)  # [B, V, D_img]
            summary = self.speech_summary(out, lengths)  # [B, H, D_speech]
            prediction = self.decoder(visible, visible_idx, summary)  # [B, N, D_img]
            with torch.no_grad():
                teacher = self.teacher(pixels[first]).tokens[target]  # [M, N, D_img] -> [B, N, D_img]
            losses["mim"] = weight * self.mim_loss(prediction, teacher, visible_idx)

        # The momentum after_step() will apply once this step's update is made.
        fraction = min(max((state.step + 1) / max(state.total_steps, 1), 0.0), 1.0)
        return StepOutput(losses=losses, metrics={"mim_weight": weight, "momentum": self.momentum_at(fraction)})

    def train(self, mode: bool = True) -> SGMIM:
        """Switch modes; the teacher always stays in eval mode (deterministic targets)."""
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def after_step(self, state: TrainState) -> None:
        """EMA update of the teacher after every optimizer update: ``θ̄ ← α θ̄ + (1 - α) θ``, ``α`` at
        ``state.fraction`` (the update just made included)."""
        m = self.momentum_at(state.fraction)
        for t, s in zip(self.teacher.parameters(), self.image_tower.parameters(), strict=True):
            if s.requires_grad:
                t.mul_(m).add_(s.detach(), alpha=1.0 - m)
            else:
                # Fixed student tensors (MAE's sine-cosine positions) are copied: averaging equal values could
                # still drift them by rounding.
                t.copy_(s)
        for t, s in zip(self.teacher.buffers(), self.image_tower.buffers(), strict=True):
            t.copy_(s)

    def ddp_options(self) -> dict[str, Any]:
        # Before mim_start_epoch the decoder (and its mask token) takes no part in the loss; DDP must not wait for
        # their gradients. See the module docstring for why the branch is skipped rather than weighted by 0.
        return {"find_unused_parameters": True}


register_model("sg_mim")(SGMIM)
register_model(
    "sg_mim_tiny",
    config=SGMIMConfig(
        speech=dataclasses.replace(default_speech_tower(), num_layers=2, reinit_last=1),
        image=PretrainedImageConfig(name_or_path="mae-vit-b16", pool="mean", project=False, freeze=False),
        embed_dim=16,
        segment_layer=1,
        decoder_dim=16,
        decoder_heads=2,
        decoder_ffn=32,
    ),
)(SGMIM)
register_model(
    "sg_mim_scenes",
    config=SGMIMConfig(
        # vg_hubert_scenes's speech tower and an MAE ViT of its image tower's sizes, random weights (see the
        # sg_mim_scenes recipe); the paper's linear projections and margin-free InfoNCE.
        speech=scenes_speech_tower(),
        # Max over the patch tokens instead of the paper's mean: as vg_hubert_scenes (from scratch, the mean of a
        # random ViT's tokens barely differs between images and contrastive training collapses).
        image=PretrainedImageConfig(name_or_path="", pool="max", project=False, freeze=False,
                                    architecture=dict(SCENES_MAE)),
        embed_dim=256,
        segment_layer=2,  # as vg_hubert_scenes: the third of 4 layers
        decoder_dim=128,  # our choice: the towers' width (the paper gives none; MAE's 512 is for ViT-B's 768)
        decoder_heads=4,
        decoder_ffn=512,
    ),
)(SGMIM)
