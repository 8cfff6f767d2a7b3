"""Video and audio encoders: a ViT-style patch transformer and its poolings.

    VideoEncoder(cfg.vision)(frames)     # [B, T, 3, H, W] uint8 or 0-1 float -> [B, width]
    AudioEncoder(cfg.audio)(waveform)    # [B, S] float in [-1, 1], 16 kHz    -> [B, width]

The patch transformer uses the parameter layout of timm's VisionTransformer
(`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.attn.qkv`, ...,
`norm`), pre-LayerNorm blocks, exact GELU, LayerNorm eps 1e-6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gram.audio import LogMel
from gram.model_config import AudioEncoderConfig, VisionConfig

__all__ = [
    "Attention",
    "AttentionPool",
    "AudioEncoder",
    "Block",
    "PatchTransformer",
    "VideoEncoder",
    "init_weights",
]

LN_EPS = 1e-6


def init_weights(module: nn.Module) -> None:
    """ViT/BERT-style init: truncated normal(0.02) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection. [B, N, C] -> [B, N, C]."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, c // self.heads)  # [B, N, 3, h, c/h]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, N, c/h]
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # [B, h, N, c/h]
        out: Tensor = self.proj(y.transpose(1, 2).reshape(b, n, c))  # [B, N, C]
        return out


class Mlp(nn.Module):
    """Linear -> GELU -> Linear. [..., C] -> [..., C]."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))
        return out


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)). [B, N, C]."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width, round(width * mlp_ratio), dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        out: Tensor = x + self.mlp(self.norm2(x))
        return out


class PatchEmbed(nn.Module):
    """Conv patchifier: [B, C, H, W] -> [B, N, width], N = grid_h * grid_w."""

    def __init__(self, in_chans: int, width: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.proj(x).flatten(2).transpose(1, 2)  # [B, N, width]
        return out


class PatchTransformer(nn.Module):
    """ViT over a fixed-size 2-D input: patches + CLS + learned positions -> pooled [B, width].

    Args:
        in_chans: input channels (3 for RGB frames, 1 for a log-mel image).
        input_size: (H, W) of the input; positions are learned for this grid.
        patch_size, stride: square patches; stride < patch_size overlaps them.
        width, depth, heads, mlp_ratio: transformer size.
        pool: "cls" (the CLS token) or "mean" (mean of the patch tokens).
    """

    def __init__(
        self,
        *,
        in_chans: int,
        input_size: tuple[int, int],
        patch_size: int,
        stride: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        pool: str,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        h, w = input_size
        if h < patch_size or w < patch_size:
            raise ValueError(f"input {input_size} is smaller than one {patch_size}px patch")
        self.input_size = input_size
        self.grid = ((h - patch_size) // stride + 1, (w - patch_size) // stride + 1)
        num_patches = self.grid[0] * self.grid[1]
        self.pool = pool
        self.width = width
        self.patch_embed = PatchEmbed(in_chans, width, patch_size, stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        init_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, width]."""
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"expected inputs of size {self.input_size}, got {tuple(x.shape[-2:])}: "
                "resize in the decoder (gram.decode) or change the config"
            )
        tokens = self.patch_embed(x)  # [B, N, C]
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # [B, 1, C]
        x = self.pos_drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)  # [B, 1+N, C]
        for block in self.blocks:
            x = block(x)
        h: Tensor = self.norm(x)  # [B, 1+N, C]
        if self.pool == "cls":
            return h[:, 0]  # [B, C]
        return h[:, 1:].mean(dim=1)  # [B, C]


