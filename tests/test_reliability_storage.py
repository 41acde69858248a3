"""Storage reliability: what a killed, concurrent, full-disk or damaged write leaves behind is read back right
or refused with a message naming the file, never served silently wrong and never as a traceback.

Kills are simulated by raising a ``BaseException`` at the moment a ``kill -9`` would strike (no handler of
vgskit catches it, like a real kill); a second process holds the run-folder lock where two processes matter.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import _ddp_worker as worker
from vgskit.errors import AudioError, ConfigError, InputFileError, VGSKitError
from vgskit.experiment import load_model
from vgskit.models.registry import create_model, load_pretrained, model_config_dict, save_pretrained
from vgskit.retrieval import engine as E
from vgskit.retrieval.engine import SearchEngine
from vgskit.train import checkpoint as C
from vgskit.train.loop import Trainer, TrainStepError

# Names added with these fixes are imported inside the tests that use them, so that each test fails on its
# own assertion against older code instead of the whole module failing to import.


class Killed(BaseException):
    """Stands for SIGKILL: not an ``Exception``, so no ``except Exception`` of the code under test stops it."""


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def _toy_trainer(out_dir, model_seed=0, evaluate_fn=None, collate=worker.collate, **overrides) -> Trainer:
    cfg = worker.make_config(out_dir, **overrides)
    torch.manual_seed(model_seed)
    return Trainer(worker.ToyDualEncoder(dropout=0.2), cfg, worker.PairData(), collate, evaluate_fn=evaluate_fn,
                   model_name="toy", model_config={"dropout": 0.2}, progress_bar=False)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _save_model_step(root: Path, step: int, model, best_step: int | None) -> Path:
    """A training checkpoint of a registry model, as the Trainer writes it (loadable by load_model)."""
    return C.save_checkpoint(root, step, model=model, config=model_config_dict(model),
                             trainer_state={"step": step, "epoch": 0, "batch_in_epoch": step,
                                            "best_step": best_step})


def _perturbed(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def _kill_copy_partway(monkeypatch, calls_before_kill: int = 0) -> list[str]:
    """Let ``calls_before_kill`` folder copies through, then kill the next one after its first file."""
    real = shutil.copytree
    seen: list[str] = []

    def copytree(src, dst, *args, **kwargs):
        seen.append(str(src))
        if len(seen) <= calls_before_kill:
            return real(src, dst, *args, **kwargs)
        os.makedirs(dst)
        shutil.copy2(Path(src) / "model.safetensors", Path(dst) / "model.safetensors")
        raise Killed

    monkeypatch.setattr(C.shutil, "copytree", copytree)
    return seen


# ------------------------------------------------------------------------------------ 1. best/ and its record


def test_best_left_behind_by_a_kill_is_never_served(tmp_path, monkeypatch, caplog):
    """Issue item 2: killed while copying step_2 to best/ (after step_2 and latest were written)."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    torch.manual_seed(0)
    model = create_model("dual_encoder_tiny")
    C.update_best(root, _save_model_step(root, 1, model, best_step=1))
    _perturbed(model, 1)
    step2 = _save_model_step(root, 2, model, best_step=2)
    want = _weights(model)
    _kill_copy_partway(monkeypatch)
    with pytest.raises(Killed):
        C.update_best(root, step2)
    monkeypatch.undo()
    assert C.read_trainer_state(root / "step_2")["best_step"] == 2
    assert json.loads((root / "best" / "trainer_state.json").read_text())["step"] == 1  # best/ lags behind

    # Every reader gets the step the run recorded as best, and says why it did not use best/.
    with caplog.at_level(logging.WARNING, logger="vgskit.train"):
        assert C.resolve_checkpoint(root / "best") == step2
    assert (f"{root / 'best'} holds step 1 but the run recorded step 2 as its best (an interrupted update of "
            f"best/); using {step2}") in caplog.text
    fresh = create_model("dual_encoder_tiny")
    assert C.load_checkpoint(root / "best", model=fresh).step == 2
    _assert_same(_weights(fresh), want)
    for loaded in (load_model(run), load_model(root), load_model(root / "best"), load_pretrained(root / "best")):
        _assert_same(_weights(loaded), want)

    # When the recorded step is gone as well, a clear refusal instead of the older weights.
    shutil.rmtree(step2)
    (root / "latest").unlink()
    _save_model_step(root, 3, model, best_step=2)
    message = (f"checkpoint {root / 'best'}: holds step 1 but the run recorded step 2 as its best (an interrupted "
               "update of best/), and step_2/ is gone; resume the run to repair best/, or load a step_<N>/ folder "
               "explicitly")
    for reader in (C.resolve_checkpoint, load_model, load_pretrained):
        with pytest.raises(C.CheckpointError, match=re.escape(message)):
            reader(root / "best")
    with pytest.raises(C.CheckpointError, match=re.escape(message)):
        load_model(run)


