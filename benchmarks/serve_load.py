"""Load and scan benchmark of the search service and the index kinds (loopback only, bounded in requests and time).

1. A real ``vgskit serve`` process (uvicorn, 127.0.0.1) over a 5k and a 1M synthetic gallery of the tiny model's
   width; ``--clients`` concurrent clients send JSON query embeddings (and a share of WAV uploads to the 5k index):
   p50/p99 latency, throughput, errors (must be 0), the server's peak RSS.
2. ``overhead``: what the server adds around the model and the scan for a 3 s spoken query against a 5k gallery
   of the demo's dual encoder, per stage (see :func:`overhead_part`).
3. In process: the exact scan of a 1M x 256 float32 gallery against the memory read bandwidth measured in the same
   run, a 64-query batch as one GEMM, fp32 vs bf16 gallery (time and top-10 overlap).
4. The approximate index at 1M x 512 on clustered unit vectors (``index_kind="auto"``): build time, ms/query and
   recall@10 against exact search (a GEMM over the whole gallery).
5. ``ann_trained``: the same on embeddings with real structure: a trained model (``--checkpoint``, e.g. the demo's
   run) embeds ``--gallery-rows`` newly generated spoken-scenes images (rendered in memory, the test split's
   Fashion-MNIST pictures, a seed the corpus does not use), and the queries are its speech embeddings of the
   corpus's spoken test captions (``--manifest``): recall@10 of the approximate index against exact search over
   the whole gallery, ms per single query, build time. The index is tuned on the validation split's spoken
   captions (the query modality, none of them measured). The rendered gallery's embeddings are kept in
   ``--work-dir`` (keyed by checkpoint and size), so a rerun only rebuilds the index.

Run: ``OMP_NUM_THREADS=2 python benchmarks/serve_load.py`` (prints and writes benchmarks/results/serve_load.json);
``--parts overhead,scan`` reruns some parts and keeps the others' results in the JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgskit.models.registry import create_model, save_pretrained
from vgskit.retrieval.engine import SearchEngine

ROOT = Path(__file__).resolve().parent


def clustered(n: int, d: int, *, clusters: int = 1000, seed: int = 0, spread: float = 0.35) -> np.ndarray:
    """Unit vectors around random centres (fixed centres; ``seed`` draws the points), in chunks (bounded memory)."""
    centres = np.random.default_rng(12345).standard_normal((clusters, d)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = centres[rng.integers(0, clusters, m)] + spread * rng.standard_normal((m, d), dtype=np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def best_of(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / a.shape[1] for x, y in zip(a, b, strict=True)]))


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_test(port: int, index: str, dim: int, *, clients: int, requests: int, seconds: float,
              audio: bytes | None) -> dict:
    import httpx

    rng = np.random.default_rng(1)
    queries = [rng.standard_normal(dim).astype(np.float32).tolist() for _ in range(64)]
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = {"n": 0}
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as c:
            while True:
                with lock:
                    if counter["n"] >= requests or time.perf_counter() > deadline:
                        return
                    counter["n"] += 1
                    n = counter["n"]
                t0 = time.perf_counter()
                try:
                    if audio is not None and n % 10 == 0:  # one request in ten is a WAV upload
                        r = c.post("/search", params={"index": index, "k": 10},
                                   files={"audio": ("q.wav", audio, "audio/wav")})
                    else:
                        r = c.post("/search", params={"index": index, "k": 10}, json={"embedding": queries[n % 64]})
                    ok = r.status_code == 200
                    if not ok:
                        raise RuntimeError(f"{r.status_code} {r.text[:100]}")
                except Exception as e:  # noqa: BLE001 - every failure counts as an error
                    with lock:
                        errors.append(str(e))
                    continue
                with lock:
                    lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat or [float("nan")]) * 1000
    return {"index": index, "clients": clients, "requests": len(lat) + len(errors), "errors": len(errors),
            "error_examples": errors[:3], "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "throughput_rps": round(len(lat) / wall, 1),
            "wall_s": round(wall, 1)}


def serve_part(args: argparse.Namespace, tmp: Path) -> dict:
    import soundfile as sf

    torch.manual_seed(0)
    model = create_model("dual_encoder_tiny").eval()
    dim = model.embed_dim
    ckpt = save_pretrained(model, tmp / "model")
    out = {}
    for name, n in (("g5k", 5_000), ("g1m", 1_000_000)):
        emb = torch.from_numpy(clustered(n, dim, seed=2))
        ids = [f"{name}-{i}" for i in range(n)]
        SearchEngine(model, emb, ids, [f"/synthetic/{i}.png" for i in ids], index_kind="exact").save(tmp / name)
        del emb, ids
    t = np.arange(32000) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="WAV")
    start = time.perf_counter()
    proc, port, log = start_server(tmp, ckpt, {"g5k": tmp / "g5k", "g1m": tmp / "g1m"}, "--max-concurrent", "64",
                                   "--max-connections", "512")
    try:
        out["startup_s"] = round(time.perf_counter() - start, 1)
        out["g5k"] = load_test(port, "g5k", dim, clients=args.clients, requests=args.requests, seconds=60,
                               audio=buf.getvalue())
        out["g1m"] = load_test(port, "g1m", dim, clients=args.clients, requests=args.requests // 2, seconds=60,
                               audio=None)
        out["server_peak_rss_mb"] = round(peak_rss_mb(proc.pid), 1)
    finally:
        stop_server(proc, log)
    out["galleries"] = {"g5k": f"5,000 x {dim}", "g1m": f"1,000,000 x {dim}",
                        "data": "clustered synthetic unit vectors (1000 centres), the tiny model's width"}
    return out


def start_server(tmp: Path, ckpt: Path, indices: dict[str, Path], *extra: str) -> tuple[subprocess.Popen, int, Any]:
    """A ``vgskit serve`` process on a free loopback port, once ``/healthz`` answers (its log goes to a file: an
    unread pipe fills up and blocks the server on its next log line)."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "vgskit.cli", "serve", "--checkpoint", str(ckpt), "--port", str(port), *extra]
    for name, folder in indices.items():
        cmd += ["--index", f"{name}={folder}"]
    log = open(tmp / f"serve-{port}.log", "w")  # noqa: SIM115 - closed by stop_server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    start = time.perf_counter()
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc, port, log
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.perf_counter() - start > 120:
            stop_server(proc, log)
            raise RuntimeError(f"vgskit serve did not start: {(tmp / f'serve-{port}.log').read_text()[-2000:]}")
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen, log: Any) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
    log.close()


