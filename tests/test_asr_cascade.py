"""MILAN's text dual encoder and the speech → ASR → text cascade, through the generic trainer, evaluator and CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from _recall_checks import assert_well_above_chance
from vgskit.asr.recognizers import audio_sha256
from vgskit.asr.wer import corpus_wer
from vgskit.contract import SpeechInputs
from vgskit.data.loader import collate_spoken_captions
from vgskit.data.manifest import read_manifest
from vgskit.errors import ConfigError
from vgskit.experiment import load_model, make_dataset, train_from_recipe
from vgskit.models import create_model
from vgskit.models.milan.tokenizer import learn_bpe
from vgskit.retrieval.evaluate import evaluate


@pytest.fixture(scope="module")
def text_run(tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A milan_text_small trained briefly on the tiny corpus's written captions by the generic trainer."""
    out = tmp_path_factory.mktemp("milan_text") / "run"
    recipe = {
        "model": {"name": "milan_text_small", "num_merges": 60},
        "data": {"manifest": str(tiny_manifest), "val_split": "val", "captions_per_image": 2, "preload": True,
                 "val_max_images": 4},
        "train": {"optimizer": "adam", "lr": 3e-3, "end_lr": 3e-3, "weight_decay": 0.0, "batch_size": 24,
                  "max_steps": 120, "eval_every": None, "log_every": 40, "ckpt_every": 120, "tensorboard": False,
                  "warmup_steps": 0, "grad_clip": None},
    }
    torch.manual_seed(0)
    summary = train_from_recipe(recipe, out_dir=out, progress=False)
    assert summary["finished"]
    return out


def test_text_dataset_serves_the_manifest_transcripts(tiny_manifest: Path, tmp_path: Path) -> None:
    records = read_manifest(tiny_manifest, split="test")
    ds = make_dataset(tiny_manifest, "test", {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
                      max_seconds=1.0, preload=True, progress=False, speech_input="text")
    speech = ds.speech_inputs([2, 0])
    assert speech.kind == "text" and speech.texts() == [records[2].text, records[0].text]
    assert ds.num_samples()[0] == len(records[0].text.encode("utf-8"))  # not cut by max_seconds
    batch = collate_spoken_captions([ds[1], ds[3]])
    assert batch.speech.texts() == [records[1].text, records[3].text]
    assert ds._audio is None  # no audio decoded for a text model

    # A caption without text is named.
    lines = tiny_manifest.read_text().splitlines()
    first = json.loads(lines[0])
    first.pop("text")
    bad = tmp_path / "manifest.jsonl"
    base = tiny_manifest.parent
    rows = [first] + [json.loads(line) for line in lines[1:]]
    for row in rows:
        row["audio"], row["image"] = str(base / row["audio"]), str(base / row["image"])
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ConfigError, match=rf"1 of \d+ captions have no 'text'.*{first['caption_id']}"):
        make_dataset(bad, first["split"], {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}, max_seconds=None,
                     preload=False, progress=False, speech_input="text")


def test_text_model_learns_its_units_from_the_training_captions_and_beats_chance(text_run: Path,
                                                                                 tiny_manifest: Path) -> None:
    model = load_model(text_run)
    train_texts = [r.text for r in read_manifest(tiny_manifest, split="train")]
    chars, merges = learn_bpe(train_texts, 60, 2)
    assert model.config.merges == merges and model.config.chars == chars
    ds = make_dataset(tiny_manifest, "train", model.image_transform, max_seconds=None, preload=True,
                      progress=False, speech_input="text")
    assert_well_above_chance(evaluate(model, ds))


class _ScriptedRecognizer:
    """Answers each waveform with a scripted transcript (by audio hash), counting what it was asked."""

    def __init__(self, by_sha: dict[str, str], identity: str = "scripted-1"):
        self.by_sha, self.identity, self.calls = by_sha, identity, 0

    def transcribe(self, wavs: list[np.ndarray]) -> list[str]:
        self.calls += len(wavs)
        return [self.by_sha[audio_sha256(w)] for w in wavs]


def _transcript_script(manifest: Path, split: str, corrupt: bool = False) -> dict[str, str]:
    ds = make_dataset(manifest, split, {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}, max_seconds=None,
                      preload=True, progress=False)
    script = {}
    for i, r in enumerate(ds.records):
        text = str(r.text)
        if corrupt and i % 2 == 0:
            text = " ".join(text.split()[:2])  # a recogniser that loses most of every other caption
        script[audio_sha256(ds.waveform(i).numpy())] = text
    return script


