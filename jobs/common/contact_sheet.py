"""Pictures of the data itself (PNG): contact sheets of clips, and top-K retrievals.

    entries = [entry_from_sample(raw, row), failed_entry(failed_row)]   # shard samples, manifest
    render_sheet(entries, Path("sheet.png"), title="shards/eval: 12 of 480 inputs")
    render_sheet(batch_entries(batch, limit=8), path, title="first batch")  # what a model sees
    top_retrievals(embeddings, eval_shards, s3, path)          # an evaluation's top-5 picture

A sheet has one row per clip: its frames as a strip (at most `MAX_STRIP_FRAMES`,
evenly picked), its audio as a log-mel spectrogram (`gram.audio.LogMel`: 64 mel bins,
10 ms hop, the normalised values on a fixed colour scale, so silence looks the same on
every row), its caption(s), and its status: `ok` with duration, frame rate and size,
or `failed` with the manifest's reason and error. The retrieval picture has one row
per query caption and its top K clips by Gramian volume (lower is better), the
caption's own clip framed in green.

matplotlib's object API with the Agg canvas: no pyplot, no display needed.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import soundfile
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from gram.audio import LogMel
from gram.retrieval import score_matrix
from gram.schema import AUDIO_SUFFIX, CAPTIONS_SUFFIX, META_SUFFIX, SAMPLE_RATE, is_frame_suffix
from gram.shards import RawSample, ShardInfo, iter_raw_samples
from pipelines import storage
from pipelines.storage import S3Config

__all__ = [
    "MAX_STRIP_FRAMES",
    "Embedded",
    "RetrievalRow",
    "Retrieved",
    "SheetEntry",
    "batch_entries",
    "entry_from_sample",
    "failed_entry",
    "first_batch_sheet",
    "render_retrievals",
    "render_sheet",
    "retrieval_rows",
    "samples_by_key",
    "top_retrievals",
]

log = logging.getLogger(__name__)

MAX_STRIP_FRAMES = 8
_DPI = 100
_ROW, _GAP, _TITLE = 96, 12, 30  # row height, gap between rows, title band: pixels
_STRIP_MIN, _STRIP_MAX = 400, 1100  # width of the frame column, pixels
_SPEC_WIDTH, _TEXT_WIDTH = 320, 560  # spectrogram and text columns, pixels
_MAX_PIXELS = 4096 * 4096  # larger frames are not decoded (decompression bombs)
_SPEC_RANGE = (-2.5, 1.5)  # normalised log-mel values shown, dark to bright
_OK, _FAILED, _MATCH = "tab:green", "tab:red", "tab:green"


@dataclass
class SheetEntry:
    """One clip on a sheet.

    frames: [H, W, 3] uint8 images in time order (empty for a failed input).
    audio: [S] float32 waveform in [-1, 1] at 16 kHz, or None without audio.
    detail: one line under the key: duration / fps / size, or the failure reason and error.
    """

    key: str
    status: str
    frames: list[np.ndarray] = field(default_factory=list)
    audio: np.ndarray | None = None
    captions: list[str] = field(default_factory=list)
    detail: str = ""
    source: str = ""
    """Where the clip came from (the manifest's `uri`), when known."""
    notes: list[str] = field(default_factory=list)
    """Members that could not be read (the sheet still shows the rest)."""


def _image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        if img.width * img.height > _MAX_PIXELS:
            raise ValueError(f"{img.width}x{img.height} frame is too large to show")
        return np.array(img.convert("RGB"), dtype=np.uint8)  # [H, W, 3]


def _wave(data: bytes) -> np.ndarray:
    wave, _ = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)  # [S, C]
    return np.ascontiguousarray(wave.mean(axis=1))  # [S]


def _captions(value: Any) -> list[str]:
    items = json.loads(value) if isinstance(value, bytes | str) else value
    return [c.strip() for c in items if isinstance(c, str) and c.strip()]


