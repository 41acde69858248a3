"""Random training crops: reproducible windows per (seed, epoch, caption), the same under workers and
preloading, cropped lengths for bucketing, and the data.train_crop recipe option."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vgskit.data.loader import (
    SpokenCaptionDataset,
    collate_spoken_captions,
    paired_batch_sampler_factory,
)
from vgskit.data.manifest import Record
from vgskit.errors import ConfigError
from vgskit.experiment import DataConfig, data_config_from, load_model, train_from_recipe

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
    return [b["wavs"] for b in loader]


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


def test_recipe_trains_with_random_crops(tiny_manifest, tmp_path) -> None:
    summary = train_from_recipe("demo_tiny", out_dir=tmp_path / "run", manifest=str(tiny_manifest),
                                overrides=["data.train_crop=random", "data.train_max_seconds=1.5",
                                           "train.max_steps=2", "train.eval_every=null"], progress=False)
    assert summary["step"] == 2
    checkpoint = Path(summary["last_checkpoint"])
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["extra"]["data"]["train_crop"] == "random"
    assert load_model(checkpoint).model_name == "dual_encoder_tiny"
