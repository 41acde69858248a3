"""Precomputed Faster R-CNN region features (FaST-VGS image input) in the BUTD/LXMERT HDF5 layout.

Layout: datasets ``img_id`` ``(n,)`` (bytes or str), ``features`` ``(n, R, 2048)``, ``boxes`` ``(n, R, 4)``
as ``x1, y1, x2, y2`` in pixels, ``objects_conf`` ``(n, R)``, and ``img_h``/``img_w`` ``(n,)``. Readers
return boxes normalised by the image size and regions sorted by decreasing confidence, as FaST-VGS feeds
them. Files without ``img_h``/``img_w`` must already hold normalised boxes (checked: all within [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vgskit.errors import InputFileError

REQUIRED = ("img_id", "features", "boxes", "objects_conf")


@dataclass
class RegionFeatures:
    """Regions of one image: ``features [R, D]``, normalised ``boxes [R, 4]``, ``confidence [R]`` (sorted)."""

    features: Tensor
    boxes: Tensor
    confidence: Tensor


class RegionFeatureReader:
    """Random access by image id to a BUTD/LXMERT region-feature HDF5 file (opened lazily, read per item)."""

    def __init__(self, path: str | Path):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise InputFileError(self.path, "region-feature HDF5 file not found")
        self._h5 = h5py.File(self.path, "r")
        missing = [k for k in REQUIRED if k not in self._h5]
        if missing:
            raise InputFileError(self.path, f"missing dataset(s) {missing}; expected {list(REQUIRED)}")
        ids = self._h5["img_id"][()]
        self._index = {(i.decode() if isinstance(i, bytes) else str(i)): n for n, i in enumerate(ids)}
        self._has_size = "img_h" in self._h5 and "img_w" in self._h5

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, img_id: str) -> bool:
        return img_id in self._index

    def ids(self) -> list[str]:
        """Image ids in file order."""
        return list(self._index)

    def __getitem__(self, img_id: str) -> RegionFeatures:
        if img_id not in self._index:
            raise KeyError(f"{self.path}: no regions for image id {img_id!r}")
        n = self._index[img_id]
        feats = np.asarray(self._h5["features"][n], dtype=np.float32)  # [R, D]
        boxes = np.asarray(self._h5["boxes"][n], dtype=np.float32)  # [R, 4]
        conf = np.asarray(self._h5["objects_conf"][n], dtype=np.float32)  # [R]
        if self._has_size:
            h, w = float(self._h5["img_h"][n]), float(self._h5["img_w"][n])
            boxes = boxes / np.asarray([w, h, w, h], dtype=np.float32)
        elif boxes.size and (boxes.min() < 0 or boxes.max() > 1):
            raise InputFileError(self.path, "boxes are in pixels but img_h/img_w are missing")
        order = np.argsort(-conf, kind="stable")  # most confident first
        return RegionFeatures(
            torch.from_numpy(feats[order]), torch.from_numpy(boxes[order]), torch.from_numpy(conf[order])
        )

    def close(self) -> None:
        """Close the file."""
        self._h5.close()
