"""The entry point's contract, the config, the stage chain and shard bytes (no Ray needed)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gram.config import ConfigError, load_config
from jobs.preprocess import main
from pipelines.config import PreprocessConfig
from pipelines.inputs import InputItem
from pipelines.preprocess import preprocess
from pipelines.shard_task import local_executor
from pipelines.stages import build_stages, process_item
from pipelines.tar_format import END_OF_ARCHIVE, sample_bytes

REPO = Path(__file__).resolve().parents[2]


def test_help_shows_the_real_defaults():
    out = subprocess.run(
        [sys.executable, "-m", "jobs.preprocess", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for pattern in (
        r"--input",
        r"--output",
        r"--config",
        r"frames\.num_segments\s+8\n",
        r"frames\.size\s+224\n",
        r"audio\.max_seconds\s+10\.0\n",
        r'shards\.prefix\s+"shard"\n',
        r"execution\.max_failure_rate\s+0\.5\n",
        r"s3\.secret_access_key\s+\(from the environment / AWS chain; never shown\)",
    ):
        assert re.search(pattern, out), pattern


def test_example_config_loads_and_matches_the_defaults():
    cfg = load_config(PreprocessConfig, REPO / "jobs" / "configs" / "preprocess.yaml")
    assert cfg == PreprocessConfig()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("frames.num_segmnts=4", r"'frames\.num_segmnts'.*did you mean 'num_segments'"),
        ("frames.size=big", r"frames\.size: expected an integer"),
        ("frames.jpeg_quality=0", r"frames\.jpeg_quality: must be in \[1, 95\]"),
        ("execution.max_failure_rate=2", r"execution\.max_failure_rate"),
        ("inputs.duplicate_ids=ignore", r"inputs\.duplicate_ids: must be one of"),
    ],
)
def test_malformed_config_names_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(PreprocessConfig, None, [override])


def test_bad_config_or_manifest_exits_2_before_any_work(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "video": "a.mp4", "captions": ["x"]}\n{"id": "b", oops}\n')
    out = tmp_path / "out"
    assert main(["--input", str(manifest), "--output", str(out)]) == 2
    assert "m.jsonl:2: invalid JSON" in capsys.readouterr().err
    assert not out.exists()
    assert main(["--input", str(manifest), "--output", str(out), "frames.sise=3"]) == 2
    assert "did you mean 'size'" in capsys.readouterr().err
    assert main(["--output", str(out)]) == 2
    assert "input: is required" in capsys.readouterr().err


def test_per_clip_timeout_fails_the_clip_not_the_run(media_dir):
    cfg = PreprocessConfig()
    item = InputItem(
        index=0,
        line=1,
        id="slow",
        key="slow",
        video=str(media_dir["long.mp4"].path),
        audio=None,
        captions=("x",),
    )
    result = process_item(build_stages(cfg), item, timeout_s=0.05)
    assert result.row["status"] == "failed"
    assert result.row["reason"] == "timeout"
    assert result.sample == b""


def test_local_run_writes_the_same_shards_as_its_rerun(media_dir, tmp_path):
    rows = [
        {"id": f"c{n}", "video": str(media_dir[name].path), "captions": [name]}
        for n, name in enumerate(["h264_aac.mp4", "short.mp4", "broken_text.mp4"])
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PreprocessConfig(input=str(tmp_path / "m.jsonl"), output=str(tmp_path / "a"))
    cfg.shards.samples_per_shard = 2
    first = preprocess(cfg, local_executor(cfg))
    assert (first.ok, first.failed, first.shards) == (2, 1, 1)
    cfg.output = str(tmp_path / "b")
    preprocess(cfg, local_executor(cfg))
    for name in ("shard-000000.tar", "index.json", "manifest.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not (tmp_path / "a" / "shard-000001.tar").exists()  # its only input failed
    state = json.loads((tmp_path / "a" / "_state" / "shard-000001.json").read_text())
    assert (state["name"], state["failed_by_reason"]) == (None, {"unreadable": 1})
    part = pq.read_table(tmp_path / "a" / "manifest" / "shard-000001.parquet").to_pylist()
    assert [(r["id"], r["reason"]) for r in part] == [("c2", "unreadable")]


def test_sample_bytes_are_a_valid_deterministic_tar():
    members = [("f000.jpg", b"\xff\xd8jpeg"), ("captions.json", b'["a"]'), ("json", b"{}")]
    data = sample_bytes("key_1", members) + sample_bytes("key_2", members) + END_OF_ARCHIVE
    assert data == sample_bytes("key_1", members) + sample_bytes("key_2", members) + END_OF_ARCHIVE
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        assert tar.extractfile("key_2.captions.json").read() == b'["a"]'
    assert names == [f"key_{k}.{s}" for k in (1, 2) for s, _ in members]
    with pytest.raises(ValueError, match="invalid sample key"):
        sample_bytes("bad.key", members)
