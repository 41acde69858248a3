"""One JSONL manifest schema for every corpus.

Each line is one spoken caption::

    {"caption_id": "...", "audio": "wavs/x.wav", "image": "images/y.jpg", "image_id": "y",
     "split": "train", "text": "a red shirt ...", "speaker": "espeak-en-us-f2"}

``text`` and ``speaker`` are optional (null or absent). Relative ``audio``/``image`` paths are resolved against
the manifest's own folder, so a corpus folder can be moved as a whole.

Any other top-level field of a line (word alignments, ASR transcripts, boxes, ...) is kept, unchanged, in
:attr:`Record.extra` and written back at the top level by :func:`write_manifest`: corpora carry more than the
schema names, and the models that use it (word discovery, cascades, localized narratives) read it from there.

:func:`read_manifest` validates a manifest and reports every problem in one error; :func:`summarize`,
:func:`image_index` and :func:`filter_split` are the helpers data checks, training and evaluation share.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypedDict

import numpy as np

from vgskit.errors import ConfigError, ManifestError
from vgskit.fileio import temp_path_for

REQUIRED_FIELDS = ("caption_id", "audio", "image", "image_id", "split")
OPTIONAL_FIELDS = ("text", "speaker")


SCHEMA_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
_SCHEMA_SET = frozenset(SCHEMA_FIELDS)


class ExtraFields(dict):
    """A read-only dict holding a record's extra manifest fields.

    A plain dict could be changed through a shared reference, silently editing a frozen :class:`Record`; a
    ``types.MappingProxyType`` cannot be pickled, and records travel to DataLoader workers and spawned
    processes by pickle. A dict subclass stays a dict for ``json.dumps`` and compares equal to any dict with
    the same content. Only the top level is read-only: nested lists and dicts are the JSON values as read.
    """

    __slots__ = ()

    def _read_only(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("Record.extra is read-only; build a new record with dataclasses.replace(record, extra=...)")

    __setitem__ = __delitem__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only  # type: ignore[assignment]
    __ior__ = _read_only  # type: ignore[assignment]

    def __reduce__(self) -> tuple[type[ExtraFields], tuple[dict[str, Any]]]:
        # dict's own pickling refills the object item by item through __setitem__, which is blocked here.
        return (ExtraFields, (dict(self),))

    def __repr__(self) -> str:
        return f"ExtraFields({dict.__repr__(self)})"


_NO_EXTRA = ExtraFields()


def _no_extra() -> ExtraFields:
    # One shared empty mapping: most records have no extras, and a million empty dicts would cost ~64 MB.
    return _NO_EXTRA


@dataclass(frozen=True)
class Record:
    """One spoken caption: its audio, the image it describes, and the split it belongs to.

    ``extra`` holds every other top-level field of the manifest line with its JSON value unchanged (nested
    lists and dicts included), so what a corpus carries beyond the schema survives reading and writing. It is
    stored as a read-only :class:`ExtraFields` and compared by content, but left out of the hash (its values
    may be lists), so records stay usable as dict keys and set members.
    """

    caption_id: str
    audio: str
    image: str
    image_id: str
    split: str
    text: str | None = None
    speaker: str | None = None
    extra: Mapping[str, Any] = field(default_factory=_no_extra, hash=False)

    def __post_init__(self) -> None:
        extra = self.extra
        if extra is _NO_EXTRA:
            return
        if not isinstance(extra, Mapping):
            raise ConfigError(
                f"Record {self.caption_id!r}: extra must be a mapping of field names to JSON values, "
                f"got {type(extra).__name__}"
            )
        for name in extra:
            if not isinstance(name, str):
                raise ConfigError(
                    f"Record {self.caption_id!r}: extra field names must be strings, "
                    f"got {type(name).__name__} {name!r}"
                )
            if name in _SCHEMA_SET:
                # A manifest line has one value per name: the schema field and the extra could not both be written.
                raise ConfigError(
                    f"Record {self.caption_id!r}: extra field {name!r} is a schema field; set Record.{name} instead"
                )
        if type(extra) is not ExtraFields or not extra:
            object.__setattr__(self, "extra", ExtraFields(extra) if extra else _NO_EXTRA)

    def to_json(self) -> dict[str, Any]:
        """Return the manifest line as a dict: every schema field (optional ones as null), then the extras.

        Extras go back to the top level, where :func:`read_manifest` found them, so that writing and reading a
        record gives an equal record.
        """
        line: dict[str, Any] = {
            "caption_id": self.caption_id,
            "audio": self.audio,
            "image": self.image,
            "image_id": self.image_id,
            "split": self.split,
            "text": self.text,
            "speaker": self.speaker,
        }
        line.update(self.extra)
        return line

    @classmethod
    def from_json(cls, line: Mapping[str, Any]) -> Record:
        """Build a record from a manifest line given as a dict: schema fields by name, the rest into ``extra``.

        The inverse of :meth:`to_json`, for code that edits records as dicts (``Record(**record.to_json())``
        fails as soon as a record has extras). Unlike :func:`read_manifest` it neither checks field types nor
        resolves paths.
        """
        missing = [name for name in REQUIRED_FIELDS if line.get(name) is None]
        if missing:
            raise ConfigError(f"manifest line {dict(line)!r}: missing required field(s) {missing}")
        extra = ExtraFields((k, v) for k, v in line.items() if k not in _SCHEMA_SET)
        return cls(**{name: line.get(name) for name in SCHEMA_FIELDS}, extra=extra or _NO_EXTRA)


def _manifest_line(record: Record, path: Path) -> str:
    """One JSON line for ``record``; an extra value JSON cannot encode is reported by caption and field."""
    try:
        return json.dumps(record.to_json(), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        for name, value in record.extra.items():
            try:
                json.dumps(value, ensure_ascii=False)
            except (TypeError, ValueError) as field_exc:
                raise ManifestError(
                    path,
                    [f"caption {record.caption_id!r}: extra field {name!r} is not JSON-serialisable ({field_exc})"],
                    "cannot write",
                ) from field_exc
        raise ManifestError(
            path, [f"caption {record.caption_id!r}: not JSON-serialisable ({exc})"], "cannot write"
        ) from exc


def write_manifest(records: Iterable[Record], path: str | Path) -> Path:
    """Write records as JSONL atomically (temp file + rename), so a killed run never leaves half a manifest.

    Each record's extras are written at the top level of its line. An extra value JSON cannot encode (a numpy
    number, a set, an arbitrary object) raises :class:`~vgskit.errors.ManifestError` naming the caption and
    the field, and leaves any existing file at ``path`` untouched. JSON has no tuples and only string keys: a
    tuple comes back as a list, a number key as a string.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(_manifest_line(r, path) + "\n")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------------------------
