"""Random training crops: reproducible windows per (seed, epoch, caption), the same under workers and
preloading, cropped lengths for bucketing, and the data.train_crop recipe option."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vgskit.contract import Batch, StepOutput, TrainState
from vgskit.data.loader import (
    CROP_STREAM,
    SpokenCaptionDataset,
    collate_spoken_captions,
    paired_batch_sampler_factory,
)
from vgskit.data.manifest import Record, read_manifest
from vgskit.errors import ConfigError
from vgskit.experiment import DataConfig, data_config_from, load_model, train_from_recipe
from vgskit.models.dual_encoder import DualEncoder
from vgskit.models.registry import model_config, register_model

LENGTHS = (3000, 8000, 12000, 1200, 9000, 16000)  # samples; 1200 is shorter than the window
WINDOW = 0.25  # seconds = 4000 samples


@pytest.fixture()
def records(tmp_path) -> list[Record]:
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate(LENGTHS):
        img = tmp_path / f"img{i // 2}.png"
        if not img.exists():
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(img)
        wav = tmp_path / f"cap{i}.wav"
        sf.write(wav, (rng.standard_normal(n) * 0.1).astype(np.float32), 16000, subtype="FLOAT")
        out.append(Record(f"c{i}", str(wav), str(img), f"img{i // 2}", "train"))
    return out


def _full(record: Record) -> torch.Tensor:
    return torch.from_numpy(sf.read(record.audio, dtype="float32")[0])


def test_random_windows_are_slices_seeded_by_seed_epoch_and_index(records) -> None:
    ds = SpokenCaptionDataset(records, image_size=8, max_seconds=WINDOW, crop="random", crop_seed=3)
    window = 4000
    offsets = {}
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i, r in enumerate(records):
            wav = ds.waveform(i)
            full = _full(r)
            assert len(wav) == min(len(full), window)
            start = ds.crop_offset(i, len(full))
            assert 0 <= start <= max(len(full) - window, 0)
            torch.testing.assert_close(wav, full[start:start + window], atol=0, rtol=0)
            offsets[epoch, i] = start
    assert all(offsets[e, 3] == 0 for e in range(4))  # shorter than the window: kept whole
    # New windows every epoch, different windows for different captions.
    assert len({offsets[e, 5] for e in range(4)}) > 1
    assert len({offsets[0, i] for i in (1, 2, 4, 5)}) > 1
    # A pure function of (seed, epoch, index): another dataset object agrees; another seed does not.
    again = SpokenCaptionDataset(records, image_size=8, max_seconds=WINDOW, crop="random")
    again.set_epoch(2, seed=3)
    assert [again.crop_offset(i, len(_full(r))) for i, r in enumerate(records)] == [
        offsets[2, i] for i in range(len(records))]
    again.set_epoch(2, seed=4)
    assert [again.crop_offset(i, len(_full(r))) for i, r in enumerate(records)] != [
        offsets[2, i] for i in range(len(records))]


def test_head_crop_is_unchanged(records) -> None:
    ds = SpokenCaptionDataset(records, image_size=8, max_seconds=WINDOW)
    ds.set_epoch(5, seed=9)
    torch.testing.assert_close(ds.waveform(5), _full(records[5])[:4000], atol=0, rtol=0)


def test_preloaded_random_crops_match_lazy_ones_and_lengths_are_cropped(records) -> None:
    lazy = SpokenCaptionDataset(records, image_size=8, max_seconds=WINDOW, crop="random", crop_seed=1)
    eager = SpokenCaptionDataset(records, image_size=8, max_seconds=WINDOW, crop="random", crop_seed=1,
                                 preload=True, progress=False)
    head = SpokenCaptionDataset(records, image_size=8, max_seconds=WINDOW, preload=True, progress=False)
    expected = [min(n, 4000) for n in LENGTHS]
    # Bucketing sees the cropped lengths, preloaded (whole utterances kept in memory) or from headers.
    assert lazy.num_samples() == eager.num_samples() == head.num_samples() == expected
    for epoch in (0, 1):
        lazy.set_epoch(epoch)
        eager.set_epoch(epoch)
        for i in range(len(records)):
            torch.testing.assert_close(eager.waveform(i), lazy.waveform(i), atol=1 / 32768 + 1e-6, rtol=0)
            assert eager[i]["length"] == expected[i]


def _epoch_batches(ds: SpokenCaptionDataset, num_workers: int, epoch: int, seed: int) -> list[torch.Tensor]:
    factory = paired_batch_sampler_factory(ds.caption_image_index, 4, 2, lengths=ds.num_samples(),
                                           on_epoch=ds.set_epoch)
    batches = factory(epoch, seed)  # what the trainer does: the factory first, then the epoch's loader
    loader = DataLoader(ds, batch_sampler=batches, collate_fn=collate_spoken_captions, num_workers=num_workers)
    return [b.speech.values for b in loader]


def test_workers_see_the_epoch_the_sampler_set(records) -> None:
    ds = SpokenCaptionDataset(records, image_size=8, max_seconds=WINDOW, crop="random")
    in_process = _epoch_batches(ds, 0, epoch=1, seed=7)
    with_workers = _epoch_batches(ds, 2, epoch=1, seed=7)
    assert len(in_process) == len(with_workers) > 0
    for a, b in zip(in_process, with_workers, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert ds.epoch == 1 and ds.crop_seed == 7  # the trainer's seed reached the dataset


def test_crop_option_is_validated() -> None:
    with pytest.raises(ConfigError, match="data.train_crop"):
        data_config_from({"train_crop": "middle"})
    with pytest.raises(ConfigError, match="train_crop"):
        DataConfig(train_crop="tail")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="data.train_crop.*train_max_seconds"):
        data_config_from({"train_crop": "random", "train_max_seconds": None})
    assert data_config_from({"train_crop": "random"}).train_crop == "random"
    with pytest.raises(ConfigError, match="crop must be one of"):
        SpokenCaptionDataset([Record("c", "a.wav", "i.png", "i", "train")], crop="tail")  # type: ignore[arg-type]


class _CropRecorder(DualEncoder):
    """The tiny dual encoder, recording the caption ids and waveform windows of every training batch."""

    batches: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []

    def step(self, batch: Batch, state: TrainState) -> StepOutput:
        ids, wavs, lengths = batch.caption_ids, batch.speech.values, batch.speech.lengths
        type(self).batches.append((ids.tolist(), wavs.detach().cpu().clone(), lengths.cpu().clone()))
        return super().step(batch, state)


register_model("test_crop_recorder", config=copy.deepcopy(model_config("dual_encoder_tiny")))(_CropRecorder)


def _batches_per_epoch(records: list[Record], batch_size: int, captions_per_image: int) -> int:
    """Paired batches per epoch: round r takes a group of captions from every image with enough left."""
    per_image = Counter(r.image_id for r in records)
    images_per_batch = batch_size // captions_per_image
    rounds = max(per_image.values()) // captions_per_image
    return sum(sum(n >= (r + 1) * captions_per_image for n in per_image.values()) // images_per_batch
               for r in range(rounds))


def test_recipe_trains_with_random_crops(tiny_manifest, tmp_path) -> None:
    seed, seconds, batch_size, captions_per_image, epochs = 5, 1.5, 16, 2, 3
    window = int(seconds * 16000)
    records = read_manifest(tiny_manifest, split="train")  # the training set's caption order
    per_epoch = _batches_per_epoch(records, batch_size, captions_per_image)
    _CropRecorder.batches = []
    summary = train_from_recipe(
        "demo_tiny", out_dir=tmp_path / "run", manifest=str(tiny_manifest), progress=False,
        overrides=["model.name=test_crop_recorder", "data.train_crop=random", f"data.train_max_seconds={seconds}",
                   f"data.captions_per_image={captions_per_image}", f"train.batch_size={batch_size}",
                   f"train.seed={seed}", f"train.max_steps={epochs * per_epoch}", "train.eval_every=null"])
    assert summary["step"] == epochs * per_epoch == len(_CropRecorder.batches)

    full = [torch.from_numpy(sf.read(r.audio, dtype="float32")[0]) for r in records]
    assert min(len(w) for w in full) > window  # every caption is cropped
    offsets: dict[tuple[int, int], int] = {}
    for step, (caption_ids, wavs, lengths) in enumerate(_CropRecorder.batches):
        epoch = step // per_epoch
        for row, i in enumerate(caption_ids):
            # The documented draw: numpy's default_rng([seed, epoch, caption index, CROP_STREAM]).
            rng = np.random.default_rng([seed, epoch, i, CROP_STREAM])
            start = int(rng.integers(0, len(full[i]) - window + 1))
            assert int(lengths[row]) == window
            # What the model was fed is that window of the caption's audio (16-bit files: exact).
            torch.testing.assert_close(wavs[row, :window], full[i][start:start + window], atol=0, rtol=0,
                                       msg=lambda m, s=step, c=i, o=start: f"step {s}, caption {c}, offset {o}: {m}")
            assert (wavs[row, window:] == 0).all()
            assert (epoch, i) not in offsets  # each caption once per epoch
            offsets[epoch, i] = start
    assert sum(1 for start in offsets.values() if start > 0) > len(offsets) // 2  # not head crops
    seen_every_epoch = [i for i in range(len(records)) if all((e, i) in offsets for e in range(epochs))]
    assert seen_every_epoch
    # New windows every epoch: most captions seen in every epoch got at least two different offsets.
    moved = [i for i in seen_every_epoch if len({offsets[e, i] for e in range(epochs)}) > 1]
    assert len(moved) > len(seen_every_epoch) // 2

    checkpoint = Path(summary["last_checkpoint"])
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["extra"]["data"]["train_crop"] == "random"
    assert load_model(checkpoint).model_name == "test_crop_recorder"
