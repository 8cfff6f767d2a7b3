"""Thin entry points, one readable file per job.

Importing the package sets up what job processes print (`jobs.console`): no MLflow
progress bars when stdout is not a terminal, Ray's token notice once per user.
"""

from jobs import console

console.setup()
