"""Word segmentation scores: boundary precision / recall / F1 / R-value and word-token precision / recall / F1.

Conventions (every result records them, see :class:`SegmentationScores`):

* **Tolerance** is explicit, in seconds, default :data:`DEFAULT_TOLERANCE_S` = 20 ms (the field's convention). A
  predicted boundary hits a reference boundary when ``|p - r| <= tolerance`` (up to 1e-9 s, so that a distance that
  equals the tolerance in decimal still counts despite float rounding, e.g. ``0.52 - 0.50``).
  The word-discovery reference evaluates Buckeye with the evaluation script of H. Kamper's ``vqwordseg`` at a
  tolerance of 3 frames of 10 ms, i.e. **30 ms**: its published Buckeye boundary and token scores are at 30 ms, not at
  the usual 20 ms, and are not comparable with 20 ms numbers.
* **Matching is one-to-one**: each predicted boundary may match at most one reference boundary and vice versa. As in
  the reference evaluation, predictions are visited in time order and each takes the earliest still unmatched
  reference boundary within tolerance. On sorted points with a symmetric window this greedy rule is also a maximum
  matching (an unmatched reference earlier than the current window can never be used by a later prediction, so
  taking the earliest usable one never costs a hit), so greedy and optimal matching give the same counts here.
* **Boundaries** of an utterance are the distinct start and end times of its words (a shared end/start of adjacent
  words is one boundary; a pause gives two). With ``include_edges=False`` (the default, as in the reference, whose
  boundaries are word ends minus the utterance end, so the utterance start and end never count) the earliest and the
  latest boundary of each side are removed before matching: for segmentations that tile the utterance these are the
  utterance start and end, which every method gets right and which would inflate the scores.
* **Tokens**: a predicted word is a hit when its start and its end are both within tolerance of the start and end of
  one reference word; each reference word can be hit once (greedy in time order, as in the reference).
* **Accumulation**: hits and counts are summed over utterances and the ratios are formed once at the end (micro
  average), so long utterances weigh more, as in the reference.
* **Degenerate counts**: a ratio with a zero denominator is 0.0 (the reference raises ZeroDivisionError), F1 is 0.0
  when precision and recall are both 0 (the reference reports ``-inf``). Over-segmentation is computed as
  ``n_pred / n_ref - 1``, which equals ``recall / precision - 1`` whenever there is a hit and stays defined without
  one (the reference gives ``-inf`` when precision is 0); OS and the R-value are NaN when there is no reference
  boundary.

R-value (Räsänen et al., 2009) with hit rate ``HR`` = recall and over-segmentation ``OS``:
``r1 = sqrt((1 - HR)^2 + OS^2)``, ``r2 = (-OS + HR - 1) / sqrt(2)``, ``R = 1 - (|r1| + |r2|) / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import Tensor

from vgskit.errors import ConfigError
from vgskit.segmentation.alignments import WordInterval

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "IntervalsLike",
    "PRScores",
    "SegmentationEvaluator",
    "SegmentationScores",
    "as_intervals",
    "evaluate_segmentation",
    "interval_boundaries",
    "match_boundaries",
    "match_tokens",
    "over_segmentation",
    "r_value",
]

#: The conventional boundary tolerance, seconds.
DEFAULT_TOLERANCE_S = 0.020

# Float slack on every tolerance and equality test: times in seconds come from products such as frame * spf.
_EPS = 1e-9

#: Word intervals of one utterance: :class:`WordInterval` objects, ``(start, end)`` pairs in seconds, or an
#: ``[S, 2]`` tensor of seconds (e.g. :attr:`vgskit.models.vg_hubert.WordSegments.boundaries`).
IntervalsLike = Sequence[WordInterval] | Sequence[Sequence[float]] | Tensor


def as_intervals(intervals: IntervalsLike) -> list[tuple[float, float]]:
    """``(start, end)`` pairs in seconds, sorted by start, from any :data:`IntervalsLike`."""
    if isinstance(intervals, Tensor):
        if intervals.numel() == 0:
            return []
        if intervals.dim() != 2 or intervals.shape[1] != 2:
            raise ConfigError(f"interval tensor must have shape [S, 2], got {tuple(intervals.shape)}")
        items: Iterable = intervals.double().tolist()
    else:
        items = intervals
    out: list[tuple[float, float]] = []
    for k, item in enumerate(items):
        if isinstance(item, WordInterval):
            start, end = item.start, item.end
        else:
            try:
                start, end = (float(v) for v in item)
            except (TypeError, ValueError):
                raise ConfigError(f"interval {k} must be a WordInterval or a (start, end) pair, got {item!r}") from None
        if not (math.isfinite(start) and math.isfinite(end)) or end < start - _EPS:
            raise ConfigError(f"interval {k} [{start}, {end}] is not a finite interval with start <= end")
        out.append((start, end))
    out.sort()
    return out


def interval_boundaries(intervals: IntervalsLike, include_edges: bool = False) -> list[float]:
    """Sorted distinct boundary times (seconds) of an utterance's word intervals.

    Starts and ends closer than 1e-9 s are one boundary. With ``include_edges=False`` the earliest and the latest
    boundary are removed (see the module notes).
    """
    times = sorted(t for pair in as_intervals(intervals) for t in pair)
    bounds: list[float] = []
    for t in times:
        if not bounds or t - bounds[-1] > _EPS:
            bounds.append(t)
    if not include_edges:
        bounds = bounds[1:-1]
    return bounds


def _check_tolerance(tolerance_s: float) -> float:
    tolerance_s = float(tolerance_s)
    if not (tolerance_s >= 0.0) or math.isinf(tolerance_s):
        raise ConfigError(f"tolerance must be a finite number of seconds >= 0, got {tolerance_s}")
    return tolerance_s


def match_boundaries(pred: Sequence[float], ref: Sequence[float], tolerance_s: float = DEFAULT_TOLERANCE_S) -> int:
    """Number of one-to-one matches between predicted and reference boundary times (seconds).

    Predictions are visited in time order; each takes the earliest unmatched reference within tolerance. This is the
    reference's greedy rule and, on sorted times, a maximum matching (see the module notes).
    """
    tol = _check_tolerance(tolerance_s) + _EPS
    refs = sorted(float(r) for r in ref)
    used = [False] * len(refs)
    lo = 0  # first reference that can still be within reach of the current (and every later) prediction
    hits = 0
    for p in sorted(float(x) for x in pred):
        while lo < len(refs) and (used[lo] or refs[lo] < p - tol):
            lo += 1
        j = lo
        while j < len(refs) and refs[j] <= p + tol:
            if not used[j]:
                used[j] = True
                hits += 1
                break
            j += 1
    return hits


def match_tokens(pred: IntervalsLike, ref: IntervalsLike, tolerance_s: float = DEFAULT_TOLERANCE_S) -> int:
    """Number of predicted words whose start and end are both within tolerance of one reference word's.

    Each reference word is hit at most once; predictions are visited in time order and take the first such unused
    reference word (the reference's rule).
    """
    tol = _check_tolerance(tolerance_s) + _EPS
    refs = as_intervals(ref)
    used = [False] * len(refs)
    hits = 0
    for p_s, p_e in as_intervals(pred):
        for j, (r_s, r_e) in enumerate(refs):
            if not used[j] and abs(p_s - r_s) <= tol and abs(p_e - r_e) <= tol:
                used[j] = True
                hits += 1
                break
    return hits


def over_segmentation(n_pred: int, n_ref: int) -> float:
    """``n_pred / n_ref - 1`` (= ``recall / precision - 1`` when there is a hit); NaN without references."""
    return n_pred / n_ref - 1.0 if n_ref > 0 else math.nan


def r_value(hit_rate: float, os: float) -> float:
    """R-value of Räsänen et al. (2009) from the hit rate (recall) and the over-segmentation ``os``."""
    r1 = math.sqrt((1.0 - hit_rate) ** 2 + os**2)
    r2 = (-os + hit_rate - 1.0) / math.sqrt(2.0)
    return 1.0 - (abs(r1) + abs(r2)) / 2.0


@dataclass(frozen=True)
class PRScores:
    """Counts and scores of one kind of unit (boundaries or word tokens), summed over utterances."""

    hits: int
    n_pred: int
    n_ref: int
    precision: float
    recall: float
    f1: float
    over_segmentation: float
    r_value: float

    @classmethod
    def from_counts(cls, hits: int, n_pred: int, n_ref: int) -> PRScores:
        """Scores from summed counts (zero denominators give 0.0, see the module notes)."""
        if not (0 <= hits <= min(n_pred, n_ref)):
            raise ConfigError(f"inconsistent counts: hits={hits}, n_pred={n_pred}, n_ref={n_ref}")
        precision = hits / n_pred if n_pred else 0.0
        recall = hits / n_ref if n_ref else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        os = over_segmentation(n_pred, n_ref)
        rv = r_value(recall, os) if n_ref else math.nan
        return cls(hits, n_pred, n_ref, precision, recall, f1, os, rv)


@dataclass(frozen=True)
class SegmentationScores:
    """Boundary and token scores of a word segmentation, with the conventions they were computed under.

    Attributes:
        tolerance_s: matching tolerance in seconds.
        include_edges: whether each utterance's first and last boundary were counted.
        n_utterances: utterances scored.
        boundary: boundary scores (precision, recall, F1, OS, R-value).
        token: word-token scores (its R-value is computed the same way but is not a conventional token metric).
    """

    tolerance_s: float
    include_edges: bool
    n_utterances: int
    boundary: PRScores
    token: PRScores

    def summary(self) -> str:
        """One line per unit, stating the tolerance and the edge convention."""
        edges = "utterance edges included" if self.include_edges else "utterance edges excluded"
        b, t = self.boundary, self.token
        return (
            f"word segmentation, {self.n_utterances} utterances, tolerance {self.tolerance_s * 1000:g} ms, {edges}\n"
            f"  boundaries: P {b.precision:.4f}  R {b.recall:.4f}  F1 {b.f1:.4f}  OS {b.over_segmentation:.4f}  "
            f"R-value {b.r_value:.4f}  ({b.hits} hits / {b.n_pred} predicted / {b.n_ref} reference)\n"
            f"  tokens:     P {t.precision:.4f}  R {t.recall:.4f}  F1 {t.f1:.4f}  OS {t.over_segmentation:.4f}  "
            f"({t.hits} hits / {t.n_pred} predicted / {t.n_ref} reference)"
        )


class SegmentationEvaluator:
    """Accumulates boundary and token counts over utterances; :meth:`result` forms the scores once.

    Args:
        tolerance_s: matching tolerance in seconds (default 20 ms).
        include_edges: count each utterance's first and last boundary (default False, see the module notes).
    """

    def __init__(self, tolerance_s: float = DEFAULT_TOLERANCE_S, include_edges: bool = False):
        self.tolerance_s = _check_tolerance(tolerance_s)
        self.include_edges = bool(include_edges)
        self.n_utterances = 0
        self._b = [0, 0, 0]  # hits, n_pred, n_ref
        self._t = [0, 0, 0]

    def add(self, pred: IntervalsLike, ref: IntervalsLike) -> None:
        """Score one utterance: predicted and reference word intervals in seconds, on the same time axis."""
        pb = interval_boundaries(pred, self.include_edges)
        rb = interval_boundaries(ref, self.include_edges)
        self._b[0] += match_boundaries(pb, rb, self.tolerance_s)
        self._b[1] += len(pb)
        self._b[2] += len(rb)
        pt, rt = as_intervals(pred), as_intervals(ref)
        self._t[0] += match_tokens(pt, rt, self.tolerance_s)
        self._t[1] += len(pt)
        self._t[2] += len(rt)
        self.n_utterances += 1

    def result(self) -> SegmentationScores:
        return SegmentationScores(
            tolerance_s=self.tolerance_s,
            include_edges=self.include_edges,
            n_utterances=self.n_utterances,
            boundary=PRScores.from_counts(*self._b),
            token=PRScores.from_counts(*self._t),
        )


def evaluate_segmentation(
    pairs: Iterable[tuple[IntervalsLike, IntervalsLike]],
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    include_edges: bool = False,
) -> SegmentationScores:
    """Scores over ``(predicted, reference)`` word intervals of many utterances (counts summed, then divided)."""
    ev = SegmentationEvaluator(tolerance_s, include_edges)
    for pred, ref in pairs:
        ev.add(pred, ref)
    return ev.result()
