"""Every documented command runs as printed.

Each shell command in README.md, docs/*.md and infra/README.md that runs `gram`,
`python -m jobs.*`, `mlflow`, `curl` or `ray job submit` (in a fenced `bash`/`sh`/`shell`
block, or after a `$ ` prompt in any block) must be an entry of COMMANDS, keyed by its text
as printed (continuation lines joined, the trailing comment dropped):

- `Run(...)`: the test runs it with bash, in a copy of the project, with the documented
  placeholders (README.md, "Placeholders in the examples") replaced by the session's real
  services: the 2-node Ray cluster, moto's S3 server, the `mlflow server`. A command
  printed with its output (`$ command` and the lines below it) must print that output.
- `NotHere("why")`: it cannot run on this machine (GPUs, KubeRay, a compose stack, ...).

A command that is new or changed in the docs fails `test_every_documented_command_is_covered`
(no services needed) until it gets its entry; an entry no doc prints any more fails it too.
Covering a new command is one line here.

How the commands run: files in RUN_ORDER (producers before consumers), blocks top to bottom,
each block as one shell session: its `export` lines hold for the commands after them, and a
server it starts (`Run(serves=...)`) answers the block's later commands and is stopped at
the block's end. A command printed twice runs once. The shell is the one the docs describe:
the venv's `bin` first on PATH, RAY_ADDRESS and the token of the cluster, the AWS variables
and the endpoint of the S3 server, MLFLOW_TRACKING_URI of the MLflow server. The working
directory holds what the docs assume exists: clips (`clips/` with its `captions.jsonl`, and
`manifest.jsonl` naming them), shards (`shards/eval`, `shards/v1`, `demo-output/shards/`),
a clip under `/data/clips`, and on S3 the raw clips (`s3://videos/raw/`) and eval shards
(`s3://bucket/shards/eval`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.services import MlflowServer, RayCluster, S3Server, free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DOCS = ("README.md", "infra/README.md", "docs/*.md")
RUN_ORDER = (
    "docs/extending.md",  # makes shards/train
    "README.md",  # trains (local and S3), registers and promotes `gram`
    "docs/preprocessing.md",
    "docs/training.md",
    "docs/registry.md",
    "infra/README.md",
)
TRACKED = re.compile(r"(gram|python -m jobs\.\w+|mlflow|curl|ray job submit)(\s|$)")
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=(\S+)\s+")
SCRIPTS = ("bash", "sh", "shell")
"""Fence languages whose every line is a command; in other blocks only `$ ` lines are."""
BUCKET = "docs-data"


@dataclass(frozen=True)
class Run:
    """Run the command. `exit`: the exit codes the docs give for it; `expect`: text its
    output holds (one of them, for several); `serves`: it starts a server, up once this
    path answers, running for the rest of its block."""

    exit: tuple[int, ...] = (0,)
    expect: tuple[str, ...] = ()
    serves: str = ""


@dataclass(frozen=True)
class NotHere:
    """The command cannot run on this machine, for the reason given."""

    why: str


GATED = Run(exit=(0, 1), expect=("PROMOTED", "REFUSED", "already the champion"))
"""A promotion: promoted (0) or refused by the gate (1), as the numbers of the day decide."""
ROLLBACK = Run(exit=(0, 1), expect=("ROLLED BACK", "nothing to roll back to"))
"""A rollback: done (0), or refused when no version is aliased `previous` (1)."""
SERVE = Run(serves="/ping")
EMBEDDING = Run(expect=('"text_embedding"',))

COMMANDS: dict[str, Run | NotHere] = {
    # README.md
    "gram --help": Run(expect=("rollback",)),
    "gram train --help": Run(expect=("config keys (default):",)),
    "gram train --config jobs/configs/train.yaml data.train=shards/train data.eval=shards/eval "
    "scaling.workers=2": Run(expect=("done: step 10",)),
    "gram train --config jobs/configs/train.yaml data.train=shards/train scaling.workers=0": Run(
        expect=("done: step 10",)
    ),
    "gram train optim.l=3e-4": Run(exit=(2,)),
    "gram preprocess --input s3://videos/raw/ --output s3://videos/shards/v1": Run(
        expect=("8 ok",)
    ),
    "gram train --config jobs/configs/train.yaml data.train=s3://videos/shards/v1 "
    "checkpoint.storage=s3://videos/runs": Run(expect=("checkpoint: s3://",)),
    "mlflow server --backend-store-uri postgresql://... --artifacts-destination "
    "s3://mlflow/artifacts --host 0.0.0.0 --port 5000": NotHere(
        "needs PostgreSQL; the suite runs this `mlflow server` with a sqlite backend "
        "(tests/support/services.py) and every command here uses it"
    ),
    "gram submit train --address http://HEAD:8265 --wait --config jobs/configs/train.yaml "
    "name=gram-base-v1 model=base_minilm data.train=s3://bucket/shards/train "
    "checkpoint.storage=s3://bucket/runs scaling.workers=64 scaling.use_gpu=true "
    "data.batch_size=64": NotHere(
        "64 GPU workers; tests/jobs/cluster/test_submit_train.py submits this form with 2 "
        "CPU workers to the session's cluster"
    ),
    "gram evaluate model=demo-output/runs/gram-tiny/checkpoint_... eval.shards=shards/eval": Run(
        expect=("text -> (video+audio) R@1",)
    ),
    "gram register checkpoint=demo-output/runs/gram-tiny/checkpoint_... name=gram": Run(
        expect=("registered",)
    ),
    "gram promote  name=gram version=candidate eval.shards=shards/eval": GATED,
    "gram rollback name=gram": ROLLBACK,
    "GRAM_SERVING_MEDIA_ROOTS=/data/clips mlflow models serve -m models:/gram@champion "
    "--env-manager local -h 127.0.0.1 -p 5001": SERVE,
    "curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d "
    '\'{"dataframe_split": {"columns": ["text"], "data": [["a red square and a whistle"]]}}\'': (
        EMBEDDING
    ),
    "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/auth_token ray job submit --address "
    'http://HEAD:8265 --working-dir . --runtime-env-json \'{"excludes": [".git", ".venv", '
    '...], "env_vars": {"AWS_ENDPOINT_URL": "http://minio:9000", "MLFLOW_TRACKING_URI": '
    '"http://mlflow:5000"}}\' -- python -m jobs.train --config jobs/configs/train.yaml '
    "scaling.workers=16": NotHere(
        "an excerpt (the runtime env is elided) and 16 workers; the full command that "
        "`gram submit` prints is run by tests/jobs/cluster/test_submit.py"
    ),
    # docs/extending.md
    "gram preprocess --input manifest.jsonl --output shards/train": Run(expect=("8 ok",)),
    "gram train --config jobs/configs/train.yaml model=tiny_subtitles data.train=shards/train": (
        NotHere("`tiny_subtitles` is the model config the worked example has the reader write")
    ),
    # docs/preprocessing.md
    "python -m jobs.preprocess --input manifest.jsonl --output shards/train": Run(expect=("8 ok",)),
    "python -m jobs.preprocess --input clips/ --output shards/clips": Run(expect=("8 ok",)),
    "python -m jobs.preprocess --input s3://videos/raw/ --output s3://videos/shards/v1 "
    "s3.endpoint_url=http://minio:9000": Run(expect=("8 ok",)),
    "ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.preprocess "
    "--input s3://videos/raw/ --output s3://videos/shards/v1 --config "
    "jobs/configs/preprocess.yaml": NotHere(
        "the job's driver reads S3 with the cluster nodes' own credentials, which the "
        "session's cluster may not have (it can start before the S3 server); "
        "tests/jobs/cluster/test_submit.py submits this job with them forwarded"
    ),
    "gram inspect shards/v1": Run(expect=("status: ok 8",)),
    "gram inspect s3://videos/shards/v1 --samples 16 --out sheet.png --seed 1": Run(),
    # docs/training.md
    "RAY_ADDRESS=127.0.0.1:6379 python -m jobs.train --config jobs/configs/train.yaml "
    "name=gram-base-v1 model=base_minilm data.train=s3://bucket/shards/train "
    "data.eval=s3://bucket/shards/eval checkpoint.storage=s3://bucket/runs "
    "s3.endpoint_url=http://minio:9000 scaling.workers=16 scaling.use_gpu=true "
    "scaling.cpus_per_worker=8 data.batch_size=64 tracking.tracking_uri=http://mlflow:5000": (
        NotHere("16 GPU workers of 8 CPUs each")
    ),
    "gram train --config jobs/configs/train.yaml name=cos loss.kind=cosine_anchor": Run(
        expect=("done: step 10",)
    ),
    "gram train --config jobs/configs/train.yaml name=gram-ft loss.kind=gram "
    "checkpoint.init_from=demo-output/runs/cos/checkpoint_...": Run(
        expect=("starting from the weights of",)
    ),
    "gram evaluate model=demo-output/runs/gram-ft/checkpoint_... eval.shards=shards/eval "
    "baseline=source eval.parallel.local=true": Run(expect=("against the baseline /",)),
    "gram train --config jobs/configs/train.yaml name=av-from-champion "
    "checkpoint.init_from=models:/gram@champion 'checkpoint.init_modules=[video, audio]'": Run(
        expect=("starting from the weights of models:/gram/",)
    ),
    # docs/registry.md
    "python -m jobs.evaluate --config jobs/configs/evaluate.yaml "
    "model=s3://bucket/runs/gram-tiny/checkpoint_... eval.shards=s3://bucket/shards/eval "
    "output=s3://bucket/evaluations/tiny": Run(expect=("report: s3://",)),
    "python -m jobs.evaluate model=models:/gram@champion eval.shards=shards/eval": Run(),
    "python -m jobs.evaluate model=demo-output/runs/gram-tiny/checkpoint_.../model.safetensors "
    "eval.shards=shards/eval eval.parallel.local=true": Run(),
    "python -m jobs.evaluate model=models:/gram@champion eval.shards=shards/eval "
    "'eval.classification.label_fields=[color, sound]' 'eval.classification.prompts=[\"a "
    '{color} square and a {sound}", "{color} square with {sound} sound"]\'': Run(),
    "python -m jobs.register checkpoint=s3://bucket/runs/gram-tiny/checkpoint_... name=gram "
    "eval.shards=s3://bucket/shards/eval": Run(expect=("registered",)),
    "MLFLOW_TRACKING_URI=http://mlflow:5000 GRAM_SERVING_MEDIA_ROOTS=/data/clips "
    "GRAM_SERVING_S3_PREFIXES=s3://bucket/clips/ MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false "
    "mlflow models serve -m models:/gram@champion --env-manager local -h 127.0.0.1 -p 5001": SERVE,
    "curl -s -X POST http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d "
    '\'{"dataframe_split": {"columns": ["text"], "data": [["a red square and a whistle"]]}}\'': (
        EMBEDDING
    ),
    "curl -s -X POST http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d "
    '\'{"inputs": {"text": ["a red square"], "video": ["/data/clips/a.mp4"]}, "params": '
    '{"volume": true}}\'': Run(expect=('"volume"',)),
    "curl -s -X POST http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d "
    '"{\\"inputs\\": {\\"video\\": [\\"data:video/mp4;base64,$(base64 -w0 /data/clips/a.mp4)'
    '\\"]}}"': Run(expect=('"video_embedding"',)),
    "python -m jobs.promote --config jobs/configs/promote.yaml name=gram version=candidate": GATED,
    "python -m jobs.promote name=gram version=2 eval.shards=s3://bucket/shards/eval "
    'gate.at_least.volume_t2i_r1=40 note="weekly retrain"': GATED,
    'python -m jobs.promote --rollback name=gram note="regression seen in production"': ROLLBACK,
    # infra/README.md
    "python -m jobs.submit train --profile infra/compose/submit-profile.yaml --wait "
    "--config jobs/configs/train.yaml": NotHere("needs the compose stack (docker compose)"),
    "python -m jobs.submit preprocess --profile infra/kuberay/submit-profile.yaml --wait -- "
    "--input s3://gram-data/raw/ --output s3://gram-data/shards/v1/": NotHere(
        "needs a KubeRay cluster"
    ),
    "python -m jobs.submit --help": Run(expect=("--storage-endpoint",)),
    "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=infra/compose/secrets/ray_auth_token ray job "
    "submit --address http://127.0.0.1:8265 --submission-id gram-train-... --working-dir . "
    '--runtime-env-json \'{"excludes":[".git",".venv",...],"env_vars":{"AWS_ENDPOINT_'
    'URL":"http://minio:9000","MLFLOW_S3_ENDPOINT_URL":"http://minio:9000","AWS_DEFAULT_REGION"'
    ':"us-east-1","MLFLOW_TRACKING_URI":"http://mlflow:5000"}}\' --metadata-json '
    '\'{"gram.job":"train",...}\' -- python -m jobs.train --config jobs/configs/train.yaml': (
        NotHere("what `gram submit` prints for the compose stack (elided); needs that stack")
    ),
}


# --- reading the docs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One documented command: where it is, its text, and the output printed under it."""

    where: str
    text: str
    output: tuple[str, ...] = ()

    @property
    def tracked(self) -> bool:
        """It runs one of the tracked programs (after any `NAME=value` prefixes)."""
        rest = self.text
        while found := ASSIGNMENT.match(rest):
            rest = rest[found.end() :]
        return TRACKED.match(rest) is not None