def test_resume_repairs_a_best_left_behind(tmp_path, monkeypatch, caplog):
    values = iter([0.2, 0.6])
    common = dict(max_steps=4, eval_every=2, ckpt_every=None, keep_last=None, select_metric="mean_R@10")
    first = _toy_trainer(tmp_path, evaluate_fn=lambda m: {"mean_R@10": next(values)}, **common)
    copies = _kill_copy_partway(monkeypatch, calls_before_kill=1)  # best/ <- step_2 works; step_4 is killed
    with pytest.raises(Killed):
        first.fit()
    monkeypatch.undo()
    ckpts = tmp_path / "checkpoints"
    assert [Path(c).name for c in copies] == ["step_2", "step_4"]
    assert C.read_trainer_state(ckpts / "step_4")["best_step"] == 4
    assert json.loads((ckpts / "best" / "trainer_state.json").read_text())["step"] == 2
    assert C.resolve_checkpoint(ckpts / "best") == ckpts / "step_4"

    with caplog.at_level(logging.WARNING, logger="vgskit.train"):
        summary = _toy_trainer(tmp_path, evaluate_fn=lambda m: {"mean_R@10": 0.0}, **common).fit(resume=True)
    assert (summary["resumed_from_step"], summary["steps_this_call"]) == (4, 0)
    assert (f"{ckpts / 'best'} held step 2 but the run recorded step 4 as its best; copied step_4/ into it"
            in caplog.text)
    assert json.loads((ckpts / "best" / "trainer_state.json").read_text())["step"] == 4
    _assert_same(load_file(str(ckpts / "best" / "model.safetensors")),
                 load_file(str(ckpts / "step_4" / "model.safetensors")))
    assert C.resolve_checkpoint(ckpts / "best") == ckpts / "best"


# ------------------------------------------------------------------------------------------- 2. the index unit


def _unit(dim: int, seed: int, n: int = 3) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return create_model("dual_encoder_tiny").eval()


def test_interrupted_rebuild_never_pairs_new_embeddings_with_old_ids(tmp_path, tiny_model, monkeypatch):
    """Issue item 3: a kill between the two renames of a rebuild into an existing index folder."""
    index = tmp_path / "index"
    old = SearchEngine(tiny_model, _unit(32, 1), ["a0", "a1", "a2"], ["/a/0.png", "/a/1.png", "/a/2.png"])
    old.save(index)
    again = SearchEngine.load(index, tiny_model)
    assert again.image_ids == ["a0", "a1", "a2"] and torch.equal(again.image_emb, old.image_emb)

    new = SearchEngine(tiny_model, _unit(32, 2), ["b0", "b1", "b2"], ["/b/0.png", "/b/1.png", "/b/2.png"])
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == "index.json":
            raise Killed  # the embeddings are in place, the ids are not
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        new.save(index)
    monkeypatch.undo()
    assert torch.equal(load_file(str(index / "index.safetensors"))["image_emb"], new.image_emb)
    assert json.loads((index / "index.json").read_text())["image_ids"] == ["a0", "a1", "a2"]
    with pytest.raises(VGSKitError, match=re.escape(
            f"search index {index}: index.safetensors does not match index.json")) as err:
        SearchEngine.load(index, tiny_model)
    assert "rebuild it with `vgskit index`" in str(err.value)

    new.save(index)  # an uninterrupted rebuild is whole again
    loaded = SearchEngine.load(index, tiny_model)
    assert loaded.image_ids == ["b0", "b1", "b2"] and torch.equal(loaded.image_emb, new.image_emb)
    assert sorted(p.name for p in index.iterdir()) == ["index.json", "index.safetensors"]  # no temp files


