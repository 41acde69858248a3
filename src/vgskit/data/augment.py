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

RandAugment
-----------
``AugmentConfig.randaugment`` (a :class:`RandAugmentConfig`, e.g. ``{kind: crop_flip, randaugment: {num_ops: 2,
magnitude: 9}}`` in a recipe) adds RandAugment (Cubuk et al., CVPR 2020; used by SG-MIM and other ViT recipes) after
the kind's crop and flip (the order of the usual ViT training pipelines: RandomResizedCrop, RandomHorizontalFlip,
RandAugment). Every model reading pixels can use it. RandAugment needs ``kind: crop_flip``: the training data
pipeline treats ``kind: none`` as "no augmentation at all", so RandAugment alone would silently never run. For each
image, ``num_ops`` operations are drawn uniformly, with replacement, from :data:`RANDAUGMENT_OPS` and applied one
after the other at magnitude bin ``magnitude`` of ``num_magnitude_bins``, each magnitude with a random sign where the
operation is signed. The
magnitude ranges are torchvision's (``RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31)`` defaults); the
geometric operations are PIL affine transforms about the top-left corner, as in the original implementation, with
black fill.

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
from PIL import Image, ImageEnhance, ImageOps

from vgskit.errors import ConfigError
from vgskit.images import resample_filter

__all__ = [
    "AUGMENTATIONS",
    "AUGMENT_STREAM",
    "RANDAUGMENT_OPS",
    "AugmentConfig",
    "RandAugmentConfig",
    "augment_image",
    "augment_rng",
    "color_jitter",
    "crop_window",
    "rand_augment",
]

