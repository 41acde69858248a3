"""Parity of the retrieval metrics with the reference implementations (golden cases in tests/golden/).

SpeechCLIP reports percent (``recall_AB`` = speech -> image, ``recall_BA`` = image -> speech); FaST-VGS and
VG-HuBERT report fractions with the trap names ``I_r`` = speech -> image and ``A_r`` = image -> speech.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from vgskit.metrics import (
    dot_product_blocks,
    first_hit_ranks,
    image_index_from_ids,
    recall_at_k,
    retrieval_metrics,
)
from vgskit.retrieval.evaluate import coarse_candidates, evaluate_retrieval

GOLDEN = Path(__file__).parent / "golden"
TIES = ("pessimistic", "optimistic")  # the golden scores have no ties, so both rules must agree with them


def load_case(name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = load_file(str(GOLDEN / f"{name}.safetensors"))
    meta = json.loads((GOLDEN / f"{name}.json").read_text())
    return tensors, meta


def caption_index(audio_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """Our caption -> image index; also checks the golden image order is first-seen order over captions."""
    unique, index = image_index_from_ids(audio_ids.tolist())
    assert unique == image_ids.tolist()
    return index


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("case", ["speechclip_mutual_retrieval_5cap", "speechclip_mutual_retrieval_unequal"])
def test_speechclip_mutual_retrieval(case: str, ties: str) -> None:
    t, meta = load_case(case)
    atol = meta["tolerance"]["recommended"]["atol"]
    ks = t["input.recall_at"].tolist()
    index = caption_index(t["input.audio_ids"], t["input.image_ids"])
    res = recall_at_k(t["input.audio_feat"], t["input.image_feat"], index, ks, chunk_size=37, ties=ties)

    for j, k in enumerate(ks):
        assert res["speech_to_image"][f"R@{k}"] == pytest.approx(float(t["output.recall_AB"][j]), abs=atol)
        assert res["image_to_speech"][f"R@{k}"] == pytest.approx(float(t["output.recall_BA"][j]), abs=atol)
        assert res[f"mean_R@{k}"] == pytest.approx(float(t["output.recall_mean"][j]), abs=atol)
    assert res["speech_to_image"]["n_queries"] == len(index)
    assert res["image_to_speech"]["n_queries"] == len(t["input.image_ids"])

    # Ranks themselves (the golden aux ranks are 0-based).
    s2i, i2s = dot_product_blocks(t["input.audio_feat"], t["input.image_feat"])
    n_images = len(t["input.image_ids"])
    ranks_ab = first_hit_ranks(s2i, index, torch.arange(n_images), chunk_size=64, ties=ties)
    ranks_ba = first_hit_ranks(i2s, torch.arange(n_images), index, chunk_size=64, ties=ties)
    assert torch.equal(ranks_ab, t["aux.first_hit_rank_AB"] + 1)
    assert torch.equal(ranks_ba, t["aux.first_hit_rank_BA"] + 1)


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize(
    "case", ["fastvgs_recalls_one_to_many_coarse", "vghubert_recalls_one_to_many_coarse"]
)
def test_fastvgs_vghubert_coarse_recalls(case: str, ties: str) -> None:
    t, meta = load_case(case)
    atol = meta["tolerance"]["recommended"]["atol"]
    index = caption_index(t["input.audio_ids"], t["input.image_ids"])
    res = recall_at_k(
        t["input.audio_feat"], t["input.image_feat"], index, (1, 5, 10, 100), chunk_size=50, ties=ties
    )
    for k in (1, 5, 10, 100):
        # I_r = speech -> image, A_r = image -> speech; fractions vs our percent.
        assert res["speech_to_image"][f"R@{k}"] / 100 == pytest.approx(float(t[f"output.I_r{k}"]), abs=atol)
        assert res["image_to_speech"][f"R@{k}"] / 100 == pytest.approx(float(t[f"output.A_r{k}"]), abs=atol)


def _fractions(res: dict[str, Any]) -> dict[str, float]:
    """Our result in FaST-VGS's naming and unit."""
    out = {}
    for k in (1, 5, 10):
        out[f"I_r{k}"] = res["speech_to_image"][f"R@{k}"] / 100
        out[f"A_r{k}"] = res["image_to_speech"][f"R@{k}"] / 100
    return out


