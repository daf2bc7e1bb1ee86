"""The compressed KV cache: fixed-size buffers, per-row counters, and what they cost.

Per layer the cache holds two parts (``docs/method.md`` section 5):

* **memory** ``[M]`` entries: the sinks and the gists of every finished segment, keys already
  rotated at their memory positions (KV variants). For Coarse-Rec it holds the keys/values of
  the re-encoded prefix ``[sinks ; accumulated gist states]``, recomputed once per segment from
  ``states`` (the post-norm last-layer gist states), so decoding a segment never re-runs it.
* **segment** ``[Ts]`` entries, ``Ts = L + t``: the raw tokens (and, for fine granularity, the
  gists) of the current unfinished segment, keys *un-rotated* plus their in-segment positions.
  A gist key has one position inside its segment and another as memory (compressed scheme),
  so the segment keeps un-rotated keys and compression rotates them once, at memory positions.

Every row of a batch has its own counters (segment index, offset inside the segment, raw
tokens fed), so prompts of different lengths cross segment boundaries at different steps while
all shapes stay static: one compilation per (batch, capacity).

``memory='none'`` is the plain KV cache: one segment as long as the capacity, no gists.

UniGist (``compression.window`` W > 0, ``gist_jax/inference/window.py``) has no chunks, so
the two parts change meaning: **memory** holds the sinks and *every* gist fed so far (a gist
enters it as soon as it is computed, since every later token sees it), and **segment** becomes
a ring of ``W + r`` raw tokens (``seg_pos`` = their raw index, -1 when empty), enough for
the widest window a next token can have (its unit's first raw token minus W, through itself).
Every key has one (aligned) position there, so both parts store keys rotated. Raw tokens that
leave the window are overwritten; the cache is ``s + n / r + W + r`` entries per layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Self

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.errors import ConfigError
from gist_jax.gist.config import CompressionConfig, variant_of
from gist_jax.gist.layout import _segment_order
from gist_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static description compiled decoding is specialised on (hashable).

    ``ratio`` is one compression ratio for the whole batch (inference has no dead slots);
    ``max_segments`` sizes the memory: ``capacity_raw`` raw tokens at most per row.
    """

    memory: str  # kv | recurrent | none
    granularity: str
    positions: str
    segment_length: int  # L (for 'none': the capacity)
    ratio: int
    num_sinks: int
    per_slot_embedding: bool
    max_segments: int
    window: int = 0  # UniGist's W (0: chunked)
    variant: str = "kv"  # the registered variant whose decode policy runs (``config.VARIANTS``)

    @classmethod
    def create(cls, comp: CompressionConfig, capacity_raw: int, ratio: int | None = None) -> Plan:
        """Plan for rows of at most ``capacity_raw`` raw tokens (prompt + generated)."""
        if capacity_raw < 1:
            raise ConfigError(f"capacity_raw={capacity_raw} must be >= 1 (prompt + max_new_tokens)")
        if not comp.enabled:
            return cls("none", "coarse", "compressed", capacity_raw, 1, 0, False, 1, variant=variant_of(comp).name)
        ratio = comp.ratios[0] if ratio is None else int(ratio)
        if comp.segment_length % ratio:
            raise ConfigError(f"ratio={ratio} does not divide compression.segment_length="
                              f"{comp.segment_length}; pick one of compression.ratios={comp.ratios}")
        if comp.window % ratio:
            raise ConfigError(f"ratio={ratio} does not divide compression.window={comp.window}: the window "
                              f"is a whole number of gist units; pick one of compression.ratios={comp.ratios}")
        return cls(comp.memory, comp.granularity, comp.positions, comp.segment_length, ratio,
                   comp.num_sinks, comp.gist_embedding == "per_slot",
                   math.ceil(capacity_raw / comp.segment_length), comp.window, variant_of(comp).name)

    @property
    def gists(self) -> int:
        """t: gists per segment (0 without compression)."""
        return 0 if self.memory == "none" else self.segment_length // self.ratio

    @property
    def segment_tokens(self) -> int:
        return self.segment_length + self.gists

    @property
    def live_tokens(self) -> int:
        """Entries of the second cache part: the current segment, or (UniGist) the raw ring of
        ``W + r`` tokens."""
        return self.window + self.ratio if self.window else self.segment_tokens

    @property
    def memory_size(self) -> int:
        return 0 if self.memory == "none" else self.num_sinks + self.max_segments * self.gists

    def order(self) -> tuple[np.ndarray, np.ndarray]:
        """Per in-segment index: raw offset (-1 for gists) and gist slot (-1 for raw tokens)."""
        if self.memory == "none":
            raw = np.arange(self.segment_length, dtype=np.int32)
            return raw, np.full_like(raw, -1)
        items = np.asarray(_segment_order(self.granularity, self.segment_length, self.ratio, self.gists), np.int32)
        return np.where(items >= 0, items, -1).astype(np.int32), np.where(items < 0, -items - 1, -1).astype(np.int32)

    def last_raw_index(self) -> int:
        raw, _ = self.order()
        return int(np.nonzero(raw >= 0)[0][-1])


