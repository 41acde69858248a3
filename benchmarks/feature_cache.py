"""Epoch time of a trainable head on a frozen speech tower: recomputing the tower vs reading the feature cache.

The tower is HuBERT-Base-shaped (hidden 768, 12 heads, FFN 3072, the 7-layer 512-channel CNN) with random
weights and ``--layers`` transformer layers, so nothing is downloaded. The utterances are synthetic (tones
plus noise, ``--min-seconds`` to ``--max-seconds``) written as WAV files to a temporary folder. The head is
what SpeechCLIP-style recipes put on a frozen tower: a softmax-weighted sum of all hidden states, a linear
layer, mean pooling over valid frames, and here an MSE loss to fixed random targets.

Both variants go through the same data pipeline (a preloaded :class:`SpokenCaptionDataset`, same batches,
same head, same optimiser); only the speech side differs: ``live`` collates waveforms and runs the frozen
tower under ``no_grad`` every step, ``cached`` reads the features :func:`vgskit.data.cache.extract` stored
once (its time is reported separately) through :class:`CachedSpokenCaptionDataset` and
:class:`CachedSpeechEncoder`. Waveforms are preloaded, so the live baseline pays no decoding.

    python benchmarks/feature_cache.py            # writes benchmarks/results/feature_cache.json
    python benchmarks/feature_cache.py --utterances 8 --layers 2 --out /tmp/fc.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from vgskit.audio import save_wav
from vgskit.data.cache import (
    CachedSpeechEncoder,
    CachedSpokenCaptionDataset,
    ExtractionOptions,
    FeatureCache,
    collate_cached_captions,
    extract,
)
from vgskit.data.loader import SpokenCaptionDataset, collate_spoken_captions
from vgskit.data.manifest import Record
from vgskit.encoders.pretrained_speech import (
    PretrainedSpeechConfig,
    PretrainedSpeechEncoder,
    WeightedLayerSum,
)
from vgskit.layers import lengths_to_mask, masked_mean

TARGET_SPEEDUP = 10.0


def make_tower(folder: Path, layers: int) -> PretrainedSpeechEncoder:
    """Save a random HuBERT-Base-shaped model with ``layers`` layers to ``folder`` and load it frozen."""
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    torch.manual_seed(0)
    HubertModel(HubertConfig(num_hidden_layers=layers)).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=False).save_pretrained(folder)
    return PretrainedSpeechEncoder(PretrainedSpeechConfig(str(folder), freeze=True))


def make_corpus(folder: Path, n: int, min_s: float, max_s: float, seed: int) -> list[Record]:
    """``n`` WAVs of tones + noise and one small image; records pair each caption with that image."""
    rng = np.random.default_rng(seed)
    image = folder / "image.png"
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    records = []
    for i in range(n):
        t = np.arange(int(rng.uniform(min_s, max_s) * 16000)) / 16000
        f0 = rng.uniform(100, 400)
        wav = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(2 * np.pi * 2.7 * f0 * t) + 0.05 * rng.standard_normal(t.size)
        path = save_wav(folder / f"utt{i:04d}.wav", wav.astype(np.float32), 16000)
        records.append(Record(f"c{i}", str(path), str(image), "img0", "train"))
    return records


class Head(nn.Module):
    """Weighted layer sum → linear → mean over valid frames."""

    def __init__(self, num_states: int, width: int, out_dim: int):
        super().__init__()
        self.mix = WeightedLayerSum(num_states)
        self.proj = nn.Linear(width, out_dim)

    def forward(self, hidden_states: tuple[torch.Tensor, ...], lengths: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.mix(hidden_states))  # [B, T', E]
        return masked_mean(x, lengths_to_mask(lengths, x.shape[1]))  # [B, E]


def run_epoch(
    loader: DataLoader, encoder: nn.Module, head: Head, targets: torch.Tensor, opt: torch.optim.Optimizer
) -> tuple[float, float]:
    """One pass over ``loader``; returns (seconds, mean loss)."""
    losses = []
    start = time.perf_counter()
    for batch in loader:
        with torch.no_grad():  # the tower is frozen either way
            # Waveforms (live) or cached tower states (cached): the encoder takes either kind's values.
            out = encoder(batch.speech.values, batch.speech.lengths)
        pred = head(out.hidden_states, out.lengths)  # [B, E]
        loss = torch.nn.functional.mse_loss(pred, targets[batch.caption_ids])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return time.perf_counter() - start, float(np.mean(losses))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of ``fn()`` and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--utterances", type=int, default=64)
    p.add_argument("--layers", type=int, default=4, help="transformer layers of the HuBERT-Base-shaped tower")
    p.add_argument("--min-seconds", type=float, default=3.0)
    p.add_argument("--max-seconds", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cached-epochs", type=int, default=3, help="cached epochs timed (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "feature_cache.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "tower").mkdir()
        (tmp / "data").mkdir()
        tower = make_tower(tmp / "tower", args.layers)
        records = make_corpus(tmp / "data", args.utterances, args.min_seconds, args.max_seconds, args.seed)
        base = SpokenCaptionDataset(records, image_size=32, preload=True, progress=False)
        seconds = sum(base.num_samples()) / 16000
        targets = torch.randn(len(records), 256, generator=torch.Generator().manual_seed(args.seed))
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(args.seed)).tolist()
        batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]

        def fresh_head() -> tuple[Head, torch.optim.Optimizer]:
            torch.manual_seed(args.seed)
            head = Head(tower.num_hidden_states, tower.width, 256)
            return head, torch.optim.Adam(head.parameters(), lr=1e-3)

        # Live: the frozen tower runs on every batch.
        head, opt = fresh_head()
        live_loader = DataLoader(base, batch_sampler=batches, collate_fn=collate_spoken_captions)
        live_s, live_loss = run_epoch(live_loader, tower, head, targets, opt)

        # Cached: extract once, then train from the memory-mapped features.
        options = ExtractionOptions(layers=None)
        cache = FeatureCache.for_tower(tmp / "cache", tower, options)
        extract_s, n_extracted = timed(
            lambda: extract(cache, tower, records, batch_size=args.batch_size, progress=False)
        )
        cached_ds = CachedSpokenCaptionDataset(base, speech_cache=FeatureCache(tmp / "cache", cache.tower_key))
        cached_enc = CachedSpeechEncoder(cached_ds.speech_cache)  # type: ignore[arg-type]
        cached_loader = DataLoader(cached_ds, batch_sampler=batches, collate_fn=collate_cached_captions)
        head, opt = fresh_head()
        cached_times, cached_losses = [], []
        for _ in range(args.cached_epochs):
            s, loss = run_epoch(cached_loader, cached_enc, head, targets, opt)
            cached_times.append(s)
            cached_losses.append(loss)
        cache_bytes = sum(f.stat().st_size for f in cache.folder.iterdir())

    cached_s = statistics.median(cached_times)
    result = {
        "tower": {"shape": "hubert-base", "layers": args.layers, "hidden": 768, "weights": "random"},
        "utterances": args.utterances,
        "audio_seconds": round(seconds, 1),
        "batch_size": args.batch_size,
        "live_epoch_s": round(live_s, 3),
        "extract_s": round(extract_s, 3),
        "items_extracted": n_extracted,
        "cached_epoch_s": round(cached_s, 4),
        "cached_epochs_s": [round(t, 4) for t in cached_times],
        "speedup": round(live_s / cached_s, 1),
        "target_speedup": TARGET_SPEEDUP,
        "breakeven_epochs": round(extract_s / max(live_s - cached_s, 1e-9), 2),
        "first_epoch_loss": {"live": round(live_loss, 5), "cached": round(cached_losses[0], 5)},
        "cache_mib": round(cache_bytes / 2**20, 1),
        "torch_threads": torch.get_num_threads(),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
    }
    rows = [
        ("live epoch (tower every step)", f"{live_s:.2f} s"),
        ("extraction (once)", f"{extract_s:.2f} s"),
        (f"cached epoch (median of {args.cached_epochs})", f"{cached_s:.3f} s"),
        ("speed-up per epoch", f"{result['speedup']:.1f}x (target >= {TARGET_SPEEDUP:g}x)"),
        ("first-epoch loss live / cached", f"{live_loss:.5f} / {cached_losses[0]:.5f}"),
        ("cache size", f"{result['cache_mib']} MiB for {seconds:.0f} s of audio"),
    ]
    print(f"{args.utterances} utterances, {seconds:.0f} s audio, HuBERT-Base-shaped tower with {args.layers} layers")
    for name, value in rows:
        print(f"  {name:<36} {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
