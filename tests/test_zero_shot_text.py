"""Zero-shot speech <-> text retrieval: the chunked metric against a brute-force reference, the evaluation
of a model with a text tower, and ``vgskit eval --zero-shot-text``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections.abc import Hashable, Sequence
from pathlib import Path

import pytest
import torch

import _toy_models  # noqa: F401  (registers the test models)
from vgskit.cli import main
from vgskit.errors import VGSKitError
from vgskit.experiment import make_dataset
from vgskit.extensions import get_evaluation
from vgskit.metrics import format_recall_table, speech_text_retrieval
from vgskit.models.registry import create_model, save_pretrained
from vgskit.models.speechclip import caption_texts, evaluate_zero_shot_text, format_zero_shot_text
from vgskit.retrieval.evaluate import embed_speech, evaluate


def _brute_force(queries: torch.Tensor, gallery: torch.Tensor, q_ids: Sequence[Hashable],
                 g_ids: Sequence[Hashable], ks=(1, 5, 10)) -> dict:
    scores = (queries.double() @ gallery.double().T).tolist()
    ranks = []
    for q, row in enumerate(scores):
        positives = [g for g, gid in enumerate(g_ids) if gid == q_ids[q]]
        if not positives:
            continue
        best = max(row[g] for g in positives)
        ranks.append(1 + sum(1 for g, s in enumerate(row) if g not in positives and s >= best))
    out = {f"R@{k}": 100.0 * sum(r <= k for r in ranks) / len(ranks) for k in ks}
    out.update(mean_rank=sum(ranks) / len(ranks), median_rank=float(statistics.median(ranks)),
               n_queries=len(ranks))
    return out


def _unequal_corpus(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Speech: image k has 1 + k % 4 spoken captions; texts: 1 + (k * 3) % 5 (up to 5, sometimes 0 after the
    # drop below); images 0 and 17 only have speech, image 18 only text.
    speech_ids = [f"img{k}" for k in range(18) for _ in range(1 + k % 4)]
    text_ids = [f"img{k}" for k in range(1, 19) if k != 17 for _ in range(1 + (k * 3) % 5)]
    speech = torch.nn.functional.normalize(torch.randn(len(speech_ids), 6, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(len(text_ids), 6, generator=g), dim=-1)
    return speech, text, speech_ids, text_ids


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_matches_brute_force_with_unequal_caption_counts(chunk_size) -> None:
    speech, text, speech_ids, text_ids = _unequal_corpus()
    got = speech_text_retrieval(speech, text, speech_ids, text_ids, ks=(1, 5, 10), chunk_size=chunk_size)
    want_s2t = _brute_force(speech, text, speech_ids, text_ids)
    want_t2s = _brute_force(text, speech, text_ids, speech_ids)
    for direction, want in (("speech_to_text", want_s2t), ("text_to_speech", want_t2s)):
        for key, value in want.items():
            assert got[direction][key] == pytest.approx(value), (direction, key)
    # Speech of images 0 and 17 (no text) and the text of image 18 (no speech) are not queries.
    assert got["speech_to_text"]["n_queries"] == len(speech_ids) - 1 - (1 + 17 % 4)
    assert got["text_to_speech"]["n_queries"] == len(text_ids) - (1 + (18 * 3) % 5)
    assert got["mean_R@5"] == pytest.approx((want_s2t["R@5"] + want_t2s["R@5"]) / 2)
    # Integer labels give the same result as the ids they stand for.
    index = {name: i for i, name in enumerate(dict.fromkeys(speech_ids + text_ids))}
    labelled = speech_text_retrieval(speech, text, torch.tensor([index[i] for i in speech_ids]),
                                     torch.tensor([index[i] for i in text_ids]), chunk_size=chunk_size)
    assert labelled == got


def test_ties_count_against_the_model() -> None:
    speech_ids, text_ids = ["a", "a", "b", "c"], ["a", "b", "b", "c", "c", "c"]
    same = torch.ones(4, 3) / 3**0.5  # a collapsed model: every score equal
    got = speech_text_retrieval(same, torch.ones(6, 3) / 3**0.5, speech_ids, text_ids, ks=(1, 6))
    # Pessimistic: every non-relevant item ties with the best relevant one and is ranked before it.
    assert got["speech_to_text"]["R@1"] == 0.0 and got["speech_to_text"]["R@6"] == 100.0
    assert got["speech_to_text"]["mean_rank"] == pytest.approx((6 + 6 + 5 + 4) / 4)
    json.dumps(got)  # plain numbers, JSON-ready


def test_errors() -> None:
    speech, text = torch.randn(3, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="image ids"):
        speech_text_retrieval(speech, text, ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="share an image"):
        speech_text_retrieval(speech, text, ["a", "a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="same D"):
        speech_text_retrieval(speech, torch.randn(2, 5), ["a", "a", "b"], ["a", "b"])


def test_table_lists_the_text_directions() -> None:
    speech, text, speech_ids, text_ids = _unequal_corpus(1)
    table = format_recall_table(speech_text_retrieval(speech, text, speech_ids, text_ids))
    assert "speech to text" in table and "text to speech" in table and "speech to image" not in table


@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = create_model("test_toy_text", vocabulary=["red", "bag"])
    return save_pretrained(model, tmp_path_factory.mktemp("toy") / "model")


def test_evaluate_zero_shot_text_on_a_split(tiny_manifest) -> None:
    torch.manual_seed(0)
    model = create_model("test_toy_text")
    ds = make_dataset(tiny_manifest, "test", model.image_transform, max_seconds=None, preload=True, progress=False)
    got = evaluate_zero_shot_text(model, ds, batch_size=7, chunk_size=9)
    speech = embed_speech(model, ds).pooled
    text = model.encode_text([r.text for r in ds.records])
    ids = [r.image_id for r in ds.records]
    assert got["speech_to_text"] == pytest.approx(_brute_force(speech, text, ids, ids))
    assert got["text_to_speech"] == pytest.approx(_brute_force(text, speech, ids, ids))
    assert got["speech_to_text"]["n_queries"] == got["text_to_speech"]["n_queries"] == 40
    # The registered evaluation reuses the recall pass's speech embeddings: the same numbers.
    results = evaluate(model, ds, extras=["zero_shot_text"], batch_size=7)
    alone = evaluate_zero_shot_text(model, ds, batch_size=7)
    for direction in ("speech_to_text", "text_to_speech"):
        assert results["zero_shot_text"][direction] == pytest.approx(alone[direction])
    wider = evaluate(model, ds, extras={"zero_shot_text": {"ks": (1, 20)}})["zero_shot_text"]
    assert set(wider["speech_to_text"]) >= {"R@1", "R@20"} and "R@5" not in wider["speech_to_text"]


def test_registered_evaluation_flag_and_table() -> None:
    ev = get_evaluation("zero_shot_text")
    parser = argparse.ArgumentParser()
    ev.add_cli_arguments(parser)
    assert ev.options_from_args(parser.parse_args([])) is None
    assert ev.options_from_args(parser.parse_args(["--zero-shot-text"])) == {}
    speech, text, speech_ids, text_ids = _unequal_corpus(2)
    result = speech_text_retrieval(speech, text, speech_ids, text_ids)
    assert ev.format is not None and ev.format(result) == format_zero_shot_text(result)
    n_texts = result["text_to_speech"]["n_queries"]
    assert format_zero_shot_text(result) == (
        f"zero-shot speech <-> text (gallery: {n_texts} caption texts; a hit is a caption of the same image)\n"
        f"{format_recall_table(result)}")


def test_evaluate_zero_shot_text_errors(tiny_manifest) -> None:
    no_text = create_model("test_no_extras")
    ds = make_dataset(tiny_manifest, "test", no_text.image_transform, max_seconds=None, preload=False,
                      progress=False)
    with pytest.raises(VGSKitError, match="'test_no_extras' has no text tower"):
        evaluate_zero_shot_text(no_text, ds)
    ds.records[3] = dataclasses.replace(ds.records[3], text=None)
    ds.records[7] = dataclasses.replace(ds.records[7], text="")
    with pytest.raises(VGSKitError, match=rf"2 of 40 captions have no transcript.*{ds.records[3].caption_id}"):
        evaluate_zero_shot_text(create_model("test_toy_text"), ds)
    with pytest.raises(VGSKitError, match=r"^m\.jsonl \(split 'test'\): 2 of 40"):
        caption_texts(ds, "m.jsonl (split 'test')")
    # Through evaluate(): the data is checked, and named, before any embedding pass.
    toy = create_model("test_toy_text")
    toy.embed_speech = None  # would fail if it were reached
    with pytest.raises(VGSKitError, match=r"^m\.jsonl \(split 'test'\): 2 of 40 captions have no transcript"):
        evaluate(toy, ds, extras=["zero_shot_text"], source="m.jsonl (split 'test')")
    with pytest.raises(VGSKitError, match="'test_no_extras' has no text tower"):
        evaluate(no_text, ds, extras=["zero_shot_text"])


def test_eval_cli_zero_shot_text(toy_model_dir, tiny_manifest, tmp_path, capsys) -> None:
    out = tmp_path / "results.json"
    code = main(["eval", "--checkpoint", str(toy_model_dir), "--manifest", str(tiny_manifest), "--split", "test",
                 "--zero-shot-text", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for label in ("speech to image", "image to speech", "speech to text", "text to speech", "40 caption texts"):
        assert label in printed
    results = json.loads(out.read_text())
    assert set(results["zero_shot_text"]) >= {"speech_to_text", "text_to_speech", "mean_R@10"}
    assert results["speech_to_image"]["n_queries"] == 40


def test_eval_cli_zero_shot_text_errors(tiny_manifest, tmp_path, capsys) -> None:
    plain = save_pretrained(create_model("test_no_extras"), tmp_path / "plain")
    assert main(["eval", "--checkpoint", str(plain), "--manifest", str(tiny_manifest), "--zero-shot-text"]) == 2
    assert "has no text tower" in capsys.readouterr().err
    # A manifest without transcripts: the error names the manifest and the split.
    lines = [json.loads(line) for line in tiny_manifest.read_text().splitlines()]
    root = tiny_manifest.parent
    for row in lines:
        row["text"] = None
        row["audio"], row["image"] = str(root / row["audio"]), str(root / row["image"])
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps(r) + "\n" for r in lines))
    toy = save_pretrained(create_model("test_toy_text"), tmp_path / "toy")
    assert main(["eval", "--checkpoint", str(toy), "--manifest", str(bare), "--zero-shot-text"]) == 2
    err = capsys.readouterr().err
    assert f"{bare} (split 'test')" in err and "40 of 40 captions have no transcript" in err
