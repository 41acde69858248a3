"""The espeak-ng library path of spoken-scenes gives exactly the audio of the espeak-ng program."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from vgskit.data import synthetic


def _require_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng program not installed")
    try:
        ctypes.CDLL(synthetic._ESPEAK_LIBRARY)
    except OSError as e:
        pytest.skip(f"{synthetic._ESPEAK_LIBRARY} not loadable: {e}")


def _espeak_captions(n: int, seed: int = 3) -> list[tuple[str, dict]]:
    """Grammar captions with espeak-ng voices drawn as the corpus draws them."""
    rng = np.random.default_rng(seed)
    config = synthetic.SpokenScenesConfig(num_train=1, num_val=0, num_test=0)
    # Captions depend on the classes only, so any index stands in for Fashion-MNIST pictures.
    pools = [np.arange(4)] * len(synthetic.CLASSES)
    out: list[tuple[str, dict]] = []
    while len(out) < n:
        scene = synthetic._sample_scene(rng, config, pools)
        for text, _ in synthetic._make_captions(scene, rng, 5):
            voice = synthetic._pick_voice(rng)
            if voice["engine"] == "espeak" and len(out) < n:
                out.append((text, voice))
    return out


@pytest.fixture
def fresh_servers(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """An empty server cache for the test; servers it starts are stopped afterwards."""
    servers: dict = {}
    monkeypatch.setattr(synthetic, "_espeak_servers", servers)
    yield servers
    for server in servers.values():
        if server is not None:
            server.close()


def _program(text: str, voice: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, int]:
    with monkeypatch.context() as m:
        m.setattr(synthetic, "_espeak_server", lambda: None)
        return synthetic._synthesise(text, voice, tmp_path / "program.wav")


def test_library_matches_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_servers: dict) -> None:
    _require_espeak()
    captions = _espeak_captions(14)
    # Voices, variants, speeds and pitches all vary, so the comparison covers more than one setting.
    assert len({v["voice"] for _, v in captions}) >= 8
    assert len({v["speed"] for _, v in captions}) >= 8
    assert len({v["pitch"] for _, v in captions}) >= 8
    # A caption spoken again after others must not depend on them.
    captions.append(captions[0])
    for text, voice in captions:
        fast, fast_rate = synthetic._synthesise(text, voice, tmp_path / "unused.wav")
        assert synthetic._espeak_servers.get(os.getpid()) is not None, "library path not taken"
        slow, slow_rate = _program(text, voice, tmp_path, monkeypatch)
        assert fast_rate == slow_rate == 22050
        assert fast.dtype == slow.dtype == np.float32
        assert np.array_equal(fast, slow), (voice["speaker"], text)
    assert not (tmp_path / "unused.wav").exists()


def test_unloadable_library_falls_back_to_the_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_servers: dict, caplog: pytest.LogCaptureFixture
) -> None:
    _require_espeak()
    text, voice = _espeak_captions(1, seed=11)[0]
    expected, rate = _program(text, voice, tmp_path, monkeypatch)
    monkeypatch.setattr(synthetic, "_ESPEAK_LIBRARY", "libespeak-ng-missing.so.0")
    with caplog.at_level(logging.DEBUG, logger=synthetic.__name__):
        samples, sr = synthetic._synthesise(text, voice, tmp_path / "fallback.wav")
    assert synthetic._espeak_server() is None
    assert "espeak-ng library unavailable" in caplog.text
    assert (tmp_path / "fallback.wav").is_file()
    assert sr == rate
    assert np.array_equal(samples, expected)
