"""Approximate nearest-neighbour indices (FAISS) for galleries too large to scan, and the rule that picks one.

Exact search scans the whole gallery once per query (one matrix-vector product over a contiguous ``[N, D]``
float32 array), so its cost is the gallery's size divided by memory bandwidth: a few milliseconds up to about
``EXACT_MAX_MB`` of embeddings. Beyond that an approximate index answers from a small part of the data. The choice
follows autofaiss's approach (pick from the number of vectors and a memory budget):

1. ``exact`` when the gallery holds fewer than ``EXACT_MIN_ANN_ROWS`` rows or ``N·D·4`` bytes ≤ ``EXACT_MAX_MB``
   (128 MiB): a full scan is fast and recall is 1.
2. ``hnsw`` (``HNSW32`` graph over 8-bit scalar-quantised vectors) when ``N ≤ HNSW_MAX_ROWS`` (500k; its build
   time grows as ``N log N`` on a few cores) and its memory, about ``N·(D + 2·32·4)·1.1`` bytes, fits the budget.
3. ``ivfsq`` (inverted lists over 8-bit scalar-quantised vectors, ``nlist = 2^round(log2(4·√N))``) when its
   ``N·(D + 8) + nlist·D·4`` bytes fit the budget: one byte per dimension keeps every candidate's score within
   the quantiser's rounding of the exact one, so its recall is limited only by the lists probed.
4. ``ivfpq`` otherwise: ``nlist = 2^round(log2(√N))`` inverted lists and product codes of ``m`` bytes, ``m`` the
   largest divisor of ``D`` ≤ ``min(64, D/2)`` such that ``N·(m + 8) + nlist·D·4`` fits the budget. Product
   codes of 64 bytes for 512 dimensions blur fine distinctions (recall@10 0.64 of exact search at 1M clustered
   vectors with 100 refined candidates), so IVF-PQ is the choice only when nothing finer fits.
5. Nothing fits: :class:`AnnError` naming the budget.

Every approximate search is refined exactly: the index proposes ``max(10·k, 100)`` candidates, which are scored
against the float32 gallery (memory-mapped; only those rows are read), so the scores returned are exact dot
products and only the candidate set is approximate. At build time the search parameter (``efSearch`` for HNSW,
``nprobe`` for the IVF kinds) is tuned on ``RECALL_QUERIES`` sampled gallery rows with Gaussian noise added (queries near
the data but not equal to an indexed vector): the smallest value whose recall@10 against exact search (computed
with one GEMM) reaches ``TARGET_RECALL`` is kept, and that recall is stored with the index.

FAISS is the optional ``faiss`` extra (``pip install 'vgskit[faiss]'``); without it ``auto`` falls back to exact
search and an explicit ``hnsw``/``ivfpq`` is refused naming the extra. Example::

    from vgskit.retrieval.ann import choose_index_kind, build_ann
    choice = choose_index_kind(1_000_000, 512, memory_budget_mb=1024)   # -> AnnChoice(kind="ivfpq", ...)
    ann, info = build_ann(gallery_np, choice)                          # info["recall_at_10"], info["params"]
    rows = ann.candidates(query_np[None], 100)                          # [1, 100] gallery rows
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgskit.errors import VGSKitError

INDEX_KINDS = ("auto", "exact", "hnsw", "ivfsq", "ivfpq")
EXACT_MAX_MB = 128.0
EXACT_MIN_ANN_ROWS = 10_000
HNSW_MAX_ROWS = 500_000
HNSW_M = 32
DEFAULT_MEMORY_BUDGET_MB = 1024.0
TARGET_RECALL = 0.95
RECALL_QUERIES = 256
_EF_LADDER = (16, 32, 64, 128, 256, 512)
_NPROBE_LADDER = (4, 8, 16, 32, 64, 128, 256)


class AnnError(VGSKitError):
    """An approximate index that cannot be built or read (missing faiss, impossible budget, bad kind)."""


def faiss_available() -> bool:
    """Whether the optional ``faiss`` package can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise AnnError("approximate indices need faiss (the 'faiss' extra): pip install 'vgskit[faiss]'") from e
    return faiss


