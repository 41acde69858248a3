"""Contrastive losses for speech–image retrieval.

Masked symmetric InfoNCE
------------------------
A batch holds ``N`` spoken captions with embeddings ``s_1..s_N`` and the image id ``g_i`` of each caption.
Several captions may describe the same image, so images are **de-duplicated**: ``v_1..v_M`` are the
embeddings of the ``M`` distinct ids ``u_1..u_M`` (first occurrence of each id in the batch), and
``j(i)`` is the index of caption ``i``'s image. With L2-normalised embeddings and scale ``τ⁻¹``,
``ℓ[i, j] = τ⁻¹ · <s_i, v_j>`` is an ``[N, M]`` logit matrix, and

* speech→image, one term per caption over the unique images (each image appears once, so the gold image
  is the only positive in the row)::

      L_s2i(i) = -ℓ[i, j(i)] + log Σ_{j=1..M} exp ℓ[i, j]

* image→speech, one term per caption (i.e. per positive pair), over the gold image's column with the
  *other captions of the same image removed* from the denominator (they are not negatives)::

      L_i2s(i) = -ℓ[i, j(i)] + log( exp ℓ[i, j(i)] + Σ_{k : g_k ≠ g_i} exp ℓ[k, j(i)] )

* ``loss = ½ (mean_i L_s2i(i) + mean_i L_i2s(i))``.

This is the SpeechCLIP convention (same-image captions leave the denominator) written over unique images,
which avoids an image competing against copies of itself when a batch has two captions per image.

Per-caption image rows (SpeechCLIP's exact loss)
------------------------------------------------
SpeechCLIP's ``MaskedContrastiveLoss`` does not de-duplicate: it scores every caption against the image
row of every caption, ``ℓ[i, k] = τ⁻¹ · <s_i, v_k>`` ``[N, N]``, and drops the off-diagonal entries with
``g_i = g_k`` from both the row (speech→image) and the column (image→speech) denominators; the diagonal
is the positive. An image with several captions in the batch therefore appears several times in the other
rows' denominators. ``InfoNCELoss(dedup_images=False, max_logit_scale=None)`` computes exactly that
(:func:`pairwise_masked_infonce_terms`); with every caption of its own image both forms coincide.

Distributed training
--------------------
With ``gather=True`` and a process group of ``W > 1`` ranks, embeddings and ids are all-gathered (with
gradient) so every rank computes the *same* loss over the global batch. The gather's backward sums the
gradients of all ranks' (identical) losses and returns each rank its slice, so rank ``r``'s parameter
gradient is ``W · ∂L/∂θ|_{rank r's samples}``; DDP's average over ranks then gives exactly
``Σ_r ∂L/∂θ|_r = ∂L/∂θ``, the single-process gradient on the global batch. All ranks must hold the same
number of captions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def unique_images(image_ids: Tensor) -> tuple[Tensor, Tensor]:
    """De-duplicate caption-level image ids.

    Args:
        image_ids: ``[N]`` image id of each caption.

    Returns:
        ``first`` ``[M]``: index of the first caption of each distinct image (ids in ascending order), and
        ``target`` ``[N]``: index into ``first`` of each caption's image.
    """
    _, target = torch.unique(image_ids, sorted=True, return_inverse=True)  # [N]
    m = int(target.max().item()) + 1 if target.numel() else 0
    n = image_ids.shape[0]
    positions = torch.arange(n, device=image_ids.device)
    first = torch.full((m,), n, dtype=torch.long, device=image_ids.device)
    first = first.scatter_reduce(0, target, positions, reduce="amin")
    return first, target


def masked_infonce_terms(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-caption loss terms of both directions (see the module docstring).

    Args:
        logits: ``[N, M]`` scaled similarities, captions × unique images.
        target: ``[N]`` index of each caption's image (a column of ``logits``).

    Returns:
        ``(s2i, i2s)``, each ``[N]``.
    """
    n, m = logits.shape
    rows = torch.arange(n, device=logits.device)
    positive = logits[rows, target]  # [N]
    s2i = torch.logsumexp(logits, dim=1) - positive
    # same[k, j]: caption k belongs to image j. Those entries leave every image→speech denominator of column
    # j (the term's own positive is added back explicitly below). A finite fill instead of -inf keeps the
    # logsumexp of a column with no negatives finite, and masked_fill's backward gives them zero gradient.
    same = F.one_hot(target, m).bool()  # [N, M]
    negatives = logits.masked_fill(same, torch.finfo(logits.dtype).min)
    negative_lse = torch.logsumexp(negatives, dim=0)  # [M]
    i2s = torch.logaddexp(positive, negative_lse[target]) - positive
    return s2i, i2s


