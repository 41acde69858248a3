"""Region features computed with torchvision's Faster R-CNN (random weights) and written in the BUTD layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vgskit.encoders.hub import MissingWeightsError
from vgskit.encoders.regions import (
    RegionDetector,
    RegionFeatureReader,
    RegionFeatures,
    compute_region_features,
    write_region_hdf5,
)

R = 12  # fewer than BUTD's 36 keeps the tests fast; the code path is the same


@pytest.fixture(scope="module")
def detector() -> RegionDetector:
    torch.manual_seed(0)
    return RegionDetector(None, num_regions=R, min_size=160, max_size=240)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small images of different sizes and aspect ratios, saved as PNG."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(120, 160), (96, 72), (100, 100)]):
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        arr[h // 4 : h // 2, w // 4 : w // 2] = (255, 0, 0)  # a solid block: some structure to detect
        paths.append(root / f"img{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def regions(detector: RegionDetector, images: list[Path]) -> list[RegionFeatures]:
    return detector(images)


def _run_recording(detector: RegionDetector, images: list[Path]) -> tuple[list[RegionFeatures], dict[str, Any]]:
    """Run the detector and record what its box-head stage received: the FPN maps, the resized image sizes
    and the kept detections (boxes in the resized frame, before normalisation)."""
    seen: dict[str, Any] = {}

    def hook(module: torch.nn.Module, args: tuple, output: tuple) -> None:
        seen["fmaps"], _, seen["sizes"] = args
        seen["detections"] = output[0]

    handle = detector.model.roi_heads.register_forward_hook(hook)
    try:
        out = detector(images)
    finally:
        handle.remove()
    return out, seen


def _box_head_features(detector: RegionDetector, seen: dict[str, Any]) -> list[torch.Tensor]:
    """The box head's features of the recorded kept boxes, one tensor per image: the same operation, on the
    same inputs with the same shapes, as the detector's own pass, so the result is the same to the bit."""
    heads = detector.model.roi_heads
    kept = [d["boxes"] for d in seen["detections"]]
    with torch.no_grad():
        feats = heads.box_head(heads.box_roi_pool(seen["fmaps"], kept, seen["sizes"])).flatten(1)
    return list(feats.split([len(b) for b in kept]))


def test_shapes_ranges_and_order(detector: RegionDetector, regions: list[RegionFeatures]) -> None:
    assert detector.feature_dim == 1024
    for r in regions:
        assert r.features.shape == (R, 1024) and r.boxes.shape == (R, 4) and r.confidence.shape == (R,)
        assert r.boxes.min() >= 0 and r.boxes.max() <= 1
        assert (r.boxes[:, 2:] >= r.boxes[:, :2]).all()
        assert (r.confidence[:-1] >= r.confidence[1:]).all()
        assert (r.confidence > 0).all()  # no threshold: random weights still give R detections here
        assert r.features.abs().sum() > 0


