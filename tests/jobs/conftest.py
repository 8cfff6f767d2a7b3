"""Shared by the evaluation, registry and promotion tests: a tiny GRAM model trained once
(plus an untrained one, the "worse model"), synthetic eval shards, and helpers that tie a
checkpoint to a training run on a given MLflow server."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gram.decode import Collator, DecodeConfig, SampleDecoder
from gram.loss import GramLoss
from gram.model import gram_tiny
from gram.steps import OptimConfig, build_optimizer, cosine_schedule, train_step
from gram.synthetic import SyntheticClips
from jobs.train import TrainConfig
from jobs.training.checkpoints import Progress, save_checkpoint_dir
from pipelines.samples_to_shards import write_sample_shards
from tests.support.once import built_once

EVAL_CLIPS = 36
SYNTHETIC_CLASSES = [
    "eval.classification.label_fields=[color, sound]",
    "eval.classification.prompts="
    '["a {color} square and a {sound}", "{color} square with {sound} sound"]',
]
"""Overrides that classify the synthetic clips by their (colour, sound) metadata."""


@dataclass(frozen=True)
class Checkpoints:
    """Training checkpoint folders (model.safetensors, trainer.pt, state.json)."""

    good: Path
    untrained: Path


def _train(folder: Path, steps: int) -> Path:
    """`tiny` trained for `steps` steps of 32 synthetic clips on one thread (as tests/gram)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model, loss = gram_tiny(), GramLoss()
        optim = OptimConfig(
            lr=3e-3, weight_decay=0.01, warmup_steps=min(15, steps), total_steps=max(steps, 1)
        )
        optimizer = build_optimizer(model, loss, optim)
        scheduler = cosine_schedule(optimizer, optim)
        decode = SampleDecoder(DecodeConfig.from_model(model.cfg), train=True)
        collate = Collator(model.tokenizer)
        clips = SyntheticClips(288, seed=1)
        pool = [clips[i] for i in range(len(clips))]
        rng = random.Random(0)
        for _ in range(steps):
            batch = collate([decode(pool[i]) for i in rng.sample(range(len(pool)), 32)])
            train_step(model, loss, optimizer, batch, scheduler=scheduler, grad_clip=1.0)
        return save_checkpoint_dir(
            folder, model, loss, optimizer, scheduler, Progress(step=steps), TrainConfig()
        )
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    def build(root: Path) -> None:
        _train(root / "good", 120)
        _train(root / "untrained", 0)

    root = built_once(tmp_path_factory, "checkpoints", build)
    return Checkpoints(good=root / "good", untrained=root / "untrained")


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """36 unseen synthetic clips (every colour x sound once, 3 without audio), 3 shards."""

    def build(root: Path) -> None:
        out = str(root / "eval")
        write_sample_shards(SyntheticClips(EVAL_CLIPS, seed=2), out, samples_per_shard=12)

    return str(built_once(tmp_path_factory, "eval-shards", build) / "eval")


def training_run(client, experiment: str, checkpoint: str) -> str:
    """A stand-in for the training job's MLflow run (the tags and params it writes)."""
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name="train-tiny", tags={"gram.job": "train"})
    run_id = run.info.run_id
    client.set_tag(run_id, "git_commit", "f" * 40)
    client.set_tag(run_id, "final_checkpoint", checkpoint)
    client.log_param(run_id, "dataset_fingerprint", "synthetic-seed1")
    client.set_terminated(run_id)
    return run_id


def checkpoint_of_run(source: Path, target: Path, run_id: str) -> Path:
    """A copy of checkpoint `source` whose state.json names training run `run_id`."""
    shutil.copytree(source, target)
    state = json.loads((target / "state.json").read_text())
    state["progress"]["mlflow_run_id"] = run_id
    (target / "state.json").write_text(json.dumps(state))
    return target
