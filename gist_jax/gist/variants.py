"""The built-in compression variants, each one registered unit (``config.Variant``): Fine-KV /
Coarse-KV (``ChunkedKV``), UniGist, Coarse-Rec and the full-attention baseline.

Every caller that used to branch on ``comp.memory`` / ``comp.windowed`` to pick one of these
asks ``variant_of(comp)`` instead: config validation, the forward (``forward.compressed_logits``,
the dense reference in ``kv_parallel``), the FLOPs model (``flops.visible_attention_pairs`` and
``attention_pairs``), the memory planner's kernel (``plan.layer_attention_kernel``), the
context-parallel check and compressed decoding (``inference/decode.py``, through the variant's
``decode`` policy name). A new variant is one subclass (usually of a class here) and one
``register_variant`` call; its ``memory`` value then validates as ``compression.memory``.
``tests/test_variants.py`` registers a toy variant that way and trains, counts, plans and is
refused decoding through the real entry points. ``gist/__init__.py`` imports this module, so
the built-ins are registered before any config is validated.

The model stack is imported inside the methods: configs are validated against this table
while the modules those methods need are still loading.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gist_jax.errors import ConfigError
from gist_jax.gist.config import VARIANTS, CompressionConfig, PairCounts, Variant, register_variant
from gist_jax.model.causal import causal_pairs

if TYPE_CHECKING:
    import jax

    from gist_jax.gist.layout import GistLayout, LayoutShape
    from gist_jax.gist.specs import LayoutArrays
    from gist_jax.model.attention import AttentionSpec
    from gist_jax.model.config import ModelConfig
    from gist_jax.model.transformer import Params

__all__ = ["VARIANTS", "ChunkedKV", "CoarseRec", "FullAttention", "PairCounts", "UniGist", "Variant",
           "register_variant"]


def _local_counts(layout: GistLayout) -> tuple[int, np.ndarray]:
    """Pairs a live query has with the live tokens of its own segment up to itself, and the live
    tokens per segment."""
    shape = layout.shape
    alive_SxT = layout.alive.reshape(shape.num_segments, shape.segment_tokens).astype(np.int64)
    return int((alive_SxT * np.cumsum(alive_SxT, axis=1)).sum()), alive_SxT.sum(axis=1)


class FullAttention(Variant):
    """No gists: the plain decoder over the raw sequence (the baseline)."""

    name, memory, decode = "full", "none", "plain"

    def forward(self, cfg: ModelConfig, comp: CompressionConfig, shape: LayoutShape | None, params: Params,
                tokens_BxN: jax.Array, arrays: LayoutArrays, **kwargs: Any) -> Any:
        from gist_jax.model.attention import AttentionSpec
        from gist_jax.model.transformer import Decoder

        spec = AttentionSpec.causal(tokens_BxN.shape[0], tokens_BxN.shape[1])
        return Decoder(cfg).apply({"params": params}, tokens_BxN, spec, head=kwargs.get("head", True))

    def visible_pairs(self, layout: GistLayout, num_raw: int) -> PairCounts:
        return PairCounts(num_raw, num_raw, causal_pairs(num_raw))

    def computed_pairs(self, cfg: ModelConfig, comp: CompressionConfig, layout: GistLayout,
                       backend: str) -> tuple[str, int]:
        from gist_jax.model import causal

        impl = causal.resolve_impl(cfg.kernels.causal, backend, cfg.dtype, cfg.head_dim)
        return f"causal:{impl}", causal.computed_pairs(impl, layout.shape.length)

    def layer_kernel(self, cfg: ModelConfig, comp: CompressionConfig, backend: str, context: int = 1) -> str:
        from gist_jax.model.causal import resolve_impl

        return resolve_impl(cfg.kernels.causal, backend, cfg.dtype, cfg.head_dim)

    def check_context(self, comp: CompressionConfig, seq_len: int, context: int) -> None:
        raise ConfigError(f"mesh.context={context}: context parallelism moves only gist K/V and "
                          f"compression.memory={comp.memory!r} has no gists; use mesh.context=1")


class ChunkedKV(Variant):
    """Fine-KV / Coarse-KV: segments, each attending to its own tokens and every earlier
    segment's gist K/V, in one parallel pass (``forward.kv_parallel``)."""

    name, memory, decode = "kv", "kv", "segments"

    def selects(self, comp: CompressionConfig) -> bool:
        return comp.memory == "kv" and not comp.windowed

    def forward(self, cfg: ModelConfig, comp: CompressionConfig, shape: LayoutShape | None, params: Params,
                tokens_BxN: jax.Array, arrays: LayoutArrays, **kwargs: Any) -> Any:
        from gist_jax.gist.forward import kv_parallel

        assert shape is not None, f"compression.memory={comp.memory!r} needs the layout's shape"
        return kv_parallel(cfg, comp, shape, params, tokens_BxN, arrays, **kwargs)

    def reference_spec(self, arrays: LayoutArrays, comp: CompressionConfig, batch: int,
                       stop_gist_memory_gradient: bool = False) -> AttentionSpec:
        """Own segment causal, earlier segments' sinks and live gists (UniGist: the window);
        ``specs.parallel_spec``."""
        from gist_jax.gist.specs import parallel_spec

        return parallel_spec(arrays, comp, batch, stop_gist_memory_gradient)

    def visible_pairs(self, layout: GistLayout, num_raw: int) -> PairCounts:
        """A live query sees the live tokens of its own segment up to itself, plus every memory
        key ((live gist) | sink) of earlier segments (``specs.parallel_spec``)."""
        local_pairs, live_S = _local_counts(layout)
        memory_key_T = (layout.is_gist & layout.alive) | layout.is_sink
        keys_S = np.bincount(layout.segment[memory_key_T], minlength=layout.shape.num_segments)
        earlier_keys_S = np.cumsum(keys_S) - keys_S  # memory keys of segments < i
        return PairCounts(int(live_S.sum()), num_raw, local_pairs + int((live_S * earlier_keys_S).sum()))

    def computed_pairs(self, cfg: ModelConfig, comp: CompressionConfig, layout: GistLayout,
                       backend: str) -> tuple[str, int]:
        from gist_jax.gist.forward import GIST_KERNELS, resolve_gist_kernel

        shape = layout.shape
        impl = resolve_gist_kernel(cfg.kernels.gist, shape.whole_segments, cfg.dtype, backend,
                                   windowed=comp.windowed)
        if impl == "dense":
            return "dense", 2 * shape.length * shape.length  # a [T, T] block per key set
        name, pairs = GIST_KERNELS[impl].computed_pairs(layout, comp, backend, cfg.dtype, cfg.head_dim)
        return name, int(pairs)

    def layer_kernel(self, cfg: ModelConfig, comp: CompressionConfig, backend: str, context: int = 1) -> str:
        from gist_jax.gist.forward import resolve_gist_kernel

        impl = resolve_gist_kernel(cfg.kernels.gist, compute_dtype=cfg.dtype, backend=backend,
                                   windowed=comp.windowed, context=context)
        return "dense" if impl == "bank" and backend != "tpu" else impl  # Pallas interpret mode off TPU

    def check_gist_kernel(self, gist: str, comp: CompressionConfig, where: str) -> None:
        """The gist bank needs one position per key and every slot live."""
        if gist == "bank" and comp.positions != "aligned":
            raise ConfigError(
                f"{where}: the gist bank is exact only when every key has one position: set "
                f"compression.positions='aligned' (got {comp.positions!r}), or use the gist kernel 'decomposed' "
                "or 'flash', which handle both schemes")
        if gist == "bank" and comp.ratio_sampling == "per_segment":
            raise ConfigError(
                f"{where}: the gist bank needs every gist slot live (one ratio per step); "
                "compression.ratio_sampling='per_segment' leaves dead slots: use 'per_instance', or the "
                "gist kernel 'decomposed' or 'flash'")

    def check_context(self, comp: CompressionConfig, seq_len: int, context: int) -> None:
        segments, rest = divmod(seq_len, comp.segment_length)
        if rest or segments % context:
            raise ConfigError(f"mesh.context={context}: step.seq_len={seq_len} must be whole segments "
                              f"(compression.segment_length={comp.segment_length}) whose count divides over the "
                              f"{context} blocks; use a multiple of {context * comp.segment_length}")


