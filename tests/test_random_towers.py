"""Towers with random weights described by their architecture (``architecture=``), for models trained from scratch.

They need no tower folder, so a checkpoint of such a model must rebuild and load anywhere; a misspelt field must not
silently build transformers' default (HuBERT-Base sized) model.
"""

from __future__ import annotations

import pytest
import torch

from vgskit.encoders.hub import random_hf_config
from vgskit.encoders.pretrained_image import PretrainedImageConfig, PretrainedImageEncoder
from vgskit.encoders.pretrained_speech import PretrainedSpeechConfig, PretrainedSpeechEncoder
from vgskit.errors import ConfigError
from vgskit.models import create_model
from vgskit.models.registry import load_pretrained, save_pretrained

HUBERT = {"model_type": "hubert", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 32, "conv_dim": [8, 8, 8, 8, 8, 8, 8], "num_conv_pos_embeddings": 8,
          "num_conv_pos_embedding_groups": 2}
VIT = {"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 16, "num_hidden_layers": 1,
       "num_attention_heads": 2, "intermediate_size": 32}


def test_random_config_takes_the_fields_and_rejects_typos_and_other_families() -> None:
    cfg = random_hf_config(HUBERT, ("hubert", "wav2vec2"), "speech.architecture")
    assert (cfg.hidden_size, cfg.num_hidden_layers, list(cfg.conv_dim)) == (16, 2, [8] * 7)
    with pytest.raises(ConfigError, match=r"unknown hubert config fields \['hiden_size'\]"):
        random_hf_config({**HUBERT, "hiden_size": 8}, ("hubert",), "speech.architecture")
    with pytest.raises(ConfigError, match="speech.architecture.model_type must be one of"):
        random_hf_config(VIT, ("hubert", "wav2vec2"), "speech.architecture")
    with pytest.raises(ConfigError, match="must be a mapping"):
        random_hf_config(["hubert"], ("hubert",), "speech.architecture")  # type: ignore[arg-type]


def test_random_towers_build_without_files_at_the_stated_sizes(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing to find on disk, and the name is not looked up
    speech = PretrainedSpeechEncoder(PretrainedSpeechConfig(name_or_path="no-such-tower", architecture=HUBERT,
                                                            cls_position="after_pos_conv"))
    out = speech(torch.randn(2, 8000), torch.tensor([8000, 6400]))
    assert out.last_hidden_state.shape == (2, 24, 16) and out.lengths.tolist() == [24, 19]  # 320x downsampling
    assert out.cls is not None and out.cls.shape == (2, 1, 16) and out.frame_rate == 50.0
    assert speech.preprocessing.sample_rate == 16000 and not speech.preprocessing.normalize  # group-norm CNN
    image = PretrainedImageEncoder(PretrainedImageConfig(name_or_path="no-such-tower", architecture=VIT,
                                                         project=False, freeze=False))
    out = image(torch.randn(3, 3, 32, 32))
    assert out.tokens.shape == (3, 16, 16) and out.pooled.shape == (3, 16)
    assert image.transform.size == 32


def test_seeded_random_towers_differ_by_seed_and_repeat_by_seed() -> None:
    def weights(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        enc = PretrainedImageEncoder(PretrainedImageConfig(architecture=VIT, project=False, freeze=False))
        # The first attention weight, whatever transformers names it in this version.
        return next(p for n, p in enc.model.named_parameters() if n.endswith("weight") and "q" in n).detach().clone()

    assert torch.equal(weights(1), weights(1)) and not torch.equal(weights(1), weights(2))


def test_a_model_with_random_towers_saves_and_loads_anywhere(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("vg_hubert_scenes", speech={"architecture": HUBERT},
                         image={"architecture": VIT}, embed_dim=8, segment_layer=1).eval()
    wavs, lengths, pixels = torch.randn(2, 6400), torch.tensor([6400, 4800]), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = (model.encode_speech(wavs, lengths), model.encode_image(pixels))
    save_pretrained(model, tmp_path / "m")
    torch.manual_seed(123)  # another initialisation: only the stored weights can reproduce the embeddings
    loaded = load_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        got = (loaded.encode_speech(wavs, lengths), loaded.encode_image(pixels))
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