def overhead_part(tmp: Path, requests: int = 200) -> dict:
    """What the server adds around the model and the scan, for a 3 s spoken query against a 5k gallery.

    The model is the demo's dual encoder (the ``demo`` recipe's architecture: 96-px images, max pooling) with
    random weights (a forward costs the same whatever the weights); the gallery is 5,000 clustered unit vectors
    at its width. One client sends the same 3 s, 16 kHz mono WAV ``requests`` times, one at a time (no queueing),
    and reads the server's own per-stage times from each response (``timing_ms``: decode, resample, encode,
    search). The overhead of a request is its client-side latency minus the encoder and the scan: upload,
    multipart parsing, decoding, resampling, the framework and the loopback round trip.
    """
    import httpx
    import soundfile as sf

    torch.manual_seed(0)
    model = create_model("dual_encoder", image={"image_size": 96}, image_pool="max").eval()
    ckpt = save_pretrained(model, tmp / "demo_model")
    n, dim = 5_000, model.embed_dim
    ids = [f"img-{i}" for i in range(n)]
    SearchEngine(model, torch.from_numpy(clustered(n, dim, seed=7)), ids, [f"/synthetic/{i}.png" for i in ids],
                 index_kind="exact").save(tmp / "g5k_demo")
    rng = np.random.default_rng(0)
    t = np.arange(48000) / 16000  # 3 s at 16 kHz: the demo's captions are 2-5 s
    wav = (0.2 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
           + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wav, 16000, format="WAV", subtype="PCM_16")
    audio = buf.getvalue()
    proc, port, log = start_server(tmp, ckpt, {"g5k": tmp / "g5k_demo"})
    rows = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as c:
            for i in range(requests + 10):
                t0 = time.perf_counter()
                r = c.post("/search", params={"index": "g5k", "k": 10}, files={"audio": ("q.wav", audio, "audio/wav")})
                total_ms = (time.perf_counter() - t0) * 1000
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code} {r.text[:200]}")
                if i >= 10:  # warm-up requests are not counted
                    timing = r.json()["timing_ms"]
                    rows.append({"total": total_ms, **timing,
                                 "overhead": total_ms - timing["encode"] - timing["search"]})
            # The floor under any request: an empty route's round trip through the client, loopback and framework.
            floor = []
            for i in range(requests + 10):
                t0 = time.perf_counter()
                c.get("/healthz")
                if i >= 10:
                    floor.append((time.perf_counter() - t0) * 1000)
    finally:
        stop_server(proc, log)
    p50 = {k: round(float(np.median([row[k] for row in rows])), 3) for k in rows[0]}
    p99 = {k: round(float(np.percentile([row[k] for row in rows], 99)), 3) for k in rows[0]}
    return {"model": "dual_encoder (demo recipe architecture, random weights)", "gallery": f"{n} x {dim} exact",
            "query": "3 s, 16 kHz mono 16-bit WAV (96 KiB upload)", "requests": len(rows),
            "p50_ms": p50, "p99_ms": p99, "healthz_round_trip_p50_ms": round(float(np.median(floor)), 3),
            "note": "overhead = client latency - encode - search (upload, parsing, decode, resample, framework)"}