def _describe(meta: Mapping[str, Any]) -> str:
    parts = []
    if meta.get("duration"):
        parts.append(f"{float(meta['duration']):.1f} s")
    if meta.get("fps"):
        parts.append(f"{float(meta['fps']):.2f} fps")
    if meta.get("width") and meta.get("height"):
        parts.append(f"{meta['width']}x{meta['height']}")
    if "has_audio" in meta and meta["has_audio"] is not None:
        parts.append("audio" if meta["has_audio"] else "no audio track")
    return ", ".join(parts)


def entry_from_sample(raw: RawSample, row: Mapping[str, Any] | None = None) -> SheetEntry:
    """A clip from its shard sample, with its manifest row (status, duration, ...) if known.

    A member that cannot be decoded is noted on the entry instead of failing the sheet.
    """
    key = str(raw["__key__"])
    entry = SheetEntry(key=key, status=str((row or {}).get("status") or "ok"))
    frames = sorted((i, s) for s in raw if (i := is_frame_suffix(s)) is not None)
    for _, suffix in frames:
        try:
            entry.frames.append(_image(raw[suffix]))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            entry.notes.append(f"{suffix}: {exc}")
    if AUDIO_SUFFIX in raw:
        try:
            entry.audio = _wave(raw[AUDIO_SUFFIX])
        except (RuntimeError, ValueError, TypeError) as exc:  # libsndfile errors are RuntimeErrors
            entry.notes.append(f"{AUDIO_SUFFIX}: {exc}")
    try:
        entry.captions = _captions(raw.get(CAPTIONS_SUFFIX, b"[]"))
    except (ValueError, TypeError) as exc:
        entry.notes.append(f"{CAPTIONS_SUFFIX}: {exc}")
    meta: dict[str, Any] = {}
    if META_SUFFIX in raw:
        try:
            meta = dict(json.loads(raw[META_SUFFIX]))
        except (ValueError, TypeError) as exc:
            entry.notes.append(f"{META_SUFFIX}: {exc}")
    entry.detail = _describe({**meta, **{k: v for k, v in (row or {}).items() if v is not None}})
    entry.source = str((row or {}).get("uri") or meta.get("source") or "")
    return entry


def failed_entry(row: Mapping[str, Any]) -> SheetEntry:
    """An input that has no sample: its manifest row's reason, error and source."""
    key = str(row.get("key") or row.get("id") or f"input {row.get('index', '?')}")
    error = str(row.get("error") or "")
    detail = f"{row.get('reason') or 'failed'}: {error}" if error else str(row.get("reason"))
    return SheetEntry(key=key, status="failed", detail=detail, source=str(row.get("uri") or ""))


def batch_entries(batch: Mapping[str, Any], limit: int = 8) -> list[SheetEntry]:
    """The first `limit` clips of a collated batch (`gram.decode.collate`), as decoded for the
    model: its frames and crop, its audio window, the caption it was given."""
    video: Tensor = batch["video"]  # [B, T, 3, H, W] uint8
    audio: Tensor = batch["audio"]  # [B, S] float32
    present: Tensor = batch["audio_present"]  # [B] bool
    out = []
    for i in range(min(limit, video.shape[0])):
        frames = [f.permute(1, 2, 0).contiguous().numpy() for f in video[i]]  # each [H, W, 3]
        has_audio = bool(present[i])
        window = audio.shape[1] / SAMPLE_RATE
        out.append(
            SheetEntry(
                key=str(batch["keys"][i]),
                status="ok",
                frames=frames,
                audio=audio[i].numpy() if has_audio else None,
                captions=[str(batch["text"][i])],
                detail=f"{video.shape[1]} frames of {video.shape[-1]} px, "
                + (f"{window:.2f} s audio window" if has_audio else "no audio track"),
            )
        )
    return out


