"""Cross-Modal Denoising (Zhou et al., Interspeech 2024) on tiny random HuBERT and CLIP towers saved locally:
the patch noise, the multi-positive targets, the training-only fusion encoder, and the α = 0 reduction to
parallel SpeechCLIP. Nothing is downloaded."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from _tiny_speechclip import Towers, make_towers, perturb, tiny_batch, tiny_config
from vgskit.contract import Batch, ImageInputs, SpeechInputs, TrainState
from vgskit.data.cache import CachedImageEncoder
from vgskit.errors import ConfigError
from vgskit.losses import unique_images
from vgskit.models import list_models, load_pretrained, save_pretrained
from vgskit.models.registry import WEIGHTS_FILE, merge_config, model_config
from vgskit.models.speechclip import ParallelBranch, SpeechCLIP, SpeechCLIPConfig
from vgskit.models.speechclip.cmd import (
    TRAINING_ONLY,
    CMDConfig,
    CrossModalDenoising,
    FusionEncoder,
    MultiPositiveInfoNCE,
    multi_positive_targets,
    num_swapped,
    swap_patches,
)
from vgskit.train.config import load_recipe

RECIPE_DIR = Path(__file__).parents[1] / "src" / "vgskit" / "recipes"


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> Towers:
    return make_towers(tmp_path_factory)


def speechclip_config(t: Towers) -> SpeechCLIPConfig:
    """:func:`tiny_config`'s parallel model on the tiny towers, without a text tower (CMD has none)."""
    return replace(tiny_config(t, "parallel"), text=None)


def cmd_config(t: Towers, **overrides) -> CMDConfig:
    """:func:`speechclip_config` as a CMD config."""
    base = speechclip_config(t)
    config = CMDConfig(**{name: getattr(base, name) for name in vars(base)})
    return merge_config(config, overrides)


def make_cmd(t: Towers, seed: int = 1, **overrides) -> CrossModalDenoising:
    torch.manual_seed(seed)
    model = CrossModalDenoising(cmd_config(t, **overrides))
    perturb(model)
    model.model_name = "cmd_large"
    return model


def step_batch(n: int = 6, seed: int = 0) -> Batch:
    """Six captions of four images (ids 0 0 1 2 3 3): two images have two captions each."""
    b = tiny_batch(n, seed)
    first, target = unique_images(b["image_ids"])
    pixels = b["pixels"][first][target]  # captions of one image share its pixels
    return Batch(speech=SpeechInputs.waveform(b["wavs"], b["lengths"]), image=ImageInputs.from_pixels(pixels),
                 image_ids=b["image_ids"], caption_ids=torch.arange(n))


def distinct_image_batch(n: int = 4, seed: int = 0) -> Batch:
    batch = step_batch(n, seed)
    batch.image_ids = torch.arange(n)
    return batch


# ---------------------------------------------------------------------------------------------------------
# Config, preset, recipes
# ---------------------------------------------------------------------------------------------------------


def test_preset_is_the_papers_model() -> None:
    assert "cmd_large" in list_models()
    c = model_config("cmd_large")
    assert (c.speech.name_or_path, c.image.name_or_path, c.text) == ("hubert-large", "clip-vit-l14", None)
    assert c.speech.freeze and c.image.freeze and c.branches == "parallel"
    assert (c.parallel.num_layers, c.parallel.num_heads, c.parallel.audio_dim, c.parallel.out_dim) == (1, 8, 1024, 768)
    assert c.learnable_temperature and c.layer_norm_states  # learnable τ (§2.3); SpeechCLIP-large's weighted sum
    assert (c.noise_ratio, c.positives, c.fusion.project_qkv) == (0.3, "multi", False)
    # Table 1: 13.4M trainable parameters in the speech transformer (with its projection), 0.6M in the fusion FC,
    # and nothing else in the fusion encoder but its LayerNorm.
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert round(count(ParallelBranch(c.parallel)) / 1e6, 1) == 13.4
    fusion = FusionEncoder(c.parallel.out_dim, c.fusion)
    assert round(count(fusion.fc) / 1e6, 1) == 0.6 and count(fusion) == count(fusion.fc) + 2 * 768


@pytest.mark.parametrize("bad", [{"branches": "both"}, {"cmd_weight": -0.1}, {"noise_ratio": 1.5},
                                 {"positives": "one_hot"}, {"fusion": {"heads": 8}}])