def _expected(t: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    return {f"{d}_r{k}": float(t[f"output.{prefix}.{d}_r{k}"]) for d in ("A", "I") for k in (1, 5, 10)}


@pytest.fixture(scope="module")
def ctf() -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor]:
    t, meta = load_case("fastvgs_coarse_to_fine_retrieval")
    return t, meta, caption_index(t["input.audio_ids"], t["input.image_ids"])


def test_coarse_to_fine_candidates(ctf: tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor]) -> None:
    t, meta, _ = ctf
    topk = meta["data"]["topk"]
    n_audio, n_image = len(t["input.audio_ids"]), len(t["input.image_ids"])
    s2i, i2s = dot_product_blocks(t["input.audio_feat"], t["input.image_feat"])
    vis, aud = t["output.visual_indices"], t["output.audio_indices"]
    # First N_audio*topk pairs: audio by audio, its top-k images best first.
    a2i = coarse_candidates(s2i, n_audio, topk, chunk_size=16)
    assert torch.equal(a2i, vis[: n_audio * topk].view(n_audio, topk))
    assert torch.equal(aud[: n_audio * topk], torch.arange(n_audio).repeat_interleave(topk))
    # Last topk*N_img pairs: a [topk, N_img] index matrix flattened row-major.
    i2a = coarse_candidates(i2s, n_image, topk, chunk_size=16)
    assert torch.equal(i2a, aud[n_audio * topk :].view(topk, n_image).T)
    assert torch.equal(vis[n_audio * topk :], torch.arange(n_image).repeat(topk))


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("fine", ["fine_random", "fine_correlated", "fine_equals_coarse"])
def test_coarse_to_fine_recalls(
    ctf: tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor], fine: str, ties: str
) -> None:
    t, meta, index = ctf
    atol = meta["tolerance"]["recommended"]["atol"]
    coarse = t["input.image_feat"] @ t["input.audio_feat"].T
    # Golden fine matrices are laid out S[image, audio]; the reranker is called with (speech, image).
    matrix = coarse if fine == "fine_equals_coarse" else t[f"input.{fine}"]
    calls: list[int] = []

    def reranker(speech_idx: torch.Tensor, image_idx: torch.Tensor) -> torch.Tensor:
        calls.append(speech_idx.numel())
        return matrix[image_idx, speech_idx].unsqueeze(1)  # [P, 1], like a cross encoder's score head

    res = evaluate_retrieval(
        t["input.audio_feat"],
        t["input.image_feat"],
        index,
        reranker=reranker,
        rerank_top=meta["data"]["topk"],
        chunk_size=40,
        rerank_batch_size=333,
        ties=ties,
    )
    got, want = _fractions(res), _expected(t, fine)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=atol), name
    assert max(calls) <= 333


@pytest.mark.parametrize("fine", ["fine_random", "fine_correlated"])
def test_full_matrix_fine_recalls(
    ctf: tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor], fine: str
) -> None:
    t, meta, index = ctf
    atol = meta["tolerance"]["recommended"]["atol"]
    matrix = t[f"input.{fine}"]  # [image, audio]
    res = retrieval_metrics(
        lambda rows: matrix.T[rows], lambda rows: matrix[rows], index, matrix.shape[0], chunk_size=7
    )
    got, want = _fractions(res), _expected(t, f"full_matrix_{fine}")
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=atol), name


def test_full_matrix_coarse_recalls(
    ctf: tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor],
) -> None:
    t, meta, index = ctf
    atol = meta["tolerance"]["recommended"]["atol"]
    got = _fractions(evaluate_retrieval(t["input.audio_feat"], t["input.image_feat"], index, chunk_size=11))
    for name, value in _expected(t, "full_matrix_coarse").items():
        assert got[name] == pytest.approx(value, abs=atol), name
