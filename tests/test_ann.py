"""Index kinds: the selection rule, approximate recall against an independent numpy exact search, the v3 format
(memory-mapped embeddings, ann.faiss checked like the embeddings), batched and bf16 exact search."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from vgskit.errors import VGSKitError
from vgskit.models.registry import create_model
from vgskit.retrieval import ann as A
from vgskit.retrieval.engine import SearchEngine, SearchIndexError

faiss = pytest.importorskip("faiss")

DIM = 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("dual_encoder_tiny", embed_dim=DIM).eval()


def _clustered(n: int, d: int, *, clusters: int = 200, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (always the same centres; ``seed`` draws the points): the
    structure real embeddings have (a uniform random cloud in high dimension has no near neighbours to find)."""
    centres = np.random.default_rng(12345).standard_normal((clusters, d)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _numpy_top(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_selection_rule():
    assert A.choose_index_kind(5_000, 512).kind == "exact"  # few rows
    assert A.choose_index_kind(60_000, 256).kind == "exact"  # 59 MiB <= 128 MiB
    hnsw = A.choose_index_kind(200_000, 512, memory_budget_mb=1024)
    assert hnsw.kind == "hnsw" and hnsw.params["M"] == 32
    # 200k x (512 + 256) x 1.1 = 161 MiB: over a 100 MiB budget the rule falls to IVF-PQ
    assert A.choose_index_kind(200_000, 512, memory_budget_mb=100).kind == "ivfpq"
    # 1M x (512 + 8) bytes of SQ8 codes and ids + 4096 x 512 x 4 of centroids = 504 MiB <= 1024 MiB
    big = A.choose_index_kind(1_000_000, 512, memory_budget_mb=1024)
    assert (big.kind, big.params) == ("ivfsq", {"nlist": 4096})  # 2^round(log2(4 * 1000))
    assert A.choose_index_kind(1_000_000, 512, memory_budget_mb=500).kind == "ivfpq"  # 504 MiB > 500
    pq = A.choose_index_kind(1_000_000, 512, memory_budget_mb=400)
    assert (pq.kind, pq.params) == ("ivfpq", {"nlist": 1024, "m": 64, "nbits": 8})  # 2^round(log2 1000)
    small = A.choose_index_kind(1_000_000, 512, memory_budget_mb=30)  # 1M x (m + 8) bytes <= 30 MiB - lists
    assert small.kind == "ivfpq" and small.params["m"] == 16 and 512 % small.params["m"] == 0
    with pytest.raises(A.AnnError, match="memory budget of 5 MiB"):
        A.choose_index_kind(1_000_000, 512, memory_budget_mb=5)
    with pytest.raises(A.AnnError, match="index kind 'flat' is not one of auto, exact, hnsw, ivfsq, ivfpq"):
        A.choose_index_kind(10, 4, kind="flat")
    with pytest.raises(A.AnnError, match="IVF-SQ8 index of 1000000 x 512 needs about 496 MiB"):
        A.choose_index_kind(1_000_000, 512, memory_budget_mb=400, kind="ivfsq")
    assert A.choose_index_kind(10, 4, kind="hnsw").kind == "hnsw"  # forced kinds are honoured


@pytest.mark.parametrize("kind", ["ivfpq", "ivfsq", "hnsw"])
def test_approximate_recall_against_numpy_exact(model, tmp_path, kind):
    n = 20_000
    gallery = _clustered(n, DIM)
    ids = [f"i{j}" for j in range(n)]
    engine = SearchEngine(model, torch.from_numpy(gallery), ids, [f"/g/{j}.png" for j in ids], index_kind=kind)
    info = engine.index_info
    assert engine.index_kind == kind and info["recall_queries"] == 256
    assert 0.0 <= info["recall_at_10"] <= 1.0 and ("nprobe" in info["params"] or "ef_search" in info["params"])

    # Fresh queries (other points of the same clusters), ground truth by numpy in float64.
    queries = _clustered(200, DIM, seed=7)
    truth = _numpy_top(gallery, queries, 10)
    scores, rows = engine.search_batch(queries, k=10)
    recall = np.mean([len(set(r.tolist()) & set(t.tolist())) / 10 for r, t in zip(rows.numpy(), truth, strict=True)])
    assert recall >= 0.9, recall
    assert abs(recall - info["recall_at_10"]) < 0.08  # the stored measurement describes fresh queries too
    # Candidates are re-scored exactly: every returned score is the float dot product of its row.
    np.testing.assert_allclose(scores.numpy(), np.einsum("bd,bkd->bk", queries, gallery[rows.numpy()]), atol=1e-5)
    assert (np.diff(scores.numpy(), axis=1) <= 1e-7).all()
    one = engine.search_by_embedding(queries[3], k=10)
    assert [h.item_id for h in one] == [ids[j] for j in rows[3].tolist()]

    # Saved and loaded: the same index answers the same, and the file is checked like the embeddings.
    engine.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["ann.faiss", "index.json", "index.safetensors"]
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["format_version"] == 3 and meta["index"]["kind"] == kind
    assert meta["index"]["recall_at_10"] == info["recall_at_10"]
    loaded = SearchEngine.load(tmp_path / "idx", model)
    assert loaded.index_kind == kind
    assert torch.equal(loaded.search_batch(queries, k=10)[1], rows)
    data = (tmp_path / "idx" / "ann.faiss").read_bytes()
    (tmp_path / "idx" / "ann.faiss").write_bytes(data[:-10])
    with pytest.raises(SearchIndexError, match=re.escape(f"search index {tmp_path / 'idx'}: ann.faiss does not "
                                                         "match index.json")):
        SearchEngine.load(tmp_path / "idx", model)
    (tmp_path / "idx" / "ann.faiss").unlink()
    with pytest.raises(SearchIndexError, match=f"missing ann.faiss \\(the {kind} index"):
        SearchEngine.load(tmp_path / "idx", model)


def test_exact_search_batch_bf16_and_memory_map(model, tmp_path):
    n = 3_000
    gallery = _clustered(n, DIM, clusters=50, seed=3)
    ids = [f"x{j}" for j in range(n)]
    engine = SearchEngine(model, torch.from_numpy(gallery), ids, ids)
    assert engine.index_kind == "exact" and engine.ann is None
    queries = _clustered(64, DIM, clusters=50, seed=4)
    truth = _numpy_top(gallery, queries, 10)
    scores, rows = engine.search_batch(queries, k=10)
    assert (rows.numpy() == truth).mean() > 0.99  # float32 vs float64: only exact near-ties may swap
    assert [h.item_id for h in engine.search_by_embedding(queries[0], k=10)] == [ids[j] for j in rows[0].tolist()]

    bf16 = SearchEngine(model, torch.from_numpy(gallery), ids, ids, gallery_dtype="bf16")
    s16, r16 = bf16.search_batch(queries, k=10)
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(r16.numpy(), truth, strict=True)])
    # bf16 picks the candidates, float32 scores them: the neighbours and their scores are the exact ones (only a
    # true neighbour outside the 100 bf16 candidates could be missed; near-ties may swap as in float32).
    assert overlap >= 0.99, overlap
    exact16 = np.einsum("bd,bkd->bk", queries.astype(np.float64), gallery[r16.numpy()].astype(np.float64))
    np.testing.assert_allclose(s16.numpy(), exact16, rtol=0, atol=1e-5)

    engine.save(tmp_path / "idx")
    loaded = SearchEngine.load(tmp_path / "idx", model)
    assert torch.equal(loaded.image_emb, torch.from_numpy(gallery))
    # The gallery tensor's memory is a mapping of index.safetensors, not a copy on the heap.
    ptr = loaded.image_emb.data_ptr()
    target = str((tmp_path / "idx" / "index.safetensors").resolve())
    with open("/proc/self/maps") as f:
        maps = [line.split() for line in f]
    mapped = [m for m in maps if len(m) >= 6 and m[5] == target]
    assert any(int(m[0].split("-")[0], 16) <= ptr < int(m[0].split("-")[1], 16) for m in mapped)


