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
import inspect
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from vgskit.data.loader import SpokenCaptionDataset, collate_spoken_captions, paired_batch_sampler_factory
from vgskit.data.manifest import Record, read_manifest
from vgskit.errors import ConfigError, VGSKitError

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
        train_max_seconds: training captions are cropped to N seconds (throughput; SpeechCLIP: 6.4 s, i.e.
            102,400 samples).
        train_crop: which N seconds: ``"head"`` (the first ones, the same every epoch) or ``"random"`` (a
            window at a random offset, new every epoch, reproducible from ``train.seed``; see
            :mod:`vgskit.data.loader`). Evaluation never crops at random.
        eval_max_seconds: evaluation crop (``None``: whole captions).
        captions_per_image: captions of each image in a training batch (the rest of the batch is other images).
        length_bucketing: sort groups by length within buckets to reduce padding.
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
    preload: bool = True
    eval_batch_size: int = 128
    val_max_images: int | None = None
    feature_cache: str | None = None
    feature_cache_towers: list[str] | None = None
    feature_cache_batch_size: int = 16

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
        if self.feature_cache_batch_size < 1:
            raise ConfigError(f"feature_cache_batch_size: must be >= 1, got {self.feature_cache_batch_size}")


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
                 progress: bool = True, crop: str = "head", crop_seed: int = 0,
                 records: Sequence[Record] | None = None) -> SpokenCaptionDataset:
    """A split of a manifest as a dataset, with images preprocessed the way the model's weights expect.

    ``records`` (that split's records, already read) saves reading the manifest again. ``crop`` and
    ``crop_seed`` are :class:`~vgskit.data.loader.SpokenCaptionDataset`'s (random crops are for training).
    """
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
        crop=crop, crop_seed=crop_seed)  # type: ignore[arg-type]


@torch.no_grad()
def map_speech(model: torch.nn.Module, dataset: SpokenCaptionDataset,
               fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch_size: int = 128) -> torch.Tensor:
    """``fn(wavs [B, T], lengths [B]) -> [B, ...]`` over every caption of ``dataset``, stacked in dataset order.

    Captions are batched in length order (little padding) with the model in eval mode (restored after).
    """
    was_training = model.training
    model.eval()
    try:
        lengths = dataset.num_samples()
        order = sorted(range(len(dataset)), key=lambda i: lengths[i])
        rows: list[torch.Tensor] = [None] * len(dataset)  # type: ignore[list-item]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            wavs = [dataset.waveform(i) for i in idx]
            batch = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)  # [B, T]
            out = fn(batch, torch.tensor([len(w) for w in wavs]))  # [B, ...]
            for row, i in enumerate(idx):
                rows[i] = out[row]
    finally:
        model.train(was_training)
    return torch.stack(rows)


@torch.no_grad()
def embed_speech(model: torch.nn.Module, dataset: SpokenCaptionDataset, batch_size: int = 128) -> torch.Tensor:
    """Embed every caption of ``dataset`` (``[Nc, D]``, dataset order), in length order to keep padding small."""
    return map_speech(model, dataset, lambda wavs, lens: model.encode_speech(wavs, lens).float(), batch_size)


@torch.no_grad()
def embed_images(model: torch.nn.Module, dataset: SpokenCaptionDataset, batch_size: int = 128) -> torch.Tensor:
    """Embed every distinct image of ``dataset`` (``[Ni, D]``, in :attr:`image_keys` order)."""
    was_training = model.training
    model.eval()
    try:
        rows = []
        n = len(dataset.image_keys)
        for start in range(0, n, batch_size):
            pixels = torch.stack([dataset.pixels(i) for i in range(start, min(start + batch_size, n))])
            rows.append(model.encode_image(pixels).float())
    finally:
        model.train(was_training)
    return torch.cat(rows)


