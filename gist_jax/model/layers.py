"""Building blocks shared by every family: RMSNorm, SwiGLU MLP and rotary embeddings."""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gist_jax.model.config import ModelConfig, RopeScaling
from gist_jax.model.matmul import projection_dot_general
from gist_jax.model.remat import MLP_HIDDEN
from gist_jax.model.sharding import BATCH_LENGTH_MLP, constrain


def kernel_init(logical_axes: tuple[str, ...], stddev: float = 0.02
                ) -> Callable[..., nn.LogicallyPartitioned]:
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), logical_axes)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as transformers does), scaled in the compute dtype."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_BxTxE: jax.Array) -> jax.Array:
        # flax types param() without unbox= as the initializer's box, but it unboxes by default.
        scale_E: jax.Array = self.param(  # type: ignore[assignment]
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x_BxTxE.shape[-1],), self.param_dtype,
        )
        x32 = x_BxTxE.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * scale_E.astype(self.dtype)


@jax.custom_vjp
def swiglu(gate_BxTxF: jax.Array, up_BxTxF: jax.Array) -> jax.Array:
    """``silu(gate) * up``, computed in float32 and rounded once to the inputs' dtype.

    Why a ``custom_vjp``: autodiff of ``nn.silu(gate) * up`` saves the sigmoid, the silu and the
    product besides gate and up (six ``[B, T, F]`` residuals per layer in the compiled step;
    on XLA:CPU each a bfloat16 round trip of converts), where gate and up determine all of it.
    This one keeps gate and up and recomputes the sigmoid in the backward (values and gradients
    tested against the autodiff form)."""
    g32, u32 = gate_BxTxF.astype(jnp.float32), up_BxTxF.astype(jnp.float32)
    return (g32 * jax.nn.sigmoid(g32) * u32).astype(gate_BxTxF.dtype)


def _swiglu_fwd(gate_BxTxF: jax.Array, up_BxTxF: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return swiglu(gate_BxTxF, up_BxTxF), (gate_BxTxF, up_BxTxF)


def _swiglu_bwd(res: tuple[jax.Array, jax.Array], ct_BxTxF: jax.Array) -> tuple[jax.Array, jax.Array]:
    gate_BxTxF, up_BxTxF = res
    g32, u32, ct32 = (a.astype(jnp.float32) for a in (gate_BxTxF, up_BxTxF, ct_BxTxF))
    sig = jax.nn.sigmoid(g32)
    d_gate = ct32 * u32 * sig * (1.0 + g32 * (1.0 - sig))  # d silu(g) / dg = s (1 + g (1 - s))
    d_up = ct32 * g32 * sig
    return d_gate.astype(gate_BxTxF.dtype), d_up.astype(up_BxTxF.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxE: jax.Array) -> jax.Array:
        cfg = self.cfg
        dense = lambda feats, axes, name: nn.DenseGeneral(  # noqa: E731
            feats, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
            kernel_init=kernel_init(axes), dot_general=projection_dot_general, name=name,
        )
        gate_BxTxF = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x_BxTxE)
        up_BxTxF = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x_BxTxE)
        hidden_BxTxF = constrain(swiglu(gate_BxTxF, up_BxTxF), BATCH_LENGTH_MLP)
        hidden_BxTxF = checkpoint_name(hidden_BxTxF, MLP_HIDDEN)
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(hidden_BxTxF)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> jax.Array:
    """Per-pair inverse frequencies [head_dim/2], with Llama-3.1 or linear scaling applied."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_freq_wavelen = old_len / scaling.low_freq_factor
        high_freq_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq_H2: jax.Array) -> jax.Array:
    """Rotate pairs (i, i + H/2) by angle position * inv_freq (transformers' rotate_half layout).

    Positions are explicit per token, so gist layouts can give any token any position.
    """
    angles_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_H2
    cos = jnp.cos(angles_BxTxH2)[:, :, None, :]
    sin = jnp.sin(angles_BxTxH2)[:, :, None, :]
    x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxTxNxH.dtype)
