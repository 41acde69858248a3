"""FaST-VGS (Peng & Harwath, ICASSP 2022): a dual encoder for fast coarse search and a cross encoder that
re-ranks its candidates, trained jointly.

Assembled from the family's blocks, which reproduce the reference (``jasonppy/FaST-VGS-Family``):

* **speech**: a pretrained wav2vec2 (CNN frozen, first 8 transformer layers, a learnable CLS inserted *before*
  the positional convolution), :class:`~vgskit.models.fast_vgs.audio.ResDAVEnet` on its frames (16× fewer),
  the tower's CLS through an MLP ``D → 2D → H`` prepended, one :class:`BertLayer`; the coarse speech embedding
  is a Linear on the CLS output;
* **image**: :class:`~vgskit.models.fast_vgs.regions.RegionEncoder` on detector regions and boxes, a learnable
  CLS prepended, six :class:`BertLayer`; the coarse image embedding is an MLP ``H → 2H → H`` on the CLS output;
* **fine score**: :class:`CrossEncoder` on the two token sequences (CLS first), one score per pair;
* **loss**: margin InfoNCE on raw dot products (no normalisation, no temperature: the model learns the scale),
  ``0.1 · coarse + 1.0 · fine``, other captions of the same image masked out of both softmaxes.

Presets: ``fast_vgs`` (the paper's sizes; wav2vec2-base loads when the model is built, never at import),
``fast_vgs_tiny`` (small widths, 2-layer towers, for tests and smoke runs) and ``fast_vgs_scenes`` (the
``fast_vgs_scenes`` recipe's small model for the embedded corpus: no wav2vec2 weights can be downloaded there,
so a from-scratch log-mel CNN at wav2vec2's 50 Hz frame rate stands in for the tower, see
``FastVGSConfig.speech_frontend``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vgskit.contract import Batch, Embeddings, ImageInputs, SpeechInputs, StepOutput, TrainState
from vgskit.encoders.audio_cnn import AudioCNNConfig, AudioCNNEncoder
from vgskit.encoders.pretrained_speech import PretrainedSpeechConfig, PretrainedSpeechEncoder
from vgskit.errors import ConfigError
from vgskit.features import LogMelConfig
from vgskit.images import IMAGENET_MEAN, IMAGENET_STD
from vgskit.layers import lengths_to_mask, masked_mean
from vgskit.losses import unique_images
from vgskit.models.base import RetrievalModel
from vgskit.models.fast_vgs.audio import ResDAVEnet, ResDAVEnetConfig
from vgskit.models.fast_vgs.losses import margin_infonce_loss
from vgskit.models.fast_vgs.regions import RegionEncoder, RegionEncoderConfig
from vgskit.models.fast_vgs.transformer import (
    BertLayer,
    BertLayerConfig,
    CrossEncoder,
    CrossEncoderConfig,
    additive_attention_mask,
)
from vgskit.models.registry import register_model

__all__ = ["FastVGS", "FastVGSConfig", "default_speech_tower"]


def default_speech_tower() -> PretrainedSpeechConfig:
    """wav2vec2-base as FaST-VGS uses it: frozen CNN, first 8 layers, CLS before the positional convolution,
    waveforms mean/std-normalised per utterance (design notes: "Audio: mean/std-normalised per utterance")."""
    return PretrainedSpeechConfig(
        name_or_path="wav2vec2-base",
        num_layers=8,
        cls_position="before_pos_conv",
        num_cls=1,
        freeze_cnn=True,
        normalize_waveform=True,
    )


def _nested(cls: type, value: Any) -> Any:
    """Configs read back from JSON arrive as plain dicts (and lists for tuples)."""
    if isinstance(value, dict):
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        return cls(**kwargs)
    return value


@dataclass
class FastVGSConfig:
    """Configuration of :class:`FastVGS`; the defaults are the paper's (design notes, reference ``args``).

    Attributes:
        speech: the pretrained speech tower (wav2vec2-base, CNN frozen, 8 layers, CLS before the pos. conv).
        speech_frontend: ``"pretrained"`` (the paper: ``speech``) or ``"logmel_cnn"``: ``speech_cnn``, a
            from-scratch :class:`~vgskit.encoders.audio_cnn.AudioCNNEncoder`, for training where no pretrained
            tower can be had. It has no CLS token, so the tower-level summary that the CLS MLP reads is the
            masked mean of its frames (our choice; the rest of the model is unchanged).
        speech_cnn: the log-mel CNN of ``speech_frontend="logmel_cnn"`` (default: 40 mels at 100 Hz, one
            stride-2 stem convolution → 50 Hz, wav2vec2's frame rate, so ResDAVEnet's 16× gives its 3.1 Hz).
        layer: sizes of every new BERT and cross layer (hidden 768, FFN 3072, dropout 0.1, init N(0, 0.02)) with
            8 attention heads, as the paper states ("All Transformer layers in our model use a hidden dimension of
            768 and 8 attention heads (except for Trm1, which uses 12)"); the reference code's argument default is
            12, so a released checkpoint's ``args.pkl`` may say otherwise.
        resdavenet_widths: ResDAVEnet widths (input projection, then one per stage); the last one must equal
            ``layer.hidden_size``. Its input width is the speech tower's, read when the tower is built.
        resdavenet_blocks: basic blocks per stage.
        resdavenet_strides: time stride of each stage (2 each: 16× down-sampling).
        audio_layers: BERT layers over ``[CLS, ResDAVEnet frames]`` (1 in the paper).
        visual_layers: BERT layers over ``[CLS, regions]`` (6 in the paper).
        cross_layers: cross layers of the fine matcher (2 in the paper).
        region_feat_dim: detector feature width (2048 for Faster R-CNN / BUTD).
        box_dim: box coordinates per region (x1, y1, x2, y2 normalised by the image size).
        visual_cls_std: std of the image CLS token's initial values. The reference draws it with
            ``torch.randn`` (1.0). At 1.0 the CLS dominates the BERT layers' residual stream at initialisation, so
            every image starts with nearly the same embedding (std across images ~1e-3 of its norm) and a model
            trained from scratch (no pretrained tower) sits at chance for hundreds of steps; the small
            ``fast_vgs_scenes`` preset uses the layers' own ``initializer_range`` (0.02) instead.
        margin: subtracted from the matched scores in both margin InfoNCE losses.
        coarse_weight: λc, weight of the coarse (dual-encoder) loss.
        fine_weight: λf, weight of the fine (cross-encoder) loss.
    """

    speech: PretrainedSpeechConfig = field(default_factory=default_speech_tower)
    speech_frontend: str = "pretrained"
    speech_cnn: AudioCNNConfig = field(default_factory=lambda: AudioCNNConfig(
        stem_channels=(128,), channels=(256,), depths=(1,), strides=(1,)))
    layer: BertLayerConfig = field(default_factory=lambda: BertLayerConfig(num_heads=8))
    resdavenet_widths: tuple[int, ...] = (128, 128, 256, 512, 768)
    resdavenet_blocks: tuple[int, ...] = (2, 2, 2, 2)
    resdavenet_strides: tuple[int, ...] = (2, 2, 2, 2)
    audio_layers: int = 1
    visual_layers: int = 6
    cross_layers: int = 2
    region_feat_dim: int = 2048
    box_dim: int = 4
    visual_cls_std: float = 1.0
    margin: float = 1.0
    coarse_weight: float = 0.1
    fine_weight: float = 1.0

    def __post_init__(self) -> None:
        self.speech = _nested(PretrainedSpeechConfig, self.speech)
        if isinstance(self.speech_cnn, dict):
            self.speech_cnn = AudioCNNConfig(**self.speech_cnn)
        if self.speech_frontend not in ("pretrained", "logmel_cnn"):
            raise ConfigError("FastVGSConfig.speech_frontend must be 'pretrained' or 'logmel_cnn', "
                              f"got {self.speech_frontend!r}")
        self.layer = _nested(BertLayerConfig, self.layer)
        for name in ("resdavenet_widths", "resdavenet_blocks", "resdavenet_strides"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.speech_frontend == "pretrained" and (self.speech.cls_position == "none" or self.speech.num_cls != 1):
            raise ConfigError("FastVGSConfig.speech: FaST-VGS needs exactly one CLS token in the speech tower "
                              f"(cls_position={self.speech.cls_position!r}, num_cls={self.speech.num_cls})")
        if self.resdavenet_widths[-1] != self.layer.hidden_size:
            raise ConfigError(f"FastVGSConfig.resdavenet_widths[-1]={self.resdavenet_widths[-1]} must equal "
                              f"layer.hidden_size={self.layer.hidden_size} (ResDAVEnet frames enter the BERT layer)")
        for name in ("audio_layers", "visual_layers", "cross_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"FastVGSConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("coarse_weight", "fine_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"FastVGSConfig.{name} must be >= 0, got {getattr(self, name)}")


def _init_new_layers(module: nn.Module, std: float) -> None:
    """The reference's ``init_weights``: Linear N(0, std) with zero bias, LayerNorm 1/0 (convolutions and
    BatchNorm keep their own init). The reference applies it to the whole dual encoder after construction,
    which includes the ResDAVEnet input projection and the region encoder."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class FastVGS(RetrievalModel):
    """FaST-VGS: waveforms and detector regions → raw coarse embeddings, token sequences and fine pair scores.

    ``embed_speech``/``embed_image`` return :class:`Embeddings` whose ``tokens`` are the full sequences the
    cross encoder reads (CLS at position 0, ``mask`` True on real tokens); ``pooled`` are *not* normalised,
    because the loss and the reference's coarse search use raw dot products.
    """

    config_class = FastVGSConfig
    speech_input = "waveform"
    image_input = "regions"
    has_fine_scores = True

    def __init__(self, config: FastVGSConfig | None = None):
        config = config or FastVGSConfig()
        super().__init__(config)
        self.config: FastVGSConfig = config
        hidden = config.layer.hidden_size
        std = config.layer.initializer_range

        # Speech side: tower → ResDAVEnet → [CLS; frames] → BERT layer(s) → Linear on CLS.
        self.speech_tower: nn.Module
        if config.speech_frontend == "pretrained":
            self.speech_tower = PretrainedSpeechEncoder(config.speech)
            self.sample_rate = self.speech_tower.preprocessing.sample_rate
        else:
            self.speech_tower = AudioCNNEncoder(config.speech_cnn)
            self.sample_rate = config.speech_cnn.features.sample_rate
        width = self.speech_tower.width
        self.resdavenet = ResDAVEnet(ResDAVEnetConfig(
            in_dim=width, widths=config.resdavenet_widths, blocks_per_stage=config.resdavenet_blocks,
            strides=config.resdavenet_strides))
        self.audio_cls_proj = _mlp(width, 2 * width, hidden)
        self.audio_layers = nn.ModuleList(BertLayer(config.layer) for _ in range(config.audio_layers))
        self.audio_proj = nn.Linear(hidden, hidden)

        # Image side: regions → [CLS; regions] → BERT layers → MLP on CLS.
        self.region_encoder = RegionEncoder(RegionEncoderConfig(
            feat_dim=config.region_feat_dim, box_dim=config.box_dim, hidden_size=hidden,
            dropout=config.layer.dropout, layer_norm_eps=config.layer.layer_norm_eps))
        # N(0, 1) as the reference's ``torch.randn`` (its init_weights does not touch Parameters) by default.
        self.visual_cls = nn.Parameter(torch.randn(1, 1, hidden) * config.visual_cls_std)
        self.visual_layers = nn.ModuleList(BertLayer(config.layer) for _ in range(config.visual_layers))
        self.visual_proj = _mlp(hidden, 2 * hidden, hidden)

        self.cross_encoder = CrossEncoder(CrossEncoderConfig(layer=config.layer, num_layers=config.cross_layers))

        for module in (self.resdavenet.input_proj, self.audio_cls_proj, self.audio_proj, self.region_encoder,
                       self.visual_proj):
            _init_new_layers(module, std)

    # ------------------------------------------------------------------------------------------ identity

    @property
    def embed_dim(self) -> int:
        return self.config.layer.hidden_size

    @property
    def image_transform(self) -> dict[str, Any]:
        # Unused (the model reads region features), but saved with the model as every model's is.
        return {"size": 224, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "resize_mode": "squash",
                "interpolation": "bilinear"}

    # ---------------------------------------------------------------------------------------- embeddings

    def _downsampled_lengths(self, frames: Tensor) -> Tensor:
        """Valid ResDAVEnet output frames per row: each stride-s stage maps ``T → ceil(T / s)``.

        Computed per row from its own length (not the reference's batch-level ``round(T_in / T_out)`` ratio),
        so that an utterance's mask does not depend on how long its batch mates are.
        """
        n = frames.clone()
        for stride in self.config.resdavenet_strides:
            n = torch.div(n - 1, stride, rounding_mode="floor") + 1
        return n.clamp(min=1)

    def embed_speech(self, speech: SpeechInputs) -> Embeddings:
        if speech.kind != "waveform":
            raise ConfigError(f"FastVGS reads waveform speech inputs, got {speech.kind}")
        out = self.speech_tower(speech.values, speech.lengths)
        if self.config.speech_frontend == "pretrained":
            assert out.cls is not None  # the config requires one CLS token
            summary = out.cls[:, :1]  # [B, 1, D_w]
        else:  # no CLS in a CNN: its masked mean frame stands in
            tower_mask = lengths_to_mask(out.lengths.to(out.last_hidden_state.device), out.last_hidden_state.shape[1])
            summary = masked_mean(out.last_hidden_state, tower_mask)[:, None]  # [B, 1, D_w]
        frames = self.resdavenet(out.last_hidden_state)  # [B, T', D_w] -> [B, T'', H]
        valid = lengths_to_mask(self._downsampled_lengths(out.lengths).to(frames.device), frames.shape[1])  # [B, T'']
        cls = self.audio_cls_proj(summary)  # [B, 1, D_w] -> [B, 1, H]
        tokens = torch.cat([cls, frames], dim=1)  # [B, 1+T'', H]
        mask = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)  # [B, 1+T'']
        additive = additive_attention_mask(mask, tokens.dtype)  # [B, 1, 1, 1+T'']
        for layer in self.audio_layers:
            tokens = layer(tokens, additive)  # [B, 1+T'', H]
        pooled = self.audio_proj(tokens[:, 0])  # [B, H], raw (not normalised)
        return Embeddings(pooled, tokens, mask)

    def encode_speech(self, wavs: Tensor, lengths: Tensor) -> Tensor:
        # wavs: [B, T]; lengths: [B] -> [B, H]
        return self.embed_speech(SpeechInputs.waveform(wavs, lengths, self.sample_rate)).pooled

    def embed_image(self, image: ImageInputs) -> Embeddings:
        if image.kind != "regions":
            raise ConfigError(f"FastVGS reads region image inputs, got {image.kind}")
        assert image.regions is not None and image.boxes is not None and image.region_mask is not None
        regions = self.region_encoder(image.regions, image.boxes)  # [B, N, H]
        cls = self.visual_cls.expand(regions.shape[0], -1, -1).to(regions.dtype)  # [B, 1, H]
        tokens = torch.cat([cls, regions], dim=1)  # [B, 1+N, H]
        region_mask = image.region_mask.to(device=tokens.device, dtype=torch.bool)  # [B, N]
        mask = torch.cat([torch.ones_like(region_mask[:, :1]), region_mask], dim=1)  # [B, 1+N]
        # The reference passes no mask (always 36 regions); with every region real, adding zeros is the same.
        additive = additive_attention_mask(mask, tokens.dtype)  # [B, 1, 1, 1+N]
        for layer in self.visual_layers:
            tokens = layer(tokens, additive)  # [B, 1+N, H]
        pooled = self.visual_proj(tokens[:, 0])  # [B, H], raw (not normalised)
        return Embeddings(pooled, tokens, mask)

    def score_pairs(self, speech: Embeddings, image: Embeddings) -> Tensor:
        if speech.tokens is None or image.tokens is None or speech.mask is None or image.mask is None:
            raise ConfigError("FastVGS.score_pairs needs token-level embeddings (from embed_speech/embed_image)")
        # speech.tokens: [P, Ta, H]; image.tokens: [P, Tv, H]
        audio_mask = additive_attention_mask(speech.mask, speech.tokens.dtype)  # [P, 1, 1, Ta]
        visual_mask = additive_attention_mask(image.mask, image.tokens.dtype)  # [P, 1, 1, Tv]
        return self.cross_encoder(speech.tokens, audio_mask, image.tokens, visual_mask).squeeze(-1)  # [P]

    # ------------------------------------------------------------------------------------------ training

    def fine_score_matrix(self, speech: Embeddings, image: Embeddings) -> Tensor:
        """Fine scores ``[B, M]`` of every caption (rows of ``speech``) × every image (rows of ``image``)."""
        b, m = len(speech), len(image)
        rows = torch.arange(b).repeat_interleave(m)  # [B*M]
        cols = torch.arange(m).repeat(b)  # [B*M]
        return self.score_pairs(speech.select(rows), image.select(cols)).view(b, m)  # [B, M]

    def step(self, batch: Batch, state: TrainState) -> StepOutput:
        speech = self.embed_speech(batch.speech)  # pooled [B, H]
        # Each distinct image is encoded once and cross-encoded once per caption; the square matrices the
        # reference builds (every caption × the image of every row) are these columns repeated.
        first, target = unique_images(batch.image_ids)  # [M], [B]
        image = self.embed_image(batch.image.select(first))  # pooled [M, H]
        target = target.to(speech.pooled.device)
        coarse_scores = speech.pooled @ image.pooled[target].T  # [B, B]
        coarse = margin_infonce_loss(coarse_scores, batch.image_ids, self.config.margin)
        fine_scores = self.fine_score_matrix(speech, image)[:, target]  # [B, M] -> [B, B]
        fine = margin_infonce_loss(fine_scores, batch.image_ids, self.config.margin)
        return StepOutput(losses={"coarse": self.config.coarse_weight * coarse,
                                  "fine": self.config.fine_weight * fine})


register_model("fast_vgs")(FastVGS)
register_model(
    "fast_vgs_tiny",
    config=FastVGSConfig(
        speech=dataclasses.replace(default_speech_tower(), num_layers=2),
        layer=BertLayerConfig(hidden_size=32, num_heads=2, ffn_dim=64, dropout=0.0, attention_dropout=0.0),
        resdavenet_widths=(16, 16, 16, 32, 32),
        resdavenet_blocks=(1, 1, 1, 1),
        audio_layers=1,
        visual_layers=2,
        cross_layers=2,
    ),
)(FastVGS)
register_model(
    "fast_vgs_scenes",
    config=FastVGSConfig(
        speech_frontend="logmel_cnn",
        speech_cnn=AudioCNNConfig(features=LogMelConfig(n_mels=40), stem_channels=(96,), channels=(128,),
                                  depths=(1,), strides=(1,)),
        layer=BertLayerConfig(hidden_size=128, num_heads=4, ffn_dim=512),
        resdavenet_widths=(64, 64, 96, 128, 128),
        resdavenet_blocks=(1, 1, 1, 1),
        audio_layers=1,
        visual_layers=2,
        cross_layers=2,
        region_feat_dim=1280,
        visual_cls_std=0.02,
    ),
)(FastVGS)
