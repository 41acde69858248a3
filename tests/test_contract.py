"""The model contract, checked over every registered model, and the toy models that exercise it through the
generic trainer, evaluator and search engine with no special case.

Every registered model needs a tiny builder in ``TINY_BUILDERS`` (a family with pretrained towers builds on
the tiny local towers of ``tests/_tiny_speechclip.py``); a registered name without one fails
:func:`test_every_registered_model_has_a_tiny_builder`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import _contract_toys  # noqa: F401  (registers the toy models)
import _toy_models  # noqa: F401
from _contract_toys import ToyEMAModel, ToyFixedModel, ema_momentum
from _regions import write_grid_regions
from _tiny_speechclip import Towers, make_towers, tiny_config
from vgskit.contract import Batch, Embeddings, SpeechInputs, StepOutput, TrainState
from vgskit.data.loader import RegionSource, SpokenCaptionDataset, collate_spoken_captions
from vgskit.errors import ConfigError
from vgskit.experiment import make_dataset, train_from_recipe
from vgskit.models import RetrievalModel, create_model, list_models, load_pretrained, save_pretrained
from vgskit.models.speechclip import SpeechCLIP
from vgskit.retrieval.engine import SearchEngine
from vgskit.retrieval.evaluate import embed_images, embed_speech, evaluate
from vgskit.train.config import TrainConfig
from vgskit.train.loop import Trainer

# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> Towers:
    return make_towers(tmp_path_factory)


@pytest.fixture(scope="module")
def region_file(tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Region features of every image of the tiny corpus: the 2×2 grid cells (mean and std of RGB)."""
    return write_grid_regions(tiny_manifest, tmp_path_factory.mktemp("regions") / "regions.h5", (0.2, 0.9, 0.5, 0.7))


def _dataset_for(model: RetrievalModel, manifest: Path, split: str, regions: Path | None) -> SpokenCaptionDataset:
    return make_dataset(manifest, split, model.image_transform, max_seconds=2.0, preload=True, progress=False,
                        regions=regions if model.image_input == "regions" else None, speech_input=model.speech_input)


# ------------------------------------------------------------------------------------------ tiny builders


def _speechclip(branches: str) -> Callable[[Towers], RetrievalModel]:
    def build(t: Towers) -> RetrievalModel:
        return SpeechCLIP(tiny_config(t, branches))

    return build


def _cmd(t: Towers) -> RetrievalModel:
    """Cross-Modal Denoising on the tiny parallel SpeechCLIP (no text tower: CMD has none)."""
    from dataclasses import replace

    from vgskit.models.speechclip.cmd import CMDConfig, CrossModalDenoising

    base = replace(tiny_config(t, "parallel"), text=None)
    return CrossModalDenoising(CMDConfig(**{name: getattr(base, name) for name in vars(base)}))


def _toy_frozen(t: Towers) -> RetrievalModel:
    return create_model("test_frozen_towers", speech_tower=str(t.hubert))


_TINY_WAV2VEC2: dict[str, str] = {}


def _tiny_wav2vec2() -> str:
    """A tiny random wav2vec2 (the HuBERT test tower's sizes) saved once per session; its own seeded RNG leaves
    the global one alone, so the first build and later ones start from the same weights."""
    import tempfile

    if "folder" in _TINY_WAV2VEC2:
        return _TINY_WAV2VEC2["folder"]
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from _tiny_speechclip import SPEECH

    folder = tempfile.mkdtemp(prefix="tiny_wav2vec2_")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Wav2Vec2Model(Wav2Vec2Config(**SPEECH)).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(folder)
    _TINY_WAV2VEC2["folder"] = folder
    return folder


def _fast_vgs(t: Towers) -> RetrievalModel:
    # 6-d region features: the mean and std of RGB of each grid cell (the region_file fixture).
    return create_model("fast_vgs_tiny", speech={"name_or_path": _tiny_wav2vec2()}, region_feat_dim=6)


_TINY_VIT: dict[str, str] = {}


def _vg_hubert(name: str) -> Callable[[Towers], RetrievalModel]:
    """A VG-HuBERT preset on the tiny HuBERT (2 layers, the last re-initialised) and a tiny random ViT saved once."""

    def build(t: Towers) -> RetrievalModel:
        import tempfile

        from transformers import ViTConfig, ViTModel

        if "folder" not in _TINY_VIT:
            folder = tempfile.mkdtemp(prefix="tiny_vit_")
            with torch.random.fork_rng():
                torch.manual_seed(0)
                ViTModel(ViTConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                                   image_size=32, patch_size=8), add_pooling_layer=False).eval().save_pretrained(folder)
            _TINY_VIT["folder"] = folder
        return create_model(name, speech={"name_or_path": str(t.hubert), "num_layers": 2, "reinit_last": 1},
                            image={"name_or_path": _TINY_VIT["folder"]}, embed_dim=16, proj_hidden=32,
                            segment_layer=1)

    return build


_TINY_MAE: dict[str, str] = {}


def _sg_mim(name: str) -> Callable[[Towers], RetrievalModel]:
    """An SG-MIM preset on the tiny HuBERT and a tiny random ViT-MAE saved once (16 patches), with a small decoder."""

    def build(t: Towers) -> RetrievalModel:
        import tempfile

        from transformers import ViTMAEConfig, ViTMAEModel

        if "folder" not in _TINY_MAE:
            folder = tempfile.mkdtemp(prefix="tiny_mae_")
            with torch.random.fork_rng():
                torch.manual_seed(0)
                ViTMAEModel(ViTMAEConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=48, image_size=32, patch_size=8)).eval().save_pretrained(folder)
            _TINY_MAE["folder"] = folder
        return create_model(name, speech={"name_or_path": str(t.hubert), "num_layers": 2, "reinit_last": 1},
                            image={"name_or_path": _TINY_MAE["folder"]}, embed_dim=16, segment_layer=1,
                            decoder_dim=16, decoder_heads=2, decoder_ffn=32)

    return build


#: Random-weight towers by architecture (the *_scenes presets' kind), at test sizes: no folder is written.
_SCENES_SPEECH = {"architecture": {"model_type": "hubert", "hidden_size": 16, "num_hidden_layers": 3,
                                   "num_attention_heads": 2, "intermediate_size": 32, "conv_dim": [8] * 7,
                                   "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 2,
                                   # Dropout off: six steps on one batch must lower the loss.
                                   "hidden_dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
                                   "feat_proj_dropout": 0.0, "layerdrop": 0.0}}
