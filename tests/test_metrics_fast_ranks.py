"""The one-pass counting ranks (vgskit.metrics.dot_product_ranks) against a naive full-matrix reference.

The reference is written here from the definitions, with numpy on the whole score matrix: explicit counting of the
gallery items ranked ahead of the best relevant one (both tie rules), and, on tie-free scores, the position of the
first relevant item in an ``argsort`` of each query's scores. Integer embeddings with products below 2**24 make
every score exact in float32, so the reference and the blocked products see the same values whatever order BLAS
sums in.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vgskit.metrics as metrics
from vgskit.metrics import (
    DotProductBlock,
    dot_product_blocks,
    dot_product_ranks,
    metrics_from_ranks,
    recall_at_k,
)


def naive_counts(scores: np.ndarray, caption_image: np.ndarray, ties: str) -> tuple[np.ndarray, np.ndarray]:
    """Ranks by counting over the full ``[n_captions, n_images]`` matrix, one query at a time."""
    n_captions, n_images = scores.shape
    ahead = np.greater_equal if ties == "pessimistic" else np.greater
    s2i = np.zeros(n_captions, dtype=np.int64)
    for q in range(n_captions):
        own = caption_image[q]
        others = np.delete(scores[q], own)
        s2i[q] = 1 + int(ahead(others, scores[q, own]).sum())
    i2s = np.zeros(n_images, dtype=np.int64)  # 0: an image without captions
    for i in range(n_images):
        mine = caption_image == i
        if mine.any():
            best = scores[mine, i].max()
            i2s[i] = 1 + int(ahead(scores[~mine, i], best).sum())
    return s2i, i2s


def naive_argsort(scores: np.ndarray, caption_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks as 1 + the position of the first relevant item in each query's descending order (tie-free scores)."""
    s2i = np.array([1 + int(np.nonzero(np.argsort(-row, kind="stable") == caption_image[q])[0][0])
                    for q, row in enumerate(scores)])
    i2s = []
    for i in range(scores.shape[1]):
        relevant = np.isin(np.argsort(-scores[:, i], kind="stable"), np.nonzero(caption_image == i)[0])
        i2s.append(1 + int(np.nonzero(relevant)[0][0]) if relevant.any() else 0)
    return s2i, np.array(i2s)