def test_config_rejects_invalid_values(bad: dict) -> None:
    with pytest.raises(ConfigError):
        model_config("cmd_large", **bad)


@pytest.mark.parametrize("corpus", ["flickr8k", "spokencoco"])
def test_recipes_train_as_the_paper(corpus: str) -> None:
    recipe = load_recipe(RECIPE_DIR / f"cmd_{corpus}.yaml")
    model, data, train = recipe["model"], recipe["data"], recipe["train"]
    assert model["name"] == "cmd_large" and data["corpus"] == corpus
    assert 0 < model["cmd_weight"] <= 1 and model["noise_ratio"] == 0.3 and model["positives"] == "multi"
    assert (train["optimizer"], train["weight_decay"], train["batch_size"]) == ("adam", 1.0e-6, 128)
    assert (train["lr"], train["warmup_steps"], train["max_steps"], train["end_lr"]) == (1.0e-4, 4000, 60000, 1.0e-8)
    assert train.get("schedule", "linear") == "linear"
    config = model_config(model.pop("name"), **model)
    assert isinstance(config, CMDConfig)


# ---------------------------------------------------------------------------------------------------------
# Patch noise
# ---------------------------------------------------------------------------------------------------------


def test_rounding_rule() -> None:
    # Nearest integer, halves up: 30 % of ViT-L/14's 256 patches is 77, of the tiny tower's 16 is 5.
    assert num_swapped(256, 0.3) == 77 and num_swapped(16, 0.3) == 5 and num_swapped(5, 0.3) == 2
    assert num_swapped(10, 0.3) == 3 and num_swapped(10, 0.25) == 3 and num_swapped(10, 0.24) == 2
    assert num_swapped(7, 0.0) == 0 and num_swapped(7, 1.0) == 7
    with pytest.raises(ConfigError):
        num_swapped(7, 1.2)


@pytest.mark.parametrize("n_patches", [5, 16, 49])
def test_exactly_the_ratio_is_swapped_with_other_images_patches_only(n_patches: int) -> None:
    g = torch.Generator().manual_seed(n_patches)
    image_ids = torch.tensor([7, 7, 3, 9, 9, 9, 1, 3])  # shared images: duplicates are never donors
    first, target = unique_images(image_ids)
    patches = torch.randn(len(first), n_patches, 4, generator=g)  # distinct values: sources are identifiable
    out = swap_patches(patches, target, 0.3, generator=g)
    k = num_swapped(n_patches, 0.3)
    assert out.patches.shape == (len(image_ids), n_patches, 4)
    assert out.replaced.sum(dim=1).tolist() == [k] * len(image_ids)
    for row, position in itertools.product(range(len(image_ids)), range(n_patches)):
        value, own = out.patches[row, position], target[row]
        if not out.replaced[row, position]:
            assert torch.equal(value, patches[own, position]) and out.donor[row, position] == -1
            continue
        donor = int(out.donor[row, position])
        assert donor != own and torch.equal(value, patches[donor, position])
        # Not any patch of the row's own image (the same image under another caption included).
        assert not (patches[own] == value).all(dim=1).any()


def test_donors_cover_every_other_image_and_a_single_image_stays_clean() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.tensor([0, 1, 2, 3])
    out = swap_patches(torch.randn(4, 100, 2, generator=g), target, 0.5, generator=g)
    for row in range(4):
        donors = set(out.donor[row][out.replaced[row]].tolist())
        assert donors == {0, 1, 2, 3} - {row}  # 50 draws over 3 other images
    alone = swap_patches(torch.randn(1, 9, 2, generator=g), torch.tensor([0, 0, 0]), 0.3, generator=g)
    assert not alone.replaced.any() and torch.equal(alone.patches[1], alone.patches[0])


# ---------------------------------------------------------------------------------------------------------
# Multi-positive targets
# ---------------------------------------------------------------------------------------------------------


def brute_force_multi_positive(speech: torch.Tensor, image: torch.Tensor, ids: list[int], scale: float) -> float:
    """Eq. 3–6 with §3.1's targets, written out entry by entry."""
    n = len(ids)
    sim = [[scale * float((speech[i] @ image[j]).detach()) for j in range(n)] for i in range(n)]
    y = [[(1.0 if ids[i] == ids[j] else 0.0) / sum(ids[i] == ids[k] for k in range(n)) for j in range(n)]
         for i in range(n)]
    s2i = i2s = 0.0
    for i in range(n):
        row = math.log(sum(math.exp(sim[i][j]) for j in range(n)))
        col = math.log(sum(math.exp(sim[j][i]) for j in range(n)))  # image row i against every speech j
        s2i += -sum(y[i][j] * (sim[i][j] - row) for j in range(n))
        i2s += -sum(y[i][j] * (sim[j][i] - col) for j in range(n))
    return 0.5 * (s2i / n + i2s / n)


