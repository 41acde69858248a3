"""Released SpeechCLIP checkpoints → our model (``load_reference_checkpoint``, ``vgskit convert speechclip``), on a
reference-shaped state dict: the parallel branch from the golden reference case, the cascaded branch from a tiny
model, the keyword table as the reference stores it (text-tower rows in its own order), frozen-tower keys."""

from __future__ import annotations

import argparse
import json
import math
import sys
import types
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from _tiny_speechclip import CAPTIONS, Towers, make_towers, perturb, tiny_batch, tiny_config
from vgskit.cli import main
from vgskit.encoders.text import load_clip_tokenizer
from vgskit.errors import ConfigError, VGSKitError
from vgskit.experiment import load_model
from vgskit.extensions import converters
from vgskit.models.speechclip import SpeechCLIP, build_keyword_vocabulary
from vgskit.models.speechclip.convert import (
    UnpickledObject,
    convert_reference_checkpoint,
    load_reference_checkpoint,
    read_reference_checkpoint,
)
from vgskit.models.stand_in_pickle import stand_in_pickle_module

GOLDEN = Path(__file__).parent / "golden"


def _golden_parallel_sizes() -> dict:
    """The golden parallel branch's transformer sizes, as its case states them (its audio and CLIP widths
    are the tiny towers' own; checked in test_reference_checkpoint_gives_the_reference_outputs)."""
    meta = json.loads((GOLDEN / "speechclip_parallel_branch_transformer.json").read_text())
    ta = meta["constructor_args"]["config"]["model_settings"]["parallel_branch"]["transformer_args"]
    return {"num_layers": ta["n_layers"], "num_heads": ta["nhead"], "ffn_dim": ta["dim_feedforward"],
            "layer_norm_eps": ta["layer_norm_eps"]}


PARALLEL = _golden_parallel_sizes()
# Our cascaded-branch names -> the reference's (the inverse of convert_speechclip_state_dict).
TO_REFERENCE = (
    ("attention.attn.", "self_att.multihead_attn_layer."),
    ("attention.norm.", "self_att.attentionBlock_Norm."),
    ("batchnorm.bn.", "bn_layer.bn_layer."),
    ("proj.", "linear_proj."),
    ("vq.temperature", "vector_quantizer.curr_temp"),
    ("cls", "cls"),
)


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> Towers:
    return make_towers(tmp_path_factory)


@pytest.fixture(scope="module")
def vocab(towers: Towers) -> list[int]:
    return build_keyword_vocabulary(load_clip_tokenizer(str(towers.clip)), CAPTIONS)


@pytest.fixture(scope="module")
def order(towers: Towers, vocab: list[int]) -> list[int]:
    """The vocabulary in a reference-like row order: padding, "a", SOT, EOT first (frequency order)."""
    a = load_clip_tokenizer(str(towers.clip)).convert_tokens_to_ids("a</w>")
    head = [0, a, towers.vocab_size - 2, towers.vocab_size - 1]
    return head + [i for i in reversed(vocab) if i not in head]


@pytest.fixture(scope="module")
def source(towers: Towers, vocab: list[int]) -> SpeechCLIP:
    """The model whose cascaded branch goes into the reference state dict."""
    torch.manual_seed(11)
    model = SpeechCLIP(tiny_config(towers, "both", parallel=PARALLEL, keyword_vocab=vocab))
    perturb(model)
    with torch.no_grad():  # running statistics away from 0 / 1
        model.cascaded.batchnorm.bn.running_mean.normal_(0, 0.1)
        model.cascaded.batchnorm.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _golden_parallel() -> tuple[dict[str, Tensor], dict]:
    t = load_file(str(GOLDEN / "speechclip_parallel_branch_transformer.safetensors"))
    return t, json.loads((GOLDEN / "speechclip_parallel_branch_transformer.json").read_text())


def _to_reference(key: str) -> str:
    old, new = next((o, n) for o, n in TO_REFERENCE if key.startswith(o))
    return new + key[len(old):]


