"""Feature caches under concurrent writers, readers during appends, dead writers, and ``vgskit cache verify``.

Two trainings that share one ``data.feature_cache`` used to both exit 0 and leave most items reading back
another item's features, for good (later runs reuse the cache). These tests run real concurrent writers in
separate processes, so they exercise the same file locks and appends as two trainings do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

import _toy_models  # noqa: F401  (registers the test models)
import vgskit
from _tiny_towers import TINY_SPEECH
from vgskit.audio import save_wav
from vgskit.data.cache import (
    INDEX_NAME,
    LOCK_NAME,
    ExtractionOptions,
    FeatureCache,
    FeatureCacheError,
    check_cache_structure,
    extract,
    lock_holder,
    verify_cache,
)
from vgskit.data.cache_cli import add_cache_arguments, run_cache
from vgskit.errors import VGSKitError

N_WAVS = 24
OPTIONS = ExtractionOptions(layers=(1, -1))
TESTS = Path(__file__).resolve().parent

# A writer process: opens the cache of the tiny tower, says it is ready, waits for the go file, extracts one
# file per tower call with an index flush after each (the most interleaving two writers can have). With a
# stall file, it extracts normally until the cache holds STALL_AFTER items, then blocks inside the tower
# call (holding the writer lock) until it is killed.
WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from vgskit.data.cache import ExtractionOptions, FeatureCache, extract
    from vgskit.encoders.pretrained_speech import PretrainedSpeechConfig, PretrainedSpeechEncoder

    hubert, root, ready, go, wav_list, stall = sys.argv[1:7]
    tower = PretrainedSpeechEncoder(PretrainedSpeechConfig(hubert, freeze=True))
    cache = FeatureCache.for_tower(root, tower, ExtractionOptions(layers=(1, -1)))
    wavs = Path(wav_list).read_text().splitlines()
    if stall != "-":
        real = PretrainedSpeechEncoder.forward
        calls = {"n": 0}

        def stalling(self, w, lengths):
            calls["n"] += 1
            if calls["n"] > int(stall):
                Path(ready).with_suffix(".stalled").touch()
                time.sleep(3600)
            return real(self, w, lengths)

        PretrainedSpeechEncoder.forward = stalling
    Path(ready).touch()
    while not os.path.exists(go):
        time.sleep(0.005)
    n = extract(cache, tower, wavs, batch_size=1, progress=False, flush_every=1, flush_interval=0,
                lock_timeout=120)
    print(f"extracted {n}")
    """
)


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hubert")
    torch.manual_seed(0)
    HubertModel(HubertConfig(**TINY_SPEECH)).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tower(hubert_dir: Path):
    from vgskit.encoders.pretrained_speech import PretrainedSpeechConfig, PretrainedSpeechEncoder

    return PretrainedSpeechEncoder(PretrainedSpeechConfig(str(hubert_dir), freeze=True))


def _tone(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * (150 + 37 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def wavs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("wavs")
    # Distinct lengths: an item read at another item's offset comes back with the wrong values.
    return [str(save_wav(folder / f"u{i:02d}.wav", _tone(0.2 + 0.01 * i, i), 16000)) for i in range(N_WAVS)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tower, wavs) -> FeatureCache:
    """The features of every file from one writer alone (what every concurrent run must end up with)."""
    cache = FeatureCache.for_tower(tmp_path_factory.mktemp("reference"), tower, OPTIONS)
    extract(cache, tower, wavs, batch_size=1, progress=False)
    return cache


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The writers import the very vgskit this test imported.
    src = Path(vgskit.__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(src), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _start_writers(tmp_path: Path, hubert_dir: Path, root: Path, wavs: list[str], stalls: list[str]):
    wav_list = tmp_path / "wavs.txt"
    wav_list.write_text("\n".join(wavs))
    go = tmp_path / "go"
    procs, readies = [], []
    for i, stall in enumerate(stalls):
        ready = tmp_path / f"ready{i}"
        readies.append(ready)
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WRITER, str(hubert_dir), str(root), str(ready), str(go), str(wav_list), stall],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()))
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in readies):
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"writer exited early: {p.communicate()}")
        assert time.monotonic() < deadline, "writers did not start"
        time.sleep(0.02)
    go.touch()
    return procs


