"""Segment-wise token importance estimation (TIE, method.md section 4.2).

Tokens whose prediction depends on context outside their own segment are the ones gist
compression hurts, so the LM loss weights them up. A frozen reference copy of the base model
(plain decoder, no gists) scores every raw token twice, with stop-gradient:

    lp_full[b, j] = log P_ref(x[b, j+1] | x[b, 0..j])                 (causal pass)
    lp_seg[b, j]  = log P_ref(x[b, j+1] | x[b, k*L..j]), k = j // L   (block-diagonal pass)
    d = min(lp_full - lp_seg, gamma);  w = softmax(d) over the loss positions of a sequence

Index convention: j is the *predicting* position, as in the gist layout's labels (a raw token
at j predicts j+1). So the first token of segment k is predicted from segment k-1's context,
and every prediction made from segment 0 sees the same context in both passes (d = 0 there).
The block-diagonal pass keeps the ordinary positions: RoPE is relative, so it equals running
each segment alone. Rescaling by N_b (loss positions of sequence b, default on) makes
``sum_j w_j * CE_j`` the plain mean-CE scale when all d are equal.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.model.attention import AttentionSpec
from gist_jax.model.config import ModelConfig
from gist_jax.model.loss import DEFAULT_CHUNK, lm_token_scores, next_token_labels
from gist_jax.model.sharding import CONTEXT_AXIS, constrain, context_size, override_rules
from gist_jax.model.transformer import Decoder, to_layout

# Tokens per chunk of the reference's LM head (``gist_jax/model/loss.py``): the [B, N, V]
# float32 logits (8 GiB per 16K-token Llama-3 sequence) are never materialised.
LOGIT_CHUNK = DEFAULT_CHUNK


def _target_log_probs(cfg: ModelConfig, params: Any, hidden_BxNxE: jax.Array,
                      targets_BxN: jax.Array) -> jax.Array:
    """log softmax(head(hidden))[target], chunked, the head applied like ``Decoder`` applies it."""
    return -lm_token_scores(cfg, params, hidden_BxNxE, targets_BxN, chunk=LOGIT_CHUNK).nll


def reference_log_probs(cfg: ModelConfig, params: Any, tokens_BxN: jax.Array,
                        segment_length: int) -> tuple[jax.Array, jax.Array]:
    """(lp_full_BxN, lp_seg_BxN) float32; position N-1 (no next token) holds 0.

    Both are stop-gradient (the params are stopped before the passes, so no residuals are
    kept and gradients w.r.t. the reference are exact zeros). Two Decoder passes: causal, and
    block-diagonal causal with segment length ``segment_length`` (a static int). Both run the
    plain causal kernel (``cfg.kernels.causal``, O(N) memory); the block-diagonal pass folds
    segments into the batch axis, ``[B, N] -> [B * S, L]`` (the last segment padded at its
    end, which no live query sees), so it costs O(N L). ``model.attention="dense"`` keeps the
    explicit ``[B, N, N]`` masks: the reference the fast passes are tested against. Gist
    parameters in ``params`` are ignored: every token is a raw token.
    """
    params = jax.lax.stop_gradient(to_layout(params, cfg))
    b, n = tokens_BxN.shape
    idx = jnp.arange(n)
    positions = jnp.broadcast_to(idx.astype(jnp.int32), (b, n))
    targets = next_token_labels(tokens_BxN)
    has_next = idx < n - 1

    def hidden_states(tokens_BxT: jax.Array, positions_BxT: jax.Array,
                      mask_TxT: jax.Array | None = None) -> jax.Array:
        shape = tokens_BxT.shape
        mask = None if mask_TxT is None else jnp.broadcast_to(mask_TxT, shape + shape[-1:])
        spec = AttentionSpec(positions=positions_BxT, mask=mask, is_gist=jnp.zeros(shape, bool),
                             gist_slot=jnp.zeros(shape, jnp.int32))
        _, hidden = cast(tuple[jax.Array, jax.Array],
                         Decoder(cfg).apply({"params": params}, tokens_BxT, spec, return_hidden=True))
        return hidden

    def log_probs(hidden_BxNxE: jax.Array) -> jax.Array:
        lp = _target_log_probs(cfg, params, hidden_BxNxE, targets)
        return jax.lax.stop_gradient(jnp.where(has_next[None], lp, 0.0))

    if cfg.kernels.causal == "dense":
        causal_NxN = idx[None, :] <= idx[:, None]  # [query, key]
        same_segment_NxN = (idx[:, None] // segment_length) == (idx[None, :] // segment_length)
        return (log_probs(hidden_states(tokens_BxN, positions, causal_NxN)),
                log_probs(hidden_states(tokens_BxN, positions, causal_NxN & same_segment_NxN)))
    lp_full = log_probs(hidden_states(tokens_BxN, positions))
    seg = min(segment_length, n)
    context = context_size()
    if context > 1 and n % (seg * context) == 0:
        # Context parallelism: the segments stay on their blocks. Folded into the batch they
        # would be re-split by XLA along their own length; vmapped with the segment axis on the
        # context mesh axis (and their length kept whole) each block runs its own.
        def per_segment(x_BxN: jax.Array) -> jax.Array:
            return constrain(x_BxN.reshape(b, n // seg, seg), ("activation_batch", "activation_length", None))

        with override_rules(activation_length=None):
            hidden_BxSxLxE = jax.vmap(hidden_states, in_axes=1, out_axes=1, spmd_axis_name=CONTEXT_AXIS)(
                per_segment(tokens_BxN), per_segment(positions))
        return lp_full, log_probs(hidden_BxSxLxE.reshape(b, n, -1))
    pad = -n % seg
    tokens_BSxL = jnp.pad(tokens_BxN, ((0, 0), (0, pad))).reshape(-1, seg)
    # Every token keeps its own position: the same computation as the block-diagonal mask.
    positions_BSxL = jnp.broadcast_to(jnp.arange(n + pad, dtype=jnp.int32), (b, n + pad)).reshape(-1, seg)
    hidden_BSxLxE = hidden_states(tokens_BSxL, positions_BSxL)
    lp_seg = log_probs(hidden_BSxLxE.reshape(b, n + pad, -1)[:, :n])
    return lp_full, lp_seg


def tie_weights(lp_full_BxN: jax.Array, lp_seg_BxN: jax.Array, loss_mask_BxN: jax.Array,
                gamma: float = 2.0, rescale: bool = True) -> jax.Array:
    """float32 [B, N] weights: softmax of min(lp_full - lp_seg, gamma) over each sequence's
    loss positions; 0 elsewhere. Rows sum to 1, or to N_b with ``rescale``. A row with no
    loss position is all zeros (double ``where``: no NaN in values or gradients)."""
    mask = jnp.asarray(loss_mask_BxN, bool)
    d = jnp.minimum(lp_full_BxN.astype(jnp.float32) - lp_seg_BxN.astype(jnp.float32), gamma)
    d = jnp.where(mask, d, 0.0)
    row_max = jnp.max(jnp.where(mask, d, -jnp.inf), axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    e = jnp.where(mask, jnp.exp(jnp.where(mask, d - row_max, 0.0)), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    w = e / jnp.where(total > 0, total, 1.0)
    if rescale:
        w = w * jnp.sum(mask, axis=-1, keepdims=True).astype(jnp.float32)
    return w


def weight_entropy(weights_BxN: jax.Array, loss_mask_BxN: jax.Array) -> jax.Array:
    """Mean over sequences (those with a loss position) of the entropy, in nats, of the
    normalised weights: log N_b means uniform (TIE inactive), lower means peaked weights."""
    mask = jnp.asarray(loss_mask_BxN, bool)
    w = jnp.where(mask, weights_BxN.astype(jnp.float32), 0.0)
    total = jnp.sum(w, axis=-1, keepdims=True)
    p = w / jnp.where(total > 0, total, 1.0)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    entropy_B = -jnp.sum(plogp, axis=-1)
    has_loss_B = jnp.any(mask, axis=-1)
    count = jnp.sum(has_loss_B)
    return jnp.sum(jnp.where(has_loss_B, entropy_B, 0.0)) / jnp.maximum(count, 1)


def compute_tie_weights(cfg: ModelConfig, params: Any, tokens_BxN: jax.Array,
                        loss_mask_BxN: jax.Array, segment_length: int, gamma: float = 2.0,
                        rescale: bool = True) -> jax.Array:
    """reference_log_probs + tie_weights (call inside the jitted update; weights are constant)."""
    lp_full, lp_seg = reference_log_probs(cfg, params, tokens_BxN, segment_length)
    return jax.lax.stop_gradient(tie_weights(lp_full, lp_seg, loss_mask_BxN, gamma, rescale))


_compute_jit = jax.jit(compute_tie_weights, static_argnums=(0, 4, 5, 6))


def default_loss_mask(tokens_BxN: np.ndarray) -> np.ndarray:
    """Every position that has a next token (the layout's label >= 0 for an unpadded row)."""
    mask = np.ones(tokens_BxN.shape, bool)
    mask[:, -1] = False
    return mask


def precompute_tie_weights(cfg: ModelConfig, params: Any, token_batches: Iterable[np.ndarray],
                           segment_length: int, gamma: float, out_path: str | pathlib.Path,
                           loss_mask_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                           rescale: bool = True) -> pathlib.Path:
    """Offline option: weights for every sequence, batch by batch, into ``out_path`` (.npy,
    float32 [num_sequences, N]) plus a ``.json`` sidecar saying how they were made, so a
    training run can refuse weights made with another gamma / segment length / model."""
    loss_mask_fn = loss_mask_fn or default_loss_mask
    rows: list[np.ndarray] = []
    for tokens in token_batches:
        tokens = np.asarray(tokens)
        if rows and tokens.shape[1] != rows[0].shape[1]:
            raise ValueError(f"batch length {tokens.shape[1]} != first batch's {rows[0].shape[1]}")
        w = _compute_jit(cfg, params, jnp.asarray(tokens, jnp.int32),
                         jnp.asarray(loss_mask_fn(tokens), bool), segment_length, float(gamma),
                         bool(rescale))
        rows.append(np.asarray(w, np.float32))
    if not rows:
        raise ValueError("token_batches is empty")
    weights = np.concatenate(rows, axis=0)
    out_path = pathlib.Path(out_path).with_suffix(".npy")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(out_path, weights)
    meta = dict(gamma=float(gamma), segment_length=int(segment_length), rescale=bool(rescale),
                model_family=cfg.family, num_sequences=int(weights.shape[0]),
                sequence_length=int(weights.shape[1]), model_config=cfg.to_dict())
    out_path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out_path


def load_precomputed_tie_weights(path: str | pathlib.Path) -> tuple[np.ndarray, dict]:
    """(weights float32 [num_sequences, N], sidecar metadata) written by precompute_tie_weights."""
    path = pathlib.Path(path).with_suffix(".npy")
    meta = json.loads(path.with_suffix(".json").read_text())
    return np.load(path), meta