_SCENES_IMAGE = {"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 24, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "intermediate_size": 48}


# MILAN's text dual encoder on units learnt from a few captions of the tiny corpus's grammar (dropout off: six
# steps on one batch must lower the loss).
_TEXT_UNITS = {"num_merges": 40, "min_frequency": 1}
_TEXTS = ["a small red dress to the left of a blue bag", "a green sneaker above a white sandal and a pink shirt"]


def _milan_text(name: str, **sizes: Any) -> Callable[[Towers], RetrievalModel]:
    def build(t: Towers) -> RetrievalModel:
        from vgskit.models.milan.text import MilanText

        config = MilanText.adapt_config_to_corpus({**_TEXT_UNITS, **sizes, "dropout": 0.0}, _TEXTS, model_name=name)
        return create_model(name, **config)

    return build


_TINY_TEXT_MODEL: dict[str, str] = {}


def _asr_cascade(t: Towers) -> RetrievalModel:
    """The cascade over a saved tiny text model, reading transcripts (no recogniser needed for the contract)."""
    if "folder" not in _TINY_TEXT_MODEL:
        folder = tempfile.mkdtemp(prefix="vgskit-tiny-text-")
        torch.manual_seed(0)
        save_pretrained(_milan_text("milan_text_small")(t), folder)
        _TINY_TEXT_MODEL["folder"] = folder
    return create_model("asr_cascade", text_model=_TINY_TEXT_MODEL["folder"], asr={"kind": "transcripts"})


TINY_BUILDERS: dict[str, Callable[[Towers], RetrievalModel]] = {
    "fast_vgs": _fast_vgs,
    "fast_vgs_tiny": _fast_vgs,
    # The log-mel CNN front end (no pretrained tower) at the preset's own widths, on the 6-d test regions.
    # At fast_vgs_tiny's widths (dropout off), which the shared six steps at Adam lr 1e-2 suit.
    "fast_vgs_scenes": lambda t: create_model(
        "fast_vgs_scenes", region_feat_dim=6, resdavenet_widths=(16, 16, 16, 32, 32),
        speech_cnn={"stem_channels": (32,), "channels": (32,), "depths": (1,), "strides": (1,)},
        layer={"hidden_size": 32, "num_heads": 2, "ffn_dim": 64, "dropout": 0.0, "attention_dropout": 0.0}),
    "cmd_large": _cmd,
    "dual_encoder": lambda t: create_model("dual_encoder"),
    "dual_encoder_tiny": lambda t: create_model("dual_encoder_tiny"),
    # MILAN at test sizes: a tiny ResNet over MFCC frames, and a random-init EfficientNet-Lite0 at 32 px.
    "milan": lambda t: create_model(
        "milan", frontend={"n_mels": 24, "n_mfcc": 16},
        resnet={"depths": (1, 1), "widths": (8, 16), "strides": (1, 2), "expansion": 2, "stem_channels": 16},
        image={"weights": None, "image_size": 32}, embed_dim=16),
    "milan_small": lambda t: create_model("milan_small"),
    "milan_text": _milan_text("milan_text", width=16, heads=2, ffn_width=32, transformer_layers=1, embed_dim=16,
                              image={"weights": None, "image_size": 32}),
    "milan_text_small": _milan_text("milan_text_small"),
    "asr_cascade": _asr_cascade,
    "clip_text_zero_shot": lambda t: create_model("clip_text_zero_shot", text={"name_or_path": str(t.clip)},
                                                  image={"name_or_path": str(t.clip)}),
    **{f"speechclip_{b}_{s}": _speechclip(b) for b in ("parallel", "cascaded") for s in ("base", "large")},
    **{name: _vg_hubert(name) for name in ("vg_hubert", "vg_hubert_m", "vg_hubert_tiny")},
    **{name: _sg_mim(name) for name in ("sg_mim", "sg_mim_tiny")},
    "vg_hubert_scenes": lambda t: create_model("vg_hubert_scenes", speech=_SCENES_SPEECH,
                                               image={"architecture": _SCENES_IMAGE}, embed_dim=16, segment_layer=1),
    "sg_mim_scenes": lambda t: create_model(
        "sg_mim_scenes", speech=_SCENES_SPEECH, image={"architecture": {**_SCENES_IMAGE, "model_type": "vit_mae"}},
        embed_dim=16, segment_layer=1, decoder_dim=16, decoder_heads=2, decoder_ffn=32),
    "test_frozen_towers": _toy_frozen,
    "test_toy_text": lambda t: create_model("test_toy_text", vocabulary=("a", "red", "bag")),
    "test_no_extras": lambda t: create_model("test_no_extras"),
    "test_toy_regions": lambda t: create_model("test_toy_regions"),
    "test_toy_ema": lambda t: create_model("test_toy_ema"),
    "test_toy_fixed": lambda t: create_model("test_toy_fixed"),
}


def build_tiny(name: str, towers: Towers) -> RetrievalModel:
    torch.manual_seed(0)
    model = TINY_BUILDERS[name](towers)
    model.model_name = name  # the tiny config stands in for the preset under the registered name
    return model


def test_every_registered_model_has_a_tiny_builder() -> None:
    from vgskit.models import get_model_class

    # Every model the package registers (test modules register toys of their own, checked where they live).
    shipped = {n for n in list_models() if get_model_class(n).__module__.startswith("vgskit.")}
    assert {"dual_encoder", "speechclip_parallel_base"} <= shipped
    missing = sorted(shipped - set(TINY_BUILDERS))
    assert not missing, f"registered models without a tiny builder in tests/test_contract.py: {missing}"


MODELS = sorted(TINY_BUILDERS)


def _fixed_batch(model: RetrievalModel, manifest: Path, regions: Path | None, n: int = 8) -> Batch:
    ds = _dataset_for(model, manifest, "train", regions)
    # Two captions of each of n/2 images: a batch with same-image rows, as training batches are.
    by_image: dict[int, list[int]] = {}
    for i, img in enumerate(ds.caption_image_index):
        by_image.setdefault(img, []).append(i)
    rows = [i for caps in list(by_image.values())[: n // 2] for i in caps[:2]]
    return collate_spoken_captions([ds[i] for i in rows])


# ---------------------------------------------------------------------------------- contract, every model


@pytest.mark.parametrize("name", MODELS)
def test_contract(name: str, towers: Towers, tiny_manifest: Path, region_file: Path, tmp_path: Path) -> None:
    model = build_tiny(name, towers).eval()
    batch = _fixed_batch(model, tiny_manifest, region_file)
    b = len(batch)

    # Embedding shapes and dtypes; token-level outputs only with a fine scorer, which scores aligned rows.
    with torch.no_grad():
        speech = model.embed_speech(batch.speech)
        image = model.embed_image(batch.image)
    for emb in (speech, image):
        assert isinstance(emb, Embeddings)
        assert emb.pooled.shape == (b, model.embed_dim) and emb.pooled.dtype == torch.float32
        assert torch.isfinite(emb.pooled).all()
    if model.has_fine_scores:
        with torch.no_grad():
            scores = model.score_pairs(speech, image)
        assert scores.shape == (b,) and torch.isfinite(scores).all()

    # Save / load gives identical embeddings; the state dict holds parameters, BatchNorm statistics and
    # scalars only: a buffer sized by the data (a vocabulary's ids, a corpus count) breaks loading into a
    # model built from another corpus, so such things live in the config.
    save_pretrained(model, tmp_path / "m")
    state = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    others = [k for k in state if k not in params and state[k].numel() > 1
              and not k.endswith(("running_mean", "running_var"))]
    assert not others, f"{name}: state-dict buffers that are not parameters, BatchNorm statistics or scalars: {others}"
    loaded = load_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded.embed_speech(batch.speech).pooled, speech.pooled)
        assert torch.equal(loaded.embed_image(batch.image).pooled, image.pooled)

    if not model.trainable:
        assert not [p for p in model.parameters() if p.requires_grad]
        return

    # A few steps on one fixed batch lower the loss (the step's named losses reach the parameters).
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(6):
        out = model(batch, TrainState(step=step, total_steps=6))
        assert isinstance(out, StepOutput) and out.losses
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0], f"{name}: loss did not go down on a fixed batch: {losses}"


@pytest.mark.parametrize("name", MODELS)
def test_training_only_state_survives_a_checkpoint_and_stays_out_of_the_model(name: str, towers: Towers,
                                                                                tmp_path: Path) -> None:
    """``training_state()`` (e.g. CMD's fusion encoder) is restored from a training checkpoint, never collides with
    the state dict, and never reaches the exported model."""
    from vgskit.train.checkpoint import TRAINING_STATE, load_checkpoint, save_checkpoint

    model = build_tiny(name, towers)
    extra = model.training_state()
    assert not set(extra) & set(model.state_dict()), f"{name}: training-only keys collide with the state dict"
    with torch.no_grad():
        for v in extra.values():
            v.add_(0.5)  # trained values differ from a fresh model's
    saved = {k: v.detach().clone() for k, v in model.training_state().items()}
    ckpt = save_checkpoint(tmp_path / "ckpt", 1, model=model, trainer_state={"step": 1})
    assert (ckpt / TRAINING_STATE).is_file() == bool(saved)
    fresh = build_tiny(name, towers)
    load_checkpoint(ckpt, model=fresh)
    got = fresh.training_state()
    assert sorted(got) == sorted(saved) and all(torch.equal(got[k], saved[k]) for k in saved), name
    save_pretrained(model, tmp_path / "exported")
    assert not (tmp_path / "exported" / TRAINING_STATE).exists()


@pytest.mark.parametrize("name", ["dual_encoder_tiny", "speechclip_cascaded_base", "test_toy_regions",
                                  "test_toy_ema", "fast_vgs_tiny"])
def test_resume_is_exact(name: str, towers: Towers, tiny_manifest: Path, region_file: Path,
                         tmp_path: Path) -> None:
    """An interrupted and resumed run ends with the weights of an uninterrupted one (the generic trainer)."""

    def run(out: Path, stop_after: int | None, resume: bool) -> dict[str, torch.Tensor]:
        model = build_tiny(name, towers)
        ds = _dataset_for(model, tiny_manifest, "train", region_file)
        cfg = TrainConfig(lr=1e-3, batch_size=4, max_steps=6, ckpt_every=2, log_every=1, out_dir=str(out),
                          stop_after_steps=stop_after, eval_every=None, tensorboard=False, grad_clip=1.0)
        Trainer(model, cfg, ds, collate_spoken_captions, model_name=name, model_config=model.config,
                progress_bar=False).fit(resume=resume)
        return {k: v.clone() for k, v in model.state_dict().items()}

    straight = run(tmp_path / "a", None, False)
    run(tmp_path / "b", 3, False)
    resumed = run(tmp_path / "b", None, True)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


# ----------------------------------------------------------------------------- region model, re-ranking


def _brute_force_reranked(model: RetrievalModel, ds: SpokenCaptionDataset, top: int, ks: tuple[int, ...]
                          ) -> dict[str, dict[str, float]]:
    """Coarse-to-fine recall written out pair by pair: every (caption, image) fine score, then per query."""
    speech, image = embed_speech(model, ds), embed_images(model, ds)
    labels = ds.caption_image_index
    n_c, n_i = len(speech), len(image)
    with torch.no_grad():
        fine = torch.tensor([[float(model.score_pairs(speech.select([c]), image.select([i])))
                              for i in range(n_i)] for c in range(n_c)])
    coarse = speech.pooled @ image.pooled.T

    def first_hit(scores_coarse: list[float], scores_fine: list[float], relevant: set[int]) -> int:
        order = sorted(range(len(scores_coarse)), key=lambda j: (-scores_coarse[j], j))
        cand = order[:top]
        reranked = sorted(cand, key=lambda j: (-scores_fine[j], j))
        for rank, j in enumerate(reranked, start=1):
            if j in relevant:
                return rank
        return top + 1  # not among the candidates: never found at K <= top

    s2i = [first_hit(coarse[c].tolist(), fine[c].tolist(), {labels[c]}) for c in range(n_c)]
    i2s = [first_hit(coarse[:, i].tolist(), fine[:, i].tolist(), {c for c in range(n_c) if labels[c] == i})
           for i in range(n_i)]
    return {d: {f"R@{k}": 100.0 * sum(r <= k for r in ranks) / len(ranks) for k in ks}
            for d, ranks in (("speech_to_image", s2i), ("image_to_speech", i2s))}


def test_region_model_trains_evaluates_and_searches_coarse_to_fine(
        tiny_manifest: Path, region_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = {
        "model": {"name": "test_toy_regions"},
        "data": {"manifest": str(tiny_manifest), "region_features": str(region_file), "train_max_seconds": 3.0,
                 "rerank_top": 4, "val_split": "val"},
        "train": {"optimizer": "adam", "lr": 3e-3, "batch_size": 8, "max_steps": 12, "eval_every": 6,
                  "log_every": 1, "ckpt_every": 6, "tensorboard": False, "select_metric": "val/mean_R@1"},
    }
    summary = train_from_recipe(recipe, out_dir=tmp_path / "run", progress=False)
    assert summary["finished"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    # Both named losses are logged, and "loss" is their sum.
    assert train_rows and all(abs(r["loss"] - r["loss/coarse"] - r["loss/fine"]) < 1e-5 for r in train_rows)
    assert any("val/rerank_top" in r for r in rows)  # validation ran coarse-to-fine

    model = load_pretrained(Path(summary["best_checkpoint"]))
    ds = make_dataset(tiny_manifest, "train", model.image_transform, max_seconds=None, preload=True,
                      progress=False, regions=RegionSource(region_file))
    top, ks = 3, (1, 2, 3)
    results = evaluate(model, ds, rerank_top=top, ks=ks)
    expected = _brute_force_reranked(model, ds, top, ks)
    for direction in ("speech_to_image", "image_to_speech"):
        for k in ks:
            assert results[direction][f"R@{k}"] == pytest.approx(expected[direction][f"R@{k}"], abs=1e-9)
    coarse = evaluate(model, ds, ks=ks)
    assert coarse["speech_to_image"] != results["speech_to_image"]  # the fine stage changed the ranking

    # The command line reaches the same numbers.
    from vgskit.cli import main

    out_json = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--manifest", str(tiny_manifest), "--split",
                 "train", "--rerank-top", str(top), "--region-features", str(region_file), "--json",
                 str(out_json)]) == 0
    cli = json.loads(out_json.read_text())
    assert cli["speech_to_image"]["R@1"] == pytest.approx(results["speech_to_image"]["R@1"])
    assert "re-ranked" in capsys.readouterr().out

    # The search engine stores the image tokens the fine stage needs, and re-ranks by the fine scores.
    engine = SearchEngine.build_from_dataset(model, ds)
    engine.save(tmp_path / "index")
    engine = SearchEngine.load(tmp_path / "index", model)
    wav = ds.waveform(0).numpy()
    hits = engine.search_by_waveform(wav, k=2, rerank_top=top)
    query = SpeechInputs.waveform(torch.from_numpy(wav)[None], torch.tensor([len(wav)]))
    with torch.no_grad():
        q = model.embed_speech(query)
        img = model.embed_image(ds.image_inputs(range(len(ds.image_keys))))
        coarse_scores = (img.pooled @ q.pooled[0]).tolist()
        cand = sorted(range(len(coarse_scores)), key=lambda j: (-coarse_scores[j], j))[:top]
        fine = {j: float(model.score_pairs(q, img.select([j]))) for j in cand}
    want = sorted(cand, key=lambda j: (-fine[j], j))[:2]
    assert [h.item_id for h in hits] == [ds.image_keys[j] for j in want]
    assert [h.score for h in hits] == pytest.approx([fine[j] for j in want], abs=1e-5)


def test_region_model_needs_region_features(tiny_manifest: Path, tmp_path: Path) -> None:
    recipe = {"model": {"name": "test_toy_regions"}, "data": {"manifest": str(tiny_manifest)},
              "train": {"batch_size": 8, "max_steps": 1, "tensorboard": False}}
    with pytest.raises(ConfigError, match="region_features"):
        train_from_recipe(recipe, out_dir=tmp_path / "run", progress=False)


# --------------------------------------------------------------------------------------- EMA and epochs


class _RecordingEMA(ToyEMAModel):
    """Records the student weights the teacher sees after every update."""

    def __init__(self, config: Any):
        super().__init__(config)
        self.seen: list[tuple[TrainState, list[torch.Tensor]]] = []

    def after_step(self, state: TrainState) -> None:
        self.seen.append((state, [p.detach().clone() for p in self.image_proj.parameters()]))
        super().after_step(state)


def test_ema_teacher_follows_every_step_and_loss_weight_starts_at_its_epoch(tiny_manifest: Path,
                                                                           tmp_path: Path) -> None:
    from vgskit.models import model_config

    model = _RecordingEMA(model_config("test_toy_ema"))
    model.model_name = "test_toy_ema"
    start = [p.detach().clone() for p in model.teacher.parameters()]
    ds = make_dataset(tiny_manifest, "train", model.image_transform, max_seconds=2.0, preload=True,
                      progress=False)
    cfg = TrainConfig(lr=1e-2, batch_size=8, epochs=3, log_every=1, out_dir=str(tmp_path), eval_every=None,
                      tensorboard=False)
    trainer = Trainer(model, cfg, ds, collate_spoken_captions, model_name="test_toy_ema",
                      model_config=model.config, progress_bar=False)
    trainer.fit()
    steps = trainer.total_steps
    assert [s.step for s, _ in model.seen] == list(range(1, steps + 1))  # after every update, counted
    # The teacher is exactly the EMA of the student weights seen after each update, with the cosine momentum.
    expected = start
    for state, student in model.seen:
        m = ema_momentum(model.config.momentum, state.fraction)
        expected = [t.clone().mul_(m).add_(s, alpha=1.0 - m) for t, s in zip(expected, student, strict=True)]
    for got, want in zip(model.teacher.parameters(), expected, strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(expected[0], start[0])

    # The distillation loss enters at epoch 1: logged from the first step of epoch 1 on, never before.
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    per_epoch = steps // 3
    assert len(train) == steps
    for r in train:
        has_aux = "loss/distill" in r
        assert has_aux == (r["step"] > per_epoch), r
        total = r["loss/infonce"] + (r["loss/distill"] if has_aux else 0.0)
        assert r["loss"] == pytest.approx(total, rel=1e-6)


# ------------------------------------------------------------------------------------- no trainable weights


def test_model_without_weights_is_evaluated_as_built(tiny_manifest: Path, tmp_path: Path) -> None:
    from vgskit.cli import main
    from vgskit.metrics import recall_at_k

    model = create_model("test_toy_fixed").eval()
    assert isinstance(model, ToyFixedModel) and model.state_dict() == {}
    ds = make_dataset(tiny_manifest, "test", model.image_transform, max_seconds=None, preload=True,
                      progress=False)
    with torch.no_grad():
        wavs = [ds.waveform(i) for i in range(len(ds))]
        speech = torch.cat([model.encode_speech(w[None], torch.tensor([len(w)])) for w in wavs])
        image = torch.cat([model.encode_image(ds.pixels(i)[None]) for i in range(len(ds.image_keys))])
    expected = recall_at_k(speech, image, torch.tensor(ds.caption_image_index), (1, 5, 10))

    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "test_toy_fixed", "--manifest", str(tiny_manifest), "--split", "test",
                 "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    for direction in ("speech_to_image", "image_to_speech"):
        for k in (1, 5, 10):
            assert got[direction][f"R@{k}"] == pytest.approx(expected[direction][f"R@{k}"], abs=1e-6)
    # --set reaches the built model: another seed gives other embeddings, hence (here) other numbers.
    assert main(["eval", "--model", "test_toy_fixed", "--set", "seed=8", "--manifest", str(tiny_manifest),
                 "--split", "test", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["speech_to_image"] != got["speech_to_image"]

    # The search engine works on it as on any model; the trainer refuses it with a clear message.
    engine = SearchEngine.build_from_dataset(model, ds)
    hits = engine.search_by_waveform(wavs[0].numpy(), k=3)
    best = torch.topk(image @ speech[0], 3).indices.tolist()
    assert [h.item_id for h in hits] == [ds.image_keys[j] for j in best]
    with pytest.raises(ConfigError, match="no trainable weights"):
        Trainer(model, TrainConfig(max_steps=1, batch_size=2, out_dir=str(tmp_path / "t")), ds,
                collate_spoken_captions, model_name="test_toy_fixed")


def test_init_from_starts_from_another_runs_weights(tiny_manifest: Path, tmp_path: Path) -> None:
    base = {"model": {"name": "dual_encoder_tiny"},
            "data": {"manifest": str(tiny_manifest), "train_max_seconds": 2.0},
            "train": {"batch_size": 8, "max_steps": 3, "eval_every": None, "tensorboard": False,
                      "select_metric": None}}
    first = train_from_recipe(base, out_dir=tmp_path / "pre", progress=False)
    pre = load_pretrained(Path(first["last_checkpoint"]))
    # Zero learning rate: the fine-tuned model is exactly the weights it started from.
    tune = {**base, "train": {**base["train"], "lr": 1e-12, "init_from": first["last_checkpoint"]}}
    second = train_from_recipe(tune, out_dir=tmp_path / "tune", progress=False)
    tuned = load_pretrained(Path(second["last_checkpoint"]))
    fresh = create_model("dual_encoder_tiny")
    for (k, a), (_, b) in zip(pre.state_dict().items(), tuned.state_dict().items(), strict=True):
        if a.is_floating_point() and "running" not in k:
            assert torch.allclose(a, b, atol=1e-9), k
    assert any(not torch.equal(a, b) for a, b in zip(pre.state_dict().values(), fresh.state_dict().values(),
                                                     strict=True))
    bad = {**base, "model": {"name": "dual_encoder_tiny", "embed_dim": 8},
           "train": {**base["train"], "init_from": first["last_checkpoint"]}}
    with pytest.raises(ConfigError, match="do not fit"):
        train_from_recipe(bad, out_dir=tmp_path / "bad", progress=False)
