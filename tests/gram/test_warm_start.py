"""Starting a model from another's weights: all of them or tower by tower, exactly, and
errors that name the keys before anything is copied."""

from __future__ import annotations

import pytest
import torch

from gram.model import build_model
from gram.model_config import model_config
from gram.warm_start import check_warm_start, module_names, warm_start


def _pair(**overrides):
    torch.manual_seed(0)
    source = build_model(model_config("tiny"))
    torch.manual_seed(1)
    target = build_model(model_config("tiny", [f"{k}={v}" for k, v in overrides.items()]))
    return source, target


def test_all_copies_every_weight_exactly():
    source, target = _pair()
    loaded = warm_start(target, source.state_dict(), ["all"], source="src")
    assert loaded == sorted(source.state_dict())
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_named_towers_copy_their_encoder_and_projection_only():
    source, target = _pair()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    loaded = warm_start(target, source.state_dict(), ["video"], source="src")
    assert loaded
    assert all(k.startswith(("encoders.video.", "projections.video.")) for k in loaded)
    for name, value in target.state_dict().items():
        want = source.state_dict()[name] if name in loaded else before[name]
        assert torch.equal(value, want), name
    assert module_names(target) == ["all", "text", "video", "audio"]


def test_mismatches_name_the_keys_and_leave_the_model_unchanged():
    source, target = _pair(embed_dim=64)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"projections\.video\.weight: source \(128, 64\)"):
        warm_start(target, source.state_dict(), ["all"], source="src")
    for name, value in target.state_dict().items():
        assert torch.equal(value, before[name]), name
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("encoders.audio.")}
    same, fresh = _pair()
    with pytest.raises(ValueError, match=r"missing from the source \(\d+\): encoders\.audio\."):
        warm_start(fresh, state, ["audio"], source="src")
    warm_start(fresh, state, ["text", "video"], source="src")  # the towers that are there
    extra = {**same.state_dict(), "dam.query": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"not in the model \(1\): dam\.query"):
        warm_start(fresh, extra, ["all"], source="src")
    with pytest.raises(ValueError, match="unknown module"):
        warm_start(fresh, same.state_dict(), ["depth"], source="src")


def test_the_check_works_on_a_meta_model_without_allocating():
    source, _ = _pair()
    with torch.device("meta"):
        meta = build_model(model_config("tiny"), load_pretrained=False)
    chosen = check_warm_start(meta, source.state_dict(), ["text"], source="src")
    assert chosen
    assert all(k.startswith(("encoders.text.", "projections.text.")) for k in chosen)