def test_index_refuses_another_checkpoint_of_the_same_width(tmp_path, tiny_model):
    """Issue item 4: an index built by one checkpoint, searched with another of the same embedding width."""
    SearchEngine(tiny_model, _unit(32, 1), ["a", "b", "c"], ["a.png", "b.png", "c.png"]).save(tmp_path / "i")
    torch.manual_seed(1)
    other = create_model("dual_encoder_tiny").eval()
    assert other.embed_dim == tiny_model.embed_dim
    with pytest.raises(VGSKitError, match="built with another checkpoint"):
        SearchEngine.load(tmp_path / "i", other)
    from vgskit.retrieval.engine import model_identity

    mine, theirs = model_identity(tiny_model), model_identity(other)
    assert mine["sha256"] != theirs["sha256"]
    with pytest.raises(VGSKitError, match=re.escape(
            f"search index {tmp_path / 'i'}: built with another checkpoint (model 'dual_encoder_tiny', weights+config "
            f"{mine['sha256'][:12]}) than the model given ('dual_encoder_tiny', {theirs['sha256'][:12]}); rebuild it "
            "with `vgskit index` for this checkpoint")):
        SearchEngine.load(tmp_path / "i", other)
    # The identity is the checkpoint's: the same weights loaded again (another object, train mode) match.
    save_pretrained(tiny_model, tmp_path / "m")
    reloaded = load_pretrained(tmp_path / "m").train()
    assert model_identity(reloaded) == mine
    assert SearchEngine.load(tmp_path / "i", reloaded).image_ids == ["a", "b", "c"]


def test_duplicate_ids_and_an_empty_gallery_are_refused(tmp_path, tiny_model):
    with pytest.raises(VGSKitError, match=re.escape(
            "duplicate gallery id 'a' (images /g/0.png and /g/2.png); gallery ids must be unique")):
        SearchEngine(tiny_model, _unit(32, 1), ["a", "b", "a"], ["/g/0.png", "/g/1.png", "/g/2.png"])
    from PIL import Image

    paths = []
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / d / "cat.png")
        paths.append(str(tmp_path / d / "cat.png"))
    with pytest.raises(VGSKitError, match=re.escape(
            f"duplicate gallery id 'cat' (images {paths[0]} and {paths[1]}); ids default to the file names")):
        SearchEngine.build(tiny_model, paths)
    assert SearchEngine.build(tiny_model, paths, ["cat-x", "cat-y"]).image_ids == ["cat-x", "cat-y"]

    for build in (lambda: SearchEngine.build(tiny_model, []),
                  lambda: SearchEngine(tiny_model, torch.zeros(0, 32), [], [])):
        with pytest.raises(VGSKitError, match=r"^the gallery is empty") as err:
            build()
        assert "another checkpoint" not in str(err.value)

    class NoImages:
        image_keys: list[str] = []
        image_paths: list[str] = []

    with pytest.raises(VGSKitError, match=re.escape("the gallery is empty: the dataset has no images")):
        SearchEngine.build_from_dataset(tiny_model, NoImages())


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_index_files_are_named(tmp_path, tiny_model, damage):
    index = tmp_path / "index"
    SearchEngine(tiny_model, _unit(32, 1, n=40), [f"i{k}" for k in range(40)],
                 [f"{k}.png" for k in range(40)]).save(index)
    data = (index / "index.safetensors").read_bytes()
    (index / "index.safetensors").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    size = len(data) // 2 if damage == "truncated" else 0
    with pytest.raises(VGSKitError, match=re.escape(
            f"search index {index}: index.safetensors does not match index.json ({size} bytes, the JSON records "
            f"{len(data)} with another checksum)")):
        SearchEngine.load(index, tiny_model)


