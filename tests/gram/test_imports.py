"""`gram` stays a pure PyTorch library: importing all of it pulls in no cluster, tracking or
reference-only packages."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = (
    "ray",
    "mlflow",
    "boto3",
    "botocore",
    "transformers",
    "sentence_transformers",
    "librosa",
    "webdataset",
)


def test_gram_imports_no_ray_mlflow_boto3_or_reference_libraries():
    code = (
        "import importlib, pkgutil, sys, gram, gram.model\n"
        "for m in pkgutil.walk_packages(gram.__path__, 'gram.'):\n"
        "    importlib.import_module(m.name)\n"
        "gram.model.gram_tiny()\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "", f"gram imported {out.stdout.strip()}"
