"""Released FaST-VGS checkpoints → :class:`~vgskit.models.fast_vgs.FastVGS` (``vgskit convert fast_vgs``).

The reference implementation (``jasonppy/FaST-VGS-Family``) saves ``best_bundle.pth``: a dict whose
``dual_encoder`` and ``cross_encoder`` entries are the state dicts of its ``DualEncoder`` and ``CrossEncoder``
(besides optimizer state and bookkeeping, which are not used here), next to a pickled ``args.pkl`` (the
training ``argparse.Namespace``).

Reference names, read from ``models/fast_vgs.py`` and ``models/w2v2_model.py`` of the reference:

* ``DualEncoder``: ``conv1_trm1_trm3`` (the fairseq-style wav2vec2 tower ``Wav2Vec2Model_cls``, its CLS
  ``cls_token``), ``conv2`` (``ResDavenet``), ``audio_cls_token_proj_pre`` (CLS MLP) → ``audio_cls_proj``,
  ``trm2`` (one ``BertLayer``) → ``audio_layers.0``, ``trm2_proj`` → ``audio_proj``, ``visn_fc``
  (``VisualFeatEncoder``) → ``region_encoder``, ``visual_cls_token`` → ``visual_cls``, ``trm.{i}`` →
  ``visual_layers.{i}``, ``visual_cls_token_proj_coarse`` → ``visual_proj``. ``audio_cls_token_proj_coarse``
  is computed by the reference and then overwritten by ``trm2_proj``'s output, so it is dropped.
* ``CrossEncoder``: ``xtrm.{i}`` (``LXMERTXLayer``) and ``fc`` (score MLP) → ``cross_encoder``.
* The tower's module names (``feature_extractor.conv_layers.{i}.0`` conv, ``.2`` GroupNorm of the first
  block, ``layer_norm``, ``post_extract_proj``, ``encoder.pos_conv.0`` weight-normed conv,
  ``encoder.layer_norm``, ``encoder.layers.{n}.self_attn.{q,k,v,out}_proj``, ``self_attn_layer_norm``,
  ``fc1``, ``fc2``, ``final_layer_norm``) are fairseq's and are mapped onto the transformers wav2vec2 module
  names our :class:`~vgskit.encoders.pretrained_speech.PretrainedSpeechEncoder` holds. The fairseq
  ``layer_norm`` extractor mode (``conv_layers.{i}.2.1``) is inferred from fairseq's module layout, not from a
  released bundle. Pretraining heads (``mask_emb``, ``quantizer``, ``project_q``, ``final_proj``, ...) and
  tower layers beyond the configured ``speech.num_layers`` are dropped.

The block-level names (inside ``trm2``/``trm``/``xtrm``/``fc``, ``conv2``, ``visn_fc``) are those of the
stored golden cases. Keys stored under a DataParallel ``module.`` prefix are accepted.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vgskit.errors import ConfigError
from vgskit.models.fast_vgs.model import FastVGS, FastVGSConfig
from vgskit.models.fast_vgs.transformer import reference_key_map
from vgskit.models.reference_bundle import (
    ARGS_NAME,
    BUNDLE_NAME,
    ConversionReport,
    bundle_parts,
    read_bundle_parts,
    read_reference_args,
    resolve_bundle,
)
from vgskit.models.stand_in_pickle import UnpickledObject

#: The file name the reference saves its best model under, and its training arguments.
#: Reference-only parameters with no use in the model (see the module docstring).
_UNUSED_DUAL = re.compile(
    r"^(audio_cls_token_proj_coarse\.|conv1_trm1_trm3\.(mask_emb$|quantizer\.|input_quantizer\.|project_q\.|"
    r"project_inp\.|final_proj\.|target_glu\.))"
)
_TOWER = "conv1_trm1_trm3."
_TOWER_LAYER = re.compile(r"^conv1_trm1_trm3\.encoder\.layers\.(\d+)\.")


class FastVGSConversion(ConversionReport):
    """What :func:`convert_reference_bundle` did with a reference bundle; keys of the bundle are named
    ``dual_encoder.<key>`` / ``cross_encoder.<key>``, ours by their ``state_dict`` names (fields: see
    :class:`~vgskit.models.reference_bundle.ConversionReport`)."""


# ---------------------------------------------------------------------------------------------------------
# Reading the files
# ---------------------------------------------------------------------------------------------------------


def read_reference_bundle(path: str | Path, *, allow_pickle: bool = False) -> dict[str, dict[str, Tensor]]:
    """The ``dual_encoder`` and ``cross_encoder`` state dicts of a ``best_bundle.pth``
    (:func:`~vgskit.models.reference_bundle.read_bundle_parts`: safe loading unless ``allow_pickle``)."""
    return read_bundle_parts(path, ("dual_encoder", "cross_encoder"), "FaST-VGS", allow_pickle=allow_pickle)


def config_from_reference_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Config overrides read from the reference's training ``args`` (absent entries are left to the config).

    ``hidden_size``/``num_attention_heads``/``intermediate_size``/``hidden_act``/dropouts/``initializer_range``
    size every BERT and cross layer; ``trm_layers`` and ``xtrm_layers`` count the visual and cross layers;
    ``layer_use + 1`` is the number of tower layers the reference keeps; ``visual_feat_dim``/``visual_pos_dim``,
    ``margin`` and the two matching weights are read as well.
    """
    layer = {own: cast(args[ref]) for own, ref, cast in (
        ("hidden_size", "hidden_size", int), ("num_heads", "num_attention_heads", int),
        ("ffn_dim", "intermediate_size", int), ("activation", "hidden_act", str),
        ("dropout", "hidden_dropout_prob", float), ("attention_dropout", "attention_probs_dropout_prob", float),
        ("initializer_range", "initializer_range", float)) if args.get(ref) is not None}
    out: dict[str, Any] = {"layer": layer} if layer else {}
    for own, ref, cast in (("visual_layers", "trm_layers", int), ("cross_layers", "xtrm_layers", int),
                           ("region_feat_dim", "visual_feat_dim", int), ("box_dim", "visual_pos_dim", int),
                           ("margin", "margin", float), ("coarse_weight", "coarse_matching_weight", float),
                           ("fine_weight", "fine_matching_weight", float)):
        if args.get(ref) is not None:
            out[own] = cast(args[ref])
    if args.get("layer_use") is not None:
        out["speech"] = {"num_layers": int(args["layer_use"]) + 1}
    if "hidden_size" in layer:
        # ResDAVEnet's last width is the hidden size (the reference hard-codes 768 for both).
        out["_hidden"] = layer["hidden_size"]
    return out


