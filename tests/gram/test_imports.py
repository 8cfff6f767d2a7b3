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
        "import sys, gram, gram.model, gram.steps, gram.decode, gram.synthetic, gram.weights\n"
        "gram.model.gram_tiny()\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "", f"gram imported {out.stdout.strip()}"
