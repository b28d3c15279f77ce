"""Config dataclasses of the vision-language model (STYLE.md habit 1).

``LungVLConfig`` composes ``VisionConfig``, ``TextConfig``, ``HeadsConfig``, ``LossWeights`` and the
input ``PreprocessConfig``. All are frozen, round-trip through ``to_dict()``/``from_dict()`` (and so
through TOML/JSON), and reject unknown keys with a "did you mean" message.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from lungvl_model.data.preprocess import PreprocessConfig

T = TypeVar("T")


def _check_keys(cls: type, d: dict[str, Any]) -> None:
    known = {f.name for f in fields(cls)}
    for k in d:
        if k not in known:
            hint = difflib.get_close_matches(k, sorted(known), n=1)
            raise KeyError(
                f"unknown {cls.__name__} key {k!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" (known: {', '.join(sorted(known))})"
            )


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


@dataclass(frozen=True)
class VisionConfig:
    """Hierarchical 3-D encoder with five scales, path aggregation and dual attention.

    Attributes:
        in_channels: input channels (1 for CT).
        channels: encoder width at each of the five scales (1, 1/2, 1/4, 1/8, 1/16).
        blocks_per_scale: residual blocks per scale.
        aggregation_channels: width of every path-aggregation (top-down + bottom-up) output.
        attention_scales: scale indices (0 = full resolution) that get a channel-spatial dual
            attention block.
        norm_groups: GroupNorm groups (never BatchNorm: DP-SGD and small batches).
        dropout: dropout in the residual blocks.
        gradient_checkpointing: recompute activations in backward (saves memory on GPU).
        bottleneck_full_resolution: the full-resolution ``3x3x3`` convs at aggregation width (the
            finest path-aggregation smoothing and the segmentation / reconstruction heads' hidden
            layer) are bottlenecks (``1x1x1`` → ``3x3x3`` at a quarter width → ``1x1x1``).
            Measured on the tiny preset, 2 × 64³, one CPU thread: those two dense convs were 49 %
            of a segmentation step (forward + backward); with bottlenecks the step is 1.7-2× faster.
    """

    in_channels: int = 1
    channels: tuple[int, ...] = (8, 16, 32, 64, 96)
    blocks_per_scale: int = 1
    aggregation_channels: int = 32
    attention_scales: tuple[int, ...] = (2, 3, 4)
    norm_groups: int = 4
    dropout: float = 0.0
    gradient_checkpointing: bool = False
    bottleneck_full_resolution: bool = True

    def __post_init__(self) -> None:
        if len(self.channels) != 5:
            raise ValueError(f"VisionConfig.channels needs 5 scales, got {len(self.channels)}: {self.channels}")
        for c in (*self.channels, self.aggregation_channels):
            if c % self.norm_groups:
                raise ValueError(f"VisionConfig: width {c} is not divisible by norm_groups={self.norm_groups}")
        bad = [s for s in self.attention_scales if not 0 <= s < 5]
        if bad:
            raise ValueError(f"VisionConfig.attention_scales must be in 0..4, got {bad}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        """Inverse of :meth:`to_dict`."""
        _check_keys(cls, d)
        return cls(**_tuples(d))


@dataclass(frozen=True)
class TextConfig:
    """Decoder-only transformer (``transformers`` GPT-2 built from config) with cross-attention.

    Attributes:
        vocab_size: tokenizer vocabulary size (the trained tokenizer's size wins when they differ).
        n_layer: transformer layers.
        n_head: attention heads.
        n_embd: hidden size.
        n_positions: longest token sequence.
        visual_scales: aggregated scales whose positions become visual tokens for cross-attention.
        attn_implementation: ``"sdpa"`` for training, ``"eager"`` when attention maps are needed.
        pretrained_dir: optional local directory with a pretrained decoder (never downloaded).
        dropout: residual / attention dropout.
    """

    vocab_size: int = 2000
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 256
    visual_scales: tuple[int, ...] = (2, 3)
    attn_implementation: str = "sdpa"
    pretrained_dir: str | None = None
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"TextConfig: n_embd={self.n_embd} not divisible by n_head={self.n_head}")
        if self.attn_implementation not in ("eager", "sdpa"):
            raise ValueError(
                f"TextConfig.attn_implementation must be 'eager' or 'sdpa', got {self.attn_implementation!r}"
            )
        bad = [s for s in self.visual_scales if not 0 <= s < 5]
        if bad or not self.visual_scales:
            raise ValueError(f"TextConfig.visual_scales must be non-empty and in 0..4, got {self.visual_scales}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        """Inverse of :meth:`to_dict`."""
        _check_keys(cls, d)
        return cls(**_tuples(d))


@dataclass(frozen=True)
class HeadsConfig:
    """Risk and concept heads on pooled visual features + an embedding of the explanation.

    Attributes:
        hidden: hidden width of the head MLPs.
        n_lung_rads: Lung-RADS classes (1, 2, 3, 4A, 4B, 4X).
        use_text: concatenate the explanation embedding (False = image-only heads).
        deferral_entropy: default per-sentence entropy threshold (nats/token) before calibration.
    """

    hidden: int = 64
    n_lung_rads: int = 6
    use_text: bool = True
    deferral_entropy: float = 1.5

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadsConfig:
        """Inverse of :meth:`to_dict`."""
        _check_keys(cls, d)
        return cls(**d)


@dataclass(frozen=True)
class LossWeights:
    """Weights of the end-to-end stage's loss terms (0 switches a term off)."""

    report: float = 1.0
    contrastive: float = 0.2
    grounding: float = 0.2
    segmentation: float = 1.0
    malignancy: float = 1.0
    lung_rads: float = 0.5
    growth: float = 0.2
    concepts: float = 0.3

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LossWeights:
        """Inverse of :meth:`to_dict`."""
        _check_keys(cls, d)
        return cls(**d)


@dataclass(frozen=True)
class LungVLConfig:
    """The whole model.

    Attributes:
        preset: name of the preset it was built from (informational).
        vision: the encoder.
        text: the decoder.
        heads: risk/concept heads.
        loss: loss weights of the end-to-end stage.
        input: preprocessing of the CT input (grid, spacing, HU window).
    """

    preset: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    input: PreprocessConfig = field(default_factory=PreprocessConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (JSON/TOML-ready)."""
        return {
            "preset": self.preset,
            "vision": self.vision.to_dict(),
            "text": self.text.to_dict(),
            "heads": self.heads.to_dict(),
            "loss": self.loss.to_dict(),
            "input": self.input.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LungVLConfig:
        """Inverse of :meth:`to_dict`; missing sections take their defaults."""
        _check_keys(cls, d)
        return cls(
            preset=d.get("preset", "custom"),
            vision=VisionConfig.from_dict(d.get("vision", {})),
            text=TextConfig.from_dict(d.get("text", {})),
            heads=HeadsConfig.from_dict(d.get("heads", {})),
            loss=LossWeights.from_dict(d.get("loss", {})),
            input=PreprocessConfig.from_dict(d["input"]) if "input" in d else PreprocessConfig(),
        )


PRESETS: dict[str, LungVLConfig] = {
    # CPU tests and demo: whole chest at 5 mm, seconds per step on 2 cores.
    "tiny": LungVLConfig(
        preset="tiny",
        vision=VisionConfig(channels=(8, 16, 32, 48, 64), aggregation_channels=32),
        text=TextConfig(n_layer=2, n_head=4, n_embd=96, n_positions=192),
        heads=HeadsConfig(hidden=64),
        input=PreprocessConfig(spacing_mm=(5.0, 5.0, 5.0), size=(48, 64, 64)),
    ),
    # One GPU: 128^3 or larger at 2.5 mm.
    "base": LungVLConfig(
        preset="base",
        vision=VisionConfig(
            channels=(16, 32, 64, 128, 256),
            blocks_per_scale=2,
            aggregation_channels=64,
            norm_groups=8,
            gradient_checkpointing=True,
        ),
        text=TextConfig(n_layer=6, n_head=8, n_embd=384, n_positions=384, visual_scales=(2, 3)),
        heads=HeadsConfig(hidden=256),
        input=PreprocessConfig(spacing_mm=(2.5, 2.5, 2.5), size=(128, 160, 160)),
    ),
}


def get_preset(name: str) -> LungVLConfig:
    """A preset by name, with a "did you mean" error for unknown names."""
    if name not in PRESETS:
        hint = difflib.get_close_matches(name, PRESETS, n=1)
        raise KeyError(
            f"unknown preset {name!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
            + f" (known: {', '.join(PRESETS)})"
        )
    return PRESETS[name]
