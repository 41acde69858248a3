"""Word segmentation from the CLS attention of VG-HuBERT (Peng & Harwath, Interspeech 2022).

VG-HuBERT's audio CLS token attends, in its middle layers (layer 9 in the published settings), to short stretches of
frames that line up with words. Segments are read off that attention with a per-head quantile threshold:

1. for every head ``h`` the threshold is ``torch.quantile(w[h], q)`` (linear interpolation);
2. a frame is *selected* when ANY head's weight is ``>=`` that head's threshold;
3. consecutive selected frames form runs ``[t_s, t_e)`` (end exclusive);
4. runs of a single frame are dropped, unless ``level2=True`` or no longer run exists (then every run is kept, so an
   utterance never ends up without segments);
5. with ``spf`` seconds per frame (``n_samples / sample_rate / T``) a run spans ``[t_s * spf, t_e * spf]`` seconds and
   is located at ``spf * (t_s + t_e) / 2``;
6. optionally one feature vector per run is pooled from the frame features (``mean``, ``max``, ``median``,
   ``weightedmean``; see :func:`pool_segments`).

Three variants of the public reference exist and are reproduced here exactly (golden case
``vghubert_cls_attn_segmentation``):

* :func:`segment_words` — the SpokenCOCO/TIMIT feature script (boundaries relative to the utterance start);
* :func:`segment_words_in_span` — the Buckeye and ZeroSpeech 2021 scripts, which segment a voice-activity span of a
  longer recording and stretch the first and last segments to the span edges;
* :func:`readme_word_intervals` — the stand-alone snippet of the reference README, which turns the attention runs
  into contiguous word intervals by cutting at the midpoints between runs.

Recommended settings from the reference README: VG-HuBERT_3 at layer 9 with ``q = 0.7`` and VG-HuBERT_4 at layer 9
with ``q = 0.8``; the reference scripts default to ``q = 0.9``.

All functions are pure (no module state, no gradients needed) and accept attention of one utterance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vgskit.errors import ConfigError, VGSKitError

__all__ = [
    "POOL_METHODS",
    "PoolMethod",
    "ReadmeSegmentation",
    "SegmentationError",
    "WordSegments",
    "attention_runs",
    "cls_attention_from_row",
    "head_thresholds",
    "keep_runs",
    "pool_segments",
    "readme_word_intervals",
    "seconds_per_frame",
    "segment_words",
    "segment_words_in_span",
    "selected_frames",
]

PoolMethod = Literal["mean", "max", "median", "weightedmean"]
POOL_METHODS: tuple[str, ...] = ("mean", "max", "median", "weightedmean")


class SegmentationError(VGSKitError, ValueError):
    """Attention or features that cannot be segmented (wrong shape, empty, not finite, no usable run)."""


@dataclass(frozen=True)
class WordSegments:
    """Word-like segments of one utterance, in time order.

    Attributes:
        frames: ``[S, 2]`` int64, frame indices ``[t_s, t_e)`` of each segment (end exclusive).
        boundaries: ``[S, 2]`` float64, ``(start, end)`` of each segment in seconds.
        locations: ``[S]`` float64, the segment centres in seconds.
        features: ``[S, D]`` pooled segment features (dtype of the frame features), or ``None`` when no frame
            features were given.
        spf: seconds per frame used for the conversion.
    """

    frames: Tensor
    boundaries: Tensor
    locations: Tensor
    features: Tensor | None
    spf: float

    def __len__(self) -> int:
        return int(self.frames.shape[0])


@dataclass(frozen=True)
class ReadmeSegmentation:
    """Output of the README variant (:func:`readme_word_intervals`).

    Attributes:
        attn_intervals: ``[S, 2]`` float64, the attention runs longer than one frame, in seconds.
        word_intervals: ``[S, 2]`` float64, contiguous word intervals in seconds whose edges are the midpoints
            between consecutive runs (plus half-way points towards the utterance start and end).
    """

    attn_intervals: Tensor
    word_intervals: Tensor


# --------------------------------------------------------------------------------------------------------------
# Validation and small utilities
# --------------------------------------------------------------------------------------------------------------


def _check_quantile(q: float) -> float:
    q = float(q)
    if not (0.0 <= q <= 1.0) or math.isnan(q):
        raise ConfigError(f"quantile threshold q must lie in [0, 1], got {q}")
    return q


def _check_attention(cls_attn: Tensor) -> Tensor:
    """Validate CLS attention ``[heads, T]`` (a single ``[T]`` row is read as one head)."""
    if not isinstance(cls_attn, Tensor):
        raise SegmentationError(f"CLS attention must be a torch.Tensor, got {type(cls_attn).__name__}")
    if cls_attn.dim() == 1:
        cls_attn = cls_attn.unsqueeze(0)  # [T] -> [1, T]
    if cls_attn.dim() != 2:
        raise SegmentationError(
            f"CLS attention must have shape [heads, T] (CLS column already dropped), got {tuple(cls_attn.shape)}"
        )
    if cls_attn.shape[0] == 0 or cls_attn.shape[1] == 0:
        raise SegmentationError(f"CLS attention is empty: shape {tuple(cls_attn.shape)}")
    if not cls_attn.is_floating_point():
        raise SegmentationError(f"CLS attention must be a floating-point tensor, got {cls_attn.dtype}")
    # NaN thresholds would silently select nothing; an utterance with broken attention should be reported instead.
    if not bool(torch.isfinite(cls_attn).all()):
        raise SegmentationError("CLS attention contains NaN or infinite values")
    return cls_attn


def _check_spf(spf: float) -> float:
    spf = float(spf)
    if not (spf > 0.0) or math.isinf(spf):
        raise ConfigError(f"seconds per frame (spf) must be a positive finite number, got {spf}")
    return spf


def _check_feats(feats: Tensor, n_frames: int) -> None:
    if feats.dim() != 2:
        raise SegmentationError(f"frame features must have shape [T, D], got {tuple(feats.shape)}")
    if feats.shape[0] != n_frames:
        raise SegmentationError(
            f"frame features have {feats.shape[0]} frames but the attention covers {n_frames} frames "
            f"(features {tuple(feats.shape)} must be [T, D] for attention [heads, T]; drop the CLS frame from both)"
        )


def seconds_per_frame(n_samples: int, sample_rate: int, n_frames: int) -> float:
    """Seconds per output frame, ``n_samples / sample_rate / n_frames``, as the reference computes it.

    Using the real audio length (rather than the nominal 20 ms HuBERT stride) keeps the last segment's end inside the
    utterance even though the convolutional front end drops a few samples at the edges.
    """
    if n_samples <= 0 or sample_rate <= 0 or n_frames <= 0:
        raise ConfigError(
            f"n_samples, sample_rate and n_frames must be positive, got {n_samples}, {sample_rate}, {n_frames}"
        )
    return n_samples / sample_rate / n_frames


def cls_attention_from_row(attn: Tensor) -> Tensor:
    """The CLS-to-frame attention ``[heads, T]`` from a CLS attention row that still holds the CLS column.

    Args:
        attn: ``[heads, T+1]`` (the CLS query's softmax row of every head, key 0 = the CLS token itself) or the full
            per-head attention matrix ``[heads, T+1, T+1]`` (query 0 is taken).

    Returns:
        ``[heads, T]``, i.e. ``attn[:, 1:]``: the weight the CLS token puts on itself says nothing about where words
        are, so it is dropped before thresholding (the reference does the same).
    """
    if not isinstance(attn, Tensor):
        raise SegmentationError(f"attention must be a torch.Tensor, got {type(attn).__name__}")
    if attn.dim() == 3:
        if attn.shape[1] != attn.shape[2]:
            raise SegmentationError(
                f"a full attention matrix must be [heads, T+1, T+1], got {tuple(attn.shape)}"
            )
        attn = attn[:, 0, :]  # [H, T+1, T+1] -> [H, T+1] (the CLS query)
    if attn.dim() != 2:
        raise SegmentationError(f"CLS attention row must be [heads, T+1], got {tuple(attn.shape)}")
    if attn.shape[1] < 2:
        raise SegmentationError(
            f"CLS attention row {tuple(attn.shape)} holds no frame after the CLS column"
        )
    return attn[:, 1:]  # [H, T]


# --------------------------------------------------------------------------------------------------------------
# Core steps
# --------------------------------------------------------------------------------------------------------------


def head_thresholds(cls_attn: Tensor, q: float) -> Tensor:
    """Per-head threshold ``torch.quantile(w[h], q)`` with linear interpolation.

    Args:
        cls_attn: ``[heads, T]`` CLS-to-frame attention.
        q: quantile level in ``[0, 1]``.

    Returns:
        ``[heads, 1]`` thresholds, same dtype as ``cls_attn``.
    """
    cls_attn = _check_attention(cls_attn)
    q = _check_quantile(q)
    # A per-head quantile (rather than one global threshold) lets heads with flat and with peaked attention both
    # contribute; ``interpolation="linear"`` is torch's default and what the reference uses.
    return torch.quantile(cls_attn, q, dim=-1, keepdim=True, interpolation="linear")  # [H, 1]


def selected_frames(cls_attn: Tensor, q: float) -> Tensor:
    """Frames where ANY head's weight is ``>=`` its own quantile threshold.

    Args:
        cls_attn: ``[heads, T]``.
        q: quantile level in ``[0, 1]``.

    Returns:
        ``[T]`` bool mask.
    """
    cls_attn = _check_attention(cls_attn)
    thr = head_thresholds(cls_attn, q)  # [H, 1]
    return (cls_attn >= thr).any(dim=0)  # [H, T] -> [T]


def attention_runs(selected: Tensor) -> list[tuple[int, int]]:
    """Maximal runs of consecutive selected frames as ``[t_s, t_e)`` pairs (end exclusive), in time order.

    Args:
        selected: ``[T]`` bool mask.
    """
    if selected.dim() != 1:
        raise SegmentationError(f"selected-frame mask must be 1-D [T], got {tuple(selected.shape)}")
    idx = torch.nonzero(selected, as_tuple=False).flatten().tolist()  # sorted frame indices
    runs: list[tuple[int, int]] = []
    for t in idx:
        if runs and runs[-1][1] == t:
            runs[-1] = (runs[-1][0], t + 1)  # extends the current run
        else:
            runs.append((t, t + 1))
    # t_e = last + 1 never exceeds T because the last index is at most T - 1 (the reference clamps it anyway).
    return runs


def keep_runs(runs: list[tuple[int, int]], level2: bool = False) -> list[tuple[int, int]]:
    """Drop single-frame runs unless ``level2`` is set or no run is longer than one frame.

    A single frame above threshold is mostly a stray attention spike; but an utterance whose every run is a single
    frame would otherwise have no segment at all, so then all runs are kept (the reference's fallback).
    """
    if level2:
        return list(runs)
    longer = [r for r in runs if r[1] - r[0] > 1]
    return longer if longer else list(runs)


def pool_segments(feats: Tensor, cls_attn: Tensor, frames: list[tuple[int, int]], pool: str = "mean") -> Tensor:
    """One feature vector per segment.

    Args:
        feats: ``[T, D]`` frame features (the CLS frame removed).
        cls_attn: ``[heads, T]`` CLS attention; only its head sum ``a[t] = sum_h w[h, t]`` is used.
        frames: segments ``[t_s, t_e)``.
        pool: ``mean`` — ``feats[t_s:t_e].mean(0)``; ``max`` — the frame with the largest head-summed attention in the
            run (first one on ties); ``median`` — ``feats[int((t_s + t_e) / 2)]`` (the middle frame, not an
            element-wise median); ``weightedmean`` — ``sum_t feats[t] * a[t] / sum_t a[t]`` over the run.

    Returns:
        ``[S, D]`` in the dtype of ``feats`` (``[0, D]`` when there is no segment).
    """
    cls_attn = _check_attention(cls_attn)
    _check_feats(feats, cls_attn.shape[-1])
    if pool not in POOL_METHODS:
        raise ConfigError(f"unknown pooling {pool!r}; choose one of {', '.join(POOL_METHODS)}")
    attn_sum = cls_attn.sum(0)  # [T], summed over heads in the attention dtype, like the reference
    out: list[Tensor] = []
    for t_s, t_e in frames:
        if not (0 <= t_s < t_e <= feats.shape[0]):
            raise SegmentationError(f"segment [{t_s}, {t_e}) is outside the {feats.shape[0]} frames")
        if pool == "mean":
            out.append(feats[t_s:t_e].mean(0))  # [D]
        elif pool == "max":
            out.append(feats[t_s + int(torch.argmax(attn_sum[t_s:t_e]))])  # [D]
        elif pool == "median":
            out.append(feats[int((t_s + t_e) / 2)])  # [D]
        else:  # weightedmean
            w = attn_sum[t_s:t_e]  # [L]
            out.append((feats[t_s:t_e] * (w / w.sum()).unsqueeze(1)).sum(0))  # [L, D] -> [D]
    if not out:
        return feats.new_zeros((0, feats.shape[1]))
    return torch.stack(out)  # [S, D]


def _segment_frames(cls_attn: Tensor, q: float, level2: bool) -> list[tuple[int, int]]:
    return keep_runs(attention_runs(selected_frames(cls_attn, q)), level2=level2)


def _frames_tensor(frames: list[tuple[int, int]]) -> Tensor:
    return torch.tensor(frames, dtype=torch.int64).reshape(-1, 2)  # [S, 2]


# --------------------------------------------------------------------------------------------------------------
# The three reference variants
# --------------------------------------------------------------------------------------------------------------


def segment_words(
    cls_attn: Tensor,
    q: float,
    spf: float,
    feats: Tensor | None = None,
    pool: PoolMethod | str = "mean",
    level2: bool = False,
) -> WordSegments:
    """Segment one utterance with the CLS attention (the SpokenCOCO/TIMIT variant of the reference).

    Args:
        cls_attn: ``[heads, T]`` CLS-to-frame attention of one layer (see :func:`cls_attention_from_row`).
        q: quantile level of the per-head threshold, in ``[0, 1]`` (0.7 for VG-HuBERT_3, 0.8 for VG-HuBERT_4).
        spf: seconds per frame (:func:`seconds_per_frame`).
        feats: optional ``[T, D]`` frame features to pool per segment.
        pool: pooling method, see :func:`pool_segments`.
        level2: keep single-frame runs.

    Returns:
        :class:`WordSegments` with boundaries ``[t_s * spf, t_e * spf]`` and locations ``spf * (t_s + t_e) / 2``,
        in seconds from the utterance start.
    """
    cls_attn = _check_attention(cls_attn)
    spf = _check_spf(spf)
    if pool not in POOL_METHODS:
        raise ConfigError(f"unknown pooling {pool!r}; choose one of {', '.join(POOL_METHODS)}")
    if feats is not None:
        _check_feats(feats, cls_attn.shape[-1])
    frames = _segment_frames(cls_attn, q, level2)
    # Python float arithmetic in the reference's order of operations, so that seconds match it bit for bit.
    boundaries = [[t_s * spf, t_e * spf] for t_s, t_e in frames]
    locations = [spf * (t_s + t_e) / 2.0 for t_s, t_e in frames]
    return WordSegments(
        frames=_frames_tensor(frames),
        boundaries=torch.tensor(boundaries, dtype=torch.float64).reshape(-1, 2),
        locations=torch.tensor(locations, dtype=torch.float64),
        features=None if feats is None else pool_segments(feats, cls_attn, frames, pool),
        spf=spf,
    )


def segment_words_in_span(
    cls_attn: Tensor,
    q: float,
    spf: float,
    start_sec: float,
    end_sec: float,
    feats: Tensor | None = None,
    pool: PoolMethod | str = "mean",
    level2: bool = False,
) -> WordSegments:
    """Segment a voice-activity span ``[start_sec, end_sec]`` of a recording (the Buckeye / ZeroSpeech 2021 variant).

    Times are absolute (in the recording), and the segments are stretched to the span: the FIRST segment starts at
    ``start_sec`` and the LAST ends at ``end_sec``; middle segments are ``start_sec + frame * spf``. With a single
    segment the first-segment rule wins: it is ``[start_sec, start_sec + t_e * spf]`` (its end is NOT moved to
    ``end_sec``), as in the reference. Locations are ``start_sec + spf * (t_s + t_e) / 2`` (not stretched).
    ``frames`` stay the unstretched run frames relative to the span start.

    Args:
        cls_attn: ``[heads, T]`` CLS attention of the span's audio.
        q: quantile level in ``[0, 1]``.
        spf: seconds per frame of the span's audio.
        start_sec: span start in the recording, seconds.
        end_sec: span end in the recording, seconds.
        feats: optional ``[T, D]`` frame features to pool (the ZeroSpeech 2021 script pools with ``max``; the Buckeye
            script pools nothing).
        pool: pooling method, see :func:`pool_segments`.
        level2: keep single-frame runs.
    """
    cls_attn = _check_attention(cls_attn)
    spf = _check_spf(spf)
    start_sec, end_sec = float(start_sec), float(end_sec)
    if not (math.isfinite(start_sec) and math.isfinite(end_sec)) or end_sec < start_sec:
        raise ConfigError(f"span must satisfy start_sec <= end_sec (finite), got [{start_sec}, {end_sec}]")
    if pool not in POOL_METHODS:
        raise ConfigError(f"unknown pooling {pool!r}; choose one of {', '.join(POOL_METHODS)}")
    if feats is not None:
        _check_feats(feats, cls_attn.shape[-1])
    frames = _segment_frames(cls_attn, q, level2)
    last = len(frames) - 1
    boundaries: list[list[float]] = []
    locations: list[float] = []
    for i, (t_s, t_e) in enumerate(frames):
        locations.append(start_sec + spf * (t_s + t_e) / 2.0)
        if i == 0:  # checked first, so a single segment keeps its own end
            boundaries.append([start_sec, start_sec + t_e * spf])
        elif i == last:
            boundaries.append([start_sec + t_s * spf, end_sec])
        else:
            boundaries.append([start_sec + t_s * spf, start_sec + t_e * spf])
    return WordSegments(
        frames=_frames_tensor(frames),
        boundaries=torch.tensor(boundaries, dtype=torch.float64).reshape(-1, 2),
        locations=torch.tensor(locations, dtype=torch.float64),
        features=None if feats is None else pool_segments(feats, cls_attn, frames, pool),
        spf=spf,
    )


def readme_word_intervals(cls_attn: Tensor, q: float, spf: float, audio_len_s: float) -> ReadmeSegmentation:
    """Contiguous word intervals between attention runs (the stand-alone snippet of the reference README).

    Only runs longer than one frame are used (there is no single-frame fallback here). With runs ``r_1 .. r_S`` in
    seconds the word boundaries are ``[r_1.start / 2, (r_1.end + r_2.start) / 2, ..., (r_S.end + audio_len_s) / 2]``
    and the ``S`` word intervals join consecutive boundaries.

    The README snippet itself does not run as printed (it uses undefined names); this is its evident intent, checked
    against the golden case. When no run is longer than one frame the reference fails with an ``IndexError`` (list
    index out of range); here a :class:`SegmentationError` says so instead.

    Args:
        cls_attn: ``[heads, T]`` CLS attention.
        q: quantile level in ``[0, 1]``.
        spf: seconds per frame.
        audio_len_s: utterance duration in seconds (``n_samples / sample_rate``).
    """
    cls_attn = _check_attention(cls_attn)
    spf = _check_spf(spf)
    runs = [r for r in attention_runs(selected_frames(cls_attn, q)) if r[1] - r[0] > 1]
    if not runs:
        raise SegmentationError(
            f"no run of selected frames is longer than one frame at q={q} (T={cls_attn.shape[-1]}); the README "
            "variant has no single-frame fallback: use segment_words or a lower q"
        )
    attn = [[spf * t_s, spf * t_e] for t_s, t_e in runs]
    cuts = [attn[0][0] / 2]
    cuts += [(left[1] + right[0]) / 2.0 for left, right in zip(attn[:-1], attn[1:], strict=True)]
    cuts.append((attn[-1][1] + float(audio_len_s)) / 2)
    words = [[cuts[i], cuts[i + 1]] for i in range(len(cuts) - 1)]
    return ReadmeSegmentation(
        attn_intervals=torch.tensor(attn, dtype=torch.float64).reshape(-1, 2),
        word_intervals=torch.tensor(words, dtype=torch.float64).reshape(-1, 2),
    )
