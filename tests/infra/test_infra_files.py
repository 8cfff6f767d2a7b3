"""Every file in infra/, parsed and checked offline (no Docker, Kubernetes or cloud here).

Catches before anyone runs `docker build`, `kubectl apply`, `docker compose up` or `ray up`:
missing schema keys, references to entrypoints and configs that do not exist, more than one
Ray version, plaintext secrets, and dashboard/storage ports published beyond localhost.

Every path the infra files reference (jobs/train.py, jobs/configs/*.yaml, ...) must exist,
and every job a manifest runs must list, in its --help, every option and key=value override
the manifest passes.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from gram.config import from_dict, read_config_file
from jobs.cluster.secrets import is_secret_name
from jobs.cluster.submission import DEFAULT_EXCLUDES
from jobs.submit import SubmitConfig

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
IMAGE_PROJECT_DIR = "/home/ray/gram-ray"
LOCAL_ONLY = ("compose/.env", "compose/secrets/")  # created by init-env.sh, git-ignored

GRAM_IMAGE = re.compile(
    r"^(?:[\w.-]+(?::\d+)?/)*gram-ray:(?P<project>\d+\.\d+\.\d+)-ray(?P<ray>\d+\.\d+\.\d+)"
    r"(?P<gpu>-gpu)?$"
)
RAY_BASE_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)(?P<gpu>-gpu)?$")
LOOPBACK = ("127.0.0.1", "::1", "[::1]", "localhost")
# Names that look secret but hold none, and keys that *name* a secret instead of holding one.
NOT_SECRETS = frozenset({"RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "token_path"})
SECRET_REFERENCES = frozenset({"secretName", "secretRef", "secretKeyRef", "authOptions"})
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
    "URL with a literal password": re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@$]+:[^/\s@$]+@"),
}


# --- what the repository says ------------------------------------------------------------


@functools.cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement(name: str) -> Requirement:
    project = pyproject()["project"]
    specs = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        specs += extra
    found = [Requirement(s) for s in specs if Requirement(s).name == name]
    assert found, f"pyproject.toml declares no {name} requirement"
    return found[0]


def infra_files() -> list[Path]:
    files = []
    for path in sorted(INFRA.rglob("*")):
        rel = path.relative_to(INFRA).as_posix()
        if path.is_file() and not rel.startswith(LOCAL_ONLY):
            files.append(path)
    return files


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def yaml_docs(path: Path) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        pytest.fail(f"{rel(path)} is not valid YAML: {exc}")


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        instruction, _, args = (current + line).partition(" ")
        out.append((instruction.upper(), " ".join(args.split())))
        current = ""
    assert not current, f"{rel(path)} ends inside a line continuation"
    return out


def dockerfile_args(path: Path) -> dict[str, str]:
    args = {}
    for instruction, value in dockerfile(path):
        if instruction == "ARG" and "=" in value:
            name, _, default = value.partition("=")
            args.setdefault(name, default)
        elif instruction == "ARG":
            args.setdefault(value, "")
    return args


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


@functools.cache
def ray_version() -> str:
    """The one Ray version of the deployment: the image's RAY_VERSION build argument."""
    return dockerfile_args(INFRA / "docker" / "Dockerfile")["RAY_VERSION"]


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted((INFRA / "kuberay").glob("*.yaml")):
        docs += [(path, d) for d in yaml_docs(path) if "apiVersion" in d]
    return docs


def cluster_specs() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, RayClusterSpec, owning document) for every RayCluster and RayJob."""
    for path, doc in k8s_docs():
        if doc["kind"] == "RayCluster":
            yield f"{rel(path)}:{doc['metadata']['name']}", doc["spec"], doc
        elif doc["kind"] == "RayJob":
            yield f"{rel(path)}:{doc['metadata']['name']}", doc["spec"]["rayClusterSpec"], doc


def pod_templates(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group name, group spec, pod template spec) for the head and every worker group."""
    yield "head", spec["headGroupSpec"], spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group, group["template"]["spec"]


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+)([KMGT]i?)?", str(quantity))
    assert match, f"memory quantity {quantity!r} is not understood"
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


