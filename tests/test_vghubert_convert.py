"""``vgskit convert vg_hubert``: reference-shaped bundles (tiny sizes) back into identical models, and every key that
does not fit named.

The bundles are assembled from a tiny model under the reference's ``dual_encoder`` names (read from
``jasonppy/word-discovery``: ``audio_encoder.*`` in fairseq's layout with ``pos_conv`` at its top level, the DINO
ViT as ``trm.*`` with a fused ``qkv``, and the two ``*_cls_token_proj`` MLPs)."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import pytest
import torch

from test_vghubert_model import random_batch, save_tiny_towers, tiny_vghubert
from vgskit.cli import main
from vgskit.errors import ConfigError, VGSKitError
from vgskit.experiment import load_model
from vgskit.models.vg_hubert import VGHuBERT
from vgskit.models.vg_hubert.convert import (
    config_from_reference_args,
    convert_reference_bundle,
    export_reference_state_dict,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run on one CPU thread: the tensors are tiny, and several threads only add start-up and oversubscription costs
    (which dominate when other processes share the cores); the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_tiny_towers(tmp_path_factory.mktemp("vghubert_convert_towers"))


def perturbed(towers: tuple[Path, Path]) -> VGHuBERT:
    """A tiny model moved away from its initial and pretrained values, so a tensor that was not converted shows."""
    model = tiny_vghubert(towers, seed=1).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def expected_reference_keys() -> set[str]:
    """The reference's dual_encoder names for the tiny sizes (2 kept HuBERT layers, 4 bias-free convolutions with a
    GroupNorm in the first, 1 ViT block)."""
    keys = {"audio_encoder.cls_token", "audio_encoder.layer_norm.weight", "audio_encoder.layer_norm.bias",
            "audio_encoder.post_extract_proj.weight", "audio_encoder.post_extract_proj.bias",
            "audio_encoder.pos_conv.0.weight_g", "audio_encoder.pos_conv.0.weight_v", "audio_encoder.pos_conv.0.bias",
            "audio_encoder.encoder.layer_norm.weight", "audio_encoder.encoder.layer_norm.bias",
            "audio_encoder.feature_extractor.conv_layers.0.2.weight",
            "audio_encoder.feature_extractor.conv_layers.0.2.bias",
            "trm.cls_token", "trm.pos_embed", "trm.patch_embed.proj.weight", "trm.patch_embed.proj.bias",
            "trm.norm.weight", "trm.norm.bias"}
    keys |= {f"audio_encoder.feature_extractor.conv_layers.{i}.0.weight" for i in range(4)}
    for n in range(2):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"):
            keys |= {f"audio_encoder.encoder.layers.{n}.{part}.{leaf}" for leaf in ("weight", "bias")}
    for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
        keys |= {f"trm.blocks.0.{part}.{leaf}" for leaf in ("weight", "bias")}
    for head in ("audio_cls_token_proj", "visual_cls_token_proj"):
        keys |= {f"{head}.{i}.{leaf}" for i in (0, 2) for leaf in ("weight", "bias")}
    return keys


def test_reference_names_and_fused_qkv(towers) -> None:
    model = perturbed(towers)
    ref = export_reference_state_dict(model)
    assert set(ref) == expected_reference_keys()
    state = {k[len("image_tower.model."):]: v for k, v in model.state_dict().items()
             if k.startswith("image_tower.model.")}
    # transformers 5 names the projections layers.0.attention.q_proj; 4.x encoder.layer.0.attention.attention.query.
    q, k, v = ([state[n] for n in state if n.endswith(f"{new}.weight") or n.endswith(f"attention.{old}.weight")][0]
               for new, old in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")))
    qkv = ref["trm.blocks.0.attn.qkv.weight"]
    assert qkv.shape == (72, 24)  # query, key, value rows stacked
    assert torch.equal(qkv[:24], q) and torch.equal(qkv[24:48], k) and torch.equal(qkv[48:], v)
    assert torch.equal(ref["audio_encoder.cls_token"], model.speech_tower.cls_tokens)
    assert torch.equal(ref["audio_cls_token_proj.2.weight"], model.audio_proj[2].weight)


def test_bundle_converts_back_to_identical_embeddings(towers, tmp_path: Path) -> None:
    model = perturbed(towers)
    ref = export_reference_state_dict(model)
    # What a released bundle also holds: HuBERT pre-training leftovers, the unused feat_loss heads, a layer beyond
    # the kept ones, all under a DataParallel prefix.
    ref["audio_encoder.mask_emb"] = torch.zeros(32)
    ref["audio_feats_proj.0.weight"] = torch.zeros(4, 32)
    ref["audio_encoder.encoder.layers.5.fc1.weight"] = torch.zeros(64, 32)
    bundle = {"dual_encoder": {"module." + k: v for k, v in ref.items()}, "optimizer": {"state": {}}}
    # The released bundles were re-saved in the legacy (non-zip) format (run_places.py of the reference).
    torch.save(bundle, tmp_path / "best_bundle.pth", _use_new_zipfile_serialization=False)
    overrides = {"speech": {"name_or_path": str(towers[0])}, "image": {"name_or_path": str(towers[1])}}
    converted, report = convert_reference_bundle(tmp_path, "vg_hubert_tiny", overrides=overrides)
    assert report.complete and report.dropped == sorted(
        ["audio_encoder.mask_emb", "audio_feats_proj.0.weight", "audio_encoder.encoder.layers.5.fc1.weight"])
    batch = random_batch()
    with torch.no_grad():
        assert torch.equal(converted.encode_speech(batch.speech.values, batch.speech.lengths),
                           model.encode_speech(batch.speech.values, batch.speech.lengths))
        assert torch.equal(converted.encode_image(batch.image.pixels), model.encode_image(batch.image.pixels))
        a = converted.cls_attention(batch.speech.values, batch.speech.lengths, 1).weights
        assert torch.equal(a, model.cls_attention(batch.speech.values, batch.speech.lengths, 1).weights)


def test_every_key_that_does_not_fit_is_named(towers, tmp_path: Path) -> None:
    ref = export_reference_state_dict(perturbed(towers))
    del ref["trm.norm.bias"]
    ref["trm.blocks.0.attn.qkv.weight"] = ref["trm.blocks.0.attn.qkv.weight"][:, :20]
    ref["visual_cls_token_proj.4.weight"] = torch.zeros(2, 2)
    overrides = {"speech": {"name_or_path": str(towers[0])}, "image": {"name_or_path": str(towers[1])}}
    with pytest.raises(ConfigError) as err:
        convert_reference_bundle({"dual_encoder": ref}, "vg_hubert_tiny", overrides=overrides)
    message = str(err.value)
    for name in ("image_tower.model.layernorm.bias", "visual_cls_token_proj.4.weight",
                 "trm.blocks.0.attn.qkv.weight[q] -> image_tower.model."):
        assert name in message, name
    _, report = convert_reference_bundle({"dual_encoder": ref}, "vg_hubert_tiny", overrides=overrides, strict=False)
    assert report.missing == ["image_tower.model.layernorm.bias"]
    assert report.unmapped == ["visual_cls_token_proj.4.weight"]
    assert len(report.mismatched) == 3  # query, key and value of the cut qkv


def test_args_pkl_needs_allow_pickle_and_sets_the_sizes(towers, tmp_path: Path) -> None:
    ref = export_reference_state_dict(perturbed(towers))
    torch.save({"dual_encoder": ref}, tmp_path / "best_bundle.pth")
    args = argparse.Namespace(layer_use=1, random_init_last_x=1, common_embed_dim=16, encoder_embed_dim=16,
                              margin=1.0, vit_arch="vitsmall", vit_patch_size=8, cls_loss=True)
    with open(tmp_path / "args.pkl", "wb") as f:
        pickle.dump(args, f)
    overrides = {"speech": {"name_or_path": str(towers[0])}, "image": {"name_or_path": str(towers[1])}}
    _, report = convert_reference_bundle(tmp_path, "vg_hubert_tiny", overrides=overrides)
    assert any("args.pkl not read" in n for n in report.notes)
    read, _ = config_from_reference_args(vars(args))
    assert read == {"speech": {"num_layers": 2, "reinit_last": 1}, "embed_dim": 16, "proj_hidden": 32, "margin": 1.0,
                    "image": {"name_or_path": "dino-vits8"}}
    model, report = convert_reference_bundle(tmp_path, "vg_hubert_tiny", overrides=overrides, allow_pickle=True)
    assert report.config_source == "config + args.pkl" and report.complete
    assert model.config.proj_hidden == 32


def test_convert_cli(towers, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = perturbed(towers)
    torch.save({"dual_encoder": export_reference_state_dict(model)}, tmp_path / "best_bundle.pth")
    sets = ["--set", f"speech.name_or_path={towers[0]}", "--set", f"image.name_or_path={towers[1]}"]
    out = tmp_path / "converted"
    assert main(["convert", "vg_hubert", str(tmp_path / "best_bundle.pth"), "--config", "vg_hubert_tiny",
                 "--out", str(out), *sets]) == 0
    assert "tensor(s) loaded into vg_hubert_tiny" in capsys.readouterr().out
    loaded = load_model(out)
    batch = random_batch()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(batch.image.pixels), model.encode_image(batch.image.pixels))
    # A file that is not a bundle: one line naming it.
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    assert main(["convert", "vg_hubert", str(junk), "--config", "vg_hubert_tiny", "--out", str(tmp_path / "x"),
                 *sets]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vgskit: error:")]
    assert len(errors) == 1 and str(junk) in errors[0] and "torch.load cannot read it" in errors[0]


def test_an_mae_tower_has_no_reference_bundle(towers) -> None:
    from vgskit.models.vg_hubert.convert import reference_key_names

    model = tiny_vghubert(towers)
    model.image_tower.family = "vit_mae"  # what an MAE tower reports
    with pytest.raises(ConfigError, match="DINO ViT"):
        reference_key_names(model)
    with pytest.raises(VGSKitError, match="file not found"):
        convert_reference_bundle("/nonexistent/best_bundle.pth", "vg_hubert_tiny")
