"""Region features of the tiny corpus's images, written in the BUTD/LXMERT HDF5 layout for region models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vgskit.data.manifest import read_manifest


def write_grid_regions(manifest: Path, path: Path, confidence: Sequence[float] = (0.2, 0.9, 0.5, 0.7)) -> Path:
    """Every image's 2×2 grid cells as 4 regions (features: mean and std of RGB; boxes: the cells), with
    ``confidence`` per cell (row-major), which sets the order readers return them in."""
    from vgskit.encoders.regions import RegionFeatures, write_region_hdf5
    from vgskit.images import load_image

    seen: dict[str, str] = {}
    for r in read_manifest(manifest):
        seen.setdefault(r.image_id, r.image)
    items = []
    for image_id, image in seen.items():
        img = np.asarray(load_image(image).resize((32, 32)), dtype=np.float32) / 255.0  # [32, 32, 3]
        feats, boxes = [], []
        for y in (0, 16):
            for x in (0, 16):
                cell = img[y:y + 16, x:x + 16].reshape(-1, 3)
                feats.append(np.concatenate([cell.mean(0), cell.std(0)]))
                boxes.append([x / 32, y / 32, (x + 16) / 32, (y + 16) / 32])
        items.append((image_id, RegionFeatures(torch.tensor(np.array(feats)), torch.tensor(boxes),
                                               torch.tensor(list(confidence))), 32, 32))
    write_region_hdf5(path, items)
    return path
