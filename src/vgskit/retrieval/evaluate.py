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

from vgskit.contract import Embeddings
from vgskit.metrics import (
    ScoreBlock,
    Ties,
    check_block,
    check_no_nan,
    combine_directions,
    count_ranked_above,
    dot_product_blocks,
    gallery_sizes,
    metrics_from_ranks,
    positive_lists,
    ranked_above,
    ranks_given_positives,
    recall_at_k,
    validate_caption_image,
)
from vgskit.precision import autocast, current_precision, precision_scope, resolve_precision

__all__ = ["PairScorer", "Reranker", "coarse_candidates", "embed_images", "embed_speech", "evaluate", "evaluate_retrieval",
           "map_speech", "pair_scorer", "reranked_first_hit_ranks"]

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


#: Pairs per fine-scorer call when the caller does not say (memory stays bounded whatever K and the chunk size).
DEFAULT_RERANK_BATCH = 4096


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
        rerank_batch_size: pairs per reranker call (``None``: at most :data:`DEFAULT_RERANK_BATCH`). A cross
            encoder holds activations for every pair of a call: 1,024 queries x 100 candidates at once would take
            tens of GiB at the FaST-VGS paper's widths.
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
        "batch_size": rerank_batch_size if rerank_batch_size is not None else DEFAULT_RERANK_BATCH,
        "ties": ties,
    }

    def image_query(image_idx: Tensor, speech_idx: Tensor) -> Tensor:
        # For image -> speech the query is the image: swap into the reranker's (speech, image) order.
        return reranker(speech_idx, image_idx)

    s2i = reranked_first_hit_ranks(s2i_block, reranker, caption_image, image_labels, **common)
    i2s = reranked_first_hit_ranks(i2s_block, image_query, image_labels, caption_image, **common)
    i2s = i2s[i2s > 0]  # images without captions have nothing to retrieve
    return combine_directions(metrics_from_ranks(s2i, ks), metrics_from_ranks(i2s, ks), ks)


# ------------------------------------------------------------------------------------------------------------
# The one evaluation entry point: a model and a dataset -> recall (coarse or coarse-to-fine) + family extras
# ------------------------------------------------------------------------------------------------------------


def _length_order(dataset: Any) -> list[int]:
    lengths = dataset.num_samples()
    return sorted(range(len(dataset)), key=lambda i: lengths[i])


def _model_device(model: Any) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _float32(out: Any) -> Any:
    """Floating tensors in ``out`` (a tensor, :class:`Embeddings`, a list or tuple of them) as float32.

    Under bf16 autocast a forward returns bfloat16 tensors; callers get float32, as in an fp32 run, so that
    what they compute from the rows (scores, stored vectors) does not depend on the precision's dtype.
    """
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, Embeddings):
        return Embeddings(out.pooled.float(), None if out.tokens is None else out.tokens.float(), out.mask)
    if isinstance(out, (list, tuple)):
        return type(out)(_float32(x) for x in out)
    return out


@torch.no_grad()
def map_speech(model: torch.nn.Module, dataset: Any, fn: Callable[[Any], Any], batch_size: int = 128,
               precision: str | None = None) -> list[Any]:
    """``fn(SpeechInputs) -> per-row results`` over every caption of ``dataset``, in dataset order.

    Captions are batched in length order (little padding) with the model in eval mode (restored after).
    ``fn`` returns something indexable by row (a tensor ``[B, ...]``, :class:`~vgskit.contract.Embeddings`,
    a list); the rows come back as a list in dataset order. ``fn`` runs at ``precision`` (``"fp32"`` or
    ``"bf16"``, see :func:`vgskit.precision.resolve_precision`; ``None``: the enclosing
    :func:`~vgskit.precision.precision_scope`'s, fp32 by default); under bf16 its floating tensors are cast
    to float32.
    """
    _check_positive("batch_size", batch_size)
    device = _model_device(model)
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    try:
        order = _length_order(dataset)
        rows: list[Any] = [None] * len(dataset)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            with autocast(precision, device):
                out = fn(dataset.speech_inputs(idx))
            if precision != "fp32":
                out = _float32(out)
            for row, i in enumerate(idx):
                rows[i] = out[row] if not isinstance(out, Embeddings) else out.select([row])
    finally:
        model.train(was_training)
    return rows


