"""The registered SpeechCLIP model: tiny random HuBERT and CLIP towers (with a small real CLIP tokenizer)
saved into temporary folders, loaded through the model's own tower configs; nothing is downloaded."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny_speechclip import CAPTIONS, SPEECH, Towers, make_towers, tiny_config
from _tiny_speechclip import perturb as _perturb
from _tiny_speechclip import tiny_batch as _batch
from vgskit.contract import Batch, ImageInputs, SpeechInputs, StepOutput, TrainState
from vgskit.encoders.hub import KNOWN_TOWERS
from vgskit.encoders.text import load_clip_tokenizer
from vgskit.errors import ConfigError
from vgskit.layers import SpeechEncoderOutput
from vgskit.losses import unique_images
from vgskit.models import RetrievalModel, list_models, load_pretrained, save_pretrained
from vgskit.models.registry import merge_config, model_config
from vgskit.models.speechclip import (
    CascadedBranch,
    ParallelBranch,
    SpeechCLIP,
    SpeechCLIPConfig,
    build_keyword_vocabulary,
)
from vgskit.retrieval.evaluate import embed_images, embed_speech

NAMES = ("speechclip_parallel_base", "speechclip_cascaded_base", "speechclip_parallel_large",
         "speechclip_cascaded_large")
RECIPES = sorted((Path(__file__).parents[1] / "src" / "vgskit" / "recipes").glob("speechclip_*.yaml"))


def _step_batch(n: int = 4, seed: int = 0) -> Batch:
    """:func:`tiny_batch` as the training batch the data pipeline hands to ``step``."""
    b = _batch(n, seed)
    return Batch(speech=SpeechInputs.waveform(b["wavs"], b["lengths"]), image=ImageInputs.from_pixels(b["pixels"]),
                 image_ids=b["image_ids"], caption_ids=torch.arange(n))


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> Towers:
    return make_towers(tmp_path_factory)


@pytest.fixture(scope="module")
def vocab(towers: Towers) -> list[int]:
    return build_keyword_vocabulary(load_clip_tokenizer(str(towers.clip)), CAPTIONS)


@pytest.fixture(scope="module")
def both(towers: Towers, vocab: list[int]) -> SpeechCLIP:
    torch.manual_seed(1)
    model = SpeechCLIP(tiny_config(towers, "both", keyword_vocab=vocab, vocab_from_captions=True))
    _perturb(model)
    model.model_name = "speechclip_parallel_base"
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


def test_registered_presets_follow_the_paper() -> None:
    assert set(NAMES) <= set(list_models())
    base, large = model_config("speechclip_parallel_base"), model_config("speechclip_cascaded_large")
    assert (base.speech.name_or_path, base.image.name_or_path, base.text.name_or_path) == (
        "hubert-base", "clip-vit-b32", "clip-vit-b32")
    assert (large.speech.name_or_path, large.image.name_or_path) == ("hubert-large", "clip-vit-l14")
    assert base.speech.freeze and base.image.freeze and base.text.freeze
    assert not base.learnable_temperature and not base.layer_norm_states and base.parallel.ffn_dim == 3072
    assert large.learnable_temperature and large.layer_norm_states and large.parallel.ffn_dim == 4096
    assert base.branches == "parallel" and large.branches == "cascaded"
    assert (base.parallel.num_heads, base.cascaded.num_heads, base.cascaded.num_keywords) == (8, 1, 8)
    for name in NAMES:
        cfg = model_config(name)
        assert {cfg.speech.name_or_path, cfg.image.name_or_path, cfg.text.name_or_path} <= set(KNOWN_TOWERS)
    # Any preset can train both branches.
    assert model_config("speechclip_parallel_large", branches="both").branch_names == ("parallel", "cascaded")


def test_trainable_parameters_match_the_paper() -> None:
    # Table 1: 2.8 M (cascaded) to 7.5 M (parallel) trainable parameters for base, up to 13.4 M for large,
    # counting the branch and the hidden-state weights (13 base / 25 large states). The cascaded large
    # branch of the reference configs has 5.0 M; Table 1's lower bound for large is 6.1 M.
    def count(size: str, branch: str) -> float:
        cfg = model_config(f"speechclip_{branch}_{size}")
        module = ParallelBranch(cfg.parallel) if branch == "parallel" else CascadedBranch(cfg.cascaded)
        return (sum(p.numel() for p in module.parameters() if p.requires_grad) + (13 if size == "base" else 25)) / 1e6

    assert count("base", "parallel") == pytest.approx(7.5, abs=0.05)
    assert count("base", "cascaded") == pytest.approx(2.8, abs=0.05)
    assert count("large", "parallel") == pytest.approx(13.4, abs=0.05)


def test_config_round_trips_through_json(towers: Towers) -> None:
    cfg = tiny_config(towers, "both", keyword_vocab=[0, 5, 9], retrieval_branch="cascaded")
    back = SpeechCLIPConfig(**json.loads(json.dumps(asdict(cfg))))
    assert back == cfg and isinstance(back.cascaded.masked_ids, tuple)
    merged = merge_config(model_config("speechclip_parallel_base"), json.loads(json.dumps(asdict(cfg))))
    assert merged == cfg
    assert SpeechCLIPConfig(text=None).text is None  # a parallel-only model may go without the text tower


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"branches": "hybrid"}, "branches"),
        ({"branches": "cascaded", "text": None}, "text"),
        ({"retrieval_branch": "cascaded"}, "retrieval_branch"),
        ({"init_temperature": 0.0}, "init_temperature"),
        ({"parallel_loss_weight": -1.0}, "parallel_loss_weight"),
        ({"parallel_loss_weight": 0.0}, "parallel_loss_weight"),
        ({"keyword_vocab": [3, 3]}, "keyword_vocab"),
        ({"keyword_vocab": [-1, 2]}, "keyword_vocab"),
        ({"keyword_vocab": "abc"}, "keyword_vocab"),
        ({"parallel": {"num_layerz": 1}}, "parallel"),
        ({"parallel": {"num_layers": 0}}, "parallel.num_layers"),
        ({"cascaded": {"num_keywords": 0}}, "cascaded.num_keywords"),
        ({"cascaded": {"vq_temperature": 0.0}}, "cascaded.vq_temperature"),
        ({"speech": {"cls_position": "middle"}}, "cls_position"),
    ],
)
def test_config_validation_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        merge_config(SpeechCLIPConfig(), overrides)


def test_model_level_config_errors(towers: Towers, vocab: list[int]) -> None:
    with pytest.raises(ConfigError, match="keyword_vocab is empty but vocab_from_captions"):
        SpeechCLIP(tiny_config(towers, "cascaded", vocab_from_captions=True))
    with pytest.raises(ConfigError, match=r"parallel\.num_heads"):
        SpeechCLIP(tiny_config(towers, "parallel", parallel={"num_heads": 3}))
    with pytest.raises(ConfigError, match="keyword_vocab: ids"):
        SpeechCLIP(tiny_config(towers, "cascaded", keyword_vocab=[1, 2, 10_000]))
    with pytest.raises(ConfigError, match="only special tokens"):
        SpeechCLIP(tiny_config(towers, "cascaded", keyword_vocab=[0, towers.vocab_size - 1]))
    with pytest.raises(ConfigError, match=r"cascaded\.num_keywords"):
        SpeechCLIP(tiny_config(towers, "cascaded", keyword_vocab=vocab, cascaded={"num_keywords": 23}))


# ---------------------------------------------------------------------------------------------------------
# Keyword vocabulary from captions
# ---------------------------------------------------------------------------------------------------------


def test_build_keyword_vocabulary(towers: Towers) -> None:
    tok = load_clip_tokenizer(str(towers.clip))
    ids = build_keyword_vocabulary(tok, [*CAPTIONS, "", "a dog"], batch_size=1)
    tokens = {t for c in CAPTIONS for t in tok(c)["input_ids"]}
    sot, eot = towers.vocab_size - 2, towers.vocab_size - 1
    assert ids == sorted(tokens | {0, sot, eot})
    assert {tok.convert_tokens_to_ids(w + "</w>") for w in ("small", "red", "bag", "left", ",")} <= set(ids)
    assert tok.convert_tokens_to_ids("cat</w>") not in ids
    assert build_keyword_vocabulary(tok, []) == [0, sot, eot]


def test_adapt_config_to_corpus(towers: Towers, vocab: list[int]) -> None:
    section = {"name": "speechclip_cascaded_base", "vocab_from_captions": True,
               **{k: v for k, v in asdict(tiny_config(towers, "cascaded")).items()
                  if k in ("speech", "image", "text", "parallel", "cascaded")}}
    adapted = SpeechCLIP.adapt_config_to_corpus(section, CAPTIONS)
    assert adapted["keyword_vocab"] == vocab and adapted["name"] == "speechclip_cascaded_base"
    assert "keyword_vocab" not in section  # the input is not modified
    # Without "name", model_name supplies the preset; a given vocabulary, a parallel model or the flag off
    # leave the config as it is.
    no_name = {k: v for k, v in section.items() if k != "name"}
    assert SpeechCLIP.adapt_config_to_corpus(no_name, CAPTIONS, model_name="speechclip_cascaded_base")[
        "keyword_vocab"] == vocab
    for unchanged in ({**section, "keyword_vocab": [0, 4, 5]}, {**section, "branches": "parallel"},
                      {**section, "vocab_from_captions": False}):
        assert SpeechCLIP.adapt_config_to_corpus(unchanged, CAPTIONS) == unchanged
    assert RetrievalModel.adapt_config_to_corpus(section, CAPTIONS) is section
    with pytest.raises(ConfigError, match="no transcripts"):
        SpeechCLIP.adapt_config_to_corpus(section, ["", ""])

    model = SpeechCLIP(merge_config(model_config("speechclip_cascaded_base"),
                                    {k: v for k, v in adapted.items() if k != "name"}))
    cfg = model.config.cascaded
    assert cfg.vocab_size == len(vocab) == len(model.keyword_vocabulary)
    # The masked rows are exactly padding id 0, SOT and EOT.
    assert [vocab[r] for r in cfg.masked_ids] == [0, towers.vocab_size - 2, towers.vocab_size - 1]
    assert torch.equal(model.keyword_table(), model.text_tower.token_embedding.weight[vocab])


# ---------------------------------------------------------------------------------------------------------
# Inference API
# ---------------------------------------------------------------------------------------------------------


def test_encoders_give_unit_vectors_in_clip_space(both: SpeechCLIP) -> None:
    b = _batch()
    with torch.no_grad():
        speech = both.encode_speech(b["wavs"], b["lengths"])
        cascaded = both.encode_speech(b["wavs"], b["lengths"], branch="cascaded")
        every = both.speech_embeddings(b["wavs"], b["lengths"])
        image = both.encode_image(b["pixels"])
        text = both.encode_text(CAPTIONS)
    assert both.embed_dim == 16 and both.retrieval_branch == "parallel"
    for emb, n in ((speech, 4), (cascaded, 4), (image, 4), (text, 2)):
        assert emb.shape == (n, 16)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(n))
    torch.testing.assert_close(every["parallel"], speech)
    torch.testing.assert_close(every["cascaded"], cascaded)
    assert not torch.allclose(speech, cascaded)
    # The text path equals CLIP's own text features of the tokenized captions.
    ids, mask = both.text_tower.tokenize(CAPTIONS)
    torch.testing.assert_close(text, both.encode_text_ids(ids, mask))
    # An utterance gets the same embedding alone as inside a padded batch.
    with torch.no_grad():
        alone = both.encode_speech(b["wavs"][2:3, :1600], b["lengths"][2:3])
    torch.testing.assert_close(alone[0], speech[2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="branch 'serial'"):
        both.encode_speech(b["wavs"], b["lengths"], branch="serial")
    assert both.image_transform["size"] == 32 and both.image_transform["resize_mode"] == "shorter_side_center_crop"


def test_keywords_structure(both: SpeechCLIP, vocab: list[int]) -> None:
    b = _batch(3)
    kws = both.keywords(b["wavs"], b["lengths"], top_k=3)
    assert len(kws) == 3 and all(len(slots) == 4 for slots in kws)
    ids, scores = both.keyword_ids(b["wavs"], b["lengths"], top_k=3)
    assert ids.shape == scores.shape == (3, 4, 3)
    special = {0, len(both.text_tower.tokenizer) - 2, len(both.text_tower.tokenizer) - 1}
    assert set(ids.flatten().tolist()) <= set(vocab) - special
    assert (scores[..., :-1] >= scores[..., 1:]).all() and (scores.abs() <= 1 + 1e-5).all()
    tok = both.text_tower.tokenizer
    for u in range(3):
        for k in range(4):
            slot = kws[u][k]
            assert len(slot) == 3 and all(isinstance(w, str) and isinstance(s, float) for w, s in slot)
            assert [w for w, _ in slot] == [tok.decode([i]).strip() for i in ids[u, k].tolist()]
            assert [s for _, s in slot] == pytest.approx(scores[u, k].tolist())
    # The slot embeddings and vocabulary feed vgskit.models.speechclip.metrics.keyword_hit_rate.
    with torch.no_grad():
        assert both.keyword_embeddings(b["wavs"], b["lengths"]).shape == (3, 4, 32)
    assert both.keyword_token_ids.tolist() == vocab
    with pytest.raises(ConfigError, match="top_k"):
        both.keyword_ids(b["wavs"], b["lengths"], top_k=len(vocab))


def test_keywords_need_the_cascaded_branch(towers: Towers) -> None:
    model = SpeechCLIP(tiny_config(towers, "parallel")).eval()
    b = _batch(2)
    with pytest.raises(ConfigError, match="cascaded branch"):
        model.keywords(b["wavs"], b["lengths"])
    assert model.cascaded is None and model.keyword_vocabulary is None


def test_layer_weights_are_a_distribution(both: SpeechCLIP) -> None:
    weights = both.layer_weights()
    assert set(weights) == {"parallel", "cascaded"}
    for w in weights.values():
        assert w.shape == (SPEECH["num_hidden_layers"] + 1,)  # transformer input + each layer
        assert float(w.sum()) == pytest.approx(1.0) and (w > 0).all()
    assert not torch.allclose(weights["parallel"], torch.full_like(weights["parallel"], 1 / 3))


def test_full_clip_vocabulary_when_no_keyword_vocab(towers: Towers) -> None:
    model = SpeechCLIP(tiny_config(towers, "cascaded")).eval()
    n = towers.vocab_size
    assert model.config.cascaded.vocab_size == n
    assert model.config.cascaded.masked_ids == (0, n - 2, n - 1)
    assert model.keyword_table().data_ptr() == model.text_tower.token_embedding.weight.data_ptr()  # no copy


# ---------------------------------------------------------------------------------------------------------
# Training contract
# ---------------------------------------------------------------------------------------------------------


def test_only_trainable_parts_get_gradients(towers: Towers, vocab: list[int]) -> None:
    torch.manual_seed(2)
    model = SpeechCLIP(tiny_config(towers, "both", keyword_vocab=vocab)).train()
    assert not model.speech_tower.training and not model.image_tower.training and not model.text_tower.training
    out = model(_step_batch(6))
    assert isinstance(out, StepOutput)
    assert set(out.losses) == {"parallel", "cascaded"}
    assert set(out.metrics) == {"logit_scale", "temperature", "vq_perplexity"}
    torch.testing.assert_close(out.loss, out.losses["parallel"] + out.losses["cascaded"])
    assert float(out.metrics["temperature"]) == pytest.approx(0.07)
    assert float(out.metrics["logit_scale"]) == pytest.approx(1 / 0.07)
    assert 1.0 <= float(out.metrics["vq_perplexity"]) <= 6 * 4
    out.loss.backward()
    for tower in (model.speech_tower, model.image_tower, model.text_tower):
        assert all(not p.requires_grad and p.grad is None for p in tower.parameters())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("layer_sum.", "parallel.", "cascaded.")) for n in trainable)
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Gradients reach the keyword slots through the frozen text tower.
    assert model.cascaded.cls.grad.abs().sum() > 0


def test_learnable_temperature_and_loss_weights(towers: Towers, vocab: list[int]) -> None:
    torch.manual_seed(2)
    model = SpeechCLIP(tiny_config(towers, "both", keyword_vocab=vocab, learnable_temperature=True,
                                   cascaded_loss_weight=0.5)).train()
    out = model(_step_batch(6))
    out.loss.backward()
    assert model.loss.logit_scale.requires_grad and model.loss.logit_scale.grad is not None


def test_step_losses_are_the_weighted_branch_losses(towers: Towers, vocab: list[int]) -> None:
    # Each named loss is its branch's contrastive loss times the branch weight, computed from one pass of the
    # towers (each distinct image once); their sum is the objective, bit for bit.
    torch.manual_seed(2)
    model = SpeechCLIP(tiny_config(towers, "both", keyword_vocab=vocab, cascaded_loss_weight=0.5)).train()
    batch = _step_batch(6)
    torch.manual_seed(8)
    out = model.step(batch, TrainState(step=3, total_steps=10))
    torch.manual_seed(8)  # the same dropout draws
    feats, lengths = model.speech_features(batch.speech.values, batch.speech.lengths)
    first, target = unique_images(batch.image_ids)
    image = model.encode_image(batch.image.pixels[first])[target]  # [B, P]
    parallel = torch.nn.functional.normalize(model.parallel(feats, lengths), dim=-1)
    cascaded = model._cascaded(feats, lengths)[0]
    want = {"parallel": model.loss(parallel, image, batch.image_ids),
            "cascaded": 0.5 * model.loss(cascaded, image, batch.image_ids)}
    for name, value in want.items():
        torch.testing.assert_close(out.losses[name], value, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(out.loss, want["parallel"] + want["cascaded"], rtol=0, atol=0)
    # One branch alone: one loss.
    parallel_only = SpeechCLIP(tiny_config(towers, "parallel")).train()
    assert set(parallel_only(batch).losses) == {"parallel"}
    assert set(parallel_only(batch).metrics) == {"logit_scale", "temperature"}


def test_step_refuses_inputs_it_cannot_read(towers: Towers) -> None:
    model = SpeechCLIP(tiny_config(towers, "parallel"))
    batch = _step_batch(2)
    frames = SpeechInputs("features", torch.zeros(2, 5, 3), torch.tensor([5, 4]))
    with pytest.raises(ConfigError, match="reads waveforms"):
        model.step(Batch(frames, batch.image, batch.image_ids, batch.caption_ids), TrainState())
    regions = ImageInputs("regions", regions=torch.zeros(2, 3, 4), boxes=torch.zeros(2, 3, 4),
                          region_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ConfigError, match="reads pixels"):
        model.step(Batch(batch.speech, regions, batch.image_ids, batch.caption_ids), TrainState())
    # Cached tower states only stand for a frozen tower (whose cached reader takes them).
    unfrozen = SpeechCLIP(tiny_config(towers, "parallel", freeze=False))
    states = SpeechInputs("tower_states", torch.zeros(2, 3, 5, 32), torch.tensor([5, 4]), 50.0)
    with pytest.raises(ConfigError, match="reads waveforms"):
        unfrozen.step(Batch(states, batch.image, batch.image_ids, batch.caption_ids), TrainState())


def test_save_and_load_reproduce_embeddings(both: SpeechCLIP, tmp_path: Path) -> None:
    save_pretrained(both, tmp_path / "m")
    keys = set(both.state_dict())
    # Frozen towers are rebuilt from their source, not saved; the trained parts are.
    assert not any(k.startswith(("speech_tower.", "image_tower.", "text_tower.")) for k in keys)
    assert {"layer_sum.weights", "parallel.cls", "cascaded.cls", "loss.logit_scale"} <= keys
    assert not any("keyword_vocabulary" in k or "token_embedding" in k for k in keys)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["config"]["keyword_vocab"] == both.config.keyword_vocab
    assert saved["config"]["cascaded"]["vocab_size"] == len(both.config.keyword_vocab)

    loaded = load_pretrained(tmp_path / "m")
    assert isinstance(loaded, SpeechCLIP) and not loaded.training
    b = _batch()
    with torch.no_grad():
        for name in ("parallel", "cascaded"):
            torch.testing.assert_close(loaded.encode_speech(b["wavs"], b["lengths"], name),
                                       both.encode_speech(b["wavs"], b["lengths"], name), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_image(b["pixels"]), both.encode_image(b["pixels"]))
    assert loaded.keywords(b["wavs"], b["lengths"]) == both.keywords(b["wavs"], b["lengths"])
    # A state dict that does hold the towers (e.g. saved with another policy) loads as well.
    full = both.state_dict()
    for attribute in ("speech_tower", "image_tower", "text_tower"):
        full |= {f"{attribute}.{k}": v for k, v in getattr(both, attribute).state_dict().items()}
    loaded.load_state_dict(full, strict=True)


def test_unfrozen_towers_are_saved(towers: Towers, tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = SpeechCLIP(tiny_config(towers, "parallel", freeze=False))
    assert model.frozen_towers() == {}
    keys = set(model.state_dict())
    assert any(k.startswith("speech_tower.") for k in keys) and any(k.startswith("image_tower.") for k in keys)
    assert not any(k.startswith("text_tower.") for k in keys)  # the text tower is still frozen
    _perturb(model)
    model.model_name = "speechclip_parallel_base"
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    b = _batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_speech(b["wavs"], b["lengths"]),
                                   model.eval().encode_speech(b["wavs"], b["lengths"]))
        torch.testing.assert_close(loaded.encode_image(b["pixels"]), model.encode_image(b["pixels"]))


class StoredSpeechFeatures(torch.nn.Module):
    """What :class:`vgskit.data.cache.CachedSpeechEncoder` does: turn stored hidden states back into outputs."""

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor) -> SpeechEncoderOutput:
        states = tuple(wavs.unbind(dim=1))  # wavs: [B, L, T', D] stored features; lengths in frames
        return SpeechEncoderOutput(states[-1], lengths, 50.0, states)


class StoredImageFeatures(torch.nn.Module):
    def forward(self, pixels: torch.Tensor):  # pixels: [B, P] stored pooled embeddings
        from vgskit.layers import ImageEncoderOutput

        return ImageEncoderOutput(tokens=pixels[:, None], pooled=pixels)


def test_frozen_towers_can_be_replaced_by_stored_features(towers: Towers, vocab: list[int]) -> None:
    torch.manual_seed(5)
    model = SpeechCLIP(tiny_config(towers, "both", keyword_vocab=vocab))
    _perturb(model)
    model.eval()
    real = model.frozen_towers()
    assert real == {"speech": model.speech_tower, "image": model.image_tower}
    keys = set(model.state_dict())
    b = _step_batch(6)
    wavs, lengths, pixels = b.speech.values, b.speech.lengths, b.image.pixels
    with torch.no_grad():
        live = model.speech_embeddings(wavs, lengths)
        live_image = model.encode_image(pixels)
        speech_out = real["speech"](wavs, lengths)
        states = torch.stack(speech_out.hidden_states, dim=1)  # [B, L, T', D]
        # What a feature-cache collate gives: tower states in frames and one pooled vector per image.
        stored = Batch(speech=SpeechInputs("tower_states", states, speech_out.lengths, 50.0),
                       image=ImageInputs("tower_outputs", tower_outputs=real["image"](pixels).pooled),
                       image_ids=b.image_ids, caption_ids=b.caption_ids)

    def use(speech: torch.nn.Module, image: torch.nn.Module) -> None:
        model.set_tower("speech", speech)
        model.set_tower("image", image)

    use(StoredSpeechFeatures(), StoredImageFeatures())
    assert set(model.state_dict()) == keys  # checkpoints look the same with stand-ins
    with torch.no_grad():
        for name, emb in model.speech_embeddings(stored.speech.values, stored.speech.lengths).items():
            torch.testing.assert_close(emb, live[name])
        torch.testing.assert_close(model.encode_image(stored.image.main), live_image)
        torch.testing.assert_close(model.embed_speech(stored.speech).pooled, live["parallel"])
        torch.testing.assert_close(model.embed_image(stored.image).pooled, live_image)
    # Training steps see the same losses (same dropout draws) with either.
    model.train()
    losses = []
    for speech, image, batch in ((real["speech"], real["image"], b),
                                 (StoredSpeechFeatures(), StoredImageFeatures(), stored)):
        use(speech, image)
        torch.manual_seed(6)
        losses.append(model(batch))
    assert losses[1].losses.keys() == losses[0].losses.keys() == {"parallel", "cascaded"}
    for name in losses[0].losses:
        torch.testing.assert_close(losses[1].losses[name], losses[0].losses[name], msg=name)
    for name in losses[0].metrics:
        torch.testing.assert_close(losses[1].metrics[name], losses[0].metrics[name], msg=name)
    with pytest.raises(ConfigError, match="valid kinds are"):
        model.set_tower("text", StoredImageFeatures())
    with pytest.raises(ConfigError, match="no replaceable"):
        RetrievalModel(None).set_tower("speech", StoredImageFeatures())
    assert RetrievalModel(None).frozen_towers() == {}


def test_real_feature_cache_stands_in_for_the_towers(towers: Towers, vocab: list[int], tmp_path: Path) -> None:
    from PIL import Image

    from vgskit.audio import save_wav
    from vgskit.data.cache import (
        CachedImageEncoder,
        CachedSpeechEncoder,
        CachedSpokenCaptionDataset,
        ExtractionOptions,
        FeatureCache,
        collate_cached_captions,
        extract,
    )
    from vgskit.data.loader import SpokenCaptionDataset, collate_spoken_captions
    from vgskit.data.manifest import Record

    rng = np.random.default_rng(0)
    records = []
    for i, seconds in enumerate((0.2, 0.15, 0.25, 0.1)):
        wav = tmp_path / f"c{i}.wav"
        save_wav(wav, (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000)
        image = tmp_path / f"im{i // 2}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
        records.append(Record(f"c{i}", str(wav), str(image), f"img{i // 2}", "train"))
    torch.manual_seed(7)
    model = SpeechCLIP(tiny_config(towers, "both", keyword_vocab=vocab))
    _perturb(model)
    model.eval()
    t = model.image_transform
    base = SpokenCaptionDataset(records, image_size=t["size"], mean=t["mean"], std=t["std"],
                                resize_mode=t["resize_mode"], interpolation=t["interpolation"], progress=False)
    frozen = model.frozen_towers()
    speech_cache = FeatureCache.for_tower(tmp_path / "cache", frozen["speech"], ExtractionOptions())
    image_cache = FeatureCache.for_tower(tmp_path / "cache", frozen["image"], ExtractionOptions(kind="image"))
    extract(speech_cache, frozen["speech"], records, progress=False)
    extract(image_cache, frozen["image"], records, progress=False)
    live_batch = collate_spoken_captions([base[i] for i in range(4)])
    cached_batch = collate_cached_captions(
        [CachedSpokenCaptionDataset(base, speech_cache, image_cache)[i] for i in range(4)])
    assert (live_batch.speech.kind, live_batch.image.kind) == ("waveform", "pixels")
    assert (cached_batch.speech.kind, cached_batch.image.kind) == ("tower_states", "tower_outputs")
    with torch.no_grad():
        live = model.speech_embeddings(live_batch.speech.values, live_batch.speech.lengths)
        live_image = model.encode_image(live_batch.image.pixels)
        model.set_tower("speech", CachedSpeechEncoder(speech_cache))
        model.set_tower("image", CachedImageEncoder(image_cache))
        cached = model.speech_embeddings(cached_batch.speech.values, cached_batch.speech.lengths)
        cached_image = model.encode_image(cached_batch.image.tower_outputs)
    # float16 storage: close, not equal.
    torch.testing.assert_close(cached["parallel"], live["parallel"], atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(cached_image, live_image, atol=5e-3, rtol=5e-3)
    agree = (cached["cascaded"] - live["cascaded"]).abs().max(dim=1).values < 5e-3
    assert agree.float().mean() >= 0.75  # a keyword may flip between two near-tied subwords


# ---------------------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------------------


def test_tiny_unfrozen_model_learns_the_training_split(towers: Towers, tiny_manifest: Path) -> None:
    from vgskit.experiment import make_dataset
    from vgskit.metrics import recall_at_k

    threads = torch.get_num_threads()
    # Tiny tensors: a second thread buys little, and on a busy machine thread hand-offs cost far more.
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        # Mean of the patch tokens: a random ViT's CLS output hardly depends on the image yet.
        model = SpeechCLIP(tiny_config(towers, "parallel", freeze=False, parallel={"dropout": 0.0},
                                       image={"pool": "mean"}))
        assert model.frozen_towers() == {}
        ds = make_dataset(tiny_manifest, "train", model.image_transform, max_seconds=1.5, preload=True,
                          progress=False)
        captions_of: dict[int, list[int]] = {}
        for caption, image in enumerate(ds.caption_image_index):
            captions_of.setdefault(image, []).append(caption)
        n_images = len(captions_of)
        pixels = torch.stack([ds.pixels(i) for i in range(n_images)])  # [N, 3, 32, 32]
        # Plain Adam; the pretrained-size towers take smaller steps than the new branch (a random ViT
        # trained at the branch's rate collapses to one embedding for every image).
        groups = {"speech_tower.": 1e-3, "image_tower.": 1e-4, "": 1e-2}
        params: dict[str, list[torch.nn.Parameter]] = {prefix: [] for prefix in groups}
        for name, p in model.named_parameters():
            if p.requires_grad:
                params[next(prefix for prefix in groups if name.startswith(prefix))].append(p)
        opt = torch.optim.Adam([{"params": params[k], "lr": lr} for k, lr in groups.items()])
        rng = np.random.default_rng(0)
        model.train()
        for _ in range(100):
            # One random caption of every training image per step.
            idx = [int(rng.choice(captions_of[i])) for i in range(n_images)]
            batch = Batch(speech=ds.speech_inputs(idx), image=ImageInputs.from_pixels(pixels),
                          image_ids=torch.arange(n_images), caption_ids=torch.tensor(idx))
            loss = model(batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        speech, image = embed_speech(model, ds).pooled, embed_images(model, ds).pooled
        caption_image = torch.tensor(ds.caption_image_index)
    finally:
        torch.set_num_threads(threads)
    recall = recall_at_k(speech, image, caption_image, ks=(1, 5))
    # Chance with 24 images: R@1 = 1/24 and R@5 = 5/24 speech → image; R@5 about 5/24 image → speech.
    chance_r1, chance_r5 = 100 / n_images, 500 / n_images
    assert recall["speech_to_image"]["R@1"] >= 3 * chance_r1, recall
    assert recall["speech_to_image"]["R@5"] >= 2 * chance_r5, recall
    assert recall["image_to_speech"]["R@5"] >= 2 * chance_r5, recall


# ---------------------------------------------------------------------------------------------------------
# Recipes and packaging
# ---------------------------------------------------------------------------------------------------------


def test_speechclip_recipes_parse_and_merge() -> None:
    from vgskit.experiment import DataConfig, data_config_from, load_experiment
    from vgskit.train.config import TrainConfig, config_from_dict

    names = {p.stem for p in RECIPES}
    assert names == {f"speechclip_{b}_{s}_{c}" for b in ("parallel", "cascaded") for s in ("base", "large")
                     for c in ("flickr8k", "spokencoco")}
    has_crop = "train_crop" in {f.name for f in fields(DataConfig)}
    for path in RECIPES:
        exp = load_experiment(path)
        model = dict(exp["model"])
        name = model.pop("name")
        branches, size = path.stem.split("_")[1:3]
        assert name == f"speechclip_{branches}_{size}"
        cfg = model_config(name, **model)  # merges into SpeechCLIPConfig without building towers
        assert isinstance(cfg, SpeechCLIPConfig) and cfg.vocab_from_captions and cfg.branches == branches
        data = dict(exp["data"])
        assert data["train_crop"] == "random" and data["train_max_seconds"] == 6.4
        if not has_crop:  # the loader option may not exist yet in this checkout
            data.pop("train_crop")
        dcfg = data_config_from(data)
        assert dcfg.corpus == path.stem.split("_")[-1] and dcfg.eval_max_seconds is None
        train = config_from_dict(TrainConfig, exp["train"], prefix="train")
        assert (train.optimizer, train.lr, train.weight_decay, train.batch_size) == ("adam", 1e-4, 1e-6, 256)
        assert (train.warmup_steps, train.max_steps, train.end_lr, train.grad_clip, train.amp) == (
            5000, 50000, 1e-8, 4.0, True)


def test_importing_models_does_not_import_transformers() -> None:
    code = "import sys, vgskit.models; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
