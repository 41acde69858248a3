"""VG-HuBERT's own evaluation: word discovery scored against reference word alignments.

``word_segmentation`` (registered with :func:`vgskit.extensions.register_evaluation`; ``vgskit eval
--word-segmentation``) segments every caption that has reference words with the model's CLS attention
(:meth:`VGHuBERT.segment <vgskit.models.vg_hubert.model.VGHuBERT.segment>`) and scores the segments with
:mod:`vgskit.segmentation.metrics`: word-boundary precision / recall / F1, over-segmentation and R-value, and
token F1 (both edges of a word within the tolerance), at an explicit tolerance (20 ms by default: the
word-discovery reference's published Buckeye numbers used 30 ms, so every report states the tolerance).

Beside the model, the same captions are scored for a trivial baseline: **equal-length segments, as many as the
model found in that caption**, tiling the whole utterance. A model whose boundaries are no better than that has
learnt how many words there are, not where they are.

Where the reference words come from (first that applies):

1. the ``alignments`` option: a spoken-scenes corpus folder (or its ``word_alignments.json``), or a JSON file
   mapping caption ids to word lists (``[{"word", "start", "end"}, ...]``, as
   :func:`vgskit.segmentation.alignments.read_json_alignment` reads);
2. a manifest field of each caption: ``words`` (such a list) or ``text_alignment`` (the word-discovery reference's
   ``start__WORD__end`` string);
3. the ``word_alignments.json`` of a spoken-scenes corpus beside the captions' audio folder (written by
   ``python -m vgskit.data.scene_alignments CORPUS``).

Captions without reference words (flite voices in spoken-scenes) are skipped and counted. Reference words ending
after the evaluated audio (cropped by ``eval_max_seconds``) are left out, so the scores compare like with like.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vgskit.errors import ConfigError, VGSKitError
from vgskit.extensions import register_evaluation
from vgskit.segmentation.alignments import (
    AlignmentError,
    WordInterval,
    parse_text_alignment,
)
from vgskit.segmentation.metrics import DEFAULT_TOLERANCE_S, SegmentationEvaluator

__all__ = [
    "caption_word_alignments",
    "equal_length_segments",
    "evaluate_word_segmentation",
    "format_word_segmentation",
    "require_segmenter",
]

_OPTIONS = ("layer", "quantile", "tolerance_ms", "include_edges", "alignments", "max_captions", "level2")


def _model_name(model: nn.Module) -> str:
    return str(getattr(model, "model_name", None) or type(model).__name__)


def require_segmenter(model: nn.Module) -> None:
    """A clear error for a model without CLS-attention word segmentation (``segment``)."""
    if not callable(getattr(model, "segment", None)) or not callable(getattr(model, "cls_attention", None)):
        raise VGSKitError(f"model {_model_name(model)!r} cannot segment speech into words: word segmentation needs "
                          "a model with a speech CLS token whose attention picks the words (VG-HuBERT, SG-MIM)")


def equal_length_segments(duration_s: float, count: int) -> list[tuple[float, float]]:
    """``count`` equal segments tiling ``[0, duration_s]`` (the baseline's segmentation of one utterance)."""
    if count < 0 or not duration_s >= 0:
        raise ConfigError(f"equal_length_segments: need count >= 0 and duration >= 0, got {count}, {duration_s}")
    edges = [duration_s * i / count for i in range(count + 1)] if count else []
    return list(zip(edges[:-1], edges[1:], strict=True))


def _from_words_field(value: Any, where: str) -> list[WordInterval]:
    if isinstance(value, str):
        return parse_text_alignment(value, source=where)
    if not isinstance(value, list):
        raise AlignmentError(where, f"expected a list of {{word, start, end}} objects, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(WordInterval(str(item["word"]), float(item["start"]), float(item["end"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise AlignmentError(where, f"word {i}: expected an object with word, start and end ({exc})") from exc
    return out


def _alignment_file(path: Path) -> dict[str, list[WordInterval] | None]:
    """Word lists keyed by caption id from ``path`` (a spoken-scenes corpus, its file, or a caption-id → words JSON)."""
    from vgskit.data.scene_alignments import ALIGNMENTS_FILE, load_word_alignments

    if path.is_dir():
        return load_word_alignments(path)
    if path.name == ALIGNMENTS_FILE and (path.parent / "corpus.json").is_file():
        return load_word_alignments(path.parent)
    if not path.is_file():
        raise AlignmentError(path, "no such file or folder (expected a spoken-scenes corpus folder or a JSON file "
                                   "mapping caption ids to word lists)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AlignmentError(path, f"cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise AlignmentError(path, "expected a JSON object mapping caption ids to word lists")
    return {str(k): None if v is None else _from_words_field(v, f"{path}: caption {k}") for k, v in data.items()}


def _scenes_file_near(records: Sequence[Any]) -> Path | None:
    from vgskit.data.scene_alignments import ALIGNMENTS_FILE

    for r in records[:1]:
        for folder in list(Path(r.audio).parents)[:2]:
            if (folder / ALIGNMENTS_FILE).is_file() and (folder / "corpus.json").is_file():
                return folder
    return None


def caption_word_alignments(dataset: Any, source: str | None = None,
                            alignments: str | Path | None = None) -> list[list[WordInterval] | None]:
    """The reference words of every caption of ``dataset`` (dataset order; ``None`` where a caption has none).

    See the module documentation for where they are looked up. Raises a :class:`VGSKitError` naming ``source``
    when no caption has reference words.
    """
    records = dataset.records
    table: Mapping[str, list[WordInterval] | None] | None = None
    if alignments is not None:
        table = _alignment_file(Path(alignments).expanduser())
    out: list[list[WordInterval] | None] = []
    for r in records:
        if table is not None:
            out.append(table.get(r.caption_id))
        elif "words" in r.extra:
            out.append(_from_words_field(r.extra["words"], f"{source or 'manifest'}: caption {r.caption_id}, words"))
        elif "text_alignment" in r.extra:
            out.append(parse_text_alignment(str(r.extra["text_alignment"]),
                                            source=f"{source or 'manifest'}: caption {r.caption_id}"))
        else:
            out.append(None)
    if table is None and not any(out):
        corpus = _scenes_file_near(records)
        if corpus is not None:
            found = _alignment_file(corpus)
            out = [found.get(r.caption_id) for r in records]
    if not any(out):
        where = source or "the evaluation data"
        raise VGSKitError(
            f"{where}: none of the {len(records)} captions has reference word alignments (a manifest field 'words' "
            "or 'text_alignment', or a word_alignments.json beside a spoken-scenes corpus; compute that one with "
            "`python -m vgskit.data.scene_alignments CORPUS`), or pass --word-alignments PATH"
        )
    return out


@torch.no_grad()
def evaluate_word_segmentation(
    model: nn.Module,
    dataset: Any,
    *,
    layer: int | None = None,
    quantile: float | None = None,
    tolerance_ms: float = DEFAULT_TOLERANCE_S * 1000,
    include_edges: bool = False,
    alignments: str | Path | None = None,
    max_captions: int | None = None,
    level2: bool = False,
    batch_size: int = 32,
    source: str | None = None,
) -> dict[str, Any]:
    """Score the model's word segments, and the equal-length baseline, against reference word alignments.

    Args:
        model: a model with ``segment`` (VG-HuBERT, SG-MIM).
        dataset: a :class:`~vgskit.data.loader.SpokenCaptionDataset` giving waveforms.
        layer: 0-based layer whose CLS attention segments (default: the model's ``segment_layer``).
        quantile: per-head threshold quantile (default: :data:`~vgskit.models.vg_hubert.model.DEFAULT_SEGMENT_QUANTILE`).
        tolerance_ms: boundary matching tolerance in milliseconds (20 by default; stated in the result).
        include_edges: also score each utterance's first and last boundary.
        alignments: where the reference words are (see the module documentation); ``None``: look them up.
        max_captions: score only the first N captions that have reference words (dataset order).
        level2: keep single-frame attention runs.
        batch_size: captions per forward pass.
        source: the data's name for error messages.

    Returns:
        ``{"tolerance_ms", "layer", "quantile", "n_captions", "n_skipped", "model": scores, "equal_length": scores,
        "mean_segments", "mean_words"}`` where ``scores`` is
        :class:`~vgskit.segmentation.metrics.SegmentationScores` as a dictionary.
    """
    from vgskit.models.vg_hubert.model import DEFAULT_SEGMENT_QUANTILE

    require_segmenter(model)
    if max_captions is not None and (isinstance(max_captions, bool) or int(max_captions) < 1):
        raise ConfigError(f"word_segmentation: max_captions must be a positive integer, got {max_captions!r}")
    quantile = DEFAULT_SEGMENT_QUANTILE if quantile is None else float(quantile)
    tolerance_s = float(tolerance_ms) / 1000.0
    refs = caption_word_alignments(dataset, source, alignments)
    chosen = [i for i, words in enumerate(refs) if words]
    n_skipped = len(refs) - len(chosen)
    if max_captions is not None:
        chosen = chosen[: int(max_captions)]
    lengths = dataset.num_samples()
    chosen.sort(key=lambda i: lengths[i])  # little padding per batch
    found = SegmentationEvaluator(tolerance_s, include_edges)
    baseline = SegmentationEvaluator(tolerance_s, include_edges)
    n_segments = n_words = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(chosen), batch_size):
            idx = chosen[start:start + batch_size]
            inputs = dataset.speech_inputs(idx)
            if inputs.kind != "waveform":
                raise VGSKitError(f"word segmentation needs waveforms; {source or 'the data'} gives {inputs.kind}")
            segments = model.segment(inputs.values, inputs.lengths, layer=layer,  # type: ignore[operator]
                                     quantile=quantile, level2=level2)
            for row, i in enumerate(idx):
                duration = float(inputs.lengths[row]) / float(inputs.rate)
                # Words past a cropped end were never heard by the model; ends are compared with a small slack.
                ref = [(w.start, w.end) for w in refs[i] or () if w.end <= duration + 1e-6]
                pred = [(float(a), float(b)) for a, b in segments[row].boundaries.tolist()]
                found.add(pred, ref)
                baseline.add(equal_length_segments(duration, len(pred)), ref)
                n_segments += len(pred)
                n_words += len(ref)
    finally:
        model.train(was_training)
    n = max(1, len(chosen))
    used_layer = layer if layer is not None else getattr(getattr(model, "config", None), "segment_layer", None)
    return {
        "tolerance_ms": float(tolerance_ms),
        "include_edges": bool(include_edges),
        "layer": used_layer,
        "quantile": quantile,
        "n_captions": len(chosen),
        "n_skipped": n_skipped,
        "mean_segments": n_segments / n,
        "mean_words": n_words / n,
        "model": dataclasses.asdict(found.result()),
        "equal_length": dataclasses.asdict(baseline.result()),
    }


def format_word_segmentation(result: Mapping[str, Any]) -> str:
    """A small table: the model's and the baseline's boundary and token scores at the stated tolerance."""
    lines = [
        f"word segmentation: {result['n_captions']} captions ({result['n_skipped']} without reference words skipped), "
        f"layer {result['layer']}, quantile {result['quantile']:g}, tolerance {result['tolerance_ms']:g} ms, "
        f"{result['mean_segments']:.2f} segments / {result['mean_words']:.2f} words per caption",
        f"  {'':<24} {'bnd P':>6} {'bnd R':>6} {'bnd F1':>6} {'R-val':>6} {'tok F1':>6}",
    ]
    for key, label in (("model", "model"), ("equal_length", "equal-length baseline")):
        b, t = result[key]["boundary"], result[key]["token"]
        lines.append(f"  {label:<24} {100 * b['precision']:6.1f} {100 * b['recall']:6.1f} {100 * b['f1']:6.1f} "
                     f"{100 * b['r_value']:6.1f} {100 * t['f1']:6.1f}")
    return "\n".join(lines)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("word segmentation (VG-HuBERT, SG-MIM)")
    group.add_argument("--word-segmentation", action="store_true",
                       help="also score the CLS-attention word segments against reference word alignments, beside "
                            "an equal-length baseline")
    group.add_argument("--word-alignments", default=None, metavar="PATH",
                       help="reference words: a spoken-scenes corpus folder or a JSON {caption_id: [{word, start, "
                            "end}]} (default: the manifest's 'words'/'text_alignment' fields or the corpus's "
                            "word_alignments.json)")
    group.add_argument("--seg-tolerance-ms", type=float, default=DEFAULT_TOLERANCE_S * 1000,
                       help="boundary tolerance in ms (default 20)")
    group.add_argument("--seg-layer", type=int, default=None, help="0-based layer (default: the model's)")
    group.add_argument("--seg-quantile", type=float, default=None, help="per-head threshold quantile (default 0.7)")
    group.add_argument("--seg-max-captions", type=int, default=None, help="score only the first N captions")


def _from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    if not getattr(args, "word_segmentation", False):
        return None
    return {"alignments": args.word_alignments, "tolerance_ms": args.seg_tolerance_ms, "layer": args.seg_layer,
            "quantile": args.seg_quantile, "max_captions": args.seg_max_captions}


@register_evaluation(
    "word_segmentation",
    require_model=require_segmenter,
    format=format_word_segmentation,
    options={"layer": None, "quantile": None, "tolerance_ms": DEFAULT_TOLERANCE_S * 1000, "include_edges": False,
             "alignments": None, "max_captions": None, "level2": False},
    add_arguments=_add_arguments,
    from_args=_from_args,
    help="word-boundary and token F1 of the discovered words against reference alignments (VG-HuBERT, SG-MIM)",
)
def word_segmentation_evaluation(model: nn.Module, dataset: Any, *, batch_size: int, source: str,
                                 options: Mapping[str, Any], speech_emb: Any) -> dict[str, Any]:
    """The registered form of :func:`evaluate_word_segmentation`."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"word_segmentation: unknown options {unknown}; known: {list(_OPTIONS)}")
    return evaluate_word_segmentation(model, dataset, batch_size=min(batch_size, 32), source=source,
                                      **{k: options[k] for k in _OPTIONS if k in options})
