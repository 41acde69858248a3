"""Tests of the spoken-scenes corpus generator and its oracle ceiling."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from vgskit.data import synthetic
from vgskit.data.synthetic import (
    PRESETS,
    SpokenScenesConfig,
    caption_true_of,
    ceiling,
    ceiling_from_facts,
    generate_spoken_scenes,
)
from vgskit.errors import ConfigError, VGSKitError

# Smaller than the tiny preset where the test only needs a few images, to keep the suite fast.
SMALL = SpokenScenesConfig(num_train=3, num_val=1, num_test=2)


def _records(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    return generate_spoken_scenes(out, PRESETS["tiny"], workers=2, progress=False)


def test_tiny_counts_captions_audio_and_images(tiny: Path) -> None:
    recs = _records(tiny)
    cfg = PRESETS["tiny"]
    per_split = Counter(r["split"] for r in recs)
    assert per_split == {"train": 5 * cfg.num_train, "val": 5 * cfg.num_val, "test": 5 * cfg.num_test}
    by_image: dict[str, list[dict]] = {}
    for r in recs:
        by_image.setdefault(r["image_id"], []).append(r)
    assert len(by_image) == cfg.num_train + cfg.num_val + cfg.num_test
    for caps in by_image.values():
        assert len({c["text"] for c in caps}) == 5
        assert len({c["caption_id"] for c in caps}) == 5
    for r in recs:
        assert r["image"] == f"images/{r['image_id']}.png"
        assert r["audio"] == f"wavs/{r['caption_id']}.wav"
        assert r["speaker"].split(":")[0] in {"espeak", "flite"}
        info = sf.info(str(tiny.parent / r["audio"]))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        # A caption of 5-20 words spoken at 150-200 words/minute.
        assert 1.0 < info.duration < 9.0, (r["text"], info.duration)
    for image_id in by_image:
        with Image.open(tiny.parent / "images" / f"{image_id}.png") as im:
            assert im.size == (cfg.image_size, cfg.image_size)
            assert im.mode == "RGB"
    assert json.loads((tiny.parent / "corpus.json").read_text())["config"]["num_train"] == cfg.num_train


def test_captions_are_true_of_their_scene_and_say_their_facts(tiny: Path) -> None:
    facts = json.loads((tiny.parent / "facts.json").read_text())
    scenes, captions = facts["scenes"], facts["captions"]
    assert len(captions) == len(_records(tiny))
    for cid, cap in captions.items():
        scene = scenes[cap["image_id"]]
        assert caption_true_of(cap, scene), (cid, cap["text"])
        # The facts are what the text says, not more.
        text = cap["text"]
        for m in cap["mentions"]:
            assert m["cls"] in text
            if m["colour"] is not None:
                assert m["colour"] in text
        if cap["background"] is not None:
            assert f"{cap['background']} background" in text
        else:
            assert "background" not in text
        # Informative captions: two or more objects named, most of them with their colour.
        assert len(cap["mentions"]) >= min(2, len(scene["objects"]))
    coloured = [m["colour"] is not None for c in captions.values() for m in c["mentions"]]
    assert np.mean(coloured) > 0.8
    # The same facts checked against a different scene are usually false: the check is not vacuous.
    first = next(iter(captions.values()))
    others = [s for i, s in scenes.items() if i != first["image_id"]]
    assert not all(caption_true_of(first, s) for s in others)


def test_caption_true_of_respects_attributes_relations_and_distinct_objects() -> None:
    scene = {
        "background": "gray",
        "objects": [
            {"cls": "dress", "colour": "red", "size": "large", "row": 0, "col": 0},
            {"cls": "bag", "colour": "blue", "size": "small", "row": 2, "col": 2},
        ],
    }

    def facts(mentions: list[dict], relations: list | None = None, **kw: object) -> dict:
        full = [{"colour": None, "size": None, "row": None, "col": None, **m} for m in mentions]
        return {"mentions": full, "relations": relations or [], "background": None, "count": None, **kw}

    assert caption_true_of(facts([{"cls": "dress", "colour": "red"}]), scene)
    assert not caption_true_of(facts([{"cls": "dress", "colour": "blue"}]), scene)
    assert not caption_true_of(facts([{"cls": "dress", "size": "small"}]), scene)
    assert caption_true_of(facts([{"cls": "dress", "row": 0}]), scene)
    assert not caption_true_of(facts([{"cls": "bag", "col": 0}]), scene)
    assert caption_true_of(facts([{"cls": "dress"}, {"cls": "bag"}], [[0, "left_of", 1]]), scene)
    assert caption_true_of(facts([{"cls": "dress"}, {"cls": "bag"}], [[1, "below", 0]]), scene)
    assert not caption_true_of(facts([{"cls": "dress"}, {"cls": "bag"}], [[0, "right_of", 1]]), scene)
    # Two mentions cannot both be the one dress.
    assert not caption_true_of(facts([{"cls": "dress"}, {"cls": "dress"}]), scene)
    assert caption_true_of(facts([{"cls": "bag"}], background="gray", count=2), scene)
    assert not caption_true_of(facts([{"cls": "bag"}], background="black"), scene)
    assert not caption_true_of(facts([{"cls": "bag"}], count=3), scene)


def test_ceiling_on_a_hand_built_example() -> None:
    def obj(cls: str, colour: str) -> dict:
        return {"cls": cls, "colour": colour, "size": "small", "row": 0, "col": 0}

    def cap(image_id: str, cls: str, colour: str | None = None) -> dict:
        mention = {"cls": cls, "colour": colour, "size": None, "row": None, "col": None}
        return {
            "image_id": image_id,
            "mentions": [mention],
            "relations": [],
            "background": None,
            "count": None,
        }

    scenes = {
        "a": {"split": "test", "background": "gray", "objects": [obj("dress", "red")]},
        "b": {"split": "test", "background": "gray", "objects": [obj("dress", "blue")]},
        "c": {"split": "test", "background": "gray", "objects": [obj("bag", "red")]},
        "z": {"split": "train", "background": "gray", "objects": [obj("dress", "red")]},
    }
    captions = {
        "a0": cap("a", "dress"),  # true of a, b -> R@1 1/2
        "a1": cap("a", "dress", "red"),  # true of a only -> 1
        "b0": cap("b", "dress", "blue"),  # true of b only -> 1
        "b1": cap("b", "dress"),  # true of a, b -> 1/2
        "c0": cap("c", "bag"),  # true of c only -> 1
        "c1": cap("c", "bag", "red"),  # true of c only -> 1
        "z0": cap("z", "dress"),  # other split: ignored
    }
    result = ceiling_from_facts(scenes, captions, "test", ks=(1, 2))
    assert result["num_images"] == 3 and result["num_captions"] == 6
    assert result["speech_to_image"]["R@1"] == pytest.approx(100 * 5 / 6)
    assert result["speech_to_image"]["R@2"] == pytest.approx(100.0)
    # Image a is described by a0, a1 (own) and b1: at least one own caption first with p = 2/3.
    # Image b by b0, b1 (own) and a0: 2/3 as well; image c only by its own two captions: 1.
    assert result["image_to_speech"]["R@1"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 1) / 3)
    assert result["image_to_speech"]["R@2"] == pytest.approx(100.0)
    assert result["unique_caption_fraction"] == pytest.approx(4 / 6)
    assert result["mean_consistent_images"] == pytest.approx(8 / 6)


def test_hypergeometric_recall_matches_enumeration() -> None:
    from itertools import permutations

    n, g = 5, 2
    for k in range(1, n + 1):
        orders = list(permutations(range(n)))
        hits = sum(any(i < g for i in order[:k]) for order in orders)
        assert synthetic._recall_hypergeometric(n, g, k) == pytest.approx(hits / len(orders))


def test_ceiling_of_generated_corpus(tiny: Path) -> None:
    result = ceiling(tiny.parent, "test")
    assert result["num_images"] == PRESETS["tiny"].num_test
    for direction in ("speech_to_image", "image_to_speech"):
        values = [result[direction][f"R@{k}"] for k in (1, 5, 10)]
        assert 0 < values[0] <= values[1] <= values[2] <= 100


def test_same_seed_same_corpus_other_seed_differs(tmp_path: Path) -> None:
    a = generate_spoken_scenes(tmp_path / "a", SMALL, workers=1, progress=False)
    b = generate_spoken_scenes(tmp_path / "b", SMALL, workers=2, progress=False)
    c = generate_spoken_scenes(tmp_path / "c", replace(SMALL, seed=1), workers=1, progress=False)
    ra, rb, rc = _records(a), _records(b), _records(c)
    assert ra == rb
    assert [r["text"] for r in ra] != [r["text"] for r in rc]
    for r in ra:
        assert (a.parent / r["image"]).read_bytes() == (b.parent / r["image"]).read_bytes()
        assert (a.parent / r["audio"]).read_bytes() == (b.parent / r["audio"]).read_bytes()
    image = ra[0]["image"]
    assert (a.parent / image).read_bytes() != (c.parent / image).read_bytes()


def test_cache_hit_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = generate_spoken_scenes(tmp_path, SMALL, workers=1, progress=False)
    recs = _records(manifest)
    marker_mtime = (tmp_path / "corpus.json").stat().st_mtime_ns

    # A complete corpus with the same config is reused without any work.
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated a complete corpus")

    monkeypatch.setattr(synthetic, "_run_tasks", no_work)
    assert generate_spoken_scenes(tmp_path, SMALL, workers=1, progress=False) == manifest
    assert (tmp_path / "corpus.json").stat().st_mtime_ns == marker_mtime
    monkeypatch.undo()

    # A deleted wav is made again, identical, and the others are left alone.
    lost = tmp_path / recs[3]["audio"]
    kept = tmp_path / recs[0]["audio"]
    original = lost.read_bytes()
    kept_mtime = kept.stat().st_mtime_ns
    lost.unlink()
    generate_spoken_scenes(tmp_path, SMALL, workers=1, progress=False)
    assert lost.read_bytes() == original
    assert kept.stat().st_mtime_ns == kept_mtime

    # A run killed before the completion marker leaves only the in-progress marker; the next run
    # resumes, reusing finished files.
    (tmp_path / "corpus.json").rename(tmp_path / "corpus.partial.json")
    (tmp_path / recs[0]["image"]).unlink()
    generate_spoken_scenes(tmp_path, SMALL, workers=1, progress=False)
    assert (tmp_path / recs[0]["image"]).is_file()
    assert kept.stat().st_mtime_ns == kept_mtime
    assert (tmp_path / "corpus.json").is_file()
    assert not (tmp_path / "corpus.partial.json").exists()


def test_missing_tools_and_data_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthetic.shutil, "which", lambda exe: None)
    with pytest.raises(VGSKitError, match="apt-get install espeak-ng flite"):
        generate_spoken_scenes(tmp_path / "x", SMALL, progress=False)
    monkeypatch.undo()
    monkeypatch.setenv("VGSKIT_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(VGSKitError, match="apt-get install dataset-fashion-mnist"):
        synthetic._load_fashion_mnist("t10k")


def test_config_validation_and_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="num_val"):
        SpokenScenesConfig(num_train=1, num_val=-1, num_test=1).validate()
    with pytest.raises(ConfigError, match="captions_per_image"):
        SpokenScenesConfig(num_train=1, num_val=1, num_test=1, captions_per_image=0).validate()
    with pytest.raises(ConfigError, match="preset"):
        synthetic.preset_dir("huge")
    monkeypatch.setenv("VGSKIT_CACHE", str(tmp_path))
    assert synthetic.default_cache_dir() == tmp_path
    assert synthetic.preset_dir("demo") == tmp_path / "spoken-scenes-demo"
    monkeypatch.delenv("VGSKIT_CACHE")
    assert synthetic.default_cache_dir() == Path.home() / ".cache" / "vgskit"
    for preset in PRESETS.values():
        preset.validate()


def test_a_second_generator_waits_and_reuses_the_corpus(tmp_path: Path) -> None:
    """Two processes asking for one corpus: the second waits for the lock, then reuses what the first made."""
    import threading

    out = tmp_path / "shared"
    results: list[Path] = []
    waiter = threading.Thread(
        target=lambda: results.append(generate_spoken_scenes(out, SMALL, workers=1, progress=False))
    )
    with synthetic.corpus_lock(out, progress=False):  # the "first process"
        waiter.start()
        waiter.join(timeout=1.0)
        # Blocked before writing anything (a generator writes corpus.partial.json first thing).
        assert waiter.is_alive() and not (out / "corpus.partial.json").exists()
        manifest = synthetic._generate(out, SMALL, workers=1, progress=False)
        made = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    waiter.join(timeout=120)
    assert not waiter.is_alive() and results == [manifest]
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == made  # reused: no file written again
