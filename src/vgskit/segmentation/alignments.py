"""Readers for reference word alignments: Praat TextGrid, Buckeye ``.words`` and JSON.

Every reader returns the words of one utterance as a list of :class:`WordInterval` ``(word, start, end)`` in
seconds, in file order, with silence and noise labels left out (configurable). Malformed input raises
:class:`AlignmentError`, whose message names the file and the line (or entry) at fault.

Formats:

* **Praat TextGrid** (:func:`read_textgrid`), both the long ("``xmin = 0``") and the short text format, UTF-8 or
  UTF-16 (Praat writes UTF-16 when a label is not ASCII). The interval tier is picked by name; by default the tier
  named ``words`` (case-insensitive), else the first interval tier.
* **Buckeye** ``.words`` (:func:`read_buckeye_words`): a header closed by a line ``#``, then one line per token,
  ``end_time  color  word; citation; realised; POS``. A token starts where the previous one ended (the first at 0).
* **JSON** (:func:`read_json_alignment`). The word-discovery reference reads word alignments from its SpokenCOCO
  Karpathy-split JSON, where each caption item carries a ``text_alignment`` string of space-separated
  ``start__WORD__end`` tokens (seconds); a whole split file ``{"data": [...]}`` is read by
  :func:`read_spokencoco_alignments`. For single utterances a plain JSON list of ``{"word", "start", "end"}`` objects
  (or an object with such a list under ``"words"``) is also accepted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgskit.errors import InputFileError

__all__ = [
    "DEFAULT_SKIP_LABELS",
    "AlignmentError",
    "WordInterval",
    "parse_text_alignment",
    "read_alignment",
    "read_buckeye_words",
    "read_json_alignment",
    "read_spokencoco_alignments",
    "read_textgrid",
]

#: Labels that mark silence or pauses rather than words (compared case-insensitively after stripping spaces):
#: the empty label of unlabelled TextGrid intervals, and the silence/short-pause/spoken-noise labels of common aligners.
DEFAULT_SKIP_LABELS: frozenset[str] = frozenset({"", "sil", "sp", "spn", "<sil>", "<sp>"})


class AlignmentError(InputFileError):
    """An alignment file that cannot be read; the message names the file and where the problem is."""

    kind = "alignment file"


@dataclass(frozen=True)
class WordInterval:
    """One word of a reference alignment: ``word`` spoken from ``start`` to ``end`` seconds."""

    word: str
    start: float
    end: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start) and math.isfinite(self.end)):
            raise ValueError(f"word {self.word!r}: times must be finite, got [{self.start}, {self.end}]")
        if self.end < self.start:
            raise ValueError(f"word {self.word!r}: end {self.end} is before start {self.start}")

    @property
    def duration(self) -> float:
        return self.end - self.start


def _skip_set(skip_labels: Collection[str] | None) -> frozenset[str]:
    return frozenset(s.strip().lower() for s in (DEFAULT_SKIP_LABELS if skip_labels is None else skip_labels))


def _read_text(path: Path) -> str:
    """File text; UTF-16 when a byte-order mark says so, else UTF-8 (a UTF-8 BOM is dropped)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AlignmentError(path, f"cannot be read ({exc.strerror or exc})") from None
    try:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            return raw.decode("utf-16")
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AlignmentError(path, f"is not UTF-8 or UTF-16 text ({exc.reason} at byte {exc.start})") from None


def _interval(path: Path, where: str, word: str, start: float, end: float) -> WordInterval:
    try:
        return WordInterval(word, start, end)
    except ValueError as exc:
        raise AlignmentError(path, f"{where}: {exc}") from None


# --------------------------------------------------------------------------------------------------------------
# Praat TextGrid
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    value: str | float
    line: int


def _textgrid_tokens(path: Path, text: str) -> list[_Token]:
    """The strings and numbers of a TextGrid, in order, with their line numbers.

    The long and the short text formats carry the same values in the same order; the long format only adds
    ``name =`` labels, ``[n]`` indices and ``<exists>`` flags. Dropping bare words and bracketed indices outside
    strings therefore reduces both formats to one token stream.
    """
    tokens: list[_Token] = []
    i, n, line = 0, len(text), 1
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif c == '"':
            start_line = line
            j = i + 1
            parts: list[str] = []
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise AlignmentError(path, f"line {start_line}: unterminated string")
                parts.append(text[j:k])
                if k + 1 < n and text[k + 1] == '"':  # "" is an escaped quote inside a Praat string
                    parts.append('"')
                    j = k + 2
                    continue
                break
            value = "".join(parts)
            line += value.count("\n")
            tokens.append(_Token(value, start_line))
            i = k + 1
        elif c == "!":  # comment to the end of the line (short format)
            k = text.find("\n", i)
            i = n if k < 0 else k
        elif c == "[":  # an index such as "item [1]:" or "intervals [3]:"
            k = text.find("]", i)
            if k < 0:
                raise AlignmentError(path, f"line {line}: unterminated '['")
            i = k + 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in '"[':
                j += 1
            word = text[i:j]
            try:
                tokens.append(_Token(float(word), line))
            except ValueError:
                if word == "<absent>":
                    tokens.append(_Token(word, line))  # "tiers? <absent>": a TextGrid without tiers
                # other bare words are labels ("xmin", "=", "intervals:", "<exists>") and carry no value
            i = j
    return tokens


