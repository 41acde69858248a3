"""``vgskit convert fast_vgs BUNDLE --config NAME|FILE --out DIR``: a released FaST-VGS ``best_bundle.pth`` as a
vgskit model (:func:`vgskit.models.fast_vgs.convert.convert_reference_bundle`).

Registered with :mod:`vgskit.extensions` on import; the CLI builds ``vgskit convert`` from that registry. Heavy
imports happen inside the command, so that registering it costs nothing.
"""

from __future__ import annotations

import argparse
from typing import Any

from vgskit.extensions import register_converter

__all__ = ["add_convert_arguments", "config_section", "run_convert"]


def config_section(config: str) -> dict[str, Any]:
    """``--config``: a registered FaST-VGS name or a JSON/YAML model section
    (:func:`vgskit.train.config.model_section`)."""
    from vgskit.train.config import model_section

    return model_section(config, family="FaST-VGS")


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vgskit convert fast_vgs``."""
    parser.description = ("Read a FaST-VGS-Family best_bundle.pth (its dual_encoder and cross_encoder state dicts), "
                          "map its weights onto the configured model, wav2vec2 tower included, and save it "
                          "(model.safetensors + config.json). Every key that does not fit is named.")
    parser.add_argument("checkpoint", help="best_bundle.pth, or the run folder holding it (and args.pkl)")
    parser.add_argument("--config", default="fast_vgs",
                        help="registered model (fast_vgs, fast_vgs_tiny) or a JSON/YAML file with its config (a model "
                             "section, or a recipe); default fast_vgs")
    parser.add_argument("--out", required=True, help="folder to write the converted model to")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (applied last), e.g. layer.num_heads=12 or "
                             "speech.name_or_path=/models/wav2vec2-base")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read the folder's args.pkl (sizes and layer counts) and unpickle the bundle fully; "
                             "only for files you trust")
    parser.add_argument("--partial", action="store_true",
                        help="save even when keys are missing, unmapped or mis-shaped (they are listed)")


def run_convert(args: argparse.Namespace) -> int:
    """Convert ``args.checkpoint`` and save it to ``args.out``, with a summary of what was loaded."""
    from vgskit.experiment import check_output_path
    from vgskit.models.fast_vgs.convert import convert_reference_bundle
    from vgskit.models.registry import save_pretrained
    from vgskit.train.config import apply_overrides

    check_output_path(args.out, "--out", folder=True)
    section = config_section(args.config)
    overrides = apply_overrides({}, list(args.set))
    model, report = convert_reference_bundle(args.checkpoint, section, allow_pickle=args.allow_pickle,
                                             strict=not args.partial, overrides=overrides)
    out = save_pretrained(model, args.out)
    print(report.summary(str(args.checkpoint), model.model_name))
    print(out)
    return 0


register_converter("fast_vgs", add_arguments=add_convert_arguments, run=run_convert,
                   help="turn a released FaST-VGS best_bundle.pth into a vgskit model")
