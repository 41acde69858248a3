"""MILAN (Sanabria, Waters & Baldridge, Interspeech 2021): a ResNet-50-style audio encoder over MFCC, filterbank or
self-supervised frames ⟷ an ImageNet-pretrained EfficientNet, trained with the in-batch bidirectional softmax
(``milan``, ``milan_small``)."""

from vgskit.models.milan.blocks import Bottleneck1d, ResNet1d, ResNet1dConfig, ShallowCNN, ShallowCNNConfig
from vgskit.models.milan.frontends import FrontendConfig, MilanFrontend, dct_ii_matrix, mfcc
from vgskit.models.milan.model import ImageTowerConfig, Milan, MilanConfig, build_image_tower

__all__ = [
    "Bottleneck1d",
    "FrontendConfig",
    "ImageTowerConfig",
    "Milan",
    "MilanConfig",
    "MilanFrontend",
    "ResNet1d",
    "ResNet1dConfig",
    "ShallowCNN",
    "ShallowCNNConfig",
    "build_image_tower",
    "dct_ii_matrix",
    "mfcc",
]
