"""Recipes that extend a ``base`` recipe: deep merge, chains, lookup rules, errors, and the built-in recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vgskit.errors import ConfigError
from vgskit.train.config import BUILTIN_RECIPE_DIR, load_recipe, resolve_recipe_bases

GOLDEN = Path(__file__).parent / "golden"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BASE = """\
model: {name: dual, dims: [64, 32], enc: {width: 8, depth: 2}}
data: {root: corpus, captions_per_image: 2}
train: {lr: 1.0e-3, epochs: 3, betas: [0.9, 0.999]}
"""


def test_child_is_deep_merged_over_its_base(tmp_path):
    _write(tmp_path / "base.yaml", BASE)
    child = _write(tmp_path / "child.yaml", """\
base: base
model: {dims: [16], enc: {depth: 4}}
data: {captions_per_image: null}
train: {lr: 3.0e-4}
extra: {x: 1}
""")
    got = load_recipe(child)
    assert got == {
        "model": {"name": "dual", "dims": [16], "enc": {"width": 8, "depth": 4}},  # lists replace, maps merge
        "data": {"root": "corpus", "captions_per_image": None},  # null replaces too
        "train": {"lr": 3.0e-4, "epochs": 3, "betas": [0.9, 0.999]},
        "extra": {"x": 1},
    }
    assert "base" not in got


def test_empty_child_section_changes_nothing(tmp_path):
    _write(tmp_path / "base.yaml", BASE)
    child = _write(tmp_path / "child.yaml", "base: base\ntrain:\n")
    assert load_recipe(child)["train"] == {"lr": 1.0e-3, "epochs": 3, "betas": [0.9, 0.999]}


def test_chained_bases_and_relative_paths(tmp_path):
    _write(tmp_path / "shared" / "root.yaml", BASE)
    _write(tmp_path / "shared" / "mid.yml", "base: root\ntrain: {epochs: 5}\ndata: {root: other}\n")
    child = _write(tmp_path / "exp" / "child.yaml", "base: ../shared/mid.yml\ntrain: {lr: 0.5}\n")
    got = load_recipe(child)
    assert got["train"] == {"lr": 0.5, "epochs": 5, "betas": [0.9, 0.999]}  # child > mid > root
    assert got["data"] == {"root": "other", "captions_per_image": 2}
    # An absolute path works from anywhere.
    elsewhere = _write(tmp_path / "x" / "y" / "c.yaml", f"base: {tmp_path / 'shared' / 'mid.yml'}\n")
    assert load_recipe(elsewhere)["train"]["epochs"] == 5


def test_name_prefers_the_childs_folder_then_the_builtin_recipes(tmp_path):
    # A local file of the same name as a built-in base wins over it.
    _write(tmp_path / "_speechclip_common.yaml", "train: {lr: 7.0}\n")
    local = _write(tmp_path / "a.yaml", "base: _speechclip_common\n")
    assert load_recipe(local) == {"train": {"lr": 7.0}}
    # Otherwise the built-in folder is searched.
    other = _write(tmp_path / "sub" / "b.yaml", "base: _speechclip_flickr8k\nmodel: {name: speechclip_parallel_base}\n")
    got = load_recipe(other)
    assert got["data"]["corpus"] == "flickr8k" and got["train"]["max_steps"] == 50000
    assert got["model"] == {"name": "speechclip_parallel_base", "vocab_from_captions": True,
                            "vocab_caption_splits": "all_splits"}


def test_overrides_apply_after_the_merge(tmp_path):
    _write(tmp_path / "base.yaml", BASE)
    child = _write(tmp_path / "child.yaml", "base: base\ntrain: {lr: 3.0e-4}\n")
    got = load_recipe(child, overrides=["train.lr=1.0e-5", "train.epochs=9", "model.enc.width=4"])
    assert got["train"] == {"lr": 1.0e-5, "epochs": 9, "betas": [0.9, 0.999]}
    assert got["model"]["enc"] == {"width": 4, "depth": 2}


def test_cycles_are_named(tmp_path):
    a = _write(tmp_path / "a.yaml", "base: b\ntrain: {lr: 1}\n")
    _write(tmp_path / "b.yaml", "base: c.yaml\n")
    _write(tmp_path / "c.yaml", "base: a\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml$"):
        load_recipe(a)
    itself = _write(tmp_path / "self.yaml", "base: self\n")
    with pytest.raises(ConfigError, match=r"cycle: .*self\.yaml -> .*self\.yaml$"):
        load_recipe(itself)


def test_missing_or_bad_base_names_the_child_and_the_base(tmp_path):
    child = _write(tmp_path / "child.yaml", "base: nowhere\n")
    with pytest.raises(ConfigError, match=r"^recipe .*child\.yaml: base 'nowhere' not found \(looked for .*"
                                          r"nowhere\.yaml"):
        load_recipe(child)
    rel = _write(tmp_path / "rel.yaml", "base: ../missing.yaml\n")
    with pytest.raises(ConfigError, match=r"^recipe .*rel\.yaml: base '\.\./missing\.yaml' not found"):
        load_recipe(rel)
    # A missing base further down the chain names the recipe that refers to it.
    _write(tmp_path / "mid.yaml", "base: gone\n")
    top = _write(tmp_path / "top.yaml", "base: mid\n")
    with pytest.raises(ConfigError, match=r"^recipe .*mid\.yaml: base 'gone' not found"):
        load_recipe(top)
    for bad in ("base: 3\n", "base:\n", "base: [a, b]\n"):
        f = _write(tmp_path / "bad.yaml", bad)
        with pytest.raises(ConfigError, match=r"^recipe .*bad\.yaml: base: must be a recipe name or a \.yaml path"):
            load_recipe(f)
    _write(tmp_path / "broken.yaml", "train: 5\n")
    child = _write(tmp_path / "uses_broken.yaml", "base: broken\n")
    with pytest.raises(ConfigError, match="^train: recipe section must be a mapping"):
        load_recipe(child)


def test_dict_recipe_with_base(tmp_path, monkeypatch):
    d = {"base": "_speechclip_spokencoco", "model": {"name": "speechclip_cascaded_large"}, "train": {"lr": 2.0e-4}}
    got = resolve_recipe_bases(d, None)
    assert got["model"] == {"name": "speechclip_cascaded_large", "vocab_from_captions": True,
                            "vocab_caption_splits": "all_splits"}
    assert got["data"]["corpus"] == "spokencoco"
    assert got["train"]["lr"] == 2.0e-4 and got["train"]["warmup_steps"] == 5000
    assert d["base"] == "_speechclip_spokencoco"  # the input is not modified
    assert resolve_recipe_bases({"train": {"lr": 1}}, None) == {"train": {"lr": 1}}
    # Without an origin a path is relative to the current directory.
    _write(tmp_path / "mine.yaml", BASE)
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe_bases({"base": "mine.yaml", "train": {"lr": 1}}, None)["train"]["epochs"] == 3
    with pytest.raises(ConfigError, match=r"^recipe <recipe dict>: base 'nope' not found"):
        resolve_recipe_bases({"base": "nope"}, None)


def test_builtin_speechclip_recipes_resolve_to_their_previous_content():
    """The eight paper recipes extend shared bases; fully resolved, each equals its recorded content (a change to a
    base or a recipe shows here, and the record is updated with it)."""
    want = json.loads((GOLDEN / "recipes_resolved.json").read_text())
    assert sorted(want) == sorted(p.stem for p in BUILTIN_RECIPE_DIR.glob("speechclip_*.yaml"))
    for name, resolved in want.items():
        path = BUILTIN_RECIPE_DIR / f"{name}.yaml"
        assert load_recipe(path) == resolved, name
        assert "base:" in path.read_text()  # the shared settings really come from a base recipe


def test_base_only_recipes_are_marked():
    # Base-only recipes start with "_" so that listings of runnable recipes can leave them out.
    bases = sorted(p.stem for p in BUILTIN_RECIPE_DIR.glob("_*.yaml"))
    assert {"_speechclip_common", "_speechclip_flickr8k", "_speechclip_spokencoco", "_fast_vgs_common"} <= set(bases)
    for name in bases:
        assert "name" not in (load_recipe(BUILTIN_RECIPE_DIR / f"{name}.yaml").get("model") or {})