def first_batch_sheet(batch: Mapping[str, Any], folder: Path, limit: int = 8) -> Path | None:
    """`folder/first_batch.png`: the sheet of a training batch's first `limit` clips.

    A picture is never worth a training run: if drawing fails, this warns and returns None.
    """
    entries = batch_entries(batch, limit)
    title = (
        f"First training batch: {len(entries)} of {len(batch['keys'])} clips as the model sees "
        "them (frames, audio window, caption)"
    )
    try:
        return render_sheet(entries, folder / "first_batch.png", title=title)
    except Exception as exc:
        log.warning("the first batch's contact sheet could not be drawn: %r", exc)
        return None


def _strip(frames: Sequence[np.ndarray], max_width: int) -> np.ndarray:
    """Frames scaled to `_ROW` pixels high, side by side with 2 px gaps, the whole strip
    shrunk to at most `max_width` pixels. -> [H <= _ROW, W <= max_width, 3] uint8."""
    if len(frames) > MAX_STRIP_FRAMES:
        picks = np.linspace(0, len(frames) - 1, MAX_STRIP_FRAMES).round().astype(int)
        frames = [frames[int(i)] for i in picks]
    thumbs = []
    for frame in frames:
        h, w = frame.shape[:2]
        size = (max(1, round(w * _ROW / max(h, 1))), _ROW)
        thumbs.append(np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR)))
    gap = np.full((_ROW, 2, 3), 255, dtype=np.uint8)
    strip = np.concatenate([p for t in thumbs for p in (t, gap)][:-1], axis=1)
    if strip.shape[1] > max_width:
        height = max(1, round(_ROW * max_width / strip.shape[1]))
        strip = np.asarray(Image.fromarray(strip).resize((max_width, height)))
    return strip


@functools.cache
def _mel_transform() -> LogMel:
    return LogMel()


def _spectrogram(wave: np.ndarray) -> np.ndarray:
    """[S] waveform -> log-mel picture [_ROW, _SPEC_WIDTH, 3] uint8, low frequencies at the
    bottom, time left to right, normalised values on the fixed `_SPEC_RANGE` colour scale."""
    from matplotlib import colormaps

    with torch.no_grad():
        samples = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None]  # [1, S]
        mel = _mel_transform()(samples)[0].T.numpy()  # [n_mels, F]
    low, high = _SPEC_RANGE
    scaled = np.clip((mel[::-1] - low) / (high - low), 0.0, 1.0)
    rgb = (colormaps["magma"](scaled)[..., :3] * 255).astype(np.uint8)  # [n_mels, F, 3]
    picture = Image.fromarray(rgb).resize((_SPEC_WIDTH, _ROW), Image.Resampling.BILINEAR)
    return np.asarray(picture)


def _caption_lines(entry: SheetEntry, width: int = 80) -> list[str]:
    lines = textwrap.wrap(entry.detail, width, max_lines=3, placeholder=" ...")
    for caption in entry.captions[:2]:
        lines += textwrap.wrap(f"\u201c{caption}\u201d", width, max_lines=2, placeholder=" ...")
    if entry.source:
        lines += textwrap.wrap(f"source: {entry.source}", width, max_lines=1, placeholder=" ...")
    lines += [f"unreadable {n}"[:width] for n in entry.notes[:2]]
    return lines[:7]


