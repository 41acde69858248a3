"""Tests for vgskit.data.augment: RandomResizedCrop + flip on preloaded uint8 images, and its seeding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vgskit.data.augment import (
    AUGMENT_STREAM,
    AUGMENTATIONS,
    AugmentConfig,
    augment_image,
    augment_rng,
)
from vgskit.data.loader import CROP_STREAM
from vgskit.errors import ConfigError

CROP_FLIP = AugmentConfig("crop_flip")
NO_FLIP = AugmentConfig("crop_flip", flip=False)


def _noise(size: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _coordinates(height: int, width: int, step: int) -> np.ndarray:
    """An image whose red channel is ``row * step`` and green channel ``col * step``: pixels say where they are."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[..., 0], img[..., 1] = rows * step, cols * step
    return img


def _window_seen(out: np.ndarray, step: int) -> tuple[int, int, int, int]:
    """The source window ``(top, left, h, w)`` a nearest-neighbour upscale of a :func:`_coordinates` crop shows.

    Upscaling with nearest neighbour visits every source row and column of the window, so the set of codes in
    the output is exactly the window's rows and columns.
    """
    rows = np.unique(out[..., 0]) // step
    cols = np.unique(out[..., 1]) // step
    assert rows.tolist() == list(range(rows[0], rows[-1] + 1))  # a contiguous band, not a scatter of pixels
    assert cols.tolist() == list(range(cols[0], cols[-1] + 1))
    return int(rows[0]), int(cols[0]), len(rows), len(cols)


def _clone(rng: np.random.Generator) -> np.random.Generator:
    twin = np.random.default_rng()
    twin.bit_generator.state = rng.bit_generator.state
    return twin


