"""Cost of speech <-> image evaluation relative to its one matrix product ``speech_emb @ image_emb.T``.

Sizes: the SpokenCOCO Karpathy test split, 5,000 images x 25,000 captions (5 each, shuffled), with every variant, and
a gallery 16 times larger, 20,000 images x 100,000 captions (``--large-images``; ``one_pass`` only: the other two
take minutes there), 512-d float32 embeddings drawn from a standard normal. Variants, each in its own subprocess:

* ``one_pass``: :func:`vgskit.metrics.recall_at_k` (one pass over cache-sized blocks, :func:`dot_product_ranks`:
  caption rows against column chunks of the gallery);
* ``two_scorers``: :func:`vgskit.metrics.retrieval_metrics` on :func:`dot_product_blocks` (one product per
  direction, 1,024-query blocks: how ``recall_at_k`` evaluated before the one-pass path);
* ``ir_metrics``: ``recall_at_k(..., ir_metrics=True)`` (adds nDCG@10, mAP, MRR; the two-scorer path).

Time: inside each worker, the full product ``speech @ image.T`` and the variant are timed alternately
(``--repeats`` times; minima reported), so both see the same machine load; the ratio is variant / product.
``one_pass`` also reports its parts, timed alone in the same worker: ``blocked_gemm_seconds`` (its matrix products,
block by block into one buffer) and ``count_seconds`` (the two comparisons and sums per block, repeated over a block
that stays in cache: the memory traffic of the counting pass on its own).
Memory: the variant runs once before any full product, right after the peak-RSS mark was reset
(``/proc/self/clear_refs``, see ``benchmarks/_memory.py``); the reported figure is the process's peak resident
memory (``VmHWM``) minus the resident memory at the reset, i.e. everything the evaluation added, BLAS workspace
included. ``tracemalloc`` would miss torch's allocations. The results of the first two variants must be identical.

    python benchmarks/eval_gemm_cost.py                     # full size -> benchmarks/results/eval_gemm_cost.json
    python benchmarks/eval_gemm_cost.py --images 500 --out /tmp/small.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _memory import peak_rss_mib, reset_peak_rss  # benchmarks/_memory.py (the script's folder is on sys.path)
from vgskit.metrics import (
    dot_product_blocks,
    fused_block_rows,
    fused_gallery_chunk,
    recall_at_k,
    retrieval_metrics,
)

KS = (1, 5, 10)
VARIANTS = ("one_pass", "two_scorers", "ir_metrics")


def make_inputs(n_images: int, captions_per_image: int, dim: int, seed: int):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n_images, dim, generator=g)
    speech = torch.randn(n_images * captions_per_image, dim, generator=g)
    caption_image = torch.arange(n_images).repeat_interleave(captions_per_image)
    caption_image = caption_image[torch.randperm(len(caption_image), generator=g)]
    return speech, image, caption_image


def evaluate(variant: str, speech: torch.Tensor, image: torch.Tensor, caption_image: torch.Tensor) -> dict[str, Any]:
    if variant == "one_pass":
        return recall_at_k(speech, image, caption_image, KS)
    if variant == "two_scorers":
        return retrieval_metrics(*dot_product_blocks(speech, image), caption_image, len(image), ks=KS)
    return recall_at_k(speech, image, caption_image, KS, ir_metrics=True)


def one_pass_parts(speech: torch.Tensor, image: torch.Tensor) -> dict[str, float]:
    """Seconds of the one-pass path's matrix products alone and of its counting alone (see the module docstring)."""
    n_captions, n_images = len(speech), len(image)
    width = fused_gallery_chunk(n_images, speech.shape[1], speech.element_size())
    rows = fused_block_rows(n_captions, width, speech.element_size(), 1024)
    block = torch.empty(rows, width)
    mask = torch.empty(rows, width, dtype=torch.bool)
    start = time.perf_counter()
    for c in range(0, n_images, width):
        chunk = image[c : c + width]
        for a in range(0, n_captions, rows):
            torch.matmul(speech[a : a + rows], chunk.T, out=block[: min(rows, n_captions - a), : len(chunk)])
    gemm = time.perf_counter() - start
    own, best = block[:, :1].clone(), block[0].clone()
    start = time.perf_counter()
    for _ in range(-(-n_images // width) * -(-n_captions // rows)):
        torch.ge(block, own, out=mask).view(torch.uint8).sum(dim=1, dtype=torch.int32)
        torch.ge(block, best[None, :], out=mask).view(torch.uint8).sum(dim=0, dtype=torch.int32)
    return {"blocked_gemm_seconds": gemm, "count_seconds": time.perf_counter() - start, "block_rows": rows,
            "chunk_images": width}


def run_worker(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    speech, image, caption_image = make_inputs(args.images, args.captions_per_image, args.dim, args.seed)
    _ = speech[:8] @ image[:8].T  # start the BLAS thread pool before the baseline
    peak_was_reset = reset_peak_rss()
    baseline = peak_rss_mib()
    result = evaluate(args.worker, speech, image, caption_image)
    peak_extra = peak_rss_mib() - baseline
    gemm_times, eval_times = [], []
    parts: list[dict[str, float]] = []
    for _ in range(args.repeats):
        if args.worker == "one_pass":
            parts.append(one_pass_parts(speech, image))
        start = time.perf_counter()
        scores = speech @ image.T
        gemm_times.append(time.perf_counter() - start)
        del scores
        start = time.perf_counter()
        evaluate(args.worker, speech, image, caption_image)
        eval_times.append(time.perf_counter() - start)
    extra: dict[str, Any] = {}
    if parts:
        for key in ("blocked_gemm_seconds", "count_seconds"):
            extra[key] = min(p[key] for p in parts)
        extra["count_ratio_to_gemm"] = extra["count_seconds"] / min(gemm_times)
        extra["block_rows"] = parts[0]["block_rows"]
        extra["chunk_images"] = parts[0]["chunk_images"]
    print(json.dumps({
        "variant": args.worker,
        "seconds": min(eval_times),
        "gemm_seconds": min(gemm_times),
        "ratio_to_gemm": min(eval_times) / min(gemm_times),
        "seconds_all": eval_times,
        "gemm_seconds_all": gemm_times,
        "peak_extra_mib": peak_extra,
        "baseline_mib": baseline,
        "peak_was_reset": peak_was_reset,
        **extra,
        "result": result,
    }))


def run_variant(args: argparse.Namespace, variant: str, images: int, repeats: int) -> dict[str, Any]:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", variant,
        "--images", str(images), "--captions-per-image", str(args.captions_per_image), "--dim", str(args.dim),
        "--seed", str(args.seed), "--repeats", str(repeats), "--threads", str(args.threads),
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant; minima are reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--large-images", type=int, default=20000,
                        help="images of the large size, one_pass only (0: skip it)")
    parser.add_argument("--large-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_gemm_cost.json"))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return

    results = {variant: run_variant(args, variant, args.images, args.repeats) for variant in args.variants}
    identical = None
    if "one_pass" in results and "two_scorers" in results:
        identical = results["one_pass"]["result"] == results["two_scorers"]["result"]
        if not identical:
            raise SystemExit(f"results differ: {results['one_pass']['result']} vs {results['two_scorers']['result']}")
    sizes = {f"{args.images}x{args.images * args.captions_per_image}": results}
    if args.large_images:
        large = run_variant(args, "one_pass", args.large_images, args.large_repeats)
        sizes[f"{args.large_images}x{args.large_images * args.captions_per_image}"] = {"one_pass": large}

    threads = args.threads or torch.get_num_threads()
    for size, by_variant in sizes.items():
        n_images, n_captions = size.split("x")
        print(f"{n_images} images x {n_captions} captions, dim {args.dim}, float32, {threads} thread(s)")
        print(f"{'variant':<12} {'seconds':>9} {'GEMM s':>9} {'x GEMM':>8} {'peak extra MiB':>15}")
        for variant, r in by_variant.items():
            print(f"{variant:<12} {r['seconds']:>9.3f} {r['gemm_seconds']:>9.3f} {r['ratio_to_gemm']:>8.2f} "
                  f"{r['peak_extra_mib']:>15.1f}")
            if "count_seconds" in r:
                print(f"{'':<12} parts: blocked GEMM {r['blocked_gemm_seconds']:.3f} s, counting alone "
                      f"{r['count_seconds']:.3f} s ({r['count_ratio_to_gemm']:.2f}x GEMM), blocks of "
                      f"{r['block_rows']} rows x {r['chunk_images']} images")
    if identical is not None:
        print(f"one_pass and two_scorers results identical: {identical}")

    report = {
        "config": {
            "images": args.images, "captions": args.images * args.captions_per_image,
            "large_images": args.large_images, "large_captions": args.large_images * args.captions_per_image,
            "captions_per_image": args.captions_per_image, "dim": args.dim, "dtype": "float32", "seed": args.seed,
            "repeats": args.repeats, "large_repeats": args.large_repeats, "threads": threads,
        },
        "environment": {
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "platform": platform.platform(), "load_average_after": Path("/proc/loadavg").read_text().split()[:3]
            if Path("/proc/loadavg").exists() else None,
        },
        "memory_note": "peak_extra_mib = peak RSS (VmHWM) during the first evaluation minus RSS at the reset "
                       "just before it (inputs built, BLAS pool started); BLAS workspace included",
        "time_note": "minimum over repeats; the full product speech @ image.T is timed in the same worker, "
                     "alternating with the variant",
        "results": sizes,
        "one_pass_equals_two_scorers": identical,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
