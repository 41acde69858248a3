"""Reading the stored reference cases of ``tests/golden/`` (layout: ``tests/golden/README`` of the shared cases)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

GOLDEN = Path(__file__).parent / "golden"


def case(name: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the description of case ``name``; the stored tensors are the ones the case describes
    (same names, shapes and dtypes), so a test may read every size from either."""
    tensors = load_file(str(GOLDEN / f"{name}.safetensors"))
    meta = json.loads((GOLDEN / f"{name}.json").read_text())
    assert sorted(tensors) == sorted(meta["tensors"]), name
    for key, info in meta["tensors"].items():
        assert list(tensors[key].shape) == info["shape"], key
        assert str(tensors[key].dtype) == f"torch.{info['dtype']}", key
    return tensors, meta


def section(t: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors whose names start with ``prefix`` (``"param."``, ``"input."``...), prefix removed."""
    return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