class _TokenReader:
    def __init__(self, path: Path, tokens: list[_Token]):
        self.path, self.tokens, self.pos = path, tokens, 0

    def _next(self, what: str) -> _Token:
        if self.pos >= len(self.tokens):
            last = self.tokens[-1].line if self.tokens else 1
            raise AlignmentError(self.path, f"line {last}: file ends early, expected {what}")
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def number(self, what: str) -> float:
        tok = self._next(what)
        if not isinstance(tok.value, float):
            raise AlignmentError(self.path, f"line {tok.line}: expected {what} (a number), found {tok.value!r}")
        return tok.value

    def string(self, what: str) -> tuple[str, int]:
        tok = self._next(what)
        if not isinstance(tok.value, str):
            raise AlignmentError(self.path, f"line {tok.line}: expected {what} (a quoted string), found {tok.value}")
        return tok.value, tok.line

    def peek_absent(self) -> bool:
        return self.pos < len(self.tokens) and self.tokens[self.pos].value == "<absent>"


def read_textgrid(
    path: str | Path,
    tier: str | None = None,
    skip_labels: Collection[str] | None = None,
) -> list[WordInterval]:
    """Words of a Praat TextGrid (long or short text format).

    Args:
        path: the ``.TextGrid`` file.
        tier: name of the interval tier to read; ``None`` picks the tier named ``words`` (case-insensitive) or, when
            there is none, the first interval tier.
        skip_labels: labels to leave out, compared case-insensitively after stripping spaces (default
            :data:`DEFAULT_SKIP_LABELS`; pass ``()`` to keep every interval, empty ones included).

    Returns:
        The kept intervals of the tier, labels stripped of surrounding spaces.
    """
    path = Path(path)
    reader = _TokenReader(path, _textgrid_tokens(path, _read_text(path)))
    file_type, line = reader.string('the header "ooTextFile"')
    if file_type != "ooTextFile":
        raise AlignmentError(path, f'line {line}: not a Praat text file (header {file_type!r}, expected "ooTextFile")')
    object_class, line = reader.string('the object class "TextGrid"')
    if object_class != "TextGrid":
        raise AlignmentError(path, f"line {line}: object class is {object_class!r}, not 'TextGrid'")
    reader.number("the TextGrid xmin")
    reader.number("the TextGrid xmax")
    n_tiers = 0 if reader.peek_absent() else int(reader.number("the number of tiers"))

    # Parse every tier (to validate the whole file), keep the words of each interval tier.
    tiers: list[tuple[str, str, list[tuple[str, float, float, int]]]] = []
    for t in range(n_tiers):
        tier_class, class_line = reader.string(f"the class of tier {t + 1}")
        name, _ = reader.string(f"the name of tier {t + 1}")
        reader.number(f"xmin of tier {name!r}")
        reader.number(f"xmax of tier {name!r}")
        size = reader.number(f"the number of entries of tier {name!r}")
        if size < 0 or size != int(size):
            raise AlignmentError(path, f"tier {name!r}: invalid number of entries {size}")
        entries: list[tuple[str, float, float, int]] = []
        if tier_class == "IntervalTier":
            for k in range(int(size)):
                xmin = reader.number(f"xmin of interval {k + 1} of tier {name!r}")
                xmax = reader.number(f"xmax of interval {k + 1} of tier {name!r}")
                label, label_line = reader.string(f"the text of interval {k + 1} of tier {name!r}")
                entries.append((label, xmin, xmax, label_line))
        elif tier_class == "TextTier":
            for k in range(int(size)):
                reader.number(f"the time of point {k + 1} of tier {name!r}")
                reader.string(f"the mark of point {k + 1} of tier {name!r}")
        else:
            raise AlignmentError(path, f"line {class_line}: unknown tier class {tier_class!r}")
        tiers.append((tier_class, name, entries))

    interval_tiers = [(name, entries) for cls, name, entries in tiers if cls == "IntervalTier"]
    names = [name for _, name, _ in tiers]
    if tier is None:
        chosen = next((tt for tt in interval_tiers if tt[0].strip().lower() == "words"), None)
        chosen = chosen or (interval_tiers[0] if interval_tiers else None)
        if chosen is None:
            raise AlignmentError(path, f"has no interval tier (tiers: {names})")
    else:
        match = next((tt for tt in tiers if tt[1] == tier), None)
        if match is None:
            raise AlignmentError(path, f"has no tier named {tier!r} (tiers: {names})")
        if match[0] != "IntervalTier":
            raise AlignmentError(path, f"tier {tier!r} is a {match[0]} (points), not an interval tier")
        chosen = (match[1], match[2])

    skip = _skip_set(skip_labels)
    return [
        _interval(path, f"line {ln}", label.strip(), xmin, xmax)
        for label, xmin, xmax, ln in chosen[1]
        if label.strip().lower() not in skip
    ]


