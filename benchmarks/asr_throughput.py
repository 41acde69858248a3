"""Speed and word error of the cascade's offline recogniser (PocketSphinx) on spoken-scenes captions.

The speech → ASR → text cascade (``asr_cascade``, :mod:`vgskit.models.milan.cascade`) transcribes every caption
before its text tower sees it; this script measures what that costs and how good the transcripts are, for the
package's generic English language model and for a trigram model of the training captions
(:mod:`vgskit.asr.lm`), on the same captions:

* **real-time factor** (RTF): decoding wall time / audio duration (below 1 is faster than real time; PocketSphinx
  decodes on one core), and audio seconds per wall second;
* **word error rate** against the manifest's text, overall and per voice family (espeak-ng voices, flite voices),
  with :func:`vgskit.asr.wer.corpus_wer`.

The captions are the first ``--captions`` of the test split of the embedded corpus (``--corpus``: a spoken-scenes
folder; default the demo corpus in the vgskit cache, generated if missing). Nothing is cached between the two
runs (the transcript cache is not used: each caption is decoded by both models).

    python benchmarks/asr_throughput.py                      # 300 test captions -> benchmarks/results/asr_throughput.json
    python benchmarks/asr_throughput.py --captions 40 --out /tmp/asr.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from vgskit.asr.recognizers import PocketSphinxRecognizer
from vgskit.asr.wer import corpus_wer
from vgskit.data.manifest import read_manifest
from vgskit.experiment import make_dataset


def _family(speaker: str | None) -> str:
    return str(speaker or "unknown").split(":")[0]


def run(corpus: Path, n_captions: int) -> dict[str, Any]:
    manifest = corpus / "manifest.jsonl"
    records = read_manifest(manifest, split="test")[:n_captions]
    ds = make_dataset(manifest, "test", {"size": 8, "mean": [0.5] * 3, "std": [0.5] * 3}, max_seconds=None,
                      preload=True, progress=False, records=records)
    wavs = [ds.waveform(i).numpy() for i in range(len(ds))]
    seconds = sum(len(w) for w in wavs) / 16000.0
    refs = [str(r.text) for r in records]
    train_texts = [str(r.text) for r in read_manifest(manifest, split="train", check_files=False) if r.text]
    rows: dict[str, Any] = {}
    for name, kwargs in (("generic_lm", {}), ("caption_trigram_lm", {"lm_texts": train_texts})):
        t0 = time.perf_counter()
        recognizer = PocketSphinxRecognizer(**kwargs)
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        hyps = recognizer.transcribe(wavs)
        wall = time.perf_counter() - t0
        by_family = {}
        for fam in sorted({_family(r.speaker) for r in records}):
            idx = [i for i, r in enumerate(records) if _family(r.speaker) == fam]
            errs = corpus_wer([refs[i] for i in idx], [hyps[i] for i in idx])
            by_family[fam] = {"captions": len(idx), "wer": round(errs.wer, 4)}
        total = corpus_wer(refs, hyps)
        rows[name] = {"setup_s": round(setup, 2), "decode_s": round(wall, 2), "rtf": round(wall / seconds, 4),
                      "audio_s_per_s": round(seconds / wall, 1), "wer": round(total.wer, 4),
                      "substitutions": total.substitutions, "deletions": total.deletions,
                      "insertions": total.insertions, "reference_words": total.reference_words,
                      "wer_by_voice_family": by_family, "lm": recognizer.lm_report or "package en-us generic"}
        print(f"{name:>20}: RTF {wall / seconds:.3f} ({seconds / wall:.1f} s of audio per s), WER "
              f"{100 * total.wer:.1f} %  " + "  ".join(f"{k} {100 * v['wer']:.1f} %" for k, v in by_family.items()))
    return {"corpus": str(corpus), "captions": len(records), "audio_seconds": round(seconds, 1), "results": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_corpus = Path(os.environ.get("VGSKIT_CACHE") or Path.home() / ".cache" / "vgskit") / "spoken-scenes-demo"
    p.add_argument("--corpus", type=Path, default=default_corpus)
    p.add_argument("--captions", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "asr_throughput.json")
    args = p.parse_args()
    if not (args.corpus / "manifest.jsonl").is_file():
        from vgskit.data.synthetic import PRESETS, generate_spoken_scenes

        generate_spoken_scenes(args.corpus, PRESETS["demo"])
    load_before = os.getloadavg()[0]
    result = run(args.corpus, args.captions)
    result.update(cpu=platform.processor() or platform.machine(), load_1min_before=load_before,
                  load_1min_after=os.getloadavg()[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
