"""Next-token cross-entropy from hidden states, without ever building ``[B, T, V]`` logits.

Why: float32 logits for every layout position are the largest activation of a long-context
step (Llama-3.1-8B at 16K with TIE and AE: 19.6 of 27 GiB per device). Callers therefore ask
the model for its final-norm hidden states (``Decoder(..., head=False)``), keep only the rows
that carry a label (raw tokens; gists have no LM loss), and hand them here. The LM head and the
cross-entropy then run chunk by chunk over the token axis inside ``lax.scan``, each chunk under
``jax.checkpoint``: the forward keeps no logits, the backward recomputes one chunk's logits at a
time, so the logits' peak is ``O(B x chunk x V)`` in values and gradients alike.

One module serves every caller: the train step (per-token NLL, TIE-weighted, and accuracy),
TIE's frozen-reference log-probabilities (``-nll``), the AE decoder's reconstruction loss,
in-training perplexity and the evaluation suites. ``dense_token_scores`` is the same
computation on whole logits, the reference the tests compare against.

Numerics match ``Decoder``'s own head: the matmul runs in the compute dtype and the logits are
cast to float32 before the log-sum-exp. The head enters each chunk in its storage dtype and is
cast inside, so its gradient accumulates across chunks in the storage dtype (float32 for
mixed precision), not in bfloat16.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gist_jax.model.config import ModelConfig
from gist_jax.model.matmul import project
from gist_jax.model.sharding import BATCH_LENGTH_VOCAB, constrain, context_size

# Tokens per chunk: B x 1024 x V float32 logits live at once (0.5 GiB for Llama-3's 128K vocab
# at B = 1), against N x V for the whole sequence.
DEFAULT_CHUNK = 1024


class TokenScores(NamedTuple):
    """Per-token results, ``[B, T]``; both are 0 / False where the mask is False."""

    nll: jax.Array  # float32 -log P(label); its negation is TIE's log-probability
    correct: jax.Array  # bool, argmax(logits) == label (first maximum, as ``jnp.argmax``)


def next_token_labels(tokens_BxN: jax.Array) -> jax.Array:
    """Label of raw position j is token j + 1; the last position wraps to token 0 (callers
    mask it: it has no next token)."""
    return jnp.concatenate([tokens_BxN[:, 1:], tokens_BxN[:, :1]], axis=1)


def next_token_pairs(hidden_BxNxE: jax.Array, tokens_BxN: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Positions 0..N-2 with the token after each, ``([B, N-1, E], [B, N-1])``: the shift of
    ``next_token_labels`` with the last position dropped instead of masked (evaluation, whose
    outputs are per prediction)."""
    return hidden_BxNxE[:, :-1], tokens_BxN[:, 1:]