def scan_part() -> dict:
    n, d = 1_000_000, 256
    g = torch.from_numpy(clustered(n, d, seed=3))
    q = torch.from_numpy(clustered(64, d, seed=4))
    gbytes = g.numel() * 4
    read_s = best_of(lambda: torch.sum(g))  # one read of every byte, the bound a scan cannot beat
    mv_s = best_of(lambda: torch.topk(torch.mv(g, q[0]), 10))
    mv_only_s = best_of(lambda: torch.mv(g, q[0]))
    gemm_s = best_of(lambda: torch.topk(q @ g.T, 10, dim=1), 3)
    ids = [str(i) for i in range(n)]
    model = create_model("dual_encoder_tiny", embed_dim=d).eval()
    e32 = SearchEngine(model, g, ids, ids, index_kind="exact")
    e16 = SearchEngine(model, g, ids, ids, index_kind="exact", gallery_dtype="bf16")
    t32 = best_of(lambda: e32.search_batch(q, 10), 3)
    t16 = best_of(lambda: e16.search_batch(q, 10), 3)
    r32, r16 = e32.search_batch(q, 10)[1], e16.search_batch(q, 10)[1]
    single = best_of(lambda: e32.search_by_embedding(q[0], k=10))
    scan_s = best_of(lambda: e32._coarse(q[0], 10))  # the engine's exact scan + top-10, without result objects
    return {
        "gallery": f"{n} x {d} float32 ({gbytes / 2**20:.0f} MiB), clustered synthetic",
        "read_bandwidth_gb_s": round(gbytes / read_s / 1e9, 2),
        "bandwidth_bound_ms": round(read_s * 1000, 2),
        "torch_mv_ms": round(mv_only_s * 1000, 2),
        "torch_mv_topk10_ms": round(mv_s * 1000, 2),
        "torch_mv_vs_bandwidth_ratio": round(read_s / mv_only_s, 2),
        "engine_scan_topk10_ms": round(scan_s * 1000, 2),
        "engine_single_query_ms": round(single * 1000, 2),
        "scan_vs_bandwidth_ratio": round(read_s / scan_s, 2),
        "batch64_gemm_topk_ms": round(gemm_s * 1000, 2),
        "batch64_per_query_ms": round(gemm_s * 1000 / 64, 3),
        "engine_batch64_fp32_ms": round(t32 * 1000, 2),
        "engine_batch64_bf16_ms": round(t16 * 1000, 2),
        "bf16_top10_overlap_with_fp32": round(overlap(r16, r32), 4),
    }


def ann_part(n: int) -> dict:
    d = 512
    x = clustered(n, d, clusters=2000, seed=5, spread=0.6)
    q = clustered(200, d, clusters=2000, seed=6, spread=0.6)
    model = create_model("dual_encoder_tiny", embed_dim=d).eval()
    ids = [str(i) for i in range(n)]
    t0 = time.perf_counter()
    engine = SearchEngine(model, torch.from_numpy(x), ids, ids, index_kind="auto", memory_budget_mb=1024)
    build_s = time.perf_counter() - t0
    gq = torch.from_numpy(q)
    t0 = time.perf_counter()
    truth = torch.topk(gq @ torch.from_numpy(x).T, 10, dim=1).indices
    exact_ms = (time.perf_counter() - t0) * 1000 / q.shape[0]
    found = []
    t0 = time.perf_counter()
    for i in range(q.shape[0]):
        hits = engine.search_by_embedding(gq[i], k=10)
        found.append([int(h.item_id) for h in hits])
    per_query = (time.perf_counter() - t0) * 1000 / q.shape[0]
    return {"gallery": f"{n} x {d} float32, clustered synthetic unit vectors (2000 centres, noise 0.6)",
            "kind": engine.index_kind, "params": engine.index_info["params"],
            "build_s": round(build_s, 1), "build_recall_at_10": engine.index_info["recall_at_10"],
            "ms_per_query": round(per_query, 3), "recall_at_10_vs_exact": round(overlap(torch.tensor(found), truth), 4),
            "exact_batched_ms_per_query": round(exact_ms, 2), "queries": int(q.shape[0])}