def _assert_matches_reference(cache: FeatureCache, reference: FeatureCache, wavs: list[str]) -> None:
    wrong = []
    for path in wavs:
        got, want = cache.get(path)["hidden"].float(), reference.get(path)["hidden"].float()
        if got.shape != want.shape or not torch.allclose(got, want, atol=2e-3, rtol=2e-3):
            wrong.append(Path(path).name)
    assert wrong == [], f"{len(wrong)} of {len(wavs)} items read back wrong features: {wrong}"


def test_two_concurrent_writers_leave_a_correct_cache(tmp_path, hubert_dir, wavs, reference) -> None:
    root = tmp_path / "shared"
    procs = _start_writers(tmp_path, hubert_dir, root, wavs, ["-", "-"])
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    # The second writer waited for the first and then found every file extracted: nothing twice.
    assert sorted(out.strip() for out, _ in outs) == ["extracted 0", f"extracted {N_WAVS}"], outs
    cache = FeatureCache(root, reference.tower_key)
    assert len(cache) == N_WAVS
    _assert_matches_reference(cache, reference, wavs)
    # One writer's worth of data: no duplicate appends, no interleaved bytes.
    assert (cache.folder / "hidden.bin").stat().st_size == (reference.folder / "hidden.bin").stat().st_size


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"writer exited early: {proc.communicate()}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_live_writer_is_waited_for_and_named_a_killed_one_blocks_nothing(
        tmp_path, hubert_dir, tower, wavs, reference) -> None:
    root = tmp_path / "shared"
    stall_after = 5
    (proc,) = _start_writers(tmp_path, hubert_dir, root, wavs, [str(stall_after)])
    try:
        _wait_for((tmp_path / "ready0").with_suffix(".stalled"), proc)
        # A reader needs no lock: it sees the writer's flushed items, correct, while the writer holds the lock.
        reader = FeatureCache(root, reference.tower_key)
        assert len(reader) == stall_after
        _assert_matches_reference(reader, reference, wavs[:stall_after])
        holder = reader.lock_holder()
        assert holder is not None and holder["pid"] == proc.pid
        assert any(f"pid {proc.pid}" in n and "is writing this cache now" in n
                   for n in check_cache_structure(reader.folder).notes)
        # A second writer waits, then gives up with the folder and the holder's pid.
        other = FeatureCache.for_tower(root, tower, OPTIONS)
        start = time.monotonic()
        with pytest.raises(FeatureCacheError) as err:
            extract(other, tower, wavs, batch_size=1, progress=False, lock_timeout=0.5)
        assert 0.5 <= time.monotonic() - start < 10
        message = str(err.value)
        assert str(other.folder) in message and f"pid {proc.pid} on host" in message and "gave up waiting" in message
        assert len(FeatureCache(root, reference.tower_key)) == stall_after  # nothing written by the refused one
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # The dead writer's record is still in the lock file, but the OS dropped its lock: nothing blocks.
    assert f'"pid": {proc.pid}' in (other.folder / LOCK_NAME).read_text()
    assert lock_holder(other.folder / LOCK_NAME) is None
    start = time.monotonic()
    assert extract(other, tower, wavs, batch_size=1, progress=False, lock_timeout=0.5) == N_WAVS - stall_after
    assert time.monotonic() - start < 30
    final = FeatureCache(root, reference.tower_key)
    assert len(final) == N_WAVS
    _assert_matches_reference(final, reference, wavs)
    assert (final.folder / "hidden.bin").stat().st_size == (reference.folder / "hidden.bin").stat().st_size
    assert check_cache_structure(final.folder).ok


