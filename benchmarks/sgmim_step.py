"""Training-step time and peak memory of SG-MIM against plain VG-HuBERT (M), at the paper's widths.

SG-MIM (Woo et al., ICASSP 2024) adds to VG-HuBERT (M) a second pass of the image encoder over the visible 25 % of
the patches, a forward pass of the momentum (EMA) image encoder over the full images, a one-layer cross-modal
decoder, and the EMA update after every optimizer step. This script measures what that costs per training step.

**Models.** HuBERT-Base (``transformers.HubertConfig()``: 12 layers, width 768) and ViT-B/16 MAE
(``transformers.ViTMAEConfig()``: 12 layers, width 768, 224 px, 196 patches) with **random weights**, saved to a
temporary folder and loaded through the registry presets ``vg_hubert_m`` and ``sg_mim`` (the last 3 HuBERT layers
re-initialised, CNN frozen, MAE tower fine-tuned, SG-MIM's decoder 512 wide, 16 heads). The cost of a step does not
depend on the values of the weights.

**Batch.** ``--captions`` captions (default 4) of ``--seconds`` s (default 5) of noise, each with its own 224x224
image (so every image is distinct, the most image work a batch of that size can ask for).

**What is timed** (``time.perf_counter``, after ``--warmup`` steps; median and min over ``--steps`` steps): one full
training step as the trainer makes it: forward, backward, gradient clipping to norm 1, a BertAdam update, and
``after_step`` (SG-MIM's EMA update of the teacher). Three rows:

* ``vg_hubert_m``: the plain VG-HuBERT (M) step (margin InfoNCE);
* ``sg_mim_lambda0``: SG-MIM before its reconstruction loss starts (epochs 0-2: the masked branch is skipped, so
  the cost over VG-HuBERT (M) is the EMA update and the global-batch contrastive loss);
* ``sg_mim``: SG-MIM with λ = 2 (the masked branch, the teacher and the decoder run).

**Memory.** On CUDA, the peak of ``torch.cuda.max_memory_allocated`` over the timed steps (weights, optimizer state,
activations). On CPU, the peak resident set size of the process over the timed steps (``VmHWM`` after a reset), and
the resident size just before them (weights and, after the warm-up, the optimizer state); the models are built one
after the other in the same process, each freed before the next.

    python benchmarks/sgmim_step.py                  # paper widths; writes benchmarks/results/sgmim_step.json
    python benchmarks/sgmim_step.py --quick          # tiny widths, seconds; JSON to a temporary file
    python benchmarks/sgmim_step.py --device cuda    # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _memory import peak_rss_mib, reset_peak_rss  # benchmarks/_memory.py (the script's folder is on sys.path)
from vgskit.contract import Batch, ImageInputs, SpeechInputs, TrainState
from vgskit.models import create_model
from vgskit.train.config import TrainConfig
from vgskit.train.optim import create_optimizer

RESULTS = Path(__file__).resolve().parent / "results" / "sgmim_step.json"
SAMPLE_RATE = 16000
#: Tiny towers for --quick (a smoke run of the script, not a measurement).
QUICK_HUBERT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                    conv_dim=(16,) * 4, conv_stride=(5, 4, 4, 4), conv_kernel=(10, 4, 4, 4),
                    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
QUICK_MAE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "cpu": cpu_model(), "cpu_cores_usable": usable,
                            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def save_towers(folder: Path, quick: bool) -> tuple[Path, Path, int]:
    """Random HuBERT-Base and ViT-B/16 MAE (or tiny ones) saved with transformers; returns their folders and the
    image size."""
    from transformers import HubertConfig, HubertModel, ViTMAEConfig, ViTMAEModel

    hubert, mae = folder / "hubert", folder / "mae"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        HubertModel(HubertConfig(**(QUICK_HUBERT if quick else {}))).save_pretrained(hubert)
        mae_config = ViTMAEConfig(**(QUICK_MAE if quick else {}))
        ViTMAEModel(mae_config).save_pretrained(mae)
    return hubert, mae, int(mae_config.image_size)


def make_batch(captions: int, seconds: float, image_size: int, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(0)
    n = int(seconds * SAMPLE_RATE)
    wavs = torch.randn(captions, n, generator=g) * 0.1
    pixels = torch.randn(captions, 3, image_size, image_size, generator=g)
    batch = Batch(SpeechInputs.waveform(wavs, torch.full((captions,), n)), ImageInputs.from_pixels(pixels),
                  torch.arange(captions), torch.arange(captions))
    return batch.to_device(device)


def build(name: str, towers: tuple[Path, Path], quick: bool, device: torch.device) -> torch.nn.Module:
    overrides: dict[str, Any] = {"speech": {"name_or_path": str(towers[0])}, "image": {"name_or_path": str(towers[1])}}
    if quick:  # the tiny HuBERT has 3 layers: keep them all, re-initialise the last
        overrides["speech"].update(num_layers=3, reinit_last=1)
        overrides["segment_layer"] = 1
        if name == "sg_mim":
            overrides.update(decoder_dim=32, decoder_heads=2, decoder_ffn=64)
    torch.manual_seed(0)
    return create_model(name, **overrides).to(device).train()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: Any, batch: Batch, epoch: int, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Time ``warmup + steps`` full training steps at ``epoch`` (which sets SG-MIM's λ)."""
    cfg = TrainConfig(optimizer="bertadam", lr=5e-6, eps=1e-6, weight_decay=0.01, max_steps=warmup + steps)
    optimizer = create_optimizer(model.param_groups(cfg.weight_decay), cfg)
    total = warmup + steps

    def one(step: int) -> dict[str, float]:
        state = TrainState(step=step, epoch=epoch, epoch_float=float(epoch), total_steps=total)
        out = model(batch, state)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.after_step(TrainState(step=step + 1, epoch=epoch, epoch_float=float(epoch), total_steps=total))
        return {k: float(v.detach()) for k, v in out.losses.items()}

    for step in range(warmup):
        one(step)
    sync(device)
    gc.collect()
    # Where the kernel cannot reset the peak mark, the peak below is the process's since it started.
    peak_reset = reset_peak_rss()
    rss_before = _current_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], {}
    for step in range(warmup, total):
        sync(device)
        t0 = time.perf_counter()
        losses = one(step)
        sync(device)
        times.append(time.perf_counter() - t0)
    result: dict[str, Any] = {
        "step_s_median": round(statistics.median(times), 4),
        "step_s_min": round(min(times), 4),
        "steps_timed": steps,
        "losses_last_step": {k: round(v, 4) for k, v in losses.items()},
    }
    if device.type == "cuda":
        result["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        result["rss_before_steps_mib"] = round(rss_before, 1)
        result["peak_rss_mib"] = round(peak_rss_mib(), 1)
        result["peak_rss_reset"] = peak_reset
    return result


def _current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def parameter_counts(model: Any) -> dict[str, float]:
    """Millions of parameters: all, trainable (in the optimizer), and SG-MIM's teacher and decoder."""
    def millions(params: Any) -> float:
        return round(sum(p.numel() for p in params) / 1e6, 2)

    counts = {"total_m": millions(model.parameters()),
              "trainable_m": millions(p for p in model.parameters() if p.requires_grad)}
    for part in ("teacher", "decoder"):
        if hasattr(model, part):
            counts[f"{part}_m"] = millions(getattr(model, part).parameters())
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=4, help="captions (and distinct images) per step")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of speech per caption")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps per row first (with 1, the first row also paid for first-touch memory and kernel set-up: measured 11.5 s vs 6.3 s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny towers; JSON to a temporary file unless --out")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out_path = args.out or (Path(tempfile.mkdtemp(prefix="sgmim_step_")) / "sgmim_step.json" if args.quick else RESULTS)

    rows: dict[str, Any] = {}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="sgmim_towers_") as tmp:
        hubert, mae, image_size = save_towers(Path(tmp), args.quick)
        batch = make_batch(args.captions, args.seconds, image_size, device)
        for row, name, epoch in (("vg_hubert_m", "vg_hubert_m", 0), ("sg_mim_lambda0", "sg_mim", 0),
                                 ("sg_mim", "sg_mim", 3)):
            model = build(name, (hubert, mae), args.quick, device)
            result = {"model": name, "epoch": epoch, **parameter_counts(model)}
            result.update(measure(model, batch, epoch, args.steps, args.warmup, device))
            rows[row] = result
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = rows["vg_hubert_m"]["step_s_median"]
    for result in rows.values():
        result["time_vs_vg_hubert_m"] = round(result["step_s_median"] / base, 2)

    report = {
        "benchmark": "sgmim_step",
        "widths": "tiny (--quick)" if args.quick else "paper: HuBERT-Base + ViT-B/16 MAE, random weights",
        "captions": args.captions, "seconds": args.seconds, "image_size": image_size,
        "machine": machine_info(device),
        "load_average_1min": [None if load_before is None else round(load_before, 2),
                              round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None],
        "rows": rows,
    }
    memory_key = "cuda_peak_allocated_mib" if device.type == "cuda" else "peak_rss_mib"
    header = f"{'row':<16}{'params M':>10}{'trainable M':>13}{'step s (med)':>14}{'x VG-HuBERT(M)':>16}{memory_key:>26}"
    print(header)
    print("-" * len(header))
    for row, r in rows.items():
        print(f"{row:<16}{r['total_m']:>10.1f}{r['trainable_m']:>13.1f}{r['step_s_median']:>14.3f}"
              f"{r['time_vs_vg_hubert_m']:>16.2f}{r[memory_key]:>26.1f}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