GALLERY_SEED = 9_000_001  # not a seed of any corpus preset, so no gallery scene is a corpus scene by construction


def _render_chunk(task: tuple[int, int, int]) -> np.ndarray:
    """Rendered scenes ``[m, S, S, 3]`` uint8 for gallery rows ``start .. start + m`` (a worker process)."""
    from vgskit.data import synthetic as sy

    start, m, size = task
    images, labels = sy._load_fashion_mnist("t10k")
    pools = sy._instance_pools("t10k", labels, "test")
    config = sy.SpokenScenesConfig(num_train=0, num_val=0, num_test=1, image_size=size)
    out = np.empty((m, size, size, 3), dtype=np.uint8)
    for i in range(m):
        row = start + i
        rng = np.random.default_rng([GALLERY_SEED, row])
        scene = sy._sample_scene(rng, config, pools)
        glyphs = [images[o["fmnist_index"]] for o in scene["objects"]]
        out[i] = np.asarray(sy._render(scene, glyphs, size, [GALLERY_SEED, row, 7]))
    return out


def trained_gallery(model: Any, rows: int, work_dir: Path, checkpoint: Path, chunk: int = 4096) -> np.ndarray:
    """``[rows, D]`` float32 image embeddings of newly rendered scenes, cached (and resumed) in ``work_dir``."""
    import hashlib
    import multiprocessing as mp

    from tqdm import tqdm

    from vgskit.contract import ImageInputs
    from vgskit.fileio import write_text_atomic
    from vgskit.images import ImageTransform
    from vgskit.precision import autocast, resolve_precision
    from vgskit.train.checkpoint import resolve_model_folder

    # Keyed by the weights themselves, so a model retrained into the same folder never reuses stale embeddings.
    weights = Path(resolve_model_folder(checkpoint)) / "model.safetensors"
    tag = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f"gallery_{tag}_{rows}x{model.embed_dim}.f32"
    done_path = path.with_suffix(".done")
    done = int(done_path.read_text()) if done_path.is_file() else 0
    emb = np.memmap(path, dtype=np.float32, mode="r+" if path.is_file() else "w+", shape=(rows, model.embed_dim))
    transform = ImageTransform.from_json(dict(model.image_transform))
    size = int(transform.size)
    mean = torch.tensor(transform.mean).view(1, 3, 1, 1)
    std = torch.tensor(transform.std).view(1, 3, 1, 1)
    precision = resolve_precision("bf16")  # fp32 where the CPU has no native bf16
    tasks = [(s, min(chunk, rows - s), size) for s in range(done, rows, chunk)]
    bar = tqdm(total=rows, initial=done, desc="gallery (render + embed)", unit="image")
    # One process renders the next chunk while this one embeds the current one.
    with mp.get_context("spawn").Pool(1) as pool, torch.no_grad():
        for (start, m, _), pixels in zip(tasks, pool.imap(_render_chunk, tasks), strict=True):
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
            x = (x - mean) / std  # the model's normalisation; scenes are rendered at its input size
            for b in range(0, m, 256):
                with autocast(precision):
                    e = model.embed_image(ImageInputs.from_pixels(x[b:b + 256])).pooled
                e = torch.nn.functional.normalize(e.float(), dim=-1)
                emb[start + b:start + b + e.shape[0]] = e.numpy()
            emb.flush()  # the rows on disk first, then the marker that counts them (replaced atomically)
            write_text_atomic(done_path, str(start + m))
            bar.update(m)
    bar.close()
    return np.asarray(emb)


