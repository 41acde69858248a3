"""``vgskit demo``: the main job on the embedded spoken-scenes corpus, with no downloads.

1. generate (or reuse the cached) spoken-scenes corpus: rendered scenes, 5 TTS captions per image;
2. train the compact dual encoder from scratch (recipe ``demo``), selecting the best validation checkpoint;
3. evaluate on the held-out test split (R@1/5/10 both directions) beside the corpus's ceiling;
4. build a search index of the test images and answer a few spoken queries;
5. write ``report.html`` (recall table, training curve, top-5 images per sample query) and ``results.json``.

Runs on two CPU cores in about 6.5 minutes on an AMD EPYC (10–12 expected, not measured, on the slower Intel machines
of the same size; 1.5 minutes less once the corpus is cached). An interrupted demo continues from its last checkpoint when
started again with the same ``--out``, and a finished run is reused (evaluation and report are redone);
use another ``--out`` for a new run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vgskit.errors import ConfigError

DEFAULT_RECIPES = {"demo": "demo", "tiny": "demo_tiny"}
N_QUERIES = 6


def run_demo(out_dir: str | Path = "runs/demo", *, preset: str = "demo", recipe: str | None = None,
             workers: int | None = None, overrides: Iterable[str] = (), resume: bool = True,
             progress: bool = True) -> dict[str, Any]:
    """Run the whole demo and return the results written to ``out_dir/results.json``."""
    from vgskit.data.loader import RegionSource
    from vgskit.data.scene_regions import resolve_region_features
    from vgskit.data.synthetic import PRESETS, ceiling, generate_spoken_scenes, preset_dir
    from vgskit.experiment import (
        data_config_from,
        load_experiment,
        load_model,
        make_dataset,
        train_from_recipe,
    )
    from vgskit.metrics import format_recall_table
    from vgskit.report import write_report
    from vgskit.retrieval.engine import SearchEngine
    from vgskit.train.tracking import read_metrics

    if preset not in PRESETS:
        raise ConfigError(f"unknown corpus preset {preset!r}; choose from {sorted(PRESETS)}")
    recipe = recipe or DEFAULT_RECIPES.get(preset, "demo")
    out_dir = Path(out_dir)
    t_start = time.time()

    _say(f"[1/5] spoken-scenes corpus ({preset})", progress)
    corpus_dir = preset_dir(preset)
    t0 = time.time()
    manifest = generate_spoken_scenes(corpus_dir, PRESETS[preset], workers=workers, progress=progress)
    corpus_s = time.time() - t0

    _say(f"[2/5] training (recipe {recipe}) → {out_dir / 'train'}", progress)
    train_dir = out_dir / "train"
    summary = train_from_recipe(recipe, out_dir=train_dir, manifest=str(manifest), overrides=overrides,
                                resume=resume, progress=progress)

    if not summary.get("finished", True):
        print(f"warning: training stopped early ({summary.get('stopped_because')}) at step {summary.get('step')}; "
              "the results below are for a shorter run than the recipe asks", flush=True)

    _say("[3/5] evaluating the best checkpoint on the test split", progress)
    model = load_model(train_dir)
    # What the recipe feeds the model beyond pixels: region features (region models) and how many coarse
    # candidates the fine scorer re-ranks (models with score_pairs).
    data_cfg = data_config_from(load_experiment(recipe, overrides).get("data"))
    regions = None
    if model.image_input == "regions":
        path = resolve_region_features(data_cfg.region_features, manifest, progress=progress)
        regions = RegionSource(path, data_cfg.num_regions) if path else None
    rerank_top = data_cfg.rerank_top if model.has_fine_scores else None
    test_set = make_dataset(manifest, "test", model.image_transform, max_seconds=None, preload=True,
                            progress=progress, regions=regions)
    from vgskit.retrieval.evaluate import evaluate

    results = evaluate(model, test_set, source=f"{manifest} (split 'test')", rerank_top=rerank_top)
    ceil = ceiling(corpus_dir, "test")

    _say("[4/5] search index over the test images + sample spoken queries", progress)
    engine = SearchEngine.build_from_dataset(model, test_set)
    engine.save(out_dir / "index")
    records = test_set.records
    step = max(1, len(records) // N_QUERIES)
    queries = []
    for r in records[::step][:N_QUERIES]:
        # Five hits per query: re-rank at least five candidates.
        hits = engine.search_by_audio(r.audio, k=5, rerank_top=None if rerank_top is None else max(rerank_top, 5))
        queries.append({"audio": r.audio, "transcript": r.text, "speaker": r.speaker,
                        "gold_image_id": r.image_id, "hits": [asdict(h) for h in hits]})

    _say("[5/5] report", progress)
    info = {
        "corpus": str(corpus_dir),
        "test images": len(test_set.image_keys),
        "test captions": len(test_set),
        "recipe": recipe,
        "re-ranked candidates": rerank_top,
        "steps": summary.get("step"),
        "best step": summary.get("best_step"),
        "best val mean R@10": None if summary.get("best_metric") is None else round(summary["best_metric"], 2),
        "corpus time (s)": round(corpus_s, 1),
        "training time (s)": round(summary.get("train_wall_s", 0.0), 1),
        "total time (s)": round(time.time() - t_start, 1),
    }
    rows = read_metrics(train_dir) if (train_dir / "metrics.jsonl").is_file() else []
    html_path, json_path = write_report(out_dir, title="vgskit demo: spoken-scenes retrieval", results=results,
                                        ceiling=ceil, metrics_rows=rows, queries=queries, info=info)
    if "coarse" in results:  # a re-ranked evaluation: coarse recall first, then coarse-to-fine
        print(f"coarse (embeddings only)\n{format_recall_table(results['coarse'], ceiling=ceil)}")
        print(f"coarse-to-fine (top {rerank_top} re-ranked by the fine scorer)")
    print(format_recall_table(results, ceiling=ceil))
    print(f"report: {html_path}\nresults: {json_path}")
    # The one command that serves this index (needs the serve extra: pip install 'vgskit[serve]').
    print(f"serve it: vgskit serve --checkpoint {out_dir} --index demo={out_dir / 'index'}")
    return json.loads(json_path.read_text())


def _say(msg: str, enabled: bool) -> None:
    if enabled:
        print(msg, flush=True)