def test_bad_arguments_name_the_value(model, tmp_path):
    g = torch.nn.functional.normalize(torch.randn(5, DIM), dim=1)
    ids = list("abcde")
    engine = SearchEngine(model, g, ids, ids)
    for k in (0, -2, 1.5, True):
        with pytest.raises(VGSKitError, match=re.escape(f"k must be >= 1, got {k!r}")):
            engine.search_by_embedding(g[0], k=k)
    with pytest.raises(VGSKitError, match="query embedding must have 32 values, got shape \\(31,\\)"):
        engine.search_by_embedding(g[0, :31])
    with pytest.raises(VGSKitError, match="NaN"):
        engine.search_by_embedding(torch.full((DIM,), float("nan")))
    with pytest.raises(SearchIndexError, match="index kind 'annoy' is not one of"):
        SearchEngine(model, g, ids, ids, index_kind="annoy")
    with pytest.raises(VGSKitError, match="gallery_dtype 'fp8' is not one of fp32, bf16"):
        SearchEngine(model, g, ids, ids, gallery_dtype="fp8")
    with pytest.raises(VGSKitError, match="queries must be \\[B, 32\\]"):
        engine.search_batch(torch.zeros(3, 8))
    with pytest.raises(VGSKitError, match="holds no spoken captions"):
        engine.search_by_image_id("a")
    engine.save(tmp_path / "i")
    meta = json.loads((tmp_path / "i" / "index.json").read_text())
    (tmp_path / "i" / "index.json").write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(SearchIndexError, match=re.escape("unsupported format version 2 (written by an older vgskit, "
                                                         "before approximate indices")):
        SearchEngine.load(tmp_path / "i", model)
    (tmp_path / "i" / "index.json").write_text(json.dumps({**meta, "index": {"kind": "lsh"}}))
    with pytest.raises(SearchIndexError, match="unknown index kind 'lsh'"):
        SearchEngine.load(tmp_path / "i", model)
    with pytest.raises(SearchIndexError, match="is a file, not an index folder"):
        SearchEngine.load(tmp_path / "i" / "index.json", model)


