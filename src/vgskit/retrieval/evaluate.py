"""Retrieval evaluation with an optional second-stage (coarse-to-fine) scorer.

Without a re-ranker this is :func:`vgskit.metrics.recall_at_k`: dot products of the two embedding sets.

With a re-ranker (as in FaST-VGS), every query is answered in two stages:

1. **coarse**: the ``rerank_top`` gallery items with the highest dot product are the *candidates*
   (ties at the cut-off are broken by the lower gallery index, so the candidate set is deterministic);
2. **fine**: the re-ranker scores every (query, candidate) pair, in batches, and the candidates are
   re-ordered by that score.

The final gallery order is: the candidates by fine score, then every other gallery item by its coarse
score. A query's rank is the position of its best relevant item in that order, with the tie rule of
:mod:`vgskit.metrics` applied within each of the two parts. Consequences:

* Recall@K for ``K <= rerank_top`` is exactly "a relevant item is among the candidates and among the K best
  of them by fine score", which is what FaST-VGS's ``fine_retrieve_one_to_many`` computes.
* A relevant item outside the candidates has rank ``> rerank_top``; it is never found at ``K <= rerank_top``.
  Its rank is ``rerank_top + 1 + #(non-candidate distractors whose coarse score beats it)``, so mean and
  median rank remain defined, but reflect the coarse scores beyond the cut-off (the fine scorer never saw
  those pairs).

Direction names are explicit: ``speech_to_image`` (a caption retrieves its image; FaST-VGS ``I_r``) and
``image_to_speech`` (an image retrieves any of its captions; FaST-VGS ``A_r``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from vgskit.metrics import (
    ScoreBlock,
    Ties,
    check_block,
    check_no_nan,
    combine_directions,
    count_ranked_above,
    dot_product_blocks,
    metrics_from_ranks,
    positive_lists,
    ranked_above,
    ranks_given_positives,
    recall_at_k,
    validate_caption_image,
)

__all__ = ["PairScorer", "Reranker", "coarse_candidates", "evaluate_retrieval", "reranked_first_hit_ranks"]

#: ``(speech_idx, image_idx) -> scores``: fine scores of the pairs ``(speech_idx[p], image_idx[p])``, both
#: int64 ``[P]`` on the embeddings' device; returns ``[P]`` (or ``[P, 1]``, the shape a cross encoder's
#: score head gives). Higher means more similar.
Reranker = Callable[[Tensor, Tensor], Tensor]

#: ``(query_idx, gallery_idx) -> scores`` for ``P`` pairs; the direction-neutral form of :data:`Reranker`.
PairScorer = Callable[[Tensor, Tensor], Tensor]


def _check_positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _top_candidates(coarse: Tensor, top: int) -> Tensor:
    """Indices of the ``top`` best gallery items per row, best first, ties broken by lower index.

    ``topk`` alone leaves the choice among items tied at the cut-off unspecified; rows with such a tie
    (rare with real-valued scores) are redone with a stable sort, which is slower but deterministic.
    """
    values, idx = coarse.topk(top, dim=1)
    tied = ((coarse >= values[:, -1:]).sum(dim=1) > top).nonzero().flatten()
    if tied.numel():
        idx[tied] = torch.sort(coarse[tied], dim=1, descending=True, stable=True).indices[:, :top]
    # Order within the chosen set: score descending, then index ascending (topk's order among equal
    # scores is unspecified too).
    idx = idx.sort(dim=1).values
    order = torch.sort(coarse.gather(1, idx), dim=1, descending=True, stable=True).indices
    return idx.gather(1, order)


def coarse_candidates(score_block: ScoreBlock, n_queries: int, top: int, *, chunk_size: int = 1024) -> Tensor:
    """Top-``top`` gallery indices of every query by coarse score, best first (int64 ``[n_queries, m]``).

    ``m = min(top, gallery size)``; ties are broken by the lower gallery index.
    """
    top = _check_positive("top", top)
    chunk_size = _check_positive("chunk_size", chunk_size)
    blocks = []
    for start in range(0, n_queries, chunk_size):
        scores = score_block(slice(start, min(start + chunk_size, n_queries)))
        blocks.append(_top_candidates(scores, min(top, scores.shape[1])).cpu())
    return torch.cat(blocks) if blocks else torch.zeros(0, 0, dtype=torch.long)


def _fine_scores(
    scorer: PairScorer, query_idx: Tensor, gallery_idx: Tensor, batch_size: int | None
) -> Tensor:
    """Call the pair scorer in batches of at most ``batch_size`` pairs and check what it returns."""
    n_pairs = query_idx.numel()
    step = n_pairs if batch_size is None else batch_size
    parts = []
    for start in range(0, n_pairs, max(step, 1)):
        stop = min(start + step, n_pairs)
        out = scorer(query_idx[start:stop], gallery_idx[start:stop])
        if out.numel() != stop - start or (out.dim() == 2 and out.shape[1] != 1) or out.dim() > 2:
            raise ValueError(f"reranker returned shape {tuple(out.shape)} for {stop - start} pairs")
        parts.append(out.reshape(-1))
    fine = torch.cat(parts)
    if torch.isnan(fine).any():
        raise ValueError("reranker returned NaN scores")
    return fine


def reranked_first_hit_ranks(
    score_block: ScoreBlock,
    pair_scorer: PairScorer,
    query_labels: Tensor,
    gallery_labels: Tensor,
    *,
    rerank_top: int = 100,
    chunk_size: int = 1024,
    batch_size: int | None = None,
    ties: Ties = "pessimistic",
) -> Tensor:
    """Coarse-to-fine rank of the first relevant gallery item for every query (see the module docstring).

    Args:
        score_block: coarse scores of a slice of queries against the whole gallery.
        pair_scorer: fine scores of ``(query index, gallery index)`` pairs.
        query_labels, gallery_labels: int64; a gallery item is relevant to a query when the labels match.
        rerank_top: candidates per query re-scored by ``pair_scorer``.
        chunk_size: queries per coarse block (``chunk_size * rerank_top`` pairs per block).
        batch_size: pairs per ``pair_scorer`` call; ``None`` = one call per block.
        ties: tie rule of :mod:`vgskit.metrics`.

    Returns:
        int64 ``[Nq]`` 1-based ranks; 0 for a query with no relevant gallery item.
    """
    rerank_top = _check_positive("rerank_top", rerank_top)
    chunk_size = _check_positive("chunk_size", chunk_size)
    if batch_size is not None:
        _check_positive("batch_size", batch_size)
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    n_queries, n_gallery = len(query_labels), len(gallery_labels)
    index, valid = positive_lists(query_labels, gallery_labels)
    ranks = torch.zeros(n_queries, dtype=torch.long)
    for start in range(0, n_queries, chunk_size):
        rows = slice(start, min(start + chunk_size, n_queries))
        coarse = check_block(score_block, rows, n_gallery)
        check_no_nan(coarse, "coarse scores")
        device, n_rows, m = coarse.device, rows.stop - rows.start, min(rerank_top, n_gallery)
        cand = _top_candidates(coarse, m)
        pos_index, pos_valid = index[rows].to(device), valid[rows].to(device)

        # Stage 2: rank of the best relevant candidate among the candidates, by fine score.
        query_idx = torch.arange(rows.start, rows.stop, device=device).repeat_interleave(m)
        fine = _fine_scores(pair_scorer, query_idx, cand.reshape(-1), batch_size).view(n_rows, m).to(device)
        cand_positive = ((cand[:, :, None] == pos_index[:, None, :]) & pos_valid[:, None, :]).any(dim=2)
        inside = ranks_given_positives(fine, cand_positive, ties)

        # No relevant candidate: the relevant items follow all m candidates, ordered by coarse score, so
        # rank = m + 1 + #(non-candidate distractors ranked above the best relevant coarse score). All
        # candidates are distractors in that case, hence the subtraction of those ranked above it.
        neg_inf = torch.tensor(float("-inf"), dtype=coarse.dtype, device=device)
        pos_scores = torch.where(pos_valid, coarse.gather(1, pos_index), neg_inf)
        best = pos_scores.amax(dim=1, keepdim=True)
        n_above = (
            count_ranked_above(coarse, best, ties)
            - (ranked_above(pos_scores, best, ties) & pos_valid).sum(dim=1)
            - ranked_above(coarse.gather(1, cand), best, ties).sum(dim=1)
        )
        outside = torch.where(pos_valid.any(dim=1), m + 1 + n_above, torch.zeros_like(n_above))
        ranks[rows] = torch.where(inside > 0, inside, outside).cpu()
        # Free this block before the next one is computed; otherwise two blocks are alive at once.
        del coarse, fine
    return ranks


@torch.no_grad()
def evaluate_retrieval(
    speech_emb: Tensor,
    image_emb: Tensor,
    caption_image: Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    reranker: Reranker | None = None,
    rerank_top: int = 100,
    rerank_batch_size: int | None = None,
    ties: Ties = "pessimistic",
) -> dict[str, Any]:
    """Speech <-> image retrieval metrics, optionally coarse-to-fine.

    Args:
        speech_emb: ``[n_captions, D]`` coarse caption embeddings.
        image_emb: ``[n_images, D]`` coarse embeddings of the unique images.
        caption_image: int64 ``[n_captions]``, index of each caption's image in ``image_emb``.
        ks: recall cut-offs (percent in the result).
        chunk_size: queries per similarity block (memory is O(chunk_size x gallery)).
        reranker: fine scorer of (caption index, image index) pairs; ``None`` = coarse scores only.
        rerank_top: candidates per query handed to the reranker; recall at ``K <= rerank_top`` is exact.
        rerank_batch_size: pairs per reranker call (``None`` = ``chunk_size * rerank_top``).
        ties: tie rule of :mod:`vgskit.metrics`.

    Returns:
        The dictionary of :func:`vgskit.metrics.retrieval_metrics`: ``speech_to_image`` and
        ``image_to_speech`` (``R@K`` in percent, ``mean_rank``, ``median_rank``, ``n_queries``) and
        ``mean_R@K``. Images without captions are not image -> speech queries.
    """
    if reranker is None:
        return recall_at_k(speech_emb, image_emb, caption_image, ks, chunk_size, ties=ties)
    s2i_block, i2s_block = dot_product_blocks(speech_emb, image_emb)
    if len(caption_image) != len(speech_emb):
        raise ValueError(f"caption_image has {len(caption_image)} entries for {len(speech_emb)} captions")
    caption_image = validate_caption_image(caption_image, len(image_emb))
    image_labels = torch.arange(len(image_emb))
    common: dict[str, Any] = {
        "rerank_top": rerank_top,
        "chunk_size": chunk_size,
        "batch_size": rerank_batch_size,
        "ties": ties,
    }

    def image_query(image_idx: Tensor, speech_idx: Tensor) -> Tensor:
        # For image -> speech the query is the image: swap into the reranker's (speech, image) order.
        return reranker(speech_idx, image_idx)

    s2i = reranked_first_hit_ranks(s2i_block, reranker, caption_image, image_labels, **common)
    i2s = reranked_first_hit_ranks(i2s_block, image_query, image_labels, caption_image, **common)
    i2s = i2s[i2s > 0]  # images without captions have nothing to retrieve
    return combine_directions(metrics_from_ranks(s2i, ks), metrics_from_ranks(i2s, ks), ks)
