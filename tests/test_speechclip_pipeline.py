"""SpeechCLIP through the whole pipeline on tiny local towers: ``train_from_recipe`` with the reduced keyword
vocabulary and a frozen-feature cache, then ``load_model``, ``vgskit keywords``, ``vgskit layers`` and
``vgskit eval --zero-shot-text --keyword-hit-rate`` on the run's checkpoint."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image

from _tiny_speechclip import SPEECH, Towers, make_towers, tiny_config
from vgskit.cli import main
from vgskit.data.manifest import read_manifest
from vgskit.encoders.text import load_clip_tokenizer
from vgskit.experiment import load_model, make_dataset, train_from_recipe
from vgskit.models.speechclip import (
    SpeechCLIP,
    build_keyword_vocabulary,
    evaluate_keyword_hit_rate,
    special_token_ids,
)
from vgskit.train.tracking import read_metrics

STEPS = 3
KEYWORDS = 4  # keyword slots of the tiny config


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny tensors: a second thread buys little, and on a busy machine thread hand-offs cost far more.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> Towers:
    return make_towers(tmp_path_factory)


def speechclip_recipe(towers: Towers, cache: Path) -> dict:
    """Both branches on the tiny frozen towers, vocabulary from the training captions, cached tower features."""
    section = {k: v for k, v in asdict(tiny_config(towers, "both")).items()
               if k in ("speech", "image", "text", "parallel", "cascaded")}
    return {
        "model": {"name": "speechclip_parallel_base", "branches": "both", "vocab_from_captions": True, **section},
        "data": {"train_max_seconds": 1.0, "train_crop": "head", "captions_per_image": 2, "feature_cache": str(cache),
                 "val_max_images": 4, "eval_batch_size": 16},
        "train": {"optimizer": "adam", "lr": 1e-3, "warmup_steps": 0, "max_steps": STEPS, "batch_size": 16,
                  "log_every": 1, "eval_every": None, "ckpt_every": STEPS, "tensorboard": False, "amp": False},
    }


@pytest.fixture(scope="module")
def run(towers: Towers, tiny_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("speechclip-run")
    summary = train_from_recipe(speechclip_recipe(towers, root / "features"), out_dir=root / "run",
                                manifest=str(tiny_manifest), progress=False)
    return root / "run", summary


@pytest.fixture(scope="module")
def train_vocab(towers: Towers, tiny_manifest: Path) -> list[int]:
    texts = [str(r.text) for r in read_manifest(tiny_manifest, split="train")]
    return build_keyword_vocabulary(load_clip_tokenizer(str(towers.clip)), texts)


def _latest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def test_training_saves_the_reduced_vocabulary(run, towers, train_vocab, tiny_manifest) -> None:
    run_dir, summary = run
    n_train = len(read_manifest(tiny_manifest, split="train"))
    assert summary["step"] == STEPS
    cache = summary["feature_cache"]
    assert cache["speech"]["items"] == n_train and cache["image"]["items"] == n_train // 5  # 5 captions per image
    losses = [row["loss"] for row in read_metrics(run_dir, kind="train")]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))

    saved = json.loads((_latest(run_dir) / "config.json").read_text())
    cfg = saved["config"]
    assert saved["model"] == "speechclip_parallel_base" and cfg["branches"] == "both"
    # The training captions' subwords (and the special ids), far fewer than the tokenizer's vocabulary.
    assert cfg["keyword_vocab"] == train_vocab and len(train_vocab) < towers.vocab_size
    assert cfg["cascaded"]["vocab_size"] == len(train_vocab)
    specials = {0, towers.vocab_size - 2, towers.vocab_size - 1}
    assert {train_vocab[r] for r in cfg["cascaded"]["masked_ids"]} == specials


def test_load_model_of_the_run(run, train_vocab) -> None:
    model = load_model(run[0])
    assert isinstance(model, SpeechCLIP) and not model.training
    assert model.keyword_token_ids.tolist() == train_vocab and len(model.keyword_vocabulary) == len(train_vocab)
    # Real towers again (training read the cache), and the trained parts moved away from their init.
    assert type(model.speech_tower).__name__ == "PretrainedSpeechEncoder"
    weights = model.layer_weights()["parallel"]
    assert not torch.allclose(weights, torch.full_like(weights, 1 / len(weights)), atol=1e-6, rtol=0)


def test_keywords_cli_uses_the_reduced_vocabulary(run, towers, train_vocab, tiny_manifest, tmp_path, capsys) -> None:
    wav = read_manifest(tiny_manifest, split="test")[0].audio
    js = tmp_path / "kw.json"
    assert main(["keywords", "--checkpoint", str(run[0]), str(wav), "-k", "3", "--json", str(js)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(wav) and len(printed) == 1 + KEYWORDS
    (report,) = json.loads(js.read_text())
    assert report["audio"] == str(wav) and len(report["slots"]) == KEYWORDS
    tokenizer = load_clip_tokenizer(str(towers.clip))
    allowed = {tokenizer.decode([i]).strip() for i in set(train_vocab) - special_token_ids(tokenizer)}
    for slot in report["slots"]:
        assert len(slot) == 3
        assert {entry["token"] for entry in slot} <= allowed
        cosines = [entry["cosine"] for entry in slot]
        assert cosines == sorted(cosines, reverse=True) and all(-1.0 <= c <= 1.0 for c in cosines)


def test_layers_cli_of_the_run(run, tmp_path, capsys) -> None:
    png, js = tmp_path / "layers.png", tmp_path / "layers.json"
    assert main(["layers", "--checkpoint", str(run[0]), "--out", str(png), "--json", str(js)]) == 0
    with Image.open(png) as img:
        assert img.format == "PNG"
    weights = json.loads(js.read_text())
    assert set(weights) == {"parallel", "cascaded"}
    for values in weights.values():
        assert len(values) == SPEECH["num_hidden_layers"] + 1  # transformer input + every layer
        assert sum(values) == pytest.approx(1.0) and min(values) > 0
    assert weights["parallel"] == weights["cascaded"]  # one weighted sum shared by both branches
    assert "cascaded: 0:" in capsys.readouterr().out


def test_eval_cli_zero_shot_text_and_keyword_hit_rate(run, tiny_manifest, tmp_path, capsys) -> None:
    js = tmp_path / "eval.json"
    code = main(["eval", "--checkpoint", str(run[0]), "--manifest", str(tiny_manifest), "--split", "test",
                 "--zero-shot-text", "--keyword-hit-rate", "--keyword-top-k", "3", "--batch-size", "16",
                 "--json", str(js)])
    assert code == 0
    results = json.loads(js.read_text())
    n_test = len(read_manifest(tiny_manifest, split="test"))
    for direction in ("speech_to_image", "image_to_speech"):
        assert set(results[direction]) >= {"R@1", "R@5", "R@10"}
    zero_shot = results["zero_shot_text"]
    assert set(zero_shot) >= {"speech_to_text", "text_to_speech"}
    assert zero_shot["text_to_speech"]["n_queries"] == n_test
    for direction in ("speech_to_text", "text_to_speech"):
        recalls = [zero_shot[direction][f"R@{k}"] for k in (1, 5, 10)]
        assert recalls == sorted(recalls) and 0 <= recalls[0] and recalls[-1] <= 100
    hit = results["keyword_hit_rate"]
    assert hit["top_k"] == 3 and hit["n_captions"] == n_test and hit["keywords"] == "chosen"
    assert len(hit["per_slot"]) == KEYWORDS and all(0 <= r <= 100 for r in hit["per_slot"])
    # Rates are counts over the test captions, in percent.
    assert all(abs(r * n_test / 100 - round(r * n_test / 100)) < 1e-9 for r in hit["per_slot"])
    printed = capsys.readouterr().out
    assert "zero-shot speech <-> text" in printed and "keyword hit rate (top-3" in printed
    # One rate line per slot (the per-slot subword lines that follow say "(count)" after each subword).
    rate_lines = [line for line in printed.splitlines() if re.fullmatch(r"  slot +\d+: +[\d.]+ %", line)]
    assert len(rate_lines) == KEYWORDS
    assert "most frequent selected subwords per slot" in printed

    # The CLI's numbers are those of the library call on the same split.
    model = load_model(run[0])
    ds = make_dataset(tiny_manifest, "test", model.image_transform, max_seconds=None, preload=True, progress=False)
    direct = evaluate_keyword_hit_rate(model, ds, top_k=3)
    assert direct["per_slot"] == pytest.approx(hit["per_slot"])
