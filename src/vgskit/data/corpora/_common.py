"""Pieces every corpus preparer shares: locating index files, parsing them with clear errors, and building
a manifest that reports (never silently hides) captions whose audio or image file is missing."""

from __future__ import annotations

import codecs
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vgskit.data.manifest import Record, write_manifest
from vgskit.errors import VGSKitError

log = logging.getLogger("vgskit.data.corpora")

OnMissing = Literal["drop", "error"]
ON_MISSING: tuple[str, ...] = ("drop", "error")
MANIFEST_NAME = "manifest.jsonl"
REPORT_NAME = "prepare_report.json"
# Index files sit at most this deep below --root in every distribution we know of; a bounded search keeps a
# mistyped --root (say, a home folder) from walking the whole disk.
SEARCH_DEPTH = 3


class PrepareError(VGSKitError):
    """A corpus cannot be prepared: an index file is missing or malformed, or an option is invalid."""


class MissingFilesError(PrepareError):
    """Audio or image files listed by the corpus index are missing (raised with ``on_missing="error"``)."""

    def __init__(self, message: str, missing: list[str]):
        self.missing = list(missing)
        super().__init__(message)


def walk_limited(root: Path, depth: int = SEARCH_DEPTH) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk`` below ``root`` down to ``depth`` levels, folders in sorted order (deterministic results)."""
    root_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames.sort()
        if len(here.parts) - root_depth >= depth:
            dirnames[:] = []
        yield here, dirnames, sorted(filenames)


def find_file(root: Path, names: Sequence[str], *, subdirs: Sequence[str] = (), what: str) -> Path:
    """Return the first of ``names`` found at ``root/<subdir>/<name>`` (``""`` first), else anywhere within
    :data:`SEARCH_DEPTH` levels below ``root``; raise :class:`PrepareError` saying where it was expected."""
    found = find_optional(root, names, subdirs=subdirs)
    if found is None:
        places = ", ".join(str(root / s) for s in ("", *subdirs))
        raise PrepareError(
            f"{what} not found: expected {' or '.join(names)} in {places} "
            f"(or up to {SEARCH_DEPTH} folders below {root})"
        )
    return found


def find_optional(root: Path, names: Sequence[str], *, subdirs: Sequence[str] = ()) -> Path | None:
    """Like :func:`find_file` but return ``None`` when none of ``names`` exists."""
    for name in names:
        for sub in ("", *subdirs):
            candidate = root / sub / name
            if candidate.is_file():
                return candidate
    wanted = set(names)
    for here, _dirs, files in walk_limited(root):
        for name in names:  # keep the preference order of ``names``
            if name in wanted and name in files:
                return here / name
    return None


def find_dir(root: Path, names: Sequence[str]) -> Path | None:
    """First existing folder ``root/<name>`` (names may contain slashes), else one found by a bounded walk."""
    for name in names:
        if (root / name).is_dir():
            return root / name
    simple = {n for n in names if "/" not in n}
    for here, dirs, _files in walk_limited(root):
        for d in dirs:
            if d in simple:
                return here / d
    return None


def _unreadable(path: Path, exc: OSError) -> PrepareError:
    # Permission denied, a folder where a file was expected, an I/O error: say which file and why.
    return PrepareError(f"{path}: cannot read the index file ({exc.strerror or exc})")


def load_json(path: Path) -> Any:
    """Parse a JSON index file; a syntax error becomes a :class:`PrepareError` naming the file and position.

    So do unreadable files, text that is not UTF-8, and nesting too deep for the parser (a corrupt or hostile
    file, which would otherwise end in a RecursionError).
    """
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise PrepareError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise PrepareError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except RecursionError as exc:
        raise PrepareError(f"{path}: not a corpus index: JSON nested too deeply to parse") from exc
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, stripped line)`` for the non-blank lines of a UTF-8 text index file.

    Lines are decoded one by one so that an encoding error names the line it is on (a text-mode reader fails
    on a whole block and cannot say where). ``\n``, ``\r\n`` and ``\r`` all end a line, as in text mode; a
    leading byte-order mark is ignored.
    """
    lineno = 0
    try:
        with open(path, "rb") as f:
            for raw in f:
                if lineno == 0 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                try:
                    decoded = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise PrepareError(
                        f"{path}: line {lineno + 1}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line)"
                    ) from exc
                for piece in decoded.rstrip("\n").removesuffix("\r").split("\r"):
                    lineno += 1
                    text = piece.strip()
                    if text:
                        yield lineno, text
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def read_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for the non-blank lines of a JSON Lines index file.

    Every line must be one JSON object; anything else is a :class:`PrepareError` naming the file and line.
    """
    for lineno, text in read_lines(path):
        where = f"line {lineno}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PrepareError(f"{path}: {where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        except RecursionError as exc:
            raise PrepareError(f"{path}: {where}: JSON nested too deeply to parse") from exc
        require(isinstance(obj, dict), path, where, f"expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def empty_index(path: Path, what: str = "captions") -> PrepareError:
    """The error for an index file that lists nothing: a broken or wrong file, never an empty split to accept."""
    return PrepareError(f"{path}: lists no {what} (empty index file; is the download complete?)")


def require_entries(entries: Sequence[Any], path: Path, what: str = "captions") -> None:
    """Raise :func:`empty_index` unless ``entries`` (the list an index file holds) has at least one item."""
    if not entries:
        raise empty_index(path, what)


def decimal(text: str) -> int | None:
    """``int(text)`` when ``text`` is plain ASCII digits, else ``None``.

    ``str.isdigit`` also accepts characters such as superscripts that ``int`` rejects, which would turn an odd
    index line into a ValueError traceback.
    """
    return int(text) if text.isascii() and text.isdigit() else None


def require(cond: bool, path: Path, where: str, problem: str) -> None:
    """Raise a :class:`PrepareError` ``"<path>: <where>: <problem>"`` unless ``cond`` holds."""
    if not cond:
        raise PrepareError(f"{path}: {where}: {problem}")


def get_str(obj: Any, key: str, path: Path, where: str, *, required: bool = True) -> str | None:
    """Return ``obj[key]`` as a non-empty string (numbers are converted, as some index files store ids as
    integers); raise a :class:`PrepareError` naming file, entry and key if it is required but absent."""
    require(isinstance(obj, dict), path, where, f"expected a JSON object, got {type(obj).__name__}")
    value = obj.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise PrepareError(f"{path}: {where}: missing required key {key!r} (keys present: {sorted(obj)})")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PrepareError(f"{path}: {where}: {key!r} must be a string, got {type(value).__name__}")
    return str(value)


def pick_base(candidates: Iterable[Path | None], probe: object) -> Path | None:
    """Among candidate base folders, return the first in which ``probe`` (a relative path taken from the index)
    exists, else the first folder that exists at all: distributions disagree on where files are unpacked.

    ``probe`` is taken as read from the index and ignored unless it is a path string; the entry it comes from
    is validated, with a clear error, where it is used."""
    existing = [c for c in candidates if c is not None and c.is_dir()]
    if isinstance(probe, str) and probe and "\0" not in probe:
        for c in existing:
            if (c / probe).is_file():
                return c
    return existing[0] if existing else None


def as_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value).expanduser()


@dataclass
class ManifestBuilder:
    """Collects records, checks their files, and writes ``manifest.jsonl`` plus ``prepare_report.json``.

    Missing audio/image files are always counted and listed in the report; with ``on_missing="drop"`` the
    affected captions are left out and a warning names them, with ``"error"`` nothing is written and a
    :class:`MissingFilesError` lists them. Duplicate caption ids (the same caption listed twice by an index)
    keep their first occurrence and are reported.
    """

    corpus: str
    out: Path
    on_missing: str = "drop"
    check_files: bool = True
    records: list[Record] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)  # missing file -> caption ids using it
    dropped: int = 0
    duplicates: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    _exists: dict[str, bool] = field(default_factory=dict)
    _ids: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.on_missing not in ON_MISSING:
            raise PrepareError(f"on_missing must be one of {ON_MISSING}, got {self.on_missing!r}")
        self.out = Path(self.out).expanduser().resolve()
        # Refused now rather than after the whole index has been parsed.
        blocker = next((p for p in (self.out, *self.out.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise PrepareError(f"output folder {self.out}: {blocker} is a file, not a folder")

    def _is_file(self, path: str) -> bool:
        # Five captions share one image: stat each distinct file once.
        ok = self._exists.get(path)
        if ok is None:
            ok = self._exists[path] = os.path.isfile(path)
        return ok

    def _rel(self, path: Path) -> str:
        absolute = os.path.abspath(path)
        try:
            return Path(os.path.relpath(absolute, self.out)).as_posix()
        except ValueError:  # another drive on Windows: no relative path exists
            return absolute

    def add(
        self,
        *,
        caption_id: str,
        audio: Path,
        image: Path,
        image_id: str,
        split: str,
        text: str | None = None,
        speaker: str | None = None,
    ) -> None:
        """Add one caption; its files are checked now (``check_files``) and it is dropped if one is missing."""
        if caption_id in self._ids:
            self.duplicates.append(caption_id)
            return
        self._ids.add(caption_id)
        if self.check_files:
            absent = [str(p) for p in (audio, image) if not self._is_file(os.path.abspath(p))]
            if absent:
                for p in absent:
                    self.missing.setdefault(os.path.abspath(p), []).append(caption_id)
                self.dropped += 1
                return
        text = text.strip() if text else None
        self.records.append(
            Record(
                caption_id=caption_id,
                audio=self._rel(audio),
                image=self._rel(image),
                image_id=image_id,
                split=split,
                text=text or None,
                speaker=speaker,
            )
        )

    def finish(self) -> Path:
        """Write the manifest and the report; return the manifest path."""
        missing = sorted(self.missing)
        if missing and self.on_missing == "error":
            shown = "\n  ".join(missing[:50])
            more = f"\n  ... and {len(missing) - 50} more" if len(missing) > 50 else ""
            raise MissingFilesError(
                f"{self.corpus}: {len(missing)} file(s) listed by the corpus index are missing "
                f"({self.dropped} caption(s) affected); no manifest written:\n  {shown}{more}",
                missing,
            )
        if not self.records:
            raise PrepareError(
                f"{self.corpus}: no captions left to write"
                + (f" ({len(missing)} missing file(s), e.g. {missing[0]})" if missing else "")
            )
        splits: dict[str, dict[str, int]] = {}
        images: dict[str, set[str]] = {}
        for r in self.records:
            s = splits.setdefault(r.split, {"captions": 0, "images": 0})
            s["captions"] += 1
            images.setdefault(r.split, set()).add(r.image_id)
        for name, ids in images.items():
            splits[name]["images"] = len(ids)
        try:
            manifest = write_manifest(self.records, self.out / MANIFEST_NAME)
        except OSError as exc:
            raise PrepareError(f"cannot write the manifest into {self.out} ({exc.strerror or exc})") from exc
        report = {
            "corpus": self.corpus,
            "manifest": str(manifest),
            "captions": len(self.records),
            "splits": dict(sorted(splits.items())),
            "missing_files": len(missing),
            "dropped_captions": self.dropped,
            "missing": [{"file": f, "captions": self.missing[f]} for f in missing],
            "duplicate_caption_ids": self.duplicates,
            "files_checked": self.check_files,
            **self.notes,
        }
        try:
            (self.out / REPORT_NAME).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise PrepareError(f"cannot write {self.out / REPORT_NAME} ({exc.strerror or exc})") from exc
        if missing:
            listed = "\n  ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
            log.warning(
                "%s: dropped %d caption(s) whose files are missing (%d file(s); full list in %s):\n  %s",
                self.corpus, self.dropped, len(missing), self.out / REPORT_NAME, listed,
            )
        if self.duplicates:
            log.warning("%s: %d duplicate caption id(s) kept once, e.g. %s", self.corpus, len(self.duplicates),
                        self.duplicates[0])
        return manifest