def _doc_files() -> list[Path]:
    found = [p for pattern in DOCS for p in sorted(REPO.glob(pattern))]
    order = {name: i for i, name in enumerate(RUN_ORDER)}
    return sorted(found, key=lambda p: order.get(p.relative_to(REPO).as_posix(), len(order)))


def _strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a `#` after a blank, outside quotes)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _commands(body: list[str], lang: str, where: str, first: int) -> list[Command]:
    """The commands of one fenced block (in a shell block every line; elsewhere the
    `$ ` lines, each with the output lines printed under it)."""
    out: list[Command] = []
    i = 0
    while i < len(body):
        line, start = body[i], i
        prompt = line.startswith("$ ")
        if not prompt and lang not in SCRIPTS:
            i += 1
            continue
        text = line[2:] if prompt else line
        while text.rstrip().endswith("\\") and i + 1 < len(body):
            i += 1
            text = text.rstrip()[:-1].rstrip() + " " + body[i].strip()
        text = _strip_comment(text).strip()
        i += 1
        printed: list[str] = []
        while prompt and i < len(body) and not body[i].startswith("$ "):
            printed.append(body[i])
            i += 1
        if text:
            out.append(Command(f"{where}:{first + start}", text, tuple(printed)))
    return out


def documented() -> list[list[Command]]:
    """Every fenced block of the docs (RUN_ORDER first) as its list of commands."""
    blocks: list[list[Command]] = []
    for path in _doc_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        rel = path.relative_to(REPO).as_posix()
        i = 0
        while i < len(lines):
            fence = re.match(r"\s*(`{3,}|~{3,})\s*(\S*)", lines[i])
            if not fence:
                i += 1
                continue
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith(fence.group(1)):
                end += 1
            body = [
                x.removeprefix(" " * (len(lines[i]) - len(lines[i].lstrip())))
                for x in lines[i + 1 : end]
            ]
            blocks.append(_commands(body, fence.group(2).lower(), rel, i + 2))
            i = end + 1
    return blocks