def integer_data(seed: int, n_images: int, dim: int, high: int, counts: list[int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer-valued float32 embeddings (exact scores) and a shuffled caption -> image index."""
    rng = np.random.default_rng(seed)
    counts = counts if counts is not None else [5] * n_images
    caption_image = np.repeat(np.arange(n_images), counts)
    rng.shuffle(caption_image)
    image = rng.integers(-high, high + 1, size=(n_images, dim))
    speech = rng.integers(-high, high + 1, size=(len(caption_image), dim))
    assert dim * high * high < 2**24  # every dot product is exact in float32
    return (torch.tensor(speech, dtype=torch.float32), torch.tensor(image, dtype=torch.float32),
            torch.tensor(caption_image))


def tie_free(scores: np.ndarray) -> bool:
    return all(len(np.unique(row)) == len(row) for row in scores) and all(
        len(np.unique(col)) == len(col) for col in scores.T)


def check(speech: torch.Tensor, image: torch.Tensor, caption_image: torch.Tensor, ties: str, chunk: int = 1024
          ) -> tuple[np.ndarray, np.ndarray]:
    scores = (speech.double() @ image.double().T).numpy()  # exact: integers far below 2**53
    want = naive_counts(scores, caption_image.numpy(), ties)
    got = dot_product_ranks(speech, image, caption_image, chunk_size=chunk, ties=ties)  # type: ignore[arg-type]
    np.testing.assert_array_equal(got[0].numpy(), want[0])
    np.testing.assert_array_equal(got[1].numpy(), want[1])
    return want


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_tie_free_scores_match_counting_and_argsort(ties: str) -> None:
    speech, image, caption_image = integer_data(0, n_images=30, dim=4, high=2000)
    scores = (speech.double() @ image.double().T).numpy()
    assert tie_free(scores)
    s2i, i2s = check(speech, image, caption_image, ties)
    # Without ties both rules are the plain ranking: the argsort positions agree with the counts.
    by_sort = naive_argsort(scores, caption_image.numpy())
    np.testing.assert_array_equal(s2i, by_sort[0])
    np.testing.assert_array_equal(i2s, by_sort[1])


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_exact_ties(ties: str) -> None:
    # Entries in {-1, 0, 1} over 3 dimensions: scores in [-3, 3], so almost every score is tied with others,
    # including each query's relevant score (and a caption with its image's other captions).
    speech, image, caption_image = integer_data(1, n_images=40, dim=3, high=1)
    scores = (speech @ image.T).numpy()
    assert not tie_free(scores)
    s2i, i2s = check(speech, image, caption_image, ties)
    if ties == "optimistic":  # the two rules must really differ on these scores
        pessimistic = naive_counts(scores.astype(np.float64), caption_image.numpy(), "pessimistic")
        assert (pessimistic[0] > s2i).any() and (pessimistic[1] > i2s).any()


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_unequal_caption_counts(ties: str) -> None:
    # 0 to 9 captions per image: images without captions get rank 0 and stay distractors for speech -> image.
    counts = [int(c) for c in np.random.default_rng(2).integers(0, 10, size=50)]
    counts[3] = counts[17] = 0
    speech, image, caption_image = integer_data(2, n_images=50, dim=4, high=6, counts=counts)
    _, i2s = check(speech, image, caption_image, ties)
    assert (i2s == 0).sum() == counts.count(0)


@pytest.mark.parametrize("chunk", [1, 7, 13, 64, 100_000])
@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_block_sizes_that_do_not_divide_the_sizes(chunk: int, ties: str) -> None:
    # 43 images x 211 captions (prime); blocks of 1, 7, 13, 64 rows and a single block.
    counts = [5] * 42 + [1]
    speech, image, caption_image = integer_data(3, n_images=43, dim=5, high=4, counts=counts)
    assert len(speech) == 211
    check(speech, image, caption_image, ties, chunk=chunk)


@pytest.mark.parametrize("budget", [4 * 37 * 33, 4 * 37 * 50])
def test_byte_budget_blocks(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    # The block size from the byte budget (33 or 50 rows of 37 images) does not divide 185 captions either.
    monkeypatch.setattr(metrics, "_FUSED_MIN_ROWS", 1)
    monkeypatch.setattr(metrics, "_FUSED_BLOCK_BYTES", budget)
    speech, image, caption_image = integer_data(4, n_images=37, dim=6, high=5)
    assert len(speech) % metrics.fused_block_rows(len(speech), len(image), 4, 1024) != 0
    check(speech, image, caption_image, "pessimistic")


def test_float_scores_match_the_full_matrix() -> None:
    # Gaussian float32 embeddings (tie-free): against the ranks of the full product computed in one GEMM.
    g = torch.Generator().manual_seed(5)
    image, speech = torch.randn(70, 32, generator=g), torch.randn(350, 32, generator=g)
    caption_image = torch.arange(70).repeat_interleave(5)[torch.randperm(350, generator=g)]
    scores = (speech @ image.T).numpy()
    assert tie_free(scores)
    want = naive_argsort(scores, caption_image.numpy())
    got = dot_product_ranks(speech, image, caption_image, chunk_size=64)
    np.testing.assert_array_equal(got[0].numpy(), want[0])
    np.testing.assert_array_equal(got[1].numpy(), want[1])
    result = recall_at_k(speech, image, caption_image, (1, 5, 10))
    assert result["speech_to_image"] == metrics_from_ranks(torch.from_numpy(want[0]), (1, 5, 10))
    assert result["image_to_speech"] == metrics_from_ranks(torch.from_numpy(want[1]), (1, 5, 10))


def test_scorer_writes_the_same_values_into_a_buffer() -> None:
    g = torch.Generator().manual_seed(6)
    speech, image = torch.randn(100, 48, generator=g), torch.randn(30, 48, generator=g)
    s2i, i2s = dot_product_blocks(speech, image)
    assert isinstance(s2i, DotProductBlock) and isinstance(i2s, DotProductBlock)
    buffer = torch.empty(40, 30)
    for rows in (slice(0, 40), slice(40, 80), slice(80, 100)):
        out = s2i(rows, out=buffer[: rows.stop - rows.start])
        assert out.data_ptr() == buffer.data_ptr()  # written in place, no new block
        assert torch.equal(out, s2i(rows)) and torch.equal(out, speech[rows] @ image.T)


def test_nan_from_an_overflow_of_finite_embeddings_is_caught() -> None:
    # Finite inputs whose products overflow: 1e20 * 1e20 + 1e20 * (-1e20) = inf - inf = NaN in float32.
    speech = torch.tensor([[1e20, 1e20], [1.0, 2.0]])
    image = torch.tensor([[1e20, -1e20], [3.0, 4.0]])
    assert torch.isnan(speech @ image.T).any()
    with pytest.raises(ValueError, match="NaN"):
        dot_product_ranks(speech, image, torch.tensor([0, 1]))
    # Large scores (up to 27 * 2**120) that do not overflow: no error, and the ranks are those of the counts.
    big = integer_data(7, n_images=10, dim=3, high=3)
    check(big[0] * 2.0**60, big[1] * 2.0**60, big[2], "pessimistic")
