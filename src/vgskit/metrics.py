"""Cross-modal retrieval metrics for spoken captions and images.

Evaluation convention (shared by the reference implementations of the published models):

* Images are de-duplicated by image id; the caller passes one embedding per *unique* image and, for every
  spoken caption, the index of its image (:func:`image_index_from_ids` builds that index from id lists).
* **speech -> image**: each caption queries the gallery of unique images; it hits at K if its own image is
  among the top K.
* **image -> speech**: each image queries the gallery of *all* captions; it hits at K if *any* of its
  captions is among the top K, i.e. its rank is the best rank over its captions. Images may have any number
  of captions; an image with no caption has nothing to retrieve and is left out of this direction (it still
  takes part as a distractor for speech -> image).
* Recall is reported in percent; ``mean_R@K`` is the mean of the two directions.

Ties: a rank is ``1 + (number of non-relevant gallery items whose score is >= the best relevant score)``
(``ties="pessimistic"``, the default): a relevant item only counts as found at K if it beats every tied
distractor. This is deliberate: with the optimistic rule (``>``) a collapsed model whose embeddings are all
equal would score 100 % R@1, which hides exactly the failure an evaluation should reveal. The optimistic
rule is available as ``ties="optimistic"``. Neither rule depends on the gallery order, so results are
deterministic. (The reference implementations use ``topk``/``argsort``, whose order among equal scores is
unspecified; on tie-free scores all three rules agree.)

Ranking metrics (``ir_metrics=True`` in :func:`retrieval_metrics` / :func:`recall_at_k`): besides R@K each
direction then holds ``nDCG@10``, ``mAP`` and ``MRR`` with binary relevance (relevant = the caption's image, or
the image's captions), as fractions in [0, 1] like the IR libraries report them (R@K stays in percent). The
ranking they score is the one the tie rule defines: within a group of equal scores the non-relevant items come
first (``"pessimistic"``) or last (``"optimistic"``); the order among equal relevant items does not change any
of the three. So the j-th best relevant item (j = 1, 2, ...) sits at position ``j + #(non-relevant items
scoring >= (or >) its score)``; j = 1 is the rank above. With ``c`` relevant items at positions ``p_1 < ... <
p_c``: ``AP = (1/c) sum_j j / p_j``, ``RR = 1 / p_1``, ``nDCG@k = sum_{p_j <= k} 1/log2(p_j + 1)`` divided by the
same sum for positions ``1..min(c, k)``; each is averaged over the queries. speech -> image has one relevant
image, so there ``AP = RR``. On tie-free scores these are the usual trec_eval measures (``map``,
``recip_rank``, ``ndcg_cut_10``). Note on naming: in IR libraries *recall@K* is the fraction of a query's
relevant items found in the top K; the R@K of this module and of the papers is what they call the *hit rate*
or *success@K* (at least one relevant item in the top K). The two agree for speech -> image but not for
image -> speech: mteb's ``recall_at_k`` for image -> speech is IR recall, and its ``hit_rate_at_k`` is the
papers' R@K.

Zero-shot **speech <-> text** (:func:`speech_text_retrieval`, models with a text tower): spoken captions query the
gallery of caption *texts* (``speech_to_text``) and texts query the spoken captions (``text_to_speech``); a
retrieved item is a hit when it is a caption of the query's image. Both sides carry image ids, so the two
sides may hold different captions and different numbers of captions per image.

Memory: similarities are computed one block of ``chunk_size`` queries at a time, so the full
``N_captions x N_images`` matrix is never held; peak extra memory is O(chunk_size x gallery size).
:func:`recall_at_k` (dot products) goes further and costs about one matrix product: see
:func:`dot_product_ranks`.
Unlike the reference code (which calls ``topk(100)``) nothing here needs a minimum number of items.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "DIRECTION_LABELS",
    "GALLERY_UNITS",
    "ScoreBlock",
    "Ties",
    "DotProductBlock",
    "combine_directions",
    "dot_product_blocks",
    "dot_product_ranks",
    "first_hit_ranks",
    "fused_block_rows",
    "fused_gallery_chunk",
    "format_recall_table",
    "gallery_sizes",
    "image_index_from_ids",
    "ir_metrics_from_values",
    "metrics_from_ranks",
    "chance_recall",
    "check_block",
    "check_no_nan",
    "count_ranked_above",
    "positive_lists",
    "ranked_above",
    "ranks_from_positive_lists",
    "ranks_given_positives",
    "relevant_position_metrics",
    "relevant_positions",
    "recall_at_k",
    "retrieval_metrics",
    "shared_labels",
    "speech_text_retrieval",
    "validate_caption_image",
]

#: Returns the scores of the queries in ``rows`` (a slice of query positions) against the whole gallery,
#: shape ``[rows.stop - rows.start, n_gallery]``; higher means more similar.
ScoreBlock = Callable[[slice], Tensor]

#: How equal scores are ranked: ``"pessimistic"`` (ties count against the relevant item) or
#: ``"optimistic"`` (ties count for it).
Ties = Literal["pessimistic", "optimistic"]

_DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def image_index_from_ids(caption_image_ids: Sequence[Hashable]) -> tuple[list[Hashable], Tensor]:
    """De-duplicate the image ids of a caption list.

    Args:
        caption_image_ids: the image id of every caption, in caption order.

    Returns:
        ``(unique_ids, caption_image)``: the distinct ids in first-seen order (the order the reference
        implementations use for the image gallery) and, per caption, the position of its id in
        ``unique_ids`` as an int64 tensor of shape ``[len(caption_image_ids)]``.
    """
    position: dict[Hashable, int] = {}
    index = [position.setdefault(image_id, len(position)) for image_id in caption_image_ids]
    return list(position), torch.tensor(index, dtype=torch.long)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Validate the cut-offs: positive integers, at least one."""
    out = tuple(int(k) for k in ks)
    if not out or any(k < 1 for k in out):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {tuple(ks)!r}")
    return out


def _check_chunk_size(chunk_size: int) -> int:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _check_ties(ties: str) -> None:
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")