def test_cascade_with_a_perfect_recognizer_equals_the_ground_truth_text_topline(
        text_run: Path, tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vgskit.cli import main
    from vgskit.models.milan.cascade import AsrCascade

    # The ground-truth-text topline is one flag away, and equals evaluating the text model itself.
    topline_json, text_json = tmp_path / "topline.json", tmp_path / "text.json"
    assert main(["eval", "--model", "asr_cascade", "--manifest", str(tiny_manifest), "--split", "test", "--set",
                 f"text_model={text_run}", "--set", "asr.kind=transcripts", "--json", str(topline_json)]) == 0
    assert main(["eval", "--checkpoint", str(text_run), "--manifest", str(tiny_manifest), "--split", "test",
                 "--json", str(text_json)]) == 0
    topline, direct = json.loads(topline_json.read_text()), json.loads(text_json.read_text())
    assert topline["speech_to_image"] == direct["speech_to_image"]
    assert topline["image_to_speech"] == direct["image_to_speech"]

    # Speech through a recogniser that hears every word: the same recall, from the audio.
    recognizer = _ScriptedRecognizer(_transcript_script(tiny_manifest, "test"))
    monkeypatch.setattr(AsrCascade, "_build_recognizer", lambda self: recognizer)
    cascade = create_model("asr_cascade", text_model=str(text_run), asr={"cache_dir": str(tmp_path / "cache")})
    assert cascade.speech_input == "waveform"
    ds = make_dataset(tiny_manifest, "test", cascade.image_transform, max_seconds=None, preload=True,
                      progress=False)
    results = evaluate(cascade, ds, extras=["asr_wer"])
    assert results["speech_to_image"] == direct["speech_to_image"]
    assert results["asr_wer"]["wer"] == 0.0 and recognizer.calls == len(ds)

    # A second pass reads the transcript cache: the recogniser is not asked again.
    again = create_model("asr_cascade", text_model=str(text_run), asr={"cache_dir": str(tmp_path / "cache")})
    assert torch.equal(evaluate_pooled(again, ds), evaluate_pooled(cascade, ds)) and recognizer.calls == len(ds)


def evaluate_pooled(model: Any, ds: Any) -> torch.Tensor:
    from vgskit.retrieval.evaluate import embed_speech

    return embed_speech(model, ds).pooled


def test_cascade_embeds_exactly_the_transcripts_and_reports_their_wer(
        text_run: Path, tiny_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vgskit.models.milan.cascade import AsrCascade

    script = _transcript_script(tiny_manifest, "test", corrupt=True)
    monkeypatch.setattr(AsrCascade, "_build_recognizer", lambda self: _ScriptedRecognizer(script, "lossy-1"))
    cascade = create_model("asr_cascade", text_model=str(text_run), asr={"cache_dir": ""})
    ds = make_dataset(tiny_manifest, "test", cascade.image_transform, max_seconds=None, preload=True,
                      progress=False)
    speech = ds.speech_inputs([0, 1, 2])
    transcripts = [script[audio_sha256(speech.values[i, : int(n)].numpy())] for i, n in enumerate(speech.lengths)]
    with torch.no_grad():
        got = cascade.embed_speech(speech).pooled
        want = cascade.text_model.embed_speech(SpeechInputs.from_texts(transcripts)).pooled
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    results = evaluate(cascade, ds, extras=["asr_wer"])
    hyps = [script[audio_sha256(ds.waveform(i).numpy())] for i in range(len(ds))]
    expected = corpus_wer([str(r.text) for r in ds.records], hyps)
    assert results["asr_wer"]["wer"] == pytest.approx(expected.wer) and expected.wer > 0.3
    assert results["asr_wer"]["deletions"] == expected.deletions and results["asr_wer"]["recognizer"] == "lossy-1"


def test_cascade_errors_are_clear(text_run: Path, tiny_manifest: Path) -> None:
    from vgskit.cli import main

    with pytest.raises(ConfigError, match="text_model is required"):
        create_model("asr_cascade")
    with pytest.raises(ConfigError, match="asr.kind must be one of"):
        create_model("asr_cascade", text_model=str(text_run), asr={"kind": "siri"})
    with pytest.raises(ConfigError, match="needs asr.model"):
        create_model("asr_cascade", text_model=str(text_run), asr={"kind": "transformers"})
    # The WER of a model that reads the references is refused before any data is read.
    assert main(["eval", "--model", "asr_cascade", "--manifest", str(tiny_manifest), "--set",
                 f"text_model={text_run}", "--set", "asr.kind=transcripts", "--asr-wer"]) != 0
    with pytest.raises(ConfigError, match="has no trainable weights"):
        train_from_recipe({"model": {"name": "asr_cascade", "text_model": str(text_run)},
                           "data": {"manifest": str(tiny_manifest)}, "train": {"max_steps": 1}},
                          out_dir=text_run.parent / "never", progress=False)


def test_pocketsphinx_with_a_caption_language_model_beats_the_generic_one(tiny_manifest: Path) -> None:
    """The real offline recogniser on the corpus's flite voices: the domain LM must cut the word error."""
    pytest.importorskip("pocketsphinx")
    from vgskit.asr.recognizers import PocketSphinxRecognizer

    records = [r for r in read_manifest(tiny_manifest) if r.split != "train" and str(r.speaker).startswith("flite")]
    assert len(records) >= 5
    ds = make_dataset(tiny_manifest, None, {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}, max_seconds=None,
                      preload=True, progress=False, records=records)
    wavs = [ds.waveform(i).numpy() for i in range(len(ds))]
    refs = [str(r.text) for r in records]
    train_texts = [str(r.text) for r in read_manifest(tiny_manifest, split="train")]
    domain = corpus_wer(refs, PocketSphinxRecognizer(lm_texts=train_texts).transcribe(wavs))
    generic = corpus_wer(refs, PocketSphinxRecognizer().transcribe(wavs))
    assert domain.wer < 0.25 and domain.wer < 0.5 * generic.wer, (domain.wer, generic.wer)


@pytest.mark.parametrize("recipe, corpus, steps", [("milan_text_flickr8k", "flickr8k", 5000),
                                                   ("milan_text_places", "places", 40000),
                                                   ("milan_text_localized_narratives", "localized_narratives", 5000)])
def test_text_recipes_hold_the_papers_settings(recipe: str, corpus: str, steps: int) -> None:
    """Written out from the paper (§4, Table 5): a 3-layer transformer text tower, MILAN's image tower and optimiser."""
    from vgskit.experiment import resolve_recipe
    from vgskit.train.config import TrainConfig, config_from_dict, load_recipe

    d = load_recipe(resolve_recipe(recipe))
    assert d["model"]["name"] == "milan_text" and d["model"]["transformer_layers"] == 3
    assert d["model"]["image"] == {"kind": "efficientnet_lite0", "weights": "imagenet", "freeze": False,
                                   "image_size": 224}
    assert d["data"]["corpus"] == corpus
    train = config_from_dict(TrainConfig, d["train"], prefix="train")
    assert (train.optimizer, train.lr, tuple(train.betas), train.eps) == ("adam", 1e-3, (0.9, 0.999), 1e-8)
    assert (train.schedule, train.decay_gamma, train.decay_every) == ("step_decay", 0.999, 1000)
    assert train.batch_size == 1024 and train.max_steps == steps
    augment = d["data"]["train_augment"]
    assert augment["scale"] == [0.67, 1.0] and augment["flip"] is False


def test_clip_zero_shot_text_tower_is_clips_joint_space_and_fits_the_cascade(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLIP's own towers, frozen: the embeddings are transformers' CLIPModel text / image features, normalised."""
    from transformers import CLIPModel, CLIPTokenizer

    from _tiny_speechclip import make_towers
    from vgskit.contract import ImageInputs
    from vgskit.models import save_pretrained
    from vgskit.models.milan.cascade import AsrCascade

    towers = make_towers(tmp_path_factory)
    model = create_model("clip_text_zero_shot", text={"name_or_path": str(towers.clip)},
                         image={"name_or_path": str(towers.clip)}).eval()
    assert not [p for p in model.parameters() if p.requires_grad] and not model.trainable
    texts = ["a small red dress", "a blue bag left of a white coat"]
    clip = CLIPModel.from_pretrained(towers.clip).eval()
    enc = CLIPTokenizer.from_pretrained(towers.clip)(texts, padding=True, return_tensors="pt")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        text_features, image_features = clip.get_text_features(**enc), clip.get_image_features(pixel_values=pixels)
        # transformers >= 5 returns an output object whose pooler_output is the projected feature
        text_features = getattr(text_features, "pooler_output", text_features)
        image_features = getattr(image_features, "pooler_output", image_features)
        want_text = torch.nn.functional.normalize(text_features, dim=-1)
        want_image = torch.nn.functional.normalize(image_features, dim=-1)
        got_text = model.embed_speech(SpeechInputs.from_texts(texts)).pooled
        got_image = model.embed_image(ImageInputs.from_pixels(pixels)).pooled
    torch.testing.assert_close(got_text, want_text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_image, want_image, rtol=1e-5, atol=1e-6)

    # Behind a recogniser: the cascade embeds what it hears with CLIP's text tower.
    save_pretrained(model, tmp_path / "clip_text")
    heard = {"a small red dress"}

    class _Says:
        identity = "says-1"

        def transcribe(self, wavs: list) -> list[str]:
            return [next(iter(heard)) for _ in wavs]

    monkeypatch.setattr(AsrCascade, "_build_recognizer", lambda self: _Says())
    cascade = create_model("asr_cascade", text_model=str(tmp_path / "clip_text"), asr={"cache_dir": ""})
    speech = SpeechInputs.waveform(torch.randn(1, 8000) * 0.1, torch.tensor([8000]))
    with torch.no_grad():
        torch.testing.assert_close(cascade.embed_speech(speech).pooled, want_text[:1], rtol=1e-5, atol=1e-6)


def test_index_of_a_text_model_embeds_the_captions_transcripts(text_run: Path, tiny_manifest: Path,
                                                                tmp_path: Path) -> None:
    """`vgskit index` on a text model: its caption embeddings are those of the manifest's text."""
    from vgskit.cli import main
    from vgskit.retrieval.engine import SearchEngine
    from vgskit.retrieval.evaluate import embed_images, embed_speech

    assert main(["index", "--checkpoint", str(text_run), "--manifest", str(tiny_manifest), "--split", "test",
                 "--out", str(tmp_path / "index")]) == 0
    model = load_model(text_run)
    engine = SearchEngine.load(tmp_path / "index", model)
    ds = make_dataset(tiny_manifest, "test", model.image_transform, max_seconds=None, preload=True, progress=False,
                      speech_input="text")
    torch.testing.assert_close(engine.gallery.pooled, embed_images(model, ds).pooled, rtol=1e-5, atol=1e-6)
    assert engine.captions is not None
    torch.testing.assert_close(engine.captions.emb.pooled, embed_speech(model, ds).pooled, rtol=1e-5, atol=1e-6)


def test_service_answers_written_queries_with_the_text_tower(text_run: Path, tiny_manifest: Path) -> None:
    """`POST /search` with {"text": ...} for a model with a text tower; a speech-only model answers 422."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vgskit.retrieval.engine import SearchEngine
    from vgskit.serve.app import create_app

    model = load_model(text_run)
    ds = make_dataset(tiny_manifest, "test", model.image_transform, max_seconds=None, preload=True, progress=False,
                      speech_input="text")
    engine = SearchEngine.build_from_dataset(model, ds, captions=False)
    query = str(ds.records[3].text)
    with torch.no_grad():
        q = model.embed_speech(SpeechInputs.from_texts([query])).pooled[0]
    scores = (engine.gallery.pooled.double() @ q.double()).numpy()
    want = [ds.image_keys[i] for i in np.argsort(-scores, kind="stable")[:3]]
    client = TestClient(create_app(model, {"scenes": engine}))
    r = client.post("/search?k=3", json={"text": query})
    assert r.status_code == 200, r.text
    assert [h["id"] for h in r.json()["hits"]] == want
    assert [h["score"] for h in r.json()["hits"]] == pytest.approx(sorted(scores, reverse=True)[:3], abs=1e-5)
    assert client.post("/search", json={"text": "  "}).status_code == 422
    assert client.post("/search", json={"text": "a" * 5000}).status_code == 413

    speech_model = create_model("dual_encoder_tiny").eval()
    speech_engine = SearchEngine(speech_model, torch.randn(4, speech_model.embed_dim), list("abcd"), list("abcd"),
                                 index_kind="exact")
    r = TestClient(create_app(speech_model, {"g": speech_engine})).post("/search", json={"text": "a red dress"})
    assert r.status_code == 422 and "has no text tower" in r.json()["detail"]
