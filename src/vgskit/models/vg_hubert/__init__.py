"""VG-HuBERT (Peng & Harwath, Interspeech 2022): visually grounded HuBERT whose CLS attention discovers words.

* :mod:`~vgskit.models.vg_hubert.model` — :class:`VGHuBERT`, registered as ``vg_hubert`` (the reference),
  ``vg_hubert_m`` (SG-MIM's VG-HuBERT (M)), ``vg_hubert_tiny`` and ``vg_hubert_scenes``; its per-head CLS attention and segments;
* :mod:`~vgskit.models.vg_hubert.sgmim` — :class:`SGMIM` (Woo et al., ICASSP 2024), VG-HuBERT (M) with a
  speech-guided masked-image-modelling branch, registered as ``sg_mim``, ``sg_mim_tiny`` and ``sg_mim_scenes``;
* :mod:`~vgskit.models.vg_hubert.wordseg` — the CLS-attention word segmentation of the reference code;
* :mod:`~vgskit.models.vg_hubert.convert` — released ``best_bundle.pth`` → :class:`VGHuBERT`;
* :mod:`~vgskit.models.vg_hubert.commands` — ``vgskit segment`` and ``vgskit convert vg_hubert``;
* :mod:`~vgskit.models.vg_hubert.evaluations` — the ``word_segmentation`` evaluation (``vgskit eval
  --word-segmentation``): boundary and token F1 of the discovered words beside an equal-length baseline.

Importing this package registers the model names and the commands (towers load only when a model is built).
"""

from vgskit.models.vg_hubert import (
    commands,  # noqa: F401  (registers ``vgskit segment``, ``vgskit convert vg_hubert``)
    evaluations,  # noqa: F401  (registers the ``word_segmentation`` evaluation)
)
from vgskit.models.vg_hubert.convert import (
    VGHuBERTConversion,
    convert_reference_bundle,
    export_reference_state_dict,
)
from vgskit.models.vg_hubert.model import (
    DEFAULT_SEGMENT_QUANTILE,
    PROJECTIONS,
    CLSAttention,
    VGHuBERT,
    VGHuBERTConfig,
    default_image_tower,
    default_speech_tower,
)
from vgskit.models.vg_hubert.sgmim import (
    MIM_REDUCTIONS,
    SGMIM,
    CrossModalDecoder,
    SGMIMConfig,
)
from vgskit.models.vg_hubert.wordseg import (
    POOL_METHODS,
    PoolMethod,
    ReadmeSegmentation,
    SegmentationError,
    WordSegments,
    attention_runs,
    cls_attention_from_row,
    head_thresholds,
    keep_runs,
    pool_segments,
    readme_word_intervals,
    seconds_per_frame,
    segment_words,
    segment_words_in_span,
    selected_frames,
)

__all__ = [
    "DEFAULT_SEGMENT_QUANTILE",
    "PROJECTIONS",
    "CLSAttention",
    "CrossModalDecoder",
    "MIM_REDUCTIONS",
    "SGMIM",
    "SGMIMConfig",
    "VGHuBERT",
    "VGHuBERTConfig",
    "VGHuBERTConversion",
    "convert_reference_bundle",
    "export_reference_state_dict",
    "default_image_tower",
    "default_speech_tower",
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
