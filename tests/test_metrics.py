"""Retrieval metrics against a brute-force reference (full score matrix, Python loops)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import pytest
import torch

from vgskit.metrics import first_hit_ranks, image_index_from_ids, recall_at_k, retrieval_metrics
from vgskit.retrieval.evaluate import coarse_candidates, evaluate_retrieval

KS = (1, 2, 5, 10, 50)


# ----------------------------------------------------------------------------------------- reference ----
def _beats(ties: str) -> Callable[[float, float], bool]:
    return (lambda a, b: a >= b) if ties == "pessimistic" else (lambda a, b: a > b)


def brute_rank(row: list[float], relevant: list[bool], ties: str) -> int | None:
    """1 + number of irrelevant items beating the best relevant one; None if nothing is relevant."""
    if not any(relevant):
        return None
    best = max(s for s, r in zip(row, relevant, strict=True) if r)
    beats = _beats(ties)
    return 1 + sum(1 for s, r in zip(row, relevant, strict=True) if not r and beats(s, best))


def brute_rerank_rank(
    coarse: list[float], fine: list[float], relevant: list[bool], top: int, ties: str
) -> int | None:
    """Candidates = coarse top-`top` (ties: lower index first) ordered by fine score, then the rest by coarse."""
    order = sorted(range(len(coarse)), key=lambda g: (-coarse[g], g))
    cand, rest = order[:top], order[top:]
    beats = _beats(ties)
    if any(relevant[g] for g in cand):
        best = max(fine[g] for g in cand if relevant[g])
        return 1 + sum(1 for g in cand if not relevant[g] and beats(fine[g], best))
    if not any(relevant[g] for g in rest):
        return None
    best = max(coarse[g] for g in rest if relevant[g])
    return len(cand) + 1 + sum(1 for g in rest if not relevant[g] and beats(coarse[g], best))


def brute_direction(ranks: list[int | None], ks: tuple[int, ...]) -> dict[str, Any]:
    kept = [r for r in ranks if r is not None]
    out: dict[str, Any] = {f"R@{k}": 100.0 * sum(r <= k for r in kept) / len(kept) for k in ks}
    out["mean_rank"] = sum(kept) / len(kept)
    out["median_rank"] = float(statistics.median(kept))
    out["n_queries"] = len(kept)
    return out


def brute_metrics(
    s2i_scores: list[list[float]],
    i2s_scores: list[list[float]],
    caption_image: list[int],
    ks: tuple[int, ...],
    ties: str,
    rerank: tuple[list[list[float]], list[list[float]], int] | None = None,
) -> dict[str, Any]:
    """Full metrics; `rerank` = (fine s2i matrix, fine i2s matrix, top) switches to coarse-to-fine."""
    n_images = len(i2s_scores)
    s2i_ranks, i2s_ranks = [], []
    for c, row in enumerate(s2i_scores):
        rel = [i == caption_image[c] for i in range(n_images)]
        s2i_ranks.append(
            brute_rank(row, rel, ties)
            if rerank is None
            else brute_rerank_rank(row, rerank[0][c], rel, rerank[2], ties)
        )
    for i, row in enumerate(i2s_scores):
        rel = [caption_image[c] == i for c in range(len(caption_image))]
        i2s_ranks.append(
            brute_rank(row, rel, ties)
            if rerank is None
            else brute_rerank_rank(row, rerank[1][i], rel, rerank[2], ties)
        )
    out: dict[str, Any] = {
        "speech_to_image": brute_direction(s2i_ranks, ks),
        "image_to_speech": brute_direction(i2s_ranks, ks),
    }
    for k in ks:
        out[f"mean_R@{k}"] = (out["speech_to_image"][f"R@{k}"] + out["image_to_speech"][f"R@{k}"]) / 2
    return out


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, dict):
            assert got[key].keys() == value.keys()
            for name, v in value.items():
                assert got[key][name] == pytest.approx(v, rel=1e-12, abs=1e-12), (key, name)
        else:
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


# -------------------------------------------------------------------------------------------- data ----
def make_data(
    seed: int, n_images: int = 13, dim: int = 3, quantised: bool = True, empty_images: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1-7 captions per image (some images none), captions shuffled.

    Quantised embeddings take values in {-1, 0, 1}, so scores are small integers with many exact ties.
    """
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 8, (n_images,), generator=g)
    counts[torch.randperm(n_images, generator=g)[:empty_images]] = 0
    caption_image = torch.repeat_interleave(torch.arange(n_images), counts)
    caption_image = caption_image[torch.randperm(len(caption_image), generator=g)]
    if quantised:
        image_emb = torch.randint(-1, 2, (n_images, dim), generator=g).float()
        speech_emb = torch.randint(-1, 2, (len(caption_image), dim), generator=g).float()
    else:
        image_emb = torch.randn(n_images, dim, generator=g)
        speech_emb = image_emb[caption_image] + 0.8 * torch.randn(len(caption_image), dim, generator=g)
    return speech_emb, image_emb, caption_image


