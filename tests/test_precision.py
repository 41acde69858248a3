"""bf16 inference: name checks, the fallback rule, bf16 evaluation and bf16 feature caches.

bf16 autocast works on every CPU (emulated where the instructions are missing), so the tests that need it
pretend the CPU has native bf16: they run, with the same results, on any machine.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

from _tiny_towers import TINY_SPEECH
from vgskit import precision as prec
from vgskit.audio import save_wav
from vgskit.data.cache import (
    ExtractionOptions,
    FeatureCache,
    FeatureCacheError,
    extract,
    tower_key,
    verify_cache,
)
from vgskit.data.loader import SpokenCaptionDataset
from vgskit.data.manifest import Record
from vgskit.encoders.pretrained_speech import PretrainedSpeechConfig, PretrainedSpeechEncoder
from vgskit.errors import ConfigError
from vgskit.models import create_model
from vgskit.retrieval.evaluate import embed_images, embed_speech, evaluate, evaluate_retrieval


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prec, "cpu_supports_bf16", lambda: True)


@pytest.fixture
def no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prec, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(prec, "_warned", set())  # each test sees the process's first fallback


def _tone(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * (150 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, SpokenCaptionDataset]:
    """A random dual encoder and 6 random images with 2 tone 'captions' each."""
    folder = tmp_path_factory.mktemp("precision-data")
    torch.manual_seed(0)
    model = create_model("dual_encoder", embed_dim=32).eval()
    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        image = folder / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
        for j in range(2):
            wav = save_wav(folder / f"c{i}_{j}.wav", _tone(0.3 + 0.05 * (i + j), 2 * i + j), 16000)
            records.append(Record(f"c{i}_{j}", str(wav), str(image), f"im{i}", "test"))
    ds = SpokenCaptionDataset(records, image_size=model.image_transform["size"], preload=True, progress=False)
    return model, ds


# ---------------------------------------------------------------------------------------------- names, fallback


def test_unknown_precision_names_are_refused_with_the_choices() -> None:
    for bad in ("fp16", "BF16", None, 16):
        with pytest.raises(ConfigError, match="choose one of fp32, bf16"):
            prec.validate_precision(bad)
    with pytest.raises(ConfigError, match="precision 'fp16' is not supported; choose one of fp32, bf16"):
        prec.resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="choose one of fp32, bf16"):
        prec.autocast("half", "cpu")
    with pytest.raises(ConfigError, match="ExtractionOptions.precision"):
        ExtractionOptions(precision="fp16")
    assert prec.PRECISIONS == ("fp32", "bf16")


def test_cli_offers_the_precisions() -> None:
    from vgskit.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["eval", "--model", "m", "--manifest", "x"]).precision == "fp32"
    assert parser.parse_args(["eval", "--model", "m", "--manifest", "x", "--precision", "bf16"]).precision == "bf16"
    assert parser.parse_args(["cache", "verify", "f", "--precision", "fp32"]).precision == "fp32"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--model", "m", "--manifest", "x", "--precision", "fp16"])


def test_bf16_without_native_support_falls_back_to_fp32_with_one_warning(
        no_bf16: None, caplog: pytest.LogCaptureFixture, model_and_data) -> None:
    with caplog.at_level(logging.WARNING, logger="vgskit.precision"):
        assert prec.resolve_precision("bf16", "cpu") == "fp32"
        assert prec.resolve_precision("bf16", torch.device("cpu")) == "fp32"
        assert prec.resolve_precision("fp32", "cpu") == "fp32"
    warnings = [r for r in caplog.records if r.name == "vgskit.precision"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "bf16 requested on cpu, running fp32 instead" in message
    assert "no native bf16 instructions" in message and "AVX-512 BF16" in message
    with pytest.raises(ConfigError, match="precision bf16 on cpu: this CPU has no native bf16"):
        prec.resolve_precision("bf16", "cpu", strict=True)

    # The evaluator follows the rule: a bf16 request on such a CPU is the fp32 evaluation, and says so.
    model, ds = model_and_data
    fp32 = evaluate(model, ds, batch_size=4)
    fallback = evaluate(model, ds, batch_size=4, precision="bf16")
    assert fallback.pop("precision") == "fp32"
    assert fallback == fp32


def test_detection_reads_cpuinfo_flags(tmp_path: Path) -> None:
    (tmp_path / "x86").write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx2\n")
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd bf16 sve\n")
    (tmp_path / "old").write_text("processor\t: 0\nflags\t\t: fpu avx512f avx2\n")
    for name, native in (("x86", True), ("arm", True), ("old", False)):
        assert bool(prec._cpuinfo_flags(str(tmp_path / name)) & prec._CPUINFO_BF16_FLAGS) is native
    assert prec._cpuinfo_flags(str(tmp_path / "missing")) == set()
    assert isinstance(prec.cpu_supports_bf16(), bool)


# ---------------------------------------------------------------------------------------------- evaluation


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_bf16_evaluation_runs_autocast_and_stays_close_to_fp32(native_bf16: None, model_and_data) -> None:
    model, ds = model_and_data
    speech32, image32 = embed_speech(model, ds, 4), embed_images(model, ds, 4)
    speech16 = embed_speech(model, ds, 4, precision="bf16")
    image16 = embed_images(model, ds, 4, precision="bf16")
    # Callers get float32 whatever the precision.
    assert speech16.pooled.dtype == image16.pooled.dtype == torch.float32
    # Autocast ran: the products were rounded to bf16, so the embeddings are not those of fp32 ...
    assert not torch.equal(speech16.pooled, speech32.pooled)
    assert not torch.equal(image16.pooled, image32.pooled)
    # ... yet within bf16 rounding of them (8 significant bits: about 0.4 % per product).
    assert _relative_error(speech16.pooled, speech32.pooled) < 2e-2
    assert _relative_error(image16.pooled, image32.pooled) < 2e-2
    # The explicit fp32 path is the default path, bit for bit.
    assert torch.equal(embed_speech(model, ds, 4, precision="fp32").pooled, speech32.pooled)
    # A scope sets the default of precision=None calls (what `vgskit eval --precision` uses).
    with prec.precision_scope("bf16"):
        assert prec.current_precision() == "bf16"
        assert torch.equal(embed_speech(model, ds, 4).pooled, speech16.pooled)
    assert prec.current_precision() == "fp32"

    results = evaluate(model, ds, batch_size=4, precision="bf16")
    assert results["precision"] == "bf16"
    assert "precision" not in evaluate(model, ds, batch_size=4)  # fp32 results keep their shape
    # The recall is the one of the bf16 embeddings.
    caption_image = torch.tensor(ds.caption_image_index, dtype=torch.long)
    direct = evaluate_retrieval(speech16.pooled, image16.pooled, caption_image)
    for direction in ("speech_to_image", "image_to_speech"):
        for k in (1, 5, 10):
            assert results[direction][f"R@{k}"] == direct[direction][f"R@{k}"]
        assert results[direction]["n_queries"] == (12 if direction == "speech_to_image" else 6)


# ---------------------------------------------------------------------------------------------- feature cache


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory) -> PretrainedSpeechEncoder:
    folder = tmp_path_factory.mktemp("hubert")
    torch.manual_seed(0)
    HubertModel(HubertConfig(**TINY_SPEECH)).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=False).save_pretrained(folder)
    return PretrainedSpeechEncoder(PretrainedSpeechConfig(str(folder), freeze=True))


def test_bf16_cache_records_its_precision_and_is_never_read_as_fp32(
        native_bf16: None, tmp_path: Path, tower: PretrainedSpeechEncoder) -> None:
    wavs = [str(save_wav(tmp_path / "wav" / f"u{i}.wav", _tone(0.3 + 0.1 * i, i), 16000)) for i in range(3)]
    root = tmp_path / "cache"
    # fp32 options serialise as before the field existed: existing caches keep their keys and folders.
    assert "precision" not in ExtractionOptions().to_json()
    assert tower_key(tower) == tower_key(tower, ExtractionOptions())
    assert tower_key(tower, precision="bf16") != tower_key(tower)

    bf16 = FeatureCache.for_tower(root, tower, ExtractionOptions(precision="bf16"))
    assert extract(bf16, tower, wavs, batch_size=2, progress=False, precision="bf16") == 3
    index = json.loads((bf16.folder / "index.json").read_text())
    assert index["options"]["precision"] == "bf16"
    assert json.loads((bf16.folder / "tower.json").read_text())["options"]["precision"] == "bf16"
    assert FeatureCache(root, bf16.tower_key).options.precision == "bf16"  # read back from the index

    # An fp32 request: another key, another (empty) folder; nothing of the bf16 cache is reused ...
    fp32 = FeatureCache.for_tower(root, tower, ExtractionOptions())
    assert fp32.folder != bf16.folder and len(fp32) == 0 and not any(w in fp32 for w in wavs)
    # ... and asking the bf16 folder for fp32 features is an error, not a silent reuse.
    with pytest.raises(FeatureCacheError, match="precision='bf16'"):
        FeatureCache(root, bf16.tower_key, ExtractionOptions())
    with pytest.raises(FeatureCacheError, match="holds bf16 features, not fp32"):
        extract(bf16, tower, wavs, progress=False, precision="fp32")

    assert extract(fp32, tower, wavs, batch_size=2, progress=False) == 3
    a, b = bf16.get(wavs[2])["hidden"].float(), fp32.get(wavs[2])["hidden"].float()
    assert not torch.equal(a, b) and _relative_error(a, b) < 5e-2  # bf16 features, close to fp32 ones

    # The bf16 cache stays verifiable: recomputed at its own precision, and at fp32 within bf16's allowance.
    report = verify_cache(bf16, tower, sample=None, batch_size=3)
    assert report.ok and report.checked == 3, report.format()
    report = verify_cache(bf16, tower, sample=None, precision="fp32")
    assert report.ok and report.checked == 3 and "recomputed at fp32" in report.format(), report.format()


def test_bf16_extraction_is_refused_where_bf16_is_not_native(
        no_bf16: None, tmp_path: Path, tower: PretrainedSpeechEncoder) -> None:
    wav = str(save_wav(tmp_path / "u.wav", _tone(0.3, 0), 16000))
    cache = FeatureCache.for_tower(tmp_path / "cache", tower, ExtractionOptions(precision="bf16"))
    with pytest.raises(ConfigError, match="no native bf16.*resolve the precision"):
        extract(cache, tower, [wav], progress=False)
    assert len(cache) == 0


def test_search_engine_embeds_queries_and_gallery_at_its_precision(native_bf16: None, model_and_data,
                                                                  tmp_path: Path) -> None:
    """``vgskit serve --precision`` / ``vgskit index --precision``: the engine's query and gallery forwards."""
    from vgskit.retrieval.engine import SearchEngine

    model, ds = model_and_data
    fp32 = SearchEngine.build_from_dataset(model, ds, captions=False)
    with prec.precision_scope("bf16"):
        bf16 = SearchEngine.build_from_dataset(model, ds, captions=False)
    g32, g16 = fp32.gallery.pooled, bf16.gallery.pooled
    assert g16.dtype == torch.float32 and not torch.equal(g16, g32) and _relative_error(g16, g32) < 2e-2
    # The gallery equals the evaluator's bf16 image embeddings (same forward, same rounding).
    torch.testing.assert_close(g16, embed_images(model, ds, 64, precision="bf16").pooled, rtol=0, atol=0)

    fp32.save(tmp_path / "index")
    wav = ds.waveform(0).numpy()
    q32 = SearchEngine.load(tmp_path / "index", model).embed_audio(wav)
    q16 = SearchEngine.load(tmp_path / "index", model, precision="bf16").embed_audio(wav)
    assert not torch.equal(q16, q32) and _relative_error(q16, q32) < 2e-2
    want = embed_speech(model, ds, 1, precision="bf16").pooled[0]
    torch.testing.assert_close(q16, want, rtol=0, atol=0)