def test_readers_see_only_complete_flushed_items(tmp_path, tower, wavs, reference) -> None:
    half = N_WAVS // 2
    first = FeatureCache.for_tower(tmp_path, tower, OPTIONS)
    extract(first, tower, wavs[:half], batch_size=1, progress=False)
    reader = FeatureCache(tmp_path, first.tower_key)
    before = {p: reader.get(p)["hidden"].clone() for p in wavs[:half]}

    # Another writer appends the rest while the reader keeps its mapping of the first half open.
    second = FeatureCache.for_tower(tmp_path, tower, OPTIONS)
    assert extract(second, tower, wavs, batch_size=3, progress=False, flush_every=1, flush_interval=0) == N_WAVS - half
    assert len(reader) == half and wavs[half] not in reader  # its snapshot: only what was flushed when it opened
    for p in wavs[:half]:
        assert torch.equal(reader.get(p)["hidden"], before[p])
    reader.reload()
    assert len(reader) == N_WAVS
    _assert_matches_reference(reader, reference, wavs)

    # Items put but not flushed are invisible to readers; their writer holds the lock until close().
    extra = str(save_wav(tmp_path / "extra.wav", _tone(0.3, 99), 16000))
    writer = FeatureCache(tmp_path, first.tower_key)
    writer.put(extra, {"hidden": np.ones((2, 60, 32), dtype=np.float32)})
    assert extra in writer and extra not in FeatureCache(tmp_path, first.tower_key)
    with pytest.raises(FeatureCacheError, match=rf"being written by pid {os.getpid()} on host"):
        extract(FeatureCache(tmp_path, first.tower_key), tower, [extra], progress=False, lock_timeout=0.2)
    writer.close()
    assert lock_holder(writer.lock_path) is None
    late = FeatureCache(tmp_path, first.tower_key)
    assert len(late) == N_WAVS + 1 and torch.equal(late.get(extra)["hidden"], torch.ones(2, 60, 32, dtype=torch.float16))


def test_index_is_replaced_only_after_the_data_is_fsynced(tmp_path, tower, wavs, monkeypatch) -> None:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced files")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", os.path.basename(os.fspath(dst))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    cache = FeatureCache.for_tower(tmp_path, tower, OPTIONS)
    events.clear()
    extract(cache, tower, wavs[:6], batch_size=2, progress=False, flush_every=1, flush_interval=0)
    replaces = [i for i, e in enumerate(events) if e == ("replace", INDEX_NAME)]
    assert len(replaces) == 3  # one flush per batch of two; the last flush had nothing left to do
    previous = -1
    for i in replaces:
        assert ("fsync", "hidden.bin") in events[previous + 1 : i], events
        previous = i


# ---------------------------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def built(tmp_path, tower, wavs) -> FeatureCache:
    cache = FeatureCache.for_tower(tmp_path / "features", tower, OPTIONS)
    extract(cache, tower, wavs, batch_size=4, progress=False)
    return FeatureCache(tmp_path / "features", cache.tower_key)


def _flip_high_byte(cache: FeatureCache, path: str, value_index: int) -> None:
    """Corrupt one stored value of ``path``'s item: flip the sign/exponent byte of the float16."""
    offset, _ = cache._index.items[cache.key_for(path)].arrays["hidden"]
    with open(cache.folder / "hidden.bin", "r+b") as f:
        f.seek((offset + value_index) * 2 + 1)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x40]))


def test_verify_passes_a_healthy_cache_and_samples_reproducibly(built, tower, wavs) -> None:
    report = verify_cache(built, tower, sample=None)
    assert report.ok and report.recomputed
    assert (report.items, report.checked, report.mismatches, report.problems, report.skipped) == (N_WAVS, N_WAVS, [], [], [])
    assert sorted(report.checked_sources) == sorted(wavs)
    assert report.format().splitlines()[-1] == "  result: OK"
    a = verify_cache(built, tower, sample=5, seed=3)
    b = verify_cache(built, tower, sample=5, seed=3)
    c = verify_cache(built, tower, sample=5, seed=4)
    assert a.checked == 5 and a.checked_sources == b.checked_sources != c.checked_sources
    subset = verify_cache(built, tower, wavs[:3], sample=16)
    assert subset.ok and sorted(subset.checked_sources) == wavs[:3]
    structure = check_cache_structure(built.folder)
    assert structure.ok and not structure.recomputed and structure.notes == []


