"""The search service: a FastAPI application over one model and one or more saved search indices.

Routes (OpenAPI documentation at ``/docs`` and ``/openapi.json``):

``POST /search?k=5&index=NAME&rerank=N``
    A spoken query, either as a ``multipart/form-data`` upload in the field ``audio`` (WAV, FLAC or Ogg at
    any sample rate and channel count; the format is read from the content) or as a JSON body
    ``{"embedding": [...]}`` holding a query embedding computed elsewhere (the model's pooled speech
    embedding, :meth:`SearchEngine.embed_audio`). Answers ``{"index", "k", "hits": [{"rank", "id", "score",
    "image_url"}], "timing_ms": {"decode", "resample", "encode", "search"}}``. ``rerank=N`` (models with a fine
    scorer, audio queries) re-ranks the N best coarse hits with the model's ``score_pairs``.
``POST /search/image?k=5&index=NAME&rerank=N``
    Image → spoken captions, for an index that holds captions: an image upload (multipart field ``image``,
    PNG/JPEG/...) or ``{"id": "<gallery image id>"}`` (its stored embedding). Answers ``{"index", "k", "hits":
    [{"rank", "id", "score", "audio_url", "image_id"}], "timing_ms"}``.
``GET /audio/{index}/{caption_id}``
    The audio file of a caption id, looked up in the index (the request names an id, never a path).
``GET /images/{index}/{id}``
    The image file of a gallery id, looked up in the index: the request names an id, never a path.
``GET /indices``
    Every index served: name, image and caption counts, embedding width, index kind with its recall@10, whether
    re-ranking is available, the identity of the model that built it.
``GET /healthz``
    Liveness, with the number of searches running.
``GET /metrics``
    Request counters and latency histograms (route and search stage) in the Prometheus text format.

Errors are JSON ``{"detail": "..."}`` naming the problem and, for limits, the limit: 404 unknown index or id,
413 upload larger than ``max_upload_bytes`` or query longer than ``max_audio_seconds``, 415 a body that is
neither multipart nor JSON, 422 undecodable, empty, silent or too short audio, a missing field or a malformed
embedding, 503 (with ``Retry-After``) when ``max_concurrent_searches`` searches are already running.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vgskit.errors import ConfigError, VGSKitError
from vgskit.retrieval.engine import SearchEngine, model_identity
from vgskit.serve.decode import ACCEPTED, QueryRejected, decode_query, sniff
from vgskit.serve.limits import ServeLimits
from vgskit.serve.metrics import CONTENT_TYPE, STAGES, Metrics
from vgskit.serve.page import mount_page

log = logging.getLogger("vgskit.serve")

AUDIO_FIELD = "audio"
IMAGE_FIELD = "image"
_AUDIO_TYPES = {"WAV": "audio/wav", "FLAC": "audio/flac", "OGG": "audio/ogg"}
_MAX_RERANK = 1000
_INDEX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_IMAGE_TYPES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
                (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))

_SEARCH_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": [AUDIO_FIELD],
            "properties": {AUDIO_FIELD: {"type": "string", "format": "binary",
                                         "description": f"the spoken query: {ACCEPTED}, any rate and channels"}}}},
        "application/json": {"schema": {
            "type": "object",
            "properties": {"embedding": {"type": "array", "items": {"type": "number"},
                                         "description": "a pooled query embedding of the index's width"},
                           "text": {"type": "string",
                                    "description": "a written query, for models with a text tower (milan_text, "
                                                   "clip_text_zero_shot, asr_cascade)"}}}},
    },
}

_IMAGE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": [IMAGE_FIELD],
            "properties": {IMAGE_FIELD: {"type": "string", "format": "binary",
                                         "description": "the query image (PNG, JPEG, GIF, BMP, WebP)"}}}},
        "application/json": {"schema": {
            "type": "object", "required": ["id"],
            "properties": {"id": {"type": "string", "description": "a gallery image id of the index"}}}},
    },
}


@dataclass
class _Index:
    name: str
    engine: SearchEngine
    files: dict[str, str]  # id -> absolute image path, fixed when the service starts
    audio: dict[str, str]  # caption id -> absolute audio path (empty without captions)


class _State:
    def __init__(self, model: Any, indices: dict[str, _Index], limits: ServeLimits):
        self.model = model
        self.indices = indices
        self.default = next(iter(indices))
        self.limits = limits
        self.identity = model_identity(model)
        self.sample_rate = int(model.sample_rate)
        self.metrics = Metrics()
        self.active = 0  # searches running; changed only on the event loop


def create_app(model: Any, indices: Mapping[str, SearchEngine], *, limits: ServeLimits | None = None) -> FastAPI:
    """The search service for ``model`` over ``indices`` (name -> engine; the first is the default).

    Every index must have been built or loaded with ``model``: queries are encoded once, by ``model``, and an
    index built by another checkpoint would answer without any sign of error. Index names are used in URLs:
    letters, digits, ``.``, ``_`` and ``-``.
    """
    limits = limits or ServeLimits()
    if not indices:
        raise ConfigError("no search index to serve: give at least one (name -> SearchEngine)")
    own: str | None = None
    served: dict[str, _Index] = {}
    for name, engine in indices.items():
        if not isinstance(name, str) or not _INDEX_NAME.match(name):
            raise ConfigError(f"index name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (it is part of URLs), "
                              "starting with a letter or digit")
        if engine.model is not model:
            own = own or model_identity(model)["sha256"]
            if model_identity(engine.model)["sha256"] != own:
                raise ConfigError(f"index {name!r} was loaded with another model than the one that encodes the "
                                  "queries; load every index with the served checkpoint")
        files = {item: os.path.abspath(path) for item, path in zip(engine.image_ids, engine.image_paths, strict=True)}
        audio = ({} if engine.captions is None else
                 {c: os.path.abspath(a) for c, a in zip(engine.captions.ids, engine.captions.audio_paths, strict=True)})
        served[name] = _Index(name, engine, files, audio)
    state = _State(model, served, limits)

    app = FastAPI(title="vgskit search", version="1",
                  description="Spoken-query image search over the indices of one vgskit model.")
    app.state.vgskit = state

    @app.exception_handler(QueryRejected)
    async def _rejected(request: Request, exc: QueryRejected) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.post("/search", openapi_extra={"requestBody": _SEARCH_BODY},
              summary="Search an index with a spoken query (audio upload) or a query embedding (JSON)")
    async def search(request: Request,
                     k: int = Query(limits.default_k, ge=1, le=limits.max_k, description="hits to return"),
                     index: str | None = Query(None, description="index name (default: the first served)"),
                     rerank: int | None = Query(None, ge=1, le=_MAX_RERANK,
                                                description="re-rank the N best coarse hits with the model's fine "
                                                            "scorer (audio queries, models with score_pairs; N >= k)"),
                     ) -> dict[str, Any]:
        entry = _index_or_404(state, index or state.default)
        _check_rerank(state, k, rerank)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in ("multipart/form-data", "application/json"):
            raise HTTPException(415, f"send the query as multipart/form-data (audio file in the field "
                                     f"{AUDIO_FIELD!r}) or as application/json ({{\"embedding\": [...]}}); got "
                                     f"{media or 'no content type'!r}")
        _check_content_length(request, limits.max_upload_bytes)
        body = _limited_stream(request, limits.max_upload_bytes)
        if media == "application/json":
            audio, vector = None, _parse_json_query(await _collect(body), entry)
            if rerank is not None:
                raise HTTPException(422, "rerank needs an audio query: a pooled embedding has no token-level "
                                         "features to re-rank with")
        else:
            audio, vector = await _read_audio_field(request, body), None
        _take_slot(state)
        try:
            hits, timing = await run_in_threadpool(_run_search, state, entry, audio, vector, k, rerank)
        finally:
            state.active -= 1
        ran = set(STAGES) if audio is not None else {"search", "encode"} if isinstance(vector, str) else {"search"}
        state.metrics.observe_stages({s: timing[s] for s in STAGES if s in ran})
        root = request.scope.get("root_path", "").rstrip("/")
        return {
            "index": entry.name, "k": k,
            "hits": [{"rank": rank, "id": item, "score": score,
                      "image_url": f"{root}/images/{quote(entry.name, safe='')}/{quote(item, safe='')}"}
                     for rank, (item, score) in enumerate(hits, start=1)],
            "timing_ms": {s: round(timing[s] * 1000.0, 3) for s in STAGES},
        }

    @app.post("/search/image", openapi_extra={"requestBody": _IMAGE_BODY},
              summary="Spoken captions for an image (upload) or a gallery image id (JSON)")
    async def search_image(request: Request,
                           k: int = Query(limits.default_k, ge=1, le=limits.max_k, description="hits to return"),
                           index: str | None = Query(None, description="index name (default: the first served)"),
                           rerank: int | None = Query(None, ge=1, le=_MAX_RERANK,
                                                      description="re-rank the N best coarse hits finely (N >= k)"),
                           ) -> dict[str, Any]:
        entry = _index_or_404(state, index or state.default)
        if entry.engine.captions is None:
            raise HTTPException(404, f"index {entry.name!r} holds no spoken captions (build it from a dataset with "
                                     "`vgskit index` to search images -> speech)")
        _check_rerank(state, k, rerank)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in ("multipart/form-data", "application/json"):
            raise HTTPException(415, f"send the image as multipart/form-data (file in the field {IMAGE_FIELD!r}) "
                                     f"or as application/json ({{\"id\": \"<gallery image id>\"}}); got "
                                     f"{media or 'no content type'!r}")
        _check_content_length(request, limits.max_upload_bytes)
        body = _limited_stream(request, limits.max_upload_bytes)
        image_bytes: bytes | None = None
        image_id: str | None = None
        if media == "application/json":
            image_id = _parse_image_id(await _collect(body), entry)
        else:
            image_bytes = await _read_file_field(request, body, IMAGE_FIELD, "the query image")
        _take_slot(state)
        try:
            hits, timing = await run_in_threadpool(_run_image_search, entry, image_bytes, image_id, k, rerank)
        finally:
            state.active -= 1
        root = request.scope.get("root_path", "").rstrip("/")
        captions = entry.engine.captions
        assert captions is not None
        image_of = dict(zip(captions.ids, captions.image_ids or [None] * len(captions.ids), strict=True))
        return {
            "index": entry.name, "k": k,
            "hits": [{"rank": rank, "id": item, "score": score, "image_id": image_of.get(item),
                      "audio_url": f"{root}/audio/{quote(entry.name, safe='')}/{quote(item, safe='')}"}
                     for rank, (item, score) in enumerate(hits, start=1)],
            "timing_ms": {s: round(v * 1000.0, 3) for s, v in timing.items()},
        }

    @app.get("/audio/{index}/{caption_id:path}", summary="The audio file of a spoken caption id")
    async def audio(index: str, caption_id: str) -> FileResponse:
        entry = _index_or_404(state, index)
        return _file_by_id(entry.audio, caption_id, entry.name, "spoken caption",
                           lambda head: _AUDIO_TYPES.get(sniff(head) or "", "application/octet-stream"))

    @app.get("/images/{index}/{item_id:path}", summary="The image file of a gallery id")
    async def image(index: str, item_id: str) -> FileResponse:
        entry = _index_or_404(state, index)
        return _file_by_id(entry.files, item_id, entry.name, "image", _image_type)

    @app.get("/indices", summary="The indices served")
    async def list_indices() -> dict[str, Any]:
        return {"default": state.default, "indices": [
            {"name": e.name, "count": len(e.engine.image_ids), "embed_dim": int(e.engine.image_emb.shape[1]),
             "captions": len(e.audio), "index_kind": e.engine.index_kind,
             "recall_at_10": e.engine.index_info.get("recall_at_10"), "rerank": bool(state.model.has_fine_scores),
             "model": state.identity} for e in state.indices.values()]}

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "searches_running": state.active,
                "max_concurrent_searches": limits.max_concurrent_searches}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics() -> PlainTextResponse:
        text = state.metrics.render({
            "vgskit_searches_running": ("Searches running now.", state.active),
            "vgskit_searches_max": ("Searches allowed to run at once (max_concurrent_searches).",
                                    limits.max_concurrent_searches)})
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    mount_page(app)  # the search page at / and its files under /static/
    app.add_middleware(_MetricsMiddleware, metrics=state.metrics)
    if limits.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(limits.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type"], max_age=600)
    return app


def _index_or_404(state: _State, name: str) -> _Index:
    entry = state.indices.get(name)
    if entry is None:
        raise HTTPException(404, f"unknown index {name!r}; served: {', '.join(sorted(state.indices))}")
    return entry


def _check_rerank(state: _State, k: int, rerank: int | None) -> None:
    if rerank is None:
        return
    if not getattr(state.model, "has_fine_scores", False):
        raise HTTPException(422, "rerank: this model has no fine scorer (score_pairs) to re-rank with")
    if rerank < k:
        raise HTTPException(422, f"rerank ({rerank}) must be >= k ({k})")


def _take_slot(state: _State) -> None:
    """Count one more search running, or answer 503 when ``max_concurrent_searches`` already are."""
    limits = state.limits
    if state.active >= limits.max_concurrent_searches:
        raise HTTPException(503, f"busy: {limits.max_concurrent_searches} searches are already running "
                                 f"(max_concurrent_searches); retry in {limits.retry_after_s} s",
                            headers={"Retry-After": str(limits.retry_after_s)})
    state.active += 1


def _check_content_length(request: Request, limit: int) -> None:
    """Refuse a body announced as too large before reading any of it."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise HTTPException(400, f"invalid Content-Length header {declared!r}") from None
    if size > limit:
        raise QueryRejected(413, _too_large(f"{size} bytes", limit))


