"""Where every token of a gist-compressed sequence goes: one host-side layout per shape.

A layout is a handful of int/bool arrays over the *layout tokens* (raw tokens with gist slots
inserted, segment-major), the same for every sequence of a batch. It depends only on the raw
length, the compression config and the per-segment ratios, never on token values, so it is
built with numpy once and passed to compiled code as data: a new ratio is a new shape (one
compilation), a new step is not.

Per segment i (L raw tokens, ``slots`` gist slots, ratio r_i, t_i = L / r_i live gists):
  coarse: x_1 .. x_L, g_1 .. g_t_i, dead slots
  fine:   x_1 .. x_r, g_1, x_(r+1) .. x_2r, g_2, ..., g_t_i, dead slots
Dead slots only exist with per-segment ratios (every segment padded to L / min(ratios)); they
are never attended to and never enter memory.

UniGist (``compression.window`` W > 0) uses the fine layout unchanged: with one ratio per
sequence, segment after segment of ``x_1 .. x_r, g_1, ...`` is one uninterrupted stream of gist
units. What differs is the mask (``specs.parallel_spec``): a token sees the raw tokens from its
``window_start`` (its unit's first raw token minus W) besides every earlier sink and gist.

Memory: the first ``num_sinks`` raw tokens and every live gist, in order. The memory buffer of
the sequential and recurrent paths has ``num_sinks + S * slots`` entries: sink j at j, gist
slot j of segment i at ``num_sinks + i * slots + j``.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from gist_jax.errors import ConfigError
from gist_jax.gist.config import CompressionConfig


@dataclasses.dataclass(frozen=True)
class LayoutShape:
    """The static part of a layout: everything compiled code may branch or size on. Ratios and
    which tokens are alive are data, so per-segment ratio sampling never recompiles.
    ``whole_segments`` is static because it picks the attention path: the prefix-causal
    (``flash``) and bank paths are exact only when no padding raw token sits before a live
    gist, and a token array padded by the caller looks the same as one that is not."""

    num_segments: int
    segment_length: int
    slots: int
    num_sinks: int
    whole_segments: bool  # the real raw tokens fill every segment (no pad_to_segments padding)

    @property
    def segment_tokens(self) -> int:
        return self.segment_length + self.slots

    @property
    def length(self) -> int:
        return self.num_segments * self.segment_tokens

    @property
    def memory_size(self) -> int:
        return self.num_sinks + self.num_segments * self.slots

    @property
    def padded_raw(self) -> int:
        return self.num_segments * self.segment_length

    def segment_slice(self, i: int) -> slice:
        return slice(i * self.segment_tokens, (i + 1) * self.segment_tokens)


@dataclasses.dataclass(frozen=True, eq=False)
class GistLayout:
    num_raw: int  # real raw tokens (before padding to whole segments)
    num_segments: int
    segment_length: int
    slots: int  # gist slots per segment
    num_sinks: int
    ratios: tuple[int, ...]  # per segment
    # Per layout token, shape [T] with T = num_segments * (segment_length + slots):
    raw_index: np.ndarray  # index into the (padded) raw sequence, -1 for gist slots
    segment: np.ndarray  # segment id
    is_gist: np.ndarray  # gist slot (live or dead)
    is_sink: np.ndarray  # one of the first num_sinks raw tokens
    alive: np.ndarray  # real raw token or live gist (False: padding, dead slot)
    gist_slot: np.ndarray  # slot within its segment (0 for raw tokens)
    position: np.ndarray  # RoPE position inside its own segment's pass
    memory_position: np.ndarray  # RoPE position when seen as memory (0 where not memory)
    memory_slot: np.ndarray  # index in the memory buffer, -1 for tokens never kept
    span_start: np.ndarray  # gists: first raw index of the span it summarises, else -1
    # First raw index whose token this one sees besides sinks and gists: its segment's first
    # raw token (chunked), or the start of its gist unit minus the window (UniGist, >= 0).
    window_start: np.ndarray

    @property
    def shape(self) -> LayoutShape:
        return LayoutShape(self.num_segments, self.segment_length, self.slots, self.num_sinks,
                           self.num_raw == self.padded_raw)

    @property
    def length(self) -> int:
        return self.shape.length

    @property
    def memory_size(self) -> int:
        return self.shape.memory_size

    @property
    def padded_raw(self) -> int:
        return self.num_segments * self.segment_length

    def live_raw_positions(self) -> np.ndarray:
        """Layout indices of the real raw tokens, in raw order, ``[num_raw]`` int32: the rows
        of layout-order logits that belong to the input tokens (raw token j at entry j).
        ``raw_index >= 0`` alone would also pick the padding up to whole segments
        (``pad_to_segments``); gists and dead slots are never raw."""
        return np.nonzero((self.raw_index >= 0) & self.alive)[0].astype(np.int32)

    def segment_slice(self, i: int) -> slice:
        return self.shape.segment_slice(i)

    def live_gists(self) -> int:
        return int((self.is_gist & self.alive).sum())


def _segment_order(granularity: str, segment_length: int, ratio: int, slots: int) -> list[int]:
    """Order of one segment's tokens: raw offsets 0..L-1, gist slots as -(slot + 1)."""
    live = segment_length // ratio
    if granularity == "coarse":
        order = list(range(segment_length)) + [-(j + 1) for j in range(live)]
    else:
        order = []
        for j in range(live):
            order += list(range(j * ratio, (j + 1) * ratio)) + [-(j + 1)]
    return order + [-(j + 1) for j in range(live, slots)]


