"""Start a model from another model's weights: all of them, or tower by tower.

    state = read_state_dict("runs/cosine/checkpoint_.../model.safetensors")
    loaded = warm_start(model, state, ["all"], source="runs/cosine/...")      # every weight
    loaded = warm_start(model, state, ["video", "audio"], source="...")      # two towers

A module is `all` (every weight of the model, strictly: the state must hold
exactly the model's keys), a modality name (its encoder and its projection; a
modality sharing another's encoder brings that encoder), or `dam` (the
data-anchor matching head). Everything not named keeps its current values.
Before anything is copied, every key the named modules need is checked: one
missing from the state, or of another shape, raises a ValueError that names it
(the model is then left unchanged). `check_warm_start` does the same check on
a model built on the `meta` device, e.g. to refuse a bad source before a job
starts any work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gram.model import GramModel

__all__ = ["ALL_MODULES", "check_warm_start", "module_names", "warm_start"]

ALL_MODULES = "all"
_MAX_LISTED = 12


def module_names(model: GramModel) -> list[str]:
    """The names `warm_start` takes for `model`: `all`, each modality, and `dam` if present."""
    return [ALL_MODULES, *model.names, *(["dam"] if model.dam is not None else [])]


def _prefixes(model: GramModel, modules: Sequence[str]) -> list[str]:
    valid = module_names(model)
    unknown = [m for m in modules if m not in valid]
    if unknown or not modules:
        raise ValueError(
            f"unknown module(s) {unknown} to start from: use {ALL_MODULES!r} or some of "
            f"{', '.join(valid[1:])}"
        )
    if ALL_MODULES in modules:
        return [""]
    prefixes = []
    for name in modules:
        if name == "dam":
            prefixes.append("dam.")
            continue
        owner = model.cfg.modality(name).share_encoder_with or name
        prefixes += [f"encoders.{owner}.", f"projections.{name}."]
    return prefixes


def _listed(keys: list[str]) -> str:
    more = len(keys) - _MAX_LISTED
    return ", ".join(keys[:_MAX_LISTED]) + (f" ... (+{more} more)" if more > 0 else "")


def check_warm_start(
    model: GramModel, state: Mapping[str, Tensor], modules: Sequence[str], *, source: str
) -> dict[str, Tensor]:
    """The entries of `state` that `warm_start` would copy into `model`; ValueError naming
    every missing, mis-shaped (and, for `all`, unexpected) key. `model` may be on `meta`."""
    prefixes = _prefixes(model, modules)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(tuple(prefixes))}
    missing = sorted(k for k in own if k not in state)
    mis_shaped = sorted(
        f"{k}: source {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    )
    unexpected = sorted(k for k in state if k not in own) if prefixes == [""] else []
    problems = []
    if mis_shaped:
        problems.append(f"shape mismatch ({len(mis_shaped)}): {_listed(mis_shaped)}")
    if missing:
        problems.append(f"missing from the source ({len(missing)}): {_listed(missing)}")
    if unexpected:
        problems.append(f"not in the model ({len(unexpected)}): {_listed(unexpected)}")
    if problems:
        raise ValueError(
            f"cannot start model {model.cfg.name!r} from {source}: "
            + "; ".join(problems)
            + ". Use the source's model config (and model overrides), or name the towers "
            f"that match in the modules to take (some of {', '.join(module_names(model)[1:])})"
        )
    return {k: state[k] for k in own}


@torch.no_grad()
def warm_start(
    model: GramModel, state: Mapping[str, Tensor], modules: Sequence[str], *, source: str
) -> list[str]:
    """Copy the weights of `modules` from `state` into `model` (exactly, dtype kept);
    returns the keys copied. See `check_warm_start` for the errors."""
    chosen = check_warm_start(model, state, modules, source=source)
    model.load_state_dict(chosen, strict=False)
    return sorted(chosen)
