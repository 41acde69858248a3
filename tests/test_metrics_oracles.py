"""nDCG@10, mAP, MRR and R@K of vgskit.metrics against independent implementations.

* A brute-force reference (full ranking by Python's sort, ties ordered by the tie rule) on data with many ties.
* ``pytrec_eval`` (trec_eval's C code) and ``torchmetrics`` on tie-free scores, in both directions. Those
  libraries break ties by document id or by sort order, so they are only comparable without ties. The papers'
  R@K (at least one relevant item in the top K) is trec_eval's ``success_K`` and torchmetrics'
  ``RetrievalHitRate``, not their IR recall.

Tolerance against the libraries: 1e-6 relative. Every value is a mean of sums of a few rationals ``j / p_j``
and ``1 / log2(p + 1)`` over integer positions, which all three compute in double precision but in different
orders (and a library may round an intermediate to float32), so they agree to far better than 1e-6; while one
relevant item moved by a single position changes a per-query value by more than 1e-3 here, i.e. a mean over
40-200 queries by more than 5e-6.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytrec_eval
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP, RetrievalMRR, RetrievalNormalizedDCG

from test_metrics import KS, make_data
from vgskit.metrics import recall_at_k, retrieval_metrics

IR_KEYS = ("nDCG@10", "mAP", "MRR")
DIRECTIONS = ("speech_to_image", "image_to_speech")


# ----------------------------------------------------------------------------------------- reference ----
def brute_ir(row: list[float], relevant: list[bool], ties: str, k: int = 10) -> dict[str, float] | None:
    """Sort the gallery (equal scores: distractors first if pessimistic, relevant first if optimistic)."""
    n_rel = sum(relevant)
    if n_rel == 0:
        return None
    rel_first = ties == "optimistic"
    order = sorted(range(len(row)), key=lambda g: (-row[g], relevant[g] != rel_first))
    positions = [p + 1 for p, g in enumerate(order) if relevant[g]]
    dcg = sum(1 / math.log2(p + 1) for p in positions if p <= k)
    ideal = sum(1 / math.log2(p + 1) for p in range(1, min(n_rel, k) + 1))
    return {
        "nDCG@10": dcg / ideal,
        "mAP": sum((j + 1) / p for j, p in enumerate(positions)) / n_rel,
        "MRR": 1 / positions[0],
        "first": positions[0],
    }


def brute_direction_ir(scores: torch.Tensor, relevant: torch.Tensor, ties: str) -> dict[str, float]:
    per_query = [brute_ir(s, r, ties) for s, r in zip(scores.tolist(), relevant.tolist(), strict=True)]
    kept = [q for q in per_query if q is not None]
    out = {key: sum(q[key] for q in kept) / len(kept) for key in IR_KEYS}
    out.update({f"R@{k}": 100.0 * sum(q["first"] <= k for q in kept) / len(kept) for k in KS})
    return out


def relevance(caption_image: torch.Tensor, n_images: int) -> dict[str, torch.Tensor]:
    """Boolean relevance matrix of each direction (queries x gallery)."""
    s2i = caption_image[:, None] == torch.arange(n_images)[None, :]
    return {"speech_to_image": s2i, "image_to_speech": s2i.T}


# ------------------------------------------------------------------------------------------- helpers ----
def tie_free_data(seed: int, n_images: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores without ties (as float64 holding float32 values) and the image of each caption.

    1-7 captions per image, plus two images without captions (distractors only). The scores are float32
    values because torchmetrics converts predictions to float32: float64 scores closer than a float32 step
    would tie, or swap, there. They are positive (non-negative embeddings): torchmetrics' average precision and
    reciprocal rank treat an item scoring <= 0 as not retrieved.
    """
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 8, (n_images,), generator=g)
    counts[torch.randperm(n_images, generator=g)[:2]] = 0
    caption_image = torch.repeat_interleave(torch.arange(n_images), counts)
    caption_image = caption_image[torch.randperm(len(caption_image), generator=g)]
    image = torch.rand(n_images, 16, generator=g)
    speech = image[caption_image] + 0.6 * torch.rand(len(caption_image), 16, generator=g)
    scores = (speech @ image.T).double()
    assert scores.min() > 0
    for m in (scores, scores.T):
        assert all(len(set(row)) == len(row) for row in m.tolist())
    return scores, caption_image


def ours(scores: torch.Tensor, caption_image: torch.Tensor, **kw: Any) -> dict[str, Any]:
    return retrieval_metrics(
        lambda rows: scores[rows], lambda rows: scores.T[rows], caption_image, scores.shape[1], ks=KS,
        ir_metrics=True, **kw,
    )


def direction_inputs(scores: torch.Tensor, caption_image: torch.Tensor, direction: str):  # type: ignore[no-untyped-def]
    rel = relevance(caption_image, scores.shape[1])[direction]
    scores = scores if direction == "speech_to_image" else scores.T
    keep = rel.any(dim=1)  # image -> speech: an image without captions is not a query
    return scores[keep], rel[keep]


