"""Weights from local files: state dicts, encoder weights and gram checkpoints.

    load_weights(model.encoder("video"), "vit_b16.safetensors")            # one tower
    load_weights(model, "run/step-1000.safetensors")                       # a gram checkpoint
    load_weights(model.encoder("text"), "ckpt.safetensors", prefix="encoders.text.")
    save_checkpoint("run/step-1000.safetensors", model, loss, metadata={"step": "1000"})
    model, loss_state, metadata = load_checkpoint("run/step-1000.safetensors")

Files are safetensors (`.safetensors`) or torch pickles (`.pt`, `.pth`,
`.bin`) read with `torch.load(weights_only=True)`, which refuses anything but
tensors and plain containers: loading never runs code from the file.

A gram checkpoint holds the model state (keys as in `GramModel.state_dict()`),
the loss state under `loss.` (the learned temperature) and the model config as
JSON (safetensors metadata `gram_config`, or the `config` entry of a `.pt`),
so `load_checkpoint` rebuilds the model without knowing its config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gram.config import from_dict, to_dict

if TYPE_CHECKING:
    from gram.model import GramModel

__all__ = [
    "CHECKPOINT_FORMAT",
    "LoadReport",
    "check_and_load",
    "load_checkpoint",
    "load_weights",
    "read_loss_state",
    "read_metadata",
    "read_state_dict",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "gram-1"
_LOSS_PREFIX = "loss."
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_MAX_LISTED = 12


@dataclass(frozen=True)
class LoadReport:
    """What a non-strict load left out: model keys not in the file, file keys not in the model."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _FileContents:
    model: dict[str, Tensor]
    loss: dict[str, Tensor]
    config: dict[str, Any] | None
    metadata: dict[str, str]


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f" ... (+{more} more)" if more > 0 else "")


