"""The jobs: one readable file per job (`jobs/<name>.py`, listed in `jobs/catalog.py`), each
declaring its config, and the domain packages they share: `training/`, `evaluation/`,
`registry/`, `cluster/`, and `common/` (what every job uses).

Importing the package sets up what job processes print (`jobs.common.console`): no MLflow
progress bars when stdout is not a terminal, Ray's token notice once per user.
"""

from jobs.common import console

console.setup()
