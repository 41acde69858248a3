"""Run any vgskit model in `mteb <https://github.com/embeddings-benchmark/mteb>`_ (audio ↔ image retrieval).

:class:`MtebModel` implements mteb's ``EncoderProtocol`` for the two modalities a vgskit model embeds, so mteb's
audio–image retrieval tasks run on it unchanged::

    import mteb
    from vgskit.integrations.mteb import as_mteb

    model = as_mteb("runs/demo")                       # a checkpoint folder, a Hub id, or a loaded model
    tasks = mteb.get_tasks(tasks=["SpokenCOCOA2IRetrieval", "SpokenCOCOI2ARetrieval"])
    results = mteb.evaluate(model, tasks=tasks, encode_kwargs={"batch_size": 32})

Needs the ``mteb`` extra (``pip install 'vgskit[mteb]'``); this module imports mteb only when a wrapper is
built, and says how to install it when it is missing.

**Inputs.** mteb hands ``encode`` a ``DataLoader`` whose batches are dicts of columns. A batch with an ``audio``
column is speech, one with an ``image`` column is images (a task's query and corpus sides each carry one
modality; a batch with both is refused, since a vgskit model has no fused audio+image embedding).

* an audio item is a ``{"array", "sampling_rate"}`` mapping (mteb's ``AudioInputItem``), a decoder with
  ``get_all_samples()`` (what ``datasets`` >= 4 decodes an ``Audio`` column to, through torchcodec), an
  undecoded ``{"bytes", "path"}`` mapping, a file path, or a bare array (taken to be at the model's rate).
  Multi-channel audio is averaged (channels first, as mteb and torchcodec lay them out, unless the first axis
  is the longer one); the mono signal passes :func:`vgskit.audio.validate_waveform` (integer PCM scaled to
  [-1, 1), NaN, unscaled or silent audio refused) and is resampled with :func:`vgskit.audio.resample` to the
  model's rate (16 kHz for every current family). Files go through :func:`vgskit.audio.load_audio`;
* an image item is a PIL image, an ``HxWx3`` (or ``HxW``) array, a ``3xHxW`` tensor (uint8, or float in
  [0, 1]), an undecoded ``{"bytes", "path"}`` mapping or a file path. It goes through the model's own
  ``image_transform`` (:class:`vgskit.images.ImageTransform`; transparency composited on white, as
  :func:`vgskit.images.load_image` does).

``encode`` returns the pooled embeddings (``Embeddings.pooled``) as a float32 numpy array, and ``similarity`` is
their dot product, exactly how vgskit scores coarse retrieval (:func:`vgskit.metrics.recall_at_k`). Some families
normalise their embeddings (then the dot product is the cosine), others do not; the dot product is right for
both, so :class:`ModelMeta` says ``similarity_fn_name="dot"``.

**Metric names.** mteb reports fractions in [0, 1] where vgskit reports percent, and its names differ from the
papers':

* ``hit_rate_at_k`` is the papers' R@K in both directions: the share of queries with at least one relevant item
  in the top K (vgskit's ``R@K`` / 100).
* ``recall_at_k`` is IR recall: the share of a query's relevant items that are in the top K, averaged over
  queries. For speech → image (``SpokenCOCOA2IRetrieval``) each caption has one relevant image, so it equals
  ``hit_rate_at_k``; for image → speech (``SpokenCOCOI2ARetrieval``) an image has about five captions and
  ``recall_at_k`` is lower than the papers' R@K. Compare image → speech numbers with ``hit_rate_at_k``.
* ties: vgskit ranks a relevant item below every distractor with an equal score; mteb (pytrec_eval) orders equal
  scores by document id. The two agree on tie-free scores (any trained model's).

**Offline use.** The SpokenCOCO tasks download their data from the Hugging Face Hub on first use. On a machine
without network, copy the Hugging Face cache of a connected machine (``HF_HOME``) and set ``HF_HUB_OFFLINE=1``
(``HF_DATASETS_OFFLINE=1`` for older ``datasets``); the audio columns of those tasks are decoded by ``datasets``,
which needs ``torchcodec``. mteb keeps results in ``~/.cache/mteb`` (``MTEB_CACHE``) and skips tasks whose
results are already there; pass ``cache=None`` to ``mteb.evaluate`` to always run. A task whose data is already in
memory (an ``AbsTaskRetrieval`` subclass whose ``load_data`` fills ``self.dataset`` and sets ``data_loaded``)
never touches the network; ``tests/test_mteb_integration.py`` builds one from a spoken-scenes corpus.

**Re-ranking.** For a model with a fine scorer (``has_fine_scores``: ``score_pairs``), :class:`MtebCrossEncoder`
implements mteb's ``CrossEncoderProtocol``. That protocol is modality-neutral: ``predict`` receives two
row-aligned ``DataLoader`` s, the queries' side and the candidates' side of each pair, so an audio–image pair is
simply an audio batch beside an image batch. mteb runs a cross-encoder only on a task with pre-ranked candidates:
evaluate the encoder with ``prediction_folder=...``, then ``task.convert_to_reranking(folder, top_k=100)`` and
evaluate the cross-encoder on that task. That is vgskit's coarse-to-fine protocol
(:func:`vgskit.retrieval.evaluate.evaluate_retrieval` with ``reranker=``, ``rerank_top=top_k``) with one
difference: mteb drops the candidates beyond ``top_k``, so only K <= ``top_k`` is comparable.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vgskit.contract import Embeddings, ImageInputs, SpeechInputs
from vgskit.errors import ConfigError

__all__ = [
    "INSTALL_HINT",
    "MtebCrossEncoder",
    "MtebModel",
    "as_mteb",
    "build_model_meta",
    "load_for_mteb",
]

#: What to run when mteb is missing.
INSTALL_HINT = "pip install 'vgskit[mteb]'"


def _require_mteb() -> Any:
    """The ``mteb`` module, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("mteb")
    except ImportError as err:
        raise ImportError(
            f"vgskit.integrations.mteb needs the mteb package, which is not installed: {INSTALL_HINT}"
        ) from err


