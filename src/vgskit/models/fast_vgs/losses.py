"""FaST-VGS margin InfoNCE: the in-batch contrastive loss of FaST-VGS and VG-HuBERT.

Differences from the temperature-scaled InfoNCE in :mod:`vgskit.losses`, all deliberate in the reference:

* the scores are raw dot products (no L2 normalisation, no temperature): the model learns the scale;
* a margin is **subtracted** from every matched (diagonal) score, so a positive must beat the negatives by
  at least the margin before the loss stops pushing (paper eq. 1);
* off-diagonal pairs of the same image (other captions of it) are pushed out of the softmax by adding the
  reference's finite ``-10000`` rather than ``-inf`` (adding ``-inf`` through a float mask would turn the
  unmasked ``0 · -inf`` entries into NaN); for realistic score ranges their ``exp`` underflows to exactly 0,
  i.e. they are removed and receive zero gradient;
* the two directions are **summed** (each a batch mean), not averaged: halving would halve the effective
  learning rate relative to the published hyperparameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MarginInfoNCELoss", "MarginInfoNCEConfig", "margin_infonce_loss"]


def margin_infonce_loss(
    scores: Tensor, image_ids: Tensor | None = None, margin: float = 1.0, mask_value: float = -10000.0
) -> Tensor:
    """Margin InfoNCE on a square score matrix whose diagonal holds the matched pairs.

    Args:
        scores: ``[B, B]`` raw scores; row ``i`` / column ``i`` belong to the same pair. Which side is rows
            (images or captions) does not matter: the loss is symmetric in that choice.
        image_ids: ``[B]`` integer image id per pair, or ``None`` when every pair has its own image.
        margin: subtracted from the diagonal before both softmaxes.
        mask_value: added to off-diagonal entries that share an image id.

    Returns:
        The scalar ``CE(S', arange) + CE(S'^T, arange)`` with ``S' = S - margin·I`` (masked).
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"margin_infonce_loss needs a square [B, B] score matrix, got {tuple(scores.shape)}")
    n = scores.shape[0]
    eye = torch.eye(n, dtype=scores.dtype, device=scores.device)  # [B, B]
    s = scores - margin * eye  # [B, B]
    if image_ids is not None:
        ids = image_ids.to(scores.device)  # [B]
        same = (ids[:, None] == ids[None, :]) & ~torch.eye(
            n, dtype=torch.bool, device=scores.device
        )  # [B, B]
        s = s + same.to(scores.dtype) * mask_value  # [B, B]
    target = torch.arange(n, device=scores.device)  # [B]
    return F.cross_entropy(s, target) + F.cross_entropy(s.t(), target)


@dataclass(frozen=True)
class MarginInfoNCEConfig:
    """The loss's constants; the defaults are FaST-VGS's (margin 1.0, mask -10000)."""

    margin: float = 1.0
    mask_value: float = -10000.0


class MarginInfoNCELoss(nn.Module):
    """Module form of :func:`margin_infonce_loss`, so a model can hold its loss configuration."""

    def __init__(self, config: MarginInfoNCEConfig | None = None) -> None:
        super().__init__()
        self.config = config or MarginInfoNCEConfig()

    def forward(self, scores: Tensor, image_ids: Tensor | None = None) -> Tensor:
        # scores: [B, B]; image_ids: [B] or None -> scalar []
        return margin_infonce_loss(scores, image_ids, self.config.margin, self.config.mask_value)
