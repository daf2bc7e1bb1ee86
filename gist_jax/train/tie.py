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
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.model.attention import AttentionSpec
from gist_jax.model.config import ModelConfig
from gist_jax.model.transformer import Decoder, head_weights, to_layout

# Sequence chunk for the LM head: log-probs of the targets are computed chunk by chunk so the
# [B, N, V] float32 logits (8 GiB per 16K-token Llama-3 sequence) are never materialised.
LOGIT_CHUNK = 1024


def _target_log_probs(cfg: ModelConfig, params: Any, hidden_BxNxE: jax.Array,
                      targets_BxN: jax.Array) -> jax.Array:
    """log softmax(head(hidden))[target], the head applied like ``Decoder`` applies it."""
    head_ExV = head_weights(cfg, params)

    def chunk(h_BxCxE: jax.Array, t_BxC: jax.Array) -> jax.Array:
        logits = jnp.dot(h_BxCxE.astype(cfg.compute_dtype), head_ExV).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, t_BxC[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    b, n, e = hidden_BxNxE.shape
    if n <= LOGIT_CHUNK:
        return chunk(hidden_BxNxE, targets_BxN)
    pad = -n % LOGIT_CHUNK
    c = (n + pad) // LOGIT_CHUNK
    h = jnp.pad(hidden_BxNxE, ((0, 0), (0, pad), (0, 0))).reshape(b, c, LOGIT_CHUNK, e)
    t = jnp.pad(targets_BxN, ((0, 0), (0, pad))).reshape(b, c, LOGIT_CHUNK)
    out = jax.lax.map(lambda xs: chunk(*xs), (h.swapaxes(0, 1), t.swapaxes(0, 1)))
    return out.swapaxes(0, 1).reshape(b, n + pad)[:, :n]


def reference_log_probs(cfg: ModelConfig, params: Any, tokens_BxN: jax.Array,
                        segment_length: int) -> tuple[jax.Array, jax.Array]:
    """(lp_full_BxN, lp_seg_BxN) float32; position N-1 (no next token) holds 0.

    Both are stop-gradient (the params are stopped before the passes, so no residuals are
    kept and gradients w.r.t. the reference are exact zeros). Two Decoder passes with explicit
    AttentionSpecs: causal, and block-diagonal causal with segment length ``segment_length``
    (a static int). Gist parameters in ``params`` are ignored: every token is a raw token.
    """
    params = jax.lax.stop_gradient(to_layout(params, cfg))
    b, n = tokens_BxN.shape
    idx = jnp.arange(n)
    causal_NxN = idx[None, :] <= idx[:, None]  # [query, key]
    same_segment_NxN = (idx[:, None] // segment_length) == (idx[None, :] // segment_length)
    positions = jnp.broadcast_to(idx.astype(jnp.int32), (b, n))
    no_gist = dict(is_gist=jnp.zeros((b, n), bool), gist_slot=jnp.zeros((b, n), jnp.int32))
    targets = jnp.concatenate([tokens_BxN[:, 1:], tokens_BxN[:, :1]], axis=1)
    has_next = idx < n - 1

    def score(mask_NxN: jax.Array) -> jax.Array:
        spec = AttentionSpec(positions=positions, mask=jnp.broadcast_to(mask_NxN, (b, n, n)),
                             **no_gist)
        _, hidden = Decoder(cfg).apply({"params": params}, tokens_BxN, spec, return_hidden=True)
        lp = _target_log_probs(cfg, params, hidden, targets)
        return jax.lax.stop_gradient(jnp.where(has_next[None], lp, 0.0))

    return score(causal_NxN), score(causal_NxN & same_segment_NxN)


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
