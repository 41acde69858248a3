"""Word segmentation evaluation: reference alignment readers and boundary / token scores.

* :mod:`~vgskit.segmentation.alignments` — Praat TextGrid, Buckeye ``.words`` and JSON word alignments;
* :mod:`~vgskit.segmentation.metrics` — boundary precision / recall / F1 / R-value and word-token scores at an explicit
  tolerance, accumulated over utterances.
"""

from vgskit.segmentation.alignments import (
    DEFAULT_SKIP_LABELS,
    AlignmentError,
    WordInterval,
    parse_text_alignment,
    read_alignment,
    read_buckeye_words,
    read_json_alignment,
    read_spokencoco_alignments,
    read_textgrid,
)
from vgskit.segmentation.metrics import (
    DEFAULT_TOLERANCE_S,
    PRScores,
    SegmentationEvaluator,
    SegmentationScores,
    as_intervals,
    evaluate_segmentation,
    interval_boundaries,
    match_boundaries,
    match_tokens,
    over_segmentation,
    r_value,
)

__all__ = [
    "DEFAULT_SKIP_LABELS",
    "DEFAULT_TOLERANCE_S",
    "AlignmentError",
    "PRScores",
    "SegmentationEvaluator",
    "SegmentationScores",
    "WordInterval",
    "as_intervals",
    "evaluate_segmentation",
    "interval_boundaries",
    "match_boundaries",
    "match_tokens",
    "over_segmentation",
    "parse_text_alignment",
    "r_value",
    "read_alignment",
    "read_buckeye_words",
    "read_json_alignment",
    "read_spokencoco_alignments",
    "read_textgrid",
]