def embed_dataset(model: torch.nn.Module, dataset: SpokenCaptionDataset, batch_size: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed every caption and every distinct image of ``dataset``.

    Returns ``speech_emb [Nc, D]``, ``image_emb [Ni, D]`` and ``caption_image [Nc]`` (image row of each
    caption). Captions are embedded in length order to keep padding small; rows come back in dataset order.
    """
    speech = embed_speech(model, dataset, batch_size)
    image = embed_images(model, dataset, batch_size)
    return speech, image, torch.tensor(dataset.caption_image_index, dtype=torch.long)


def evaluate_model(model: torch.nn.Module, dataset: SpokenCaptionDataset, *, batch_size: int = 128,
                   ks: tuple[int, ...] = (1, 5, 10), zero_shot_text: bool = False) -> dict[str, Any]:
    """Recall@K both directions (+ mean/median rank) of ``model`` on ``dataset``; see :mod:`vgskit.metrics`.

    ``zero_shot_text=True`` adds ``results["zero_shot_text"]``: speech <-> caption-text retrieval (see
    :func:`evaluate_zero_shot_text`), reusing the speech embeddings.
    """
    from vgskit.retrieval.evaluate import evaluate_retrieval

    if zero_shot_text:
        _check_zero_shot_text(model, dataset)  # fail before the (long) embedding pass
    speech, image, caption_image = embed_dataset(model, dataset, batch_size)
    results = evaluate_retrieval(speech, image, caption_image, ks=ks)
    if zero_shot_text:
        results["zero_shot_text"] = evaluate_zero_shot_text(model, dataset, batch_size=batch_size, ks=ks,
                                                            speech_emb=speech)
    return results


def require_text_tower(model: torch.nn.Module) -> None:
    """Raise unless ``model`` embeds text (``encode_text``), which zero-shot speech <-> text retrieval needs."""
    if not callable(getattr(model, "encode_text", None)):
        name = getattr(model, "model_name", None) or type(model).__name__
        raise VGSKitError(f"model {name!r} has no text tower (encode_text): zero-shot speech <-> text retrieval "
                          "needs a model that embeds text in its speech space, such as SpeechCLIP")


def caption_texts(dataset: SpokenCaptionDataset, source: str | None = None) -> list[str]:
    """The transcript of every caption of ``dataset``; an error listing captions without one.

    ``source`` (e.g. the manifest and split) is named in the error.
    """
    missing = [r.caption_id for r in dataset.records if not r.text]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        where = f"{source}: " if source else ""
        raise VGSKitError(f"{where}{len(missing)} of {len(dataset.records)} captions have no transcript (text) "
                          f"({shown}); zero-shot speech <-> text retrieval ranks the caption texts")
    return [str(r.text) for r in dataset.records]


def _check_zero_shot_text(model: torch.nn.Module, dataset: SpokenCaptionDataset) -> list[str]:
    require_text_tower(model)
    return caption_texts(dataset)


@torch.no_grad()
def evaluate_zero_shot_text(model: torch.nn.Module, dataset: SpokenCaptionDataset, *, batch_size: int = 128,
                            ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024,
                            speech_emb: torch.Tensor | None = None) -> dict[str, Any]:
    """Zero-shot speech <-> text retrieval of ``dataset``'s captions, scored as the SpeechCLIP paper does.

    Speech queries rank the caption texts (embedded with ``model.encode_text``) and hit when a retrieved
    text is a caption of the same image; text queries rank the spoken captions the same way (see
    :func:`vgskit.metrics.speech_text_retrieval`). No speech-text pair was seen in training: the two meet
    only through the image space. ``speech_emb`` reuses embeddings from :func:`embed_speech`.
    """
    from vgskit.metrics import speech_text_retrieval

    texts = _check_zero_shot_text(model, dataset)
    if speech_emb is None:
        speech_emb = embed_speech(model, dataset, batch_size)
    was_training = model.training
    model.eval()
    try:
        text_emb = torch.cat([model.encode_text(texts[i:i + batch_size]).float()
                              for i in range(0, len(texts), batch_size)])
    finally:
        model.train(was_training)
    labels = torch.tensor(dataset.caption_image_index, dtype=torch.long)
    return speech_text_retrieval(speech_emb.cpu(), text_emb.cpu(), labels, labels, ks=ks, chunk_size=chunk_size)


#: What :func:`evaluate_keyword_hit_rate` looks up in the vocabulary for each keyword slot.
KEYWORD_SOURCES = ("chosen", "slot")


def _model_name(model: torch.nn.Module) -> str:
    return str(getattr(model, "model_name", None) or type(model).__name__)


def require_keyword_branch(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """``(table [V, D], token_ids [V], tokenizer)`` of a model with keyword slots; a clear error otherwise.

    The keyword hit rate needs the vocabulary the keywords are chosen from (``keyword_table()``,
    ``keyword_token_ids``) and the text tower's tokenizer, to split each transcript into the same subwords.
    """
    name = _model_name(model)
    # Looked up on the class: a model without the cascaded branch raises from the property itself.
    if not all(hasattr(type(model), a) for a in ("keyword_table", "keyword_token_ids", "keyword_ids")):
        raise VGSKitError(f"model {name!r} has no keyword slots (keyword_table, keyword_token_ids, keyword_ids): "
                          "the keyword hit rate needs a cascaded model such as SpeechCLIP-C")
    try:
        table = model.keyword_table()
        ids = model.keyword_token_ids
    except VGSKitError as err:  # e.g. a SpeechCLIP without its cascaded branch
        raise VGSKitError(f"model {name!r}: the keyword hit rate needs the cascaded branch ({err})") from err
    tokenizer = getattr(getattr(model, "text_tower", None), "tokenizer", None)
    if tokenizer is None:
        raise VGSKitError(f"model {name!r}: its text tower has no tokenizer files (vocab.json, merges.txt), "
                          "which the keyword hit rate needs to split the transcripts into subwords")
    return table.detach(), ids.detach().long(), tokenizer


def _keyword_transcripts(dataset: SpokenCaptionDataset, source: str | None) -> list[str]:
    missing = [r.caption_id for r in dataset.records if not r.text]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        where = f"{source}: " if source else ""
        raise VGSKitError(f"{where}{len(missing)} of {len(dataset.records)} captions have no transcript (text) "
                          f"({shown}); the keyword hit rate compares each caption's keywords with the subwords "
                          "of its transcript")
    return [str(r.text) for r in dataset.records]


@torch.no_grad()
def evaluate_keyword_hit_rate(model: torch.nn.Module, dataset: SpokenCaptionDataset, *, top_k: int = 5,
                              keywords: Literal["chosen", "slot"] = "chosen", batch_size: int = 64,
                              source: str | None = None) -> dict[str, Any]:
    """Per-slot keyword hit rate of a cascaded model (SpeechCLIP-C) over ``dataset``'s captions, in percent.

    For every caption and keyword slot, the ``top_k`` vocabulary entries nearest (by cosine) to the slot's
    keyword are looked up; the slot *hits* when any of them is one of the subwords of the caption's own
    transcript (:func:`vgskit.metrics.keyword_hit_rate`). ``keywords`` says which vector is looked up:

    * ``"chosen"`` (default): the vocabulary entry the slot selects, i.e. the token embedding CLIP's text
      tower receives. The reference implementation scores these (with 5 neighbours); with ``top_k=1`` this
      is the paper's definition (the selected subword itself occurs in the caption).
    * ``"slot"``: the slot's batch-normalised vector before it is quantised (``keyword_embeddings``).

    Two details differ from the reference code on purpose: padding/start/end-of-text rows are never counted
    among the neighbours (a keyword can never be one of them), and a transcript's subwords are its own
    tokens only (the reference re-encodes padded token sequences, so start/end-of-text neighbours count as
    hits there). Captions are embedded in length order to keep padding small; the model runs in eval mode
    (the keyword BatchNorm uses its running statistics).

    Returns:
        ``{"per_slot": [K rates], "mean": ..., "top_k": ..., "keywords": ..., "n_captions": N}``.

    Raises:
        VGSKitError: the model has no cascaded branch or no tokenizer, or a caption has no transcript
            (``source``, e.g. the manifest and split, is named in the message).
    """
    from vgskit.metrics import keyword_hit_rate
    from vgskit.models.speechclip import special_token_ids

    if keywords not in KEYWORD_SOURCES:
        raise ConfigError(f"keywords: must be one of {KEYWORD_SOURCES}, got {keywords!r}")
    table, token_ids, tokenizer = require_keyword_branch(model)
    table, token_ids = table.float().cpu(), token_ids.cpu()  # [V, D], [V]
    texts = _keyword_transcripts(dataset, source)
    # Candidates: every vocabulary row except padding and start/end of text (never chosen as keywords).
    special = torch.tensor(sorted(special_token_ids(tokenizer)), dtype=torch.long)
    keep = ~torch.isin(token_ids, special)
    candidates, candidate_ids = table[keep], token_ids[keep]  # [V', D], [V']
    if not 1 <= top_k <= len(candidate_ids):
        raise ConfigError(f"top_k: must be in [1, {len(candidate_ids)}] (the keyword vocabulary without special "
                          f"tokens), got {top_k}")
    row_of = {int(t): r for r, t in enumerate(token_ids.tolist())}
    caption_tokens = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def slot_vectors(batch: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        if keywords == "chosen":
            chosen, _ = model.keyword_ids(batch, lens, top_k=1)  # [B, K, 1] CLIP token ids
            chosen_rows = torch.tensor([[row_of[int(t)] for t in slots] for slots in chosen[..., 0].tolist()])
            return table[chosen_rows]  # [B, K, D]
        return model.keyword_embeddings(batch, lens).float().cpu()  # [B, K, D]

    vectors = map_speech(model, dataset, slot_vectors, batch_size)  # [N, K, D]
    rates = keyword_hit_rate(vectors, candidates, caption_tokens, candidate_ids, top=top_k)
    return {"per_slot": [float(r) for r in rates], "mean": float(rates.mean()), "top_k": int(top_k),
            "keywords": keywords, "n_captions": len(dataset)}


def format_keyword_hit_rate(result: Mapping[str, Any]) -> str:
    """A small text table of :func:`evaluate_keyword_hit_rate`'s result (one line per slot, then the mean)."""
    what = "selected subword" if result["keywords"] == "chosen" else "slot vector"
    lines = [f"keyword hit rate (top-{result['top_k']} vocabulary neighbours of each slot's {what} among the "
             f"caption's subwords; {result['n_captions']} captions)"]
    lines += [f"  slot {i:>2}: {rate:6.2f} %" for i, rate in enumerate(result["per_slot"], start=1)]
    lines.append(f"  mean   : {result['mean']:6.2f} %")
    return "\n".join(lines)


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

    Before the model is built, its class's ``adapt_config_to_corpus`` (if it has one) gets the recipe's model
    overrides and the transcripts of the training split, and returns the overrides to build with (SpeechCLIP
    fills its reduced keyword vocabulary this way; see :func:`adapt_model_config`); the adapted config is the
    one saved with every checkpoint. With ``data.feature_cache`` the model's frozen towers run once over the
    training split and training reads their cached outputs (see :func:`prepare_feature_caches`); the
    summary then has a ``feature_cache`` entry (folder and number of files extracted per tower).
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

    # Only the main process may generate the corpus; the others wait for it (a file lock would also do).
    dist_info = init_distributed()
    if is_main():
        manifest_path = resolve_manifest(data_cfg, progress=progress)
    barrier()
    if not is_main():
        manifest_path = resolve_manifest(data_cfg, progress=False)
    train_records = read_manifest(manifest_path, split=data_cfg.train_split)

    model_d = adapt_model_config(model_name, model_d, train_records, source=f"{manifest_path} "
                                 f"(split {data_cfg.train_split!r})")
    # Same seed on every process: identical initial weights, and the same run twice starts identically.
    torch.manual_seed(train_cfg.seed)
    model = create_model(model_name, **model_d)
    transform = model.image_transform

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
                            crop_seed=train_cfg.seed, progress=progress and is_main())
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
    sampler = paired_batch_sampler_factory(train_set.caption_image_index, train_cfg.batch_size,
                                           data_cfg.captions_per_image, lengths=lengths,
                                           on_epoch=train_set.set_epoch)

    # Every rank passes the same evaluate_fn (the Trainer runs it on the main rank only and broadcasts the
    # result); the validation set is therefore built lazily, on first use, by the main rank alone.
    val_sets: list[SpokenCaptionDataset] = []

    def evaluate_fn(m: torch.nn.Module) -> dict[str, float]:
        if not val_sets:
            val_sets.append(make_dataset(manifest_path, data_cfg.val_split, transform,
                                         max_seconds=data_cfg.eval_max_seconds, preload=data_cfg.preload,
                                         max_images=data_cfg.val_max_images, progress=False))
        # Validation runs the real frozen towers on raw inputs: its numbers are those of the saved model.
        with swap.real_towers() if swap is not None else contextlib.nullcontext():
            return flatten_metrics(evaluate_model(m, val_sets[0], batch_size=data_cfg.eval_batch_size), "val/")

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