def _display_name(model: Any) -> str:
    return str(getattr(model, "model_name", None) or type(model).__name__)


def _check_model(model: Any) -> None:
    """Refuse, before any data is read, a model whose inputs cannot be built from raw audio and images."""
    for method in ("embed_speech", "embed_image"):
        if not callable(getattr(model, method, None)):
            raise ConfigError(f"{type(model).__name__} is not a vgskit retrieval model (no {method} method)")
    speech_input = getattr(model, "speech_input", "waveform")
    image_input = getattr(model, "image_input", "pixels")
    if speech_input != "waveform":
        raise ConfigError(
            f"model {_display_name(model)!r} reads {speech_input} speech inputs; mteb hands over waveforms, "
            "which only models with speech_input='waveform' embed directly")
    if image_input != "pixels":
        raise ConfigError(
            f"model {_display_name(model)!r} reads {image_input} image inputs (detector region features); mteb "
            "hands over images, which only models with image_input='pixels' embed directly")


def build_model_meta(
    model: Any,
    *,
    name: str | None = None,
    revision: str | None = None,
    cross_encoder: bool = False,
    checkpoint: str | None = None,
    **overrides: Any,
) -> Any:
    """An ``mteb.ModelMeta`` describing ``model`` (a :class:`~vgskit.models.base.RetrievalModel`).

    Args:
        model: the vgskit model.
        name: ``"organization/model_name"`` (mteb's format; results are stored under it). Default:
            ``"vgskit/<registry name>"``.
        revision: the weights' revision (a Hub revision, a run or step name). Default: ``"local"``.
        cross_encoder: describe the fine scorer (``model_type=["cross-encoder"]``) instead of the encoder.
        checkpoint: where :func:`load_for_mteb` loads the weights from when mteb rebuilds the model from its
            metadata (``meta.load_model()``); default: ``name``, read as a Hub id.
        **overrides: any other ``ModelMeta`` field (``license``, ``open_weights``, ``languages``,
            ``training_datasets``, ``reference``, ``release_date``, ``public_training_code``, ...).

    Filled from the model: ``embed_dim``, ``n_parameters`` (distinct parameters, tied ones once),
    ``memory_usage_mb`` (parameters and buffers at their stored precision), ``modalities=["audio", "image"]``,
    ``similarity_fn_name="dot"`` and ``framework=["PyTorch", "safetensors"]``. Fields vgskit cannot know
    (license, training data, languages) default to "not specified" / unknown; set them for a published model.
    """
    _require_mteb()
    from mteb.models import ModelMeta

    params = list(model.parameters())
    n_parameters = sum(p.numel() for p in params)
    n_bytes = sum(p.numel() * p.element_size() for p in params)
    n_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    name = name or f"vgskit/{_display_name(model)}"
    fields: dict[str, Any] = {
        "loader": load_for_mteb,
        "loader_kwargs": {"checkpoint": checkpoint, "cross_encoder": cross_encoder} if checkpoint else
        {"cross_encoder": cross_encoder},
        "name": name,
        "revision": revision or "local",
        "release_date": None,
        "languages": None,
        "n_parameters": int(n_parameters),
        "memory_usage_mb": round(n_bytes / 2**20, 2),
        "max_tokens": None,
        "embed_dim": int(model.embed_dim),
        "license": "not specified",
        "open_weights": True,
        "public_training_code": None,
        "public_training_data": None,
        "framework": ["PyTorch", "safetensors"],
        "reference": None,
        "similarity_fn_name": "dot",
        "use_instructions": False,
        "training_datasets": None,
        "modalities": ["audio", "image"],
        "model_type": ["cross-encoder"] if cross_encoder else ["dense"],
    }
    fields.update(overrides)
    return ModelMeta(**fields)


