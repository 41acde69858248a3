"""Recall and time of coarse, coarse-to-fine (CTF) and exhaustive fine retrieval of a *trained* FaST-VGS.

The timing harness (``fastvgs_retrieval_timing.py``) measures the paper-width cross encoder with random weights:
the cost is right, the scores are not. This script takes a trained model — by default the ``fast_vgs_scenes``
recipe's run on the embedded spoken-scenes corpus — and measures on the test split (500 images, 2,500
captions), from **one** embedding pass shared by the three rankings:

* ``coarse``: dot products of the pooled embeddings;
* ``ctf@K`` for each ``--top`` K: the coarse top-K of every query re-ranked by the cross encoder;
* ``exhaustive_fine``: the cross encoder on every (caption, image) pair, both directions (the CTF ceiling).

For each: R@1/5/10 both directions, wall seconds of the ranking (embedding excluded) and seconds per query,
and for CTF the gap to exhaustive fine in recall points (the paper's claim: CTF keeps the fine recall at a
fraction of the cost). Exhaustive fine scores 2,500 x 500 = 1.25 M pairs per direction (about 25 minutes on two
cores for the small model); ``--max-images 100`` compares CTF with it on the first 100 test images.

    vgskit train --recipe fast_vgs_scenes --out runs/fast_vgs_scenes
    python benchmarks/fastvgs_scenes_recall.py --run runs/fast_vgs_scenes --no-exhaustive     # whole test split
    python benchmarks/fastvgs_scenes_recall.py --run runs/fast_vgs_scenes --max-images 100 --top 10 50 \
        --out benchmarks/results/fastvgs_scenes_recall_100.json                                # with exhaustive fine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fastvgs_retrieval_timing import machine_info  # noqa: E402
from vgskit.data.loader import RegionSource  # noqa: E402
from vgskit.data.scene_regions import resolve_region_features  # noqa: E402
from vgskit.experiment import data_config_from, load_experiment, load_model, make_dataset, resolve_manifest  # noqa: E402
from vgskit.metrics import gallery_sizes  # noqa: E402
from vgskit.retrieval.evaluate import embed_images, embed_speech, evaluate_retrieval, pair_scorer  # noqa: E402

KS = (1, 5, 10)


def _row(results: dict[str, Any]) -> dict[str, Any]:
    return {d: {f"R@{k}": round(results[d][f"R@{k}"], 2) for k in KS} for d in ("speech_to_image", "image_to_speech")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/fast_vgs_scenes"), help="trained run folder or checkpoint")
    p.add_argument("--recipe", default="fast_vgs_scenes", help="recipe whose data section names the corpus")
    p.add_argument("--split", default="test")
    p.add_argument("--top", type=int, nargs="+", default=[10, 50, 100], help="CTF candidate counts")
    p.add_argument("--no-exhaustive", action="store_true", help="skip the exhaustive fine ranking")
    p.add_argument("--max-images", type=int, default=None,
                   help="evaluate on the split's first N images only (exhaustive fine costs captions x images pairs)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "fastvgs_scenes_recall.json")
    args = p.parse_args()

    model = load_model(args.run).eval()
    data_cfg = data_config_from(load_experiment(args.recipe).get("data"))
    manifest = resolve_manifest(data_cfg, progress=False)
    regions = None
    if model.image_input == "regions":
        regions = RegionSource(resolve_region_features(data_cfg.region_features, manifest), data_cfg.num_regions)
    ds = make_dataset(manifest, args.split, model.image_transform, max_seconds=data_cfg.eval_max_seconds,
                      preload=True, progress=False, regions=regions, max_images=args.max_images)
    t0 = time.perf_counter()
    with torch.inference_mode():
        speech, image = embed_speech(model, ds), embed_images(model, ds)
    embed_s = time.perf_counter() - t0
    caption_image = torch.tensor(ds.caption_image_index, dtype=torch.long)
    n_capt, n_img = len(speech.pooled), len(image.pooled)
    fine = pair_scorer(model, speech, image)
    queries = n_capt + n_img  # both directions

    def ranked(reranker: Any, top: int) -> tuple[dict[str, Any], float]:
        t = time.perf_counter()
        with torch.inference_mode():
            out = evaluate_retrieval(speech.pooled, image.pooled, caption_image, ks=KS, reranker=reranker,
                                     rerank_top=top)
        return out, time.perf_counter() - t

    rows: dict[str, Any] = {}
    coarse, secs = ranked(None, 1)
    rows["coarse"] = {**_row(coarse), "seconds": round(secs, 3), "ms_per_query": round(1000 * secs / queries, 4)}
    print(f"coarse: {rows['coarse']}", flush=True)
    for top in args.top:
        res, secs = ranked(fine, top)
        rows[f"ctf@{top}"] = {**_row(res), "seconds": round(secs, 2), "ms_per_query": round(1000 * secs / queries, 3),
                              "pairs": top * queries}
        print(f"ctf@{top}: {rows[f'ctf@{top}']}", flush=True)
    if not args.no_exhaustive:
        res, secs = ranked(fine, max(n_capt, n_img))
        rows["exhaustive_fine"] = {**_row(res), "seconds": round(secs, 1),
                                   "ms_per_query": round(1000 * secs / queries, 2), "pairs": 2 * n_capt * n_img}
        print(f"exhaustive fine: {rows['exhaustive_fine']}", flush=True)
        for top in args.top:
            row = rows[f"ctf@{top}"]
            row["gap_to_exhaustive_points"] = {
                d: {f"R@{k}": round(row[d][f"R@{k}"] - rows["exhaustive_fine"][d][f"R@{k}"], 2) for k in KS}
                for d in ("speech_to_image", "image_to_speech")}
            row["speedup_over_exhaustive"] = round(rows["exhaustive_fine"]["seconds"] / row["seconds"], 1)
    chance = {d: {k: round(v, 3) for k, v in sizes.items()} for d, sizes in gallery_sizes(caption_image, n_img, KS).items()}
    out = {"run": str(args.run), "split": args.split, "max_images": args.max_images, "captions": n_capt, "images": n_img,
           "embedding_seconds": round(embed_s, 1), "rankings": rows, "gallery": chance,
           "machine": machine_info(), "torch_threads": torch.get_num_threads(), "pid": os.getpid()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
