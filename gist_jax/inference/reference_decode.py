"""Greedy decoding with the uncompressed model (the reference that compressed decoding is
checked against later).

Prompts of different lengths are left-padded into one fixed buffer so the whole loop is a
single compiled ``fori_loop``: one compilation per (batch, buffer length), none per token.
Every step re-runs the buffer without a KV cache, which is quadratic but exact; the cached,
compressed decoder lives with compressed inference.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.model.attention import AttentionSpec
from gist_jax.model.config import ModelConfig
from gist_jax.model.transformer import Params, forward


@functools.partial(jax.jit, static_argnames=("cfg", "prompt_len", "max_new_tokens"))
def _greedy_loop(cfg: ModelConfig, params: Params, buffer_BxT: jax.Array, valid_BxT: jax.Array,
                 prompt_len: int, max_new_tokens: int) -> jax.Array:
    positions_BxT = jnp.maximum(jnp.cumsum(valid_BxT, axis=1) - 1, 0).astype(jnp.int32)
    spec = AttentionSpec(positions=positions_BxT, valid=valid_BxT)

    def step(k, buf_BxT):
        logits_BxTxV = forward(cfg, params, buf_BxT, spec)
        next_B = jnp.argmax(logits_BxTxV[:, prompt_len + k - 1], axis=-1).astype(buf_BxT.dtype)
        return buf_BxT.at[:, prompt_len + k].set(next_B)

    return jax.lax.fori_loop(0, max_new_tokens, step, buffer_BxT)


def greedy_generate(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, eos_id: int | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt; output stops at (and includes) ``eos_id``."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("greedy_generate needs at least one non-empty prompt")
    prompt_len = max(len(p) for p in prompts)
    total = prompt_len + max_new_tokens
    buffer = np.zeros((len(prompts), total), np.int32)
    valid = np.ones((len(prompts), total), bool)
    for row, prompt in enumerate(prompts):
        buffer[row, prompt_len - len(prompt):prompt_len] = prompt
        valid[row, :prompt_len - len(prompt)] = False
    out = np.asarray(_greedy_loop(cfg, params, jnp.asarray(buffer), jnp.asarray(valid),
                                  prompt_len, max_new_tokens))[:, prompt_len:]
    results = []
    for row in out.tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id) + 1]
        results.append(row)
    return results