def test_index_json_missing_a_field_or_from_an_old_version(tmp_path, tiny_model):
    index = tmp_path / "index"
    SearchEngine(tiny_model, _unit(32, 1), ["a", "b", "c"], ["a.png", "b.png", "c.png"]).save(index)
    meta = json.loads((index / "index.json").read_text())
    for field in ("image_ids", "image_paths", "model", "tensors"):
        broken = {k: v for k, v in meta.items() if k != field}
        (index / "index.json").write_text(json.dumps(broken))
        with pytest.raises(VGSKitError, match=re.escape(
                f"search index {index}: index.json field {field!r} is missing, expected a ")):
            SearchEngine.load(index, tiny_model)
    (index / "index.json").write_text(json.dumps({**meta, "image_ids": "a"}))
    with pytest.raises(VGSKitError, match=re.escape("index.json field 'image_ids' is a str, expected a list")):
        SearchEngine.load(index, tiny_model)
    v1 = {"format_version": 1, "embed_dim": 32, "image_ids": ["a", "b", "c"], "image_paths": ["a", "b", "c"]}
    (index / "index.json").write_text(json.dumps(v1))
    with pytest.raises(VGSKitError, match=re.escape(
            "unsupported format version 1 (written by an older vgskit, which recorded neither the model nor a "
            "checksum); rebuild it with `vgskit index`")):
        SearchEngine.load(index, tiny_model)


