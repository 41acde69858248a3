"""MILAN (Sanabria, Waters & Baldridge, Interspeech 2021): a ResNet-50-style audio encoder over MFCC, filterbank or
self-supervised frames ⟷ an ImageNet-pretrained EfficientNet, trained with the in-batch bidirectional softmax
(``milan``, ``milan_small``); the text dual encoder of its transcription-based comparison (``milan_text``,
``milan_text_small``) and the speech → ASR → text cascade built on it (``asr_cascade``)."""

from vgskit.models.milan import evaluations  # noqa: F401  (registers the asr_wer evaluation)
from vgskit.models.milan.blocks import Bottleneck1d, ResNet1d, ResNet1dConfig, ShallowCNN, ShallowCNNConfig
from vgskit.models.milan.cascade import AsrCascade, AsrCascadeConfig, AsrConfig
from vgskit.models.milan.clip_text import ClipTextZeroShot, ClipTextZeroShotConfig
from vgskit.models.milan.frontends import FrontendConfig, MilanFrontend, dct_ii_matrix, mfcc
from vgskit.models.milan.model import ImageTowerConfig, Milan, MilanConfig, build_image_tower
from vgskit.models.milan.text import MilanText, MilanTextConfig, TextTower

__all__ = [
    "AsrCascade",
    "AsrCascadeConfig",
    "AsrConfig",
    "ClipTextZeroShot",
    "ClipTextZeroShotConfig",
    "Bottleneck1d",
    "FrontendConfig",
    "ImageTowerConfig",
    "Milan",
    "MilanConfig",
    "MilanFrontend",
    "MilanText",
    "MilanTextConfig",
    "ResNet1d",
    "ResNet1dConfig",
    "ShallowCNN",
    "ShallowCNNConfig",
    "TextTower",
    "build_image_tower",
    "dct_ii_matrix",
    "mfcc",
]