def build_layout(num_raw: int, cfg: CompressionConfig, ratios: tuple[int, ...] | None = None,
                 slots: int | None = None) -> GistLayout:
    """Layout for ``num_raw`` raw tokens with one ratio per segment.

    ``ratios`` defaults to the single ratio of a fixed config; ``slots`` to L / min(ratios).
    """
    if not cfg.enabled:
        return _full_attention_layout(num_raw)
    L, s = cfg.segment_length, cfg.num_sinks
    num_segments = cfg.num_segments(num_raw)
    if ratios is None:
        ratios = (cfg.ratios[0],) * num_segments
    ratios = tuple(int(r) for r in ratios)
    if len(ratios) != num_segments:
        raise ConfigError(f"{len(ratios)} ratios given for {num_segments} segments")
    if any(L % r for r in ratios):
        raise ConfigError(f"ratios {ratios} must divide compression.segment_length={L}")
    slots = L // min(ratios) if slots is None else slots
    if slots < L // min(ratios):
        raise ConfigError(f"{slots} gist slots cannot hold L / r = {L // min(ratios)} gists")

    cols: dict[str, list[int]] = {k: [] for k in ("raw_index", "segment", "is_gist", "alive", "gist_slot", "position",
                            "memory_position", "memory_slot", "span_start", "window_start")}
    gists_before = 0  # live gists of earlier segments (memory grows by these)
    for i, r in enumerate(ratios):
        live = L // r
        offset_in_memory = 0 if i == 0 else s + gists_before
        for k, item in enumerate(_segment_order(cfg.granularity, L, r, slots)):
            is_gist = item < 0
            slot = -item - 1 if is_gist else 0
            raw = -1 if is_gist else i * L + item
            alive = slot < live if is_gist else raw < num_raw
            # A gist's span is the r raw tokens it summarises (fine: the ones before it;
            # coarse: the slot-th block of r tokens); aligned position = the token after it.
            span = i * L + slot * r if is_gist and alive else -1
            if cfg.positions == "compressed":
                position = offset_in_memory + k
                memory_position = (s + gists_before + slot) if (is_gist and alive) else (
                    raw if 0 <= raw < s else 0)
            else:
                after = (i + 1) * L if cfg.granularity == "coarse" or not alive else span + r
                position = after if is_gist else raw
                memory_position = position if (is_gist and alive) or 0 <= raw < s else 0
            if is_gist:
                memory_slot = s + i * slots + slot if alive else -1
            else:
                memory_slot = raw if raw < s and alive else -1
            if cfg.windowed:  # the own gist unit (fine: a gist follows its span) and W before it
                unit_start = i * L + slot * r if is_gist else raw - raw % r
                window_start = max(0, unit_start - cfg.window)
            else:
                window_start = i * L
            for key, value in (("raw_index", raw), ("segment", i), ("is_gist", is_gist),
                               ("alive", alive), ("gist_slot", slot), ("position", position),
                               ("memory_position", memory_position), ("memory_slot", memory_slot),
                               ("span_start", span), ("window_start", window_start)):
                cols[key].append(value)
        gists_before += live

    arrays = {k: np.asarray(v, dtype=bool if k in ("is_gist", "alive") else np.int32)
              for k, v in cols.items()}
    raw_index = arrays["raw_index"]
    is_sink = (raw_index >= 0) & (raw_index < s) & arrays["alive"]
    return GistLayout(num_raw=num_raw, num_segments=num_segments, segment_length=L, slots=slots,
                      num_sinks=s, ratios=ratios, is_sink=is_sink, **arrays)


def _full_attention_layout(num_raw: int) -> GistLayout:
    """memory='none': one segment, no gists, ordinary positions."""
    raw = np.arange(num_raw, dtype=np.int32)
    zeros, false = np.zeros(num_raw, np.int32), np.zeros(num_raw, bool)
    return GistLayout(
        num_raw=num_raw, num_segments=1, segment_length=num_raw, slots=0, num_sinks=0,
        ratios=(1,), raw_index=raw, segment=zeros, is_gist=false, is_sink=false,
        alive=np.ones(num_raw, bool), gist_slot=zeros, position=raw, memory_position=zeros,
        memory_slot=np.full(num_raw, -1, np.int32), window_start=zeros,
        span_start=np.full(num_raw, -1, np.int32))


@functools.lru_cache(maxsize=256)
def cached_layout(num_raw: int, cfg: CompressionConfig, ratios: tuple[int, ...] | None = None,
                  slots: int | None = None) -> GistLayout:
    """``build_layout`` memoised: a training run meets few distinct layouts, once each."""
    return build_layout(num_raw, cfg, ratios, slots)


def sample_ratios(cfg: CompressionConfig, num_segments: int,
                  rng: np.random.Generator) -> tuple[tuple[int, ...], int]:
    """Per-segment ratios and gist slots for one batch, drawn on the host.

    ``per_instance`` draws one ratio for the whole batch (the layout, hence the compiled
    shape, is shared by its sequences); ``per_segment`` draws one per segment and pads every
    segment to L / min(ratios) slots, so its shape never changes.
    """
    if cfg.ratio_sampling == "per_segment":
        ratios = tuple(int(r) for r in rng.choice(cfg.ratios, size=num_segments))
        return ratios, cfg.max_gists_per_segment
    r = cfg.ratios[0] if cfg.ratio_sampling == "fixed" else int(rng.choice(cfg.ratios))
    return (r,) * num_segments, cfg.segment_length // r
