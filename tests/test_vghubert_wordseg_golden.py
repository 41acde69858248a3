"""Parity of the VG-HuBERT CLS-attention word segmentation with the reference (golden case in tests/golden/).

Every size, argument and tolerance is read from the case: quantile levels from ``input.thresholds``, ``spf``,
``start_sec`` and ``end_sec`` from its ``data`` section, the variants and pooling methods from the names of its
``output.*`` tensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from vgskit.errors import ConfigError
from vgskit.models.vg_hubert import (
    SegmentationError,
    attention_runs,
    cls_attention_from_row,
    head_thresholds,
    keep_runs,
    readme_word_intervals,
    seconds_per_frame,
    segment_words,
    segment_words_in_span,
    selected_frames,
)

GOLDEN = Path(__file__).parent / "golden"
CASE = "vghubert_cls_attn_segmentation"


def _load() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = load_file(str(GOLDEN / f"{CASE}.safetensors"))
    meta = json.loads((GOLDEN / f"{CASE}.json").read_text())
    assert sorted(tensors) == sorted(meta["tensors"])
    for key, info in meta["tensors"].items():
        assert list(tensors[key].shape) == info["shape"], key
        assert str(tensors[key].dtype) == f"torch.{info['dtype']}", key
    return tensors, meta


T, META = _load()
DATA = META["data"]
TOL = META["tolerance"]["recommended"]
ATOL = float(TOL["atol"])
SEC_TOL = float(re.search(r"seconds within ([0-9.eE+-]+)", TOL["note"]).group(1))
FEAT_RTOL = float(re.search(r"seg_feats rtol ([0-9.eE+-]+)", TOL["note"]).group(1))
SPF = float(DATA["spf"])
START, END = float(DATA["start_sec"]), float(DATA["end_sec"])


def _tag(q: float) -> str:
    """The case's name for a quantile level: 0.7 -> ``q070``."""
    return f"q{round(q * 100):03d}"


QS = [float(q) for q in T["input.thresholds"].tolist()]
TAGS = {_tag(q): q for q in QS}
# (tag, variant, pool) for every stored pooled-feature output: e.g. output.q070.main.mean.seg_feats.
POOLED = sorted(
    (m.group(1), m.group(2), m.group(3))
    for k in T
    if (m := re.fullmatch(r"output\.(q\d{3})\.(\w+)\.(\w+)\.seg_feats", k))
)


def _assert_seconds(ours: torch.Tensor, stored: torch.Tensor, what: str) -> None:
    assert ours.dtype == torch.float64, what
    assert ours.shape == stored.shape, what
    torch.testing.assert_close(ours, stored, rtol=0.0, atol=SEC_TOL, msg=what)


def test_case_is_complete() -> None:
    # Every quantile level has outputs, every output tag is a listed level, and the data section is consistent.
    assert {k.split(".")[1] for k in T if k.startswith("output.q")} == set(TAGS)
    assert SPF == seconds_per_frame(DATA["n_samples"], DATA["sample_rate"], DATA["T"])
    assert DATA["audio_len_in_sec"] == DATA["n_samples"] / DATA["sample_rate"]
    assert tuple(T["input.cls_attn_weights"].shape) == (DATA["heads"], DATA["T"])
    assert T["input.feats"].shape[0] == DATA["T"]
    assert {p for _, v, p in POOLED if v == "main"} == {"mean", "max", "median", "weightedmean"}


def test_cls_row_extraction() -> None:
    row = T["input.attn_row_with_cls"]  # [H, T+1]
    assert torch.equal(cls_attention_from_row(row), T["input.cls_attn_weights"])
    # A full [H, T+1, T+1] matrix gives the same row (query 0).
    full = row.unsqueeze(1).expand(row.shape[0], row.shape[1], row.shape[1])
    assert torch.equal(cls_attention_from_row(full), T["input.cls_attn_weights"])


@pytest.mark.parametrize("tag", sorted(TAGS))
def test_thresholds_and_selected_frames(tag: str) -> None:
    w, q = T["input.cls_attn_weights"], TAGS[tag]
    torch.testing.assert_close(head_thresholds(w, q), T[f"aux.{tag}.threshold_value"], rtol=0.0, atol=ATOL)
    assert torch.equal(selected_frames(w, q), T[f"aux.{tag}.selected_frames"])


@pytest.mark.parametrize("tag", sorted(TAGS))
def test_main_variant(tag: str) -> None:
    w, feats, q = T["input.cls_attn_weights"], T["input.feats"], TAGS[tag]
    seg = segment_words(w, q, SPF, feats=feats, pool="mean")
    assert torch.equal(seg.frames, T[f"aux.{tag}.main.boundary_frames"])
    _assert_seconds(seg.boundaries, T[f"output.{tag}.main.boundaries"], "boundaries")
    _assert_seconds(seg.locations, T[f"output.{tag}.main.locations"], "locations")
    assert seg.boundaries.tolist() == META["outputs_json"][str(q)]["main_boundaries_sec"]
    assert seg.frames.tolist() == META["outputs_json"][str(q)]["main_boundary_frames"]
    assert len(seg) == T[f"output.{tag}.main.boundaries"].shape[0]


