"""SpeechCLIP training throughput (samples/s): frozen towers run every step vs read from the feature cache.

Two sizes, each with the parallel and the cascaded branch:

* ``tiny``: a 2-layer, 32-wide HuBERT-shaped speech tower (50 frames/s) and a 1-layer, 32-wide CLIP;
* ``base``: the paper's base towers, ``transformers.HubertConfig()`` (HuBERT Base: 12 layers, 768 wide) and
  ``transformers.CLIPConfig()`` (CLIP ViT-B/32 vision + 512-wide text), with the base preset's branches
  (:func:`vgskit.models.speechclip.speechclip_preset`) and a keyword vocabulary of 8,112 CLIP ids (the size
  of Flickr8k's).

The towers have **random weights**, saved locally with ``save_pretrained`` (nothing is downloaded): the
architecture, hence the compute per step, is that of the pretrained checkpoints; only the numbers they
compute differ. The corpus is generated into a temporary folder: noise WAVs of ``--seconds`` seconds (longer
than SpeechCLIP's 6.4 s training crop, so every caption is cropped to exactly 102,400 samples, the most
compute a training caption can cost) and one random PNG per caption (captions_per_image 1, as the paper's
recipes).

A training step is what :class:`vgskit.train.loop.Trainer` does: batch to the device, forward, backward,
gradient clipping at 4, an Adam step (lr 1e-4, weight decay 1e-6 on matrices); fp32 unless ``--amp``.

* ``live``: batches of raw waveforms and pixels (:class:`SpokenCaptionDataset`, preloaded as training with
  ``preload: true`` does, + :func:`collate_spoken_captions`) through the real frozen towers;
* ``cache``: the path ``train_from_recipe`` takes with ``data.feature_cache``: the caches are filled by
  :func:`vgskit.experiment.prepare_feature_caches` (i.e. :func:`vgskit.data.cache.extract`: every hidden state
  of the speech tower in float16, the pooled CLIP image embedding), read back through
  :class:`CachedSpokenCaptionDataset` + :func:`collate_cached_captions` from the memory-mapped files, and
  the towers are swapped for :class:`CachedSpeechEncoder` / :class:`CachedImageEncoder` by
  :class:`CachedTowers`. Extraction is timed on its own (it is paid once per corpus).

Data loading (``next(loader)``) and the step are timed separately; samples/s is batch size over the sum of
their medians over the timed steps (robust to a step slowed by other work; the means are in the JSON too,
with the process's CPU time per wall second while timed, about the thread count on free cores). Warm-up steps
are excluded. Each run (and each extraction) is a fresh process, so that its peak resident memory is its
own; ``peak_rss_mib`` is the peak while training (``VmHWM``, reset after setup), ``process_peak_rss_mib``
includes loading the towers. The cache files are small enough to stay in the page cache, so reading them
costs memory copies, not disk reads.

    python benchmarks/speechclip_throughput.py              # writes benchmarks/results/speechclip_throughput.json
    python benchmarks/speechclip_throughput.py --quick      # tiny config only, a few seconds, in one process
    python benchmarks/speechclip_throughput.py --configs base --base-batch-size 16 --live-steps 5
    python benchmarks/speechclip_throughput.py --device cuda --amp --base-batch-size 64 --files 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _memory import peak_rss_mib, reset_peak_rss  # benchmarks/_memory.py (the script's folder is on sys.path)

SAMPLE_RATE = 16000
CROP_SECONDS = 6.4  # SpeechCLIP's training crop: 102,400 samples
GRAD_CLIP = 4.0  # the paper recipes' gradient clipping
LR, WEIGHT_DECAY = 1e-4, 1e-6  # the paper recipes' Adam settings
FLICKR8K_VOCAB = 8112  # keyword vocabulary of the reference Flickr8k models
CONFIGS = ("tiny", "base")
BRANCHES = ("parallel", "cascaded", "both")
MODES = ("live", "cache")
WEIGHTS_NOTE = (
    "random weights (saved locally, nothing downloaded): same architectures, hence the same compute per step, "
    "as the pretrained HuBERT / CLIP checkpoints"
)

# Tiny towers: a HuBERT-shaped speech tower with a fourth stride-4 convolution (50 frames/s, as HuBERT).
TINY_HUBERT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    conv_dim=(16,) * 4, conv_stride=(5, 4, 4, 4), conv_kernel=(10, 4, 4, 4),
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
)
TINY_CLIP_WIDTH, TINY_CLIP_VOCAB, TINY_IMAGE = 32, 512, 32


# ---------------------------------------------------------------------------------------------------------
# Memory and machine
# ---------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_model(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# ---------------------------------------------------------------------------------------------------------
# Towers and corpus (random weights, generated files)
# ---------------------------------------------------------------------------------------------------------


def write_towers(folder: Path, size: str, seed: int) -> dict[str, str]:
    """Save a randomly initialised HuBERT and CLIP of ``size`` (with their preprocessing configs) under ``folder``."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        HubertConfig,
        HubertModel,
        Wav2Vec2FeatureExtractor,
    )

    torch.manual_seed(seed)
    hubert, clip = folder / f"{size}-hubert", folder / f"{size}-clip"
    if size == "base":
        speech_cfg, clip_cfg = HubertConfig(), CLIPConfig()
        processor = CLIPImageProcessor()  # 224 px, CLIP's statistics
    else:
        w = TINY_CLIP_WIDTH
        layer = dict(hidden_size=w, intermediate_size=2 * w, num_hidden_layers=1, num_attention_heads=2)
        text = dict(layer, vocab_size=TINY_CLIP_VOCAB, max_position_embeddings=24,
                    bos_token_id=TINY_CLIP_VOCAB - 2, eos_token_id=TINY_CLIP_VOCAB - 1)
        speech_cfg = HubertConfig(**TINY_HUBERT)
        clip_cfg = CLIPConfig(text_config=text, vision_config=dict(layer, image_size=TINY_IMAGE, patch_size=8),
                              projection_dim=16)
        processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE},
                                       crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE})
    model: torch.nn.Module = HubertModel(speech_cfg).eval()
    model.save_pretrained(hubert)
    # HuBERT Base was trained on raw (unnormalised) waveforms.
    Wav2Vec2FeatureExtractor(sampling_rate=SAMPLE_RATE, do_normalize=False).save_pretrained(hubert)
    del model
    model = CLIPModel(clip_cfg).eval()
    model.save_pretrained(clip)
    processor.save_pretrained(clip)
    vocab = int(clip_cfg.text_config.vocab_size)
    del model
    return {"hubert": str(hubert), "clip": str(clip), "text_vocab": vocab}  # type: ignore[dict-item]


