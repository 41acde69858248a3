"""Word segmentation scores on small examples worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vgskit.errors import ConfigError
from vgskit.segmentation import (
    DEFAULT_TOLERANCE_S,
    PRScores,
    SegmentationEvaluator,
    WordInterval,
    evaluate_segmentation,
    interval_boundaries,
    match_boundaries,
    match_tokens,
    r_value,
)

# Reference: three words tiling [0, 1] s; prediction: four segments tiling [0, 1] s.
REF = [WordInterval("a", 0.0, 0.30), WordInterval("dog", 0.30, 0.55), WordInterval("runs", 0.55, 1.00)]
PRED = [(0.0, 0.31), (0.31, 0.42), (0.42, 0.60), (0.60, 1.0)]


def test_hand_worked_example() -> None:
    # Edges excluded: reference boundaries {0.30, 0.55}, predicted {0.31, 0.42, 0.60}.
    # At 20 ms: 0.31 hits 0.30; 0.42 and 0.60 (0.05 from 0.55) miss -> hits 1, n_pred 3, n_ref 2.
    # P = 1/3, R = 1/2, F1 = 2 * (1/6) / (5/6) = 0.4, OS = R/P - 1 = 0.5,
    # r1 = sqrt(0.5^2 + 0.5^2) = 1/sqrt(2), r2 = (-0.5 + 0.5 - 1)/sqrt(2) = -1/sqrt(2), R-value = 1 - 1/sqrt(2).
    # Tokens: only (0, 0.31) matches a reference word, (0, 0.30) -> P = 1/4, R = 1/3, F1 = 2/7.
    s = evaluate_segmentation([(PRED, REF)])
    assert s.tolerance_s == DEFAULT_TOLERANCE_S == 0.020 and not s.include_edges and s.n_utterances == 1
    b = s.boundary
    assert (b.hits, b.n_pred, b.n_ref) == (1, 3, 2)
    assert b.precision == pytest.approx(1 / 3) and b.recall == pytest.approx(0.5) and b.f1 == pytest.approx(0.4)
    assert b.over_segmentation == pytest.approx(0.5)
    assert b.r_value == pytest.approx(1 - 1 / math.sqrt(2))
    t = s.token
    assert (t.hits, t.n_pred, t.n_ref) == (1, 4, 3)
    assert t.precision == pytest.approx(0.25) and t.recall == pytest.approx(1 / 3) and t.f1 == pytest.approx(2 / 7)
    assert "tolerance 20 ms" in s.summary() and "edges excluded" in s.summary()


def test_edges_included() -> None:
    # Reference {0, 0.30, 0.55, 1.0}, predicted {0, 0.31, 0.42, 0.60, 1.0}: hits 0, 0.31, 1.0 -> P 3/5, R 3/4.
    b = evaluate_segmentation([(PRED, REF)], include_edges=True).boundary
    assert (b.hits, b.n_pred, b.n_ref) == (3, 5, 4)
    assert b.precision == pytest.approx(0.6) and b.recall == pytest.approx(0.75)


def test_larger_tolerance_changes_the_result() -> None:
    # At 50 ms the prediction 0.60 also hits 0.55 (0.42 is 0.12 away): hits 2 -> P 2/3, R 1.
    b = evaluate_segmentation([(PRED, REF)], tolerance_s=0.05).boundary
    assert b.hits == 2 and b.recall == 1.0


def test_tolerance_boundary_is_inclusive() -> None:
    assert match_boundaries([0.52], [0.50], 0.02) == 1  # float 0.52 - 0.50 = 0.020000000000000018 still counts
    assert match_boundaries([0.48], [0.50], 0.02) == 1
    assert match_boundaries([0.5201], [0.50], 0.02) == 0
    assert match_boundaries([0.50], [0.50], 0.0) == 1


def test_one_to_one_matching() -> None:
    # Two predictions near one reference: one hit; two references near one prediction: one hit.
    assert match_boundaries([0.49, 0.51], [0.50]) == 1
    assert match_boundaries([0.50], [0.49, 0.51]) == 1
    # The second prediction must not lose its only partner to the first: 0.50 takes 0.485 (earliest), 0.52 takes 0.505.
    assert match_boundaries([0.50, 0.52], [0.485, 0.505]) == 2
    # Token matching uses each reference word once.
    assert match_tokens([(0.0, 0.3), (0.01, 0.31)], [(0.0, 0.3)]) == 1


def test_counts_are_summed_over_utterances() -> None:
    ev = SegmentationEvaluator()
    ev.add([(0, 0.5), (0.5, 1)], [(0, 0.5), (0.5, 1)])  # 1 hit / 1 pred / 1 ref
    ev.add([(0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 1)], [(0, 0.5), (0.5, 1)])  # 0 hits / 3 pred / 1 ref
    b = ev.result().boundary
    assert (b.hits, b.n_pred, b.n_ref) == (1, 4, 2)
    assert b.precision == pytest.approx(0.25)  # 1/4, not the mean of per-utterance precisions (0.5)
    assert ev.result().n_utterances == 2


def test_no_predictions_and_no_references() -> None:
    # No predicted boundary: P = R = F1 = 0, OS = 0/2 - 1 = -1, r1 = sqrt(1 + 1), r2 = 0 -> R-value 1 - sqrt(2)/2.
    b = evaluate_segmentation([([], REF)]).boundary
    assert (b.hits, b.n_pred, b.n_ref) == (0, 0, 2)
    assert b.precision == b.recall == b.f1 == 0.0
    assert b.over_segmentation == -1.0 and b.r_value == pytest.approx(1 - math.sqrt(2) / 2)
    # No reference boundary: recall 0 by convention, OS and R-value undefined (NaN).
    b = evaluate_segmentation([(PRED, [])]).boundary
    assert (b.n_pred, b.n_ref, b.precision, b.recall) == (3, 0, 0.0, 0.0)
    assert math.isnan(b.over_segmentation) and math.isnan(b.r_value)
    # Nothing at all.
    s = evaluate_segmentation([])
    assert s.n_utterances == 0 and s.boundary.f1 == 0.0


def test_perfect_segmentation_and_tensor_input() -> None:
    seg = torch.tensor([[0.0, 0.30], [0.30, 0.55], [0.55, 1.00]], dtype=torch.float64)  # e.g. WordSegments.boundaries
    s = evaluate_segmentation([(seg, REF)])
    assert s.boundary.f1 == 1.0 and s.boundary.r_value == pytest.approx(1.0) and s.token.f1 == 1.0


def test_boundaries_with_pauses() -> None:
    # A pause between words gives two boundaries; a shared end/start is one.
    ivs = [(0.1, 0.3), (0.3, 0.5), (0.7, 0.9)]
    assert interval_boundaries(ivs, include_edges=True) == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert interval_boundaries(ivs) == [0.3, 0.5, 0.7]


def test_r_value_formula() -> None:
    assert r_value(1.0, 0.0) == 1.0
    assert PRScores.from_counts(2, 4, 2).over_segmentation == pytest.approx(1.0)  # R/P - 1 = 1/0.5 - 1


def test_invalid_input() -> None:
    with pytest.raises(ConfigError, match="tolerance"):
        SegmentationEvaluator(tolerance_s=-0.01)
    with pytest.raises(ConfigError, match="start <= end"):
        interval_boundaries([(0.5, 0.2)])
    with pytest.raises(ConfigError, match="inconsistent"):
        PRScores.from_counts(3, 2, 5)
