"""Throughput of VG-HuBERT word segmentation on CPU: seconds of audio segmented per second of wall time.

VG-HuBERT (Peng & Harwath, Interspeech 2022) segments speech into word-like units from the attention of its speech
CLS token at one transformer layer (layer 9 by default): :meth:`vgskit.models.vg_hubert.VGHuBERT.segment` runs the
HuBERT tower (:meth:`~vgskit.models.vg_hubert.VGHuBERT.cls_attention`), then
:func:`vgskit.models.vg_hubert.wordseg.segment_words` on every utterance (per-head quantile threshold, runs of
frames, one mean-pooled feature per segment). This script measures what each part costs.

**Model.** The ``vg_hubert`` preset at the paper's widths with **random weights**: its speech tower is HuBERT-Base
(``transformers.HubertConfig()``: 12 layers, width 768, 12 heads; all 12 kept, the last 3 re-initialised, one CLS
after the positional convolution), its image tower DINO ViT-S/8-shaped (``transformers.ViTConfig`` with width 384,
6 heads, patch 8; never run here). Both are saved with ``save_pretrained`` into a temporary folder and loaded through
the registry, so nothing is downloaded. The compute of a forward pass does not depend on the values of the weights;
with random weights the attention, hence the number of segments, is not that of a trained model, and the
segmentation step's cost grows (slightly) with the number of segments it pools.

**Audio.** ``--batch-sizes`` utterances (default 1 and 8) of each of ``--seconds`` (default 2, 5 and 10 s) of
speech-like noise at 16 kHz: white noise shaped by a syllable-rate (about 4 Hz) envelope with short pauses. All rows
of a batch have the same length (no padding).

**What is timed** (``time.perf_counter``, model in eval mode, under ``torch.no_grad``; after ``--warmup`` untimed
calls, median and min over ``--reps`` calls):

* ``cls_attention``: ``model.cls_attention(wavs, lengths)`` at the default layer (the HuBERT forward, all layers the
  tower keeps, plus the CLS query/key product at that layer);
* ``segment_words``: the segmentation step alone, done as ``segment`` does it: for every row, the valid attention
  ``[H, T]`` and the layer's output ``[T, D]`` to float on the CPU, then ``segment_words(..., quantile 0.7,
  feats=...)``;
* ``segment``: the whole ``model.segment(wavs, lengths)`` call (both of the above).

For every row: seconds of audio per second of wall time (``batch * seconds / median``) and the real-time factor
(``median / (batch * seconds)``; below 1 is faster than real time). The JSON also records the torch thread count,
the CPU model and the 1-minute load average before and after.

    python benchmarks/vghubert_segment_throughput.py           # paper widths; writes
                                                               # benchmarks/results/vghubert_segment_throughput.json
    python benchmarks/vghubert_segment_throughput.py --quick   # tiny towers, seconds; JSON to a temporary file
    python benchmarks/vghubert_segment_throughput.py --threads 2 --seconds 2 5 10 --batch-sizes 1 8 --reps 5
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vgskit.models import create_model
from vgskit.models.vg_hubert.model import DEFAULT_SEGMENT_QUANTILE
from vgskit.models.vg_hubert.wordseg import segment_words

RESULTS = Path(__file__).resolve().parent / "results" / "vghubert_segment_throughput.json"
SAMPLE_RATE = 16000
#: DINO ViT-S/8's shape (the reference's image tower); the segmentation never runs it.
VIT_S8 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, image_size=224,
              patch_size=8)
#: Tiny towers for --quick (a smoke run of the script, not a measurement).
QUICK_HUBERT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                    conv_dim=(16,) * 4, conv_stride=(5, 4, 4, 4), conv_kernel=(10, 4, 4, 4),
                    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
QUICK_VIT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine_info() -> dict[str, Any]:
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": cpu_model(), "cpu_cores_usable": usable, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "device": "cpu"}


def save_towers(folder: Path, quick: bool) -> tuple[Path, Path]:
    """Random HuBERT-Base and a DINO ViT-S/8-shaped ViT (or tiny ones) saved with transformers."""
    from transformers import HubertConfig, HubertModel, ViTConfig, ViTModel

    hubert, vit = folder / "hubert", folder / "vit"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        HubertModel(HubertConfig(**(QUICK_HUBERT if quick else {}))).save_pretrained(hubert)
        ViTModel(ViTConfig(**(QUICK_VIT if quick else VIT_S8)), add_pooling_layer=False).save_pretrained(vit)
    return hubert, vit


def build(towers: tuple[Path, Path], quick: bool) -> Any:
    overrides: dict[str, Any] = {"speech": {"name_or_path": str(towers[0])}, "image": {"name_or_path": str(towers[1])}}
    if quick:  # the tiny HuBERT has 3 layers: keep them all, re-initialise the last, read layer 1
        overrides["speech"].update(num_layers=3, reinit_last=1)
        overrides["segment_layer"] = 1
        overrides.update(embed_dim=16, proj_hidden=32)
    torch.manual_seed(0)
    return create_model("vg_hubert", **overrides).eval()


def speech_like_noise(batch: int, seconds: float, seed: int = 0) -> torch.Tensor:
    """``[batch, samples]`` white noise under a syllable-rate envelope (about 4 Hz) with pauses; peak about 0.3."""
    g = torch.Generator().manual_seed(seed)
    n = int(round(seconds * SAMPLE_RATE))
    t = torch.arange(n, dtype=torch.float32) / SAMPLE_RATE
    rate = 3.0 + 2.0 * torch.rand(batch, 1, generator=g)  # syllables per second, per row
    phase = 2 * math.pi * torch.rand(batch, 1, generator=g)
    envelope = torch.sin(math.pi * rate * t[None] + phase).abs() ** 2  # [B, n]
    pauses = torch.sin(2 * math.pi * 0.4 * t[None] + phase) > -0.7  # a pause of ~0.5 s every ~2.5 s
    return 0.1 * torch.randn(batch, n, generator=g) * envelope * pauses


def timed(fn: Callable[[], Any], reps: int, warmup: int) -> tuple[list[float], Any]:
    """Call ``fn`` ``warmup`` times untimed, then ``reps`` times timed; the times and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def summary(times: list[float], audio_seconds: float) -> dict[str, Any]:
    median = statistics.median(times)
    return {"median_s": round(median, 5), "min_s": round(min(times), 5), "reps": len(times),
            "audio_s_per_s": round(audio_seconds / median, 2), "rtf": round(median / audio_seconds, 5)}