# Reading and validation
# ---------------------------------------------------------------------------------------------------------------

# Problem kinds in the order they are summarised, with singular and plural labels for the counts line.
_KINDS: dict[str, tuple[str, str]] = {
    "bad_json": ("line with invalid JSON", "lines with invalid JSON"),
    "not_object": ("line that is not a JSON object", "lines that are not JSON objects"),
    "missing_field": ("missing field", "missing fields"),
    "wrong_type": ("field of the wrong type", "fields of the wrong type"),
    "empty_value": ("empty field", "empty fields"),
    "duplicate_caption_id": ("duplicate caption_id", "duplicate caption_ids"),
    "image_id_conflict": ("image_id mapped to two image paths", "image_ids mapped to two image paths"),
    "missing_audio": ("missing audio file", "missing audio files"),
    "missing_image": ("missing image file", "missing image files"),
    "no_records": ("empty selection", "empty selections"),
}


class _Problems:
    """Collects every problem found, so one error can report all of them at once."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.counts: dict[str, int] = {}

    def add(self, kind: str, message: str) -> None:
        self.items.append(message)
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def summary(self) -> str:
        parts = []
        for kind, (one, many) in _KINDS.items():
            n = self.counts.get(kind, 0)
            if n:
                parts.append(f"{n} {one if n == 1 else many}")
        return ", ".join(parts)


def _resolve(value: str, base: str) -> str:
    # os.path.abspath only normalises ("a/./b" == "a/b") and never touches the filesystem, so resolving a
    # million paths stays cheap and symlinked corpus folders keep their names.
    return os.path.abspath(os.path.join(base, value))


def _parse_line(raw: bytes, lineno: int, problems: _Problems) -> dict[str, Any] | None:
    """Decode one manifest line into a dict with well-typed fields, or record why it cannot be."""
    try:
        text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        problems.add("bad_json", f"line {lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})")
        return None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.add("bad_json", f"line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})")
        return None
    if not isinstance(obj, dict):
        problems.add("not_object", f"line {lineno}: expected a JSON object, got {type(obj).__name__}")
        return None

    ok = True
    missing = [f for f in REQUIRED_FIELDS if obj.get(f) is None]
    if missing:
        ok = False
        for f in missing:
            problems.add("missing_field", f"line {lineno}: missing required field '{f}'")
    for f in REQUIRED_FIELDS:
        value = obj.get(f)
        if value is None:
            continue
        if not isinstance(value, str):
            ok = False
            problems.add(
                "wrong_type", f"line {lineno}: '{f}' must be a string, got {type(value).__name__} {value!r}"
            )
        elif not value.strip():
            ok = False
            problems.add("empty_value", f"line {lineno}: '{f}' is an empty string")
    for f in OPTIONAL_FIELDS:
        value = obj.get(f)
        if value is not None and not isinstance(value, str):
            ok = False
            problems.add(
                "wrong_type",
                f"line {lineno}: '{f}' must be a string or null, got {type(value).__name__} {value!r}",
            )
    return obj if ok else None


def read_manifest(
    path: str | Path,
    *,
    split: str | None = None,
    check_files: bool = True,
    root: str | Path | None = None,
) -> list[Record]:
    """Read and validate a JSONL manifest; return its records (only those of ``split`` if given).

    Relative ``audio``/``image`` paths are resolved against ``root`` (default: the manifest's folder); the
    returned records hold absolute paths. Validation finds every problem before raising a single
    :class:`~vgskit.errors.ManifestError` whose summary counts problems per kind and whose ``problems`` list
    names each one (line number and file), so a corpus can be fixed in one pass:

    * invalid JSON, non-object lines, missing/null required fields, wrong types, empty strings;
    * duplicate ``caption_id``; one ``image_id`` used with two different image paths;
    * with ``check_files`` (default), audio and image files that do not exist, counted once per file. These
      checks cover only the records returned, so reading the test split does not stat every training file;
      ``check_files=False`` skips the filesystem entirely for very large corpora.

    Unknown split names are accepted (corpora name their splits freely), but selecting a ``split`` that no
    record has is an error, as is a manifest without records: both are almost always a typo.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            path, ["file not found" if not path.exists() else "not a regular file"], "cannot read"
        )
    base = os.path.abspath(root if root is not None else path.parent)

    problems = _Problems()
    records: list[tuple[int, Record]] = []
    first_line_of_caption: dict[str, int] = {}
    image_of_id: dict[str, tuple[str, int]] = {}  # image_id -> (resolved image path, first line)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            obj = _parse_line(raw, lineno, problems)
            if obj is None:
                continue
            rec = Record(
                caption_id=obj["caption_id"],
                audio=_resolve(obj["audio"], base),
                image=_resolve(obj["image"], base),
                image_id=obj["image_id"],
                split=obj["split"],
                text=obj.get("text"),
                speaker=obj.get("speaker"),
                extra=ExtraFields((k, v) for k, v in obj.items() if k not in _SCHEMA_SET) or _NO_EXTRA,
            )
            first = first_line_of_caption.setdefault(rec.caption_id, lineno)
            if first != lineno:
                problems.add(
                    "duplicate_caption_id",
                    f"line {lineno}: duplicate caption_id {rec.caption_id!r} (first on line {first})",
                )
                continue
            seen = image_of_id.setdefault(rec.image_id, (rec.image, lineno))
            if seen[0] != rec.image:
                problems.add(
                    "image_id_conflict",
                    f"line {lineno}: image_id {rec.image_id!r} is {rec.image} here but {seen[0]} on line {seen[1]}",
                )
            records.append((lineno, rec))

    if split is not None:
        selected = [(n, r) for n, r in records if r.split == split]
        if records and not selected:
            present = ", ".join(sorted({r.split for _, r in records}))
            problems.add("no_records", f"no records with split {split!r} (splits present: {present})")
    else:
        selected = records
    if not records and not problems.items:
        problems.add("no_records", "the manifest contains no records")

    if check_files:
        # Many captions share one image, so each distinct file is checked (and reported) once.
        checked: set[str] = set()
        for lineno, rec in selected:
            for kind, label, file in (
                ("missing_audio", "audio", rec.audio),
                ("missing_image", "image", rec.image),
            ):
                if file in checked:
                    continue
                checked.add(file)
                if not os.path.isfile(file):
                    problems.add(kind, f"line {lineno}: {label} file not found: {file}")

    if problems.items:
        raise ManifestError(path, problems.items, problems.summary())
    return [r for _, r in selected]