@pytest.mark.parametrize(("tag", "variant", "pool"), POOLED)
def test_pooled_features(tag: str, variant: str, pool: str) -> None:
    w, feats, q = T["input.cls_attn_weights"], T["input.feats"], TAGS[tag]
    if variant == "main":
        seg = segment_words(w, q, SPF, feats=feats, pool=pool)
    else:
        seg = segment_words_in_span(w, q, SPF, START, END, feats=feats, pool=pool)
    stored = T[f"output.{tag}.{variant}.{pool}.seg_feats"]
    assert seg.features is not None and seg.features.dtype == stored.dtype
    torch.testing.assert_close(seg.features, stored, rtol=FEAT_RTOL, atol=ATOL)


@pytest.mark.parametrize("tag", sorted(TAGS))
def test_level2_keeps_single_frames(tag: str) -> None:
    seg = segment_words(T["input.cls_attn_weights"], TAGS[tag], SPF, level2=True)
    _assert_seconds(seg.boundaries, T[f"output.{tag}.main_level2.boundaries"], "level2 boundaries")
    assert seg.features is None


@pytest.mark.parametrize("tag", sorted(TAGS))
@pytest.mark.parametrize("variant", ["buckeye", "zs21"])
def test_span_variants(tag: str, variant: str) -> None:
    seg = segment_words_in_span(T["input.cls_attn_weights"], TAGS[tag], SPF, START, END)
    _assert_seconds(seg.boundaries, T[f"output.{tag}.{variant}.boundaries"], f"{variant} boundaries")
    if f"output.{tag}.{variant}.locations" in T:
        _assert_seconds(seg.locations, T[f"output.{tag}.{variant}.locations"], f"{variant} locations")
    assert seg.boundaries[0, 0].item() == START and seg.boundaries[-1, 1].item() == END


@pytest.mark.parametrize("tag", sorted(TAGS))
def test_readme_variant(tag: str) -> None:
    out = readme_word_intervals(T["input.cls_attn_weights"], TAGS[tag], SPF, DATA["audio_len_in_sec"])
    _assert_seconds(out.attn_intervals, T[f"output.{tag}.readme.attn_boundary_intervals"], "readme attn")
    _assert_seconds(out.word_intervals, T[f"output.{tag}.readme.word_boundary_intervals"], "readme words")
    stored = torch.tensor(META["outputs_json"][str(TAGS[tag])]["readme_word_boundary_intervals"], dtype=torch.float64)
    _assert_seconds(out.word_intervals, stored, "readme words (json)")
    # Contiguous: each interval starts where the previous one ends.
    assert torch.equal(out.word_intervals[1:, 0], out.word_intervals[:-1, 1])


def _single_frame_args() -> tuple[float, float, str]:
    """q, spf and pool of the single-frame case, as its description states them."""
    desc = META["tensors"]["output.single_frame.main.boundaries"]["description"]
    q = float(re.search(r"q=([0-9.]+)", desc).group(1))
    spf = float(re.search(r"spf=([0-9.]+)", desc).group(1))
    pool = re.search(r"pool=(\w+)", desc).group(1)
    return q, spf, pool


def test_single_frame_fallback() -> None:
    q, spf, pool = _single_frame_args()
    w = T["input.single_frame_attn"]
    runs = attention_runs(selected_frames(w, q))
    assert runs and all(e - s == 1 for s, e in runs)
    assert keep_runs(runs) == runs  # nothing longer than one frame: every run is kept
    seg = segment_words(w, q, spf, pool=pool)
    _assert_seconds(seg.boundaries, T["output.single_frame.main.boundaries"], "single-frame fallback")


def test_readme_variant_without_long_runs_raises() -> None:
    # The reference raises IndexError here; we raise a clear error instead.
    assert "IndexError" in META["readme_on_single_frame_attn"]
    q, spf, _ = _single_frame_args()
    with pytest.raises(SegmentationError, match="longer than one frame"):
        readme_word_intervals(T["input.single_frame_attn"], q, spf, 1.0)


def test_span_single_segment_keeps_its_end() -> None:
    # One run: the first-segment rule wins, so the end is start_sec + t_e * spf, not end_sec.
    w = torch.zeros(1, 10)
    w[0, 3:6] = 1.0
    seg = segment_words_in_span(w, 0.7, SPF, START, END)  # threshold 0.3: frames 3..5
    assert seg.frames.tolist() == [[3, 6]]
    assert seg.boundaries.tolist() == [[START, START + 6 * SPF]]


def test_validation_errors() -> None:
    w, feats = T["input.cls_attn_weights"], T["input.feats"]
    with pytest.raises(SegmentationError, match="empty"):
        segment_words(w[:, :0], 0.7, SPF)
    with pytest.raises(SegmentationError, match="frames"):
        segment_words(w, 0.7, SPF, feats=feats[:-1])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        segment_words(w, 1.5, SPF)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        selected_frames(w, -0.1)
    with pytest.raises(ConfigError, match="pooling"):
        segment_words(w, 0.7, SPF, feats=feats, pool="sum")
    with pytest.raises(ConfigError, match="spf"):
        segment_words(w, 0.7, 0.0)
    with pytest.raises(SegmentationError, match="NaN"):
        segment_words(torch.full_like(w, float("nan")), 0.7, SPF)
    with pytest.raises(SegmentationError, match=r"\[heads, T\+1\]"):
        cls_attention_from_row(w[0])
