"""A real `mlflow models serve` process on a registered model: it embeds inline bytes, paths
under its media root and objects under its S3 prefix, answers everything else with a 400 that
says nothing about the file, and opens nothing outside what it allows."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gram.config import load_config
from jobs import register
from pipelines.synthetic import ClipSpec, make_clip
from tests.jobs.registry.test_served_inputs import FifoWatch
from tests.support.services import free_port, wait_for_http

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
MAX_BYTES = 300_000


@pytest.fixture(scope="module")
def served(mlflow_server, s3_server, checkpoints, tmp_path_factory):
    """The model served with one media root, one S3 prefix and small limits; yields
    (post, root, outside FIFOs, bucket, serve log)."""
    tmp = tmp_path_factory.mktemp("serving")
    root, outside = tmp / "root", tmp / "outside"
    root.mkdir()
    outside.mkdir()
    make_clip(ClipSpec(width=64, height=48, fps=10, duration=2.0), root / "clip.mp4")
    make_clip(ClipSpec(width=64, height=48, fps=10, duration=4.0), root / "long.mp4")
    for seconds in (1, 6):  # audio-only files
        subprocess.run(
            ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i",
             f"sine=frequency=440:duration={seconds}", "-c:a", "aac",
             str(root / f"tone{seconds}.m4a")],
            check=True,
        )  # fmt: skip
    watch = FifoWatch(outside, ["secret.ts", "secret.mp4", "passwd"])
    (root / "link-out.mp4").symlink_to(outside / "secret.mp4")
    (root / "evil.mp4").write_text(
        f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{outside / 'secret.ts'}\n#EXT-X-ENDLIST\n"
    )
    bucket = s3_server.make_bucket("serving-media")
    for key in ("allowed/clip.mp4", "private/clip.mp4"):
        s3_server.client().put_object(Bucket=bucket, Key=key, Body=(root / "clip.mp4").read_bytes())

    name = "gram-limits"
    cfg = load_config(
        register.RegisterConfig,
        None,
        [f"checkpoint={checkpoints.good}", f"name={name}",
         f"tracking.tracking_uri={mlflow_server.url}"],
    )  # fmt: skip
    version = register.run(cfg)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        MLFLOW_TRACKING_URI=mlflow_server.url,
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        GRAM_SERVING_MEDIA_ROOTS=str(root),
        GRAM_SERVING_S3_PREFIXES=f"s3://{bucket}/allowed/",
        GRAM_SERVING_MAX_ROWS="4",
        GRAM_SERVING_MAX_MEDIA_BYTES=str(MAX_BYTES),
        GRAM_SERVING_MAX_MEDIA_SECONDS="5",
    )
    log = tmp / "serve.log"
    server = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}/{version}",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip

    def post(columns: list[str], rows: list[list[str | None]]) -> tuple[int, dict]:
        payload = {"dataframe_split": {"columns": columns, "data": rows}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", timeout=180, proc=server)
        with watch.running():
            yield post, root, outside, bucket, log
        assert watch.opened == set(), f"opened outside the root: {watch.opened}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)


def _inline(path: Path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def test_inline_bytes_a_path_under_the_root_and_an_allowed_object_give_the_same_embedding(
    served,
):
    post, root, _, bucket, log = served
    clip = root / "clip.mp4"
    status, body = post(
        ["video", "audio"],
        [[_inline(clip), _inline(clip)], [str(clip), str(clip)],
         [f"s3://{bucket}/allowed/clip.mp4", None]],
    )  # fmt: skip
    assert status == 200, body
    inline, by_path, by_s3 = body["predictions"]
    assert inline["video_embedding"] == pytest.approx(by_path["video_embedding"], abs=1e-6)
    assert inline["audio_embedding"] == pytest.approx(by_path["audio_embedding"], abs=1e-6)
    assert by_s3["video_embedding"] == pytest.approx(by_path["video_embedding"], abs=1e-6)
    assert "Downloading artifacts" not in log.read_text(errors="replace")


def test_paths_outside_the_root_are_refused_alike_and_never_opened(served):
    post, root, outside, _, _ = served
    answers = {}
    for value in (
        "/etc/passwd",
        "/etc/no-such-file",
        str(outside / "passwd"),
        f"{root}/../outside/secret.mp4",
        str(root / "link-out.mp4"),
    ):
        status, body = post(["video"], [[value]])
        assert status == 400, (value, body)
        assert body["error_code"] == "INVALID_PARAMETER_VALUE"
        # The scoring server puts the input frame first, then "Error: " and the model's message.
        answers[value] = body["message"].split("Error: ", 1)[1].replace(repr(value), "<cell>")
    assert len(set(answers.values())) == 1, answers  # nothing tells one file from another
    assert "refused: not a path under a media root" in answers["/etc/passwd"]
    status, body = post(["video"], [[str(root / "evil.mp4")]])
    assert status == 400
    assert "not a media file this server reads" in body["message"]
    assert "secret" not in body["message"]


def test_objects_outside_the_prefix_are_refused(served):
    post, _, _, bucket, _ = served
    for uri in (f"s3://{bucket}/private/clip.mp4", f"s3://{bucket}/allowed/../private/clip.mp4"):
        status, body = post(["audio"], [[uri]])
        assert status == 400
        assert "not an s3:// URI under a prefix this server allows" in body["message"]


def test_oversize_bytes_too_many_rows_and_too_many_media_seconds_are_refused(served):
    post, root, _, _, _ = served
    big = "data:video/mp4;base64," + base64.b64encode(os.urandom(MAX_BYTES + 1)).decode()
    status, body = post(["video"], [[big]])
    assert status == 400
    assert f"limit of {MAX_BYTES} bytes" in body["message"]
    assert len(body["message"]) < 500  # the cell is named by its size, not echoed

    status, body = post(["text"], [["a clip"]] * 5)
    assert status == 400
    assert "5 rows in one request; this server takes at most 4" in body["message"]

    long = str(root / "long.mp4")  # 4 s of video and the same 4 s as audio: 8 s > 5 s
    status, body = post(["video", "audio"], [[long, long]])
    assert status == 400
    assert "serving.max_media_seconds" in body["message"]
    status, body = post(["video"], [[long]])
    assert status == 200, body


def test_audio_only_files_are_embedded_and_their_duration_counts(served):
    post, root, _, _, _ = served
    status, body = post(["audio"], [[str(root / "tone1.m4a")]])
    assert status == 200, body
    assert len(body["predictions"][0]["audio_embedding"]) > 0
    status, body = post(["audio"], [[str(root / "tone6.m4a")]])  # 6 s > 5 s
    assert status == 400
    assert "serving.max_media_seconds" in body["message"]