def filter_split(records: Iterable[Record], split: str) -> list[Record]:
    """Return the records whose ``split`` equals ``split``, in their original order."""
    return [r for r in records if r.split == split]


def image_index(records: Sequence[Record]) -> tuple[list[str], np.ndarray]:
    """Map captions to de-duplicated images.

    Returns ``(image_ids, caption_image_idx)``: the distinct ``image_id`` values in first-seen order, and an
    int64 array with, for each record, the position of its image in ``image_ids``. This is the ground truth
    for retrieval: caption ``i`` matches image ``image_ids[caption_image_idx[i]]``. First-seen order (not
    sorted order) is the convention, so that image embeddings computed in that order line up without a
    separate lookup table.
    """
    position: dict[str, int] = {}
    idx = np.empty(len(records), dtype=np.int64)
    for i, rec in enumerate(records):
        idx[i] = position.setdefault(rec.image_id, len(position))
    return list(position), idx


class SplitSummary(TypedDict):
    captions: int
    images: int


class ManifestSummary(TypedDict):
    """What :func:`summarize` returns; every value is JSON-serialisable (histogram keys become strings)."""

    captions: int
    images: int
    speakers: int
    captions_without_speaker: int
    captions_with_text: int
    splits: dict[str, SplitSummary]
    captions_per_image: dict[int, int]
    images_in_several_splits: int