class UniGist(ChunkedKV):
    """UniGist (Deng et al., NeurIPS 2025): Fine-KV's layout without chunks; every token sees the
    sinks, every earlier gist and the raw tokens of the last ``window`` raw tokens' gist units
    (``specs.windowed_mask``, ``window.py``, ``context_window.py``, ``inference/window.py``)."""

    name, memory, decode = "unigist", "kv", "window"

    def selects(self, comp: CompressionConfig) -> bool:
        return comp.memory == "kv" and comp.windowed

    def validate(self, comp: CompressionConfig) -> None:
        need = {"granularity": "fine", "positions": "aligned"}
        for key, value in need.items():
            if getattr(comp, key) != value:
                raise ConfigError(
                    f"compression.window={comp.window} (UniGist) needs compression.{key}={value!r}, got "
                    f"{getattr(comp, key)!r}; set it, or compression.window=0 for chunked compression")
        if comp.ratio_sampling == "per_segment":
            raise ConfigError(
                f"compression.window={comp.window} (UniGist) has no chunks to draw a ratio for: use "
                "compression.ratio_sampling='per_instance' or 'fixed'")
        bad = [r for r in comp.ratios if comp.window % r]
        if bad:
            raise ConfigError(
                f"compression.window={comp.window} is not a multiple of ratio(s) {bad}: the window is a "
                "whole number of gist units; use a multiple of every ratio, e.g. the segment length")

    def check_gist_kernel(self, gist: str, comp: CompressionConfig, where: str) -> None:
        """The window has one structured kernel, which ``decomposed`` names."""
        if gist != "decomposed":
            raise ConfigError(
                f"{where}: the gist kernel {gist!r} has no windowed (UniGist) form; use "
                "'decomposed' (or 'auto'), exact for compression.window > 0, or 'dense'")

    def visible_pairs(self, layout: GistLayout, num_raw: int) -> PairCounts:
        from gist_jax.gist.window_pairs import windowed_visible_pairs

        _, live_S = _local_counts(layout)
        return PairCounts(int(live_S.sum()), num_raw, windowed_visible_pairs(layout))

    def check_context(self, comp: CompressionConfig, seq_len: int, context: int) -> None:
        """Whole-segment blocks, and a window that reaches no further back than the previous
        block (its halo, ``context_window.py``)."""
        from gist_jax.gist.context_window import context_window_plan
        from gist_jax.gist.layout import build_layout

        super().check_context(comp, seq_len, context)
        shape = build_layout(seq_len, comp).shape
        halo, block = context_window_plan(shape, comp.window, context).halo, shape.length // context
        if halo > block:
            raise ConfigError(f"mesh.context={context}: UniGist's window (compression.window={comp.window}) reaches "
                              f"{halo} layout tokens back, past the previous block ({block} tokens); use fewer "
                              "context blocks, a longer step.seq_len or a shorter window")


