"""Frozen-feature cache: a tiny random HuBERT saved to a folder, short WAVs written to a temporary folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import HubertConfig, HubertModel, ViTConfig, ViTModel, Wav2Vec2FeatureExtractor

from _tiny_towers import TINY_SPEECH
from vgskit.audio import load_audio, save_wav
from vgskit.data.cache import (
    CachedImageEncoder,
    CachedSpeechEncoder,
    CachedSpokenCaptionDataset,
    ExtractionOptions,
    FeatureCache,
    FeatureCacheError,
    collate_cached_captions,
    extract,
    tower_key,
)
from vgskit.data.loader import SpokenCaptionDataset
from vgskit.data.manifest import Record
from vgskit.encoders.pretrained_image import PretrainedImageConfig, PretrainedImageEncoder
from vgskit.encoders.pretrained_speech import PretrainedSpeechConfig, PretrainedSpeechEncoder

TINY = TINY_SPEECH
DURATIONS = (0.3, 0.45, 0.2, 0.5, 0.35)  # seconds; distinct lengths exercise padding inside batches


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hubert")
    torch.manual_seed(0)
    HubertModel(HubertConfig(**TINY)).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tower(hubert_dir: Path) -> PretrainedSpeechEncoder:
    return PretrainedSpeechEncoder(PretrainedSpeechConfig(str(hubert_dir), freeze=True))


def _tone(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture
def wavs(tmp_path: Path) -> list[str]:
    return [str(save_wav(tmp_path / "wav" / f"u{i}.wav", _tone(d, i), 16000)) for i, d in enumerate(DURATIONS)]


def _live(tower: PretrainedSpeechEncoder, path: str) -> tuple[torch.Tensor, ...]:
    wav = torch.from_numpy(load_audio(path, sample_rate=16000))[None]
    with torch.no_grad():
        return tower(wav, torch.tensor([wav.shape[1]])).hidden_states


def test_cached_features_match_live_tower(tmp_path: Path, tower, wavs) -> None:
    cache = FeatureCache.for_tower(tmp_path / "cache", tower, ExtractionOptions(layers=(1, -1)))
    assert extract(cache, tower, wavs, batch_size=2, progress=False) == len(wavs)
    reopened = FeatureCache(tmp_path / "cache", cache.tower_key)  # reads everything back from disk
    assert len(reopened) == len(wavs) and reopened.meta["layers"] == [1, 3]
    for path in wavs:
        live = _live(tower, path)
        got = reopened.get(path)["hidden"]
        assert got.dtype == torch.float16 and got.shape == (2, live[0].shape[1], 32)
        torch.testing.assert_close(got[0].float(), live[1][0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(got[1].float(), live[3][0], atol=2e-3, rtol=2e-3)


def test_pooled_option_stores_layer_means(tmp_path: Path, tower, wavs) -> None:
    cache = FeatureCache.for_tower(tmp_path / "cache", tower, ExtractionOptions(pooled=True))
    extract(cache, tower, wavs[:2], progress=False)
    live = _live(tower, wavs[0])
    got = cache.get(wavs[0])["hidden"]  # [L, D]
    assert got.shape == (4, 32)
    torch.testing.assert_close(got.float(), torch.stack([s[0].mean(0) for s in live]), atol=2e-3, rtol=2e-3)


def test_second_extraction_does_not_call_the_tower(tmp_path: Path, tower, wavs, monkeypatch) -> None:
    cache = FeatureCache.for_tower(tmp_path / "cache", tower)
    extract(cache, tower, wavs, progress=False)

    def boom(*args, **kwargs):
        raise AssertionError("tower called although everything is cached")

    # Patched on the class: patching the shared instance would leave a bound method behind after undo.
    monkeypatch.setattr(PretrainedSpeechEncoder, "forward", boom)
    again = FeatureCache.for_tower(tmp_path / "cache", tower)
    assert again.tower_key == cache.tower_key
    assert extract(again, tower, wavs, progress=False) == 0


def test_interrupted_extraction_resumes_with_identical_results(tmp_path: Path, tower, wavs, monkeypatch) -> None:
    ref = FeatureCache.for_tower(tmp_path / "ref", tower)
    extract(ref, tower, wavs, batch_size=1, progress=False)

    calls = {"n": 0}
    real = PretrainedSpeechEncoder.forward

    def dies_after_two(self, w, lengths):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(self, w, lengths)

    monkeypatch.setattr(PretrainedSpeechEncoder, "forward", dies_after_two)
    cache = FeatureCache.for_tower(tmp_path / "cache", tower)
    with pytest.raises(KeyboardInterrupt):
        extract(cache, tower, wavs, batch_size=1, progress=False, flush_every=1, flush_interval=0)
    # A crash between two flushes leaves unindexed bytes behind; they must be cut off, not misread.
    with open(cache.folder / "hidden.bin", "ab") as f:
        f.write(b"\x7f" * 1000)
    monkeypatch.setattr(PretrainedSpeechEncoder, "forward", real)

    resumed = FeatureCache(tmp_path / "cache", cache.tower_key)
    assert len(resumed) == 2
    done = {"n": 0}

    def counting(self, w, lengths):
        done["n"] += 1
        return real(self, w, lengths)

    monkeypatch.setattr(PretrainedSpeechEncoder, "forward", counting)
    assert extract(resumed, tower, wavs, batch_size=1, progress=False) == 3 and done["n"] == 3
    final = FeatureCache(tmp_path / "cache", cache.tower_key)
    for path in wavs:
        assert torch.equal(final.get(path)["hidden"], ref.get(path)["hidden"])
    assert (final.folder / "hidden.bin").stat().st_size == (ref.folder / "hidden.bin").stat().st_size


def test_changed_file_is_extracted_again(tmp_path: Path, tower, wavs) -> None:
    cache = FeatureCache.for_tower(tmp_path / "cache", tower)
    extract(cache, tower, wavs, progress=False)
    old = cache.get(wavs[1])["hidden"]
    save_wav(wavs[1], _tone(0.25, 99), 16000)
    os.utime(wavs[1], ns=(1, 1))  # a distinct mtime even on coarse-clock filesystems
    assert wavs[1] not in cache
    with pytest.raises(FeatureCacheError, match="lacks 1 of"):
        CachedSpokenCaptionDataset(_dataset(wavs), speech_cache=cache)
    assert extract(cache, tower, wavs, progress=False) == 1
    new = FeatureCache(tmp_path / "cache", cache.tower_key)
    assert len(new) == len(wavs)  # the stale entry was replaced, not kept beside the new one
    got = new.get(wavs[1])["hidden"]
    assert got.shape[1] != old.shape[1]
    torch.testing.assert_close(got[-1].float(), _live(tower, wavs[1])[-1][0], atol=2e-3, rtol=2e-3)


def test_keys_depend_on_options_and_weights(tmp_path: Path, hubert_dir: Path, tower, wavs) -> None:
    base = tower_key(tower)
    assert tower_key(tower) == base
    assert tower_key(tower, layers=(1,)) != base
    assert tower_key(tower, layers=(1,)) != tower_key(tower, layers=(2,))
    assert tower_key(tower, pooled=True) != base
    other = PretrainedSpeechEncoder(PretrainedSpeechConfig(str(hubert_dir), freeze=True, num_layers=2))
    assert tower_key(other) != base
    reinit = PretrainedSpeechEncoder(PretrainedSpeechConfig(str(hubert_dir), freeze=True, reinit_last=1))
    assert tower_key(reinit) != tower_key(reinit.__class__(PretrainedSpeechConfig(str(hubert_dir), freeze=True)))
    # Different layer selection → different folder; a tower that does not match a cache is refused.
    a = FeatureCache.for_tower(tmp_path, tower, ExtractionOptions(layers=(1,)))
    b = FeatureCache.for_tower(tmp_path, tower, ExtractionOptions(layers=(2,)))
    assert a.folder != b.folder
    with pytest.raises(FeatureCacheError, match="does not match"):
        extract(a, other, wavs, progress=False)
    extract(a, tower, wavs[:1], progress=False)
    with pytest.raises(FeatureCacheError, match="built with"):
        FeatureCache(tmp_path, a.tower_key, ExtractionOptions(layers=(2,)))


def test_corrupt_or_truncated_cache_is_a_clear_error(tmp_path: Path, tower, wavs) -> None:
    cache = FeatureCache.for_tower(tmp_path, tower)
    extract(cache, tower, wavs, progress=False)
    index = cache.folder / "index.json"
    text = index.read_text()
    index.write_text(text[: len(text) // 2])
    with pytest.raises(FeatureCacheError, match=r"index\.json.*corrupt or truncated JSON"):
        FeatureCache(tmp_path, cache.tower_key)
    data = json.loads(text)
    del data["sizes"]
    index.write_text(json.dumps(data))
    with pytest.raises(FeatureCacheError, match="malformed"):
        FeatureCache(tmp_path, cache.tower_key)
    index.write_text(text)
    with open(cache.folder / "hidden.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(FeatureCacheError, match=r"hidden\.bin is truncated"):
        FeatureCache(tmp_path, cache.tower_key)
    with pytest.raises(FeatureCacheError, match="no feature cache"):
        FeatureCache(tmp_path, "0123456789abcdef")


def _dataset(paths: list[str], images: list[str] | None = None) -> SpokenCaptionDataset:
    images = images or ["unused.png"] * len(paths)
    records = [Record(f"c{i}", p, images[i // 2], f"img{i // 2}", "train") for i, p in enumerate(paths)]
    return SpokenCaptionDataset(records, progress=False)


@pytest.fixture(scope="module")
def image_tower(tmp_path_factory: pytest.TempPathFactory) -> PretrainedImageEncoder:
    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    image_size=32, patch_size=16)
    ViTModel(cfg, add_pooling_layer=False).eval().save_pretrained(folder)
    return PretrainedImageEncoder(PretrainedImageConfig(str(folder), freeze=True))


def test_training_reads_cache_transparently(tmp_path: Path, tower, image_tower, wavs) -> None:
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        images.append(str(tmp_path / f"im{i}.png"))
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images[-1])
    cache = FeatureCache.for_tower(tmp_path, tower, ExtractionOptions(layers=(0, 2, 3)))
    extract(cache, tower, wavs, batch_size=3, progress=False)
    image_cache = FeatureCache.for_tower(tmp_path, image_tower, ExtractionOptions(kind="image"))
    base = _dataset(wavs, images)
    assert extract(image_cache, image_tower, base.records, progress=False) == 3  # one per distinct image
    ds = CachedSpokenCaptionDataset(base, speech_cache=cache, image_cache=image_cache)
    enc = CachedSpeechEncoder(cache)
    assert (enc.width, enc.frame_rate, enc.num_hidden_states) == (32, 200.0, 3)
    batch = collate_cached_captions([ds[i] for i in range(len(wavs))])
    assert (batch.speech.kind, batch.speech.unit, batch.speech.rate) == ("tower_states", "frames", 200.0)
    assert batch.image.kind == "tower_outputs"
    cached = enc(batch.speech.values, batch.speech.lengths)

    live_batch = [base.waveform(i) for i in range(len(wavs))]
    lengths = torch.tensor([len(w) for w in live_batch])
    padded = torch.nn.utils.rnn.pad_sequence(live_batch, batch_first=True)
    with torch.no_grad():
        live = tower(padded, lengths)
    assert torch.equal(cached.lengths, live.lengths) and cached.frame_rate == live.frame_rate
    for mine, theirs in zip(cached.hidden_states, (live.hidden_states[i] for i in (0, 2, 3)), strict=True):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cached.last_hidden_state, live.last_hidden_state, atol=2e-3, rtol=2e-3)
    assert ds.num_frames() == live.lengths.tolist()
    with pytest.raises(ValueError, match="raw waveforms"):
        enc(padded, lengths)

    from vgskit.images import load_image

    img_out = CachedImageEncoder(image_cache)(batch.image.tower_outputs)
    pixels = torch.stack([image_tower.transform(load_image(images[i // 2])) for i in range(len(wavs))])
    with torch.no_grad():
        want = image_tower(pixels)
    assert img_out.tokens.shape == want.tokens.shape == (len(wavs), 4, 16)
    torch.testing.assert_close(img_out.tokens, want.tokens, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(img_out.pooled, want.pooled, atol=2e-3, rtol=2e-3)
