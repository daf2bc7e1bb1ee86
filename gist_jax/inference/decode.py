"""Compressed inference: prefill segment by segment, then decode one layout token per step.

Every call feeds each row its next ``C`` layout tokens (raw tokens and gists in the order the
training layout uses) against ``[memory ; current segment]`` from the cache, writes their
keys/values into the current segment, and when a row's segment is complete compresses it the
way training does: the gists' KV (and the sinks', when segment 0 completes) move to memory at
their memory positions (KV variants), or the gists' post-norm last-layer states join the
recurrent memory and the prefix ``[sinks ; states]`` is re-encoded once (Coarse-Rec). The raw
KV of a finished segment is dropped. Gist logits are never sampled, and neither are the
``<gist>`` id and ids beyond the tokenizer (``sampleable_ids``).

Prefill feeds whole segments (``C = L + t``; UniGist, ``window.py``: a rolling window cache
and chunks of any multiple of r; a plain KV cache: chunks of ``FULL_PREFILL_CHUNK`` tokens);
decoding is one jitted ``while_loop`` feeding one token per row per step, teacher-forcing the
rest of each prompt and then sampling (greedy, temperature, top-p). Positions and masks come
from the same rules as ``gist_jax.gist.layout``, so the logits equal the parallel training
forward over the final sequence (tested <= 1e-4).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.errors import ConfigError
from gist_jax.gist.config import VARIANTS, CompressionConfig
from gist_jax.inference import window
from gist_jax.inference.cache import Cache, Plan, cache_stats
from gist_jax.inference.model_step import rotate_keys as _rotate
from gist_jax.inference.model_step import run_decoder as _run
from gist_jax.model.attention import AttentionSpec, LayerMemory
from gist_jax.model.config import ModelConfig
from gist_jax.model.transformer import Params

FULL_PREFILL_CHUNK = 512  # prompt tokens per prefill call without compression (memory bounded by it)


def _item_positions(plan: Plan, segment_B: jax.Array, index_BxC: jax.Array) -> tuple[jax.Array, ...]:
    """(raw offset, gist slot, position, memory position) of in-segment items ``index``."""
    raw_T, slot_T = (jnp.asarray(a) for a in plan.order())
    idx = jnp.minimum(index_BxC, plan.segment_tokens - 1)
    raw, slot = raw_T[idx], slot_T[idx]
    seg = segment_B[:, None]
    s, t, L = plan.num_sinks, plan.gists, plan.segment_length
    gist_memory_pos = s + seg * t + slot
    if plan.positions == "compressed":
        position = jnp.where(seg == 0, 0, s + seg * t) + index_BxC
        memory_pos = gist_memory_pos
    else:
        after = (seg + 1) * L if plan.granularity == "coarse" else seg * L + (slot + 1) * plan.ratio
        position = jnp.where(raw >= 0, seg * L + raw, after)
        memory_pos = position
    return raw, slot, position.astype(jnp.int32), memory_pos.astype(jnp.int32)


def _reencode_prefix(cfg: ModelConfig, plan: Plan, params: Params, cache: Cache, rows_B: jax.Array) -> Cache:
    """Coarse-Rec: KV of ``[sinks ; gist states so far]`` (causal among themselves) for ``rows``."""
    b, s = cache.segment.shape[0], plan.num_sinks
    n_states = cache.states.shape[1]
    seg = cache.segment  # already advanced: memory holds segments < seg
    state_idx = jnp.arange(n_states)
    valid = jnp.concatenate([jnp.broadcast_to(seg[:, None] > 0, (b, s)),
                             state_idx[None, :] < (seg * plan.gists)[:, None]], axis=1)
    slot = state_idx % plan.gists
    seg_of = state_idx // plan.gists
    gist_index = jnp.asarray(np.nonzero(plan.order()[1] >= 0)[0])  # in-segment index of gist slot j
    _, _, _, mem_pos = _item_positions(plan, seg_of, gist_index[slot][:, None])
    positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(s), (b, s)),
                                 jnp.broadcast_to(mem_pos[:, 0], (b, n_states))], axis=1).astype(jnp.int32)
    tokens = jnp.concatenate([cache.sink_tokens, jnp.zeros((b, n_states), jnp.int32)], axis=1)
    embeds = jnp.concatenate([jnp.zeros((b, s, cfg.hidden_size), cache.states.dtype), cache.states], axis=1)
    embeds_mask = jnp.broadcast_to(jnp.arange(s + n_states) >= s, tokens.shape)
    false = jnp.zeros(tokens.shape, bool)
    spec = AttentionSpec(positions=positions, valid=valid, is_gist=false, gist_slot=jnp.zeros(tokens.shape, jnp.int32))
    _, _, (k, v) = _run(cfg, params, tokens, spec, None, (embeds, embeds_mask))
    pick = rows_B[None, :, None, None, None]
    return cache.replace(mem_k=jnp.where(pick, _rotate(cfg, k, positions), cache.mem_k),
                         mem_v=jnp.where(pick, v, cache.mem_v),
                         mem_valid=jnp.where(rows_B[:, None], valid, cache.mem_valid))


def _compress(cfg: ModelConfig, plan: Plan, params: Params, cache: Cache, done_B: jax.Array) -> Cache:
    """Rows whose segment is complete: gists (and the sinks, when segment 0 completes) go to memory; the
    segment is emptied and the row moves to the next segment."""
    s = plan.num_sinks
    raw_T, slot_T = plan.order()
    gist_idx = np.nonzero(slot_T >= 0)[0]
    if plan.memory == "kv":
        sink_idx = np.asarray([int(np.nonzero(raw_T == o)[0][0]) for o in range(s)], np.int32)
        idx = np.concatenate([sink_idx, gist_idx]).astype(np.int32)
        seg = cache.segment[:, None]
        idx_BxI = jnp.broadcast_to(jnp.asarray(idx), (seg.shape[0], len(idx)))
        _, _, _, mem_pos = _item_positions(plan, cache.segment, idx_BxI)
        is_sink = jnp.arange(len(idx)) < s
        mem_pos = jnp.where(is_sink[None], jnp.arange(len(idx))[None], mem_pos)
        slots = jnp.where(is_sink[None], jnp.arange(len(idx))[None], s + seg * plan.gists + slot_T[idx][None])
        write = done_B[:, None] & (~is_sink[None] | (seg == 0))
        slots = jnp.where(write, slots, plan.memory_size)  # out of range: dropped
        k = _rotate(cfg, cache.seg_k[:, :, idx], mem_pos)
        rows = jnp.broadcast_to(jnp.arange(seg.shape[0])[:, None], slots.shape)
        cache = cache.replace(
            mem_k=cache.mem_k.at[:, rows, slots].set(k.astype(cache.mem_k.dtype), mode="drop"),
            mem_v=cache.mem_v.at[:, rows, slots].set(cache.seg_v[:, :, idx], mode="drop"),
            mem_valid=cache.mem_valid.at[rows, slots].set(True, mode="drop"))
    cache = cache.replace(segment=cache.segment + done_B, offset=jnp.where(done_B, 0, cache.offset))
    if plan.memory == "recurrent":
        cache = jax.lax.cond(done_B.any(), lambda c: _reencode_prefix(cfg, plan, params, c, done_B), lambda c: c, cache)
    return cache


class DecodePolicy(NamedTuple):
    """How a cache is filled: ``feed`` the next layout tokens; ``prefill`` whole prompt chunks;
    ``chunk_raw_offsets(plan, L)``, per position of one prefill chunk of L raw tokens, its raw
    offset (-1: a gist)."""

    feed: Callable[..., tuple[jax.Array, Cache]]
    prefill: Callable[..., tuple[Cache, jax.Array, np.ndarray]]
    chunk_raw_offsets: Callable[[Plan, int], Any]


def _policy(plan: Plan) -> DecodePolicy:
    variant = VARIANTS[plan.variant]
    if variant.decode is None:
        raise ConfigError(f"compression.memory={plan.memory!r} ({variant.name}) has no compressed decoding; "
                          "evaluate it with the parallel forward (train/evaluation.py)")
    return DECODE_POLICIES[variant.decode]


def feed(cfg: ModelConfig, plan: Plan, params: Params, cache: Cache, tokens_BxC: jax.Array,
         valid_BxC: jax.Array) -> tuple[jax.Array, Cache]:
    """Feed each row its next C layout tokens (valid ones first; a gist's token id is ignored).

    Returns logits ``[B, C, V]`` and the cache after the tokens (and any completed segment's
    compression). The variant's decode policy does it (``Variant.decode``, ``DECODE_POLICIES``):
    chunked variants and full attention ``feed_segments``, UniGist ``window.feed``.
    """
    return _policy(plan).feed(cfg, plan, params, cache, tokens_BxC, valid_BxC)


def feed_segments(cfg: ModelConfig, plan: Plan, params: Params, cache: Cache, tokens_BxC: jax.Array,
                  valid_BxC: jax.Array) -> tuple[jax.Array, Cache]:
    """``feed`` for segment-wise caches (Fine-KV, Coarse-KV, Coarse-Rec; a plain cache without
    compression). Callers keep every row inside one segment per call."""
    b, c = tokens_BxC.shape
    index = cache.offset[:, None] + jnp.arange(c)[None, :]
    raw, slot, position, _ = _item_positions(plan, cache.segment, index)
    is_gist = slot >= 0
    seg_valid = cache.seg_valid()
    memory = LayerMemory(jnp.concatenate([cache.mem_k, _rotate(cfg, cache.seg_k, cache.seg_pos)], axis=2),
                         jnp.concatenate([cache.mem_v, cache.seg_v], axis=2))
    spec = AttentionSpec(positions=position, valid=valid_BxC,
                         prefix_valid=jnp.concatenate([cache.mem_valid, seg_valid], axis=1), is_gist=is_gist,
                         gist_slot=jnp.maximum(slot, 0) if plan.per_slot_embedding else jnp.zeros_like(slot))
    logits, hidden, (k, v) = _run(cfg, params, tokens_BxC, spec, memory)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, c))
    where = jnp.where(valid_BxC, index, plan.segment_tokens)  # invalid: dropped
    cache = cache.replace(
        seg_k=cache.seg_k.at[:, rows, where].set(k.astype(cache.seg_k.dtype), mode="drop"),
        seg_v=cache.seg_v.at[:, rows, where].set(v.astype(cache.seg_v.dtype), mode="drop"),
        seg_pos=cache.seg_pos.at[rows, where].set(position, mode="drop"))
    if plan.memory == "recurrent":
        state_slot = jnp.where(valid_BxC & is_gist, cache.segment[:, None] * plan.gists + slot, cache.states.shape[1])
        states = cache.states.at[rows, state_slot].set(hidden.astype(cache.states.dtype), mode="drop")
        cache = cache.replace(states=states)
    if plan.num_sinks and plan.memory != "none":
        is_sink = valid_BxC & (raw >= 0) & (raw < plan.num_sinks) & (cache.segment[:, None] == 0)
        sink = jnp.where(is_sink, raw, plan.num_sinks)
        cache = cache.replace(sink_tokens=cache.sink_tokens.at[rows, sink].set(tokens_BxC, mode="drop"))
    n_valid = valid_BxC.sum(axis=1).astype(jnp.int32)
    cache = cache.replace(offset=cache.offset + n_valid,
                          raw_count=cache.raw_count + (valid_BxC & (raw >= 0)).sum(axis=1).astype(jnp.int32))
    if plan.memory != "none":
        cache = _compress(cfg, plan, params, cache, cache.offset >= plan.segment_tokens)
    return logits, cache


@functools.partial(jax.jit, static_argnames=("cfg", "plan"))
def feed_jit(cfg: ModelConfig, plan: Plan, params: Params, cache: Cache, tokens_BxC: jax.Array,
             valid_BxC: jax.Array) -> tuple[jax.Array, Cache]:
    """``feed`` compiled once per (plan, chunk width)."""
    return feed(cfg, plan, params, cache, tokens_BxC, valid_BxC)


def sampleable_ids(vocab_size: int, tokenizer_size: int | None = None,
                   gist_token_id: int | None = None) -> np.ndarray:
    """``[V]`` bool: the LM-head rows generation may pick. Not the ``<gist>`` marker (the model
    inserts gists itself; fed back as a token it would be an ordinary embedding row no training
    shaped), nor rows at or beyond the tokenizer's size: a vocabulary padded past the tokenizer
    (Qwen2: 152064 rows for 151665 ids) has untrained rows that no text decodes to. The
    exported ``modeling_gist.py`` excludes the same ids, so both generators agree."""
    allowed_V = np.ones(vocab_size, bool)
    if tokenizer_size is not None:
        allowed_V[tokenizer_size:] = False
    if gist_token_id is not None and 0 <= gist_token_id < vocab_size:
        allowed_V[gist_token_id] = False
    if not allowed_V.any():
        raise ConfigError(f"no id can be generated: tokenizer_size={tokenizer_size}, "
                          f"gist_token_id={gist_token_id}, model vocab_size={vocab_size}")
    return allowed_V


def sample(logits_BxV: jax.Array, rng: jax.Array, temperature: float, top_p: float,
           allowed_V: jax.Array | None = None) -> jax.Array:
    """Greedy when ``temperature == 0``; else temperature sampling from the smallest set of top
    tokens whose probability reaches ``top_p`` (nucleus). Ids outside ``allowed_V``
    (``sampleable_ids``) get -inf first, so no mode ever picks them."""
    if allowed_V is not None:
        logits_BxV = jnp.where(allowed_V, logits_BxV, -jnp.inf)
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        choice = jax.random.categorical(rng, sorted_logits, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "plan", "max_new", "temperature", "top_p", "record"))
def _decode_loop(cfg: ModelConfig, plan: Plan, params: Params, cache: Cache, pending_BxV: jax.Array,
                 prompts_BxP: jax.Array, lengths_B: jax.Array, new_B: jax.Array, allowed_V: jax.Array,
                 rng: jax.Array, max_new: int, temperature: float, top_p: float,
                 record: int) -> tuple[jax.Array, Cache, jax.Array]:
    """One layout token per row per step until every row has fed ``length + new`` raw tokens
    (``new <= max_new``, data, so nearby requests share a compilation); returns the generated
    tokens, the cache and (``record`` > 0) raw-token logits. Only ``allowed_V`` ids (data) are
    sampled; recorded logits are the model's, unmasked."""
    b = prompts_BxP.shape[0]
    raw_T = jnp.asarray(plan.order()[0])
    target = lengths_B + new_B
    out = jnp.zeros((b, max_new), jnp.int32)
    logits_rec = jnp.zeros((b, max(record, 1), cfg.vocab_size), jnp.float32)

    def cond(carry):
        return (carry[0].raw_count < target).any()

    def body(carry):
        cache, pending, out, rng, logits_rec = carry
        rng, key = jax.random.split(rng)
        n = cache.raw_count
        active = n < target
        is_raw = raw_T[jnp.minimum(cache.offset, plan.segment_tokens - 1)] >= 0
        in_prompt = n < lengths_B
        sampled = sample(pending, key, temperature, top_p, allowed_V)
        prompt_tok = jnp.take_along_axis(prompts_BxP, jnp.minimum(n, prompts_BxP.shape[1] - 1)[:, None], axis=1)[:, 0]
        token = jnp.where(in_prompt, prompt_tok, sampled)
        logits, cache = feed(cfg, plan, params, cache, token[:, None], active[:, None])
        fed_raw = active & is_raw
        pending = jnp.where(fed_raw[:, None], logits[:, 0], pending)
        gen_at = jnp.where(fed_raw & ~in_prompt, n - lengths_B, max_new)
        out = out.at[jnp.arange(b), gen_at].set(token, mode="drop")
        if record:
            logits_rec = logits_rec.at[jnp.arange(b), jnp.where(fed_raw, n, record)].set(logits[:, 0], mode="drop")
        return cache, pending, out, rng, logits_rec

    cache, _, out, _, logits_rec = jax.lax.while_loop(cond, body, (cache, pending_BxV, out, rng, logits_rec))
    return out, cache, logits_rec


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated tokens per row (cut after eos_id when given)
    cache_stats: list[dict[str, int]]  # per row, see ``cache_stats``
    logits: np.ndarray | None  # [B, N, V] logits of every raw token fed (record_logits=True)
    cache: Cache


def prefill(cfg: ModelConfig, plan: Plan, params: Params, cache: Cache, prompts_BxP: np.ndarray,
            lengths_B: np.ndarray, logits_out: np.ndarray | None = None,
            chunk: int | None = None) -> tuple[Cache, jax.Array, np.ndarray]:
    """Feed every whole chunk of each prompt, one chunk per call; the rest of a prompt (less
    than a chunk) is teacher-forced by the decode loop. A chunk is a segment (``chunk`` None
    or L), the unit chunked compression works in; UniGist has no chunks and takes any multiple
    of r raw tokens (default L). Without compression every prompt token is fed, ``chunk``
tokens per call (default ``FULL_PREFILL_CHUNK``). Returns the
    cache, each row's pending logits (of its last raw token fed; zeros if none) and the raw
    tokens fed per row. The variant's decode policy does it (``DECODE_POLICIES``)."""
    return _policy(plan).prefill(cfg, plan, params, cache, prompts_BxP, lengths_B, logits_out, chunk)


def _prefill_chunks(cfg: ModelConfig, plan: Plan, params: Params, cache: Cache, prompts_BxP: np.ndarray,
                    lengths_B: np.ndarray, logits_out: np.ndarray | None,
                    chunk: int | None) -> tuple[Cache, jax.Array, np.ndarray]:
    """``prefill`` of a compressing cache: whole chunks, one per call."""
    b = prompts_BxP.shape[0]
    pending = jnp.zeros((b, cfg.vocab_size), jnp.float32)
    L = _check_chunk(plan, chunk)
    raw_T = np.asarray(_policy(plan).chunk_raw_offsets(plan, L))
    last_raw = int(np.nonzero(raw_T >= 0)[0][-1])
    full = lengths_B // L
    for i in range(int(full.max(initial=0))):
        seg_tokens = prompts_BxP[:, i * L + np.maximum(raw_T, 0)] * (raw_T >= 0)[None]
        valid_B = full > i
        valid = np.broadcast_to(valid_B[:, None], seg_tokens.shape)
        logits, cache = feed_jit(cfg, plan, params, cache, jnp.asarray(seg_tokens, jnp.int32), jnp.asarray(valid))
        pending = jnp.where(jnp.asarray(valid_B)[:, None], logits[:, last_raw], pending)
        if logits_out is not None:
            got = np.asarray(logits)
            for r in np.nonzero(valid_B)[0].tolist():
                logits_out[r, i * L + raw_T[raw_T >= 0]] = got[r, raw_T >= 0]
    return cache, pending, full * L


def _prefill_full(cfg: ModelConfig, plan: Plan, params: Params, cache: Cache, prompts_BxP: np.ndarray,
                  lengths_B: np.ndarray, logits_out: np.ndarray | None,
                  chunk: int | None) -> tuple[Cache, jax.Array, np.ndarray]:
    """A plain KV cache's prefill, ``chunk`` tokens per call (None: ``FULL_PREFILL_CHUNK``). One
    call over the whole prompt held its logits ``[B, P, V]`` and scores ``[B, heads, P,
    capacity + P]`` at once: 18 GB for 4 prompts of 4K tokens with SmolLM2's 49K vocabulary. In
    chunks both are bounded by the chunk, and every row's whole prompt is fed (there is no
    segment to wait for)."""
    chunk = FULL_PREFILL_CHUNK if chunk is None else chunk
    if chunk < 1:
        raise ConfigError(f"prefill_chunk={chunk} must be >= 1")
    b = prompts_BxP.shape[0]
    pending = jnp.zeros((b, cfg.vocab_size), jnp.float32)
    last_B = np.maximum(lengths_B - 1, 0)
    chunk = min(chunk, prompts_BxP.shape[1])
    for start in range(0, int(lengths_B.max(initial=0)), chunk):
        part_BxC = np.zeros((b, chunk), np.int32)
        taken = prompts_BxP[:, start:start + chunk]
        part_BxC[:, :taken.shape[1]] = taken
        valid_BxC = (start + np.arange(chunk))[None, :] < lengths_B[:, None]
        logits, cache = feed_jit(cfg, plan, params, cache, jnp.asarray(part_BxC), jnp.asarray(valid_BxC))
        ends_here_B = (lengths_B > start) & (last_B < start + chunk)
        at_B = np.clip(last_B - start, 0, chunk - 1)
        last_logits = jnp.take_along_axis(logits, jnp.asarray(at_B)[:, None, None], axis=1)[:, 0]
        pending = jnp.where(jnp.asarray(ends_here_B)[:, None], last_logits, pending)
        if logits_out is not None:
            got = np.asarray(logits)
            for row, n in enumerate(lengths_B):
                n_here = int(np.clip(n - start, 0, chunk))
                logits_out[row, start:start + n_here] = got[row, :n_here]
    return cache, pending, np.asarray(lengths_B)


def _check_chunk(plan: Plan, chunk: int | None) -> int:
    """Raw tokens per prefill call: L unless UniGist, which takes any multiple of r."""
    L = plan.segment_length
    if chunk is None or chunk == L:
        return L
    if not plan.window:
        raise ConfigError(f"prefill_chunk={chunk}: chunked compression prefills whole segments of "
                          f"compression.segment_length={L}; leave it unset (UniGist, window > 0, takes any "
                          "multiple of the ratio)")
    if chunk < 1 or chunk % plan.ratio:
        raise ConfigError(f"prefill_chunk={chunk} must be a positive multiple of the ratio {plan.ratio} "
                          "(whole gist units)")
    return chunk


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def generate(cfg: ModelConfig, comp: CompressionConfig, params: Params, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, *, ratio: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, eos_id: int | None = None, record_logits: bool = False,
             capacity: int | None = None, pad_batch_to: int | None = None,
             tokenizer_size: int | None = None, gist_token_id: int | None = None,
             prefill_chunk: int | None = None) -> Generation:
    """Generate from gist-compressed memory (``comp.memory='none'``: a plain KV cache).

    ``cfg`` is the model config with the gist parameters (``model_config_for``); ``ratio``
    picks one of ``comp.ratios`` (default: the first). ``capacity`` (raw tokens per row)
    sizes the memory; default the longest prompt + ``max_new_tokens`` rounded up to 64.
    ``pad_batch_to`` adds idle rows up to that batch size, so batches of a few sizes share
    one compilation (their outputs are dropped). Ids ``>= tokenizer_size`` (the tokenizer's
    ``vocab_size``; None: every LM-head row) and ``gist_token_id`` (an export's ``<gist>``
    marker; gist_jax's tokenizers have none, and an export puts it at ``tokenizer_size``) are
    never sampled (``sampleable_ids``). ``prefill_chunk``: raw tokens per prefill call (see
    ``prefill``; UniGist: any multiple of the ratio; no compression: any width, default 512;
    chunked compression: the segment only).
    """
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate needs at least one non-empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not 0.0 < top_p <= 1.0 or temperature < 0:
        raise ConfigError(f"top_p={top_p} must be in (0, 1] and temperature={temperature} >= 0")
    lengths = np.asarray([len(p) for p in prompts], np.int64)
    total = int(lengths.max()) + max_new_tokens
    # Shapes are rounded up to multiples of 64 so that nearby prompt lengths share a compilation.
    capacity = _round_up(total, 64) if capacity is None else capacity
    if capacity < total:
        raise ConfigError(f"capacity={capacity} is below the longest prompt + max_new_tokens = {total}")
    plan = Plan.create(comp, capacity, ratio)
    allowed_V = jnp.asarray(sampleable_ids(cfg.vocab_size, tokenizer_size, gist_token_id))
    rows = max(len(prompts), pad_batch_to or 0)
    padded = np.zeros((rows, _round_up(int(lengths.max()), 64)), np.int32)
    for row, p in enumerate(prompts):
        padded[row, :len(p)] = p
    new = np.zeros(rows, np.int32)
    new[:len(prompts)] = max_new_tokens
    lengths = np.concatenate([lengths, np.zeros(rows - len(prompts), np.int64)])  # idle rows: nothing to feed
    cache = Cache.empty(cfg, plan, rows)
    record = total if record_logits else 0
    logits_out = np.zeros((rows, total, cfg.vocab_size), np.float32) if record_logits else None
    cache, pending, prefilled = prefill(cfg, plan, params, cache, padded, lengths, logits_out, prefill_chunk)
    out, cache, rec = _decode_loop(cfg, plan, params, cache, pending, jnp.asarray(padded),
                                   jnp.asarray(lengths, jnp.int32), jnp.asarray(new), allowed_V, jax.random.key(seed),
                                   _round_up(max_new_tokens, 16), float(temperature), float(top_p), record)
    if logits_out is not None:
        rec_np = np.asarray(rec)
        for row in range(len(prompts)):
            logits_out[row, prefilled[row]:] = rec_np[row, prefilled[row]:]
        logits_out = logits_out[:len(prompts)]
    tokens = []
    for row in np.asarray(out)[:len(prompts), :max_new_tokens].tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id) + 1]
        tokens.append(row)
    return Generation(tokens, cache_stats(cfg, cache)[:len(prompts)], logits_out, cache)


def _segment_offsets(plan: Plan, chunk: int) -> np.ndarray:
    return plan.order()[0]


# The cache policies a variant names (``config.Variant.decode``): segment caches (Fine-KV, Coarse-KV,
# Coarse-Rec), UniGist's rolling raw window (``window.py``), and a plain KV cache (no compression).
DECODE_POLICIES: dict[str, DecodePolicy] = {
    "segments": DecodePolicy(feed_segments, _prefill_chunks, _segment_offsets),
    "window": DecodePolicy(window.feed, _prefill_chunks, window.chunk_raw_offsets),
    "plain": DecodePolicy(feed_segments, _prefill_full, _segment_offsets),
}
