"""SpeechCLIP (Shih et al., SLT 2022): frozen HuBERT + frozen CLIP, aligned by small trainable speech branches.

The model is assembled from the blocks of :mod:`vgskit.models.speechclip.blocks` (checked against the
reference implementation; every name there is re-exported here):

* the speech tower's hidden states (transformer input + every layer) are combined by a softmax-weighted
  sum (:class:`~vgskit.encoders.pretrained_speech.WeightedLayerSum`, one set of weights shared by the
  branches; large models layer-norm each state first);
* **parallel** (SpeechCLIP-P): CLS + one transformer layer → CLIP's joint space, contrasted with CLIP's
  image embedding;
* **cascaded** (SpeechCLIP-C): ``K`` CLS tokens → keyword embeddings chosen from CLIP's (reduced) subword
  vocabulary → CLIP's frozen text tower as ``[SOT, kw_1..kw_K, EOT]`` → CLIP's joint space, contrasted with
  the same image embedding;
* **both**: one speech-tower pass feeds both branches and the two losses are added (weights
  ``parallel_loss_weight`` / ``cascaded_loss_weight``, 1 each). The paper trains each branch alone and
  names the combination as future work; the reference code's "integrated" configs add the objectives the
  same way. Coarse retrieval uses the parallel embedding (see :meth:`SpeechCLIP.encode_speech`).

Loss: :func:`~vgskit.models.speechclip.blocks.speechclip_loss` (scale ``1/0.07`` fixed for base, learnable
for large; other captions of the same image leave the denominators). The training step
(:meth:`SpeechCLIP.step`) returns one named, already-weighted loss per branch (``parallel``, ``cascaded``),
so the trainer logs each objective on its own and back-propagates their sum.

Towers and checkpoints. The towers are attributes with a narrow contract, so that a feature-cache stand-in
(:class:`vgskit.data.cache.CachedSpeechEncoder` / ``CachedImageEncoder``) can replace them
(:meth:`SpeechCLIP.set_tower`): the model only calls ``speech_tower(wavs, lengths)`` and reads
``.hidden_states`` / ``.lengths``, and ``image_tower(pixels)`` and reads ``.pooled``. While a cache is in
use, batches carry ``tower_states`` speech inputs and ``tower_outputs`` image inputs, which go through the
same two calls (the stand-ins read them). The cache keeps every hidden state of the speech tower (the layer
weights cover all of them) and the pooled image embedding: the defaults of
:meth:`~vgskit.models.base.RetrievalModel.feature_cache_options`. Frozen towers are *not* written to the
state dict: they are the pretrained weights named in the config, loaded again when the model is built. A checkpoint therefore holds only the trained parts (megabytes instead of gigabytes),
and it has the same keys whether training ran with the real towers or with cached features. Towers that
are trained (``freeze: false``) are saved as usual.

Keyword vocabulary. ``keyword_vocab`` lists the CLIP token ids keywords may be chosen from, in the
order of the vocabulary rows (``None``: CLIP's whole vocabulary). With ``vocab_from_captions: true`` it
is built from captions before the model is built (:meth:`SpeechCLIP.adapt_config_to_corpus`,
:func:`build_keyword_vocabulary`) and stored in the config, so a saved model rebuilds without the data;
the table itself is never saved (its rows are read from the text tower's token embedding). As in the
reference, the vocabulary includes id 0 (the original CLIP tokenizer pads with it) and the start/end of
text ids, and these rows are masked so a keyword can never be one of them. ``vocab_caption_splits`` says
which captions: ``"train"`` (default, a clean protocol: nothing of the evaluation splits is seen) or
``"all_splits"`` (train + dev + test, what the reference did: its 8,112 Flickr8k and 19,787 SpokenCOCO
subwords count every caption of the corpus, and its released checkpoints carry that vocabulary).

Released reference checkpoints. :func:`vgskit.models.speechclip.convert.load_reference_checkpoint`
(``vgskit convert speechclip``) maps the trained weights of the reference implementation's Lightning
checkpoints onto this model: branch, layer weights and temperature keys are renamed
(:func:`convert_speechclip_state_dict`), the frozen towers are dropped (ours load from the hub), and the
stored keyword table is matched row by row against the text tower's token embedding, which recovers the
keyword vocabulary's token ids.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgskit.contract import Batch, ImageInputs, SpeechInputs, StepOutput, TrainState
from vgskit.encoders.pretrained_image import PretrainedImageConfig, PretrainedImageEncoder
from vgskit.encoders.pretrained_speech import (
    PretrainedSpeechConfig,
    PretrainedSpeechEncoder,
    WeightedLayerSum,
)
from vgskit.encoders.text import ClipTextConfig, ClipTextEncoder, load_clip_tokenizer
from vgskit.errors import ConfigError, VGSKitError
from vgskit.losses import unique_images
from vgskit.models.base import RetrievalModel
from vgskit.models.registry import register_model
from vgskit.models.speechclip.blocks import (
    AttentionAndNorm,
    CascadedBranch,
    CascadedBranchConfig,
    CascadedBranchOutput,
    CosineVectorQuantizer,
    KeywordBatchNorm,
    KeywordProjection,
    ParallelBranch,
    ParallelBranchConfig,
    QuantizerOutput,
    SpeechClipWarmupDecay,
    convert_speechclip_state_dict,
    cosine_scores,
    encode_keywords,
    key_padding_mask,
    speechclip_loss,
)

BRANCHES = ("parallel", "cascaded", "both")
BranchSet = Literal["parallel", "cascaded", "both"]
#: The id the original CLIP tokenizer pads with ("!"); the reference counts and masks it as padding.
CLIP_PAD_ID = 0


# ---------------------------------------------------------------------------------------------------------
# Keyword vocabulary
# ---------------------------------------------------------------------------------------------------------


@dataclass
class KeywordAttention:
    """What :meth:`SpeechCLIP.keyword_attention` returns.

    Attributes:
        weights: ``[B, K, T']`` attention of each keyword slot over the frames (0 on padding).
        lengths: ``[B]`` frames of each utterance.
        frame_rate: frames per second (frame ``t`` covers ``[t, t + 1) / frame_rate`` seconds).
    """

    weights: Tensor
    lengths: Tensor
    frame_rate: float


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids a keyword must never be: CLIP's padding id 0 and the tokenizer's start/end/pad tokens."""
    ids = {CLIP_PAD_ID}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(int(value))
    return ids


def build_keyword_vocabulary(tokenizer: Any, texts: Iterable[str], *, batch_size: int = 2048) -> list[int]:
    """Sorted CLIP token ids occurring in ``texts``, plus the special ids (see :func:`special_token_ids`).

    The special ids are included (and masked by the model) as in the reference, whose vocabulary comes from
    padded ``[SOT, ..., EOT, 0, 0, ...]`` token sequences. Which captions go in is the caller's choice (see
    :func:`keyword_vocab_texts`): the reference's 8,112 ids for Flickr8k come from all of its captions (train,
    dev and test), not from the training split alone. Captions are not truncated to CLIP's 77 positions:
    every subword that is spoken may be a keyword.

    Args:
        tokenizer: a transformers CLIP tokenizer (anything callable like one, with ``bos_token_id`` etc.).
        texts: caption transcripts; empty ones are skipped.
        batch_size: captions tokenized per call.
    """
    ids: set[int] = set()
    batch: list[str] = []

    def flush() -> None:
        if batch:
            for row in tokenizer(batch, add_special_tokens=True, verbose=False)["input_ids"]:
                ids.update(int(i) for i in row)
            batch.clear()

    for text in texts:
        if text:
            batch.append(str(text))
            if len(batch) >= batch_size:
                flush()
    flush()
    return sorted(ids | special_token_ids(tokenizer))


#: Values of ``SpeechCLIPConfig.vocab_caption_splits``: the captions the keyword vocabulary is built from.
VOCAB_CAPTION_SPLITS = ("train", "all_splits")


def keyword_vocab_texts(records: Iterable[Any], source: str = "train", *, train_split: str = "train") -> list[str]:
    """The transcripts a keyword vocabulary is built from: the training split's, or every split's.

    ``"train"`` keeps the evaluation captions out of the model (a keyword can only be a subword heard in
    training); ``"all_splits"`` is the reference's choice (its counts, 8,112 for Flickr8k and 19,787 for
    SpokenCOCO, and its released checkpoints' vocabularies include the dev and test captions' subwords).

    Args:
        records: manifest records (anything with ``split`` and ``text`` attributes).
        source: ``"train"`` or ``"all_splits"`` (see :data:`VOCAB_CAPTION_SPLITS`).
        train_split: the split name of the training captions.
    """
    if source not in VOCAB_CAPTION_SPLITS:
        raise ConfigError(f"vocab_caption_splits must be one of {VOCAB_CAPTION_SPLITS}, got {source!r}")
    return [str(r.text) for r in records if r.text and (source == "all_splits" or r.split == train_split)]


def clip_sot_eot_ids(text: ClipTextEncoder) -> tuple[int, int]:
    """Start- and end-of-text ids of a CLIP text tower (the last two ids when it has no tokenizer files)."""
    tok = text.tokenizer
    if tok is not None and tok.bos_token_id is not None and tok.eos_token_id is not None:
        return int(tok.bos_token_id), int(tok.eos_token_id)
    # CLIP's BPE vocabulary ends with <|startoftext|>, <|endoftext|> (old configs store wrong ids).
    n = int(text.token_embedding.num_embeddings)
    return n - 2, n - 1


class KeywordVocabulary(nn.Module):
    """Rows ``ids`` of a token-embedding table, as the table keywords are chosen from.

    The rows are read from the table on every access (``weight``), so nothing is copied or saved, and the
    ids live in a non-persistent buffer (they come from the config). The table is shared, not registered.

    Args:
        table: the text tower's token embedding.
        ids: token ids of the vocabulary rows, in row order; ``None`` for the whole table.
    """

    def __init__(self, table: nn.Embedding, ids: Sequence[int] | None):
        super().__init__()
        self._table = (table,)
        n = int(table.num_embeddings)
        ids = list(range(n)) if ids is None else [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ConfigError(f"keyword_vocab: ids {bad[:5]} are outside the text tower's {n}-token vocabulary")
        self.full = len(ids) == n and ids == list(range(n))
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self._row_of = {token: row for row, token in enumerate(ids)}

    def __len__(self) -> int:
        return int(self.ids.numel())

    @property
    def weight(self) -> Tensor:
        """``[V, D]`` embeddings of the vocabulary rows."""
        table = self._table[0].weight
        return table if self.full else table[self.ids]

    def rows_of(self, token_ids: Iterable[int]) -> tuple[int, ...]:
        """Sorted row indices of those ``token_ids`` that are in the vocabulary."""
        return tuple(sorted(self._row_of[int(t)] for t in set(token_ids) if int(t) in self._row_of))


# ---------------------------------------------------------------------------------------------------------
# Speech tower variant
# ---------------------------------------------------------------------------------------------------------


def _skip_module(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
    # forward hook: the module's input replaces its output.
    return inputs[0]


class RawLastStateSpeechEncoder(PretrainedSpeechEncoder):
    """A :class:`PretrainedSpeechEncoder` whose last hidden state is the last layer's raw output.

    Pre-norm towers (HuBERT large: ``do_stable_layer_norm``) end with a LayerNorm that transformers applies to
    the last hidden state; the reference sums the states of fairseq's HuBERT without it. The weights stay in
    place (the LayerNorm is skipped during the forward only), so checkpoints and state dicts are unchanged; the
    class name differs, so feature caches of the two variants do not mix. Post-norm towers have no such
    final LayerNorm: they give the same states as the parent class.
    """

    def forward(self, wavs: Tensor, lengths: Tensor) -> Any:
        if not self.stable_layer_norm:
            return super().forward(wavs, lengths)
        handle = self.model.encoder.layer_norm.register_forward_hook(_skip_module)
        try:
            return super().forward(wavs, lengths)
        finally:
            handle.remove()


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


def _nested(cls: type, value: Any, where: str) -> Any:
    # Configs read back from JSON (or given in a recipe) arrive as plain dicts.
    if isinstance(value, Mapping):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"SpeechCLIPConfig.{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
        return cls(**value)
    if not isinstance(value, cls):
        raise ConfigError(f"SpeechCLIPConfig.{where}: expected a mapping or {cls.__name__}, got {type(value).__name__}")
    return value


def _check(ok: bool, where: str, problem: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"SpeechCLIPConfig.{where} {problem}, got {value!r}")


def _base_speech() -> PretrainedSpeechConfig:
    # Fairseq's HuBERT base was trained on raw waveforms (the large model on normalised ones).
    return PretrainedSpeechConfig("hubert-base", freeze=True, normalize_waveform=False)


@dataclass
class SpeechCLIPConfig:
    """Configuration of :class:`SpeechCLIP` (defaults: the base size, parallel branch).

    Attributes:
        speech: the speech tower (HuBERT; frozen in the paper).
        image: CLIP's vision tower; its projected pooled embedding is the target space (frozen).
        text: CLIP's text tower (same checkpoint as ``image``): needed by the cascaded branch and for
            zero-shot speech–text retrieval; ``None`` only for a parallel-only model that needs neither.
        branches: ``"parallel"``, ``"cascaded"`` or ``"both"``.
        parallel: parallel branch. Its ``audio_dim`` and ``out_dim`` are set from the towers when the model
            is built (values given here are replaced).
        cascaded: cascaded branch. ``audio_dim``, ``text_dim``, ``vocab_size`` and ``masked_ids`` are set
            from the towers and the keyword vocabulary when the model is built.
        layer_norm_states: layer-norm each hidden state (no affine) before the weighted sum (large models).
        init_temperature: initial loss temperature (0.07).
        learnable_temperature: learn the temperature (large models) or keep it fixed (base models).
        parallel_loss_weight, cascaded_loss_weight: weights of the branch losses when both are trained.
        retrieval_branch: which branch's embedding :meth:`SpeechCLIP.encode_speech` returns; ``None``: the
            parallel one when the model has it, else the cascaded one.
        keyword_vocab: CLIP token ids keywords are chosen from (row order); ``None`` or empty: the whole
            CLIP vocabulary, unless ``vocab_from_captions`` asks for it to be built.
        vocab_from_captions: build ``keyword_vocab`` from captions (:meth:`SpeechCLIP.adapt_config_to_corpus`)
            before the model is built.
        vocab_caption_splits: which captions ``vocab_from_captions`` reads: ``"train"`` (the training split; a
            clean protocol) or ``"all_splits"`` (train, dev and test, as the reference did: needed to reproduce
            its vocabulary sizes and the vocabularies of its released checkpoints).
        raw_last_hidden_state: sum the last layer's raw output as the speech tower's last hidden state, as the
            reference does (its fairseq HuBERT-Large states are collected before the encoder's final
            LayerNorm). Default: the state after that LayerNorm, as transformers' ``output_hidden_states``
            gives it. Only pre-norm towers (HuBERT large) have that final norm; for post-norm ones (HuBERT
            base) the option changes nothing. See :class:`RawLastStateSpeechEncoder`.
        frozen_speech_dropout: keep the frozen speech tower's dropout active while the model trains, as the
            reference does (Lightning's train mode reaches its frozen HuBERT, so HuBERT base's dropouts, 0.1,
            are on during training). Default: a frozen tower always runs in eval mode, so its features are
            deterministic (and can be cached: with this option the speech tower is not offered to a feature
            cache, which would freeze one dropout draw). Evaluation is unaffected (eval mode).
        reference_init_order: draw the branches' random initial values in the reference's order: the cascaded
            branch before the parallel one, and within the parallel branch the transformer before the CLS
            token (:class:`ParallelBranch`). Default: parallel first, CLS first. Only a seeded build's values
            differ (the distributions are the same); the frozen towers' construction is not covered.
        decay_all_parameters: apply the weight decay to every trainable parameter (one optimizer group), as
            the reference does (it hands all its parameters to ``torch.optim.Adam`` with ``weight_decay``).
            Default: the usual groups, without decay on parameters of ``ndim < 2`` (biases, norm and
            BatchNorm scales, the layer weights, the temperature; :func:`vgskit.train.optim.default_param_groups`).
    """

    speech: PretrainedSpeechConfig = field(default_factory=_base_speech)
    image: PretrainedImageConfig = field(default_factory=lambda: PretrainedImageConfig("clip-vit-b32"))
    text: ClipTextConfig | None = field(default_factory=lambda: ClipTextConfig("clip-vit-b32"))
    branches: BranchSet = "parallel"
    parallel: ParallelBranchConfig = field(default_factory=ParallelBranchConfig)
    cascaded: CascadedBranchConfig = field(default_factory=CascadedBranchConfig)
    layer_norm_states: bool = False
    init_temperature: float = 0.07
    learnable_temperature: bool = False
    parallel_loss_weight: float = 1.0
    cascaded_loss_weight: float = 1.0
    retrieval_branch: Literal["parallel", "cascaded"] | None = None
    keyword_vocab: list[int] | None = None
    vocab_from_captions: bool = False
    vocab_caption_splits: Literal["train", "all_splits"] = "train"
    raw_last_hidden_state: bool = False
    frozen_speech_dropout: bool = False
    reference_init_order: bool = False
    decay_all_parameters: bool = False

    def __post_init__(self) -> None:
        self.speech = _nested(PretrainedSpeechConfig, self.speech, "speech")
        self.image = _nested(PretrainedImageConfig, self.image, "image")
        if self.text is not None:
            self.text = _nested(ClipTextConfig, self.text, "text")
        self.parallel = _nested(ParallelBranchConfig, self.parallel, "parallel")
        self.cascaded = _nested(CascadedBranchConfig, self.cascaded, "cascaded")
        self.cascaded.masked_ids = tuple(int(i) for i in self.cascaded.masked_ids)
        hidden = self.cascaded.projection_hidden_dims
        _check(isinstance(hidden, list | tuple) and all(isinstance(h, int) and not isinstance(h, bool) and h >= 1
                                                        for h in hidden),
               "cascaded.projection_hidden_dims", "must be a list of widths (integers >= 1)", hidden)
        self.cascaded.projection_hidden_dims = tuple(int(h) for h in hidden)

        _check(self.branches in BRANCHES, "branches", f"must be one of {BRANCHES}", self.branches)
        _check(self.text is not None or self.branches == "parallel", "text",
               "is required by the cascaded branch (CLIP's text tower)", self.text)
        _check(self.retrieval_branch in (None, *self.branch_names), "retrieval_branch",
               f"must be null or one of the model's branches {self.branch_names}", self.retrieval_branch)
        _check(self.init_temperature > 0, "init_temperature", "must be > 0", self.init_temperature)
        _check(self.vocab_caption_splits in VOCAB_CAPTION_SPLITS, "vocab_caption_splits",
               f"must be one of {VOCAB_CAPTION_SPLITS}", self.vocab_caption_splits)
        for name in ("parallel_loss_weight", "cascaded_loss_weight"):
            _check(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        _check(sum(getattr(self, f"{b}_loss_weight") for b in self.branch_names) > 0,
               f"{self.branch_names[0]}_loss_weight", "must leave a positive total loss weight",
               getattr(self, f"{self.branch_names[0]}_loss_weight"))

        p, c = self.parallel, self.cascaded
        _check(p.num_layers >= 1, "parallel.num_layers", "must be >= 1", p.num_layers)
        _check(p.num_heads >= 1, "parallel.num_heads", "must be >= 1", p.num_heads)
        _check(p.ffn_dim >= 1, "parallel.ffn_dim", "must be >= 1", p.ffn_dim)
        _check(0 <= p.dropout < 1, "parallel.dropout", "must be in [0, 1)", p.dropout)
        _check(c.num_keywords >= 1, "cascaded.num_keywords", "must be >= 1", c.num_keywords)
        _check(c.num_heads >= 1, "cascaded.num_heads", "must be >= 1", c.num_heads)
        _check(0 <= c.dropout < 1, "cascaded.dropout", "must be in [0, 1)", c.dropout)
        _check(c.vq_temperature > 0, "cascaded.vq_temperature", "must be > 0", c.vq_temperature)
        _check(c.bn_std_scale > 0, "cascaded.bn_std_scale", "must be > 0", c.bn_std_scale)
        _check(0 <= c.projection_dropout < 1, "cascaded.projection_dropout", "must be in [0, 1)",
               c.projection_dropout)

        if self.keyword_vocab is not None:
            vocab = list(self.keyword_vocab) if isinstance(self.keyword_vocab, list | tuple) else None
            _check(vocab is not None and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                             for i in vocab),
                   "keyword_vocab", "must be a list of token ids (integers >= 0) or null", self.keyword_vocab)
            assert vocab is not None
            _check(len(set(vocab)) == len(vocab), "keyword_vocab", "must not repeat ids",
                   sorted(i for i in set(vocab) if vocab.count(i) > 1)[:5])
            self.keyword_vocab = vocab or None

    @property
    def branch_names(self) -> tuple[str, ...]:
        """The branches the model has, in a fixed order."""
        return ("parallel", "cascaded") if self.branches == "both" else (self.branches,)


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------


def _drop_unsaved_towers(module: SpeechCLIP, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    # state_dict post-hook: frozen pretrained towers are rebuilt from their source, not saved.
    for attribute in module.unsaved_towers():
        head = f"{prefix}{attribute}."
        for key in [k for k in state_dict if k.startswith(head)]:
            del state_dict[key]


def _keep_unsaved_towers(module: SpeechCLIP, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # load_state_dict pre-hook: unsaved towers keep their current weights (a checkpoint that does hold them,
    # e.g. one saved before they were frozen, still loads them).
    for attribute in module.unsaved_towers():
        for key, value in getattr(module, attribute).state_dict().items():
            state_dict.setdefault(f"{prefix}{attribute}.{key}", value)


class SpeechCLIP(RetrievalModel):
    """SpeechCLIP with a parallel branch, a cascaded branch, or both (see the module docstring).

    :meth:`step` reads the batch's speech (waveforms, or cached tower states) and images (pixels, or cached
    tower outputs; captions of the same image share an id and each distinct image is encoded once) and
    returns one weighted contrastive loss per branch (``parallel``, ``cascaded``) and the metrics
    ``logit_scale``, ``temperature`` and, with the cascaded branch, ``vq_perplexity`` (of the chosen
    keywords over the batch).

    Attributes:
        speech_tower, image_tower, text_tower: the towers (``text_tower`` is ``None`` without a text config).
        layer_sum: the weighted sum of the speech tower's hidden states.
        parallel, cascaded: the branches (``None`` when absent).
        keyword_vocabulary: the table keywords are chosen from (``None`` without the cascaded branch).
        loss: the contrastive loss (holds the temperature).
    """

    config_class = SpeechCLIPConfig
    tower_attributes: ClassVar[Mapping[str, str]] = {"speech": "speech_tower", "image": "image_tower"}

    def __init__(self, config: SpeechCLIPConfig | None = None):
        # A copy: the derived branch sizes are written into it, and the caller's config stays as given.
        config = copy.deepcopy(config) if config is not None else SpeechCLIPConfig()
        if "cascaded" in config.branch_names and config.vocab_from_captions and not config.keyword_vocab:
            raise ConfigError(
                "SpeechCLIPConfig.keyword_vocab is empty but vocab_from_captions is set: build it from the "
                "training captions with SpeechCLIP.adapt_config_to_corpus(config, texts) (vgskit train does) "
                "or give the token ids"
            )
        super().__init__(config)
        self.config: SpeechCLIPConfig = config
        speech_class = RawLastStateSpeechEncoder if config.raw_last_hidden_state else PretrainedSpeechEncoder
        self.speech_tower: nn.Module = speech_class(config.speech)
        self.image_tower: nn.Module = PretrainedImageEncoder(config.image)
        self.text_tower: ClipTextEncoder | None = ClipTextEncoder(config.text) if config.text is not None else None
        self.sample_rate = self.speech_tower.preprocessing.sample_rate
        # Kept from the real towers so that stand-ins (which have no such attributes) can replace them.
        self._image_transform = self.image_tower.transform.to_json()
        self._embed_dim = int(self.image_tower.width)
        audio_dim = int(self.speech_tower.width)
        self.layer_sum = WeightedLayerSum(self.speech_tower.num_hidden_states, layer_norm=config.layer_norm_states)

        self.parallel: ParallelBranch | None = None
        self.keyword_vocabulary: KeywordVocabulary | None = None
        self.cascaded: CascadedBranch | None = None
        self._sot_id = self._eot_id = -1
        # The reference builds its cascaded branch first (it matters only for seeded initial values).
        order = ("cascaded", "parallel") if config.reference_init_order else ("parallel", "cascaded")
        for name in order:
            if name not in config.branch_names:
                continue
            if name == "cascaded":
                self._build_cascaded(audio_dim)
                continue
            _check(audio_dim % config.parallel.num_heads == 0, "parallel.num_heads",
                   f"must divide the speech tower's width {audio_dim}", config.parallel.num_heads)
            config.parallel = replace(config.parallel, audio_dim=audio_dim, out_dim=self._embed_dim)
            self.parallel = ParallelBranch(config.parallel, reference_init_order=config.reference_init_order)

        self.loss = speechclip_loss(config.learnable_temperature, config.init_temperature)
        post_hook = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        post_hook(_drop_unsaved_towers)
        if hasattr(self, "register_load_state_dict_pre_hook"):
            self.register_load_state_dict_pre_hook(_keep_unsaved_towers)
        else:  # torch < 2.1
            self._register_load_state_dict_pre_hook(_keep_unsaved_towers, with_module=True)
        if self._speech_dropout():
            self.train(self.training)  # the tower put itself in eval mode; the option keeps its dropout on

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups: the default ones, or one group decaying every parameter (``decay_all_parameters``)."""
        if not self.config.decay_all_parameters:
            return super().param_groups(weight_decay)
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}] if params else []

    def _speech_dropout(self) -> bool:
        return self.config.frozen_speech_dropout and self.config.speech.freeze

    def train(self, mode: bool = True) -> SpeechCLIP:
        """Switch modes; with ``frozen_speech_dropout`` the frozen speech tower trains along (dropout on)."""
        super().train(mode)
        if mode and self._speech_dropout():
            # Bypass the tower's own train(), which keeps a frozen tower in eval mode.
            nn.Module.train(self.speech_tower, True)
        return self

    def _build_cascaded(self, audio_dim: int) -> None:
        config, text = self.config, self.text_tower
        assert text is not None  # checked by the config
        if text.width != self._embed_dim:
            raise ConfigError(
                f"SpeechCLIPConfig.text: the text tower's embeddings have {text.width} dims, the image tower's "
                f"{self._embed_dim} (use the text and vision towers of one CLIP checkpoint)"
            )
        k = config.cascaded.num_keywords
        _check(k + 2 <= text.max_length, "cascaded.num_keywords",
               f"leaves no room for SOT/EOT in CLIP's {text.max_length} positions", k)
        _check(audio_dim % config.cascaded.num_heads == 0, "cascaded.num_heads",
               f"must divide the speech tower's width {audio_dim}", config.cascaded.num_heads)
        self._sot_id, self._eot_id = clip_sot_eot_ids(text)
        vocab = KeywordVocabulary(text.token_embedding, config.keyword_vocab)
        excluded = {CLIP_PAD_ID, self._sot_id, self._eot_id}
        if text.tokenizer is not None:
            excluded |= special_token_ids(text.tokenizer)
        masked = vocab.rows_of(excluded)
        if len(masked) >= len(vocab):
            raise ConfigError("SpeechCLIPConfig.keyword_vocab holds only special tokens (padding, SOT, EOT)")
        config.cascaded = replace(config.cascaded, audio_dim=audio_dim, text_dim=text.token_width,
                                  vocab_size=len(vocab), masked_ids=masked)
        self.keyword_vocabulary = vocab
        self.cascaded = CascadedBranch(config.cascaded, token_embedding=vocab)  # type: ignore[arg-type]

    # ----------------------------------------------------------------------------------------- towers

    def unsaved_towers(self) -> list[str]:
        """Attributes of the frozen towers, which the state dict leaves out (see the module docstring)."""
        names = []
        if self.config.speech.freeze:
            names.append("speech_tower")
        if self.config.image.freeze:
            names.append("image_tower")
        if self.config.text is not None and self.config.text.freeze:
            names.append("text_tower")
        return names

    def frozen_towers(self) -> dict[str, nn.Module]:
        """``{"speech": ..., "image": ...}`` for the towers that are frozen (their outputs may be cached).

        A cache keeps every hidden state of the speech tower (the layer weights cover all of them) and the
        image tower's pooled embedding: what the default :meth:`feature_cache_options` asks for. With
        ``frozen_speech_dropout`` the speech tower's training outputs are random, so it is not listed.
        """
        towers: dict[str, nn.Module] = {}
        if self.config.speech.freeze and not self._speech_dropout():  # dropout: no fixed features to cache
            towers["speech"] = self.speech_tower
        if self.config.image.freeze:
            towers["image"] = self.image_tower
        return towers

    # ----------------------------------------------------------------------------------------- basics

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def image_transform(self) -> dict[str, Any]:
        # CLIP's own preprocessing (resize the shorter side, centre crop, CLIP statistics).
        return dict(self._image_transform)

    @property
    def branch_names(self) -> tuple[str, ...]:
        """The model's branches: ``("parallel",)``, ``("cascaded",)`` or ``("parallel", "cascaded")``."""
        return self.config.branch_names

    @property
    def retrieval_branch(self) -> str:
        """The branch whose embedding :meth:`encode_speech` returns by default."""
        return self.config.retrieval_branch or self.branch_names[0]

    def _branch(self, branch: str | None) -> str:
        name = branch or self.retrieval_branch
        if name not in self.branch_names:
            raise ConfigError(f"branch {name!r}: this model has {list(self.branch_names)}")
        return name

    def layer_weights(self) -> dict[str, Tensor]:
        """Softmax-normalised weights ``[L]`` over the speech tower's hidden states, per branch (CPU, float32).

        The branches share one weighted sum, so with both branches the two entries are equal. Index 0 is
        the transformer input (CNN features after the projection and positional convolution), index ``l``
        the output of layer ``l``.
        """
        weights = torch.softmax(self.layer_sum.weights.detach().float(), dim=0).cpu()
        return {name: weights.clone() for name in self.branch_names}

    # ----------------------------------------------------------------------------------------- encoders

    def speech_features(self, wavs: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Weighted sum of the speech tower's hidden states ``[B, T', D]`` and frame lengths ``[B]``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.speech.freeze):
            out = self.speech_tower(wavs, lengths)
        states = out.hidden_states
        if states is None or len(states) != self.layer_sum.num_layers:
            got = "no hidden states" if states is None else f"{len(states)} hidden states"
            raise ConfigError(
                f"the speech tower gave {got}; the layer weights expect {self.layer_sum.num_layers} "
                "(a feature cache must keep every hidden state)"
            )
        return self.layer_sum(states), out.lengths  # [B, T', D], [B]

    def _image_embeddings(self, pixels: Tensor) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.image.freeze):
            pooled = self.image_tower(pixels).pooled  # [B, P]
        return F.normalize(pooled, dim=-1)

    def _cascaded(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, CascadedBranchOutput]:
        assert self.cascaded is not None and self.text_tower is not None
        out = self.cascaded(feats, lengths)
        emb = encode_keywords(self.text_tower, out.keywords, self._sot_id, self._eot_id)  # [B, P]
        return F.normalize(emb, dim=-1), out

    def _branch_embedding(self, name: str, feats: Tensor, lengths: Tensor) -> Tensor:
        if name == "parallel":
            assert self.parallel is not None
            return F.normalize(self.parallel(feats, lengths), dim=-1)  # [B, P]
        return self._cascaded(feats, lengths)[0]

    def encode_speech(self, wavs: Tensor, lengths: Tensor, branch: str | None = None) -> Tensor:
        """L2-normalised speech embeddings ``[B, P]`` in CLIP's joint space.

        Coarse retrieval uses :attr:`retrieval_branch`: the **parallel** embedding whenever the model has the
        parallel branch (including ``branches="both"``: the keyword bottleneck loses information, and the
        paper's cascaded models retrieve far worse, e.g. speech → image R@1 8.2 vs 26.7 on Flickr8k), else
        the cascaded one. ``branch`` picks the other one; :meth:`speech_embeddings` returns every branch's
        embedding from one pass of the speech tower.
        """
        name = self._branch(branch)
        feats, frame_lengths = self.speech_features(wavs, lengths)
        return self._branch_embedding(name, feats, frame_lengths)

    def speech_embeddings(self, wavs: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        """Every branch's L2-normalised embedding ``[B, P]``, from one pass of the speech tower."""
        feats, frame_lengths = self.speech_features(wavs, lengths)
        return {name: self._branch_embedding(name, feats, frame_lengths) for name in self.branch_names}

    def encode_image(self, pixels: Tensor) -> Tensor:
        """L2-normalised CLIP image embeddings ``[B, P]`` of ``pixels`` preprocessed per :attr:`image_transform`."""
        return self._image_embeddings(pixels)

    def _text(self) -> ClipTextEncoder:
        if self.text_tower is None:
            raise ConfigError("this SpeechCLIP model has no text tower (SpeechCLIPConfig.text is null)")
        return self.text_tower

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised CLIP text embeddings ``[B, P]`` of ``texts`` (zero-shot speech ↔ text retrieval)."""
        text = self._text()
        input_ids, mask = text.tokenize(list(texts))
        device = text.token_embedding.weight.device
        return self.encode_text_ids(input_ids.to(device), mask.to(device))

    def encode_text_ids(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """:meth:`encode_text` from CLIP token ids ``[B, L]`` (``[SOT, ..., EOT, pad...]``)."""
        return F.normalize(self._text()(input_ids, attention_mask).pooled, dim=-1)

    # ----------------------------------------------------------------------------------------- keywords

    def _keyword_branch(self) -> tuple[CascadedBranch, KeywordVocabulary]:
        if self.cascaded is None or self.keyword_vocabulary is None:
            raise ConfigError(f"keywords need the cascaded branch; this model has {list(self.branch_names)}")
        return self.cascaded, self.keyword_vocabulary

    @property
    def keyword_token_ids(self) -> Tensor:
        """``[V]`` CLIP token id of each keyword-vocabulary row (for :func:`vgskit.models.speechclip.metrics.keyword_hit_rate`)."""
        return self._keyword_branch()[1].ids

    def keyword_table(self) -> Tensor:
        """``[V, D]`` the keyword vocabulary's token embeddings (constant)."""
        return self._keyword_branch()[1].weight.detach()

    def keyword_embeddings(self, wavs: Tensor, lengths: Tensor) -> Tensor:
        """``[B, K, D]`` batch-normalised keyword slots, the vectors compared with the vocabulary.

        Batch statistics are used in training mode, running ones in eval mode (call ``model.eval()``).
        """
        cascaded, _ = self._keyword_branch()
        feats, frame_lengths = self.speech_features(wavs, lengths)
        return cascaded(feats, frame_lengths).kw_bn

    @torch.no_grad()
    def keyword_attention(self, wavs: Tensor, lengths: Tensor) -> KeywordAttention:
        """Attention of every keyword slot over the speech frames (the paper's Fig. 3).

        Computed in eval mode (restored afterwards): the attention block's softmax without dropout, heads
        averaged, restricted to the frame keys (see :meth:`CascadedBranch.keyword_attention`).
        """
        cascaded, _ = self._keyword_branch()
        was_training = self.training
        self.eval()
        try:
            feats, frame_lengths = self.speech_features(wavs, lengths)
            weights = cascaded.keyword_attention(feats, frame_lengths)  # [B, K, T']
        finally:
            self.train(was_training)
        frame_rate = float(getattr(self.speech_tower, "frame_rate", 50.0))
        return KeywordAttention(weights.float(), frame_lengths, frame_rate)

    @torch.no_grad()
    def keyword_ids(self, wavs: Tensor, lengths: Tensor, top_k: int = 5) -> tuple[Tensor, Tensor]:
        """The ``top_k`` nearest vocabulary tokens of every keyword slot.

        Returns:
            ``(token_ids, scores)``, each ``[B, K, top_k]``: CLIP token ids and cosine similarities, best
            first. Padding/SOT/EOT are never returned.
        """
        cascaded, vocab = self._keyword_branch()
        allowed = len(vocab) - len(cascaded.config.masked_ids)
        if not 1 <= top_k <= allowed:
            raise ConfigError(f"top_k must be in [1, {allowed}], got {top_k}")
        feats, frame_lengths = self.speech_features(wavs, lengths)
        scores = cascaded(feats, frame_lengths).cos_score  # [B, K, V]
        if cascaded.config.masked_ids:
            scores = scores.clone()
            scores[..., list(cascaded.config.masked_ids)] = float("-inf")
        best, rows = scores.topk(top_k, dim=-1)  # [B, K, top_k]
        return vocab.ids[rows], best

    def keywords(self, wavs: Tensor, lengths: Tensor, top_k: int = 5) -> list[list[list[tuple[str, float]]]]:
        """Per utterance, per keyword slot, the ``top_k`` nearest subwords as ``(text, cosine)``, best first.

        Call in eval mode (the keyword BatchNorm then uses its running statistics).
        """
        tokenizer = self._text().tokenizer
        if tokenizer is None:
            raise VGSKitError(
                f"text tower {self._text().config.name_or_path!r} has no tokenizer files to decode keywords "
                "(use keyword_ids for token ids)"
            )
        ids, scores = self.keyword_ids(wavs, lengths, top_k)
        names: dict[int, str] = {}
        out = []
        for utt_ids, utt_scores in zip(ids.tolist(), scores.tolist(), strict=True):
            slots = []
            for slot_ids, slot_scores in zip(utt_ids, utt_scores, strict=True):
                for token in slot_ids:
                    if token not in names:
                        names[token] = tokenizer.decode([token]).strip()
                slots.append([(names[t], float(s)) for t, s in zip(slot_ids, slot_scores, strict=True)])
            out.append(slots)
        return out

    # ----------------------------------------------------------------------------------------- training

    def _speech_values(self, speech: SpeechInputs) -> tuple[Tensor, Tensor]:
        # Cached tower states go through the same speech_tower(values, lengths) call: while a cache is in use
        # the tower is a reader that takes them in place of waveforms.
        if speech.kind == "waveform" or (speech.kind == "tower_states" and "speech" in self.frozen_towers()):
            return speech.values, speech.lengths
        raise ConfigError(f"SpeechCLIP reads waveforms (or cached speech-tower states), got {speech.kind} inputs")

    def _image_values(self, image: ImageInputs) -> Tensor:
        if image.kind == "pixels" or (image.kind == "tower_outputs" and "image" in self.frozen_towers()):
            return image.main
        raise ConfigError(f"SpeechCLIP reads pixels (or cached image-tower outputs), got {image.kind} inputs")

    def step(self, batch: Batch, state: TrainState) -> StepOutput:
        """One contrastive loss per branch, each times its ``<branch>_loss_weight``, against CLIP's image space.

        Both branches read one pass of the speech tower; their sum is the objective of the reference's
        "integrated" configs (one branch alone: the paper's models).
        """
        wavs, lengths = self._speech_values(batch.speech)
        feats, frame_lengths = self.speech_features(wavs, lengths)  # [B, T', D], [B]
        # Each distinct image is encoded once, then expanded back to one row per caption.
        first, target = unique_images(batch.image_ids)  # [M], [B]
        image = self._image_embeddings(self._image_values(batch.image.select(first)))[target]  # [B, P]
        losses: dict[str, Tensor] = {}
        metrics: dict[str, Tensor | float] = {}
        if self.parallel is not None:
            speech = F.normalize(self.parallel(feats, frame_lengths), dim=-1)  # [B, P]
            losses["parallel"] = self.config.parallel_loss_weight * self.loss(speech, image, batch.image_ids)
        if self.cascaded is not None:
            speech, cascaded = self._cascaded(feats, frame_lengths)  # [B, P]
            losses["cascaded"] = self.config.cascaded_loss_weight * self.loss(speech, image, batch.image_ids)
            metrics["vq_perplexity"] = cascaded.vq.code_perplexity.detach()
        scale = self.loss.scale().detach()
        metrics["logit_scale"] = scale
        metrics["temperature"] = 1.0 / scale
        return StepOutput(losses=losses, metrics=metrics)

    # ----------------------------------------------------------------------------------------- corpus

    @classmethod
    def adapt_config_to_corpus(
        cls,
        config: dict[str, Any],
        train_texts: Sequence[str],
        *,
        model_name: str | None = None,
        corpus_texts: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Fill ``keyword_vocab`` from captions when ``vocab_from_captions`` asks for it.

        Nothing changes when ``vocab_from_captions`` is off, ``keyword_vocab`` is already given, or the model
        has no cascaded branch. The captions are ``train_texts`` with ``vocab_caption_splits: train`` and
        ``corpus_texts`` (every split's transcripts, e.g. :func:`keyword_vocab_texts` of the whole manifest)
        with ``all_splits``; the latter is refused without them rather than silently built from the training
        split, whose vocabulary is smaller than the reference's. The tokenizer is the text tower's (read from
        its folder or hub cache; the weights are not loaded). ``config`` may carry the registry ``name`` (a
        recipe's ``model`` section); otherwise pass ``model_name``, whose preset supplies the fields ``config``
        leaves out.
        """
        from vgskit.models.registry import merge_config, model_config

        overrides = dict(config)
        name = overrides.pop("name", None) or model_name
        merged = (model_config(str(name), **overrides) if name
                  else merge_config(SpeechCLIPConfig(), overrides, where="SpeechCLIPConfig"))
        if not isinstance(merged, SpeechCLIPConfig):
            raise ConfigError(f"model {name!r} is not a SpeechCLIP model")
        if not merged.vocab_from_captions or merged.keyword_vocab or "cascaded" not in merged.branch_names:
            return config
        assert merged.text is not None  # the cascaded branch needs it (checked by the config)
        if merged.vocab_caption_splits == "all_splits":
            if corpus_texts is None:
                raise ConfigError(
                    "SpeechCLIPConfig.vocab_caption_splits: 'all_splits' builds the keyword vocabulary from the "
                    "captions of every split, which were not passed (corpus_texts); set vocab_caption_splits to "
                    "'train', or give keyword_vocab (build_keyword_vocabulary(tokenizer, "
                    "keyword_vocab_texts(read_manifest(MANIFEST), 'all_splits')))"
                )
            texts, which = [t for t in corpus_texts if t], "the corpus's captions"
        else:
            texts, which = [t for t in train_texts if t], "the training captions"
        if not texts:
            raise ConfigError(
                f"SpeechCLIPConfig.vocab_from_captions: {which} have no transcripts; give "
                "keyword_vocab or set vocab_from_captions to false (the whole CLIP vocabulary)"
            )
        tokenizer = load_clip_tokenizer(merged.text)
        if tokenizer is None:
            raise ConfigError(
                f"SpeechCLIPConfig.vocab_from_captions: text tower {merged.text.name_or_path!r} has no tokenizer "
                "files (vocab.json, merges.txt); copy them from the hub repository into the folder"
            )
        adapted = dict(config)
        adapted["keyword_vocab"] = build_keyword_vocabulary(tokenizer, texts)
        return adapted


# ---------------------------------------------------------------------------------------------------------
# Registered sizes (the paper's Table 1 and the reference configs)
# ---------------------------------------------------------------------------------------------------------


def speechclip_preset(size: Literal["base", "large"], branches: BranchSet) -> SpeechCLIPConfig:
    """The paper's settings: base = HuBERT base + CLIP ViT-B/32, large = HuBERT large + CLIP ViT-L/14.

    Both branch configs are filled in, so ``branches`` can be overridden (``"both"``) on any preset.
    """
    if size == "base":
        return SpeechCLIPConfig(
            speech=_base_speech(),
            image=PretrainedImageConfig("clip-vit-b32"),
            text=ClipTextConfig("clip-vit-b32"),
            branches=branches,
            parallel=ParallelBranchConfig(audio_dim=768, out_dim=512, ffn_dim=3072),
            cascaded=CascadedBranchConfig(audio_dim=768, text_dim=512),
            layer_norm_states=False,
            learnable_temperature=False,
        )
    return SpeechCLIPConfig(
        speech=PretrainedSpeechConfig("hubert-large", freeze=True, normalize_waveform=True),
        image=PretrainedImageConfig("clip-vit-l14"),
        text=ClipTextConfig("clip-vit-l14"),
        branches=branches,
        parallel=ParallelBranchConfig(audio_dim=1024, out_dim=768, ffn_dim=4096),
        cascaded=CascadedBranchConfig(audio_dim=1024, text_dim=768),
        layer_norm_states=True,
        learnable_temperature=True,
    )


for _size in ("base", "large"):
    for _branches in ("parallel", "cascaded"):
        register_model(f"speechclip_{_branches}_{_size}", config=speechclip_preset(_size, _branches))(SpeechCLIP)


__all__ = [
    "BRANCHES",
    "CLIP_PAD_ID",
    "VOCAB_CAPTION_SPLITS",
    "AttentionAndNorm",
    "CascadedBranch",
    "CascadedBranchConfig",
    "CascadedBranchOutput",
    "CosineVectorQuantizer",
    "KeywordAttention",
    "KeywordBatchNorm",
    "KeywordProjection",
    "KeywordVocabulary",
    "ParallelBranch",
    "ParallelBranchConfig",
    "QuantizerOutput",
    "RawLastStateSpeechEncoder",
    "SpeechCLIP",
    "SpeechCLIPConfig",
    "SpeechClipWarmupDecay",
    "build_keyword_vocabulary",
    "clip_sot_eot_ids",
    "convert_speechclip_state_dict",
    "cosine_scores",
    "encode_keywords",
    "key_padding_mask",
    "keyword_vocab_texts",
    "special_token_ids",
    "speechclip_loss",
    "speechclip_preset",
]
