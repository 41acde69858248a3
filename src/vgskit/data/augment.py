"""Train-time image augmentation, separate from the deterministic evaluation transform.

Image towers are trained on random crops and mirror images (torchvision's ``RandomResizedCrop`` followed by
``RandomHorizontalFlip``), while evaluation resizes the whole image the same way every time
(:class:`~vgskit.images.ImageTransform`). Training on the evaluation view alone over-fits the few images of a
spoken-caption corpus, which is why papers augment.

The training dataset decodes each image once into a uint8 ``[S, S, 3]`` array at the model's size, because
decoding files on every step costs more than a training step on two CPU cores. :func:`augment_image` therefore
works on that stored array: it samples a window of it with ``RandomResizedCrop``'s rule and resizes the window
back to ``S x S``. Cropping the already-resized image instead of the original file loses some resolution on
small windows; that is the price of preloading.

Randomness
----------
Everything random comes from the generator passed in. :func:`augment_rng` derives it from
``(seed, epoch, index)`` alone, with its own stream word :data:`AUGMENT_STREAM`, so the augmentation of
caption ``index`` in epoch ``epoch`` does not depend on the process (DDP rank), the DataLoader worker, the
number of workers or where a run was resumed, and never shares draws with the random audio crop
(``CROP_STREAM`` in :mod:`vgskit.data.loader`) of the same caption.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vgskit.errors import ConfigError
from vgskit.images import resample_filter

__all__ = [
    "AUGMENTATIONS",
    "AUGMENT_STREAM",
    "AugmentConfig",
    "augment_image",
    "augment_rng",
    "crop_window",
]

#: ``"none"`` leaves the stored image as it is; ``"crop_flip"`` is RandomResizedCrop + horizontal flip.
AUGMENTATIONS: tuple[str, ...] = ("none", "crop_flip")
#: Last entropy word of the augmentation seed ("augm" in ASCII), different from the audio crop's ``CROP_STREAM``
#: ("crop") and from the batch sampler's ``default_rng([seed, epoch])``, so the three never share draws.
AUGMENT_STREAM = 0x6175676D
#: Window draws before falling back to the central crop, as in torchvision.
CROP_ATTEMPTS = 10


def _pair(value: object, name: str) -> tuple[float, float]:
    """``value`` as two finite floats (YAML and JSON give lists; a tuple keeps the config hashable)."""
    try:
        low, high = (float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise ConfigError(f"AugmentConfig.{name} must be two numbers (low, high), got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"AugmentConfig.{name} must be finite, got {value!r}")
    return low, high


@dataclass(frozen=True)
class AugmentConfig:
    """Which train-time augmentation to apply, with torchvision's ``RandomResizedCrop`` defaults.

    ``scale``: the range of the window's area as a fraction of the image's area. ``ratio``: the range of the
    window's aspect ratio (width / height), sampled uniformly in log space so that 3:4 and 4:3 are equally
    likely. ``flip``: mirror the result left-right with probability 0.5. ``scale`` and ``ratio`` are only
    used by ``kind="crop_flip"``.
    """

    kind: str = "none"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in AUGMENTATIONS:
            raise ConfigError(f"AugmentConfig.kind must be one of {AUGMENTATIONS}, got {self.kind!r}")
        scale = _pair(self.scale, "scale")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"AugmentConfig.scale must satisfy 0 < low <= high <= 1, got {self.scale!r}")
        ratio = _pair(self.ratio, "ratio")
        if not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"AugmentConfig.ratio must satisfy 0 < low <= high, got {self.ratio!r}")
        if not isinstance(self.flip, bool):
            raise ConfigError(f"AugmentConfig.flip must be true or false, got {self.flip!r}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)


def augment_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of caption ``index``'s augmentation in epoch ``epoch`` of a run seeded with ``seed``.

    A pure function of its three arguments, so every process, loader worker and resumed run draws the same
    augmentation for the same caption and epoch, and each epoch draws a new one.
    """
    words = []
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        try:
            word = operator.index(value)
        except TypeError:
            raise ConfigError(f"augment_rng: {name} must be an integer, got {value!r}") from None
        if word < 0:
            raise ConfigError(f"augment_rng: {name} must be >= 0, got {word}")
        words.append(word)
    return np.random.default_rng([*words, AUGMENT_STREAM])


def crop_window(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """Sample a crop window ``(top, left, h, w)`` of a ``height x width`` image with RandomResizedCrop's rule.

    Up to :data:`CROP_ATTEMPTS` times: draw an area ``U(scale) * height * width`` and an aspect ratio
    ``exp(U(log ratio))``, round ``w = sqrt(area * ratio)`` and ``h = sqrt(area / ratio)``, and if the window
    fits draw its top row, then its left column, uniformly among the positions where it fits. If no attempt
    fits, fall back to the central crop of the largest window whose aspect ratio is clamped into ``ratio``
    (the whole image when its own ratio is inside). The draws are made in this order from ``rng``, one
    ``uniform`` for the area, one for the log-ratio, then ``integers`` for top and left.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_image(
    image: np.ndarray, config: AugmentConfig, rng: np.random.Generator, *, interpolation: str = "bilinear"
) -> np.ndarray:
    """Apply ``config``'s augmentation to a preloaded uint8 image ``[H, W, 3]`` (``[S, S, 3]`` in training).

    ``"none"`` returns ``image`` itself, unchanged and without drawing from ``rng``. ``"crop_flip"`` returns a
    new contiguous uint8 array of the same shape: the window :func:`crop_window` samples, resized back to
    ``W x H`` with ``interpolation`` (PIL's filter, as torchvision uses on PIL images; torchvision's default is
    bilinear), then, when ``config.flip``, mirrored left-right if ``rng.random() < 0.5``.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ConfigError(f"augment_image: expected a uint8 array [H, W, 3], got {got}")
    resample = resample_filter(interpolation, field="augment_image: interpolation")
    if config.kind == "none":
        return image
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ConfigError(f"augment_image: empty image {list(image.shape)}")
    top, left, h, w = crop_window(height, width, config.scale, config.ratio, rng)
    window = image[top : top + h, left : left + w]
    if (h, w) == (height, width):
        out = np.array(window)  # the whole image: resizing to its own size would only copy it
    else:
        out = np.array(Image.fromarray(np.ascontiguousarray(window)).resize((width, height), resample))
    if config.flip and rng.random() < 0.5:
        out = np.ascontiguousarray(out[:, ::-1])
    return out
