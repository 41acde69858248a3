"""Word alignment readers on small files of every format, well formed and malformed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vgskit.segmentation import (
    AlignmentError,
    WordInterval,
    parse_text_alignment,
    read_alignment,
    read_buckeye_words,
    read_json_alignment,
    read_spokencoco_alignments,
    read_textgrid,
)

LONG_TEXTGRID = """File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0
xmax = 1.5
tiers? <exists>
size = 2
item []:
    item [1]:
        class = "IntervalTier"
        name = "phones"
        xmin = 0
        xmax = 1.5
        intervals: size = 1
        intervals [1]:
            xmin = 0
            xmax = 1.5
            text = "x"
    item [2]:
        class = "IntervalTier"
        name = "words"
        xmin = 0
        xmax = 1.5
        intervals: size = 4
        intervals [1]:
            xmin = 0
            xmax = 0.2
            text = ""
        intervals [2]:
            xmin = 0.2
            xmax = 0.7
            text = "say ""hi"" now"
        intervals [3]:
            xmin = 0.7
            xmax = 0.9
            text = "sil"
        intervals [4]:
            xmin = 0.9
            xmax = 1.5
            text = "world"
"""

SHORT_TEXTGRID = """File type = "ooTextFile"
Object class = "TextGrid"

0
1.5
<exists>
2
"TextTier"
"events"
0
1.5
1
0.5
"click"
"IntervalTier"
"lexical"
0
1.5
3
0
0.2
"sp"
0.2
0.7
"hello"
0.7
1.5
"world"
"""

BUCKEYE = """signal s0101a
type 0
color 121
comment
font -misc-*-bold-*-*-*-15-*-*-*-*-*-*-*
separator ;
nfields 4
#
    0.165806  121 {B_TRANS}; {B_TRANS}; {B_TRANS}; null
    0.409048  121 okay; ow k ey; ow k ey; NN
    0.600000  121 <SIL>; <SIL>; <SIL>; null
    0.950000  121 um; ah m; ah m; UH
