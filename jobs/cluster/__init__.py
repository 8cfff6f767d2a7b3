"""Reaching a Ray cluster: job submission, the Jobs API, the Ray connection, and secrets."""
