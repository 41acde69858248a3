"""fp32 vs bf16 autocast on the CPU: a GEMM, base-size speech and vision towers, and a demo model's recall.

Four measurements, each fp32 then bf16 (:func:`vgskit.precision.autocast`; the bf16 GEMM multiplies bfloat16
tensors directly):

* ``gemm``: a square float matrix product (``--gemm-size``, default 2048);
* ``hubert_base``: a random-weight HuBERT-Base (``transformers.HubertConfig()`` defaults: 12 layers, width 768)
  on 4 utterances of 5 s at 16 kHz (no download);
* ``clip_vit_b32``: a random-weight CLIP ViT-B/32 vision tower (``CLIPVisionConfig()`` defaults) on 8 images
  of 224 x 224;
* ``demo_eval``: :func:`vgskit.retrieval.evaluate.evaluate` of a trained demo dual encoder at fp32 and bf16,
  recall side by side with the difference: the ``runs/demo`` checkpoint on the spoken-scenes demo test split
  when it exists, else a model trained by ``vgskit demo --preset tiny`` (``--tiny-run``, trained first if
  missing, about 20 s) on the tiny corpus's test split and, when the demo corpus is cached, on the demo test
  split as well (a larger gallery shows smaller recall differences).

Times are minima over ``--repeats`` runs after one warm-up, under ``torch.no_grad`` with the model in eval mode,
with ``torch.set_num_threads`` = ``$OMP_NUM_THREADS`` (default 2). The relative difference of the outputs,
``|bf16 - fp32| / |fp32|`` (Frobenius norms), is reported beside each time. bf16 only pays on a CPU with native
bf16 (:func:`vgskit.precision.cpu_supports_bf16`, recorded in the JSON); elsewhere it is emulated and slower.

    OMP_NUM_THREADS=2 python benchmarks/bf16.py            # -> benchmarks/results/bf16.json
    python benchmarks/bf16.py --skip-demo --repeats 2 --out /tmp/bf16.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vgskit.precision import autocast, cpu_supports_bf16

KS = (1, 5, 10)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in float64 (Frobenius norms)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, list[float], torch.Tensor]:
    """``(min seconds, all seconds, output)`` of ``fn`` over ``repeats`` runs after one warm-up run."""
    out = fn()  # warm-up: one-time allocations, oneDNN kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), times, out


def _pair(name: str, fp32: Callable[[], torch.Tensor], bf16: Callable[[], torch.Tensor], repeats: int,
          what: dict[str, Any]) -> dict[str, Any]:
    t32, all32, out32 = _time(fp32, repeats)
    t16, all16, out16 = _time(bf16, repeats)
    row = {"what": what, "fp32_s": t32, "bf16_s": t16, "speedup": t32 / t16, "rel_diff": _rel(out16.float(), out32),
           "fp32_s_all": all32, "bf16_s_all": all16}
    print(f"{name:<14} fp32 {t32:8.3f} s   bf16 {t16:8.3f} s   x{t32 / t16:4.2f}   rel diff {row['rel_diff']:.2e}",
          flush=True)
    return row


@torch.no_grad()
def bench_gemm(size: int, repeats: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    a16, b16 = a.bfloat16(), b.bfloat16()
    row = _pair("gemm", lambda: a @ b, lambda: a16 @ b16, repeats, {"m=n=k": size})
    row["fp32_gflops"] = 2 * size**3 / row["fp32_s"] / 1e9
    row["bf16_gflops"] = 2 * size**3 / row["bf16_s"] / 1e9
    return row


@torch.no_grad()
def bench_hubert(repeats: int) -> dict[str, Any]:
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    model = HubertModel(HubertConfig()).eval()
    wavs = torch.randn(4, 5 * 16000, generator=torch.Generator().manual_seed(1)) * 0.1

    def run(precision: str) -> torch.Tensor:
        with autocast(precision, "cpu"):
            return model(wavs).last_hidden_state

    params = sum(p.numel() for p in model.parameters())
    return _pair("hubert_base", lambda: run("fp32"), lambda: run("bf16"), repeats,
                 {"config": "HubertConfig() defaults, random weights", "input": "4 x 5 s at 16 kHz",
                  "parameters": params})


@torch.no_grad()
def bench_clip(repeats: int) -> dict[str, Any]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig()
    model = CLIPVisionModel(config).eval()
    pixels = torch.randn(8, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(1))

    def run(precision: str) -> torch.Tensor:
        with autocast(precision, "cpu"):
            return model(pixel_values=pixels).pooler_output

    params = sum(p.numel() for p in model.parameters())
    return _pair("clip_vit_b32", lambda: run("fp32"), lambda: run("bf16"), repeats,
                 {"config": "CLIPVisionConfig() defaults (ViT-B/32), random weights",
                  "input": f"8 x 3 x {config.image_size} x {config.image_size}", "parameters": params})


def _recall_rows(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {d: {f"R@{k}": results[d][f"R@{k}"] for k in KS} for d in ("speech_to_image", "image_to_speech")}


def _eval_both(model: Any, manifest: Path, label: str) -> dict[str, Any]:
    from vgskit.experiment import make_dataset
    from vgskit.retrieval.evaluate import embed_images, embed_speech, evaluate

    ds = make_dataset(manifest, "test", model.image_transform, max_seconds=None, preload=True, progress=False)
    out: dict[str, Any] = {"manifest": str(manifest), "split": "test", "images": len(ds.image_keys),
                           "captions": len(ds)}
    for precision in ("fp32", "bf16"):
        start = time.perf_counter()
        results = evaluate(model, ds, precision=precision)
        out[f"{precision}_eval_s"] = time.perf_counter() - start
        out[precision] = _recall_rows(results)
        out[f"{precision}_ran_at"] = results.get("precision", "fp32")
    out["bf16_minus_fp32"] = {d: {k: out["bf16"][d][k] - out["fp32"][d][k] for k in out["fp32"][d]}
                              for d in out["fp32"]}
    s32, s16 = embed_speech(model, ds, precision="fp32"), embed_speech(model, ds, precision="bf16")
    i32, i16 = embed_images(model, ds, precision="fp32"), embed_images(model, ds, precision="bf16")
    out["speech_emb_rel_diff"] = _rel(s16.pooled, s32.pooled)
    out["image_emb_rel_diff"] = _rel(i16.pooled, i32.pooled)
    print(f"demo_eval [{label}] {out['images']} images / {out['captions']} captions "
          f"(eval fp32 {out['fp32_eval_s']:.1f} s, bf16 {out['bf16_eval_s']:.1f} s; embedding rel diff speech "
          f"{out['speech_emb_rel_diff']:.2e}, image {out['image_emb_rel_diff']:.2e})")
    for d in out["fp32"]:
        cells = "  ".join(f"{k} {out['fp32'][d][k]:5.1f} / {out['bf16'][d][k]:5.1f} "
                          f"({out['bf16_minus_fp32'][d][k]:+.1f})" for k in out["fp32"][d])
        print(f"  {d:<16} fp32 / bf16 (diff): {cells}", flush=True)
    return out


def bench_demo(demo_run: Path, tiny_run: Path) -> dict[str, Any]:
    from vgskit.data.synthetic import preset_dir
    from vgskit.experiment import load_model

    if (demo_run / "train").is_dir() and (demo_run / "results.json").is_file():
        model = load_model(demo_run / "train")
        return {"source": f"trained demo checkpoint {demo_run}",
                "demo_test": _eval_both(model, preset_dir("demo") / "manifest.jsonl", "demo test")}
    if not (tiny_run / "results.json").is_file():
        print(f"no trained checkpoint at {demo_run}: training one with `vgskit demo --preset tiny --out {tiny_run}`",
              flush=True)
        subprocess.run([sys.executable, "-m", "vgskit.cli", "demo", "--preset", "tiny", "--out", str(tiny_run)],
                       check=True, stdout=subprocess.DEVNULL)
    model = load_model(tiny_run / "train")
    out: dict[str, Any] = {
        "source": f"no checkpoint at {demo_run}; the tiny preset's model (`vgskit demo --preset tiny --out {tiny_run}`)",
        "tiny_test": _eval_both(model, preset_dir("tiny") / "manifest.jsonl", "tiny test"),
    }
    demo_manifest = preset_dir("demo") / "manifest.jsonl"
    if demo_manifest.is_file():
        out["demo_test_with_tiny_model"] = _eval_both(model, demo_manifest, "demo test, tiny-preset model")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gemm-size", type=int, default=2048)
    parser.add_argument("--demo-run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--tiny-run", type=Path, default=Path("/tmp/bf16demo"))
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bf16.json"))
    args = parser.parse_args(argv)

    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    native = cpu_supports_bf16()
    print(f"threads {threads}, native bf16: {native}, cpu capability {torch.backends.cpu.get_cpu_capability()}",
          flush=True)
    load_before = os.getloadavg()
    results: dict[str, Any] = {
        "gemm": bench_gemm(args.gemm_size, args.repeats),
        "hubert_base": bench_hubert(args.repeats),
        "clip_vit_b32": bench_clip(args.repeats),
    }
    if not args.skip_demo:
        results["demo_eval"] = bench_demo(args.demo_run, args.tiny_run)
    report = {
        "config": {"repeats": args.repeats, "threads": threads, "gemm_size": args.gemm_size},
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_native_bf16": native,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "time_note": "minimum over repeats after one warm-up; the machine is shared and other work may have been "
                     "running (see the load averages), so the times are upper bounds of the quiet-machine ones",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
