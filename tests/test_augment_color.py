"""Colour jitter of the train-time augmentation (MILAN's "random brightening and saturation")."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from vgskit.data.augment import AugmentConfig, augment_image, color_jitter
from vgskit.errors import ConfigError


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)


def test_factors_are_drawn_in_range_and_applied_as_pil_enhance() -> None:
    img = _image()
    out = color_jitter(img, 0.4, 0.3, np.random.default_rng(7))
    draws = np.random.default_rng(7)
    b, s = draws.uniform(0.6, 1.4), draws.uniform(0.7, 1.3)
    want = ImageEnhance.Color(ImageEnhance.Brightness(Image.fromarray(img)).enhance(b)).enhance(s)
    assert np.array_equal(out, np.asarray(want)) and not np.array_equal(out, img)


def test_saturation_leaves_grey_images_grey_and_zero_draws_nothing() -> None:
    grey = np.repeat(np.random.default_rng(1).integers(0, 256, (8, 8, 1), dtype=np.uint8), 3, axis=2)
    out = color_jitter(grey, 0.0, 0.9, np.random.default_rng(3))
    assert np.array_equal(out, grey)  # a grey image has no saturation to scale
    rng = np.random.default_rng(5)
    assert np.array_equal(color_jitter(_image(), 0.0, 0.0, rng), _image())
    assert rng.random() == np.random.default_rng(5).random()  # no draw was consumed


def test_without_jitter_the_augmentation_is_unchanged_and_with_it_differs() -> None:
    crop = AugmentConfig(kind="crop_flip", scale=(0.67, 1.0), flip=False)
    plain = augment_image(_image(), crop, np.random.default_rng(11))
    zero = augment_image(_image(), AugmentConfig(kind="crop_flip", scale=(0.67, 1.0), flip=False, brightness=0.0,
                                                 saturation=0.0), np.random.default_rng(11))
    jitter = augment_image(_image(), AugmentConfig(kind="crop_flip", scale=(0.67, 1.0), flip=False, brightness=0.5),
                           np.random.default_rng(11))
    assert np.array_equal(plain, zero) and not np.array_equal(plain, jitter)
    # Same crop (drawn first), then the brightness factor: the jittered image is the plain one brightened.
    ratio = jitter.astype(float).sum() / max(1.0, plain.astype(float).sum())
    assert 0.5 <= ratio <= 1.5


@pytest.mark.parametrize("bad", [{"brightness": -0.1}, {"saturation": "a"}, {"brightness": True},
                                 {"kind": "none", "brightness": 0.2}])
def test_bad_jitter_values_are_refused(bad: dict) -> None:
    with pytest.raises(ConfigError, match="AugmentConfig"):
        AugmentConfig(**{"kind": "crop_flip", **bad})
