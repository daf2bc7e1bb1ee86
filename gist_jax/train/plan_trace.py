"""What the backward pass keeps, counted by tracing the real loss (no compile, no allocation).

The memory planner (``train/plan.py``) needs the activations a training step saves for its
backward pass. Rather than a rule of thumb per remat policy and attention implementation, it
traces ``jax.vjp`` of the very microbatch loss the step differentiates
(``train/step.make_microbatch_loss``: compressed forward, TIE's reference passes, chunked LM
loss, AE) on abstract per-device inputs and sums the residuals the VJP closes over. That is
exact for what is *saved* (every pass, every remat policy, every implementation), and cheap
even for an 8B model at 16K: ``jax.make_jaxpr`` traces the layer scan's body once.

Planning for another backend than this one: the attention code decides its kernel at trace
time from ``jax.default_backend()``. ``target_backend`` makes the trace see the target, and
replaces what cannot be traced here by a stand-in with the same saved residuals:
``jax.nn.dot_product_attention(implementation="cudnn")`` becomes a ``custom_vjp`` that keeps
(q, k, v, out, float32 log-sum-exp), which is what cuDNN's fused attention keeps. Splash
(TPU) traces as itself (a ``custom_vjp`` over ``pallas_call``; tracing does not lower it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.layout import build_layout
from gist_jax.gist.params import add_gist_params, model_config_for
from gist_jax.gist.specs import layout_arrays
from gist_jax.model.config import ModelConfig
from gist_jax.model.transformer import init_params
from gist_jax.train.config import StepConfig
from gist_jax.train.objectives import objectives
from gist_jax.train.state import trainable_tree


def abstract_params(base: ModelConfig, comp: CompressionConfig, step: StepConfig) -> Any:
    """Shapes of ``state.params`` (the model with its gist parameters, every loss term's own),
    without allocating them."""
    cfg = model_config_for(base, comp)

    def build() -> Any:
        model = add_gist_params(init_params(base, jax.random.key(0)), cfg)
        return {"model": model, **objectives(step, comp).init_params(cfg, comp, model)}

    return jax.eval_shape(build)


@jax.custom_vjp
def _kernel_stand_in(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array) -> jax.Array:
    return jnp.zeros(q_BxTxNxH.shape[:-1] + v_BxSxKxH.shape[-1:], q_BxTxNxH.dtype)


def _stand_in_fwd(q, k, v):
    out = _kernel_stand_in(q, k, v)
    lse_BxTxN = jnp.zeros(q.shape[:-1], jnp.float32)
    return out, (q, k, v, out, lse_BxTxN)


def _stand_in_bwd(residuals, dout):
    q, k, v, _, _ = residuals
    return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)


_kernel_stand_in.defvjp(_stand_in_fwd, _stand_in_bwd)


@contextlib.contextmanager
def target_backend(backend: str) -> Iterator[None]:
    """Trace as if on ``backend``; cuDNN's fused attention replaced by its residual signature.
    Only for ``jax.make_jaxpr`` (the stand-in computes zeros)."""
    if backend == jax.default_backend():
        yield
        return
    real_backend, real_attention = jax.default_backend, jax.nn.dot_product_attention

    def attention(query, key, value, *args, implementation=None, **kwargs):
        if implementation == "cudnn":
            return _kernel_stand_in(query, key.astype(query.dtype), value.astype(query.dtype))
        return real_attention(query, key, value, *args, implementation=implementation, **kwargs)

    jax.default_backend, jax.nn.dot_product_attention = (lambda: backend), attention
    try:
        yield
    finally:
        jax.default_backend, jax.nn.dot_product_attention = real_backend, real_attention


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype)


def saved_residual_bytes(base: ModelConfig, comp: CompressionConfig, step: StepConfig,
                         batch_per_device: int, backend: str) -> int:
    """Bytes the microbatch loss's VJP keeps for one device's microbatch, on ``backend``.

    Residuals that are inputs (parameters, the frozen TIE reference, tokens, layout arrays)
    are not counted: the planner counts those as stored state. Frozen leaves get
    ``stop_gradient`` exactly as the step does, so ``gist_only`` keeps what it really keeps.
    """
    from gist_jax.train.step import make_microbatch_loss  # step imports the model stack

    params = abstract_params(base, comp, step)
    ref_params = jax.eval_shape(lambda: init_params(base, jax.random.key(0)))
    layout = build_layout(step.seq_len, comp)
    arrays = jax.tree.map(_abstract, layout_arrays(layout))
    dtypes = {"tokens": jnp.int32, "loss_mask": bool}  # every other field: float32 (tie_weights)
    micro = {field: jax.ShapeDtypeStruct((batch_per_device, step.seq_len), dtypes.get(field, jnp.float32))
             for field in objectives(step, comp).batch_fields}
    loss_fn = make_microbatch_loss(base, comp, step, layout.shape)
    trainable = trainable_tree(params, comp)

    def loss(p, ref, batch, arr):
        p = jax.tree.map(lambda x, t: x if t else jax.lax.stop_gradient(x), p, trainable)
        return loss_fn(p, ref, batch, arr, jnp.float32(1.0))[0]

    def vjp(p, ref, batch, arr):
        return jax.vjp(lambda q: loss(q, ref, batch, arr), p)

    with target_backend(backend):
        closed, (_, vjp_fn) = jax.make_jaxpr(vjp, return_shape=True)(params, ref_params, micro, arrays)
    num_residuals = len(jax.tree.leaves(vjp_fn))
    jaxpr = closed.jaxpr
    inputs = {id(v) for v in (*jaxpr.invars, *jaxpr.constvars)}
    seen: set[int] = set()
    total = 0
    for var in jaxpr.outvars[len(jaxpr.outvars) - num_residuals:]:
        if id(var) in inputs or id(var) in seen:
            continue
        seen.add(id(var))
        total += int(np.prod(var.aval.shape)) * np.dtype(var.aval.dtype).itemsize
    return total


def layer_residual_bytes(base: ModelConfig, comp: CompressionConfig, step: StepConfig,
                         batch_per_device: int, backend: str) -> int:
    """What one decoder layer would keep without rematerialisation: the residuals of the loss
    with every layer saved, minus the same with one layer fewer. The backward of a layer (and,
    under remat, its recomputed forward) holds about this much at once: the planner's
    working-set unit. (A one-layer model: everything its loss keeps, an upper bound.)"""
    none = base.replace(remat_policy="none")
    if base.num_layers < 2:
        return saved_residual_bytes(none, comp, step, batch_per_device, backend)
    fewer = none.replace(num_layers=base.num_layers - 1)
    return (saved_residual_bytes(none, comp, step, batch_per_device, backend)
            - saved_residual_bytes(fewer, comp, step, batch_per_device, backend))