def _too_large(size: str, limit: int) -> str:
    return f"request body too large: {size} exceeds the limit of {limit} bytes ({limit / 2**20:g} MiB, max_upload_bytes)"


async def _limited_stream(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The request body, counted as it arrives: stop with 413 at the first byte past ``limit`` (a client may
    send no Content-Length, or a false one)."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise QueryRejected(413, _too_large("more than that", limit))
        yield chunk


async def _collect(body: AsyncGenerator[bytes, None]) -> bytes:
    return b"".join([chunk async for chunk in body])


async def _read_audio_field(request: Request, body: AsyncGenerator[bytes, None]) -> bytes:
    return await _read_file_field(request, body, AUDIO_FIELD, "the spoken query")


async def _read_file_field(request: Request, body: AsyncGenerator[bytes, None], name: str, what_for: str) -> bytes:
    parser = MultiPartParser(request.headers, body, max_files=1, max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise HTTPException(422, f"malformed multipart body: {exc.message}") from None
    try:
        field = form.get(name)
        if not isinstance(field, UploadFile):
            got = ", ".join(repr(key) for key in form.keys()) or "none"
            what = "a text value, not a file" if field is not None else f"missing (fields sent: {got})"
            raise HTTPException(422, f"expected {what_for} as a file in the multipart field {name!r}: {what}")
        return await field.read()
    finally:
        await form.close()


_MAX_TEXT_CHARS = 2000


def _parse_json_query(raw: bytes, entry: _Index) -> torch.Tensor | str:
    """A JSON query: ``{"embedding": [...]}`` (a tensor) or ``{"text": "..."}`` (the text, for text towers)."""
    width = int(entry.engine.image_emb.shape[1])
    expected = f"expected a JSON object {{\"embedding\": [{width} numbers]}} or {{\"text\": \"...\"}}"
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(422, f"the body is not valid JSON ({exc}); {expected}") from None
    if isinstance(payload, dict) and "text" in payload and "embedding" not in payload:
        text = payload["text"]
        if not isinstance(text, str) or not text.strip():
            raise HTTPException(422, "'text' must be a non-empty string")
        if len(text) > _MAX_TEXT_CHARS:
            raise HTTPException(413, f"'text' has {len(text)} characters; at most {_MAX_TEXT_CHARS} are accepted")
        if not entry.engine.accepts_text:
            name = getattr(entry.engine.model, "model_name", None) or type(entry.engine.model).__name__
            raise HTTPException(422, f"model {name!r} has no text tower: send a spoken query (or an embedding)")
        return text
    if not isinstance(payload, dict) or "embedding" not in payload:
        raise HTTPException(422, f"{expected}; got {type(payload).__name__}" + (
            f" with keys {sorted(payload)}" if isinstance(payload, dict) else ""))
    values = payload["embedding"]
    if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise HTTPException(422, f"'embedding' must be a list of numbers; {expected}")
    if len(values) != width:
        raise HTTPException(422, f"'embedding' has {len(values)} values but index {entry.name!r} holds "
                                 f"{width}-dimensional embeddings")
    if not all(math.isfinite(v) for v in values):
        raise HTTPException(422, "'embedding' contains NaN or infinite values")
    return torch.tensor(values, dtype=torch.float32)


def _parse_image_id(raw: bytes, entry: _Index) -> str:
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(422, f"the body is not valid JSON ({exc}); expected {{\"id\": \"<gallery image id>\"}}"
                            ) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("id"), str):
        raise HTTPException(422, "expected a JSON object {\"id\": \"<gallery image id>\"} with a string id")
    if payload["id"] not in entry.files:
        raise HTTPException(404, f"index {entry.name!r} has no image with id {payload['id']!r}")
    return payload["id"]


def _run_image_search(entry: _Index, data: bytes | None, image_id: str | None, k: int,
                      rerank: int | None) -> tuple[list[tuple[str, float]], dict[str, float]]:
    """Decode and embed an uploaded image (or take a gallery image's embedding), then rank the captions."""
    import tempfile

    from vgskit.images import load_image
    from vgskit.models.base import image_transform_of

    engine = entry.engine
    timing = {"decode": 0.0, "encode": 0.0, "search": 0.0}
    if image_id is not None:
        t0 = time.perf_counter()
        hits = engine.search_by_image_id(image_id, k, rerank_top=rerank)
        timing["search"] = time.perf_counter() - t0
        return [(h.item_id, h.score) for h in hits], timing
    assert data is not None
    if engine.model.image_input != "pixels":
        raise HTTPException(422, "this model reads region features, not pixels: search with {\"id\": ...} of a "
                                 "gallery image")
    if not data:
        raise HTTPException(422, "image upload: empty (0 bytes)")
    t0 = time.perf_counter()
    # load_image reads files: it checks the pixel count from the header before decoding (decompression bombs)
    with tempfile.NamedTemporaryFile(suffix=".img") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            pixels = image_transform_of(engine.model)(load_image(tmp.name))
        except VGSKitError as err:
            raise HTTPException(422, f"image upload: {str(err).replace(tmp.name, 'the upload')}") from None
    timing["decode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    query = engine.embed_image(pixels)
    timing["encode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    hits = engine.search_captions(query, k, rerank_top=rerank)
    timing["search"] = time.perf_counter() - t0
    return [(h.item_id, h.score) for h in hits], timing


def _run_search(state: _State, entry: _Index, audio: bytes | None, vector: torch.Tensor | str | None,
                k: int, rerank: int | None = None) -> tuple[list[tuple[str, float]], dict[str, float]]:
    """Decode, resample, encode and rank (in a worker thread); the hits as (id, score) and each stage's time."""
    timing = dict.fromkeys(STAGES, 0.0)
    engine = entry.engine
    if audio is not None:
        query = decode_query(audio, sample_rate=state.sample_rate, max_seconds=state.limits.max_audio_seconds)
        timing["decode"], timing["resample"] = query.decode_s, query.resample_s
        t0 = time.perf_counter()
        try:
            embedded = engine.embed_query(query.wav)
        except VGSKitError as err:  # too short for the speech encoder, ...
            raise QueryRejected(422, f"audio upload: {err}") from err
        timing["encode"] = time.perf_counter() - t0
    elif isinstance(vector, str):  # a written query: the model's text tower is the encoder
        t0 = time.perf_counter()
        embedded = engine.embed_text(vector)
        timing["encode"] = time.perf_counter() - t0
    else:
        assert vector is not None
        embedded = vector
    t0 = time.perf_counter()
    with torch.inference_mode():
        found = engine.search_by_embedding(embedded, k, rerank_top=rerank)
    hits = [(h.item_id, h.score) for h in found]
    timing["search"] = time.perf_counter() - t0
    return hits, timing


def _file_by_id(files: Mapping[str, str], item_id: str, index: str, what: str,
                media_type: Callable[[bytes], str]) -> FileResponse:
    """The file an index stores for ``item_id`` (never a path from the request), typed from its first bytes; 404
    naming the id for an unknown one, and for a file gone from the server (logged with its path)."""
    path = files.get(item_id)
    if path is None:
        raise HTTPException(404, f"index {index!r} has no {what} with id {item_id!r}")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        log.warning("%s %r in index %r is missing or unreadable: %s", what, item_id, index, path)
        raise HTTPException(404, f"the {what} {item_id!r} in index {index!r} is missing on the server") from None
    return FileResponse(path, media_type=media_type(head),
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=3600"})


def _image_type(head: bytes) -> str:
    for magic, media in _IMAGE_TYPES:
        if head.startswith(magic):
            return media
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


class _MetricsMiddleware:
    """Counts every request by route template, method and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(route, scope.get("method", ""), status, time.perf_counter() - start)


def image_paths_missing(app: FastAPI) -> dict[str, list[str]]:
    """Ids whose image file is missing, by index (checked when the service starts, to warn early)."""
    state: _State = app.state.vgskit
    return {name: [item for item, path in entry.files.items() if not Path(path).is_file()]
            for name, entry in state.indices.items()}
