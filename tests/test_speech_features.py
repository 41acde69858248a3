"""Precomputed speech frames from a file (``data.speech_features``) for models that read ``features``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from vgskit.contract import Batch, TrainState
from vgskit.data.loader import SpeechFeatureSource, collate_spoken_captions
from vgskit.data.manifest import read_manifest
from vgskit.errors import ConfigError
from vgskit.experiment import load_model, make_dataset, speech_feature_source, train_from_recipe
from vgskit.models import create_model
from vgskit.models.milan.model import Milan
from vgskit.retrieval.evaluate import evaluate

DIM, RATE = 6, 100.0


def random_frames(caption_ids: list[str], dim: int = DIM, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 frames [T, dim] per caption, T from 5 to 40 (far below any crop)."""
    rng = np.random.default_rng(seed)
    return {c: rng.standard_normal((int(rng.integers(5, 41)), dim)).astype(np.float32) for c in caption_ids}


def write_h5(path: Path, frames: dict[str, np.ndarray], rate: float = RATE) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["frame_rate"] = rate
        for key, arr in frames.items():
            f.create_dataset(key, data=arr)
    return path


@pytest.fixture(scope="module")
def frames(tiny_manifest: Path) -> dict[str, np.ndarray]:
    return random_frames([r.caption_id for r in read_manifest(tiny_manifest, check_files=False)])


@pytest.fixture(scope="module")
def features_h5(frames: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_h5(tmp_path_factory.mktemp("speech-features") / "feats.h5", frames)


def recipe(manifest: Path, features: Path | None, model: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "model": model or {"name": "milan_small", "frontend": {"kind": "features", "feature_dim": DIM,
                                                                "feature_rate": RATE}},
        "data": {"manifest": str(manifest), "speech_features": None if features is None else str(features),
                 "captions_per_image": 2},
        "train": {"optimizer": "adamw", "lr": 1e-3, "warmup_steps": 0, "max_steps": 2, "batch_size": 8,
                  "log_every": 1, "eval_every": 2, "ckpt_every": 2, "tensorboard": False},
    }


def test_milan_reads_file_frames_trains_and_evaluates(tiny_manifest: Path, features_h5: Path,
                                                      frames: dict[str, np.ndarray], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    train_records = read_manifest(tiny_manifest, split="train")
    seen: list[Batch] = []
    original_step = Milan.step

    def recording_step(self: Milan, batch: Batch, state: TrainState) -> Any:
        seen.append(batch)
        return original_step(self, batch, state)

    monkeypatch.setattr(Milan, "step", recording_step)
    summary = train_from_recipe(recipe(tiny_manifest, features_h5), out_dir=tmp_path / "run", progress=False)
    assert summary["step"] == 2 and len(seen) == 2
    for batch in seen:  # every training row holds exactly its caption's frames from the file, zero after them
        speech = batch.speech
        assert speech.kind == "features" and speech.rate == RATE and speech.values.shape[-1] == DIM
        for row, caption in enumerate(batch.caption_ids.tolist()):
            want = torch.from_numpy(frames[train_records[caption].caption_id])
            n = int(speech.lengths[row])
            assert n == len(want)
            assert torch.equal(speech.values[row, :n], want)
            assert not speech.values[row, n:].any()

    model = load_model(tmp_path / "run")
    test = make_dataset(tiny_manifest, "test", model.image_transform, max_seconds=None, preload=True,
                        speech_features=features_h5)
    results = evaluate(model, test)
    assert results["speech_to_image"]["n_queries"] == len(test)
    # The command line reads the same frames: `vgskit eval --speech-features` gives the same numbers.
    import json

    from vgskit.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--manifest", str(tiny_manifest), "--split", "test",
                 "--speech-features", str(features_h5), "--json", str(tmp_path / "eval.json")]) == 0
    cli = json.loads((tmp_path / "eval.json").read_text())
    for direction in ("speech_to_image", "image_to_speech"):
        assert cli[direction] == pytest.approx(results[direction])


