"""``vgskit cache``: inspect and verify frozen-feature caches (:mod:`vgskit.data.cache`).

    vgskit cache info FOLDER
    vgskit cache verify FOLDER                        # structure only: the index against the data files
    vgskit cache verify FOLDER --model runs/x         # + recompute 16 random items with the checkpoint's tower
    vgskit cache verify FOLDER --model NAME --set speech_tower=DIR --sample 64 --seed 1
    vgskit cache verify FOLDER --model runs/x --precision fp32   # recompute a bf16 cache at fp32

``FOLDER`` is one cache (``<data.feature_cache>/<tower_key>``) or the ``data.feature_cache`` folder itself,
whose caches are all checked. A cache is written once and read by every later run, so a bad one does harm
for a long time: ``verify`` exits 1 when it finds a problem (0 when all is well) so that scripts can stop
before training on it. User errors (no such folder, a model that did not build the cache) raise
:class:`~vgskit.errors.VGSKitError`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from vgskit.data.cache import (
    INDEX_NAME,
    TOWER_NAME,
    FeatureCache,
    FeatureCacheError,
    VerifyReport,
    check_cache_structure,
    lock_holder,
    tower_description,
    tower_key,
    verify_cache,
)
from vgskit.errors import VGSKitError
from vgskit.precision import PRECISIONS


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``verify`` and ``info`` subcommands (and their options) to the ``cache`` parser."""
    sub = parser.add_subparsers(dest="cache_command", required=True, metavar="{verify,info}")
    v = sub.add_parser(
        "verify", help="check a feature cache: its index against its data files, and recompute a sample",
        description="Check a feature cache: every index entry against the data files (no tower needed) and, "
                    "with --model, a seeded random sample of items recomputed with the tower that built it. "
                    "Exit status 0: no problem found; 1: problems (listed).")
    v.add_argument("folder", help="a cache folder (<data.feature_cache>/<tower key>) or the data.feature_cache "
                                  "folder holding several")
    v.add_argument("--model", default=None, metavar="NAME_OR_CHECKPOINT",
                   help="the model whose frozen tower built the cache: a checkpoint or run folder, or a "
                        "registered model name (with --set); without it only the structure is checked")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --model NAME: override a config value of the registered model")
    v.add_argument("--sample", type=int, default=16, help="items to recompute per cache (default 16)")
    v.add_argument("--all", action="store_true", help="recompute every item")
    v.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")
    v.add_argument("--atol", type=float, default=None,
                   help="absolute allowance for the tower's run-to-run variation (default: 1%% of each value "
                        "plus 1%% of the item's RMS); fp16 rounding is always allowed on top")
    v.add_argument("--device", default="cpu", help="where to run the tower (default cpu)")
    v.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="precision to recompute at (default: the one the cache was built at, which its options "
                        "record; bf16 on either side widens the allowance to bf16 rounding)")
    v.add_argument("--batch-size", type=int, default=8, help="files per tower call")
    v.add_argument("--json", default=None, help="also write the reports to this JSON file")
    i = sub.add_parser("info", help="what a feature cache holds: tower, options, items, data files, writer",
                       description="Describe feature caches: tower key and class, options, metadata, item "
                                   "count, data file sizes, and the process writing it now, if any.")
    i.add_argument("folder", help="a cache folder or the data.feature_cache folder holding several")


def run_cache(args: argparse.Namespace) -> int:
    """Run ``vgskit cache <command>``; returns the exit status."""
    command = getattr(args, "cache_command", None)
    if command == "verify":
        return _verify(args)
    if command == "info":
        return _info(args)
    raise VGSKitError(f"vgskit cache: unknown command {command!r}; choose verify or info")


def _cache_folders(folder: str | os.PathLike[str]) -> list[Path]:
    """One cache folder, or the caches (sub-folders with an index) of a ``data.feature_cache`` folder."""
    p = Path(folder)
    if not p.exists():
        raise VGSKitError(f"{p}: no such folder")
    if not p.is_dir():
        raise VGSKitError(f"{p}: not a folder (give a feature cache folder)")
    if (p / INDEX_NAME).is_file():
        return [p]
    try:
        subs = sorted(d for d in p.iterdir() if d.is_dir() and (d / INDEX_NAME).is_file())
    except OSError as exc:
        raise VGSKitError(f"{p}: cannot list the folder ({exc.strerror or exc})") from exc
    if subs:
        return subs
    if (p / TOWER_NAME).is_file():
        raise VGSKitError(f"{p}: no {INDEX_NAME}: extraction stopped before its first flush, nothing is cached yet")
    raise VGSKitError(f"{p}: not a feature cache (no {INDEX_NAME} in it or in its sub-folders)")


def _load_towers(spec: str, sets: list[str]) -> dict[str, nn.Module]:
    """The frozen towers of ``--model`` (a checkpoint/run folder, or a registered name with ``--set``)."""
    from vgskit.experiment import model_for_evaluation
    from vgskit.train.config import apply_overrides

    if Path(spec).exists():
        if sets:
            raise VGSKitError("--set applies to --model NAME (a checkpoint's config is the one it was trained with)")
        model = model_for_evaluation(checkpoint=spec)
    elif os.sep in spec or spec.startswith("."):
        raise VGSKitError(f"--model {spec}: no such checkpoint folder")
    else:
        model = model_for_evaluation(model_name=spec, overrides=apply_overrides({}, sets) if sets else None)
    towers = dict(model.frozen_towers())
    if not towers:
        name = getattr(model, "model_name", None) or type(model).__name__
        raise VGSKitError(f"--model {spec}: model {name!r} has no frozen towers, so it built no feature cache")
    return towers


