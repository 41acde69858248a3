"""What moves the demo's recall: short runs of the ``demo`` recipe with one change each, validation recall compared.

Every variant trains the ``demo`` recipe on the spoken-scenes demo corpus for ``--steps`` steps (the learning rate
decays to zero over them, as in the full recipe) with the overrides listed in :data:`VARIANTS`, and records the
validation recall (250 images, 1,250 captions) at the end and at the half-way evaluation, plus the wall time. The
baseline ``mean pool, kernel 3`` is the first recipe (3-wide kernels, mean pooling of the speech frames, 2 captions
of each of 64 images a batch, fp32); each variant name says what it changes against that baseline
(``k7`` = ``model.audio.kernel_size=7``, ``max`` = max pooling of the speech frames).
A variant that collapses (recall at chance, 0.4 / 4.0) stays in the table: the recipe sits close to that edge
(a learning rate of 2e-3 collapses, and so do wider audio stages with attention pooling at the recipe's 1e-3).

Steps rather than wall time fix each variant's amount of training, so a variant's recall does not depend on the
machine's speed or load; the wall times in the JSON are only indicative (other jobs may have run beside). Runs
of one configuration differ by a point or two of R@1 (different kernels, different batches' timing), so only
differences well beyond that are read as effects.

    python benchmarks/demo_ablation.py                          # every variant, 600 steps each (~3.5 min each)
    python benchmarks/demo_ablation.py --only "k7 + attention pooling" --steps 600
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# The first recipe (kernel 3, mean pooling, 2 captions per image, fp32), then one change at a time.
BASELINE = ["model.audio.kernel_size=3", "model.audio_pool=mean", "data.captions_per_image=2", "train.amp=false"]
VARIANTS: dict[str, list[str]] = {
    "mean pool, kernel 3 (the first recipe)": [],
    "bf16 autocast (train.amp)": ["train.amp=true"],
    "k7 + learning rate 2e-3": ["model.audio.kernel_size=7", "train.lr=2e-3"],
    "learning rate 3e-3": ["train.lr=3e-3"],
    "kernel 5": ["model.audio.kernel_size=5"],
    "k7": ["model.audio.kernel_size=7"],
    "k5 + one transformer layer over the frames": ["model.audio.kernel_size=5", "model.audio_context_layers=1"],
    "k7 + wider image CNN (32; 64, 128, 256)": ["model.audio.kernel_size=7", "model.image.stem_channels=32",
                                                "model.image.channels=[64,128,256]"],
    "k7 + two residual blocks per audio stage": ["model.audio.kernel_size=7", "model.audio.depths=[2,2]"],
    "k7 + initial temperature 0.03": ["model.audio.kernel_size=7", "model.init_temperature=0.03"],
    "k7 + 80 mel bins": ["model.audio.kernel_size=7", "model.audio.features.n_mels=80"],
    "k7 + one caption per image (128 images a batch)": ["model.audio.kernel_size=7", "data.captions_per_image=1"],
    "k7 + 512-d embeddings": ["model.audio.kernel_size=7", "model.embed_dim=512"],
    "k7 + attention pooling": ["model.audio.kernel_size=7", "model.audio_pool=attention"],
    "k7 + attention + bf16 autocast": ["model.audio.kernel_size=7", "model.audio_pool=attention", "train.amp=true"],
    "k7 + attention + wider audio stages (192, 384)": ["model.audio.kernel_size=7", "model.audio_pool=attention",
                                                       "model.audio.channels=[192,384]"],
    "k7 + attention + one caption per image": ["model.audio.kernel_size=7", "model.audio_pool=attention",
                                               "data.captions_per_image=1"],
    "k9 + attention pooling (the recipe before)": ["model.audio.kernel_size=9", "model.audio_pool=attention"],
    "k11 + attention pooling": ["model.audio.kernel_size=11", "model.audio_pool=attention"],
    "k9 + attention + stem kernel 5": ["model.audio.kernel_size=9", "model.audio_pool=attention",
                                       "model.audio.stem_kernel=5"],
    "k9 + 4-head attention pooling": ["model.audio.kernel_size=9", "model.audio_pool=attention",
                                      "model.audio_pool_heads=4"],
    "k9 + max pooling": ["model.audio.kernel_size=9", "model.audio_pool=max"],
    "k7 + max pooling": ["model.audio.kernel_size=7", "model.audio_pool=max"],
    "k9 + max + bf16 autocast": ["model.audio.kernel_size=9", "model.audio_pool=max", "train.amp=true"],
    "k9 + max + one caption per image": ["model.audio.kernel_size=9", "model.audio_pool=max",
                                         "data.captions_per_image=1"],
    "k9 + max + one caption per image + bf16 autocast (the recipe now)": [
        "model.audio.kernel_size=9", "model.audio_pool=max", "data.captions_per_image=1", "train.amp=true"],
    "k7 + max + one caption per image + bf16 autocast": [
        "model.audio.kernel_size=7", "model.audio_pool=max", "data.captions_per_image=1", "train.amp=true"],
}


def run_variant(name: str, overrides: list[str], steps: int, manifest: Path, work: Path) -> dict:
    out = work / "".join(c if c.isalnum() else "_" for c in name)[:60]
    sets = [*BASELINE, *overrides, f"train.max_steps={steps}", f"train.eval_every={steps // 2}",
            f"train.ckpt_every={steps}", "train.time_budget_s=100000"]
    cmd = [sys.executable, "-c", "import sys; from vgskit.cli import main; sys.exit(main())", "train", "--recipe", "demo", "--out", str(out), "--manifest", str(manifest)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"overrides": overrides, "error": proc.stderr.strip()[-800:]}
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"val/' in line]
    keys = ("speech_to_image/R@1", "speech_to_image/R@10", "image_to_speech/R@1", "image_to_speech/R@10")
    return {"overrides": overrides, "wall_s": round(wall, 1),
            "val": {str(e["step"]): {k: round(e[f"val/{k}"], 2) for k in keys} for e in evals}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--only", action="append", help="run only this variant (repeatable)")
    p.add_argument("--manifest", default=None, help="default: the demo corpus (generated if missing)")
    p.add_argument("--work", default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "results" / "demo_ablation.json"))
    args = p.parse_args()
    from vgskit.data.synthetic import PRESETS, generate_spoken_scenes, preset_dir

    manifest = Path(args.manifest) if args.manifest else generate_spoken_scenes(preset_dir("demo"), PRESETS["demo"])
    names = args.only or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    import tempfile

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update(steps=args.steps, omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                  validation="250 images, 1,250 captions of the demo corpus's val split")
    variants = result.setdefault("variants", {})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        for name in names:
            variants[name] = run_variant(name, VARIANTS[name], args.steps, manifest, work)
            print(name, json.dumps(variants[name]), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
