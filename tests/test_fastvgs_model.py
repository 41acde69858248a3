"""FaST-VGS assembled on the model contract: what trains, what the embeddings are, the fine scorer, the loss
weights, and coarse-to-fine retrieval against an exhaustive fine ranking.

Everything runs on a tiny random wav2vec2 saved locally (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from _regions import write_grid_regions
from _tiny_speechclip import SPEECH
from vgskit.contract import Batch, Embeddings, ImageInputs, SpeechInputs, TrainState
from vgskit.data.loader import RegionSource, collate_spoken_captions
from vgskit.experiment import make_dataset
from vgskit.models import create_model, list_models, model_config
from vgskit.models.fast_vgs import FastVGS, FastVGSConfig
from vgskit.retrieval.evaluate import embed_images, embed_speech, evaluate

REGION_DIM = 6  # mean and std of RGB of each grid cell


@pytest.fixture(scope="module")
def wav2vec2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wav2vec2")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Wav2Vec2Model(Wav2Vec2Config(**SPEECH)).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(folder)
    return folder


def tiny_model(folder: Path, seed: int = 0) -> FastVGS:
    torch.manual_seed(seed)
    model = create_model("fast_vgs_tiny", speech={"name_or_path": str(folder)}, region_feat_dim=REGION_DIM)
    assert isinstance(model, FastVGS)
    return model


def random_batch(seed: int = 0) -> Batch:
    """Six captions of four images (two images with two captions each), 0.4-1.5 s of noise each."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([24000, 16000, 8000, 20000, 6400, 12000])
    wavs = torch.randn(6, int(lengths.max()), generator=g) * 0.1
    wavs = wavs * (torch.arange(wavs.shape[1]) < lengths[:, None])
    image_ids = torch.tensor([0, 0, 1, 2, 3, 3])
    feats = torch.randn(4, 5, REGION_DIM, generator=g)[image_ids]  # rows of one image are identical
    boxes = torch.rand(4, 5, 4, generator=g)[image_ids]
    region_mask = torch.ones(6, 5, dtype=torch.bool)
    region_mask[2, 3:] = False  # one image with fewer detections
    image = ImageInputs("regions", regions=feats, boxes=boxes, region_mask=region_mask)
    return Batch(SpeechInputs.waveform(wavs, lengths), image, image_ids, torch.arange(6))


