"""The SG-MIM recipes hold the paper's settings (Woo, Ryu, Senocak, Chung, ICASSP 2024, §2.2 and §3.2).

Every expected value below is written out from the paper, not read from the recipes, so a recipe edited away from its
source fails here. What the paper leaves open (audio crop lengths, BertAdam's epsilon and weight decay, clipping) is
inherited from the VG-HuBERT recipes and checked by ``tests/test_vghubert_recipes.py``; here only that it is inherited.
"""

from __future__ import annotations

import pytest

from vgskit.data.augment import RandAugmentConfig
from vgskit.experiment import RECIPE_DIR, data_config_from, load_experiment
from vgskit.models.registry import list_models, model_config
from vgskit.models.vg_hubert import SGMIMConfig
from vgskit.train.config import TrainConfig, config_from_dict

#: §3.2: "We use the BertAdam [23] optimizer with an initial learning rate of 0 that linearly increases to 5×10^-6
#: during the initial 10% of training process. Subsequently, the learning rate decays to 0 in line with VG-HuBERT".
PAPER_TRAIN = {"optimizer": "bertadam", "lr": 5e-6, "warmup_fraction": 0.1, "schedule": "bert_warmup_linear",
               "end_lr": 0.0, "warmup_steps": None, "max_steps": None}

#: §3.2 and Eq. 2: MAE ViT-B/16 (mean of Z_I), HuBERT Base with its last 3 layers re-initialised, linear projections
#: to 768, InfoNCE without margin, 75 % masking, α 0.999 → 1, λ = 2.0 "after 3 epochs" (0-based epoch index 3).
PAPER_MODEL = {"embed_dim": 768, "projection": "linear", "margin": 0.0, "mask_ratio": 0.75, "momentum": 0.999,
               "mim_weight": 2.0, "mim_start_epoch": 3}

#: §3.2: "Training is conducted with a batch size of 100 over 30 epochs for SpokenCOCO, 30 epochs with a batch size
#: of 80 for Places Audio, and 20 epochs with a batch size of 100 for FACC."  recipe -> (corpus, batch, epochs).
PAPER_CORPORA = {
    "sg_mim_spokencoco": ("spokencoco", 100, 30),
    "sg_mim_places": ("places", 80, 30),
    "sg_mim_flickr8k": ("flickr8k", 100, 20),
}


def _resolved(name: str):
    exp = load_experiment(name)
    model_d = dict(exp["model"])
    model_name = model_d.pop("name")
    return (exp, model_name, model_config(model_name, **model_d), data_config_from(exp["data"]),
            config_from_dict(TrainConfig, exp["train"], prefix="train"))


def test_every_sg_mim_recipe_is_in_the_table() -> None:
    # sg_mim_scenes (the embedded corpus) is checked in test_vghubert_recipes.py.
    assert {p.stem for p in RECIPE_DIR.glob("sg_mim*.yaml")} - {"sg_mim_scenes"} == set(PAPER_CORPORA)
    assert (RECIPE_DIR / "_sg_mim_common.yaml").is_file()


@pytest.mark.parametrize("name", sorted(PAPER_CORPORA))
def test_recipe_holds_the_paper_settings(name: str) -> None:
    corpus, batch, epochs = PAPER_CORPORA[name]
    exp, model_name, mcfg, data, train = _resolved(name)

    assert model_name == "sg_mim" and model_name in list_models()
    assert isinstance(mcfg, SGMIMConfig)
    for key, want in PAPER_MODEL.items():
        assert getattr(mcfg, key) == want, f"model.{key}: {getattr(mcfg, key)!r}"
    assert (mcfg.image.name_or_path, mcfg.image.pool, mcfg.image.freeze) == ("mae-vit-b16", "mean", False)
    assert (mcfg.speech.name_or_path, mcfg.speech.num_layers, mcfg.speech.reinit_last) == ("hubert-base", 12, 3)
    # λ, the mask ratio and the momentum are written in the recipes, not left to the preset.
    for key in ("margin", "mask_ratio", "mim_weight", "mim_start_epoch", "momentum"):
        assert key in exp["model"], f"model.{key} missing"

    assert data.corpus == corpus
    # "images are cropped to a size of 224 x 224, and RandAugment [24] is applied" (train time only).
    aug = data.train_augment
    assert aug.kind == "crop_flip"
    assert aug.randaugment == RandAugmentConfig(num_ops=2, magnitude=9, num_magnitude_bins=31)

    for key, want in PAPER_TRAIN.items():
        got = getattr(train, key)
        assert got == (pytest.approx(want) if isinstance(want, float) else want), f"train.{key}: {got!r}"
    assert (train.batch_size, train.epochs) == (batch, epochs)
    for key in ("optimizer", "lr", "schedule", "warmup_fraction", "batch_size", "epochs"):
        assert key in exp["train"], f"train.{key} missing"

    # What the paper does not state comes from the VG-HuBERT recipes ("in line with VG-HuBERT").
    vg = load_experiment(name.replace("sg_mim", "vg_hubert"))
    for key in ("eps", "weight_decay", "grad_clip", "select_metric"):
        assert exp["train"][key] == vg["train"][key], key
    for key in ("train_crop", "train_max_seconds", "eval_max_seconds", "captions_per_image"):
        assert exp["data"][key] == vg["data"][key], key


def test_every_recipe_value_names_its_source() -> None:
    for path in [RECIPE_DIR / "_sg_mim_common.yaml", *(RECIPE_DIR / f"{n}.yaml" for n in PAPER_CORPORA)]:
        for line in path.read_text().splitlines():
            body = line.split("#", 1)[0].strip()
            if body and not body.endswith(":"):
                comment = line.split("#", 1)[1] if "#" in line else ""
                assert any(s in comment for s in ("SG-MIM paper", "our choice", "vgskit data prepare", "shared")), \
                    f"{path.name}: {line!r}"