class AttentionPool(nn.Module):
    """A learned query attends over T tokens (with learned positions). [B, T, C] -> [B, C]."""

    def __init__(self, width: int, heads: int, max_tokens: int) -> None:
        super().__init__()
        self.heads = heads
        self.pos = nn.Parameter(torch.zeros(1, max_tokens, width))
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        init_weights(self)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        if t > self.pos.shape[1]:
            raise ValueError(f"attention pooling takes at most {self.pos.shape[1]} tokens, got {t}")
        dh = c // self.heads
        kv = self.kv(self.norm(x + self.pos[:, :t]))  # [B, T, 2C]
        k, v = kv.view(b, t, 2, self.heads, dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, T, dh]
        q = self.q(self.query).view(1, self.heads, 1, dh).expand(b, -1, -1, -1)  # [B, h, 1, dh]
        y = F.scaled_dot_product_attention(q, k, v)  # [B, h, 1, dh]
        out: Tensor = self.proj(y.reshape(b, c))  # [B, C]
        return out


class VideoEncoder(nn.Module):
    """Frames [B, T, 3, H, W] -> per-frame ViT -> temporal pooling -> [B, width].

    uint8 frames are scaled to [0, 1]; float frames must already be in [0, 1].
    Both are then normalised with the config's image mean / std. T may be
    smaller than `num_frames` (at most `num_frames` with attention pooling).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.output_dim = cfg.width
        self.register_buffer(
            "mean", torch.tensor(cfg.image_mean).view(1, 1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(cfg.image_std).view(1, 1, 3, 1, 1), persistent=False
        )
        self.image = PatchTransformer(
            in_chans=3,
            input_size=(cfg.image_size, cfg.image_size),
            patch_size=cfg.patch_size,
            stride=cfg.patch_size,
            width=cfg.width,
            depth=cfg.depth,
            heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            pool=cfg.pool,
            dropout=cfg.dropout,
        )
        self.temporal = (
            AttentionPool(cfg.width, cfg.heads, cfg.num_frames)
            if cfg.temporal_pool == "attention"
            else None
        )

    def forward(self, frames: Tensor) -> Tensor:
        """[B, T, 3, H, W] -> [B, width]."""
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be [B, T, 3, H, W], got {tuple(frames.shape)}")
        b, t = frames.shape[:2]
        x = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
        x = (x - self.mean) / self.std  # [B, T, 3, H, W]
        per_frame: Tensor = self.image(x.flatten(0, 1)).view(b, t, -1)  # [B, T, C]
        if self.temporal is None:
            return per_frame.mean(dim=1)  # [B, C]
        pooled: Tensor = self.temporal(per_frame)  # [B, C]
        return pooled


class AudioEncoder(nn.Module):
    """Waveform [B, S] -> log-mel [B, F, n_mels] -> patch transformer over (mel, time) -> [B, C].

    Waveforms longer than `cfg.num_samples` are cut at the end, shorter ones
    zero-padded, so the patch grid (and the learned positions) stay fixed.
    """

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.output_dim = cfg.width
        self.features = LogMel(
            sample_rate=cfg.sample_rate,
            n_mels=cfg.n_mels,
            window_ms=cfg.window_ms,
            hop_ms=cfg.hop_ms,
            fmin=cfg.fmin,
            fmax=cfg.fmax,
            mean=cfg.mel_mean,
            std=cfg.mel_std,
        )
        frames = self.features.num_frames(cfg.num_samples)
        self.transformer = PatchTransformer(
            in_chans=1,
            input_size=(cfg.n_mels, frames),
            patch_size=cfg.patch_size,
            stride=cfg.patch_stride,
            width=cfg.width,
            depth=cfg.depth,
            heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            pool=cfg.pool,
            dropout=cfg.dropout,
        )

    def forward(self, waveform: Tensor) -> Tensor:
        """[B, S] -> [B, width]."""
        if waveform.dim() != 2:
            raise ValueError(f"waveform must be [B, S], got {tuple(waveform.shape)}")
        n = self.cfg.num_samples
        if waveform.shape[1] > n:
            waveform = waveform[:, :n]
        elif waveform.shape[1] < n:
            waveform = F.pad(waveform, (0, n - waveform.shape[1]))
        mel = self.features(waveform)  # [B, F, n_mels]
        pooled: Tensor = self.transformer(mel.transpose(1, 2).unsqueeze(1))  # [B, C]
        return pooled