def test_verify_names_the_corrupted_item_and_file(built, tower, wavs) -> None:
    _flip_high_byte(built, wavs[7], 40)
    report = verify_cache(built, tower, sample=None)
    assert not report.ok and report.problems == []  # a flipped byte is not structural
    assert [(Path(m.source).name, m.array, Path(m.data_file).name) for m in report.mismatches] == [
        ("u07.wav", "hidden", "hidden.bin")]
    (m,) = report.mismatches
    assert m.bad_values == 1 and m.max_abs_diff > 1 and m.values == math.prod(built.shapes(built.key_for(wavs[7]))["hidden"])
    text = report.format()
    assert "1 of 24 recomputed items do not match" in text and "u07.wav" in text and text.endswith("result: PROBLEMS FOUND")
    # A sample that misses the item passes; the structure alone cannot see a flipped byte.
    assert verify_cache(built, tower, [w for w in wavs if w != wavs[7]], sample=None).ok
    assert check_cache_structure(built.folder).ok


def test_items_pointing_at_other_items_bytes_are_found(built, tower, wavs) -> None:
    # What interleaved writers left behind: index entries whose offsets point into another item's values.
    index = json.loads((built.folder / INDEX_NAME).read_text())
    k3, k4 = built.key_for(wavs[3]), built.key_for(wavs[4])
    index["items"][k4]["arrays"]["hidden"][0] = index["items"][k3]["arrays"]["hidden"][0] + 32
    (built.folder / INDEX_NAME).write_text(json.dumps(index))
    structure = check_cache_structure(built.folder)
    assert len(structure.problems) == 1 and f"items {k3} and {k4} share values" in structure.problems[0]
    assert "hidden.bin" in structure.problems[0]
    report = verify_cache(FeatureCache(built.root, built.tower_key), tower, sample=None)
    assert [Path(m.source).name for m in report.mismatches] == ["u04.wav"]


def test_structural_problems_without_a_tower(built, wavs) -> None:
    folder = built.folder
    (folder / "hidden.bin").open("ab").write(b"\x00" * 10)  # an interrupted writer's tail: harmless
    report = check_cache_structure(folder)
    assert report.ok and report.notes == [f"{folder / 'hidden.bin'}: 10 bytes after the indexed data (left by an "
                                          "interrupted extraction; the next one cuts them off)"]
    size = (folder / "hidden.bin").stat().st_size
    with open(folder / "hidden.bin", "r+b") as f:
        f.truncate(size - 1000)
    report = check_cache_structure(folder)
    need = built.data_sizes["hidden"] * 2
    assert report.problems == [f"{folder / 'hidden.bin'}: truncated ({size - 1000} bytes, the index expects {need})"]
    index = json.loads((folder / INDEX_NAME).read_text())
    index["format"] = 1
    (folder / INDEX_NAME).write_text(json.dumps(index))
    (problem,) = check_cache_structure(folder).problems
    assert "format 1, this version reads format 2 (written without the writer lock" in problem
    with pytest.raises(FeatureCacheError, match="format 1"):
        FeatureCache(built.root, built.tower_key)


# ---------------------------------------------------------------------------------------------------------------
# vgskit cache verify / info
# ---------------------------------------------------------------------------------------------------------------


def _cache_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vgskit cache")
    add_cache_arguments(parser)
    return run_cache(parser.parse_args(argv))


@pytest.fixture
def model_caches(tmp_path, hubert_dir, wavs):
    """The speech and image caches of the registered ``test_frozen_towers`` model, as training builds them."""
    from PIL import Image

    from vgskit.images import ImageTransform
    from vgskit.models.registry import create_model

    model = create_model("test_frozen_towers", speech_tower=str(hubert_dir))
    towers = model.frozen_towers()
    root = tmp_path / "features"
    speech = FeatureCache.for_tower(root, towers["speech"], ExtractionOptions(kind="speech", max_seconds=1.0))
    extract(speech, towers["speech"], wavs, batch_size=4, progress=False)
    rng = np.random.default_rng(0)
    images = []
    for i in range(5):
        images.append(str(tmp_path / f"im{i}.png"))
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images[-1])
    options = ExtractionOptions(kind="image", pooled=True, image_transform=ImageTransform.from_json(
        dict(model.image_transform)))
    image = FeatureCache.for_tower(root, towers["image"], options)
    extract(image, towers["image"], images, progress=False)
    return model, root, FeatureCache(root, speech.tower_key), FeatureCache(root, image.tower_key)


