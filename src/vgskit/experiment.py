"""Recipe → data → model → Trainer → evaluation: the glue shared by ``vgskit train``, ``eval``, ``index`` and
``demo``.

A recipe is a YAML file with three sections::

    model: {name: dual_encoder, embed_dim: 256, ...}    # registry name + config overrides
    data:  {manifest: null, corpus_preset: demo, ...}    # DataConfig; null manifest = embedded corpus
    train: {lr: 1e-3, batch_size: 128, ...}              # vgskit.train.TrainConfig

Built-in recipes live in ``vgskit/recipes/`` and are addressed by name (``--recipe demo``).

Single process::

    vgskit train --recipe demo --out runs/demo
Several processes (same result as one process on the same global batch)::

    torchrun --nproc_per_node=2 -m vgskit.cli train --recipe demo --out runs/demo
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from vgskit.data.augment import AugmentConfig
from vgskit.data.loader import (
    RegionSource,
    SpeechFeatureSource,
    SpokenCaptionDataset,
    collate_spoken_captions,
    paired_batch_sampler_factory,
)
from vgskit.data.manifest import Record, read_manifest
from vgskit.errors import ConfigError, VGSKitError

if TYPE_CHECKING:
    from vgskit.train.config import TrainConfig

RECIPE_DIR = Path(__file__).parent / "recipes"
#: Tower kinds a feature cache can serve (keys of ``model.frozen_towers()``).
TOWER_KINDS = ("speech", "image")


@dataclass
class DataConfig:
    """Which corpus and how to feed it.

    Attributes:
        manifest: JSONL manifest path; ``None`` uses the embedded spoken-scenes corpus ``corpus_preset``
            (generated and cached on first use).
        corpus_preset: spoken-scenes size when ``manifest`` is ``None`` (``demo`` or ``tiny``).
        corpus: a corpus name of :data:`vgskit.data.splits.STANDARD_SPLITS` (``flickr8k``, ``places``, ...):
            sets the train/val split names to that corpus's standard ones.
        train_split, val_split, test_split: split names in the manifest (explicit values win over ``corpus``).
        train_max_seconds: training captions are cropped to N seconds (throughput; e.g. 6.4 s, i.e.
            102,400 samples).
        train_crop: which N seconds: ``"head"`` (the first ones, the same every epoch) or ``"random"`` (a
            window at a random offset, new every epoch, reproducible from ``train.seed``; see
            :mod:`vgskit.data.loader`). Evaluation never crops at random.
        eval_max_seconds: evaluation crop (``None``: whole captions).
        captions_per_image: captions of each image in a training batch (the rest of the batch is other images).
        length_bucketing: sort groups by length within buckets to reduce padding (``paired`` batches).
        batch_sampler: ``"paired"`` (default: each batch holds distinct images with ``captions_per_image``
            captions each, optionally length-bucketed) or ``"shuffled"`` (all captions shuffled and cut into
            full batches, two captions of an image may meet: a plain shuffled loader, as the SpeechCLIP
            reference); see :mod:`vgskit.data.loader`.
        preload: decode all audio and images into memory once (fast epochs; fits the embedded corpus).
        eval_batch_size: batch size for embedding during evaluation.
        val_max_images: evaluate validation on at most this many images (keeps per-epoch evaluation cheap).
        feature_cache: a folder for frozen-tower features. When set, the model must report frozen towers
            (``frozen_towers()``); their outputs on the training split are extracted once into this folder
            (:mod:`vgskit.data.cache`; later runs reuse them) and training reads them instead of running the
            towers. Validation and checkpoints use the real towers.
        feature_cache_towers: which frozen towers to cache (``speech``, ``image``); ``None``: all of them.
            A speech cache stores what the head crop gives, so it cannot be combined with
            ``train_crop: random``; cache ``[image]`` only in that case.
        feature_cache_batch_size: files per tower call during extraction.
        region_features: a BUTD/LXMERT HDF5 file of region features for every image (models whose
            ``image_input`` is ``"regions"``, e.g. FaST-VGS); images are then read from it, never decoded.
            ``scene_boxes`` with the embedded corpus: the scene generator's object boxes with ImageNet
            EfficientNet-Lite0 features pooled over each (:mod:`vgskit.data.scene_regions`; made once per corpus).
        num_regions: regions per image (most confident first; fewer are zero-padded and masked).
        speech_features: precomputed speech frames for every caption (models that read ``features``, e.g. MILAN
            with ``frontend.kind: features``): an HDF5 file with one ``[T, F]`` dataset per caption id and
            ``frame_rate`` in its attributes, or a folder of ``<caption_id>.npy`` with a ``meta.json`` giving
            ``frame_rate`` (:class:`~vgskit.data.loader.SpeechFeatureSource`); audio is then never decoded.
        extra_fields: manifest fields beyond the schema that batches carry (``Batch.extras``).
        train_augment: the train-time image augmentation (:class:`vgskit.data.augment.AugmentConfig`, e.g.
            ``{kind: crop_flip, scale: [0.08, 1.0]}``: RandomResizedCrop + horizontal flip); evaluation and
            indexing always use the model's deterministic ``image_transform``.
        rerank_top: validate with coarse-to-fine recall, re-ranking this many candidates per query with
            the model's ``score_pairs`` (``None``: coarse recall).
    """

    manifest: str | None = None
    corpus_preset: str = "demo"
    corpus: str | None = None
    train_split: str | None = None
    val_split: str | None = None
    test_split: str | None = None
    train_max_seconds: float | None = 8.0
    train_crop: Literal["head", "random"] = "head"
    eval_max_seconds: float | None = None
    captions_per_image: int = 2
    length_bucketing: bool = True
    batch_sampler: str = "paired"
    preload: bool = True
    eval_batch_size: int = 128
    val_max_images: int | None = None
    feature_cache: str | None = None
    feature_cache_towers: list[str] | None = None
    feature_cache_batch_size: int = 16
    region_features: str | None = None
    num_regions: int = 36
    speech_features: str | None = None
    extra_fields: list[str] = field(default_factory=list)
    train_augment: AugmentConfig = field(default_factory=AugmentConfig)
    rerank_top: int | None = None

    def __post_init__(self) -> None:
        from vgskit.data.loader import CROP_MODES
        from vgskit.data.splits import corpus_splits

        std = corpus_splits(self.corpus or "spoken_scenes")
        self.train_split = self.train_split or std.train
        self.val_split = self.val_split or std.val
        if self.test_split is None and std.test:
            self.test_split = std.test[0]
        if self.train_crop not in CROP_MODES:
            raise ConfigError(f"train_crop: must be one of {', '.join(map(repr, CROP_MODES))}, got {self.train_crop!r}")
        if self.train_crop == "random" and self.train_max_seconds is None:
            raise ConfigError("train_crop: 'random' needs train_max_seconds (the window length), got null")
        if self.feature_cache_towers is not None:
            bad = sorted(set(self.feature_cache_towers) - set(TOWER_KINDS))
            if bad or not self.feature_cache_towers:
                raise ConfigError(f"feature_cache_towers: choose from {list(TOWER_KINDS)} (or null for every "
                                  f"frozen tower), got {self.feature_cache_towers!r}")
        from vgskit.data.loader import BATCH_SAMPLERS

        if self.batch_sampler not in BATCH_SAMPLERS:
            raise ConfigError(f"batch_sampler: must be one of {', '.join(map(repr, BATCH_SAMPLERS))}, got "
                              f"{self.batch_sampler!r}")
        if self.batch_sampler == "shuffled" and self.length_bucketing:
            raise ConfigError("batch_sampler: 'shuffled' batches are not grouped by length; set length_bucketing: "
                              "false with it")
        if self.feature_cache_batch_size < 1:
            raise ConfigError(f"feature_cache_batch_size: must be >= 1, got {self.feature_cache_batch_size}")
        if self.num_regions < 1:
            raise ConfigError(f"num_regions: must be >= 1, got {self.num_regions}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size: must be >= 1, got {self.eval_batch_size}")
        if self.rerank_top is not None and self.rerank_top < 1:
            raise ConfigError(f"rerank_top: must be >= 1 or null, got {self.rerank_top}")


def resolve_recipe(recipe: str | Path) -> Path:
    """A recipe name (``demo``) or a YAML path → the YAML path, with a clear error listing known names."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"recipe {p}: file not found")
        return p
    named = RECIPE_DIR / f"{recipe}.yaml"
    if named.is_file():
        return named
    known = sorted(q.stem for q in RECIPE_DIR.glob("*.yaml") if not q.name.startswith("_"))  # _x: bases only
    raise ConfigError(f"unknown recipe {recipe!r}; built-in recipes: {known} (or pass a .yaml path)")