def test_multi_positive_loss_against_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    ids = [4, 4, 1, 2, 2, 2, 8]
    want = [[(ids[i] == ids[j]) / ids.count(ids[i]) for j in range(7)] for i in range(7)]
    torch.testing.assert_close(multi_positive_targets(torch.tensor(ids)), torch.tensor(want))
    speech = torch.nn.functional.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1)
    loss = MultiPositiveInfoNCE(init_temperature=0.2, learnable_temperature=True)
    got = float(loss(speech, image, torch.tensor(ids)).detach())
    assert got == pytest.approx(brute_force_multi_positive(speech, image, ids, 1 / 0.2), rel=1e-5)
    # With one caption per image the targets are one-hot: the CLIP loss.
    one = torch.arange(7)
    logits = (speech @ image.T / 0.2).float()
    clip = 0.5 * (torch.nn.functional.cross_entropy(logits, one) + torch.nn.functional.cross_entropy(logits.T, one))
    assert float(loss(speech, image, one).detach()) == pytest.approx(float(clip), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The model: training step, α = 0, fusion encoder only in training
# ---------------------------------------------------------------------------------------------------------


def test_step_returns_both_losses_and_the_fusion_encoder_learns(towers: Towers) -> None:
    model = make_cmd(towers, cmd_weight=0.5).train()
    out = model.step(step_batch(), TrainState())
    assert set(out.losses) == {"sic", "cmd"}
    assert float(out.losses["cmd"].detach()) == pytest.approx(0.5 * float(out.metrics["cmd_unweighted"]))
    assert float(out.metrics["swapped_fraction"]) == pytest.approx(num_swapped(16, 0.3) / 16)  # 32 px / 8 px
    out.loss.backward()
    for name, p in model.fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # The denoising loss reaches the speech branch through the query: its gradient differs from L_sic's alone.
    cmd_grad = model.parallel.cls.grad.clone()
    model.zero_grad()
    model.step(step_batch(), TrainState()).losses["sic"].backward()
    assert not torch.allclose(cmd_grad, model.parallel.cls.grad)
    # Frozen CLIP: its modules shared by the patch projection get no gradient.
    assert all(p.grad is None for p in model.patch_projection.parameters())


def test_learned_query_key_value_option(towers: Towers) -> None:
    model = make_cmd(towers, fusion={"project_qkv": True}).train()
    model.step(step_batch(), TrainState()).loss.backward()
    assert model.fusion.q.weight.grad.abs().sum() > 0 and model.fusion.k.weight.grad.abs().sum() > 0


def test_alpha_zero_is_parallel_speechclip(towers: Towers) -> None:
    torch.manual_seed(2)
    speechclip = SpeechCLIP(speechclip_config(towers))
    perturb(speechclip)
    speechclip.train()
    for positives, batch in (("masked", step_batch()), ("multi", distinct_image_batch())):
        model = make_cmd(towers, cmd_weight=0.0, positives=positives)
        model.load_state_dict(speechclip.state_dict(), strict=True)  # same weights
        model.train()
        torch.manual_seed(5)  # same dropout draws
        want = speechclip.step(batch, TrainState()).loss
        torch.manual_seed(5)
        out = model.step(batch, TrainState())
        assert set(out.losses) == {"sic"}
        if positives == "masked":  # the very same computation
            assert torch.equal(out.loss, want)
        else:  # one-hot targets: CLIP's loss written as a cross-entropy
            torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-6)


def test_multi_positive_step_against_brute_force(towers: Towers) -> None:
    model = make_cmd(towers, cmd_weight=0.0).eval()  # no dropout: the embeddings below are the step's
    batch = step_batch()
    speech = model.encode_speech(batch.speech.values, batch.speech.lengths).double()
    image = model.encode_image(batch.image.pixels).double()
    want = brute_force_multi_positive(speech, image, batch.image_ids.tolist(), float(model.loss.scale()))
    assert float(model.step(batch, TrainState()).loss.detach()) == pytest.approx(want, rel=1e-5)


