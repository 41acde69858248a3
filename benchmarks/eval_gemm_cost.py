"""Cost of speech <-> image evaluation relative to its one matrix product ``speech_emb @ image_emb.T``.

Default size is the SpokenCOCO Karpathy test split: 5,000 images x 25,000 captions (5 each, shuffled), 512-d
float32 embeddings drawn from a standard normal. Variants, each in its own subprocess:

* ``one_pass``: :func:`vgskit.metrics.recall_at_k` (one pass over cache-sized blocks, :func:`dot_product_ranks`);
* ``two_scorers``: :func:`vgskit.metrics.retrieval_metrics` on :func:`dot_product_blocks` (one product per
  direction, 1,024-query blocks: how ``recall_at_k`` evaluated before the one-pass path);
* ``ir_metrics``: ``recall_at_k(..., ir_metrics=True)`` (adds nDCG@10, mAP, MRR; the two-scorer path).

Time: inside each worker, the full product ``speech @ image.T`` and the variant are timed alternately
(``--repeats`` times; minima reported), so both see the same machine load; the ratio is variant / product.
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
from vgskit.metrics import dot_product_blocks, recall_at_k, retrieval_metrics

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
    for _ in range(args.repeats):
        start = time.perf_counter()
        scores = speech @ image.T
        gemm_times.append(time.perf_counter() - start)
        del scores
        start = time.perf_counter()
        evaluate(args.worker, speech, image, caption_image)
        eval_times.append(time.perf_counter() - start)
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
        "result": result,
    }))


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", variant,
        "--images", str(args.images), "--captions-per-image", str(args.captions_per_image), "--dim", str(args.dim),
        "--seed", str(args.seed), "--repeats", str(args.repeats), "--threads", str(args.threads),
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
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_gemm_cost.json"))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return

    results = {variant: run_variant(args, variant) for variant in args.variants}
    identical = None
    if "one_pass" in results and "two_scorers" in results:
        identical = results["one_pass"]["result"] == results["two_scorers"]["result"]
        if not identical:
            raise SystemExit(f"results differ: {results['one_pass']['result']} vs {results['two_scorers']['result']}")

    n_captions = args.images * args.captions_per_image
    threads = args.threads or torch.get_num_threads()
    print(f"{args.images} images x {n_captions} captions, dim {args.dim}, float32, {threads} thread(s)")
    print(f"{'variant':<12} {'seconds':>9} {'GEMM s':>9} {'x GEMM':>8} {'peak extra MiB':>15}")
    for variant, r in results.items():
        print(f"{variant:<12} {r['seconds']:>9.3f} {r['gemm_seconds']:>9.3f} {r['ratio_to_gemm']:>8.2f} "
              f"{r['peak_extra_mib']:>15.1f}")
    if identical is not None:
        print(f"one_pass and two_scorers results identical: {identical}")

    report = {
        "config": {
            "images": args.images, "captions": n_captions, "captions_per_image": args.captions_per_image,
            "dim": args.dim, "dtype": "float32", "seed": args.seed, "repeats": args.repeats, "threads": threads,
        },
        "environment": {
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "platform": platform.platform(),
        },
        "memory_note": "peak_extra_mib = peak RSS (VmHWM) during the first evaluation minus RSS at the reset "
                       "just before it (inputs built, BLAS pool started); BLAS workspace included",
        "time_note": "minimum over repeats; the full product speech @ image.T is timed in the same worker, "
                     "alternating with the variant",
        "results": results,
        "one_pass_equals_two_scorers": identical,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