# ---------------------------------------------------------------------------------------------------------
# Key names
# ---------------------------------------------------------------------------------------------------------

_HF_TO_FAIRSEQ_LAYER = (
    ("attention.", "self_attn."),
    ("layer_norm.", "self_attn_layer_norm."),
    ("feed_forward.intermediate_dense.", "fc1."),
    ("feed_forward.output_dense.", "fc2."),
    ("final_layer_norm.", "final_layer_norm."),
)
_POS_CONV = {"bias": "bias", "weight_g": "weight_g", "weight_v": "weight_v",
             "parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}


def _tower_reference_key(hf_key: str, group_norm: bool) -> str | None:
    """The fairseq name (inside ``conv1_trm1_trm3``) of a transformers wav2vec2 key, else ``None``."""
    m = re.match(r"^feature_extractor\.conv_layers\.(\d+)\.(conv|layer_norm)\.(\w+)$", hf_key)
    if m:
        i, part, leaf = m.groups()
        inner = "0" if part == "conv" else ("2" if group_norm else "2.1")
        return f"feature_extractor.conv_layers.{i}.{inner}.{leaf}"
    for own, ref in (("feature_projection.layer_norm.", "layer_norm."),
                     ("feature_projection.projection.", "post_extract_proj."),
                     ("encoder.layer_norm.", "encoder.layer_norm.")):
        if hf_key.startswith(own):
            return ref + hf_key[len(own):]
    if hf_key.startswith("encoder.pos_conv_embed.conv."):
        leaf = _POS_CONV.get(hf_key[len("encoder.pos_conv_embed.conv."):])
        return None if leaf is None else f"encoder.pos_conv.0.{leaf}"
    m = re.match(r"^encoder\.layers\.(\d+)\.(.+)$", hf_key)
    if m:
        n, rest = m.groups()
        for own, ref in _HF_TO_FAIRSEQ_LAYER:
            if rest.startswith(own):
                return f"encoder.layers.{n}.{ref}{rest[len(own):]}"
    return None


_RESDAVENET_PARTS = {"conv1": "conv1", "norm1": "bn1", "conv2": "conv2", "norm2": "bn2",
                     "shortcut.0": "downsample.0", "shortcut.1": "downsample.1"}
_REGION_PARTS = {"feat_proj": "visn_fc", "feat_norm": "visn_layer_norm", "box_proj": "box_fc",
                 "box_norm": "box_layer_norm"}


def _resdavenet_reference_key(key: str) -> str | None:
    m = re.match(r"^stages\.(\d+)\.(\d+)\.(conv1|norm1|conv2|norm2|shortcut\.[01])\.(\w+)$", key)
    if m:
        s, j, part, leaf = m.groups()
        return f"layer{int(s) + 1}.{j}.{_RESDAVENET_PARTS[part]}.{leaf}"
    for own, ref in (("input_proj.", "linear."), ("input_norm.", "bn1.")):
        if key.startswith(own):
            return ref + key[len(own):]
    return None


def reference_key_names(model: FastVGS) -> dict[str, str]:
    """Our ``state_dict`` key → the bundle key (``dual_encoder.<key>`` or ``cross_encoder.<key>``).

    Our keys with no reference counterpart (extra audio layers beyond the reference's single ``trm2``, a tower
    module fairseq does not have) are left out, so they show up as missing when a bundle is converted.
    """
    group_norm = getattr(model.speech_tower.hf_config, "feat_extract_norm", "group") == "group"
    bert = reference_key_map(model.visual_layers[0])
    cross = reference_key_map(model.cross_encoder)
    out: dict[str, str] = {}
    for key in model.state_dict():
        head, _, rest = key.partition(".")
        ref: str | None = None
        if key == "speech_tower.cls_tokens":
            ref = _TOWER + "cls_token"
        elif key.startswith("speech_tower.model."):
            tower = _tower_reference_key(key[len("speech_tower.model."):], group_norm)
            ref = None if tower is None else _TOWER + tower
        elif head == "resdavenet":
            inner = _resdavenet_reference_key(rest)
            ref = None if inner is None else "conv2." + inner
        elif head == "audio_cls_proj":
            ref = "audio_cls_token_proj_pre." + rest
        elif head == "audio_layers":
            index, _, inner = rest.partition(".")
            ref = "trm2." + bert[inner] if index == "0" else None
        elif head == "audio_proj":
            ref = "trm2_proj." + rest
        elif head == "region_encoder":
            part, _, leaf = rest.partition(".")
            ref = f"visn_fc.{_REGION_PARTS[part]}.{leaf}" if part in _REGION_PARTS else None
        elif key == "visual_cls":
            ref = "visual_cls_token"
        elif head == "visual_layers":
            index, _, inner = rest.partition(".")
            ref = f"trm.{index}.{bert[inner]}"
        elif head == "visual_proj":
            ref = "visual_cls_token_proj_coarse." + rest
        elif head == "cross_encoder":
            out[key] = "cross_encoder." + cross[rest]
            continue
        if ref is not None:
            out[key] = "dual_encoder." + ref
    return out


def _hf_alias(model: FastVGS, key: str) -> str | None:
    """Our key for a tower key the bundle stores under transformers' own names (``conv1_trm1_trm3.<hf key>``)."""
    if not key.startswith(_TOWER):
        return None
    ours = "speech_tower.model." + key[len(_TOWER):]
    return ours if ours in model.state_dict() else None


# ---------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------


def _resolve_config(config: FastVGSConfig | str | Mapping[str, Any], extra: Mapping[str, Any]) -> tuple[
        FastVGSConfig, str | None]:
    from vgskit.models.registry import merge_config, model_config

    extra = dict(extra)
    hidden = extra.pop("_hidden", None)
    if isinstance(config, FastVGSConfig):
        base, name = copy.deepcopy(config), None
    elif isinstance(config, str):
        base, name = model_config(config), config
    elif isinstance(config, Mapping):
        overrides = dict(config)
        name = overrides.pop("name", None)
        base = model_config(str(name), **overrides) if name else merge_config(FastVGSConfig(), overrides,
                                                                                where="FastVGSConfig")
    else:
        raise ConfigError(f"config: expected a FastVGSConfig, a registered name or a mapping, got "
                          f"{type(config).__name__}")
    if not isinstance(base, FastVGSConfig):
        raise ConfigError(f"config: model {name!r} is not a FaST-VGS model")
    if hidden is not None and base.resdavenet_widths[-1] != hidden:
        extra["resdavenet_widths"] = (*base.resdavenet_widths[:-1], hidden)
    if extra:
        base = merge_config(base, extra, where="FastVGSConfig (from args.pkl)")
    return base, None if name is None else str(name)


def convert_reference_bundle(
    source: str | Path | Mapping[str, Any],
    config: FastVGSConfig | str | Mapping[str, Any] = "fast_vgs",
    *,
    allow_pickle: bool = False,
    strict: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[FastVGS, FastVGSConversion]:
    """A :class:`FastVGS` holding the weights of a reference ``best_bundle.pth``, and a report.

    Args:
        source: the bundle file, a run folder holding it (and maybe ``args.pkl``), or the loaded bundle dict.
        config: the model to build: a :class:`FastVGSConfig`, a registered name or a mapping with an optional
            ``name`` (a recipe's ``model`` section). Its speech tower loads its pretrained weights first; the
            bundle's tower weights then replace them.
        allow_pickle: unpickle the bundle fully and read the folder's ``args.pkl`` (sizes, layer counts) over
            ``config``; only for files you trust. Without it an ``args.pkl`` is left unread (noted).
        strict: raise when a tensor of the model is missing, a bundle key has no place or a shape differs;
            with ``False`` whatever fits is loaded and the report lists the rest.
        overrides: config values applied last (over ``args.pkl``), e.g. from ``--set``.

    Raises:
        VGSKitError: unreadable files. ConfigError (strict): naming the missing, unmapped and mis-shaped keys.
    """
    args_path: Path | None = None
    if isinstance(source, Mapping):
        where = "reference bundle"
        bundle = bundle_parts(source, ("dual_encoder", "cross_encoder"), "FaST-VGS", where)
    else:
        bundle_path, args_path = resolve_bundle(source)
        where = str(bundle_path)
        bundle = read_reference_bundle(bundle_path, allow_pickle=allow_pickle)

    report = FastVGSConversion()
    extra: dict[str, Any] = {}
    if args_path is not None:
        if allow_pickle:
            extra = config_from_reference_args(read_reference_args(args_path, allow_pickle=True))
            report.config_source = "config + args.pkl"
        else:
            report.notes.append(f"{args_path} not read (a pickle; pass --allow-pickle to take the sizes from it)")
    cfg, name = _resolve_config(config, extra)
    if overrides:
        from vgskit.models.registry import merge_config

        cfg = merge_config(cfg, dict(overrides), where="FastVGSConfig")
    model = FastVGS(cfg)

    names = reference_key_names(model)
    to_ours = {ref: ours for ours, ref in names.items()}
    kept_layers = len(model.speech_tower.model.encoder.layers)
    ours_state = model.state_dict()
    converted: dict[str, Tensor] = {}
    misshaped: set[str] = set()
    for part, state in bundle.items():
        for key, value in state.items():
            full = f"{part}.{key}"
            ours = to_ours.get(full) or (_hf_alias(model, key) if part == "dual_encoder" else None)
            if ours is None:
                layer = _TOWER_LAYER.match(key) if part == "dual_encoder" else None
                unused = part == "dual_encoder" and _UNUSED_DUAL.match(key)
                if unused or (layer and int(layer.group(1)) >= kept_layers):
                    report.dropped.append(full)
                else:
                    report.unmapped.append(full)
                continue
            if tuple(value.shape) != tuple(ours_state[ours].shape):
                report.mismatched.append(f"{full} -> {ours}: {tuple(value.shape)} vs {tuple(ours_state[ours].shape)}")
                misshaped.add(ours)
                continue
            converted[ours] = value
    report.missing = sorted(set(ours_state) - set(converted) - misshaped)  # mis-shaped ones are named there
    report.loaded = sorted(converted)
    report.unmapped.sort()
    report.dropped.sort()
    if strict and not report.complete:
        raise ConfigError(f"checkpoint {where}: does not fit the configured FaST-VGS model: {_problems(report)}; "
                          "check the sizes (--config / --set, or args.pkl with --allow-pickle)")
    with torch.no_grad():
        model.load_state_dict(converted, strict=False)
    model.model_name = name or "fast_vgs"
    return model.eval(), report


def _problems(report: FastVGSConversion, limit: int = 20) -> str:
    parts = []
    for what, keys in (("missing (ours)", report.missing), ("unmapped (bundle)", report.unmapped),
                       ("mis-shaped", report.mismatched)):
        if keys:
            more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
            parts.append(f"{len(keys)} {what}: {keys[:limit]}{more}")
    return "; ".join(parts)


def load_reference_bundle(
    source: str | Path | Mapping[str, Any],
    config: FastVGSConfig | str | Mapping[str, Any] = "fast_vgs",
    *,
    allow_pickle: bool = False,
) -> FastVGS:
    """:func:`convert_reference_bundle` (strict) without the report."""
    return convert_reference_bundle(source, config, allow_pickle=allow_pickle)[0]


__all__ = [
    "ARGS_NAME",
    "BUNDLE_NAME",
    "FastVGSConversion",
    "UnpickledObject",
    "config_from_reference_args",
    "convert_reference_bundle",
    "load_reference_bundle",
    "read_reference_args",
    "read_reference_bundle",
    "reference_key_names",
    "resolve_bundle",
]