def _save(fig: Figure, path: Path, dpi: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path


def render_sheet(entries: Sequence[SheetEntry], path: Path, *, title: str) -> Path:
    """One row per entry: frame strip, log-mel spectrogram, key / status / detail / caption.

    The strips and spectrograms are composed into one picture (drawn pixel for pixel) and
    the words are figure text, so drawing stays quick for many rows.
    """
    if not entries:
        raise ValueError("a contact sheet needs at least one entry")
    strips = [_strip(e.frames, _STRIP_MAX) if e.frames else None for e in entries]
    strip_width = max([s.shape[1] for s in strips if s is not None] + [_STRIP_MIN])
    step = _ROW + _GAP
    spec_left = strip_width + _GAP
    canvas = np.full((len(entries) * step, spec_left + _SPEC_WIDTH, 3), 255, dtype=np.uint8)
    blank = np.full((_ROW, 1, 3), 235, dtype=np.uint8)
    for i, (entry, strip) in enumerate(zip(entries, strips, strict=True)):
        top = i * step
        if strip is not None:
            canvas[top : top + strip.shape[0], : strip.shape[1]] = strip
        else:
            canvas[top : top + _ROW, :strip_width] = blank
        if entry.audio is not None and entry.audio.size:
            canvas[top : top + _ROW, spec_left:] = _spectrogram(entry.audio)
        else:
            canvas[top : top + _ROW, spec_left:] = blank
    width, height = canvas.shape[1] + _GAP + _TEXT_WIDTH, canvas.shape[0] + _TITLE
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    ax = fig.add_axes((0.0, 0.0, canvas.shape[1] / width, canvas.shape[0] / height))
    ax.imshow(canvas, interpolation="nearest", aspect="auto")
    ax.axis("off")
    fig.text(0.5, 1 - 8 / height, title, ha="center", va="top", fontsize=10)

    def label(x: float, y: float, text: str, **style: Any) -> None:  # x, y: pixels, top left
        fig.text(x / width, 1 - (_TITLE + y) / height, text, **style)

    text_left = canvas.shape[1] + _GAP
    middle: dict[str, Any] = {"ha": "center", "va": "center", "fontsize": 8}
    for i, entry in enumerate(entries):
        top = i * step
        ok = entry.status == "ok"
        colour = _OK if ok else _FAILED
        if not entry.frames:
            empty = "no frames" if ok else "no sample"
            label(strip_width / 2, top + _ROW / 2, empty, color="0.4" if ok else colour, **middle)
        if entry.audio is not None:
            seconds = entry.audio.shape[0] / SAMPLE_RATE
            label(spec_left + 3, top + _ROW - 3, f"0-{seconds:.1f} s", fontsize=6.5, color="white")
        elif ok:
            label(spec_left + _SPEC_WIDTH / 2, top + _ROW / 2, "no audio", color="0.4", **middle)
        label(text_left, top, entry.key, va="top", fontsize=8.5, weight="bold")
        label(text_left, top + 14, entry.status.upper(), va="top", fontsize=8, color=colour)
        label(text_left, top + 28, "\n".join(_caption_lines(entry)), va="top", fontsize=7)
    return _save(fig, path, dpi=_DPI)


@dataclass(frozen=True)
class Retrieved:
    """One retrieved clip: its middle frame [H, W, 3] uint8 (None if unreadable), score."""

    key: str
    frame: np.ndarray | None
    score: float
    match: bool


@dataclass(frozen=True)
class RetrievalRow:
    """A query caption, the clip it belongs to, and what the model ranked first."""

    caption: str
    key: str
    results: list[Retrieved]


def render_retrievals(rows: Sequence[RetrievalRow], path: Path, *, title: str) -> Path:
    """One row per query: the caption, then its top K clips (rank, key, volume)."""
    k = max(len(r.results) for r in rows)
    fig = Figure(figsize=(3.2 + 1.9 * k, 0.9 + 2.0 * len(rows)))
    grid = fig.add_gridspec(
        len(rows), k + 1, width_ratios=[2.2] + [1] * k, left=0.01, right=0.99,
        top=1 - 0.8 / fig.get_figheight(), bottom=0.02, wspace=0.08, hspace=0.35,
    )  # fmt: skip
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / fig.get_figheight(), va="top")
    for i, row in enumerate(rows):
        ax = fig.add_subplot(grid[i, 0])
        ax.axis("off")
        text = "\n".join(textwrap.wrap(f"\u201c{row.caption}\u201d", 30, max_lines=5))
        ax.text(0, 0.9, text, va="top", fontsize=8.5, transform=ax.transAxes)
        ax.text(0, 0.05, f"clip {row.key}", fontsize=7, color="0.4", transform=ax.transAxes)
        for j, hit in enumerate(row.results):
            cell = fig.add_subplot(grid[i, j + 1])
            if hit.frame is not None:
                cell.imshow(hit.frame)
            cell.set_xticks([])
            cell.set_yticks([])
            for spine in cell.spines.values():
                spine.set_color(_MATCH if hit.match else "0.8")
                spine.set_linewidth(4 if hit.match else 1)
            cell.set_title(f"{j + 1}. {hit.key[:18]}\nvolume {hit.score:.3f}", fontsize=7)
    return _save(fig, path)


