"""Tests for vgskit.data.manifest: reading, validation with complete problem reports, and helpers."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from vgskit.data.manifest import (
    SCHEMA_FIELDS,
    Record,
    filter_split,
    image_index,
    read_manifest,
    summarize,
    write_manifest,
)
from vgskit.errors import ConfigError, ManifestError


def _line(cid: str, audio: str, image: str, image_id: str, split: str = "train", **extra: object) -> dict:
    return {"caption_id": cid, "audio": audio, "image": image, "image_id": image_id, "split": split, **extra}


def _write_lines(path: Path, lines: list[dict | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8"
    )
    return path


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    """A small valid corpus: 3 images, 5 captions, relative paths, two splits."""
    root = tmp_path / "corpus"
    _touch(root, "wavs/c1.wav", "wavs/c2.wav", "wavs/c3.wav", "wavs/c4.wav", "wavs/c5.wav")
    _touch(root, "images/b.jpg", "images/a.jpg", "images/c.jpg")
    _write_lines(
        root / "manifest.jsonl",
        [
            _line("c1", "wavs/c1.wav", "images/b.jpg", "b", text="a dog", speaker="s1"),
            _line("c2", "wavs/c2.wav", "images/a.jpg", "a", speaker="s2"),
            _line("c3", "wavs/c3.wav", "./images/b.jpg", "b", speaker="s1"),
            _line("c4", "wavs/c4.wav", "images/c.jpg", "c", split="test", text=None),
            _line("c5", "wavs/c5.wav", "images/b.jpg", "b", speaker="s3"),
        ],
    )
    return root


def test_relative_paths_resolve_against_the_manifest_folder(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    records = read_manifest(corpus / "manifest.jsonl")
    assert [r.caption_id for r in records] == ["c1", "c2", "c3", "c4", "c5"]
    assert records[0].audio == str(corpus / "wavs" / "c1.wav")
    assert records[2].image == str(corpus / "images" / "b.jpg")  # "./" normalised away
    assert all(Path(r.audio).is_absolute() and Path(r.image).is_absolute() for r in records)
    assert records[0].text == "a dog" and records[3].text is None and records[3].speaker is None


def test_root_overrides_the_manifest_folder(corpus: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "lists" / "m.jsonl"
    elsewhere.parent.mkdir()
    elsewhere.write_text((corpus / "manifest.jsonl").read_text())
    with pytest.raises(ManifestError, match="5 missing audio files, 3 missing image files"):
        read_manifest(elsewhere)
    records = read_manifest(elsewhere, root=corpus)
    assert records[1].image == str(corpus / "images" / "a.jpg")


def test_absolute_paths_round_trip_through_write_manifest(corpus: Path, tmp_path: Path) -> None:
    records = read_manifest(corpus / "manifest.jsonl")
    out = write_manifest(records, tmp_path / "copy" / "all.jsonl")
    assert read_manifest(out) == records


def test_split_selection(corpus: Path) -> None:
    test = read_manifest(corpus / "manifest.jsonl", split="test")
    assert [r.caption_id for r in test] == ["c4"]
    with pytest.raises(ManifestError, match=r"no records with split 'tset' \(splits present: test, train\)"):
        read_manifest(corpus / "manifest.jsonl", split="tset")
    records = read_manifest(corpus / "manifest.jsonl")
    assert [r.caption_id for r in filter_split(records, "train")] == ["c1", "c2", "c3", "c5"]
    assert filter_split(records, "val") == []


def test_unknown_split_names_are_accepted(tmp_path: Path) -> None:
    _touch(tmp_path, "a.wav", "a.jpg")
    path = _write_lines(tmp_path / "m.jsonl", [_line("x", "a.wav", "a.jpg", "a", split="dev-clean-2")])
    assert read_manifest(path)[0].split == "dev-clean-2"


def test_file_checks_cover_only_the_selected_split(tmp_path: Path) -> None:
    _touch(tmp_path, "t.wav", "t.jpg")
    path = _write_lines(
        tmp_path / "m.jsonl",
        [
            _line("a", "gone.wav", "gone.jpg", "g", split="train"),
            _line("b", "t.wav", "t.jpg", "t", split="test"),
        ],
    )
    assert [r.caption_id for r in read_manifest(path, split="test")] == ["b"]
    with pytest.raises(ManifestError, match="1 missing audio file, 1 missing image file"):
        read_manifest(path)


def test_every_problem_is_reported_at_once_with_counts(tmp_path: Path) -> None:
    _touch(tmp_path, "ok1.wav", "ok2.wav", "dup.wav", "img/a.jpg", "img/b.jpg")
    lines: list[dict | str] = [
        _line("ok1", "ok1.wav", "img/a.jpg", "a"),  # line 1: fine
        '{"caption_id": "broken", "audio": ',  # line 2: bad JSON
        _line("ok1", "dup.wav", "img/a.jpg", "a"),  # line 3: duplicate caption_id
        {"caption_id": "m", "image": "img/a.jpg", "image_id": "a", "split": "train"},  # line 4: no audio
        {**_line("t", "ok2.wav", "img/a.jpg", "a"), "image_id": 7},  # line 5: image_id of the wrong type
        _line("e", "ok2.wav", "img/a.jpg", "a", split="", speaker=3),  # line 6: empty split, bad speaker
        _line("conf", "ok2.wav", "img/b.jpg", "a"),  # line 7: image_id 'a' -> second path
        _line("x1", "lost1.wav", "img/a.jpg", "a"),  # lines 8, 9 and 11: three missing audio files
        _line("x2", "lost2.wav", "img/a.jpg", "a"),
        "",  # line 10: blank lines are allowed
        _line("x3", "lost3.wav", "img/nope.jpg", "nope"),  # line 11: + one missing image ...
        _line("x4", "ok1.wav", "img/nope.jpg", "nope"),  # line 12: ... reported once, not per caption
        "[1, 2]",  # line 13: not an object
    ]
    path = _write_lines(tmp_path / "m.jsonl", lines)

    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    err = info.value
    summary = str(err).splitlines()[0]
    for part in [
        "1 line with invalid JSON",
        "1 line that is not a JSON object",
        "1 missing field",
        "2 fields of the wrong type",
        "1 empty field",
        "1 duplicate caption_id",
        "1 image_id mapped to two image paths",
        "3 missing audio files",
        "1 missing image file",
    ]:
        assert part in summary
    assert str(path) in summary
    problems = "\n".join(err.problems)
    assert "line 2: invalid JSON" in problems
    assert "line 3: duplicate caption_id 'ok1' (first on line 1)" in problems
    assert "line 4: missing required field 'audio'" in problems
    assert "line 5: 'image_id' must be a string, got int 7" in problems
    assert "line 6: 'split' is an empty string" in problems
    conflict = f"line 7: image_id 'a' is {tmp_path / 'img' / 'b.jpg'} here but {tmp_path / 'img' / 'a.jpg'}"
    assert conflict + " on line 1" in problems
    for n, name in [(8, "lost1.wav"), (9, "lost2.wav"), (11, "lost3.wav")]:
        assert f"line {n}: audio file not found: {tmp_path / name}" in problems
    assert "line 12: image file" not in problems
    assert f"line 11: image file not found: {tmp_path / 'img' / 'nope.jpg'}" in problems
    assert "line 6: 'speaker' must be a string or null" in problems
    assert "line 13: expected a JSON object, got list" in problems
    assert len(err.problems) == 12


def test_check_files_false_skips_the_filesystem(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "m.jsonl", [_line(f"c{i}", f"w/{i}.wav", "i/x.jpg", "x") for i in range(3)]
    )
    with pytest.raises(ManifestError, match="3 missing audio files, 1 missing image file"):
        read_manifest(path)
    records = read_manifest(path, check_files=False)
    assert [r.audio for r in records] == [str(tmp_path / "w" / f"{i}.wav") for i in range(3)]


def test_structure_is_still_checked_without_file_checks(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "m.jsonl", [_line("c", "a.wav", "x.jpg", "x"), _line("c", "b.wav", "x.jpg", "x")]
    )
    with pytest.raises(ManifestError, match="1 duplicate caption_id"):
        read_manifest(path, check_files=False)


def test_missing_and_empty_manifests(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="file not found") as info:
        read_manifest(tmp_path / "absent.jsonl")
    assert info.value.path == str(tmp_path / "absent.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ManifestError, match="contains no records"):
        read_manifest(empty)


def test_utf8_bom_and_non_ascii_text(tmp_path: Path) -> None:
    _touch(tmp_path, "a.wav", "a.jpg")
    line = json.dumps(_line("ç1", "a.wav", "a.jpg", "a", text="un chien brun sur la plage, très vite"))
    (tmp_path / "m.jsonl").write_bytes("\ufeff".encode() + line.encode("utf-8") + b"\n")
    (rec,) = read_manifest(tmp_path / "m.jsonl")
    assert rec.caption_id == "ç1" and rec.text is not None and "très" in rec.text


def _rec(
    cid: str, image_id: str, split: str = "train", speaker: str | None = None, text: str | None = None
) -> Record:
    return Record(cid, f"/a/{cid}.wav", f"/i/{image_id}.jpg", image_id, split, text, speaker)


def test_image_index_first_seen_order_and_mapping() -> None:
    records = [_rec("0", "z"), _rec("1", "a"), _rec("2", "z"), _rec("3", "m"), _rec("4", "a"), _rec("5", "z")]
    image_ids, idx = image_index(records)
    assert image_ids == ["z", "a", "m"]  # first-seen, not sorted
    assert idx.dtype == np.int64
    assert idx.tolist() == [0, 1, 0, 2, 1, 0]
    assert all(image_ids[idx[i]] == r.image_id for i, r in enumerate(records))
    empty_ids, empty_idx = image_index([])
    assert empty_ids == [] and empty_idx.shape == (0,) and empty_idx.dtype == np.int64


def test_summarize_counts() -> None:
    records = [
        _rec("0", "a", speaker="s1", text="x"),
        _rec("1", "a", speaker="s2"),
        _rec("2", "a", speaker="s1", text="y"),
        _rec("3", "b"),
        _rec("4", "c", split="test", speaker="s3"),
        _rec("5", "b", split="test", speaker="s3"),
    ]
    s = summarize(records)
    assert s["captions"] == 6 and s["images"] == 3
    assert s["speakers"] == 3 and s["captions_without_speaker"] == 1 and s["captions_with_text"] == 2
    assert s["splits"] == {"test": {"captions": 2, "images": 2}, "train": {"captions": 4, "images": 2}}
    assert s["captions_per_image"] == {1: 1, 2: 1, 3: 1}  # c: 1 caption, b: 2, a: 3
    assert s["images_in_several_splits"] == 1  # b is in train and test
    json.dumps(s)  # ready for `vgskit data check --json`
    assert summarize([])["captions"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Extra fields
# ---------------------------------------------------------------------------------------------------------------

_WORDS = [{"word": "dog", "start": 0.25, "end": 0.61}, {"word": "beach", "start": 1.0, "end": 1.5}]
_BOXES = {"boxes": [[0, 0, 10, 20], [5, 5, 7, 7]], "traces": {"t": [0.5, None, True], "empty": {}}}


def test_unknown_fields_are_kept_with_their_values(tmp_path: Path) -> None:
    _touch(tmp_path, "a.wav", "b.wav", "a.jpg")
    path = _write_lines(
        tmp_path / "m.jsonl",
        [
            _line("c1", "a.wav", "a.jpg", "a", text="a dog", words=_WORDS, asr="a dog on the beach",
                  narrative=_BOXES, confidence=0.5, n=3, flag=False, nothing=None),
            _line("c2", "b.wav", "a.jpg", "a"),
        ],
    )
    c1, c2 = read_manifest(path)
    assert c1.text == "a dog"  # schema fields still go to their attributes ...
    assert dict(c1.extra) == {  # ... and every other field is kept, value for value, in line order
        "words": _WORDS, "asr": "a dog on the beach", "narrative": _BOXES,
        "confidence": 0.5, "n": 3, "flag": False, "nothing": None,
    }
    assert list(c1.extra) == ["words", "asr", "narrative", "confidence", "n", "flag", "nothing"]
    assert c1.extra.get("words") == _WORDS and c1.extra.get("absent") is None  # what the datasets call
    assert not set(c1.extra) & set(SCHEMA_FIELDS)
    assert c2.extra == {} and not c2.extra


def test_nested_extras_round_trip_through_write_and_read(tmp_path: Path) -> None:
    _touch(tmp_path, "a.wav", "b.wav", "a.jpg", "b.jpg")
    records = [
        Record("c1", str(tmp_path / "a.wav"), str(tmp_path / "a.jpg"), "a", "train", "a dog", "s1",
               extra={"words": _WORDS, "narrative": _BOXES, "asr": "ein hund", "extra": {"a field": "named extra"}}),
        Record("c2", str(tmp_path / "b.wav"), str(tmp_path / "b.jpg"), "b", "test"),
    ]
    out = write_manifest(records, tmp_path / "out" / "m.jsonl")
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["words"] == _WORDS and lines[0]["narrative"] == _BOXES  # at the top level, not nested
    assert lines[0]["extra"] == {"a field": "named extra"}  # a corpus field that happens to be called "extra"
    assert "extra" not in lines[1]
    assert list(lines[1]) == list(SCHEMA_FIELDS)
    back = read_manifest(out)
    assert back == records
    assert back[0].extra == records[0].extra and back[0].extra["narrative"]["traces"]["t"] == [0.5, None, True]
    assert [r.to_json() for r in back] == [r.to_json() for r in records]
    assert Record.from_json(records[0].to_json()) == records[0]  # the dict-level inverse too


def test_records_compare_by_content_and_stay_hashable() -> None:
    a = Record("c", "/a.wav", "/a.jpg", "a", "train", extra={"words": [{"w": "x"}], "asr": "x"})
    b = Record("c", "/a.wav", "/a.jpg", "a", "train", extra={"asr": "x", "words": [{"w": "x"}]})
    other = Record("c", "/a.wav", "/a.jpg", "a", "train", extra={"asr": "y", "words": [{"w": "x"}]})
    plain = Record("c", "/a.wav", "/a.jpg", "a", "train")
    assert a == b and hash(a) == hash(b)  # equal content, built separately, in another key order
    assert a != other and a != plain
    assert len({a, b, other, plain}) == 3 and {a: 1}[b] == 1  # lists inside extras do not break hashing
    assert plain.extra == {} and Record("c", "/a.wav", "/a.jpg", "a", "train", extra={}) == plain
    assert pickle.loads(pickle.dumps(a)) == a  # records reach loader workers and spawned processes by pickle
    moved = dataclasses.replace(a, split="test")
    assert moved.split == "test" and moved.extra == a.extra
    assert dataclasses.replace(a, extra={}) == plain


def test_extras_cannot_be_changed_in_place() -> None:
    source = {"asr": "x"}
    rec = Record("c", "/a.wav", "/a.jpg", "a", "train", extra=source)
    source["asr"] = "changed"  # the record keeps its own copy
    assert rec.extra == {"asr": "x"}
    with pytest.raises(TypeError, match="read-only"):
        rec.extra["asr"] = "y"  # type: ignore[index]
    with pytest.raises(TypeError, match="read-only"):
        rec.extra.update(asr="y")  # type: ignore[attr-defined]
    assert rec.extra == {"asr": "x"}


def test_an_extra_field_cannot_shadow_a_schema_field() -> None:
    with pytest.raises(ConfigError, match=r"Record 'c': extra field 'text' is a schema field"):
        Record("c", "/a.wav", "/a.jpg", "a", "train", extra={"text": "hidden"})
    with pytest.raises(ConfigError, match="extra field names must be strings"):
        Record("c", "/a.wav", "/a.jpg", "a", "train", extra={1: "x"})
    with pytest.raises(ConfigError, match="extra must be a mapping"):
        Record("c", "/a.wav", "/a.jpg", "a", "train", extra=[("asr", "x")])  # type: ignore[arg-type]


def test_a_value_json_cannot_encode_is_rejected_when_writing(tmp_path: Path) -> None:
    good = Record("c1", "/a.wav", "/a.jpg", "a", "train", extra={"asr": "x"})
    bad = Record("c2", "/b.wav", "/a.jpg", "a", "train", extra={"asr": "y", "score": np.float32(0.5)})
    target = write_manifest([good], tmp_path / "m.jsonl")
    before = target.read_bytes()
    with pytest.raises(ManifestError, match="cannot write") as info:
        write_manifest([good, bad], target)
    assert info.value.path == str(target)
    assert info.value.problems == [
        "caption 'c2': extra field 'score' is not JSON-serialisable (Object of type float32 is not JSON serializable)"
    ]
    assert target.read_bytes() == before  # the old manifest is untouched ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]  # ... and no temporary file is left


def test_schema_field_validation_is_unchanged_by_extras(tmp_path: Path) -> None:
    _touch(tmp_path, "a.wav", "a.jpg")
    path = _write_lines(
        tmp_path / "m.jsonl",
        [
            _line("c1", "a.wav", "a.jpg", "a", text=["not", "a", "string"], words=_WORDS),
            _line("c2", "a.wav", "a.jpg", "a", speaker=7, extra={"nested": 1}),
            {**_line("c3", "a.wav", "a.jpg", "a", asr="x"), "split": None},
        ],
    )
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert info.value.problems == [
        "line 1: 'text' must be a string or null, got list ['not', 'a', 'string']",
        "line 2: 'speaker' must be a string or null, got int 7",
        "line 3: missing required field 'split'",
    ]