def reference_state_dict(source: SpeechCLIP, order: list[int], temperature: float | None = None) -> dict[str, Tensor]:
    """A ``KWClip_GeneralTransformer`` state dict with both branches, as the released checkpoints hold it."""
    t, _ = _golden_parallel()
    ref = {f"parallel_branch.{k[len('param.'):]}": v.clone() for k, v in t.items() if k.startswith("param.")}
    for key, value in source.state_dict().items():
        if key.startswith("cascaded."):
            ref[f"cascaded_branch.{_to_reference(key[len('cascaded.'):])}"] = value.clone()
    table = source.text_tower.token_embedding.weight[order].clone()  # the reduced table, reference row order
    ref["clip.model.token_embedding.weight"] = table
    ref["cascaded_branch.clip.model.token_embedding.weight"] = table
    for key in ("clip.model.positional_embedding", "cascaded_branch.clip.model.positional_embedding"):
        ref[key] = torch.zeros(24, 32)
    ref["clip.model.visual.conv1.weight"] = torch.zeros(32, 3, 8, 8)
    ref["audio_encoder.encoder.model.feature_extractor.conv_layers.0.0.weight"] = torch.zeros(16, 1, 10)
    ref["audio_encoder.weightedsum_layer.weights"] = source.layer_sum.weights.detach().clone()
    if temperature is not None:
        ref["criterion.temperature"] = torch.tensor(math.log(1 / temperature))
    return ref


def _section(towers: Towers, branches: str = "both", **overrides) -> dict:
    """A recipe-style model section (registry name + overrides) on the tiny towers, golden parallel sizes."""
    overrides["parallel"] = {**PARALLEL, **overrides.get("parallel", {})}
    return {"name": "speechclip_parallel_base", **asdict(tiny_config(towers, branches, **overrides))}


def test_reference_checkpoint_gives_the_reference_outputs(source, towers, order, vocab) -> None:
    ref = reference_state_dict(source, order)
    model, report = convert_reference_checkpoint(ref, _section(towers))
    assert isinstance(model, SpeechCLIP) and not model.training and model.model_name == "speechclip_parallel_base"

    # Parallel branch: the reference's own output on the golden inputs.
    t, meta = _golden_parallel()
    ctor = meta["constructor_args"]
    assert (model.parallel.config.audio_dim, model.parallel.config.out_dim) == (ctor["audio_dim"], ctor["out_dim"])
    with torch.no_grad():
        out = model.parallel(t[meta["call_args"]["audio_feat"]], t[meta["call_args"]["audio_len"]])
    rec = meta["tolerance"]["recommended"]
    torch.testing.assert_close(out, t["output.out"], rtol=rec["rtol"], atol=rec["atol"])
    torch.testing.assert_close(model.layer_sum.weights.detach(), ref["audio_encoder.weightedsum_layer.weights"])

    # Keyword vocabulary recovered from the table's rows, in the checkpoint's order; masked rows follow the ids.
    assert model.config.keyword_vocab == order and report.keyword_vocab == order
    assert report.keyword_vocab_source == "checkpoint" and sorted(order) == vocab
    assert [order[r] for r in model.config.cascaded.masked_ids] == [0, towers.vocab_size - 2, towers.vocab_size - 1]
    # Cascaded branch: the same keywords and embedding as the model the weights came from.
    b = tiny_batch(4)
    with torch.no_grad():
        ids, scores = model.keyword_ids(b["wavs"], b["lengths"], top_k=3)
        want_ids, want_scores = source.keyword_ids(b["wavs"], b["lengths"], top_k=3)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(scores, want_scores)
        torch.testing.assert_close(model.encode_speech(b["wavs"], b["lengths"], "cascaded"),
                                   source.encode_speech(b["wavs"], b["lengths"], "cascaded"))

    # The report: a fixed temperature is not in the reference state dict; the frozen towers are dropped.
    assert report.defaulted == ["loss.logit_scale"]
    assert float(model.loss.scale()) == pytest.approx(1 / 0.07)
    assert "parallel.proj.weight" in report.loaded and "cascaded.batchnorm.bn.running_var" in report.loaded
    assert set(report.dropped) == {k for k in ref if k.startswith(("clip.", "audio_encoder.", "cascaded_branch.clip."))
                                   } - {"audio_encoder.weightedsum_layer.weights"}
    # No table is kept in our state dict; the model saves and loads like any other.
    assert not any("token_embedding" in k for k in model.state_dict())