"""


def _write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding=encoding)
    return p


def test_textgrid_long_format(tmp_path: Path) -> None:
    p = _write(tmp_path, "utt.TextGrid", LONG_TEXTGRID)
    words = read_textgrid(p)  # picks the tier named "words", skips "" and "sil"
    assert words == [WordInterval('say "hi" now', 0.2, 0.7), WordInterval("world", 0.9, 1.5)]
    assert read_textgrid(p, tier="phones") == [WordInterval("x", 0.0, 1.5)]
    assert len(read_textgrid(p, skip_labels=())) == 4  # keep everything, empty labels included
    assert read_alignment(p) == words


def test_textgrid_short_format_utf16(tmp_path: Path) -> None:
    p = _write(tmp_path, "utt.textgrid", SHORT_TEXTGRID, encoding="utf-16")
    # No tier named "words": the first interval tier (the point tier is passed over).
    assert read_textgrid(p) == [WordInterval("hello", 0.2, 0.7), WordInterval("world", 0.7, 1.5)]
    with pytest.raises(AlignmentError, match="not an interval tier"):
        read_textgrid(p, tier="events")
    with pytest.raises(AlignmentError, match=r"no tier named 'words'.*lexical"):
        read_textgrid(p, tier="words")


def test_textgrid_malformed(tmp_path: Path) -> None:
    bad_number = _write(tmp_path, "bad.TextGrid", LONG_TEXTGRID.replace("xmax = 0.7", 'xmax = "0.7"'))
    with pytest.raises(AlignmentError, match=r"bad\.TextGrid: line 31: expected xmax of interval 2") as err:
        read_textgrid(bad_number)
    assert str(bad_number) in str(err.value)
    truncated = _write(tmp_path, "cut.TextGrid", LONG_TEXTGRID[: LONG_TEXTGRID.index("intervals [4]")])
    with pytest.raises(AlignmentError, match=r"cut\.TextGrid: .*file ends early"):
        read_textgrid(truncated)
    not_praat = _write(tmp_path, "x.TextGrid", '"hello"\n')
    with pytest.raises(AlignmentError, match=r"x\.TextGrid: line 1: not a Praat text file"):
        read_textgrid(not_praat)
    backwards = _write(
        tmp_path, "back.TextGrid", LONG_TEXTGRID.replace("xmax = 1.5\n            text", "xmax = 0.1\n            text")
    )
    with pytest.raises(AlignmentError, match=r"back\.TextGrid: line \d+: .*before start"):
        read_textgrid(backwards, tier="words")


def test_buckeye_words(tmp_path: Path) -> None:
    p = _write(tmp_path, "s0101a.words", BUCKEYE)
    # Starts are the previous line's end, also after a skipped token.
    assert read_buckeye_words(p) == [WordInterval("okay", 0.165806, 0.409048), WordInterval("um", 0.6, 0.95)]
    everything = read_buckeye_words(p, skip_noise=False, skip_labels=())
    assert [w.word for w in everything] == ["{B_TRANS}", "okay", "<SIL>", "um"]
    assert read_buckeye_words(p, skip_labels={"um"}) == [WordInterval("okay", 0.165806, 0.409048)]
    assert read_alignment(p) == read_buckeye_words(p)


def test_buckeye_malformed(tmp_path: Path) -> None:
    no_header = _write(tmp_path, "a.words", BUCKEYE.replace("#\n", ""))
    with pytest.raises(AlignmentError, match=r"a\.words: no header end"):
        read_buckeye_words(no_header)
    bad_time = _write(tmp_path, "b.words", BUCKEYE.replace("0.409048", "0.4o9"))
    with pytest.raises(AlignmentError, match=r"b\.words: line 10: expected an end time"):
        read_buckeye_words(bad_time)
    backwards = _write(tmp_path, "c.words", BUCKEYE.replace("0.950000", "0.500000"))
    with pytest.raises(AlignmentError, match=r"c\.words: line 12: time goes backwards"):
        read_buckeye_words(backwards)


def test_json_formats(tmp_path: Path) -> None:
    words = [{"word": "a", "start": 0.1, "end": 0.2}, {"word": "sil", "start": 0.2, "end": 0.3},
             {"word": "dog", "start": 0.3, "end": 0.6}]
    expected = [WordInterval("a", 0.1, 0.2), WordInterval("dog", 0.3, 0.6)]
    assert read_json_alignment(_write(tmp_path, "l.json", json.dumps(words))) == expected
    assert read_alignment(_write(tmp_path, "w.json", json.dumps({"words": words}))) == expected
    item = {"caption": {"wav": "x.wav"}, "text_alignment": "0.1__A__0.2 0.3__DOG__0.6"}
    assert read_json_alignment(_write(tmp_path, "i.json", json.dumps(item))) == [
        WordInterval("A", 0.1, 0.2), WordInterval("DOG", 0.3, 0.6)]
    split = {"data": [item, {"caption": {"wav": "y.wav"}}]}
    p = _write(tmp_path, "split.json", json.dumps(split))
    assert read_spokencoco_alignments(p) == {"x.wav": [WordInterval("A", 0.1, 0.2), WordInterval("DOG", 0.3, 0.6)]}
    with pytest.raises(AlignmentError, match=r"split\.json: holds many utterances"):
        read_json_alignment(p)
    # Tokens that are not start__word__end triples are ignored, as in the reference.
    assert parse_text_alignment("junk 0.0__HI__0.4") == [WordInterval("HI", 0.0, 0.4)]


def test_json_malformed(tmp_path: Path) -> None:
    broken = _write(tmp_path, "broken.json", '[{"word": "a", "start": 0.1,\n "end": }]')
    with pytest.raises(AlignmentError, match=r"broken\.json: line 2, column \d+: invalid JSON"):
        read_json_alignment(broken)
    missing = _write(tmp_path, "missing.json", json.dumps([{"word": "a", "start": 0.1}]))
    with pytest.raises(AlignmentError, match=r"missing\.json: entry\[0\]: expected an object"):
        read_json_alignment(missing)
    text = _write(tmp_path, "text.json", json.dumps([{"word": "a", "start": "0.1", "end": 0.2}]))
    with pytest.raises(AlignmentError, match=r"text\.json: entry\[0\]: 'start' and 'end' must be numbers"):
        read_json_alignment(text)
    bad_tok = _write(tmp_path, "tok.json", json.dumps({"text_alignment": "0.1__A__x"}))
    with pytest.raises(AlignmentError, match=r"tok\.json: token 1"):
        read_json_alignment(bad_tok)
    bad_split = _write(tmp_path, "s.json", json.dumps({"data": [{"caption": {}}]}))
    with pytest.raises(AlignmentError, match=r"s\.json: data\[0\]: missing caption\.wav"):
        read_spokencoco_alignments(bad_split)


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AlignmentError, match=r"a\.ctm: unknown alignment format"):
        read_alignment(tmp_path / "a.ctm")
    with pytest.raises(AlignmentError, match=r"nope\.words: cannot be read"):
        read_alignment(tmp_path / "nope.words")
