"""The VG-HuBERT recipes hold the reference's and the SG-MIM paper's settings.

Every expected value below is written out from the word-discovery reference code (``scripts/training.sh``,
``steps/trainer.py``, ``datasets/spokencoco_dataset.py``) or the SG-MIM paper (Woo et al., ICASSP 2024, §3.2), not
read from the recipes, so a recipe edited away from its source fails here.
"""

from __future__ import annotations

import pytest

from vgskit.data.augment import RandAugmentConfig
from vgskit.experiment import RECIPE_DIR, data_config_from, load_experiment
from vgskit.models.registry import list_models, model_config
from vgskit.models.vg_hubert import VGHuBERTConfig
from vgskit.train.config import TrainConfig, config_from_dict

# Shared by every corpus: reference --lr 0.00005 --warmup_fraction 0.1, BertAdam (defaults eps 1e-6, weight decay
# 0.01), gradient norm clipped to 1; best checkpoint by mean R@1.
COMMON_TRAIN = {
    "optimizer": "bertadam",
    "schedule": "bert_warmup_linear",
    "lr": 5e-5,
    "warmup_fraction": 0.1,
    "warmup_steps": None,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "eps": 1e-6,
    "select_metric": "val/mean_R@1",
}

# recipe -> (corpus, batch size, epochs): SpokenCOCO from the reference's training.sh (and SG-MIM §3.2); Places and
# FACC from SG-MIM §3.2 ("30 epochs with a batch size of 80 for Places Audio, and 20 epochs with a batch size of 100
# for FACC").
SETTINGS = {
    "vg_hubert_spokencoco": ("spokencoco", 100, 30),
    "vg_hubert_places": ("places", 80, 30),
    "vg_hubert_flickr8k": ("flickr8k", 100, 20),
}


def _resolved(name: str):
    exp = load_experiment(name)
    model_d = dict(exp["model"])
    model_name = model_d.pop("name")
    return (exp, model_name, model_config(model_name, **model_d), data_config_from(exp["data"]),
            config_from_dict(TrainConfig, exp["train"], prefix="train"))


def test_every_vg_hubert_recipe_is_in_the_table() -> None:
    # vg_hubert_scenes (the embedded corpus, towers from scratch) is checked by the test at the end.
    assert {p.stem for p in RECIPE_DIR.glob("vg_hubert*.yaml")} - {"vg_hubert_scenes"} == set(SETTINGS)
    assert (RECIPE_DIR / "_vg_hubert_common.yaml").is_file()


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_recipe_holds_the_reference_settings(name: str) -> None:
    corpus, batch, epochs = SETTINGS[name]
    exp, model_name, mcfg, data, train = _resolved(name)

    assert model_name == "vg_hubert" and model_name in list_models()
    assert isinstance(mcfg, VGHuBERTConfig)
    # --encoder_layers 12 --layer_use 11, last 3 re-initialised (VG-HuBERT_3), --feature_grad_mult 0 (CNN frozen),
    # waveforms not normalised, DINO ViT-S/8 (--vit_arch vitsmall --vit_patch_size 8) fine-tuned, common_embed_dim
    # 2048, margin 1.
    assert (mcfg.speech.num_layers, mcfg.speech.reinit_last, mcfg.speech.freeze_cnn) == (12, 3, True)
    assert mcfg.speech.cls_position == "after_pos_conv" and mcfg.speech.normalize_waveform is False
    assert (mcfg.image.name_or_path, mcfg.image.freeze, mcfg.embed_dim, mcfg.margin) == ("dino-vits8", False, 2048, 1.0)

    assert data.corpus == corpus
    assert data.train_crop == "head"
    assert data.train_max_seconds == pytest.approx(8.0)  # --audio_feat_len 8
    assert data.eval_max_seconds == pytest.approx(10.0)  # val_audio_feat_len 10
    assert data.captions_per_image == 1
    # Train-time crop (RandomResizedCrop + flip) and RandAugment (SG-MIM §3.2); evaluation is not augmented.
    aug = data.train_augment
    assert aug.kind == "crop_flip" and aug.flip and aug.scale == (0.08, 1.0)
    assert aug.randaugment == RandAugmentConfig(num_ops=2, magnitude=9, num_magnitude_bins=31)

    for key, want in COMMON_TRAIN.items():
        got = getattr(train, key)
        assert got == (pytest.approx(want) if isinstance(want, float) else want), f"train.{key}: {got!r}"
    assert (train.batch_size, train.epochs, train.max_steps) == (batch, epochs, None)
    # Every value is written in the recipes, not left to a default that might change.
    for key in ("optimizer", "schedule", "lr", "warmup_fraction", "weight_decay", "grad_clip", "eps",
                "batch_size", "epochs"):
        assert key in exp["train"], f"train.{key} missing"
    assert "margin" in exp["model"]


def test_every_recipe_value_names_its_source() -> None:
    for path in [RECIPE_DIR / "_vg_hubert_common.yaml", *(RECIPE_DIR / f"{n}.yaml" for n in SETTINGS)]:
        for line in path.read_text().splitlines():
            body = line.split("#", 1)[0].strip()
            if body and not body.endswith(":") and not body.startswith("base:"):
                comment = line.split("#", 1)[1] if "#" in line else ""
                assert any(s in comment for s in ("reference", "paper", "SG-MIM", "our choice", "bookkeeping",
                                                  "vgskit data prepare", "shared")), f"{path.name}: {line!r}"


def test_the_scenes_recipes_differ_by_the_model_only() -> None:
    """vg_hubert_scenes and sg_mim_scenes train on the same data, batches, steps and optimiser, so that their recall
    and word-discovery scores compare SG-MIM's change; both towers are random-weight architectures (nothing to
    download), and no image augmentation contradicts the captions' colours and sides."""
    vg_exp, vg_name, vg_model, vg_data, vg_train = _resolved("vg_hubert_scenes")
    sg_exp, sg_name, sg_model, sg_data, sg_train = _resolved("sg_mim_scenes")
    assert (vg_name, sg_name) == ("vg_hubert_scenes", "sg_mim_scenes")
    assert vg_data == sg_data and vg_data.train_augment.kind == "none" and vg_data.train_augment.randaugment is None
    assert vg_data.corpus_preset == "demo" and vg_data.manifest is None
    differ = {f for f in vars(vg_train) if getattr(vg_train, f) != getattr(sg_train, f)}
    assert differ <= {"time_budget_s"}, differ
    assert vg_model.speech == sg_model.speech and vg_model.speech.architecture is not None
    assert vg_model.speech.freeze_cnn is False and vg_model.speech.reinit_last == 0
    assert vg_model.image.architecture["model_type"] == "vit" and sg_model.image.architecture["model_type"] == "vit_mae"
    assert {k: v for k, v in vg_model.image.architecture.items() if k not in ("model_type", "mask_ratio")} == {
        k: v for k, v in sg_model.image.architecture.items() if k not in ("model_type", "mask_ratio")}
    # SG-MIM's own values stay the paper's, except the start epoch the short run needs.
    assert (sg_model.mask_ratio, sg_model.mim_weight, sg_model.momentum, sg_model.margin) == (0.75, 2.0, 0.999, 0.0)
    assert sg_model.mim_start_epoch == 1 and sg_train.max_steps == 600
