"""Training-step configuration: mesh, batch, optimizer, objectives. One frozen schema per
concern, validated on construction; the experiment configs (ml_collections) fill these."""

from __future__ import annotations

import dataclasses

from gist_jax.model.config import ConfigError


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; one of them may be -1 for "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = self.sizes()
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ConfigError(f"mesh {sizes}: at most one axis may be -1")
        bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
        if bad:
            raise ConfigError(f"mesh axis sizes {bad} must be positive or -1")

    def sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping; linear warmup then cosine decay to a floor.

    Paper recipe: peak lr 1e-5, 1% warmup, cosine to 50% of peak."""

    learning_rate: float = 1e-5
    warmup_fraction: float = 0.01
    min_lr_ratio: float = 0.5
    total_steps: int = 1000
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"optimizer.learning_rate={self.learning_rate} must be positive")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"optimizer.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optimizer.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.total_steps <= 0:
            raise ConfigError(f"optimizer.total_steps={self.total_steps} must be positive")

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_fraction * self.total_steps))


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """LM loss (optionally TIE-weighted) plus lambda * AE loss; both extras can be off.

    tie_source: ``online`` runs the two frozen-reference passes inside the step;
    ``precomputed`` reads per-token weights from the batch (``batch['tie_weights']``).
    """

    tie: bool = False
    tie_gamma: float = 2.0
    tie_rescale: bool = True
    tie_source: str = "online"
    ae: bool = False
    ae_lambda: float = 1.0
    ae_layer: int = -1
    include_first_segment: bool = True

    def __post_init__(self) -> None:
        if self.tie_source not in ("online", "precomputed"):
            raise ConfigError(f"objective.tie_source={self.tie_source!r} must be 'online' or 'precomputed'")
        if self.tie_gamma <= 0:
            raise ConfigError(f"objective.tie_gamma={self.tie_gamma} must be positive")
        if self.ae_lambda < 0:
            raise ConfigError(f"objective.ae_lambda={self.ae_lambda} must be >= 0")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything the jitted update depends on besides the model and compression configs."""

    batch_size: int = 8  # global sequences per step
    seq_len: int = 2048  # raw tokens per sequence
    microbatches: int = 1  # gradient accumulation steps inside one update
    mesh: MeshConfig = MeshConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.microbatches <= 0 or self.batch_size % self.microbatches:
            raise ConfigError(f"step.batch_size={self.batch_size} is not divisible by "
                              f"step.microbatches={self.microbatches}")
