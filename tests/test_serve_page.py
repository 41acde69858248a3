"""The search page of `vgskit serve` (``/``): its files, and a real browser recording a query from a microphone.

The browser tests drive headless Chromium through chromedriver (selenium), with a WAV file played as the fake
microphone, against the service running in uvicorn on a loopback port. They need the ``chromium`` and
``chromium-driver`` packages and ``selenium``; without them they are skipped, saying which is missing.

The model reads pitch: its speech embedding is the energy of the query in four frequency bands, and the index
holds one band per image, so the right answer for a tone is known (the image of its band) and robust to what a
browser does to audio (resampling to the sound card's rate, 16-bit rounding, starting anywhere in the looped
file). Each answer shown is also compared with the engine's own answer for the same bytes.

Set ``VGSKIT_SCREENSHOT=PATH`` to keep a screenshot of the page with the microphone query's results.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")
from fastapi.testclient import TestClient  # noqa: E402

from vgskit.models.base import RetrievalModel  # noqa: E402
from vgskit.retrieval.engine import SearchEngine  # noqa: E402
from vgskit.serve import create_app  # noqa: E402
from vgskit.serve.page import STATIC_DIR  # noqa: E402

BANDS = ((60.0, 300.0), (300.0, 700.0), (700.0, 1500.0), (1500.0, 4000.0))  # Hz
IDS = ["red", "green", "blue", "scenes/yellow"]  # image i is band i; a slash travels encoded in image URLs
COLOURS = [(200, 40, 40), (40, 160, 60), (40, 80, 200), (230, 200, 40)]
MIC_TONES = ((440.0, 0.3), (200.0, 0.08))  # the fake microphone: mostly band 1 ("green"), some band 0
UPLOAD_TONES = ((2000.0, 0.3), (900.0, 0.12))  # the uploaded file: band 3 ("scenes/yellow"), then band 2
WAIT_S = 30


@dataclass
class BandConfig:
    bands: tuple[tuple[float, float], ...] = BANDS


class BandModel(RetrievalModel):
    """Speech embedding: the square root of the energy in each band of :data:`BANDS`, L2-normalised."""

    config_class = BandConfig

    @property
    def embed_dim(self) -> int:
        return len(self.config.bands)

    @property
    def image_transform(self) -> dict[str, Any]:
        return {"size": 8, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "resize_mode": "squash",
                "interpolation": "bilinear"}

    def encode_speech(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        rows = []
        for wav, n in zip(wavs, lengths.tolist(), strict=True):
            power = torch.fft.rfft(wav[:n].double()).abs() ** 2
            freqs = torch.fft.rfftfreq(n, 1.0 / self.sample_rate, dtype=torch.float64)
            rows.append(torch.stack([power[(freqs >= lo) & (freqs < hi)].sum() for lo, hi in self.config.bands]))
        return F.normalize(torch.stack(rows).sqrt(), dim=-1).float()


def _tones(tones: tuple[tuple[float, float], ...], seconds: float, rate: int, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = sum(amp * np.sin(2 * np.pi * freq * t) for freq, amp in tones)
    x = x + 0.003 * np.random.default_rng(seed).standard_normal(t.shape)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """The band model, four solid-colour images (one per band), the index ``demo`` and a two-image ``second``."""
    root = tmp_path_factory.mktemp("serve-page")
    paths = []
    for i, colour in enumerate(COLOURS):
        p = root / f"img{i}.png"
        Image.new("RGB", (64, 48), colour).save(p)
        paths.append(str(p))
    model = BandModel(BandConfig()).eval()
    rows = torch.eye(len(BANDS))
    engine = SearchEngine(model, rows, IDS, paths)
    second = SearchEngine(model, rows[:2], IDS[:2], paths[:2])
    mic = root / "microphone.wav"  # Chromium's fake capture reads 16-bit PCM WAV, and loops it
    sf.write(mic, _tones(MIC_TONES, 3.0, 48000, seed=1), 48000, subtype="PCM_16")
    upload = root / "query.flac"
    sf.write(upload, np.stack([_tones(UPLOAD_TONES, 2.0, 22050, seed=2)] * 2, axis=1), 22050, subtype="PCM_16")
    return {"root": root, "paths": paths, "model": model, "engine": engine, "second": second, "mic": mic,
            "upload": upload}


def _app(gallery):
    return create_app(gallery["model"], {"demo": gallery["engine"], "second": gallery["second"]})


# -- the page's files (no browser) ------------------------------------------------------------------------------
def test_page_and_assets_are_served_with_a_strict_policy(gallery):
    with TestClient(_app(gallery)) as client:
        r = client.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self' blob:",
                          "img-src 'self' data:", "media-src 'self' blob:", "frame-ancestors 'none'"):
            assert directive in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        html = r.text
        referenced = set(re.findall(r'(?:src|href)="(static/[^"]+)"', html))
        assert referenced == {"static/app.css", "static/app.js"}
        js = (STATIC_DIR / "app.js").read_text(encoding="utf-8")
        assert '"static/recorder-worklet.js"' in js
        types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
        for name in ("app.css", "app.js", "recorder-worklet.js", "index.html"):
            asset = client.get(f"/static/{name}")
            assert asset.status_code == 200, name
            assert asset.headers["content-type"].startswith(types[Path(name).suffix]), name
            assert asset.content == (STATIC_DIR / name).read_bytes()
        assert client.get("/static/missing.js").status_code == 404
        assert "/" not in client.get("/openapi.json").json()["paths"]  # the API description stays the API's
        metrics = client.get("/metrics").text
        assert 'vgskit_http_requests_total{route="/",method="GET",status="200"} 1' in metrics


def test_page_is_offline_accessible_and_free_of_inline_code():
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    for path in STATIC_DIR.iterdir():  # every file ships with the package ("serve/static/*" in package-data)
        assert path.is_file(), f"{path}: package-data ships files directly under static/ only"
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(?:https?:)?//[\w-]+\.[\w.-]+", re.sub(r"^\s*//.*$", "", text, flags=re.M)), (
            f"{path.name} refers to another host: the page must work offline")
        assert "@import" not in text and "fonts." not in text
    assert not re.search(r"\son[a-z]+\s*=", html, flags=re.I), "inline event handler attribute"
    assert not re.search(r"\sstyle\s*=", html, flags=re.I), "inline style attribute"
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html)), "inline script"
    labelled = set(re.findall(r'<label for="([^"]+)"', html))
    for tag, control in re.findall(r"<(input|select|textarea)\b[^>]*\bid=\"([^\"]+)\"", html):
        assert control in labelled, f"<{tag} id={control}> has no label"
    for control in re.findall(r"<(?:meter|button)\b[^>]*>", html):
        assert "aria-label=" in control or "<button" in control  # buttons are labelled by their text


# -- a real browser ---------------------------------------------------------------------------------------------
def _browser_binaries() -> tuple[str, str]:
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        missing = " and ".join(name for name, found in (("chromium", chromium), ("chromedriver", driver))
                               if found is None)
        pytest.skip(f"{missing} not installed: the browser test needs them "
                    "(Debian: apt-get install chromium chromium-driver)")
    return chromium, driver


@pytest.fixture(scope="module")
def server(gallery):
    """The service in uvicorn, in a background thread, on a free loopback port."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(_app(gallery), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(WAIT_S)
    sock.close()


