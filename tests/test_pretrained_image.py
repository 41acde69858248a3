"""Pretrained image/text towers: tiny random CLIP, ViT (DINO-style) and MAE checkpoints loaded from folders,
and EfficientNet-Lite0 with its real packaged ImageNet weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    ViTConfig,
    ViTMAEConfig,
    ViTMAEModel,
    ViTModel,
)

from vgskit.encoders.efficientnet import LITE0_TRANSFORM, EfficientNetLite0Encoder
from vgskit.encoders.pretrained_image import PretrainedImageConfig, PretrainedImageEncoder
from vgskit.encoders.text import ClipTextConfig, ClipTextEncoder
from vgskit.errors import ConfigError

VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CLIPModel]:
    torch.manual_seed(0)
    text = dict(VIT, vocab_size=100, max_position_embeddings=20, bos_token_id=98, eos_token_id=99)
    del text["image_size"], text["patch_size"]
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=VIT, projection_dim=16)).eval()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder, model


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _features(out: object) -> torch.Tensor:
    # get_*_features returns a tensor in older transformers and an output object in newer ones.
    return getattr(out, "pooler_output", out)


def test_clip_vision_matches_clip_image_features(clip_dir) -> None:
    folder, model = clip_dir
    enc = PretrainedImageEncoder(PretrainedImageConfig(str(folder)))
    out = enc(_pixels())
    assert out.tokens.shape == (2, 16, 32) and out.pooled.shape == (2, 16) and enc.width == 16
    with torch.no_grad():
        torch.testing.assert_close(out.pooled, _features(model.get_image_features(pixel_values=_pixels())))
    # Preprocessing travels with the weights: CLIP's statistics, resize + centre crop at 32.
    assert enc.transform.size == 32 and enc.transform.resize_mode == "shorter_side_center_crop"
    assert enc.transform.mean[0] == pytest.approx(0.48145466)
    assert not any(p.requires_grad for p in enc.parameters())


def test_clip_text_ids_and_embeddings_paths(clip_dir) -> None:
    folder, model = clip_dir
    enc = ClipTextEncoder(ClipTextConfig(str(folder)))
    ids = torch.tensor([[98, 5, 6, 99, 0], [98, 7, 99, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    out = enc(ids, mask)
    with torch.no_grad():
        want = _features(model.get_text_features(input_ids=ids, attention_mask=mask))
    torch.testing.assert_close(out.pooled, want)
    assert out.tokens.shape == (2, 5, 32) and enc.eot_positions(ids).tolist() == [3, 2]
    # Feeding embeddings (cascaded SpeechCLIP) is the same computation, and gradients reach the embeddings.
    emb = enc.embed_tokens(ids).clone().requires_grad_(True)
    via_emb = enc.forward_embeddings(emb, torch.tensor([3, 2]), mask)
    torch.testing.assert_close(via_emb.pooled, want)
    via_emb.pooled.sum().backward()
    assert emb.grad is not None and emb.grad[0, :4].abs().sum() > 0
    assert emb.grad[0, 4].abs().sum() == 0  # causal: nothing after EOT influences the EOT state
    assert enc.token_embedding.weight.shape == (100, 32)
    assert enc.tokenizer is None  # the tiny folder has no tokenizer files
    with pytest.raises(Exception, match="tokenizer"):
        enc.tokenize(["a cat"])


def test_vit_dino_style_cls_pooling(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**VIT), add_pooling_layer=False).eval()
    model.save_pretrained(tmp_path)
    enc = PretrainedImageEncoder(PretrainedImageConfig(str(tmp_path)))
    out = enc(_pixels())
    with torch.no_grad():
        ref = model(_pixels()).last_hidden_state
    torch.testing.assert_close(out.pooled, ref[:, 0])
    torch.testing.assert_close(out.tokens, ref[:, 1:])
    assert enc.transform.size == 32  # no preprocessor file: the model's own image size


def test_mae_unmasked_tokens_in_raster_order(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ViTMAEConfig(**VIT, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                       decoder_intermediate_size=32, decoder_num_attention_heads=2)
    ViTMAEModel(cfg).save_pretrained(tmp_path)
    enc = PretrainedImageEncoder(PretrainedImageConfig(str(tmp_path)))
    px = _pixels()
    out = enc(px)
    assert out.tokens.shape == (2, 16, 32)
    torch.testing.assert_close(out.pooled, out.tokens.mean(dim=1))
    # A randomly shuffled pass, put back in order with MAE's own ids_restore, must give the same tokens:
    # so ours are unmasked and in raster order.
    with torch.no_grad():
        shuffled = enc.model(pixel_values=px, noise=torch.rand(2, 16, generator=torch.Generator().manual_seed(5)))
    idx = shuffled.ids_restore.unsqueeze(-1).expand(-1, -1, 32)
    restored = torch.gather(shuffled.last_hidden_state[:, 1:], 1, idx)
    assert not torch.allclose(shuffled.last_hidden_state[:, 1:], out.tokens, atol=1e-4)
    torch.testing.assert_close(restored, out.tokens, atol=1e-5, rtol=1e-4)


def test_missing_image_tower_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PretrainedImageEncoder(PretrainedImageConfig(str(tmp_path / "towers" / "dino")))


# ImageNet class ids asserted on (no class-name list ships with the weights):
# 281 tabby, 282 tiger cat, 285 Egyptian cat; 504 coffee mug, 967 espresso, 968 cup.
CAT_IDS = {281, 282, 285}
COFFEE_IDS = {504, 967, 968}


def test_efficientnet_lite0_real_weights_classify_sample_photos() -> None:
    enc = EfficientNetLite0Encoder()
    pixels = torch.stack([LITE0_TRANSFORM(Image.fromarray(data.chelsea())), LITE0_TRANSFORM(Image.fromarray(data.coffee()))])
    with torch.no_grad():
        probs = enc.logits(pixels).softmax(-1)
        out = enc(pixels)
    assert int(probs[0].argmax()) in CAT_IDS and float(probs[0, sorted(CAT_IDS)].sum()) > 0.8
    assert int(probs[1].argmax()) in COFFEE_IDS and float(probs[1, sorted(COFFEE_IDS)].sum()) > 0.8
    assert out.tokens.shape == (2, 49, 1280) and out.pooled.shape == (2, 1280)


def test_max_pooling_is_the_channelwise_maximum_of_the_patch_tokens(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ViTModel(ViTConfig(**VIT), add_pooling_layer=False).eval().save_pretrained(tmp_path)
    enc = PretrainedImageEncoder(PretrainedImageConfig(str(tmp_path), pool="max", project=False))
    out = enc(_pixels())
    by_hand = torch.stack([torch.stack([out.tokens[b, :, c].max() for c in range(out.tokens.shape[2])])
                           for b in range(out.tokens.shape[0])])
    assert torch.equal(out.pooled, by_hand) and not torch.equal(out.pooled, out.tokens.mean(dim=1))
    with pytest.raises(ConfigError, match="'cls', 'mean', 'max'"):
        PretrainedImageConfig(str(tmp_path), pool="sum")  # type: ignore[arg-type]
