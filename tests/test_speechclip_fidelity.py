"""SpeechCLIP options that reproduce the reference where our defaults differ on purpose: the captions the keyword
vocabulary comes from, HuBERT-Large's raw last hidden state, the frozen HuBERT's dropout in training, and the
pre-release keyword projection MLP of cascaded large (Table 1's 6.1 M parameters)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

from _tiny_speechclip import SPEECH, Towers, make_towers, tiny_batch, tiny_config
from vgskit.data.manifest import Record, read_manifest, write_manifest
from vgskit.encoders.pretrained_speech import PretrainedSpeechEncoder
from vgskit.encoders.text import load_clip_tokenizer
from vgskit.errors import ConfigError
from vgskit.layers import lengths_to_mask
from vgskit.models.registry import merge_config, model_config
from vgskit.models.speechclip import (
    CascadedBranch,
    KeywordProjection,
    RawLastStateSpeechEncoder,
    SpeechCLIP,
    SpeechCLIPConfig,
    build_keyword_vocabulary,
    keyword_vocab_texts,
)

RECIPES = sorted((Path(__file__).parents[1] / "src" / "vgskit" / "recipes").glob("*speechclip_*.yaml"))


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> Towers:
    return make_towers(tmp_path_factory)


def _save_hubert(folder: Path, **overrides) -> str:
    torch.manual_seed(5)
    HubertModel(HubertConfig(**dict(SPEECH, **overrides))).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def prenorm_hubert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny HuBERT laid out as HuBERT large: pre-norm layers and a final encoder LayerNorm."""
    return _save_hubert(tmp_path_factory.mktemp("hubert_prenorm"), do_stable_layer_norm=True, feat_extract_norm="layer")


@pytest.fixture(scope="module")
def dropout_hubert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny HuBERT with HuBERT base's dropouts (0.1)."""
    return _save_hubert(tmp_path_factory.mktemp("hubert_dropout"), hidden_dropout=0.1, attention_dropout=0.1,
                        activation_dropout=0.1, feat_proj_dropout=0.1)


# ---------------------------------------------------------------------------------------------------------
# Keyword vocabulary: training captions or every split's
# ---------------------------------------------------------------------------------------------------------

# Train and test share "a" and "dog"; every other word belongs to one split only.
SPLIT_CAPTIONS = {
    "train": ["a small red bag", "the dog left"],
    "dev": ["a blue cat"],
    "test": ["a pink sneaker above the dog"],
}


@pytest.fixture()
def manifest(tmp_path: Path) -> Path:
    records = [Record(caption_id=f"{split}{i}", audio=f"{split}{i}.wav", image=f"{split}{i}.jpg",
                      image_id=f"{split}{i}", split=split, text=text)
               for split, texts in SPLIT_CAPTIONS.items() for i, text in enumerate(texts)]
    records.append(Record(caption_id="silent", audio="s.wav", image="s.jpg", image_id="s", split="test", text=None))
    return write_manifest(records, tmp_path / "manifest.jsonl")


def test_vocabulary_from_the_training_split_or_every_split(towers: Towers, manifest: Path) -> None:
    tok = load_clip_tokenizer(str(towers.clip))
    records = read_manifest(manifest, check_files=False)
    assert keyword_vocab_texts(records, "train") == SPLIT_CAPTIONS["train"]
    assert keyword_vocab_texts(records, "all_splits") == [t for texts in SPLIT_CAPTIONS.values() for t in texts]
    with pytest.raises(ConfigError, match="vocab_caption_splits must be one of"):
        keyword_vocab_texts(records, "dev")

    def ids(*words: str) -> set[int]:
        return {tok.convert_tokens_to_ids(w + "</w>") for w in words}

    specials = {0, towers.vocab_size - 2, towers.vocab_size - 1}
    train = build_keyword_vocabulary(tok, keyword_vocab_texts(records, "train"))
    every = build_keyword_vocabulary(tok, keyword_vocab_texts(records, "all_splits"))
    assert train == sorted(ids("a", "small", "red", "bag", "the", "dog", "left") | specials)
    assert len(train) == 10
    assert every == sorted(set(train) | ids("blue", "cat", "pink", "sneaker", "above"))
    assert len(every) == 15
    # Subwords heard only in the dev/test captions are keywords only with every split's captions.
    assert not ids("blue", "cat", "pink", "sneaker", "above") & set(train)


