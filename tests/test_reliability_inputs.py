"""Bad input files, as a hostile but realistic user would feed them: each is refused with an error naming the
file and the problem, or handled correctly; never a traceback, never a silently wrong answer.

The files are generated here (soundfile, numpy, PIL, raw bytes), so every case stays part of the test suite.
New API names are reached through their modules (``audio.validate_waveform``) so that each test fails on its
own, for its own reason, on code that lacks them.
"""

from __future__ import annotations

import inspect
import json
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from test_corpora_flickr8k import build_facc
from test_corpora_places_ln_csc import build_ln, build_places
from test_corpora_spokencoco import build as build_spokencoco
from vgskit import audio, images
from vgskit.audio import audio_duration, load_audio
from vgskit.data import check
from vgskit.data.check import check_manifest
from vgskit.data.corpora import PrepareError, prepare_corpus
from vgskit.data.manifest import Record, read_manifest, write_manifest
from vgskit.errors import AudioError, ImageError
from vgskit.images import ImageTransform, load_image

SR = 16000


def _sine(seconds: float = 1.0, sr: int = SR, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _set_wav_data_size(path: Path, size: int, *, riff_size: int | None = None) -> None:
    """Overwrite the 'data' chunk's size field (and optionally the RIFF size) in place."""
    data = bytearray(path.read_bytes())
    at = data.index(b"data")
    data[at + 4 : at + 8] = struct.pack("<I", size)
    if riff_size is not None:
        data[4:8] = struct.pack("<I", riff_size)
    path.write_bytes(bytes(data))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A small, valid-looking PNG whose header states ``width x height`` (its pixel data is not that big)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# --- audio: files whose header and content disagree ---------------------------------------------------------------


def test_truncated_wav_is_refused_saying_how_much_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "cut.wav"
    sf.write(path, _sine(1.0), SR, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[: 44 + 2 * 6000])  # header says 16000 frames; 6000 are left
    expected = (r"cut\.wav: truncated: the WAV header states 16000 frames \(1\.000 s\) of audio but the file holds "
                r"only 6000 frames \(0\.375 s\); 10000 frames \(0\.625 s\) \(62%\) are missing")
    with pytest.raises(AudioError, match=expected):
        load_audio(path)
    with pytest.raises(AudioError, match=r"cut\.wav: truncated"):
        audio_duration(path)
    with pytest.raises(AudioError, match=r"cut\.wav: truncated"):
        audio.validate_audio_file(path)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
@pytest.mark.parametrize("riff_size", [None, 0])
def test_wav_with_zero_data_size_is_read_in_full(tmp_path: Path, subtype: str, riff_size: int | None) -> None:
    # Streaming writers cannot seek back to fill in the sizes; libsndfile then sees "0 frames".
    wav = _sine(1.0)
    path = tmp_path / "stream.wav"
    sf.write(path, wav, SR, subtype=subtype)
    reference = load_audio(path)
    _set_wav_data_size(path, 0, riff_size=riff_size)
    assert audio_duration(path) == pytest.approx(1.0)
    got = load_audio(path)
    np.testing.assert_array_equal(got, reference)
    assert audio.validate_audio_file(path) == pytest.approx(1.0)


def test_wav_with_placeholder_size_is_not_called_truncated(tmp_path: Path) -> None:
    path = tmp_path / "espeak_like.wav"
    sf.write(path, _sine(0.5), SR, subtype="PCM_16")
    reference = load_audio(path)
    _set_wav_data_size(path, 0x7FFFF000)  # espeak-ng --stdout
    np.testing.assert_array_equal(load_audio(path), reference)


def _flac_without_total_samples(path: Path, wav: np.ndarray) -> Path:
    """Write ``wav`` as FLAC, then zero STREAMINFO's total-sample count, as encoders writing to a pipe do."""
    sf.write(path, wav, SR, format="FLAC")
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # first metadata block is STREAMINFO
    # STREAMINFO starts at byte 8; its 36-bit total-sample count is the low nibble of byte 21 and bytes 22-25.
    data[21] &= 0xF0
    data[22:26] = b"\0\0\0\0"
    path.write_bytes(bytes(data))
    assert sf.info(str(path)).frames > 2**62  # libsndfile's "unknown": 5.8e14 s at 16 kHz
    return path


def test_flac_without_total_sample_count_gets_its_real_duration(tmp_path: Path) -> None:
    wav = _sine(1.25)
    path = _flac_without_total_samples(tmp_path / "piped.flac", wav)
    assert audio_duration(path) == pytest.approx(1.25)
    got = load_audio(path)
    np.testing.assert_allclose(got, wav, atol=1 / 32768)
    assert audio.validate_audio_file(path) == pytest.approx(1.25)
    # The length limit still holds, found by decoding no more than one frame past it.
    with pytest.raises(AudioError, match=r"piped\.flac: too long: more than 1 s exceeds the limit max_seconds=1"):
        load_audio(path, max_seconds=1.0)


def test_constant_dc_audio_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dc.wav"
    sf.write(path, np.full(SR, 0.25, np.float32), SR, subtype="PCM_16")
    with pytest.raises(AudioError, match=r"dc\.wav: constant: every sample is 0\.25 \(a DC offset, no signal"):
        load_audio(path)


@pytest.mark.parametrize("case", ["inverted_with_dc", "inverted_with_noise"])
def test_phase_cancelled_stereo_is_refused_after_downmixing(tmp_path: Path, case: str) -> None:
    x = _sine(0.5)
    if case == "inverted_with_dc":  # the mix is a constant 0.3: a peak check sees a loud signal
        stereo = np.stack([0.3 + x, 0.3 - x], axis=1)
    else:  # the mix is 1e-5 of noise, above the silence threshold
        noise = 1e-5 * np.random.default_rng(0).standard_normal(len(x)).astype(np.float32)
        stereo = np.stack([x, -x + noise], axis=1)
    path = tmp_path / f"{case}.wav"
    sf.write(path, stereo, SR, subtype="FLOAT")
    with pytest.raises(AudioError, match=rf"{case}\.wav: silent after downmixing to mono: the channels cancel out"):
        load_audio(path)


def test_float_file_far_outside_unit_range_is_refused(tmp_path: Path) -> None:
    # int16 sample values written as floats: loud garbage to any model.
    path = tmp_path / "unscaled.wav"
    sf.write(path, _sine(0.5) * 32767, SR, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"unscaled\.wav: peak amplitude 1\.64e\+04 is far outside \[-1, 1\]"):
        load_audio(path)


# --- audio: waveforms handed over in memory ------------------------------------------------------------------------


def test_validate_waveform_converts_integer_pcm() -> None:
    validate = audio.validate_waveform
    pcm = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    got = validate(pcm, SR, source="query")
    assert got.dtype == np.float32 and got.ndim == 1
    np.testing.assert_array_equal(got, np.array([0, 0.5, -1, 32767 / 32768], dtype=np.float32))
    np.testing.assert_array_equal(validate(np.array([0, 2**30, -(2**31)], np.int32), SR, source="q"),
                                  np.array([0, 0.5, -1], np.float32))
    np.testing.assert_array_equal(validate(np.array([128, 192, 0], np.uint8), SR, source="q"),
                                  np.array([0, 0.5, -1], np.float32))
    np.testing.assert_array_equal(validate(np.array([0, 16384, -32768], ">i2"), SR, source="q"),  # big-endian
                                  np.array([0, 0.5, -1], np.float32))
    x = np.array([0.1, -0.2, 0.3], dtype=np.float64)
    out = validate(x, SR, source="q")
    assert out.dtype == np.float32 and np.allclose(out, x)
    good = _sine(0.1)
    assert validate(good, SR, source="q") is good  # valid float32 mono comes back untouched


@pytest.mark.parametrize(
    ("wav", "problem"),
    [
        (np.zeros(0, np.float32), r"empty waveform \(0 samples\)"),
        (np.zeros(SR, np.float32), r"silent: peak amplitude 0 is below 1e-06"),
        (np.zeros(SR, np.int16), r"silent: peak amplitude 0 is below 1e-06"),
        (np.full(SR, 0.2, np.float32), r"constant: every sample is 0\.2 \(a DC offset, no signal"),
        (np.full(SR, 1e30, np.float32), r"peak amplitude 1e\+30 is far outside \[-1, 1\] \(limit 16\)"),
        ((_sine(0.2) * 32767).astype(np.float32), r"peak amplitude 1\.64e\+04 is far outside \[-1, 1\] "
                                                   r"\(limit 16\): .* must be divided by 32768 \(16-bit\)"),
        (np.array([0.1, np.nan, np.inf, 0.2], np.float32), r"contains 2 NaN or infinite sample value\(s\)"),
        (np.stack([_sine(0.1), _sine(0.1)], axis=1), r"expected a 1-D mono waveform, got an array of shape "
                                                      r"\(1600, 2\); down-mix it to mono first, e\.g\. "
                                                      r"wav\.mean\(axis=1\)"),
        (_sine(0.1)[None, :], r"expected a 1-D mono waveform, got an array of shape \(1, 1600\); it holds one "
                              r"channel: pass wav\.reshape\(-1\)"),
        (np.float32(0.5), "a single number, not a waveform"),
        (np.array([1, 2, 3], np.int64), r"unsupported sample type int64"),
        (np.array([True, False]), r"unsupported sample type bool"),
        (np.array([0.1 + 1j, 0.2]), r"unsupported sample type complex128"),
    ],
    ids=["empty", "zeros", "int_zeros", "dc", "1e30", "int16_as_float", "nan", "stereo", "row", "scalar",
         "int64", "bool", "complex"],
)
def test_validate_waveform_refuses_bad_arrays(wav: np.ndarray, problem: str) -> None:
    with pytest.raises(AudioError, match=r"^audio file query waveform: (.*; )?" + problem) as info:
        audio.validate_waveform(wav, SR, source="query waveform")
    assert info.value.path == "query waveform"


def test_validate_waveform_signature_and_rate() -> None:
    sig = inspect.signature(audio.validate_waveform)
    assert list(sig.parameters) == ["wav", "sample_rate", "source"]
    assert sig.parameters["source"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(AudioError, match="sample rate must be a positive integer"):
        audio.validate_waveform(_sine(0.1), 0, source="q")


# --- images --------------------------------------------------------------------------------------------------------


def test_decompression_bomb_png_is_a_clear_error_not_a_pil_exception(tmp_path: Path) -> None:
    bomb = _png_header_only(tmp_path / "bomb.png", 20000, 20000)  # 400 M pixels: PIL raises inside open()
    with pytest.raises(ImageError, match=r"bomb\.png: too large: .*max_pixels=64000000"):
        images.probe_image(bomb)
    with pytest.raises(ImageError, match=r"bomb\.png: too large"):
        load_image(bomb)


def test_image_over_pils_warning_threshold_is_refused_without_a_warning(tmp_path: Path) -> None:
    big = _png_header_only(tmp_path / "big.png", 10000, 10000)  # 100 M pixels: PIL only warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match=r"big\.png: too large: 10000x10000 = 100000000 pixels exceeds "
                                             r"max_pixels=64000000"):
            images.probe_image(big)


def test_extreme_aspect_ratio_resizes_without_a_huge_intermediate(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A 60000x1 strip, red with a green middle, is a few hundred bytes of PNG.
    strip = np.zeros((1, 60000, 3), np.uint8)
    strip[..., 0] = 255
    strip[:, 29000:31000] = (0, 255, 0)
    path = tmp_path / "strip.png"
    Image.fromarray(strip).save(path)
    assert path.stat().st_size < 1000
    img = load_image(path)

    original = Image.Image.resize
    sizes: list[tuple[int, int]] = []

    def bounded_resize(self: Image.Image, size: tuple[int, int], *args: object, **kwargs: object) -> Image.Image:
        sizes.append(size)
        assert size[0] * size[1] <= 16 * 224 * 224, f"resize to {size} would allocate a huge intermediate image"
        return original(self, size, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image.Image, "resize", bounded_resize)
    out = ImageTransform(size=224, resize_mode="shorter_side_center_crop").resize(img)
    assert out.size == (224, 224) and sizes == [(224, 224)]
    assert np.all(np.asarray(out) == (0, 255, 0))  # the centre of the strip, as the crop promises
    tensor = ImageTransform(size=32)(img)
    assert tensor.shape == (3, 32, 32) and bool(tensor.isfinite().all())


def test_bounded_resize_keeps_the_same_region_as_resize_then_crop() -> None:
    # 2000x10 at size 64 takes the bounded path; resizing the whole strip is still affordable for a reference.
    xs = np.linspace(0, 4 * np.pi, 2000)
    arr = (127.5 + 127.5 * np.sin(xs))[None, :, None].repeat(10, axis=0).repeat(3, axis=2).astype(np.uint8)
    img = Image.fromarray(arr)
    got = np.asarray(ImageTransform(size=64).resize(img), dtype=np.int32)
    full = img.resize((12800, 64), Image.Resampling.BICUBIC)
    left = (12800 - 64) // 2
    reference = np.asarray(full.crop((left, 0, left + 64, 64)), dtype=np.int32)
    assert np.abs(got - reference).max() <= 2


def test_rgba_whose_alpha_hides_everything_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)  # hidden content
    path = tmp_path / "hidden.png"
    Image.fromarray(rgba, "RGBA").save(path)
    assert np.all(np.asarray(load_image(path)) == 255)
    rgba[..., :3], rgba[..., 3] = 0, 128  # half-transparent black over white: mid grey
    Image.fromarray(rgba, "RGBA").save(path)
    assert np.all(np.abs(np.asarray(load_image(path)).astype(int) - 127) <= 1)
    # The transform composites the same way when handed an RGBA image directly.
    assert np.all(np.asarray(ImageTransform(size=8).resize(Image.fromarray(np.zeros((8, 8, 4), np.uint8)))) == 255)


@pytest.mark.parametrize("mode", ["LA", "P"])
def test_other_transparent_modes_are_composited(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"t_{mode}.png"
    if mode == "LA":
        Image.new("LA", (5, 5), (0, 0)).save(path)
    else:
        img = Image.new("P", (5, 5), 0)
        img.putpalette([10, 20, 30] * 256)
        img.save(path, transparency=0)
    assert np.all(np.asarray(load_image(path)) == 255)


# --- data check applies training's limits ---------------------------------------------------------------------------


def _check_corpus(root: Path) -> tuple[Path, dict[str, Callable[[Path], object]]]:
    """A manifest with one good pair and one file of each kind training refuses; return it with how training
    loads each kind of file."""
    root.mkdir(parents=True)
    sf.write(root / "good.wav", _sine(1.0), SR)
    Image.new("RGB", (16, 16), (9, 99, 199)).save(root / "good.jpg")
    sf.write(root / "long.wav", _sine(61.0, sr=8000), 8000)
    sf.write(root / "silent.wav", np.zeros(SR, np.float32), SR)
    sf.write(root / "dc.wav", np.full(SR, 0.1, np.float32), SR)
    sf.write(root / "cut.wav", _sine(1.0), SR, subtype="PCM_16")
    (root / "cut.wav").write_bytes((root / "cut.wav").read_bytes()[:10000])
    _png_header_only(root / "huge.png", 9000, 8000)  # 72 M pixels > 64 M, no decompression-bomb warning
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "cut.jpg")
    (root / "cut.jpg").write_bytes((root / "cut.jpg").read_bytes()[:3000])
    Image.fromarray(noise).save(root / "trailer.jpg")  # complete, plus bytes after EOI: fine for both
    with open(root / "trailer.jpg", "ab") as f:
        f.write(b"camera maker notes" * 10)
    recs = [Record("ok", "good.wav", "good.jpg", "g", "train"),
            Record("ok2", "good.wav", "trailer.jpg", "t", "train")]
    recs += [Record(f"a{i}", name, "good.jpg", "g", "train")
             for i, name in enumerate(["long.wav", "silent.wav", "dc.wav", "cut.wav"])]
    recs += [Record(f"i{i}", "good.wav", name, name, "train") for i, name in enumerate(["huge.png", "cut.jpg"])]
    return write_manifest(recs, root / "manifest.jsonl"), {"audio": load_audio, "image": load_image}


@pytest.mark.parametrize("deep", [False, True])
def test_data_check_refuses_exactly_what_training_refuses(tmp_path: Path, deep: bool) -> None:
    manifest, loaders = _check_corpus(tmp_path / "c")
    report = check_manifest(manifest, deep=deep, workers=2)
    bad = {Path(b["file"]).name: b for b in report["bad_files"]}
    assert set(bad) == {"long.wav", "silent.wav", "dc.wav", "cut.wav", "huge.png", "cut.jpg"}
    assert not report["ok"]
    for name, b in bad.items():
        # The problem reported is the very error training's loader raises for the file.
        with pytest.raises((AudioError, ImageError)) as info:
            loaders[b["kind"]](tmp_path / "c" / name)
        assert info.value.problem == b["problem"], name
    assert bad["long.wav"]["problem"].startswith("too long: 61.00 s exceeds the limit max_seconds=60")
    assert bad["huge.png"]["problem"].startswith("too large: 9000x8000 = 72000000 pixels exceeds max_pixels")
    assert bad["cut.jpg"]["problem"].startswith("truncated or corrupt image data")
    assert bad["cut.wav"]["problem"].startswith("truncated: the WAV header states 16000 frames")
    assert bad["silent.wav"]["problem"].startswith("silent")
    assert bad["dc.wav"]["problem"].startswith("constant")
    # Limits passed explicitly move with the run's: no limit on length accepts the 61 s file.
    relaxed = check_manifest(manifest, max_seconds=None, max_pixels=80_000_000)
    assert {Path(b["file"]).name for b in relaxed["bad_files"]} == {"silent.wav", "dc.wav", "cut.wav", "cut.jpg"}


def test_data_check_limits_are_the_loaders_limits() -> None:
    load_audio_defaults = inspect.signature(load_audio).parameters
    check_defaults = inspect.signature(check_manifest).parameters
    assert check_defaults["max_seconds"].default == load_audio_defaults["max_seconds"].default == 60.0
    assert check_defaults["min_seconds"].default == load_audio_defaults["min_seconds"].default
    assert check_defaults["max_pixels"].default == inspect.signature(load_image).parameters["max_pixels"].default
    assert check.MAX_AUDIO_SECONDS is audio.MAX_AUDIO_SECONDS  # one definition, imported


def test_data_check_on_a_decompression_bomb_reports_it(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    sf.write(root / "a.wav", _sine(0.5), SR)
    _png_header_only(root / "bomb.png", 20000, 20000)
    manifest = write_manifest([Record("r", "a.wav", "bomb.png", "b", "train")], root / "manifest.jsonl")
    report = check_manifest(manifest)
    [bad] = report["bad_files"]
    assert Path(bad["file"]).name == "bomb.png" and bad["problem"].startswith("too large")
    assert "PROBLEMS FOUND" in check.format_report(report)


# --- corpus preparers on broken native layouts -----------------------------------------------------------------------


def _write(rel: str, text: str | bytes) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / rel
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)

    return mutate


def _karpathy_flickr(images: object) -> Callable[[Path], None]:
    """Replace the official split files by Karpathy's JSON: ``images`` as JSON, or a string written as is."""

    def mutate(root: Path) -> None:
        for f in (root / "Flickr8k_text").iterdir():
            f.unlink()
        (root / "dataset_flickr8k.json").write_text(images if isinstance(images, str) else json.dumps(images))

    return mutate


FACC_CAPT = "flickr_audio/wav2capt.txt"
FACC_TOKEN = "Flickr8k_text/Flickr8k.token.txt"
COCO_TEST = "SpokenCOCO/SpokenCOCO_test_karpathy.json"
PLACES_TRAIN = "PlacesAudio_400k_distro/metadata/train_2020.json"
LN_COCO = "annotations/coco_val_localized_narratives.jsonl"
CSC_TRAIN = "Train_GCC-training.tsv"
A_FACC_IMAGE = "1000268201_693b08cb0e"


def _csc(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / CSC_TRAIN).write_text("a dog\thttp://x/1.jpg\n")
    (root / "audio/train").mkdir(parents=True)
    sf.write(root / "audio/train/0.wav", _sine(0.2), SR)
    (root / "images/train").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "images/train/0.jpg")
    return root


