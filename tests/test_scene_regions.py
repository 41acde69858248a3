"""Region features of the embedded corpus: generator boxes, area-weighted pooling, the cached HDF5 file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vgskit.data import synthetic
from vgskit.data.loader import RegionSource
from vgskit.data.scene_regions import (
    FEATURES_FILE,
    SIDECAR_FILE,
    box_pool,
    resolve_region_features,
    scene_region_features,
)
from vgskit.encoders.efficientnet import LITE0_TRANSFORM, EfficientNetLite0Encoder
from vgskit.encoders.regions import RegionFeatureReader, RegionFeatures, write_region_hdf5
from vgskit.errors import ConfigError
from vgskit.fileio import sha256_file
from vgskit.images import ImageTransform, load_image


def test_box_pool_is_the_area_weighted_mean_of_the_cells() -> None:
    # A 2x2 map over a 4x4 image: each cell covers 2x2 pixels.
    fmap = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # [1, 2, 2]
    boxes = torch.tensor([[0.0, 0.0, 3.0, 2.0],  # top row: 2 px of cell (0,0), 1 px of cell (0,1) per line
                          [0.0, 0.0, 4.0, 4.0],  # whole image
                          [2.5, 3.0, 3.5, 4.0]])  # inside cell (1,1) only
    pooled = box_pool(fmap, boxes, (4, 4))
    assert pooled.shape == (3, 1)
    assert pooled[0, 0].item() == pytest.approx((1.0 * 4 + 2.0 * 2) / 6)
    assert pooled[1, 0].item() == pytest.approx(2.5)
    assert pooled[2, 0].item() == pytest.approx(4.0)
    with pytest.raises(ConfigError, match="x2 > x1"):
        box_pool(fmap, torch.tensor([[2.0, 0.0, 2.0, 4.0]]), (4, 4))


def _scene_tiny(tiny_manifest: Path) -> tuple[Path, dict, list]:
    corpus = tiny_manifest.parent
    scenes = json.loads((corpus / "facts.json").read_text())["scenes"]
    ids = sorted(scenes)[:6]
    return corpus, {i: scenes[i] for i in ids}, synthetic.scene_glyphs([scenes[i] for i in ids])


def test_object_boxes_hold_what_the_renderer_draws(tiny_manifest: Path) -> None:
    corpus, scenes, glyphs = _scene_tiny(tiny_manifest)
    size = json.loads((corpus / "corpus.json").read_text())["config"]["image_size"]
    tightened = 0
    for (image_id, scene), glyph in zip(scenes.items(), glyphs, strict=True):
        # The stored image is the renderer's output for these facts.
        split, idx = scene["split"], int(image_id.split("-")[1])
        seed = [0, synthetic._SPLIT_CODE[split], idx, 7]
        stored = np.asarray(load_image(corpus / "images" / f"{image_id}.png"))
        assert np.array_equal(np.asarray(synthetic._render(scene, glyph, size, seed)), stored)
        empty = np.asarray(synthetic._render({**scene, "objects": []}, [], size, seed)).astype(int)
        squares = synthetic.object_boxes(scene, size)
        tight = synthetic.object_boxes(scene, size, glyph)
        for k, obj in enumerate(scene["objects"]):
            alone = np.asarray(synthetic._render({**scene, "objects": [obj]}, [glyph[k]], size, seed)).astype(int)
            change = np.abs(alone - empty).sum(-1)  # [S, S]: how much the object changed each pixel
            ys, xs = np.nonzero(change > 0)
            x1, y1, x2, y2 = squares[k]
            assert xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2
            # The tight box lies in the square and holds every strongly drawn pixel (bicubic resizing leaves
            # faint ringing around a picture; the box is cut at opacity 0.5, within a pixel of the strong part).
            tx1, ty1, tx2, ty2 = tight[k]
            assert x1 <= tx1 < tx2 <= x2 and y1 <= ty1 < ty2 <= y2
            sy, sx = np.nonzero(change > 0.5 * change.max())
            assert sx.min() >= tx1 - 1 and sx.max() <= tx2 and sy.min() >= ty1 - 1 and sy.max() <= ty2
            # ... and no more than the drawn pixels' extent.
            assert tx1 >= xs.min() and tx2 <= xs.max() + 1 and ty1 >= ys.min() and ty2 <= ys.max() + 1
            tightened += (tx2 - tx1) * (ty2 - ty1) < (x2 - x1) * (y2 - y1)
    assert tightened >= 3  # Fashion-MNIST pictures have margins: most boxes shrink


def test_region_file_for_the_tiny_corpus(tiny_manifest: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_manifest.parent, corpus)
    torch.manual_seed(3)
    path = scene_region_features(corpus, weights=None, input_size=64, batch_size=5, progress=False)
    assert path == corpus / FEATURES_FILE
    side = json.loads((corpus / SIDECAR_FILE).read_text())
    scenes = json.loads((corpus / "facts.json").read_text())["scenes"]
    size = json.loads((corpus / "corpus.json").read_text())["config"]["image_size"]
    reader = RegionFeatureReader(path)
    assert sorted(reader.ids()) == sorted(scenes) and side["images"] == len(scenes)

    # One image recomputed independently: same random encoder, its feature map pooled over the boxes.
    torch.manual_seed(3)
    encoder = EfficientNetLite0Encoder(weights=None, freeze=True)
    image_id = sorted(scenes)[4]
    scene, glyph = scenes[image_id], synthetic.scene_glyphs([scenes[image_id]])[0]
    transform = ImageTransform(size=64, mean=LITE0_TRANSFORM.mean, std=LITE0_TRANSFORM.std, resize_mode="squash",
                               interpolation="bilinear")
    with torch.inference_mode():
        fmap = encoder.feature_map(transform(load_image(corpus / "images" / f"{image_id}.png"))[None])[0]
    objects = synthetic.object_boxes(scene, size, glyph)
    area = (objects[:, 2] - objects[:, 0]) * (objects[:, 3] - objects[:, 1])
    boxes = np.concatenate([objects[np.argsort(-area, kind="stable")], [[0, 0, size, size]]])
    got = reader[image_id]
    n = len(scene["objects"]) + 1
    assert got.features.shape == (n, 1280)  # padding rows are not regions
    torch.testing.assert_close(got.boxes, torch.from_numpy(boxes / size).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.features, box_pool(fmap, torch.from_numpy(boxes), (size, size)),
                               atol=1e-5, rtol=1e-5)
    assert got.confidence.tolist() == [1.0] * (n - 1) + [0.5]
    # Through the dataset's source: padded to num_regions and masked.
    item = RegionSource(path, num_regions=5).item(image_id)
    assert item["region_mask"].tolist() == [True] * n + [False] * (5 - n)
    assert item["regions"][n:].abs().sum() == 0

    # Reused when current; rebuilt when the file no longer matches its recorded hash.
    stamp = path.stat().st_mtime_ns
    reader.close()
    assert scene_region_features(corpus, weights=None, input_size=64, progress=False) == path
    assert path.stat().st_mtime_ns == stamp
    with open(path, "r+b") as f:
        f.seek(-64, 2)
        f.write(b"\x00" * 64)
    scene_region_features(corpus, weights=None, input_size=64, progress=False)
    assert path.stat().st_mtime_ns != stamp
    assert json.loads((corpus / SIDECAR_FILE).read_text())["sha256"] == sha256_file(path)
    RegionFeatureReader(path)[image_id]  # a whole, readable file again


def test_scene_boxes_need_a_spoken_scenes_corpus(tmp_path: Path) -> None:
    (tmp_path / "manifest.jsonl").write_text("")
    with pytest.raises(ConfigError, match="spoken-scenes corpus"):
        resolve_region_features("scene_boxes", tmp_path / "manifest.jsonl")
    with pytest.raises(ConfigError, match="needs the spoken-scenes manifest"):
        resolve_region_features("scene_boxes", None)
    assert resolve_region_features("my.h5", None) == "my.h5"


def test_writer_pads_variable_region_counts(tmp_path: Path) -> None:
    def item(n: int) -> RegionFeatures:
        return RegionFeatures(torch.arange(n * 3, dtype=torch.float32).view(n, 3) + 1,
                              torch.tensor([[0.1, 0.1, 0.5, 0.5]] * n), torch.linspace(1, 0.5, n))

    path = tmp_path / "r.h5"
    write_region_hdf5(path, [("a", item(2), 10, 10), ("b", item(4), 10, 10)], max_regions=4)
    reader = RegionFeatureReader(path)
    assert reader["a"].features.shape == (2, 3) and reader["b"].features.shape == (4, 3)
    torch.testing.assert_close(reader["a"].features, item(2).features)
    with pytest.raises(ConfigError, match="has 5 regions; expected 1..4"):
        write_region_hdf5(tmp_path / "s.h5", [("a", item(5), 10, 10)], max_regions=4)
