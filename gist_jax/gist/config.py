"""The compression config: one schema for every variant, validated before anything compiles.

Defaults follow ``docs/method.md``: KV memory, fine granularity (Fine-KV), 4 sinks,
compressed positions, one shared gist embedding, no separate gist projections, full-parameter
training. Every decision the paper leaves open is a field here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gist_jax.errors import ConfigError
from gist_jax.model.config import check_int

MEMORY = ("kv", "recurrent", "none")
GRANULARITY = ("coarse", "fine")
RATIO_SAMPLING = ("fixed", "per_instance", "per_segment")
POSITIONS = ("compressed", "aligned")
GIST_EMBEDDING = ("shared", "per_slot")
TRAINABLE = ("all", "gist_only")
ATTENTION_IMPL = ("dense", "decomposed", "flash", "split", "bank", "auto")


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
    """How a long sequence is cut into segments and summarised into gists.

    memory:          ``kv`` (keep gist KV per layer), ``recurrent`` (feed last-layer gist
                     states back as inputs), ``none`` (full-attention baseline).
    granularity:     ``coarse`` (gists after the segment) or ``fine`` (one gist every r tokens).
    segment_length:  L raw tokens per segment.
    ratios:          compression ratios r; t = L / r gists per segment. One ratio = fixed.
    ratio_sampling:  ``fixed``; ``per_instance`` (paper: one ratio per sequence; sequences of
                     one batch share it so shapes stay static, one compilation per ratio);
                     ``per_segment`` (Activation Beacon: every segment draws its own ratio;
                     segments are padded to L / min(ratios) gist slots, one compilation).
    num_sinks:       first s raw tokens visible to every later token.
    positions:       ``compressed`` (memory at 0..m-1, segment after it) or ``aligned``
                     (original indices; a gist takes the next raw token's index).
    gist_embedding:  ``shared`` (one learned vector) or ``per_slot`` (one per gist slot).
    gist_projections: separate gist q/k/v projections per layer (Beacon).
    trainable:       ``all`` or ``gist_only`` (gist embedding and projections only).
    bptt_segments:   recurrent only: gradients flow through the memory of at most this many
                     earlier segments (AutoCompressors: 2); 0 = unlimited.
    pad_to_segments: accept sequence lengths that are not a whole number of segments by
                     padding the last segment (padding carries no loss).
    window:          0: chunked compression (the paper's three architectures: a token sees its
                     own segment and earlier segments' memory). W > 0: UniGist (Deng et al.,
                     NeurIPS 2025): no chunks; every token, raw or gist, sees the sinks, every
                     earlier gist, and the raw tokens of its own gist unit (r raw tokens and
                     their gist) and of the W / r units before it. Needs memory='kv',
                     granularity='fine', positions='aligned' and one ratio per sequence;
                     segments remain only as the unit of layout, evaluation and prefill.
    attention_impl:  KV variants' parallel (training) pass, all with the same values and
                     gradients (docs/performance.md): ``dense`` (reference masks, a T x 2T
                     score matrix per head); ``decomposed`` (segment-local causal attention +
                     gist-memory attention merged by log-sum-exp, no T x T matrix,
                     ``gist/structured.py``); ``flash`` (memory laid in front of each segment,
                     one causal ``jax.nn.dot_product_attention`` call: cuDNN on NVIDIA GPUs,
                     ``gist/flash.py``); ``split`` (segment-local causal call + memory call
                     with key lengths, merged by log-sum-exp, custom backward: exactly the
                     admitted pairs on cuDNN, ``gist/split.py``); ``bank`` (gists-first
                     permutation, one block-sparse Splash kernel on TPU; aligned positions, one
                     ratio per step, ``gist/bank.py``); ``auto`` (on GPU in bf16/fp16 ``split``
                     when its cuDNN self-test passes, else ``flash``; elsewhere ``decomposed``).
    """

    memory: str = "kv"
    granularity: str = "fine"
    segment_length: int = 2048
    ratios: tuple[int, ...] = (4, 8, 16, 32)
    ratio_sampling: str = "per_instance"
    num_sinks: int = 4
    positions: str = "compressed"
    gist_embedding: str = "shared"
    gist_projections: bool = False
    trainable: str = "all"
    bptt_segments: int = 0
    pad_to_segments: bool = False
    window: int = 0
    attention_impl: str = "dense"

    def __post_init__(self) -> None:
        if isinstance(self.ratios, int):
            object.__setattr__(self, "ratios", (self.ratios,))
        for r in self.ratios:  # before int(): int(2.5) would silently train ratio 2
            check_int("compression.ratios", r, 1, fix="give whole compression ratios, e.g. (4, 8)")
        object.__setattr__(self, "ratios", tuple(int(r) for r in self.ratios))
        validate(self)

    @property
    def enabled(self) -> bool:
        return self.memory != "none"

    @property
    def windowed(self) -> bool:
        """UniGist: a sliding local window instead of chunks (``window > 0``)."""
        return self.window > 0

    @property
    def max_gists_per_segment(self) -> int:
        """Gist slots per segment: L / min(r) (per_segment pads every segment to this)."""
        return self.segment_length // min(self.ratios)

    def replace(self, **changes: Any) -> CompressionConfig:
        return dataclasses.replace(self, **changes)

    def full_attention(self) -> CompressionConfig:
        """This config's full-attention baseline (``memory='none'``), with the settings that
        only apply to compression reset, so it is valid whatever this config trains."""
        return self.replace(memory="none", trainable="all", bptt_segments=0, window=0,
                            attention_impl="dense")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def num_segments(self, seq_len: int) -> int:
        """Segments for ``seq_len`` raw tokens; fails unless whole (or padding is on)."""
        segments, rest = divmod(seq_len, self.segment_length)
        if rest and not self.pad_to_segments:
            raise ConfigError(
                f"sequence length {seq_len} is not a whole number of segments of "
                f"compression.segment_length={self.segment_length}; use a multiple of it or set "
                "compression.pad_to_segments=True")
        return segments + (1 if rest else 0)


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"compression.{key}={value!r} is not one of {allowed}")


def validate(c: CompressionConfig) -> None:
    _one_of("memory", c.memory, MEMORY)
    _one_of("granularity", c.granularity, GRANULARITY)
    _one_of("ratio_sampling", c.ratio_sampling, RATIO_SAMPLING)
    _one_of("positions", c.positions, POSITIONS)
    _one_of("gist_embedding", c.gist_embedding, GIST_EMBEDDING)
    _one_of("trainable", c.trainable, TRAINABLE)
    _one_of("attention_impl", c.attention_impl, ATTENTION_IMPL)
    if c.attention_impl != "dense" and c.memory != "kv":
        raise ConfigError(
            f"compression.attention_impl={c.attention_impl!r} applies to memory='kv' (Fine-KV, "
            f"Coarse-KV); memory={c.memory!r} has no gist-memory attention to restructure "
            "(recurrent runs a segment scan, none is plain causal attention): set "
            "attention_impl='dense'")
    if c.attention_impl == "bank" and c.positions != "aligned":
        raise ConfigError(
            "compression.attention_impl='bank' is exact only when every key has one position: "
            f"set compression.positions='aligned' (got {c.positions!r}), or use "
            "attention_impl='decomposed'/'flash', which handle both schemes")
    if c.attention_impl == "bank" and c.ratio_sampling == "per_segment":
        raise ConfigError(
            "compression.attention_impl='bank' needs every gist slot live (one ratio per step); "
            "compression.ratio_sampling='per_segment' leaves dead slots: use 'per_instance' or "
            "attention_impl='decomposed'/'flash'")
    if c.memory == "recurrent" and c.granularity == "fine":
        raise ConfigError(
            "compression.granularity='fine' with compression.memory='recurrent' is not supported "
            "(it needs a forward pass per gist); use granularity='coarse' (Coarse-Rec) or "
            "memory='kv' (Fine-KV)")
    check_int("compression.segment_length", c.segment_length, 1, fix="use the raw tokens per segment, e.g. 2048")
    check_int("compression.num_sinks", c.num_sinks, 0)
    check_int("compression.bptt_segments", c.bptt_segments, 0, fix="use 0 for unlimited")
    if not c.ratios or min(c.ratios) < 1:
        raise ConfigError(f"compression.ratios={c.ratios} must be non-empty and >= 1")
    bad = [r for r in c.ratios if c.segment_length % r]
    if bad:
        raise ConfigError(
            f"compression.segment_length={c.segment_length} is not a multiple of ratio(s) {bad} in "
            "compression.ratios; choose ratios that divide the segment length")
    if c.ratio_sampling == "fixed" and len(c.ratios) != 1:
        raise ConfigError(f"compression.ratio_sampling='fixed' needs exactly one ratio, got "
                          f"compression.ratios={c.ratios}; pass one ratio or sample them")
    if not 0 <= c.num_sinks < c.segment_length:
        raise ConfigError(f"compression.num_sinks={c.num_sinks} must be >= 0 and smaller than "
                          f"compression.segment_length={c.segment_length}")
    if c.bptt_segments and c.memory != "recurrent":
        raise ConfigError("compression.bptt_segments only applies to memory='recurrent'; set it to 0")
    check_int("compression.window", c.window, 0, fix="use 0 (chunked) or the window in raw tokens, e.g. 128")
    if c.window:
        _validate_window(c)
    if c.trainable == "gist_only" and c.memory == "none":
        raise ConfigError("compression.trainable='gist_only' with memory='none' trains nothing; "
                          "use trainable='all'")


def _validate_window(c: CompressionConfig) -> None:
    """UniGist's constraints: each names the key that breaks it and the fix."""
    need = {"memory": "kv", "granularity": "fine", "positions": "aligned"}
    for key, value in need.items():
        if getattr(c, key) != value:
            raise ConfigError(
                f"compression.window={c.window} (UniGist) needs compression.{key}={value!r}, got "
                f"{getattr(c, key)!r}; set it, or compression.window=0 for chunked compression")
    if c.ratio_sampling == "per_segment":
        raise ConfigError(
            f"compression.window={c.window} (UniGist) has no chunks to draw a ratio for: use "
            "compression.ratio_sampling='per_instance' or 'fixed'")
    bad = [r for r in c.ratios if c.window % r]
    if bad:
        raise ConfigError(
            f"compression.window={c.window} is not a multiple of ratio(s) {bad}: the window is a "
            "whole number of gist units; use a multiple of every ratio, e.g. the segment length")
    if c.attention_impl not in ("dense", "decomposed", "auto"):
        raise ConfigError(
            f"compression.attention_impl={c.attention_impl!r} has no windowed (UniGist) kernel; "
            "use 'decomposed' (or 'auto'), exact for compression.window > 0, or 'dense'")