def test_learnable_temperature_and_a_lightning_dict(source, towers, order) -> None:
    ref = reference_state_dict(source, order, temperature=0.05)
    lightning = {"state_dict": ref, "hyper_parameters": {"config": {"lr": 1e-4}}, "epoch": 3}
    model = load_reference_checkpoint(lightning, _section(towers, learnable_temperature=True))
    assert float(model.loss.scale().detach()) == pytest.approx(20.0)
    with pytest.raises(ConfigError, match=r"lacks 1 trained tensor.*loss\.logit_scale"):
        load_reference_checkpoint({k: v for k, v in ref.items() if k != "criterion.temperature"},
                                  _section(towers, learnable_temperature=True))


def test_configured_keyword_vocab_is_checked(source, towers, order, vocab) -> None:
    ref = reference_state_dict(source, order)
    # The same subwords in sorted order (as built from captions): accepted, the checkpoint's order kept.
    model, report = convert_reference_checkpoint(ref, _section(towers, keyword_vocab=vocab))
    assert model.config.keyword_vocab == order and report.keyword_vocab_source == "config"
    # Other subwords: refused, naming the difference.
    absent = [i for i in range(towers.vocab_size) if i not in vocab][:2]
    other = sorted(set(vocab[:-3]) | set(absent))
    with pytest.raises(ConfigError, match=rf"keyword table holds {len(vocab)} subwords, the configured keyword_vocab "
                                          rf"{len(other)}; ids only in the config: \[{absent[0]}, {absent[1]}\]"):
        convert_reference_checkpoint(ref, _section(towers, keyword_vocab=other))
    # Rows of another CLIP: refused.
    foreign = dict(ref)
    foreign["cascaded_branch.clip.model.token_embedding.weight"] = torch.randn(len(order), 32)
    with pytest.raises(ConfigError, match="equal no token embedding of the text tower.*another CLIP"):
        convert_reference_checkpoint(foreign, _section(towers))
    # Without a table the configured vocabulary is taken as it is; with neither, there is no vocabulary.
    bare = {k: v for k, v in ref.items() if not k.endswith("token_embedding.weight")}
    model, report = convert_reference_checkpoint(bare, _section(towers, keyword_vocab=vocab))
    assert model.config.keyword_vocab == vocab and report.keyword_vocab_source == "config, unchecked"
    with pytest.raises(ConfigError, match="no keyword table"):
        convert_reference_checkpoint(bare, _section(towers))
    # vocab_from_captions is kept in the saved config but not applied (the checkpoint has the vocabulary).
    model = load_reference_checkpoint(ref, _section(towers, vocab_from_captions=True))
    assert model.config.vocab_from_captions and model.config.keyword_vocab == order


def test_key_and_size_problems_are_named(source, towers, order) -> None:
    ref = reference_state_dict(source, order)
    with pytest.raises(ConfigError, match=r"reference state dict: unexpected key 'parallel_branch\.mystery', "
                                          "which belongs to no module"):
        convert_reference_checkpoint({**ref, "parallel_branch.mystery": torch.zeros(1)}, _section(towers))
    with pytest.raises(ConfigError, match="trained the cascaded and parallel branch.*config has parallel; "
                                          "set branches: both"):
        convert_reference_checkpoint(ref, _section(towers, branches="parallel"))
    with pytest.raises(ConfigError, match=r"lacks 1 trained tensor\(s\) of the model: \['parallel\.proj\.weight'\]"):
        convert_reference_checkpoint({k: v for k, v in ref.items() if k != "parallel_branch.linear_proj.weight"},
                                     _section(towers))
    with pytest.raises(ConfigError, match="do not fit the configured sizes.*linear1"):
        convert_reference_checkpoint(ref, _section(towers, parallel={"ffn_dim": 32}))
    with pytest.raises(ConfigError, match="no parallel_branch.* or cascaded_branch.* keys"):
        convert_reference_checkpoint({"weights": torch.zeros(3)}, _section(towers))


