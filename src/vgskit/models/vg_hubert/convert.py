"""Released VG-HuBERT checkpoints → :class:`~vgskit.models.vg_hubert.VGHuBERT` (``vgskit convert vg_hubert``).

The reference implementation (``jasonppy/word-discovery``) saves ``best_bundle.pth``: a dict whose ``dual_encoder``
entry is the state dict of its ``DualEncoder`` (besides ``optimizer`` and ``indices``, which are not used here), next
to a pickled ``args.pkl`` (the training ``argparse.Namespace``). The released VG-HuBERT_3 / VG-HuBERT_4 bundles hold
only ``dual_encoder``.

Reference names, read from ``models/dual_encoder.py``, ``models/audio_encoder.py`` and the DINO
``vision_transformer.py`` the reference builds its image tower from:

* ``audio_encoder.*`` (``AudioEncoder``, fairseq's wav2vec2/HuBERT layout): ``feature_extractor.conv_layers.{i}.0``
  (conv), ``.2`` (GroupNorm of the first block; ``.2.1`` LayerNorm in the ``layer_norm`` extractor mode),
  ``layer_norm`` (on the CNN features), ``post_extract_proj``, ``pos_conv.0`` (weight-normed conv; at the top level,
  not under ``encoder``), ``encoder.layers.{n}.self_attn.{q,k,v,out}_proj``, ``self_attn_layer_norm``, ``fc1``,
  ``fc2``, ``final_layer_norm``, ``encoder.layer_norm`` and ``cls_token`` → our transformers HuBERT tower;
* ``trm.*`` (DINO ViT): ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.norm1``,
  ``blocks.{i}.attn.qkv`` (query, key and value fused in one Linear, in that order along the output rows),
  ``blocks.{i}.attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2`` and ``norm`` → our transformers ViT tower (the fused
  ``qkv`` is split into ``query``/``key``/``value``);
* ``audio_cls_token_proj.{0,2}`` → ``audio_proj.{0,2}``, ``visual_cls_token_proj.{0,2}`` → ``image_proj.{0,2}``.

Dropped as unused for retrieval: the ``audio_feats_proj`` / ``visual_feats_proj`` heads (``--feat_loss``), HuBERT
pre-training leftovers (``mask_emb``, ``final_proj``, ``label_embs_concat``, ...) and tower layers beyond the
configured ``speech.num_layers``. Keys stored under a DataParallel ``module.`` prefix are accepted.
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
from vgskit.models.reference_bundle import (
    ARGS_NAME,
    BUNDLE_NAME,
    ConversionReport,
    bundle_parts,
    read_bundle_parts,
    read_reference_args,
    resolve_bundle,
)
from vgskit.models.vg_hubert.model import VGHuBERT, VGHuBERTConfig

__all__ = [
    "ARGS_NAME",
    "BUNDLE_NAME",
    "VGHuBERTConversion",
    "config_from_reference_args",
    "convert_reference_bundle",
    "export_reference_state_dict",
    "read_reference_args",
    "read_reference_bundle",
    "reference_key_names",
    "resolve_bundle",
]

_AUDIO = "audio_encoder."
_VIT = "trm."
_UNUSED = re.compile(
    r"^(audio_feats_proj\.|visual_feats_proj\.|audio_encoder\.(mask_emb$|final_proj\.|label_embs_concat$|"
    r"quantizer\.|input_quantizer\.|project_q\.|project_inp\.|target_glu\.)|trm\.head\.)"
)
_AUDIO_LAYER = re.compile(r"^audio_encoder\.encoder\.layers\.(\d+)\.")
#: A fused-qkv reference key fills three of our keys; the chunk index says which third (0 query, 1 key, 2 value).
RefKey = tuple[str, int | None]


class VGHuBERTConversion(ConversionReport):
    """What :func:`convert_reference_bundle` did with a reference bundle (bundle keys are ``dual_encoder`` keys;
    fields: see :class:`~vgskit.models.reference_bundle.ConversionReport`)."""


# ---------------------------------------------------------------------------------------------------------
# Reading the files
# ---------------------------------------------------------------------------------------------------------


def read_reference_bundle(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The ``dual_encoder`` state dict of a ``best_bundle.pth``
    (:func:`~vgskit.models.reference_bundle.read_bundle_parts`: safe loading unless ``allow_pickle``)."""
    return read_bundle_parts(path, ("dual_encoder",), "VG-HuBERT", allow_pickle=allow_pickle)["dual_encoder"]


