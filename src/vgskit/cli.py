"""The ``vgskit`` command line.

    vgskit demo                                   # embedded corpus → train → evaluate → search → report
    vgskit data generate --preset tiny --out DIR  # (re)build the spoken-scenes corpus
    vgskit data prepare flickr8k --root DIR --out DIR   # a public corpus -> manifest (see vgskit.data.corpora)
    vgskit data check MANIFEST [--expected flickr8k] [--plot durations.png]   # files, durations, split sizes
    vgskit train --recipe demo --out runs/x [--manifest M --corpus flickr8k] [--resume] [--set train.lr=3e-4]
    torchrun --nproc_per_node=2 -m vgskit.cli train --recipe demo --out runs/x   # multi-process
    vgskit eval --checkpoint runs/x --manifest M [--split test | --corpus places]   # runs/x: best checkpoint
    vgskit eval --checkpoint runs/x --manifest M --zero-shot-text   # + speech <-> caption text (SpeechCLIP)
    vgskit eval --checkpoint runs/x --manifest M --keyword-hit-rate # + per-slot keyword hit rate (SpeechCLIP-C)
    vgskit index --checkpoint runs/x --manifest M --split test --out runs/x/index
    vgskit search --checkpoint runs/x --index runs/x/index query.wav [-k 5]
    vgskit layers --checkpoint runs/x --out layers.png [--json layers.json]   # hidden-state weights
    vgskit keywords --checkpoint runs/x a.wav b.flac [-k 5] [--json kw.json]  # cascaded SpeechCLIP keywords
    vgskit convert-speechclip released.ckpt --config speechclip_parallel_base --out models/p_base  # reference ckpt

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
    from vgskit.data.synthetic import PRESETS, generate_spoken_scenes, preset_dir

    if args.preset not in PRESETS:
        raise VGSKitError(f"unknown preset {args.preset!r}; choose from {sorted(PRESETS)}")
    out = Path(args.out) if args.out else preset_dir(args.preset)
    manifest = generate_spoken_scenes(out, PRESETS[args.preset], workers=args.workers)
    print(manifest)
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from vgskit.data.check import check_manifest, format_report, write_report

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

    summary = train_from_recipe(args.recipe, out_dir=args.out, manifest=args.manifest, corpus=args.corpus,
                                overrides=args.set, resume=args.resume)
    if summary is not None:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _recall_tables(results: dict) -> str:
    from vgskit.metrics import format_recall_table

    text = format_recall_table(results)
    zero_shot = results.get("zero_shot_text")
    if zero_shot is not None:
        n_texts = zero_shot["text_to_speech"]["n_queries"]
        text += (f"\n\nzero-shot speech <-> text (gallery: {n_texts} caption texts; a hit is a caption of the "
                 f"same image)\n{format_recall_table(zero_shot)}")
    return text


def _keyword_tables(results: dict) -> str:
    from vgskit.experiment import format_keyword_hit_rate

    text = _recall_tables(results)
    if "keyword_hit_rate" in results:
        text += "\n\n" + format_keyword_hit_rate(results["keyword_hit_rate"])
    return text


def _cmd_eval(args: argparse.Namespace) -> int:
    from vgskit.experiment import evaluate_checkpoint, evaluate_checkpoint_splits, evaluate_corpus

    if args.keyword_top_k < 1:
        raise VGSKitError(f"--keyword-top-k must be >= 1, got {args.keyword_top_k}")
    if args.keyword_hit_rate:
        # One model load for the recall, the zero-shot text retrieval and the keyword hit rate.
        from vgskit.data.splits import corpus_splits

        by_corpus = args.corpus is not None and args.split is None
        splits = list(corpus_splits(args.corpus).test) if by_corpus else [args.split or "test"]
        if not splits:
            raise VGSKitError(f"corpus {args.corpus!r} has no standard test split (it is used for pretraining)")
        per_split = evaluate_checkpoint_splits(args.checkpoint, args.manifest, splits, batch_size=args.batch_size,
                                               zero_shot_text=args.zero_shot_text, keyword_hit_rate=True,
                                               keyword_top_k=args.keyword_top_k)
        if by_corpus:
            results = per_split
            for split, split_results in per_split.items():
                print(f"[{split}]\n{_keyword_tables(split_results)}")
        else:
            results = per_split[splits[0]]
            print(_keyword_tables(results))
    elif args.corpus is not None and args.split is None:
        results = evaluate_corpus(args.checkpoint, args.manifest, args.corpus, batch_size=args.batch_size,
                                  zero_shot_text=args.zero_shot_text)
        for split, split_results in results.items():
            print(f"[{split}]\n{_recall_tables(split_results)}")
    else:
        results = evaluate_checkpoint(args.checkpoint, args.manifest, split=args.split or "test",
                                      batch_size=args.batch_size, zero_shot_text=args.zero_shot_text)
        print(_recall_tables(results))
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


def _cmd_layers(args: argparse.Namespace) -> int:
    from vgskit.experiment import load_model
    from vgskit.report import plot_layer_weights

    model = load_model(args.checkpoint)
    layer_weights = getattr(model, "layer_weights", None)
    if not callable(layer_weights):
        name = getattr(model, "model_name", None) or type(model).__name__
        raise VGSKitError(f"checkpoint {args.checkpoint}: model {name!r} has no layer weights (layer_weights()); "
                          "only models with a weighted sum of hidden states, such as SpeechCLIP, have them")
    weights = {str(branch): [float(v) for v in w.detach().float().cpu().reshape(-1)]
               for branch, w in layer_weights().items()}
    if not weights:
        raise VGSKitError(f"checkpoint {args.checkpoint}: the model reports no layer weights")
    for branch, values in weights.items():
        print(f"{branch}: " + " ".join(f"{i}:{v:.3f}" for i, v in enumerate(values)))
    print(plot_layer_weights(weights, args.out, title=args.title or f"Hidden-state weights ({args.checkpoint})"))
    if args.json:
        Path(args.json).write_text(json.dumps(weights, indent=2))
    return 0


def _cmd_keywords(args: argparse.Namespace) -> int:
    import torch

    from vgskit.audio import load_audio
    from vgskit.experiment import load_model

    if args.k < 1:
        raise VGSKitError(f"-k must be >= 1, got {args.k}")
    model = load_model(args.checkpoint)
    keywords = getattr(model, "keywords", None)
    if not callable(keywords):
        name = getattr(model, "model_name", None) or type(model).__name__
        raise VGSKitError(f"checkpoint {args.checkpoint}: model {name!r} has no keyword slots (keywords()); "
                          "only cascaded models such as SpeechCLIP-C produce keywords")
    rate = int(getattr(model, "sample_rate", 16000))
    report: list[dict] = []
    failed = 0
    # One file at a time: a bad file is reported and skipped, and no utterance is padded next to another.
    for path in args.audio:
        try:
            wav = torch.from_numpy(load_audio(path, sample_rate=rate, max_seconds=args.max_seconds))
        except VGSKitError as err:
            print(f"vgskit: error: {err}", file=sys.stderr)
            report.append({"audio": path, "error": str(err)})
            failed += 1
            continue
        with torch.no_grad():
            (slots,) = keywords(wav[None], torch.tensor([len(wav)]), top_k=args.k)
        print(path)
        for i, slot in enumerate(slots, start=1):
            print(f"  slot {i}: " + " ".join(f"{token} ({score:.2f})" for token, score in slot))
        report.append({"audio": path, "slots": [[{"token": t, "cosine": float(c)} for t, c in slot]
                                                for slot in slots]})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    if failed:
        print(f"vgskit: {failed} of {len(args.audio)} file(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


def _speechclip_config_section(config: str, overrides: list[str]) -> dict:
    """``--config``: a registered SpeechCLIP name, or a JSON/YAML file holding a model section (a mapping with an
    optional ``name``, or a recipe whose ``model`` section is used); ``--set`` overrides apply to it."""
    from vgskit.train.config import apply_overrides

    path = Path(config)
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise VGSKitError(f"--config {path}: file not found")
        import yaml

        try:
            text = path.read_text(encoding="utf-8")
            # Not YAML for JSON: YAML 1.1 reads numbers such as 1e-05 as strings.
            section = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as err:
            raise VGSKitError(f"--config {path}: cannot read it as {path.suffix[1:].upper()} ({err})") from None
        if isinstance(section, dict) and isinstance(section.get("model"), dict):
            section = section["model"]  # a recipe
        if not isinstance(section, dict):
            raise VGSKitError(f"--config {path}: expected a mapping of SpeechCLIP config values, "
                              f"got {type(section).__name__}")
    else:
        section = {"name": config}
    return apply_overrides(section, overrides)


def _cmd_convert_speechclip(args: argparse.Namespace) -> int:
    from vgskit.models.registry import save_pretrained
    from vgskit.models.speechclip_convert import convert_reference_checkpoint

    section = _speechclip_config_section(args.config, args.set)
    model, report = convert_reference_checkpoint(args.checkpoint, section, allow_pickle=args.allow_pickle)
    out = save_pretrained(model, args.out)
    print(f"{args.checkpoint}: {len(report.loaded)} trained tensor(s) loaded into {model.model_name} "
          f"(branches: {', '.join(model.branch_names)})")
    if report.defaulted:
        print(f"  kept at their configured value: {', '.join(report.defaulted)}")
    if report.dropped:
        print(f"  frozen-tower tensors not used (the towers load from {model.config.speech.name_or_path!r} and "
              f"{model.config.image.name_or_path!r}): {len(report.dropped)}")
    if report.keyword_vocab is not None:
        print(f"  keyword vocabulary: {len(report.keyword_vocab)} subwords (ids from the {report.keyword_vocab_source})")
    print(out)
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

    e = sub.add_parser("eval", help="retrieval recall of a checkpoint on a manifest split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--manifest", required=True)
    e.add_argument("--split", default=None, help="split to evaluate (default: test, or the corpus's test splits)")
    e.add_argument("--corpus", default=None, help="evaluate every split this corpus's papers report on")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--zero-shot-text", action="store_true",
                   help="also rank the caption texts with speech and the speech with texts (models with a text "
                        "tower, e.g. SpeechCLIP; every caption needs a transcript)")
    e.add_argument("--keyword-hit-rate", action="store_true",
                   help="also report the per-slot keyword hit rate (cascaded models, e.g. SpeechCLIP-C; every "
                        "caption needs a transcript)")
    e.add_argument("--keyword-top-k", type=int, default=5,
                   help="vocabulary neighbours of each keyword that count for the hit rate (default 5)")
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

    ly = sub.add_parser("layers", help="plot the learned weights of the speech tower's hidden states")
    ly.add_argument("--checkpoint", required=True, help="run folder or saved model folder")
    ly.add_argument("--out", required=True, help="PNG file to write")
    ly.add_argument("--json", default=None, help="also write the weights ({branch: [w_0, ...]}) as JSON")
    ly.add_argument("--title", default=None, help="plot title")
    ly.set_defaults(func=_cmd_layers)

    kw = sub.add_parser("keywords", help="the keywords a cascaded model reads from spoken utterances",
                        description="Print, per audio file, the top-k vocabulary tokens of each keyword slot "
                                    "with their cosine similarity. Unreadable files are reported and skipped; "
                                    "the exit status is 1 if any file failed.")
    kw.add_argument("--checkpoint", required=True, help="run folder or saved model folder")
    kw.add_argument("-k", type=int, default=5, help="tokens per slot (default 5)")
    kw.add_argument("--max-seconds", type=float, default=60.0, help="refuse longer files (default 60)")
    kw.add_argument("--json", default=None, help="also write the keywords (and errors) as JSON")
    kw.add_argument("audio", nargs="+")
    kw.set_defaults(func=_cmd_keywords)

    cv = sub.add_parser("convert-speechclip", help="turn a released SpeechCLIP checkpoint into a vgskit model",
                        description="Read a checkpoint of the SpeechCLIP reference implementation (Lightning .ckpt, "
                                    "a saved state dict or .safetensors), map its trained weights onto the "
                                    "configured model and save it (model.safetensors + config.json). The frozen "
                                    "HuBERT/CLIP towers are not taken from the file: they load from the "
                                    "config's hub names or folders.")
    cv.add_argument("checkpoint", help="the reference checkpoint file")
    cv.add_argument("--config", required=True,
                    help="registered model (speechclip_parallel_base, speechclip_cascaded_large, ...) or a "
                         "JSON/YAML file with its config (a model section, or a recipe)")
    cv.add_argument("--out", required=True, help="folder to write the converted model to")
    cv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. branches=both or speech.name_or_path=/models/hubert")
    cv.add_argument("--allow-pickle", action="store_true",
                    help="unpickle the whole file (released .ckpt files pickle their training config); only "
                         "for files you trust")
    cv.set_defaults(func=_cmd_convert_speechclip)
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
