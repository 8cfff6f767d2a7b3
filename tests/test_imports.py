"""`gram` is a pure-PyTorch library: importing it pulls in no Ray, MLflow or boto3."""

from __future__ import annotations

import subprocess
import sys


def test_import_gram_imports_neither_ray_nor_mlflow_nor_boto3():
    code = (
        "import sys, gram, gram.config, gram.schema, gram.retrieval, gram.distributed\n"
        "import pkgutil, importlib\n"
        "for m in pkgutil.walk_packages(gram.__path__, 'gram.'):\n"
        "    importlib.import_module(m.name)\n"
        "banned = {'ray', 'mlflow', 'boto3', 'botocore'}\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in banned)\n"
        "print(','.join(bad))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "", f"gram imported: {res.stdout.strip()}"