def test_adapt_config_reads_the_configured_captions(towers: Towers, manifest: Path) -> None:
    tok = load_clip_tokenizer(str(towers.clip))
    records = read_manifest(manifest, check_files=False)
    train_texts, all_texts = keyword_vocab_texts(records, "train"), keyword_vocab_texts(records, "all_splits")
    section = {"name": "speechclip_cascaded_base", "vocab_from_captions": True,
               **{k: v for k, v in asdict(tiny_config(towers, "cascaded")).items()
                  if k in ("speech", "image", "text", "parallel", "cascaded")}}

    # Default: the training split only, even when every split's captions are at hand.
    adapted = SpeechCLIP.adapt_config_to_corpus(section, train_texts, corpus_texts=all_texts)
    assert adapted["keyword_vocab"] == build_keyword_vocabulary(tok, train_texts)
    # all_splits: the reference's vocabulary.
    every = {**section, "vocab_caption_splits": "all_splits"}
    adapted = SpeechCLIP.adapt_config_to_corpus(every, train_texts, corpus_texts=all_texts)
    assert adapted["keyword_vocab"] == build_keyword_vocabulary(tok, all_texts) and len(adapted["keyword_vocab"]) == 15
    # Without every split's captions it refuses rather than build the smaller training vocabulary.
    with pytest.raises(ConfigError, match=r"vocab_caption_splits: 'all_splits'.*corpus_texts"):
        SpeechCLIP.adapt_config_to_corpus(every, train_texts)
    with pytest.raises(ConfigError, match="corpus's captions have no transcripts"):
        SpeechCLIP.adapt_config_to_corpus(every, train_texts, corpus_texts=["", ""])
    with pytest.raises(ConfigError, match="vocab_caption_splits"):
        merge_config(SpeechCLIPConfig(), {"vocab_caption_splits": "test"})

    model = SpeechCLIP(merge_config(model_config("speechclip_cascaded_base"),
                                    {k: v for k, v in adapted.items() if k != "name"}))
    assert model.config.vocab_caption_splits == "all_splits" and len(model.keyword_vocabulary) == 15


def test_recipes_state_their_vocabulary_captions() -> None:
    from vgskit.experiment import load_experiment

    for path in RECIPES:
        if path.stem == "_speechclip_common":  # no model section: the corpus bases set the vocabulary
            continue
        assert "vocab_caption_splits" in path.read_text(), f"{path.name} does not say which captions it uses"
        if not path.stem.startswith("_"):
            model = dict(load_experiment(path)["model"])
            # The paper recipes reproduce the reference runs, whose vocabulary (and released checkpoints') was read
            # from every split's captions.
            assert model_config(model.pop("name"), **model).vocab_caption_splits == "all_splits"


# ---------------------------------------------------------------------------------------------------------
# HuBERT: raw last hidden state, dropout of the frozen tower
# ---------------------------------------------------------------------------------------------------------


def _parallel(towers: Towers, hubert: str, **overrides) -> SpeechCLIP:
    torch.manual_seed(0)
    cfg = tiny_config(towers, "parallel", speech={"name_or_path": hubert}, **overrides)
    return SpeechCLIP(cfg)


def test_raw_last_hidden_state(towers: Towers, prenorm_hubert: str) -> None:
    ours = _parallel(towers, prenorm_hubert, layer_norm_states=True).eval()
    raw = _parallel(towers, prenorm_hubert, layer_norm_states=True, raw_last_hidden_state=True).eval()
    assert isinstance(raw.speech_tower, RawLastStateSpeechEncoder) and type(ours.speech_tower) is PretrainedSpeechEncoder
    assert raw.state_dict().keys() == ours.state_dict().keys()  # same weights; nothing new is saved
    b = tiny_batch(3)
    with torch.no_grad():
        raw.layer_sum.weights.copy_(torch.randn(raw.layer_sum.num_layers))
        ours_out = ours.speech_tower(b["wavs"], b["lengths"])
        raw_out = raw.speech_tower(b["wavs"], b["lengths"])
        # Every state but the last is the same; ours is the final LayerNorm of the raw last-layer output.
        for a, r in zip(ours_out.hidden_states[:-1], raw_out.hidden_states[:-1], strict=True):
            torch.testing.assert_close(a, r, rtol=0, atol=0)
        valid = lengths_to_mask(raw_out.lengths, raw_out.hidden_states[-1].shape[1]).unsqueeze(-1).float()
        norm = raw.speech_tower.model.encoder.layer_norm
        torch.testing.assert_close(ours_out.hidden_states[-1], norm(raw_out.hidden_states[-1]) * valid)
        assert not torch.allclose(ours_out.hidden_states[-1], raw_out.hidden_states[-1])
        # The weighted sum (each state layer-normed, as for large models) is a manual sum of the raw states.
        feats, _ = raw.speech_features(b["wavs"], b["lengths"])
        w = torch.softmax(raw.layer_sum.weights, dim=0)
        manual = sum(w[i] * F.layer_norm(s, s.shape[-1:]) for i, s in enumerate(raw_out.hidden_states))
        torch.testing.assert_close(feats, manual)