def load_experiment(recipe: str | Path | Mapping[str, Any], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a recipe (name, path or dict), apply ``section.key=value`` overrides, check its sections."""
    from vgskit.train.config import apply_overrides, load_recipe, resolve_recipe_bases

    if isinstance(recipe, Mapping):
        d = apply_overrides(resolve_recipe_bases(copy.deepcopy(dict(recipe)), None), overrides)
    else:
        d = load_recipe(resolve_recipe(recipe), overrides)
    unknown = sorted(set(d) - {"model", "data", "train"})
    if unknown:
        raise ConfigError(f"recipe: unknown section(s) {unknown}; expected model, data, train")
    if not isinstance(d.get("model"), Mapping) or "name" not in d["model"]:
        raise ConfigError("recipe: model.name is required (a registered model, see vgskit.models.list_models())")
    return d


def data_config_from(d: Mapping[str, Any] | None) -> DataConfig:
    from vgskit.train.config import config_from_dict

    return config_from_dict(DataConfig, d or {}, prefix="data")


def resolve_manifest(cfg: DataConfig, *, progress: bool = True) -> Path:
    """The manifest to read: the configured one, or the embedded corpus (generated on first use)."""
    if cfg.manifest is not None:
        p = Path(cfg.manifest)
        if not p.is_file():
            raise ConfigError(f"data.manifest {p}: file not found")
        return p
    from vgskit.data.synthetic import PRESETS, generate_spoken_scenes, preset_dir

    if cfg.corpus_preset not in PRESETS:
        raise ConfigError(f"data.corpus_preset {cfg.corpus_preset!r}: choose from {sorted(PRESETS)}")
    out = preset_dir(cfg.corpus_preset)
    return generate_spoken_scenes(out, PRESETS[cfg.corpus_preset], progress=progress)


def make_dataset(manifest: str | Path, split: str, image_transform: Mapping[str, Any], *,
                 max_seconds: float | None, preload: bool, max_images: int | None = None,
                 progress: bool = True, crop: str = "head", crop_seed: int = 0,
                 records: Sequence[Record] | None = None, regions: str | RegionSource | None = None,
                 num_regions: int = 36, extra_fields: Sequence[str] = (),
                 augment: AugmentConfig | None = None, speech_input: str = "waveform",
                 speech_features: str | SpeechFeatureSource | None = None) -> SpokenCaptionDataset:
    """A split of a manifest as a dataset, with images preprocessed the way the model's weights expect.

    ``records`` (that split's records, already read) saves reading the manifest again. ``crop`` and
    ``crop_seed`` are :class:`~vgskit.data.loader.SpokenCaptionDataset`'s (random crops are for training).
    ``regions`` (an HDF5 file or a :class:`~vgskit.data.loader.RegionSource`) serves region features
    instead of pixels; ``extra_fields`` are manifest fields the items carry. ``speech_input`` is the model's
    (:attr:`~vgskit.models.base.RetrievalModel.speech_input`): ``"text"`` serves the manifest's transcripts.
    ``speech_features`` (a file or folder, or a :class:`~vgskit.data.loader.SpeechFeatureSource`; see
    :func:`speech_feature_source` for the checks against a model) serves precomputed frames instead of audio.
    """
    if isinstance(regions, (str, Path)):
        regions = RegionSource(regions, num_regions)
    if isinstance(speech_features, (str, Path)):
        speech_features = SpeechFeatureSource(speech_features)
    if records is None:
        records = read_manifest(manifest, split=split)
    records = list(records)
    if max_images is not None:
        keep: dict[str, None] = {}
        for r in records:
            if len(keep) >= max_images and r.image_id not in keep:
                continue
            keep.setdefault(r.image_id)
        records = [r for r in records if r.image_id in keep]
    return SpokenCaptionDataset(
        records, image_size=int(image_transform["size"]), preload=preload, max_seconds=max_seconds,
        mean=image_transform["mean"], std=image_transform["std"],
        resize_mode=image_transform.get("resize_mode", "squash"),
        interpolation=image_transform.get("interpolation", "bilinear"), progress=progress,
        crop=crop, crop_seed=crop_seed, regions=regions, extra_fields=extra_fields,
        augment=augment, speech_source="text" if speech_input == "text" else "audio",  # type: ignore[arg-type]
        speech_features=speech_features)


def flatten_metrics(results: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"speech_to_image": {"R@1": ..}}`` → ``{"speech_to_image/R@1": ..}`` (scalars only)."""
    flat: dict[str, float] = {}
    for k, v in results.items():
        if isinstance(v, Mapping):
            flat.update(flatten_metrics(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float):
            flat[f"{prefix}{k}"] = float(v)
    return flat


def validation_metric_names(*, rerank_top: int | None = None, ks: Sequence[int] = (1, 5, 10),
                            prefix: str = "val/") -> list[str]:
    """The metric names validation during training reports, known before any model exists.

    They are the keys of ``flatten_metrics(evaluate(...), "val/")``; they depend on the cut-offs and on
    re-ranking, not on the numbers, so a 2-caption, 2-image stand-in built the way
    :func:`vgskit.retrieval.evaluate.evaluate` builds its result gives them. ``train.select_metric`` must be
    one of them; checking it when the recipe is read saves finding a typo at the first evaluation.
    """
    from vgskit.metrics import gallery_sizes, recall_at_k

    caption_image = torch.tensor([0, 1])
    def stand_in() -> dict[str, Any]:
        block: dict[str, Any] = recall_at_k(torch.eye(2), torch.eye(2), caption_image, ks)
        for direction, sizes in gallery_sizes(caption_image, 2, ks).items():
            block[direction].update(sizes)
        return block

    results = stand_in()
    if rerank_top is not None:
        # Re-ranked validation also reports the coarse recall of the same embeddings, under "coarse/".
        results["rerank_top"] = int(rerank_top)
        results["coarse"] = stand_in()
    return sorted(flatten_metrics(results, prefix))


def check_output_path(path: str | Path, what: str, *, folder: bool = False) -> Path:
    """Refuse, before any work is spent, an output that could not be written; returns ``path`` as a Path.

    ``folder``: ``path`` is a folder to write into (a run, an index), else a file (a JSON result, a plot).
    Refused: a folder where a file is meant and the reverse, a file where a parent folder would have to be
    created, and a location this process may not write to (permission denied, read-only file system). Missing
    parent folders are fine: they are created when the output is written. Nothing is created here. ``what``
    names the option in the message (``--out``, ``--json``, ``out_dir``).
    """
    p = Path(path)
    if p.is_dir() and not folder:
        raise ConfigError(f"{what} {p}: is a folder; give the name of a file to write")
    if p.exists() and not p.is_dir() and folder:
        raise ConfigError(f"{what} {p}: is a file, not a folder (choose a folder to write into)")
    where = p if p.is_dir() else p.parent
    while not where.exists() and not where.is_symlink() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise ConfigError(f"{what} {p}: {where} is a file, so no folder can be created there")
    if not _writable(where):
        raise ConfigError(f"{what} {p}: cannot write into {where} (permission denied or a read-only file system)")
    return p


def _writable(folder: Path) -> bool:
    """Whether this process may create files in ``folder`` (the kernel's answer: rights, read-only mounts)."""
    if os.access in os.supports_effective_ids:
        return os.access(folder, os.W_OK | os.X_OK, effective_ids=True)
    return os.access(folder, os.W_OK | os.X_OK)


def write_output_text(path: str | Path, text: str, what: str) -> Path:
    """Write an output file atomically, creating its missing folders; a failure names ``what`` and the file."""
    from vgskit.fileio import write_text_atomic

    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(p, text)
    except OSError as err:
        raise VGSKitError(f"{what} {p}: cannot be written ({err.strerror or err})") from None


def train_from_recipe(recipe: str | Path | Mapping[str, Any], *, out_dir: str | Path,
                      manifest: str | None = None, corpus: str | None = None, overrides: Iterable[str] = (),
                      resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train the recipe's model on its data; returns the Trainer's summary (best checkpoint, metric, ...).

    ``manifest`` and ``corpus`` (standard split names, see :mod:`vgskit.data.splits`) override the recipe's
    ``data.manifest`` and ``data.corpus``.

    Before the model is built, its class's ``adapt_config_to_corpus`` (if it has one) gets the recipe's model
    overrides and the transcripts of the training split, and returns the overrides to build with (a keyword
    vocabulary taken from the captions is filled in this way; see :func:`adapt_model_config`); the adapted config is the
    one saved with every checkpoint. With ``data.feature_cache`` the model's frozen towers run once over the
    training split and training reads their cached outputs (see :func:`prepare_feature_caches`); the
    summary then has a ``feature_cache`` entry (folder and number of files extracted per tower).

    The recipe is checked against the data before the corpus is decoded or the model built, so that no mistake
    waits for the first evaluation: the run folder (writable; no checkpoints in it unless ``resume``), the
    warm-up against the run's length, ``train.select_metric`` against the names validation reports
    (:func:`validation_metric_names`), the validation split (it must have records), and the batch size against
    what the training split can fill. Each refusal is a :class:`~vgskit.errors.ConfigError` naming the setting.
    """
    from vgskit.models.registry import create_model
    from vgskit.train.config import TrainConfig, config_from_dict
    from vgskit.train.distributed import barrier, init_distributed, is_main
    from vgskit.train.loop import Trainer

    exp = load_experiment(recipe, overrides)
    data_d = dict(exp.get("data") or {})
    if manifest is not None:
        data_d["manifest"] = str(manifest)
    if corpus is not None:
        data_d["corpus"] = corpus
    data_cfg = data_config_from(data_d)
    train_d = dict(exp.get("train") or {})
    train_d["out_dir"] = str(out_dir)
    train_d.setdefault("select_metric", "val/mean_R@10")
    train_cfg = config_from_dict(TrainConfig, train_d, prefix="train")
    model_d = dict(exp["model"])
    model_name = model_d.pop("name")
    # The whole recipe is checked before anything is generated, decoded or built: a mistake found at the first
    # evaluation costs a training's worth of time.
    _check_training_settings(train_cfg, data_cfg, out_dir, resume=resume)

    # Only the main process may generate the corpus; the others wait for it (a file lock would also do).
    dist_info = init_distributed()
    if is_main():
        manifest_path = resolve_manifest(data_cfg, progress=progress)
    barrier()
    if not is_main():
        manifest_path = resolve_manifest(data_cfg, progress=False)
    train_records = read_manifest(manifest_path, split=data_cfg.train_split)
    # Every split, read once without checking files: the split names and the transcripts that
    # adapt_config_to_corpus may read (a missing test-split file must not stop a training run).
    all_records = read_manifest(manifest_path, check_files=False)
    val_records = _check_training_data(train_cfg, data_cfg, manifest_path, train_records, dist_info.world_size,
                                       all_records)

    model_d = adapt_model_config(model_name, model_d, train_records, source=f"{manifest_path} "
                                 f"(split {data_cfg.train_split!r})", corpus_records=all_records)
    # Same seed on every process: identical initial weights, and the same run twice starts identically.
    torch.manual_seed(train_cfg.seed)
    model = create_model(model_name, **model_d)
    transform = model.image_transform
    # Region features computed on first use (scene_boxes): the main process makes them, the others wait.
    if is_main():
        regions = _region_source(model, data_cfg, manifest_path, progress=progress)
    barrier()
    if not is_main():
        regions = _region_source(model, data_cfg, manifest_path, progress=False)
    # Checked against the model and both splits now, not at the first validation.
    speech_features = speech_feature_source(model, data_cfg.speech_features, [*train_records, *val_records],
                                            option="data.speech_features")

    caches: dict[str, Any] = {}
    cache_summary: dict[str, Any] = {}
    if data_cfg.feature_cache is not None:
        device = f"cuda:{dist_info.local_rank}" if torch.cuda.is_available() else "cpu"
        if is_main():
            caches, cache_summary = prepare_feature_caches(model, data_cfg, train_records, device=device,
                                                           progress=progress)
        barrier()
        if not is_main():  # the main process extracted; the others open what it wrote
            caches, cache_summary = prepare_feature_caches(model, data_cfg, train_records, extract_missing=False)

    base_set = make_dataset(manifest_path, data_cfg.train_split, transform, records=train_records,
                            max_seconds=data_cfg.train_max_seconds, preload=False, crop=data_cfg.train_crop,
                            crop_seed=train_cfg.seed, progress=progress and is_main(), regions=regions,
                            extra_fields=data_cfg.extra_fields, augment=data_cfg.train_augment,
                            speech_input=model.speech_input, speech_features=speech_features)
    if data_cfg.preload:  # what a cache serves is not decoded
        base_set.preload(progress and is_main(), audio="speech" not in caches, images="image" not in caches)
    train_set: Any = base_set
    collate: Any = collate_spoken_captions
    lengths = None
    swap = None
    if caches:
        from vgskit.data.cache import CachedSpokenCaptionDataset, CachedTowers, collate_cached_captions

        train_set = CachedSpokenCaptionDataset(base_set, caches.get("speech"), caches.get("image"))
        collate = collate_cached_captions
        if data_cfg.length_bucketing and "speech" in caches:
            lengths = train_set.num_frames()  # from the cache index: no audio headers read
        swap = CachedTowers(model, caches)
    if data_cfg.length_bucketing and lengths is None:
        lengths = base_set.num_samples()  # cropped lengths; file headers if not preloaded
    # The sampler tells the dataset each epoch (and the seed) before that epoch's loader starts: random crops.
    sampler = batch_sampler_for(data_cfg, train_set.caption_image_index, train_cfg.batch_size, lengths=lengths,
                                on_epoch=train_set.set_epoch)

    # Every rank passes the same evaluate_fn (the Trainer runs it on the main rank only and broadcasts the
    # result); the validation set is therefore built lazily, on first use, by the main rank alone.
    val_sets: list[SpokenCaptionDataset] = []

    def evaluate_fn(m: torch.nn.Module) -> dict[str, float]:
        from vgskit.retrieval.evaluate import evaluate

        if not val_sets:
            val_sets.append(make_dataset(manifest_path, data_cfg.val_split, transform, records=val_records,
                                         max_seconds=data_cfg.eval_max_seconds, preload=data_cfg.preload,
                                         max_images=data_cfg.val_max_images, progress=False, regions=regions,
                                         speech_input=model.speech_input, speech_features=speech_features))
        # Validation runs the real frozen towers on raw inputs: its numbers are those of the saved model.
        with swap.real_towers() if swap is not None else contextlib.nullcontext():
            results = evaluate(m, val_sets[0], batch_size=data_cfg.eval_batch_size, rerank_top=data_cfg.rerank_top,
                               source=f"{manifest_path} (split {data_cfg.val_split!r})")
            return flatten_metrics(results, "val/")

    if swap is not None:
        # The readers save and load as the towers they replace, so every checkpoint holds the real model.
        swap.use_cache()
    try:
        trainer = Trainer(model, train_cfg, train_set, collate, batch_sampler_factory=sampler,
                          evaluate_fn=evaluate_fn, model_name=model_name,
                          model_config=model.config,
                          extra_config={"data": asdict(data_cfg), "manifest": str(manifest_path),
                                        "image_transform": transform},
                          progress_bar=progress)
        t0 = time.time()
        summary = trainer.fit(resume=resume)
    finally:
        if swap is not None:
            swap.use_real()
    summary["train_wall_s"] = time.time() - t0
    summary["manifest"] = str(manifest_path)
    if cache_summary:
        summary["feature_cache"] = cache_summary
    return summary


def _check_training_settings(train_cfg: TrainConfig, data_cfg: DataConfig, out_dir: str | Path, *, resume: bool) -> None:
    """What can be checked in the recipe alone: the run folder, warm-up against length, the selection metric."""
    from vgskit.train.checkpoint import list_checkpoints

    run = check_output_path(out_dir, "out_dir", folder=True)
    if not resume and (run / "checkpoints").is_dir() and list_checkpoints(run / "checkpoints"):
        raise ConfigError(f"out_dir: {run} already holds checkpoints; pass resume=True (vgskit train --resume) to "
                          "continue that run or choose another out_dir")
    if train_cfg.warmup_steps and train_cfg.max_steps is not None and train_cfg.warmup_steps > train_cfg.max_steps:
        raise ConfigError(f"train.warmup_steps: {train_cfg.warmup_steps} is more than train.max_steps "
                          f"({train_cfg.max_steps}); the learning rate would never reach train.lr")
    name = train_cfg.select_metric
    if name is not None:
        names = validation_metric_names(rerank_top=data_cfg.rerank_top)
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"train.select_metric: {name!r} is not a metric validation reports{hint}; "
                              f"choose one of {', '.join(names)}")


def batch_sampler_for(data_cfg: DataConfig, caption_images: Sequence[int] | Sequence[Record], batch_size: int, *,
                      lengths: Sequence[int] | None = None,
                      on_epoch: Callable[[int, int], None] | None = None) -> Any:
    """The trainer's ``batch_sampler_factory`` that ``data.batch_sampler`` names (global batches; see
    :class:`~vgskit.data.loader.PairedBatches` and :class:`~vgskit.data.loader.ShuffledBatches`)."""
    from vgskit.data.loader import ShuffledBatches

    if data_cfg.batch_sampler == "shuffled":
        return ShuffledBatches(len(caption_images), batch_size, on_epoch=on_epoch)
    return paired_batch_sampler_factory(caption_images, batch_size, data_cfg.captions_per_image, lengths=lengths,
                                        on_epoch=on_epoch)


def _check_training_data(train_cfg: TrainConfig, data_cfg: DataConfig, manifest_path: Path, train_records: Sequence[Record],
                         world_size: int, all_records: Sequence[Record]) -> list[Record]:
    """The recipe against the manifest, before the model is built or any file decoded; returns the val records.

    Refused: a validation split with no records (validation runs at least at the end, and picks ``best/``),
    a batch the training split cannot fill once (too few images with ``captions_per_image`` captions), a
    global batch that the processes cannot share evenly, and a warm-up longer than the run its epochs give.
    """
    splits = sorted({r.split for r in all_records})
    if data_cfg.val_split not in splits:
        raise ConfigError(f"data.val_split: no records with split {data_cfg.val_split!r} in {manifest_path} (splits "
                          f"present: {', '.join(splits)}); validation needs them (set data.val_split, or data.corpus "
                          "for a corpus's standard split names)")
    val_records = read_manifest(manifest_path, split=data_cfg.val_split)
    if train_cfg.batch_size % world_size:
        raise ConfigError(f"train.batch_size: {train_cfg.batch_size} cannot be split evenly over {world_size} "
                          "processes; use a multiple of the number of processes")
    per_image = data_cfg.captions_per_image
    if data_cfg.batch_sampler == "shuffled" and len(train_records) < train_cfg.batch_size:
        raise ConfigError(f"train.batch_size: {train_cfg.batch_size} captions per batch, but split "
                          f"{data_cfg.train_split!r} of {manifest_path} has {len(train_records)}: not one full batch")
    sampler = batch_sampler_for(data_cfg, train_records, train_cfg.batch_size)
    per_epoch = sampler.num_batches()
    if per_epoch == 0:
        counts: dict[str, int] = {}
        for r in train_records:
            counts[r.image_id] = counts.get(r.image_id, 0) + 1
        usable = sum(1 for n in counts.values() if n >= per_image)
        raise ConfigError(
            f"train.batch_size: a batch of {train_cfg.batch_size} captions needs "
            f"{train_cfg.batch_size // per_image} images with {per_image} caption(s) each "
            f"(data.captions_per_image), but split {data_cfg.train_split!r} of {manifest_path} has {usable} such "
            f"image(s) ({len(counts)} images, {len(train_records)} captions): not one full batch; lower "
            "train.batch_size")
    total = train_cfg.max_steps
    if train_cfg.epochs is not None:
        by_epochs = train_cfg.epochs * per_epoch
        total = by_epochs if total is None else min(total, by_epochs)
    if train_cfg.warmup_steps and total is not None and train_cfg.warmup_steps > total:
        raise ConfigError(f"train.warmup_steps: {train_cfg.warmup_steps} is more than the {total} steps this run "
                          f"takes ({per_epoch} batches per epoch); the learning rate would never reach train.lr")
    return val_records


def _region_source(model: Any, data_cfg: DataConfig, manifest: str | Path,
                   progress: bool = True) -> RegionSource | None:
    """The region features a region model reads (``data.region_features``), or None for pixel models."""
    from vgskit.data.scene_regions import resolve_region_features

    name = getattr(model, "model_name", None) or type(model).__name__
    if model.image_input == "regions":
        if data_cfg.region_features is None:
            raise ConfigError(f"data.region_features: model {name!r} reads region features; give the BUTD/LXMERT "
                              "HDF5 file of the corpus's images")
        path = resolve_region_features(data_cfg.region_features, manifest, progress=progress)
        return RegionSource(path, data_cfg.num_regions)
    if data_cfg.region_features is not None:
        raise ConfigError(f"data.region_features: model {name!r} reads {model.image_input}, not region features; "
                          "remove data.region_features")
    return None


def reads_speech_features(model: Any) -> bool:
    """Whether ``model`` reads precomputed frames (``SpeechInputs`` of kind ``features``): its ``speech_input`` says
    so (a model whose input depends on its config sets it per instance, as MILAN with ``frontend.kind: features``)."""
    return getattr(model, "speech_input", "waveform") == "features"


def speech_feature_format(model: Any) -> tuple[int | None, float | None]:
    """``(feature_dim, frame_rate)`` the model declares for precomputed frames (``None`` where it declares none):
    ``speech_feature_dim`` / ``speech_frame_rate`` attributes, else those of its front-end (``width`` /
    ``frame_rate``)."""
    frontend = getattr(model, "frontend", None)
    dim = getattr(model, "speech_feature_dim", None) or getattr(frontend, "width", None)
    rate = getattr(model, "speech_frame_rate", None) or getattr(frontend, "frame_rate", None)
    return (None if dim is None else int(dim)), (None if rate is None else float(rate))


def speech_feature_source(model: Any, path: str | Path | None, records: Sequence[Record], *,
                          option: str = "data.speech_features") -> SpeechFeatureSource | None:
    """The precomputed speech frames a features model reads, checked against the model and ``records``.

    Each mistake is a :class:`~vgskit.errors.ConfigError` naming ``option`` or the file: features for a model
    that reads waveforms (or text), a features model without them, a missing file, utterances (caption ids of
    ``records``) the file lacks, frames whose width differs from the model's ``feature_dim``, and a frame rate
    other than the one the model declares. ``None`` for a model that does not read features.
    """
    name = getattr(model, "model_name", None) or type(model).__name__
    if not reads_speech_features(model):
        if path is not None:
            raise ConfigError(f"{option}: model {name!r} reads {model.speech_input} speech inputs, not precomputed "
                              f"features; remove {option} (or choose a front-end that reads features)")
        return None
    if path is None:
        raise ConfigError(f"{option}: model {name!r} reads precomputed speech features; give the HDF5 file (or the "
                          "folder of .npy files) of the captions' frames")
    source = SpeechFeatureSource(path)
    source.check_ids([r.caption_id for r in records])
    dim, rate = speech_feature_format(model)
    if dim is not None and source.feature_dim is not None and source.feature_dim != dim:
        raise ConfigError(f"speech features {source.path}: frames are {source.feature_dim}-d, but model {name!r} "
                          f"reads {dim}-d features (its feature_dim)")
    if rate is not None and source.frame_rate is not None and not math.isclose(source.frame_rate, rate,
                                                                                rel_tol=1e-6):
        raise ConfigError(f"speech features {source.path}: frames are at {source.frame_rate:g} frames/s, but model "
                          f"{name!r} reads {rate:g} frames/s (its feature_rate)")
    return source


def adapt_model_config(model_name: str, overrides: Mapping[str, Any], records: Sequence[Record], *,
                       source: str = "the training split",
                       corpus_records: Sequence[Record] | None = None) -> dict[str, Any]:
    """Let the model class adapt its config to the training corpus; returns the overrides to build it with.

    ``cls.adapt_config_to_corpus(config, train_texts, model_name=..., corpus_texts=...)`` (see
    :class:`vgskit.models.base.RetrievalModel`) receives the recipe's config overrides (a copy), the
    non-empty transcripts of ``records`` (the training split), the registry name and the non-empty transcripts of
    ``corpus_records`` (every split, or ``None``), and returns the overrides to build the model with. A hook that needs transcripts the corpus lacks should raise; the error is re-raised as a
    :class:`ConfigError` naming ``source`` (the manifest and split).
    """
    from vgskit.models.registry import get_model_class

    cls = get_model_class(model_name)
    texts = [str(r.text) for r in records if r.text]
    corpus_texts = None if corpus_records is None else [str(r.text) for r in corpus_records if r.text]
    try:
        adapted = cls.adapt_config_to_corpus(copy.deepcopy(dict(overrides)), texts, model_name=model_name,
                                             corpus_texts=corpus_texts)
    except (VGSKitError, ValueError) as err:
        raise ConfigError(f"{source}: model {model_name!r} cannot adapt its config to the training captions "
                          f"({len(texts)} of {len(records)} have a transcript): {err}") from err
    if not isinstance(adapted, Mapping):
        raise ConfigError(f"model {model_name!r}: adapt_config_to_corpus returned {type(adapted).__name__}, "
                          "not a mapping of config overrides")
    out = dict(adapted)
    out.pop("name", None)  # the registry name, if the hook kept it
    return out


def prepare_feature_caches(model: torch.nn.Module, data_cfg: DataConfig, records: Sequence[Record], *,
                           extract_missing: bool = True, device: str | torch.device | None = None,
                           progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Open (and fill) the feature caches of ``model``'s frozen towers for the training ``records``.

    Returns ``({kind: FeatureCache}, {kind: {"folder", "extracted", "items"}})``. Speech caches hold every
    hidden state of the head crop of ``data_cfg.train_max_seconds``: a random crop changes the tower's input
    every epoch (and cropping cached frames would not give the frames of a cropped waveform, since the
    transformer sees the whole input), so ``train_crop: random`` with a speech cache is refused (cache the
    image tower only). Image caches hold the pooled vector, computed from the model's own
    ``image_transform``. Extraction runs the tower on ``device`` (it stays there,
    ready for validation) with a progress bar; files already cached are skipped, so a second run extracts
    nothing. Under ``torchrun`` only the main process extracts (the others wait at a barrier, which times
    out after 30 minutes: extract a large corpus in one process first, e.g. with ``--set
    train.max_steps=1``).
    """
    from vgskit.data.cache import ExtractionOptions, FeatureCache, extract
    from vgskit.images import ImageTransform

    name = getattr(model, "model_name", None) or type(model).__name__
    towers = dict(model.frozen_towers())
    declared = model.feature_cache_options()
    if not towers:
        raise ConfigError(f"data.feature_cache: model {name!r} has no frozen towers (frozen_towers() is empty), "
                          "so there is nothing to cache; remove data.feature_cache")
    kinds = list(data_cfg.feature_cache_towers or sorted(k for k in towers if k in TOWER_KINDS))
    missing = [k for k in kinds if k not in towers]
    if missing or not kinds:
        raise ConfigError(f"data.feature_cache_towers: model {name!r} has no frozen {missing or TOWER_KINDS} "
                          f"tower; its frozen towers are {sorted(towers)}")
    if "image" in kinds and data_cfg.train_augment.kind != "none":
        raise ConfigError("data.train_augment: an image feature cache holds one fixed output per image, an "
                          "augmentation changes the tower's input every epoch; set data.train_augment.kind=none, or "
                          "data.feature_cache_towers=[speech] to cache the speech tower only")
    if "speech" in kinds and data_cfg.train_crop == "random":
        raise ConfigError("data.train_crop: 'random' cannot be combined with a speech feature cache (a cache holds "
                          "one fixed crop per file, a random crop changes the tower's input every epoch); set "
                          "data.train_crop=head, or data.feature_cache_towers=[image] to cache the image tower only")
    root = Path(str(data_cfg.feature_cache))
    caches: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for kind in kinds:
        tower = towers[kind]
        trainable = [n for n, prm in tower.named_parameters() if prm.requires_grad]
        if trainable:
            raise ConfigError(f"data.feature_cache: the {kind} tower of model {name!r} has trainable parameters "
                              f"({', '.join(trainable[:3])}{', ...' if len(trainable) > 3 else ''}); a cache "
                              "would silently freeze them")
        pooled = bool(declared.get(kind, {}).get("pooled", kind == "image"))  # what the model reads of it
        if kind == "speech":
            options = ExtractionOptions(kind="speech", max_seconds=data_cfg.train_max_seconds, pooled=pooled)
        else:
            options = ExtractionOptions(kind="image", pooled=pooled,
                                        image_transform=ImageTransform.from_json(dict(model.image_transform)))
        cache = FeatureCache.for_tower(root, tower, options)
        extracted = 0
        if extract_missing:
            if device is not None:
                tower.to(device)
            extracted = extract(cache, tower, records, batch_size=data_cfg.feature_cache_batch_size,
                                progress=progress, check_key=False)
        caches[kind] = cache
        summary[kind] = {"folder": str(cache.folder), "extracted": extracted, "items": len(cache)}
    return caches, summary


def load_model(checkpoint: str | Path) -> torch.nn.Module:
    """A trained model from a checkpoint folder (``best/``, ``step_N/``), a run's ``checkpoints/``, a run folder
    or the demo's output folder (``train/checkpoints/`` inside it); see
    :func:`vgskit.train.checkpoint.resolve_model_folder`. A run's ``best/`` is checked against the step the run
    recorded as best, so an interrupted update of it never hands back an older model. A Hugging Face Hub id
    (``owner/name`` or ``owner/name@revision``) that is not a local path is downloaded (:mod:`vgskit.hub`)."""
    from vgskit.hub import is_hub_id
    from vgskit.models.registry import load_pretrained
    from vgskit.train.checkpoint import resolve_model_folder

    if is_hub_id(checkpoint):
        return load_pretrained(str(checkpoint))
    return load_pretrained(resolve_model_folder(checkpoint))


def load_model_named(checkpoint: str | Path, option: str = "--checkpoint") -> torch.nn.Module:
    """:func:`load_model` for commands: every error it raises names ``option`` and the checkpoint given."""
    try:
        return load_model(checkpoint)
    except VGSKitError as err:
        if str(checkpoint) in str(err):
            raise
        raise VGSKitError(f"{option} {checkpoint}: {err}") from None


def model_for_evaluation(checkpoint: str | Path | None = None, model_name: str | None = None,
                         overrides: Mapping[str, Any] | None = None) -> Any:
    """A trained model from ``checkpoint``, or the registered model ``model_name`` as built (in eval mode).

    The second form evaluates a model that has no trained weights of its own (a cascade of pretrained
    systems, or a model whose pretrained towers are its whole content).
    """
    if (checkpoint is None) == (model_name is None):
        raise ConfigError("give a checkpoint or a registered model name (not both)")
    if checkpoint is not None:
        return load_model(checkpoint)
    from vgskit.models.registry import create_model

    return create_model(str(model_name), **dict(overrides or {})).eval()


def evaluate_splits(model: Any, manifest: str | Path, splits: Sequence[str], *, batch_size: int = 128,
                    max_seconds: float | None = None, rerank_top: int | None = None,
                    extras: Sequence[str] | Mapping[str, Mapping[str, Any]] = (),
                    region_features: str | None = None, num_regions: int = 36,
                    exhaustive_fine: bool = False,
                    speech_features: str | None = None) -> dict[str, dict[str, Any]]:
    """:func:`vgskit.retrieval.evaluate.evaluate` of ``model`` on each split of ``manifest``.

    What the model must offer for the requested ``extras``, ``rerank_top`` and ``exhaustive_fine`` is checked
    once, before any split is read.
    """
    from vgskit.extensions import get_evaluation
    from vgskit.retrieval.evaluate import evaluate

    requested = {name: dict(opts) for name, opts in extras.items()} if isinstance(extras, Mapping) else {
        name: {} for name in extras}
    for name in requested:
        check = get_evaluation(name).require_model
        if check is not None:
            check(model)
    for option, wanted in (("--rerank-top", rerank_top is not None), ("--exhaustive-fine", exhaustive_fine)):
        if wanted and not model.has_fine_scores:
            name = getattr(model, "model_name", None) or type(model).__name__
            raise ConfigError(f"{option}: model {name!r} has no fine scorer (score_pairs) to re-rank with")
    from vgskit.data.scene_regions import resolve_region_features

    region_features = resolve_region_features(region_features, manifest)
    regions = RegionSource(region_features, num_regions) if region_features else None
    if regions is None and model.image_input == "regions":
        raise ConfigError("--region-features: this model reads region features; give the HDF5 file of the images")
    records = {split: read_manifest(manifest, split=split) for split in splits}
    features = speech_feature_source(model, speech_features, [r for rs in records.values() for r in rs],
                                     option="speech_features")
    results: dict[str, dict[str, Any]] = {}
    for split in splits:
        ds = make_dataset(manifest, split, model.image_transform, max_seconds=max_seconds, preload=True,
                          regions=regions, speech_input=model.speech_input, records=records[split],
                          speech_features=features)
        results[split] = evaluate(model, ds, batch_size=batch_size, rerank_top=rerank_top, extras=requested,
                                  source=f"{manifest} (split {split!r})", exhaustive_fine=exhaustive_fine)
    return results


def evaluate_checkpoint(checkpoint: str | Path, manifest: str | Path, *, split: str = "test",
                        batch_size: int = 128, max_seconds: float | None = None, rerank_top: int | None = None,
                        extras: Sequence[str] | Mapping[str, Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Recall (and ``extras``) of a checkpoint on one split of a manifest."""
    model = load_model(checkpoint)
    return evaluate_splits(model, manifest, [split], batch_size=batch_size, max_seconds=max_seconds,
                           rerank_top=rerank_top, extras=extras)[split]


def evaluate_corpus(checkpoint: str | Path, manifest: str | Path, corpus: str, *, batch_size: int = 128,
                    max_seconds: float | None = None, rerank_top: int | None = None,
                    extras: Sequence[str] | Mapping[str, Mapping[str, Any]] = ()) -> dict[str, dict[str, Any]]:
    """Recall on every split the papers report for ``corpus`` (e.g. Places: test_seen and test_unseen)."""
    from vgskit.data.splits import corpus_splits

    splits = corpus_splits(corpus).test
    if not splits:
        raise ConfigError(f"corpus {corpus!r} has no standard test split (it is used for pretraining)")
    return evaluate_splits(load_model(checkpoint), manifest, list(splits), batch_size=batch_size,
                           max_seconds=max_seconds, rerank_top=rerank_top, extras=extras)


def build_index(checkpoint: str | Path, manifest: str | Path, *, split: str = "test",
                out_dir: str | Path, region_features: str | None = None, num_regions: int = 36) -> Path:
    """Embed the distinct images of a split into a saved :class:`~vgskit.retrieval.engine.SearchEngine`."""
    from vgskit.data.scene_regions import resolve_region_features
    from vgskit.retrieval.engine import SearchEngine

    model = load_model(checkpoint)
    region_features = resolve_region_features(region_features, manifest)
    regions = RegionSource(region_features, num_regions) if region_features else None
    if regions is None and model.image_input == "regions":
        raise ConfigError("--region-features: this model reads region features; give the HDF5 file of the images")
    ds = make_dataset(manifest, split, model.image_transform, max_seconds=None, preload=False, regions=regions,
                      progress=False, speech_input=model.speech_input)
    engine = SearchEngine.build_from_dataset(model, ds, progress=True)
    return engine.save(out_dir)