def test_boxes_and_scores_are_the_detectors_own(
    detector: RegionDetector, images: list[Path], regions: list[RegionFeatures]
) -> None:
    # torchvision's own forward returns boxes in input pixels: normalising them must give ours.
    tensors = [detector.image_tensor(p) for p in images]
    with torch.no_grad():
        outputs = detector.model(tensors)
    for t, out, r in zip(tensors, outputs, regions, strict=True):
        h, w = t.shape[1:]
        torch.testing.assert_close(r.boxes, out["boxes"] / torch.tensor([w, h, w, h]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r.confidence, out["scores"])


def test_features_are_box_head_features_of_those_boxes(detector: RegionDetector, images: list[Path]) -> None:
    # Features recomputed in another batch composition (one image's boxes at a time, say) would go through
    # matrix products of other shapes, whose float32 rounding differs between CPU kernels (Intel, AMD) by
    # amounts no fixed tolerance bounds for 12544-term reductions of these random-weight features. So the
    # comparisons below are exact: the recorded kept boxes, through the same pooling and head call.
    regions, seen = _run_recording(detector, images)
    expected = _box_head_features(detector, seen)
    model = detector.model
    with torch.no_grad():
        batch, _ = model.transform([detector.image_tensor(p) for p in images])
    assert list(seen["sizes"]) == list(batch.image_sizes)
    for r, det, feats, (h, w) in zip(regions, seen["detections"], expected, seen["sizes"], strict=True):
        k = len(det["boxes"])
        assert k == R and (det["scores"][:-1] >= det["scores"][1:]).all()  # kept in confidence order
        assert torch.equal(r.features, feats)
        assert torch.equal(r.confidence, det["scores"])
        # Our normalised boxes are the kept ones divided by the resized size (elementwise: exact rounding).
        torch.testing.assert_close(r.boxes * torch.tensor([w, h, w, h]), det["boxes"], atol=1e-4, rtol=1e-6)
    # Each image's rows are its own boxes' features, pooled from its own maps: another image's differ.
    assert not torch.allclose(regions[0].features, regions[1].features, atol=1e-2)
    # Row order matters too: features of a different box are far off.
    assert not torch.allclose(regions[0].features[0], regions[0].features[1], atol=1e-2)


def test_fewer_detections_are_padded(detector: RegionDetector, images: list[Path]) -> None:
    # Baseline on the image alone: batching pads images to a common size, which shifts the features.
    (full,), full_seen = _run_recording(detector, [images[0]])
    heads = detector.model.roi_heads
    try:
        # Raising the threshold between the 5th and 6th scores leaves exactly 5 detections.
        heads.score_thresh = float(full.confidence[4] + full.confidence[5]) / 2
        (few,), few_seen = _run_recording(detector, [images[0]])
        heads.score_thresh = 1.0  # softmax scores never reach 1: no detections at all
        none = detector([images[0]])[0]
    finally:
        heads.score_thresh = 0.0
    assert few.features.shape == (R, 1024)
    # The threshold only drops the weaker detections: the same proposals, scores and NMS keep the same 5
    # boxes, to the bit.
    kept_full, kept_few = full_seen["detections"][0]["boxes"], few_seen["detections"][0]["boxes"]
    assert len(kept_few) == 5 and torch.equal(kept_few, kept_full[:5])
    assert torch.equal(few.boxes[:5], full.boxes[:5]) and torch.equal(few.confidence[:5], full.confidence[:5])
    # Their features are the box head's features of those 5 boxes. (Not compared with full.features[:5]: the
    # head's matrix products run on 5 rows here and 12 there, other kernels whose float32 rounding of the
    # 12544-term reductions differs between CPUs; recomputing the same call is exact instead.)
    (expected,) = _box_head_features(detector, few_seen)
    assert torch.equal(few.features[:5], expected)
    assert not torch.allclose(few.features[0], few.features[1], atol=1e-2)
    for t in (few.features[5:], few.boxes[5:], few.confidence[5:], none.features, none.boxes, none.confidence):
        assert t.numel() and (t == 0).all()


def test_write_then_read_round_trip(detector: RegionDetector, images: list[Path], tmp_path: Path) -> None:
    pairs = [(f"img{i}", p) for i, p in enumerate(images)]
    items = list(compute_region_features(pairs, detector, batch_size=2))
    assert [(i, h, w) for i, _, h, w in items] == [("img0", 120, 160), ("img1", 96, 72), ("img2", 100, 100)]
    out = tmp_path / "sub" / "regions.h5"
    assert write_region_hdf5(out, items) == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["regions.h5"]  # no temp file left behind
    reader = RegionFeatureReader(out)
    assert reader.ids() == ["img0", "img1", "img2"]
    for img_id, r, _, _ in items:
        back = reader[img_id]
        torch.testing.assert_close(back.features, r.features, atol=0, rtol=0)
        torch.testing.assert_close(back.confidence, r.confidence, atol=0, rtol=0)
        torch.testing.assert_close(back.boxes, r.boxes)  # via pixels: float32 rounding only
    reader.close()


def test_failed_write_leaves_nothing(regions: list[RegionFeatures], tmp_path: Path) -> None:
    out = tmp_path / "regions.h5"
    out.write_bytes(b"old")
    with pytest.raises(Exception, match="given twice"):
        write_region_hdf5(out, [("a", regions[0], 10, 10), ("a", regions[1], 10, 10)])
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["regions.h5"]


def test_local_weights_file_and_missing_file(detector: RegionDetector, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "frcnn.pth"
    with pytest.raises(MissingWeightsError) as err:
        RegionDetector(missing, min_size=160, max_size=240)
    assert str(missing) in str(err.value) and "fasterrcnn_resnet50_fpn_coco" in str(err.value)

    # A checkpoint saved torchvision's way (.pth, optionally wrapped) loads back to the same weights.
    state = {k: v.clone() for k, v in detector.model.state_dict().items()}
    torch.save({"model": state}, tmp_path / "frcnn.pth")
    loaded = RegionDetector(tmp_path / "frcnn.pth", num_regions=R, min_size=160, max_size=240)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, state[k]), k