def test_checkpoint_files(source, towers, order, tmp_path, monkeypatch) -> None:
    ref = reference_state_dict(source, order)
    # A bare state dict and a Lightning dict of plain values load with the safe loader.
    torch.save(ref, tmp_path / "state_dict.pt")
    torch.save({"state_dict": ref, "hyper_parameters": {"config": {"lr": 1e-4}}, "epoch": 3}, tmp_path / "plain.ckpt")
    for name in ("state_dict.pt", "plain.ckpt"):
        assert read_reference_checkpoint(tmp_path / name).keys() == ref.keys()
    save_file({k: v.clone().contiguous() for k, v in ref.items()}, str(tmp_path / "ref.safetensors"))
    assert read_reference_checkpoint(tmp_path / "ref.safetensors").keys() == ref.keys()

    # Released checkpoints pickle the reference code's config class, which is not installed here.
    module = types.ModuleType("reference_pkg_config")

    class OrderedNamespace(dict):
        pass

    OrderedNamespace.__module__, OrderedNamespace.__qualname__ = module.__name__, "OrderedNamespace"
    module.OrderedNamespace = OrderedNamespace
    monkeypatch.setitem(sys.modules, module.__name__, module)
    config = OrderedNamespace(model_settings={"cascaded_objective_weight": 1.0})
    config.trainer = {"max_steps": 50000}
    torch.save({"state_dict": ref, "hyper_parameters": {"config": config}}, tmp_path / "released.ckpt")
    monkeypatch.delitem(sys.modules, module.__name__)

    with pytest.raises(VGSKitError, match=r"released\.ckpt: holds pickled Python objects.*OrderedNamespace.*"
                                          r"--allow-pickle"):
        read_reference_checkpoint(tmp_path / "released.ckpt")
    assert read_reference_checkpoint(tmp_path / "released.ckpt", allow_pickle=True).keys() == ref.keys()
    held = torch.load(tmp_path / "released.ckpt", weights_only=False, pickle_module=stand_in_pickle_module())
    stand_in = held["hyper_parameters"]["config"]
    assert isinstance(stand_in, UnpickledObject) and stand_in["model_settings"]["cascaded_objective_weight"] == 1.0
    assert stand_in.origin == "reference_pkg_config.OrderedNamespace" and stand_in.state == {"trainer": {"max_steps": 50000}}

    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(VGSKitError, match=r"broken\.ckpt: torch\.load cannot read it"):
        read_reference_checkpoint(tmp_path / "broken.ckpt")
    with pytest.raises(VGSKitError, match=r"missing\.ckpt: file not found"):
        read_reference_checkpoint(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {"parallel_branch.cls": [1, 2]}}, tmp_path / "lists.ckpt")
    with pytest.raises(VGSKitError, match="not tensors"):
        read_reference_checkpoint(tmp_path / "lists.ckpt")


def _run_registered(argv: list[str]) -> int:
    """The registered ``speechclip`` converter on its own arguments, as the command line runs it."""
    converter = converters()["speechclip"]
    parser = argparse.ArgumentParser(prog="vgskit convert speechclip")
    converter.add_arguments(parser)
    return converter.run(parser.parse_args(argv))