@dataclass(frozen=True)
class AnnChoice:
    """What :func:`choose_index_kind` decided: the kind, its build parameters and why."""

    kind: str
    params: dict[str, int] = field(default_factory=dict)
    reason: str = ""


def check_index_kind(kind: str) -> str:
    if kind not in INDEX_KINDS:
        raise AnnError(f"index kind {kind!r} is not one of {', '.join(INDEX_KINDS)}")
    return kind


def _ivfpq_params(n: int, d: int, budget_bytes: float) -> dict[str, int] | None:
    nlist = int(2 ** round(math.log2(max(math.sqrt(n), 16))))
    nlist = max(16, min(nlist, 65536, max(16, n // 39)))  # faiss wants >= 39 training points per list
    cap = max(1, min(64, d // 2))
    for m in sorted((m for m in range(1, cap + 1) if d % m == 0), reverse=True):
        if n * (m + 8) + nlist * d * 4 <= budget_bytes:
            return {"nlist": nlist, "m": m, "nbits": 8}
    return None


def _ivfsq_params(n: int, d: int, budget_bytes: float) -> dict[str, int] | None:
    nlist = int(2 ** round(math.log2(max(4 * math.sqrt(n), 16))))
    nlist = max(16, min(nlist, 65536, max(16, n // 39)))
    if n * (d + 8) + nlist * d * 4 <= budget_bytes:
        return {"nlist": nlist}
    return None


def choose_index_kind(n: int, d: int, *, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
                      kind: str = "auto") -> AnnChoice:
    """The index for ``n`` vectors of width ``d`` (see the module docstring for the rule).

    ``kind`` other than ``"auto"`` forces that kind (its parameters still follow the rule and the budget).

    >>> choose_index_kind(5_000, 256).kind
    'exact'
    >>> choose_index_kind(1_000_000, 512, memory_budget_mb=1024).kind
    'ivfsq'
    >>> choose_index_kind(2_000_000, 512, memory_budget_mb=1024).kind
    'ivfpq'
    """
    check_index_kind(kind)
    if not (isinstance(memory_budget_mb, (int, float)) and memory_budget_mb > 0):
        raise AnnError(f"memory budget must be a positive number of MiB, got {memory_budget_mb!r}")
    budget = float(memory_budget_mb) * 2**20
    gallery_mb = n * d * 4 / 2**20
    hnsw_bytes = n * (d + 2 * HNSW_M * 4) * 1.1
    if kind == "exact" or (kind == "auto" and (n < EXACT_MIN_ANN_ROWS or gallery_mb <= EXACT_MAX_MB)):
        return AnnChoice("exact", {}, f"{n} rows, {gallery_mb:.0f} MiB: a full scan is fast (exact up to "
                                      f"{EXACT_MAX_MB:g} MiB or {EXACT_MIN_ANN_ROWS} rows)")
    if kind == "auto" and not faiss_available():
        return AnnChoice("exact", {}, "faiss is not installed (pip install 'vgskit[faiss]'): exact search")
    if kind == "hnsw" or (kind == "auto" and n <= HNSW_MAX_ROWS and hnsw_bytes <= budget):
        if hnsw_bytes > budget:
            raise AnnError(f"an HNSW index of {n} x {d} needs about {hnsw_bytes / 2**20:.0f} MiB, more than the memory "
                           f"budget of {memory_budget_mb:g} MiB; raise the budget or use index kind 'ivfpq'")
        return AnnChoice("hnsw", {"M": HNSW_M, "ef_construction": 64},
                         f"{n} rows <= {HNSW_MAX_ROWS} and the graph ({hnsw_bytes / 2**20:.0f} MiB) fits the budget")
    sq = _ivfsq_params(n, d, budget)
    if kind == "ivfsq" or (kind == "auto" and sq is not None):
        if sq is None:
            raise AnnError(f"an IVF-SQ8 index of {n} x {d} needs about {n * (d + 8) / 2**20:.0f} MiB, more than the "
                           f"memory budget of {memory_budget_mb:g} MiB; raise the budget or use index kind 'ivfpq'")
        return AnnChoice("ivfsq", sq, f"IVF{sq['nlist']},SQ8 ({n * (d + 8) / 2**20:.0f} MiB: one byte per "
                                      "dimension) fits the budget")
    params = _ivfpq_params(n, d, budget)
    if params is None:
        raise AnnError(f"no IVF-PQ index of {n} x {d} fits the memory budget of {memory_budget_mb:g} MiB "
                       f"(at least {n * 9 / 2**20:.0f} MiB of codes and ids); raise --memory-budget-mb")
    return AnnChoice("ivfpq", params, f"{n} rows: IVF{params['nlist']},PQ{params['m']} codes "
                                      f"({n * (params['m'] + 8) / 2**20:.0f} MiB) fit the budget")


def exact_topk(gallery: torch.Tensor, queries: torch.Tensor, k: int, *, block: int = 262144) -> torch.Tensor:
    """Row indices ``[B, k]`` of the ``k`` largest dot products, by blocks of gallery rows (bounded memory)."""
    best_s: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for start in range(0, gallery.shape[0], block):
        s = queries @ gallery[start:start + block].T  # [B, b]
        top = torch.topk(s, min(k, s.shape[1]), dim=1)
        idx = top.indices + start
        if best_s is None:
            best_s, best_i = top.values, idx
        else:
            cat_s, cat_i = torch.cat([best_s, top.values], 1), torch.cat([best_i, idx], 1)
            keep = torch.topk(cat_s, min(k, cat_s.shape[1]), dim=1).indices
            best_s, best_i = cat_s.gather(1, keep), cat_i.gather(1, keep)
    assert best_i is not None
    return best_i


def recall_queries(gallery: np.ndarray, count: int = RECALL_QUERIES, seed: int = 0) -> np.ndarray:
    """``count`` sampled gallery rows plus Gaussian noise of a quarter of the rows' spread (float32 ``[count, D]``).

    The noise keeps a query from being an indexed vector (its own row would be an easy first hit) while
    leaving it in the region of the data that real queries fall in.
    """
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(gallery.shape[0], size=min(count, gallery.shape[0]), replace=False))
    base = np.asarray(gallery[rows], dtype=np.float32)
    scale = float(np.std(base)) * 0.25
    return (base + rng.standard_normal(base.shape).astype(np.float32) * scale).astype(np.float32)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each row of ``truth[:, :k]`` present in ``found[:, :k]``."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth, strict=True)]
    return float(np.sum(hits)) / float(truth.shape[0] * min(k, truth.shape[1]))


class AnnIndex:
    """A FAISS index over gallery rows (inner product), with its tuned search parameter.

    :meth:`candidates` returns gallery row indices; the engine re-scores them exactly.
    """

    def __init__(self, kind: str, index: Any, params: dict[str, int]):
        self.kind = kind
        self.index = index
        self.params = dict(params)
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        faiss = _faiss()
        if self.kind == "hnsw" and "ef_search" in self.params:
            self.index.hnsw.efSearch = int(self.params["ef_search"])
        elif self.kind in ("ivfpq", "ivfsq") and "nprobe" in self.params:
            faiss.extract_index_ivf(self.index).nprobe = int(self.params["nprobe"])

    def set_search_param(self, value: int) -> None:
        self.params["ef_search" if self.kind == "hnsw" else "nprobe"] = int(value)
        self._apply_search_params()

    def candidates(self, queries: np.ndarray, n: int) -> np.ndarray:
        """Gallery rows ``[B, n]`` proposed for ``queries`` ``[B, D]`` (-1 where the index found fewer)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.kind == "hnsw":  # efSearch below the number asked for returns fewer neighbours
            self.index.hnsw.efSearch = max(int(self.params.get("ef_search", 16)), n)
        _, idx = self.index.search(q, n)
        return idx

    def write(self, path: Path) -> None:
        _faiss().write_index(self.index, str(path))

    @classmethod
    def read(cls, path: Path, kind: str, params: dict[str, int]) -> AnnIndex:
        faiss = _faiss()
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise AnnError(f"{path}: not a readable faiss index ({str(e).splitlines()[0]})") from e
        return cls(kind, index, params)


def refine(gallery: torch.Tensor, query: torch.Tensor, rows: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact scores of candidate ``rows`` (one query): the ``k`` best as ``(scores, rows)``, best first."""
    rows_t = torch.from_numpy(np.asarray(rows[rows >= 0], dtype=np.int64))
    scores = gallery[rows_t] @ query
    top = torch.topk(scores, min(k, scores.shape[0]))
    return top.values, rows_t[top.indices]


def n_candidates(k: int) -> int:
    return max(10 * k, 100)


def build_ann(gallery: np.ndarray, choice: AnnChoice, *, seed: int = 0, target_recall: float = TARGET_RECALL,
              n_queries: int = RECALL_QUERIES, queries: np.ndarray | None = None) -> tuple[AnnIndex, dict[str, Any]]:
    """Train and fill the index of ``choice`` over ``gallery`` ``[N, D]`` float32, then tune and measure it.

    ``queries`` ``[Q, D]``: examples of what will query the index (e.g. spoken captions' embeddings for a gallery of
    images); up to ``n_queries`` of them tune and measure it. Queries of another modality sit apart from the
    gallery (the modality gap), so noisy gallery rows, the default, can understate the lists a real query needs
    (a trained speech ⟷ image model at 1M × 512: recall@10 0.98 on noisy gallery rows, 0.87 on spoken queries).

    Returns the index and its record: ``{"kind", "params", "recall_at_10", "recall_queries", "recall_query_source",
    "target_recall", "reason"}``; ``recall_at_10`` is that of the whole search path (candidates, then exact
    refinement).
    """
    faiss = _faiss()
    x = np.ascontiguousarray(gallery, dtype=np.float32)
    n, d = x.shape
    rng = np.random.default_rng(seed)
    if choice.kind == "hnsw":
        index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, int(choice.params["M"]),
                                  faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(choice.params["ef_construction"])
        train_rows = 65536
        ladder = _EF_LADDER
    elif choice.kind in ("ivfsq", "ivfpq"):
        nlist = int(choice.params["nlist"])
        quantizer = faiss.IndexFlatIP(d)
        train_rows = 64 * nlist
        if choice.kind == "ivfsq":
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
        else:
            m, nbits = int(choice.params["m"]), int(choice.params["nbits"])
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
            index.pq.cp.seed = seed
            # k-means wants >= 39 points per centroid: the lists' and the PQ's 2^nbits
            train_rows = max(train_rows, 40 * 2**nbits)
        index.cp.seed = seed  # deterministic k-means, so a rebuild gives the same index
        ladder = tuple(p for p in _NPROBE_LADDER if p <= nlist) or (nlist,)
    else:
        raise AnnError(f"build_ann: index kind {choice.kind!r} is not approximate")
    index.train(x[np.sort(rng.choice(n, size=min(n, train_rows), replace=False))])
    index.add(x)
    ann = AnnIndex(choice.kind, index, choice.params)
    if queries is not None and len(queries):
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != d:
            raise AnnError(f"tuning queries must be [Q, {d}], got {tuple(q.shape)}")
        if q.shape[0] > n_queries:
            q = q[np.sort(rng.choice(q.shape[0], size=n_queries, replace=False))]
        queries, source = q, "given queries"
    else:
        queries, source = recall_queries(x, n_queries, seed), "gallery rows with noise"
    gallery_t = torch.from_numpy(x)
    q_t = torch.from_numpy(queries)
    truth = exact_topk(gallery_t, q_t, 10).numpy()
    recall = 0.0
    for value in ladder:
        ann.set_search_param(value)
        found = _search_refined(ann, gallery_t, q_t, 10)
        recall = recall_at(found, truth, 10)
        if recall >= target_recall:
            break
    info = {"kind": choice.kind, "params": dict(ann.params), "recall_at_10": round(recall, 4),
            "recall_queries": int(queries.shape[0]), "recall_query_source": source, "target_recall": target_recall,
            "reason": choice.reason}
    return ann, info


def _search_refined(ann: AnnIndex, gallery: torch.Tensor, queries: torch.Tensor, k: int) -> np.ndarray:
    cand = ann.candidates(queries.numpy(), n_candidates(k))
    out = np.full((queries.shape[0], k), -1, dtype=np.int64)
    for i in range(queries.shape[0]):
        _, rows = refine(gallery, queries[i], cand[i], k)
        out[i, : rows.shape[0]] = rows.numpy()
    return out
