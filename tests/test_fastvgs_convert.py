"""Converting FaST-VGS-Family's ``best_bundle.pth`` into a vgskit ``fast_vgs`` model.

Bundles are assembled in the reference's layout: the golden cases' reference-named parameters under the
reference's top-level module names (``trm2``, ``trm.{i}``, ``visn_fc``, ``conv2``, ``xtrm``/``fc``), random
tensors for every other tensor. The converted model's blocks must then reproduce the golden outputs, which
checks the whole path from a reference key to the block that uses it.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from _golden import case, section
from vgskit.contract import SpeechInputs
from vgskit.errors import ConfigError, VGSKitError
from vgskit.models import load_pretrained
from vgskit.models.fast_vgs import FastVGS, additive_attention_mask
from vgskit.models.fast_vgs.convert import (
    convert_reference_bundle,
    read_reference_args,
    reference_key_names,
)


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random wav2vec2 (hidden 32, 2 layers) saved as a local tower folder."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from _tiny_speechclip import SPEECH

    folder = tmp_path_factory.mktemp("tiny_wav2vec2")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Wav2Vec2Model(Wav2Vec2Config(**SPEECH)).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(folder)
    return str(folder)


def _config(tower: str, hidden: int, heads: int, ffn: int, **extra: Any) -> dict[str, Any]:
    return {"name": "fast_vgs_tiny", "speech": {"name_or_path": tower},
            "layer": {"hidden_size": hidden, "num_heads": heads, "ffn_dim": ffn},
            "resdavenet_widths": (16, 16, 16, 32, hidden), **extra}


def _random_like(value: Tensor, g: torch.Generator) -> Tensor:
    if not value.is_floating_point():
        return torch.zeros_like(value)
    return torch.rand(value.shape, generator=g) + 0.5  # positive: also valid BatchNorm running variances


def _bundle(config: dict[str, Any], golden: dict[str, dict[str, Tensor]]) -> dict[str, Any]:
    """A reference-shaped bundle for ``config``: random tensors under the reference names, then ``golden``
    (``{"dual_encoder.trm2.": params, ...}``) on top, plus the reference-only entries a real bundle carries."""
    from vgskit.models.registry import model_config

    overrides = {k: v for k, v in config.items() if k != "name"}
    model = FastVGS(model_config(config["name"], **overrides))
    g = torch.Generator().manual_seed(1)
    state = model.state_dict()
    parts: dict[str, dict[str, Tensor]] = {"dual_encoder": {}, "cross_encoder": {}}
    for ours, ref in reference_key_names(model).items():
        part, _, key = ref.partition(".")
        parts[part][key] = _random_like(state[ours], g)
    for prefix, params in golden.items():
        part, _, inner = prefix.partition(".")
        for key, value in params.items():
            assert inner + key in parts[part], f"golden {prefix}{key} is not a reference name of the model"
            parts[part][inner + key] = value
    hidden = config["layer"]["hidden_size"]
    parts["dual_encoder"]["audio_cls_token_proj_coarse.0.weight"] = torch.zeros(2 * hidden, 32)
    parts["dual_encoder"]["conv1_trm1_trm3.mask_emb"] = torch.zeros(32)
    parts["dual_encoder"]["conv1_trm1_trm3.encoder.layers.7.fc1.weight"] = torch.zeros(64, 32)
    return {"dual_encoder": {f"module.{k}": v for k, v in parts["dual_encoder"].items()},
            "cross_encoder": parts["cross_encoder"], "optimizer": {"state": {}, "param_groups": []}, "epoch": 3}


def _close(actual: Tensor, expected: Tensor, meta: dict[str, Any]) -> None:
    tol = meta["tolerance"]["recommended"]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"])


def test_bert_layers_and_region_encoder_reproduce_the_golden_outputs(tower: str) -> None:
    bert, bert_meta = case("fastvgs_bert_layer")
    regions, regions_meta = case("fastvgs_visual_feat_encoder")
    cfg_bert = bert_meta["constructor_args"]["config"]
    cfg_regions = regions_meta["constructor_args"]["config"]
    config = _config(tower, cfg_bert["hidden_size"], cfg_bert["num_attention_heads"], cfg_bert["intermediate_size"],
                     region_feat_dim=cfg_regions["visual_feat_dim"], box_dim=cfg_regions["visual_pos_dim"])
    params = section(bert, "param.")
    bundle = _bundle(config, {"dual_encoder.trm2.": params, "dual_encoder.trm.0.": params,
                              "dual_encoder.trm.1.": params, "dual_encoder.visn_fc.": section(regions, "param.")})
    model, report = convert_reference_bundle(bundle, config)
    assert report.complete and report.loaded == sorted(model.state_dict())
    assert report.dropped == ["dual_encoder.audio_cls_token_proj_coarse.0.weight",
                              "dual_encoder.conv1_trm1_trm3.encoder.layers.7.fc1.weight",
                              "dual_encoder.conv1_trm1_trm3.mask_emb"]
    x, mask = bert["input.hidden_states"], bert["input.extended_attention_mask"]
    with torch.no_grad():
        for layer in (model.audio_layers[0], *model.visual_layers):
            _close(layer(x, mask), bert["output.y"], bert_meta)
        _close(model.region_encoder(regions["input.feats"], regions["input.boxes"]), regions["output.y"], regions_meta)


def test_cross_encoder_reproduces_the_golden_score(tower: str) -> None:
    t, meta = case("fastvgs_cross_encoder")
    args = meta["constructor_args"]["args"]
    config = _config(tower, args["hidden_size"], args["num_attention_heads"], args["intermediate_size"],
                     cross_layers=args["xtrm_layers"])
    model, report = convert_reference_bundle(_bundle(config, {"cross_encoder.": section(t, "param.")}), config)
    assert report.complete
    with torch.no_grad():
        score = model.cross_encoder(t["input.audio_feats"], t["input.audio_attention_mask"], t["input.visual_feats"])
    _close(score, t["output.score"], meta)


def test_resdavenet_reproduces_the_golden_output(tower: str) -> None:
    t, meta = case("fastvgs_resdavenet_tiny_eval")
    args = meta["constructor_args"]
    widths = tuple(args["layer_widths"])
    config = _config(tower, widths[-1], 2, 2 * widths[-1], resdavenet_widths=widths,
                     resdavenet_blocks=tuple(args["layers"]))
    model, report = convert_reference_bundle(_bundle(config, {"dual_encoder.conv2.": section(t, "param.")}), config)
    assert report.complete
    with torch.no_grad():
        _close(model.resdavenet(t["input.x"]), t["output.y"], meta)


def test_the_tower_and_the_top_level_names_are_the_reference_ones(tower: str) -> None:
    config = _config(tower, 32, 4, 64)
    bundle = _bundle(config, {})
    dual = {k.removeprefix("module."): v for k, v in bundle["dual_encoder"].items()}
    # Names read from the reference's DualEncoder / CrossEncoder / fairseq wav2vec2 (not derived here).
    for key in ("conv1_trm1_trm3.cls_token", "conv1_trm1_trm3.feature_extractor.conv_layers.0.0.weight",
                "conv1_trm1_trm3.feature_extractor.conv_layers.0.2.weight", "conv1_trm1_trm3.layer_norm.weight",
                "conv1_trm1_trm3.post_extract_proj.weight", "conv1_trm1_trm3.encoder.pos_conv.0.weight_g",
                "conv1_trm1_trm3.encoder.pos_conv.0.weight_v", "conv1_trm1_trm3.encoder.layer_norm.bias",
                "conv1_trm1_trm3.encoder.layers.1.self_attn.q_proj.weight",
                "conv1_trm1_trm3.encoder.layers.1.self_attn_layer_norm.weight",
                "conv1_trm1_trm3.encoder.layers.1.fc2.bias", "conv1_trm1_trm3.encoder.layers.1.final_layer_norm.bias",
                "conv2.linear.weight", "conv2.layer4.0.downsample.1.running_var", "audio_cls_token_proj_pre.2.bias",
                "trm2.attention.self.query.weight", "trm2_proj.weight", "visn_fc.box_layer_norm.weight",
                "visual_cls_token", "trm.1.output.LayerNorm.bias", "visual_cls_token_proj_coarse.2.weight"):
        assert key in dual, key
    assert {"xtrm.1.visual_attention.att.key.weight", "fc.2.bias"} <= set(bundle["cross_encoder"])
    model, report = convert_reference_bundle(bundle, config)
    assert report.complete
    tower_q = "conv1_trm1_trm3.encoder.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(model.speech_tower.model.encoder.layers[1].attention.q_proj.weight, dual[tower_q])
    torch.testing.assert_close(model.speech_tower.cls_tokens, dual["conv1_trm1_trm3.cls_token"])
    with torch.no_grad():  # the converted model runs end to end
        out = model.embed_speech(SpeechInputs.waveform(torch.randn(2, 8000), torch.tensor([8000, 6000]), 16000))
    assert out.pooled.shape == (2, 32)


def test_missing_extra_and_misshaped_keys_are_named(tower: str) -> None:
    config = _config(tower, 32, 4, 64)
    bundle = _bundle(config, {})
    del bundle["dual_encoder"]["module.trm2_proj.weight"]
    bundle["dual_encoder"]["module.trm2_extra.weight"] = torch.zeros(3)
    bundle["cross_encoder"]["fc.2.bias"] = torch.zeros(2)
    with pytest.raises(ConfigError) as err:
        convert_reference_bundle(bundle, config)
    for name in ("audio_proj.weight", "dual_encoder.trm2_extra.weight", "cross_encoder.fc.2.bias"):
        assert name in str(err.value)
    _, report = convert_reference_bundle(bundle, config, strict=False)
    assert report.missing == ["audio_proj.weight"]
    assert report.unmapped == ["dual_encoder.trm2_extra.weight"]
    assert report.mismatched == ["cross_encoder.fc.2.bias -> cross_encoder.score_head.2.bias: (2,) vs (1,)"]


def _pickled_args(path: Path, **values: Any) -> None:
    """An ``args.pkl`` as the reference writes it, holding an object of a class that is not installed."""
    stub = types.ModuleType("fastvgs_reference_stub")

    class Tokenizer:
        pass

    Tokenizer.__module__ = stub.__name__
    Tokenizer.__qualname__ = "Tokenizer"
    stub.Tokenizer = Tokenizer  # type: ignore[attr-defined]
    sys.modules[stub.__name__] = stub
    try:
        path.write_bytes(pickle.dumps(argparse.Namespace(tokenizer=Tokenizer(), **values)))
    finally:
        del sys.modules[stub.__name__]


def test_args_pkl_needs_the_flag_and_then_sets_the_sizes(tower: str, tmp_path: Path) -> None:
    config = _config(tower, 32, 4, 64, visual_layers=3)
    torch.save(_bundle(config, {}), tmp_path / "best_bundle.pth")
    _pickled_args(tmp_path / "args.pkl", hidden_size=32, num_attention_heads=4, intermediate_size=64,
                  trm_layers=3, xtrm_layers=2, layer_use=1, visual_feat_dim=2048, visual_pos_dim=4)
    with pytest.raises(VGSKitError, match=r"args\.pkl.*--allow-pickle"):
        read_reference_args(tmp_path / "args.pkl")
    base = _config(tower, 32, 2, 16)  # wrong sizes: only args.pkl can fix them
    with pytest.raises(ConfigError, match=r"dual_encoder\.trm\.2\."):
        convert_reference_bundle(tmp_path, base)
    model, report = convert_reference_bundle(tmp_path, base, allow_pickle=True)
    assert report.complete and report.config_source == "config + args.pkl"
    assert model.config.visual_layers == 3 and model.config.layer.num_heads == 4 and model.config.layer.ffn_dim == 64
    assert model.config.speech.num_layers == 2  # layer_use + 1


def test_cli_writes_a_model_folder_that_loads(tower: str, tmp_path: Path) -> None:
    from vgskit.cli import main

    config = _config(tower, 32, 4, 64)
    bundle = _bundle(config, {})
    torch.save(bundle, tmp_path / "best_bundle.pth")
    (tmp_path / "args.pkl").write_bytes(pickle.dumps(argparse.Namespace(hidden_size=32)))
    out = tmp_path / "converted"
    rc = main(["convert", "fast_vgs", str(tmp_path / "best_bundle.pth"), "--config", "fast_vgs_tiny",
               "--set", f"speech.name_or_path={tower}", "--set", "layer.num_heads=4", "--set", "layer.ffn_dim=64",
               "--out", str(out)])
    assert rc == 0
    loaded = load_pretrained(out)
    assert isinstance(loaded, FastVGS)
    torch.testing.assert_close(loaded.visual_cls, bundle["dual_encoder"]["module.visual_cls_token"])
    torch.testing.assert_close(loaded.cross_encoder.score_head[0].weight, bundle["cross_encoder"]["fc.0.weight"])
    mask = additive_attention_mask(torch.ones(1, 3, dtype=torch.bool))
    with torch.no_grad():
        assert loaded.visual_layers[0](torch.randn(1, 3, 32), mask).shape == (1, 3, 32)