class CoarseRec(Variant):
    """Coarse-Rec: segments one after another, the last layer's gist states fed back as the next
    segment's memory inputs (``gist/recurrent.py``)."""

    name, memory, decode = "recurrent", "recurrent", "segments"

    def forward(self, cfg: ModelConfig, comp: CompressionConfig, shape: LayoutShape | None, params: Params,
                tokens_BxN: jax.Array, arrays: LayoutArrays, **kwargs: Any) -> Any:
        from gist_jax.gist.recurrent import recurrent_scan

        assert shape is not None, f"compression.memory={comp.memory!r} needs the layout's shape"
        return recurrent_scan(cfg, comp, shape, params, tokens_BxN, arrays, **kwargs)

    def visible_pairs(self, layout: GistLayout, num_raw: int) -> PairCounts:
        """Step i runs ``[sinks | memory buffer | segment]`` causally with only the P_i valid
        prefix entries (sinks if i > 0, live gists of segments < i), so it adds P_i re-encoded
        tokens with P_i (P_i + 1) / 2 prefix pairs."""
        from gist_jax.gist.specs import memory_buffer_arrays

        local_pairs, live_S = _local_counts(layout)
        buffer, s, n = memory_buffer_arrays(layout), layout.shape.num_sinks, layout.shape.num_segments
        live_sinks = int(buffer["live"][:s].sum())
        gists_S = np.bincount(buffer["segment"][s:][buffer["live"][s:]], minlength=n)
        prefix_S = np.cumsum(gists_S) - gists_S + live_sinks * (np.arange(n) > 0)
        pairs = local_pairs + int((live_S * prefix_S).sum()) + int((prefix_S * (prefix_S + 1) // 2).sum())
        return PairCounts(int(live_S.sum() + prefix_S.sum()), num_raw, pairs)

    def computed_pairs(self, cfg: ModelConfig, comp: CompressionConfig, layout: GistLayout,
                       backend: str) -> tuple[str, int]:
        from gist_jax.model import causal

        shape = layout.shape
        impl = causal.resolve_impl(cfg.kernels.causal, backend, cfg.dtype, cfg.head_dim, has_padding=True)
        s = shape.num_segments
        return f"recurrent:{impl}", s * causal.computed_pairs(impl, shape.num_sinks + s * shape.slots
                                                              + shape.segment_tokens)

    def check_context(self, comp: CompressionConfig, seq_len: int, context: int) -> None:
        raise ConfigError(f"mesh.context={context}: Coarse-Rec (compression.memory='recurrent') runs its segments "
                          "one after another, so its sequence cannot be split; use mesh.context=1 (its step "
                          "memory is linear in the context) or compression.memory='kv'")


for _variant in (ChunkedKV(), UniGist(), CoarseRec(), FullAttention()):
    register_variant(_variant)