def has_ties(scores: torch.Tensor) -> bool:
    return any(len(set(row.tolist())) < len(row) for row in scores)


# ------------------------------------------------------------------------------------------- tests ----
def test_image_index_from_ids_first_seen_order() -> None:
    unique, index = image_index_from_ids(["b", "a", "b", "c", "a", "a"])
    assert unique == ["b", "a", "c"]
    assert index.dtype == torch.long
    assert index.tolist() == [0, 1, 0, 2, 1, 1]


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("chunk", [1, 7, "N", "N+5"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force(seed: int, chunk: int | str, ties: str) -> None:
    speech, image, caption_image = make_data(seed)
    scores = speech @ image.T
    assert has_ties(scores) and has_ties(scores.T)  # the data must exercise the tie rule
    n = len(speech)
    chunk_size = {"N": n, "N+5": n + 5}.get(chunk, chunk)  # type: ignore[arg-type]
    got = recall_at_k(speech, image, caption_image, KS, chunk_size=int(chunk_size), ties=ties)  # type: ignore[arg-type]
    want = brute_metrics(scores.tolist(), scores.T.tolist(), caption_image.tolist(), KS, ties)
    assert_same(got, want)


def test_images_without_captions_are_distractors_only() -> None:
    speech, image, caption_image = make_data(3, empty_images=3)
    res = recall_at_k(speech, image, caption_image, (1,))
    assert res["image_to_speech"]["n_queries"] == len(image) - 3
    assert res["speech_to_image"]["n_queries"] == len(speech)


def test_tie_rules_on_a_collapsed_model() -> None:
    # Every score equal: the pessimistic rule puts each relevant item behind all distractors.
    speech, image = torch.ones(6, 4), torch.ones(3, 4)
    caption_image = torch.tensor([0, 0, 1, 1, 1, 2])
    pess = recall_at_k(speech, image, caption_image, (1, 3, 4))
    opt = recall_at_k(speech, image, caption_image, (1, 3, 4), ties="optimistic")
    assert pess["speech_to_image"]["R@1"] == 0.0 and pess["speech_to_image"]["R@3"] == 100.0
    assert pess["speech_to_image"]["mean_rank"] == 3.0
    # image -> speech: ranks 1 + (6 - n_captions) = 5, 4, 6.
    assert pess["image_to_speech"]["mean_rank"] == 5.0 and pess["image_to_speech"]["R@4"] == pytest.approx(
        100 / 3
    )
    assert opt["speech_to_image"]["R@1"] == 100.0 and opt["image_to_speech"]["mean_rank"] == 1.0


def test_tie_rule_is_independent_of_gallery_order() -> None:
    speech, image, caption_image = make_data(4)
    perm = torch.randperm(len(image), generator=torch.Generator().manual_seed(0))
    inverse = torch.argsort(perm)
    a = recall_at_k(speech, image, caption_image, KS)
    b = recall_at_k(speech, image[perm], inverse[caption_image], KS)
    assert_same(a, b)


def test_fewer_than_ten_items() -> None:
    speech = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.1]])
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    caption_image = torch.tensor([0, 1, 1, 2])
    res = recall_at_k(speech, image, caption_image)
    # speech -> image ranks: 1, 1, 2 (image 2 scores 0.98 > 0.8), 2 (image 0 scores 1.0 > 0.77)
    assert res["speech_to_image"]["R@1"] == 50.0
    assert res["speech_to_image"]["R@10"] == 100.0
    assert res["speech_to_image"]["median_rank"] == 1.5
    assert_same(
        res,
        brute_metrics(
            (speech @ image.T).tolist(), (image @ speech.T).tolist(), [0, 1, 1, 2], (1, 5, 10), "pessimistic"
        ),
    )