def _indented_commands() -> list[str]:
    """Commands in indented (unfenced) code blocks: they belong in fenced blocks."""
    found = []
    for path in _doc_files():
        fenced = False
        lines = path.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            if re.match(r"\s*(`{3,}|~{3,})", line):
                fenced = not fenced
            elif not fenced and line.startswith("    ") and Command("", line.strip()).tracked:
                found.append(f"{path.relative_to(REPO)}:{n + 1}: {line.strip()}")
    return found


def test_every_documented_command_is_covered() -> None:
    commands = [c for block in documented() for c in block if c.tracked]
    missing = [f"{c.where}: {c.text}" for c in commands if c.text not in COMMANDS]
    assert not missing, (
        "documented commands that no test runs: add each to COMMANDS in "
        "tests/test_docs_commands.py (Run(...), or NotHere('why')):\n" + "\n".join(missing)
    )
    stale = sorted(set(COMMANDS) - {c.text for c in commands})
    assert not stale, "COMMANDS entries that no doc prints any more:\n" + "\n".join(stale)
    assert not _indented_commands(), "put these in fenced ```bash blocks:\n" + "\n".join(
        _indented_commands()
    )


# --- running them --------------------------------------------------------------------------


@dataclass
class Workspace:
    """Where the commands run, what the placeholders stand for, and the shell's environment."""

    root: Path
    env: dict[str, str]
    values: dict[str, str]
    s3: S3Server
    ran: set[str] = field(default_factory=set)

    def substitute(self, text: str) -> str:
        """The command with the documented placeholders replaced (see README.md)."""
        text = text.replace("http://HEAD:8265", self.values["dashboard"])
        text = text.replace("http://minio:9000", self.values["s3"])
        text = text.replace("http://mlflow:5000", self.values["mlflow"])
        text = re.sub(r"(127\.0\.0\.1:|-p )5001\b", rf"\g<1>{self.values['port']}", text)
        text = re.sub(r"s3://(videos|bucket)/", f"s3://{BUCKET}/", text)
        text = text.replace("/data/clips", str(self.root / "data" / "clips"))
        text = re.sub(
            r"\b([A-Z][A-Z0-9_]*)=\.\.\.(?=\s|$)", lambda m: f"{m[1]}={self.env[m[1]]}", text
        )
        return re.sub(r"((?:s3://)?[\w./-]*/)checkpoint_\.\.\.", self._checkpoint, text)

    def _checkpoint(self, found: re.Match[str]) -> str:
        """`<run folder>/checkpoint_...`: the run's newest checkpoint folder."""
        run = found[1]
        if run.startswith("s3://"):
            bucket, _, prefix = run.removeprefix("s3://").partition("/")
            listed = self.s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
            names = {o["Key"][len(prefix) :].split("/")[0] for o in listed.get("Contents", [])}
        else:
            names = {p.name for p in (self.root / run).iterdir()}
        newest = max((n for n in names if re.match(r"checkpoint_\d", n)), default="")
        assert newest, f"no checkpoint in {run}: the command that trains it has not run"
        return run + newest


