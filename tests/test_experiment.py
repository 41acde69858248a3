"""Recipe → training → checkpoint → evaluation, through the same functions the CLI uses."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml
from safetensors.torch import load_file

from vgskit.data.manifest import read_manifest
from vgskit.errors import ConfigError
from vgskit.experiment import (
    RECIPE_DIR,
    data_config_from,
    evaluate_checkpoint,
    load_experiment,
    load_model,
    make_dataset,
    train_from_recipe,
)
from vgskit.images import load_image
from vgskit.models.base import image_transform_of
from vgskit.models.registry import create_model, list_models, model_config
from vgskit.train.config import TrainConfig, config_from_dict
from vgskit.train.tracking import read_metrics

# Files starting with "_" are base recipes other recipes build on, not recipes of their own.
BUILTIN_RECIPES = sorted(p for p in RECIPE_DIR.glob("*.yaml") if not p.name.startswith("_"))


def _merge(base: dict, over: dict) -> dict:
    """``over`` merged over ``base``: mappings key by key (recursively), anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _yaml_recipe(path: Path) -> dict:
    """What a recipe's YAML files say, read with PyYAML and merged over its ``base`` recipes, if any."""
    d = yaml.safe_load(path.read_text()) or {}
    d = {k: v for k, v in d.items() if v is not None}  # an empty section changes nothing
    base = d.pop("base", None)
    if base is None:
        return d
    base_path = Path(base) if str(base).endswith((".yaml", ".yml")) else Path(f"{base}.yaml")
    return _merge(_yaml_recipe(path.parent / base_path), d)


def _assert_matches(config: object, expected: dict, where: str) -> None:
    """Every key of ``expected`` is a field of ``config`` holding that value (nested mappings: nested configs)."""
    for key, want in expected.items():
        assert hasattr(config, key), f"{where}.{key}: not a field of {type(config).__name__}"
        got = getattr(config, key)
        if dataclasses.is_dataclass(got) and isinstance(want, dict):
            _assert_matches(got, want, f"{where}.{key}")
        elif isinstance(got, (tuple, list)):
            assert list(got) == list(want), f"{where}.{key}: {got!r} != {want!r}"
        elif isinstance(got, float) and not isinstance(want, bool):
            assert got == pytest.approx(float(want), rel=1e-12), f"{where}.{key}: {got!r} != {want!r}"
        else:
            assert got == want and type(got) is type(want), f"{where}.{key}: {got!r} != {want!r}"


@pytest.mark.parametrize("path", BUILTIN_RECIPES, ids=lambda p: p.stem)
def test_builtin_recipes_are_valid(path: Path):
    written = _yaml_recipe(path)
    exp = load_experiment(path)
    # Loading keeps every section as the files write it.
    assert set(exp) == set(written) == {"model", "data", "train"}
    for section in ("model", "data", "train"):
        assert exp[section] == written[section], section

    model_d = dict(exp["model"])
    name = model_d.pop("name")
    assert name in list_models()
    config = model_config(name, **model_d)  # the model section merges into the model's config
    _assert_matches(config, model_d, "model")
    # Models on pretrained towers (SpeechCLIP) need downloaded weights to be built: checked up to the config.
    if not any(hasattr(value, "name_or_path") for value in vars(config).values()):
        model = create_model(name, **model_d)
        assert model.model_name == name and model.config == config
    data = data_config_from(exp["data"])
    _assert_matches(data, exp["data"], "data")
    train = config_from_dict(TrainConfig, exp["train"], prefix="train")
    _assert_matches(train, exp["train"], "train")
    for key in ("optimizer", "lr", "batch_size"):  # a recipe states how it trains, not the defaults
        assert key in exp["train"], f"train.{key} missing"

    # An invalid edit of each section is rejected, naming the key.
    with pytest.raises(ConfigError, match="not_a_field"):
        model_config(name, **model_d, not_a_field=1)
    edited = load_experiment(path, ["data.not_a_field=1"])
    with pytest.raises(ConfigError, match=r"data\.not_a_field: unknown key"):
        data_config_from(edited["data"])
    edited = load_experiment(path, ["train.not_a_field=1"])
    with pytest.raises(ConfigError, match=r"train\.not_a_field: unknown key"):
        config_from_dict(TrainConfig, edited["train"], prefix="train")
    edited = load_experiment(path, ["train.optimizer=sgd"])
    with pytest.raises(ConfigError, match=r"train\.optimizer"):
        config_from_dict(TrainConfig, edited["train"], prefix="train")
    edited = load_experiment(path, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"train\.lr"):
        config_from_dict(TrainConfig, edited["train"], prefix="train")


def test_recipe_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*demo"):
        load_experiment("nope")
    with pytest.raises(ConfigError, match="missing.yaml: file not found"):
        load_experiment(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: dual_encoder_tiny}\ntrainer: {lr: 1}\n")
    with pytest.raises(ConfigError, match="unknown section.*trainer"):
        load_experiment(bad)
    with pytest.raises(ConfigError, match="data.captions_per_imag"):
        data_config_from({"captions_per_imag": 2})


