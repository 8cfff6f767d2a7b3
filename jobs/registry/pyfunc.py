"""The registered model's serving contract: an MLflow pyfunc `PythonModel` around a GramModel.

`jobs.register` logs this file as an MLflow "model from code" (the last line,
`set_model(GramPyfunc())`, is what MLflow picks up when it loads the file), with
`gram/`, `pipelines/` and `jobs/registry/served_inputs.py` shipped beside it as `code_paths`.
Loading it therefore needs only the registered artifacts: no checkpoint store, no Ray,
no project checkout. From `jobs` it imports only `jobs.registry.served_inputs`, which ships with it.

Artifacts (names in `context.artifacts`):
    weights       model.safetensors: a gram checkpoint (weights + model config)
    model_config  model_config.json: the architecture, with the tokenizer as shipped
    inference     inference.json: how media is decoded (`InferenceConfig`)
    tokenizer     tokenizer.json (only for models with a pretrained text tokenizer)

Input: a pandas DataFrame with one or more of the model's modality columns
(`text`, `video`, `audio` for the shipped configs); a null or empty cell means
that row lacks that modality.
    text kind:   the text itself.
    Media cells are admitted by `jobs.registry.served_inputs`: inline `data:...;base64,` bytes
    always; paths and s3:// URIs only under the configured `serving.media_roots` /
    `serving.s3_prefixes` (none by default); sizes, rows and media seconds are bounded.
    video kind:  a video file. Frames at the midpoints of `num_segments` equal segments,
                 scaled and centre-cropped by the preprocessing code, then evaluation
                 decoding (the model's T frames).
    audio kind:  any file with an audio track (a video or audio file);
                 16 kHz mono, the first `max_audio_seconds`, then the model's centre window.
    With `inference` matching the preprocessing config, a clip gets exactly the inputs
    its preprocessed shard sample gives the evaluation (tested to 1e-5).
params:
    volume (bool, default false): also return `volume`, the Gramian volume of each
        row's present modalities (None for rows with fewer than two).
    batch_size (int, default 16): rows per forward pass.
Output: a DataFrame with one row per input row and, for every modality column of
the input, `<name>_embedding`: a list of `embed_dim` floats (unit L2 norm), or
None where the row lacks it; plus `volume` (float) when asked.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc.model import PythonModel
from torch import Tensor

from gram.config import ConfigError, from_dict
from gram.decode import DecodeConfig, decode_sample
from gram.model import GramModel
from gram.model_config import ModelConfig
from gram.schema import CAPTIONS_SUFFIX, frame_suffix
from gram.volume import volume
from gram.weights import load_weights
from jobs.registry.served_inputs import (
    FFMPEG_INPUT_OPTIONS,
    RefusedInputError,
    RowBudget,
    ServingPolicy,
    admit_rows,
    describe_cell,
    fetch_media,
    media_failure,
)

__all__ = [
    "ARTIFACT_CONFIG",
    "ARTIFACT_INFERENCE",
    "ARTIFACT_TOKENIZER",
    "ARTIFACT_WEIGHTS",
    "GramPyfunc",
    "InferenceConfig",
]

ARTIFACT_WEIGHTS = "weights"
ARTIFACT_CONFIG = "model_config"
ARTIFACT_INFERENCE = "inference"
ARTIFACT_TOKENIZER = "tokenizer"


@dataclass(frozen=True)
class InferenceConfig:
    """How the served model turns media files into model inputs: as preprocessing did for
    the shards (set these to the preprocessing config's values), then evaluation decoding.

    num_segments: frames at the midpoints of this many equal segments (`frames.num_segments`).
    frame_size: short side scaled to this, centre-cropped, pixels (`frames.size`).
    max_audio_seconds: audio kept from the start of a file, s (`audio.max_seconds`).
    media_timeout_s: time limit per file for probing and for ffmpeg, s.
    media_roots, s3_prefixes, max_rows, max_media_bytes, max_media_seconds: what clients
        may send (`jobs.registry.served_inputs.ServingPolicy`); the serving process's
        `GRAM_SERVING_<KEY>` environment variables override them.
    """

    num_segments: int = 8
    frame_size: int = 224
    max_audio_seconds: float = 10.0
    media_timeout_s: float = 120.0
    media_roots: tuple[str, ...] = ()
    s3_prefixes: tuple[str, ...] = ()
    max_rows: int = ServingPolicy.max_rows
    max_media_bytes: int = ServingPolicy.max_media_bytes
    max_media_seconds: float = ServingPolicy.max_media_seconds

    def __post_init__(self) -> None:
        if self.num_segments < 1 or self.frame_size < 16:
            raise ConfigError("serving.num_segments must be >= 1 and serving.frame_size >= 16")
        if self.max_audio_seconds <= 0 or self.media_timeout_s <= 0:
            raise ConfigError("serving.max_audio_seconds and serving.media_timeout_s must be > 0")
        ServingPolicy.configured(self, {})  # raises ConfigError naming a bad serving.* key


def _bad_input(message: str) -> MlflowException:
    """An input error: the scoring server answers 400 with this message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class GramPyfunc(PythonModel):
    """Embeddings per modality (and optionally volumes) for rows of text / media paths."""

    def load_context(self, context: Any) -> None:
        """Build the model from the artifacts only (CPU, eval mode)."""
        artifacts = context.artifacts
        cfg = from_dict(
            ModelConfig, json.loads(Path(artifacts[ARTIFACT_CONFIG]).read_text("utf-8"))
        )
        tokenizer = artifacts.get(ARTIFACT_TOKENIZER)
        if tokenizer:
            cfg = replace(cfg, text=replace(cfg.text, tokenizer=str(tokenizer), pretrained=None))
        model = GramModel(cfg, load_pretrained=False)
        load_weights(model, artifacts[ARTIFACT_WEIGHTS])
        self.model = model.eval()
        self.inference = from_dict(
            InferenceConfig, json.loads(Path(artifacts[ARTIFACT_INFERENCE]).read_text("utf-8"))
        )
        self.decode_cfg = DecodeConfig.from_model(cfg)
        self.policy = ServingPolicy.configured(self.inference, os.environ)

    def _video(self, path: str, spend: Callable[[float], None]) -> Tensor:
        """[T, 3, S, S] uint8 frames of one file, decoded like preprocessing + evaluation;
        `spend(seconds)` counts its duration against the row's media budget."""
        from pipelines import media

        timeout = self.inference.media_timeout_s
        info = media.probe(path, timeout_s=timeout, input_options=FFMPEG_INPUT_OPTIONS)
        spend(info.duration)
        times = media.frame_times(info.duration, self.inference.num_segments)
        frames = media.decode_clip(
            path,
            times,
            size=self.inference.frame_size,
            timeout_s=timeout,
            duration=info.duration,
            fps=info.fps,
            input_options=FFMPEG_INPUT_OPTIONS,
        ).frames
        sample: dict[str, Any] = {frame_suffix(i): jpg for i, jpg in enumerate(frames)}
        # decode_sample picks the model's T of the segments; it needs a caption, unused here.
        sample.update({"__key__": "row", CAPTIONS_SUFFIX: b'["-"]'})
        return decode_sample(sample, self.decode_cfg, train=False)["video"]

    def _audio(self, path: str, spend: Callable[[float], None]) -> Tensor:
        """[S] float32 waveform: the model's centre window of the file's first audio stream;
        `spend(seconds)` counts its duration against the row's media budget."""
        from pipelines import media

        timeout = self.inference.media_timeout_s
        try:  # a video's duration as preprocessing measures it
            duration = media.probe(
                path, timeout_s=timeout, input_options=FFMPEG_INPUT_OPTIONS
            ).duration
        except media.MediaError as exc:
            if exc.reason != "no_video":
                raise
            duration = media.media_duration(  # an audio-only file: the container's duration
                path, timeout_s=timeout, input_options=FFMPEG_INPUT_OPTIONS
            )
        spend(duration)
        samples = max(1, media.audio_length(duration, self.inference.max_audio_seconds))
        pcm = media.extract_audio(
            path, num_samples=samples, timeout_s=timeout, input_options=FFMPEG_INPUT_OPTIONS
        )
        wave = pcm.astype(np.float32) / 32768.0  # [N] as soundfile reads PCM_16
        n = self.decode_cfg.audio_samples
        if wave.shape[0] >= n:
            start = (wave.shape[0] - n) // 2
            wave = wave[start : start + n]
        else:
            wave = np.pad(wave, (0, n - wave.shape[0]))
        return torch.from_numpy(np.ascontiguousarray(wave))

    def _encode(
        self, name: str, rows: list[int], values: list[str], tmp: Path, budget: RowBudget
    ) -> Tensor:
        """Embeddings [len(values), D] of one modality's non-empty cells (at `rows`)."""
        from pipelines.media import MediaError

        kind = self.model.cfg.modality(name).kind
        if kind == "text":
            return self.model.encode(name, {name: values})
        load = self._video if kind == "video" else self._audio
        tensors = []
        for row, value in zip(rows, values, strict=True):
            where = f"{name} of row {row} ({describe_cell(value)})"
            try:
                path = fetch_media(value, self.policy, tmp)
                tensors.append(load(str(path), functools.partial(budget.spend, row)))
            except RefusedInputError as exc:
                raise _bad_input(f"{where}: {exc}") from None
            except MediaError as exc:  # the reason only: ffmpeg's words may name other files
                raise _bad_input(f"{where}: {media_failure(exc.reason)}") from None
            except Exception:  # every other failure is a 400 too, and says nothing more
                raise _bad_input(f"{where}: could not be read as media") from None
        return self.model.encode(name, {name: torch.stack(tensors)})

    @torch.no_grad()
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Embeddings per modality column (and volumes); see the module docstring."""
        params = params or {}
        frame = pd.DataFrame(model_input)
        known = self.model.names
        unknown = [c for c in frame.columns if c not in known]
        columns = [n for n in known if n in frame.columns]
        if unknown or not columns:
            raise _bad_input(
                f"input columns must be modality names of this model {known}; got "
                f"{list(frame.columns)}"
            )
        batch_size = int(params.get("batch_size", 16))
        if batch_size < 1:
            raise _bad_input(f"params.batch_size must be >= 1, got {batch_size}")
        rows = len(frame)
        try:
            admit_rows(rows, self.policy)
        except RefusedInputError as exc:
            raise _bad_input(str(exc)) from None
        budget = RowBudget(self.policy)
        dim = self.model.cfg.embed_dim
        emb = {n: torch.full((rows, dim), float("nan")) for n in columns}
        present = torch.zeros(rows, len(columns), dtype=torch.bool)
        with tempfile.TemporaryDirectory(prefix="gram-pyfunc-") as tmp:
            for j, name in enumerate(columns):
                cells = frame[name].tolist()
                filled = [i for i, v in enumerate(cells) if isinstance(v, str) and v.strip()]
                for b0 in range(0, len(filled), batch_size):
                    idx = filled[b0 : b0 + batch_size]
                    values = [cells[i] for i in idx]
                    emb[name][idx] = self._encode(name, idx, values, Path(tmp), budget)
                present[filled, j] = True
        out = pd.DataFrame(index=frame.index)
        for j, name in enumerate(columns):
            out[f"{name}_embedding"] = [
                emb[name][i].tolist() if present[i, j] else None for i in range(rows)
            ]
        if params.get("volume"):
            vol = torch.full((rows,), float("nan"))
            enough = present.sum(1) >= 2  # [rows]
            if len(columns) >= 2 and bool(enough.any()):
                safe = [torch.nan_to_num(emb[n][enough], nan=0.0) for n in columns]
                vol[enough] = volume(*safe, mask=present[enough])
            values = [v if math.isfinite(v) else None for v in vol.tolist()]
            out["volume"] = pd.Series(values, index=frame.index, dtype=object)
        return out


set_model(GramPyfunc())
