"""Standard split names per corpus, and handing a prepared corpus to training/evaluation by corpus name."""

from __future__ import annotations

import json
import shutil

import pytest

from vgskit.cli import main
from vgskit.data.manifest import Record, read_manifest, write_manifest
from vgskit.data.splits import corpus_splits
from vgskit.errors import ConfigError
from vgskit.experiment import DataConfig, data_config_from


def test_standard_splits_and_aliases():
    assert corpus_splits("flickr8k").val == "dev" and corpus_splits("FACC").test == ("test",)
    assert corpus_splits("places").test == ("test_seen", "test_unseen")
    assert corpus_splits("spokencoco") == corpus_splits("spokencoco-karpathy")
    assert corpus_splits("csc").test == ()
    with pytest.raises(ConfigError, match="unknown corpus 'flickr30k'"):
        corpus_splits("flickr30k")


def test_data_config_takes_split_names_from_the_corpus():
    assert (DataConfig().train_split, DataConfig().val_split, DataConfig().test_split) == ("train", "val", "test")
    facc = data_config_from({"corpus": "flickr8k"})
    assert (facc.train_split, facc.val_split, facc.test_split) == ("train", "dev", "test")
    places = data_config_from({"corpus": "places", "val_split": "dev_unseen"})  # explicit value wins
    assert (places.val_split, places.test_split) == ("dev_unseen", "test_seen")


def _as_places(tiny_manifest, tmp_path):
    """The tiny corpus with its splits renamed the way the Places 2020 preparer names them."""
    rename = {"train": "train", "val": "dev_seen", "test": "test_seen"}
    records = read_manifest(tiny_manifest)
    out = []
    for r in records:
        split = rename[r.split]
        if r.split == "test" and int(r.image_id.rsplit("-", 1)[1]) % 2:
            split = "test_unseen"
        out.append(Record(**{**r.to_json(), "split": split}))
    return write_manifest(out, tmp_path / "places" / "manifest.jsonl")


def test_train_and_evaluate_by_corpus_name(tiny_manifest, tmp_path, capsys):
    manifest = _as_places(tiny_manifest, tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--recipe", "demo_tiny", "--manifest", str(manifest), "--corpus", "places",
                 "--out", str(run), "--set", "train.max_steps=4", "--set", "train.eval_every=4"]) == 0
    config = json.loads((run / "checkpoints" / "best" / "config.json").read_text())
    assert config["extra"]["data"]["val_split"] == "dev_seen"
    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--manifest", str(manifest), "--corpus", "places",
                 "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "[test_seen]" in printed and "[test_unseen]" in printed
    results = json.loads(out_json.read_text())
    assert set(results) == {"test_seen", "test_unseen"}
    assert results["test_seen"]["speech_to_image"]["n_queries"] == 20  # 4 of the 8 test images x 5
    shutil.rmtree(run)