# --------------------------------------------------------------------------------------------- tests ----
@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ir_metrics_match_brute_force_with_ties(seed: int, chunk: int, ties: str) -> None:
    speech, image, caption_image = make_data(seed, n_images=17, dim=3)
    got = recall_at_k(speech, image, caption_image, KS, chunk_size=chunk, ties=ties, ir_metrics=True)  # type: ignore[arg-type]
    scores = speech @ image.T
    for direction, rel in relevance(caption_image, len(image)).items():
        want = brute_direction_ir(scores if direction == "speech_to_image" else scores.T, rel, ties)
        for key, value in want.items():
            assert got[direction][key] == pytest.approx(value, rel=1e-12, abs=1e-12), (direction, key)


def test_ir_metrics_add_keys_and_change_nothing_else() -> None:
    speech, image, caption_image = make_data(3, n_images=15)
    plain = recall_at_k(speech, image, caption_image, KS)
    extended = recall_at_k(speech, image, caption_image, KS, ir_metrics=True)
    assert plain.keys() == extended.keys()
    for direction in DIRECTIONS:
        assert set(extended[direction]) - set(plain[direction]) == set(IR_KEYS)
        assert {k: extended[direction][k] for k in plain[direction]} == plain[direction]
        assert all(0.0 <= extended[direction][k] <= 1.0 for k in IR_KEYS)
    # One relevant image per caption: average precision is the reciprocal rank.
    assert extended["speech_to_image"]["mAP"] == pytest.approx(extended["speech_to_image"]["MRR"], rel=1e-15)


def test_ir_metrics_on_a_collapsed_model() -> None:
    # Every score equal. Pessimistic: an image's c captions sit behind the 6 - c others, at 7 - c, ..., 6.
    speech, image = torch.ones(6, 4), torch.ones(3, 4)
    caption_image = torch.tensor([0, 0, 1, 1, 1, 2])
    pess = recall_at_k(speech, image, caption_image, (1,), ir_metrics=True)["image_to_speech"]
    ap = [sum(j / (6 - c + j) for j in range(1, c + 1)) / c for c in (2, 3, 1)]
    assert pess["mAP"] == pytest.approx(sum(ap) / 3, rel=1e-15)
    assert pess["MRR"] == pytest.approx((1 / 5 + 1 / 4 + 1 / 6) / 3, rel=1e-15)
    opt = recall_at_k(speech, image, caption_image, (1,), ir_metrics=True, ties="optimistic")
    assert all(opt[d][k] == 1.0 for d in DIRECTIONS for k in IR_KEYS)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_against_pytrec_eval(seed: int, direction: str) -> None:
    all_scores, caption_image = tie_free_data(seed)
    got = ours(all_scores, caption_image, chunk_size=7)[direction]
    scores, rel = direction_inputs(all_scores, caption_image, direction)
    qrels = {f"q{q}": {f"d{g}": 1 for g in r.nonzero()[:, 0].tolist()} for q, r in enumerate(rel)}
    run = {f"q{q}": {f"d{g}": float(s) for g, s in enumerate(row.tolist())} for q, row in enumerate(scores)}
    measures = {"ndcg_cut.10", "map", "recip_rank", "success." + ",".join(map(str, KS))}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    assert len(per_query) == got["n_queries"]

    def mean(name: str) -> float:
        return sum(q[name] for q in per_query.values()) / len(per_query)

    assert got["nDCG@10"] == pytest.approx(mean("ndcg_cut_10"), rel=1e-6)
    assert got["mAP"] == pytest.approx(mean("map"), rel=1e-6)
    assert got["MRR"] == pytest.approx(mean("recip_rank"), rel=1e-6)
    for k in KS:
        assert got[f"R@{k}"] == pytest.approx(100 * mean(f"success_{k}"), rel=1e-6), k


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_against_torchmetrics(seed: int, direction: str) -> None:
    all_scores, caption_image = tie_free_data(seed)
    got = ours(all_scores, caption_image)[direction]
    scores, rel = direction_inputs(all_scores, caption_image, direction)
    preds, target = scores.reshape(-1), rel.reshape(-1)
    indexes = torch.arange(len(scores))[:, None].expand_as(scores).reshape(-1)

    def value(metric: Any) -> float:
        return float(metric(preds, target, indexes=indexes))

    assert got["nDCG@10"] == pytest.approx(value(RetrievalNormalizedDCG(top_k=10)), rel=1e-6)
    assert got["mAP"] == pytest.approx(value(RetrievalMAP()), rel=1e-6)
    assert got["MRR"] == pytest.approx(value(RetrievalMRR()), rel=1e-6)
    for k in KS:
        assert got[f"R@{k}"] == pytest.approx(100 * value(RetrievalHitRate(top_k=k)), rel=1e-6), k