def _read(path: str | Path) -> _FileContents:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {str(p)!r} does not exist (paths are local)")
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        tensors: dict[str, Tensor] = {}
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta: dict[str, str] = dict(f.metadata() or {})
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = f.get_tensor(key)
        config = json.loads(meta["gram_config"]) if "gram_config" in meta else None
        model = {k: v for k, v in tensors.items() if not k.startswith(_LOSS_PREFIX)}
        loss = {
            k.removeprefix(_LOSS_PREFIX): v
            for k, v in tensors.items()
            if k.startswith(_LOSS_PREFIX)
        }
        if config is None:
            return _FileContents(tensors, {}, None, meta)
        return _FileContents(model, loss, config, meta)
    if p.suffix in _PICKLE_SUFFIXES:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # the unpickler raises several types
            raise ValueError(
                f"{str(p)!r} is not a plain state dict (torch.load with weights_only=True "
                f"refused it: {exc}); re-save it as safetensors or as a dict of tensors"
            ) from None
        if isinstance(obj, Mapping) and obj.get("gram_format") == CHECKPOINT_FORMAT:
            return _FileContents(
                dict(obj["model"]),
                dict(obj.get("loss", {})),
                dict(obj["config"]),
                {str(k): str(v) for k, v in obj.get("metadata", {}).items()},
            )
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not (isinstance(obj, Mapping) and all(isinstance(v, Tensor) for v in obj.values())):
            raise ValueError(f"{str(p)!r} does not hold a state dict (a mapping of name -> tensor)")
        return _FileContents({str(k): v for k, v in obj.items()}, {}, None, {})
    raise ValueError(
        f"unknown weights format {p.suffix!r} for {str(p)!r}: use .safetensors, or "
        f"{', '.join(_PICKLE_SUFFIXES)} for torch state dicts"
    )


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The model state dict in a weights file (a gram checkpoint's model part). On CPU."""
    return _read(path).model


def read_loss_state(path: str | Path) -> dict[str, Tensor]:
    """The loss state (e.g. the learned temperature) stored in a gram checkpoint. On CPU."""
    return _read(path).loss


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored with a gram checkpoint (e.g. `step`); {} for plain state dicts."""
    return _read(path).metadata


def check_and_load(
    module: nn.Module, state: Mapping[str, Tensor], *, source: str, strict: bool = True
) -> LoadReport:
    """Load `state` into `module`, checking names and shapes first.

    strict=True raises ValueError listing every missing, unexpected and
    mis-shaped key; strict=False loads the keys that match and returns what it
    skipped (a shape mismatch always raises).
    """
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mis_shaped = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    )
    problems = []
    if mis_shaped:
        problems.append(f"shape mismatch ({len(mis_shaped)}): {_listed(mis_shaped)}")
    if strict and missing:
        problems.append(f"missing from the file ({len(missing)}): {_listed(missing)}")
    if strict and unexpected:
        problems.append(f"not in the model ({len(unexpected)}): {_listed(unexpected)}")
    if problems:
        raise ValueError(
            f"cannot load {source} into {type(module).__name__}: "
            + "; ".join(problems)
            + ". If the file holds a whole model, pass prefix='encoders.<name>.' to load one "
            "tower; if the architecture differs, fix the config; strict=False skips missing "
            "and unexpected keys"
        )
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return LoadReport(missing=missing, unexpected=unexpected)


def load_weights(
    module: nn.Module, path: str | Path, *, prefix: str = "", strict: bool = True
) -> LoadReport:
    """Load the weights in `path` into `module` (a GramModel or any encoder).

    `prefix` selects and strips a part of the file's keys, e.g.
    `prefix="encoders.video."` loads the video tower of a gram checkpoint into
    `model.encoder("video")`. See `check_and_load` for `strict`.
    """
    state = read_state_dict(path)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"no key of {str(path)!r} starts with prefix {prefix!r}")
    return check_and_load(module, state, source=repr(str(path)), strict=strict)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    loss: nn.Module | None = None,
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write model (+ loss) state and the model config to `path` (.safetensors or .pt).

    `model` is a GramModel or a wrapper holding one as `.module` (DDP). Writes
    to a temporary name first, so a crash never leaves a half-written file.
    """
    from gram.model import GramModel

    inner = getattr(model, "module", model)
    if not isinstance(inner, GramModel):
        raise TypeError(f"save_checkpoint needs a GramModel (or DDP of one), got {type(inner)}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    model_state = {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
    loss_state = (
        {}
        if loss is None
        else {k: v.detach().cpu().contiguous() for k, v in loss.state_dict().items()}
    )
    config = to_dict(inner.cfg)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = {**model_state, **{_LOSS_PREFIX + k: v for k, v in loss_state.items()}}
        header = {**meta, "gram_format": CHECKPOINT_FORMAT, "gram_config": json.dumps(config)}
        save_file(tensors, str(tmp), metadata=header)
    elif p.suffix in _PICKLE_SUFFIXES:
        torch.save(
            {
                "gram_format": CHECKPOINT_FORMAT,
                "config": config,
                "model": model_state,
                "loss": loss_state,
                "metadata": meta,
            },
            tmp,
        )
    else:
        raise ValueError(f"checkpoint path must end in .safetensors or .pt, got {str(p)!r}")
    tmp.replace(p)
    return p


def load_checkpoint(
    path: str | Path, *, load_pretrained: bool = False
) -> tuple[GramModel, dict[str, Tensor], dict[str, str]]:
    """Rebuild a GramModel from a gram checkpoint -> (model, loss state, metadata).

    The model is built from the stored config and loaded strictly; pass the
    loss state to `loss.load_state_dict` to resume with the learned temperature.
    `load_pretrained=False` skips reading the pretrained text folder first (the
    checkpoint's weights replace it anyway); the tokenizer file is still needed.
    """
    from gram.model import GramModel
    from gram.model_config import ModelConfig

    contents = _read(path)
    if contents.config is None:
        raise ValueError(
            f"{str(path)!r} is a plain state dict, not a gram checkpoint (no stored config): "
            "build the model from its config and use load_weights(model, path)"
        )
    cfg = from_dict(ModelConfig, contents.config)
    model = GramModel(cfg, load_pretrained=load_pretrained)
    check_and_load(model, contents.model, source=repr(str(path)))
    return model, contents.loss, contents.metadata
