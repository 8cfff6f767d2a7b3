"""The training job's parts: its config, the Ray Train loop, checkpoints, and MLflow tracking."""
