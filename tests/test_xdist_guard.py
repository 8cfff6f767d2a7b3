"""The guard that keeps the Ray-cluster tests in one test process (tests/conftest.py).

`make test` runs `pytest -n 2 --dist loadgroup`; every test on the session's Ray cluster is
marked `xdist_group` so that one process runs them all. If pytest-xdist does not group a
marked test (a pytest it does not fit, or a mark added after its hook), the guard fails that
test with the reason instead of letting two processes share the cluster. Both cases run
here in a pytest of their own, with the project's two hooks and a folder of three tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFTEST = '''
import pytest

from tests.conftest import pytest_collection_modifyitems, pytest_runtest_setup


@pytest.fixture
def ray_cluster():
    """Stands in for the session's cluster: only its name decides the group."""
    return "cluster"


class LateMark:
    """Marks one test after pytest-xdist's hook has named the groups: never grouped."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items):
        for item in items:
            if item.name == "test_marked_too_late":
                item.add_marker(pytest.mark.xdist_group("ray-cluster"))


def pytest_configure(config):
    config.pluginmanager.register(LateMark(), "late-mark")
'''

TESTS = """
def test_on_the_cluster(ray_cluster):
    assert ray_cluster == "cluster"


def test_elsewhere():
    assert True


def test_marked_too_late():
    assert True
"""


def test_a_cluster_test_pytest_xdist_did_not_group_fails_with_the_reason(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_three.py").write_text(TESTS)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p",
         "no:cacheprovider", "-c", "/dev/null", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert "PASSED test_three.py::test_on_the_cluster@ray-cluster" in out, out
    assert "PASSED test_three.py::test_elsewhere" in out, out
    assert "ERROR test_three.py::test_marked_too_late" in out, out
    assert "pytest-xdist did not group this test under pytest" in out, out
    assert res.returncode == 1, out