# ------------------------------------------------------------------------------------------------- inputs


def _to_mono(x: np.ndarray) -> np.ndarray:
    """Average the channels of a ``[C, T]`` (or ``[T, C]``, when the first axis is the longer one) array."""
    if x.ndim == 2:
        if 1 in x.shape:
            return x.reshape(-1)
        axis = 0 if x.shape[0] <= x.shape[1] else 1
        if x.dtype.kind == "f":
            return x.astype(np.float32, copy=False).mean(axis=axis)
        # Integer PCM stays integer (rounded), so validate_waveform still knows its scale.
        return np.round(x.mean(axis=axis)).astype(x.dtype)
    return x


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        t = value.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return np.asarray(value)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _waveform(item: Any, sample_rate: int, where: str) -> np.ndarray:
    """One audio item (see the module docstring) as 1-D float32 mono at ``sample_rate`` Hz."""
    from vgskit.audio import load_audio, resample, validate_waveform

    if isinstance(item, (str, Path)):
        return load_audio(item, sample_rate=sample_rate, max_seconds=None)
    if hasattr(item, "get_all_samples"):  # a torchcodec AudioDecoder (datasets >= 4 decodes Audio columns so)
        samples = item.get_all_samples()
        raw, rate = _as_numpy(samples.data), _int_or_none(samples.sample_rate)
    elif isinstance(item, Mapping) and "array" in item:
        raw, rate = _as_numpy(item["array"]), _int_or_none(item.get("sampling_rate"))
    elif isinstance(item, Mapping) and ("bytes" in item or "path" in item):
        if item.get("bytes") is not None:
            raw, rate = _decode_audio_bytes(bytes(item["bytes"]), str(item.get("path") or where))
        elif item.get("path"):
            return load_audio(item["path"], sample_rate=sample_rate, max_seconds=None)
        else:
            raise ConfigError(f"{where}: audio item has neither bytes nor a path")
    else:
        raw, rate = _as_numpy(item), None
    mono = validate_waveform(_to_mono(raw), int(rate or sample_rate), source=where)
    return resample(mono, int(rate), sample_rate) if rate and int(rate) != sample_rate else mono