def _deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


BROKEN_LAYOUTS: list[tuple[str, str, Callable[[Path], Path], Callable[[Path], None], str]] = [
    # (id, corpus, build, break, expected message): the file and the line or entry, then the problem.
    ("facc_malformed_line", "flickr8k", build_facc, _write(FACC_CAPT, "a.wav a.jpg #0\nbroken line\n"),
     r"wav2capt\.txt: line 2: expected '<img>_<n>\.wav <img>\.jpg #<n>'"),
    ("facc_superscript_number", "flickr8k", build_facc, _write(FACC_CAPT, f"a.wav {A_FACC_IMAGE}.jpg #\u00b2\n"),
     r"wav2capt\.txt: line 1: expected '<img>_<n>\.wav <img>\.jpg #<n>'"),
    ("facc_token_superscript", "flickr8k", build_facc, _write(FACC_TOKEN, "x.jpg#0\tok\nx.jpg#\u00b9\tbad\n"),
     r"Flickr8k\.token\.txt: line 2: expected '<img>\.jpg#<n><TAB><caption>'"),
    ("facc_not_utf8_line_3", "flickr8k", build_facc, _write(FACC_CAPT, b"a.wav a.jpg #0\n\nb \xff\xfe #1\n"),
     r"wav2capt\.txt: line 3: not UTF-8 text"),
    ("facc_karpathy_sentences_not_list", "flickr8k", build_facc,
     _karpathy_flickr({"images": [{"filename": f"{A_FACC_IMAGE}.jpg", "split": "train", "sentences": 5}]}),
     r"dataset_flickr8k\.json: images\[0\]: 'sentences' must be a list of objects, got int"),
    ("facc_karpathy_sentence_not_object", "flickr8k", build_facc,
     _karpathy_flickr({"images": [{"filename": f"{A_FACC_IMAGE}.jpg", "split": "train", "sentences": ["x"]}]}),
     r"dataset_flickr8k\.json: images\[0\]\.sentences\[0\]: expected a JSON object, got str"),
    ("facc_karpathy_nested_too_deep", "flickr8k", build_facc, _karpathy_flickr(_deep_json(100_000)),
     r"dataset_flickr8k\.json: not a corpus index: JSON nested too deeply"),
    ("coco_missing_captions", "spokencoco", build_spokencoco, _write(COCO_TEST, '{"data": [{"image": "x.jpg"}]}'),
     r"SpokenCOCO_test_karpathy\.json: data\[0\]: expected a 'captions' list \(per-image form\) or a 'caption'"),
    ("coco_empty_data", "spokencoco", build_spokencoco, _write(COCO_TEST, '{"data": []}'),
     r"SpokenCOCO_test_karpathy\.json: lists no captions \(empty index file"),
    ("coco_caption_not_object", "spokencoco", build_spokencoco,
     _write(COCO_TEST, '{"data": [{"image": "x.jpg", "captions": ["hello"]}]}'),
     r"SpokenCOCO_test_karpathy\.json: data\[0\]\.captions\[0\]: expected a JSON object, got str"),
    ("places_not_data_object", "places", build_places, _write(PLACES_TRAIN, "[1, 2]"),
     r"train_2020\.json: top level: expected \{\"data\": \[\.\.\.\]\}"),
    ("places_empty_data", "places", build_places, _write(PLACES_TRAIN, '{"data": []}'),
     r"train_2020\.json: lists no captions"),
    ("places_first_wav_not_a_string", "places", build_places,
     _write(PLACES_TRAIN, '{"data": [{"uttid": "u", "wav": ["a.wav"], "image": "x.jpg"}]}'),
     r"train_2020\.json: data\[0\]: 'wav' must be a string, got list"),
    ("places_first_image_not_a_string", "places", build_places,
     _write(PLACES_TRAIN, '{"data": [{"uttid": "u", "wav": "a.wav", "image": {"p": 1}}]}'),
     r"train_2020\.json: data\[0\]: 'image' must be a string, got dict"),
    ("ln_line_not_json", "localized_narratives", build_ln,
     _write(LN_COCO, '{"image_id": "1", "voice_recording": "a.ogg"}\n{nope\n'),
     r"coco_val_localized_narratives\.jsonl: line 2: invalid JSON"),
    ("ln_not_utf8", "localized_narratives", build_ln, _write(LN_COCO, b'{"image_id": "\xff"}\n'),
     r"coco_val_localized_narratives\.jsonl: line 1: not UTF-8 text"),
    ("ln_nested_too_deep", "localized_narratives", build_ln, _write(LN_COCO, _deep_json(100_000) + "\n"),
     r"coco_val_localized_narratives\.jsonl: line 1: JSON nested too deeply"),
    ("ln_empty_shard", "localized_narratives", build_ln, _write(LN_COCO, "\n"),
     r"coco_val_localized_narratives\.jsonl: lists no narratives"),
    ("csc_no_tab", "csc", _csc, _write(CSC_TRAIN, "no tab here\n"),
     r"Train_GCC-training\.tsv: line 1: expected '<caption><TAB><url>'"),
    ("csc_empty_index", "csc", _csc, _write(CSC_TRAIN, ""),
     r"Train_GCC-training\.tsv: lists no captions"),
]