#: ``"none"`` leaves the stored image as it is; ``"crop_flip"`` is RandomResizedCrop + horizontal flip (either may
#: be followed by RandAugment, see :attr:`AugmentConfig.randaugment`).
AUGMENTATIONS: tuple[str, ...] = ("none", "crop_flip")
#: RandAugment's operations (torchvision's list, the paper's 14 transformations).
RANDAUGMENT_OPS: tuple[str, ...] = (
    "identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
    "sharpness", "posterize", "solarize", "autocontrast", "equalize",
)
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
class RandAugmentConfig:
    """RandAugment's settings (torchvision's defaults).

    Attributes:
        num_ops: operations applied to each image, drawn with replacement from :data:`RANDAUGMENT_OPS`.
        magnitude: the strength bin of every operation, ``0 .. num_magnitude_bins - 1``.
        num_magnitude_bins: the number of strength bins (the ranges of :func:`rand_augment` are split into them).
    """

    num_ops: int = 2
    magnitude: int = 9
    num_magnitude_bins: int = 31

    def __post_init__(self) -> None:
        for name, low in (("num_ops", 0), ("magnitude", 0), ("num_magnitude_bins", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"RandAugmentConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.magnitude >= self.num_magnitude_bins:
            raise ConfigError(f"RandAugmentConfig.magnitude must be below num_magnitude_bins={self.num_magnitude_bins} "
                              f"(it is a bin index), got {self.magnitude}")


@dataclass(frozen=True)
class AugmentConfig:
    """Which train-time augmentation to apply, with torchvision's ``RandomResizedCrop`` defaults.

    ``scale``: the range of the window's area as a fraction of the image's area. ``ratio``: the range of the
    window's aspect ratio (width / height), sampled uniformly in log space so that 3:4 and 4:3 are equally
    likely. ``flip``: mirror the result left-right with probability 0.5. ``scale``, ``ratio`` and ``flip`` are
    used by ``kind="crop_flip"``. ``brightness`` / ``saturation``: after the crop and flip, the brightness and
    then the saturation are scaled by factors drawn uniformly from ``[max(0, 1 - b), 1 + b]`` (torchvision's
    ``ColorJitter`` ranges, applied with PIL's ``ImageEnhance`` as torchvision does for PIL images, in this fixed
    order); 0 leaves them alone and draws nothing, so configurations without them augment exactly as before
    (MILAN: "random brightening and saturation"). ``randaugment``: RandAugment applied after the kind's
    augmentation (``None``: none).
    """

    kind: str = "none"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    brightness: float = 0.0
    saturation: float = 0.0
    randaugment: RandAugmentConfig | None = None

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
        for name in ("brightness", "saturation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 10:
                raise ConfigError(f"AugmentConfig.{name} must be a number in [0, 10), got {value!r}")
            if value and self.kind == "none":
                raise ConfigError(f"AugmentConfig.{name}: colour jitter follows the random resized crop; set "
                                  "kind: crop_flip with it (kind: none means no train-time augmentation at all)")
        randaugment = self.randaugment
        if isinstance(randaugment, dict):  # JSON / YAML give a mapping
            unknown = sorted(set(randaugment) - {"num_ops", "magnitude", "num_magnitude_bins"})
            if unknown:
                raise ConfigError(f"AugmentConfig.randaugment: unknown key(s) {unknown}; valid keys are num_ops, "
                                  "magnitude, num_magnitude_bins")
            randaugment = RandAugmentConfig(**randaugment)
        if randaugment is not None and not isinstance(randaugment, RandAugmentConfig):
            raise ConfigError(f"AugmentConfig.randaugment must be null or a mapping with num_ops, magnitude, "
                              f"num_magnitude_bins, got {self.randaugment!r}")
        if randaugment is not None and self.kind == "none":
            raise ConfigError("AugmentConfig.randaugment: RandAugment follows the random resized crop; set "
                              "kind: crop_flip with it (kind: none means no train-time augmentation at all)")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "randaugment", randaugment)

    @property
    def active(self) -> bool:
        """Whether the configuration changes any pixel (RandAugment always comes with a crop kind)."""
        return self.kind != "none" or self.randaugment is not None


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
    bilinear), then, when ``config.flip``, mirrored left-right if ``rng.random() < 0.5``. With
    ``config.randaugment`` (``"crop_flip"`` only) the result then goes through :func:`rand_augment`
    (the crop's draws come first from ``rng``).
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ConfigError(f"augment_image: expected a uint8 array [H, W, 3], got {got}")
    resample = resample_filter(interpolation, field="augment_image: interpolation")
    if not config.active:
        return image
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ConfigError(f"augment_image: empty image {list(image.shape)}")
    out = image
    if config.kind == "crop_flip":
        top, left, h, w = crop_window(height, width, config.scale, config.ratio, rng)
        window = image[top : top + h, left : left + w]
        if (h, w) == (height, width):
            out = np.array(window)  # the whole image: resizing to its own size would only copy it
        else:
            out = np.array(Image.fromarray(np.ascontiguousarray(window)).resize((width, height), resample))
        if config.flip and rng.random() < 0.5:
            out = np.ascontiguousarray(out[:, ::-1])
        if config.brightness or config.saturation:
            out = color_jitter(out, config.brightness, config.saturation, rng)
    if config.randaugment is not None:
        ra = config.randaugment
        out = rand_augment(out, ra.num_ops, ra.magnitude, rng, ra.num_magnitude_bins)
    return out


def color_jitter(image: np.ndarray, brightness: float, saturation: float, rng: np.random.Generator) -> np.ndarray:
    """Scale brightness then saturation of a uint8 ``[H, W, 3]`` image by factors drawn from ``[max(0, 1 - x),
    1 + x]`` (a zero ``x`` draws nothing and changes nothing)."""
    pil = Image.fromarray(image)
    if brightness:
        pil = ImageEnhance.Brightness(pil).enhance(float(rng.uniform(max(0.0, 1 - brightness), 1 + brightness)))
    if saturation:
        pil = ImageEnhance.Color(pil).enhance(float(rng.uniform(max(0.0, 1 - saturation), 1 + saturation)))
    return np.asarray(pil)


def _magnitude(op: str, level: int, bins: int, height: int, width: int) -> float:
    """The strength of ``op`` at bin ``level`` of ``bins`` (torchvision's ranges for RandAugment)."""
    frac = level / (bins - 1)  # position in torchvision's linspace(0, top, bins)
    if op in ("shear_x", "shear_y"):
        return 0.3 * frac
    if op == "translate_x":
        return 150.0 / 331.0 * width * frac
    if op == "translate_y":
        return 150.0 / 331.0 * height * frac
    if op == "rotate":
        return 30.0 * frac
    if op in ("brightness", "color", "contrast", "sharpness"):
        return 0.9 * frac
    if op == "posterize":
        return float(8 - int(round(level / ((bins - 1) / 4))))  # bits kept: 8 down to 4
    if op == "solarize":
        return 255.0 * (1.0 - frac)  # threshold: 255 (no change) down to 0
    return 0.0


_SIGNED = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast", "sharpness"}
_ENHANCE = {"brightness": ImageEnhance.Brightness, "color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
            "sharpness": ImageEnhance.Sharpness}


def _apply_op(img: Image.Image, op: str, v: float) -> Image.Image:
    fill = (0, 0, 0)
    if op == "shear_x":
        return img.transform(img.size, Image.Transform.AFFINE, (1, v, 0, 0, 1, 0), Image.Resampling.NEAREST,
                             fillcolor=fill)
    if op == "shear_y":
        return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, v, 1, 0), Image.Resampling.NEAREST,
                             fillcolor=fill)
    if op == "translate_x":
        return img.transform(img.size, Image.Transform.AFFINE, (1, 0, int(round(v)), 0, 1, 0),
                             Image.Resampling.NEAREST, fillcolor=fill)
    if op == "translate_y":
        return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, int(round(v))),
                             Image.Resampling.NEAREST, fillcolor=fill)
    if op == "rotate":
        return img.rotate(v, resample=Image.Resampling.NEAREST, fillcolor=fill)
    if op in _ENHANCE:
        return _ENHANCE[op](img).enhance(1.0 + v)
    if op == "posterize":
        return ImageOps.posterize(img, int(v))
    if op == "solarize":
        return ImageOps.solarize(img, int(round(v)))
    if op == "autocontrast":
        return ImageOps.autocontrast(img)
    if op == "equalize":
        return ImageOps.equalize(img)
    return img  # identity


def rand_augment(image: np.ndarray, num_ops: int, magnitude: int, rng: np.random.Generator,
                 num_magnitude_bins: int = 31) -> np.ndarray:
    """RandAugment of a uint8 image ``[H, W, 3]``: ``num_ops`` operations drawn from :data:`RANDAUGMENT_OPS`.

    For each operation, in this order from ``rng``: ``integers`` picks the operation, then, for a signed one,
    ``random() < 0.5`` makes its magnitude negative (torchvision's draws, from our generator instead of torch's).
    Returns a new contiguous uint8 array of the same shape.
    """
    height, width = image.shape[:2]
    img = Image.fromarray(np.ascontiguousarray(image))
    for _ in range(num_ops):
        op = RANDAUGMENT_OPS[int(rng.integers(len(RANDAUGMENT_OPS)))]
        v = _magnitude(op, magnitude, num_magnitude_bins, height, width)
        if op in _SIGNED and rng.random() < 0.5:
            v = -v
        img = _apply_op(img, op, v)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
