"""The one config mechanism (hope_kernels.config.Config): unknown keys, types, ranges and key paths, for the
simulation, predictor, training, adaptation and A-B-A configs."""

import copy
import dataclasses
from typing import ClassVar

import pytest

from hope_kernels.aba import AbaConfig, load_config, validate_config
from hope_kernels.adapt import AdaptOptions
from hope_kernels.config import (
    Config,
    PredictorConfig,
    TrainConfig,
    at_least,
    one_of,
    read_shipped_config,
    setting,
    shipped_configs,
)
from hope_kernels.data.simulate import SimConfig, make_config


@dataclasses.dataclass
class Inner(Config):
    WHAT: ClassVar[str] = "inner"
    rate: float = setting(0.5, at_least(0))
    sizes: list[int] | None = setting(None, lambda v: None if v else "must not be empty")


@dataclasses.dataclass
class Outer(Config):
    WHAT: ClassVar[str] = "outer"
    name: str
    mode: str = setting("a", one_of("a", "b"))
    inner: Inner | None = None
    items: list[Inner] = dataclasses.field(default_factory=list)
    table: dict[str, int] = dataclasses.field(default_factory=dict)
    shape: tuple[int, ...] = (1, 2)


def test_from_dict_names_the_key_path():
    o = Outer.from_dict(
        {"name": "x", "inner": {"rate": 1}, "items": [{}, {"sizes": [3]}], "table": {"k": 2}, "shape": [4, 5]}
    )
    assert o.inner.rate == 1 and o.items[1].sizes == [3] and o.shape == (4, 5)
    cases = [
        ({"name": "x", "nme": 1}, r"unknown outer keys \['nme'\]; known: \['inner', 'items', 'mode', 'name', "),
        ({}, "outer is missing 'name'"),
        ({"name": 3}, "name must be a string, got 3"),
        ({"name": "x", "mode": "c"}, r"mode must be one of \('a', 'b'\), got 'c'"),
        ({"name": "x", "inner": {"rate": -1}}, r"inner.rate must be >= 0, got -1"),
        ({"name": "x", "inner": {"rat": 1}}, r"unknown inner keys \['rat'\] at inner; known"),
        ({"name": "x", "inner": 3}, "inner must be a mapping or None, got 3"),
        ({"name": "x", "items": [{}, {"sizes": []}]}, r"items\[1\].sizes must not be empty, got \[\]"),
        ({"name": "x", "items": [{}, {"sizes": [1, "2"]}]}, r"items\[1\].sizes\[1\] must be an int, got '2'"),
        ({"name": "x", "table": {"k": 1.5}}, "table.k must be an int, got 1.5"),
        ({"name": "x", "inner": {"rate": True}}, "inner.rate must be a number or None|inner.rate must be a num"),
        ({"name": "x", "shape": "ab"}, "shape must be a list of int, got 'ab'"),
    ]
    for d, match in cases:
        with pytest.raises(ValueError, match=match):
            Outer.from_dict(d)
    with pytest.raises(ValueError, match=r"job.items\[0\].rate must be >= 0"):
        Outer.from_dict({"name": "x", "items": [{"rate": -1.0}]}, "job")


def test_checks_run_on_direct_construction_and_to_dict_round_trips():
    with pytest.raises(ValueError, match="mode must be one of"):
        Outer(name="x", mode="z")
    o = Outer.from_dict({"name": "x", "items": [{"rate": 2.0}]})
    d = o.to_dict()
    assert d == {
        "name": "x",
        "mode": "a",
        "inner": None,
        "items": [{"rate": 2.0, "sizes": None}],
        "table": {},
        "shape": [1, 2],
    }
    assert Outer.from_dict(d) == o


@pytest.mark.parametrize("cls", [PredictorConfig, TrainConfig, SimConfig, AdaptOptions])
def test_every_config_round_trips(cls):
    c = cls()
    assert cls.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match=rf"unknown {cls.WHAT} keys \['nope'\]"):
        cls.from_dict({"nope": 1})


