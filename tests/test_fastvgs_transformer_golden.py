"""FaST-VGS transformer blocks vs the reference implementation's golden outputs.

Cases ``tests/golden/fastvgs_{bert_layer,lxmert_xlayer,cross_encoder}``: parameters go through the reference
key map, the module is built from the case's constructor arguments (every size, depth and epsilon comes from
the case, since the same cases exist in other shapes), runs in the case's mode on the stored inputs, and every
``output.*`` and ``grad.*`` must match within ``tolerance.recommended``. Gradients are those of
``(y * cotangent).sum()`` for tensor outputs and of the summed score for the cross encoder.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from _golden import case, section
from vgskit.errors import ConfigError
from vgskit.models.fast_vgs import (
    BertLayer,
    BertLayerConfig,
    CrossEncoder,
    CrossEncoderConfig,
    CrossLayer,
    additive_attention_mask,
    convert_reference_state_dict,
    load_reference_state_dict,
    reference_key_map,
)

_case, _section = case, section


def _training(name: str, meta: dict[str, Any]) -> bool:
    mode = meta["mode"].split()[0]
    assert mode in ("train", "eval"), meta["mode"]
    assert (mode == "train") == name.endswith("_train"), (name, meta["mode"])
    return mode == "train"


def _call_inputs(t: dict[str, Tensor], meta: dict[str, Any]) -> tuple[list[Tensor | None], dict[str, Tensor]]:
    """The case's call arguments in the reference's order (``null`` → None); inputs that have a stored
    gradient become leaves that require grad (returned by name as well)."""
    args: list[Tensor | None] = []
    leaves: dict[str, Tensor] = {}
    for spec in meta["call_args"].values():
        if spec is None:
            args.append(None)
            continue
        match = re.fullmatch(r"input\.(\w+)", spec)
        assert match is not None, spec
        name = match.group(1)
        value = t[f"input.{name}"].clone()
        if f"grad.{name}" in t:
            value.requires_grad_(True)
            leaves[name] = value
        args.append(value)
    return args, leaves


def _layer_config(meta: dict[str, Any], args: dict[str, Any]) -> BertLayerConfig:
    """The layer sizes of a case; a LayerNorm epsilon stated in its semantics wins (the reference code
    hard-codes its epsilon and ignores the config's ``layer_norm_eps``)."""
    config = BertLayerConfig.from_reference(args)
    stated = re.search(r"LayerNorm eps (\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", " ".join(meta.get("semantics", [])))
    if stated is not None:
        config = dataclasses.replace(config, layer_norm_eps=float(stated.group(1)))
    return config


def _build_bert_layer(meta: dict[str, Any]) -> nn.Module:
    return BertLayer(_layer_config(meta, meta["constructor_args"]["config"]))


def _build_cross_layer(meta: dict[str, Any]) -> nn.Module:
    return CrossLayer(_layer_config(meta, meta["constructor_args"]["config"]))


def _build_cross_encoder(meta: dict[str, Any]) -> nn.Module:
    args = meta["constructor_args"]["args"]
    config = CrossEncoderConfig.from_reference(args)
    return CrossEncoder(dataclasses.replace(config, layer=_layer_config(meta, args)))


def _run_bert_layer(
    module: nn.Module, args: list[Tensor | None], t: dict[str, Tensor]
) -> tuple[dict[str, Tensor], Tensor]:
    hidden_states, mask = args
    assert hidden_states is not None
    y = module(hidden_states, mask)  # the reference call
    with torch.no_grad():
        y_no_mask = module(hidden_states, None)  # how the visual stack calls it
    return {"y": y, "y_no_mask": y_no_mask}, (y * t["input.cotangent"]).sum()


def _run_cross_layer(
    module: nn.Module, args: list[Tensor | None], t: dict[str, Tensor]
) -> tuple[dict[str, Tensor], Tensor]:
    audio, audio_mask, visual, visual_mask = args
    audio_out, visn_out = module(audio, audio_mask, visual, visual_mask)
    loss = (audio_out * t["input.cotangent_audio"]).sum() + (visn_out * t["input.cotangent_visn"]).sum()
    return {"audio_out": audio_out, "visn_out": visn_out}, loss


def _run_cross_encoder(
    module: nn.Module, args: list[Tensor | None], t: dict[str, Tensor]
) -> tuple[dict[str, Tensor], Tensor]:
    audio, audio_mask, visual, visual_mask = args
    score = module(audio, audio_mask, visual, visual_mask)
    return {"score": score}, score.sum()


Builder = Callable[[dict[str, Any]], nn.Module]
Runner = Callable[[nn.Module, list[Tensor | None], dict[str, Tensor]], tuple[dict[str, Tensor], Tensor]]

CASES: dict[str, tuple[Builder, Runner]] = {
    "fastvgs_bert_layer": (_build_bert_layer, _run_bert_layer),
    "fastvgs_lxmert_xlayer": (_build_cross_layer, _run_cross_layer),
    "fastvgs_cross_encoder": (_build_cross_encoder, _run_cross_encoder),
}


def run_case(name: str) -> dict[str, tuple[Tensor, Tensor]]:
    """Run one case; returns ``{stored name: (ours, reference)}`` for every ``output.*`` and ``grad.*``."""
    t, meta = _case(name)
    build, run = CASES[name]
    module = load_reference_state_dict(build(meta), _section(t, "param."))
    module.train(_training(name, meta))
    args, leaves = _call_inputs(t, meta)
    outputs, loss = run(module, args, t)
    loss.backward()

    own_params = dict(module.named_parameters())
    ref_to_own = {ref: own for own, ref in reference_key_map(module).items()}
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    for key, expected in t.items():
        if key.startswith("output."):
            pairs[key] = (outputs[key[len("output.") :]].detach(), expected)
        elif key.startswith("grad."):
            target = key[len("grad.") :]
            if target in leaves:
                grad = leaves[target].grad
            else:  # a reference parameter's gradient
                grad = own_params[ref_to_own[target]].grad
            assert grad is not None, key
            pairs[key] = (grad, expected)
    assert set(pairs) == {k for k in t if k.startswith(("output.", "grad."))}, name
    return pairs


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_case(name: str) -> None:
    _, meta = _case(name)
    tol = meta["tolerance"]["recommended"]
    pairs = run_case(name)
    assert pairs, name
    for key, (ours, reference) in pairs.items():
        torch.testing.assert_close(ours, reference, rtol=tol["rtol"], atol=tol["atol"], msg=f"{name}: {key}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_stored_masks_are_the_additive_form(name: str) -> None:
    """The stored masks are what :func:`additive_attention_mask` builds from their keep pattern."""
    t, meta = _case(name)
    for spec in meta["call_args"].values():
        if spec is None or "mask" not in spec:
            continue
        stored = t[spec]
        keep = stored == 0
        torch.testing.assert_close(additive_attention_mask(keep[:, 0, 0, :]), stored, rtol=0, atol=0)


def test_different_key_sets_are_refused() -> None:
    t, meta = _case("fastvgs_lxmert_xlayer")
    params = _section(t, "param.")
    module = _build_cross_layer(meta)
    dropped = "visn_self_att.key.bias"
    bad = {k: v for k, v in params.items() if k != dropped}
    bad["visn_self_att.output.dense.weight"] = params["visual_attention.output.dense.weight"]
    with pytest.raises(ConfigError) as err:
        load_reference_state_dict(module, bad)
    message = str(err.value)
    assert dropped in message and "visn_self_att.output.dense.weight" in message
    assert "missing" in message and "unexpected" in message

    # A cross layer's keys do not fit a BERT layer, nor the reverse.
    with pytest.raises(ConfigError, match="attention.self.query.weight"):
        convert_reference_state_dict(
            BertLayer(BertLayerConfig.from_reference(meta["constructor_args"]["config"])), params
        )
    bert_t, bert_meta = _case("fastvgs_bert_layer")
    with pytest.raises(ConfigError, match="visual_attention.att.query.weight"):
        convert_reference_state_dict(_build_cross_layer(bert_meta), _section(bert_t, "param."))


def test_cross_encoder_map_covers_every_layer() -> None:
    t, meta = _case("fastvgs_cross_encoder")
    module = _build_cross_encoder(meta)
    assert sorted(reference_key_map(module).values()) == sorted(_section(t, "param."))
    # One layer fewer than the checkpoint holds: the extra layer's keys are named as unexpected.
    config = CrossEncoderConfig.from_reference(meta["constructor_args"]["args"])
    smaller = CrossEncoder(CrossEncoderConfig(layer=config.layer, num_layers=config.num_layers - 1))
    last = config.num_layers - 1
    with pytest.raises(ConfigError, match=rf"xtrm\.{last}\.visual_attention\.att\.query\.weight"):
        load_reference_state_dict(smaller, _section(t, "param."))


def test_config_reads_reference_names() -> None:
    _, meta = _case("fastvgs_bert_layer")
    ref = meta["constructor_args"]["config"]
    config = BertLayerConfig.from_reference(ref)
    assert config.hidden_size == ref["hidden_size"]
    assert config.num_heads == ref["num_attention_heads"]
    assert config.ffn_dim == ref["intermediate_size"]
    assert config.activation == ref["hidden_act"]
    # The reference hard-codes its LayerNorm epsilon: a config entry must not change it.
    assert BertLayerConfig.from_reference({**ref, "layer_norm_eps": 1e-5}).layer_norm_eps == 1e-12
    with pytest.raises(ValueError, match="multiple"):
        BertLayerConfig(hidden_size=10, num_heads=4)