def test_index_save_into_a_file_or_onto_a_full_disk(tmp_path, tiny_model, monkeypatch):
    engine = SearchEngine(tiny_model, _unit(32, 1), ["a", "b", "c"], ["a.png", "b.png", "c.png"])
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(VGSKitError, match=re.escape(f"search index {afile}: is a file, not a folder")):
        engine.save(afile)

    index = tmp_path / "index"
    engine.save(index)
    before = {p.name: p.read_bytes() for p in index.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(E, "save_file", full)
    other = SearchEngine(tiny_model, _unit(32, 2), ["x", "y", "z"], ["x.png", "y.png", "z.png"])
    with pytest.raises(VGSKitError, match=re.escape(
            f"search index {index}: could not be written ([Errno 28] No space left on device); free some disk space")):
        other.save(index)
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before  # the previous index, untouched
    monkeypatch.undo()
    assert SearchEngine.load(index, tiny_model).image_ids == ["a", "b", "c"]


# ------------------------------------------------------------------------------ 3. query waveforms from the API


def test_api_query_waveforms_are_checked_like_files(tmp_path, tiny_model, monkeypatch):
    engine = SearchEngine(tiny_model, _unit(32, 1), ["a", "b", "c"], ["a.png", "b.png", "c.png"])
    t = np.arange(16000) / 16000.0
    pcm = np.round(np.sin(2 * np.pi * 220 * t) * 0.3 * 32767).astype(np.int16)
    seen: list[torch.Tensor] = []
    real = tiny_model.embed_speech

    def spy(speech):
        seen.append(speech.values.detach().clone())
        return real(speech)

    monkeypatch.setattr(tiny_model, "embed_speech", spy)
    hits_int = engine.search_by_waveform(pcm, k=3)
    scaled = pcm.astype(np.float32) / 32768.0
    hits_float = engine.search_by_waveform(scaled, k=3)
    assert [(h.item_id, h.score) for h in hits_int] == [(h.item_id, h.score) for h in hits_float]
    # The model saw int16 / 32768, not raw integers.
    assert torch.equal(seen[0].reshape(-1), torch.from_numpy(scaled))
    from vgskit.audio import validate_waveform

    np.testing.assert_array_equal(validate_waveform(pcm, 16000, source="q"), scaled)

    for bad, problem in ((np.zeros(16000, dtype=np.float32), "silent"),
                         (np.full(16000, 1e30, dtype=np.float32), "peak amplitude"),
                         (np.full(16000, 0.25, dtype=np.float32), "constant"),
                         (np.full(16000, np.nan, dtype=np.float32), "NaN")):
        with pytest.raises(AudioError) as err:
            engine.search_by_waveform(bad, k=1)
        assert err.value.path == "query waveform"
        assert problem in str(err.value) or problem in err.value.problem.lower(), str(err.value)
    with pytest.raises(AudioError) as err:
        engine.search_by_waveform(torch.zeros(16000), k=1)
    assert err.value.path == "query waveform"


# ------------------------------------------------------------------------------ 4. one writer per run folder


_HOLDER = textwrap.dedent("""
    import sys
    from vgskit.fileio import FolderLock
    FolderLock(sys.argv[1], what="run folder").acquire()
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes stdin or kills this process
""")


def test_a_second_training_on_a_locked_run_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        refusal = (f"run folder {out} is in use by another process (pid {holder.pid} on host "
                   f"{socket.gethostname()}, since ")
        for resume in (False, True):
            with pytest.raises(VGSKitError, match=re.escape(refusal)) as err:
                _toy_trainer(out, max_steps=2).fit(resume=resume)
            assert type(err.value).__name__ == "FolderInUseError"
            assert str(err.value).endswith(f"wait for it to end or write into another folder (lock file "
                                           f"{out / '.lock'})")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no metrics.jsonl, no checkpoints
    finally:
        holder.kill()  # like kill -9: the lock file stays, holding the dead pid
        holder.wait(timeout=60)
    assert json.loads((out / ".lock").read_text())["pid"] == holder.pid
    summary = _toy_trainer(out, max_steps=2).fit()  # a dead holder does not block
    assert summary["step"] == 2 and (out / "metrics.jsonl").is_file()
    assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()


def test_the_run_folder_lock_is_released_when_fit_fails(tmp_path):
    def failing(items):
        raise RuntimeError("bad batch")

    with pytest.raises(TrainStepError, match="bad batch"):
        _toy_trainer(tmp_path, max_steps=2, collate=failing).fit()
    from vgskit.fileio import FolderLock

    with FolderLock(tmp_path, what="run folder"):  # free again: the failing fit released it
        pass
    assert _toy_trainer(tmp_path, max_steps=2).fit()["step"] == 2


def test_out_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    afile = tmp_path / "run"
    afile.write_text("not a folder")
    with pytest.raises(ConfigError, match=re.escape(
            f"out_dir {afile}: is a file, not a folder (choose a folder to write into)")):
        _toy_trainer(afile, max_steps=2)
    with pytest.raises(ConfigError, match=re.escape(f"out_dir {afile / 'sub'}: {afile} is a file, not a folder")):
        _toy_trainer(afile / "sub", max_steps=2)
    assert afile.read_text() == "not a folder"


# ------------------------------------------------------------------- 5. damaged checkpoints, full disk, resume


@pytest.mark.parametrize(("name", "keep"), [("model.safetensors", 0), ("optimizer.safetensors", 0.5)])
def test_resume_falls_back_past_a_damaged_checkpoint_and_says_so(tmp_path, caplog, name, keep):
    common = dict(max_steps=6, ckpt_every=2, keep_last=None)
    full = _toy_trainer(tmp_path / "full", **common)
    full.fit()
    split = tmp_path / "split"
    _toy_trainer(split, **common, stop_after_steps=4).fit()
    bad = split / "checkpoints" / "step_4" / name
    data = bad.read_bytes()
    bad.write_bytes(data[: int(len(data) * keep)])

    with caplog.at_level(logging.WARNING, logger="vgskit.train"):
        second = _toy_trainer(split, model_seed=123, **common)
        summary = second.fit(resume=True)
    assert (summary["resumed_from_step"], summary["step"]) == (2, 6)
    warning = (f"checkpoint {bad.parent} is unusable ({name} is unreadable: truncated or not a safetensors file (")
    assert warning in caplog.text
    assert "); moved it to step_4.corrupt and resuming from step_2, the newest complete checkpoint" in caplog.text
    assert (split / "checkpoints" / "step_4.corrupt" / name).read_bytes() == data[: int(len(data) * keep)]
    _assert_same(_weights(second.model), _weights(full.model))  # exact resume from the older step
    aside = split / "checkpoints" / "step_4.corrupt"
    with pytest.raises(C.CheckpointError, match=re.escape(
            f"checkpoint {aside}: {name} is unreadable: truncated or not a safetensors file (")):
        C.verify_checkpoint(aside)


def test_resume_with_no_complete_checkpoint_is_refused(tmp_path):
    _toy_trainer(tmp_path, max_steps=4, ckpt_every=2).fit()
    for step in (2, 4):
        (tmp_path / "checkpoints" / f"step_{step}" / "model.safetensors").write_bytes(b"")
    with pytest.raises(C.CheckpointError, match=re.escape(
            f"checkpoint {tmp_path / 'checkpoints'}: no complete checkpoint to resume from (step_4: model.safetensors "
            "is unreadable")):
        _toy_trainer(tmp_path, max_steps=4).fit(resume=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_2", "step_4"]


def test_truncated_checkpoint_files_are_named_on_load(tmp_path):
    model = worker.ToyDualEncoder()
    opt = torch.optim.Adam(model.parameters())
    model(worker.collate([worker.PairData()[i] for i in range(4)])).loss.backward()
    opt.step()
    path = C.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, trainer_state={"step": 2})
    data = (path / "optimizer.safetensors").read_bytes()
    (path / "optimizer.safetensors").write_bytes(data[:100])
    with pytest.raises(C.CheckpointError, match=re.escape(
            f"checkpoint {path}: optimizer.safetensors is unreadable: truncated or not a safetensors file")):
        C.load_checkpoint(path, model=worker.ToyDualEncoder(), optimizer=opt)
    (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(C.CheckpointError, match=re.escape(
            f"checkpoint {path}: model.safetensors is unreadable: truncated or not a safetensors file")):
        C.load_checkpoint(path, model=worker.ToyDualEncoder())


def test_disk_full_at_a_checkpoint_keeps_the_previous_step(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = create_model("dual_encoder_tiny")
    opt = torch.optim.Adam(model.parameters())
    _save_model_step(tmp_path, 1, model, best_step=None)
    want = _weights(model)
    _perturbed(model, 3)

    def full(module, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 64)  # what a full disk leaves: a partial file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C, "save_model", full)
    with pytest.raises(C.CheckpointError, match=re.escape(
            f"checkpoint {tmp_path / 'step_2'}: could not be written ([Errno 28] No space left on device); the "
            "previous checkpoint step_1 is intact")) as err:
        C.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, config=model_config_dict(model),
                          trainer_state={"step": 2})
    assert type(err.value).__name__ == "CheckpointWriteError"
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    assert isinstance(err.value, VGSKitError)  # the CLI prints it as `vgskit: error: ...`
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_1"]
    assert C.resolve_checkpoint(tmp_path) == tmp_path / "step_1"
    _assert_same(_weights(load_model(tmp_path)), want)


def test_weights_that_do_not_fit_their_config_are_listed(tmp_path):
    torch.manual_seed(0)
    folder = save_pretrained(create_model("dual_encoder_tiny"), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())

    def with_config(**changes) -> None:
        c = json.loads(json.dumps(config))
        for dotted, value in changes.items():
            *parents, leaf = dotted.split(".")
            node = c["config"]
            for key in parents:
                node = node[key]
            node[leaf] = value
        (folder / "config.json").write_text(json.dumps(c))

    with_config(embed_dim=16)
    with pytest.raises(InputFileError, match=re.escape(
            f"model {folder}: the weights in model.safetensors do not fit the model 'dual_encoder_tiny' that "
            "config.json describes (other shape: audio_proj.bias (file [32], model [16]), audio_proj.weight (file "
            "[32, 24], model [16, 24]), image_proj.bias (file [32], model [16]), image_proj.weight (file [32, 24], "
            "model [16, 24]))")):
        load_pretrained(folder)
    with_config(**{"audio.depths": [2]})
    with pytest.raises(InputFileError, match=re.escape(
            "config.json describes (missing: audio_encoder.stages.0.1.conv1.bias, audio_encoder.stages.0.1.conv1.weight, "
            "audio_encoder.stages.0.1.conv2.bias, audio_encoder.stages.0.1.conv2.weight, "
            "audio_encoder.stages.0.1.norm1.bias, audio_encoder.stages.0.1.norm1.weight, ... (8 in all))")):
        load_pretrained(folder)
    # A checkpoint saved with a deeper tower than its config: the extra tensors are listed as unexpected.
    deeper = save_pretrained(create_model("dual_encoder_tiny", audio={"depths": [2]}), tmp_path / "deep")
    shallow = json.loads((deeper / "config.json").read_text())
    shallow["config"]["audio"]["depths"] = [1]
    (deeper / "config.json").write_text(json.dumps(shallow))
    with pytest.raises(InputFileError, match=re.escape(
            f"model {deeper}: the weights in model.safetensors do not fit the model 'dual_encoder_tiny' that "
            "config.json describes (unexpected: audio_encoder.stages.0.1.conv1.bias, ")):
        load_pretrained(deeper)
    with_config(**{"audio.depths": [1], "audio_context_layers": 0})
    load_pretrained(folder)  # the original config fits again

    data = (folder / "model.safetensors").read_bytes()
    for damaged in (data[: len(data) // 3], b""):
        (folder / "model.safetensors").write_bytes(damaged)
        with pytest.raises(InputFileError, match=re.escape(
                f"model {folder}: model.safetensors is unreadable: truncated or not a safetensors file (")):
            load_pretrained(folder)
        with pytest.raises(InputFileError, match=re.escape(f"model {folder}: model.safetensors is unreadable")):
            load_model(folder)


# ------------------------------------------------------------------------------------ 6. the demo's own folder


def test_load_model_accepts_the_demo_output_folder(tmp_path):
    demo = tmp_path / "demo"
    root = demo / "train" / "checkpoints"
    torch.manual_seed(0)
    model = create_model("dual_encoder_tiny")
    C.update_best(root, _save_model_step(root, 3, model, best_step=3))
    _perturbed(model, 2)
    _save_model_step(root, 6, model, best_step=3)  # the last step is not the best one
    best = _weights(C.resolve_checkpoint(root / "best") and load_pretrained(root / "step_3"))
    (demo / "index").mkdir()
    (demo / "report.html").write_text("<html></html>")
    _assert_same(_weights(load_model(demo)), best)
    _assert_same(_weights(load_model(demo / "train")), best)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no model here")
    with pytest.raises(C.CheckpointError, match=re.escape(
            f"checkpoint {empty}: holds no model (expected a model folder with config.json and model.safetensors, "
            "a run folder with checkpoints/, or the demo's output folder with train/checkpoints/)")):
        load_model(empty)
    with pytest.raises(C.CheckpointError, match=re.escape(f"checkpoint {tmp_path / 'nowhere'}: does not exist")):
        load_model(tmp_path / "nowhere")