def _model_class(model_name: str) -> type:
    """The class registered as ``model_name``, without building the model."""
    from vgskit.models import registry

    get_model_class = getattr(registry, "get_model_class", None)
    if get_model_class is not None:
        return get_model_class(model_name)
    registry._import_builtin_models()
    if model_name not in registry._MODELS:
        raise ConfigError(f"unknown model {model_name!r}; available models are {registry.list_models()}")
    return registry._MODELS[model_name][0]


def _accepts_keyword(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def adapt_model_config(model_name: str, overrides: Mapping[str, Any], records: Sequence[Record], *,
                       source: str = "the training split") -> dict[str, Any]:
    """Let the model class adapt its config to the training corpus; returns the overrides to build it with.

    ``cls.adapt_config_to_corpus(config, train_texts, model_name=...)`` (see
    :class:`vgskit.models.base.RetrievalModel`) receives the recipe's config overrides (a copy), the
    non-empty transcripts of ``records`` and the registry name, and returns the overrides to build the
    model with. A hook that needs transcripts the corpus lacks should raise; the error is re-raised as a
    :class:`ConfigError` naming ``source`` (the manifest and split).
    """
    cls = _model_class(model_name)
    hook = getattr(cls, "adapt_config_to_corpus", None)
    if hook is None:
        return dict(overrides)
    texts = [str(r.text) for r in records if r.text]
    kwargs = {"model_name": model_name} if _accepts_keyword(hook, "model_name") else {}
    try:
        adapted = hook(copy.deepcopy(dict(overrides)), texts, **kwargs)
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
    frozen_towers = getattr(model, "frozen_towers", None)
    towers = dict(frozen_towers()) if callable(frozen_towers) else {}
    if not towers:
        raise ConfigError(f"data.feature_cache: model {name!r} has no frozen towers (frozen_towers() is empty), "
                          "so there is nothing to cache; remove data.feature_cache")
    kinds = list(data_cfg.feature_cache_towers or sorted(k for k in towers if k in TOWER_KINDS))
    missing = [k for k in kinds if k not in towers]
    if missing or not kinds:
        raise ConfigError(f"data.feature_cache_towers: model {name!r} has no frozen {missing or TOWER_KINDS} "
                          f"tower; its frozen towers are {sorted(towers)}")
    if "speech" in kinds and data_cfg.train_crop == "random":
        raise ConfigError("data.train_crop: 'random' cannot be combined with a speech feature cache (a cache holds "
                          "one fixed crop per file, a random crop changes the tower's input every epoch); set "
                          "data.train_crop=head, or data.feature_cache_towers=[image] to cache the image tower only")
    if not callable(getattr(model, "set_tower", None)):
        raise ConfigError(f"data.feature_cache: model {name!r} has no set_tower(kind, module) to swap its towers")
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
        if kind == "speech":
            options = ExtractionOptions(kind="speech", max_seconds=data_cfg.train_max_seconds)
        else:
            # Only the pooled vector of a listed image tower is read (the frozen_towers() contract).
            options = ExtractionOptions(kind="image", pooled=True,
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
                        batch_size: int = 128, max_seconds: float | None = None,
                        zero_shot_text: bool = False) -> dict[str, Any]:
    """Recall of a checkpoint on one split of a manifest.

    ``zero_shot_text=True`` adds ``results["zero_shot_text"]`` (speech <-> caption-text retrieval, see
    :func:`evaluate_zero_shot_text`); the model must have ``encode_text`` and every caption a transcript.
    """
    model = load_model(checkpoint)
    if zero_shot_text:
        require_text_tower(model)  # before decoding the split
    ds = make_dataset(manifest, split, model.image_transform, max_seconds=max_seconds, preload=True)
    if zero_shot_text:
        caption_texts(ds, f"{manifest} (split {split!r})")
    return evaluate_model(model, ds, batch_size=batch_size, zero_shot_text=zero_shot_text)


def evaluate_corpus(checkpoint: str | Path, manifest: str | Path, corpus: str, *, batch_size: int = 128,
                    max_seconds: float | None = None, zero_shot_text: bool = False) -> dict[str, dict[str, Any]]:
    """Recall on every split the papers report for ``corpus`` (e.g. Places: test_seen and test_unseen)."""
    from vgskit.data.splits import corpus_splits

    splits = corpus_splits(corpus).test
    if not splits:
        raise ConfigError(f"corpus {corpus!r} has no standard test split (it is used for pretraining)")
    model = load_model(checkpoint)
    if zero_shot_text:
        require_text_tower(model)
    results = {}
    for split in splits:
        ds = make_dataset(manifest, split, model.image_transform, max_seconds=max_seconds, preload=True)
        if zero_shot_text:
            caption_texts(ds, f"{manifest} (split {split!r})")
        results[split] = evaluate_model(model, ds, batch_size=batch_size, zero_shot_text=zero_shot_text)
    return results


def evaluate_checkpoint_splits(checkpoint: str | Path, manifest: str | Path, splits: Sequence[str], *,
                               batch_size: int = 128, max_seconds: float | None = None,
                               zero_shot_text: bool = False, keyword_hit_rate: bool = False,
                               keyword_top_k: int = 5) -> dict[str, dict[str, Any]]:
    """Recall of a checkpoint on several splits, plus the optional SpeechCLIP measures, loading it once.

    ``zero_shot_text`` adds ``results[split]["zero_shot_text"]`` (see :func:`evaluate_zero_shot_text`);
    ``keyword_hit_rate`` adds ``results[split]["keyword_hit_rate"]`` (see :func:`evaluate_keyword_hit_rate`,
    ``keyword_top_k`` neighbours). What the model and the transcripts must offer is checked before the
    (long) embedding passes: the model once, each split right after it is read.
    """
    model = load_model(checkpoint)
    if zero_shot_text:
        require_text_tower(model)
    if keyword_hit_rate:
        require_keyword_branch(model)
    results: dict[str, dict[str, Any]] = {}
    for split in splits:
        ds = make_dataset(manifest, split, model.image_transform, max_seconds=max_seconds, preload=True)
        where = f"{manifest} (split {split!r})"
        if zero_shot_text:
            caption_texts(ds, where)
        if keyword_hit_rate:
            _keyword_transcripts(ds, where)
        split_results = evaluate_model(model, ds, batch_size=batch_size, zero_shot_text=zero_shot_text)
        if keyword_hit_rate:
            split_results["keyword_hit_rate"] = evaluate_keyword_hit_rate(
                model, ds, top_k=keyword_top_k, batch_size=batch_size, source=where)
        results[split] = split_results
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
