"""Text tower: offline tokenizers and a BERT-compatible encoder.

    tok = build_tokenizer(cfg.text)                 # "hash", "pretrained" or a tokenizer.json
    ids, attention = tok(["a red circle", "..."])   # [B, L] int64, [B, L] bool
    enc = BertEncoder(cfg.text)                     # Hugging Face BertModel parameter names
    load_hf_folder(enc, folder)                     # config.json + model.safetensors
    pooled = enc(ids, attention)                    # [B, hidden_size]

`BertEncoder` is our own implementation of the BERT architecture (post-LN
blocks, exact GELU, absolute positions) whose state dict uses the same names
as a Hugging Face `BertModel`, so a local Hugging Face folder of a BERT-family
model (BERT, MiniLM, all-MiniLM-L6-v2, ...) loads without `transformers`.
Nothing is ever downloaded: folders and tokenizer files are local paths, or
folders shipped inside an installed package (`package:NAME`).
"""

from __future__ import annotations

import importlib
import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gram.encoders import init_weights
from gram.model_config import TextConfig

__all__ = [
    "BertEncoder",
    "HFTokenizer",
    "HashTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "load_hf_folder",
    "resolve_pretrained",
    "text_config_from_hf",
]

PACKAGE_PREFIX = "package:"


class Tokenizer(Protocol):
    """Texts -> (token ids [B, L] int64, attention mask [B, L] bool), padded to the longest."""

    max_length: int

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]: ...


def _pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad id lists -> ids [B, L] int64, attention [B, L] bool."""
    length = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), max(length, 1)), pad_id, dtype=torch.int64)
    attention = torch.zeros(ids.shape, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        attention[i, : len(r)] = True
    return ids, attention


class HashTokenizer:
    """A built-in word tokenizer that needs no vocabulary file.

    Lower-cases, splits into words and punctuation, and maps each piece to
    4 + crc32(piece) mod (vocab_size - 4); ids 0-3 are [PAD], [UNK], [CLS], [SEP].
    Deterministic across processes and machines. For models trained from
    scratch (the `tiny` config); pretrained towers use their own tokenizer.json.
    """

    PAD, UNK, CLS, SEP = 0, 1, 2, 3
    _SPECIAL = 4
    _WORDS = re.compile(r"\w+|[^\w\s]", re.UNICODE)

    def __init__(self, vocab_size: int, max_length: int) -> None:
        if vocab_size <= self._SPECIAL:
            raise ValueError(f"hash tokenizer needs vocab_size > {self._SPECIAL}, got {vocab_size}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
        self.vocab_size = vocab_size
        self.max_length = max_length

    def token_id(self, piece: str) -> int:
        """The id of one word or punctuation piece."""
        return self._SPECIAL + zlib.crc32(piece.encode("utf-8")) % (self.vocab_size - self._SPECIAL)

    def encode(self, text: str) -> list[int]:
        """[CLS] pieces... [SEP], truncated to max_length."""
        pieces = self._WORDS.findall(text.lower())[: self.max_length - 2]
        return [self.CLS, *(self.token_id(p) for p in pieces), self.SEP]

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        return _pad([self.encode(t) for t in texts], self.PAD)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` read with the `tokenizers` library (offline).

    Adds the file's special tokens ([CLS] ... [SEP] for BERT), truncates to
    `max_length`, pads with the file's [PAD] token (id 0 if it has none).
    """

    def __init__(self, path: str | Path, max_length: int) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(
                f"tokenizer file {str(p)!r} not found: pass a local tokenizer.json or a Hugging "
                "Face folder that holds one (nothing is downloaded)"
            )
        self.path = p
        self.max_length = max_length
        self._tok = _Tokenizer.from_file(str(p))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length)
        pad = self._tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else int(pad)

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        encodings = self._tok.encode_batch(list(texts))
        return _pad([list(e.ids) for e in encodings], self.pad_id)


