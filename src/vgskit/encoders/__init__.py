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