def test_tuning_queries_of_the_query_modality(model):
    """An index is tuned on the queries it is given (e.g. spoken captions), not on noisy gallery rows: queries
    offset from the gallery (a modality gap) need more lists probed than the gallery's own neighbourhood."""
    n = 20_000
    gallery = _clustered(n, DIM)
    ids = [f"i{j}" for j in range(n)]
    gap = np.random.default_rng(3).standard_normal(DIM).astype(np.float32)
    raw = _clustered(300, DIM, seed=11) + 0.8 * gap / np.linalg.norm(gap)
    queries = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)
    tune, held_out = queries[:200], queries[200:]

    default = SearchEngine(model, torch.from_numpy(gallery), ids, ids, index_kind="ivfsq")
    assert default.index_info["recall_query_source"] == "gallery rows with noise"
    tuned = SearchEngine(model, torch.from_numpy(gallery), ids, ids, index_kind="ivfsq", tuning_queries=tune)
    info = tuned.index_info
    assert info["recall_query_source"] == "given queries" and info["recall_queries"] == 200
    assert info["params"]["nprobe"] >= default.index_info["params"]["nprobe"]
    # The recorded recall is that of the given queries, and it carries over to held-out queries of the same kind.
    truth = _numpy_top(gallery, tune, 10)
    rows = tuned.search_batch(tune, k=10)[1].numpy()
    measured = np.mean([len(set(r.tolist()) & set(t.tolist())) / 10 for r, t in zip(rows, truth, strict=True)])
    assert abs(measured - info["recall_at_10"]) < 0.01 and measured >= A.TARGET_RECALL  # float64 vs float32 ties
    truth = _numpy_top(gallery, held_out, 10)
    rows = tuned.search_batch(held_out, k=10)[1].numpy()
    assert np.mean([len(set(r.tolist()) & set(t.tolist())) / 10 for r, t in zip(rows, truth, strict=True)]) >= 0.9
    # An index that holds spoken captions tunes on their embeddings by default (the queries speech search sends).
    from vgskit.contract import Embeddings
    from vgskit.retrieval.engine import CaptionSet

    caps = CaptionSet([f"c{j}" for j in range(200)], [f"/a/{j}.wav" for j in range(200)], Embeddings(torch.from_numpy(tune)))
    with_captions = SearchEngine(model, torch.from_numpy(gallery), ids, ids, index_kind="ivfsq", captions=caps)
    assert with_captions.index_info["recall_query_source"] == "given queries"
    assert with_captions.index_info["params"] == info["params"]
    with pytest.raises(A.AnnError, match=r"tuning queries must be \[Q, 32\], got \(5, 7\)"):
        A.build_ann(gallery, A.choose_index_kind(n, DIM, kind="ivfsq"), queries=np.zeros((5, 7), np.float32))