def _decode_audio_bytes(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """Decode an encoded audio file held in memory (any format libsndfile reads; lenient WAV otherwise)."""
    import soundfile as sf

    from vgskit.audio import read_wav_bytes_lenient

    try:
        wav, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # [T, C]
        return wav.T, int(rate)
    except (RuntimeError, sf.LibsndfileError):
        return read_wav_bytes_lenient(data, name=name)


def _pil_image(item: Any, where: str) -> Any:
    """One image item (see the module docstring) as a PIL image."""
    from PIL import Image

    from vgskit.images import load_image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (str, Path)):
        return load_image(item)
    if isinstance(item, Mapping) and ("bytes" in item or "path" in item):
        if item.get("bytes") is not None:
            img = Image.open(io.BytesIO(bytes(item["bytes"])))
            img.load()
            return img
        if item.get("path"):
            return load_image(item["path"])
        raise ConfigError(f"{where}: image item has neither bytes nor a path")
    arr = _as_numpy(item)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # [C, H, W] -> [H, W, C]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ConfigError(f"{where}: expected an HxW, HxWx3 or 3xHxW image array, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ConfigError(f"{where}: float image values must lie in [0, 1] (or pass uint8 pixels)")
        arr = np.round(arr * 255.0)
    elif arr.dtype != np.uint8 and (arr.min() < 0 or arr.max() > 255):
        raise ConfigError(f"{where}: integer image values must lie in [0, 255], got dtype {arr.dtype}")
    return Image.fromarray(arr.astype(np.uint8))


def _modality(batch: Mapping[str, Any]) -> str:
    has_audio, has_image = "audio" in batch, "image" in batch
    if has_audio and has_image:
        raise ConfigError("a batch holds both audio and images; a vgskit model embeds one modality per input "
                          "(it has no fused audio+image embedding)")
    if not (has_audio or has_image):
        raise ConfigError(f"a batch holds no audio or image column (columns: {sorted(batch)}); vgskit models "
                          "embed speech and images only")
    return "audio" if has_audio else "image"


# ------------------------------------------------------------------------------------------------ encoder


class MtebModel:
    """A vgskit model as an mteb encoder (``mteb.models.EncoderProtocol``), for audio and images.

    Args:
        model: a :class:`~vgskit.models.base.RetrievalModel` reading waveforms and pixels.
        name, revision: recorded in mteb's results (see :func:`build_model_meta`).
        device: move the model there (default: where it is).
        checkpoint: where the weights come from, for ``meta.load_model()``.
        **meta_overrides: other ``ModelMeta`` fields (``license``, ``languages``, ``training_datasets``, ...).

    The model is put in eval mode. See the module docstring for the inputs it reads and the metric names.
    """

    def __init__(self, model: Any, name: str | None = None, revision: str | None = None, *,
                 device: str | torch.device | None = None, checkpoint: str | None = None,
                 **meta_overrides: Any) -> None:
        _require_mteb()
        _check_model(model)
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.sample_rate = int(getattr(model, "sample_rate", 16000))
        from vgskit.models.base import image_transform_of

        self.image_transform = image_transform_of(model)
        self._meta_args: dict[str, Any] = {"name": name, "revision": revision, "checkpoint": checkpoint,
                                           **meta_overrides}
        self._meta: Any = None

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    @property
    def mteb_model_meta(self) -> Any:
        """The ``mteb.ModelMeta`` of this model (built once)."""
        if self._meta is None:
            self._meta = build_model_meta(self.model, **self._meta_args)
        return self._meta

    # -------------------------------------------------------------------------------------- embeddings

    @torch.no_grad()
    def embed_audio(self, items: Sequence[Any]) -> Embeddings:
        """:class:`~vgskit.contract.Embeddings` (float32, CPU) of audio items, one row each."""
        arrays = [_waveform(item, self.sample_rate, f"audio item {i}") for i, item in enumerate(items)]
        # Read-only arrays (e.g. from a dataset in numpy format) are copied: torch needs writable memory.
        wavs = [torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else np.array(a, dtype=np.float32))
                for a in arrays]
        values = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)  # [B, T]
        lengths = torch.tensor([len(w) for w in wavs], dtype=torch.long)
        speech = SpeechInputs.waveform(values, lengths, self.sample_rate).to_device(self.device)
        return self.model.embed_speech(speech).float_cpu()

    @torch.no_grad()
    def embed_images(self, items: Sequence[Any]) -> Embeddings:
        """:class:`~vgskit.contract.Embeddings` (float32, CPU) of image items, one row each."""
        pixels = torch.stack([self.image_transform(_pil_image(item, f"image item {i}"))
                              for i, item in enumerate(items)])  # [B, 3, S, S]
        return self.model.embed_image(ImageInputs.from_pixels(pixels).to_device(self.device)).float_cpu()

    def embed_batch(self, batch: Mapping[str, Any]) -> Embeddings:
        """Embeddings of one mteb batch (its ``audio`` or its ``image`` column)."""
        if _modality(batch) == "audio":
            return self.embed_audio(list(batch["audio"]))
        return self.embed_images(list(batch["image"]))

    # ------------------------------------------------------------------------------------ EncoderProtocol

    def encode(self, inputs: Iterable[Mapping[str, Any]], *, task_metadata: Any = None, hf_split: str | None = None,
               hf_subset: str | None = None, prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        """Pooled embeddings ``[N, D]`` (float32 numpy) of every row of ``inputs``, in order.

        ``task_metadata``, ``hf_split``, ``hf_subset`` and ``prompt_type`` are accepted and ignored: a vgskit
        model embeds a caption or an image the same way whatever the task, and has no prompts.
        """
        parts = [self.embed_batch(batch).pooled for batch in inputs]
        if not parts:
            return np.zeros((0, int(self.model.embed_dim)), dtype=np.float32)
        return torch.cat(parts).numpy()

    def similarity(self, embeddings1: Any, embeddings2: Any) -> Tensor:
        """Dot products ``[N1, N2]`` of two sets of pooled embeddings (how vgskit scores coarse retrieval)."""
        a, b = _as_matrix(embeddings1), _as_matrix(embeddings2)
        return a @ b.T

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> Tensor:
        """Dot products ``[N]`` of row-aligned pairs."""
        a, b = _as_matrix(embeddings1), _as_matrix(embeddings2)
        return (a * b).sum(dim=-1)

    def __repr__(self) -> str:
        return f"MtebModel({_display_name(self.model)!r}, embed_dim={int(self.model.embed_dim)})"


def _as_matrix(x: Any) -> Tensor:
    t = x.detach().cpu() if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))
    t = t.float() if not t.is_floating_point() or t.dtype == torch.bfloat16 or t.dtype == torch.float16 else t
    return t[None] if t.dim() == 1 else t


