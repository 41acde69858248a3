"""Loading, checking and preprocessing images.

:func:`load_image` returns a fully decoded RGB image or raises :class:`~vgskit.errors.ImageError` naming the
file. Decoding is forced at load time because PIL decodes lazily: a truncated JPEG would otherwise open fine
and fail (or, with ``ImageFile.LOAD_TRUNCATED_IMAGES``, be silently padded with grey) much later, inside a data
loader worker. vgskit never enables that flag, so truncated files are reported instead of trained on.

Images with transparency are composited on a white background (see :func:`load_image`). ``vgskit data check``
runs :func:`probe_image`, the header part of the same checks with the same limits, so it refuses what training
refuses.

:class:`ImageTransform` is the image preprocessing as plain data, serialisable to JSON so it can be saved
next to model weights: an encoder is only meaningful together with the exact resize and normalisation that
produced its training inputs.
"""

from __future__ import annotations

import json
import threading
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vgskit.errors import ConfigError, ImageError

__all__ = [
    "ALPHA_BACKGROUND",
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "ImageTransform",
    "load_image",
    "load_image_tensor",
    "probe_image",
    "resample_filter",
]

#: Training, caching and ``vgskit data check`` refuse images with more pixels than this (checked on the header,
#: before any pixel is decoded). Below PIL's own decompression-bomb threshold (~89 M pixels), so PIL never warns.
DEFAULT_MAX_PIXELS = 64_000_000
#: Colour transparent pixels are composited on (white): the background a transparent PNG is shown on.
ALPHA_BACKGROUND = (255, 255, 255)
# ``shorter_side_center_crop`` resizes the whole image before cropping only while that intermediate image holds
# at most this many output-sized squares (or fewer pixels than the source); beyond it (aspect ratios past
# 16:1, e.g. a 60000x1 strip whose intermediate would take ~9 GB) only the region kept is resampled.
_MAX_INTERMEDIATE_SQUARES = 16
# Last bytes of a complete file: a JPEG ends with the EOI marker, a PNG with its IEND chunk (and CRC).
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND\xaeB`\x82"
# Bytes some writers pad a file with after its end marker.
_PADDING = b"\x00\r\n\t "
# Image.open warns (DecompressionBombWarning) on large images before vgskit's own max_pixels check can refuse
# them with a clear error. The warning filter is process-wide state, so opening is serialised while the filter
# is changed: ``data check`` opens headers from several threads.
_OPEN_LOCK = threading.Lock()
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ResizeMode = Literal["shorter_side_center_crop", "squash"]
RESIZE_MODES: tuple[str, ...] = ("shorter_side_center_crop", "squash")
_INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}
#: The interpolation names every resize in vgskit accepts (evaluation transform and training augmentation).
INTERPOLATIONS: tuple[str, ...] = tuple(_INTERPOLATIONS)


def resample_filter(interpolation: str, *, field: str = "interpolation") -> Image.Resampling:
    """Return the PIL filter named ``interpolation``; a :class:`ConfigError` naming ``field`` otherwise.

    Shared so that the training augmentation and :class:`ImageTransform` accept the same names and resize
    the same way: a model trained on one filter and evaluated with another sees slightly different pixels.
    """
    try:
        return _INTERPOLATIONS[interpolation]
    except (KeyError, TypeError):
        raise ConfigError(f"{field} must be one of {INTERPOLATIONS}, got {interpolation!r}") from None


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparency (an alpha channel, or a palette/colour key marked transparent) is composited over a white
    background (:data:`ALPHA_BACKGROUND`), the way the image is shown to people. Dropping the alpha channel
    instead would expose whatever colour the file stores under transparent pixels: often black, sometimes
    leftover image content the alpha hides; a fully transparent image would become an arbitrary picture.
    """
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # PIL's convert() clips 16-bit/32-bit grey to 0..255 instead of rescaling, turning most 16-bit PNGs
        # white; rescale the full range to 8 bits instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _check_max_pixels(max_pixels: int) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ConfigError(f"max_pixels must be a positive integer, got {max_pixels!r}")


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    """Open ``path`` (header only) and check its size against ``max_pixels``; the caller closes the image."""
    if not path.exists():
        raise ImageError(path, "file not found")
    if not path.is_file():
        raise ImageError(path, "is not a regular file (is it a directory?)")
    if path.stat().st_size == 0:
        raise ImageError(path, "file is empty (0 bytes)")
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as exc:
        # PIL's own guard (at 2 * Image.MAX_IMAGE_PIXELS) fires inside open() before our check below.
        raise ImageError(
            path, f"too large: {exc} (PIL refuses such images outright; vgskit's limit is max_pixels={max_pixels})"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(path, "not an image, or an image format PIL cannot read") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(path, f"unreadable image header ({exc})") from exc
    width, height = img.size
    problem = None
    if width <= 0 or height <= 0:
        problem = f"zero-size image ({width}x{height} pixels)"
    elif width * height > max_pixels:
        problem = (f"too large: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}; "
                   "pass a larger max_pixels or downscale the image")
    if problem is not None:
        img.close()
        raise ImageError(path, problem)
    return img


def _decode(img: Image.Image, path: Path) -> None:
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"too large: {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # PIL reports truncation as OSError("image file is truncated ..."); other decoder failures use
        # several exception types depending on the plugin.
        raise ImageError(path, f"truncated or corrupt image data ({exc})") from exc


def _has_end_marker(path: Path, image_format: str | None) -> bool | None:
    """Whether a JPEG/PNG file ends with its end marker (``None``: another format, not checked)."""
    marker = {"JPEG": _JPEG_END, "MPO": _JPEG_END, "PNG": _PNG_END}.get(image_format or "")
    if marker is None:
        return None
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        tail = f.read()
    return tail.rstrip(_PADDING).endswith(marker)


def probe_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Check ``path`` as :func:`load_image` would, without decoding its pixels; return ``(width, height)``.

    The header checks are exactly those of :func:`load_image` (file present and non-empty, a readable image,
    no zero side, at most ``max_pixels`` pixels). Truncation, which only a full decode proves, is caught
    cheaply for JPEG and PNG: a complete JPEG ends with the EOI marker (``FF D9``) and a complete PNG with its
    ``IEND`` chunk. A file that lacks its end marker is decoded in full, so one that merely carries extra
    bytes after its image data is accepted and a cut one is refused with the decoder's reason. Other formats
    are checked on the header only; corrupt pixel data inside a complete file also needs a full decode.

    Raises:
        ImageError: as :func:`load_image`; the message names the file.
    """
    _check_max_pixels(max_pixels)
    path = Path(path)
    img = _open_checked(path, max_pixels)
    with img:
        try:
            complete = _has_end_marker(path, img.format)
        except OSError as exc:
            raise ImageError(path, f"cannot read the file ({exc.strerror or exc})") from exc
        if complete is False:
            _decode(img, path)
        return img.size


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path``, fully decode it and return it as an RGB image.

    The pixel count is checked from the header before decoding, so an oversized (or maliciously crafted)
    image is rejected without allocating its pixels. Transparent pixels are composited over white
    (:data:`ALPHA_BACKGROUND`; see :func:`_to_rgb`).

    Raises:
        ImageError: the file is missing, empty, not an image, truncated/corrupt, has zero width or height,
            or has more than ``max_pixels`` pixels. The message names the file.
    """
    _check_max_pixels(max_pixels)
    path = Path(path)
    img = _open_checked(path, max_pixels)
    with img:
        _decode(img, path)
        # The conversion returns a new image, so the result stays valid after the file is closed.
        return _to_rgb(img)


@dataclass(frozen=True)
class ImageTransform:
    """Resize, crop and normalise an RGB image into a float tensor ``[3, size, size]``.

    ``resize_mode``:
        ``'shorter_side_center_crop'`` scales the shorter side to ``size`` keeping the aspect ratio, then cuts
        the central ``size x size`` square (the ImageNet evaluation convention). For aspect ratios beyond
        16:1 only the region kept is resampled (equal up to rounding), so a 60000x1 strip cannot allocate a
        multi-gigabyte intermediate image. ``'squash'`` resizes straight
        to ``size x size``, keeping the whole image at the cost of distorting it.
    """

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_mode: ResizeMode = "shorter_side_center_crop"
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise ConfigError(f"ImageTransform.size must be a positive integer, got {self.size!r}")
        # JSON gives lists; store tuples so the frozen dataclass stays hashable and comparable.
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                as_tuple = tuple(float(v) for v in value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"ImageTransform.{name} must be 3 numbers, got {value!r}") from exc
            if len(as_tuple) != 3:
                raise ConfigError(f"ImageTransform.{name} must have 3 values (R, G, B), got {value!r}")
            object.__setattr__(self, name, as_tuple)
        if any(not s > 0 for s in self.std):
            raise ConfigError(f"ImageTransform.std values must be positive, got {self.std!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(
                f"ImageTransform.resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}"
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(
                f"ImageTransform.interpolation must be one of {tuple(_INTERPOLATIONS)}, got {self.interpolation!r}"
            )

    def resize(self, img: Image.Image) -> Image.Image:
        """Apply only the geometric part (resize and crop); returns a ``size x size`` RGB image."""
        img = img if img.mode == "RGB" else _to_rgb(img)
        resample = _INTERPOLATIONS[self.interpolation]
        s = self.size
        if self.resize_mode == "squash":
            return img.resize((s, s), resample)
        w, h = img.size
        scale = s / min(w, h)
        # max() guards against rounding the shorter side to s - 1.
        new_w, new_h = max(s, round(w * scale)), max(s, round(h * scale))
        left, top = (new_w - s) // 2, (new_h - s) // 2
        if new_w * new_h > max(w * h, _MAX_INTERMEDIATE_SQUARES * s * s):
            # Extreme aspect ratio: resample only the source region the crop keeps (the same region, up to
            # rounding), instead of an intermediate image that could take gigabytes.
            box = (left * w / new_w, top * h / new_h, (left + s) * w / new_w, (top + s) * h / new_h)
            return img.resize((s, s), resample, box=box)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample)
        return img.crop((left, top, left + s, top + s))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Return the normalised float32 tensor ``[3, size, size]`` for ``img``."""
        arr = np.asarray(self.resize(img), dtype=np.float32) / 255.0  # [H, W, 3] in [0, 1]
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict that :meth:`from_json` turns back into an equal transform."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> ImageTransform:
        """Build a transform from :meth:`to_json` output (a dict or its JSON text).

        Unknown keys are an error rather than ignored: a key this version does not understand means the
        weights were trained with preprocessing it cannot reproduce.
        """
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"image transform: invalid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"image transform: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"image transform: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def load_image_tensor(
    path: str | Path, transform: ImageTransform | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Load ``path`` with :func:`load_image` and apply ``transform`` (default: ``ImageTransform()``)."""
    transform = transform if transform is not None else ImageTransform()
    return transform(load_image(path, max_pixels=max_pixels))