@pytest.mark.parametrize(("corpus", "build", "damage", "message"), [c[1:] for c in BROKEN_LAYOUTS],
                         ids=[c[0] for c in BROKEN_LAYOUTS])
def test_broken_native_layouts_name_the_file_and_line(tmp_path: Path, corpus: str, build: Callable[[Path], Path],
                                                       damage: Callable[[Path], None], message: str) -> None:
    root = build(tmp_path / "root")
    damage(root)
    with pytest.raises(PrepareError, match=message):
        prepare_corpus(corpus, root, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_karpathy_sentence_without_text_gives_no_transcript_not_the_word_none(tmp_path: Path) -> None:
    root = build_facc(tmp_path / "facc", missing_wav=None)
    sentences = [{"raw": None}] + [{"raw": f"caption {n}"} for n in range(1, 5)]
    _karpathy_flickr({"images": [{"filename": f"{A_FACC_IMAGE}.jpg", "split": "train",
                                  "sentences": sentences}]})(root)
    records = {r.caption_id: r for r in read_manifest(prepare_corpus("flickr8k", root, tmp_path / "out"))}
    assert records[f"{A_FACC_IMAGE}_0"].text is None and records[f"{A_FACC_IMAGE}_1"].text == "caption 1"


def test_csc_and_ln_odd_digit_names_are_not_a_traceback(tmp_path: Path) -> None:
    root = _csc(tmp_path / "csc")
    Image.new("RGB", (8, 8)).save(root / "images/train/\u00b2.jpg")  # "²" looks like a row number to isdigit()
    assert [r.caption_id for r in read_manifest(prepare_corpus("csc", root, tmp_path / "out"))] == ["csc_train_0"]
    ln = build_ln(tmp_path / "ln")
    line = {"image_id": "\u00b2", "voice_recording": "coco_val/coco_val_x_1.ogg"}
    (ln / LN_COCO).write_text(json.dumps(line) + "\n")
    with pytest.raises(PrepareError, match="no captions left to write"):  # its files are missing, and said so
        prepare_corpus("localized_narratives", ln, tmp_path / "out2", collections=["coco"])


def test_output_folder_that_is_a_file_is_refused_before_parsing(tmp_path: Path) -> None:
    root = build_facc(tmp_path / "facc")
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(PrepareError, match=r"output folder .*out: .*out is a file, not a folder"):
        prepare_corpus("flickr8k", root, tmp_path / "out")


def test_unreadable_index_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Permission bits do not stop root (the test may run as root), so the denial is simulated at open().
    import builtins

    root = build_facc(tmp_path / "facc")
    real_open = builtins.open

    def denying_open(file: object, *args: object, **kwargs: object) -> object:
        if str(file).endswith("wav2capt.txt"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", denying_open)
    with pytest.raises(PrepareError, match=r"wav2capt\.txt: cannot read the index file \(Permission denied\)"):
        prepare_corpus("flickr8k", root, tmp_path / "out")


def test_unwritable_output_is_a_prepare_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vgskit.data.corpora import _common

    root = build_facc(tmp_path / "facc")

    def read_only(*args: object, **kwargs: object) -> Path:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_common, "write_manifest", read_only)
    with pytest.raises(PrepareError, match=r"cannot write the manifest into .*out \(Permission denied\)"):
        prepare_corpus("flickr8k", root, tmp_path / "out")