def test_raw_last_hidden_state_changes_nothing_for_post_norm_towers(towers: Towers) -> None:
    ours = _parallel(towers, str(towers.hubert)).eval()
    raw = _parallel(towers, str(towers.hubert), raw_last_hidden_state=True).eval()
    b = tiny_batch(2)
    with torch.no_grad():
        for a, r in zip(ours.speech_tower(b["wavs"], b["lengths"]).hidden_states,
                        raw.speech_tower(b["wavs"], b["lengths"]).hidden_states, strict=True):
            torch.testing.assert_close(a, r, rtol=0, atol=0)


def test_frozen_speech_dropout(towers: Towers, dropout_hubert: str) -> None:
    b = tiny_batch(3)

    def twice(model: SpeechCLIP) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return model.speech_features(b["wavs"], b["lengths"])[0], model.speech_features(b["wavs"], b["lengths"])[0]

    ours = _parallel(towers, dropout_hubert).train()
    ref = _parallel(towers, dropout_hubert, frozen_speech_dropout=True)
    assert ref.training and ref.speech_tower.training  # also right after construction
    ref.train()
    # Default: a frozen tower runs in eval mode even while the model trains, so two passes agree.
    assert not ours.speech_tower.training
    first, second = twice(ours)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # Reference behaviour: the tower's dropouts are on in training, so two passes differ ...
    assert ref.speech_tower.training and all(m.training for m in ref.speech_tower.modules() if isinstance(m, nn.Dropout))
    first, second = twice(ref)
    assert not torch.allclose(first, second)
    # ... the tower stays frozen, and it is not offered to a feature cache (its outputs are random).
    assert not any(p.requires_grad for p in ref.speech_tower.parameters())
    assert set(ref.frozen_towers()) == {"image"} and set(ours.frozen_towers()) == {"speech", "image"}
    # In eval mode both are deterministic and equal.
    ref.eval()
    ours.eval()
    assert not ref.speech_tower.training
    first, second = twice(ref)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, twice(ours)[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Keyword projection MLP (pre-release cascaded large)
# ---------------------------------------------------------------------------------------------------------


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_keyword_projection_mlp_gives_table_1_count() -> None:
    large = model_config("speechclip_cascaded_large").cascaded
    released = CascadedBranch(large)
    mlp = CascadedBranch(replace(large, projection_hidden_dims=(1024,)))
    # Layout of the reference MLPLayers(units=[1024, 1024, 768]): Linear, ReLU, Dropout, Linear.
    assert isinstance(mlp.proj, KeywordProjection)
    assert [type(m) for m in mlp.proj.sequential] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert {k for k in mlp.state_dict() if k.startswith("proj.")} == {
        "proj.sequential.0.weight", "proj.sequential.0.bias", "proj.sequential.3.weight", "proj.sequential.3.bias"}
    assert (mlp.proj.sequential[0].in_features, mlp.proj.sequential[0].out_features) == (1024, 1024)
    assert (mlp.proj.sequential[3].in_features, mlp.proj.sequential[3].out_features) == (1024, 768)
    # Trainable parameters with HuBERT large's 25 layer weights: 5.0 M released, 6.06 M with the MLP (Table 1:
    # >= 6.1 M for cascaded large); the MLP adds exactly one 1024 x 1024 layer.
    assert (_trainable(released) + 25) / 1e6 == pytest.approx(5.01, abs=0.005)
    assert (_trainable(mlp) + 25) / 1e6 == pytest.approx(6.06, abs=0.005)
    assert _trainable(mlp) - _trainable(released) == 1024 * 1024 + 1024


def test_keyword_projection_config(towers: Towers) -> None:
    cfg = tiny_config(towers, "cascaded", cascaded={"projection_hidden_dims": [24, 20], "projection_dropout": 0.2})
    assert cfg.cascaded.projection_hidden_dims == (24, 20)
    back = SpeechCLIPConfig(**json.loads(json.dumps(asdict(cfg))))
    assert back == cfg
    for bad in ({"projection_hidden_dims": [0]}, {"projection_hidden_dims": "64"}, {"projection_dropout": 1.0}):
        with pytest.raises(ConfigError, match=r"cascaded\.projection_"):
            merge_config(SpeechCLIPConfig(), {"cascaded": bad})
    branch = CascadedBranch(replace(cfg.cascaded, audio_dim=32, text_dim=16, vocab_size=50, masked_ids=(0,)))
    assert [m.out_features for m in branch.proj.sequential if isinstance(m, nn.Linear)] == [24, 20, 16]
    assert branch.proj.sequential[2].p == 0.2
    out = branch.eval()(torch.randn(2, 5, 32), torch.tensor([5, 3]))
    assert out.kw_proj.shape == (2, 4, 16) and out.keywords.shape == (2, 4, 16)
