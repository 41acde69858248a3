"""Training-time data loading: utterances/s with 0, 1, 2 loader workers, and padding with/without bucketing.

Reads a manifest split from disk the way training does without preloading (decode + resample + image
resize in the workers), through ``SpokenCaptionDataset`` + ``collate_spoken_captions`` and the paired batch
sampler. Padding is measured over a whole epoch of batches as padded samples / all samples in the padded
batch tensors (with the collate's rounding to a multiple of ``pad_multiple``).

    python benchmarks/data_loading.py                                   # spoken-scenes demo corpus (cached)
    python benchmarks/data_loading.py --manifest data/facc/manifest.jsonl --split train --batches 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vgskit.data.loader import DEFAULT_PAD_MULTIPLE, collate_spoken_captions, paired_batch_sampler
from vgskit.experiment import make_dataset


def padding_fraction(batches: list[list[int]], lengths: list[int], pad_multiple: int) -> float:
    padded = real = 0
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        longest = -(-longest // pad_multiple) * pad_multiple
        padded += longest * len(batch)
        real += sum(lengths[i] for i in batch)
    return 1.0 - real / padded


def loader_throughput(dataset, batches: list[list[int]], workers: int) -> dict[str, float]:
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_spoken_captions, num_workers=workers,
                        persistent_workers=False)
    t0 = time.perf_counter()
    n = 0
    first = None
    for batch in loader:
        n += int(batch["lengths"].numel())
        if first is None:
            first = time.perf_counter() - t0  # includes worker start-up
    total = time.perf_counter() - t0
    return {"workers": workers, "utterances": n, "seconds": round(total, 3),
            "utterances_per_s": round(n / total, 1), "first_batch_s": round(first or 0.0, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", default=None, help="manifest JSONL (default: the spoken-scenes demo corpus)")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="batches timed per worker setting")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--out", default="benchmarks/results/data_loading.json")
    args = p.parse_args()

    if args.manifest is None:
        from vgskit.data.synthetic import PRESETS, generate_spoken_scenes, preset_dir

        manifest = generate_spoken_scenes(preset_dir("demo"), PRESETS["demo"])
    else:
        manifest = Path(args.manifest)
    torch.set_num_threads(1)  # the work under test is decoding in the loader, not maths
    transform = {"size": args.image_size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    dataset = make_dataset(manifest, args.split, transform, max_seconds=None, preload=False, progress=False)
    lengths = dataset.num_samples()  # from file headers, no decoding

    plain = paired_batch_sampler(dataset.caption_image_index, args.batch_size, seed=0)
    bucketed = paired_batch_sampler(dataset.caption_image_index, args.batch_size, seed=0, lengths=lengths)
    padding = {
        "without_bucketing": round(padding_fraction(plain, lengths, DEFAULT_PAD_MULTIPLE), 4),
        "with_bucketing": round(padding_fraction(bucketed, lengths, DEFAULT_PAD_MULTIPLE), 4),
        "without_bucketing_no_rounding": round(padding_fraction(plain, lengths, 1), 4),
        "with_bucketing_no_rounding": round(padding_fraction(bucketed, lengths, 1), 4),
    }
    timed = bucketed[: args.batches]
    throughput = [loader_throughput(dataset, timed, w) for w in args.workers]

    result = {
        "config": {"manifest": str(manifest), "split": args.split, "captions": len(dataset),
                   "batch_size": args.batch_size, "batches_timed": len(timed), "image_size": args.image_size,
                   "pad_multiple": DEFAULT_PAD_MULTIPLE},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpus": os.cpu_count(), "machine": platform.machine()},
        "padding_fraction": padding,
        "throughput": throughput,
    }
    print(f"padding fraction over one epoch ({len(plain)} batches of {args.batch_size}):")
    for k, v in padding.items():
        print(f"  {k:<32} {100 * v:5.1f} %")
    print("loader throughput (decode + resample + image resize, from disk):")
    for row in throughput:
        print(f"  workers={row['workers']}  {row['utterances_per_s']:8.1f} utterances/s  "
              f"(first batch {row['first_batch_s']:.2f} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