def summarize(records: Iterable[Record]) -> ManifestSummary:
    """Count captions, images (distinct ``image_id``), speakers and per-split sizes of ``records``.

    ``captions_per_image`` is a histogram: ``{k: number of images with exactly k captions}``, sorted by k.
    ``images_in_several_splits`` counts images that appear in more than one split, which leaks test images
    into training and inflates retrieval scores.
    """
    n_captions = 0
    with_text = 0
    without_speaker = 0
    speakers: set[str] = set()
    captions_of_image: Counter[str] = Counter()
    split_captions: Counter[str] = Counter()
    split_images: dict[str, set[str]] = {}
    splits_of_image: dict[str, set[str]] = {}
    for r in records:
        n_captions += 1
        with_text += r.text is not None and r.text != ""
        if r.speaker is None:
            without_speaker += 1
        else:
            speakers.add(r.speaker)
        captions_of_image[r.image_id] += 1
        split_captions[r.split] += 1
        split_images.setdefault(r.split, set()).add(r.image_id)
        splits_of_image.setdefault(r.image_id, set()).add(r.split)
    histogram = Counter(captions_of_image.values())
    return ManifestSummary(
        captions=n_captions,
        images=len(captions_of_image),
        speakers=len(speakers),
        captions_without_speaker=without_speaker,
        captions_with_text=with_text,
        splits={
            s: SplitSummary(captions=split_captions[s], images=len(split_images[s]))
            for s in sorted(split_captions)
        },
        captions_per_image={k: histogram[k] for k in sorted(histogram)},
        images_in_several_splits=sum(1 for s in splits_of_image.values() if len(s) > 1),
    )
