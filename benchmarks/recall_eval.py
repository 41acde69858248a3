"""Time and peak memory of recall evaluation: chunked (vgskit.metrics) vs one full similarity matrix.

Default size is the SpokenCOCO Karpathy test split: 5,000 images x 25,000 captions, 512-d L2-normalised
embeddings. Each variant runs in its own subprocess so that its peak resident memory can be read from
``/proc/self/status`` (``VmHWM``; ``ru_maxrss`` where that file does not exist). tracemalloc cannot be used:
it does not see torch's allocations. The reported memory is the peak minus the peak reached after the inputs
were built (the peak mark is reset there), i.e. what the evaluation itself added.

    python benchmarks/recall_eval.py                              # full size, writes benchmarks/results/recall_eval.json
    python benchmarks/recall_eval.py --images 200 --captions-per-image 5 --out /tmp/tiny.json
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
from vgskit.metrics import recall_at_k

KS = (1, 5, 10)
VARIANTS = ("chunked", "full_matrix")


def make_inputs(
    n_images: int, captions_per_image: int, dim: int, seed: int, args_noise: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Captions are noisy copies of their image embedding, so that recall is far from both chance and 100 %."""
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=1)
    caption_image = torch.arange(n_images).repeat_interleave(captions_per_image)
    caption_image = caption_image[torch.randperm(len(caption_image), generator=g)]
    noise = torch.randn(len(caption_image), dim, generator=g)
    speech = torch.nn.functional.normalize(image[caption_image] + args_noise * noise / dim**0.5, dim=1)
    return speech, image, caption_image


def full_matrix_recalls(
    speech: torch.Tensor, image: torch.Tensor, caption_image: torch.Tensor
) -> dict[str, float]:
    """The naive evaluation: materialise the whole [captions, images] matrix and take top-K on both axes."""
    scores = speech @ image.T
    k_max = max(KS)
    s2i_top = scores.topk(min(k_max, scores.shape[1]), dim=1).indices  # [captions, K]
    s2i_hit = (s2i_top == caption_image[:, None]).cumsum(dim=1) > 0
    i2s_top = scores.topk(min(k_max, scores.shape[0]), dim=0).indices  # [K, images]
    i2s_hit = (caption_image[i2s_top] == torch.arange(scores.shape[1])[None, :]).cumsum(dim=0) > 0
    out = {}
    for k in KS:
        out[f"speech_to_image_R@{k}"] = (
            100.0 * int(s2i_hit[:, min(k, s2i_hit.shape[1]) - 1].sum()) / len(speech)
        )
        out[f"image_to_speech_R@{k}"] = 100.0 * int(i2s_hit[min(k, i2s_hit.shape[0]) - 1].sum()) / len(image)
    return out


def chunked_recalls(
    speech: torch.Tensor, image: torch.Tensor, caption_image: torch.Tensor, chunk_size: int
) -> dict[str, float]:
    res = recall_at_k(speech, image, caption_image, KS, chunk_size=chunk_size)
    out = {}
    for k in KS:
        out[f"speech_to_image_R@{k}"] = res["speech_to_image"][f"R@{k}"]
        out[f"image_to_speech_R@{k}"] = res["image_to_speech"][f"R@{k}"]
    return out


def run_worker(args: argparse.Namespace) -> None:
    """Run one variant in this process and print one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    speech, image, caption_image = make_inputs(
        args.images, args.captions_per_image, args.dim, args.seed, args.noise
    )
    # Warm up the BLAS thread pool on a tiny problem so that its buffers count towards the baseline.
    _ = speech[:8] @ image[:8].T
    # Without the reset, the baseline would include temporaries freed while building the inputs, and
    # memory reused from them would be missed.
    peak_was_reset = reset_peak_rss()
    baseline = peak_rss_mib()
    times = []
    recalls: dict[str, float] = {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        if args.worker == "chunked":
            recalls = chunked_recalls(speech, image, caption_image, args.chunk_size)
        else:
            recalls = full_matrix_recalls(speech, image, caption_image)
        times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "variant": args.worker,
                "seconds": min(times),
                "seconds_all": times,
                "peak_extra_mib": peak_rss_mib() - baseline,
                "baseline_mib": baseline,
                "peak_was_reset": peak_was_reset,
                "recalls": recalls,
            }
        )
    )


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        variant,
        *("--images", str(args.images), "--captions-per-image", str(args.captions_per_image)),
        *("--dim", str(args.dim), "--chunk-size", str(args.chunk_size), "--seed", str(args.seed)),
        *("--repeats", str(args.repeats), "--threads", str(args.threads), "--noise", str(args.noise)),
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--noise", type=float, default=5.0, help="caption = image + noise * N(0, I/dim), then L2-normalised"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per variant; the minimum is reported"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/recall_eval.json"))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return

    results = {variant: run_variant(args, variant) for variant in VARIANTS}
    # Both evaluations must agree exactly (the embeddings are continuous, so there are no ties to resolve).
    if results["chunked"]["recalls"] != results["full_matrix"]["recalls"]:
        raise SystemExit(
            f"recalls differ: {results['chunked']['recalls']} vs {results['full_matrix']['recalls']}"
        )

    n_captions = args.images * args.captions_per_image
    print(f"{args.images} images x {n_captions} captions, dim {args.dim}, chunk {args.chunk_size}")
    print(f"{'variant':<12} {'seconds':>9} {'peak MiB':>9}")
    for variant, r in results.items():
        print(f"{variant:<12} {r['seconds']:>9.3f} {r['peak_extra_mib']:>9.1f}")
    print("recalls (percent):", json.dumps(results["chunked"]["recalls"]))

    report = {
        "config": {
            "images": args.images,
            "captions": n_captions,
            "captions_per_image": args.captions_per_image,
            "dim": args.dim,
            "chunk_size": args.chunk_size,
            "seed": args.seed,
            "noise": args.noise,
            "repeats": args.repeats,
            "threads": args.threads or torch.get_num_threads(),
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "platform": platform.platform(),
        },
        "memory_note": "peak_extra_mib = process peak RSS (VmHWM) minus RSS after building the inputs (peak mark reset there)",
        "results": results,
        "recalls_identical": True,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