# --------------------------------------------------------------------------------------------------------------
# Buckeye .words
# --------------------------------------------------------------------------------------------------------------


def _is_buckeye_noise(word: str) -> bool:
    # Buckeye marks silence, noise and transcription notes as {B_TRANS}, <SIL>, <VOCNOISE>, <IVER>, <LAUGH-...> etc.
    return word.startswith(("{", "<"))


def read_buckeye_words(
    path: str | Path,
    skip_noise: bool = True,
    skip_labels: Collection[str] | None = None,
) -> list[WordInterval]:
    """Words of a Buckeye corpus ``.words`` file.

    After the header (closed by a line holding only ``#``) each line is ``end_time color word; citation; realised;
    POS``; only the end time is stored, so a token starts at the previous token's end (the first at 0.0). Skipped
    tokens still advance that time.

    Args:
        path: the ``.words`` file.
        skip_noise: leave out tokens in ``{...}`` or ``<...>`` (silence, noise, interviewer speech, notes).
        skip_labels: further labels to leave out, compared case-insensitively (default :data:`DEFAULT_SKIP_LABELS`;
            tokens without a word are always left out).
    """
    path = Path(path)
    lines = _read_text(path).splitlines()
    try:
        body = next(i for i, ln in enumerate(lines) if ln.strip() == "#") + 1
    except StopIteration:
        raise AlignmentError(path, "no header end: expected a line holding only '#' before the words") from None
    skip = _skip_set(skip_labels)
    words: list[WordInterval] = []
    prev_end = 0.0
    for lineno, raw in enumerate(lines[body:], start=body + 1):
        if not raw.strip():
            continue
        fields = raw.split(None, 2)  # end time, colour, "word; citation; realised; POS"
        try:
            end = float(fields[0])
        except ValueError:
            raise AlignmentError(path, f"line {lineno}: expected an end time, found {fields[0]!r}") from None
        if not math.isfinite(end):
            raise AlignmentError(path, f"line {lineno}: end time {fields[0]!r} is not finite")
        if len(fields) < 2:
            raise AlignmentError(path, f"line {lineno}: expected 'end_time color word; ...', found {raw.strip()!r}")
        word = fields[2].split(";", 1)[0].strip() if len(fields) > 2 else ""
        if end < prev_end:
            raise AlignmentError(path, f"line {lineno}: time goes backwards ({end} after {prev_end})")
        if word and not (skip_noise and _is_buckeye_noise(word)) and word.lower() not in skip:
            words.append(_interval(path, f"line {lineno}", word, prev_end, end))
        prev_end = end
    return words


# --------------------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------------------


def parse_text_alignment(
    text_alignment: str,
    source: str | Path = "<text_alignment>",
    skip_labels: Collection[str] | None = None,
) -> list[WordInterval]:
    """Words of a word-discovery ``text_alignment`` string: space-separated ``start__WORD__end`` tokens (seconds).

    Tokens that do not split into exactly three ``__``-separated parts are ignored, as the reference ignores them.

    Args:
        text_alignment: the string.
        source: what to name in error messages (a file, or a file and an item).
        skip_labels: labels to leave out (default :data:`DEFAULT_SKIP_LABELS`).
    """
    skip = _skip_set(skip_labels)
    words: list[WordInterval] = []
    for k, tok in enumerate(text_alignment.split(), start=1):
        parts = tok.split("__")
        if len(parts) != 3:
            continue
        try:
            start, end = float(parts[0]), float(parts[2])
        except ValueError:
            raise AlignmentError(source, f"token {k} {tok!r}: start and end must be numbers") from None
        if parts[1].strip().lower() in skip:
            continue
        words.append(_interval(Path(str(source)), f"token {k}", parts[1], start, end))
    return words