def test_registered_converter(source, towers, order, tmp_path, capsys) -> None:
    ref = reference_state_dict(source, order)
    torch.save({"state_dict": ref}, tmp_path / "released.ckpt")
    (tmp_path / "config.json").write_text(json.dumps(_section(towers)))
    out = tmp_path / "converted"
    assert _run_registered([str(tmp_path / "released.ckpt"), "--config", str(tmp_path / "config.json"),
                            "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trained tensor(s) loaded into speechclip_parallel_base" in printed and printed.rstrip().endswith(str(out))
    assert load_model(out).config.keyword_vocab == order
    # Mistakes in the input are VGSKitErrors (the command line prints them), not exit codes.
    with pytest.raises(VGSKitError, match=r"--config .*missing\.yaml: file not found"):
        _run_registered([str(tmp_path / "released.ckpt"), "--config", str(tmp_path / "missing.yaml"),
                         "--out", str(tmp_path / "x")])
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(VGSKitError, match="expected a mapping of SpeechCLIP config values, got list"):
        _run_registered([str(tmp_path / "released.ckpt"), "--config", str(tmp_path / "list.json"),
                         "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", [["convert-speechclip"], ["convert", "speechclip"]])
def test_convert_cli(command, source, towers, order, tmp_path, capsys) -> None:
    ref = reference_state_dict(source, order)
    torch.save({"state_dict": ref, "epoch": 3}, tmp_path / "released.ckpt")
    (tmp_path / "config.json").write_text(json.dumps(_section(towers)))
    out = tmp_path / "converted"
    assert main([*command, str(tmp_path / "released.ckpt"), "--config", str(tmp_path / "config.json"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trained tensor(s) loaded into speechclip_parallel_base (branches: parallel, cascaded)" in printed
    assert "kept at their configured value: loss.logit_scale" in printed
    assert f"keyword vocabulary: {len(order)} subwords (ids from the checkpoint)" in printed
    assert printed.rstrip().endswith(str(out))

    saved = load_model(out)
    direct = load_reference_checkpoint(ref, _section(towers))
    assert saved.config.keyword_vocab == order
    b = tiny_batch(3)
    with torch.no_grad():
        for branch in ("parallel", "cascaded"):
            torch.testing.assert_close(saved.encode_speech(b["wavs"], b["lengths"], branch),
                                       direct.encode_speech(b["wavs"], b["lengths"], branch), rtol=0, atol=0)

    # A recipe file works as the config too; --set overrides apply to it, and problems exit with status 2.
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"model": _section(towers), "train": {"lr": 1e-4}}))
    assert main([*command, str(tmp_path / "released.ckpt"), "--config", str(tmp_path / "recipe.yaml"),
                 "--set", "parallel.ffn_dim=32", "--out", str(tmp_path / "bad")]) == 2
    assert "do not fit the configured sizes" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------------------
# Every key a released checkpoint holds
# ---------------------------------------------------------------------------------------------------------

# The state dict of the reference LightningModule ``KWClip_GeneralTransformer`` (avssl/model/kwClip.py) with both
# branches, listed by the module that registers each entry. Trained parts and buffers are listed key by key; the
# frozen towers by a few keys each (their full lists are the s3prl/fairseq HuBERT and OpenAI CLIP state dicts).
RELEASED_KEYS: tuple[tuple[str, str], ...] = (
    # KWClipBase.audio_encoder = S3prlSpeechEncoderPlus (avssl/module/speech_encoder_plus.py): the frozen s3prl
    # HuBERT upstream under "encoder." ...
    ("audio_encoder.encoder.model.feature_extractor.conv_layers.0.0.weight", "s3prl HuBERT (frozen)"),
    ("audio_encoder.encoder.model.post_extract_proj.weight", "s3prl HuBERT (frozen)"),
    ("audio_encoder.encoder.model.encoder.layers.0.self_attn.k_proj.weight", "s3prl HuBERT (frozen)"),
    ("audio_encoder.encoder.model.layer_norm.weight", "s3prl HuBERT (frozen)"),
    ("audio_encoder.encoder.model.mask_emb", "s3prl HuBERT (frozen)"),
    # ... and WeightedSumLayer.weights (avssl/module/weighted_sum.py), a Parameter.
    ("audio_encoder.weightedsum_layer.weights", "WeightedSumLayer"),
    # KWClipBase.clip = ClipModel (avssl/module/clip_official.py), the OpenAI CLIP model as ".model".
    ("clip.model.positional_embedding", "OpenAI CLIP (frozen)"),
    ("clip.model.text_projection", "OpenAI CLIP (frozen)"),
    ("clip.model.logit_scale", "OpenAI CLIP (frozen)"),
    ("clip.model.token_embedding.weight", "OpenAI CLIP (frozen; reduced vocabulary rows)"),
    ("clip.model.ln_final.weight", "OpenAI CLIP (frozen)"),
    ("clip.model.transformer.resblocks.0.attn.in_proj_weight", "OpenAI CLIP (frozen)"),
    ("clip.model.visual.conv1.weight", "OpenAI CLIP (frozen)"),
    # KWClipBase.criterion = MaskedContrastiveLoss (avssl/module/losses.py): the log-scale Parameter (only when
    # temperature_trainable; a fixed one is a float attribute) and three register_buffer masks over MAX_EYE = 256.
    ("criterion.temperature", "MaskedContrastiveLoss (trainable temperature)"),
    ("criterion.eye_mat", "MaskedContrastiveLoss buffer"),
    ("criterion.neg_eye_mat", "MaskedContrastiveLoss buffer"),
    ("criterion.eye_mat_fl", "MaskedContrastiveLoss buffer"),
    # KW_CascadedBranch (kwClip.py): cls Parameter; self_att = TransformerModels.MultiheadAttentionAndNorm
    # (avssl/module/kw_modules/TransformerModels.py); linear_proj = nn.Linear; vector_quantizer =
    # SimpleVectorQuantizer with a fixed temperature buffer (curr_temp); bn_layer = Kw_BatchNorm
    # (avssl/module/speechclip_c_modules/kw_bn.py, eachKw + parallel: one BatchNorm1d); and the shared ClipModel
    # again as ".clip".
    ("cascaded_branch.cls", "KW_CascadedBranch"),
    ("cascaded_branch.self_att.multihead_attn_layer.in_proj_weight", "MultiheadAttentionAndNorm"),
    ("cascaded_branch.self_att.multihead_attn_layer.in_proj_bias", "MultiheadAttentionAndNorm"),
    ("cascaded_branch.self_att.multihead_attn_layer.out_proj.weight", "MultiheadAttentionAndNorm"),
    ("cascaded_branch.self_att.multihead_attn_layer.out_proj.bias", "MultiheadAttentionAndNorm"),
    ("cascaded_branch.self_att.attentionBlock_Norm.weight", "MultiheadAttentionAndNorm"),
    ("cascaded_branch.self_att.attentionBlock_Norm.bias", "MultiheadAttentionAndNorm"),
    ("cascaded_branch.linear_proj.weight", "KW_CascadedBranch"),
    ("cascaded_branch.linear_proj.bias", "KW_CascadedBranch"),
    ("cascaded_branch.vector_quantizer.curr_temp", "SimpleVectorQuantizer buffer"),
    ("cascaded_branch.bn_layer.bn_layer.weight", "Kw_BatchNorm"),
    ("cascaded_branch.bn_layer.bn_layer.bias", "Kw_BatchNorm"),
    ("cascaded_branch.bn_layer.bn_layer.running_mean", "Kw_BatchNorm buffer"),
    ("cascaded_branch.bn_layer.bn_layer.running_var", "Kw_BatchNorm buffer"),
    ("cascaded_branch.bn_layer.bn_layer.num_batches_tracked", "Kw_BatchNorm buffer"),
    ("cascaded_branch.clip.model.token_embedding.weight", "the shared ClipModel (frozen)"),
    ("cascaded_branch.clip.model.positional_embedding", "the shared ClipModel (frozen)"),
    # KW_ParallelBranch (kwClip.py): cls Parameter; self_att = TransformerModels.TransformerEncoder (an
    # nn.TransformerEncoder as ".model" with a final norm); linear_proj = nn.Linear.
    ("parallel_branch.cls", "KW_ParallelBranch"),
    *((f"parallel_branch.self_att.model.layers.0.{name}", "nn.TransformerEncoderLayer") for name in (
        "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
        "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")),
    ("parallel_branch.self_att.model.norm.weight", "TransformerEncoder final norm"),
    ("parallel_branch.self_att.model.norm.bias", "TransformerEncoder final norm"),
    ("parallel_branch.linear_proj.weight", "KW_ParallelBranch"),
    ("parallel_branch.linear_proj.bias", "KW_ParallelBranch"),
)
LOSS_BUFFERS = ("criterion.eye_mat", "criterion.neg_eye_mat", "criterion.eye_mat_fl")


def released_state_dict(source: SpeechCLIP, order: list[int], *, learnable: bool) -> dict[str, Tensor]:
    """:func:`reference_state_dict` completed to every entry of :data:`RELEASED_KEYS` (fixed-temperature
    checkpoints have no ``criterion.temperature``)."""
    ref = reference_state_dict(source, order, temperature=0.05 if learnable else None)
    eye = torch.eye(256, dtype=torch.bool)
    ref.update({"criterion.eye_mat": eye, "criterion.neg_eye_mat": ~eye, "criterion.eye_mat_fl": eye.float()})
    for key, origin in RELEASED_KEYS:
        if key not in ref and "frozen" in origin:
            ref[key] = torch.zeros(2, 2)
    return ref


@pytest.mark.parametrize("learnable", [False, True])
def test_every_key_of_a_released_checkpoint_is_accepted(source, towers, order, learnable) -> None:
    ref = released_state_dict(source, order, learnable=learnable)
    expected = {k for k, _ in RELEASED_KEYS if learnable or k != "criterion.temperature"}
    assert expected <= set(ref)
    # Beyond the listed tower keys, the fixture holds only more keys of the frozen towers.
    assert all(k.startswith(("clip.", "cascaded_branch.clip.", "audio_encoder.")) for k in set(ref) - expected)

    model, report = convert_reference_checkpoint(ref, _section(towers, learnable_temperature=learnable))
    # The loss's mask buffers are dropped (reported), the temperature is kept.
    assert set(LOSS_BUFFERS) <= set(report.dropped)
    assert not any("eye_mat" in k for k in report.loaded) and not any("eye_mat" in k for k in model.state_dict())
    assert ("loss.logit_scale" in report.loaded) == learnable
    if learnable:
        assert float(model.loss.scale().detach()) == pytest.approx(20.0)
    # Every trained entry lands in the model, and nothing else is dropped besides the towers and the masks.
    assert set(report.dropped) == {k for k in ref if k.startswith(("clip.", "cascaded_branch.clip.", "audio_encoder."))
                                   and k != "audio_encoder.weightedsum_layer.weights"} | set(LOSS_BUFFERS)
    b = tiny_batch(3)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_speech(b["wavs"], b["lengths"], "cascaded"),
                                   source.encode_speech(b["wavs"], b["lengths"], "cascaded"))


def test_unknown_loss_keys_still_fail(source, towers, order) -> None:
    ref = released_state_dict(source, order, learnable=False)
    with pytest.raises(ConfigError, match=r"unexpected key 'criterion\.eye_mat_2', which belongs to no module"):
        convert_reference_checkpoint({**ref, "criterion.eye_mat_2": torch.zeros(2)}, _section(towers))
    with pytest.raises(ConfigError, match=r"unexpected key 'mystery\.weight'"):
        convert_reference_checkpoint({**ref, "mystery.weight": torch.zeros(2)}, _section(towers))


def test_checkpoint_with_the_keyword_projection_mlp(source, towers, order, vocab) -> None:
    """A pre-release cascaded-large checkpoint: the keyword projection is reference ``MLPLayers`` (Linear, ReLU,
    Dropout, Linear) under ``cascaded_branch.linear_proj.sequential.{0,3}.*``."""
    torch.manual_seed(12)
    mlp_source = SpeechCLIP(tiny_config(towers, "both", parallel=PARALLEL, keyword_vocab=vocab,
                                        cascaded={"projection_hidden_dims": [24]}))
    perturb(mlp_source)
    mlp_source.eval()
    ref = reference_state_dict(mlp_source, order)
    mlp_keys = {f"cascaded_branch.linear_proj.sequential.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")}
    assert {k for k in ref if k.startswith("cascaded_branch.linear_proj.")} == mlp_keys
    assert tuple(ref["cascaded_branch.linear_proj.sequential.0.weight"].shape) == (24, 32)
    assert tuple(ref["cascaded_branch.linear_proj.sequential.3.weight"].shape) == (32, 24)

    model, report = convert_reference_checkpoint(ref, _section(towers, cascaded={"projection_hidden_dims": [24]}))
    assert {f"cascaded.proj.sequential.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")} <= set(report.loaded)
    b = tiny_batch(3)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_speech(b["wavs"], b["lengths"], "cascaded"),
                                   mlp_source.encode_speech(b["wavs"], b["lengths"], "cascaded"))
    # Without the option the MLP has no place; with it, a released (single Linear) checkpoint lacks the MLP.
    with pytest.raises(ConfigError, match=r"projects the keywords with an MLP .*set cascaded\.projection_hidden_dims: "
                                          r"\[24\]"):
        convert_reference_checkpoint(ref, _section(towers))
    with pytest.raises(ConfigError, match=r"projects the keywords with one Linear .*projection_hidden_dims: \[\]"):
        convert_reference_checkpoint(reference_state_dict(source, order),
                                     _section(towers, cascaded={"projection_hidden_dims": [24]}))
    # A wrong hidden width is a size mismatch, named as such.
    with pytest.raises(ConfigError, match="do not fit the configured sizes"):
        convert_reference_checkpoint(ref, _section(towers, cascaded={"projection_hidden_dims": [16]}))