def hand_margin_infonce(scores: torch.Tensor, image_ids: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Written out: diagonal minus the margin, other captions of the same image removed, two directions summed."""
    n = scores.shape[0]
    total = scores.new_zeros(())
    for s in (scores, scores.T):
        per_row = []
        for i in range(n):
            keep = [j for j in range(n) if j == i or image_ids[j] != image_ids[i]]
            logits = torch.stack([s[i, j] - (margin if j == i else 0.0) for j in keep])
            per_row.append(-F.log_softmax(logits, dim=0)[keep.index(i)])
        total = total + torch.stack(per_row).mean()
    return total


def test_registered_presets_and_paper_sizes() -> None:
    assert {"fast_vgs", "fast_vgs_tiny"} <= set(list_models())
    paper = model_config("fast_vgs")  # no weights needed: the tower loads when the model is built
    assert isinstance(paper, FastVGSConfig)
    assert (paper.layer.hidden_size, paper.layer.ffn_dim, paper.layer.initializer_range) == (768, 3072, 0.02)
    assert paper.layer.num_heads == 8  # the paper: 8 heads in every new Transformer layer (12 only in wav2vec2's)
    assert (paper.audio_layers, paper.visual_layers, paper.cross_layers) == (1, 6, 2)
    assert (paper.coarse_weight, paper.fine_weight, paper.margin) == (0.1, 1.0, 1.0)
    assert paper.speech.num_layers == 8 and paper.speech.cls_position == "before_pos_conv"
    assert paper.speech.freeze_cnn and paper.resdavenet_strides == (2, 2, 2, 2)


def test_only_trainable_parts_get_gradients(wav2vec2: Path) -> None:
    model = tiny_model(wav2vec2).train()
    out = model.step(random_batch(), TrainState())
    assert set(out.losses) == {"coarse", "fine"}
    out.loss.backward()
    cnn = {f"speech_tower.model.feature_extractor.{n}" for n, _ in
           model.speech_tower.model.feature_extractor.named_parameters()}
    assert cnn
    for name, p in model.named_parameters():
        if name in cnn:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad, name
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # The new layers, the tower's transformer and its CLS all learn.
    for name in ("visual_cls", "speech_tower.cls_tokens", "audio_proj.weight", "cross_encoder.score_head.0.weight",
                 "resdavenet.input_proj.weight", "region_encoder.box_proj.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_pooled_embeddings_are_raw_dot_product_vectors(wav2vec2: Path) -> None:
    model = tiny_model(wav2vec2).eval()
    batch = random_batch()
    with torch.no_grad():
        speech, image = model.embed_speech(batch.speech), model.embed_image(batch.image)
        # The pooled vectors are the projections of the CLS outputs, without any normalisation.
        assert torch.allclose(speech.pooled, model.audio_proj(speech.tokens[:, 0]), atol=1e-6)
        assert torch.allclose(image.pooled, model.visual_proj(image.tokens[:, 0]), atol=1e-6)
    for emb in (speech, image):
        norms = emb.pooled.norm(dim=-1)
        assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-3)
    # Token sequences carry the CLS first, then the real tokens (mask True) and the padding.
    assert speech.mask is not None and image.mask is not None
    assert speech.mask[:, 0].all() and image.mask[:, 0].all()
    assert image.tokens is not None and image.tokens.shape[1] == 1 + batch.image.regions.shape[1]
    assert image.mask[2].tolist() == [True, True, True, True, False, False]
    assert speech.mask.sum(1).tolist() != [speech.mask.shape[1]] * len(batch)  # shorter utterances padded


def test_score_pairs_is_the_cross_encoder_on_the_token_sequences(wav2vec2: Path) -> None:
    model = tiny_model(wav2vec2).eval()
    batch = random_batch()
    with torch.no_grad():
        speech, image = model.embed_speech(batch.speech), model.embed_image(batch.image)
        rows, cols = [0, 3, 5, 2], [1, 1, 4, 2]
        s, v = speech.select(rows), image.select(cols)
        got = model.score_pairs(s, v)
        assert s.mask is not None and v.mask is not None and s.tokens is not None and v.tokens is not None
        audio_mask = (1.0 - s.mask.float())[:, None, None, :] * -10000.0
        visual_mask = (1.0 - v.mask.float())[:, None, None, :] * -10000.0
        want = model.cross_encoder(s.tokens, audio_mask, v.tokens, visual_mask)[:, 0]
        # Each pair alone (no padding beyond its own tokens) scores the same.
        alone = torch.stack([model.score_pairs(speech.select([r]), image.select([c]))[0]
                             for r, c in zip(rows, cols, strict=True)])
    assert got.shape == (4,)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got, alone, atol=1e-4)


def test_step_losses_are_the_weighted_margin_infonce(wav2vec2: Path) -> None:
    model = tiny_model(wav2vec2).eval()  # eval: BatchNorm running statistics, the same in step and by hand
    batch = random_batch()
    with torch.no_grad():
        out = model.step(batch, TrainState())
        speech = model.embed_speech(batch.speech)
        image = model.embed_image(batch.image)  # every row's own image (rows of one image are identical)
        coarse = hand_margin_infonce(speech.pooled @ image.pooled.T, batch.image_ids)
        n = len(batch)
        fine_scores = torch.tensor([[float(model.score_pairs(speech.select([i]), image.select([j])))
                                     for j in range(n)] for i in range(n)])
        fine = hand_margin_infonce(fine_scores, batch.image_ids)
    assert float(out.losses["coarse"]) == pytest.approx(0.1 * float(coarse), rel=1e-5)
    assert float(out.losses["fine"]) == pytest.approx(1.0 * float(fine), rel=1e-4)
    weighted = tiny_model(wav2vec2)
    weighted.load_state_dict(model.state_dict())
    weighted.config.coarse_weight, weighted.config.fine_weight = 0.5, 2.0
    with torch.no_grad():
        again = weighted.eval().step(batch, TrainState())
    assert float(again.losses["coarse"]) == pytest.approx(5.0 * float(out.losses["coarse"]), rel=1e-5)
    assert float(again.losses["fine"]) == pytest.approx(2.0 * float(out.losses["fine"]), rel=1e-5)


# ----------------------------------------------------------------------------- training, coarse-to-fine


@pytest.fixture(scope="module")
def regions(tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Region features of every image of the tiny corpus: the 2×2 grid cells (mean and std of RGB)."""
    return write_grid_regions(tiny_manifest, tmp_path_factory.mktemp("regions") / "regions.h5", (0.9, 0.8, 0.7, 0.6))


def _exhaustive_fine_recall(model: FastVGS, speech: Embeddings, image: Embeddings, labels: list[int],
                            ks: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Recall from the fine scores of every (caption, image) pair, each scored alone (ties count against)."""
    with torch.no_grad():
        fine = torch.tensor([[float(model.score_pairs(speech.select([c]), image.select([i])))
                              for i in range(len(image))] for c in range(len(speech))])
    s2i = [int((fine[c] >= fine[c, labels[c]]).sum()) for c in range(len(speech))]
    i2s = []
    for i in range(len(image)):
        relevant = [c for c in range(len(speech)) if labels[c] == i]
        best = max(float(fine[c, i]) for c in relevant)
        i2s.append(1 + sum(1 for c in range(len(speech)) if labels[c] != i and float(fine[c, i]) >= best))
    return {d: {f"R@{k}": 100.0 * sum(r <= k for r in ranks) / len(ranks) for k in ks}
            for d, ranks in (("speech_to_image", s2i), ("image_to_speech", i2s))}


def test_trains_and_coarse_to_fine_over_the_whole_gallery_is_exhaustive_fine_recall(
        wav2vec2: Path, tiny_manifest: Path, regions: Path) -> None:
    model = tiny_model(wav2vec2)
    ds = make_dataset(tiny_manifest, "train", model.image_transform, max_seconds=2.0, preload=True,
                      progress=False, regions=RegionSource(regions))
    by_image: dict[int, list[int]] = {}
    for i, img in enumerate(ds.caption_image_index):
        by_image.setdefault(img, []).append(i)
    # A small fixed set: two captions of each of the first six images, in batches of three images.
    rows = [c for caps in list(by_image.values())[:6] for c in caps[:2]]
    batches = [collate_spoken_captions([ds[i] for i in rows[s:s + 6]]) for s in (0, 6)]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for step in range(30):
        out = model(batches[step % 2], TrainState(step=step, total_steps=30))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert sum(losses[-4:]) < sum(losses[:4]), losses

    model.eval()
    sub = make_dataset(tiny_manifest, "train", model.image_transform, max_seconds=2.0, preload=True,
                       progress=False, regions=RegionSource(regions), max_images=6)
    speech, image = embed_speech(model, sub), embed_images(model, sub)
    labels = list(sub.caption_image_index)
    top = len(speech)  # the whole gallery of both directions
    ks = (1, 2, 5)
    results = evaluate(model, sub, rerank_top=top, ks=ks)
    expected = _exhaustive_fine_recall(model, speech, image, labels, ks)
    for direction in ("speech_to_image", "image_to_speech"):
        for k in ks:
            assert results[direction][f"R@{k}"] == pytest.approx(expected[direction][f"R@{k}"], abs=1e-9)
