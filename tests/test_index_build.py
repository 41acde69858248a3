"""`vgskit index` in shards: parallel workers, resume after an interruption (byte-identical result), captions."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import vgskit.images
from vgskit.cli import main
from vgskit.models.registry import create_model, save_pretrained
from vgskit.retrieval.engine import SearchEngine


class Interrupted(Exception):
    pass


@pytest.fixture
def images(tmp_path):
    paths = []
    for i in range(10):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (24, 20), (25 * i, 255 - 20 * i, (70 * i) % 256)).save(p)
        paths.append(str(p))
    return paths


def test_interrupted_build_resumes_and_matches_an_uninterrupted_one(images, tmp_path, monkeypatch):
    """Two worker processes; shard 2 fails; the rerun finishes and the saved index is byte-identical."""
    from vgskit.retrieval import shards

    torch.manual_seed(0)
    model = create_model("dual_encoder_tiny").eval()
    ids = [f"id{i}" for i in range(10)]
    with shards.build_options(workers=2, work_dir=tmp_path / "w0", shard_size=3):
        SearchEngine.build(model, images, ids, batch_size=2).save(tmp_path / "full")

    real = vgskit.images.load_image

    def failing(path, **kw):  # an unreadable image in shard 2 (rows 6-8); forked workers inherit the patch
        if str(path).endswith("img7.png"):
            raise Interrupted(str(path))
        return real(path, **kw)

    monkeypatch.setattr(vgskit.images, "load_image", failing)
    work = tmp_path / "w1"
    with shards.build_options(workers=2, work_dir=work, shard_size=3), pytest.raises(Interrupted, match="img7.png"):
        SearchEngine.build(model, images, ids, batch_size=2)
    written = {p.name for p in work.glob("images-*.safetensors")}
    assert "images-000002.safetensors" not in written
    monkeypatch.setattr(vgskit.images, "load_image", real)
    with shards.build_options(workers=2, work_dir=work, shard_size=3):
        SearchEngine.build(model, images, ids, batch_size=2).save(tmp_path / "resumed")
    for name in ("index.safetensors", "index.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


def test_resume_embeds_only_missing_shards(images, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = create_model("dual_encoder_tiny").eval()
    ids = [f"id{i}" for i in range(10)]
    from vgskit.retrieval import shards

    reference = SearchEngine.build(model, images, ids, batch_size=2)  # the plain loop, no shards
    real = vgskit.images.load_image
    state = {"fail": True}

    def failing(path, **kw):
        if state["fail"] and str(path).endswith("img7.png"):
            raise Interrupted(str(path))
        return real(path, **kw)

    monkeypatch.setattr(vgskit.images, "load_image", failing)
    work = tmp_path / "w"
    with shards.build_options(workers=1, work_dir=work, shard_size=3), pytest.raises(Interrupted):
        SearchEngine.build(model, images, ids, batch_size=3)
    assert sorted(p.name for p in work.glob("images-*")) == ["images-000000.safetensors", "images-000001.safetensors"]
    calls: list[str] = []

    def counting(path, **kw):
        calls.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(vgskit.images, "load_image", counting)
    with shards.build_options(workers=1, work_dir=work, shard_size=3):
        resumed = SearchEngine.build(model, images, ids, batch_size=3)
    assert sorted(calls) == sorted(images[6:])  # shards 0 and 1 (rows 0-5) were read from the work folder
    torch.testing.assert_close(resumed.image_emb, reference.image_emb, atol=1e-5, rtol=0)
    # Another model's shards are never reused: everything is embedded again.
    calls.clear()
    other = create_model("dual_encoder_tiny").eval()
    with shards.build_options(workers=1, work_dir=work, shard_size=3):
        SearchEngine.build(other, images, ids, batch_size=3)
    assert sorted(calls) == sorted(images)


def test_index_command_workers_captions_and_resume(tiny_manifest, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = create_model("dual_encoder_tiny").eval()
    ckpt = save_pretrained(model, tmp_path / "model")
    args = ["index", "--checkpoint", str(ckpt), "--manifest", str(tiny_manifest), "--split", "test"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    out = capsys.readouterr().out
    assert "index exact" in out and "spoken captions" in out
    assert main([*args, "--out", str(tmp_path / "two"), "--workers", "2", "--index-kind", "exact",
                 "--memory-budget-mb", "64"]) == 0
    for name in ("index.safetensors", "index.json"):  # parallel shards give the same bytes as one process
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert not (tmp_path / "two.work").exists()  # the work folder goes once the index is saved
    meta = json.loads((tmp_path / "one" / "index.json").read_text())
    engine = SearchEngine.load(tmp_path / "one", model)
    assert engine.captions is not None and len(engine.captions.ids) == meta["captions"]["count"] > meta["count"]
    assert set(engine.captions.image_ids) == set(engine.image_ids)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "three"), "--workers", "0"]) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's usage error
        main([*args, "--out", str(tmp_path / "three"), "--index-kind", "lsh"])
    assert "invalid choice: 'lsh'" in capsys.readouterr().err
