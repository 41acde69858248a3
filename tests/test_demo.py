"""The whole `vgskit demo` pipeline on the tiny corpus, through the command line entry point."""

from __future__ import annotations

import json
import re

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from vgskit.cli import main
from vgskit.experiment import load_model
from vgskit.retrieval.engine import SearchEngine


@pytest.fixture(scope="module")
def demo_run(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VGSKIT_CACHE", str(tiny_cache))
        assert main(["demo", "--preset", "tiny", "--out", str(out)]) == 0
        yield out


def test_demo_writes_report_results_and_index(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    for direction in ("speech_to_image", "image_to_speech"):
        r = results["results"][direction]
        assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 100
        assert 0 < results["ceiling"][direction]["R@1"] <= 100
    assert results["info"]["test images"] == 8 and results["info"]["test captions"] == 40

    queries = results["queries"]
    assert len(queries) == 6
    for q in queries:
        assert len(q["hits"]) == 5 and q["transcript"]
        scores = [h["score"] for h in q["hits"]]
        assert scores == sorted(scores, reverse=True)

    html = (demo_run / "report.html").read_text()
    assert "speech → image" in html and "image → speech" in html
    assert html.count("<audio") == 6 and html.count("data:image/png") >= 6 * 5 + 1  # thumbnails + curve
    assert f"{results['results']['speech_to_image']['R@10']:.1f}" in html
    assert (demo_run / "training_curve.png").stat().st_size > 1000

    # The saved index answers the same as the demo did, and embedding the images from their files (the
    # `vgskit index` path) gives the embeddings the evaluation used.
    engine = SearchEngine.load(demo_run / "index", load_model(demo_run / "train"))
    rebuilt = SearchEngine.build(engine.model, engine.image_paths, engine.image_ids)
    assert torch.allclose(rebuilt.image_emb, engine.image_emb, atol=1e-5)
    hits = engine.search_by_audio(queries[0]["audio"], k=5)
    assert [h.item_id for h in hits] == [h["item_id"] for h in queries[0]["hits"]]


def test_demo_rerun_reuses_the_finished_run(demo_run, capsys, monkeypatch):
    before = json.loads((demo_run / "results.json").read_text())
    capsys.readouterr()
    assert main(["demo", "--preset", "tiny", "--out", str(demo_run)]) == 0
    printed = capsys.readouterr().out
    # The demo ends with the command that serves its index; that command starts the service on it.
    serve = re.search(r"^serve it: (vgskit serve .*)$", printed, re.M)
    assert serve is not None
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    assert main(serve.group(1).split()[1:]) == 0 and len(started) == 1
    r = before["results"]["speech_to_image"]
    assert re.search(rf"speech to image\s+{r['R@1']:.1f}\s+{r['R@5']:.1f}\s+{r['R@10']:.1f}", printed)
    assert re.search(r"image to speech(\s+[\d.]+){3}", printed) and "report.html" in printed
    after = json.loads((demo_run / "results.json").read_text())
    assert after["results"] == before["results"]
    assert after["info"]["steps"] == before["info"]["steps"]


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["train", "--recipe", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vgskit: error:") and "unknown recipe 'nope'" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption_id": "a"}\nnot json\n')
    assert main(["data", "check", str(bad)]) == 1  # problems found: reported, not raised
    out = capsys.readouterr().out
    assert "bad.jsonl" in out and "line 2: invalid JSON" in out and "missing required field 'audio'" in out


HIT_LINE = re.compile(r"^ +(\d+) +(-?\d+\.\d{3}) +(\S+) +(.+)$")  # "  rank  score  id  path"


def test_search_cli(demo_run, capsys):
    queries = json.loads((demo_run / "results.json").read_text())["queries"]
    audios = [queries[0]["audio"], queries[1]["audio"]]
    # The index as stored on disk, read without SearchEngine.
    meta = json.loads((demo_run / "index" / "index.json").read_text())
    gallery = load_file(str(demo_run / "index" / "index.safetensors"))["image_emb"]
    ids, paths = meta["image_ids"], meta["image_paths"]
    assert gallery.shape[0] == len(ids) == 8
    k = len(ids) - 2
    capsys.readouterr()
    assert main(["search", "--checkpoint", str(demo_run / "train"), "--index", str(demo_run / "index"),
                 "-k", str(k), *audios]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(audios) * (k + 1)

    model = load_model(demo_run / "train")
    for q, audio in enumerate(audios):
        block = lines[q * (k + 1):(q + 1) * (k + 1)]
        assert block[0] == f"{audio}:"
        wav, rate = sf.read(audio, dtype="float32")
        assert rate == 16000 and wav.ndim == 1
        with torch.no_grad():
            query = model.encode_speech(torch.from_numpy(wav)[None], torch.tensor([len(wav)]))[0]
        scores = gallery @ query  # brute force over the stored embeddings
        best = scores.sort(descending=True).values
        printed = [HIT_LINE.match(line) for line in block[1:]]
        assert all(printed), block
        for rank, m in enumerate(printed, start=1):
            item = m.group(3)
            assert int(m.group(1)) == rank and m.group(4) == paths[ids.index(item)]
            expected = float(scores[ids.index(item)])
            assert float(m.group(2)) == pytest.approx(expected, abs=5e-4 + 1e-6)  # printed with 3 decimals
            assert expected == pytest.approx(float(best[rank - 1]), abs=1e-6)  # the rank-th best score
        assert len({m.group(3) for m in printed}) == k


def test_eval_and_index_cli(demo_run, tiny_manifest, tmp_path, capsys):
    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(demo_run / "train"), "--manifest", str(tiny_manifest),
                 "--split", "test", "--json", str(out_json)]) == 0
    assert "speech to image" in capsys.readouterr().out
    evaluated = json.loads(out_json.read_text())
    demo = json.loads((demo_run / "results.json").read_text())["results"]
    for direction in ("speech_to_image", "image_to_speech"):
        for k in ("R@1", "R@5", "R@10"):
            assert abs(evaluated[direction][k] - demo[direction][k]) < 1e-6

    assert main(["index", "--checkpoint", str(demo_run / "train"), "--manifest", str(tiny_manifest),
                 "--split", "test", "--out", str(tmp_path / "idx")]) == 0
    built = SearchEngine.load(tmp_path / "idx", load_model(demo_run / "train"))
    saved = SearchEngine.load(demo_run / "index", built.model)
    assert built.image_ids == saved.image_ids
    assert torch.allclose(built.image_emb, saved.image_emb, atol=1e-5)
