"""The ``vgskit`` command line.

    vgskit demo                                   # embedded corpus → train → evaluate → search → report
    vgskit data generate --preset tiny --out DIR  # (re)build the spoken-scenes corpus
    vgskit data prepare flickr8k --root DIR --out DIR   # a public corpus -> manifest (see vgskit.data.corpora)
    vgskit data check MANIFEST [--expected flickr8k] [--plot durations.png]   # files, durations, split sizes
    vgskit train --recipe demo --out runs/x [--manifest M --corpus flickr8k] [--resume] [--set train.lr=3e-4]
    torchrun --nproc_per_node=2 -m vgskit.cli train --recipe demo --out runs/x   # multi-process
    vgskit eval --checkpoint runs/x --manifest M [--split test | --corpus places]   # runs/x: best checkpoint
    vgskit eval --checkpoint runs/x --manifest M --zero-shot-text   # + speech <-> caption text (text-tower models)
    vgskit eval --checkpoint runs/x --manifest M --keyword-hit-rate # + per-slot keyword hit rate (cascaded models)
    vgskit eval --checkpoint runs/x --manifest M --rerank-top 100 [--exhaustive-fine]  # coarse-to-fine (fine scorers)
    vgskit eval --model NAME --manifest M                          # a registered model as built
    vgskit index --checkpoint runs/x --manifest M --split test --out runs/x/index
    vgskit cache verify /data/features [--model NAME_OR_CHECKPOINT] [--sample 16]   # check a feature cache
    vgskit search --checkpoint runs/x --index runs/x/index query.wav [-k 5]
    vgskit serve --checkpoint runs/x --index demo=runs/x/index [--port 8000]   # HTTP search service (extra: serve)
    vgskit layers --checkpoint runs/x --out layers.png [--json layers.json]   # hidden-state weights
    vgskit keywords --checkpoint runs/x a.wav b.flac [-k 5] [--json kw.json]  # keywords of a cascaded model
    vgskit convert speechclip released.ckpt --config speechclip_parallel_base --out models/p_base  # reference ckpt

Commands, evaluations and converters of a model family (``keywords``, ``layers``, ``--zero-shot-text``,
``convert speechclip``) come from the registries of :mod:`vgskit.extensions`, filled when the family packages
are imported.

Errors. Every command checks its options and where it will write (``--out``, ``--json``, ``--plot``: a folder
where a file is meant or the reverse, a file in the way of a folder to create, a folder it may not write to)
before it loads a model or reads a corpus, so a mistake costs seconds, not an evaluation. Missing parent
folders of an output are created. A mistake in the input, and any failure of the file system (permission
denied, disk full), is printed as one line ``vgskit: error: ...`` naming the file or option, with exit status
2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vgskit.errors import VGSKitError


def _output(path: str | Path | None, option: str, *, folder: bool = False) -> Path | None:
    """``path`` checked as an output (see :func:`vgskit.experiment.check_output_path`), or None when not given."""
    if path is None:
        return None
    from vgskit.experiment import check_output_path

    return check_output_path(path, option, folder=folder)


def _input_file(path: str, option: str) -> None:
    """Refuse a missing input file before a model is loaded for it."""
    p = Path(path)
    if not p.is_file():
        raise VGSKitError(f"{option} {p}: " + ("is a folder, not a file" if p.is_dir() else "file not found"))


def _load_model(checkpoint: str) -> Any:
    from vgskit.experiment import load_model_named

    return load_model_named(checkpoint)


def _cmd_demo(args: argparse.Namespace) -> int:
    from vgskit.demo import run_demo

    _output(args.out, "--out", folder=True)  # before the corpus is generated
    # A run already in --out is continued (interrupted) or reused (finished), never overwritten.
    run_demo(out_dir=args.out, preset=args.preset, recipe=args.recipe, workers=args.workers, overrides=args.set)
    return 0


def _cmd_data_generate(args: argparse.Namespace) -> int:
    from vgskit.data.synthetic import PRESETS, generate_spoken_scenes, preset_dir

    if args.preset not in PRESETS:
        raise VGSKitError(f"unknown preset {args.preset!r}; choose from {sorted(PRESETS)}")
    out = _output(args.out, "--out", folder=True) or preset_dir(args.preset)
    manifest = generate_spoken_scenes(out, PRESETS[args.preset], workers=args.workers)
    print(manifest)
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from vgskit.data.check import check_manifest, format_report, write_report

    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if _output(path, option) is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)  # missing folders of an output are created
    report = check_manifest(args.manifest, expected=args.expected, workers=args.workers,
                            check_files=not args.no_files, deep=args.deep, plot=args.plot)
    print(format_report(report))
    if args.json:
        write_report(report, args.json)
    # A non-zero exit lets scripts stop before training on a corpus with problems.
    return 0 if report["ok"] else 1


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    import logging

    from vgskit.data.corpora import REPORT_NAME, prepare_corpus

    logging.basicConfig(level=logging.INFO, format="vgskit: %(message)s")
    _output(args.out, "--out", folder=True)
    opts: dict[str, object] = {"on_missing": args.on_missing, "check_files": not args.no_files}
    if args.images:
        pairs = [i.split("=", 1) for i in args.images if "=" in i]
        # "--images coco=DIR --images open_images=DIR" gives one folder per collection (Localized Narratives).
        opts["images"] = dict(pairs) if pairs and len(pairs) == len(args.images) else args.images[-1]
    if args.audio:
        opts["audio"] = args.audio
    # Lists are comma-separated on the command line; flickr8k's --splits is a single mode name instead.
    list_options = {"collections"} | ({"splits"} if args.corpus == "places" else set())
    for key in ("splits", "scheme", "form", "collections"):
        value = getattr(args, key)
        if value is not None:
            opts[key] = value.split(",") if key in list_options else value
    manifest = prepare_corpus(args.corpus, args.root, args.out, **opts)
    report = json.loads((manifest.parent / REPORT_NAME).read_text())
    for name, v in report["splits"].items():
        print(f"{name:<12} {v['images']:>8} images {v['captions']:>9} captions")
    if report["missing_files"]:
        print(f"{report['missing_files']} missing file(s), {report['dropped_captions']} caption(s) dropped; "
              f"listed in {manifest.parent / REPORT_NAME}")
    print(manifest)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from vgskit.experiment import train_from_recipe

    _output(args.out, "--out", folder=True)
    summary = train_from_recipe(args.recipe, out_dir=args.out, manifest=args.manifest, corpus=args.corpus,
                                overrides=args.set, resume=args.resume)
    if summary is not None:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _recall_tables(results: dict) -> str:
    """The recall table(s), then the table of every family evaluation in the results that has a format.

    With re-ranking or exhaustive fine scores the coarse, coarse-to-fine and exhaustive-fine tables come one
    after another under their own headings, so the gain of the fine stage and the loss of its cut-off are read
    off one output.
    """
    from vgskit.extensions import get_evaluation, list_evaluations
    from vgskit.metrics import format_recall_table

    if "rerank_top" not in results and "exhaustive_fine" not in results:
        text = format_recall_table(results)
    else:
        top = results.get("rerank_top")
        sections = [("coarse", "dot products of the pooled embeddings", results.get("coarse", results))]
        if top is not None:
            sections.append((f"coarse-to-fine (top {top} re-ranked)",
                             f"the {top} best coarse candidates of every query re-ranked by the fine scorer", results))
        if "exhaustive_fine" in results:
            sections.append(("exhaustive fine", "the fine scorer over every (query, gallery item) pair",
                             results["exhaustive_fine"]))
        text = "\n\n".join(f"{title}: {what}\n{format_recall_table(block)}" for title, what, block in sections)
    for name in list_evaluations():
        ev = get_evaluation(name)
        if name in results and ev.format is not None:
            text += "\n\n" + ev.format(results[name])
    return text


def _cmd_eval(args: argparse.Namespace) -> int:
    from vgskit.data.splits import corpus_splits
    from vgskit.experiment import evaluate_splits, model_for_evaluation
    from vgskit.extensions import get_evaluation, list_evaluations
    from vgskit.train.config import apply_overrides

    if args.batch_size < 1:
        raise VGSKitError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.rerank_top is not None and args.rerank_top < 1:
        raise VGSKitError(f"--rerank-top must be >= 1, got {args.rerank_top}")
    if args.set and args.model is None:
        raise VGSKitError("--set applies to --model NAME (a checkpoint's config is the one it was trained with)")
    _output(args.json, "--json")  # before the (long) evaluation, not after it
    _input_file(args.manifest, "--manifest")
    extras: dict[str, dict] = {}
    for name in list_evaluations():
        options = get_evaluation(name).options_from_args(args)
        if options is not None:
            extras[name] = options
    by_corpus = args.corpus is not None and args.split is None
    splits = list(corpus_splits(args.corpus).test) if by_corpus else [args.split or "test"]
    if not splits:
        raise VGSKitError(f"corpus {args.corpus!r} has no standard test split (it is used for pretraining)")
    overrides = apply_overrides({}, args.set) if args.set else None
    model = _load_model(args.checkpoint) if args.checkpoint is not None else model_for_evaluation(
        None, args.model, overrides)
    from vgskit.precision import precision_scope

    # evaluate_splits passes no precision down: the scope is the default of every evaluate() inside it.
    with precision_scope(getattr(args, "precision", "fp32")):
        per_split = evaluate_splits(model, args.manifest, splits, batch_size=args.batch_size,
                                    rerank_top=args.rerank_top, extras=extras, region_features=args.region_features,
                                    speech_features=args.speech_features,
                                    exhaustive_fine=args.exhaustive_fine)
    if by_corpus:
        results: dict = per_split
        for split, split_results in per_split.items():
            print(f"[{split}]\n{_recall_tables(split_results)}")
    else:
        results = per_split[splits[0]]
        print(_recall_tables(results))
    if args.json:
        from vgskit.experiment import write_output_text

        write_output_text(args.json, json.dumps(results, indent=2), "--json")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    import shutil

    from vgskit.experiment import build_index
    from vgskit.retrieval.shards import build_options

    _output(args.out, "--out", folder=True)
    _input_file(args.manifest, "--manifest")
    if args.workers < 1:
        raise VGSKitError(f"--workers must be >= 1, got {args.workers}")
    if not args.memory_budget_mb > 0:
        raise VGSKitError(f"--memory-budget-mb must be positive, got {args.memory_budget_mb}")
    # Finished shards wait here until the index is saved: a rerun after an interruption reuses them.
    work = Path(args.work_dir) if args.work_dir else Path(args.out).with_name(Path(args.out).name + ".work")
    from vgskit.precision import precision_scope

    with build_options(workers=args.workers, work_dir=work, index_kind=args.index_kind,
                       memory_budget_mb=args.memory_budget_mb, captions=not args.no_captions), \
            precision_scope(args.precision):
        out = build_index(args.checkpoint, args.manifest, split=args.split, out_dir=args.out,
                          region_features=args.region_features)
    shutil.rmtree(work, ignore_errors=True)
    meta = json.loads((Path(out) / "index.json").read_text(encoding="utf-8"))
    info = meta["index"]
    line = f"{meta['count']} images, index {info['kind']}"
    if info["kind"] != "exact":
        line += (f" ({', '.join(f'{k}={v}' for k, v in info['params'].items())}), recall@10 vs exact "
                 f"{info['recall_at_10']} on {info['recall_queries']} sampled queries")
    if "captions" in meta:
        line += f", {meta['captions']['count']} spoken captions"
    print(line)
    print(out)
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from vgskit.retrieval.engine import SearchEngine

    if args.k < 1:
        raise VGSKitError(f"-k must be >= 1, got {args.k}")
    model = _load_model(args.checkpoint)
    engine = SearchEngine.load(args.index, model)
    for audio in args.audio:
        print(f"{audio}:")
        for hit in engine.search_by_audio(audio, k=args.k, rerank_top=args.rerank_top):
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
    pr = data.add_parser("prepare", help="turn a public corpus into a manifest")
    pr.add_argument("corpus", choices=["flickr8k", "spokencoco", "places", "localized_narratives", "csc"])
    pr.add_argument("--root", required=True, help="folder the corpus was unpacked into")
    pr.add_argument("--out", required=True, help="output folder for manifest.jsonl and prepare_report.json")
    pr.add_argument("--images", action="append", default=[], metavar="DIR|COLLECTION=DIR",
                    help="image folder, if not found under --root")
    pr.add_argument("--audio", default=None, help="audio folder (places, localized_narratives, csc)")
    pr.add_argument("--on-missing", choices=["drop", "error"], default="drop",
                    help="captions with missing files: drop them with a warning (default) or fail")
    pr.add_argument("--no-files", action="store_true", help="do not check that audio/image files exist")
    pr.add_argument("--splits", default=None,
                    help="flickr8k: auto|official|karpathy; places: comma-separated subset of the 2020 splits")
    pr.add_argument("--scheme", default=None, help="spokencoco: karpathy (default) or original")
    pr.add_argument("--form", default=None, help="spokencoco: auto (default), per_image or unrolled")
    pr.add_argument("--collections", default=None,
                    help="localized_narratives: comma-separated subset of coco,open_images,flickr30k,ade20k")
    pr.set_defaults(func=_cmd_data_prepare)
    c = data.add_parser("check", help="check a manifest's files and summarise it")
    c.add_argument("manifest")
    c.add_argument("--no-files", action="store_true", help="skip checking that audio/image files exist")
    c.add_argument("--expected", default=None, metavar="CORPUS",
                   help="compare split sizes with a corpus's standard ones (flickr8k, spokencoco_karpathy, "
                        "spokencoco_original)")
    c.add_argument("--plot", default=None, metavar="PATH", help="write a histogram of audio durations (PNG)")
    c.add_argument("--deep", action="store_true", help="decode every file instead of reading headers")
    c.add_argument("--workers", type=int, default=None, help="threads opening files (default: up to 8)")
    c.add_argument("--json", default=None, metavar="PATH", help="also write the full report as JSON")
    c.set_defaults(func=_cmd_data_check)

    t = sub.add_parser("train", help="train a model from a recipe")
    t.add_argument("--recipe", required=True, help="recipe name (see vgskit/recipes) or YAML path")
    t.add_argument("--out", required=True, help="run folder (checkpoints, logs)")
    t.add_argument("--manifest", default=None, help="manifest JSONL (default: the recipe's data.manifest)")
    t.add_argument("--corpus", default=None,
                   help="use this corpus's standard split names (flickr8k, spokencoco, places, ...)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="retrieval recall of a checkpoint (or a registered model) on a manifest split")
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="run folder, checkpoint folder, saved model folder or Hugging Face Hub id owner/name[@revision]")
    which.add_argument("--model", default=None,
                       help="a registered model evaluated as built, without trained weights of its own")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --model: override a config value of the registered model")
    e.add_argument("--manifest", required=True)
    e.add_argument("--split", default=None, help="split to evaluate (default: test, or the corpus's test splits)")
    e.add_argument("--corpus", default=None, help="evaluate every split this corpus's papers report on")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32 (default) or bf16 autocast for the embedding passes; bf16 runs where the CPU/GPU has "
                        "native bf16 and falls back to fp32 with a warning elsewhere; embeddings are scored in fp32")
    e.add_argument("--rerank-top", type=int, default=None,
                   help="coarse-to-fine: re-rank the N best coarse candidates of every query with the model's "
                        "fine scorer (models with score_pairs); the coarse recall is printed beside it")
    e.add_argument("--exhaustive-fine", action="store_true",
                   help="also score every (caption, image) pair with the fine scorer (models with score_pairs): "
                        "the ceiling of --rerank-top; costs captions x images fine scores")
    e.add_argument("--region-features", default=None,
                   help="HDF5 file of the images' region features (models that read regions); 'scene_boxes' with a "
                        "spoken-scenes manifest: the generator's boxes with EfficientNet-Lite0 features")
    e.add_argument("--speech-features", default=None,
                   help="precomputed speech frames by caption id (models that read features, e.g. MILAN with "
                        "frontend.kind features): an HDF5 file, or a folder of <caption_id>.npy with meta.json")
    from vgskit.extensions import get_evaluation, list_evaluations

    for name in list_evaluations():  # the families' own evaluations add their flags
        get_evaluation(name).add_cli_arguments(e)
    e.add_argument("--json", default=None,
                   help="also write the results to this JSON file (checked before the evaluation; missing folders "
                        "are created)")
    e.set_defaults(func=_cmd_eval)

    i = sub.add_parser("index", help="embed a split's images into a search index")
    i.add_argument("--checkpoint", required=True, help="run, checkpoint or model folder, or a hub id owner/name[@revision]")
    i.add_argument("--manifest", required=True)
    i.add_argument("--split", default="test")
    i.add_argument("--out", required=True)
    i.add_argument("--region-features", default=None,
                   help="HDF5 file of the images' region features (models that read regions); 'scene_boxes' with a "
                        "spoken-scenes manifest: the generator's boxes with EfficientNet-Lite0 features")
    i.add_argument("--workers", type=int, default=1,
                   help="processes embedding shards of the image list in parallel (default: 1)")
    i.add_argument("--work-dir", default=None,
                   help="folder for finished shards, reused by a rerun after an interruption (default: OUT.work, "
                        "removed once the index is saved)")
    i.add_argument("--index-kind", choices=["auto", "exact", "hnsw", "ivfsq", "ivfpq"], default="auto",
                   help="exact scan, or an approximate FAISS index (needs the 'faiss' extra); auto: exact up to "
                        "128 MiB of embeddings, then HNSW, IVF-SQ8 or IVF-PQ by size and --memory-budget-mb")
    i.add_argument("--memory-budget-mb", type=float, default=1024.0,
                   help="memory the approximate index may use, in MiB (default: 1024)")
    i.add_argument("--no-captions", action="store_true",
                   help="leave the spoken captions out (no image -> speech search; faster to build)")
    i.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="embed the gallery in bf16 where the CPU has it natively (fp32 fallback with a warning)")
    i.set_defaults(func=_cmd_index)

    s = sub.add_parser("search", help="search an index with spoken queries (audio files)")
    s.add_argument("--checkpoint", required=True, help="run, checkpoint or model folder, or a hub id owner/name[@revision]")
    s.add_argument("--index", required=True)
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--rerank-top", type=int, default=None,
                   help="re-rank the N best coarse candidates with the model's fine scorer (N >= k)")
    s.add_argument("audio", nargs="+")
    s.set_defaults(func=_cmd_search)

    from vgskit.serve.command import add_serve_arguments, run_serve

    sv = sub.add_parser("serve", help="spoken-query image search over HTTP (needs the 'serve' extra)")
    add_serve_arguments(sv)
    sv.set_defaults(func=run_serve)

    from vgskit.data.cache_cli import add_cache_arguments, run_cache

    ca = sub.add_parser("cache", help="inspect and verify frozen-feature caches",
                        description="Check a frozen-feature cache (data.feature_cache): every index entry against "
                                    "the data files, and with --model a seeded sample recomputed by the tower.")
    add_cache_arguments(ca)
    ca.set_defaults(func=run_cache)

    from vgskit.extensions import commands, converters

    cv = sub.add_parser("convert", help="turn a released reference checkpoint into a vgskit model")
    families = cv.add_subparsers(dest="family", required=True, metavar="FAMILY")
    for family, command in converters().items():
        fp = families.add_parser(family, help=command.help, description=command.help)
        command.add_arguments(fp)
        fp.set_defaults(func=command.run)
        # The older spelling `vgskit convert-FAMILY` stays available.
        alias = sub.add_parser(f"convert-{family}", help=f"same as `vgskit convert {family}`",
                               description=command.help)
        command.add_arguments(alias)
        alias.set_defaults(func=command.run)
    for name, command in commands().items():  # the families' own commands
        cp = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(cp)
        cp.set_defaults(func=command.run)
    return p


def _leave_process_group(code: int) -> None:
    """After an error under torch.distributed, end the process at once with ``code``.

    Tearing down a process group whose peer died or hangs can block, or abort the interpreter in the
    backend's destructor (SIGABRT instead of the error's exit status); the error is already reported.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VGSKitError as err:
        print(f"vgskit: error: {err}", file=sys.stderr)
        _leave_process_group(2)
        return 2
    except OSError as err:
        # What the checks before the work cannot foresee (a disk filling up, a permission changed meanwhile)
        # still ends as one line naming the file, not as a traceback.
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        print(f"vgskit: error: {where + ': ' if where else ''}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vgskit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
