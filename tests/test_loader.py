"""Dataset, collation and the paired batch sampler."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from vgskit.data.loader import (
    SpokenCaptionDataset,
    collate_spoken_captions,
    paired_batch_sampler,
    paired_batch_sampler_factory,
)
from vgskit.data.manifest import Record
from vgskit.errors import ConfigError


@pytest.fixture()
def records(tmp_path) -> list[Record]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(3):
        img = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(img)
        for c in range(2):
            wav = tmp_path / f"cap{i}_{c}.wav"
            sf.write(wav, (rng.standard_normal(3000 + 1000 * i + 100 * c) * 0.1).astype(np.float32), 16000)
            out.append(Record(f"c{i}{c}", str(wav), str(img), f"img{i}", "train"))
    return out


def test_dataset_items_and_preload_agree(records) -> None:
    lazy = SpokenCaptionDataset(records, image_size=16)
    eager = SpokenCaptionDataset(records, image_size=16, preload=True, progress=False)
    assert len(lazy) == 6 and lazy.image_keys == ["img0", "img1", "img2"]
    assert lazy.caption_image_index == [0, 0, 1, 1, 2, 2]
    assert eager.num_samples() == [3000, 3100, 4000, 4100, 5000, 5100]
    for i in (0, 5):
        a, b = lazy[i], eager[i]
        assert a["wav"].dtype == torch.float32 and a["length"] == b["length"] == a["wav"].shape[0]
        assert a["pixels"].shape == (3, 16, 16) and a["image_index"] == b["image_index"] == i // 2
        assert a["caption_index"] == i
        torch.testing.assert_close(a["wav"], b["wav"], atol=1.0 / 32768 + 1e-6, rtol=0)  # int16 storage
        torch.testing.assert_close(a["pixels"], b["pixels"])
    # ImageNet normalisation of uint8 pixels
    raw = torch.from_numpy(eager._images[0]).permute(2, 0, 1).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(eager[0]["pixels"], (raw - mean) / std)


def test_max_seconds_crops(records) -> None:
    ds = SpokenCaptionDataset(records, image_size=8, max_seconds=0.2)
    assert ds[5]["length"] == 3200


def test_collate_pads_to_multiple(records) -> None:
    ds = SpokenCaptionDataset(records, image_size=16, preload=True, progress=False)
    batch = collate_spoken_captions([ds[i] for i in (0, 3, 4)], pad_multiple=1024)
    wavs = batch.speech.values
    assert batch.speech.kind == "waveform" and batch.speech.unit == "samples"
    assert wavs.shape == (3, 5120)  # 5000 rounded up to a multiple of 1024
    assert batch.speech.lengths.tolist() == [3000, 4100, 5000]
    assert batch.image_ids.tolist() == [0, 1, 2] and batch.caption_ids.tolist() == [0, 3, 4]
    assert batch.image.kind == "pixels" and batch.image.pixels.shape == (3, 3, 16, 16)
    torch.testing.assert_close(batch.image.pixels[1], ds.pixels(1))
    assert wavs[0, 3000:].abs().max() == 0 and wavs[0, :3000].abs().max() > 0
    torch.testing.assert_close(wavs[1, :4100], ds[3]["wav"])


def _caption_images(n_images: int = 40, caps: int = 5) -> list[int]:
    return [i for i in range(n_images) for _ in range(caps)]


def test_sampler_pairs_distinct_images_deterministic() -> None:
    image_idx = _caption_images()
    batches = paired_batch_sampler(image_idx, batch_size=8, captions_per_image=2, seed=3, epoch=1)
    assert batches == paired_batch_sampler(image_idx, batch_size=8, captions_per_image=2, seed=3, epoch=1)
    assert batches != paired_batch_sampler(image_idx, batch_size=8, captions_per_image=2, seed=3, epoch=2)
    assert batches != paired_batch_sampler(image_idx, batch_size=8, captions_per_image=2, seed=4, epoch=1)
    assert len(batches) == 2 * (40 // 4)  # two rounds of 2 captions per image (5 captions -> 2 groups)
    seen: Counter[int] = Counter()
    for batch in batches:
        assert len(batch) == 8
        counts = Counter(image_idx[c] for c in batch)
        assert len(counts) == 4 and set(counts.values()) == {2}
        # captions of one image are adjacent (a contiguous split over processes keeps them together)
        assert all(image_idx[batch[k]] == image_idx[batch[k + 1]] for k in range(0, 8, 2))
        seen.update(batch)
    assert max(seen.values()) == 1  # no caption twice in an epoch


def test_sampler_accepts_records_and_buckets_lengths() -> None:
    recs = [Record(f"c{i}", "a.wav", "b.png", f"im{i // 2}", "train") for i in range(64)]
    lengths = [int(x) for x in np.random.default_rng(0).integers(1000, 9000, 64)]
    batches = paired_batch_sampler(recs, batch_size=8, seed=0, epoch=0, lengths=lengths, bucket_batches=100)
    assert len(batches) == 8
    # one bucket: batches are cut from groups sorted by their longest caption, so group lengths of
    # different batches do not interleave
    group_max = [sorted(max(lengths[b[k]], lengths[b[k + 1]]) for k in range(0, 8, 2)) for b in batches]
    group_max.sort()
    assert all(g[-1] <= h[0] for g, h in zip(group_max, group_max[1:], strict=False))
    plain = paired_batch_sampler(recs, batch_size=8, seed=0, epoch=0)
    padding = [sum(max(lengths[c] for c in b) - lengths[c] for c in b) for b in batches]
    padding_plain = [sum(max(lengths[c] for c in b) - lengths[c] for c in b) for b in plain]
    assert sum(padding) < sum(padding_plain)
    factory = paired_batch_sampler_factory(recs, batch_size=8, lengths=lengths, bucket_batches=100)
    assert factory(0, 0) == batches and factory.num_batches(0) == 8


def test_num_batches_matches_sampler() -> None:
    image_idx = [i for i in range(30) for _ in range(1 + i % 6)]  # 1..6 captions per image
    factory = paired_batch_sampler_factory(image_idx, batch_size=6, captions_per_image=2)
    for epoch in range(3):
        assert len(factory(epoch, 7)) == factory.num_batches(epoch) > 0


def test_sampler_rejects_bad_batch_size() -> None:
    with pytest.raises(ConfigError, match="multiple"):
        paired_batch_sampler(_caption_images(), batch_size=7, captions_per_image=2)


def test_train_items_are_augmented_per_epoch_and_evaluation_is_not(records) -> None:
    from vgskit.data.augment import AugmentConfig, augment_image, augment_rng

    cfg = AugmentConfig(kind="crop_flip", scale=(0.3, 0.6))
    ds = SpokenCaptionDataset(records, image_size=16, preload=True, progress=False, augment=cfg, crop_seed=4)
    plain = SpokenCaptionDataset(records, image_size=16, preload=True, progress=False)
    # Evaluation pixels are the deterministic transform, the same as without augmentation.
    torch.testing.assert_close(ds.pixels(1), plain.pixels(1), rtol=0, atol=0)
    # A training item carries this epoch's window of its own caption index: recomputed independently here.
    arr = plain._images[ds.caption_image_index[3]]
    ds.set_epoch(2)
    want = augment_image(arr, cfg, augment_rng(4, 2, 3))
    want_t = (torch.tensor(want).permute(2, 0, 1).float() / 255.0 - ds.mean) / ds.std
    torch.testing.assert_close(ds[3]["pixels"], want_t, rtol=0, atol=0)
    assert not torch.equal(ds[3]["pixels"], plain[3]["pixels"])
    ds.set_epoch(3)
    assert not torch.equal(ds[3]["pixels"], want_t)  # a new window every epoch


def test_items_carry_requested_extra_fields(records) -> None:
    import dataclasses

    words = [[["a", 0.0, 0.1]], None, [["red", 0.1, 0.3], ["bag", 0.3, 0.5]], [], None, [["x", 0, 1]]]
    base = [dataclasses.replace(r, extra={"words": w} if w is not None else {"asr": "hi"})
            for r, w in zip(records, words, strict=True)]
    ds = SpokenCaptionDataset(base, image_size=8, progress=False, extra_fields=("words",))
    batch = collate_spoken_captions([ds[i] for i in (0, 1, 2)])
    assert batch.extras == {"words": words[:3]}  # a record without the field carries None
    assert "extras" not in SpokenCaptionDataset(base, image_size=8, progress=False)[0]
