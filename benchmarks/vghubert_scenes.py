"""Retrieval recall and word discovery of VG-HuBERT and SG-MIM trained from scratch on the embedded corpus.

For each trained run (by default the ``vg_hubert_scenes`` and ``sg_mim_scenes`` recipes' runs) on the spoken-scenes
test split (500 images, 2,500 captions):

* **recall**: speech -> image and image -> speech R@1/5/10 through the generic evaluator, beside chance;
* **word discovery**: word-boundary precision / recall / F1 and R-value, and token F1, of the CLS-attention segments
  against the synthesizer's word alignments (``python -m vgskit.data.scene_alignments``; espeak-ng captions only,
  flite captions have none), at 20 ms tolerance, beside the equal-length baseline with the same segment count
  (:mod:`vgskit.models.vg_hubert.evaluations`). The layer and the threshold quantile are chosen on the
  **validation** split (boundary F1 over a grid), then scored once on the test split; the model's default
  (``segment_layer``, quantile 0.7) is scored on test too.

    vgskit train --recipe vg_hubert_scenes --out runs/vg_hubert_scenes
    vgskit train --recipe sg_mim_scenes --out runs/sg_mim_scenes
    python -m vgskit.data.scene_alignments ~/.cache/vgskit/spoken-scenes-demo      # word alignments, once
    python benchmarks/vghubert_scenes.py --runs runs/vg_hubert_scenes runs/sg_mim_scenes
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fastvgs_retrieval_timing import machine_info  # noqa: E402
from vgskit.data.scene_alignments import word_alignments  # noqa: E402
from vgskit.experiment import data_config_from, load_experiment, load_model, make_dataset, resolve_manifest  # noqa: E402
from vgskit.models.vg_hubert.evaluations import evaluate_word_segmentation, format_word_segmentation  # noqa: E402
from vgskit.retrieval.evaluate import evaluate  # noqa: E402

KS = (1, 5, 10)


def _recall_row(result: dict[str, Any]) -> dict[str, Any]:
    return {d: {**{f"R@{k}": round(result[d][f"R@{k}"], 2) for k in KS},
                **{f"chance_R@{k}": round(result[d][f"chance_R@{k}"], 2) for k in KS}}
            for d in ("speech_to_image", "image_to_speech")}


def _scores(result: dict[str, Any]) -> dict[str, Any]:
    def pick(s: dict[str, Any]) -> dict[str, float]:
        b, t = s["boundary"], s["token"]
        return {"boundary_precision": round(100 * b["precision"], 2), "boundary_recall": round(100 * b["recall"], 2),
                "boundary_f1": round(100 * b["f1"], 2), "r_value": round(100 * b["r_value"], 2),
                "token_f1": round(100 * t["f1"], 2)}

    return {"layer": result["layer"], "quantile": result["quantile"], "tolerance_ms": result["tolerance_ms"],
            "captions": result["n_captions"], "mean_segments": round(result["mean_segments"], 2),
            "mean_words": round(result["mean_words"], 2), "model": pick(result["model"]),
            "equal_length": pick(result["equal_length"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, nargs="+", default=[Path("runs/vg_hubert_scenes"), Path("runs/sg_mim_scenes")])
    p.add_argument("--recipe", default="vg_hubert_scenes", help="recipe whose data section names the corpus")
    p.add_argument("--quantiles", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--val-captions", type=int, default=500, help="validation captions for choosing layer/quantile")
    p.add_argument("--tolerance-ms", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=HERE / "results" / "vghubert_scenes.json")
    p.add_argument("--train-seconds", nargs="*", default=[], metavar="MODEL=SECONDS",
                   help="training wall time of each run to record beside its scores (from `vgskit train`'s summary)")
    args = p.parse_args()
    args.train_seconds = {k: float(v) for k, v in (item.split("=", 1) for item in args.train_seconds)}

    data_cfg = data_config_from(load_experiment(args.recipe).get("data"))
    manifest = resolve_manifest(data_cfg, progress=False)
    word_alignments(manifest.parent)  # computed once per corpus (a few minutes), verified on every load
    out: dict[str, Any] = {"tolerance_ms": args.tolerance_ms, "machine": machine_info(),
                           "torch_threads": torch.get_num_threads(), "runs": {}}
    for run in args.runs:
        model = load_model(run).eval()
        name = getattr(model, "model_name", None) or type(model).__name__
        kwargs = dict(max_seconds=data_cfg.eval_max_seconds, preload=True, progress=False)
        val = make_dataset(manifest, "val", model.image_transform, **kwargs)
        test = make_dataset(manifest, "test", model.image_transform, **kwargs)
        t0 = time.perf_counter()
        with torch.inference_mode():
            recall = evaluate(model, test, ks=KS, source=f"{manifest} (test)")
        recall_s = time.perf_counter() - t0
        # Layer and quantile chosen on validation captions, by boundary F1.
        grid = []
        n_layers = model.num_layers
        for layer, q in itertools.product(range(n_layers), args.quantiles):
            res = evaluate_word_segmentation(model, val, layer=layer, quantile=q, tolerance_ms=args.tolerance_ms,
                                             max_captions=args.val_captions, source=f"{manifest} (val)")
            grid.append({"layer": layer, "quantile": q, "boundary_f1": round(100 * res["model"]["boundary"]["f1"], 2),
                         "baseline_boundary_f1": round(100 * res["equal_length"]["boundary"]["f1"], 2)})
            print(f"{name} val layer {layer} q {q}: boundary F1 {grid[-1]['boundary_f1']} "
                  f"(equal-length {grid[-1]['baseline_boundary_f1']})", flush=True)
        best = max(grid, key=lambda g: g["boundary_f1"])
        t0 = time.perf_counter()
        chosen = evaluate_word_segmentation(model, test, layer=best["layer"], quantile=best["quantile"],
                                            tolerance_ms=args.tolerance_ms, source=f"{manifest} (test)")
        seg_s = time.perf_counter() - t0
        default = evaluate_word_segmentation(model, test, tolerance_ms=args.tolerance_ms, source=f"{manifest} (test)")
        print(f"\n{name} ({run}) test recall:", json.dumps(_recall_row(recall)))
        print(format_word_segmentation(chosen))
        print("model default:\n" + format_word_segmentation(default), flush=True)
        out["runs"][name] = {
            "run": str(run), "train_wall_s": args.train_seconds.get(name),
            "recall_test": _recall_row(recall), "recall_seconds": round(recall_s, 1),
            "segmentation_val_grid": grid, "segmentation_test_chosen": _scores(chosen),
            "segmentation_test_default": _scores(default), "segmentation_seconds": round(seg_s, 1),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