@torch.no_grad()
def embed_speech(model: Any, dataset: Any, batch_size: int = 128, precision: str | None = None) -> Embeddings:
    """:class:`Embeddings` of every caption of ``dataset`` (dataset order; float32, CPU).

    ``precision``: ``"fp32"`` or ``"bf16"`` autocast for the forward (:func:`vgskit.precision.resolve_precision`
    applies the fallback rule); ``None``: the enclosing :func:`~vgskit.precision.precision_scope`'s, fp32 by
    default. The embeddings are float32 either way.
    """
    _check_positive("batch_size", batch_size)
    device = _model_device(model)
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    try:
        order = _length_order(dataset)
        parts, positions = [], []
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            with autocast(precision, device):
                emb = model.embed_speech(dataset.speech_inputs(idx))
            parts.append(emb.float_cpu())  # float32 after the forward: bf16 stops at the model's output
            positions.extend(idx)
    finally:
        model.train(was_training)
    emb = Embeddings.cat(parts)
    inverse = torch.empty(len(positions), dtype=torch.long)
    inverse[torch.tensor(positions, dtype=torch.long)] = torch.arange(len(positions))
    return emb.select(inverse) if emb.tokens is not None else Embeddings(emb.pooled[inverse])


@torch.no_grad()
def embed_images(model: Any, dataset: Any, batch_size: int = 128, precision: str | None = None) -> Embeddings:
    """:class:`Embeddings` of every distinct image of ``dataset`` (``image_keys`` order; float32, CPU).

    ``precision`` as in :func:`embed_speech`.
    """
    _check_positive("batch_size", batch_size)
    device = _model_device(model)
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    try:
        n = len(dataset.image_keys)
        parts = []
        for s in range(0, n, batch_size):
            with autocast(precision, device):
                emb = model.embed_image(dataset.image_inputs(range(s, min(s + batch_size, n))))
            parts.append(emb.float_cpu())
    finally:
        model.train(was_training)
    return Embeddings.cat(parts)


def pair_scorer(model: Any, speech: Embeddings, image: Embeddings, device: torch.device | None = None) -> Reranker:
    """The model's ``score_pairs`` as a :data:`Reranker` over stored embeddings (rows picked per pair batch)."""
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))

    @torch.no_grad()
    def score(speech_idx: Tensor, image_idx: Tensor) -> Tensor:
        s = speech.select(speech_idx.cpu()).to_device(device)
        i = image.select(image_idx.cpu()).to_device(device)
        return model.score_pairs(s, i).float().reshape(-1).cpu()

    return score