def _prepare(root: Path, clips: Path, s3: S3Server) -> None:
    """The files the docs assume (see the module docstring)."""
    from jobs.preprocess import run as preprocess
    from pipelines.config import PreprocessConfig

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("gram", "jobs", "pipelines"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", root)
    (root / "clips").mkdir()
    rows = []
    for line in (clips / "captions.jsonl").read_text().splitlines():
        rows.append(line.replace('"video": "', '"video": "clips/'))
        name = line.split('"video": "')[1].split('"')[0]
        shutil.copy(clips / name, root / "clips" / name)
    (root / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    shutil.copy(clips / "captions.jsonl", root / "clips")
    (root / "data" / "clips").mkdir(parents=True)
    shutil.copy(clips / "demo_0000.mp4", root / "data" / "clips" / "a.mp4")
    preprocess(PreprocessConfig(input=str(root / "manifest.jsonl"), output=str(root / "eval")))
    for target in (
        "shards/eval",
        "shards/v1",
        "demo-output/shards/train",
        "demo-output/shards/eval",
    ):
        shutil.copytree(root / "eval", root / target)
    shutil.rmtree(root / "eval")
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    for path in clips.iterdir():
        client.upload_file(str(path), BUCKET, f"raw/{path.name}")
    eval_shards = root / "shards" / "eval"
    for path in sorted(p for p in eval_shards.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, f"shards/eval/{path.relative_to(eval_shards)}")


@pytest.fixture(scope="module")
def workspace(
    tmp_path_factory: pytest.TempPathFactory,
    small_clips: Path,
    ray_cluster: RayCluster,
    s3_server: S3Server,
    mlflow_server: MlflowServer,
) -> Workspace:
    root = tmp_path_factory.mktemp("docs")
    _prepare(root, small_clips, s3_server)
    env = {k: v for k, v in os.environ.items() if not re.match(r"(AWS_|MLFLOW_|RAY_)", k)}
    env.update(ray_cluster.env)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        HOME=str(root / "home"),
        AWS_ACCESS_KEY_ID=s3_server.access_key,
        AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
        AWS_DEFAULT_REGION=s3_server.region,
        AWS_ENDPOINT_URL=s3_server.endpoint_url,
        MLFLOW_TRACKING_URI=mlflow_server.url,
    )
    values = {
        "dashboard": ray_cluster.dashboard_url,
        "s3": s3_server.endpoint_url,
        "mlflow": mlflow_server.url,
        "port": str(free_port()),
    }
    return Workspace(root, env, values, s3_server)


def _printed(command: Command, output: str) -> None:
    """The output holds the lines printed under the command, in order (a line ending in
    `...` stands for any line that starts like it)."""
    lines = iter(output.splitlines())
    for want in command.output:
        prefix = want.removesuffix("...")
        assert any(
            line.startswith(prefix) if want.endswith("...") else line == want for line in lines
        ), f"{command.where}: the docs print {want!r}, the command did not:\n{output[-3000:]}"


@contextlib.contextmanager
def _servers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def _serve(ws: Workspace, command: Command, shell: str, env: dict[str, str], path: str,
           servers: list[subprocess.Popen[bytes]]) -> None:  # fmt: skip
    log = (ws.root / f"server-{len(ws.ran)}.log").open("wb")
    proc = subprocess.Popen(
        ["bash", "-c", shell], cwd=ws.root, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    servers.append(proc)
    url = f"http://127.0.0.1:{ws.values['port']}{path}"
    deadline = time.monotonic() + 300
    while True:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as answer:
            if answer.status == 200:
                return
        assert proc.poll() is None, f"{command.where}: the server exited:\n{log.name}"
        assert time.monotonic() < deadline, f"{command.where}: no answer at {url}"
        time.sleep(1)


@pytest.mark.slow
def test_documented_commands_run_as_printed(workspace: Workspace) -> None:
    ws = workspace
    for block in documented():
        env = dict(ws.env)
        with _servers() as servers:
            for command in block:
                if command.text.startswith("export "):
                    shell = ws.substitute(command.text)
                    env.update(w.split("=", 1) for w in shlex.split(shell)[1:] if "=" in w)
                    continue
                entry = COMMANDS.get(command.text)
                if not command.tracked or isinstance(entry, NotHere) or command.text in ws.ran:
                    continue
                assert entry is not None, f"{command.where}: not covered: {command.text}"
                ws.ran.add(command.text)
                shell = ws.substitute(command.text)
                start = time.monotonic()
                if entry.serves:
                    _serve(ws, command, shell, env, entry.serves, servers)
                    print(f"{time.monotonic() - start:6.1f} s  {command.where} (server up)")
                    continue
                res = subprocess.run(
                    ["bash", "-c", shell], cwd=ws.root, env=env, capture_output=True,
                    text=True, timeout=900, check=False,
                )  # fmt: skip
                output = res.stdout + res.stderr
                assert res.returncode in entry.exit, (
                    f"{command.where}: exit {res.returncode} (documented: {entry.exit})\n"
                    f"$ {shell}\n{output[-4000:]}"
                )
                assert not entry.expect or any(e in output for e in entry.expect), (
                    f"{command.where}: none of {entry.expect} in the output:\n{output[-4000:]}"
                )
                _printed(command, output)
                print(f"{time.monotonic() - start:6.1f} s  {command.where}")
    assert ws.ran == {text for text, entry in COMMANDS.items() if isinstance(entry, Run)}
    assert not (ws.root / "mlflow.db").exists(), "a job ignored MLFLOW_TRACKING_URI"