def resolve_pretrained(spec: str) -> Path:
    """A local folder path, or `package:NAME` -> the model folder shipped in package NAME.

    A package folder is found via the package's `get_model_path()` or its
    `model/` subfolder. Raises FileNotFoundError / ModuleNotFoundError with the fix.
    """
    if spec.startswith(PACKAGE_PREFIX):
        name = spec[len(PACKAGE_PREFIX) :]
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            dist = name.replace("_", "-")
            raise ModuleNotFoundError(
                f"the pretrained text tower {spec!r} needs the package {dist!r}: "
                f"pip install 'gram-ray[text]' (or pip install {dist})"
            ) from None
        getter = getattr(module, "get_model_path", None)
        default = Path(str(module.__file__)).parent / "model"
        folder = Path(getter()) if callable(getter) else default
    else:
        folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{spec!r} -> {str(folder)!r} is not a Hugging Face model folder (no config.json); "
            "pass a local folder with config.json, model.safetensors and tokenizer.json"
        )
    return folder


def text_config_from_hf(folder: str | Path, **overrides: object) -> TextConfig:
    """A TextConfig matching the BERT config.json in `folder` (plus overrides, e.g. pool)."""
    path = Path(folder) / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model_type = data.get("model_type", "bert")
    if model_type != "bert" or data.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"{str(path)!r}: only BERT-architecture models with absolute positions load here "
            f"(got model_type={model_type!r})"
        )
    fields: dict[str, object] = {
        "vocab_size": data["vocab_size"],
        "hidden_size": data["hidden_size"],
        "num_layers": data["num_hidden_layers"],
        "num_heads": data["num_attention_heads"],
        "intermediate_size": data["intermediate_size"],
        "max_position": data["max_position_embeddings"],
        "type_vocab_size": data.get("type_vocab_size", 2),
        "layer_norm_eps": data.get("layer_norm_eps", 1e-12),
        "dropout": data.get("hidden_dropout_prob", 0.1),
        "tokenizer": "pretrained",
        "pretrained": str(folder),
    }
    fields.update(overrides)
    return TextConfig(**fields)  # type: ignore[arg-type]


def build_tokenizer(cfg: TextConfig) -> Tokenizer:
    """The tokenizer a text config names: hash, the pretrained folder's or a tokenizer.json."""
    if cfg.tokenizer == "hash":
        return HashTokenizer(cfg.vocab_size, cfg.max_length)
    if cfg.tokenizer == "pretrained":
        if cfg.pretrained is None:
            raise ValueError("text.tokenizer='pretrained' needs text.pretrained")
        return HFTokenizer(resolve_pretrained(cfg.pretrained), cfg.max_length)
    return HFTokenizer(cfg.tokenizer, cfg.max_length)


class BertEmbeddings(nn.Module):
    """word + position + token type (0) embeddings -> LayerNorm -> dropout. [B, L] -> [B, L, H]."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)  # [L]
        x = self.word_embeddings(ids) + self.position_embeddings(positions)[None]  # [B, L, H]
        x = x + self.token_type_embeddings.weight[0]
        out: Tensor = self.dropout(self.LayerNorm(x))
        return out


class BertSelfAttention(nn.Module):
    """Separate q, k, v projections; key padding mask. [B, L, H] -> [B, L, H]."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """x [B, L, H]; keep [B, 1, 1, L] bool (True = attend to that token)."""
        b, n, c = x.shape
        q, k, v = (
            proj(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)  # [B, h, L, dh]
            for proj in (self.query, self.key, self.value)
        )
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)  # [B, h, L, dh]
        return y.transpose(1, 2).reshape(b, n, c)


class BertResidualOutput(nn.Module):
    """LayerNorm(dropout(dense(x)) + residual): the post-LN step of BERT."""

    def __init__(self, d_in: int, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        out: Tensor = self.LayerNorm(self.dropout(self.dense(x)) + residual)
        return out


class BertAttention(nn.Module):
    """Self-attention plus its residual output (names: `self`, `output`)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertResidualOutput(cfg.hidden_size, cfg)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        out: Tensor = self.output(self.self(x, keep), x)
        return out


