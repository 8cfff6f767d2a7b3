"""Fixtures for the model tests: a tiny model, a few synthetic samples, one thread."""

from __future__ import annotations

import pytest
import torch

from gram.decode import Collator, DecodeConfig, SampleDecoder
from gram.model import GramModel, gram_tiny
from gram.synthetic import SyntheticClips


@pytest.fixture
def one_thread():
    """Run with one intra-op thread: stable timings on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny() -> GramModel:
    torch.manual_seed(0)
    return gram_tiny()


@pytest.fixture(scope="session")
def clips() -> SyntheticClips:
    return SyntheticClips(12, seed=3, missing_audio=0.3)


@pytest.fixture
def tiny_batch(tiny, clips):
    decode = SampleDecoder(DecodeConfig.from_model(tiny.cfg), train=True)
    return Collator(tiny.tokenizer)([decode(clips[i]) for i in range(8)])
