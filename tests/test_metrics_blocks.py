"""The one-pass dot-product evaluation (vgskit.metrics.dot_product_ranks) against the two-scorer path."""

from __future__ import annotations

import pytest
import torch

import vgskit.metrics as metrics
from test_metrics import KS, assert_same, brute_metrics, has_ties, make_data
from vgskit.metrics import (
    dot_product_blocks,
    dot_product_ranks,
    first_hit_ranks,
    fused_block_rows,
    recall_at_k,
    retrieval_metrics,
)


def two_scorer_ranks(
    speech: torch.Tensor, image: torch.Tensor, caption_image: torch.Tensor, chunk_size: int, ties: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranks of the generic path: one scorer per direction, image -> speech from image @ speech.T."""
    s2i_block, i2s_block = dot_product_blocks(speech, image)
    labels = torch.arange(len(image))
    s2i = first_hit_ranks(s2i_block, caption_image, labels, chunk_size=chunk_size, ties=ties)  # type: ignore[arg-type]
    i2s = first_hit_ranks(i2s_block, labels, caption_image, chunk_size=chunk_size, ties=ties)  # type: ignore[arg-type]
    return s2i, i2s


def _shift_relevant_scores(monkeypatch: pytest.MonkeyPatch, towards: float) -> None:
    """Make the tiles' relevant scores one ulp off the main pass's (as another BLAS kernel might round them)."""
    original = metrics._relevant_scores

    def off_by_one_ulp(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, positive = original(*args)
        shifted = torch.nextafter(positive, torch.full_like(positive, towards))
        return metrics._best_of(shifted, args[2], len(args[1])), shifted

    monkeypatch.setattr(metrics, "_relevant_scores", off_by_one_ulp)


def _record_dot_product_blocks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The shapes of the dot-product blocks computed from now on, in order."""
    shapes: list[tuple[int, int]] = []
    original = metrics.DotProductBlock.__call__

    def recording(self, rows, out=None, cols=None):  # type: ignore[no-untyped-def]
        result = original(self, rows, out=out, cols=cols)
        shapes.append(tuple(result.shape))  # type: ignore[arg-type]
        return result

    monkeypatch.setattr(metrics.DotProductBlock, "__call__", recording)
    return shapes


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize(("seed", "quantised"), [(0, True), (1, True), (2, False), (3, False)])
def test_one_pass_ranks_equal_two_scorer_ranks(seed: int, quantised: bool, chunk: int, ties: str) -> None:
    # Quantised data: integer scores with many exact ties; 1-7 captions per image and two images without any.
    speech, image, caption_image = make_data(seed, n_images=23, dim=4, quantised=quantised)
    if quantised:
        assert has_ties(speech @ image.T) and has_ties(image @ speech.T)
    got = dot_product_ranks(speech, image, caption_image, chunk_size=chunk, ties=ties)  # type: ignore[arg-type]
    want = two_scorer_ranks(speech, image, caption_image, chunk, ties)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[1] == 0).sum() == 2  # the images without captions
    s2i_block, i2s_block = dot_product_blocks(speech, image)
    assert_same(
        recall_at_k(speech, image, caption_image, KS, chunk_size=chunk, ties=ties),  # type: ignore[arg-type]
        retrieval_metrics(s2i_block, i2s_block, caption_image, len(image), ks=KS, chunk_size=chunk, ties=ties),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_one_pass_matches_brute_force_on_a_larger_gallery(ties: str) -> None:
    # Enough captions for several blocks of the default size and several tiles of relevant scores.
    speech, image, caption_image = make_data(11, n_images=150, dim=3)
    scores = speech @ image.T
    got = recall_at_k(speech, image, caption_image, KS, ties=ties)  # type: ignore[arg-type]
    assert_same(got, brute_metrics(scores.tolist(), scores.T.tolist(), caption_image.tolist(), KS, ties))


def test_one_pass_recounts_when_the_relevant_scores_disagree(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the tiles' relevant scores differ from the main pass's (another BLAS kernel), the ranks still follow
    the main pass: both directions are counted again with its values."""
    speech, image, caption_image = make_data(5, n_images=30, dim=5, quantised=False)
    want = two_scorer_ranks(speech, image, caption_image, 16, "pessimistic")
    _shift_relevant_scores(monkeypatch, float("inf"))
    calls: list[int] = []
    blocks = metrics.dot_product_blocks

    def counting_blocks(s: torch.Tensor, i: torch.Tensor):  # type: ignore[no-untyped-def]
        s2i, i2s = blocks(s, i)

        def s2i_counted(rows: slice) -> torch.Tensor:
            calls.append(rows.stop - rows.start)
            return s2i(rows)

        return s2i_counted, i2s

    monkeypatch.setattr(metrics, "dot_product_blocks", counting_blocks)
    got = dot_product_ranks(speech, image, caption_image, chunk_size=16)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert sum(calls) == 2 * len(speech)  # main pass + the recount


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize(("chunk_images", "chunk"), [(5, 7), (1, 64), (22, 3), (8, 10_000)])
@pytest.mark.parametrize(("seed", "quantised"), [(0, True), (2, False)])
def test_gallery_chunks_give_the_same_ranks(monkeypatch: pytest.MonkeyPatch, seed: int, quantised: bool,
                                            chunk_images: int, chunk: int, ties: str) -> None:
    """A gallery cut into column chunks (uneven ones included) ranks exactly as the two-scorer path, every
    caption-image pair is scored once, and no block is wider than a chunk."""
    speech, image, caption_image = make_data(seed, n_images=23, dim=4, quantised=quantised)
    monkeypatch.setattr(metrics, "_FUSED_GALLERY_BYTES", chunk_images * 4 * 4)  # chunk_images images of dim 4
    width = metrics.fused_gallery_chunk(len(image), 4, 4)
    assert width == -(-23 // -(-23 // chunk_images))  # equal chunks of at most chunk_images
    want = two_scorer_ranks(speech, image, caption_image, chunk, ties)
    shapes = _record_dot_product_blocks(monkeypatch)
    got = dot_product_ranks(speech, image, caption_image, chunk_size=chunk, ties=ties)  # type: ignore[arg-type]
    shapes = list(shapes)  # the blocks of this call only
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(cols <= width and rows <= chunk for rows, cols in shapes)
    scored = sum(rows * cols for rows, cols in shapes)
    if quantised:  # exact scores: the tiles agree with the main pass, no recount
        assert scored == len(speech) * len(image)
    else:  # float rounding may differ between tile and block shapes: then one recount, never more
        assert scored in (len(speech) * len(image), 2 * len(speech) * len(image))
    scores = speech @ image.T
    assert_same(recall_at_k(speech, image, caption_image, KS, chunk_size=chunk, ties=ties),  # type: ignore[arg-type]
                brute_metrics(scores.tolist(), scores.T.tolist(), caption_image.tolist(), KS, ties))


def test_gallery_chunks_recount_when_the_relevant_scores_disagree(monkeypatch: pytest.MonkeyPatch) -> None:
    speech, image, caption_image = make_data(5, n_images=30, dim=5, quantised=False)
    want = two_scorer_ranks(speech, image, caption_image, 16, "pessimistic")
    monkeypatch.setattr(metrics, "_FUSED_GALLERY_BYTES", 7 * 5 * 4)  # 5 chunks of 6 images
    _shift_relevant_scores(monkeypatch, float("-inf"))
    shapes = _record_dot_product_blocks(monkeypatch)
    got = dot_product_ranks(speech, image, caption_image, chunk_size=16)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert max(cols for _, cols in shapes) == 6
    assert sum(rows * cols for rows, cols in shapes) == 2 * len(speech) * len(image)  # main pass + the recount


@pytest.mark.parametrize(("n_images", "dim", "chunks"),
                         [(5_000, 512, 2), (20_000, 512, 5), (4_096, 512, 1), (1, 512, 1), (100, 2**20, 50),
                          (10, 2**22, 10)])
def test_fused_gallery_chunk(n_images: int, dim: int, chunks: int) -> None:
    width = metrics.fused_gallery_chunk(n_images, dim, 4)
    assert -(-n_images // width) == chunks
    assert width * dim * 4 <= max(metrics._FUSED_GALLERY_BYTES, dim * 4)


def test_one_pass_holds_one_bounded_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every score block is [rows, n_images] with rows <= chunk_size: no [*, n_captions] block, no full matrix,
    and each caption row is computed once."""
    speech, image, caption_image = make_data(6, n_images=40, dim=4, quantised=False)
    shapes: list[tuple[int, int]] = []
    blocks = metrics.dot_product_blocks

    def recording_blocks(s: torch.Tensor, i: torch.Tensor):  # type: ignore[no-untyped-def]
        s2i, i2s = blocks(s, i)

        def s2i_recorded(rows: slice) -> torch.Tensor:
            out = s2i(rows)
            shapes.append(tuple(out.shape))  # type: ignore[arg-type]
            return out

        def i2s_forbidden(rows: slice) -> torch.Tensor:
            raise AssertionError("the one-pass path must not compute image -> speech blocks")

        return s2i_recorded, i2s_forbidden

    monkeypatch.setattr(metrics, "dot_product_blocks", recording_blocks)
    recall_at_k(speech, image, caption_image, chunk_size=9)
    assert all(cols == len(image) and rows <= 9 for rows, cols in shapes)
    assert sum(rows for rows, _ in shapes) == len(speech)


@pytest.mark.parametrize(
    ("n_captions", "n_images", "chunk"),
    [(25_000, 5_000, 1024), (25_000, 5_000, 100), (10, 3, 1), (1, 1, 1024), (0, 4, 1024), (5_000, 100_000, 1024),
     (1_000_000, 10, 1024)],
)
def test_fused_block_rows(n_captions: int, n_images: int, chunk: int) -> None:
    rows = fused_block_rows(n_captions, n_images, 4, chunk)
    assert 1 <= rows <= chunk
    # Bounded block: within the byte budget unless the minimum row count (or chunk) asks for more.
    assert rows * n_images * 4 <= max(metrics._FUSED_BLOCK_BYTES, metrics._FUSED_MIN_ROWS * n_images * 4)
    if n_captions:
        n_blocks = -(-n_captions // rows)
        assert n_captions - (n_blocks - 1) * rows >= rows - n_blocks  # the last block is not a sliver


def test_one_pass_rejects_nan() -> None:
    speech, image, caption_image = make_data(7)
    speech[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        dot_product_ranks(speech, image, caption_image)