def write_corpus(folder: Path, n: int, seconds: float, seed: int) -> Path:
    """``n`` noise WAVs of ``seconds`` s and ``n`` random 320x240 PNGs (one image per caption); the manifest."""
    import soundfile as sf
    from PIL import Image

    from vgskit.data.manifest import Record, write_manifest

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        wav = np.clip(0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE)), -1, 1).astype(np.float32)
        audio, image = folder / f"utt{i:04d}.wav", folder / f"img{i:04d}.png"
        sf.write(audio, wav, SAMPLE_RATE, subtype="PCM_16")
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(image)
        records.append(Record(f"c{i}", str(audio), str(image), f"img{i}", "train"))
    return write_manifest(records, folder / "manifest.jsonl")


# ---------------------------------------------------------------------------------------------------------
# Jobs (each normally in its own process)
# ---------------------------------------------------------------------------------------------------------


def build_model(spec: dict[str, Any], branches: str) -> Any:
    """SpeechCLIP with the base preset's branch settings on the saved random towers."""
    from vgskit.encoders.pretrained_image import PretrainedImageConfig
    from vgskit.encoders.text import ClipTextConfig
    from vgskit.models.speechclip import SpeechCLIP, speechclip_preset

    preset = speechclip_preset("base", branches)  # type: ignore[arg-type]
    vocab_size, keyword_vocab = int(spec["text_vocab"]), None
    if 0 < spec["keyword_vocab"] < vocab_size:
        # Any ids will do for throughput: padding id 0 and SOT/EOT (the last two) as in a caption vocabulary.
        rng = np.random.default_rng(spec["seed"])
        chosen = rng.choice(np.arange(1, vocab_size - 2), size=spec["keyword_vocab"] - 3, replace=False)
        keyword_vocab = sorted({0, vocab_size - 2, vocab_size - 1, *(int(i) for i in chosen)})
    parallel = preset.parallel
    if spec["size"] == "tiny":
        parallel = replace(parallel, num_heads=2, ffn_dim=2 * TINY_CLIP_WIDTH)
    config = replace(
        preset,
        speech=replace(preset.speech, name_or_path=spec["hubert"], local_files_only=True),
        image=PretrainedImageConfig(spec["clip"], local_files_only=True),
        text=ClipTextConfig(spec["clip"], local_files_only=True),
        parallel=parallel,
        keyword_vocab=keyword_vocab,
    )
    torch.manual_seed(spec["seed"])
    return SpeechCLIP(config)


