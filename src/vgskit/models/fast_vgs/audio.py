"""FaST-VGS audio stage: the ResDAVEnet that down-samples wav2vec2 frames before the audio BERT layer.

FaST-VGS (Peng & Harwath, ICASSP 2022) runs a small convolutional ResNet over the 768-d frames of the first
8 wav2vec2 layers: ``Linear(768→128) → BatchNorm → ReLU`` followed by 4 stages of 2 basic blocks with
``(1, 9)`` convolutions, widths 128/256/512/768 and stride 2 per stage, i.e. 16× fewer frames. It shortens
the sequence the cross-modal layers attend over, which is what makes the fine (cross-encoder) scores cheap
enough for re-ranking.

The module keeps the reference's ``[B, C, 1, T]`` layout and ``BatchNorm2d`` so that train-mode batch
statistics and running-stat updates are bit-for-bit those of the public code (a ``BatchNorm1d`` over
``[B, C, T]`` computes the same maths, but not necessarily in the same summation order). Reference
state-dict keys (``linear.*``, ``bn1.*``, ``layerS.J.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}.*``)
load through :func:`load_resdavenet_reference_state_dict`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vgskit.errors import ConfigError

__all__ = [
    "ResDAVEnet",
    "ResDAVEnetConfig",
    "SpeechBasicBlock",
    "load_renamed_state_dict",
    "load_resdavenet_reference_state_dict",
    "resdavenet_key_from_reference",
    "resdavenet_output_frames",
]


@dataclass(frozen=True)
class ResDAVEnetConfig:
    """Sizes of the ResDAVEnet; the defaults are the FaST-VGS ones (the reference hard-codes them).

    ``widths[0]`` is the width after the input projection, ``widths[s + 1]`` the width of stage ``s``.
    """

    in_dim: int = 768
    widths: tuple[int, ...] = (128, 128, 256, 512, 768)
    blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    kernel_size: int = 9
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1

    def __post_init__(self) -> None:
        stages = len(self.blocks_per_stage)
        if len(self.widths) != stages + 1 or len(self.strides) != stages:
            raise ConfigError(
                f"ResDAVEnet: widths needs {stages + 1} entries and strides {stages} for {stages} stages, "
                f"got widths={self.widths}, strides={self.strides}"
            )
        if self.kernel_size % 2 != 1:
            raise ConfigError(
                f"ResDAVEnet: kernel_size must be odd to keep frames centred, got {self.kernel_size}"
            )
        if min(self.blocks_per_stage) < 1 or min(self.strides) < 1:
            raise ConfigError("ResDAVEnet: every stage needs at least one block and a stride >= 1")


def resdavenet_output_frames(frames: int, strides: tuple[int, ...] = (2, 2, 2, 2)) -> int:
    """Frames left after the network: each stride-``s`` stage maps ``T → ceil(T / s)`` (kernel 9, padding 4).

    Kept as a function because the dual encoder needs the pooling ratio to shorten the padding mask.
    """
    for stride in strides:
        frames = (frames - 1) // stride + 1
    return frames


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Conv2d:
    # A (1, k) kernel over [B, C, 1, T]: a 1-D convolution along time in the reference's 2-D layout.
    return nn.Conv2d(
        in_ch, out_ch, kernel_size=(1, kernel), stride=(1, stride), padding=(0, kernel // 2), bias=False
    )


class SpeechBasicBlock(nn.Module):
    """ResNet basic block along time: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is a strided ``1×1`` conv + BatchNorm whenever the stride or the width changes, as in the
    reference, so that the residual sum has matching shapes.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, eps: float, momentum: float
    ) -> None:
        super().__init__()
        self.conv1 = _conv(in_ch, out_ch, kernel, stride)
        self.norm1 = nn.BatchNorm2d(out_ch, eps=eps, momentum=momentum)
        self.conv2 = _conv(out_ch, out_ch, kernel, 1)
        self.norm2 = nn.BatchNorm2d(out_ch, eps=eps, momentum=momentum)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=(1, stride), bias=False),
                nn.BatchNorm2d(out_ch, eps=eps, momentum=momentum),
            )

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, C_in, 1, T] -> [B, C_out, 1, ceil(T / stride)]
        residual = x if self.shortcut is None else self.shortcut(x)  # [B, C_out, 1, T']
        out = self.relu(self.norm1(self.conv1(x)))  # [B, C_out, 1, T']
        out = self.norm2(self.conv2(out))  # [B, C_out, 1, T']
        return self.relu(out + residual)  # [B, C_out, 1, T']


