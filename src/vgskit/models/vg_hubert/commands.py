"""VG-HuBERT's command-line pieces, registered with :mod:`vgskit.extensions` and added to ``vgskit`` by the CLI.

* ``vgskit segment (--checkpoint RUN | --model NAME) a.wav ... [--layer 9] [--quantile 0.7] [--json OUT]
  [--plot OUT.png]`` — word-like segments read off the speech CLS attention
  (:meth:`~vgskit.models.vg_hubert.VGHuBERT.segment`), printed as ``start - end`` seconds per file;
* ``vgskit convert vg_hubert BUNDLE --config NAME|FILE --out DIR`` — a released word-discovery ``best_bundle.pth``
  as a vgskit model (:func:`vgskit.models.vg_hubert.convert.convert_reference_bundle`).

Each ``run(args)`` returns the exit status and raises :class:`~vgskit.errors.VGSKitError` for mistakes in the input,
which the CLI prints as one ``vgskit: error: ...`` line. Heavy imports happen inside the commands, so that
registering them costs nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgskit.errors import VGSKitError
from vgskit.extensions import register_command, register_converter

__all__ = [
    "PLOT_AXES_X",
    "SegmentedUtterance",
    "add_convert_arguments",
    "add_segment_arguments",
    "plot_segments",
    "run_convert",
    "run_segment",
]

#: Left and right edges of every plot's axes, as fractions of the figure width (fixed, so that a time maps to a
#: known pixel column: ``x = width * (left + (right - left) * t / duration)``).
PLOT_AXES_X: tuple[float, float] = (0.08, 0.98)


@dataclass
class SegmentedUtterance:
    """What :func:`plot_segments` draws for one file.

    Attributes:
        name: the file name (the subplot's title).
        wav: ``[T_samples]`` float waveform.
        sample_rate: its rate in Hz.
        attention: ``[T_frames]`` the CLS attention summed over heads.
        seconds_per_frame: seconds per attention frame.
        segments: ``(start, end)`` seconds of each segment.
    """

    name: str
    wav: Any
    sample_rate: int
    attention: Any
    seconds_per_frame: float
    segments: list[tuple[float, float]]


def plot_segments(items: Sequence[SegmentedUtterance], out: str | Path, title: str | None = None) -> Path:
    """Draw, per file, the waveform, the head-summed CLS attention (right axis) and the segments shaded; save a PNG.

    The time axis of every subplot spans exactly the utterance (``0 .. duration``) and the axes occupy
    :data:`PLOT_AXES_X` of the width, so segment shading lands at predictable pixel columns.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not items:
        raise VGSKitError(f"--plot {out}: nothing to plot (no file could be segmented)")
    fig, axes = plt.subplots(len(items), 1, figsize=(10, 2.4 * len(items)), squeeze=False)
    left, right = PLOT_AXES_X
    # Margins in inches, so that the figure title and the first file's title never overlap, whatever the count.
    height = 2.4 * len(items)
    fig.subplots_adjust(left=left, right=right, top=1 - (0.62 if title else 0.32) / height, bottom=0.4 / height,
                        hspace=0.6)
    for ax, item in zip(axes[:, 0], items, strict=True):
        wav = np.asarray(item.wav, dtype=np.float32)
        duration = len(wav) / float(item.sample_rate)
        ax.plot(np.arange(len(wav)) / item.sample_rate, wav, color="0.55", linewidth=0.5)
        peak = float(np.abs(wav).max()) or 1.0
        ax.set_ylim(-1.05 * peak, 1.05 * peak)
        for start, end in item.segments:
            ax.axvspan(start, end, color="tab:orange", alpha=0.35, linewidth=0)
        attn = np.asarray(item.attention, dtype=np.float64)
        twin = ax.twinx()
        centres = (np.arange(len(attn)) + 0.5) * item.seconds_per_frame
        twin.plot(centres, attn, color="tab:blue", linewidth=1.0)
        twin.set_ylim(0.0, 1.05 * float(attn.max()) if attn.size and attn.max() > 0 else 1.0)
        twin.set_ylabel("CLS attention", fontsize=7)
        for a in (ax, twin):
            a.set_xlim(0.0, duration)
            a.tick_params(labelsize=7)
        ax.set_title(item.name, fontsize=8)
        ax.set_xlabel("seconds", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------
# vgskit segment
# ---------------------------------------------------------------------------------------------------------


def add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vgskit segment``."""
    from vgskit.models.vg_hubert.model import DEFAULT_SEGMENT_QUANTILE

    parser.description = ("Segment spoken utterances into word-like units with the CLS attention of a VG-HuBERT model "
                          "(per-head quantile threshold, runs of frames); print the segments' start and end in seconds "
                          "per file. Unreadable files are reported and skipped; the exit status is 1 if any failed.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run folder or saved model folder of a VG-HuBERT model")
    source.add_argument("--model", help="a registered VG-HuBERT model as built (vg_hubert, vg_hubert_m, ...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="with --model: override a config value, e.g. speech.name_or_path=/models/hubert")
    parser.add_argument("--layer", type=int, default=None,
                        help="0-based transformer layer whose CLS attention is read (default: the model's "
                             "segment_layer, 9 for vg_hubert as the reference README recommends)")
    parser.add_argument("--quantile", type=float, default=DEFAULT_SEGMENT_QUANTILE,
                        help=f"per-head threshold quantile (default {DEFAULT_SEGMENT_QUANTILE}, the README's choice "
                             "for VG-HuBERT_3; 0.8 for VG-HuBERT_4; the reference scripts default to 0.9)")
    parser.add_argument("--level2", action="store_true", help="keep single-frame runs")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="refuse longer files (default 60)")
    parser.add_argument("--json", default=None, help="also write the segments (and errors) as JSON")
    parser.add_argument("--plot", default=None, help="also draw waveform, attention and segments into this PNG")
    parser.add_argument("audio", nargs="+")


def _load_segmenter(args: argparse.Namespace) -> Any:
    if args.checkpoint:
        if args.set:
            raise VGSKitError("--set applies to --model only (a checkpoint carries its own config)")
        from vgskit.experiment import load_model_named

        model = load_model_named(args.checkpoint)
        where = f"--checkpoint {args.checkpoint}"
    else:
        from vgskit.models.registry import create_model
        from vgskit.train.config import apply_overrides

        model = create_model(str(args.model), **apply_overrides({}, list(args.set)))
        where = f"--model {args.model}"
    if not callable(getattr(model, "cls_attention", None)):
        name = getattr(model, "model_name", None) or type(model).__name__
        raise VGSKitError(f"{where}: model {name!r} has no speech CLS attention (cls_attention()); only VG-HuBERT "
                          "models segment speech")
    return model.eval()


def run_segment(args: argparse.Namespace) -> int:
    """Segment every file of ``args.audio``; 1 when a file could not be read, else 0."""
    import torch

    from vgskit.audio import load_audio
    from vgskit.experiment import check_output_path, write_output_text
    from vgskit.models.vg_hubert.wordseg import segment_words

    if not 0.0 <= args.quantile <= 1.0:
        raise VGSKitError(f"--quantile must lie in [0, 1], got {args.quantile}")
    if not args.max_seconds > 0:
        raise VGSKitError(f"--max-seconds must be > 0, got {args.max_seconds}")
    for option in ("json", "plot"):
        if getattr(args, option):
            check_output_path(getattr(args, option), f"--{option}")
    model = _load_segmenter(args)
    layer = model.config.segment_layer if args.layer is None else args.layer
    rate = int(getattr(model, "sample_rate", 16000))
    report: list[dict[str, Any]] = []
    drawn: list[SegmentedUtterance] = []
    failed = 0
    # One file at a time: a bad file is reported and skipped, and no utterance is padded next to another.
    for path in args.audio:
        try:
            wav = torch.from_numpy(load_audio(path, sample_rate=rate, max_seconds=args.max_seconds))  # [T]
        except VGSKitError as err:
            print(f"vgskit: error: {err}", file=sys.stderr)
            report.append({"audio": path, "error": str(err)})
            failed += 1
            continue
        with torch.no_grad():
            attn = model.cls_attention(wav[None], torch.tensor([len(wav)]), layer)
        n = int(attn.frames[0])
        weights = attn.weights[0, :, :n].float().cpu()  # [H, T]
        spf = float(attn.seconds_per_frame[0])
        seg = segment_words(weights, args.quantile, spf, level2=args.level2)
        spans = [(float(s), float(e)) for s, e in seg.boundaries.tolist()]
        print(f"{path}  ({len(spans)} segment(s), layer {layer}, quantile {args.quantile})")
        for i, (start, end) in enumerate(spans, start=1):
            print(f"  {i}: {start:.3f} - {end:.3f} s")
        report.append({"audio": path, "layer": layer, "quantile": args.quantile, "seconds_per_frame": spf,
                       "segments": [{"start": s, "end": e} for s, e in spans]})
        if args.plot:
            drawn.append(SegmentedUtterance(Path(path).name, wav.numpy(), rate, weights.sum(0).numpy(), spf, spans))
    if args.json:
        write_output_text(args.json, json.dumps(report, indent=2), "--json")
    if args.plot and drawn:
        print(plot_segments(drawn, args.plot, title=f"CLS attention, layer {layer}, quantile {args.quantile}"))
    if failed:
        print(f"vgskit: {failed} of {len(args.audio)} file(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------------
# vgskit convert vg_hubert
# ---------------------------------------------------------------------------------------------------------


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vgskit convert vg_hubert``."""
    parser.description = ("Read a word-discovery best_bundle.pth (its dual_encoder state dict), map its weights onto "
                          "the configured VG-HuBERT model (HuBERT and DINO ViT towers included) and save it "
                          "(model.safetensors + config.json). Every key that does not fit is named.")
    parser.add_argument("checkpoint", help="best_bundle.pth, or the run folder holding it (and args.pkl)")
    parser.add_argument("--config", default="vg_hubert",
                        help="registered model (vg_hubert, vg_hubert_tiny) or a JSON/YAML file with its config (a "
                             "model section, or a recipe); default vg_hubert")
    parser.add_argument("--out", required=True, help="folder to write the converted model to")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (applied last), e.g. speech.name_or_path=/models/hubert-base")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read the folder's args.pkl (layer counts, sizes) and unpickle the bundle fully; only "
                             "for files you trust")
    parser.add_argument("--partial", action="store_true",
                        help="save even when keys are missing, unmapped or mis-shaped (they are listed)")


def run_convert(args: argparse.Namespace) -> int:
    """Convert ``args.checkpoint`` and save it to ``args.out``, with a summary of what was loaded."""
    from vgskit.experiment import check_output_path
    from vgskit.models.registry import save_pretrained
    from vgskit.models.vg_hubert.convert import convert_reference_bundle
    from vgskit.train.config import apply_overrides, model_section

    check_output_path(args.out, "--out", folder=True)
    section = model_section(args.config, family="VG-HuBERT")
    overrides = apply_overrides({}, list(args.set))
    model, report = convert_reference_bundle(args.checkpoint, section, allow_pickle=args.allow_pickle,
                                             strict=not args.partial, overrides=overrides)
    out = save_pretrained(model, args.out)
    print(report.summary(str(args.checkpoint), model.model_name))
    print(out)
    return 0


register_command("segment", add_arguments=add_segment_arguments, run=run_segment,
                 help="word-like segments of spoken utterances from a VG-HuBERT model's CLS attention")
register_converter("vg_hubert", add_arguments=add_convert_arguments, run=run_convert,
                   help="turn a released word-discovery (VG-HuBERT) best_bundle.pth into a vgskit model")
