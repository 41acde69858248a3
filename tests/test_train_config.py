"""TrainConfig checks, dict -> dataclass conversion, YAML recipes and dotted overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from vgskit.errors import ConfigError
from vgskit.train.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_recipe,
    parse_override,
    to_jsonable,
    train_config_from_recipe,
)


def test_defaults_need_a_length():
    with pytest.raises(ConfigError, match="max_steps"):
        TrainConfig()
    assert TrainConfig(epochs=2).epochs == 2


def test_values_are_converted_from_yaml_types():
    cfg = config_from_dict(TrainConfig, {
        "lr": "3e-4",  # PyYAML reads this as a string (YAML 1.1); numeric fields accept it
        "max_steps": "1e3",
        "betas": [0.9, 0.98],
        "eval_every": 100,
        "grad_clip": None,
        "weight_decay": 0,
    }, prefix="train")
    assert cfg.lr == pytest.approx(3e-4) and isinstance(cfg.lr, float)
    assert cfg.max_steps == 1000 and isinstance(cfg.max_steps, int)
    assert cfg.betas == (0.9, 0.98)
    assert cfg.eval_every == 100 and cfg.grad_clip is None
    assert isinstance(cfg.weight_decay, float)
    assert config_from_dict(TrainConfig, {"epochs": 1, "eval_every": "epoch"}).eval_every == "epoch"


@pytest.mark.parametrize(("d", "key", "problem"), [
    ({"lrr": 1.0}, "train.lrr", "did you mean 'lr'"),
    ({"lr": 0}, "train.lr", "> 0"),
    ({"lr": -1e-3}, "train.lr", "> 0"),
    ({"lr": "fast"}, "train.lr", "expected a number"),
    ({"batch_size": 0}, "train.batch_size", ">= 1"),
    ({"batch_size": 8.5}, "train.batch_size", "integer"),
    ({"batch_size": True}, "train.batch_size", "integer"),
    ({"amp": "yes"}, "train.amp", "true or false"),
    ({"optimizer": "sgd"}, "train.optimizer", "one of"),
    ({"select_mode": "biggest"}, "train.select_mode", "one of"),
    ({"betas": [0.9]}, "train.betas", "2 values"),
    ({"betas": [0.9, 1.5]}, "train.betas", "[0, 1)"),
    ({"eval_every": "often"}, "train.eval_every", "expected"),
    ({"eval_every": 0}, "train.eval_every", "integer >= 1"),
    ({"grad_clip": 0}, "train.grad_clip", "> 0"),
    ({"warmup_fraction": 1.5}, "train.warmup_fraction", "[0, 1)"),
    ({"warmup_steps": 10, "warmup_fraction": 0.1}, "train.warmup_fraction", "not both"),
    ({"end_lr": 1.0, "lr": 0.1}, "train.end_lr", "[0, lr]"),
    ({"keep_last": 0}, "train.keep_last", ">= 1"),
    ({"num_workers": -1}, "train.num_workers", ">= 0"),
])
def test_errors_name_the_key(d, key, problem):
    with pytest.raises(ConfigError) as e:
        config_from_dict(TrainConfig, {"max_steps": 10, **d}, prefix="train")
    msg = str(e.value)
    assert msg.startswith(key + ":"), msg
    assert problem in msg, msg


@dataclass
class _Inner:
    size: int
    name: str = "x"


@dataclass
class _Outer:
    inner: _Inner
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)


def test_nested_dataclasses_and_errors_with_full_path():
    cfg = config_from_dict(_Outer, {"inner": {"size": 3}, "tags": ["a"], "weights": {"a": 1}}, prefix="model")
    assert cfg == _Outer(_Inner(3), ["a"], {"a": 1.0})
    with pytest.raises(ConfigError, match=r"^model\.inner\.size: missing required key"):
        config_from_dict(_Outer, {"inner": {}}, prefix="model")
    with pytest.raises(ConfigError, match=r"^model\.inner\.colour: unknown key"):
        config_from_dict(_Outer, {"inner": {"size": 1, "colour": 2}}, prefix="model")
    with pytest.raises(ConfigError, match=r"^model\.tags\[1\]: expected a string"):
        config_from_dict(_Outer, {"inner": {"size": 1}, "tags": ["a", 2]}, prefix="model")
    with pytest.raises(ConfigError, match=r"^model\.inner: expected a mapping"):
        config_from_dict(_Outer, {"inner": 5}, prefix="model")


def test_overrides_parse_values_with_yaml():
    assert parse_override("train.lr=3.0e-4") == (["train", "lr"], 3e-4)
    assert parse_override("train.grad_clip=null") == (["train", "grad_clip"], None)
    assert parse_override("train.betas=[0.9, 0.98]") == (["train", "betas"], [0.9, 0.98])
    assert parse_override("data.name=a=b") == (["data", "name"], "a=b")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("train..lr=1")

    base = {"train": {"lr": 1e-3}, "model": {"name": "m"}}
    out = apply_overrides(base, ["train.lr=3e-4", "model.enc.dim=64", "data.root=/x"])
    assert out == {"train": {"lr": "3e-4"}, "model": {"name": "m", "enc": {"dim": 64}}, "data": {"root": "/x"}}
    assert base["train"]["lr"] == 1e-3  # the input is not modified
    with pytest.raises(ConfigError, match=r"^model\.name: cannot set model\.name\.x"):
        apply_overrides(base, ["model.name.x=1"])


def test_load_recipe_with_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: dual\n  dim: 8\ndata: {root: corpus}\ntrain:\n  lr: 1e-3\n  epochs: 3\n")
    recipe = load_recipe(path, overrides=["train.lr=3e-4", "train.batch_size=16", "model.dim=16"])
    assert recipe["model"] == {"name": "dual", "dim": 16}
    cfg = train_config_from_recipe(recipe)
    assert (cfg.lr, cfg.batch_size, cfg.epochs) == (pytest.approx(3e-4), 16, 3)

    bad = load_recipe(path, overrides=["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"^train\.batch_size:"):
        train_config_from_recipe(bad)
    with pytest.raises(ConfigError, match=r"^train\.optimiser: unknown key; did you mean 'optimizer'"):
        train_config_from_recipe(load_recipe(path, overrides=["train.optimiser=adam"]))


def test_load_recipe_rejects_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "sec.yaml").write_text("train: 5\n")
    with pytest.raises(ConfigError, match="^train: recipe section must be a mapping"):
        load_recipe(tmp_path / "sec.yaml")
    (tmp_path / "broken.yaml").write_text("train: {lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(tmp_path / "broken.yaml")


def test_to_jsonable_handles_dataclasses_and_names_bad_values():
    cfg = TrainConfig(max_steps=3)
    js = to_jsonable(cfg, "train")
    assert js["betas"] == [0.9, 0.999] and js["max_steps"] == 3
    assert config_from_dict(TrainConfig, js) == cfg  # round trip through JSON types
    with pytest.raises(ConfigError, match=r"model\.fn: cannot be written as JSON"):
        to_jsonable({"fn": print}, "model")
