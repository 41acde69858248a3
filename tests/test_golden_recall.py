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
    # The stored tensors are the ones the case describes, with the sizes its data section states.
    assert sorted(tensors) == sorted(meta["tensors"]), name
    for key, info in meta["tensors"].items():
        assert list(tensors[key].shape) == info["shape"], key
    data = meta.get("data", {})
    if "n_audio" in data:
        assert len(tensors["input.audio_ids"]) == len(tensors["input.audio_feat"]) == data["n_audio"]
    if "n_image" in data:
        assert len(tensors["input.image_ids"]) == len(tensors["input.image_feat"]) == data["n_image"]
    return tensors, meta


def _ks(names: Any, prefix: str) -> list[int]:
    """The cut-offs K of result names such as ``I_r1, I_r5, ...`` (``prefix`` ``"I_r"``), ascending."""
    return sorted(int(name[len(prefix):]) for name in names if name.startswith(prefix))


def _case_meta(name: str) -> dict[str, Any]:
    """A case's JSON alone (to parametrise tests over what it holds)."""
    return json.loads((GOLDEN / f"{name}.json").read_text())


CTF = _case_meta("fastvgs_coarse_to_fine_retrieval")["outputs_json"]


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
    assert ks == meta["call_args"]["recall_at"]
    index = caption_index(t["input.audio_ids"], t["input.image_ids"])
    res = recall_at_k(t["input.audio_feat"], t["input.image_feat"], index, ks, chunk_size=37, ties=ties)

    printed = meta["outputs_json"]
    for j, k in enumerate(ks):
        for ours, stored, listed in ((res["speech_to_image"][f"R@{k}"], "output.recall_AB", "recall_results_AB"),
                                     (res["image_to_speech"][f"R@{k}"], "output.recall_BA", "recall_results_BA"),
                                     (res[f"mean_R@{k}"], "output.recall_mean", "recall_results_mean")):
            assert ours == pytest.approx(float(t[stored][j]), abs=atol), (stored, k)
            assert ours == pytest.approx(printed[listed][f"recall@{k}"], abs=atol), (listed, k)
    assert res["speech_to_image"]["n_queries"] == len(index) == meta["data"]["n_audio"]
    assert res["image_to_speech"]["n_queries"] == len(t["input.image_ids"]) == meta["data"]["n_image"]

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
    expected = meta["outputs_json"]
    ks = _ks(expected, "I_r")
    assert ks == _ks(expected, "A_r") and ks
    index = caption_index(t["input.audio_ids"], t["input.image_ids"])
    res = recall_at_k(t["input.audio_feat"], t["input.image_feat"], index, ks, chunk_size=50, ties=ties)
    for k in ks:
        # I_r = speech -> image, A_r = image -> speech; fractions vs our percent.
        for ours, name in ((res["speech_to_image"][f"R@{k}"], f"I_r{k}"),
                           (res["image_to_speech"][f"R@{k}"], f"A_r{k}")):
            assert ours / 100 == pytest.approx(float(t[f"output.{name}"]), abs=atol), name
            assert ours / 100 == pytest.approx(expected[name], abs=atol), name


def _fractions(res: dict[str, Any], names: Any) -> dict[str, float]:
    """Our result in FaST-VGS's naming and unit, for the result ``names`` a case lists (``I_r1``, ``A_r5`` ...)."""
    direction = {"I_r": "speech_to_image", "A_r": "image_to_speech"}
    return {name: res[direction[name[:3]]][f"R@{name[3:]}"] / 100 for name in names}


def _expected(t: dict[str, torch.Tensor], listed: dict[str, float], prefix: str) -> dict[str, float]:
    """The case's values for ``prefix`` (``fine_random``, ``full_matrix_coarse`` ...): the stored tensors,
    which must agree with the values its JSON lists."""
    out = {name: float(t[f"output.{prefix}.{name}"]) for name in listed}
    assert out == pytest.approx(listed, abs=1e-12)
    return out


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
@pytest.mark.parametrize("fine", sorted(CTF["ctf"]))
def test_coarse_to_fine_recalls(
    ctf: tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor], fine: str, ties: str
) -> None:
    t, meta, index = ctf
    atol = meta["tolerance"]["recommended"]["atol"]
    listed = meta["outputs_json"]["ctf"][fine]
    ks = _ks(listed, "I_r")
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
        ks=ks,
        chunk_size=40,
        rerank_batch_size=333,
        ties=ties,
    )
    want = _expected(t, listed, fine)
    got = _fractions(res, want)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=atol), name
    assert max(calls) <= 333


@pytest.mark.parametrize("fine", sorted(k for k in CTF["full_matrix"] if k != "coarse"))
def test_full_matrix_fine_recalls(
    ctf: tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor], fine: str
) -> None:
    t, meta, index = ctf
    atol = meta["tolerance"]["recommended"]["atol"]
    matrix = t[f"input.{fine}"]  # [image, audio]
    listed = meta["outputs_json"]["full_matrix"][fine]
    res = retrieval_metrics(
        lambda rows: matrix.T[rows], lambda rows: matrix[rows], index, matrix.shape[0], ks=_ks(listed, "I_r"),
        chunk_size=7,
    )
    want = _expected(t, listed, f"full_matrix_{fine}")
    got = _fractions(res, want)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=atol), name


def test_full_matrix_coarse_recalls(
    ctf: tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor],
) -> None:
    t, meta, index = ctf
    atol = meta["tolerance"]["recommended"]["atol"]
    listed = meta["outputs_json"]["full_matrix"]["coarse"]
    want = _expected(t, listed, "full_matrix_coarse")
    got = _fractions(evaluate_retrieval(t["input.audio_feat"], t["input.image_feat"], index,
                                        ks=_ks(listed, "I_r"), chunk_size=11), want)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=atol), name