def config_from_reference_args(args: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Config overrides read from the reference's training ``args``, and notes on what could not be used.

    ``layer_use + 1`` is the number of HuBERT layers kept, ``random_init_last_x`` how many were re-initialised,
    ``common_embed_dim`` the embedding size, ``encoder_embed_dim * 2`` the MLPs' hidden width and ``margin`` the
    loss margin. The image tower is named by ``vit_arch`` + ``vit_patch_size`` (only DINO ViT-S/8 has a known hub
    name; any other is noted and left to the config).
    """
    out: dict[str, Any] = {}
    notes: list[str] = []
    speech: dict[str, Any] = {}
    if args.get("layer_use") is not None:
        speech["num_layers"] = int(args["layer_use"]) + 1
    if args.get("random_init_last_x") is not None:
        speech["reinit_last"] = int(args["random_init_last_x"])
    if speech:
        out["speech"] = speech
    if args.get("common_embed_dim") is not None:
        out["embed_dim"] = int(args["common_embed_dim"])
    if args.get("encoder_embed_dim") is not None:
        out["proj_hidden"] = 2 * int(args["encoder_embed_dim"])
    if args.get("margin") is not None:
        out["margin"] = float(args["margin"])
    arch, patch = args.get("vit_arch"), args.get("vit_patch_size")
    if arch is not None:
        if (str(arch), int(patch or 0)) == ("vitsmall", 8):
            out["image"] = {"name_or_path": "dino-vits8"}
        else:
            notes.append(f"args.pkl: image tower {arch}/{patch} has no known hub name; the config's image tower is "
                         "used (set image.name_or_path to a matching local ViT)")
    if args.get("cls_loss") is False:
        notes.append("args.pkl: cls_loss is off, so the bundle's CLS projections were not trained")
    return out, notes


# ---------------------------------------------------------------------------------------------------------
# Key names
# ---------------------------------------------------------------------------------------------------------

_HF_TO_FAIRSEQ_LAYER = (
    ("attention.q_proj.", "self_attn.q_proj."),
    ("attention.k_proj.", "self_attn.k_proj."),
    ("attention.v_proj.", "self_attn.v_proj."),
    ("attention.out_proj.", "self_attn.out_proj."),
    ("layer_norm.", "self_attn_layer_norm."),
    ("feed_forward.intermediate_dense.", "fc1."),
    ("feed_forward.output_dense.", "fc2."),
    ("final_layer_norm.", "final_layer_norm."),
)
_POS_CONV = {"bias": "bias", "weight_g": "weight_g", "weight_v": "weight_v",
             "parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
#: transformers ViT block names → DINO block names. transformers 5 renamed the ViT modules (``layers.{i}.attention.
#: q_proj``, ``mlp.fc1``); 4.x names them ``encoder.layer.{i}.attention.attention.query``, ``intermediate.dense``.
#: Both layouts are mapped, so a tower saved by either version converts.
_HF_TO_DINO_BLOCK = (
    ("layernorm_before.", "norm1."),
    ("attention.output.dense.", "attn.proj."),
    ("attention.o_proj.", "attn.proj."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)
_QKV = {"query": 0, "key": 1, "value": 2, "q_proj": 0, "k_proj": 1, "v_proj": 2}


def _hubert_reference_key(hf_key: str, group_norm: bool) -> str | None:
    """The reference name (inside ``audio_encoder``) of a transformers HuBERT key, else ``None``."""
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
        return None if leaf is None else f"pos_conv.0.{leaf}"  # AudioEncoder holds pos_conv at its top level
    m = re.match(r"^encoder\.layers\.(\d+)\.(.+)$", hf_key)
    if m:
        n, rest = m.groups()
        for own, ref in _HF_TO_FAIRSEQ_LAYER:
            if rest.startswith(own):
                return f"encoder.layers.{n}.{ref}{rest[len(own):]}"
    return None


def _vit_reference_key(hf_key: str) -> RefKey | None:
    """The DINO name (inside ``trm``) of a transformers ViT key, with the qkv chunk for query/key/value."""
    fixed = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed"}
    if hf_key in fixed:
        return fixed[hf_key], None
    if hf_key.startswith("embeddings.patch_embeddings.projection."):
        return "patch_embed.proj." + hf_key.rsplit(".", 1)[1], None
    if hf_key.startswith("layernorm."):
        return "norm." + hf_key[len("layernorm."):], None
    m = re.match(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$", hf_key)
    if not m:
        return None
    i, rest = m.groups()
    q = re.match(r"^attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)$", rest)
    if q:
        return f"blocks.{i}.attn.qkv.{q.group(2)}", _QKV[q.group(1)]
    for own, ref in _HF_TO_DINO_BLOCK:
        if rest.startswith(own):
            return f"blocks.{i}.{ref}{rest[len(own):]}", None
    return None


def reference_key_names(model: VGHuBERT) -> dict[str, RefKey]:
    """Our ``state_dict`` key → ``(bundle key, qkv chunk or None)``; keys with no reference counterpart are left out.

    Raises:
        ConfigError: the model's image tower is not a ViT (the reference's is DINO; an MAE tower has no bundle).
    """
    if model.image_tower.family != "vit":
        raise ConfigError(f"the reference bundles hold a DINO ViT image tower; the configured image tower is a "
                          f"{model.image_tower.family!r} model "
                          f"(image.name_or_path={model.config.image.name_or_path!r})")
    group_norm = getattr(model.speech_tower.hf_config, "feat_extract_norm", "group") == "group"
    out: dict[str, RefKey] = {}
    for key in model.state_dict():
        ref: RefKey | None = None
        if key == "speech_tower.cls_tokens":
            ref = (_AUDIO + "cls_token", None)
        elif key.startswith("speech_tower.model."):
            name = _hubert_reference_key(key[len("speech_tower.model."):], group_norm)
            ref = None if name is None else (_AUDIO + name, None)
        elif key.startswith("image_tower.model."):
            vit = _vit_reference_key(key[len("image_tower.model."):])
            ref = None if vit is None else (_VIT + vit[0], vit[1])
        elif key.startswith("audio_proj."):
            ref = ("audio_cls_token_proj." + key[len("audio_proj."):], None)
        elif key.startswith("image_proj."):
            ref = ("visual_cls_token_proj." + key[len("image_proj."):], None)
        if ref is not None:
            out[key] = ref
    return out


def export_reference_state_dict(model: VGHuBERT) -> dict[str, Tensor]:
    """The model's weights under the reference's ``dual_encoder`` names (query/key/value fused into ``qkv``).

    The inverse of the conversion: ``{"dual_encoder": export_reference_state_dict(m)}`` saved with ``torch.save``
    converts back into ``m``'s weights.
    """
    state = model.state_dict()
    out: dict[str, Tensor] = {}
    chunks: dict[str, dict[int, Tensor]] = {}
    for ours, (ref, chunk) in reference_key_names(model).items():
        value = state[ours].detach().clone()
        if chunk is None:
            out[ref] = value
        else:
            chunks.setdefault(ref, {})[chunk] = value
    for ref, parts in chunks.items():
        out[ref] = torch.cat([parts[i] for i in range(3)], dim=0)  # [3D, ...]: query, key, value rows
    return out


# ---------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------


def _resolve_config(config: VGHuBERTConfig | str | Mapping[str, Any], extra: Mapping[str, Any]) -> tuple[
        VGHuBERTConfig, str | None]:
    from vgskit.models.registry import merge_config, model_config

    if isinstance(config, VGHuBERTConfig):
        base, name = copy.deepcopy(config), None
    elif isinstance(config, str):
        base, name = model_config(config), config
    elif isinstance(config, Mapping):
        overrides = dict(config)
        name = overrides.pop("name", None)
        base = model_config(str(name), **overrides) if name else merge_config(VGHuBERTConfig(), overrides,
                                                                                where="VGHuBERTConfig")
    else:
        raise ConfigError(f"config: expected a VGHuBERTConfig, a registered name or a mapping, got "
                          f"{type(config).__name__}")
    if not isinstance(base, VGHuBERTConfig):
        raise ConfigError(f"config: model {name!r} is not a VG-HuBERT model")
    if extra:
        base = merge_config(base, dict(extra), where="VGHuBERTConfig (from args.pkl)")
    return base, None if name is None else str(name)


def convert_reference_bundle(
    source: str | Path | Mapping[str, Any],
    config: VGHuBERTConfig | str | Mapping[str, Any] = "vg_hubert",
    *,
    allow_pickle: bool = False,
    strict: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[VGHuBERT, VGHuBERTConversion]:
    """A :class:`VGHuBERT` holding the weights of a reference ``best_bundle.pth``, and a report.

    Args:
        source: the bundle file, a run folder holding it (and maybe ``args.pkl``), or the loaded bundle dict.
        config: the model to build (a config, a registered name, or a recipe's ``model`` section). Its towers load
            their pretrained weights first; the bundle's weights then replace them.
        allow_pickle: unpickle the bundle fully and read the folder's ``args.pkl`` (sizes) over ``config``; only
            for files you trust. Without it an ``args.pkl`` is left unread (noted).
        strict: raise when a tensor of the model is missing, a bundle key has no place or a shape differs; with
            ``False`` whatever fits is loaded and the report lists the rest.
        overrides: config values applied last (over ``args.pkl``), e.g. from ``--set``.

    Raises:
        VGSKitError: unreadable files. ConfigError (strict): naming the missing, unmapped and mis-shaped keys.
    """
    args_path: Path | None = None
    if isinstance(source, Mapping):
        where = "reference bundle"
        bundle = bundle_parts(source, ("dual_encoder",), "VG-HuBERT", where)["dual_encoder"]
    else:
        bundle_path, args_path = resolve_bundle(source)
        where = str(bundle_path)
        bundle = read_reference_bundle(bundle_path, allow_pickle=allow_pickle)

    report = VGHuBERTConversion()
    extra: dict[str, Any] = {}
    if args_path is not None:
        if allow_pickle:
            extra, notes = config_from_reference_args(read_reference_args(args_path, allow_pickle=True))
            report.notes.extend(notes)
            report.config_source = "config + args.pkl"
        else:
            report.notes.append(f"{args_path} not read (a pickle; pass --allow-pickle to take the sizes from it)")
    cfg, name = _resolve_config(config, extra)
    if overrides:
        from vgskit.models.registry import merge_config

        cfg = merge_config(cfg, dict(overrides), where="VGHuBERTConfig")
    model = VGHuBERT(cfg)

    to_ours: dict[str, list[tuple[str, int | None]]] = {}
    for ours, (ref, chunk) in reference_key_names(model).items():
        to_ours.setdefault(ref, []).append((ours, chunk))
    kept_layers = model.num_layers
    ours_state = model.state_dict()
    converted: dict[str, Tensor] = {}
    misshaped: set[str] = set()
    for key, value in bundle.items():
        targets = to_ours.get(key)
        if targets is None:
            layer = _AUDIO_LAYER.match(key)
            if _UNUSED.match(key) or (layer and int(layer.group(1)) >= kept_layers):
                report.dropped.append(key)
            else:
                report.unmapped.append(key)
            continue
        for ours, chunk in targets:
            if chunk is not None:
                if value.shape[0] % 3:
                    report.mismatched.append(f"{key} -> {ours}: {tuple(value.shape)} is not three stacked "
                                             "query/key/value blocks")
                    misshaped.add(ours)
                    continue
                part = value.chunk(3, dim=0)[chunk]
            else:
                part = value
            if tuple(part.shape) != tuple(ours_state[ours].shape):
                what = f"{key}[{'qkv'[chunk]}]" if chunk is not None else key
                report.mismatched.append(f"{what} -> {ours}: {tuple(part.shape)} vs {tuple(ours_state[ours].shape)}")
                misshaped.add(ours)
                continue
            converted[ours] = part.clone()
    report.missing = sorted(set(ours_state) - set(converted) - misshaped)
    report.loaded = sorted(converted)
    report.unmapped.sort()
    report.dropped.sort()
    report.mismatched.sort()
    if strict and not report.complete:
        raise ConfigError(f"checkpoint {where}: does not fit the configured VG-HuBERT model: {_problems(report)}; "
                          "check the sizes (--config / --set, or args.pkl with --allow-pickle), or pass --partial")
    with torch.no_grad():
        model.load_state_dict(converted, strict=False)
    model.model_name = name or "vg_hubert"
    return model.eval(), report


def _problems(report: VGHuBERTConversion, limit: int = 20) -> str:
    parts = []
    for what, keys in (("missing (ours)", report.missing), ("unmapped (bundle)", report.unmapped),
                       ("mis-shaped", report.mismatched)):
        if keys:
            more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
            parts.append(f"{len(keys)} {what}: {keys[:limit]}{more}")
    return "; ".join(parts)