def test_predictor_train_and_sim_configs_keep_their_checks():
    with pytest.raises(ValueError, match="width 97 must be divisible by heads 4"):
        PredictorConfig(width=97)
    with pytest.raises(ValueError, match=r"model.grid must be \(T, H, W\)"):
        PredictorConfig.from_dict({"grid": [8, 8]}, "model")
    assert PredictorConfig.from_dict({"grid": [2, 3, 4]}).grid == (2, 3, 4)
    with pytest.raises(ValueError, match="lr must be a number, got '1e-3'"):  # YAML 1.1 reads 1e-3 as a string
        TrainConfig.from_dict({"lr": "1e-3"})
    assert TrainConfig.from_dict({"phases": "B"}).phases == ["B"]
    assert TrainConfig().to_dict() == dataclasses.asdict(TrainConfig())
    with pytest.raises(ValueError, match="train_b must be a non-negative int, got -1"):
        make_config("tiny", train_b=-1)
    with pytest.raises(ValueError, match=r"unknown simulation config keys \['mu'\]"):
        make_config("tiny", mu=1.0)
    with pytest.raises(ValueError, match=r"mu_b must be > 0 \(the physics needs mu > 0 and mass > 0\), got 0.0"):
        make_config("tiny", mu_b=0.0)
    assert make_config("tiny").to_dict() == dataclasses.asdict(make_config("tiny"))


def test_adapt_options_defaults_and_checks():
    o = AdaptOptions()
    assert (o.lr, o.steps, o.optimizer, o.memory_lr_scale, o.ttt_params) == (1e-3, 1, "adamw", 1.0, "layernorm")
    with pytest.raises(ValueError, match="memory_lr_scale must be a finite number > 0"):
        AdaptOptions.from_dict({"memory_lr_scale": float("inf")})
    with pytest.raises(ValueError, match="steps must be an int, got 1.5"):
        AdaptOptions.from_dict({"steps": 1.5})
    clips = [{"latents": None}]
    assert AdaptOptions.from_dict({"fisher_clips": clips}).fisher_clips is clips


@pytest.mark.parametrize("name", shipped_configs("aba_"))
def test_shipped_aba_presets_load_unchanged(name):
    raw = read_shipped_config(name, "aba_")
    cfg = load_config(name)
    assert cfg == raw  # results.json records the mapping as the file holds it
    again = copy.deepcopy(cfg)
    assert validate_config(again) is again and again == raw
    typed = AbaConfig.from_dict(cfg, "aba")
    assert [r.name for r in typed.runs] == [r["name"] for r in raw["runs"]] and typed.compile is False


@pytest.mark.parametrize("name", shipped_configs("train_"))
def test_shipped_training_configs_load(name):
    assert TrainConfig.from_dict(read_shipped_config(name, "train_")).steps >= 1


def test_aba_compile_key():
    assert AbaConfig.from_dict(load_config("quick", compile=True), "aba").compile is True
    with pytest.raises(ValueError, match="aba.compile must be a bool, got 1"):
        load_config("quick", compile=1)
    with pytest.raises(ValueError, match=r"aba.tuning.grids.hope\[2\].cms_lr must be >= 0, got -1"):
        cfg = load_config("quick")
        cfg["tuning"]["grids"]["hope"][2]["cms_lr"] = -1
        validate_config(cfg)


def test_aba_pretrain_sections_hold_training_fields():
    for edit, match in [
        (lambda c: c["pretrain"]["hope"].update(stepz=1), "aba.pretrain has 'hope', which is not"),
        (
            lambda c: c["runs"][8]["pretrain"].update(per_seed=True),
            r"aba.runs\[8\].pretrain has keys that are not training config fields: \['per_seed'\]",
        ),
    ]:
        cfg = load_config("quick")
        edit(cfg)
        with pytest.raises(ValueError, match=match):
            validate_config(cfg)