@pytest.fixture(scope="module")
def browser(gallery):
    """Headless Chromium whose microphone plays ``microphone.wav`` (in a loop), permission granted."""
    chromium, chromedriver = _browser_binaries()
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (pip install "
                                                                 "selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,1000", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={gallery['mic']}", "--autoplay-policy=no-user-gesture-required",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda d: condition(d))
    except TimeoutException:
        error = driver.find_element("id", "error").text
        raise AssertionError(f"timed out waiting for {what}; page error: {error!r}; "
                             f"status: {driver.find_element('id', 'status').text!r}") from None


def _open(driver, url: str) -> None:
    driver.get(url + "/")
    _wait(driver, lambda d: d.find_element("id", "index").is_enabled(), "the index list")
    options = [o.get_attribute("value") for o in driver.find_elements("css selector", "#index option")]
    assert options == ["demo", "second"]
    assert driver.find_element("id", "index").get_attribute("value") == "demo"


def _set_k(driver, k: int) -> None:
    field = driver.find_element("id", "k")
    field.clear()
    field.send_keys(str(k))


def _hits(driver) -> list[tuple[int, str, float]]:
    return [(int(li.get_attribute("data-rank")), li.get_attribute("data-id"), float(li.get_attribute("data-score")))
            for li in driver.find_elements("css selector", "#results li.hit")]


def _wait_hits(driver, n: int) -> list[tuple[int, str, float]]:
    _wait(driver, lambda d: len(_hits(d)) == n, f"{n} results")
    return _hits(driver)


def _first_image_loaded(driver) -> tuple[str, int]:
    _wait(driver, lambda d: d.execute_script("const i = document.querySelector('#results li img');"
                                             "return i.complete && i.naturalWidth > 0;"), "the first image")
    img = driver.find_element("css selector", "#results li img")
    return img.get_attribute("src"), int(driver.execute_script("return arguments[0].naturalWidth;", img))


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _query_audio_bytes(driver) -> bytes:
    """The bytes behind the page's <audio> player: the query it sent."""
    encoded = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById('query-audio').src).then((r) => r.blob()).then((blob) => {
          const reader = new FileReader();
          reader.onload = () => done(reader.result.split(',')[1]);
          reader.readAsDataURL(blob);
        }).catch((err) => done(`error: ${err}`));""")
    assert not encoded.startswith("error"), encoded
    return base64.b64decode(encoded)


def test_microphone_query_shows_the_engines_best_image_first(browser, server, gallery, tmp_path):
    engine = gallery["engine"]
    assert engine.search_by_audio(gallery["mic"], k=1)[0].item_id == "green"  # the 440 Hz band
    _open(browser, server)
    _set_k(browser, 3)
    record = browser.find_element("id", "record")
    assert record.text == "Record" and record.get_attribute("aria-pressed") == "false"
    started = time.perf_counter()
    record.click()
    _wait(browser, lambda d: record.get_attribute("aria-pressed") == "true", "the recording to start")
    _wait(browser, lambda d: float(d.find_element("id", "elapsed").text.split()[0]) >= 1.5, "1.5 s of audio")
    record.click()  # stop: the page encodes a WAV and searches with it
    hits = _wait_hits(browser, 3)
    seconds = time.perf_counter() - started
    assert record.text == "Record" and record.get_attribute("aria-pressed") == "false"

    assert hits[0][:2] == (1, "green")
    assert [h[0] for h in hits] == [1, 2, 3]
    assert [h[2] for h in hits] == sorted((h[2] for h in hits), reverse=True)
    src, width = _first_image_loaded(browser)
    assert src == f"{server}/images/demo/green" and width == 64
    first = browser.find_element("css selector", "#results li.hit")
    assert first.find_element("css selector", ".rank").text == "#1"
    assert first.find_element("css selector", ".score").text == f"score {hits[0][2]:.4f}"
    assert browser.find_element("css selector", "#results li img").get_attribute("alt") == "Image green, rank 1"

    # the query plays back, and is the 16-bit mono PCM WAV that was searched
    player = browser.find_element("id", "query-audio")
    assert player.is_displayed() and player.get_attribute("src").startswith("blob:")
    wav = _query_audio_bytes(browser)
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    info = sf.info(io.BytesIO(wav))
    assert (info.format, info.subtype, info.channels) == ("WAV", "PCM_16", 1)
    assert 1.5 <= info.duration <= seconds, (info.duration, seconds)
    recorded = tmp_path / "recorded.wav"
    recorded.write_bytes(wav)
    expected = engine.search_by_audio(recorded, k=3)
    assert [h[1] for h in hits] == [h.item_id for h in expected]
    assert [h[2] for h in hits] == pytest.approx([h.score for h in expected], abs=1e-5)
    assert "recording" in browser.find_element("id", "status").text
    assert not browser.find_element("id", "error").is_displayed()
    assert "encode" in browser.find_element("id", "timing").text
    assert _console_errors(browser) == []

    shot = os.environ.get("VGSKIT_SCREENSHOT")
    if shot:
        browser.execute_script("window.scrollTo(0, 0);")
        assert browser.save_screenshot(shot), shot


def test_upload_query_index_choice_and_error_details(browser, server, gallery, tmp_path):
    engine, upload = gallery["engine"], gallery["upload"]
    _open(browser, server)
    _set_k(browser, 4)
    file_input = browser.find_element("id", "file")
    file_input.send_keys(str(upload))
    hits = _wait_hits(browser, 4)
    expected = engine.search_by_audio(upload, k=4)
    assert [h.item_id for h in expected][:2] == ["scenes/yellow", "blue"]
    assert [h[1] for h in hits] == [h.item_id for h in expected]
    assert [h[2] for h in hits] == pytest.approx([h.score for h in expected], abs=1e-5)
    src, _ = _first_image_loaded(browser)
    assert src == f"{server}/images/demo/scenes%2Fyellow"
    assert browser.find_element("id", "query-audio").get_attribute("src").startswith("blob:")
    assert "query.flac" in browser.find_element("id", "status").text

    # an undecodable file: the service's detail is shown and no stale results remain
    bad = tmp_path / "notes.wav"
    bad.write_text("these are not audio samples")
    file_input.send_keys(str(bad))
    error = browser.find_element("id", "error")
    _wait(browser, lambda d: error.is_displayed(), "the error message")
    assert error.text.startswith("Error 422") and "audio upload" in error.text and "WAV, FLAC or Ogg" in error.text
    assert _hits(browser) == []

    # a k the service refuses: FastAPI's validation detail is shown as text, naming the parameter
    file_input.send_keys(str(upload))
    _wait_hits(browser, 4)
    assert not error.is_displayed()
    _set_k(browser, 500)
    browser.find_element("id", "search").click()
    _wait(browser, lambda d: error.is_displayed(), "the k error")
    assert error.text.startswith("Error 422") and "k: " in error.text and "100" in error.text

    # choosing another index searches it again with the same query
    _set_k(browser, 2)
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "index")).select_by_value("second")
    hits = _wait_hits(browser, 2)
    assert [h[1] for h in hits] == [h.item_id for h in gallery["second"].search_by_audio(upload, k=2)]
    assert browser.find_element("css selector", "#results li img").get_attribute("src").startswith(
        f"{server}/images/second/")
    assert "second" in browser.find_element("id", "results-title").text
    # the 422 answers are expected; nothing else went wrong on the page
    assert all("422" in message for message in _console_errors(browser))


def test_recording_without_audio_worklets_falls_back_to_a_script_processor(browser, server, gallery):
    """Browsers without AudioWorklet record through a ScriptProcessor, into the same WAV."""
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                     {"source": "delete window.AudioWorkletNode;"})
    try:
        _open(browser, server)
        assert browser.execute_script("return typeof AudioWorkletNode;") == "undefined"
        _set_k(browser, 1)
        record = browser.find_element("id", "record")
        record.click()
        _wait(browser, lambda d: float(d.find_element("id", "elapsed").text.split()[0]) >= 1.0, "1 s of audio")
        record.click()
        assert _wait_hits(browser, 1)[0][:2] == (1, "green")
        info = sf.info(io.BytesIO(_query_audio_bytes(browser)))
        assert (info.format, info.subtype, info.channels) == ("WAV", "PCM_16", 1) and info.duration >= 1.0
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})
