"""The search service (`vgskit serve`): routes, answers and hostile input, over a tiny model and gallery."""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import time
from pathlib import Path

import anyio
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")
from fastapi.testclient import TestClient  # noqa: E402

from vgskit.cli import main  # noqa: E402
from vgskit.models.registry import create_model, save_pretrained  # noqa: E402
from vgskit.retrieval.engine import SearchEngine, model_identity  # noqa: E402
from vgskit.serve import ServeLimits, create_app  # noqa: E402
from vgskit.serve.decode import sniff  # noqa: E402

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
IDS = ["red", "green", "blue", "scenes/yellow"]  # an id with a slash travels encoded in image URLs


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A tiny model, four solid-colour images and an index of them saved and loaded back."""
    root = tmp_path_factory.mktemp("serve")
    paths = []
    for i, colour in enumerate(COLOURS):
        p = root / f"img{i}.png"
        Image.new("RGB", (40, 30), colour).save(p)
        paths.append(str(p))
    torch.manual_seed(0)
    model = create_model("dual_encoder_tiny").eval()
    SearchEngine.build(model, paths, IDS).save(root / "index")
    SearchEngine.build(model, paths[:2], ["a", "b"]).save(root / "second")
    engine = SearchEngine.load(root / "index", model)
    second = SearchEngine.load(root / "second", model)
    return {"root": root, "paths": paths, "model": model, "engine": engine, "second": second}


def _app(gallery, **limits):
    return create_app(gallery["model"], {"demo": gallery["engine"], "second": gallery["second"]},
                      limits=ServeLimits(**limits))


@pytest.fixture(scope="module")
def client(gallery):
    with TestClient(_app(gallery)) as c:
        yield c


def _tone(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A speech-like test signal: a few harmonics with a slow envelope, plus a little noise."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    x = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate((180.0, 360.0, 900.0, 2400.0)))
    x = 0.2 * x * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(t.shape)
    x = x.astype(np.float32)
    return np.stack([x, 0.7 * x + 0.01 * rng.standard_normal(t.shape).astype(np.float32)][:channels], axis=1)


def _encode(wav: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _upload(client, data: bytes, *, name: str = "query.bin", ctype: str = "application/octet-stream",
            field: str = "audio", **params):
    return client.post("/search", params=params, files={field: (name, data, ctype)})


def _is_traceback_free(response) -> bool:
    return "Traceback" not in response.text and "File \"" not in response.text


# -- answers ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,subtype,rate,channels", [("WAV", "PCM_16", 44100, 2), ("FLAC", "PCM_24", 22050, 1),
                                                       ("OGG", "VORBIS", 16000, 1)])
def test_search_upload_matches_the_engine(client, gallery, tmp_path, fmt, subtype, rate, channels):
    """Any container, rate and channel count; the format comes from the bytes, not the name or declared type."""
    data = _encode(_tone(1.5, rate, channels), rate, fmt, subtype)
    file = tmp_path / f"query.{fmt.lower()}"
    file.write_bytes(data)
    expected = gallery["engine"].search_by_audio(file, k=3)  # the same bytes as a file, through vgskit.audio
    r = _upload(client, data, name="query.mp3", ctype="text/plain", k=3)  # misleading name and type
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["index"] == "demo" and body["k"] == 3
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3]
    assert [h["id"] for h in body["hits"]] == [h.item_id for h in expected]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in expected], abs=1e-5)
    assert set(body["timing_ms"]) == {"decode", "resample", "encode", "search"}
    assert all(v >= 0 for v in body["timing_ms"].values()) and body["timing_ms"]["encode"] > 0
    for hit in body["hits"]:  # every image URL serves the file of its id
        img = client.get(hit["image_url"])
        assert img.status_code == 200 and img.headers["content-type"] == "image/png"
        assert img.content == Path(gallery["paths"][IDS.index(hit["id"])]).read_bytes()


def test_search_embedding_json_default_k_and_second_index(client, gallery):
    wav = _tone(2.0, 16000)[:, 0]
    engine = gallery["engine"]
    emb = engine.embed_audio(wav).tolist()
    r = client.post("/search", json={"embedding": emb})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = engine.search_by_waveform(wav, k=5)
    assert body["k"] == 5 and len(body["hits"]) == 4  # default k; the gallery holds 4
    assert [h["id"] for h in body["hits"]] == [h.item_id for h in expected]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in expected], abs=1e-5)
    assert body["timing_ms"]["decode"] == body["timing_ms"]["encode"] == 0
    url = next(h["image_url"] for h in body["hits"] if h["id"] == "scenes/yellow")
    assert url == "/images/demo/scenes%2Fyellow" and client.get(url).content == Path(gallery["paths"][3]).read_bytes()

    r = client.post("/search", params={"index": "second", "k": 1}, json={"embedding": emb})
    assert r.status_code == 200 and r.json()["index"] == "second"
    assert [h["id"] for h in r.json()["hits"]] == [gallery["second"].search_by_waveform(wav, k=1)[0].item_id]
    assert r.json()["hits"][0]["image_url"].startswith("/images/second/")


def test_k_is_bounded(client):
    emb = [0.1] * 32
    for k in (0, -1, 101):
        r = client.post("/search", params={"k": k}, json={"embedding": emb})
        assert r.status_code == 422 and "k" in str(r.json()["detail"])
    assert client.post("/search", params={"k": 100}, json={"embedding": emb}).status_code == 200
    with TestClient(_app(_gallery_only(client), max_k=2, default_k=2)) as small:
        assert small.post("/search", params={"k": 3}, json={"embedding": emb}).status_code == 422
        assert small.post("/search", json={"embedding": emb}).json()["k"] == 2


def _gallery_only(client):
    state = client.app.state.vgskit
    return {"model": state.model, "engine": state.indices["demo"].engine, "second": state.indices["second"].engine}


def test_indices_healthz_and_docs(client, gallery):
    recorded = json.loads((gallery["root"] / "index" / "index.json").read_text())["model"]
    r = client.get("/indices")
    assert r.status_code == 200
    assert r.json() == {"default": "demo", "indices": [
        {"name": "demo", "count": 4, "embed_dim": 32, "captions": 0, "index_kind": "exact", "recall_at_10": 1.0,
         "rerank": False, "model": model_identity(gallery["model"])},
        {"name": "second", "count": 2, "embed_dim": 32, "captions": 0, "index_kind": "exact", "recall_at_10": 1.0,
         "rerank": False, "model": model_identity(gallery["model"])}]}
    assert r.json()["indices"][0]["model"] == recorded  # the identity index.json records
    assert client.get("/healthz").json() == {"status": "ok", "searches_running": 0, "max_concurrent_searches": 2}
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/search"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert client.get("/docs").status_code == 200


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def test_metrics_prometheus_text(gallery):
    with TestClient(_app(gallery)) as c:
        data = _encode(_tone(1.0, 16000), 16000, "WAV")
        for _ in range(2):
            assert _upload(c, data).status_code == 200
        assert c.post("/search", json={"embedding": [0.0] * 32}).status_code == 200
        assert c.get("/images/demo/red").status_code == 200
        assert c.get("/images/demo/nope").status_code == 404
        assert _upload(c, b"").status_code == 422
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, float] = {}
    for line in r.text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* \S", line), line
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    req = 'vgskit_http_requests_total{route="%s",method="%s",status="%s"}'
    assert samples[req % ("/search", "POST", "200")] == 3
    assert samples[req % ("/search", "POST", "422")] == 1
    assert samples[req % ("/images/{index}/{item_id:path}", "GET", "200")] == 1
    assert samples[req % ("/images/{index}/{item_id:path}", "GET", "404")] == 1
    stage = 'vgskit_search_stage_duration_seconds_%s{stage="%s"}'
    for name, n in (("decode", 2), ("resample", 2), ("encode", 2), ("search", 3)):
        assert samples[stage % ("count", name)] == n
        buckets = [v for k, v in samples.items() if k.startswith(f'vgskit_search_stage_duration_seconds_bucket{{stage="{name}"')]
        assert buckets == sorted(buckets) and buckets[-1] == n  # cumulative, +Inf holds every observation
    assert samples['vgskit_http_request_duration_seconds_count{route="/search"}'] == 4
    assert samples["vgskit_searches_running"] == 0 and samples["vgskit_searches_max"] == 2


# -- hostile input ----------------------------------------------------------------------------------------------
def test_upload_size_limit_from_content_length(gallery):
    with TestClient(_app(gallery, max_upload_bytes=4096)) as c:
        data = _encode(_tone(1.0, 16000), 16000, "WAV")  # 32 kB
        r = _upload(c, data)
        assert r.status_code == 413
        assert "exceeds the limit of 4096 bytes" in r.json()["detail"] and "max_upload_bytes" in r.json()["detail"]
        r = c.post("/search", json={"embedding": [0.0] * 5000})
        assert r.status_code == 413
        small = _encode(_tone(0.1, 16000), 16000, "WAV")  # 3.2 kB: within the limit
        assert _upload(c, small).status_code == 200
    # A small body announced as a large one: refused on the header, before any byte of it is read.
    status, detail, pulled = anyio.run(_asgi_post, c.app, [b"{", b'"embedding": []', b"}"],
                                       {"content-type": "application/json", "content-length": str(10**9)})
    assert status == 413 and "1000000000 bytes exceeds the limit of 4096 bytes" in detail and pulled == 0


def test_upload_size_limit_counted_while_reading(gallery):
    """A body sent without Content-Length (chunked), or with a false one, is counted as it arrives."""
    with TestClient(_app(gallery, max_upload_bytes=4096)) as c:
        r = c.post("/search", content=iter([b"x" * 1024] * 64), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]
        data = _encode(_tone(1.0, 16000), 16000, "WAV")
        boundary = "xyz"
        multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"q.wav\"\r\n"
                     f"Content-Type: audio/wav\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        r = c.post("/search", content=iter([multipart[i:i + 1000] for i in range(0, len(multipart), 1000)]),
                   headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]
        r = c.post("/search", content=multipart, headers={"content-type": f"multipart/form-data; boundary={boundary}",
                                                          "content-length": "100"})
        assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]
        # Reading stops at the first chunk past the limit: the rest of the body is never pulled.
        for ctype, body in (("application/json", b"x" * 65536),
                            (f"multipart/form-data; boundary={boundary}", multipart)):
            chunks = [body[i:i + 1024] for i in range(0, len(body), 1024)]
            status, detail, pulled = anyio.run(_asgi_post, c.app, chunks, {"content-type": ctype})
            assert status == 413 and "4096 bytes" in detail and (pulled, len(chunks)) == (5, len(chunks))


async def _asgi_post(app, chunks: list[bytes], headers: dict[str, str]) -> tuple[int, str, int]:
    """POST /search straight through ASGI, counting the body chunks the service pulls."""
    pulled = 0
    messages = []

    async def receive():
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/search", "raw_path": b"/search", "root_path": "", "query_string": b"",
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()], "client": ("test", 1),
             "server": ("test", 80)}
    await app(scope, receive, send)
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, json.loads(body)["detail"], pulled


def test_audio_duration_limit(gallery):
    with TestClient(_app(gallery, max_audio_seconds=2.0)) as c:
        r = _upload(c, _encode(_tone(3.0, 8000), 8000, "WAV"))
        assert r.status_code == 413 and "3.00 s exceeds the limit of 2 s" in r.json()["detail"]
        r = _upload(c, _unknown_length_flac(_tone(3.0, 8000), 8000))  # the header states no length
        assert r.status_code == 413 and "more than 2 s" in r.json()["detail"]
        assert _upload(c, _unknown_length_flac(_tone(1.0, 8000), 8000)).status_code == 200
        assert _upload(c, _encode(_tone(1.9, 48000, 2), 48000, "FLAC")).status_code == 200


def _unknown_length_flac(wav: np.ndarray, rate: int) -> bytes:
    """A FLAC whose STREAMINFO total-sample count is 0, as encoders writing to a pipe leave it."""
    data = bytearray(_encode(wav, rate, "FLAC"))
    assert data[:4] == b"fLaC"
    data[8 + 13] &= 0xF0  # the 36-bit count spans the low nibble of byte 13 and bytes 14-17 of STREAMINFO
    data[8 + 14:8 + 18] = b"\0\0\0\0"
    assert sf.info(io.BytesIO(bytes(data))).frames > 2**62
    return bytes(data)


def test_undecodable_and_empty_audio_are_422_naming_the_problem(client):
    good = _encode(_tone(1.0, 16000), 16000, "WAV")
    silent = _encode(np.zeros((16000, 1), np.float32), 16000, "WAV")
    cancel = _encode(np.stack([_tone(1.0, 16000)[:, 0], -_tone(1.0, 16000)[:, 0]], 1), 16000, "WAV")
    cases = {
        b"": "empty (0 bytes)",
        b"ID3\x04 this is not audio at all": "not a recognised audio format",
        b"%PDF-1.4\n": "not a recognised audio format",
        good[:44] + b"\x00" * 3: "truncated",  # header of 1 s, three bytes of samples
        good[:12] + b"junkjunkjunk" * 20: "cannot decode",
        b"fLaC" + bytes(200): "cannot decode",
        b"OggS" + bytes(200): "cannot decode",
        silent: "silent",
        cancel: "channels cancel out",
        _encode(_tone(0.06, 16000), 16000, "WAV"): "too short",
        _encode(np.zeros((0, 1), np.float32), 16000, "WAV"): "no audio samples",
    }
    for data, problem in cases.items():
        r = _upload(client, data, name="query.wav", ctype="audio/wav")
        assert r.status_code == 422, (problem, r.text)
        assert problem in r.json()["detail"] and r.json()["detail"].startswith("audio upload"), r.text
        assert _is_traceback_free(r)
    assert _upload(client, good).status_code == 200


def test_wrong_field_body_or_type(client):
    data = _encode(_tone(1.0, 16000), 16000, "WAV")
    r = _upload(client, data, field="file")
    assert r.status_code == 422 and "'audio'" in r.json()["detail"] and "'file'" in r.json()["detail"]
    r = client.post("/search", data={"audio": "not a file"}, files={"other": ("x", b"1")})
    assert r.status_code == 422 and "a text value, not a file" in r.json()["detail"]
    r = client.post("/search", content=data, headers={"content-type": "audio/wav"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = client.post("/search", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 422
    for payload, problem in (({"audio": [1, 2]}, "expected a JSON object"), ([1, 2], "got list"),
                             ({"embedding": [0.1] * 8}, "has 8 values"), ({"embedding": "0.1"}, "list of numbers"),
                             ({"embedding": [True] * 32}, "list of numbers")):
        r = client.post("/search", json=payload)
        assert r.status_code == 422 and problem in r.json()["detail"], r.text
    r = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
    r = client.post("/search", content=b'{"embedding": [NaN' + b", 0" * 31 + b"]}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and "NaN" in r.json()["detail"]


def test_unknown_index_or_id_is_404(client):
    r = client.post("/search", params={"index": "nope"}, json={"embedding": [0.0] * 32})
    assert r.status_code == 404 and r.json()["detail"] == "unknown index 'nope'; served: demo, second"
    r = _upload(client, _encode(_tone(1.0, 16000), 16000, "WAV"), index="nope")
    assert r.status_code == 404
    assert client.get("/images/nope/red").status_code == 404
    r = client.get("/images/demo/purple")
    assert r.status_code == 404 and "no image with id 'purple'" in r.json()["detail"]
    assert client.get("/images/second/red").status_code == 404  # ids are per index


def test_no_path_traversal(client, gallery):
    """Only ids of the index are served: ../, absolute paths, file names and their encodings are unknown ids."""
    secret = gallery["root"] / "secret.txt"
    secret.write_text("do not serve")
    image = Path(gallery["paths"][0])
    raw_paths = [
        "/images/demo/..%2Fsecret.txt",
        "/images/demo/%2e%2e%2fsecret.txt",
        "/images/demo/%2E%2E/%2E%2E/etc/passwd",
        "/images/demo/..%5c..%5csecret.txt",
        "/images/demo/%252e%252e%252fsecret.txt",
        "/images/demo/scenes%2F..%2Fred",
        "/images/demo/" + str(secret).lstrip("/"),
        "/images/demo/%2F" + str(secret).lstrip("/").replace("/", "%2F"),
        "/images/demo/" + image.name,
        "/images/demo/img0",
        "/images/%2e%2e/red",
        "/images/demo/red%00.png",
    ]
    for raw in raw_paths:
        r = client.get(raw)
        assert r.status_code == 404, raw
        assert "do not serve" not in r.text and not r.content.startswith(b"\x89PNG") and "root:" not in r.text
    r = client.get("/images/demo/../../etc/passwd")  # the client resolves the dots: no route
    assert r.status_code == 404 and "root:" not in r.text
    assert client.get("/images/demo/red").content == image.read_bytes()


def test_concurrent_searches_are_bounded_with_503(gallery, monkeypatch):
    engine = gallery["engine"]
    entered, release = threading.Event(), threading.Event()
    original = engine.embed_query

    def slow_embed(wav):
        entered.set()
        assert release.wait(30)
        return original(wav)

    monkeypatch.setattr(engine, "embed_query", slow_embed)
    data = _encode(_tone(1.0, 16000), 16000, "WAV")
    with TestClient(_app(gallery, max_concurrent_searches=1, retry_after_s=3)) as c:
        results = {}
        first = threading.Thread(target=lambda: results.setdefault("first", _upload(c, data)))
        first.start()
        try:
            assert entered.wait(30)
            r = _upload(c, data)
            assert r.status_code == 503 and r.headers["retry-after"] == "3"
            assert "1 searches are already running" in r.json()["detail"]
            r = c.post("/search", json={"embedding": [0.0] * 32})  # JSON queries take a slot too
            assert r.status_code == 503
            assert c.get("/healthz").json()["searches_running"] == 1  # other routes still answer
        finally:
            release.set()
            first.join(30)
        assert results["first"].status_code == 200
        assert _upload(c, b"").status_code == 422  # a failing search frees its slot as well
        assert _upload(c, data).status_code == 200
        assert c.get("/healthz").json()["searches_running"] == 0


def test_cors_is_off_unless_origins_are_given(gallery):
    origin = {"Origin": "https://evil.example"}
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with TestClient(_app(gallery)) as c:
        r = c.get("/indices", headers=origin)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = c.options("/search", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    with TestClient(_app(gallery, cors_origins=("https://app.example",))) as c:
        r = c.get("/indices", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.options("/search", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-origin" not in c.get("/indices", headers=origin).headers


def test_create_app_refuses_bad_names_and_foreign_models(gallery):
    from vgskit.errors import ConfigError

    with pytest.raises(ConfigError, match="index name '../x'"):
        create_app(gallery["model"], {"../x": gallery["engine"]})
    with pytest.raises(ConfigError, match="no search index"):
        create_app(gallery["model"], {})
    other = create_model("dual_encoder_tiny").eval()
    with pytest.raises(ConfigError, match="another model"):
        create_app(other, {"demo": gallery["engine"]})
    with pytest.raises(ConfigError, match="max_upload_bytes"):
        ServeLimits(max_upload_bytes=0)


def test_sniff_reads_content_not_names():
    assert sniff(_encode(_tone(0.1, 8000), 8000, "WAV")) == "WAV"
    assert sniff(_encode(_tone(0.1, 8000), 8000, "FLAC")) == "FLAC"
    assert sniff(_encode(_tone(0.1, 8000), 8000, "OGG", "VORBIS")) == "OGG"
    assert sniff(b"RIFF\0\0\0\0AVI LIST") is None and sniff(b"") is None


# -- the command ------------------------------------------------------------------------------------------------
def test_serve_command_loads_checkpoint_and_indices(gallery, tmp_path, monkeypatch, capsys):
    import uvicorn

    ckpt = save_pretrained(gallery["model"], tmp_path / "model")
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    code = main(["serve", "--checkpoint", str(ckpt), "--index", f"scenes={gallery['root'] / 'index'}",
                 "--index", str(gallery["root"] / "second"), "--port", "8123", "--cors-origin", "https://app.example",
                 "--max-upload-mb", "1", "--max-concurrent", "3"])
    assert code == 0, capsys.readouterr().err
    (app, kw), = calls
    assert kw["host"] == "127.0.0.1" and kw["port"] == 8123 and kw["limit_concurrency"] == 64
    assert "serving scenes (4 images), second (2 images) on http://127.0.0.1:8123" in capsys.readouterr().out
    with TestClient(app) as c:
        assert [i["name"] for i in c.get("/indices").json()["indices"]] == ["scenes", "second"]
        assert c.get("/healthz").json()["max_concurrent_searches"] == 3
        r = c.get("/indices", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = _upload(c, _encode(_tone(1.0, 16000), 16000, "WAV"))
        assert r.status_code == 200 and r.json()["index"] == "scenes"


def test_serve_command_errors_are_one_line(gallery, tmp_path, monkeypatch, capsys):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: pytest.fail("must not start"))
    ckpt = save_pretrained(gallery["model"], tmp_path / "model")
    other = save_pretrained(create_model("dual_encoder_tiny", embed_dim=16), tmp_path / "other")
    index = str(gallery["root"] / "index")
    for argv, message in (
            (["--checkpoint", str(ckpt), "--index", f"a={index}", "--index", f"a={index}"], "'a' is given twice"),
            (["--checkpoint", str(ckpt), "--index", f"a={tmp_path / 'none'}"], "does not exist"),
            (["--checkpoint", str(ckpt), "--index", f"a/b={index}"], "the name 'a/b'"),
            (["--checkpoint", str(other), "--index", f"a={index}"], f"--index a={index}: search index"),
            (["--checkpoint", str(ckpt), "--index", index, "--max-concurrent", "0"], "--max-concurrent must be >= 1")):
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vgskit: error: ") and message in err and "Traceback" not in err, err


def test_serve_command_without_the_extra_names_it(monkeypatch, capsys, tmp_path):
    for module in ("fastapi", "fastapi.testclient", "uvicorn"):
        monkeypatch.setitem(sys.modules, module, None)
    start = time.perf_counter()
    code = main(["serve", "--checkpoint", str(tmp_path / "missing"), "--index", f"a={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "fastapi, uvicorn (the 'serve' extra): pip install 'vgskit[serve]'" in err
    assert "missing" not in err  # checked before the checkpoint is looked at
    assert time.perf_counter() - start < 5