def lm_head(cfg: ModelConfig, params: Any) -> jax.Array:
    """The LM head as an ``[E, V]`` matrix in its storage dtype: the transposed embedding when
    tied, ``lm_head/kernel`` otherwise (what ``Decoder`` applies with ``embed.attend`` /
    ``DenseGeneral``)."""
    if cfg.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def _chunk_scores(hidden_BxCxE: jax.Array, head_ExV: jax.Array, labels_BxC: jax.Array,
                  mask_BxC: jax.Array, compute_dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Head + cross-entropy of one chunk (also the dense reference, with C = T)."""
    logits_BxCxV = project(hidden_BxCxE.astype(compute_dtype), head_ExV.astype(compute_dtype)).astype(jnp.float32)
    vocab_axes = BATCH_LENGTH_VOCAB if logits_BxCxV.ndim == 3 else (
        "activation_batch", "activation_length", None, "activation_vocab")  # [B, blocks, C, V]
    logits_BxCxV = constrain(logits_BxCxV, vocab_axes)
    labels_BxC = jnp.maximum(labels_BxC, 0)  # -1 (no label) is masked; keep the gather in range
    picked_BxC = jnp.take_along_axis(logits_BxCxV, labels_BxC[..., None], axis=-1)[..., 0]
    nll_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1) - picked_BxC
    correct_BxC = jnp.argmax(logits_BxCxV, axis=-1) == labels_BxC
    return jnp.where(mask_BxC, nll_BxC, 0.0), correct_BxC & mask_BxC


def _full_mask(labels_BxT: jax.Array, mask_BxT: jax.Array | None) -> jax.Array:
    if mask_BxT is None:
        return jnp.ones(labels_BxT.shape, bool)
    return jnp.broadcast_to(jnp.asarray(mask_BxT, bool), labels_BxT.shape)


def token_scores(hidden_BxTxE: jax.Array, head_ExV: jax.Array, labels_BxT: jax.Array,
                 mask_BxT: jax.Array | None = None, *, chunk: int = DEFAULT_CHUNK,
                 compute_dtype: Any = jnp.float32) -> TokenScores:
    """Per-token NLL and correctness of ``labels`` under ``softmax(hidden @ head)``.

    ``hidden`` is what the head consumes (after the final norm); ``chunk`` tokens of every row
    are scored at a time. T need not divide by ``chunk``: the tail is padded with masked rows.
    Differentiable in ``hidden`` and ``head``; masked positions get exactly zero gradient.

    With the token axis split over the mesh's ``context`` axis, each block is scored on its own
    (``[B, T] -> [B, blocks, T / blocks]``, chunks taken within a block), so no chunk spans two
    blocks: a chunk loop across blocks would make XLA gather the hidden rows onto one device.
    """
    mask_BxT = _full_mask(labels_BxT, mask_BxT)
    blocks = context_size()
    b, t = labels_BxT.shape
    if blocks == 1 or t % blocks:
        return _chunked_scores(hidden_BxTxE, head_ExV, labels_BxT, mask_BxT, chunk, compute_dtype)

    def split(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [B, blocks, T / blocks, ...]
        return x.reshape((b, blocks, t // blocks) + x.shape[2:])

    scores = _chunked_scores(split(hidden_BxTxE), head_ExV, split(labels_BxT), split(mask_BxT), chunk,
                             compute_dtype)
    return TokenScores(scores.nll.reshape(b, t), scores.correct.reshape(b, t))


def _chunked_scores(hidden_BxTxE: jax.Array, head_ExV: jax.Array, labels_BxT: jax.Array,
                    mask_BxT: jax.Array, chunk: int, compute_dtype: Any) -> TokenScores:
    """``token_scores`` of every row, ``chunk`` tokens at a time in a ``lax.scan``. The token
    axis is the last of the labels' (``[B, T]``, or ``[B, blocks, T / blocks]`` with context
    blocks, the block axis kept sharded over ``context`` in every chunk)."""
    lead, t = labels_BxT.shape[:-1], labels_BxT.shape[-1]
    axis = len(lead)
    c = max(1, min(int(chunk), t))
    pad = -t % c
    num_chunks = (t + pad) // c
    # [B, c, ...] or [B, blocks, c, ...]: the logical names of one chunk's leading axes
    names = ("activation_batch",) if axis == 1 else ("activation_batch", "activation_length", None)

    def per_chunk(x: jax.Array) -> jax.Array:  # [*lead, T, ...] -> [num_chunks, *lead, c, ...]
        x = jnp.pad(x, ((0, 0),) * axis + ((0, pad),) + ((0, 0),) * (x.ndim - axis - 1))
        return jnp.moveaxis(x.reshape(lead + (num_chunks, c) + x.shape[axis + 1:]), axis, 0)

    def scored(h: jax.Array, y: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
        if axis > 1:
            h = constrain(h, names + (None,) * (h.ndim - len(names)))
        return _chunk_scores(h, head_ExV, y, m, compute_dtype)

    def body(carry: None, xs: tuple[jax.Array, ...]) -> tuple[None, tuple[jax.Array, jax.Array]]:
        return carry, jax.checkpoint(scored)(*xs)

    xs = (per_chunk(hidden_BxTxE), per_chunk(labels_BxT.astype(jnp.int32)), per_chunk(mask_BxT))
    _, (nll, correct) = jax.lax.scan(body, None, xs)

    def unchunk(x: jax.Array) -> jax.Array:  # [num_chunks, *lead, c] -> [*lead, T]
        return jnp.moveaxis(x, 0, axis).reshape(lead + (num_chunks * c,))[..., :t]

    return TokenScores(unchunk(nll), unchunk(correct))


def dense_token_scores(hidden_BxTxE: jax.Array, head_ExV: jax.Array, labels_BxT: jax.Array,
                       mask_BxT: jax.Array | None = None, *,
                       compute_dtype: Any = jnp.float32) -> TokenScores:
    """The same scores from whole ``[B, T, V]`` logits: the reference for tests and for tiny
    host-side loops (one AE span); never the training path."""
    return TokenScores(*_chunk_scores(hidden_BxTxE, head_ExV, labels_BxT,
                                      _full_mask(labels_BxT, mask_BxT), compute_dtype))


def lm_token_scores(cfg: ModelConfig, params: Any, hidden_BxTxE: jax.Array,
                    labels_BxT: jax.Array, mask_BxT: jax.Array | None = None, *,
                    chunk: int = DEFAULT_CHUNK) -> TokenScores:
    """``token_scores`` with the model's own head and compute dtype (``params`` = the model
    tree, scanned or not)."""
    return token_scores(hidden_BxTxE, lm_head(cfg, params), labels_BxT, mask_BxT, chunk=chunk,
                        compute_dtype=cfg.compute_dtype)
