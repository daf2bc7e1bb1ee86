"""The training update: compressed forward, TIE-weighted LM loss, lambda * AE loss, gradient
accumulation over microbatches, AdamW, all in one jitted and sharded function.

Normalisation: the LM loss is ``sum(w * CE) / D`` where D is computed from the whole batch's
masks before any forward pass (loss tokens; or, for TIE without rescaling, sequences), so
accumulating microbatch gradients is exactly the gradient of the full batch whatever the
per-microbatch token counts. The AE loss is the mean over microbatches of the per-microbatch
mean over gists (every microbatch has the same layout, hence the same gist count).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.context_parallel import balanced_arrays, check_context_parallel, splits
from gist_jax.gist.forward import compressed_hidden
from gist_jax.gist.layout import LayoutShape
from gist_jax.gist.params import model_config_for
from gist_jax.gist.specs import LayoutArrays, raw_row_order, raw_rows
from gist_jax.model.config import ModelConfig
from gist_jax.model.loss import lm_token_scores, next_token_labels
from gist_jax.model.sharding import activation_mesh, context_size
from gist_jax.model.transformer import Params
from gist_jax.train.config import StepConfig
from gist_jax.train.mesh import BATCH_AXES, batch_sharding, check_batch, replicated
from gist_jax.train.objectives import Objectives, TermInputs, objectives
from gist_jax.train.optimizer import learning_rate_schedule
from gist_jax.train.state import TrainState, trainable_tree
from gist_jax.train.tie import compute_tie_weights, weight_entropy

Batch = dict[str, jax.Array]


def loss_positions(tokens_BxN: jax.Array, loss_mask_BxN: jax.Array, segment_length: int,
                   include_first_segment: bool) -> jax.Array:
    """Raw positions j that carry an LM loss (predicting token j + 1)."""
    n = tokens_BxN.shape[1]
    j = jnp.arange(n)
    mask = loss_mask_BxN & (j < n - 1)[None]
    if not include_first_segment:
        mask &= (j >= segment_length)[None]
    return mask


def _denominator(mask_BxN: jax.Array, tie_without_rescale: bool) -> jax.Array:
    if tie_without_rescale:
        return jnp.maximum(jnp.sum(jnp.any(mask_BxN, axis=1)), 1).astype(jnp.float32)
    return jnp.maximum(jnp.sum(mask_BxN), 1).astype(jnp.float32)


def _lm_weights(base_cfg: ModelConfig, terms: Objectives, obj: Any, ref_params: Params | None, micro: Batch,
                mask_BxN: jax.Array, seg_len: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token weights of the LM loss: TIE's (from the batch, or the frozen reference passes)
    or the plain loss mask; with TIE, also its entropy metric."""
    if not terms.tie:
        return mask_BxN.astype(jnp.float32), {}
    if terms.tie_precomputed:
        weights = micro["tie_weights"] * mask_BxN
    else:
        weights = compute_tie_weights(base_cfg, ref_params, micro["tokens"], mask_BxN, seg_len,
                                      obj.tie_gamma, obj.tie_rescale)
    return weights, {"tie_entropy": weight_entropy(weights, mask_BxN)}