def evaluate(
    model: Any,
    dataset: Any,
    *,
    rerank_top: int | None = None,
    extras: Sequence[str] | dict[str, dict[str, Any]] = (),
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 128,
    rerank_batch_size: int | None = None,
    source: str | None = None,
    exhaustive_fine: bool = False,
    precision: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset``: recall both directions, optionally coarse-to-fine, plus extras.

    This is the one entry point that validation during training, ``vgskit eval``, the demo and the search
    engine's checks use.

    Args:
        model: a :class:`~vgskit.models.base.RetrievalModel`.
        dataset: a :class:`~vgskit.data.loader.SpokenCaptionDataset` (``speech_inputs``, ``image_inputs``,
            ``caption_image_index``, ``image_keys``).
        rerank_top: re-rank the best ``rerank_top`` coarse candidates of every query with the model's
            ``score_pairs`` (models with ``has_fine_scores``); ``None``: coarse scores only.
        extras: family evaluations by name (see :func:`vgskit.extensions.list_evaluations`), or a mapping
            name → options; each result is stored under its name.
        ks: recall cut-offs.
        batch_size: captions / images per embedding batch.
        rerank_batch_size: pairs per ``score_pairs`` call (``None``: a whole block of queries).
        source: the data's name for error messages (e.g. the manifest and split).
        exhaustive_fine: also score *every* (caption, image) pair with ``score_pairs`` (re-ranking the whole
            gallery of each direction): the ceiling of coarse-to-fine, which tells how much recall the cut-off at
            ``rerank_top`` loses. It costs ``n_captions x n_images`` fine scores, so it is asked for explicitly.
        precision: ``"fp32"`` or ``"bf16"``: autocast of the embedding passes and of the extras' forwards
            (:func:`vgskit.precision.resolve_precision`: bf16 falls back to fp32, with a warning, where the
            device has no native bf16); ``None``: the enclosing :func:`~vgskit.precision.precision_scope`'s,
            fp32 by default. Embeddings are cast to float32 before scoring. The fine scorer (``score_pairs``)
            stays fp32: its scores are ranked directly, and bf16 would round them to 8 significant bits, which
            creates ties the pessimistic tie rule counts against the model.

    Returns:
        :func:`evaluate_retrieval`'s dictionary (with ``rerank_top`` when re-ranked), each direction also holding
        its gallery size ``n_gallery`` and the recall of a random ranking ``chance_R@K``
        (:func:`vgskit.metrics.gallery_sizes`), plus one entry per extra. With ``rerank_top`` the top-level
        numbers are the coarse-to-fine ones and ``"coarse"`` holds the coarse recall of the same embeddings
        (the dictionary of an evaluation without ``rerank_top``, extras aside), so the gain of the fine stage
        is read from one run; with ``exhaustive_fine``, ``"exhaustive_fine"`` holds the fine-only recall in
        the same shape. A run asked for a precision other than fp32 records the one it ran at as
        ``"precision"``.
    """
    from vgskit.extensions import get_evaluation

    _check_positive("batch_size", batch_size)
    where = source or "the evaluation data"
    requested = dict(extras) if isinstance(extras, dict) else {name: {} for name in extras}
    evaluations = {name: get_evaluation(name) for name in requested}
    if rerank_top is not None:
        _check_positive("rerank_top", rerank_top)
    for option, wanted in (("rerank_top", rerank_top is not None), ("exhaustive_fine", exhaustive_fine)):
        if wanted and not model.has_fine_scores:
            name = getattr(model, "model_name", None) or type(model).__name__
            raise ValueError(f"{option}: model {name!r} has no fine scorer (score_pairs) to re-rank with")
    # Everything the model and the data must offer is checked before the (long) embedding passes.
    for ev in evaluations.values():
        if ev.require_model is not None:
            ev.require_model(model)
        if ev.require_data is not None:
            ev.require_data(dataset, where)
    requested_precision = current_precision() if precision is None else precision
    precision = resolve_precision(requested_precision, _model_device(model))
    speech = embed_speech(model, dataset, batch_size, precision)
    image = embed_images(model, dataset, batch_size, precision)
    caption_image = torch.tensor(dataset.caption_image_index, dtype=torch.long)
    fine = pair_scorer(model, speech, image) if rerank_top is not None or exhaustive_fine else None

    def recall(reranker: Reranker | None, top: int) -> dict[str, Any]:
        # Every pass scores the same stored embeddings: the coarse, coarse-to-fine and exhaustive numbers differ
        # only by the ranking, never by a second (possibly non-deterministic) embedding pass.
        out = evaluate_retrieval(speech.pooled, image.pooled, caption_image, ks=ks, reranker=reranker,
                                 rerank_top=top, rerank_batch_size=rerank_batch_size)
        # Gallery sizes and chance levels beside every recall: R@K means little without them (see
        # format_recall_table).
        for direction, sizes in gallery_sizes(caption_image, len(image.pooled), ks).items():
            out[direction].update(sizes)
        return out

    coarse = recall(None, 1)
    if rerank_top is None:
        results = coarse
    else:
        results = recall(fine, rerank_top)
        results["rerank_top"] = int(rerank_top)
        results["coarse"] = coarse
    if exhaustive_fine:
        # Re-ranking a whole gallery is scoring every pair: the cut-off covers both directions' galleries.
        results["exhaustive_fine"] = recall(fine, max(len(speech.pooled), len(image.pooled), 1))
    for name, ev in evaluations.items():
        options = {**ev.options, **requested[name]}
        # The extras embed through map_speech / embed_speech with precision=None: the scope hands them ours.
        with precision_scope(precision):
            results[name] = ev.fn(model, dataset, batch_size=batch_size, source=where, options=options,
                                  speech_emb=speech.pooled)
    if requested_precision != "fp32":
        results["precision"] = precision  # fp32 results keep their shape; others say what they ran at
    return results