def secret_literals(node: Any, where: str) -> Iterator[str]:
    """Places in a parsed YAML tree where a secret-named key holds a literal value."""
    if isinstance(node, dict):
        name, value = node.get("name"), node.get("value")
        if isinstance(name, str) and isinstance(value, str) and is_literal_secret(name, value):
            yield f"{where}: env {name} has a literal value"
        for key, value in node.items():
            if str(key) in SECRET_REFERENCES:
                continue
            if isinstance(value, str | int) and is_literal_secret(str(key), str(value)):
                yield f"{where}.{key} holds a literal value"
            yield from secret_literals(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from secret_literals(item, f"{where}[{i}]")


def is_literal_secret(name: str, value: str) -> bool:
    """A secret-named key whose value is neither empty, a ${VAR} reference nor a file path."""
    if name in NOT_SECRETS or not is_secret_name(name) or not value.strip():
        return False
    return not value.strip().startswith(("$", "/", "~/", "./"))


# --- every file is covered ---------------------------------------------------------------


def kind_of(path: Path) -> str:
    """Which checks cover `path`; an unknown kind of file fails so that it gets checks."""
    relpath = path.relative_to(INFRA).as_posix()
    if relpath == "README.md":
        return "readme"
    if path.suffix == ".sh":
        return "shell"
    if path.name == "Dockerfile" or path.name.endswith(".Dockerfile"):
        return "dockerfile"
    if path.name.endswith(".dockerignore"):
        return "dockerignore"
    if relpath == "compose/.env.example":
        return "env-example"
    if path.name == ".gitignore":
        return "gitignore"
    if path.name == "submit-profile.yaml":
        return "submit-profile"
    if relpath == "compose/compose.yaml":
        return "compose"
    if relpath.startswith("kuberay/") and path.suffix == ".yaml":
        return "kubernetes"
    if relpath.startswith("cluster/") and path.suffix == ".yaml":
        return "cluster-launcher"
    return "unknown"


def test_every_infra_file_is_covered_by_checks():
    unknown = [rel(p) for p in infra_files() if kind_of(p) == "unknown"]
    assert not unknown, f"add checks for {unknown} in tests/infra/test_infra_files.py"
    kinds = {kind_of(p) for p in infra_files()}
    for needed in ("dockerfile", "compose", "kubernetes", "cluster-launcher", "readme"):
        assert needed in kinds, f"infra/ has no {needed} file"


@pytest.mark.parametrize("path", infra_files(), ids=lambda p: p.relative_to(INFRA).as_posix())
def test_no_plaintext_secrets(path: Path):
    text = path.read_text()
    for what, pattern in SECRET_PATTERNS.items():
        match = pattern.search(text)
        assert not match, f"{rel(path)} contains a {what}: {match.group(0)[:24]}..."
    if path.suffix == ".yaml":
        found = [w for d in yaml_docs(path) for w in secret_literals(d, rel(path))]
        assert not found, "use Secret references / ${VAR} instead of literal values: " + str(found)


def test_shell_scripts_parse_and_are_executable():
    for path in INFRA.rglob("*.sh"):
        res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
        assert res.returncode == 0, f"{rel(path)}: {res.stderr}"
        assert os.access(path, os.X_OK), f"{rel(path)} is not executable (chmod +x)"


# --- one Ray version, one image naming -----------------------------------------------------


def all_image_references() -> list[tuple[str, str]]:
    refs = []
    compose = yaml_docs(INFRA / "compose" / "compose.yaml")[0]
    refs += [(f"compose {n}", s["image"]) for n, s in compose["services"].items()]
    for where, spec, _ in cluster_specs():
        for group, _, pod in pod_templates(spec):
            refs += [(f"{where} {group}", c["image"]) for c in pod["containers"]]
    launcher = yaml_docs(INFRA / "cluster" / "aws.yaml")[0]
    refs.append(("cluster/aws.yaml docker.image", launcher["docker"]["image"]))
    for name, node in launcher["available_node_types"].items():
        if "worker_image" in node.get("docker", {}):
            refs.append((f"cluster/aws.yaml {name}", node["docker"]["worker_image"]))
    return refs


def test_one_ray_version_everywhere_and_inside_pyproject_range():
    version = ray_version()
    assert requirement("ray").specifier.contains(version), (
        f"infra's Ray {version} is outside pyproject's {requirement('ray')}"
    )
    project_version = pyproject()["project"]["version"]
    found = {"Dockerfile ARG RAY_VERSION": version}
    for where, image in all_image_references():
        match = GRAM_IMAGE.match(image)
        if match:
            found[where] = match["ray"]
            assert match["project"] == project_version, (
                f"{where}: image {image} is tagged for project {match['project']}, "
                f"pyproject says {project_version}"
            )
    for where, spec, _ in cluster_specs():
        found[f"{where} rayVersion"] = spec["rayVersion"]
    compose = yaml_docs(INFRA / "compose" / "compose.yaml")[0]
    for name, service in compose["services"].items():
        if "RAY_VERSION" in service.get("build", {}).get("args", {}):
            found[f"compose {name} build arg"] = service["build"]["args"]["RAY_VERSION"]
    versions = {v for v in found.values()}
    assert versions == {version}, f"more than one Ray version in infra/: {found}"


def test_every_image_is_pinned():
    for where, image in all_image_references():
        name, _, tag = image.rpartition(":")
        assert name, f"{where}: image {image!r} has no tag"
        assert "/" not in tag, f"{where}: image {image!r} has no tag"
        assert tag != "latest", f"{where}: pin {image} to a version, not latest"


# --- Dockerfiles --------------------------------------------------------------------------


def test_runtime_image_builds_from_ray_with_ffmpeg_and_the_project():
    path = INFRA / "docker" / "Dockerfile"
    steps = dockerfile(path)
    args = dockerfile_args(path)
    froms = [value for instruction, value in steps if instruction == "FROM"]
    assert len(froms) == 1, "one stage: the Ray base image"
    for variant, gpu in (("", None), ("-gpu", "-gpu")):
        image = substitute(froms[0], {**args, "VARIANT": variant})
        match = RAY_BASE_IMAGE.match(image)
        assert match, f"FROM {image} is not a rayproject/ray:<version>-py3XX[-gpu] image"
        assert match["ray"] == ray_version(), f"FROM {image}: Ray {match['ray']}"
        assert match["gpu"] == gpu, f"FROM {image} with VARIANT={variant!r}"
        python = f"{match['py'][0]}.{match['py'][1:]}"
        assert pyproject()["project"]["requires-python"] == f">={python}", (
            f"base image Python {python} differs from pyproject's requires-python"
        )
    runs = " ".join(v for i, v in steps if i == "RUN")
    assert re.search(r"apt-get install .*\bffmpeg\b", runs), "the image must install ffmpeg"
    torch_pin = str(requirement("torch").specifier)
    assert torch_pin == f"=={args['TORCH_VERSION']}", (
        f"image torch {args['TORCH_VERSION']} differs from pyproject's torch{torch_pin}"
    )
    assert re.search(r"pip install [^&]*-c \S+ \"?\.\[all\]", runs), (
        "the project must be installed with its extras under the ray/torch constraints"
    )
    workdirs = [v for i, v in steps if i == "WORKDIR"]
    assert workdirs == [IMAGE_PROJECT_DIR], "manifests rely on the code at " + IMAGE_PROJECT_DIR
    users = [v for i, v in steps if i == "USER"]
    assert users, "the image must switch back to an unprivileged user"
    assert users[-1] not in ("root", "0"), "the image must not run as root"
    envs = " ".join(v for i, v in steps if i == "ENV")
    assert "RAY_AUTH_MODE=token" in envs, "token auth must be the image's default"
    for instruction, value in steps:
        if instruction == "COPY":
            sources = [w for w in shlex.split(value)[:-1] if not w.startswith("--")]
            for source in sources:
                check_reference(source, f"infra/docker/Dockerfile COPY {source}")


def test_build_context_ignore_file_keeps_out_environments_data_and_credentials():
    patterns = set((INFRA / "docker" / "Dockerfile.dockerignore").read_text().split())
    for needed in ("**/.git", "**/.venv", "**/.env", "**/.env.*", "infra/compose/secrets", "data"):
        assert needed in patterns, f"Dockerfile.dockerignore must exclude {needed}"
    for needed in (".env", ".env.*", "infra/compose/secrets", ".venv", ".git"):
        assert needed in DEFAULT_EXCLUDES, f"jobs.submit's working-dir upload must exclude {needed}"


def test_mlflow_image_is_inside_pyproject_mlflow_range():
    path = INFRA / "docker" / "mlflow.Dockerfile"
    args = dockerfile_args(path)
    froms = [substitute(v, args) for i, v in dockerfile(path) if i == "FROM"]
    assert froms == [f"ghcr.io/mlflow/mlflow:v{args['MLFLOW_VERSION']}"]
    assert requirement("mlflow").specifier.contains(args["MLFLOW_VERSION"])
    compose = yaml_docs(INFRA / "compose" / "compose.yaml")[0]["services"]["mlflow"]
    assert compose["build"]["args"]["MLFLOW_VERSION"] == args["MLFLOW_VERSION"]
    assert compose["image"].endswith(":" + args["MLFLOW_VERSION"])


# --- compose ------------------------------------------------------------------------------


@functools.cache
def compose() -> dict[str, Any]:
    return yaml_docs(INFRA / "compose" / "compose.yaml")[0]


def env_example_names() -> set[str]:
    names = set()
    for line in (INFRA / "compose" / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not NAME="
            assert not value.strip(), f".env.example must not hold values: {line!r}"
            names.add(name.strip())
    return names


def test_compose_services_health_and_startup_order():
    services = compose()["services"]
    needed = {"minio", "minio-init", "postgres", "mlflow", "ray-head", "ray-worker"}
    assert needed <= set(services), f"compose lacks {sorted(needed - set(services))}"
    for name, service in services.items():
        assert "image" in service, f"compose {name}: no image"
        one_shot = service.get("restart") == "no"
        if not one_shot:
            assert service.get("healthcheck", {}).get("test"), f"compose {name}: no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"compose {name} depends on unknown {dependency}"
            wanted = condition.get("condition")
            if wanted == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
            elif wanted == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", f"{dependency} is not one-shot"
            else:
                pytest.fail(f"compose {name}: wait for {dependency} to be healthy or completed")
        if "build" in service:
            context = (INFRA / "compose" / service["build"]["context"]).resolve()
            assert context.is_dir(), f"compose {name}: build context {context} missing"
            assert (context / service["build"]["dockerfile"]).is_file()
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_ports_are_loopback_only():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host = port.get("host_ip", "")
            else:
                parts = str(port).rsplit(":", 2)
                host = parts[0] if len(parts) == 3 else ""
            assert host in LOOPBACK, (
                f"compose {name} publishes {port} on every interface: bind it to 127.0.0.1 "
                "(remote access goes through an SSH tunnel, see infra/README.md#security)"
            )


def test_compose_secrets_come_from_the_env_file_and_ray_uses_tokens():
    documented = env_example_names()
    text = (INFRA / "compose" / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required <= documented, f"document {sorted(required - documented)} in .env.example"
    for name, service in compose()["services"].items():
        for key, value in service.get("environment", {}).items():
            if is_secret_name(key) and key not in NOT_SECRETS:
                assert str(value).startswith("${"), f"compose {name}: {key} must be ${{VAR}}"
    for name in ("ray-head", "ray-worker"):
        env = compose()["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", f"compose {name}: token auth must be on"
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN"), name
    head = compose()["services"]["ray-head"]
    assert any(str(p).endswith(":8265") for p in head["ports"]), "the Jobs API port is published"
    mlflow = compose()["services"]["mlflow"]["environment"]
    assert mlflow["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert mlflow["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    ignored = (INFRA / "compose" / ".gitignore").read_text().split()
    assert {".env", "secrets/"} <= set(ignored), "compose credentials must be git-ignored"


# --- KubeRay ------------------------------------------------------------------------------


def test_kubernetes_documents_have_schema_keys_and_no_secret_objects():
    kinds = []
    for path, doc in k8s_docs():
        where = f"{rel(path)}:{doc.get('kind')}"
        for key in ("apiVersion", "kind", "metadata"):
            assert key in doc, f"{where}: missing {key}"
        assert doc["metadata"].get("name"), f"{where}: metadata.name"
        assert doc["kind"] != "Secret", (
            f"{where}: never commit Secrets; create them with kubectl from your secret manager"
        )
        if doc["kind"] == "ConfigMap":
            assert doc["apiVersion"] == "v1", where
            assert isinstance(doc.get("data"), dict), f"{where}: data"
            leaked = [k for k in doc["data"] if is_secret_name(k)]
            assert not leaked, f"{where}: {leaked} belong in a Secret"
        else:
            assert doc["apiVersion"] == "ray.io/v1", f"{where}: KubeRay CRDs are ray.io/v1"
            assert doc["kind"] in ("RayCluster", "RayJob"), f"{where}: unexpected kind"
            assert "spec" in doc, f"{where}: spec"
        kinds.append(doc["kind"])
    assert {"ConfigMap", "RayCluster", "RayJob"} <= set(kinds)


def test_ray_clusters_token_auth_private_dashboard_and_sized_pods():
    configmaps = {d["metadata"]["name"] for _, d in k8s_docs() if d["kind"] == "ConfigMap"}
    readme = (INFRA / "README.md").read_text()
    for where, spec, _ in cluster_specs():
        assert spec["rayVersion"] == ray_version(), f"{where}: rayVersion"
        auth = spec.get("authOptions", {})
        assert auth.get("mode") == "token", f"{where}: authOptions.mode must be token"
        assert auth.get("secretName") in readme, f"{where}: document the token Secret"
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", (
            f"{where}: the head service must stay ClusterIP (use kubectl port-forward)"
        )
        assert not head.get("enableIngress"), f"{where}: no ingress for the dashboard"
        assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: keep tasks off the head"
        images = {c["image"] for _, _, pod in pod_templates(spec) for c in pod["containers"]}
        assert len(images) == 1, f"{where}: driver and workers need the same image, got {images}"
        for group, group_spec, pod in pod_templates(spec):
            label = f"{where} {group}"
            if group != "head":
                low, n, high = (group_spec[k] for k in ("minReplicas", "replicas", "maxReplicas"))
                assert 0 <= low <= n <= high, f"{label}: min <= replicas <= max"
            container = pod["containers"][0]
            image = GRAM_IMAGE.match(container["image"])
            assert image, f"{label}: image {container['image']} is not a gram-ray image"
            limits = container["resources"]["limits"]
            requests = container["resources"]["requests"]
            for resource in ("cpu", "memory"):
                assert resource in limits, f"{label}: set a {resource} limit"
                assert resource in requests, f"{label}: set a {resource} request"
            if int(limits.get("nvidia.com/gpu", 0)):
                assert image["gpu"], f"{label}: GPU pods use the -gpu image"
            store = group_spec["rayStartParams"].get("object-store-memory")
            shm = {v["name"]: v for v in pod.get("volumes", [])}.get("shm")
            assert shm, f"{label}: a memory-backed `shm` volume for /dev/shm"
            assert shm["emptyDir"]["medium"] == "Memory", f"{label}: shm must be in memory"
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/dev/shm" in mounts, f"{label}: mount the shm volume at /dev/shm"
            if store is not None:
                assert int(store) < memory_bytes(limits["memory"]), f"{label}: object store"
                assert int(store) <= memory_bytes(shm["emptyDir"]["sizeLimit"]), (
                    f"{label}: /dev/shm must hold the object store"
                )
            refs = container.get("envFrom", [])
            assert {r["configMapRef"]["name"] for r in refs if "configMapRef" in r} <= configmaps
            secrets = {r["secretRef"]["name"] for r in refs if "secretRef" in r}
            assert {"gram-s3-credentials", "gram-mlflow-credentials"} <= secrets, (
                f"{label}: S3 and MLflow credentials come from Secrets"
            )
            assert all(name in readme for name in secrets), f"{label}: document {secrets}"


def worker_gpus(spec: dict[str, Any]) -> int:
    return sum(
        int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        * g["replicas"]
        for g in spec.get("workerGroupSpecs", [])
    )


def test_preprocessing_is_cpu_and_training_has_a_gpu_worker_group():
    by_component = {}
    for where, spec, doc in cluster_specs():
        component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
        by_component.setdefault(component, []).append((where, spec, doc))
    assert {"preprocess", "train"} <= set(by_component)
    for where, spec, _ in by_component["preprocess"]:
        assert spec["workerGroupSpecs"], f"{where}: needs a CPU worker group"
        assert worker_gpus(spec) == 0, f"{where}: preprocessing needs no GPUs"
    kinds = {doc["kind"] for _, _, doc in by_component["preprocess"]}
    assert kinds == {"RayCluster", "RayJob"}
    for where, spec, doc in by_component["train"]:
        assert doc["kind"] == "RayJob"
        assert worker_gpus(spec) > 0, f"{where}: training needs a GPU worker group"
        for group in spec["workerGroupSpecs"]:
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), where
        overrides = dict(w.split("=", 1) for w in entrypoint_words(doc) if "=" in w)
        assert int(overrides["scaling.workers"]) == worker_gpus(spec), (
            f"{where}: scaling.workers={overrides['scaling.workers']} but the GPU groups hold "
            f"{worker_gpus(spec)} GPUs (one training worker per GPU)"
        )


def test_rayjobs_clean_up_after_themselves():
    for path, doc in k8s_docs():
        if doc["kind"] == "RayJob":
            spec = doc["spec"]
            assert spec.get("shutdownAfterJobFinishes") is True, f"{rel(path)}: delete the cluster"
            assert spec.get("activeDeadlineSeconds", 0) > 0, f"{rel(path)}: bound the run time"
            assert spec.get("entrypoint"), f"{rel(path)}: entrypoint"


# --- entrypoints and referenced paths ------------------------------------------------------


def check_reference(path: str, where: str) -> None:
    """`path` (repo-relative, or under the image's project dir) exists."""
    relpath = path.removeprefix(IMAGE_PROJECT_DIR + "/").removeprefix("./").rstrip("/")
    assert not relpath.startswith("/"), f"{where}: {path} is outside the project"
    assert (REPO / relpath).exists(), (
        f"{where} references {relpath}, which does not exist in the repository; fix the reference"
    )


def entrypoint_words(doc: dict[str, Any]) -> list[str]:
    return shlex.split(doc["spec"]["entrypoint"])


def entrypoints() -> list[tuple[str, list[str]]]:
    found = [(rel(p), entrypoint_words(d)) for p, d in k8s_docs() if d["kind"] == "RayJob"]
    assert found, "no RayJob entrypoints found"
    return found


@functools.cache
def job_help(module: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, f"python -m {module} --help failed:\n{res.stderr[-2000:]}"
    return res.stdout


@pytest.mark.parametrize(
    ("where", "words"), [pytest.param(w, words, id=w) for w, words in entrypoints()]
)
def test_entrypoints_name_existing_jobs_configs_and_options(where: str, words: list[str]):
    assert words[:2] == ["python", "-m"], f"{where}: entrypoints are `python -m jobs.<job>`"
    assert words[2].startswith("jobs."), f"{where}: entrypoints run a jobs.<job> module"
    module = words[2]
    needed = [module.replace(".", "/") + ".py"]
    if "--config" in words:
        config = words[words.index("--config") + 1]
        assert config.startswith(IMAGE_PROJECT_DIR + "/"), (
            f"{where}: give the config's path inside the image, {IMAGE_PROJECT_DIR}/..."
        )
        needed.append(config.removeprefix(IMAGE_PROJECT_DIR + "/"))
    for path in needed:
        check_reference(path, where)
    if "--config" in words:
        read_config_file(REPO / needed[1])
    help_text = job_help(module)
    options = [w.split("=", 1)[0] for w in words[3:] if w.startswith("--")]
    keys = [w.split("=", 1)[0] for w in words[3:] if "=" in w and not w.startswith("-")]
    for name in [*options, *keys]:
        assert name in help_text, (
            f"{where} passes {name!r} but `python -m {module} --help` does not list it: "
            "rename it in the manifest, or add it to the job"
        )


def test_every_path_the_infra_files_reference_exists():
    referenced = set()
    for _, words in entrypoints():
        referenced.add(words[2].replace(".", "/") + ".py")
        if "--config" in words:
            referenced.add(words[words.index("--config") + 1].removeprefix(IMAGE_PROJECT_DIR + "/"))
    for instruction, value in dockerfile(INFRA / "docker" / "Dockerfile"):
        if instruction == "COPY":
            referenced |= {w for w in shlex.split(value)[:-1] if not w.startswith("--")}
    missing = sorted(p for p in referenced if not (REPO / p).exists())
    assert not missing, f"infra/ references paths that do not exist: {missing}"


# --- cluster launcher ---------------------------------------------------------------------


# Ray's own launcher validation, in a child process: importing the autoscaler loads Ray's
# process-wide auth-token cache, which must stay unset in the test process until it joins
# the session cluster.
_VALIDATE_LAUNCHER_CONFIG = """
import json, pathlib, sys
import jsonschema
import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config
config = json.load(sys.stdin)
schema = pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json"
jsonschema.validate(config, json.loads(schema.read_text()))
validate_config(prepare_config(config))
print("valid")
"""


def test_cluster_launcher_config_is_valid_for_ray():
    config = yaml_docs(INFRA / "cluster" / "aws.yaml")[0]
    res = subprocess.run(
        [sys.executable, "-c", _VALIDATE_LAUNCHER_CONFIG],
        input=json.dumps(config),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, f"Ray rejects infra/cluster/aws.yaml:\n{res.stderr[-3000:]}"
    assert res.stdout.strip() == "valid"

    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    assert sum(t.get("max_workers", 0) for t in node_types.values()) <= config["max_workers"]
    cpu_image = GRAM_IMAGE.match(config["docker"]["image"])
    assert cpu_image, "nodes run the gram-ray image"
    assert not cpu_image["gpu"], "nodes default to the CPU image"
    gpu_types = [name for name in node_types if "gpu" in name]
    assert gpu_types, "a GPU worker type for training"
    for name in gpu_types:
        image = GRAM_IMAGE.match(node_types[name]["docker"]["worker_image"])
        assert image, f"{name}: GPU nodes run the gram-ray image"
        assert image["gpu"], f"{name}: GPU nodes use the -gpu image"
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head, "start the head with token auth"
    assert "RAY_AUTH_MODE=token" in workers, "start the workers with token auth"
    assert "--dashboard-host=127.0.0.1" in head, "reach the dashboard via `ray dashboard` only"
    assert "0.0.0.0" not in head
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert "~/.ray/auth_token" in config["file_mounts"], "every node needs the token"


# --- submit profiles and the README -------------------------------------------------------


@pytest.mark.parametrize("path", sorted(INFRA.rglob("submit-profile.yaml")), ids=str)
def test_submit_profiles_load_into_the_submit_config(path: Path):
    data = read_config_file(path)
    cfg = from_dict(SubmitConfig, {"job": "train", **data})
    assert cfg.address.startswith("http://127.0.0.1:"), "profiles reach tunnelled/local ports"
    assert cfg.token_path, f"{rel(path)}: say where the token file is"
    assert not cfg.forward_secrets, f"{rel(path)}: profiles must not forward secrets"


def test_readme_documents_security_tokens_and_scale_out():
    text = (INFRA / "README.md").read_text()
    for heading in ("## Security", "### Tokens", "## Scale-out guide", "### Expected bottlenecks"):
        assert heading in text, f"infra/README.md lacks {heading!r}"
    for phrase in (
        "kubectl port-forward",
        "ray dashboard",
        "rotate",
        "--forward-secret",
        "ray job submit",
    ):
        assert phrase in text, f"infra/README.md should explain {phrase!r}"
    # The worked all-gather example: 8 nodes x 8 GPUs, batch 64 per GPU, d = 512, 3 modalities.
    gathered = 8 * 8 * 64 * 3 * 512 * 4 / 2**20
    assert f"**{gathered:.0f} MiB**" in text, "the README's all-gather figure must match"