def make_microbatch_loss(base_cfg: ModelConfig, comp: CompressionConfig, step_cfg: StepConfig,
                         shape: LayoutShape) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """``(params, ref_params, micro, arrays, denom, step=None) -> (loss, metrics)`` for one
    microbatch (``step``: the update's index, for ``objective.ae_base_warmup_steps``): the
    compressed forward, then the chunked LM loss with its weights (TIE's or the mask), then every
    additive term ``objectives`` returns (the AE loss; ``objectives.register_term``), summed.
    Shared by the train step and the memory planner (``train/plan.py`` traces its VJP to count
    what the backward keeps)."""
    cfg = model_config_for(base_cfg, comp)
    obj, terms = step_cfg.objective, objectives(step_cfg, comp)
    seg_len = shape.segment_length if comp.enabled else step_cfg.seq_len
    m = step_cfg.microbatches

    def microbatch_loss(params: Params, ref_params: Params | None, micro: Batch, arrays: LayoutArrays,
                        denom: jax.Array, step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        tokens = micro["tokens"]
        mask = loss_positions(tokens, micro["loss_mask"], seg_len, obj.include_first_segment)
        if context_size() > 1 and comp.enabled and not comp.windowed and splits(shape, context_size()):
            arrays = balanced_arrays(arrays, shape, context_size())  # every block sees as much memory
        row_order = raw_row_order(arrays, tokens.shape[1], shape)

        def as_rows(x_BxN: jax.Array) -> jax.Array:  # raw order -> the order of raw_rows' rows
            return x_BxN if row_order is None else jnp.take(x_BxN, row_order, axis=1)

        layer_kv: tuple[jax.Array, jax.Array] | None = None
        if terms.kv_layer is not None:
            hidden, layer_kv = compressed_hidden(cfg, comp, shape, params["model"], tokens, arrays,
                                                 kv_layer=terms.kv_layer)
        else:
            hidden = compressed_hidden(cfg, comp, shape, params["model"], tokens, arrays)
        # LM term. Raw rows only (gists carry no LM label), then head + CE chunk by chunk: no [B, T, V].
        scores = lm_token_scores(cfg, params["model"], raw_rows(hidden, arrays, tokens.shape[1], shape),
                                 as_rows(next_token_labels(tokens)), as_rows(mask), chunk=obj.loss_chunk)
        weights, metrics = _lm_weights(base_cfg, terms, obj, ref_params, micro, mask, seg_len)
        lm_num = jnp.sum(as_rows(weights * mask) * scores.nll)
        loss = lm_num / denom
        metrics.update(correct=jnp.sum(scores.correct), tokens=jnp.sum(mask), lm_num=lm_num)
        inputs = TermInputs(cfg, comp, shape, params, tokens, arrays, hidden, layer_kv, step, m)
        for term in terms.terms:  # the additive terms (AE, and any registered objective)
            value, term_metrics = term(inputs)
            loss = loss + value
            metrics.update(term_metrics)
        return loss, metrics

    return microbatch_loss


def build_train_step(base_cfg: ModelConfig, comp: CompressionConfig, step_cfg: StepConfig,
                     shape: LayoutShape, tx: optax.GradientTransformation, mesh: Mesh,
                     state_shardings: Any) -> jax.stages.Wrapped:
    """A jitted ``(state, batch, layout_arrays) -> (state, metrics)`` for one layout shape.

    ``batch``: ``tokens`` [B, N] int32, ``loss_mask`` [B, N] bool (document/padding masks from
    the data pipeline), and ``tie_weights`` [B, N] when TIE weights are precomputed. The state
    is donated.
    """
    check_batch(step_cfg.batch_size, step_cfg.microbatches, mesh)
    obj, terms = step_cfg.objective, objectives(step_cfg, comp)
    check_context_parallel(comp, step_cfg.seq_len, mesh.shape["context"])
    seg_len = shape.segment_length if comp.enabled else step_cfg.seq_len
    m = step_cfg.microbatches
    schedule = learning_rate_schedule(step_cfg.optimizer)

    microbatch_loss = make_microbatch_loss(base_cfg, comp, step_cfg, shape)

    def step(state: TrainState, batch: Batch, arrays: LayoutArrays) -> tuple[TrainState, dict[str, jax.Array]]:
        trainable = trainable_tree(state.params, comp)
        params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), state.params, trainable)
        full_mask = loss_positions(batch["tokens"], batch["loss_mask"], seg_len, obj.include_first_segment)
        denom = _denominator(full_mask, terms.tie and not obj.tie_rescale)

        def split(x):  # [B, ...] -> [M, B/M, ...], each microbatch spread over every device
            x = x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)
            spec = PartitionSpec(None, BATCH_AXES, *([None] * (x.ndim - 2)))
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

        micro_batches = jax.tree.map(split, batch)
        grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

        def accumulate(carry, micro):
            grads_acc, loss_acc, metrics_acc = carry
            (loss, metrics), grads = grad_fn(params, state.ref_params, micro, arrays, denom, state.step)
            return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss,
                    jax.tree.map(jnp.add, metrics_acc, metrics)), None

        zero_metrics = jax.eval_shape(
            lambda: microbatch_loss(params, state.ref_params,
                                    jax.tree.map(lambda x: x[0], micro_batches), arrays, denom)[1])
        init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics))
        (grads, loss, sums), _ = jax.lax.scan(accumulate, init, micro_batches)

        updates, opt_state = tx.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(state.params, updates)
        trained_grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
        metrics = {
            "loss": loss,
            "lm_loss": sums["lm_num"] / denom,
            "accuracy": sums["correct"] / jnp.maximum(sums["tokens"], 1),
            "tokens": sums["tokens"],
            "grad_norm": optax.global_norm(trained_grads),
            "learning_rate": schedule(state.step),
        }
        if terms.tie:
            metrics["tie_entropy"] = sums["tie_entropy"] / m
        for term in terms.terms:
            metrics.update({name: sums[name] / m for name in term.mean_metrics})
        new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state)
        return new_state, metrics

    def traced(state, batch, arrays):
        # Turns the model's logical activation constraints into real ones while tracing.
        with activation_mesh(mesh):
            return step(state, batch, arrays)

    batch_spec = {field: batch_sharding(mesh) for field in terms.batch_fields}
    return jax.jit(traced, in_shardings=(state_shardings, batch_spec, replicated(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))