@flax.struct.dataclass
class Cache:
    """Fixed-size per-row cache; see the module docstring for the two parts."""

    mem_k: jax.Array  # [layers, B, M, K, H] rotated at memory positions
    mem_v: jax.Array  # [layers, B, M, K, H]
    mem_valid: jax.Array  # [B, M]
    seg_k: jax.Array  # [layers, B, Ts, K, H] un-rotated
    seg_v: jax.Array  # [layers, B, Ts, K, H]
    seg_pos: jax.Array  # [B, Ts] in-segment RoPE positions (UniGist: raw index, -1 empty)
    states: jax.Array  # [B, S * t, E] recurrent gist states (size 0 for KV variants)
    sink_tokens: jax.Array  # [B, s] raw ids of the sinks (recurrent re-encodes them)
    segment: jax.Array  # [B] index of the current segment
    offset: jax.Array  # [B] layout tokens of the current segment already fed
    raw_count: jax.Array  # [B] raw tokens fed so far
    window: int = flax.struct.field(pytree_node=False, default=0)  # UniGist: seg_* is a raw ring

    if TYPE_CHECKING:  # added by flax.struct.dataclass at runtime
        def replace(self, **updates: Any) -> Self: ...

    @classmethod
    def empty(cls, cfg: ModelConfig, plan: Plan, batch: int) -> Cache:
        def kv(n: int) -> jax.Array:
            return jnp.zeros((cfg.num_layers, batch, n, cfg.num_kv_heads, cfg.head_dim), cfg.compute_dtype)

        state_slots = plan.max_segments * plan.gists if plan.memory == "recurrent" else 0
        zeros_B = jnp.zeros((batch,), jnp.int32)
        return cls(kv(plan.memory_size), kv(plan.memory_size), jnp.zeros((batch, plan.memory_size), bool),
                   kv(plan.live_tokens), kv(plan.live_tokens),
                   jnp.full((batch, plan.live_tokens), -1 if plan.window else 0, jnp.int32),
                   jnp.zeros((batch, state_slots, cfg.hidden_size), cfg.compute_dtype),
                   jnp.zeros((batch, plan.num_sinks), jnp.int32), zeros_B, zeros_B, zeros_B, plan.window)

    def seg_valid(self) -> jax.Array:
        """[B, Ts] filled entries of the second part (UniGist: ring slots holding a raw token)."""
        if self.window:
            return self.seg_pos >= 0
        return jnp.arange(self.seg_k.shape[2])[None, :] < self.offset[:, None]


def entry_bytes(cfg: ModelConfig) -> int:
    """Bytes of one cache entry across all layers: a key and a value per layer."""
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize


def cache_stats(cfg: ModelConfig, cache: Cache) -> list[dict[str, int]]:
    """Per row: entries per layer in use (memory + current segment), their bytes, the bytes an
    uncompressed cache would hold for the same raw tokens, and the bytes allocated."""
    per = entry_bytes(cfg)
    used = np.asarray(cache.mem_valid.sum(axis=1) + cache.seg_valid().sum(axis=1))
    raw = np.asarray(cache.raw_count)
    allocated = (cache.mem_k.shape[2] + cache.seg_k.shape[2]) * per + \
        cache.states.shape[1] * cache.states.shape[2] * jnp.dtype(cache.states.dtype).itemsize
    return [{"entries": int(u), "bytes": int(u) * per, "raw_tokens": int(n), "uncompressed_bytes": int(n) * per,
             "allocated_bytes": int(allocated)} for u, n in zip(used, raw)]


def expected_entries(plan: Plan, segment: int, offset: int) -> int:
    """What the method says a row holds per layer: segment 0 keeps its own tokens only; later
    segments keep sinks + every gist of finished segments + the current segment's tokens.
    UniGist: sinks + every gist fed + the raw ring (the last ``W + r`` non-sink raw tokens)."""
    if plan.window:
        units, raw_in_unit = divmod(segment * plan.segment_tokens + offset, plan.ratio + 1)
        raw = units * plan.ratio + raw_in_unit
        sinks = min(raw, plan.num_sinks)
        return sinks + units + min(raw - sinks, plan.live_tokens)
    if plan.memory == "none" or segment == 0:
        return offset
    return plan.num_sinks + segment * plan.gists + offset
