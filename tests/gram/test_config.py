"""Typed configs: every bad key or value gets an error that names it and the fix."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from gram.config import (
    ConfigError,
    config_hash,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
)


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class Job:
    name: str
    workers: int = 2
    use_gpu: bool = False
    optim: Optim = field(default_factory=Optim)
    tags: dict[str, str] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")


def test_nested_values_and_types():
    job = from_dict(Job, {"name": "x", "optim": {"lr": 1, "betas": [0.8, 0.9]}, "shards": ["a"]})
    assert job.optim.lr == 1.0
    assert isinstance(job.optim.lr, float)
    assert job.optim.betas == (0.8, 0.9)
    assert job.shards == ["a"]
    assert job.checkpoint is None


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'.*did you mean 'lr'"):
        from_dict(Job, {"name": "x", "optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"unknown key 'wokers'.*did you mean 'workers'"):
        from_dict(Job, {"name": "x", "wokers": 3})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "workers": "two"}, r"workers: expected an integer, got 'two'"),
        ({"name": "x", "workers": True}, r"workers: expected an integer"),
        ({"name": "x", "use_gpu": "yes"}, r"use_gpu: expected true or false"),
        (
            {"name": "x", "optim": {"schedule": "linear"}},
            r"optim.schedule: must be one of 'cosine', 'constant'",
        ),
        ({"name": "x", "optim": {"betas": [1.0]}}, r"optim.betas: expected 2 items"),
        ({"name": "x", "optim": 3}, r"optim: expected a mapping"),
        ({}, r"missing required key\(s\) name"),
        ({"name": "x", "workers": 0}, r"workers must be >= 1"),
    ],
)
def test_bad_values_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Job, data)


def test_overrides_parse_yaml_scalars_and_nest():
    got = parse_overrides(
        ["optim.lr=3e-4", "workers=4", "use_gpu=true", "shards=[a, b]", "checkpoint=null"]
    )
    assert got == {
        "optim": {"lr": "3e-4"},
        "workers": 4,
        "use_gpu": True,
        "shards": ["a", "b"],
        "checkpoint": None,
    }
    assert load_config(Job, overrides=["name=x", "optim.lr=3e-4"]).optim.lr == 3e-4
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_overrides(["workers"])


def test_load_config_layers_file_then_overrides(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text("name: base\nworkers: 3\noptim:\n  lr: 0.01\n")
    job = load_config(Job, path, ["optim.schedule=constant", "workers=5"])
    assert (job.name, job.workers, job.optim.lr, job.optim.schedule) == (
        "base",
        5,
        0.01,
        "constant",
    )
    assert from_dict(Job, to_dict(job)) == job
    assert config_hash(job) == config_hash(from_dict(Job, to_dict(job)))
    assert config_hash(job) != config_hash(load_config(Job, path))


def test_config_file_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Job, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*not valid YAML"):
        load_config(Job, bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Job, listing)
