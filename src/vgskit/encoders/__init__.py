"""Speech and image encoders.

Contracts (kept narrow so models can swap encoders):

* speech: ``encoder(wavs[B,T], lengths[B]) -> SpeechEncoderOutput`` (frames ``[B,T',D]``, frame lengths,
  frame rate, optional per-layer states);
* image: ``encoder(pixels[B,3,H,W]) -> ImageEncoderOutput`` (tokens ``[B,N,D]``, pooled ``[B,D]``).

Both expose ``width`` (the output dimension) and ``config`` (a dataclass).
"""

from vgskit.encoders.audio_cnn import AudioCNNConfig, AudioCNNEncoder
from vgskit.encoders.image_cnn import ImageCNNConfig, ImageCNNEncoder
from vgskit.layers import ImageEncoderOutput, SpeechEncoderOutput

__all__ = [
    "AudioCNNConfig",
    "AudioCNNEncoder",
    "ImageCNNConfig",
    "ImageCNNEncoder",
    "ImageEncoderOutput",
    "SpeechEncoderOutput",
]

# Pretrained towers (need the ``pretrained`` extra only when instantiated: transformers is imported lazily).
from vgskit.encoders.efficientnet import EfficientNetLite0Encoder  # noqa: E402
from vgskit.encoders.hub import KNOWN_TOWERS, MissingWeightsError, offline_mode, resolve_tower  # noqa: E402
from vgskit.encoders.pretrained_image import PretrainedImageConfig, PretrainedImageEncoder  # noqa: E402
from vgskit.encoders.pretrained_speech import (  # noqa: E402
    PretrainedSpeechConfig,
    PretrainedSpeechEncoder,
    PretrainedSpeechOutput,
    SpeechPreprocessing,
    WeightedLayerSum,
)
from vgskit.encoders.regions import RegionFeatureReader, RegionFeatures  # noqa: E402
from vgskit.encoders.text import ClipTextConfig, ClipTextEncoder, TextEncoderOutput  # noqa: E402

__all__ += [
    "KNOWN_TOWERS",
    "ClipTextConfig",
    "ClipTextEncoder",
    "EfficientNetLite0Encoder",
    "MissingWeightsError",
    "PretrainedImageConfig",
    "PretrainedImageEncoder",
    "PretrainedSpeechConfig",
    "PretrainedSpeechEncoder",
    "PretrainedSpeechOutput",
    "RegionFeatureReader",
    "RegionFeatures",
    "SpeechPreprocessing",
    "TextEncoderOutput",
    "WeightedLayerSum",
    "offline_mode",
    "resolve_tower",
]
