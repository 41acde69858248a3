"""SpeechCLIP's command-line pieces, registered with :mod:`vgskit.extensions` and added to ``vgskit`` by the CLI.

* ``vgskit keywords --checkpoint RUN a.wav ... [-k 5] [--json kw.json] [--attention-plot att.png]`` — the
  subwords each keyword slot of a cascaded model reads from spoken utterances (and, for one file, a plot of
  each slot's attention over time, the paper's Fig. 3);
* ``vgskit layers --checkpoint RUN --out layers.png [--json layers.json]`` — the learned weights of the
  speech tower's hidden states (any model with ``layer_weights()``);
* ``vgskit convert speechclip CHECKPOINT --config NAME|FILE --out DIR`` — a released reference checkpoint as
  a vgskit model (:func:`vgskit.models.speechclip.convert.convert_reference_checkpoint`).

Each ``run(args)`` returns the exit status and raises :class:`~vgskit.errors.VGSKitError` for mistakes in
the input, which the CLI prints as ``vgskit: error: ...``. Outputs are checked before a model is loaded, and a
file that is not what the command needs (a random binary, a JSON file, another model's weights, a folder that
holds no model) is refused with its name and what it is. Heavy imports happen inside the commands, so that
registering them costs nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vgskit.errors import VGSKitError
from vgskit.extensions import register_command, register_converter

__all__ = [
    "add_convert_arguments",
    "add_keywords_arguments",
    "add_layers_arguments",
    "check_checkpoint_file",
    "config_section",
    "run_convert",
    "run_keywords",
    "run_layers",
]


def _name(model: Any) -> str:
    return str(getattr(model, "model_name", None) or type(model).__name__)


def _load(checkpoint: str) -> Any:
    from vgskit.experiment import load_model_named

    return load_model_named(checkpoint)


def add_keywords_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vgskit keywords``."""
    parser.description = ("Print, per audio file, the top-k vocabulary tokens of each keyword slot with their "
                          "cosine similarity. Unreadable files are reported and skipped; the exit status is 1 if "
                          "any file failed.")
    parser.add_argument("--checkpoint", required=True, help="run folder or saved model folder")
    parser.add_argument("-k", type=int, default=5, help="tokens per slot (default 5)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="refuse longer files (default 60)")
    parser.add_argument("--json", default=None, help="also write the keywords (and errors) as JSON")
    parser.add_argument("--attention-plot", default=None, metavar="PNG",
                        help="also draw each keyword slot's attention over the frames of the (single) audio file, "
                             "under its waveform, as the paper's Fig. 3")
    parser.add_argument("audio", nargs="+")


def run_keywords(args: argparse.Namespace) -> int:
    """The keywords of every file of ``args.audio``; 1 when a file could not be read, else 0."""
    import torch

    from vgskit.audio import load_audio
    from vgskit.experiment import check_output_path, write_output_text

    if args.k < 1:
        raise VGSKitError(f"-k must be >= 1, got {args.k}")
    if not args.max_seconds > 0:
        raise VGSKitError(f"--max-seconds must be > 0, got {args.max_seconds}")
    if args.json:
        check_output_path(args.json, "--json")
    plot_path = getattr(args, "attention_plot", None)
    if plot_path:
        if len(args.audio) != 1:
            raise VGSKitError(f"--attention-plot draws one utterance; give one audio file (got {len(args.audio)})")
        check_output_path(plot_path, "--attention-plot")
    model = _load(args.checkpoint)
    keywords = getattr(model, "keywords", None)
    if not callable(keywords):
        raise VGSKitError(f"checkpoint {args.checkpoint}: model {_name(model)!r} has no keyword slots (keywords()); "
                          "only cascaded models such as SpeechCLIP-C produce keywords")
    if plot_path and not callable(getattr(model, "keyword_attention", None)):
        raise VGSKitError(f"checkpoint {args.checkpoint}: model {_name(model)!r} reports no keyword attention "
                          "(keyword_attention()), which --attention-plot draws")
    rate = int(getattr(model, "sample_rate", 16000))
    report: list[dict[str, Any]] = []
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
            (slots,) = keywords(wav[None], torch.tensor([len(wav)]), top_k=args.k)
        print(path)
        for i, slot in enumerate(slots, start=1):
            print(f"  slot {i}: " + " ".join(f"{token} ({score:.2f})" for token, score in slot))
        report.append({"audio": path, "slots": [[{"token": t, "cosine": float(c)} for t, c in slot]
                                                for slot in slots]})
        if plot_path:
            print(_plot_attention(model, wav, rate, [slot[0][0] if slot else "" for slot in slots], plot_path,
                                  title=Path(path).name).path)
    if args.json:
        write_output_text(args.json, json.dumps(report, indent=2, ensure_ascii=False), "--json")
    if failed:
        print(f"vgskit: {failed} of {len(args.audio)} file(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


def _plot_attention(model: Any, wav: Any, rate: int, labels: Sequence[str], path: str, *, title: str) -> Any:
    """Draw ``model``'s keyword attention over one utterance ``wav [T]``; y labels: slot number and subword."""
    import torch

    from vgskit.models.speechclip.analyses import plot_keyword_attention

    att = model.keyword_attention(wav[None], torch.tensor([len(wav)]))
    frames = int(att.lengths[0])
    return plot_keyword_attention(wav, rate, att.weights[0, :, :frames], att.frame_rate, path,
                                  slot_labels=[f"{i} {t}".strip() for i, t in enumerate(labels, start=1)],
                                  title=f"Keyword attention: {title}")


# ---------------------------------------------------------------------------------------------------------
# vgskit layers
# ---------------------------------------------------------------------------------------------------------


def add_layers_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vgskit layers``."""
    parser.add_argument("--checkpoint", required=True, help="run folder or saved model folder")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--json", default=None, help="also write the weights ({branch: [w_0, ...]}) as JSON")
    parser.add_argument("--title", default=None, help="plot title")


def run_layers(args: argparse.Namespace) -> int:
    """Print and plot the hidden-state weights of every branch of ``args.checkpoint``."""
    from vgskit.experiment import check_output_path, write_output_text
    from vgskit.report import plot_layer_weights

    check_output_path(args.out, "--out")
    if args.json:
        check_output_path(args.json, "--json")
    model = _load(args.checkpoint)
    layer_weights = getattr(model, "layer_weights", None)
    if not callable(layer_weights):
        raise VGSKitError(f"checkpoint {args.checkpoint}: model {_name(model)!r} has no layer weights "
                          "(layer_weights()); only models with a weighted sum of hidden states, such as SpeechCLIP, "
                          "have them")
    weights = {str(branch): [float(v) for v in w.detach().float().cpu().reshape(-1)]
               for branch, w in layer_weights().items()}
    if not weights:
        raise VGSKitError(f"checkpoint {args.checkpoint}: the model reports no layer weights")
    for branch, values in weights.items():
        print(f"{branch}: " + " ".join(f"{i}:{v:.3f}" for i, v in enumerate(values)))
    print(plot_layer_weights(weights, args.out, title=args.title or f"Hidden-state weights ({args.checkpoint})"))
    if args.json:
        write_output_text(args.json, json.dumps(weights, indent=2), "--json")
    return 0


# ---------------------------------------------------------------------------------------------------------
# vgskit convert speechclip
# ---------------------------------------------------------------------------------------------------------


def config_section(config: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``--config``: a registered SpeechCLIP name or a JSON/YAML model section, with ``--set`` overrides applied
    (:func:`vgskit.train.config.model_section`)."""
    from vgskit.train.config import model_section

    return model_section(config, overrides, family="SpeechCLIP")


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vgskit convert speechclip``."""
    parser.description = ("Read a checkpoint of the SpeechCLIP reference implementation (Lightning .ckpt, a saved "
                          "state dict or .safetensors), map its trained weights onto the configured model and save "
                          "it (model.safetensors + config.json). The frozen HuBERT/CLIP towers are not taken from "
                          "the file: they load from the config's hub names or folders.")
    parser.add_argument("checkpoint", help="the reference checkpoint file")
    parser.add_argument("--config", required=True,
                        help="registered model (speechclip_parallel_base, speechclip_cascaded_large, ...) or a "
                             "JSON/YAML file with its config (a model section, or a recipe)")
    parser.add_argument("--out", required=True, help="folder to write the converted model to")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. branches=both or speech.name_or_path=/models/hubert")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="unpickle the whole file (released .ckpt files pickle their training config); only "
                             "for files you trust")


#: Leading bytes of the files ``torch.load`` reads: a zip archive (``torch.save`` since 1.6) or a pickle (protocol 2+).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def check_checkpoint_file(path: str | Path) -> Path:
    """Refuse, by its first bytes and before any tower is loaded, a file that cannot be a reference checkpoint.

    A checkpoint is a ``torch.save`` file (zip or pickle) or a safetensors file (an 8-byte header length, then
    a JSON header). Anything else (a folder, an empty file, a JSON or text file, a random binary) is named with
    what it is, instead of the unpickler's message, which suggests disabling its safety checks.
    """
    p = Path(path)
    if not p.exists():
        raise VGSKitError(f"checkpoint {p}: file not found")
    if p.is_dir():
        if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
            raise VGSKitError(f"checkpoint {p}: is a vgskit model folder already (config.json, model.safetensors); "
                              "it loads as it is, there is nothing to convert")
        raise VGSKitError(f"checkpoint {p}: is a folder; give the reference checkpoint file (.ckpt, .pt, .pth, "
                          ".bin or .safetensors)")
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(64)
    except OSError as err:
        raise VGSKitError(f"checkpoint {p}: cannot be read ({err.strerror or err})") from None
    if size == 0:
        raise VGSKitError(f"checkpoint {p}: is empty")
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 9 else -1
    if 0 < header_len <= size - 8 and head[8:9] == b"{":
        return p  # safetensors layout
    if p.suffix == ".safetensors":
        raise VGSKitError(f"checkpoint {p}: is not a safetensors file (no valid header; truncated or another "
                          "format)")
    if head.startswith(_TORCH_MAGIC):
        return p
    if _looks_like_text(head):
        raise VGSKitError(f"checkpoint {p}: is a text file (starts with {head[:16]!r}), not a checkpoint; give "
                          "the released .ckpt / state-dict file (a JSON or YAML config goes to --config)")
    raise VGSKitError(f"checkpoint {p}: is neither a PyTorch checkpoint (zip or pickle) nor a safetensors file "
                      f"(it starts with bytes {head[:8].hex()})")


def _looks_like_text(head: bytes) -> bool:
    """Whether the first bytes of a file read as text (UTF-8, printable characters and white space)."""
    try:
        text = head[: max(1, len(head) - 3)].decode("utf-8")  # the cut may split a multi-byte character
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\t\r\n" for ch in text)


def run_convert(args: argparse.Namespace) -> int:
    """Convert ``args.checkpoint`` and save it to ``args.out``, with a summary of what was loaded."""
    from vgskit.experiment import check_output_path
    from vgskit.models.registry import save_pretrained
    from vgskit.models.speechclip.convert import convert_reference_checkpoint

    check_checkpoint_file(args.checkpoint)
    check_output_path(args.out, "--out", folder=True)
    section = config_section(args.config, args.set)
    model, report = convert_reference_checkpoint(args.checkpoint, section, allow_pickle=args.allow_pickle)
    out = save_pretrained(model, args.out)
    print(f"{args.checkpoint}: {len(report.loaded)} trained tensor(s) loaded into {model.model_name} "
          f"(branches: {', '.join(model.branch_names)})")
    if report.defaulted:
        print(f"  kept at their configured value: {', '.join(report.defaulted)}")
    if report.dropped:
        print(f"  frozen-tower tensors not used (the towers load from {model.config.speech.name_or_path!r} and "
              f"{model.config.image.name_or_path!r}): {len(report.dropped)}")
    if report.keyword_vocab is not None:
        print(f"  keyword vocabulary: {len(report.keyword_vocab)} subwords (ids from the {report.keyword_vocab_source})")
    print(out)
    return 0


register_command("keywords", add_arguments=add_keywords_arguments, run=run_keywords,
                 help="the keywords a cascaded model reads from spoken utterances")
register_command("layers", add_arguments=add_layers_arguments, run=run_layers,
                 help="plot the learned weights of the speech tower's hidden states")
register_converter("speechclip", add_arguments=add_convert_arguments, run=run_convert,
                   help="turn a released SpeechCLIP checkpoint into a vgskit model")
