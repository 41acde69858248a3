"""One JSONL manifest schema for every corpus.

Each line is one spoken caption::

    {"caption_id": "...", "audio": "wavs/x.wav", "image": "images/y.jpg", "image_id": "y",
     "split": "train", "text": "a red shirt ...", "speaker": "espeak-en-us-f2"}

``text`` and ``speaker`` are optional (null or absent). Relative ``audio``/``image`` paths are resolved against
the manifest's own folder, so a corpus folder can be moved as a whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

REQUIRED_FIELDS = ("caption_id", "audio", "image", "image_id", "split")
OPTIONAL_FIELDS = ("text", "speaker")


@dataclass(frozen=True)
class Record:
    caption_id: str
    audio: str
    image: str
    image_id: str
    split: str
    text: str | None = None
    speaker: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def write_manifest(records: Iterable[Record], path: str | Path) -> Path:
    """Write records as JSONL atomically (temp file + rename), so a killed run never leaves half a manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
