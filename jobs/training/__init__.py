"""The training job's parts: the Ray Train loop, checkpoints, and MLflow tracking."""