class ResDAVEnet(nn.Module):
    """Frame features ``[B, T, in_dim]`` → down-sampled features ``[B, T_out, widths[-1]]``.

    Padding frames are not masked: like the reference, BatchNorm statistics in training include them, so a
    batch padded differently gives slightly different outputs. The caller shortens its lengths with
    :func:`resdavenet_output_frames` (or the reference's ``round(T_in / T_out)`` pooling ratio).
    """

    def __init__(self, config: ResDAVEnetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or ResDAVEnetConfig()
        self.input_proj = nn.Linear(cfg.in_dim, cfg.widths[0])
        self.input_norm = nn.BatchNorm2d(cfg.widths[0], eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Sequential] = []
        for s, (n_blocks, stride) in enumerate(zip(cfg.blocks_per_stage, cfg.strides, strict=True)):
            in_ch, out_ch = cfg.widths[s], cfg.widths[s + 1]
            blocks = [
                SpeechBasicBlock(
                    in_ch if b == 0 else out_ch,
                    out_ch,
                    cfg.kernel_size,
                    stride if b == 0 else 1,
                    cfg.bn_eps,
                    cfg.bn_momentum,
                )
                for b in range(n_blocks)
            ]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init: convs ``N(0, sqrt(2 / (k_h·k_w·C_out)))``, BatchNorm weight 1 / bias 0.

        The input Linear keeps PyTorch's default init, as in the reference.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, T, in_dim]
        h = self.input_proj(x)  # [B, T, widths[0]]
        h = h.transpose(1, 2).unsqueeze(2)  # [B, widths[0], 1, T]
        h = self.relu(self.input_norm(h))  # [B, widths[0], 1, T]
        for stage in self.stages:
            h = stage(h)  # [B, widths[s+1], 1, ceil(T / stride_s)]
        return h.squeeze(2).transpose(1, 2)  # [B, T_out, widths[-1]]


_BLOCK_RENAMES = {
    "conv1": "conv1",
    "bn1": "norm1",
    "conv2": "conv2",
    "bn2": "norm2",
    "downsample.0": "shortcut.0",
    "downsample.1": "shortcut.1",
}
_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.(conv1|bn1|conv2|bn2|downsample\.[01])\.(\w+)$")
_TOP_RENAMES = {"linear.": "input_proj.", "bn1.": "input_norm."}


def resdavenet_key_from_reference(key: str) -> str | None:
    """Our parameter name for a reference ``ResDavenet`` state-dict key, or ``None`` if it is not one.

    ``layerS.J.bn1.weight`` → ``stages.{S-1}.J.norm1.weight``; ``linear.*`` → ``input_proj.*``;
    top-level ``bn1.*`` → ``input_norm.*``.
    """
    match = _BLOCK_KEY.match(key)
    if match is not None:
        stage, block, part, leaf = match.groups()
        if int(stage) < 1:
            return None
        return f"stages.{int(stage) - 1}.{block}.{_BLOCK_RENAMES[part]}.{leaf}"
    for old, new in _TOP_RENAMES.items():
        if key.startswith(old) and "." not in key[len(old) :]:
            return new + key[len(old) :]
    return None


def load_renamed_state_dict(
    module: nn.Module, params: Mapping[str, Tensor], rename: Callable[[str], str | None], family: str
) -> None:
    """Strictly load ``params`` (reference names) into ``module`` through ``rename`` (reference → ours).

    Shared by the FaST-VGS blocks' reference loaders. Nothing is dropped silently: keys that ``rename``
    rejects or that the module lacks are "unexpected", module entries left unfilled are "missing".

    Raises:
        ConfigError: naming every missing (our names) and unexpected (reference names) key.
    """
    ours = set(module.state_dict())
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in params.items():
        name = rename(key)
        if name is None or name not in ours:
            unexpected.append(key)
        else:
            mapped[name] = value
    missing = sorted(ours - set(mapped))
    if missing or unexpected:
        raise ConfigError(
            f"{family} reference state dict does not fit the module: missing {missing} (our names), "
            f"unexpected {sorted(unexpected)} (reference names)"
        )
    with torch.no_grad():
        module.load_state_dict(mapped, strict=True)


def load_resdavenet_reference_state_dict(module: ResDAVEnet, params: Mapping[str, Tensor]) -> None:
    """Load a reference ``ResDavenet`` state dict (BatchNorm running stats included) into ``module``.

    Every key must map and every parameter/buffer of ``module`` must be provided: a partial load would
    silently leave random convolutions or fresh running statistics behind.

    Raises:
        ConfigError: naming the missing (ours) and unexpected (reference) keys; shape mismatches surface
            from :meth:`torch.nn.Module.load_state_dict`.
    """
    load_renamed_state_dict(module, params, resdavenet_key_from_reference, "ResDAVEnet")
