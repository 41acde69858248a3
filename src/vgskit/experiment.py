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

import copy
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vgskit.data.loader import SpokenCaptionDataset, collate_spoken_captions, paired_batch_sampler_factory
from vgskit.data.manifest import read_manifest
from vgskit.errors import ConfigError, VGSKitError

RECIPE_DIR = Path(__file__).parent / "recipes"


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
        train_max_seconds: training captions are cropped to their first N seconds (throughput).
        eval_max_seconds: evaluation crop (``None``: whole captions).
        captions_per_image: captions of each image in a training batch (the rest of the batch is other images).
        length_bucketing: sort groups by length within buckets to reduce padding.
        preload: decode all audio and images into memory once (fast epochs; fits the embedded corpus).
        eval_batch_size: batch size for embedding during evaluation.
        val_max_images: evaluate validation on at most this many images (keeps per-epoch evaluation cheap).
    """

    manifest: str | None = None
    corpus_preset: str = "demo"
    corpus: str | None = None
    train_split: str | None = None
    val_split: str | None = None
    test_split: str | None = None

    def __post_init__(self) -> None:
        from vgskit.data.splits import corpus_splits

        std = corpus_splits(self.corpus or "spoken_scenes")
        self.train_split = self.train_split or std.train
        self.val_split = self.val_split or std.val
        if self.test_split is None and std.test:
            self.test_split = std.test[0]
    train_max_seconds: float | None = 8.0
    eval_max_seconds: float | None = None
    captions_per_image: int = 2
    length_bucketing: bool = True
    preload: bool = True
    eval_batch_size: int = 128
    val_max_images: int | None = None


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
    known = sorted(q.stem for q in RECIPE_DIR.glob("*.yaml"))
    raise ConfigError(f"unknown recipe {recipe!r}; built-in recipes: {known} (or pass a .yaml path)")


def load_experiment(recipe: str | Path | Mapping[str, Any], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a recipe (name, path or dict), apply ``section.key=value`` overrides, check its sections."""
    from vgskit.train.config import apply_overrides, load_recipe

    if isinstance(recipe, Mapping):
        d = apply_overrides(copy.deepcopy(dict(recipe)), overrides)
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
                 progress: bool = True) -> SpokenCaptionDataset:
    """A split of a manifest as a dataset, with images preprocessed the way the model's weights expect."""
    records = read_manifest(manifest, split=split)
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
        interpolation=image_transform.get("interpolation", "bilinear"), progress=progress)


