"""VG-HuBERT (Peng & Harwath, Interspeech 2022) and the VG-HuBERT (M) baseline of SG-MIM (Woo et al., ICASSP 2024).

A dual encoder trained with margin InfoNCE, whose speech CLS token learns, as a side effect, to attend to word-like
stretches of frames (read off by :mod:`~vgskit.models.vg_hubert.wordseg`):

* **speech**: HuBERT (:class:`~vgskit.encoders.pretrained_speech.PretrainedSpeechEncoder`) with a learnable CLS token
  inserted *after* the positional convolution (the reference concatenates it to ``x + pos_conv(x)``, so the CLS
  carries no positional information), the last layers re-initialised; the CLS output of the last kept layer goes
  through an MLP ``D → 2D → E`` (768 → 1536 → 2048 in the reference) to give the coarse speech embedding;
* **image**: a pretrained ViT (DINO ViT-S/8 in the reference) whose final-layernorm CLS goes through an MLP
  ``D_img → 2D → E`` (384 → 1536 → 2048: the reference sizes the hidden layer of *both* MLPs from the audio
  width);
* **loss**: margin InfoNCE on raw dot products (margin 1, other captions of the same image masked, both directions
  summed), :func:`vgskit.losses.margin_infonce_loss`.

Facts read from the reference code (``jasonppy/word-discovery``: ``models/dual_encoder.py``,
``models/audio_encoder.py``, ``steps/trainer.py``, ``scripts/training.sh``):

* ``--encoder_layers 12 --layer_use 11``: all 12 HuBERT-base layers are kept (``encoder_layers = layer_use + 1``) and
  the CLS is read at layer index 11, the last one; ``random_init_last_x`` layers are re-initialised: 3 (layers 9–11)
  for the released VG-HuBERT_3, the model the README recommends and SG-MIM follows ("we reinitialize the last 3
  layers"). The repository's ``scripts/training.sh`` passes ``--random_init_last_x 4`` next to
  ``--exp_dir .../vg-hubert_3``; that is VG-HuBERT_4's setting, so the preset follows the model's name (3);
* ``--feature_grad_mult 0.``: the trainer sets ``requires_grad = False`` on every ``feature_extractor`` parameter, so
  the waveform CNN is **frozen**; every other parameter is in the optimizer: the transformer layers, the CLS, the two
  MLPs **and the DINO ViT, which is fine-tuned** (nothing freezes it);
* the new MLPs are initialised ``N(0, 0.02)`` with zero biases (``init_weights``);
* waveforms are not normalised ("do not layer normalize the waveform!", README), as for HuBERT-base.

VG-HuBERT (M), as the SG-MIM paper states it (§3.3 baselines, §3.2 implementation details): it "closely follows
that of VG-HuBERT, with a notable exception in the image encoder": ViT-B/16 initialised from MAE. HuBERT Base with
"the last 3 layers" re-initialised (12 layers, width 768, 12 heads). The paper's implementation details, which
describe the model SG-MIM builds on top of VG-HuBERT (M) ("our proposed method utilizes the cross-modal decoder on top
of this model"), differ from the reference VG-HuBERT in two further points, which the ``vg_hubert_m`` preset follows:
the image representation is the **mean** of the ViT's output tokens (§2.2, "the mean feature of Z_I"; not its CLS),
and each modality's projection is **a linear layer with an output dimension of 768** (not a 2-layer MLP to 2048).
Whether the MAE tower is fine-tuned is not stated; as in VG-HuBERT it is.

Known difference: the deterministic evaluation transform (``image_transform``) is the ViT tower's own preprocessing
(its ``preprocessor_config.json``); the reference evaluates on ``Resize(256)`` + ``CenterCrop(224)``, which
:class:`~vgskit.images.ImageTransform` does not express (it resizes the shorter side to the crop size).

Presets: ``vg_hubert`` (reference), ``vg_hubert_m`` (SG-MIM's VG-HuBERT (M)), ``vg_hubert_tiny`` (small sizes for
tests; pass local towers with ``speech.name_or_path`` / ``image.name_or_path``) and ``vg_hubert_scenes`` (towers of
:data:`SCENES_HUBERT` / :data:`SCENES_VIT` with random weights, trained from scratch on the embedded corpus by the
``vg_hubert_scenes`` recipe). Towers load when a model is built,
never at import.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vgskit.contract import Batch, StepOutput, TrainState
from vgskit.encoders.pretrained_image import PretrainedImageConfig, PretrainedImageEncoder
from vgskit.encoders.pretrained_speech import (
    PretrainedSpeechConfig,
    PretrainedSpeechEncoder,
    PretrainedSpeechOutput,
)
from vgskit.errors import ConfigError
from vgskit.layers import lengths_to_mask
from vgskit.losses import margin_infonce_loss, unique_images
from vgskit.models.base import RetrievalModel
from vgskit.models.registry import register_model
from vgskit.models.vg_hubert.wordseg import WordSegments, segment_words

__all__ = [
    "DEFAULT_SEGMENT_QUANTILE",
    "SCENES_HUBERT",
    "SCENES_MAE",
    "SCENES_VIT",
    "PROJECTIONS",
    "CLSAttention",
    "VGHuBERT",
    "VGHuBERTConfig",
    "default_image_tower",
    "default_speech_tower",
    "scenes_speech_tower",
]

#: Projection heads: ``"mlp"`` (Linear → GELU → Linear, the reference) or ``"linear"`` (SG-MIM's paper).
PROJECTIONS: tuple[str, ...] = ("mlp", "linear")
#: Quantile of the per-head attention threshold the reference README recommends for VG-HuBERT_3 at layer 9
#: (0.8 for VG-HuBERT_4; the reference's segmentation scripts default to 0.9).
DEFAULT_SEGMENT_QUANTILE = 0.7


#: HuBERT architecture of the ``vg_hubert_scenes`` preset, built with random weights (no tower can be downloaded
#: for the embedded corpus): HuBERT-Base's 7-layer waveform CNN (same kernels and strides: 20 ms frames; group norm
#: after the first layer; raw waveforms) at 32 channels instead of 512, 4 pre-LayerNorm transformer layers of
#: width 128 (pre-LN trains from scratch without the post-LN warm-up troubles). The CNN costs most of a step on
#: 2 cores: 64 channels were measured 1.35x slower per step than 32, and the layer-norm CNN of HuBERT-Large 1.6x
#: slower than group norm (a transpose around every layer norm at 3,200 frames per second).
SCENES_HUBERT: dict[str, Any] = {
    "model_type": "hubert",
    "conv_dim": [32, 32, 32, 32, 32, 32, 32],
    "feat_extract_norm": "group",
    "conv_bias": True,
    "do_stable_layer_norm": True,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "num_conv_pos_embeddings": 64,
    "num_conv_pos_embedding_groups": 8,
}
#: ViT of the ``*_scenes`` presets (random weights): the corpus's 96-pixel images in 12-pixel patches (8 x 8 = 64),
#: width 128, 4 layers.
SCENES_VIT: dict[str, Any] = {
    "model_type": "vit",
    "image_size": 96,
    "patch_size": 12,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 512,
}
#: MAE ViT of the ``sg_mim_scenes`` preset (random weights): :data:`SCENES_VIT`'s sizes as an MAE encoder.
SCENES_MAE: dict[str, Any] = {**SCENES_VIT, "model_type": "vit_mae", "mask_ratio": 0.75}


def scenes_speech_tower() -> PretrainedSpeechConfig:
    """The speech tower of the ``*_scenes`` presets: :data:`SCENES_HUBERT` with random weights, all of it trained."""
    # From scratch every layer is new: nothing to re-initialise, and the waveform CNN must learn.
    # exact_padding=False: the CNN runs on the padded batch, so padding enters the first layer's group-norm
    # statistics, as in the fairseq reference; with length-bucketed batches that is a few percent of the frames,
    # and it makes a training step ~2.5x faster than one CNN pass per utterance (measured on 2 cores).
    return dataclasses.replace(default_speech_tower(), name_or_path="", num_layers=None, reinit_last=0,
                               freeze_cnn=False, normalize_waveform=None, exact_padding=False,
                               architecture=dict(SCENES_HUBERT))


def default_speech_tower() -> PretrainedSpeechConfig:
    """HuBERT-base as the reference trains it: all 12 layers, the last 3 re-initialised, one CLS after the positional
    convolution, CNN frozen, raw (not normalised) waveforms."""
    return PretrainedSpeechConfig(
        name_or_path="hubert-base",
        num_layers=12,
        reinit_last=3,
        cls_position="after_pos_conv",
        num_cls=1,
        freeze_cnn=True,
        normalize_waveform=False,
    )


def default_image_tower() -> PretrainedImageConfig:
    """DINO ViT-S/8, fine-tuned, its final-layernorm CLS as the image summary (reference)."""
    return PretrainedImageConfig(name_or_path="dino-vits8", pool="cls", project=False, freeze=False)


def _nested(cls: type, value: Any) -> Any:
    """Configs read back from JSON arrive as plain dicts (and lists for tuples)."""
    if isinstance(value, dict):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
    return value


@dataclass
class VGHuBERTConfig:
    """Configuration of :class:`VGHuBERT`; the defaults are the reference's (``vg_hubert``).

    Attributes:
        speech: the HuBERT tower (12 layers, last 3 re-initialised, CLS after the positional convolution, CNN frozen).
        image: the ViT tower (DINO ViT-S/8, fine-tuned, CLS pooling).
        embed_dim: dimension of the shared embedding space (reference ``common_embed_dim`` 2048; 768 in SG-MIM).
        projection: ``"mlp"`` (reference) or ``"linear"`` (SG-MIM paper), see :data:`PROJECTIONS`.
        proj_hidden: hidden width of both MLPs; ``None`` takes twice the speech tower's width, as the reference
            (``encoder_embed_dim * 2`` for the audio *and* the image MLP).
        initializer_range: std of the ``N(0, std)`` init of the projection heads (reference 0.02).
        margin: subtracted from the matched scores in the margin InfoNCE loss (reference 1.0).
        segment_layer: 0-based transformer layer whose CLS attention :meth:`VGHuBERT.segment` reads by default
            (reference README: layer 9 for VG-HuBERT_3 and VG-HuBERT_4).
    """

    speech: PretrainedSpeechConfig = field(default_factory=default_speech_tower)
    image: PretrainedImageConfig = field(default_factory=default_image_tower)
    embed_dim: int = 2048
    projection: str = "mlp"
    proj_hidden: int | None = None
    initializer_range: float = 0.02
    margin: float = 1.0
    segment_layer: int = 9

    def __post_init__(self) -> None:
        self.speech = _nested(PretrainedSpeechConfig, self.speech)
        self.image = _nested(PretrainedImageConfig, self.image)
        if self.speech.cls_position == "none" or self.speech.num_cls != 1:
            raise ConfigError("VGHuBERTConfig.speech: VG-HuBERT needs exactly one CLS token in the speech tower "
                              f"(cls_position={self.speech.cls_position!r}, num_cls={self.speech.num_cls})")
        if self.speech.freeze:
            raise ConfigError("VGHuBERTConfig.speech.freeze: the speech tower is what VG-HuBERT trains (its CLS and "
                              "layers); freeze only its CNN (speech.freeze_cnn)")
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"VGHuBERTConfig.projection must be one of {PROJECTIONS}, got {self.projection!r}")
        for name in ("embed_dim", "proj_hidden"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"VGHuBERTConfig.{name} must be a positive integer, got {value!r}")
        if not self.initializer_range > 0:
            raise ConfigError(f"VGHuBERTConfig.initializer_range must be > 0, got {self.initializer_range}")
        if isinstance(self.segment_layer, bool) or not isinstance(self.segment_layer, int) or self.segment_layer < 0:
            raise ConfigError(f"VGHuBERTConfig.segment_layer must be an integer >= 0, got {self.segment_layer!r}")


@dataclass
class CLSAttention:
    """Per-head attention of the speech CLS token over the frames at one transformer layer.

    Attributes:
        weights: ``[B, H, T]`` the CLS query's softmax weights on every frame (the softmax runs over the CLS and
            the valid frames; the CLS column is dropped, as the reference's ``attn_weights[:, 0, 1:]``); 0 on padding.
        cls_self: ``[B, H]`` the weight the CLS puts on itself (``weights`` sum to ``1 - cls_self`` per head).
        features: ``[B, T, D]`` the frames' output of that layer (the reference pools segment features from it),
            zero on padding.
        frames: ``[B]`` valid frames per row.
        seconds_per_frame: ``[B]`` float64, ``samples / sample_rate / frames`` per row (the reference's ``spf``).
        layer: the 0-based layer index.
    """

    weights: Tensor
    cls_self: Tensor
    features: Tensor
    frames: Tensor
    seconds_per_frame: Tensor
    layer: int


def _projection(kind: str, d_in: int, d_hidden: int, d_out: int, std: float) -> nn.Module:
    module: nn.Module
    if kind == "mlp":
        module = nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))
    else:
        module = nn.Sequential(nn.Linear(d_in, d_out))
    # The reference's init_weights: N(0, std) weights and zero biases on every new Linear.
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            nn.init.zeros_(m.bias)
    return module


class VGHuBERT(RetrievalModel):
    """VG-HuBERT: waveforms and pixels → raw (not normalised) embeddings compared by dot products.

    Attributes:
        speech_tower: the HuBERT :class:`PretrainedSpeechEncoder`.
        image_tower: the ViT :class:`PretrainedImageEncoder`.
        audio_proj / image_proj: the projection heads (``Sequential``; Linear layers at indices 0 and 2 for an MLP,
            0 for a linear head, as the reference's ``audio_cls_token_proj`` / ``visual_cls_token_proj``).
    """

    config_class = VGHuBERTConfig
    speech_input = "waveform"
    image_input = "pixels"
    has_fine_scores = False

    def __init__(self, config: VGHuBERTConfig | None = None):
        config = config or VGHuBERTConfig()
        super().__init__(config)
        self.config: VGHuBERTConfig = config
        self.speech_tower = PretrainedSpeechEncoder(config.speech)
        self.sample_rate = self.speech_tower.preprocessing.sample_rate
        self.image_tower = PretrainedImageEncoder(config.image)
        width = self.speech_tower.width
        hidden = config.proj_hidden or 2 * width
        std = config.initializer_range
        self.audio_proj = _projection(config.projection, width, hidden, config.embed_dim, std)
        self.image_proj = _projection(config.projection, self.image_tower.width, hidden, config.embed_dim, std)
        self._image_transform = self.image_tower.transform.to_json()

    # ------------------------------------------------------------------------------------------ identity

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_transform(self) -> dict[str, Any]:
        # The ViT's own preprocessing (its preprocessor_config.json, else ImageNet statistics at its size).
        return dict(self._image_transform)

    @property
    def num_layers(self) -> int:
        """Transformer layers of the speech tower (valid ``layer`` arguments are ``0 .. num_layers - 1``)."""
        return len(self.speech_tower.model.encoder.layers)

    # ---------------------------------------------------------------------------------------- embeddings

    def encode_speech(self, wavs: Tensor, lengths: Tensor) -> Tensor:
        # wavs: [B, T] samples; lengths: [B] -> [B, E]
        out = self.speech_tower(wavs, lengths)
        assert out.cls is not None  # the config requires one CLS token
        return self.audio_proj(out.cls[:, 0])  # [B, D] -> [B, E], raw (not normalised)

    def encode_image(self, pixels: Tensor) -> Tensor:
        # pixels: [B, 3, S, S] -> [B, E]
        pooled = self.image_tower(pixels).pooled  # [B, D_img]: CLS (reference) or token mean (SG-MIM)
        return self.image_proj(pooled)  # [B, E], raw (not normalised)

    # ------------------------------------------------------------------------------------------ training

    def embed_for_loss(self, batch: Batch) -> dict[str, Tensor]:
        speech = self.embed_speech(batch.speech).pooled  # [B, E]
        first, target = unique_images(batch.image_ids)  # each distinct image encoded once: [M], [B]
        image = self.embed_image(batch.image.select(first)).pooled  # [M, E]
        return {"speech": speech, "image": image[target.to(image.device)]}  # image: [B, E], the row's image

    def loss_from_embeddings(self, embeddings: Mapping[str, Tensor], batch: Batch, state: TrainState) -> StepOutput:
        scores = embeddings["speech"] @ embeddings["image"].T  # [B, B], rows captions, columns the row's image
        loss = margin_infonce_loss(scores, batch.image_ids, self.config.margin)
        return StepOutput(losses={"margin_infonce": loss})

    def step(self, batch: Batch, state: TrainState) -> StepOutput:
        # Through the two gradient-cache methods, so that a grad-cached step computes the same thing.
        return self.loss_from_embeddings(self.embed_for_loss(batch), batch, state)

    # --------------------------------------------------------------------------------- word segmentation

    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ConfigError(f"layer must be an integer in 0..{self.num_layers - 1} (0-based, the speech tower has "
                              f"{self.num_layers} layers), got {layer!r}")
        return layer

    def cls_attention(self, wavs: Tensor, lengths: Tensor, layer: int | None = None) -> CLSAttention:
        """Per-head CLS→frame attention at transformer layer ``layer`` (0-based; default ``config.segment_layer``).

        Computed from the layer's own query/key projections of that layer's input: ``softmax(q_cls · K^T /
        sqrt(d_head))`` over the CLS and the valid frames, padded frames masked out. The reference gets the same
        numbers by patching PyTorch's multi-head attention to return per-head weights; here nothing is patched.
        Call it on a model in eval mode: in training mode the tower's dropout makes the weights random.

        Args:
            wavs: ``[B, T_samples]`` waveforms at :attr:`sample_rate`.
            lengths: ``[B]`` valid samples per row.
            layer: 0-based transformer layer.
        """
        layer = self._check_layer(self.config.segment_layer if layer is None else layer)
        lengths = lengths.to(device=wavs.device, dtype=torch.long)
        return self.cls_attention_from_output(self.speech_tower(wavs, lengths), lengths, layer)

    def cls_attention_from_output(self, out: PretrainedSpeechOutput, lengths: Tensor,
                                  layer: int | None = None) -> CLSAttention:
        """:meth:`cls_attention` from a speech-tower output already computed on ``(wavs, lengths)``.

        A training step that needs both the CLS embedding and the attention (SG-MIM's speech summary) reads them
        from one forward pass: a second pass would double the speech tower's cost and, in training mode, draw other
        dropout masks, so the attention would not belong to the states the loss is computed from.

        Args:
            out: ``self.speech_tower(wavs, lengths)``.
            lengths: ``[B]`` valid samples per row (for ``seconds_per_frame``).
            layer: 0-based transformer layer (default ``config.segment_layer``).
        """
        layer = self._check_layer(self.config.segment_layer if layer is None else layer)
        tower = self.speech_tower
        assert out.cls_hidden_states is not None and out.hidden_states is not None
        frames = out.lengths  # [B]
        t = out.hidden_states[layer].shape[1]
        # hidden_states[i] is the input of layer i: [CLS; frames] rebuilt (padding rows are zero, and masked below).
        h = torch.cat([out.cls_hidden_states[layer], out.hidden_states[layer]], dim=1)  # [B, 1+T, D]
        block = tower.model.encoder.layers[layer]
        if tower.stable_layer_norm:
            h = block.layer_norm(h)  # pre-norm layers normalise their input before the attention
        attention = block.attention
        heads, head_dim = int(attention.num_heads), int(attention.head_dim)
        b = h.shape[0]
        q = attention.q_proj(h[:, :1]).view(b, 1, heads, head_dim).transpose(1, 2)  # [B, H, 1, d]
        k = attention.k_proj(h).view(b, 1 + t, heads, head_dim).transpose(1, 2)  # [B, H, 1+T, d]
        scores = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) / math.sqrt(head_dim)  # [B, H, 1+T]
        valid = torch.cat([torch.ones_like(frames[:, None], dtype=torch.bool),
                           lengths_to_mask(frames.to(h.device), t)], dim=1)  # [B, 1+T]
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # [B, H, 1+T]
        spf = lengths.double().cpu() / float(self.sample_rate) / frames.double().cpu()  # [B]
        return CLSAttention(weights=weights[:, :, 1:], cls_self=weights[:, :, 0], features=out.hidden_states[layer + 1],
                            frames=frames, seconds_per_frame=spf, layer=layer)

    @torch.no_grad()
    def segment(self, wavs: Tensor, lengths: Tensor, layer: int | None = None,
                quantile: float = DEFAULT_SEGMENT_QUANTILE, level2: bool = False) -> list[WordSegments]:
        """Word-like segments of every utterance, from the CLS attention (:func:`wordseg.segment_words`).

        Args:
            wavs: ``[B, T_samples]`` waveforms; lengths: ``[B]`` valid samples.
            layer: 0-based layer (default ``config.segment_layer``: 9, the reference README's choice).
            quantile: per-head threshold quantile (default 0.7, the README's for VG-HuBERT_3; 0.8 for VG-HuBERT_4;
                the reference scripts default to 0.9).
            level2: keep single-frame runs.

        Returns:
            One :class:`WordSegments` per row (seconds from the row's start; features pooled from the layer's output).
        """
        attn = self.cls_attention(wavs, lengths, layer)
        out = []
        for i in range(wavs.shape[0]):
            n = int(attn.frames[i])
            out.append(segment_words(attn.weights[i, :, :n].float().cpu(), quantile, float(attn.seconds_per_frame[i]),
                                     feats=attn.features[i, :n].float().cpu(), level2=level2))
        return out


register_model("vg_hubert")(VGHuBERT)
register_model(
    "vg_hubert_m",
    config=VGHuBERTConfig(
        image=PretrainedImageConfig(name_or_path="mae-vit-b16", pool="mean", project=False, freeze=False),
        embed_dim=768,
        projection="linear",
    ),
)(VGHuBERT)
register_model(
    "vg_hubert_tiny",
    config=VGHuBERTConfig(
        speech=dataclasses.replace(default_speech_tower(), num_layers=2, reinit_last=1),
        embed_dim=16,
        proj_hidden=32,
        segment_layer=1,
    ),
)(VGHuBERT)
register_model(
    "vg_hubert_scenes",
    config=VGHuBERTConfig(
        speech=scenes_speech_tower(),
        # Max over the patch tokens instead of the reference's CLS: from scratch, the random ViT's CLS is nearly the
        # same for every image and training collapsed both towers to constant embeddings within 20 steps
        # (measured: loss flat at its collapsed value log(1 + 47e) x 2 = 9.71 at batch 48, with dot products or
        # cosines, lr 1e-4 to 1e-3); with the maximum the loss leaves that value within 25 steps.
        image=PretrainedImageConfig(name_or_path="", pool="max", project=False, freeze=False,
                                    architecture=dict(SCENES_VIT)),
        embed_dim=256,
        segment_layer=2,  # the reference reads layer 9 of 12, three from the top; of 4 layers, the third
    ),
)(VGHuBERT)