def test_cli_verify_with_a_registered_model_and_a_checkpoint(model_caches, hubert_dir, wavs, tmp_path, capsys) -> None:
    from vgskit.models.registry import save_pretrained

    model, root, speech, image = model_caches
    by_name = ["--model", "test_frozen_towers", "--set", f"speech_tower={hubert_dir}"]
    assert _cache_cli(["verify", str(root), *by_name, "--all", "--json", str(tmp_path / "v.json")]) == 0
    out = capsys.readouterr().out
    assert f"values: {N_WAVS} of {N_WAVS} items recomputed, all match" in out
    assert "values: 5 of 5 items recomputed, all match" in out and out.rstrip().endswith("2 of 2 caches OK")
    saved = json.loads((tmp_path / "v.json").read_text())
    assert [(r["kind"], r["checked"], r["ok"]) for r in saved] == [
        (c.options.kind, len(c), True) for c in sorted((speech, image), key=lambda c: c.tower_key)]

    checkpoint = save_pretrained(model, tmp_path / "ckpt")
    _flip_high_byte(speech, wavs[11], 3)
    assert _cache_cli(["verify", str(speech.folder), "--model", str(checkpoint), "--all"]) == 1
    out = capsys.readouterr().out
    assert "values: 1 of 24 recomputed items do not match" in out
    assert f"{wavs[11]}: 'hidden' in {speech.folder / 'hidden.bin'}: max abs diff" in out
    assert out.rstrip().endswith("result: PROBLEMS FOUND")
    # Without a model only the structure is checked: a flipped byte is not visible there.
    assert _cache_cli(["verify", str(speech.folder)]) == 0
    assert "values: not recomputed" in capsys.readouterr().out


def test_cli_verify_refuses_a_model_that_did_not_build_the_cache(built, hubert_dir, capsys) -> None:
    # `built` comes from a tower configured without local_files_only; the registered model sets it.
    with pytest.raises(VGSKitError) as err:
        _cache_cli(["verify", str(built.folder), "--model", "test_frozen_towers", "--set", f"speech_tower={hubert_dir}"])
    message = str(err.value)
    assert str(built.folder) in message and f"not {built.tower_key}" in message and "differ in: config" in message
    assert capsys.readouterr().out == ""  # refused before any work


def test_cli_verify_structure_and_user_errors(built, tmp_path, capsys) -> None:
    assert _cache_cli(["verify", str(built.folder)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("result: OK")
    assert _cache_cli(["info", str(built.root)]) == 0
    info = capsys.readouterr().out
    assert f"items: {N_WAVS}" in info and "writer: none" in info and "PretrainedSpeechEncoder" in info
    with open(built.folder / "hidden.bin", "r+b") as f:
        f.truncate(100)
    assert _cache_cli(["verify", str(built.root)]) == 1
    out = capsys.readouterr().out
    assert f"{built.folder / 'hidden.bin'}: truncated (100 bytes" in out and "result: PROBLEMS FOUND" in out
    assert _cache_cli(["info", str(built.folder)]) == 1
    assert "unreadable:" in capsys.readouterr().out
    with pytest.raises(VGSKitError, match="no such folder"):
        _cache_cli(["verify", str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(VGSKitError, match="not a feature cache"):
        _cache_cli(["verify", str(tmp_path / "empty")])
    with pytest.raises(VGSKitError, match="does not exist"):
        _cache_cli(["verify", str(built.folder), "--json", str(tmp_path / "missing" / "v.json")])
    with pytest.raises(VGSKitError, match="--sample must be >= 0"):
        _cache_cli(["verify", str(built.folder), "--sample", "-1"])
    with pytest.raises(VGSKitError, match="no such checkpoint folder"):
        _cache_cli(["verify", str(built.folder), "--model", "./no/such/run"])
