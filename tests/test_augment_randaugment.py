"""RandAugment in the train-time augmentation: reproducible from (seed, epoch, index), new every epoch, torchvision's
magnitude ranges, validated config, and pixels changed in training only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vgskit.data.augment import (
    RANDAUGMENT_OPS,
    AugmentConfig,
    RandAugmentConfig,
    _magnitude,
    augment_image,
    augment_rng,
    rand_augment,
)
from vgskit.errors import ConfigError
from vgskit.experiment import DataConfig, make_dataset
from vgskit.train.config import config_from_dict

CONFIG = AugmentConfig("crop_flip", randaugment=RandAugmentConfig(num_ops=2, magnitude=9))


def _image(seed: int = 0, size: int = 48) -> np.ndarray:
    # Smooth gradients plus noise: every operation (equalize, posterize, ...) visibly changes such an image.
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1) + rng.integers(0, 40, (size, size, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def test_same_seed_epoch_and_index_give_the_same_augmentation() -> None:
    image = _image()
    for index in range(5):
        a = augment_image(image, CONFIG, augment_rng(7, 2, index))
        b = augment_image(image, CONFIG, augment_rng(7, 2, index))
        assert a.dtype == np.uint8 and a.shape == image.shape and np.array_equal(a, b)


def test_each_epoch_draws_a_new_augmentation() -> None:
    image = _image()
    differ = [not np.array_equal(augment_image(image, CONFIG, augment_rng(7, 0, i)),
                                 augment_image(image, CONFIG, augment_rng(7, 1, i))) for i in range(8)]
    assert all(differ)


def test_randaugment_follows_the_crop_and_flip() -> None:
    image = _image()
    crop_only = AugmentConfig("crop_flip")
    rng = augment_rng(3, 0, 0)
    ours = augment_image(image, CONFIG, rng)
    rng2 = augment_rng(3, 0, 0)
    cropped = augment_image(image, crop_only, rng2)  # the same first draws
    assert np.array_equal(ours, rand_augment(cropped, 2, 9, rng2, 31))


def test_magnitudes_are_torchvisions() -> None:
    torchvision = pytest.importorskip("torchvision")
    space = torchvision.transforms.RandAugment()._augmentation_space(31, (40, 50))  # (height, width)
    names = {"Identity": "identity", "ShearX": "shear_x", "ShearY": "shear_y", "TranslateX": "translate_x",
             "TranslateY": "translate_y", "Rotate": "rotate", "Brightness": "brightness", "Color": "color",
             "Contrast": "contrast", "Sharpness": "sharpness", "Posterize": "posterize", "Solarize": "solarize",
             "AutoContrast": "autocontrast", "Equalize": "equalize"}
    assert set(names.values()) == set(RANDAUGMENT_OPS)
    for tv_name, (values, _signed) in space.items():
        for level in (0, 9, 30):
            want = float(values[level]) if values.ndim else 0.0
            got = _magnitude(names[tv_name], level, 31, 40, 50)
            # torchvision states the solarize threshold as a fraction of the value range; ours is on uint8.
            if tv_name == "Solarize" and float(values.max()) <= 1.0:
                want *= 255.0
            assert got == pytest.approx(want, rel=1e-5, abs=1e-4), (tv_name, level)


def test_every_operation_runs_and_keeps_the_shape() -> None:
    image = _image()
    changed = 0
    for seed in range(40):
        out = rand_augment(image, 1, 20, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        changed += not np.array_equal(out, image)
    assert changed > 30  # only "identity" (1 of 14) leaves the image alone
    assert np.array_equal(rand_augment(image, 0, 9, np.random.default_rng(0)), image)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_ops": -1}, r"RandAugmentConfig\.num_ops must be an integer >= 0"),
        ({"magnitude": 31}, r"RandAugmentConfig\.magnitude must be below num_magnitude_bins=31"),
        ({"num_magnitude_bins": 1}, r"RandAugmentConfig\.num_magnitude_bins must be an integer >= 2"),
        ({"magnitude": 2.5}, r"RandAugmentConfig\.magnitude must be an integer"),
    ],
)
def test_randaugment_config_is_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RandAugmentConfig(**kwargs)


def test_augment_config_from_a_recipe_section() -> None:
    data = config_from_dict(DataConfig, {"train_augment": {"kind": "crop_flip",
                                                           "randaugment": {"num_ops": 2, "magnitude": 9}}}, "data")
    assert data.train_augment.randaugment == RandAugmentConfig(2, 9, 31)
    with pytest.raises(ConfigError, match="set kind: crop_flip"):
        AugmentConfig("none", randaugment=RandAugmentConfig())
    with pytest.raises(ConfigError, match="randaugment must be null or a mapping"):
        AugmentConfig("crop_flip", randaugment=3)  # type: ignore[arg-type]


def test_pixels_change_in_training_only(tiny_manifest: Path) -> None:
    transform = {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "resize_mode": "squash",
                 "interpolation": "bilinear"}
    plain = make_dataset(tiny_manifest, "train", transform, max_seconds=2.0, preload=False, progress=False,
                         max_images=2)
    augmented = make_dataset(tiny_manifest, "train", transform, max_seconds=2.0, preload=False, progress=False,
                             max_images=2, augment=CONFIG)
    # Evaluation pixels never change; training pixels do, reproducibly, and anew each epoch.
    assert torch.equal(augmented.pixels(0), plain.pixels(0))
    augmented.set_epoch(0)
    first = augmented.train_pixels(0, 0)
    assert not torch.equal(first, plain.pixels(0))
    assert torch.equal(first, augmented.train_pixels(0, 0))
    augmented.set_epoch(1)
    assert not torch.equal(first, augmented.train_pixels(0, 0))