@torch.no_grad()
def embed_dataset(model: torch.nn.Module, dataset: SpokenCaptionDataset, batch_size: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed every caption and every distinct image of ``dataset``.

    Returns ``speech_emb [Nc, D]``, ``image_emb [Ni, D]`` and ``caption_image [Nc]`` (image row of each
    caption). Captions are embedded in length order to keep padding small; rows come back in dataset order.
    """
    was_training = model.training
    model.eval()
    try:
        lengths = dataset.num_samples()
        order = sorted(range(len(dataset)), key=lambda i: lengths[i])
        speech_rows: list[torch.Tensor] = [None] * len(dataset)  # type: ignore[list-item]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            wavs = [dataset.waveform(i) for i in idx]
            batch = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)  # [B, T]
            emb = model.encode_speech(batch, torch.tensor([len(w) for w in wavs])).float()
            for row, i in enumerate(idx):
                speech_rows[i] = emb[row]
        image_rows = []
        for start in range(0, len(dataset.image_keys), batch_size):
            pixels = torch.stack([dataset.pixels(i) for i in
                                  range(start, min(start + batch_size, len(dataset.image_keys)))])
            image_rows.append(model.encode_image(pixels).float())
    finally:
        model.train(was_training)
    caption_image = torch.tensor(dataset.caption_image_index, dtype=torch.long)
    return torch.stack(speech_rows), torch.cat(image_rows), caption_image


def evaluate_model(model: torch.nn.Module, dataset: SpokenCaptionDataset, *, batch_size: int = 128,
                   ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, Any]:
    """Recall@K both directions (+ mean/median rank) of ``model`` on ``dataset``; see :mod:`vgskit.metrics`."""
    from vgskit.retrieval.evaluate import evaluate_retrieval

    speech, image, caption_image = embed_dataset(model, dataset, batch_size)
    return evaluate_retrieval(speech, image, caption_image, ks=ks)


def flatten_metrics(results: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"speech_to_image": {"R@1": ..}}`` → ``{"speech_to_image/R@1": ..}`` (scalars only)."""
    flat: dict[str, float] = {}
    for k, v in results.items():
        if isinstance(v, Mapping):
            flat.update(flatten_metrics(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float):
            flat[f"{prefix}{k}"] = float(v)
    return flat


def train_from_recipe(recipe: str | Path | Mapping[str, Any], *, out_dir: str | Path,
                      manifest: str | None = None, corpus: str | None = None, overrides: Iterable[str] = (),
                      resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train the recipe's model on its data; returns the Trainer's summary (best checkpoint, metric, ...).

    ``manifest`` and ``corpus`` (standard split names, see :mod:`vgskit.data.splits`) override the recipe's
    ``data.manifest`` and ``data.corpus``.
    """
    from vgskit.models.registry import create_model
    from vgskit.train.config import TrainConfig, config_from_dict
    from vgskit.train.distributed import is_main
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
    # Same seed on every process: identical initial weights, and the same run twice starts identically.
    torch.manual_seed(train_cfg.seed)
    model = create_model(model_name, **model_d)
    transform = model.image_transform

    # Only the main process may generate the corpus; the others wait for it (a file lock would also do).
    from vgskit.train.distributed import barrier, init_distributed

    init_distributed()
    if is_main():
        manifest_path = resolve_manifest(data_cfg, progress=progress)
    barrier()
    if not is_main():
        manifest_path = resolve_manifest(data_cfg, progress=False)

    train_set = make_dataset(manifest_path, data_cfg.train_split, transform, max_seconds=data_cfg.train_max_seconds,
                             preload=data_cfg.preload, progress=progress and is_main())
    sampler = paired_batch_sampler_factory(
        train_set.caption_image_index, train_cfg.batch_size, data_cfg.captions_per_image,
        lengths=train_set.num_samples() if data_cfg.length_bucketing else None)  # headers if not preloaded

    # Every rank passes the same evaluate_fn (the Trainer runs it on the main rank only and broadcasts the
    # result); the validation set is therefore built lazily, on first use, by the main rank alone.
    val_sets: list[SpokenCaptionDataset] = []

    def evaluate_fn(m: torch.nn.Module) -> dict[str, float]:
        if not val_sets:
            val_sets.append(make_dataset(manifest_path, data_cfg.val_split, transform,
                                         max_seconds=data_cfg.eval_max_seconds, preload=data_cfg.preload,
                                         max_images=data_cfg.val_max_images, progress=False))
        return flatten_metrics(evaluate_model(m, val_sets[0], batch_size=data_cfg.eval_batch_size), "val/")

    trainer = Trainer(model, train_cfg, train_set, collate_spoken_captions, batch_sampler_factory=sampler,
                      evaluate_fn=evaluate_fn, model_name=model_name,
                      model_config=model.config,
                      extra_config={"data": asdict(data_cfg), "manifest": str(manifest_path),
                                    "image_transform": transform},
                      progress_bar=progress)
    t0 = time.time()
    summary = trainer.fit(resume=resume)
    summary["train_wall_s"] = time.time() - t0
    summary["manifest"] = str(manifest_path)
    return summary


def load_model(checkpoint: str | Path) -> torch.nn.Module:
    """A trained model from a checkpoint folder (``best/``, ``step_N/``, a run's ``checkpoints/`` or run dir)."""
    from vgskit.models.registry import load_pretrained
    from vgskit.train.checkpoint import resolve_checkpoint

    p = Path(checkpoint)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / "best").is_dir():
        p = p / "best"
    elif not (p / "config.json").is_file():
        p = resolve_checkpoint(p)
    if not (p / "model.safetensors").is_file():
        raise VGSKitError(f"checkpoint {checkpoint}: no model.safetensors found")
    return load_pretrained(p)


def evaluate_checkpoint(checkpoint: str | Path, manifest: str | Path, *, split: str = "test",
                        batch_size: int = 128, max_seconds: float | None = None) -> dict[str, Any]:
    """Recall of a checkpoint on one split of a manifest."""
    model = load_model(checkpoint)
    ds = make_dataset(manifest, split, model.image_transform, max_seconds=max_seconds, preload=True)
    return evaluate_model(model, ds, batch_size=batch_size)


def evaluate_corpus(checkpoint: str | Path, manifest: str | Path, corpus: str, *, batch_size: int = 128,
                    max_seconds: float | None = None) -> dict[str, dict[str, Any]]:
    """Recall on every split the papers report for ``corpus`` (e.g. Places: test_seen and test_unseen)."""
    from vgskit.data.splits import corpus_splits

    splits = corpus_splits(corpus).test
    if not splits:
        raise ConfigError(f"corpus {corpus!r} has no standard test split (it is used for pretraining)")
    model = load_model(checkpoint)
    results = {}
    for split in splits:
        ds = make_dataset(manifest, split, model.image_transform, max_seconds=max_seconds, preload=True)
        results[split] = evaluate_model(model, ds, batch_size=batch_size)
    return results


def build_index(checkpoint: str | Path, manifest: str | Path, *, split: str = "test",
                out_dir: str | Path) -> Path:
    """Embed the distinct images of a split into a saved :class:`~vgskit.retrieval.engine.SearchEngine`."""
    from vgskit.retrieval.engine import SearchEngine

    model = load_model(checkpoint)
    records = read_manifest(manifest, split=split)
    seen: dict[str, str] = {}
    for r in records:
        seen.setdefault(r.image_id, r.image)
    engine = SearchEngine.build(model, list(seen.values()), list(seen.keys()), progress=True)
    return engine.save(out_dir)
