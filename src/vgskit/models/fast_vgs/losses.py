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

from torch import Tensor, nn

# The function lives in vgskit.losses (VG-HuBERT shares it); re-exported here where FaST-VGS code imports it.
from vgskit.losses import margin_infonce_loss

__all__ = ["MarginInfoNCELoss", "MarginInfoNCEConfig", "margin_infonce_loss"]


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
