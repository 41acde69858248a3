"""The registered ``word_segmentation`` evaluation: where reference words come from, the scores of the discovered
segments and of the equal-length baseline (checked against counts worked out by hand), and the run through the
generic evaluator with a real (tiny, random-weight) VG-HuBERT."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from torch import nn

from vgskit.data.loader import SpokenCaptionDataset
from vgskit.data.manifest import Record
from vgskit.errors import VGSKitError
from vgskit.models import create_model
from vgskit.models.vg_hubert.evaluations import (
    caption_word_alignments,
    equal_length_segments,
    evaluate_word_segmentation,
    format_word_segmentation,
)
from vgskit.retrieval.evaluate import evaluate

SR = 16000
WORDS = [{"word": "a", "start": 0.1, "end": 0.5}, {"word": "red", "start": 0.5, "end": 0.9},
         {"word": "bag", "start": 1.0, "end": 1.4}]


def _records(tmp_path, extras: list[dict], seconds: float = 1.5) -> list[Record]:
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(img)
    out = []
    for i, extra in enumerate(extras):
        wav = tmp_path / f"c{i}.wav"
        sf.write(wav, (np.random.default_rng(i).standard_normal(int(seconds * SR)) * 0.1).astype(np.float32), SR)
        out.append(Record(f"c{i}", str(wav), str(img), f"img{i}", "test", extra=extra))
    return out


class FixedSegmenter(nn.Module):
    """Returns the same segments (seconds) for every utterance; records what it was asked."""

    def __init__(self, segments: list[tuple[float, float]]):
        super().__init__()
        self.segments = segments
        self.config = SimpleNamespace(segment_layer=7)
        self.calls: list[dict] = []

    def cls_attention(self, *args, **kwargs):  # pragma: no cover - only its presence is checked
        raise AssertionError

    def segment(self, wavs, lengths, layer=None, quantile=0.7, level2=False):
        self.calls.append({"layer": layer, "quantile": quantile, "rows": int(wavs.shape[0])})
        boundaries = torch.tensor(self.segments, dtype=torch.float64).reshape(-1, 2)
        return [SimpleNamespace(boundaries=boundaries) for _ in range(wavs.shape[0])]


def tiny_vg_hubert() -> nn.Module:
    """The vg_hubert_scenes preset with tiny random-weight towers (8-pixel images, width 16)."""
    hubert = {"model_type": "hubert", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 32, "conv_dim": [8] * 7, "num_conv_pos_embeddings": 8,
              "num_conv_pos_embedding_groups": 2}
    vit = {"model_type": "vit", "image_size": 8, "patch_size": 4, "hidden_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 32}
    torch.manual_seed(0)
    return create_model("vg_hubert_scenes", speech={"architecture": hubert}, image={"architecture": vit},
                        embed_dim=8, segment_layer=1)


def test_equal_length_segments_tile_the_utterance() -> None:
    assert equal_length_segments(1.5, 3) == [(0.0, 0.5), (0.5, 1.0), (1.0, 1.5)]
    assert equal_length_segments(2.0, 0) == []


def test_scores_of_the_model_and_of_the_baseline_match_hand_counts(tmp_path) -> None:
    ds = SpokenCaptionDataset(_records(tmp_path, [{"words": WORDS}, {}]), image_size=8)
    # Reference interior boundaries (edges 0.1 and 1.4 excluded): 0.5, 0.9, 1.0.
    model = FixedSegmenter([(0.12, 0.49), (0.51, 0.95)])  # interior boundaries 0.49, 0.51, 0.95 (edges 0.12, 0.95)
    result = evaluate_word_segmentation(model, ds, tolerance_ms=20, quantile=0.5)
    assert result["n_captions"] == 1 and result["n_skipped"] == 1 and result["tolerance_ms"] == 20
    b = result["model"]["boundary"]
    # Predicted interior boundaries: 0.49 and 0.51 (0.12 and 0.95 are the edges); 0.5 is matched once only.
    assert (b["hits"], b["n_pred"], b["n_ref"]) == (1, 2, 3)
    assert b["precision"] == pytest.approx(0.5) and b["recall"] == pytest.approx(1 / 3)
    t = result["model"]["token"]
    # Tokens: (0.12, 0.49) matches (0.1, 0.5) within 20 ms at both ends; (0.51, 0.95) misses 0.9 by 50 ms.
    assert (t["hits"], t["n_pred"], t["n_ref"]) == (1, 2, 3)
    # Baseline: 2 equal segments over 1.5 s -> one interior boundary at 0.75: no hit.
    base = result["equal_length"]["boundary"]
    assert (base["hits"], base["n_pred"], base["n_ref"]) == (0, 1, 3)
    assert model.calls == [{"layer": None, "quantile": 0.5, "rows": 1}]
    assert result["layer"] == 7 and result["mean_segments"] == 2 and result["mean_words"] == 3
    table = format_word_segmentation(result)
    assert "tolerance 20 ms" in table and "equal-length baseline" in table

    # At 60 ms the second token's end (0.95 vs 0.9) matches too.
    wide = evaluate_word_segmentation(model, ds, tolerance_ms=60)
    assert wide["model"]["token"]["hits"] == 2 and wide["tolerance_ms"] == 60


def test_the_baseline_uses_the_models_segment_count(tmp_path) -> None:
    ds = SpokenCaptionDataset(_records(tmp_path, [{"words": WORDS}]), image_size=8)
    model = FixedSegmenter([(0.0, 0.3), (0.3, 0.6), (0.6, 0.9)])
    result = evaluate_word_segmentation(model, ds)
    # Three equal segments over 1.5 s: interior boundaries 0.5 and 1.0, both reference boundaries.
    base = result["equal_length"]["boundary"]
    assert (base["hits"], base["n_pred"]) == (2, 2)


def test_reference_words_from_fields_files_and_the_cropped_end(tmp_path) -> None:
    text_alignment = "0.1__A__0.5 0.5__RED__0.9 1.0__BAG__1.4"
    ds = SpokenCaptionDataset(_records(tmp_path, [{"text_alignment": text_alignment}, {"words": WORDS[:1]}]),
                              image_size=8)
    found = caption_word_alignments(ds)
    assert [(w.word.lower(), w.start, w.end) for w in found[0]] == [("a", 0.1, 0.5), ("red", 0.5, 0.9),
                                                                    ("bag", 1.0, 1.4)]
    assert [w.word for w in found[1]] == ["a"]

    table = tmp_path / "align.json"
    table.write_text(json.dumps({"c1": WORDS[1:], "other": WORDS}))
    from_file = caption_word_alignments(ds, alignments=table)
    assert from_file[0] is None and [w.word for w in from_file[1]] == ["red", "bag"]

    # Audio cropped to 1.2 s: "bag" (ends at 1.4) was never heard and is not a reference word.
    cropped = SpokenCaptionDataset(_records(tmp_path, [{"words": WORDS}]), image_size=8, max_seconds=1.2)
    result = evaluate_word_segmentation(FixedSegmenter([(0.1, 0.5)]), cropped)
    assert result["mean_words"] == 2 and result["model"]["token"]["n_ref"] == 2


def test_clear_errors_without_words_or_without_a_segmenter(tmp_path) -> None:
    ds = SpokenCaptionDataset(_records(tmp_path, [{}, {}]), image_size=8)
    with pytest.raises(VGSKitError, match="none of the 2 captions has reference word alignments"):
        evaluate_word_segmentation(FixedSegmenter([]), ds, source="data/x.jsonl (test)")
    with pytest.raises(VGSKitError, match="cannot segment speech into words"):
        evaluate_word_segmentation(nn.Linear(2, 2), ds)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(VGSKitError, match="bad.json"):
        caption_word_alignments(ds, alignments=bad)


def test_runs_through_the_generic_evaluator_with_a_real_vg_hubert(tmp_path) -> None:
    model = tiny_vg_hubert()
    ds = SpokenCaptionDataset(_records(tmp_path, [{"words": WORDS}, {"words": WORDS[:2]}, {}]), image_size=8)
    result = evaluate(model, ds, extras={"word_segmentation": {"quantile": 0.5, "tolerance_ms": 30}}, batch_size=2)
    seg = result["word_segmentation"]
    assert seg["n_captions"] == 2 and seg["n_skipped"] == 1 and seg["tolerance_ms"] == 30 and seg["layer"] == 1
    # The scored segments are the model's own: count them directly.
    with torch.no_grad():
        inputs = ds.speech_inputs([0, 1])
        direct = model.eval().segment(inputs.values, inputs.lengths, quantile=0.5)
    assert seg["model"]["token"]["n_pred"] == sum(len(s) for s in direct)
    assert seg["model"]["token"]["n_ref"] == 5


def test_vgskit_eval_word_segmentation_on_the_command_line(tmp_path, capsys) -> None:
    from vgskit.cli import main
    from vgskit.data.manifest import write_manifest
    from vgskit.models.registry import save_pretrained

    save_pretrained(tiny_vg_hubert(), tmp_path / "model")
    manifest = tmp_path / "m.jsonl"
    write_manifest(_records(tmp_path, [{"words": WORDS}, {"words": WORDS[:2]}, {}]), manifest)
    out = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "model"), "--manifest", str(manifest), "--split", "test",
                 "--word-segmentation", "--seg-tolerance-ms", "40", "--seg-quantile", "0.5", "--json", str(out)]) == 0
    seg = json.loads(out.read_text())["word_segmentation"]
    assert (seg["n_captions"], seg["n_skipped"], seg["tolerance_ms"], seg["quantile"]) == (2, 1, 40.0, 0.5)
    assert "tolerance 40 ms" in capsys.readouterr().out
