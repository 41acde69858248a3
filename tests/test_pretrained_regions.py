"""Region-feature HDF5 reader on a tiny file written in the BUTD/LXMERT layout."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from vgskit.encoders.regions import RegionFeatureReader
from vgskit.errors import InputFileError


def _write(path: Path, with_size: bool = True) -> None:
    with h5py.File(path, "w") as f:
        f["img_id"] = np.array([b"COCO_1", b"COCO_2"])
        f["features"] = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
        f["boxes"] = np.array([[[0, 0, 100, 50]] * 3, [[10, 20, 30, 40]] * 3], dtype=np.float32)
        f["objects_conf"] = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]], dtype=np.float32)
        if with_size:
            f["img_h"] = np.array([50, 100])
            f["img_w"] = np.array([200, 100])


def test_reader_normalises_and_sorts(tmp_path: Path) -> None:
    _write(tmp_path / "r.h5")
    reader = RegionFeatureReader(tmp_path / "r.h5")
    assert len(reader) == 2 and reader.ids() == ["COCO_1", "COCO_2"] and "COCO_2" in reader
    r = reader["COCO_1"]
    assert r.confidence.tolist() == pytest.approx([0.9, 0.5, 0.1])
    assert r.features[:, 0].tolist() == [4.0, 8.0, 0.0]  # regions 1, 2, 0 of the file
    assert r.boxes[0].tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0])
    assert reader["COCO_2"].boxes[0].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    with pytest.raises(KeyError):
        reader["nope"]
    reader.close()


def test_pixel_boxes_without_size_rejected(tmp_path: Path) -> None:
    _write(tmp_path / "r.h5", with_size=False)
    with pytest.raises(InputFileError, match="img_h"):
        RegionFeatureReader(tmp_path / "r.h5")["COCO_1"]
    with pytest.raises(InputFileError, match="not found"):
        RegionFeatureReader(tmp_path / "missing.h5")