def _reference_window(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, written out with numpy draws in the same order."""
    area = height * width
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    if width / height < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_crop_flip_returns_a_new_uint8_image_of_the_same_shape() -> None:
    for image in (_noise(32), _noise(224, seed=1), np.ascontiguousarray(_noise(40)[:30])):
        before = image.copy()
        out = augment_image(image, CROP_FLIP, augment_rng(0, 0, 0))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert out.flags.c_contiguous and out.flags.writeable
        assert not np.shares_memory(out, image)
        np.testing.assert_array_equal(image, before)  # the stored image is never modified


def test_same_seed_epoch_and_index_give_the_same_augmentation() -> None:
    image = _noise()
    first = augment_image(image, CROP_FLIP, augment_rng(7, 3, 11))
    np.random.seed(123)  # neither numpy's global state ...
    augment_image(image, CROP_FLIP, augment_rng(7, 3, 12))  # ... nor what was augmented before matters
    np.testing.assert_array_equal(augment_image(image, CROP_FLIP, augment_rng(7, 3, 11)), first)
    np.testing.assert_array_equal(augment_image(image, CROP_FLIP, augment_rng(np.int64(7), 3, 11)), first)

    by_epoch = [augment_image(image, CROP_FLIP, augment_rng(7, e, 11)).tobytes() for e in range(6)]
    assert len(set(by_epoch)) == 6  # every epoch sees a new view of the caption's image
    by_index = [augment_image(image, CROP_FLIP, augment_rng(7, 3, i)).tobytes() for i in range(6)]
    assert len(set(by_index)) == 6
    by_seed = [augment_image(image, CROP_FLIP, augment_rng(s, 3, 11)).tobytes() for s in range(6)]
    assert len(set(by_seed)) == 6


def test_the_augmentation_stream_is_its_own() -> None:
    assert AUGMENT_STREAM != CROP_STREAM
    ours = augment_rng(5, 2, 9).random(4)
    np.testing.assert_array_equal(ours, np.random.default_rng([5, 2, 9, AUGMENT_STREAM]).random(4))
    assert not np.array_equal(ours, np.random.default_rng([5, 2, 9, CROP_STREAM]).random(4))
    assert not np.array_equal(ours, np.random.default_rng([5, 2]).random(4))  # the batch sampler's stream


def test_whole_image_window_is_the_image_or_its_mirror_about_half_the_time() -> None:
    image = _noise(24)
    whole = AugmentConfig("crop_flip", scale=(1.0, 1.0), ratio=(1.0, 1.0))
    mirrored = 0
    draws = 400
    for i in range(draws):
        out = augment_image(image, whole, augment_rng(0, 0, i))
        if np.array_equal(out, image[:, ::-1]):
            mirrored += 1
        else:
            np.testing.assert_array_equal(out, image)  # exactly the input: no resampling of a whole window
    assert 150 <= mirrored <= 250  # Binomial(400, 0.5): mean 200, sd 10
    no_flip = AugmentConfig("crop_flip", scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    for i in range(50):
        np.testing.assert_array_equal(augment_image(image, no_flip, augment_rng(0, 0, i)), image)


def test_the_crop_is_the_window_randomresizedcrop_samples() -> None:
    size, step = 64, 4
    image = _coordinates(size, size, step)
    for i in range(60):
        rng = augment_rng(3, 1, i)
        expected = _reference_window(size, size, NO_FLIP.scale, NO_FLIP.ratio, _clone(rng))
        out = augment_image(image, NO_FLIP, rng, interpolation="nearest")
        assert _window_seen(out, step) == expected, f"draw {i}"


def test_the_crop_is_resized_like_torchvision_resized_crop() -> None:
    tvf = pytest.importorskip("torchvision.transforms.functional")
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    image = _noise(56, seed=4)
    for i in range(10):
        rng = augment_rng(1, 0, i)
        top, left, h, w = _reference_window(56, 56, NO_FLIP.scale, NO_FLIP.ratio, _clone(rng))
        reference = tvf.resized_crop(Image.fromarray(image), top, left, h, w, [56, 56], InterpolationMode.BILINEAR)
        np.testing.assert_array_equal(augment_image(image, NO_FLIP, rng), np.asarray(reference))


def test_central_crop_fallback_when_no_window_fits() -> None:
    size, step = 64, 4
    image = _coordinates(size, size, step)
    # Windows wider than tall with >= 90% of the area never fit in a square: torchvision's central-crop fallback.
    wide = AugmentConfig("crop_flip", scale=(0.9, 1.0), ratio=(2.0, 3.0), flip=False)
    tall = AugmentConfig("crop_flip", scale=(0.9, 1.0), ratio=(0.25, 0.5), flip=False)
    for i in range(5):
        assert _window_seen(augment_image(image, wide, augment_rng(0, 0, i), interpolation="nearest"), step) == (
            16, 0, 32, 64,  # full width, height 64 / 2, centred vertically
        )
        assert _window_seen(augment_image(image, tall, augment_rng(0, 0, i), interpolation="nearest"), step) == (
            0, 16, 64, 32,  # full height, width 64 * 0.5, centred horizontally
        )


@pytest.mark.parametrize(
    ("scale", "ratio"), [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.25, 0.5), (0.5, 2.0)), ((0.3, 0.3), (1.5, 1.5))]
)
def test_window_area_and_aspect_ratio_stay_within_bounds(scale: tuple[float, float], ratio: tuple[float, float]) -> None:
    size, step = 128, 2
    image = _coordinates(size, size, step)
    config = AugmentConfig("crop_flip", scale=scale, ratio=ratio, flip=False)
    areas, aspects = [], []
    for i in range(300):
        top, left, h, w = _window_seen(augment_image(image, config, augment_rng(9, 0, i), interpolation="nearest"), step)
        assert 0 <= top and top + h <= size and 0 <= left and left + w <= size
        # w and h are sqrt(area * ratio) and sqrt(area / ratio) rounded, so each is within 0.5 of the exact value.
        assert (w - 0.5) * (h - 0.5) <= scale[1] * size**2 and (w + 0.5) * (h + 0.5) >= scale[0] * size**2
        assert (w - 0.5) / (h + 0.5) <= ratio[1] and (w + 0.5) / (h - 0.5) >= ratio[0]
        areas.append(w * h / size**2)
        aspects.append(w / h)
    if scale[0] < scale[1]:  # the draws spread over the whole range, not one corner of it
        width = scale[1] - scale[0]
        assert min(areas) < scale[0] + 0.1 * width and max(areas) > scale[1] - 0.1 * width
    if ratio[0] < 1 < ratio[1]:
        assert min(aspects) < 0.95 and max(aspects) > 1.05  # both portrait and landscape windows


def test_none_is_the_identity_and_draws_nothing() -> None:
    image = _noise()
    rng = augment_rng(0, 0, 0)
    state = rng.bit_generator.state
    assert augment_image(image, AugmentConfig(), rng) is image
    assert augment_image(image, AugmentConfig("none", flip=True), rng) is image
    assert rng.bit_generator.state == state
    assert AugmentConfig().kind == "none" and AUGMENTATIONS == ("none", "crop_flip")


def test_config_defaults_are_torchvisions_and_lists_become_tuples() -> None:
    config = AugmentConfig("crop_flip")
    assert config.scale == (0.08, 1.0) and config.ratio == (3 / 4, 4 / 3) and config.flip is True
    from_yaml = AugmentConfig(kind="crop_flip", scale=[0.2, 1], ratio=[0.5, 2])  # type: ignore[arg-type]
    assert from_yaml.scale == (0.2, 1.0) and from_yaml.ratio == (0.5, 2.0)
    assert hash(from_yaml) == hash(AugmentConfig("crop_flip", scale=(0.2, 1.0), ratio=(0.5, 2.0)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "random_crop"}, r"AugmentConfig\.kind must be one of \('none', 'crop_flip'\)"),
        ({"scale": (0.0, 1.0)}, r"AugmentConfig\.scale must satisfy 0 < low <= high <= 1"),
        ({"scale": (0.6, 0.5)}, r"AugmentConfig\.scale must satisfy"),
        ({"scale": (0.5, 1.5)}, r"AugmentConfig\.scale must satisfy"),
        ({"scale": (0.5,)}, r"AugmentConfig\.scale must be two numbers"),
        ({"scale": "ab"}, r"AugmentConfig\.scale must be two numbers"),
        ({"scale": (float("nan"), 1.0)}, r"AugmentConfig\.scale must be finite"),
        ({"ratio": (0.0, 1.0)}, r"AugmentConfig\.ratio must satisfy 0 < low <= high"),
        ({"ratio": (2.0, 1.0)}, r"AugmentConfig\.ratio must satisfy"),
        ({"ratio": (1.0, float("inf"))}, r"AugmentConfig\.ratio must be finite"),
        ({"flip": "yes"}, r"AugmentConfig\.flip must be true or false"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AugmentConfig(**{"kind": "crop_flip", **kwargs})


def test_bad_images_seeds_and_interpolations_are_rejected() -> None:
    rng = augment_rng(0, 0, 0)
    with pytest.raises(ConfigError, match=r"expected a uint8 array \[H, W, 3\], got float32 \[8, 8, 3\]"):
        augment_image(np.zeros((8, 8, 3), np.float32), CROP_FLIP, rng)
    with pytest.raises(ConfigError, match=r"got uint8 \[3, 8, 8\]"):
        augment_image(np.zeros((3, 8, 8), np.uint8), CROP_FLIP, rng)
    with pytest.raises(ConfigError, match="interpolation must be one of"):
        augment_image(_noise(8), CROP_FLIP, rng, interpolation="cubic")
    with pytest.raises(ConfigError, match="augment_rng: epoch must be >= 0"):
        augment_rng(0, -1, 0)
    with pytest.raises(ConfigError, match="augment_rng: index must be an integer"):
        augment_rng(0, 0, 1.5)  # type: ignore[arg-type]