# ------------------------------------------------------------------------------------------ cross encoder


class MtebCrossEncoder:
    """The fine scorer of a vgskit model (``score_pairs``) as an mteb cross-encoder (``CrossEncoderProtocol``).

    ``predict(inputs1, inputs2)`` scores row-aligned pairs: row p of ``inputs1`` (the query, audio or image) with
    row p of ``inputs2`` (the candidate, the other modality). Each side is embedded with the model's
    ``embed_speech``/``embed_image`` (token-level features included) and the pair is scored with
    ``score_pairs(speech, image)``, whichever side is the query. A re-ranking task repeats every query once per
    candidate, so embeddings are kept per row ``id`` and each query is embedded once.

    Only for models with ``has_fine_scores``; see the module docstring for how mteb runs a cross-encoder.
    """

    def __init__(self, model: Any, name: str | None = None, revision: str | None = None, *,
                 device: str | torch.device | None = None, checkpoint: str | None = None,
                 **meta_overrides: Any) -> None:
        if not getattr(model, "has_fine_scores", False):
            raise ConfigError(f"model {_display_name(model)!r} has no fine scorer (score_pairs); use MtebModel")
        self.encoder = MtebModel(model, name, revision, device=device, checkpoint=checkpoint)
        self.model = self.encoder.model
        self._meta_args: dict[str, Any] = {"name": name, "revision": revision, "checkpoint": checkpoint,
                                           "cross_encoder": True, **meta_overrides}
        self._meta: Any = None

    @property
    def mteb_model_meta(self) -> Any:
        if self._meta is None:
            self._meta = build_model_meta(self.model, **self._meta_args)
        return self._meta

    def _embed(self, batch: Mapping[str, Any], cache: dict[tuple[str, Any], Embeddings]) -> Embeddings:
        ids = batch.get("id")
        kind = _modality(batch)
        if ids is None:
            return self.encoder.embed_batch(batch)
        keys = [(kind, i.item() if isinstance(i, Tensor) else i) for i in ids]
        todo = [row for row, key in enumerate(keys) if key not in cache]
        if todo:
            column = batch[kind]
            emb = self.encoder.embed_batch({kind: [column[row] for row in todo]})
            for j, row in enumerate(todo):
                cache[keys[row]] = emb.select([j])
        return Embeddings.cat([cache[key] for key in keys])

    @torch.no_grad()
    def predict(self, inputs1: Iterable[Mapping[str, Any]], inputs2: Iterable[Mapping[str, Any]], *,
                task_metadata: Any = None, hf_split: str | None = None, hf_subset: str | None = None,
                prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        """Fine scores ``[P]`` (float32 numpy) of the row-aligned pairs of ``inputs1`` and ``inputs2``."""
        cache: dict[tuple[str, Any], Embeddings] = {}
        device = self.encoder.device
        scores = []
        for b1, b2 in zip(inputs1, inputs2, strict=True):
            kind1, kind2 = _modality(b1), _modality(b2)
            if kind1 == kind2:
                raise ConfigError(f"a cross-encoder pair needs audio and an image, got {kind1} and {kind2}")
            e1, e2 = self._embed(b1, cache), self._embed(b2, cache)
            if len(e1) != len(e2):
                raise ConfigError(f"pair batches of different sizes: {len(e1)} and {len(e2)}")
            speech, image = (e1, e2) if kind1 == "audio" else (e2, e1)
            out = self.model.score_pairs(speech.to_device(device), image.to_device(device))
            scores.append(out.float().reshape(-1).cpu())
        return torch.cat(scores).numpy() if scores else np.zeros(0, dtype=np.float32)

    def __repr__(self) -> str:
        return f"MtebCrossEncoder({_display_name(self.model)!r})"


# ------------------------------------------------------------------------------------------- entry points


def as_mteb(model_or_checkpoint: Any, *, name: str | None = None, revision: str | None = None,
            cross_encoder: bool = False, device: str | torch.device | None = None,
            **meta_overrides: Any) -> MtebModel | MtebCrossEncoder:
    """Wrap a vgskit model, or load one and wrap it, for mteb.

    Args:
        model_or_checkpoint: a loaded model, or anything :func:`vgskit.experiment.load_model` reads (a checkpoint
            folder, a run folder, the demo's output folder, a Hub id ``owner/name[@revision]``).
        name: mteb's model name (``organization/model_name``). Default: a Hub id as given, else
            ``"vgskit/<registry name>"``.
        revision: default: a Hub id's ``@revision``, else ``"local"``.
        cross_encoder: return the fine scorer (:class:`MtebCrossEncoder`) instead of the encoder.
        device: where to run the model.
        **meta_overrides: other ``ModelMeta`` fields (see :func:`build_model_meta`).
    """
    _require_mteb()
    checkpoint: str | None = None
    if isinstance(model_or_checkpoint, (str, Path)):
        from vgskit.experiment import load_model
        from vgskit.hub import is_hub_id

        checkpoint = str(model_or_checkpoint)
        model = load_model(model_or_checkpoint)
        if is_hub_id(model_or_checkpoint):
            repo, _, rev = checkpoint.partition("@")
            name = name or repo
            revision = revision or (rev or None)
    else:
        model = model_or_checkpoint
    cls = MtebCrossEncoder if cross_encoder else MtebModel
    return cls(model, name, revision, device=device, checkpoint=checkpoint, **meta_overrides)


def load_for_mteb(model_name: str, revision: str | None = None, device: str | None = None, *,
                  checkpoint: str | None = None, cross_encoder: bool = False,
                  **kwargs: Any) -> MtebModel | MtebCrossEncoder:
    """``ModelMeta.loader`` of the wrappers: what ``meta.load_model()`` calls to rebuild the model.

    Loads ``checkpoint`` (the folder or Hub id the wrapper was built from), else ``model_name@revision`` from
    the Hub. ``kwargs`` are other ``ModelMeta`` fields.
    """
    source = checkpoint or (f"{model_name}@{revision}" if revision and revision != "local" else model_name)
    return as_mteb(source, name=model_name, revision=revision, cross_encoder=cross_encoder, device=device,
                   **kwargs)
