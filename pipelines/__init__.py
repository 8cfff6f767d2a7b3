"""Ray Data preprocessing: video + audio + captions -> WebDataset shards.

See docs/preprocessing.md.

Media operations (`media`), input reading (`inputs`), shard writing
(`shards`, `writer`) and storage (`storage`) are plain Python; Ray lives in
`ray_exec` only.
"""

PIPELINE_VERSION = "2"
"""Bumped whenever a change alters shard bytes for the same input and config."""