def check_no_nan(scores: Tensor, what: str = "scores") -> None:
    """Raise if ``scores`` holds a NaN.

    A NaN compares False with everything, which would silently give a NaN-scored relevant item the best
    possible rank. The sum is a cheap first test (one reduction, no ``[Q, G]`` mask); only when it is NaN
    (a NaN, or +inf and -inf together) is the exact element-wise test run.
    """
    if torch.isnan(scores.sum()) and torch.isnan(scores).any():
        raise ValueError(f"{what} contain NaN")


def ranked_above(scores: Tensor, best: Tensor, ties: Ties) -> Tensor:
    """Which scores are ranked ahead of a relevant item scoring ``best``, under the tie rule."""
    return scores >= best if ties == "pessimistic" else scores > best


_COUNT_COLUMNS = 4096


def count_ranked_above(scores: Tensor, best: Tensor, ties: Ties) -> Tensor:
    """Per row, how many scores are ranked ahead of ``best`` (``[Q, 1]``); int64 ``[Q]``.

    Summing a boolean tensor first converts it to int64, a copy twice the size of a float32 score block;
    counting over column slices keeps that temporary small, so the score block dominates the memory.
    """
    total = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    for start in range(0, scores.shape[1], _COUNT_COLUMNS):
        total += ranked_above(scores[:, start : start + _COUNT_COLUMNS], best, ties).sum(dim=1)
    return total


def ranks_given_positives(scores: Tensor, positive: Tensor, ties: Ties = "pessimistic") -> Tensor:
    """1-based rank of the best relevant item of each row of a (small) score block, from a dense mask.

    Args:
        scores: ``[Q, G]`` scores of Q queries against G gallery items.
        positive: ``[Q, G]`` bool, True where the gallery item is relevant to the query.
        ties: tie rule (see the module docstring).

    Returns:
        int64 ``[Q]``: ``1 + #(non-relevant items scoring >= (or >) the best relevant score)``, and 0 for a
        query without any relevant item.
    """
    check_no_nan(scores)
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    best = torch.where(positive, scores, neg_inf).amax(dim=1, keepdim=True)
    ranks = 1 + (ranked_above(scores, best, ties) & ~positive).sum(dim=1)
    return torch.where(positive.any(dim=1), ranks, torch.zeros_like(ranks))


