"""Peak memory and step time of a plain MILAN training step against gradient caching at the same batch.

Gradient caching (``train.grad_cache_chunk``, :mod:`vgskit.train.gradcache`) embeds a batch a chunk at a time twice
(once without gradients, once to back-propagate the cached embedding gradients), so that only one chunk's
activations are alive at once. This script measures what that buys and what it costs.

**Model.** ``milan_small`` (MFCC front-end, small 1-D ResNet, small image CNN, 64-d space), random weights, with
the ``--image-size`` images (default 64) and ``--seconds`` of noise per caption (default 2 s).

**What is timed** (``time.perf_counter``, after ``--warmup`` steps; median over ``--steps`` steps): one training
step: forward, backward and an Adam update, either plain (``model.step`` then ``backward``) or through
:func:`vgskit.train.gradcache.grad_cache_step` with each ``--chunks`` size. Every caption has its own image.

**Memory.** Each row runs in a fresh process (so no row inherits memory an earlier one left with the allocator).
On CPU: the peak resident set size over the warm-up and timed steps (``VmHWM`` after a reset) and the resident size
before the first step (weights, batch); their difference is what training adds (activations, gradients, Adam
state). On CUDA, ``torch.cuda.max_memory_allocated``.

    python benchmarks/gradcache.py                      # batch 256, chunks 32 and 64; writes results/gradcache.json
    python benchmarks/gradcache.py --quick              # batch 32, seconds; JSON to a temporary file
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _memory import peak_rss_mib, reset_peak_rss  # benchmarks/_memory.py (the script's folder is on sys.path)
from vgskit.contract import Batch, ImageInputs, SpeechInputs, TrainState
from vgskit.models import create_model
from vgskit.train.gradcache import grad_cache_step

RESULTS = Path(__file__).resolve().parent / "results" / "gradcache.json"
SAMPLE_RATE = 16000


def _current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_batch(n: int, seconds: float, image_size: int, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(0)
    samples = int(seconds * SAMPLE_RATE)
    wavs = 0.1 * torch.randn(n, samples, generator=g)  # [B, T]
    lengths = torch.full((n,), samples, dtype=torch.long)  # [B]
    pixels = torch.randn(n, 3, image_size, image_size, generator=g)  # [B, 3, S, S]
    batch = Batch(SpeechInputs.waveform(wavs, lengths, SAMPLE_RATE), ImageInputs.from_pixels(pixels),
                  image_ids=torch.arange(n), caption_ids=torch.arange(n))
    return batch.to_device(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(batch: Batch, chunk: int | None, image_size: int, steps: int, warmup: int,
            device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model("milan_small", image={"kind": "cnn", "weights": None, "image_size": image_size,
                                               "cnn": {"image_size": image_size, "stem_channels": 16,
                                                       "channels": (32, 64), "depths": (1, 1),
                                                       "strides": (2, 2)}}).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    state = TrainState(step=0, total_steps=steps + warmup)

    def one() -> float:
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if chunk is None:
            model.step(batch, state).loss.backward()
        else:
            grad_cache_step(model, batch, state, chunk)
        opt.step()
        sync(device)
        return time.perf_counter() - t0

    losses = []
    gc.collect()
    rss_before = _current_rss_mib()
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        one()
    times = [one() for _ in range(steps)]
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib())
    # The loss the rows share (same weights and batch before the first step): a check that they agree.
    with torch.no_grad():
        torch.manual_seed(0)
        losses.append(float(model.step(batch, state).loss))
    return {"chunk": chunk, "step_s_median": statistics.median(times), "step_s_min": min(times),
            "peak_mib": peak, "rss_before_mib": rss_before, "peak_over_before_mib": peak - rss_before
            if device.type != "cuda" else None, "loss_after": losses[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="captions (and distinct images) per step")
    parser.add_argument("--chunks", type=int, nargs="+", default=[32, 64], help="grad_cache_chunk sizes")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds of speech per caption")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each row")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="batch 32, chunks 8; JSON to a temporary file")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {RESULTS})")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: one row, JSON on stdout
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.chunks, args.steps, args.warmup = 32, [8], 1, 0
    out_path = args.out or (Path(tempfile.mkdtemp(prefix="gradcache_")) / "gradcache.json" if args.quick else RESULTS)
    device = torch.device(args.device)
    if args.row is not None:
        batch = make_batch(args.batch, args.seconds, args.image_size, device)
        chunk = None if args.row == "plain" else int(args.row)
        print(json.dumps(measure(batch, chunk, args.image_size, args.steps, args.warmup, device)))
        return 0

    rows = []
    base = [sys.executable, str(Path(__file__).resolve()), "--batch", str(args.batch), "--seconds", str(args.seconds),
            "--image-size", str(args.image_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--device", args.device, "--threads", str(torch.get_num_threads())]
    for chunk in [None, *args.chunks]:
        done = subprocess.run([*base, "--row", "plain" if chunk is None else str(chunk)], check=True,
                              capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    report = {
        "benchmark": "gradcache",
        "model": "milan_small",
        "batch": args.batch, "seconds": args.seconds, "image_size": args.image_size,
        "steps": args.steps, "warmup": args.warmup,
        "machine": {"device": str(device), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "platform": platform.platform(), "torch": torch.__version__},
        "memory": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS (VmHWM after a reset)",
        "rows": rows,
    }
    header = f"{'step':<14}{'median s':>10}{'min s':>8}{'peak MiB':>10}{'over start MiB':>16}{'loss after':>12}"
    print(f"milan_small, batch {args.batch}, {args.seconds:g} s audio, {args.image_size} px, {device}, "
          f"{torch.get_num_threads()} threads")
    print(header)
    print("-" * len(header))
    for r in rows:
        label = "plain" if r["chunk"] is None else f"cache {r['chunk']}"
        over = r["peak_over_before_mib"]
        print(f"{label:<14}{r['step_s_median']:>10.2f}{r['step_s_min']:>8.2f}{r['peak_mib']:>10.0f}"
              f"{(over if over is not None else float('nan')):>16.0f}{r['loss_after']:>12.5f}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