def test_fusion_encoder_is_absent_from_the_saved_model(towers: Towers, tmp_path: Path) -> None:
    model = make_cmd(towers).eval()
    assert not [k for k in model.state_dict() if k.startswith(tuple(f"{n}." for n in TRAINING_ONLY))]
    save_pretrained(model, tmp_path / "cmd")
    with safe_open(str(tmp_path / "cmd" / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert not [k for k in keys if "fusion" in k or "patch_projection" in k]
    # The saved weights are exactly a parallel SpeechCLIP model's.
    inference = SpeechCLIP(speechclip_config(towers))
    assert keys == set(inference.state_dict())
    from safetensors.torch import load_file

    inference.load_state_dict(load_file(str(tmp_path / "cmd" / WEIGHTS_FILE)), strict=True)
    inference.eval()
    batch = step_batch()
    wavs, lengths, pixels = batch.speech.values, batch.speech.lengths, batch.image.pixels
    with torch.no_grad():
        want_s, want_i = model.encode_speech(wavs, lengths), model.encode_image(pixels)
        torch.testing.assert_close(inference.encode_speech(wavs, lengths), want_s)
        torch.testing.assert_close(inference.encode_image(pixels), want_i)
        # load_pretrained rebuilds the CMD model; retrieval does not depend on its (fresh) fusion encoder.
        loaded = load_pretrained(tmp_path / "cmd")
        assert isinstance(loaded, CrossModalDenoising)
        torch.testing.assert_close(loaded.encode_speech(wavs, lengths), want_s)
        torch.testing.assert_close(loaded.encode_image(pixels), want_i)
        exported = model.to_speechclip()
        assert not hasattr(exported, "fusion") and exported.model_name == "speechclip_parallel_base"
        torch.testing.assert_close(exported.encode_speech(wavs, lengths), want_s)


def test_retrieval_never_reads_the_fusion_encoder(towers: Towers) -> None:
    model = make_cmd(towers).eval()
    batch = step_batch()
    with torch.no_grad():
        before = model.embed_speech(batch.speech).pooled, model.embed_image(batch.image).pooled
        for p in model.fusion.parameters():
            p.mul_(-3.0).add_(1.0)
        after = model.embed_speech(batch.speech).pooled, model.embed_image(batch.image).pooled
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_image_feature_cache_keeps_patch_tokens_and_pooled(towers: Towers) -> None:
    model = make_cmd(towers).eval()
    assert model.feature_cache_options() == {"speech": {"pooled": False}, "image": {"pooled": False}}
    batch = step_batch()
    with torch.no_grad():
        torch.manual_seed(9)
        want = model.step(batch, TrainState())
        out = model.image_tower(batch.image.pixels)
        # What the trainer's cache reader hands the model: tokens then pooled, flattened per image.
        flat = torch.cat([out.tokens.flatten(1), out.pooled], dim=1)
        fake_cache = SimpleNamespace(meta={"width": out.pooled.shape[1], "tokens_shape": list(out.tokens.shape[1:])},
                                     options=SimpleNamespace(kind="image"), index_path="cache")
        real = model.image_tower
        model.set_tower("image", CachedImageEncoder(fake_cache, tower=real))  # type: ignore[arg-type]
        cached = Batch(speech=batch.speech, image=ImageInputs("tower_outputs", tower_outputs=flat),
                       image_ids=batch.image_ids, caption_ids=batch.caption_ids)
        torch.manual_seed(9)
        got = model.step(cached, TrainState())
        model.set_tower("image", real)
    for name in ("sic", "cmd"):
        torch.testing.assert_close(got.losses[name], want.losses[name])


def test_readme_lists_the_papers_numbers() -> None:
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    start = text.index("### Cross-Modal Denoising")
    assert text.index("## SpeechCLIP") < start < text.index("## FaST-VGS")
    section = text[start:text.index("## FaST-VGS")]
    for numbers in ("40.7 / 75.1 / 85.8", "56.8 / 86.2 / 94.2", "48.9 / 78.3 / 87.5", "61.4 / 88.2 / 93.8",
                    "48.8 vs 46.5", "44.9 vs 43.0"):
        assert numbers in section, numbers
    assert "vgskit eval --checkpoint runs/cmd_spokencoco --manifest data/facc/manifest.jsonl --split test" in section