def measure(model: Any, seconds: float, batch: int, reps: int, warmup: int, seg_reps: int) -> dict[str, Any]:
    wavs = speech_like_noise(batch, seconds)
    lengths = torch.full((batch,), wavs.shape[1], dtype=torch.long)
    audio = batch * seconds
    quantile = DEFAULT_SEGMENT_QUANTILE

    def attention() -> Any:
        with torch.no_grad():
            return model.cls_attention(wavs, lengths)

    attention_times, attn = timed(attention, reps, warmup)

    def segmentation() -> list[Any]:
        out = []
        for i in range(batch):
            n = int(attn.frames[i])
            out.append(segment_words(attn.weights[i, :, :n].float().cpu(), quantile, float(attn.seconds_per_frame[i]),
                                     feats=attn.features[i, :n].float().cpu()))
        return out

    segmentation_times, segments = timed(segmentation, seg_reps, warmup)
    # The forward is warm already (same shapes just ran); no further warm-up for the whole call.
    segment_times, whole = timed(lambda: model.segment(wavs, lengths, quantile=quantile), reps, 0)
    return {
        "seconds": seconds, "batch": batch, "audio_seconds": audio, "layer": attn.layer, "quantile": quantile,
        "frames": int(attn.frames[0]), "heads": int(attn.weights.shape[1]),
        "segments_per_utterance": round(sum(len(s) for s in segments) / batch, 2),
        "same_segments_in_segment_call": all(torch.equal(a.frames, b.frames) for a, b in zip(segments, whole,
                                                                                                strict=True)),
        "cls_attention": summary(attention_times, audio),
        "segment_words": summary(segmentation_times, audio),
        "segment": summary(segment_times, audio),
    }


def print_table(rows: list[dict[str, Any]], info: dict[str, Any], loads: list[float | None]) -> None:
    print(f"VG-HuBERT segmentation throughput, CPU ({info['cpu']}), torch threads {info['torch_threads']}, "
          f"load average (1 min) {loads[0]} before, {loads[1]} after")
    header = (f"{'sec':>5}{'batch':>6}{'frames':>7}{'segs/utt':>9}  {'part':<14}{'median s':>10}{'min s':>9}"
              f"{'audio s/s':>11}{'RTF':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        for i, part in enumerate(("cls_attention", "segment_words", "segment")):
            p = r[part]
            lead = (f"{r['seconds']:>5g}{r['batch']:>6}{r['frames']:>7}{r['segments_per_utterance']:>9.1f}" if i == 0
                    else " " * 27)
            print(f"{lead}  {part:<14}{p['median_s']:>10.4f}{p['min_s']:>9.4f}{p['audio_s_per_s']:>11.1f}"
                  f"{p['rtf']:>9.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[2.0, 5.0, 10.0], help="utterance lengths")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="utterances per call")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per row (cls_attention, segment)")
    parser.add_argument("--seg-reps", type=int, default=10, help="timed calls of the segmentation step alone")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny towers, short utterances; JSON to a temporary file unless --out")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.seconds, args.batch_sizes, args.reps, args.seg_reps = [1.0, 2.0], [1, 2], 2, 2
    out_path = args.out or (Path(tempfile.mkdtemp(prefix="vghubert_seg_")) / RESULTS.name if args.quick else RESULTS)

    load_before = load_average()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vghubert_towers_") as tmp:
        model = build(save_towers(Path(tmp), args.quick), args.quick)
    params_m = round(sum(p.numel() for p in model.speech_tower.parameters()) / 1e6, 2)
    rows = [measure(model, seconds, batch, args.reps, args.warmup, args.seg_reps)
            for seconds in args.seconds for batch in args.batch_sizes]
    loads = [load_before, load_average()]
    info = machine_info()
    report = {
        "benchmark": "vghubert_segment_throughput",
        "widths": "tiny (--quick)" if args.quick else "paper: HuBERT-Base speech tower (vg_hubert preset), random weights",
        "speech_tower_params_m": params_m, "sample_rate": SAMPLE_RATE, "audio": "speech-like noise",
        "warmup": args.warmup, "machine": info, "load_average_1min": loads,
        "total_wall_s": round(time.perf_counter() - t_start, 1), "rows": rows,
    }
    print_table(rows, info, loads)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