def positive_lists(query_labels: Tensor, gallery_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Gallery indices relevant to each query (same label), padded to a common length.

    Returns:
        ``(index, valid)``, both ``[Nq, P]`` with ``P`` the largest number of relevant items of a query
        (at least 1): ``index[q, j]`` is a relevant gallery index where ``valid[q, j]``, else 0.
    """
    query_labels, gallery_labels = query_labels.long().cpu(), gallery_labels.long().cpu()
    if len(gallery_labels) == 0:
        shape = (len(query_labels), 1)
        return torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.bool)
    # Group the gallery by label: sorted order, then each label's run [start, start + count).
    order = torch.argsort(gallery_labels, stable=True)
    labels, counts = torch.unique_consecutive(gallery_labels[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    run = torch.searchsorted(labels, query_labels).clamp(max=len(labels) - 1)
    n_pos = torch.where(labels[run] == query_labels, counts[run], 0)
    width = max(int(n_pos.max()) if len(n_pos) else 0, 1)
    offsets = torch.arange(width)
    valid = offsets[None, :] < n_pos[:, None]
    position = (starts[run][:, None] + offsets[None, :]).clamp(max=len(order) - 1)
    return torch.where(valid, order[position], 0), valid


def ranks_from_positive_lists(
    scores: Tensor, index: Tensor, valid: Tensor, ties: Ties = "pessimistic"
) -> Tensor:
    """1-based rank of the best relevant item of each row, relevant items given as index lists.

    Costs one comparison pass over ``scores`` and no ``[Q, G]`` mask beyond its boolean result: every item
    beating the best relevant score is counted, then the relevant ones among them are subtracted.

    Args:
        scores: ``[Q, G]``.
        index, valid: ``[Q, P]`` from :func:`positive_lists` (rows of this block).
        ties: tie rule (see the module docstring).

    Returns:
        int64 ``[Q]`` ranks; 0 for a query without any relevant item.
    """
    check_no_nan(scores)
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    pos_scores = torch.where(valid, scores.gather(1, index), neg_inf)
    best = pos_scores.amax(dim=1, keepdim=True)
    n_positive_above = (ranked_above(pos_scores, best, ties) & valid).sum(dim=1)
    n_beating = count_ranked_above(scores, best, ties) - n_positive_above
    return torch.where(valid.any(dim=1), 1 + n_beating, torch.zeros_like(n_beating))


def first_hit_ranks(
    score_block: ScoreBlock,
    query_labels: Tensor,
    gallery_labels: Tensor,
    *,
    chunk_size: int = 1024,
    ties: Ties = "pessimistic",
) -> Tensor:
    """Rank of the first relevant gallery item for every query, computed block by block.

    A gallery item is relevant to a query when their labels are equal (for speech -> image the labels are
    image indices: caption -> its image, image ``i`` -> ``i``). Only one ``[chunk_size, n_gallery]`` block of
    scores exists at a time.

    Args:
        score_block: scores of a slice of queries against the whole gallery (see :data:`ScoreBlock`).
        query_labels: int64 ``[Nq]``.
        gallery_labels: int64 ``[Ng]``.
        chunk_size: queries per block.
        ties: tie rule (see the module docstring).

    Returns:
        int64 ``[Nq]`` 1-based ranks; 0 for a query with no relevant gallery item.
    """
    _check_ties(ties)
    chunk_size = _check_chunk_size(chunk_size)
    n_queries, n_gallery = len(query_labels), len(gallery_labels)
    index, valid = positive_lists(query_labels, gallery_labels)
    ranks = torch.zeros(n_queries, dtype=torch.long)
    for start in range(0, n_queries, chunk_size):
        rows = slice(start, min(start + chunk_size, n_queries))
        scores = check_block(score_block, rows, n_gallery)
        ranks[rows] = ranks_from_positive_lists(
            scores, index[rows].to(scores.device), valid[rows].to(scores.device), ties
        ).cpu()
        # Free this block before the next one is computed; otherwise two blocks are alive at once.
        del scores
    return ranks


def check_block(score_block: ScoreBlock, rows: slice, n_gallery: int) -> Tensor:
    """Call ``score_block(rows)`` and check the shape of what it returns."""
    scores = score_block(rows)
    expected = (rows.stop - rows.start, n_gallery)
    if tuple(scores.shape) != expected:
        raise ValueError(f"score_block({rows}) returned shape {tuple(scores.shape)}, expected {expected}")
    return scores


def relevant_positions(scores: Tensor, index: Tensor, valid: Tensor, ties: Ties = "pessimistic") -> Tensor:
    """1-based positions of every relevant item of each row in the ranking the tie rule defines.

    The j-th best relevant score ``t_j`` of a row sits at ``j + #(non-relevant items ranked ahead of t_j)``
    (see the module docstring); column 0 is :func:`ranks_from_positive_lists`. One comparison pass over the
    block per column, up to the largest number of relevant items of a row in the block, and no sort of the
    gallery.

    Args:
        scores: ``[Q, G]``.
        index, valid: ``[Q, P]`` from :func:`positive_lists` (rows of this block).
        ties: tie rule (see the module docstring).

    Returns:
        int64 ``[Q, P]``, increasing along each row over its valid entries, and 0 where ``valid`` is False
        (the valid entries come first).
    """
    check_no_nan(scores)
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    pos_scores = torch.where(valid, scores.gather(1, index), neg_inf)
    # Padding scores -inf sort last; a relevant score of -inf equals them, so the first n_valid entries of
    # each sorted row are that row's relevant scores whatever the padding holds.
    thresholds = pos_scores.sort(dim=1, descending=True).values
    n_valid = valid.sum(dim=1)
    positions = torch.zeros(valid.shape, dtype=torch.long, device=scores.device)
    for j in range(int(n_valid.max()) if n_valid.numel() else 0):
        t = thresholds[:, j : j + 1]
        n_relevant_ahead = (ranked_above(pos_scores, t, ties) & valid).sum(dim=1)
        n_beating = count_ranked_above(scores, t, ties) - n_relevant_ahead
        positions[:, j] = torch.where(j < n_valid, j + 1 + n_beating, torch.zeros_like(n_beating))
    return positions


def _per_query_ir(positions: Tensor, ndcg_k: int) -> dict[str, Tensor]:
    """Reciprocal rank, average precision and nDCG@k per query from :func:`relevant_positions`, float64."""
    positions = positions.cpu()
    valid = positions > 0
    n_rel = valid.sum(dim=1)
    pos = torch.where(valid, positions, 1).to(torch.float64)
    j = torch.arange(1, positions.shape[1] + 1, dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    rr = torch.where(n_rel > 0, 1.0 / pos[:, 0], zero)
    ap = torch.where(valid, j / pos, zero).sum(dim=1) / n_rel.clamp(min=1)
    gain = torch.where(valid & (pos <= ndcg_k), 1.0 / torch.log2(pos + 1.0), zero).sum(dim=1)
    ideal = torch.cumsum(1.0 / torch.log2(torch.arange(2, ndcg_k + 2, dtype=torch.float64)), 0)
    best_gain = ideal[(n_rel.clamp(min=1, max=ndcg_k) - 1)]
    ndcg = torch.where(n_rel > 0, gain / best_gain, zero)
    return {"RR": rr, "AP": ap, "nDCG": ndcg}


def relevant_position_metrics(
    score_block: ScoreBlock,
    query_labels: Tensor,
    gallery_labels: Tensor,
    *,
    chunk_size: int = 1024,
    ties: Ties = "pessimistic",
    ndcg_k: int = 10,
) -> tuple[Tensor, dict[str, Tensor]]:
    """First-hit ranks and per-query ranking metrics, block by block like :func:`first_hit_ranks`.

    Returns:
        ``(ranks, values)``: int64 ``[Nq]`` first-hit ranks (0 for a query without relevant items, as in
        :func:`first_hit_ranks`) and float64 ``[Nq]`` tensors ``values["RR"]``, ``values["AP"]`` and
        ``values["nDCG"]`` (nDCG at ``ndcg_k``), 0 for a query without relevant items. Only one block of
        scores and the ``[Nq]`` results are held; the positions of a block are reduced before the next one.
    """
    _check_ties(ties)
    chunk_size = _check_chunk_size(chunk_size)
    if ndcg_k < 1:
        raise ValueError(f"ndcg_k must be >= 1, got {ndcg_k}")
    n_queries, n_gallery = len(query_labels), len(gallery_labels)
    index, valid = positive_lists(query_labels, gallery_labels)
    ranks = torch.zeros(n_queries, dtype=torch.long)
    values = {name: torch.zeros(n_queries, dtype=torch.float64) for name in ("RR", "AP", "nDCG")}
    for start in range(0, n_queries, chunk_size):
        rows = slice(start, min(start + chunk_size, n_queries))
        scores = check_block(score_block, rows, n_gallery)
        positions = relevant_positions(scores, index[rows].to(scores.device), valid[rows].to(scores.device), ties)
        del scores
        ranks[rows] = positions[:, 0].cpu()
        for name, v in _per_query_ir(positions, ndcg_k).items():
            values[name][rows] = v
    return ranks, values


def ir_metrics_from_values(values: Mapping[str, Tensor], keep: Tensor, ndcg_k: int = 10) -> dict[str, float]:
    """Mean nDCG@k, AP and RR over the queries ``keep`` selects: ``{"nDCG@k", "mAP", "MRR"}`` in [0, 1]."""
    n = int(keep.sum())
    if n == 0:
        raise ValueError("no queries to evaluate")
    return {
        f"nDCG@{ndcg_k}": float(values["nDCG"][keep].sum()) / n,
        "mAP": float(values["AP"][keep].sum()) / n,
        "MRR": float(values["RR"][keep].sum()) / n,
    }


def metrics_from_ranks(ranks: Tensor, ks: Sequence[int] = _DEFAULT_KS) -> dict[str, Any]:
    """Recall@K (percent), mean and median rank from 1-based ranks.

    The median of an even number of ranks is the mean of the two middle ones (the usual statistical
    median). ``n_queries`` is the number of ranks.
    """
    ks = _check_ks(ks)
    if ranks.numel() == 0:
        raise ValueError("no queries to evaluate")
    r = ranks.to(torch.float64)
    out: dict[str, Any] = {}
    for k in ks:
        # hits / n in double precision, then percent: exact up to one rounding of the ratio.
        out[f"R@{k}"] = 100.0 * int((ranks <= k).sum()) / ranks.numel()
    ordered = r.sort().values
    mid = ordered.numel() // 2
    median = ordered[mid] if ordered.numel() % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    out["mean_rank"] = float(r.mean())
    out["median_rank"] = float(median)
    out["n_queries"] = int(ranks.numel())
    return out


def validate_caption_image(caption_image: Tensor, n_images: int) -> Tensor:
    """Check that ``caption_image`` is a 1-D integer tensor of indices into ``n_images`` images.

    Returns it as an int64 CPU tensor.
    """
    if caption_image.dim() != 1:
        raise ValueError(
            f"caption_image must be 1-D (one image index per caption), got {tuple(caption_image.shape)}"
        )
    if caption_image.is_floating_point() or caption_image.is_complex() or caption_image.dtype == torch.bool:
        raise ValueError(f"caption_image must hold integer indices, got dtype {caption_image.dtype}")
    caption_image = caption_image.long().cpu()
    if caption_image.numel() == 0:
        raise ValueError("no captions to evaluate")
    if n_images == 0:
        raise ValueError("no images to evaluate")
    lo, hi = int(caption_image.min()), int(caption_image.max())
    if lo < 0 or hi >= n_images:
        raise ValueError(f"caption_image indices must lie in [0, {n_images}), found range [{lo}, {hi}]")
    return caption_image


def combine_directions(
    speech_to_image: dict[str, Any], image_to_speech: dict[str, Any], ks: Sequence[int]
) -> dict[str, Any]:
    """Assemble the result dictionary: both directions plus ``mean_R@K`` (their average) per K."""
    out: dict[str, Any] = {"speech_to_image": speech_to_image, "image_to_speech": image_to_speech}
    for k in _check_ks(ks):
        out[f"mean_R@{k}"] = (speech_to_image[f"R@{k}"] + image_to_speech[f"R@{k}"]) / 2
    return out


def retrieval_metrics(
    speech_to_image_block: ScoreBlock,
    image_to_speech_block: ScoreBlock,
    caption_image: Tensor,
    n_images: int,
    *,
    ks: Sequence[int] = _DEFAULT_KS,
    chunk_size: int = 1024,
    ties: Ties = "pessimistic",
    ir_metrics: bool = False,
    ndcg_k: int = 10,
) -> dict[str, Any]:
    """Retrieval metrics in both directions from arbitrary block scorers.

    Args:
        speech_to_image_block: ``rows -> [len(rows), n_images]`` scores of captions ``rows`` vs all images.
        image_to_speech_block: ``rows -> [len(rows), n_captions]`` scores of images ``rows`` vs all captions.
            Both may be dot products, a learned scorer, or anything else; they need not be transposes.
        caption_image: int64 ``[n_captions]``, index of each caption's image in ``[0, n_images)``.
        n_images: number of unique images.
        ks: recall cut-offs. A K above the gallery size gives 100 % (every rank is within the gallery).
        chunk_size: queries per block.
        ties: tie rule (see the module docstring).
        ir_metrics: also return ``"nDCG@{ndcg_k}"``, ``"mAP"`` and ``"MRR"`` per direction (fractions in
            [0, 1], defined in the module docstring). image -> speech then costs one comparison pass per
            caption of the image with most captions in a block, instead of one.
        ndcg_k: cut-off of nDCG.

    Returns:
        ``{"speech_to_image": {...}, "image_to_speech": {...}, "mean_R@K": ...}``; each direction holds
        ``"R@K"`` (percent), ``"mean_rank"``, ``"median_rank"`` and ``"n_queries"`` (plus the ranking
        metrics with ``ir_metrics``; the other entries do not change).
    """
    ks = _check_ks(ks)
    caption_image = validate_caption_image(caption_image, n_images)
    image_labels = torch.arange(n_images)
    common: dict[str, Any] = {"chunk_size": chunk_size, "ties": ties}
    if not ir_metrics:
        s2i = first_hit_ranks(speech_to_image_block, caption_image, image_labels, **common)
        i2s = first_hit_ranks(image_to_speech_block, image_labels, caption_image, **common)
        # Images without captions got rank 0 ("nothing relevant"): they are not image -> speech queries.
        i2s = i2s[i2s > 0]
        return combine_directions(metrics_from_ranks(s2i, ks), metrics_from_ranks(i2s, ks), ks)
    s2i, s2i_values = relevant_position_metrics(
        speech_to_image_block, caption_image, image_labels, ndcg_k=ndcg_k, **common
    )
    i2s, i2s_values = relevant_position_metrics(
        image_to_speech_block, image_labels, caption_image, ndcg_k=ndcg_k, **common
    )
    speech_to_image = metrics_from_ranks(s2i, ks) | ir_metrics_from_values(s2i_values, s2i > 0, ndcg_k)
    image_to_speech = metrics_from_ranks(i2s[i2s > 0], ks) | ir_metrics_from_values(i2s_values, i2s > 0, ndcg_k)
    return combine_directions(speech_to_image, image_to_speech, ks)


def _check_embeddings(speech_emb: Tensor, image_emb: Tensor) -> None:
    if speech_emb.dim() != 2 or image_emb.dim() != 2 or speech_emb.shape[1] != image_emb.shape[1]:
        raise ValueError(
            "speech_emb and image_emb must be [N, D] with the same D, got "
            f"{tuple(speech_emb.shape)} and {tuple(image_emb.shape)}"
        )


class DotProductBlock:
    """A :data:`ScoreBlock` of plain dot products, ``rows -> queries[rows] @ gallery.T``.

    ``out``, when given, is a ``[len(rows), n_gallery]`` buffer the block is written into (the same matrix
    product, so the same values); ``cols`` restricts the block to a slice of the gallery.
    :func:`dot_product_ranks` reuses one buffer for all its blocks: a fresh block of a few MiB per call is handed
    back to the operating system when freed and page-faulted in again by the next call, which on a
    5,000 x 25,000 evaluation cost more time than the counting itself.
    """

    def __init__(self, queries: Tensor, gallery: Tensor):
        self.queries = queries  # [Nq, D]
        self.gallery = gallery  # [Ng, D]

    def __call__(self, rows: slice, out: Tensor | None = None, cols: slice | None = None) -> Tensor:
        # cols: a slice of the gallery (default: all of it); the block is then [len(rows), len(cols)]
        gallery = self.gallery if cols is None else self.gallery[cols]
        if out is None:
            return self.queries[rows] @ gallery.T
        return torch.matmul(self.queries[rows], gallery.T, out=out)


def dot_product_blocks(speech_emb: Tensor, image_emb: Tensor) -> tuple[DotProductBlock, DotProductBlock]:
    """Block scorers for plain dot products: (captions vs images, images vs captions)."""
    _check_embeddings(speech_emb, image_emb)
    return DotProductBlock(speech_emb, image_emb), DotProductBlock(image_emb, speech_emb)


#: Bytes of one score block of :func:`dot_product_ranks`: small enough to stay in the CPU cache between the matrix
#: product that writes it and the two counting passes that read it, and to keep the evaluation's extra memory
#: (the block, its mask and the per-block sums) near 25 MiB; 16 MiB blocks took over 100 MiB.
_FUSED_BLOCK_BYTES = 4 << 20
#: Fewest caption rows per block (below this the matrix product loses efficiency), unless ``chunk_size``
#: asks for fewer. Large galleries hit this floor: at 20k images, 52 rows (the 4 MiB budget) made the blocked
#: products 1.32x the one full product, 96 rows 1.15x with 54 MiB extra in all, 128 rows 78 MiB (2 threads).
_FUSED_MIN_ROWS = 96
#: Bytes of the image embeddings one score block is computed against. A larger gallery is cut into column chunks
#: of at most this size, each a separate pass over the captions: the chunk stays in the CPU cache across the
#: caption blocks and the blocks get more rows for the same bytes. At 20k images x 100k captions (dim 512,
#: 2 threads) full-width blocks of 96 rows cost 1.09x the one full product, 5,000-image chunks (209 rows) 0.93x,
#: 4,000-image chunks (262 rows, this budget) 0.90x: writing a 100k x 20k product to memory costs more than
#: reading the captions five times.
_FUSED_GALLERY_BYTES = 8 << 20
#: Images per tile when the relevant scores are computed ahead of the main pass.
_POSITIVE_TILE_IMAGES = 64


def fused_gallery_chunk(n_images: int, dim: int, element_size: int) -> int:
    """Images per column chunk of :func:`dot_product_ranks`: all of them when their embeddings fit in
    :data:`_FUSED_GALLERY_BYTES`, else the gallery cut into equal chunks that do."""
    if n_images <= 1:
        return max(n_images, 1)
    n_chunks = max(1, -(-n_images * max(dim, 1) * element_size // _FUSED_GALLERY_BYTES))
    return -(-n_images // min(n_chunks, n_images))


def fused_block_rows(n_captions: int, n_images: int, element_size: int, chunk_size: int) -> int:
    """Caption rows per score block of :func:`dot_product_ranks`: at most ``chunk_size``, blocks of equal size.

    About :data:`_FUSED_BLOCK_BYTES` per block (at least :data:`_FUSED_MIN_ROWS` rows); the rows are then spread
    evenly over the blocks, so that the last block is not a sliver (BLAS may round a product of very few rows
    differently).
    """
    rows = max(1, min(chunk_size, max(_FUSED_MIN_ROWS, _FUSED_BLOCK_BYTES // max(n_images * element_size, 1))))
    n_blocks = max(1, -(-n_captions // rows))
    return -(-max(n_captions, 1) // n_blocks)


def _scores_may_be_nan(speech_emb: Tensor, image_emb: Tensor) -> bool:
    """Whether a dot product of these embeddings can be NaN; False is a guarantee.

    Finite inputs give a NaN only through an overflow to inf (then inf - inf), and every partial sum of a
    ``D``-dimensional ``a . b`` is at most ``D max|a| max|b|``: well below the float maximum, no overflow. One
    ``aminmax`` per tensor (a NaN or inf in an embedding shows in it), no copy of the embeddings, instead of a
    pass over every score block.
    """
    limit = torch.finfo(torch.result_type(speech_emb, image_emb)).max / 1024  # margin for rounding
    bound = float(speech_emb.shape[1])
    for emb in (speech_emb, image_emb):
        if emb.numel() == 0:
            return False
        lo, hi = torch.aminmax(emb)
        bound *= max(-float(lo), float(hi))
    return not bound < limit  # also True for a NaN or inf bound


def _relevant_scores(speech_emb: Tensor, image_emb: Tensor, caption_image: Tensor) -> tuple[Tensor, Tensor]:
    """Per caption, its score with its own image; per image, the best of those (-inf without captions).

    Computed by small tiles: the captions of a group of images against just those images,
    ``n_captions x _POSITIVE_TILE_IMAGES`` products, a few percent of the full product. The values are checked
    against the main pass of :func:`dot_product_ranks`.
    """
    n_images = len(image_emb)
    order = torch.argsort(caption_image, stable=True)
    ends = torch.cumsum(torch.bincount(caption_image, minlength=n_images), 0).tolist()
    dtype = torch.result_type(speech_emb, image_emb)
    positive = torch.empty(len(speech_emb), dtype=dtype, device=speech_emb.device)
    width = min(_POSITIVE_TILE_IMAGES, n_images)
    for a in range(0, n_images, width):
        b = min(a + width, n_images)
        members = order[(ends[a - 1] if a else 0) : ends[b - 1]].to(speech_emb.device)
        if members.numel() == 0:
            continue
        # Every tile is `width` images wide (the last one reaches back): BLAS kernels may round a product
        # with very few columns differently.
        first = b - width
        local = caption_image.to(speech_emb.device)[members] - first
        tile = speech_emb[members] @ image_emb[first:b].T  # [members, width]
        positive[members] = tile.gather(1, local[:, None])[:, 0]
    return _best_of(positive, caption_image.to(speech_emb.device), n_images), positive


def _best_of(positive: Tensor, labels: Tensor, n_images: int) -> Tensor:
    """Per image, the largest of its captions' scores (-inf for an image without captions)."""
    return torch.full((n_images,), float("-inf"), dtype=positive.dtype, device=positive.device).scatter_reduce(
        0, labels, positive, "amax")


@torch.no_grad()
def dot_product_ranks(
    speech_emb: Tensor,
    image_emb: Tensor,
    caption_image: Tensor,
    *,
    chunk_size: int = 1024,
    ties: Ties = "pessimistic",
) -> tuple[Tensor, Tensor]:
    """First-hit ranks of both directions from one pass over ``speech_emb @ image_emb.T``.

    The result equals :func:`first_hit_ranks` applied to the two scorers of :func:`dot_product_blocks`
    (``speech -> image`` ranks per caption, ``image -> speech`` ranks per image, 0 for an image without
    captions), at about the cost of one matrix product instead of two, and without sorting or top-K:

    1. Each caption's score with its own image, and per image the best of them, are computed first, from
       ``n_captions x 64`` tiles.
    2. One pass over score blocks ``speech_emb[rows] @ image_emb[cols].T`` (cache-sized: a large gallery is cut
       into column chunks, see :func:`fused_gallery_chunk`, and each chunk's caption blocks into rows, see
       :func:`fused_block_rows`): per row, the count of the chunk's images ranked ahead of the caption's image
       (speech -> image, accumulated over chunks); per column, the count of the block's captions ranked ahead of
       that image's best caption (image -> speech, accumulated over blocks). Each block is read by two
       comparisons and discarded.
    3. The relevant captions counted in step 2 are subtracted, from the scores the blocks gave them.

    Bit-identical results need the two directions to see the same scores. Here image -> speech reads the
    transposed blocks of ``speech_emb @ image_emb.T`` where :func:`dot_product_blocks` computes
    ``image_emb @ speech_emb.T``, and blocks of a column chunk where the two-scorer path multiplies by the whole
    gallery; the two agree exactly whenever the scores are exact (e.g. small integers), and MKL's float32 products
    gave equal values every way on the random data of ``tests/test_metrics_blocks.py`` and
    ``benchmarks/eval_gemm_cost.py`` (which checks the results against the two-scorer path). Step 1's values are
    compared with the scores the main pass gives the same pairs; if a BLAS kernel rounded them differently, the
    counts are redone with the main pass's values (a second pass), so the ranks are always those of the main
    pass's scores.

    Scores are checked for NaN block by block only when the embeddings allow one (see
    :func:`_scores_may_be_nan`); otherwise a NaN-free result is certain without reading the blocks again.

    Memory: one ``[rows, chunk]`` block (reused for every block when the scorer is a :class:`DotProductBlock`)
    and its boolean mask, plus ``O(n_captions + n_images)``.
    """
    _check_embeddings(speech_emb, image_emb)
    _check_ties(ties)
    chunk_size = _check_chunk_size(chunk_size)
    n_captions, n_images = len(speech_emb), len(image_emb)
    if len(caption_image) != n_captions:
        raise ValueError(f"caption_image has {len(caption_image)} entries for {n_captions} captions")
    caption_image = validate_caption_image(caption_image, n_images)
    device = speech_emb.device
    labels = caption_image.to(device)
    speech_block, _ = dot_product_blocks(speech_emb, image_emb)
    element_size = torch.empty((), dtype=torch.result_type(speech_emb, image_emb)).element_size()
    fused = isinstance(speech_block, DotProductBlock)
    # Any other scorer returns whole rows: one chunk, the whole gallery.
    width = fused_gallery_chunk(n_images, speech_emb.shape[1], element_size) if fused else max(n_images, 1)
    rows_per_block = fused_block_rows(n_captions, width, element_size, chunk_size)
    best, expected = _relevant_scores(speech_emb, image_emb, caption_image)
    mask = torch.empty((rows_per_block, width), dtype=torch.bool, device=device)
    # One score buffer for every block (see DotProductBlock); any other scorer returns its own blocks.
    into = torch.empty((rows_per_block, width), dtype=best.dtype, device=device) if fused else None
    chunks = [slice(c, min(c + width, n_images)) for c in range(0, n_images, width)] or [slice(0, 0)]

    def block(rows: slice, cols: slice) -> Tensor:
        if into is None:
            return check_block(speech_block, rows, n_images)
        out = into[: rows.stop - rows.start, : cols.stop - cols.start]
        return speech_block(rows, out=out, cols=None if len(chunks) == 1 else cols)  # [rows, cols]

    # Another scorer's blocks are not bounded by the embeddings: always checked.
    may_be_nan = into is None or _scores_may_be_nan(speech_emb, image_emb)
    # The relevant item counts itself as ranked ahead of itself under ">=" only.
    self_count = 1 if ties == "pessimistic" else 0
    compare = torch.ge if ties == "pessimistic" else torch.gt

    def count(scores: Tensor, threshold: Tensor, dim: int) -> Tensor:
        # A bool tensor viewed as uint8 sums straight into int32, without an int64 copy of the block.
        out = compare(scores, threshold, out=mask[: scores.shape[0], : scores.shape[1]])
        return out.view(torch.uint8).sum(dim=dim, dtype=torch.int32)

    def counting_pass(positive: Tensor, best: Tensor, record: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per caption the images ranked ahead of its own, per image the captions ahead of its best; ``record``
        receives the scores the blocks give each caption with its own image."""
        ahead_of_caption = torch.zeros(n_captions, dtype=torch.long, device=device)
        ahead_of_image = torch.zeros(n_images, dtype=torch.long, device=device)
        for cols in chunks:
            own_here = (labels >= cols.start) & (labels < cols.stop)  # [n_captions]: image in this chunk
            for start in range(0, n_captions, rows_per_block):
                rows = slice(start, min(start + rows_per_block, n_captions))
                scores = block(rows, cols)  # [rows, cols]
                if may_be_nan:
                    check_no_nan(scores)
                ahead_of_caption[rows] += count(scores, positive[rows, None], 1)
                ahead_of_image[cols] += count(scores, best[None, cols], 0)
                if record is not None:
                    here = own_here[rows].nonzero()[:, 0]  # [n]: rows whose own image is in the chunk
                    record[start + here] = scores[here, labels[start + here] - cols.start]
                del scores
        return ahead_of_caption, ahead_of_image

    positive = torch.empty_like(expected)
    ahead_of_caption, ahead_of_image = counting_pass(expected, best, positive)
    if not torch.equal(positive, expected):  # a BLAS kernel rounded the tiles differently: count the main values
        best = _best_of(positive, labels, n_images)
        ahead_of_caption, ahead_of_image = counting_pass(positive, best, None)
    s2i = 1 + ahead_of_caption - self_count
    relevant_ahead = torch.zeros_like(ahead_of_image).scatter_add_(
        0, labels, compare(positive, best[labels]).long()
    )
    has_caption = torch.bincount(labels, minlength=n_images) > 0
    i2s = torch.where(has_caption, 1 + ahead_of_image - relevant_ahead, torch.zeros_like(ahead_of_image))
    return s2i.cpu(), i2s.cpu()


@torch.no_grad()
def recall_at_k(
    speech_emb: Tensor,
    image_emb: Tensor,
    caption_image: Tensor,
    ks: Sequence[int] = _DEFAULT_KS,
    chunk_size: int = 1024,
    *,
    ties: Ties = "pessimistic",
    ir_metrics: bool = False,
    ndcg_k: int = 10,
) -> dict[str, Any]:
    """Dot-product retrieval metrics in both directions (see :func:`retrieval_metrics` for the result).

    Without ``ir_metrics`` the ranks come from :func:`dot_product_ranks` (one matrix product, cache-sized
    blocks); with it, from :func:`retrieval_metrics` on :func:`dot_product_blocks`.

    Args:
        speech_emb: ``[n_captions, D]`` caption embeddings (normalise them first for cosine similarity).
        image_emb: ``[n_images, D]`` embeddings of the unique images.
        caption_image: int64 ``[n_captions]``, index of each caption's image in ``image_emb``.
        ks: recall cut-offs.
        chunk_size: queries per similarity block (an upper bound for :func:`dot_product_ranks`).
        ties: tie rule (see the module docstring).
        ir_metrics, ndcg_k: see :func:`retrieval_metrics`.
    """
    _check_embeddings(speech_emb, image_emb)
    if len(caption_image) != len(speech_emb):
        raise ValueError(f"caption_image has {len(caption_image)} entries for {len(speech_emb)} captions")
    if ir_metrics:
        s2i_block, i2s_block = dot_product_blocks(speech_emb, image_emb)
        return retrieval_metrics(s2i_block, i2s_block, caption_image, len(image_emb), ks=ks,
                                 chunk_size=chunk_size, ties=ties, ir_metrics=True, ndcg_k=ndcg_k)
    ks = _check_ks(ks)
    caption_image = validate_caption_image(caption_image, len(image_emb))
    s2i, i2s = dot_product_ranks(speech_emb, image_emb, caption_image, chunk_size=chunk_size, ties=ties)
    # Images without captions got rank 0 ("nothing relevant"): they are not image -> speech queries.
    i2s = i2s[i2s > 0]
    return combine_directions(metrics_from_ranks(s2i, ks), metrics_from_ranks(i2s, ks), ks)


def shared_labels(*id_lists: Sequence[Hashable] | Tensor) -> list[Tensor]:
    """Image ids of several item lists → int64 labels that agree across the lists.

    Integer tensors are taken as labels already (e.g. image indices of one dataset); any other sequence of
    hashable ids is mapped through one shared table, in first-seen order.
    """
    if all(isinstance(ids, Tensor) for ids in id_lists):
        out = []
        for ids in id_lists:
            if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise ValueError(f"image labels must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}")
            out.append(ids.long().cpu())
        return out
    position: dict[Hashable, int] = {}
    return [
        torch.tensor([position.setdefault(_hashable(i), len(position)) for i in ids], dtype=torch.long)
        for ids in id_lists
    ]


def _hashable(value: Any) -> Hashable:
    return value.item() if isinstance(value, Tensor) else value


@torch.no_grad()
def speech_text_retrieval(
    speech_emb: Tensor,
    text_emb: Tensor,
    speech_images: Sequence[Hashable] | Tensor,
    text_images: Sequence[Hashable] | Tensor,
    *,
    ks: Sequence[int] = _DEFAULT_KS,
    chunk_size: int = 1024,
    ties: Ties = "pessimistic",
) -> dict[str, Any]:
    """Zero-shot speech <-> text retrieval scored by image ids, by dot products in bounded-memory chunks.

    ``speech_to_text``: each spoken caption ranks every caption text and hits at K when a text of *its
    image* is among the top K (the best rank over that image's texts). ``text_to_speech``: each text ranks
    every spoken caption the same way. Relevance comes from image ids, not from caption pairing, because a
    caption of the same image is a correct answer too (the published convention). A query whose
    image has nothing on the other side is left out of that direction (``n_queries`` counts the rest). Ties
    follow the module's rule.

    Args:
        speech_emb: ``[Ns, D]`` spoken-caption embeddings (L2-normalised for cosine similarity).
        text_emb: ``[Nt, D]`` caption-text embeddings in the same space.
        speech_images: image id of every spoken caption (hashable ids, or int64 labels as a tensor).
        text_images: image id of every text (the same kind of ids as ``speech_images``).
        ks: recall cut-offs.
        chunk_size: queries per similarity block.
        ties: tie rule (see the module docstring).

    Returns:
        ``{"speech_to_text": {...}, "text_to_speech": {...}, "mean_R@K": ...}``; each direction holds
        ``"R@K"`` (percent), ``"mean_rank"``, ``"median_rank"`` and ``"n_queries"``.
    """
    ks = _check_ks(ks)
    _check_embeddings(speech_emb, text_emb)
    if len(speech_images) != len(speech_emb) or len(text_images) != len(text_emb):
        raise ValueError(f"{len(speech_images)} image ids for {len(speech_emb)} spoken captions and "
                         f"{len(text_images)} for {len(text_emb)} texts")
    speech_labels, text_labels = shared_labels(speech_images, text_images)

    def speech_block(rows: slice) -> Tensor:
        return speech_emb[rows] @ text_emb.T

    def text_block(rows: slice) -> Tensor:
        return text_emb[rows] @ speech_emb.T

    s2t = first_hit_ranks(speech_block, speech_labels, text_labels, chunk_size=chunk_size, ties=ties)
    t2s = first_hit_ranks(text_block, text_labels, speech_labels, chunk_size=chunk_size, ties=ties)
    s2t, t2s = s2t[s2t > 0], t2s[t2s > 0]  # queries whose image has nothing on the other side
    if s2t.numel() == 0 or t2s.numel() == 0:
        raise ValueError("no spoken caption and text share an image id: nothing to retrieve")
    return _combine("speech_to_text", metrics_from_ranks(s2t, ks), "text_to_speech", metrics_from_ranks(t2s, ks), ks)


def _combine(name_a: str, a: dict[str, Any], name_b: str, b: dict[str, Any], ks: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {name_a: a, name_b: b}
    for k in ks:
        out[f"mean_R@{k}"] = (a[f"R@{k}"] + b[f"R@{k}"]) / 2
    return out


#: Direction keys and their table labels, in the order tables list them.
DIRECTION_LABELS = {
    "speech_to_image": "speech to image",
    "image_to_speech": "image to speech",
    "speech_to_text": "speech to text",
    "text_to_speech": "text to speech",
}

#: What the gallery of each direction holds (the unit printed beside its size).
GALLERY_UNITS = {
    "speech_to_image": "images",
    "image_to_speech": "spoken captions",
    "speech_to_text": "caption texts",
    "text_to_speech": "spoken captions",
}


def chance_recall(n_gallery: int, positives: Sequence[int], ks: Sequence[int] = _DEFAULT_KS) -> dict[str, float]:
    """Expected R@K (percent) of a ranking drawn uniformly at random: the floor a number must be read against.

    A query with ``c`` relevant items among ``n_gallery`` hits at K with probability
    ``1 - C(n_gallery - c, K) / C(n_gallery, K)`` (none of the ``c`` among the first K of a random order), which is
    exactly ``K / n_gallery`` for a single relevant item and 1 once ``K > n_gallery - c``. The result is that
    probability averaged over the queries, one entry of ``positives`` (their ``c``) each, keyed ``chance_R@K``.
    Computed with exact integer binomials, so it holds for any gallery size.
    """
    ks = _check_ks(ks)
    if n_gallery < 1:
        raise ValueError(f"n_gallery must be >= 1, got {n_gallery}")
    counts: dict[int, int] = {}
    for c in positives:
        c = int(c)
        if not 1 <= c <= n_gallery:
            raise ValueError(f"a query has {c} relevant items in a gallery of {n_gallery}")
        counts[c] = counts.get(c, 0) + 1
    n_queries = sum(counts.values())
    if n_queries == 0:
        raise ValueError("no queries to evaluate")
    out: dict[str, float] = {}
    for k in ks:
        total = 0.0
        for c, n in counts.items():
            # int / int is correctly rounded in Python even when both binomials are far beyond float range.
            miss = math.comb(n_gallery - c, k) / math.comb(n_gallery, k) if k <= n_gallery - c else 0.0
            total += n * (1.0 - miss)
        out[f"chance_R@{k}"] = 100.0 * total / n_queries
    return out


def gallery_sizes(caption_image: Tensor, n_images: int, ks: Sequence[int] = _DEFAULT_KS) -> dict[str, dict[str, Any]]:
    """Gallery size and chance recall of both speech <-> image directions, as :func:`retrieval_metrics` counts them.

    A recall number means little without them: R@10 = 100 over a gallery of 8 images is what any ranking scores.
    ``speech_to_image``: every caption queries the ``n_images`` unique images, one of them relevant (chance
    ``K / n_images``). ``image_to_speech``: every image with a caption queries all captions, its own ``c`` being
    relevant (see :func:`chance_recall`). Returns ``{direction: {"n_gallery": int, "chance_R@K": float}}``, to
    merge into the directions of a result (evaluation does; :func:`format_recall_table` prints them).
    """
    caption_image = validate_caption_image(caption_image, n_images)
    per_image = torch.bincount(caption_image, minlength=n_images)
    n_captions = int(caption_image.numel())
    return {
        "speech_to_image": {"n_gallery": int(n_images), **chance_recall(n_images, [1] * n_captions, ks)},
        "image_to_speech": {"n_gallery": n_captions,
                            **chance_recall(n_captions, per_image[per_image > 0].tolist(), ks)},
    }


def format_recall_table(results: Mapping[str, Any], ceiling: Mapping[str, Any] | None = None,
                        ks: Sequence[int] = (1, 5, 10)) -> str:
    """A plain-text table of R@K per direction (percent), with the ceiling row under each when given.

    When the results carry them (:func:`gallery_sizes`; :func:`vgskit.retrieval.evaluate.evaluate` adds them),
    every direction also shows its number of queries and gallery size, a ``(chance)`` row with the recall of a
    random ranking, and a warning line for every K that is at least the gallery size: such a column reads 100
    for any model, and a small test split must not pass for a good result.
    """
    gallery = any("n_gallery" in results.get(key, {}) for key in DIRECTION_LABELS)
    head = f"{'direction':<18}" + "".join(f"{f'R@{k}':>8}" for k in ks)
    lines = [head + (f"{'queries':>10}{'gallery':>10}" if gallery else "")]
    warnings: list[str] = []
    for key, label in DIRECTION_LABELS.items():
        if key not in results:
            continue
        row = results[key]
        line = f"{label:<18}" + "".join(f"{row[f'R@{k}']:>8.1f}" for k in ks)
        if "n_gallery" in row:
            n_gallery = int(row["n_gallery"])
            line += f"{row.get('n_queries', ''):>10}{n_gallery:>10}"
            if all(f"chance_R@{k}" in row for k in ks):
                lines.append(line)
                line = f"{'  (chance)':<18}" + "".join(f"{row[f'chance_R@{k}']:>8.1f}" for k in ks)
            big = [k for k in ks if k >= n_gallery]
            if big:
                unit = GALLERY_UNITS.get(key, "items")
                unit = unit[:-1] if n_gallery == 1 else unit
                names = " and ".join(", ".join(f"R@{k}" for k in big).rsplit(", ", 1))
                warnings.append(f"warning: {label}: the gallery holds only {n_gallery} {unit}, so {names} "
                                f"(K >= gallery size) {'is' if len(big) == 1 else 'are'} 100 for any ranking")
        lines.append(line)
        if ceiling is not None and key in ceiling:
            lines.append(f"{'  (ceiling)':<18}" + "".join(f"{ceiling[key][f'R@{k}']:>8.1f}" for k in ks))
    return "\n".join(lines + warnings)
