"""Training metrics: one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard when installed.

Each line has ``kind`` (``"train"`` or ``"eval"``), ``step`` and ``epoch`` plus the values, e.g.::

    {"kind": "train", "step": 100, "epoch": 0.42, "loss": 2.31, "lr": 0.0003, "samples_per_s": 812.5}
    {"kind": "eval", "step": 240, "epoch": 1.0, "mean_R@10": 0.37}

Read it back with :func:`read_metrics`; view TensorBoard with ``tensorboard --logdir <out_dir>/tb``.
Only the main rank writes; on other ranks the logger is a no-op.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("vgskit.train")

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    # JSON has no NaN/Infinity; null keeps the line parseable by strict readers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends records to ``<out_dir>/metrics.jsonl`` and, optionally, TensorBoard scalars."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.path = self.out_dir / METRICS_FILE
        self._file = None
        self._tb: Any = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                log.info("tensorboard is not installed; writing %s only", self.path)
            else:
                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"))

    def start(self, resume_step: int | None) -> None:
        """Open the file: fresh (``resume_step=None``) or keeping only records up to ``resume_step``.

        A resumed run repeats the steps after its checkpoint, so records of those steps written by the
        interrupted run are dropped to keep exactly one record per step.
        """
        if not self.enabled:
            return
        kept: list[str] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= resume_step:
                        kept.append(line)
                except (ValueError, AttributeError):
                    continue  # a line cut short by a crash
        self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        self._file = open(self.path, "a", encoding="utf-8")  # kept open for the whole run

    def log(self, kind: str, step: int, epoch: float, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), "epoch": round(float(epoch), 6)}
        record.update({k: _clean(v) for k, v in values.items()})
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, global_step=int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (or of the one in folder ``path``), optionally only one ``kind``."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
    return out


__all__ = ["METRICS_FILE", "MetricsLogger", "read_metrics"]
