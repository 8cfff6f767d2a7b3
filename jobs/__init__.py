"""The jobs: one readable file per job (`jobs/<name>.py`, listed in `jobs/catalog.py`), each
declaring its config, and the domain packages they share: `training/`, `evaluation/`,
`registry/`, `cluster/`, and `common/` (what every job uses)."""
