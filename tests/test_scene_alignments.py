"""Measured word alignments of spoken-scenes captions (vgskit.data.scene_alignments)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vgskit.data.scene_alignments import (
    ALIGNMENTS_FILE,
    _caption_words,
    _read_wav_int16,
    _word_sample_spans,
    espeak_synthesize,
    load_word_alignments,
    word_alignments,
)
from vgskit.segmentation.alignments import AlignmentError
from vgskit.segmentation.metrics import evaluate_segmentation

SR = 16000


@pytest.fixture(scope="module")
def aligned_corpus(tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny corpus (the session one stays untouched) with its alignments computed."""
    corpus = tmp_path_factory.mktemp("aligned") / "corpus"
    shutil.copytree(tiny_manifest.parent, corpus)
    word_alignments(corpus, progress=False, workers=2)
    return corpus


def _records(corpus: Path) -> list[dict]:
    return [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines() if line.strip()]


def _speaker(record: dict) -> tuple[str, int, int]:
    _, voice, speed, pitch = record["speaker"].split(":")
    return voice, int(speed[1:]), int(pitch[1:])


def test_espeak_captions_are_aligned_word_by_word(aligned_corpus: Path) -> None:
    found = load_word_alignments(aligned_corpus)
    records = _records(aligned_corpus)
    assert set(found) == {r["caption_id"] for r in records}
    n_espeak = 0
    for rec in records:
        words = found[rec["caption_id"]]
        if rec["speaker"].startswith("flite:"):
            assert words is None  # no measured times: reported missing, never guessed
            continue
        n_espeak += 1
        # Every stored WAV is reproduced exactly, so every espeak caption gets its alignment.
        assert words is not None, rec["caption_id"]
        expected = [w.strip(",.") for w in rec["text"].split()]
        assert [w.word for w in words] == expected
        duration = len(_read_wav_int16(aligned_corpus / rec["audio"])) / SR
        for w in words:
            assert 0.0 <= w.start < w.end <= duration + 1e-9, (rec["caption_id"], w)
        for a, b in zip(words, words[1:], strict=False):
            assert a.end <= b.start + 1e-9, (rec["caption_id"], a, b)
    assert n_espeak >= 100

    # The alignments feed the segmentation metrics directly: a perfect segmentation scores 1.
    pairs = [(words, words) for words in found.values() if words]
    scores = evaluate_segmentation(pairs)
    assert scores.boundary.f1 == pytest.approx(1.0)
    assert scores.token.f1 == pytest.approx(1.0)


def test_boundaries_fall_on_pauses_and_match_isolated_words(aligned_corpus: Path) -> None:
    found = load_word_alignments(aligned_corpus)
    espeak = [r for r in _records(aligned_corpus) if r["speaker"].startswith("espeak:")]

    # Whatever lies outside the words (pauses between them, the lead-in and the tail) is quiet in the stored
    # audio: silence, or the echo some voice variants add (up to ~5% of the peak for 130 ms).
    for rec in espeak:
        words = found[rec["caption_id"]]
        audio = np.abs(_read_wav_int16(aligned_corpus / rec["audio"]).astype(np.int32))
        peak = audio.max()
        edges = [0.0] + [t for w in words for t in (w.start, w.end)] + [len(audio) / SR]
        for gap_start, gap_end in zip(edges[::2], edges[1::2], strict=True):
            lo, hi = round(gap_start * SR) + 2, round(gap_end * SR) - 2  # slack for the resampling filter
            if hi > lo:
                assert audio[lo:hi].max() < 0.1 * peak, (rec["caption_id"], gap_start, gap_end)

    # A word synthesized on its own with the same voice lasts about as long as its aligned stretch. Isolated words
    # are a little longer (final lengthening, full stress), so the ratio is below one; a boundary off by a word
    # or by a sizeable fraction of one would scatter it far wider.
    ratios = []
    for rec in espeak[:12]:
        voice, speed, pitch = _speaker(rec)
        for w in found[rec["caption_id"]]:
            if len(w.word) < 4 or w.word in {"there", "including"}:
                continue  # function words are reduced in running speech ("there is": 0.3 of "there" alone)
            alone = espeak_synthesize(w.word, voice, speed, pitch, (w.word,))
            spans, why = _word_sample_spans(w.word, alone)
            assert spans is not None, why
            isolated = (spans[0][2] - spans[0][1]) / alone.sample_rate
            ratios.append(w.duration / isolated)
    assert len(ratios) >= 30
    assert 0.6 <= float(np.median(ratios)) <= 1.1
    assert 0.3 <= min(ratios) and max(ratios) <= 1.5


def test_synthesis_reproduces_the_command_line_program(aligned_corpus: Path) -> None:
    # Each synthesis starts from the library's fresh state: the same caption twice gives the same samples.
    rec = next(r for r in _records(aligned_corpus) if r["speaker"].startswith("espeak:"))
    voice, speed, pitch = _speaker(rec)
    first = espeak_synthesize(rec["text"], voice, speed, pitch)
    espeak_synthesize("something else entirely", "en-gb+f4", 160, 70)
    again = espeak_synthesize(rec["text"], voice, speed, pitch)
    assert np.array_equal(first.samples, again.samples)
    # Word events point at the caption's words (some words share an event: "on the" is one dictionary entry).
    starts = {a for a, _, _ in _caption_words(rec["text"])}
    assert all(char in starts for char, length, _ in first.words if length)


def test_load_refuses_missing_corrupted_and_stale_files(aligned_corpus: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(aligned_corpus, corpus)
    path = corpus / ALIGNMENTS_FILE
    original = path.read_text()

    # Corrupted: a time edited without its checksum.
    data = json.loads(original)
    caption_id = next(k for k, v in data["alignments"].items() if v)
    data["alignments"][caption_id][0][2] += 0.05
    path.write_text(json.dumps(data))
    with pytest.raises(AlignmentError, match="corrupted"):
        load_word_alignments(corpus)

    # Truncated / not JSON.
    path.write_text(original[: len(original) // 2])
    with pytest.raises(AlignmentError, match="invalid JSON"):
        load_word_alignments(corpus)

    # Stale: the audio changed after the alignments were computed.
    path.write_text(original)
    load_word_alignments(corpus)
    wav = corpus / "wavs" / f"{caption_id}.wav"
    raw = bytearray(wav.read_bytes())
    raw[-1] ^= 0x01
    wav.write_bytes(bytes(raw))
    with pytest.raises(AlignmentError, match="stale: its wavs_sha256"):
        load_word_alignments(corpus)
    # ... and computing again rebuilds the file; the altered caption no longer matches its re-synthesis.
    word_alignments(corpus, progress=False, workers=1)
    rebuilt = load_word_alignments(corpus)
    assert rebuilt[caption_id] is None
    assert json.loads(path.read_text())["counts"]["wav_mismatch"] == 1

    # Stale: the manifest changed.
    manifest = corpus / "manifest.jsonl"
    manifest.write_text(manifest.read_text() + "\n")
    with pytest.raises(AlignmentError, match="stale: its manifest_sha256"):
        load_word_alignments(corpus)

    # Missing.
    path.unlink()
    with pytest.raises(AlignmentError, match="not found"):
        load_word_alignments(corpus)