class BertIntermediate(nn.Module):
    """dense -> exact GELU. [B, L, H] -> [B, L, I]."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """One post-LN BERT layer. [B, L, H] -> [B, L, H]."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        h = self.attention(x, keep)  # [B, L, H]
        out: Tensor = self.output(self.intermediate(h), h)
        return out


class BertLayers(nn.Module):
    """The stack of layers (name: `encoder.layer.N`)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))


class BertEncoder(nn.Module):
    """BERT over token ids, pooled to one vector per text. -> [B, hidden_size].

    `pool="cls"` takes the [CLS] token's final hidden state; `pool="mean"` averages
    the final hidden states of the non-padding tokens (sentence-transformers' mean
    pooling). The Hugging Face pooler (dense + tanh) is not part of the model.
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.output_dim = cfg.hidden_size
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertLayers(cfg)
        init_weights(self)

    def hidden_states(self, ids: Tensor, attention: Tensor) -> Tensor:
        """Final hidden states. ids [B, L] int64, attention [B, L] bool -> [B, L, H]."""
        if ids.dim() != 2 or attention.shape != ids.shape:
            raise ValueError(
                f"ids and attention must both be [B, L], got {tuple(ids.shape)} and "
                f"{tuple(attention.shape)}"
            )
        if ids.shape[1] > self.cfg.max_position:
            raise ValueError(
                f"{ids.shape[1]} tokens exceed text.max_position={self.cfg.max_position}: "
                "lower the tokenizer's max_length"
            )
        keep = attention.to(torch.bool)[:, None, None, :]  # [B, 1, 1, L]
        h: Tensor = self.embeddings(ids)  # [B, L, H]
        for layer in self.encoder.layer:
            h = layer(h, keep)
        return h

    def forward(self, ids: Tensor, attention: Tensor) -> Tensor:
        """ids [B, L] int64, attention [B, L] bool -> pooled [B, H]."""
        h = self.hidden_states(ids, attention)  # [B, L, H]
        if self.cfg.pool == "cls":
            return h[:, 0]
        w = attention.to(h.dtype).unsqueeze(-1)  # [B, L, 1]
        return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-9)  # [B, H]


_HF_IGNORED = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$)")


def _hf_name(key: str) -> str:
    """Hugging Face BERT key -> ours: drop `bert.`; old files name LayerNorm gamma/beta."""
    key = key.removeprefix("bert.")
    if key.endswith("LayerNorm.gamma"):
        return key.removesuffix("gamma") + "weight"
    if key.endswith("LayerNorm.beta"):
        return key.removesuffix("beta") + "bias"
    return key


def load_hf_folder(encoder: BertEncoder, folder: str | Path) -> None:
    """Load a local Hugging Face BERT folder's weights into `encoder` (strict).

    Reads `model.safetensors` (or `pytorch_model.bin` with weights_only=True),
    drops a `bert.` prefix and the parts our encoder does not have (pooler, MLM
    head, position_ids), and checks the folder's config.json against the
    encoder's config. Raises ValueError listing missing / unexpected keys.
    """
    from gram.weights import check_and_load, read_state_dict

    path = Path(folder)
    expected = text_config_from_hf(path)
    mine = encoder.cfg
    for name in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "intermediate_size",
        "max_position",
        "type_vocab_size",
    ):
        if getattr(expected, name) != getattr(mine, name):
            raise ValueError(
                f"{str(path)!r} has {name}={getattr(expected, name)} but the text config says "
                f"{getattr(mine, name)}: build it with gram.text.text_config_from_hf(folder)"
            )
    weights = path / "model.safetensors"
    if not weights.is_file():
        weights = path / "pytorch_model.bin"
    state = read_state_dict(weights)
    state = {_hf_name(k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not _HF_IGNORED.match(k)}
    check_and_load(encoder, state, source=str(weights))
