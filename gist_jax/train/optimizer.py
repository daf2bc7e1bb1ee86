"""AdamW with clipping, warmup + cosine-to-floor schedule, weight-decay and trainable masks."""

from __future__ import annotations

from typing import Any

import jax
import optax

from gist_jax.train.config import OptimizerConfig

NO_DECAY_NAMES = ("gist_embedding", "ae_embedding", "bias", "scale")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine to ``min_lr_ratio * peak`` at the end."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _names(path: jax.tree_util.KeyPath) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: not on norms, biases or the gist / AE embeddings."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and not any(n in NO_DECAY_NAMES for n in _names(path)), params)


def make_optimizer(cfg: OptimizerConfig, trainable: Any) -> optax.GradientTransformation:
    """``trainable``: tree of bools like params. Frozen leaves get ``set_to_zero`` and no
    optimizer state; clipping sees only the trainable gradients."""
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip_norm),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
    return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)