def data_config(spec: dict[str, Any], towers: list[str] | None = None) -> Any:
    from vgskit.experiment import DataConfig

    return DataConfig(manifest=spec["manifest"], train_max_seconds=CROP_SECONDS, train_crop="head",
                      captions_per_image=1, feature_cache=spec["cache_root"], feature_cache_towers=towers,
                      feature_cache_batch_size=spec["extract_batch_size"])


def extract_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Fill the speech and image caches as ``vgskit train`` does (:func:`prepare_feature_caches`), timed per tower."""
    from vgskit.data.manifest import read_manifest
    from vgskit.experiment import prepare_feature_caches

    model = build_model(spec, "parallel")  # every branch has the same frozen towers, hence the same caches
    records = read_manifest(spec["manifest"], split="train")
    result: dict[str, Any] = {"files": len(records)}
    for kind in ("speech", "image"):
        sync(spec["device"])
        start = time.perf_counter()
        caches, summary = prepare_feature_caches(model, data_config(spec, [kind]), records, device=spec["device"],
                                                 progress=False)
        sync(spec["device"])
        seconds = time.perf_counter() - start
        cache = caches[kind]
        first = cache.key_for(records[0].audio if kind == "speech" else records[0].image)
        result[kind] = {
            "seconds": round(seconds, 3),
            "files_per_s": round(summary[kind]["extracted"] / seconds, 2),
            "extracted": summary[kind]["extracted"],
            "item_shapes": {k: list(v) for k, v in cache.shapes(first).items()},
            "mib": round(sum(f.stat().st_size for f in cache.folder.glob("*.bin")) / 2**20, 2),
        }
    result["process_peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forever(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def train_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Time ``warmup + steps`` training steps of one (size, branch, mode)."""
    from torch.utils.data import DataLoader

    from vgskit.contract import Batch, TrainState
    from vgskit.data.cache import CachedSpokenCaptionDataset, CachedTowers, collate_cached_captions
    from vgskit.data.loader import collate_spoken_captions
    from vgskit.data.manifest import read_manifest
    from vgskit.experiment import make_dataset, prepare_feature_caches
    from vgskit.train.loop import move_to_device

    device = torch.device(spec["device"])
    model = build_model(spec, spec["branch"])
    records = read_manifest(spec["manifest"], split="train")
    transform = model.image_transform
    if spec["mode"] == "cache":
        # As the non-main ranks of a multi-process run: open what the extraction wrote.
        caches, _ = prepare_feature_caches(model, data_config(spec), records, extract_missing=False)
        base = make_dataset(spec["manifest"], "train", transform, records=records, max_seconds=CROP_SECONDS,
                            preload=False, progress=False)
        dataset: Any = CachedSpokenCaptionDataset(base, caches["speech"], caches["image"])
        collate: Any = collate_cached_captions
        CachedTowers(model, caches).use_cache()
    else:
        dataset = make_dataset(spec["manifest"], "train", transform, records=records, max_seconds=CROP_SECONDS,
                               preload=True, progress=False)
        collate = collate_spoken_captions
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(model.param_groups(WEIGHT_DECAY), lr=LR)
    amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if spec["amp"] else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    bs = spec["batch_size"]
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(spec["seed"])).tolist()
    batches = [order[i : i + bs] for i in range(0, len(order) - bs + 1, bs)]
    workers = spec["workers"]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    stream = forever(loader)

    def step(batch: Batch, index: int) -> float:
        batch = move_to_device(batch, device, non_blocking=True)
        state = TrainState(step=index, total_steps=spec["warmup"] + spec["steps"])
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(batch, state)  # StepOutput: one weighted loss per branch
        loss = out.loss
        if not torch.isfinite(loss.detach()).item():
            raise FloatingPointError(f"loss is not finite: {loss.item()}")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    setup_peak = peak_rss_mib()  # loading the towers; the process-wide peak mark is reset next
    peak_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    load_s, step_s, cpu_s, losses = [], [], [], []
    shapes: dict[str, Any] = {}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for i in range(spec["warmup"] + spec["steps"]):
        c0 = time.process_time()
        t0 = time.perf_counter()
        batch = next(stream)
        t1 = time.perf_counter()
        if not shapes:
            # Waveforms and pixels (live), or cached tower states and tower outputs (cache).
            shapes = {name: [list(v.shape), str(v.dtype).replace("torch.", "")] for name, v in
                      (("speech", batch.speech.values), ("lengths", batch.speech.lengths), ("image", batch.image.main))}
            shapes["kinds"] = [batch.speech.kind, batch.image.kind]
        losses.append(step(batch, i))
        sync(spec["device"])
        t2 = time.perf_counter()
        if i >= spec["warmup"]:
            load_s.append(t1 - t0)
            step_s.append(t2 - t1)
            cpu_s.append(time.process_time() - c0)
    # Medians: robust to a step slowed down by other work on the machine (the means are kept too).
    load_med, step_med = statistics.median(load_s), statistics.median(step_s)
    total = sum(load_s) + sum(step_s)
    n = len(step_s)
    result = {
        "size": spec["size"], "branch": spec["branch"], "mode": spec["mode"], "batch_size": bs,
        "warmup_steps": spec["warmup"], "steps": n,
        "samples_per_s": round(bs / (load_med + step_med), 3),
        "s_per_step": round(load_med + step_med, 4),
        "load_s_per_step": round(load_med, 4),
        "train_s_per_step": round(step_med, 4),
        "mean_samples_per_s": round(bs * n / total, 3),
        "step_s": [round(t, 4) for t in step_s],
        "load_s": [round(t, 4) for t in load_s],
        # Process CPU time over wall time while timed: about the thread count when the cores were free.
        "cpu_per_wall": round(sum(cpu_s) / total, 2),
        "load_average_1min": [None if load_before is None else round(load_before, 2),
                              round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None],
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_rss_reset": peak_reset,
        "process_peak_rss_mib": round(max(setup_peak, peak_rss_mib()), 1),
        "trainable_params": sum(p.numel() for p in trainable),
        "keyword_vocab": None if model.keyword_vocabulary is None else len(model.keyword_vocabulary),
        "batch": shapes,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def quiet_transformers() -> None:
    """Keep transformers' load reports (the CLIP vision tower skips the text weights) out of the output."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    quiet_transformers()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    return extract_job(spec) if spec["job"] == "extract" else train_job(spec)


def run_isolated(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``run_job(spec)`` in a fresh Python process (its own peak memory); the result comes back as JSON."""
    path = folder / f"job-{spec['job']}-{spec['size']}-{spec.get('branch', '')}-{spec.get('mode', '')}.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{spec['job']} job for {spec['size']} failed (exit status {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked, with ``--quick`` applied and the paths made absolute.

    ``--tmp-dir`` and ``--out`` are resolved against the current folder here: the corpus manifest stores the
    paths it is given and is read back relative to its own folder, so a relative ``--tmp-dir`` would point
    every file at ``<tmp-dir>/<tmp-dir>/...``.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--branches", nargs="+", choices=BRANCHES, default=["parallel", "cascaded"])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--tiny-batch-size", type=int, default=16)
    p.add_argument("--base-batch-size", type=int, default=8)
    p.add_argument("--files", type=int, default=16,
                   help="captions (WAV + PNG) generated; batches cycle over them, at least the largest batch size")
    p.add_argument("--seconds", type=float, default=7.0, help="length of the generated WAVs (cropped to 6.4 s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--live-steps", type=int, default=3, help="timed steps with the towers run live")
    p.add_argument("--cache-steps", type=int, default=10, help="timed steps from the cache")
    p.add_argument("--keyword-vocab", type=int, default=FLICKR8K_VOCAB,
                   help="keyword vocabulary size of the cascaded branch (0: CLIP's whole vocabulary)")
    p.add_argument("--extract-batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision as the Trainer's amp: fp16 with loss scaling on CUDA, bf16 on CPU")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-process", action="store_true",
                   help="run every job in this process (faster start; peak memory is then not per run)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny config, 4 files, batch 4, 1 warm-up + 2 timed steps, in one process")
    p.add_argument("--tmp-dir", type=Path, default=None, help="where to write towers, corpus and caches")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default: benchmarks/results/speechclip_throughput.json; --quick: a temp file)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    if args.tmp_dir is not None:
        args.tmp_dir = args.tmp_dir.expanduser().resolve()
        if not args.tmp_dir.is_dir():
            p.error(f"--tmp-dir {args.tmp_dir}: not an existing folder")
    if args.quick:
        args.configs, args.files, args.tiny_batch_size = ["tiny"], 4, 4
        args.warmup, args.live_steps, args.cache_steps, args.in_process = 1, 2, 2, True
    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / "speechclip_throughput_quick.json" if args.quick
                    else Path(__file__).parent / "results" / "speechclip_throughput.json")
    args.out = args.out.expanduser().resolve()
    if args.out.is_dir():
        p.error(f"--out {args.out}: is a folder; give the JSON file to write")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    batch_sizes = {"tiny": args.tiny_batch_size, "base": args.base_batch_size}
    if args.files < max(batch_sizes[c] for c in args.configs):
        p.error(f"--files {args.files} is smaller than a batch")
    if args.seconds < CROP_SECONDS:
        p.error(f"--seconds must be at least the {CROP_SECONDS} s training crop")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_job(json.loads(args.worker.read_text()))))
        return {}
    batch_sizes = {"tiny": args.tiny_batch_size, "base": args.base_batch_size}
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_transformers()

    started = time.perf_counter()
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    runs: list[dict[str, Any]] = []
    extraction: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp_name:
        tmp = Path(tmp_name)
        manifest = write_corpus(tmp / "corpus", args.files, args.seconds, args.seed)
        for size in args.configs:
            towers = write_towers(tmp, size, args.seed)
            spec: dict[str, Any] = {
                "size": size, **towers, "manifest": str(manifest), "cache_root": str(tmp / f"{size}-cache"),
                "device": args.device, "threads": args.threads, "seed": args.seed, "amp": args.amp,
                "keyword_vocab": args.keyword_vocab, "extract_batch_size": args.extract_batch_size,
                "workers": args.workers, "batch_size": batch_sizes[size], "warmup": args.warmup,
            }

            def run(job: dict[str, Any]) -> dict[str, Any]:
                return run_job(job) if args.in_process else run_isolated(job, tmp)

            if "cache" in args.modes:
                extraction[size] = run({**spec, "job": "extract"})
                ex = extraction[size]
                print(f"[{size}] extraction of {ex['files']} captions: speech {ex['speech']['seconds']:.1f} s "
                      f"({ex['speech']['mib']:.1f} MiB), images {ex['image']['seconds']:.1f} s", flush=True)
            for branch in args.branches:
                for mode in args.modes:
                    steps = args.live_steps if mode == "live" else args.cache_steps
                    r = run({**spec, "job": "train", "branch": branch, "mode": mode, "steps": steps})
                    runs.append(r)
                    print(f"[{size}] {branch:<8} {mode:<5} {r['samples_per_s']:9.2f} samples/s "
                          f"({r['s_per_step']:.3f} s/step, CPU/wall {r['cpu_per_wall']:.2f})", flush=True)
        info = machine_info(args.device)
        info["load_average_1min_at_start"] = load_at_start
        if runs:
            info["torch_threads"] = runs[0]["torch_threads"]

    # Speed-up of the cache per (size, branch), and how many epochs repay the extraction.
    by_key = {(r["size"], r["branch"], r["mode"]): r for r in runs}
    for r in runs:
        live = by_key.get((r["size"], r["branch"], "live"))
        if r["mode"] == "cache" and live is not None:
            r["speedup_vs_live"] = round(r["samples_per_s"] / live["samples_per_s"], 1)
            ex = extraction[r["size"]]
            extract_per_sample = (ex["speech"]["seconds"] + ex["image"]["seconds"]) / ex["files"]
            saved = 1 / live["samples_per_s"] - 1 / r["samples_per_s"]
            r["breakeven_epochs"] = round(extract_per_sample / saved, 2) if saved > 0 else None

    result = {
        "benchmark": "SpeechCLIP training throughput: frozen towers live vs frozen-feature cache",
        "weights": WEIGHTS_NOTE,
        "towers": {
            "tiny": {"speech": "HuBERT-shaped, 2 layers, width 32, 50 frames/s",
                     "clip": f"1 layer, width {TINY_CLIP_WIDTH}, {TINY_IMAGE} px images, vocab {TINY_CLIP_VOCAB}"},
            "base": {"speech": "transformers.HubertConfig() (HuBERT Base: 12 layers, width 768)",
                     "clip": "transformers.CLIPConfig() (ViT-B/32 vision, 224 px; 512-wide text, vocab 49,408)"},
        },
        "settings": {
            "crop_samples": int(round(CROP_SECONDS * SAMPLE_RATE)),
            "generated_seconds": args.seconds, "files": args.files, "captions_per_image": 1,
            "batch_sizes": {c: batch_sizes[c] for c in args.configs}, "warmup_steps": args.warmup,
            "live_steps": args.live_steps, "cache_steps": args.cache_steps,
            "keyword_vocab": args.keyword_vocab or "whole CLIP vocabulary",
            "optimizer": f"Adam lr {LR:g}, weight decay {WEIGHT_DECAY:g}, grad clip {GRAD_CLIP:g}",
            "amp": args.amp, "loader_workers": args.workers, "isolated_processes": not args.in_process,
            "live_data": "preloaded waveforms and images (no decoding in the step)",
            "cache_data": "float16 memmap read per batch (files in the page cache)",
            "samples_per_s": "batch size / (median data loading + median training step), warm-up excluded",
        },
        "machine": info,
        "extraction": extraction,
        "runs": runs,
        "total_wall_s": round(time.perf_counter() - started, 1),
    }

    print(f"\nSpeechCLIP training throughput on {args.device} ({info['cpu']}, {info['torch_threads']} threads); "
          f"captions cropped to {result['settings']['crop_samples']:,} samples")
    print(f"towers: {WEIGHTS_NOTE}")
    header = (f"  {'config':<6} {'branch':<9} {'batch':>5} {'mode':<6} {'samples/s':>10} {'s/step':>8} "
              f"{'load s':>8} {'step s':>8} {'peak RSS':>9} {'speed-up':>9}")
    print(header)
    for r in runs:
        speedup = f"{r['speedup_vs_live']:.1f}x" if "speedup_vs_live" in r else ""
        print(f"  {r['size']:<6} {r['branch']:<9} {r['batch_size']:>5} {r['mode']:<6} {r['samples_per_s']:>10.2f} "
              f"{r['s_per_step']:>8.3f} {r['load_s_per_step']:>8.4f} {r['train_s_per_step']:>8.3f} "
              f"{r['peak_rss_mib']:>5.0f} MiB {speedup:>9}")
    for size, ex in extraction.items():
        per = (ex["speech"]["seconds"] + ex["image"]["seconds"]) / ex["files"]
        shape = ex["speech"]["item_shapes"]["hidden"]
        print(f"  extraction ({size}): {per:.3f} s per caption once; speech cache {shape} float16 per caption, "
              f"{ex['speech']['mib'] / ex['files']:.2f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['total_wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
