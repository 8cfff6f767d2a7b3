"""The `gram` command: every subcommand's help, typo hints, and every example config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gram.config import ConfigError, load_config
from jobs import cli
from jobs.catalog import JOBS

REPO = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*cli.COMMANDS, "bench"]:
        assert f"  {name} " in out


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_subcommand_help_names_itself_and_shows_defaults(name: str, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: gram {name}")
    if name != "submit":  # submit forwards the job's own keys, listed by that job's help
        assert "config keys (default):" in out
        assert "--config" in out


def test_console_script_is_installed_and_runs():
    exe = Path(sys.executable).parent / "gram"  # installed beside this interpreter
    assert exe.is_file(), f"{exe} missing: the `gram` console script is not installed"
    res = subprocess.run([str(exe), "train", "--help"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "scaling.workers" in res.stdout


def test_train_help_explains_the_starting_points_and_the_combined_loss(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("checkpoint.init_from", "checkpoint.init_modules", "loss.cosine_weight"):
        assert out.count(key) >= 2, key  # explained in the description, listed with its default
    assert "models:/NAME@ALIAS" in out
    assert "loss.warmup_kind" in out


def test_unknown_command_and_wrong_key_name_the_closest(capsys):
    assert cli.main(["trian"]) == 2
    assert "did you mean 'train'?" in capsys.readouterr().err
    assert cli.main(["demo", "train_step=5"]) == 2
    assert "did you mean 'train_steps'?" in capsys.readouterr().err
    assert cli.main(["bench", "nope"]) == 2


def _config_classes() -> dict[str, type]:
    """The config class of every job that runs on a cluster (each has an example config)."""
    return {job.name: job.config_class() for job in JOBS if job.on_cluster}


def test_every_example_config_loads_into_its_typed_config():
    classes = _config_classes()
    files = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert {f.stem for f in files} == set(classes)
    for f in files:
        load_config(classes[f.stem], f)


def test_a_malformed_example_value_names_its_key(tmp_path: Path):
    bad = tmp_path / "train.yaml"
    bad.write_text((REPO / "jobs" / "configs" / "train.yaml").read_text() + "\nmax_steps: many\n")
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(_config_classes()["train"], bad)