def _brute_force_ranks(speech: torch.Tensor, image: torch.Tensor, caption_image: list[int], margin: float
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """First-hit ranks of both directions by brute force: 1 + distractors scoring >= the best relevant item.

    Scores are computed here in float64; the evaluation computes them in float32, in other blocks. A
    distractor within ``margin`` of the relevant score may therefore fall on either side, so each rank comes
    as ``(lowest, highest)`` possible value.
    """
    gold = torch.tensor(caption_image)
    scores = speech.double() @ image.double().T  # [captions, images]
    relevant = torch.nn.functional.one_hot(gold, image.shape[0]).bool()
    out = {}
    for direction, s, rel in (("speech_to_image", scores, relevant), ("image_to_speech", scores.T, relevant.T)):
        best = s.masked_fill(~rel, float("-inf")).amax(dim=1, keepdim=True)  # best relevant score per query
        lo = 1 + ((s > best + margin) & ~rel).sum(dim=1)
        hi = 1 + ((s >= best - margin) & ~rel).sum(dim=1)
        out[direction] = (lo, hi)
    return out


def _evaluation_embeddings(model: torch.nn.Module, dataset: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The caption and image embeddings the evaluation ranks: its own (deterministic) embedding pass."""
    try:
        from vgskit.experiment import embed_dataset
    except ImportError:  # the embedding pass lives in vgskit.retrieval.evaluate
        from vgskit.retrieval.evaluate import embed_images, embed_speech

        return embed_speech(model, dataset).pooled, embed_images(model, dataset).pooled
    speech, image, _ = embed_dataset(model, dataset)
    return speech, image


def _check_against_brute_force(run: Path, manifest: Path, split: str) -> dict:
    """Recall of the run's model on ``split`` (as ``vgskit eval`` computes it) against brute force."""
    results = evaluate_checkpoint(run, manifest, split=split)
    model = load_model(run)
    records = read_manifest(manifest, split=split)
    image_ids = list(dict.fromkeys(r.image_id for r in records))
    # The embeddings the evaluation ranks (its dataset and embedding pass; deterministic, so the same)...
    ds = make_dataset(manifest, split, model.image_transform, max_seconds=None, preload=True, progress=False)
    speech, image = _evaluation_embeddings(model, ds)
    caption_image = torch.tensor([image_ids.index(r.image_id) for r in records])
    assert ds.image_keys == image_ids and ds.caption_image_index == caption_image.tolist()
    # ... are those of each caption and image, computed here one caption at a time, the images from files.
    transform = image_transform_of(model)
    with torch.no_grad():
        own_speech = torch.cat([model.encode_speech(torch.from_numpy(wav)[None], torch.tensor([len(wav)]))
                                for wav in (sf.read(r.audio, dtype="float32")[0] for r in records)])
        own_image = model.encode_image(torch.stack([transform(load_image(ds.image_paths[i]))
                                                    for i in range(len(image_ids))]))
    # Unit vectors; other batch shapes and padding change only float32 rounding (reductions of a few
    # hundred terms: at most ~n·eps ≈ 3e-5 relative), while another caption's or image's row is ~0.1 away.
    torch.testing.assert_close(speech, own_speech, atol=1e-4, rtol=0)
    torch.testing.assert_close(image, own_image, atol=1e-4, rtol=0)

    # A float32 dot product of D-dim unit vectors is within D·u (u = eps/2, the unit roundoff) of the exact
    # one, so two compared scores may swap only when they are within 2·D·u = D·eps.
    margin = speech.shape[1] * torch.finfo(torch.float32).eps
    ranks = _brute_force_ranks(speech, image, caption_image.tolist(), margin)
    for direction, (lo, hi) in ranks.items():
        r = results[direction]
        assert r["n_queries"] == len(lo) == (len(records) if direction == "speech_to_image" else len(image_ids))
        n, slack = len(lo), 1e-9  # slack: percent values are rounded doubles
        for k in (1, 5, 10):
            fewest, most = 100.0 * int((hi <= k).sum()) / n, 100.0 * int((lo <= k).sum()) / n
            assert fewest - slack <= r[f"R@{k}"] <= most + slack, (split, direction, k, fewest, most)
        assert float(lo.double().mean()) - slack <= r["mean_rank"] <= float(hi.double().mean()) + slack
        assert float(lo.double().quantile(0.5)) <= r["median_rank"] <= float(hi.double().quantile(0.5))
        # Near-ties (this briefly trained model scores many pairs alike) leave a few ranks open; most are fixed.
        assert int((hi != lo).sum()) <= n // 4 + 1, "too many near-ties for the check to say much"
    return results


def test_train_evaluate_resume(tiny_manifest, tmp_path):
    # A context layer with dropout: the random state must be restored too for the resumed run to match.
    dropout = ["model.audio_context_layers=1", "model.audio_context_heads=2", "model.audio_context_ffn=32",
               "model.audio_context_dropout=0.2"]
    run = tmp_path / "run"
    # Stopped within the first epoch (6 batches), so the resumed run must find its place inside an epoch.
    first = train_from_recipe("demo_tiny", out_dir=run, manifest=str(tiny_manifest),
                              overrides=[*dropout, "train.stop_after_steps=4"], progress=False)
    assert first["step"] == 4 and not first["finished"] and (first["epoch"], first["batch_in_epoch"]) == (0, 4)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train_from_recipe("demo_tiny", out_dir=run, manifest=str(tiny_manifest), overrides=dropout,
                          progress=False)
    second = train_from_recipe("demo_tiny", out_dir=run, manifest=str(tiny_manifest), overrides=dropout,
                               resume=True, progress=False)
    assert second["resumed_from_step"] == 4 and second["step"] == 12 and second["finished"]

    # Resuming is exact: the same weights and the same evaluations as one uninterrupted run.
    whole = tmp_path / "whole"
    once = train_from_recipe("demo_tiny", out_dir=whole, manifest=str(tiny_manifest), overrides=dropout,
                             progress=False)
    assert once["step"] == 12 and once["resumed_from_step"] is None
    resumed, uninterrupted = _final_weights(run), _final_weights(whole)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    torch.manual_seed(0)  # the recipe's seed: the initial weights
    init = create_model("dual_encoder_tiny", audio_context_layers=1, audio_context_heads=2,
                        audio_context_ffn=32, audio_context_dropout=0.2).state_dict()
    assert init.keys() == resumed.keys()
    assert max(float((resumed[k] - init[k]).abs().max()) for k in resumed) > 1e-3  # it trained
    evals = read_metrics(run, kind="eval")
    assert [e["step"] for e in evals] == [6, 12]
    assert [{k: v for k, v in e.items() if k.startswith("val/")} for e in evals] == \
        [{k: v for k, v in e.items() if k.startswith("val/")} for e in read_metrics(whole, kind="eval")]

    # Recall against brute force: on the test split (8 images, 40 captions) and on the training split,
    # whose 24 images make R@10 speech -> image more than a count of the gallery.
    results = _check_against_brute_force(run, tiny_manifest, "test")
    assert results["speech_to_image"]["n_queries"] == 40
    train = _check_against_brute_force(run, tiny_manifest, "train")
    assert train["speech_to_image"]["n_queries"] == 120 and train["image_to_speech"]["n_queries"] == 24
    assert train["speech_to_image"]["R@10"] < 100.0  # a gallery larger than K

    model = load_model(run)
    assert model.model_name == "dual_encoder_tiny" and not model.training
    assert model.config.audio_context_dropout == 0.2


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


def test_two_processes_train_the_same_dual_encoder_as_one(tiny_cache, tiny_manifest, tmp_path):
    """torchrun with 2 gloo processes on the real model, loss and sampler == one process, same global batch."""
    env = dict(os.environ, VGSKIT_CACHE=str(tiny_cache), OMP_NUM_THREADS="1")
    # The two runs sum the same gradients in another order (per rank, then across ranks), so they differ by
    # float32 rounding, δ <= ~1e-6 here (gradients <= ~1e-2, reductions of a few thousand terms: n·u·|g|).
    # Adam turns a gradient change δ into a step change of at most ~2·lr·δ/ε: with the default ε = 1e-8 a
    # rounding-level gradient (|g| ~ δ) could move by a full step either way, so no tolerance would be
    # derivable. A larger ε bounds that response (and makes the step depend on the gradient's scale, so a
    # gradient W times too large would show).
    steps, lr, eps, delta = 4, 3e-3, 1e-3, 1e-6
    common = ["train", "--recipe", "demo_tiny", "--manifest", str(tiny_manifest),
              "--set", f"train.max_steps={steps}", "--set", "train.eval_every=null",
              "--set", f"train.ckpt_every={steps}", "--set", "train.amp=false", "--set", f"train.lr={lr}",
              "--set", f"train.eps={eps}"]
    single = subprocess.run([sys.executable, "-m", "vgskit.cli", *common, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "vgskit.cli", *common, "--out", str(tmp_path / "two")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    assert one.keys() == two.keys()
    torch.manual_seed(0)  # the recipe's seed: the initial weights both runs started from
    init = create_model("dual_encoder_tiny").state_dict()
    moved = max(float((one[k] - init[k]).abs().max()) for k in one if k in init)
    assert moved > 1e-3  # training changed the weights, so agreement below is not trivial
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    tolerance = steps * 2 * lr * delta / eps  # 2.4e-5, far below how far training moved the weights
    assert worst < tolerance < moved / 100, f"2-process weights differ from 1-process weights by {worst}"


def test_lengths_for_bucketing_without_preloading(tiny_manifest):
    from vgskit.experiment import make_dataset

    transform = create_model("dual_encoder_tiny").image_transform
    lazy = make_dataset(tiny_manifest, "train", transform, max_seconds=2.5, preload=False, progress=False)
    eager = make_dataset(tiny_manifest, "train", transform, max_seconds=2.5, preload=True, progress=False)
    assert lazy.num_samples() == eager.num_samples()
    assert max(eager.num_samples()) == 40000  # cropped to 2.5 s
    i = 3
    torch.testing.assert_close(lazy.waveform(i), eager.waveform(i), atol=1 / 32768, rtol=0)
