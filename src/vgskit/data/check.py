"""Check a manifest against the files on disk and summarise it, reporting every problem in one pass.

:func:`check_manifest` reads a manifest leniently (malformed lines are reported and skipped, not fatal), checks
every distinct audio and image file with the functions and limits training uses
(:func:`vgskit.audio.validate_audio_file`, :func:`vgskit.images.probe_image` or :func:`vgskit.images.load_image`),
so that a file it passes is a file training accepts, and returns a JSON-ready report: bad files (each with its
reason and the captions that use it), audio durations (statistics and histogram, optionally a PNG plot),
speakers, captions per image, split sizes, and a comparison of the split sizes with the standard ones of a known
corpus (:data:`EXPECTED_COUNTS`). :func:`format_report` renders it as text.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from vgskit.audio import MAX_AUDIO_SECONDS, MIN_AUDIO_SECONDS, validate_audio_file
from vgskit.data.manifest import Record, _parse_line, _Problems, _resolve, read_manifest, summarize
from vgskit.errors import ConfigError, InputFileError, ManifestError
from vgskit.images import DEFAULT_MAX_PIXELS, load_image, probe_image

# Standard split sizes. ``None`` = not pinned by the corpus (only the counts given are compared).
#
# | key                  | split | images  | captions | source                                              |
# |----------------------|-------|---------|----------|-----------------------------------------------------|
# | flickr8k             | train |   6,000 |   30,000 | Flickr_8k.trainImages.txt, 5 spoken captions each   |
# | flickr8k             | dev   |   1,000 |    5,000 | Flickr_8k.devImages.txt                             |
# | flickr8k             | test  |   1,000 |    5,000 | Flickr_8k.testImages.txt                            |
# | spokencoco_karpathy  | train | 113,287 |        – | Karpathy train + restval (82,783 + 30,504)          |
# | spokencoco_karpathy  | val   |   5,000 |        – | Karpathy val                                        |
# | spokencoco_karpathy  | test  |   5,000 |        – | Karpathy test                                       |
# | spokencoco_original  | train |  82,783 |        – | COCO train2014                                      |
# | spokencoco_original  | val   |  40,504 |        – | COCO val2014                                        |
#
# SpokenCOCO caption counts are not pinned: a few COCO images have 6 or 7 captions and a few recordings were
# not released. Places, Localized Narratives and CSC have no fixed image counts worth pinning here (CSC depends
# on how many Conceptual Captions URLs still resolve); their splits are only listed.
EXPECTED_COUNTS: dict[str, dict[str, dict[str, int | None]]] = {
    "flickr8k": {
        "train": {"images": 6000, "captions": 30000},
        "dev": {"images": 1000, "captions": 5000},
        "test": {"images": 1000, "captions": 5000},
    },
    "spokencoco_karpathy": {
        "train": {"images": 113287, "captions": None},
        "val": {"images": 5000, "captions": None},
        "test": {"images": 5000, "captions": None},
    },
    "spokencoco_original": {
        "train": {"images": 82783, "captions": None},
        "val": {"images": 40504, "captions": None},
    },
}

HISTOGRAM_BINS = 30


def _lenient_records(path: Path) -> tuple[list[Record], list[str]]:
    """Read every valid record of ``path``; return them with the problems of the lines that were skipped.

    :func:`read_manifest` stops at the first malformed manifest by raising; a check must go on and look at the
    files of every line that can be used, so the same line validation is applied here record by record.
    """
    try:
        return read_manifest(path, check_files=False), []
    except ManifestError as exc:
        problems = list(exc.problems)
    base = os.path.abspath(path.parent)
    records: list[Record] = []
    seen: set[str] = set()
    if path.is_file():
        scratch = _Problems()  # problems were already collected by read_manifest
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                obj = _parse_line(raw, lineno, scratch)
                if obj is None or obj["caption_id"] in seen:
                    continue
                seen.add(obj["caption_id"])
                records.append(Record(
                    caption_id=obj["caption_id"], audio=_resolve(obj["audio"], base),
                    image=_resolve(obj["image"], base), image_id=obj["image_id"], split=obj["split"],
                    text=obj.get("text"), speaker=obj.get("speaker"),
                ))
    return records, problems


def _problem(check: Callable[[], float | None]) -> tuple[float | None, str | None]:
    """Run one file's check; return ``(value, None)`` or ``(None, problem)``.

    Anything a file makes a check raise is reported against that file: one odd file must never end the
    check of the others with a traceback.
    """
    try:
        return check(), None
    except InputFileError as exc:
        return None, exc.problem
    except Exception as exc:  # noqa: BLE001 - reported per file, never hidden: the file is listed as bad
        return None, f"unexpected error while checking the file ({type(exc).__name__}: {exc})"


def _check_audio(path: str, max_seconds: float | None, min_seconds: float) -> tuple[float | None, str | None]:
    # Always decoded, in both modes: training refuses silent, constant, cancelling and NaN audio, which only the
    # samples show, and an audio file costs less to decode than the image it describes.
    return _problem(lambda: validate_audio_file(path, max_seconds=max_seconds, min_seconds=min_seconds))


def _check_image(path: str, deep: bool, max_pixels: int) -> str | None:
    def check() -> None:
        if deep:
            load_image(path, max_pixels=max_pixels)
        else:
            probe_image(path, max_pixels=max_pixels)

    return _problem(check)[1]


def compare_expected(splits: dict[str, dict[str, int]], corpus: str) -> dict[str, Any]:
    """Compare per-split ``{"images", "captions"}`` counts with :data:`EXPECTED_COUNTS[corpus]`."""
    if corpus not in EXPECTED_COUNTS:
        raise ConfigError(f"no expected counts for {corpus!r}; known: {', '.join(EXPECTED_COUNTS)}")
    rows: dict[str, Any] = {}
    ok = True
    for split, want in EXPECTED_COUNTS[corpus].items():
        have = splits.get(split)
        row: dict[str, Any] = {}
        for key, value in want.items():
            if value is None:
                continue
            actual = have[key] if have else 0
            row[key] = {"actual": actual, "expected": value, "ok": actual == value}
            ok &= actual == value
        rows[split] = row
    unexpected = sorted(set(splits) - set(EXPECTED_COUNTS[corpus]))
    return {"corpus": corpus, "ok": ok and not unexpected, "splits": rows, "unexpected_splits": unexpected}


def _histogram(durations: np.ndarray) -> dict[str, Any]:
    if durations.size == 0:
        return {"edges": [], "counts": []}
    top = float(durations.max())
    counts, edges = np.histogram(durations, bins=HISTOGRAM_BINS, range=(0.0, top if top > 0 else 1.0))
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}


def plot_durations(durations: Sequence[float], path: str | Path, *, title: str = "") -> Path:
    """Save a histogram of audio durations (seconds) as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; never pop up a window
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(np.asarray(durations, dtype=np.float64), bins=HISTOGRAM_BINS, color="#4477aa")
    ax.set_xlabel("duration (s)")
    ax.set_ylabel("spoken captions")
    ax.set_title(title or f"{len(durations)} audio files")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def check_manifest(
    path: str | Path,
    *,
    expected: str | None = None,
    workers: int | None = None,
    check_files: bool = True,
    deep: bool = False,
    plot: str | Path | None = None,
    short_seconds: float = 0.2,
    progress: Callable[[int, int], None] | None = None,
    max_seconds: float | None = MAX_AUDIO_SECONDS,
    min_seconds: float = MIN_AUDIO_SECONDS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Check ``path`` and return a JSON-ready report (see the module docstring); never stops at a bad file.

    Files are judged by the checks and limits training applies: ``max_seconds``/``min_seconds`` (audio) and
    ``max_pixels`` (images) default to the limits the training data loader uses, so a file this check passes
    is one training accepts; pass the values a run overrides them with.

    Audio is always decoded (without resampling): silence, a constant DC offset, channels that cancel out and
    NaN samples are only visible in the samples, and training refuses them. A WAV whose header promises more
    samples than the file holds is refused as truncated. Images: by default only headers are read (size,
    pixel limit) plus the end marker of JPEG and PNG files (``FF D9`` / ``IEND``), which catches truncated
    files; a file without its end marker is decoded to confirm. ``deep`` decodes every image (also finds
    corrupt data inside complete files; much slower).

    ``expected`` names a key of :data:`EXPECTED_COUNTS` to compare split sizes with. ``workers`` threads open
    files (default: up to 8); libsndfile and PIL release the GIL while reading, so threads overlap the I/O.
    Audio shorter than ``short_seconds`` is listed as suspicious (clipped or empty recordings). ``plot``
    writes the duration histogram as a PNG. ``report["ok"]`` is true when nothing is wrong.
    """
    path = Path(path)
    if expected is not None and expected not in EXPECTED_COUNTS:
        raise ConfigError(f"no expected counts for {expected!r}; known: {', '.join(EXPECTED_COUNTS)}")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if max_seconds is not None and not max_seconds > 0:
        raise ConfigError(f"max_seconds must be positive or None, got {max_seconds!r}")
    if not min_seconds >= 0:
        raise ConfigError(f"min_seconds must be >= 0, got {min_seconds!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ConfigError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    records, manifest_problems = _lenient_records(path)
    summary = summarize(records)
    report: dict[str, Any] = {
        "manifest": str(path),
        "manifest_problems": manifest_problems,
        "summary": summary,
        "files_checked": check_files,
        "deep": deep,
        "limits": {"max_seconds": max_seconds, "min_seconds": min_seconds, "max_pixels": max_pixels},
    }

    users: dict[tuple[str, str], list[str]] = {}  # (kind, file) -> caption ids
    for r in records:
        users.setdefault(("audio", r.audio), []).append(r.caption_id)
        users.setdefault(("image", r.image), []).append(r.caption_id)
    bad: list[dict[str, Any]] = []
    durations: dict[str, float] = {}
    if check_files:
        jobs = list(users)
        n_workers = workers or min(8, os.cpu_count() or 1)

        def run(job: tuple[str, str]) -> tuple[float | None, str | None]:
            kind, file = job
            if kind == "audio":
                return _check_audio(file, max_seconds, min_seconds)
            return None, _check_image(file, deep, max_pixels)

        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            for i, (job, (seconds, problem)) in enumerate(zip(jobs, pool.map(run, jobs), strict=True)):
                if problem is not None:
                    captions = users[job]
                    bad.append({"kind": job[0], "file": job[1], "problem": problem,
                                "captions": len(captions), "example_caption": captions[0]})
                elif seconds is not None:
                    durations[job[1]] = seconds
                if progress is not None:
                    progress(i + 1, len(jobs))
    report["bad_files"] = bad
    report["bad_file_counts"] = dict(Counter(b["kind"] for b in bad))

    values = np.array(list(durations.values()), dtype=np.float64)
    if values.size:
        report["durations"] = {
            "files": int(values.size),
            "total_hours": round(float(values.sum()) / 3600, 3),
            "min": round(float(values.min()), 3),
            "mean": round(float(values.mean()), 3),
            "median": round(float(np.median(values)), 3),
            "p95": round(float(np.percentile(values, 95)), 3),
            "max": round(float(values.max()), 3),
            "histogram": _histogram(values),
            "shorter_than": {"seconds": short_seconds,
                             "files": sorted(f for f, s in durations.items() if s < short_seconds)},
        }
        if plot is not None:
            report["plot"] = str(plot_durations(values.tolist(), plot, title=path.name))
    else:
        report["durations"] = None

    speakers = Counter(r.speaker for r in records if r.speaker is not None)
    report["speakers"] = {
        "count": len(speakers),
        "captions_without_speaker": summary["captions_without_speaker"],
        "most_captions": speakers.most_common(5),
        "captions_per_speaker_median": float(np.median(list(speakers.values()))) if speakers else None,
    }
    if expected is not None:
        split_counts = {s: {"images": v["images"], "captions": v["captions"]} for s, v in summary["splits"].items()}
        report["expected"] = compare_expected(split_counts, expected)
    report["ok"] = (
        not manifest_problems
        and not bad
        and bool(records)
        and (expected is None or report["expected"]["ok"])
    )
    return report


def format_report(report: dict[str, Any], *, max_listed: int = 50) -> str:
    """Render a :func:`check_manifest` report as readable text, listing every problem (up to ``max_listed``
    per kind; the JSON report holds all of them)."""
    s = report["summary"]
    lines = [f"manifest {report['manifest']}",
             f"  {s['captions']} captions, {s['images']} images, {s['speakers']} speakers"]
    for name, v in s["splits"].items():
        lines.append(f"  split {name:<12} {v['images']:>8} images {v['captions']:>9} captions")
    hist = ", ".join(f"{k}: {n}" for k, n in s["captions_per_image"].items())
    lines.append(f"  captions per image: {hist or '-'}")
    if s["images_in_several_splits"]:
        lines.append(f"  WARNING: {s['images_in_several_splits']} image(s) appear in more than one split")
    d = report.get("durations")
    if d:
        lines.append(f"  audio: {d['files']} files, {d['total_hours']} h; seconds min {d['min']} median "
                     f"{d['median']} mean {d['mean']} p95 {d['p95']} max {d['max']}")
        short = d["shorter_than"]["files"]
        if short:
            lines.append(f"  WARNING: {len(short)} audio file(s) shorter than {d['shorter_than']['seconds']} s")
            lines.extend(f"    {f}" for f in short[:max_listed])
        if report.get("plot"):
            lines.append(f"  duration histogram: {report['plot']}")
    sp = report["speakers"]
    if sp["captions_without_speaker"]:
        lines.append(f"  {sp['captions_without_speaker']} caption(s) without a speaker")
    exp = report.get("expected")
    if exp:
        lines.append(f"  expected counts ({exp['corpus']}): {'match' if exp['ok'] else 'MISMATCH'}")
        for split, row in exp["splits"].items():
            for key, v in row.items():
                mark = "ok" if v["ok"] else "MISMATCH"
                lines.append(f"    {split:<12} {key:<8} {v['actual']:>8} / {v['expected']:<8} {mark}")
        if exp["unexpected_splits"]:
            lines.append(f"    unexpected split(s): {', '.join(exp['unexpected_splits'])}")
    probs = report["manifest_problems"]
    if probs:
        lines.append(f"  {len(probs)} manifest problem(s) (lines skipped):")
        lines.extend(f"    {p}" for p in probs[:max_listed])
    bad = report["bad_files"]
    if bad:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(report["bad_file_counts"].items()))
        lines.append(f"  {len(bad)} bad file(s) ({counts}):")
        lines.extend(f"    {b['file']}: {b['problem']} ({b['captions']} caption(s), e.g. {b['example_caption']})"
                     for b in bad[:max_listed])
        if len(bad) > max_listed:
            lines.append(f"    ... and {len(bad) - max_listed} more (see the JSON report)")
    elif report["files_checked"]:
        images = "decoded" if report["deep"] else "headers and end markers checked; --deep decodes them"
        lines.append(f"  all files pass training's checks (audio decoded; images {images})")
    else:
        lines.append("  files not checked (--no-files)")
    lines.append("OK" if report["ok"] else "PROBLEMS FOUND")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the full report as JSON (every bad file listed, not only the first ``max_listed``)."""
    path = Path(path)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return path
