"""Pretrained image towers via transformers behind the image-encoder contract.

``PretrainedImageEncoder(pixels[B,3,H,W]) -> ImageEncoderOutput`` with patch tokens ``[B, N, D]`` (the CLS
token removed) and one pooled vector ``[B, D']`` per image. Supported checkpoints:

* CLIP vision (``clip_vision_model`` or a full ``clip`` checkpoint): pooled = CLIP's image embedding
  (post-layernorm CLS through the visual projection, the space CLIP's text tower shares) when
  ``project=True``, else the post-layernorm CLS;
* ViT (``vit``; DINO ViT-S/8 is one): pooled = final-layernorm CLS (what VG-HuBERT uses) or token mean;
* MAE (``vit_mae``): run without masking and with patches in their natural order (MAE's random shuffle
  is disabled by passing an increasing noise); pooled = mean of tokens by default (SG-MIM's "mean image
  feature").

The preprocessing the tower was trained with comes from its ``preprocessor_config.json`` as an
:class:`~vgskit.images.ImageTransform`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vgskit.encoders.hub import (
    load_hf_config,
    load_hf_model,
    random_hf_config,
    read_preprocessor_config,
    resolve_tower,
)
from vgskit.errors import ConfigError
from vgskit.images import IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from vgskit.layers import ImageEncoderOutput

IMAGE_MODEL_TYPES = ("clip", "clip_vision_model", "vit", "vit_mae")
# PIL resample codes stored by transformers image processors → ImageTransform interpolation names.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def _side(value: Any) -> int | None:
    # Processor sizes are an int or a dict with "height"/"width" or "shortest_edge".
    if value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in ("shortest_edge", "height", "width"):
            if key in value:
                return int(value[key])
    return None


def image_transform_from_preprocessor(data: dict[str, Any] | None, default_size: int) -> ImageTransform:
    """Build the :class:`ImageTransform` a transformers image processor config describes.

    A processor that resizes the shorter side then centre-crops (CLIP) maps to ``shorter_side_center_crop``
    at the crop size; one that resizes straight to a square (ViT) maps to ``squash``. Without a file, ImageNet
    statistics at the model's own image size.
    """
    if not data:
        return ImageTransform(size=default_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    crop = _side(data.get("crop_size")) if data.get("do_center_crop", False) else None
    size = crop or _side(data.get("size")) or default_size
    return ImageTransform(
        size=size,
        mean=tuple(data.get("image_mean", IMAGENET_MEAN)),
        std=tuple(data.get("image_std", IMAGENET_STD)),
        resize_mode="shorter_side_center_crop" if crop else "squash",
        interpolation=_RESAMPLE.get(int(data.get("resample", 3)), "bicubic"),
    )


@dataclass
class PretrainedImageConfig:
    """Configuration of :class:`PretrainedImageEncoder`.

    Attributes:
        name_or_path: alias (``"clip-vit-b32"``, ``"dino-vits8"``, ``"mae-vit-b16"``...), hub id or local folder.
        pool: ``"cls"``, ``"mean"`` or ``"max"`` (over the patch tokens, per channel) or ``None`` for the family
            default (CLS, mean for MAE). ``"max"`` is for towers trained from scratch on small objects: a random
            ViT's CLS (and mean) is nearly the same for every image, and contrastive training then collapses both
            towers to constant embeddings (measured on spoken-scenes); the maximum keeps each object's patches.
        project: CLIP only: pooled vector in CLIP's joint space (through the visual projection).
        freeze: no gradients, eval mode kept.
        local_files_only: never use the network (``None``: follow the offline switches).
        architecture: instead of loading ``name_or_path``, build a tower with **random weights** from these
            transformers config fields (``model_type`` ``"vit"``, ``"vit_mae"``... plus sizes): towers trained from
            scratch, whose checkpoints rebuild anywhere without a tower folder; ImageNet statistics at the
            config's ``image_size``.
    """

    name_or_path: str = "clip-vit-b32"
    pool: Literal["cls", "mean", "max"] | None = None
    project: bool = True
    freeze: bool = True
    local_files_only: bool | None = None
    architecture: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.pool not in (None, "cls", "mean", "max"):
            raise ConfigError(f"PretrainedImageConfig.pool must be 'cls', 'mean', 'max' or None, got {self.pool!r}")


class PretrainedImageEncoder(nn.Module):
    """CLIP vision / ViT / DINO / MAE image encoder: ``pixels[B,3,H,W] -> ImageEncoderOutput``.

    Attributes:
        config: the :class:`PretrainedImageConfig`.
        transform: the :class:`ImageTransform` the tower expects.
        width: dimension of the pooled vector; ``token_width`` that of the tokens.
    """

    def __init__(self, config: PretrainedImageConfig):
        super().__init__()
        import transformers

        self.config = config
        source = None
        if config.architecture is not None:
            hf_config = random_hf_config(config.architecture, IMAGE_MODEL_TYPES, "PretrainedImageConfig.architecture")
        else:
            source = resolve_tower(config.name_or_path, local_files_only=config.local_files_only)
            hf_config = load_hf_config(source, IMAGE_MODEL_TYPES)

        def load(cls: Any, cfg: Any, **kwargs: Any) -> Any:
            # Random weights come from the class's own initialisation (transformers' _init_weights).
            return cls(cfg, **kwargs) if source is None else load_hf_model(source, cls, cfg, **kwargs)

        self.family = hf_config.model_type
        if self.family in ("clip", "clip_vision_model"):
            vision_config = hf_config.vision_config if self.family == "clip" else hf_config
            # A full CLIP checkpoint keeps projection_dim at the top level; the vision-only config must
            # carry it, or the projection would be built (and rejected) at the default 512.
            vision_config.projection_dim = hf_config.projection_dim
            cls = transformers.CLIPVisionModelWithProjection if config.project else transformers.CLIPVisionModel
            self.model = load(cls, vision_config)
            self.token_width = int(vision_config.hidden_size)
            self.width = int(hf_config.projection_dim) if config.project else self.token_width
            image_size = int(vision_config.image_size)
        elif self.family == "vit":
            # DINO checkpoints have no pooler: CLS after the final layernorm is their global feature.
            self.model = load(transformers.ViTModel, hf_config, add_pooling_layer=False)
            self.token_width = self.width = int(hf_config.hidden_size)
            image_size = int(hf_config.image_size)
        else:
            hf_config.mask_ratio = 0.0  # feature extraction sees every patch
            self.model = load(transformers.ViTMAEModel, hf_config)
            self.token_width = self.width = int(hf_config.hidden_size)
            image_size = int(hf_config.image_size)
        self.pool = config.pool or ("mean" if self.family == "vit_mae" else "cls")
        preprocessor = read_preprocessor_config(source) if source is not None else None
        self.transform = image_transform_from_preprocessor(preprocessor, image_size)
        if config.freeze:
            for p in self.parameters():
                p.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> PretrainedImageEncoder:
        """Switch modes; a frozen tower stays in eval mode."""
        return super().train(mode and not self.config.freeze)

    def forward(self, pixels: Tensor) -> ImageEncoderOutput:
        """Encode normalised ``pixels [B, 3, H, W]`` (see :attr:`transform`)."""
        if self.family == "vit_mae":
            n = self.model.embeddings.patch_embeddings.num_patches
            # Increasing noise keeps MAE's argsort-based shuffle the identity: tokens stay in raster order.
            noise = torch.arange(n, dtype=pixels.dtype, device=pixels.device).expand(pixels.shape[0], n)
            out = self.model(pixel_values=pixels, noise=noise)
        else:
            out = self.model(pixel_values=pixels)
        seq = out.last_hidden_state  # [B, 1+N, D]
        tokens = seq[:, 1:]  # [B, N, D]
        if self.family in ("clip", "clip_vision_model") and self.pool == "cls":
            pooled = out.image_embeds if self.config.project else out.pooler_output  # [B, D']
        elif self.pool == "cls":
            pooled = seq[:, 0]  # [B, D]
        elif self.pool == "max":
            pooled = tokens.amax(dim=1)  # [B, D]
            if self.family in ("clip", "clip_vision_model") and self.config.project:
                pooled = self.model.visual_projection(self.model.vision_model.post_layernorm(pooled))
        else:
            pooled = tokens.mean(dim=1)  # [B, D]
            if self.family in ("clip", "clip_vision_model") and self.config.project:
                pooled = self.model.visual_projection(self.model.vision_model.post_layernorm(pooled))
        return ImageEncoderOutput(tokens=tokens, pooled=pooled)