def pairwise_masked_infonce_terms(logits: Tensor, image_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-caption terms of SpeechCLIP's loss over per-caption image rows (see the module docstring).

    Args:
        logits: ``[N, N]`` scaled similarities, captions × the image row of each caption.
        image_ids: ``[N]`` image id of each caption.

    Returns:
        ``(s2i, i2s)``, each ``[N]``: row ``i`` (speech→image) and column ``i`` (image→speech) terms.
    """
    n = logits.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    # Same image but not the pair itself: neither positive nor negative, so it leaves both denominators.
    # A finite fill keeps logsumexp finite and gives those entries zero gradient.
    drop = (image_ids[:, None] == image_ids[None, :]) & ~eye  # [N, N]
    masked = logits.masked_fill(drop, torch.finfo(logits.dtype).min)
    positive = logits.diagonal()  # [N]
    s2i = torch.logsumexp(masked, dim=1) - positive
    i2s = torch.logsumexp(masked, dim=0) - positive
    return s2i, i2s


class InfoNCELoss(nn.Module):
    """Symmetric masked InfoNCE over L2-normalised embeddings with a learnable or fixed temperature.

    Args:
        init_temperature: initial ``τ`` (logit scale ``1/τ``; default 0.07 as in CLIP).
        learnable_temperature: learn ``log(1/τ)``; otherwise it is a fixed buffer.
        max_logit_scale: upper bound on ``1/τ`` (clamped in the forward pass, as in CLIP, so the
            temperature cannot collapse and blow up the logits); ``None``: no clamp (SpeechCLIP).
        gather: all-gather across ranks when a process group with more than one rank is active.
        dedup_images: score captions against unique images (default); ``False``: against the image row
            of every caption, SpeechCLIP's exact ``MaskedContrastiveLoss``.
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        learnable_temperature: bool = True,
        max_logit_scale: float | None = 100.0,
        gather: bool = True,
        dedup_images: bool = True,
    ):
        super().__init__()
        init = torch.tensor(math.log(1.0 / init_temperature), dtype=torch.float32)
        if learnable_temperature:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)
        self.max_logit_scale = max_logit_scale
        self.gather = gather
        self.dedup_images = dedup_images

    def scale(self) -> Tensor:
        """Current logit scale ``1/τ`` (clamped unless ``max_logit_scale`` is ``None``)."""
        scale = self.logit_scale.exp()
        return scale if self.max_logit_scale is None else scale.clamp(max=self.max_logit_scale)

    def _gather(self, speech: Tensor, image: Tensor, image_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not (self.gather and torch.distributed.is_available() and torch.distributed.is_initialized()):
            return speech, image, image_ids
        from vgskit.train.distributed import all_gather_no_grad, all_gather_with_grad, get_world_size

        if get_world_size() <= 1:
            return speech, image, image_ids
        return all_gather_with_grad(speech), all_gather_with_grad(image), all_gather_no_grad(image_ids)

    def forward(self, speech: Tensor, image: Tensor, image_ids: Tensor | None = None) -> Tensor:
        """Loss for a batch of captions.

        Args:
            speech: ``[N, D]`` caption embeddings (L2-normalised).
            image: ``[N, D]`` image embedding of each caption's image, row-aligned with ``speech``
                (rows of captions of the same image are equal; only the first occurrence is used, unless
                ``dedup_images=False``, where every row is used as given).
            image_ids: ``[N]`` image id (or any group id) per caption; ``None`` means every caption has its
                own image (plain CLIP loss).

        Returns:
            Scalar loss.
        """
        if image_ids is None:
            image_ids = torch.arange(speech.shape[0], device=speech.device)
        speech, image, image_ids = self._gather(speech, image, image_ids)  # [N_global, ...]
        # float32 logits even under autocast: with a scale up to 100, bf16 would round logits by ~0.5.
        if not self.dedup_images:
            with torch.autocast(speech.device.type, enabled=False):
                logits = self.scale() * speech.float() @ image.float().T  # [N, N]
                s2i, i2s = pairwise_masked_infonce_terms(logits, image_ids)
                return 0.5 * (s2i.mean() + i2s.mean())
        first, target = unique_images(image_ids)  # [M], [N]
        with torch.autocast(speech.device.type, enabled=False):
            logits = self.scale() * speech.float() @ image[first].float().T  # [N, M]
            s2i, i2s = masked_infonce_terms(logits, target)
            return 0.5 * (s2i.mean() + i2s.mean())


def margin_infonce_loss(
    scores: Tensor, image_ids: Tensor | None = None, margin: float = 1.0, mask_value: float = -10000.0
) -> Tensor:
    """Margin InfoNCE on a square score matrix whose diagonal holds the matched pairs (FaST-VGS, VG-HuBERT).

    Differences from :class:`InfoNCELoss`, all deliberate in the reference implementations:

    * the scores are raw dot products (no L2 normalisation, no temperature): the model learns the scale;
    * a margin is **subtracted** from every matched (diagonal) score, so a positive must beat the negatives by
      at least the margin before the loss stops pushing;
    * off-diagonal pairs of the same image (other captions of it) are pushed out of the softmax by adding the
      reference's finite ``-10000`` rather than ``-inf`` (adding ``-inf`` through a float mask would turn the
      unmasked ``0 · -inf`` entries into NaN); for realistic score ranges their ``exp`` underflows to exactly 0,
      i.e. they are removed and receive zero gradient;
    * the two directions are **summed** (each a batch mean), not averaged: halving would halve the effective
      learning rate relative to the published hyperparameters.

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
        same = (ids[:, None] == ids[None, :]) & ~torch.eye(n, dtype=torch.bool, device=scores.device)  # [B, B]
        s = s + same.to(scores.dtype) * mask_value  # [B, B]
    target = torch.arange(n, device=scores.device)  # [B]
    return F.cross_entropy(s, target) + F.cross_entropy(s.t(), target)