def _what_differs(cache: FeatureCache, tower: nn.Module) -> str:
    """Which parts of the tower description differ from the cache's ``tower.json`` (for the refusal)."""
    try:
        stored = json.loads((cache.folder / TOWER_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "no readable tower.json to tell what differs"
    mine = json.loads(json.dumps(tower_description(tower, cache.options), default=str))
    if not isinstance(stored, dict):
        return "no readable tower.json to tell what differs"
    differ = sorted(k for k in set(mine) | set(stored) if mine.get(k) != stored.get(k))
    labels = {"weights": "weights", "class": "class", "config": "config", "hf_config": "pretrained config",
              "preprocessing": "preprocessing", "transform": "image transform", "format": "cache format",
              "options": "extraction options"}
    return "they differ in: " + (", ".join(labels.get(k, k) for k in differ) or "nothing tower.json records")


def _verify(args: argparse.Namespace) -> int:
    if args.sample < 0:
        raise VGSKitError(f"--sample must be >= 0, got {args.sample}")
    if args.batch_size < 1:
        raise VGSKitError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.atol is not None and not args.atol >= 0:
        raise VGSKitError(f"--atol must be >= 0, got {args.atol}")
    if args.set and args.model is None:
        raise VGSKitError("--set applies to --model NAME")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise VGSKitError(f"--json {args.json}: the folder {Path(args.json).parent} does not exist")
    folders = _cache_folders(args.folder)
    towers = _load_towers(args.model, args.set) if args.model else None

    # Decide what can be recomputed before any work, so that a wrong --model is refused at once.
    plan: list[tuple[Path, FeatureCache | None, nn.Module | None, str | None]] = []
    refusals: list[str] = []
    for folder in folders:
        try:
            cache = FeatureCache(folder.parent, folder.name)
        except FeatureCacheError as exc:  # reported as a problem by the structural check below
            plan.append((folder, None, None, str(exc)))
            continue
        if towers is None:
            plan.append((folder, cache, None, None))
            continue
        kind = cache.options.kind
        tower = towers.get(kind)
        if tower is None:
            refusals.append(f"{folder}: a {kind} cache, and --model {args.model} has no frozen {kind} tower "
                            f"(it has {sorted(towers)})")
            plan.append((folder, cache, None, None))
            continue
        key = tower_key(tower, cache.options)
        if key != cache.tower_key:
            refusals.append(f"{folder}: the {kind} tower of --model {args.model} did not build this cache: under "
                            f"the cache's options its key is {key}, not {cache.tower_key} "
                            f"({_what_differs(cache, tower)})")
            plan.append((folder, cache, None, None))
            continue
        plan.append((folder, cache, tower, None))
    if towers is not None and not any(t is not None for _, _, t, _ in plan) and refusals:
        raise VGSKitError("cannot recompute with this model:\n  " + "\n  ".join(refusals))

    reports: list[VerifyReport] = []
    for folder, cache, tower, open_error in plan:
        if cache is None or tower is None:
            report = check_cache_structure(folder)
            if open_error is not None and not report.problems:
                report.problems.append(open_error)
            if towers is not None and cache is not None:
                report.notes.append("values not recomputed: --model has no tower that built this cache")
        else:
            report = verify_cache(cache, tower.to(args.device), sample=None if args.all else args.sample,
                                  seed=args.seed, atol=args.atol, batch_size=args.batch_size, device=args.device,
                                  check_key=False, precision=getattr(args, "precision", None))
        reports.append(report)
        print(report.format(), flush=True)
    bad = sum(not r.ok for r in reports)
    if len(reports) > 1:
        print(f"{len(reports) - bad} of {len(reports)} caches OK")
    if args.json:
        from vgskit.fileio import write_text_atomic

        payload: Any = [r.to_json() for r in reports]
        write_text_atomic(args.json, json.dumps(payload if len(payload) > 1 else payload[0], indent=2, default=str))
    return 1 if bad else 0


def _info(args: argparse.Namespace) -> int:
    status = 0
    for folder in _cache_folders(args.folder):
        try:
            cache = FeatureCache(folder.parent, folder.name)
        except FeatureCacheError as exc:
            print(f"feature cache {folder}\n  unreadable: {exc}")
            status = 1
            continue
        lines = [f"feature cache {folder}", f"  tower key: {cache.tower_key}"]
        try:
            desc = json.loads((folder / TOWER_NAME).read_text(encoding="utf-8"))
            lines.append(f"  tower: {desc.get('class', '?')} (weights {desc.get('weights', '?')})")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            lines.append(f"  tower: unknown (no readable {TOWER_NAME})")
        lines.append(f"  options: {json.dumps(cache.options.to_json(), default=str)}")
        lines.append(f"  precision: {cache.options.precision} (the tower's autocast at extraction)")
        lines.append(f"  meta: {json.dumps(cache.meta, default=str)}")
        lines.append(f"  items: {len(cache)}")
        for name, values in sorted(cache.data_sizes.items()):
            path = cache.folder / f"{name}.bin"
            size = path.stat().st_size if path.is_file() else 0
            lines.append(f"  {path.name}: {values} float16 values, {size / 2**20:.1f} MiB")
        holder = lock_holder(cache.lock_path)
        if holder is None:
            lines.append("  writer: none")
        else:
            lines.append(f"  writer: pid {holder.get('pid', '?')} on host {holder.get('host', '?')} is extracting")
        print("\n".join(lines))
    return status
