"""The search service: a FastAPI application over one model and one or more saved search indices.

Routes (OpenAPI documentation at ``/docs`` and ``/openapi.json``):

``POST /search?k=5&index=NAME``
    A spoken query, either as a ``multipart/form-data`` upload in the field ``audio`` (WAV, FLAC or Ogg at
    any sample rate and channel count; the format is read from the content) or as a JSON body
    ``{"embedding": [...]}`` holding a query embedding computed elsewhere (the model's pooled speech
    embedding, :meth:`SearchEngine.embed_audio`). Answers ``{"index", "k", "hits": [{"rank", "id", "score",
    "image_url"}], "timing_ms": {"decode", "resample", "encode", "search"}}``.
``GET /images/{index}/{id}``
    The image file of a gallery id, looked up in the index: the request names an id, never a path.
``GET /indices``
    Every index served: name, image count, embedding width, the identity of the model that built it.
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
from collections.abc import AsyncGenerator, Mapping
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
from vgskit.serve.decode import ACCEPTED, QueryRejected, decode_query
from vgskit.serve.limits import ServeLimits
from vgskit.serve.metrics import CONTENT_TYPE, STAGES, Metrics
from vgskit.serve.page import mount_page

log = logging.getLogger("vgskit.serve")

AUDIO_FIELD = "audio"
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
            "type": "object", "required": ["embedding"],
            "properties": {"embedding": {"type": "array", "items": {"type": "number"},
                                         "description": "a pooled query embedding of the index's width"}}}},
    },
}


@dataclass
class _Index:
    name: str
    engine: SearchEngine
    files: dict[str, str]  # id -> absolute image path, fixed when the service starts


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
        served[name] = _Index(name, engine, files)
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
                     ) -> dict[str, Any]:
        entry = _index_or_404(state, index or state.default)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in ("multipart/form-data", "application/json"):
            raise HTTPException(415, f"send the query as multipart/form-data (audio file in the field "
                                     f"{AUDIO_FIELD!r}) or as application/json ({{\"embedding\": [...]}}); got "
                                     f"{media or 'no content type'!r}")
        _check_content_length(request, limits.max_upload_bytes)
        body = _limited_stream(request, limits.max_upload_bytes)
        if media == "application/json":
            audio, vector = None, _parse_embedding(await _collect(body), entry)
        else:
            audio, vector = await _read_audio_field(request, body), None
        if state.active >= limits.max_concurrent_searches:
            raise HTTPException(503, f"busy: {limits.max_concurrent_searches} searches are already running "
                                     f"(max_concurrent_searches); retry in {limits.retry_after_s} s",
                                headers={"Retry-After": str(limits.retry_after_s)})
        state.active += 1
        try:
            hits, timing = await run_in_threadpool(_run_search, state, entry, audio, vector, k)
        finally:
            state.active -= 1
        state.metrics.observe_stages({s: timing[s] for s in STAGES if not (audio is None and s != "search")})
        root = request.scope.get("root_path", "").rstrip("/")
        return {
            "index": entry.name, "k": k,
            "hits": [{"rank": rank, "id": item, "score": score,
                      "image_url": f"{root}/images/{quote(entry.name, safe='')}/{quote(item, safe='')}"}
                     for rank, (item, score) in enumerate(hits, start=1)],
            "timing_ms": {s: round(timing[s] * 1000.0, 3) for s in STAGES},
        }

    @app.get("/images/{index}/{item_id:path}", summary="The image file of a gallery id")
    async def image(index: str, item_id: str) -> FileResponse:
        entry = _index_or_404(state, index)
        path = entry.files.get(item_id)
        if path is None:
            raise HTTPException(404, f"index {entry.name!r} has no image with id {item_id!r}")
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError:
            log.warning("image of id %r in index %r is missing or unreadable: %s", item_id, entry.name, path)
            raise HTTPException(404, f"the image of id {item_id!r} in index {entry.name!r} is missing on the server"
                                ) from None
        return FileResponse(path, media_type=_image_type(head),
                            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=3600"})

    @app.get("/indices", summary="The indices served")
    async def list_indices() -> dict[str, Any]:
        return {"default": state.default, "indices": [
            {"name": e.name, "count": len(e.engine.image_ids), "embed_dim": int(e.engine.image_emb.shape[1]),
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
    parser = MultiPartParser(request.headers, body, max_files=1, max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise HTTPException(422, f"malformed multipart body: {exc.message}") from None
    try:
        field = form.get(AUDIO_FIELD)
        if not isinstance(field, UploadFile):
            got = ", ".join(repr(key) for key in form.keys()) or "none"
            what = "a text value, not a file" if field is not None else f"missing (fields sent: {got})"
            raise HTTPException(422, f"expected the spoken query as a file in the multipart field {AUDIO_FIELD!r}: "
                                     f"{what}")
        return await field.read()
    finally:
        await form.close()


def _parse_embedding(raw: bytes, entry: _Index) -> torch.Tensor:
    width = int(entry.engine.image_emb.shape[1])
    expected = f"expected a JSON object {{\"embedding\": [{width} numbers]}}"
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(422, f"the body is not valid JSON ({exc}); {expected}") from None
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


def _run_search(state: _State, entry: _Index, audio: bytes | None, vector: torch.Tensor | None,
                k: int) -> tuple[list[tuple[str, float]], dict[str, float]]:
    """Decode, resample, encode and rank (in a worker thread); the hits as (id, score) and each stage's time."""
    timing = dict.fromkeys(STAGES, 0.0)
    engine = entry.engine
    if audio is not None:
        query = decode_query(audio, sample_rate=state.sample_rate, max_seconds=state.limits.max_audio_seconds)
        timing["decode"], timing["resample"] = query.decode_s, query.resample_s
        t0 = time.perf_counter()
        try:
            vector = engine.embed_query(query.wav).pooled[0]
        except VGSKitError as err:  # too short for the speech encoder, ...
            raise QueryRejected(422, f"audio upload: {err}") from err
        timing["encode"] = time.perf_counter() - t0
    assert vector is not None
    t0 = time.perf_counter()
    with torch.inference_mode():
        scores = engine.image_emb @ vector
        top = torch.topk(scores, min(k, scores.shape[0]))
    hits = [(engine.image_ids[j], float(s)) for s, j in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
    timing["search"] = time.perf_counter() - t0
    return hits, timing


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
