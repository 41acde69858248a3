"""FaST-VGS region encoder: Faster R-CNN region features and boxes → the visual tower's input tokens.

FaST-VGS (Peng & Harwath, ICASSP 2022) feeds 36 detector regions per image (2048-d features plus boxes
normalised by the image size) into 6 BERT layers. Following LXMERT, each region token is the average of two
separately LayerNormed projections, ``(LN(W_f f) + LN(W_b b)) / 2``: normalising each branch before the
sum keeps the 4-d box signal from being drowned by the 2048-d appearance feature. The LayerNorm epsilon is
BERT's ``1e-12``, not PyTorch's ``1e-5``; that matters for bit-level parity with released checkpoints.

Reference state-dict keys (``visn_fc``, ``visn_layer_norm``, ``box_fc``, ``box_layer_norm``) load through
:func:`load_region_encoder_reference_state_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from vgskit.models.fast_vgs.audio import load_renamed_state_dict

__all__ = [
    "RegionEncoder",
    "RegionEncoderConfig",
    "load_region_encoder_reference_state_dict",
    "region_encoder_key_from_reference",
]


@dataclass(frozen=True)
class RegionEncoderConfig:
    """Sizes of the region encoder; the defaults are FaST-VGS's (Faster R-CNN 2048-d, BERT-base width)."""

    feat_dim: int = 2048
    box_dim: int = 4
    hidden_size: int = 768
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12


class RegionEncoder(nn.Module):
    """``(feats [B, N, feat_dim], boxes [B, N, box_dim] | None)`` → region tokens ``[B, N, hidden_size]``.

    With ``boxes=None`` only the feature branch is used (no averaging), as the reference does, so a model
    trained without boxes keeps its scale.
    """

    def __init__(self, config: RegionEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or RegionEncoderConfig()
        self.feat_proj = nn.Linear(cfg.feat_dim, cfg.hidden_size)
        self.feat_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.box_proj = nn.Linear(cfg.box_dim, cfg.hidden_size)
        self.box_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, feats: Tensor, boxes: Tensor | None = None) -> Tensor:
        # feats: [B, N, feat_dim]; boxes: [B, N, box_dim] or None
        x = self.feat_norm(self.feat_proj(feats))  # [B, N, H]
        if boxes is not None:
            y = self.box_norm(self.box_proj(boxes))  # [B, N, H]
            x = (x + y) / 2  # [B, N, H]
        return self.dropout(x)  # [B, N, H]


_RENAMES = {
    "visn_fc": "feat_proj",
    "visn_layer_norm": "feat_norm",
    "box_fc": "box_proj",
    "box_layer_norm": "box_norm",
}


def region_encoder_key_from_reference(key: str) -> str | None:
    """Our name for a reference ``VisualFeatEncoder`` key (``visn_fc.weight`` → ``feat_proj.weight``), else ``None``."""
    module, _, leaf = key.partition(".")
    if module not in _RENAMES or leaf not in ("weight", "bias"):
        return None
    return f"{_RENAMES[module]}.{leaf}"


def load_region_encoder_reference_state_dict(module: RegionEncoder, params: Mapping[str, Tensor]) -> None:
    """Load a reference ``VisualFeatEncoder`` state dict into ``module``, refusing any key set that does not fit.

    Raises:
        ConfigError: naming the missing (ours) and unexpected (reference) keys.
    """
    load_renamed_state_dict(module, params, region_encoder_key_from_reference, "RegionEncoder")