def ann_trained_part(checkpoint: Path, manifest: Path, rows: int, work_dir: Path) -> dict:
    from vgskit.experiment import load_model, make_dataset
    from vgskit.retrieval.evaluate import embed_speech

    model = load_model(checkpoint).eval()
    test = make_dataset(manifest, "test", model.image_transform, max_seconds=None, preload=True, progress=False)
    queries = embed_speech(model, test, precision="bf16").pooled.float()
    queries = torch.nn.functional.normalize(queries, dim=-1)
    # The index is tuned on spoken queries too, but on the validation split's captions: none of them is measured.
    val = make_dataset(manifest, "val", model.image_transform, max_seconds=None, preload=True, progress=False)
    tuning = torch.nn.functional.normalize(embed_speech(model, val, precision="bf16").pooled.float(), dim=-1)
    t0 = time.perf_counter()
    x = trained_gallery(model, rows, work_dir, Path(checkpoint))
    gallery_s = time.perf_counter() - t0
    ids = [str(i) for i in range(rows)]
    t0 = time.perf_counter()
    engine = SearchEngine(model, torch.from_numpy(x), ids, ids, index_kind="auto", memory_budget_mb=1024,
                          tuning_queries=tuning)
    build_s = time.perf_counter() - t0
    g = torch.from_numpy(x)
    from vgskit.retrieval.ann import exact_topk

    t0 = time.perf_counter()
    truth = exact_topk(g, queries, 10)
    exact_ms = (time.perf_counter() - t0) * 1000 / queries.shape[0]
    found = []
    t0 = time.perf_counter()
    for i in range(queries.shape[0]):
        found.append([int(h.item_id) for h in engine.search_by_embedding(queries[i], k=10)])
    per_query = (time.perf_counter() - t0) * 1000 / queries.shape[0]
    return {"gallery": f"{rows} x {x.shape[1]} image embeddings of newly rendered spoken-scenes images, model {checkpoint}",
            "queries": f"{queries.shape[0]} speech embeddings of the spoken test captions of {manifest}",
            "gallery_embed_s": round(gallery_s, 1), "kind": engine.index_kind, "params": engine.index_info["params"],
            "build_s": round(build_s, 1), "build_recall_at_10": engine.index_info["recall_at_10"],
            "build_recall_queries": (f"{engine.index_info['recall_queries']} spoken validation captions"
                                     if "recall_queries" in engine.index_info else "none (exact index)"),
            "ms_per_query": round(per_query, 3), "recall_at_10_vs_exact": round(overlap(torch.tensor(found), truth), 4),
            "exact_batched_ms_per_query": round(exact_ms, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--ann-rows", type=int, default=1_000_000)
    p.add_argument("--out", default=str(ROOT / "results" / "serve_load.json"))
    p.add_argument("--checkpoint", default="runs/demo", help="ann_trained: the trained model (a run folder)")
    p.add_argument("--manifest", default=None,
                   help="ann_trained: the corpus whose spoken test captions are the queries (default: the demo's)")
    p.add_argument("--gallery-rows", type=int, default=1_000_000, help="ann_trained: generated gallery size")
    p.add_argument("--work-dir", default=None, help="ann_trained: where the gallery embeddings are kept "
                   "(default: $VGSKIT_CACHE or ~/.cache/vgskit, under bench/)")
    p.add_argument("--parts", default="serve,overhead,scan,ann",
                   help="comma-separated parts to run; the others keep their results from an existing --out file")
    args = p.parse_args()
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - {"serve", "overhead", "scan", "ann", "ann_trained"})
    if unknown:
        p.error(f"--parts: unknown part(s) {unknown}; choose from serve, overhead, scan, ann, ann_trained")
    out = Path(args.out)
    result: dict = json.loads(out.read_text()) if out.is_file() else {}
    result.update(threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
    out.parent.mkdir(parents=True, exist_ok=True)
    for part in parts:  # each part's result is written as soon as it is known
        t0 = time.perf_counter()
        if part == "serve":
            with tempfile.TemporaryDirectory() as tmp:
                result["serve"] = serve_part(args, Path(tmp))
        elif part == "overhead":
            with tempfile.TemporaryDirectory() as tmp:
                result["overhead"] = overhead_part(Path(tmp))
        elif part == "scan":
            result["scan"] = scan_part()
        elif part == "ann_trained":
            from vgskit.data.synthetic import default_cache_dir, preset_dir

            manifest = Path(args.manifest) if args.manifest else preset_dir("demo") / "manifest.jsonl"
            work = Path(args.work_dir) if args.work_dir else default_cache_dir() / "bench"
            result["ann_trained"] = ann_trained_part(Path(args.checkpoint), manifest, args.gallery_rows, work)
        else:
            result["ann"] = ann_part(args.ann_rows)
        result[part]["part_s"] = round(time.perf_counter() - t0, 1)
        result[part]["load_1min_after"] = round(os.getloadavg()[0], 2)
        print(json.dumps(result[part], indent=2), flush=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
