"""Per-query time of FaST-VGS retrieval: coarse, exhaustive fine and coarse-to-fine (CTF), on CPU.

The paper (Peng & Harwath, ICASSP 2022) reports, on SpokenCOCO and a GPU, 399.7 ms per query for the
exhaustive fine search against 8.4 ms for CTF (47.6x). This script measures the same three searches with the
compute of the paper's model, speech -> image and image -> speech, for galleries of 1,000 and 5,000 images
(5,000 and 25,000 captions for image -> speech, five captions per image as SpokenCOCO).

**Model and embeddings.** A :class:`vgskit.models.fast_vgs.CrossEncoder` at the paper's widths (hidden 768,
FFN 3072, 8 heads, 2 cross layers, score MLP 1536 -> 768 -> 1) with **random weights**, in eval mode under
``torch.inference_mode``: the architecture, hence the compute per pair, is that of a trained model; only the
scores differ. The stored token-level embeddings are random float32 tensors of the lengths a trained model
produces:

* speech: ``1 + resdavenet_output_frames(F)`` tokens, where ``F`` is the number of wav2vec2 frames of a
  ``--seconds`` s caption (20 ms hop, 25 ms window: 499 frames for 10 s) and ResDAVEnet's four stride-2 stages
  divide it by 16: 10 s -> 32 frames -> **33 tokens** with the CLS. Every caption is given that length (no
  padding), so for captions up to 10 s the speech side is an upper bound on the cost of a pair. (Eight to ten
  seconds at 50 Hz are 400-500 frames, 25-32 after the 16x down-sampling, not 40-60.)
* images: CLS + 36 detector regions = **37 tokens**.
* coarse embeddings: one 768-d vector per item (random; coarse search is a dot product, its cost does not
  depend on the values).

The pooled coarse embeddings are stored for the whole gallery. The token embeddings are stored in a pool of
``--token-pool`` distinct items and gallery item ``i`` reads pool row ``i % pool`` (25,000 captions x 33 x 768
float32 would take 2.4 GiB); each fine batch still gathers its rows with ``index_select`` from a pool far
larger than the CPU caches, so the gather cost is that of a full store.

**What is timed** (``time.perf_counter``, one query at a time, after warm-up):

* ``coarse``: the query's pooled vector against every gallery vector (one matrix-vector product), then
  ``topk(--top)``; median over ``--coarse-queries`` queries.
* ``ctf``: the coarse step, then the cross encoder on the ``--top`` (100) candidates in one batch (query
  tokens expanded, candidate tokens gathered), then the re-ordering of the candidates by fine score; median
  over ``--ctf-queries`` queries. This is measured whole, not assembled from parts.
* ``fine`` (exhaustive): the cross encoder on every (query, gallery item) pair in batches of ``--batch-size``
  pairs (default 100, the shape of CTF's batch, so that both pay the same cost per pair), then a sort of all
  the scores. A full query costs 1,000-25,000 pairs, minutes each on two cores, so it is **extrapolated**:
  ``--fine-batches`` consecutive batches of one query's loop (gallery items 0, bs, 2 bs, ...: the code path
  of a full query) are timed, ``pairs/s`` is one over the median seconds per pair of those batches, and the
  per-query time is ``gallery size / pairs/s`` plus the measured time of sorting ``gallery size`` scores. On
  galleries up to ``--fine-whole-max`` (1,000) one exhaustive query is also timed whole, as a check of the
  extrapolation. ``pairs/s`` of CTF's own batch is reported next to it.

The CTF queries and the exhaustive batches are timed alternately (round ``i``: one CTF query, then batch ``i``),
so that on a shared machine both see the same load. The speed-up of CTF over exhaustive fine is a ratio of
times measured in the **same run** (same process, same threads): ``ctf_speedup_over_fine`` is the ratio of the
two per-query times (medians), ``ctf_speedup_over_fine_paired`` the median over rounds of (batch ``i`` scaled
to the gallery) / (CTF query ``i``), the form least sensitive to other work on the machine. Thread count, torch
version, CPU model, the load average and the process's CPU seconds per wall second are in the JSON.

**Recall** is not measured here. That CTF returns exactly the exhaustive fine ranking when the candidate list
covers the gallery is tested in the test suite
(``tests/test_fastvgs_model.py::test_trains_and_coarse_to_fine_over_the_whole_gallery_is_exhaustive_fine_recall``
and the ``rerank_top`` tests of ``tests/test_metrics.py``); how much recall CTF loses with 100 candidates
depends on a trained model's coarse ranking, which random weights cannot show.

    python benchmarks/fastvgs_retrieval_timing.py           # paper widths; writes benchmarks/results/fastvgs_retrieval_timing.json
    python benchmarks/fastvgs_retrieval_timing.py --quick   # tiny widths and galleries, seconds; JSON to a temp file
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from _memory import peak_rss_mib, reset_peak_rss  # benchmarks/_memory.py (the script's folder is on sys.path)
from vgskit.models.fast_vgs import (
    BertLayerConfig,
    CrossEncoder,
    CrossEncoderConfig,
    additive_attention_mask,
    resdavenet_output_frames,
)

SAMPLE_RATE = 16000
REGIONS = 36  # detector regions per image (the paper's bottom-up features)
CAPTIONS_PER_IMAGE = 5  # SpokenCOCO
PAPER_GPU_MS = {"fine": 399.7, "ctf": 8.4, "speedup": 47.6}  # SpokenCOCO, per query, the paper's GPU


def wav2vec2_frames(seconds: float) -> int:
    """Frames of wav2vec2's feature encoder (receptive field 400 samples, hop 320) for ``seconds`` of audio."""
    return max((int(seconds * SAMPLE_RATE) - 400) // 320 + 1, 1)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }


@dataclass
class Side:
    """Stored embeddings of one modality: pooled vectors of every item, token sequences in a pool."""

    pooled: Tensor  # [N, D]
    tokens: Tensor  # [P, T, H], item i -> row i % P
    mask: Tensor  # additive [P, 1, 1, T] (all zeros: every token real)

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def rows(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Token sequences and masks of gallery items ``index`` (gathered, as from a full store)."""
        pool = index % self.tokens.shape[0]
        return self.tokens.index_select(0, pool), self.mask.index_select(0, pool)


def make_side(n: int, length: int, width: int, pool: int, g: torch.Generator) -> Side:
    pooled = torch.randn(n, width, generator=g)
    tokens = torch.randn(min(pool, n), length, width, generator=g)
    mask = additive_attention_mask(torch.ones(tokens.shape[0], length, dtype=torch.bool))
    return Side(pooled, tokens, mask)


class Searcher:
    """The three searches of one direction; ``speech_is_query`` fixes which side is the cross encoder's audio."""

    def __init__(self, model: CrossEncoder, query: Side, gallery: Side, speech_is_query: bool) -> None:
        self.model, self.query, self.gallery, self.speech_is_query = model, query, gallery, speech_is_query

    def pair_scores(self, q: int, index: Tensor) -> Tensor:
        """Fine scores of query ``q`` against gallery items ``index`` (one cross-encoder batch)."""
        q_tok, q_mask = self.query.rows(torch.tensor([q]))
        g_tok, g_mask = self.gallery.rows(index)
        n = index.numel()
        q_tok, q_mask = q_tok.expand(n, -1, -1), q_mask.expand(n, -1, -1, -1)
        if self.speech_is_query:
            return self.model(q_tok, q_mask, g_tok, g_mask).view(-1)  # [n]
        return self.model(g_tok, g_mask, q_tok, q_mask).view(-1)  # [n]

    def coarse(self, q: int, top: int) -> Tensor:
        scores = self.gallery.pooled @ self.query.pooled[q]  # [N]
        return scores.topk(min(top, scores.numel())).indices  # [top], best first

    def ctf(self, q: int, top: int) -> Tensor:
        cand = self.coarse(q, top)
        fine = self.pair_scores(q, cand)
        return cand[fine.argsort(descending=True)]


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_direction(
    name: str, searcher: Searcher, args: argparse.Namespace, g: torch.Generator
) -> dict[str, Any]:
    """Time coarse, CTF and (extrapolated) exhaustive fine search for one direction and gallery size."""
    n_gallery, n_queries = len(searcher.gallery), len(searcher.query)
    load_before, cpu0, wall0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
    queries = torch.randint(0, n_queries, (max(args.coarse_queries, args.ctf_queries, 1),), generator=g).tolist()
    top = args.top

    for q in queries[:2]:  # warm-up: allocator, threads, first-call paths
        searcher.coarse(q, top)
    searcher.ctf(queries[0], top)

    coarse_s = [timed(lambda q=q: searcher.coarse(q, top)) for q in queries[: args.coarse_queries]]
    coarse_ms = 1000 * statistics.median(coarse_s)
    ctf_pairs = min(top, n_gallery)

    # CTF queries and batches of one query's exhaustive loop alternate, so that both see the same load on a
    # shared machine; the exhaustive batches are consecutive (gallery items 0, bs, 2 bs, ...), as in a full query.
    bs = min(args.batch_size, n_gallery)
    n_batches = min(args.fine_batches, math.ceil(n_gallery / bs))
    q_fine = queries[-1]
    ctf_s: list[float] = []
    batch_s: list[float] = []
    batch_pairs: list[int] = []
    for i in range(max(args.ctf_queries, n_batches)):
        if i < args.ctf_queries:
            ctf_s.append(timed(lambda q=queries[i]: searcher.ctf(q, top)))
        if i < n_batches:
            index = torch.arange(i * bs, min((i + 1) * bs, n_gallery))
            batch_s.append(timed(lambda index=index: searcher.pair_scores(q_fine, index)))
            batch_pairs.append(index.numel())
    ctf_ms = 1000 * statistics.median(ctf_s)
    timed_pairs = sum(batch_pairs)
    # Median seconds per pair over the batches: robust to a batch slowed by other work, as the CTF median.
    pairs_per_s = 1.0 / statistics.median(t / n for t, n in zip(batch_s, batch_pairs, strict=True))
    scores = torch.randn(n_gallery, generator=g)
    sort_s = statistics.median(timed(lambda: scores.argsort(descending=True)) for _ in range(5))
    fine_ms = 1000 * (n_gallery / pairs_per_s + sort_s)
    paired = [(n_gallery * t / n + sort_s) / c for t, n, c in zip(batch_s, batch_pairs, ctf_s, strict=False)]
    extra: dict[str, Any] = {}
    if n_gallery <= args.fine_whole_max:
        # A check of the extrapolation: one query's exhaustive search measured whole.
        def whole() -> None:
            parts = [searcher.pair_scores(q_fine, torch.arange(s, min(s + bs, n_gallery)))
                     for s in range(0, n_gallery, bs)]
            torch.cat(parts).argsort(descending=True)

        extra["fine_ms_measured_whole"] = round(1000 * timed(whole), 1)
    return {
        "direction": name,
        "gallery": n_gallery,
        "query_tokens": int(searcher.query.tokens.shape[1]),
        "gallery_tokens": int(searcher.gallery.tokens.shape[1]),
        "coarse_ms": round(coarse_ms, 3),
        "coarse_queries": len(coarse_s),
        "ctf_ms": round(ctf_ms, 1),
        "ctf_ms_all": [round(1000 * t, 1) for t in ctf_s],
        "ctf_pairs": ctf_pairs,
        "ctf_pairs_per_s": round(ctf_pairs / statistics.median(ctf_s), 2),
        "fine_ms": round(fine_ms, 1),
        "fine_pairs": n_gallery,
        "fine_pairs_per_s": round(pairs_per_s, 2),
        "fine_timed_pairs": timed_pairs,
        "fine_batch_size": bs,
        "fine_batch_s": [round(t, 3) for t in batch_s],
        "fine_sort_ms": round(1000 * sort_s, 3),
        "ctf_speedup_over_fine": round(fine_ms / ctf_ms, 2),
        # Paired: round i's exhaustive batch scaled to the gallery over round i's CTF query (timed back to back,
        # so under the same load); the median over rounds. The most load-robust form of the same ratio.
        "ctf_speedup_over_fine_paired": round(statistics.median(paired), 2) if paired else None,
        "ctf_speedup_over_fine_paired_all": [round(r, 2) for r in paired],
        "fine_pairs_per_s_mean": round(timed_pairs / sum(batch_s), 2),
        **extra,
        # Other work on the machine shows here: 1-min load average before/after, process CPU s per wall s.
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpu_per_wall": round((time.process_time() - cpu0) / (time.perf_counter() - wall0), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny widths and galleries (a smoke test, seconds)")
    p.add_argument("--images", type=int, nargs="+", default=[1000, 5000], help="image gallery sizes")
    p.add_argument("--seconds", type=float, default=10.0, help="caption duration setting the speech length")
    p.add_argument("--top", type=int, default=100, help="coarse candidates re-scored by CTF")
    p.add_argument("--batch-size", type=int, default=100,
                   help="pairs per cross-encoder call in the exhaustive loop (default: CTF's batch, --top pairs)")
    p.add_argument("--fine-batches", type=int, default=5, help="timed batches of the exhaustive fine loop")
    p.add_argument("--fine-whole-max", type=int, default=1000,
                   help="also time one whole exhaustive query on galleries up to this size (checks the extrapolation)")
    p.add_argument("--coarse-queries", type=int, default=50)
    p.add_argument("--ctf-queries", type=int, default=5)
    p.add_argument("--token-pool", type=int, default=2048, help="distinct stored token sequences per side")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default: benchmarks/results/fastvgs_retrieval_timing.json; --quick: a temp file)")
    args = p.parse_args()
    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / "fastvgs_retrieval_timing_quick.json" if args.quick
                    else Path(__file__).parent / "results" / "fastvgs_retrieval_timing.json")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.quick:
        layer = BertLayerConfig(hidden_size=32, num_heads=2, ffn_dim=64, dropout=0.0, attention_dropout=0.0)
        args.images, args.top, args.batch_size = [40, 100], 10, 16
        args.coarse_queries, args.ctf_queries, args.fine_batches, args.token_pool = 5, 2, 2, 64
        args.fine_whole_max = 100
    else:
        layer = BertLayerConfig(hidden_size=768, num_heads=8, ffn_dim=3072, dropout=0.0, attention_dropout=0.0)
    config = CrossEncoderConfig(layer=layer, num_layers=2)
    torch.manual_seed(args.seed)
    model = CrossEncoder(config).eval()
    width = layer.hidden_size
    speech_len = 1 + resdavenet_output_frames(wav2vec2_frames(args.seconds))
    image_len = 1 + REGIONS
    g = torch.Generator().manual_seed(args.seed)
    reset_peak_rss()

    rows = []
    with torch.inference_mode():
        for n_images in args.images:
            images = make_side(n_images, image_len, width, args.token_pool, g)
            captions = make_side(CAPTIONS_PER_IMAGE * n_images, speech_len, width, args.token_pool, g)
            rows.append(run_direction("speech_to_image", Searcher(model, captions, images, True), args, g))
            rows.append(run_direction("image_to_speech", Searcher(model, images, captions, False), args, g))
            print(f"  done: {n_images} images", flush=True)

    header = (f"{'direction':<16} {'gallery':>7} {'coarse ms':>9} {'CTF ms':>8} {'fine ms':>10} "
              f"{'fine pairs/s':>12} {'CTF pairs/s':>11} {'CTF speed-up':>12} {'paired':>8}")
    print(header)
    for r in rows:
        print(f"{r['direction']:<16} {r['gallery']:>7} {r['coarse_ms']:>9.3f} {r['ctf_ms']:>8.1f} "
              f"{r['fine_ms']:>10.1f} {r['fine_pairs_per_s']:>12.1f} {r['ctf_pairs_per_s']:>11.1f} "
              f"{r['ctf_speedup_over_fine']:>11.1f}x {r['ctf_speedup_over_fine_paired']:>7.1f}x")

    result = {
        "quick": args.quick,
        "machine": machine_info(),
        "model": {
            "hidden": width, "ffn": layer.ffn_dim, "heads": layer.num_heads, "cross_layers": config.num_layers,
            "params": sum(p.numel() for p in model.parameters()),
            "weights": "random (same compute as a trained model)",
        },
        "speech_tokens": speech_len,
        "speech_seconds": args.seconds,
        "image_tokens": image_len,
        "captions_per_image": CAPTIONS_PER_IMAGE,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "method": (
            "coarse and CTF: median wall time per query, measured whole; exhaustive fine: gallery size / pairs/s, "
            "pairs/s = 1 / median seconds per pair over fine_timed_pairs consecutive pairs of one query's "
            "full-gallery loop (batches timed alternately with the CTF queries), plus the measured sort of "
            "gallery-size scores; ctf_speedup_over_fine = fine_ms / ctf_ms and ctf_speedup_over_fine_paired = "
            "median over rounds of (batch i scaled to the gallery) / (CTF query i), both within this run; "
            "fine_ms_measured_whole (small galleries): one whole exhaustive query, a check of the extrapolation"
        ),
        "paper_gpu_spokencoco_ms": PAPER_GPU_MS,
        "recall": "not measured here; CTF == exhaustive fine when the candidates cover the gallery is tested in "
                  "tests/test_fastvgs_model.py and tests/test_metrics.py",
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
