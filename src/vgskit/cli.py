"""The ``vgskit`` command line.

    vgskit demo                                   # embedded corpus → train → evaluate → search → report
    vgskit data generate --preset tiny --out DIR  # (re)build the spoken-scenes corpus
    vgskit data check MANIFEST                    # validate a manifest and summarise it
    vgskit train --recipe demo --out runs/x [--manifest M] [--resume] [--set train.lr=3e-4]
    torchrun --nproc_per_node=2 -m vgskit.cli train --recipe demo --out runs/x   # multi-process
    vgskit eval --checkpoint runs/x/best --manifest M --split test
    vgskit index --checkpoint runs/x/best --manifest M --split test --out runs/x/index
    vgskit search --checkpoint runs/x/best --index runs/x/index query.wav [-k 5]

Imports of torch and friends happen inside the commands so that ``vgskit --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vgskit.errors import VGSKitError


def _cmd_demo(args: argparse.Namespace) -> int:
    from vgskit.demo import run_demo

    # A run already in --out is continued (interrupted) or reused (finished), never overwritten.
    run_demo(out_dir=args.out, preset=args.preset, recipe=args.recipe, workers=args.workers, overrides=args.set)
    return 0


def _cmd_data_generate(args: argparse.Namespace) -> int:
    from vgskit.data.synthetic import PRESETS, default_cache_dir, generate_spoken_scenes

    if args.preset not in PRESETS:
        raise VGSKitError(f"unknown preset {args.preset!r}; choose from {sorted(PRESETS)}")
    out = Path(args.out) if args.out else default_cache_dir() / f"spoken-scenes-{args.preset}"
    manifest = generate_spoken_scenes(out, PRESETS[args.preset], workers=args.workers)
    print(manifest)
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from vgskit.data.manifest import read_manifest, summarize

    records = read_manifest(args.manifest, check_files=not args.no_files)
    print(json.dumps(summarize(records), indent=2))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from vgskit.experiment import train_from_recipe

    summary = train_from_recipe(args.recipe, out_dir=args.out, manifest=args.manifest, overrides=args.set,
                                resume=args.resume)
    if summary is not None:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vgskit.experiment import evaluate_checkpoint
    from vgskit.metrics import format_recall_table

    results = evaluate_checkpoint(args.checkpoint, args.manifest, split=args.split, batch_size=args.batch_size)
    print(format_recall_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from vgskit.experiment import build_index

    out = build_index(args.checkpoint, args.manifest, split=args.split, out_dir=args.out)
    print(out)
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from vgskit.experiment import load_model
    from vgskit.retrieval.engine import SearchEngine

    model = load_model(args.checkpoint)
    engine = SearchEngine.load(args.index, model)
    for audio in args.audio:
        print(f"{audio}:")
        for hit in engine.search_by_audio(audio, k=args.k):
            print(f"  {hit.rank:>2}  {hit.score:7.3f}  {hit.item_id}  {hit.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vgskit", description="Visually grounded speech toolkit")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="generate the embedded corpus, train, evaluate, search and write a report")
    d.add_argument("--out", default="runs/demo",
                   help="output folder (default: runs/demo); a run already there is continued or reused")
    d.add_argument("--preset", default="demo", help="spoken-scenes size: demo (default) or tiny")
    d.add_argument("--recipe", default=None, help="training recipe name or YAML path (default: per preset)")
    d.add_argument("--workers", type=int, default=None, help="corpus generation processes (default: all cores)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    d.set_defaults(func=_cmd_demo)

    data = sub.add_parser("data", help="corpus tools").add_subparsers(dest="data_command", required=True)
    g = data.add_parser("generate", help="generate the spoken-scenes corpus")
    g.add_argument("--preset", default="demo")
    g.add_argument("--out", default=None, help="output folder (default: the vgskit cache)")
    g.add_argument("--workers", type=int, default=None)
    g.set_defaults(func=_cmd_data_generate)
    c = data.add_parser("check", help="validate a manifest and print a summary")
    c.add_argument("manifest")
    c.add_argument("--no-files", action="store_true", help="skip checking that audio/image files exist")
    c.set_defaults(func=_cmd_data_check)

    t = sub.add_parser("train", help="train a model from a recipe")
    t.add_argument("--recipe", required=True, help="recipe name (see vgskit/recipes) or YAML path")
    t.add_argument("--out", required=True, help="run folder (checkpoints, logs)")
    t.add_argument("--manifest", default=None, help="manifest JSONL (default: the recipe's data.manifest)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="retrieval recall of a checkpoint on a manifest split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--manifest", required=True)
    e.add_argument("--split", default="test")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.set_defaults(func=_cmd_eval)

    i = sub.add_parser("index", help="embed a split's images into a search index")
    i.add_argument("--checkpoint", required=True)
    i.add_argument("--manifest", required=True)
    i.add_argument("--split", default="test")
    i.add_argument("--out", required=True)
    i.set_defaults(func=_cmd_index)

    s = sub.add_parser("search", help="search an index with spoken queries (audio files)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--index", required=True)
    s.add_argument("-k", type=int, default=5)
    s.add_argument("audio", nargs="+")
    s.set_defaults(func=_cmd_search)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VGSKitError as err:
        print(f"vgskit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vgskit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