def samples_by_key(
    shards: Sequence[ShardInfo], keys: set[str], s3: S3Config | None
) -> dict[str, RawSample]:
    """The samples of `keys` found in `shards`, read in order until every key is found."""
    found: dict[str, RawSample] = {}
    for shard in shards:
        if len(found) == len(keys):
            break
        stream = storage.open_read(shard.url, s3=s3)
        try:
            for raw in iter_raw_samples(stream, shard.url):
                if raw["__key__"] in keys:
                    found[raw["__key__"]] = raw
                    if len(found) == len(keys):
                        break
        finally:
            stream.close()
    return found


class Embedded(Protocol):
    """An embedded eval set (`ClipEmbeddings` of the evaluation): keys [Ni] in item order;
    items: data modality -> [Ni, D]; present [Ni, len(items)]; text [Nt, D]; text_to_item
    [Nt] (a clip's captions are consecutive rows, in the sample's order)."""

    keys: list[str]
    items: dict[str, Tensor]
    present: Tensor
    text: Tensor
    text_to_item: Tensor


def retrieval_rows(
    emb: Embedded,
    shards: Sequence[ShardInfo],
    s3: S3Config | None,
    *,
    queries: int = 4,
    k: int = 5,
) -> list[RetrievalRow]:
    """The top-`k` clips by volume for the first caption of `queries` clips spread evenly
    over the eval set (in key order), with frames and captions read back from `shards`."""
    keys = emb.keys
    first_row: dict[int, int] = {}
    for row, item in enumerate(emb.text_to_item.tolist()):
        first_row.setdefault(int(item), row)
    clips = sorted(first_row)
    spread = np.linspace(0, len(clips) - 1, min(queries, len(clips)))
    picks = list(dict.fromkeys(clips[round(i)] for i in spread))
    rows = torch.tensor([first_row[c] for c in picks])
    scores = score_matrix(emb.text[rows], list(emb.items.values()), item_mask=emb.present)
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1, largest=False)  # [q, k]
    wanted = {keys[c] for c in picks} | {keys[int(j)] for j in top.indices.flatten()}
    entries = {
        key: entry_from_sample(raw) for key, raw in samples_by_key(shards, wanted, s3).items()
    }
    out = []
    for q, clip in enumerate(picks):
        query = entries.get(keys[clip])
        caption = query.captions[0] if query and query.captions else "(caption not found)"
        results = []
        for score, j in zip(top.values[q].tolist(), top.indices[q].tolist(), strict=True):
            hit = entries.get(keys[j])
            frame = hit.frames[len(hit.frames) // 2] if hit and hit.frames else None
            results.append(Retrieved(keys[j], frame, score, j == clip))
        out.append(RetrievalRow(caption, keys[clip], results))
    return out


def top_retrievals(
    emb: Embedded, shards: Sequence[ShardInfo], s3: S3Config | None, path: Path
) -> Path:
    """`path`: the picture of `retrieval_rows` (4 captions, top 5 clips each)."""
    rows = retrieval_rows(emb, shards, s3)
    k = max(len(r.results) for r in rows)
    return render_retrievals(rows, path, title=f"Top {k} clips by volume for {len(rows)} captions")