def _words_from_objects(path: Path, items: Iterable[Any], where: str, skip: frozenset[str]) -> list[WordInterval]:
    words: list[WordInterval] = []
    for k, item in enumerate(items):
        if not isinstance(item, dict) or not {"word", "start", "end"} <= item.keys():
            raise AlignmentError(path, f"{where}[{k}]: expected an object with 'word', 'start' and 'end', got {item!r}")
        word, start, end = item["word"], item["start"], item["end"]
        if not isinstance(word, str):
            raise AlignmentError(path, f"{where}[{k}]: 'word' must be a string, got {word!r}")
        if isinstance(start, bool) or isinstance(end, bool) or not isinstance(start, int | float) or not isinstance(
            end, int | float
        ):
            raise AlignmentError(path, f"{where}[{k}]: 'start' and 'end' must be numbers, got {start!r}, {end!r}")
        if word.strip().lower() in skip:
            continue
        words.append(_interval(path, f"{where}[{k}]", word, float(start), float(end)))
    return words


def _load_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise AlignmentError(path, f"line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})") from None


def read_json_alignment(path: str | Path, skip_labels: Collection[str] | None = None) -> list[WordInterval]:
    """Words of one utterance from a JSON file.

    Accepted layouts: a list of ``{"word": str, "start": s, "end": s}`` objects; an object holding such a list under
    ``"words"``; or one word-discovery caption item, an object with a ``"text_alignment"`` string (see
    :func:`parse_text_alignment`). A whole SpokenCOCO split file (``{"data": [...]}``) holds many utterances: read it
    with :func:`read_spokencoco_alignments`.
    """
    path = Path(path)
    obj = _load_json(path)
    skip = _skip_set(skip_labels)
    if isinstance(obj, list):
        return _words_from_objects(path, obj, "entry", skip)
    if isinstance(obj, dict):
        if isinstance(obj.get("words"), list):
            return _words_from_objects(path, obj["words"], "words", skip)
        if isinstance(obj.get("text_alignment"), str):
            return parse_text_alignment(obj["text_alignment"], path, skip_labels)
        if isinstance(obj.get("data"), list):
            raise AlignmentError(
                path, "holds many utterances ('data' list); read it with read_spokencoco_alignments"
            )
    raise AlignmentError(
        path, "expected a list of {word, start, end} objects, an object with 'words', or one with 'text_alignment'"
    )


def read_spokencoco_alignments(
    path: str | Path, skip_labels: Collection[str] | None = None
) -> dict[str, list[WordInterval]]:
    """Word alignments of a word-discovery SpokenCOCO split file, keyed by caption wav path.

    The file is ``{"data": [item, ...]}``; an item has ``item["caption"]["wav"]`` and, when aligned, a
    ``text_alignment`` string (the reference's unrolled Karpathy JSON). Items without ``text_alignment`` are left out
    (the reference counts them as missing alignments).
    """
    path = Path(path)
    obj = _load_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise AlignmentError(path, "expected an object with a 'data' list of caption items")
    out: dict[str, list[WordInterval]] = {}
    for k, item in enumerate(obj["data"]):
        wav = item.get("caption", {}).get("wav") if isinstance(item, dict) else None
        if not isinstance(wav, str):
            raise AlignmentError(path, f"data[{k}]: missing caption.wav")
        ali = item.get("text_alignment")
        if ali is None:
            continue
        if not isinstance(ali, str):
            raise AlignmentError(path, f"data[{k}] ({wav}): text_alignment must be a string")
        out[wav] = parse_text_alignment(ali, f"{path} data[{k}] ({wav})", skip_labels)
    return out


# --------------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------------


def read_alignment(path: str | Path, **kwargs: Any) -> list[WordInterval]:
    """Read one utterance's word alignment, choosing the reader by file suffix.

    ``.TextGrid`` (any case) -> :func:`read_textgrid`; ``.words`` -> :func:`read_buckeye_words`; ``.json`` ->
    :func:`read_json_alignment`. Keyword arguments go to the chosen reader.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".textgrid":
        return read_textgrid(path, **kwargs)
    if suffix == ".words":
        return read_buckeye_words(path, **kwargs)
    if suffix == ".json":
        return read_json_alignment(path, **kwargs)
    raise AlignmentError(path, f"unknown alignment format {path.suffix!r} (expected .TextGrid, .words or .json)")