@pytest.mark.parametrize("layout", ["h5", "npy"])
def test_items_and_batches_carry_the_file_frames(tiny_manifest: Path, frames: dict[str, np.ndarray],
                                                 tmp_path: Path, layout: str) -> None:
    if layout == "h5":
        path = write_h5(tmp_path / "f.h5", frames)
    else:
        path = tmp_path / "npy"
        path.mkdir()
        (path / "meta.json").write_text(json.dumps({"frame_rate": RATE}))
        for key, arr in frames.items():
            np.save(path / f"{key}.npy", arr)
    transform = create_model("milan_small").image_transform
    ds = make_dataset(tiny_manifest, "val", transform, max_seconds=None, preload=True, speech_features=path)
    want = [torch.from_numpy(frames[r.caption_id]) for r in ds.records]
    assert ds.num_samples() == [len(w) for w in want]  # length bucketing sees frames
    items = [ds[i] for i in range(5)]
    for item, w in zip(items, want, strict=False):
        assert "wav" not in item and torch.equal(item["feats"], w) and item["length"] == len(w)
    for speech in (collate_spoken_captions(items).speech, ds.speech_inputs(range(5))):
        assert speech.kind == "features" and speech.unit == "frames" and speech.rate == RATE
        assert speech.values.shape == (5, max(len(w) for w in want[:5]), DIM)
        assert speech.lengths.tolist() == [len(w) for w in want[:5]]
        for row, w in enumerate(want[:5]):
            assert torch.equal(speech.values[row, : len(w)], w) and not speech.values[row, len(w):].any()

    # A crop of max_seconds keeps round(max_seconds * frame_rate) frames: the head ones, or a random window.
    head = make_dataset(tiny_manifest, "val", transform, max_seconds=0.07, preload=False, speech_features=path)
    assert all(torch.equal(head.features(i), w[:7]) for i, w in enumerate(want))
    rand = make_dataset(tiny_manifest, "val", transform, max_seconds=0.07, preload=False, crop="random",
                        speech_features=path)
    for i, w in enumerate(want):
        start = rand.crop_offset(i, len(w), 7)
        assert torch.equal(rand.features(i), w[start : start + 7])


def test_bad_inputs_give_clear_errors(tiny_manifest: Path, frames: dict[str, np.ndarray], tmp_path: Path) -> None:
    def train(features: Path | None, model: dict[str, Any] | None = None) -> None:
        train_from_recipe(recipe(tiny_manifest, features, model), out_dir=tmp_path / "run", progress=False)

    missing_file = tmp_path / "nowhere.h5"
    with pytest.raises(ConfigError, match=r"speech features .*nowhere\.h5: file not found"):
        train(missing_file)

    # Missing utterances: how many, and the first few (train and validation captions are both checked).
    ids = [r.caption_id for r in read_manifest(tiny_manifest, check_files=False) if r.split in ("train", "val")]
    lacking = write_h5(tmp_path / "lacking.h5", {k: v for k, v in frames.items() if k not in ids[:7]})
    with pytest.raises(ConfigError, match=rf"lacking\.h5: no frames for 7 of {len(ids)} utterances "
                                          rf"\({', '.join(ids[:5])}, \.\.\.\)"):
        train(lacking)

    wide = write_h5(tmp_path / "wide.h5", random_frames(list(frames), dim=DIM + 2))
    with pytest.raises(ConfigError, match=rf"wide\.h5: frames are {DIM + 2}-d, but model 'milan_small' reads "
                                          rf"{DIM}-d"):
        train(wide)

    slow = write_h5(tmp_path / "slow.h5", frames, rate=50.0)
    with pytest.raises(ConfigError, match=r"slow\.h5: frames are at 50 frames/s, but model 'milan_small' reads "
                                          r"100 frames/s"):
        train(slow)

    unrated = tmp_path / "unrated.h5"
    with h5py.File(unrated, "w") as f:
        for key, arr in frames.items():
            f.create_dataset(key, data=arr)
    with pytest.raises(ConfigError, match=r"unrated\.h5: no frame_rate"):
        train(unrated)

    no_meta = tmp_path / "no_meta"
    no_meta.mkdir()
    with pytest.raises(ConfigError, match=r"no_meta: a folder of \.npy features needs a meta\.json"):
        train(no_meta)

    good = write_h5(tmp_path / "good.h5", frames)
    with pytest.raises(ConfigError, match="model 'milan_small' reads waveform speech inputs, not precomputed"):
        train(good, {"name": "milan_small"})  # the MFCC front-end reads waveforms
    with pytest.raises(ConfigError, match="model 'dual_encoder_tiny' reads waveform speech inputs"):
        train(good, {"name": "dual_encoder_tiny"})
    with pytest.raises(ConfigError, match="data.speech_features: model 'milan_small' reads precomputed speech "
                                          "features; give"):
        train(None)
    assert not (tmp_path / "run" / "checkpoints").exists()  # every mistake is caught before training


def test_source_checks_shapes_of_each_utterance(tmp_path: Path) -> None:
    path = tmp_path / "mixed.h5"
    with h5py.File(path, "w") as f:
        f.attrs["frame_rate"] = RATE
        f.create_dataset("a", data=np.zeros((4, 3), np.float32))
        f.create_dataset("b", data=np.zeros((4, 5), np.float32))
        f.create_dataset("c", data=np.zeros(4, np.float32))
    with pytest.raises(ConfigError, match="utterance 'b' has 5-d frames, others 3-d"):
        SpeechFeatureSource(path).check_ids(["a", "b"])
    with pytest.raises(ConfigError, match=r"utterance 'c' has shape \(4,\)"):
        SpeechFeatureSource(path).check_ids(["c"])
    model = create_model("milan_small", frontend={"kind": "features", "feature_dim": 3})
    assert speech_feature_source(model, path, []) is not None  # nothing to check against, no error
