"""Test inputs built once per test session, also when `pytest -n N` runs N test processes."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name`, filled by `build(folder)` once for the whole session.

    In one process this is `factory.mktemp(name)`. Under pytest-xdist every test process
    asks for it: the first builds it under a lock in the session's shared temp folder (the
    parent of each process's own), the others wait for the lock and reuse it. The folder is
    read-only by agreement: tests copy what they change."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = factory.mktemp(name)
        build(folder)
        return folder
    shared = factory.getbasetemp().parent
    folder, done = shared / name, shared / f"{name}.built"
    with (shared / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder
