"""The compression config: one schema for every variant, validated before anything compiles.

Defaults follow ``docs/method.md``: KV memory, fine granularity (Fine-KV), 4 sinks,
compressed positions, one shared gist embedding, no separate gist projections, full-parameter
training. Every decision the paper leaves open is a field here.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

from gist_jax.errors import ConfigError
from gist_jax.model.config import check_int

if TYPE_CHECKING:
    import jax

    from gist_jax.model.config import ModelConfig
    from gist_jax.model.transformer import Params

# The interface below names layout types as Any: gist/layout.py and gist/specs.py import this
# module, so importing theirs here (even for type checking) would be a cycle. The built-ins in
# gist/variants.py annotate them exactly.
GistLayout: TypeAlias = Any
LayoutShape: TypeAlias = Any
LayoutArrays: TypeAlias = Any
AttentionSpec: TypeAlias = Any

GRANULARITY = ("coarse", "fine")
RATIO_SAMPLING = ("fixed", "per_instance", "per_segment")
POSITIONS = ("compressed", "aligned")
GIST_EMBEDDING = ("shared", "per_slot")
TRAINABLE = ("all", "gist_only")


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

    The kernel of the KV variants' parallel pass is the gist part of ``model.attention``
    (``model/kernels.py``); ``check_gist_kernel`` refuses the kernels a config cannot run exactly.
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
        return self.replace(memory="none", trainable="all", bptt_segments=0, window=0)

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
    _one_of("memory", c.memory, memory_values())
    _one_of("granularity", c.granularity, GRANULARITY)
    _one_of("ratio_sampling", c.ratio_sampling, RATIO_SAMPLING)
    _one_of("positions", c.positions, POSITIONS)
    _one_of("gist_embedding", c.gist_embedding, GIST_EMBEDDING)
    _one_of("trainable", c.trainable, TRAINABLE)
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
    variant_of(c).validate(c)
    if c.trainable == "gist_only" and c.memory == "none":
        raise ConfigError("compression.trainable='gist_only' with memory='none' trains nothing; "
                          "use trainable='all'")


def check_gist_kernel(attention: str, c: CompressionConfig, key: str = "model.attention") -> None:
    """The gist kernel ``attention`` names must be exact for this layout; the variant says
    (``Variant.check_gist_kernel``). ``auto`` and ``dense`` run everywhere."""
    from gist_jax.model.kernels import parse_attention  # the one parser of the knob

    gist = parse_attention(attention, key).gist
    if gist not in ("auto", "dense"):
        variant_of(c).check_gist_kernel(gist, c, f"{key}={attention!r}")


# -- compression variants: the interface and the one table ------------------------------------------
# The table lives here, below every module that asks it, so a config can be validated against the
# registered variants; the built-ins are defined and registered in ``gist/variants.py``, which
# ``gist/__init__.py`` imports before any module of this package runs.


class PairCounts(NamedTuple):
    """What one sequence's forward pass works on (the FLOPs model's input)."""

    tokens: int  # tokens through every layer (raw + live gists [+ re-encoded memory])
    logit_tokens: int  # tokens that get LM-head logits (raw tokens)
    pairs: int  # visible (query, key) attention pairs per layer


class Variant:
    """One compression architecture, registered once in ``VARIANTS``: its config rules, training
    forward, dense reference masks, cost model, memory-planner kernel, context-parallel support
    and decode policy. ``memory`` is the ``compression.memory`` value it claims; ``selects`` tells
    it apart from variants sharing that value (UniGist: ``window > 0``). ``decode`` names the
    policy compressed decoding runs (``inference/decode.py``'s ``DECODE_POLICIES``: a cache
    policy is code of the inference layer), or None: decoding is refused in one line."""

    name = "variant"
    memory = ""
    decode: str | None = None

    def selects(self, comp: CompressionConfig) -> bool:
        return comp.memory == self.memory

    def validate(self, comp: CompressionConfig) -> None:
        """Start-up rules only this variant has (``ConfigError`` naming the key and the fix).
        A window is UniGist's alone."""
        if comp.window:
            raise ConfigError(f"compression.window={comp.window} (UniGist) needs compression.memory='kv', got "
                              f"{comp.memory!r}; set it, or compression.window=0 for chunked compression")

    def forward(self, cfg: ModelConfig, comp: CompressionConfig, shape: LayoutShape | None, params: Params,
                tokens_BxN: jax.Array, arrays: LayoutArrays, **kwargs: Any) -> Any:
        """Logits (or ``(logits, (k, v))`` with ``kv_layer``) of the training pass."""
        raise NotImplementedError

    def reference_spec(self, arrays: LayoutArrays, comp: CompressionConfig, batch: int,
                       stop_gist_memory_gradient: bool = False) -> AttentionSpec:
        """The dense reference masks of the one-pass forward (what every kernel must equal)."""
        raise NotImplementedError

    def visible_pairs(self, layout: GistLayout, num_raw: int) -> PairCounts:
        """Tokens and the (query, key) pairs its mask allows, counted from the layout."""
        raise NotImplementedError

    def computed_pairs(self, cfg: ModelConfig, comp: CompressionConfig, layout: GistLayout,
                       backend: str) -> tuple[str, int]:
        """(what runs, score entries it computes per layer and head) on ``backend``."""
        raise NotImplementedError

    def layer_kernel(self, cfg: ModelConfig, comp: CompressionConfig, backend: str, context: int = 1) -> str:
        """The attention implementation the decoder layers run (the memory planner's unit)."""
        return "dense"

    def check_gist_kernel(self, gist: str, comp: CompressionConfig, where: str) -> None:
        """Refuse a gist kernel (``model.attention``'s gist part, ``where`` the setting) that cannot
        run this layout exactly. A variant without a gist-structure pass ignores the part
        (Coarse-Rec: a segment scan of causal passes; full attention: the causal kernel)."""

    def check_context(self, comp: CompressionConfig, seq_len: int, context: int) -> None:
        """Whether ``mesh.context`` > 1 blocks can run it (``context_parallel.check_context_parallel``)."""
        raise ConfigError(f"mesh.context={context}: compression.memory={comp.memory!r} ({self.name}) has no "
                          "context-parallel forward; use mesh.context=1")


VARIANTS: dict[str, Variant] = {}  # name -> variant, filled by gist/variants.py and register_variant


def register_variant(variant: Variant) -> None:
    """Adds a variant; its ``memory`` value becomes a valid ``compression.memory``."""
    if variant.name in VARIANTS:
        raise ValueError(f"a compression variant named {variant.name!r} is already registered")
    VARIANTS[variant.name] = variant


def memory_values() -> tuple[str, ...]:
    """The ``compression.memory`` values some registered variant claims."""
    return tuple(dict.fromkeys(v.memory for v in VARIANTS.values()))


def variant_of(comp: CompressionConfig) -> Variant:
    """The one registered variant that runs ``comp``."""
    chosen = [v for v in VARIANTS.values() if v.selects(comp)]
    if len(chosen) != 1:
        raise ConfigError(f"compression.memory={comp.memory!r}, window={comp.window}: "
                          f"{'no' if not chosen else 'several'} registered variant(s) select it "
                          f"({[v.name for v in chosen] or sorted(VARIANTS)})")
    return chosen[0]
