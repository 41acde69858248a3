"""Tests for vgskit.images: validated loading and the serialisable preprocessing transform."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vgskit import images
from vgskit.errors import ConfigError, ImageError
from vgskit.images import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, load_image, load_image_tensor


def _noise_image(tmp_path: Path, name: str, size: tuple[int, int] = (120, 80)) -> Path:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path = tmp_path / name
    Image.fromarray(arr).save(path)
    return path


# --- load_image --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_any_mode_loads_as_rgb(tmp_path: Path, mode: str) -> None:
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    Image.new(mode, (31, 17)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (31, 17)
    img.load()  # still usable after load_image closed the file


def test_16bit_greyscale_is_rescaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "depth.png"
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    arr = np.asarray(load_image(path))
    assert arr[0, :, 0].tolist() == [0, 128, 255]


def test_missing_directory_and_empty(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"gone\.jpg: file not found") as info:
        load_image(tmp_path / "gone.jpg")
    assert info.value.path == str(tmp_path / "gone.jpg")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: file is empty \(0 bytes\)"):
        load_image(empty)


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("a dog runs on the beach\n" * 20)
    with pytest.raises(ImageError, match=r"notes\.jpg: not an image"):
        load_image(path)


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_truncated_files_are_rejected(tmp_path: Path, ext: str) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # importing vgskit must not hide truncation
    full = _noise_image(tmp_path, f"full.{ext}", size=(200, 150))
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    Image.open(cut).close()  # the header alone still parses: only a full decode finds the damage
    with pytest.raises(ImageError, match=rf"cut\.{ext}: truncated or corrupt image data"):
        load_image(cut)
    assert load_image(full).size == (200, 150)


def test_too_large_is_rejected_from_header_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _noise_image(tmp_path, "big.png", size=(40, 30))

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("an oversized image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match=r"big\.png: too large: 40x30 = 1200 pixels exceeds max_pixels=1000"):
        load_image(path, max_pixels=1000)
    monkeypatch.undo()
    assert load_image(path, max_pixels=1200).size == (40, 30)


def test_pil_decompression_bomb_guard_becomes_image_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _noise_image(tmp_path, "bomb.png", size=(40, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL raises above twice this
    with pytest.raises(ImageError, match=r"bomb\.png: too large"):
        load_image(path)


def test_zero_size_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Current PIL refuses to open 0-pixel files at all; the check guards plugins that do open them.
    path = _noise_image(tmp_path, "flat.png")
    monkeypatch.setattr(images.Image, "open", lambda p: Image.new("RGB", (0, 7)))
    with pytest.raises(ImageError, match=r"flat\.png: zero-size image \(0x7 pixels\)"):
        load_image(path)


def test_bad_max_pixels() -> None:
    with pytest.raises(ConfigError, match="max_pixels"):
        load_image("x.png", max_pixels=0)


# --- ImageTransform ----------------------------------------------------------------------------------------------


def test_solid_colour_is_normalised_per_channel() -> None:
    colour = (200, 100, 50)
    t = ImageTransform(size=32)(Image.new("RGB", (64, 48), colour))
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32
    for c in range(3):
        expected = (colour[c] / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(t[c], torch.full((32, 32), expected), atol=1e-5)


def _three_bands(width: int, height: int) -> Image.Image:
    """Left third red, middle third green, right third blue."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    third = width // 3
    arr[:, :third, 0] = 255
    arr[:, third : 2 * third, 1] = 255
    arr[:, 2 * third :, 2] = 255
    return Image.fromarray(arr)


def test_center_crop_keeps_the_middle_and_squash_keeps_everything() -> None:
    img = _three_bands(300, 100)
    plain = ImageTransform(size=50, mean=(0, 0, 0), std=(1, 1, 1))

    crop = plain(img)  # 300x100 -> 150x50 -> the central 50x50 is exactly the green band
    inner = crop[:, :, 3:-3]  # bicubic blends a couple of columns across the band edges
    assert torch.allclose(inner[1], torch.ones(50, 44), atol=1e-3)
    assert inner[0].abs().max() < 1e-3 and inner[2].abs().max() < 1e-3

    squash = ImageTransform(size=50, mean=(0, 0, 0), std=(1, 1, 1), resize_mode="squash")(img)
    assert squash[0, :, 0].min() > 0.99  # left edge red
    assert squash[2, :, -1].min() > 0.99  # right edge blue


def test_tensor_is_channels_height_width() -> None:
    arr = np.zeros((60, 40, 3), dtype=np.uint8)
    arr[:30] = 255  # top half white
    t = ImageTransform(size=40, mean=(0, 0, 0), std=(1, 1, 1), resize_mode="squash")(Image.fromarray(arr))
    assert t.shape == (3, 40, 40)
    assert t[:, 0, :].min() > 0.99 and t[:, -1, :].max() < 0.01  # rows are height, not width


def test_transform_json_round_trip_and_validation() -> None:
    tf = ImageTransform(size=96, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0), resize_mode="squash")
    text = json.dumps(tf.to_json())
    back = ImageTransform.from_json(json.loads(text))
    assert back == tf and ImageTransform.from_json(text) == tf
    assert isinstance(back.mean, tuple)
    img = _three_bands(90, 70)
    assert torch.equal(back(img), tf(img))

    with pytest.raises(ConfigError, match="unknown key"):
        ImageTransform.from_json({**tf.to_json(), "antialias": True})
    with pytest.raises(ConfigError, match="resize_mode"):
        ImageTransform(resize_mode="stretch")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="std values must be positive"):
        ImageTransform(std=(0.2, 0.0, 0.2))
    with pytest.raises(ConfigError, match="3 values"):
        ImageTransform(mean=(0.5, 0.5))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="size"):
        ImageTransform(size=0)


def test_load_image_tensor(tmp_path: Path) -> None:
    path = _noise_image(tmp_path, "photo.jpg", size=(320, 240))
    t = load_image_tensor(path)
    assert t.shape == (3, 224, 224)
    assert torch.equal(t, ImageTransform()(load_image(path)))
    with pytest.raises(ImageError, match="nothing.jpg"):
        load_image_tensor(tmp_path / "nothing.jpg", ImageTransform(size=8))
