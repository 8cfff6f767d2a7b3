"""Preprocessing on Ray: video + audio + captions -> WebDataset shards, one task per shard.

See docs/preprocessing.md.

Media operations (`media`, `stages`), input reading (`inputs`, `disk_index`),
a shard's work (`shard_task`), the output layout (`writer`, `tar_format`),
the output lease (`lease`) and storage (`storage`) are plain Python; Ray lives
in `ray_adapter` only.
"""

PIPELINE_VERSION = "2"
"""Bumped whenever a change alters shard bytes for the same input and config."""
