"""The service's image → spoken-caption route, caption audio by id, and `rerank` on /search (TestClient)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import _contract_toys  # noqa: F401  (registers the toy models)

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")
from fastapi.testclient import TestClient  # noqa: E402

from vgskit.contract import Embeddings  # noqa: E402
from vgskit.images import load_image  # noqa: E402
from vgskit.models.base import image_transform_of  # noqa: E402
from vgskit.models.registry import create_model  # noqa: E402
from vgskit.retrieval.engine import CaptionSet, SearchEngine  # noqa: E402
from vgskit.serve import create_app  # noqa: E402

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def _tone(freq: float, seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _wav(x: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    torch.manual_seed(0)
    model = create_model("dual_encoder_tiny").eval()
    paths, cap_ids, audio_paths, cap_images = [], [], [], []
    for i, colour in enumerate(COLOURS):
        p = root / f"img{i}.png"
        Image.new("RGB", (40, 30), colour).save(p)
        paths.append(str(p))
        for j in range(2):  # two spoken captions per image
            a = root / f"cap{i}_{j}.wav"
            a.write_bytes(_wav(_tone(150.0 + 170 * i + 40 * j)))
            cap_ids.append(f"c{i}-{j}")
            audio_paths.append(str(a))
            cap_images.append(f"im{i}")
    ids = [f"im{i}" for i in range(len(COLOURS))]
    with torch.no_grad():
        wavs = [sf.read(a, dtype="float32")[0] for a in audio_paths]
        cap_emb = torch.cat([model.encode_speech(torch.from_numpy(w)[None], torch.tensor([len(w)])) for w in wavs])
        pixels = torch.stack([image_transform_of(model)(load_image(p)) for p in paths])
        img_emb = model.encode_image(pixels)
    captions = CaptionSet(cap_ids, audio_paths, Embeddings(cap_emb), cap_images)
    SearchEngine(model, img_emb, ids, paths, captions=captions).save(root / "index")
    engine = SearchEngine.load(root / "index", model)
    plain = SearchEngine(model, img_emb, ids, paths)
    return {"root": root, "model": model, "engine": engine, "plain": plain, "paths": paths, "img_emb": img_emb,
            "cap_emb": cap_emb, "cap_ids": cap_ids, "audio_paths": audio_paths}


@pytest.fixture(scope="module")
def client(setup):
    with TestClient(create_app(setup["model"], {"caps": setup["engine"], "plain": setup["plain"]})) as c:
        yield c


def _expected_captions(setup, query: torch.Tensor, k: int) -> list[str]:
    scores = setup["cap_emb"].numpy().astype(np.float64) @ query.numpy().astype(np.float64)
    return [setup["cap_ids"][j] for j in np.argsort(-scores, kind="stable")[:k]]


def test_search_image_upload_and_by_id(client, setup):
    data = Path(setup["paths"][2]).read_bytes()
    r = client.post("/search/image", params={"k": 4}, files={"image": ("q.png", data, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    with torch.no_grad():
        query = setup["model"].encode_image(image_transform_of(setup["model"])(load_image(setup["paths"][2]))[None])[0]
    assert body["index"] == "caps" and body["k"] == 4
    assert [h["id"] for h in body["hits"]] == _expected_captions(setup, query, 4)
    scores = setup["cap_emb"].numpy() @ query.numpy()
    assert [h["score"] for h in body["hits"]] == pytest.approx(
        [float(scores[setup["cap_ids"].index(h["id"])]) for h in body["hits"]], abs=1e-5)
    assert all(h["image_id"] == "im" + h["id"][1] for h in body["hits"])
    for hit in body["hits"]:  # the audio is served by caption id
        audio = client.get(hit["audio_url"])
        assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
        assert audio.content == Path(setup["audio_paths"][setup["cap_ids"].index(hit["id"])]).read_bytes()
    # By gallery id: the stored embedding, no image sent.
    r = client.post("/search/image", params={"k": 3}, json={"id": "im1"})
    assert r.status_code == 200
    assert [h["id"] for h in r.json()["hits"]] == _expected_captions(setup, setup["img_emb"][1], 3)
    assert client.get("/indices").json()["indices"][0]["captions"] == 10


def test_search_image_errors(client, setup):
    r = client.post("/search/image", params={"index": "plain"}, json={"id": "im1"})
    assert r.status_code == 404 and "holds no spoken captions" in r.json()["detail"]
    r = client.post("/search/image", json={"id": "nope"})
    assert r.status_code == 404 and "no image with id 'nope'" in r.json()["detail"]
    r = client.post("/search/image", files={"image": ("q.png", b"not an image", "image/png")})
    assert r.status_code == 422 and r.json()["detail"].startswith("image upload:") and "Traceback" not in r.text
    assert "/tmp" not in r.json()["detail"]  # the temporary file is not named
    r = client.post("/search/image", files={"image": ("q.png", b"", "image/png")})
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = client.post("/search/image", files={"audio": ("q.png", b"x", "image/png")})
    assert r.status_code == 422 and "'image'" in r.json()["detail"]
    r = client.post("/search/image", content=b"x", headers={"content-type": "image/png"})
    assert r.status_code == 415
    r = client.post("/search/image", json={"id": 3})
    assert r.status_code == 422 and "string id" in r.json()["detail"]
    assert client.post("/search/image", params={"k": 0}, json={"id": "im1"}).status_code == 422
    r = client.post("/search/image", params={"rerank": 5}, json={"id": "im1"})
    assert r.status_code == 422 and "no fine scorer" in r.json()["detail"]
    for url in ("/audio/caps/nope", "/audio/plain/c0-0", "/audio/caps/..%2Fimg0.png",
                "/audio/caps/" + setup["audio_paths"][0].lstrip("/"), "/audio/nope/c0-0"):
        assert client.get(url).status_code == 404, url


def test_rerank_on_search_with_a_fine_scorer():
    """`rerank=N`: the N best by pooled dot product, re-ordered by the model's fine scores (computed here)."""
    torch.manual_seed(1)
    model = create_model("test_toy_regions").eval()
    n, regions, d = 12, 3, model.embed_dim
    tokens = torch.randn(n, regions, d)
    pooled = torch.nn.functional.normalize(tokens.mean(1), dim=1)
    gallery = Embeddings(pooled, tokens, torch.ones(n, regions, dtype=torch.bool))
    ids = [f"g{i}" for i in range(n)]
    engine = SearchEngine(model, gallery, ids, [f"/none/{i}.png" for i in ids])
    wav = _tone(440.0, 1.0)
    with TestClient(create_app(model, {"toy": engine})) as c:
        r = c.post("/search", params={"k": 3, "rerank": 8}, files={"audio": ("q.wav", _wav(wav), "audio/wav")})
        assert r.status_code == 200, r.text
        got = r.json()["hits"]
        query = engine.embed_query(wav)  # the speech embedding, as the service computes it
        coarse = np.argsort(-(pooled.numpy() @ query.pooled[0].numpy()), kind="stable")[:8]
        with torch.no_grad():
            fine = model.score_pairs(query.select([0] * 8), gallery.select(torch.from_numpy(coarse))).numpy()
        order = np.argsort(-fine, kind="stable")[:3]
        assert [h["id"] for h in got] == [ids[coarse[j]] for j in order]
        assert [h["score"] for h in got] == pytest.approx([float(fine[j]) for j in order], abs=1e-5)
        plain = c.post("/search", params={"k": 3}, files={"audio": ("q.wav", _wav(wav), "audio/wav")}).json()
        assert [h["id"] for h in plain["hits"]] == [ids[j] for j in coarse[:3]]
        r = c.post("/search", params={"k": 5, "rerank": 4}, files={"audio": ("q.wav", _wav(wav), "audio/wav")})
        assert r.status_code == 422 and "rerank (4) must be >= k (5)" in r.json()["detail"]
        r = c.post("/search", params={"rerank": 8}, json={"embedding": [0.1] * d})
        assert r.status_code == 422 and "rerank needs an audio query" in r.json()["detail"]
        assert c.get("/indices").json()["indices"][0]["rerank"] is True
        assert json.loads(c.get("/openapi.json").text)["paths"]["/search/image"]["post"]


def test_rerank_refused_without_a_fine_scorer(client):
    r = client.post("/search", params={"rerank": 10}, files={"audio": ("q.wav", _wav(_tone(300.0)), "audio/wav")})
    assert r.status_code == 422 and "no fine scorer" in r.json()["detail"]