def test_score_blocks_are_bounded_by_chunk_size() -> None:
    speech, image, caption_image = make_data(5, n_images=11)
    seen: list[tuple[int, int]] = []

    def s2i(rows: slice) -> torch.Tensor:
        out = speech[rows] @ image.T
        seen.append(tuple(out.shape))  # type: ignore[arg-type]
        return out

    def i2s(rows: slice) -> torch.Tensor:
        out = image[rows] @ speech.T
        seen.append(tuple(out.shape))  # type: ignore[arg-type]
        return out

    res = retrieval_metrics(s2i, i2s, caption_image, len(image), chunk_size=4)
    assert max(rows for rows, _ in seen) <= 4
    assert sum(rows for rows, cols in seen if cols == len(image)) == len(speech)
    assert_same(res, recall_at_k(speech, image, caption_image))


def test_first_hit_ranks_marks_queries_without_relevant_items() -> None:
    ranks = first_hit_ranks(
        lambda rows: torch.zeros(rows.stop - rows.start, 3), torch.tensor([0, 5]), torch.arange(3)
    )
    assert ranks.tolist() == [3, 0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"caption_image": torch.tensor([0, 3])}, "indices"),
        ({"caption_image": torch.tensor([0.0, 1.0])}, "integer"),
        ({"ks": (0,)}, "ks"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"speech_emb": torch.tensor([[float("nan"), 0.0], [1.0, 0.0]])}, "NaN"),
    ],
)
def test_invalid_inputs(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "speech_emb": torch.eye(2),
        "image_emb": torch.eye(2),
        "caption_image": torch.tensor([0, 1]),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        recall_at_k(**args)


# ------------------------------------------------------------------------------------- re-ranking ----
def fine_matrix(seed: int, n_captions: int, n_images: int) -> torch.Tensor:
    """Fine scores [caption, image] on a coarse integer grid, so that they tie too."""
    return torch.randint(-3, 4, (n_captions, n_images), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize(
    ("top", "chunk", "batch"), [(1, 7, None), (3, 1, 1), (4, 5, 5), (13, 100, None), (15, 3, 2)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_rerank_matches_brute_force(seed: int, top: int, chunk: int, batch: int | None, ties: str) -> None:
    speech, image, caption_image = make_data(seed, n_images=13)
    fine = fine_matrix(seed + 10, len(speech), len(image))
    coarse = speech @ image.T

    def reranker(speech_idx: torch.Tensor, image_idx: torch.Tensor) -> torch.Tensor:
        return fine[speech_idx, image_idx]

    got = evaluate_retrieval(
        speech,
        image,
        caption_image,
        ks=KS,
        chunk_size=chunk,
        reranker=reranker,
        rerank_top=top,
        rerank_batch_size=batch,
        ties=ties,  # type: ignore[arg-type]
    )
    want = brute_metrics(
        coarse.tolist(),
        coarse.T.tolist(),
        caption_image.tolist(),
        KS,
        ties,
        rerank=(fine.tolist(), fine.T.tolist(), top),
    )
    assert_same(got, want)


def test_rerank_with_every_item_a_candidate_equals_full_fine_ranking() -> None:
    speech, image, caption_image = make_data(6, quantised=False)
    fine = fine_matrix(7, len(speech), len(image))
    got = evaluate_retrieval(
        speech, image, caption_image, ks=KS, reranker=lambda s, i: fine[s, i], rerank_top=len(speech)
    )
    want = retrieval_metrics(
        lambda rows: fine[rows], lambda rows: fine.T[rows], caption_image, len(image), ks=KS
    )
    assert_same(got, want)


@pytest.mark.parametrize("top", [1, 3, 10, 200])
def test_rerank_by_coarse_scores_changes_nothing(top: int) -> None:
    speech, image, caption_image = make_data(8, n_images=20, dim=8, quantised=False)
    assert not has_ties(speech @ image.T) and not has_ties(image @ speech.T)
    got = evaluate_retrieval(
        speech,
        image,
        caption_image,
        ks=KS,
        reranker=lambda s, i: (speech[s] * image[i]).sum(1),
        rerank_top=top,
        chunk_size=6,
    )
    assert_same(got, recall_at_k(speech, image, caption_image, KS))


def test_coarse_candidates_break_ties_by_lower_index() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    cand = coarse_candidates(lambda rows: scores[rows], 2, 2, chunk_size=1)
    assert cand.tolist() == [[1, 2], [0, 1]]


def test_reranker_bad_output_is_rejected() -> None:
    speech, image, caption_image = make_data(9)
    with pytest.raises(ValueError, match="shape"):
        evaluate_retrieval(
            speech, image, caption_image, reranker=lambda s, i: torch.zeros(len(s), 2), rerank_top=3
        )
    with pytest.raises(ValueError, match="NaN"):
        evaluate_retrieval(
            speech,
            image,
            caption_image,
            reranker=lambda s, i: torch.full((len(s),), float("nan")),
            rerank_top=3,
        )
