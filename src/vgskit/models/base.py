"""The contract every retrieval model follows (contract v2).

A :class:`RetrievalModel` is an ``nn.Module`` built from one dataclass config (``config_class``). The generic
rooms — the trainer, the data pipeline, the evaluator and the search engine — talk to it only through the
typed values of :mod:`vgskit.contract` and the methods below, so a new model family is a package under
``vgskit/models/`` plus recipes and a registry entry, with no special case anywhere else.

What a model declares and offers:

* **inputs** — ``speech_input`` (``"waveform"`` or ``"features"``) and ``image_input`` (``"pixels"`` or
  ``"regions"``): the data pipeline builds batches of these kinds (:mod:`vgskit.data.loader`);
* **embeddings** — ``embed_speech(SpeechInputs) -> Embeddings`` and ``embed_image(ImageInputs) ->
  Embeddings``: a pooled vector per row for coarse search (dot products; unit vectors are the model's
  choice, not the contract's), plus optional token-level tensors for a fine scorer. Models whose inputs are
  waveforms and pixels usually implement only the tensor shortcuts ``encode_speech(wavs, lengths)`` and
  ``encode_image(pixels)``, which the default ``embed_*`` call;
* **fine scores** — ``score_pairs(speech_emb, image_emb) -> [P]`` for row-aligned pairs, when
  ``has_fine_scores`` is True (coarse-to-fine re-ranking in evaluation and search);
* **the training step** — ``step(batch, state) -> StepOutput``: named, already-weighted losses (the trainer
  sums them) and metrics to log, given the :class:`~vgskit.contract.TrainState` (step, epoch, fraction);
* **gradient caching (optional)** — ``embed_for_loss(batch) -> {name: [b, ...]}`` (per-row embeddings of any
  slice of a batch) and ``loss_from_embeddings(embeddings, batch, state) -> StepOutput`` (the step's losses from
  the embeddings of the whole batch), for a model whose ``step`` is exactly "embed every row, then a loss over
  the embeddings"; ``supports_grad_cache`` says whether they stand for ``step`` (see
  :mod:`vgskit.train.gradcache`, which ``train.grad_cache_chunk`` turns on);
* **optional hooks, with defaults** — ``param_groups`` (per-group weight decay and lr scale),
  ``after_step`` (EMA / momentum teachers, run after every optimizer update), ``ddp_options`` (e.g.
  unused parameters), ``frozen_towers``/``set_tower``/``feature_cache_options`` (what a frozen-feature
  cache stores and how it stands in for the towers), ``adapt_config_to_corpus`` (a config completed from the
  training data) and ``image_transform`` (the preprocessing its weights expect, saved with it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

from vgskit.contract import Batch, Embeddings, ImageInputs, SpeechInputs, StepOutput, TrainState
from vgskit.errors import ConfigError
from vgskit.losses import InfoNCELoss, unique_images


class RetrievalModel(nn.Module):
    """Base class of speech–image retrieval models.

    Class attributes:
        config_class: the dataclass type of ``config``.
        speech_input: the raw speech input the model reads (``"waveform"``, ``"features"``, or ``"text"``: the
            captions' transcripts, for text towers — the data pipeline then serves the manifest's ``text``).
        image_input: the raw image input the model reads (``"pixels"`` or ``"regions"``).
        has_fine_scores: whether :meth:`score_pairs` is implemented.
        trainable: False for a model with nothing to train (evaluated as built, e.g. a cascade of
            pretrained systems); the trainer refuses it and ``vgskit eval --model NAME`` evaluates it.
        tower_attributes: tower kind (``"speech"``, ``"image"``) → attribute holding that tower, for
            :meth:`set_tower`.

    Instance attributes:
        config: the model's dataclass config (everything needed to rebuild it).
        model_name: registry name the model was created under (set by :func:`vgskit.models.create_model`).
    """

    config_class: ClassVar[type]
    speech_input: ClassVar[Literal["waveform", "features", "text"]] = "waveform"
    image_input: ClassVar[Literal["pixels", "regions"]] = "pixels"
    has_fine_scores: ClassVar[bool] = False
    trainable: ClassVar[bool] = True
    tower_attributes: ClassVar[Mapping[str, str]] = {}
    sample_rate: int = 16000

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.model_name: str | None = None

    # ------------------------------------------------------------------------------------------ identity

    @property
    def embed_dim(self) -> int:
        """Dimension of the pooled (coarse) embeddings."""
        raise NotImplementedError

    @property
    def image_transform(self) -> dict[str, Any]:
        """Image preprocessing as a plain dict: ``size``, ``mean``, ``std``, ``resize_mode``, ``interpolation``."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- embeddings

    def encode_speech(self, wavs: Tensor, lengths: Tensor) -> Tensor:
        """Shortcut for waveform models: ``wavs [B, T]`` + ``lengths [B]`` samples → pooled ``[B, D]``."""
        raise NotImplementedError(f"{type(self).__name__} does not embed waveforms with encode_speech")

    def encode_image(self, pixels: Tensor) -> Tensor:
        """Shortcut for pixel models: ``pixels [B, 3, S, S]`` (normalised per ``image_transform``) → ``[B, D]``."""
        raise NotImplementedError(f"{type(self).__name__} does not embed pixels with encode_image")

    def embed_speech(self, speech: SpeechInputs) -> Embeddings:
        """Embeddings of a batch of speech inputs.

        The default serves waveforms through :meth:`encode_speech`, and cached tower states the same way:
        while a feature cache is in use the model's frozen speech tower is a reader that takes the cached
        states in place of waveforms (see :meth:`frozen_towers`).
        """
        if speech.kind == "waveform" or (speech.kind == "tower_states" and "speech" in self.frozen_towers()):
            return Embeddings(self.encode_speech(speech.values, speech.lengths))
        raise ConfigError(f"{type(self).__name__} reads {self.speech_input} speech inputs, got {speech.kind}")

    def embed_image(self, image: ImageInputs) -> Embeddings:
        """Embeddings of a batch of image inputs (default: pixels, or cached tower outputs, via ``encode_image``)."""
        if image.kind == "pixels" or (image.kind == "tower_outputs" and "image" in self.frozen_towers()):
            return Embeddings(self.encode_image(image.main))
        raise ConfigError(f"{type(self).__name__} reads {self.image_input} image inputs, got {image.kind}")

    def score_pairs(self, speech: Embeddings, image: Embeddings) -> Tensor:
        """Fine scores ``[P]`` of row-aligned pairs (``speech`` row p with ``image`` row p); higher = closer."""
        raise NotImplementedError(f"{type(self).__name__} has no fine cross-modal scorer")

    # ------------------------------------------------------------------------------------------ training

    def step(self, batch: Batch, state: TrainState) -> StepOutput:
        """One training step's named losses (already weighted) and metrics."""
        raise NotImplementedError(f"{type(self).__name__} has no training step")

    # ------------------------------------------------------------- gradient caching (optional, see gradcache)

    def embed_for_loss(self, batch: Batch) -> dict[str, Tensor]:
        """Per-row embeddings of ``batch`` (any slice of a training batch), by name: ``{"speech": [b, E], ...}``.

        Every value has one row per row of ``batch`` (first dimension ``b = len(batch)``), and a row may depend
        only on that row's inputs (BatchNorm in training mode aside, see :mod:`vgskit.train.gradcache`): the
        gradient cache embeds a batch in slices and concatenates them. Only models with
        :attr:`supports_grad_cache` implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement embed_for_loss (no gradient caching)")

    def loss_from_embeddings(self, embeddings: Mapping[str, Tensor], batch: Batch, state: TrainState) -> StepOutput:
        """The step's losses and metrics from :meth:`embed_for_loss`'s embeddings of the whole ``batch``.

        ``step(batch, state)`` must equal ``loss_from_embeddings(embed_for_loss(batch), batch, state)``; the
        loss may read the model's own parameters (a learnable temperature) and the batch's ids and extras, but
        not its inputs again.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement loss_from_embeddings "
                                  "(no gradient caching)")

    @property
    def supports_grad_cache(self) -> bool:
        """Whether :meth:`step` is :meth:`embed_for_loss` followed by :meth:`loss_from_embeddings`.

        True when the class implements both methods and does not override :meth:`step` below the class that
        implements them (a subclass with a step of its own, e.g. an extra loss branch, is not covered by its
        parent's methods). A model whose config makes its step not separable overrides this to say False.
        """
        return _grad_cache_problem(type(self)) is None

    def forward(self, batch: Batch, state: TrainState | None = None) -> StepOutput:
        # The trainer calls the module (so DDP's hooks run) and the module calls step().
        return self.step(batch, state if state is not None else TrainState())

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups: ``{"params", "weight_decay"?, "lr_scale"?}`` dicts.

        Default: weight decay on matrices and kernels, none on biases, norms and scalars
        (:func:`vgskit.train.optim.default_param_groups`).
        """
        from vgskit.train.optim import default_param_groups

        return default_param_groups(self, weight_decay)

    def after_step(self, state: TrainState) -> None:
        """Called after every optimizer update on the bare (unwrapped) model (EMA / momentum teachers).

        ``state.step`` counts the update just made. Default: nothing.
        """

    def ddp_options(self) -> dict[str, Any]:
        """Keyword arguments for ``DistributedDataParallel`` (e.g. ``find_unused_parameters=True`` for a model
        whose loss skips a branch at some steps). Default: none."""
        return {}

    # ----------------------------------------------------------------------------- frozen-feature caches

    def frozen_towers(self) -> dict[str, nn.Module]:
        """Frozen towers whose outputs may be precomputed, by kind (``"speech"``, ``"image"``).

        A listed speech tower is only called as ``tower(wavs, lengths)`` and only its output's
        ``hidden_states`` and ``lengths`` are read; a listed image tower is only called as ``tower(pixels)``
        and only the fields :meth:`feature_cache_options` names are read. Default: none.
        """
        return {}

    def feature_cache_options(self) -> dict[str, dict[str, Any]]:
        """What a cache of each frozen tower must store: ``{kind: {"pooled": bool}}``.

        Default: every hidden state of a speech tower, the pooled vector of an image tower.
        """
        return {kind: {"pooled": kind == "image"} for kind in self.frozen_towers()}

    def set_tower(self, kind: str, module: nn.Module) -> None:
        """Replace the tower of ``kind`` (e.g. by a cached-feature stand-in with the same call contract)."""
        attribute = self.tower_attributes.get(kind)
        if attribute is None:
            valid = sorted(self.tower_attributes)
            raise ConfigError(
                f"{type(self).__name__} has no replaceable {kind!r} tower"
                + (f"; valid kinds are {valid}" if valid else "")
            )
        setattr(self, attribute, module)

    def training_state(self) -> dict[str, Tensor]:
        """Tensors a training checkpoint must keep that the exported model leaves out (default: none).

        A module that exists only for training and is dropped from the saved model (CMD's fusion encoder) still
        has to survive an interrupted run: the trainer's checkpoints store these tensors in
        ``training_state.safetensors`` and give them back with :meth:`load_training_state` on resume, while
        ``save_pretrained`` and every model loader read ``model.safetensors`` only. Keys must not collide with
        :meth:`state_dict`'s.
        """
        return {}

    def load_training_state(self, tensors: Mapping[str, Tensor]) -> None:
        """Restore what :meth:`training_state` returned; the default refuses tensors it does not expect."""
        if tensors:
            raise KeyError(f"{type(self).__name__} keeps no training-only tensors, got {sorted(tensors)[:4]}")

    @classmethod
    def adapt_config_to_corpus(
        cls, config: dict[str, Any], train_texts: Sequence[str], *, model_name: str | None = None,
        corpus_texts: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Complete a config (registry overrides, as in a recipe's ``model`` section) from the training data.

        Args:
            config: config overrides; a ``"name"`` key, if present, is the registry name (kept as is).
            train_texts: transcripts of the training captions (only models that need them read them).
            model_name: registry name the overrides apply to (its preset supplies the other values).
            corpus_texts: transcripts of every caption of the manifest, all splits (``None`` when the caller has
                only the training split). Only for reproducing a reference that read them (SpeechCLIP builds its
                keyword vocabulary from all captions); a clean protocol uses ``train_texts``.

        Returns:
            The overrides to build the model with. Default: ``config`` unchanged.
        """
        return config


class InBatchSoftmaxStep:
    """The training step of a dual encoder with a bidirectional in-batch softmax (``self.loss``, an
    :class:`~vgskit.losses.InfoNCELoss`): embed the batch's speech (or text) inputs and its distinct images, each
    distinct image once, then the loss over them; one loss, ``infonce``, and the ``logit_scale`` metric.

    Mixed in before :class:`RetrievalModel` (``class M(InBatchSoftmaxStep, RetrievalModel)``). Written as the two
    gradient-cache methods, so that a grad-cached step (``train.grad_cache_chunk``) computes the same thing.
    """

    loss: InfoNCELoss

    def embed_for_loss(self, batch: Batch) -> dict[str, Tensor]:
        speech = self.embed_speech(batch.speech).pooled  # type: ignore[attr-defined]  # [B, E]
        first, target = unique_images(batch.image_ids)  # [M], [B]: each distinct image is encoded once
        image = self.embed_image(batch.image.select(first)).pooled[target]  # type: ignore[attr-defined]  # [B, E]
        return {"speech": speech, "image": image}

    def loss_from_embeddings(self, embeddings: Mapping[str, Tensor], batch: Batch, state: TrainState) -> StepOutput:
        loss = self.loss(embeddings["speech"], embeddings["image"], batch.image_ids)
        return StepOutput(losses={"infonce": loss}, metrics={"logit_scale": self.loss.scale().detach()})

    def step(self, batch: Batch, state: TrainState) -> StepOutput:
        return self.loss_from_embeddings(self.embed_for_loss(batch), batch, state)


def _defining_class(cls: type, name: str) -> type | None:
    """The first class of ``cls``'s MRO whose own namespace defines ``name``."""
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def _grad_cache_problem(cls: type) -> str | None:
    """Why ``cls``'s step cannot be gradient-cached (None when it can), in words for an error message."""
    own = [name for name in ("embed_for_loss", "loss_from_embeddings")
           if _defining_class(cls, name) in (None, RetrievalModel)]
    if own:
        return (f"its training step is not written as per-row embeddings followed by a loss over them "
                f"({cls.__name__} does not implement {' and '.join(own)})")
    step_owner = _defining_class(cls, "step")
    loss_owner = _defining_class(cls, "loss_from_embeddings")
    embed_owner = _defining_class(cls, "embed_for_loss")
    mro = cls.__mro__
    if step_owner is not None and any(mro.index(step_owner) < mro.index(o)  # type: ignore[arg-type]
                                      for o in (loss_owner, embed_owner)):
        return (f"{step_owner.__name__} overrides step() below {loss_owner.__name__}, whose "
                "embed_for_loss/loss_from_embeddings therefore do not describe it")
    return None


def grad_cache_problem(model: Any) -> str | None:
    """Why ``model`` cannot train with a gradient cache (``train.grad_cache_chunk``), or None when it can."""
    if not isinstance(model, RetrievalModel):
        return f"{type(model).__name__} is not a RetrievalModel (gradient caching needs embed_for_loss)"
    if model.supports_grad_cache:
        return None
    problem = _grad_cache_problem(type(model))
    return problem or (f"{type(model).__name__}.supports_grad_cache is False for this configuration (its step "
                       "is not separable into per-row embeddings and a loss over them)")


def image_transform_of(model: RetrievalModel) -> Any:
    """The :class:`vgskit.images.ImageTransform` described by ``model.image_transform``."""
    from vgskit.images import ImageTransform

    return ImageTransform.from_json(dict(model.image_transform))
