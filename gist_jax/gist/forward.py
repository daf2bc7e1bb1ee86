"""The training paths: every KV-variant segment in one pass, and Coarse-Rec as a scan
(``recurrent.py``).

Both return logits in layout order, ``[B, T, V]`` with ``T = layout.shape.length``; the
sequential reference (``sequential.py``) returns the same array, which is what the tests
compare. With ``head=False`` (``compressed_hidden``) they return the final-norm hidden states
``[B, T, E]`` instead, so losses apply the LM head chunk-wise to the raw rows only
(``gist_jax/model/loss.py``). ``raw_embeds_BxNxE`` feeds raw-token embeddings instead of token
ids (gradient probes); gists always use the gist embedding.
"""

from __future__ import annotations

import warnings
from typing import Any, cast, overload

import jax

from gist_jax.gist.bank import GistBankKV
from gist_jax.gist.config import CompressionConfig, check_gist_kernel, variant_of
from gist_jax.gist.context_parallel import ContextParallelKV, splits
from gist_jax.gist.context_window import ContextParallelWindowedKV
from gist_jax.gist.flash import PrefixCausalKV
from gist_jax.gist.layout import LayoutShape
from gist_jax.gist.recurrent import LayerKV
from gist_jax.gist.specs import (
    LayoutArrays,
    gather_raw,
    pad_raw,
    physical_segments,
    raw_embed_inputs,
    structured_spec,
)
from gist_jax.gist.split import SplitKV
from gist_jax.gist.structured import DecomposedKV
from gist_jax.gist.window import WindowedKV
from gist_jax.model.attention import AttentionStructure
from gist_jax.model.config import ModelConfig
from gist_jax.model.kernels import is_half
from gist_jax.model.sharding import context_size
from gist_jax.model.transformer import Decoder, Params, collect_kv

_WARNED: set[str] = set()  # fallbacks already reported in this process (one warning each)


def resolve_gist_kernel(impl: str, whole_segments: bool = True,
                           compute_dtype: str = "bfloat16", backend: str | None = None,
                           windowed: bool = False, context: int = 1) -> str:
    """The implementation a KV pass runs, decided at trace time from the backend (default:
    this process's; the memory planner passes the target's): ``auto`` is ``flash`` on GPU
    with a bf16/fp16 compute dtype (where cuDNN runs it): ``split`` when this process is on
    that GPU and the cuDNN self-test passes (``cudnn_stats.ready``), else ``flash``; and
    ``decomposed`` otherwise. ``split`` on this process's GPU without a passing self-test
    falls back to ``flash`` with one warning (off GPU it runs its XLA backend; exact for every
    layout). ``bank`` is ``flash`` on GPU (no block-sparse GPU kernel in JAX). ``flash`` and
    ``bank`` need whole segments (a padded segment has dead raw tokens before live gists); a
    layout with padding (``LayoutShape.whole_segments`` False) runs ``decomposed``, which is
    exact for every layout. A windowed (UniGist) config has one structured path,
    ``windowed`` (``window.py``), whatever the name; ``dense`` runs the reference. A layout split
    over ``context`` > 1 blocks of whole segments runs, on every block, the decomposed kernel
    (``context_parallel.py``) or the windowed one (``context_window.py``).

    Every caller that needs to know what runs (the forward, FLOPs, the memory plan, the
    benchmarks) asks this one function; ``GIST_KERNELS`` maps its answer to the kernel class."""
    from gist_jax.gist import cudnn_stats

    if impl == "dense":
        return "dense"
    if windowed:
        return "windowed"
    if context > 1:
        return "decomposed"

    on_gpu = (backend or jax.default_backend()) == "gpu"
    if impl == "auto":
        impl = "flash" if on_gpu and is_half(compute_dtype) else "decomposed"
        if impl == "flash" and cudnn_stats.ready(backend):
            impl = "split"
    if impl == "split" and cudnn_stats.ready(backend) is False:
        if "split" not in _WARNED:
            _WARNED.add("split")
            warnings.warn("the gist kernel 'split' needs cuDNN attention with explicit "
                          f"statistics ({cudnn_stats.unavailable_reason()}); running 'flash' instead",
                          RuntimeWarning, stacklevel=2)
        impl = "flash"
    if impl == "bank" and on_gpu:
        impl = "flash"
    if impl in ("flash", "bank") and not whole_segments:
        impl = "decomposed"
    return impl


# The gist-structure kernels by the name ``resolve_gist_kernel`` returns (the names
# ``model.attention`` may give, ``kernels.GIST_KERNEL_NAMES``, plus UniGist's ``windowed``). Each class builds
# its structure (``for_layout(arrays, shape, comp)``, what ``AttentionSpec.structure`` holds) and
# counts what it computes (``computed_pairs(layout, comp, backend, dtype, head_dim)``, which
# ``flops.attention_pairs`` asks). A new kernel is one class and one line here.
# Values are classes with those two classmethods (typed Any: the classes share no base).
GIST_KERNELS: dict[str, Any] = {"decomposed": DecomposedKV, "flash": PrefixCausalKV, "split": SplitKV,
                                 "bank": GistBankKV, "windowed": WindowedKV}


def kv_parallel(cfg: ModelConfig, comp: CompressionConfig, shape: LayoutShape, params: Params,
                tokens_BxN: jax.Array, arrays: LayoutArrays, *,
                raw_embeds_BxNxE: jax.Array | None = None,
                stop_gist_memory_gradient: bool = False, kv_layer: int | None = None,
                head: bool = True) -> jax.Array | tuple[jax.Array, LayerKV]:
    """Fine-KV / Coarse-KV / UniGist in one pass: the dense reference masks, or a structured path
    chosen by the gist part of ``model.attention`` (``resolve_gist_kernel``; decomposed
    ``structured.py`` or, windowed, ``window.py``, flash ``flash.py``, split ``split.py``, bank
    ``bank.py``): equal values and gradients, no T x T score matrix.

    With ``kv_layer`` set, also returns that layer's un-rotated (k, v) ``[B, T, K, H]`` for
    every layout token (the autoencoding objective reads the gists' entries)."""
    tokens_BxT = gather_raw(pad_raw(tokens_BxN, shape), arrays["raw_index"])
    # Whole segments is the layout's word, not the token array's width: a caller may pass
    # tokens already padded to whole segments, and that padding is still dead.
    # The sequence split over the mesh's context axis: only the gist memory is gathered
    # (context_parallel.py, context_window.py). A layout that does not cut into whole-segment
    # blocks (an evaluation length) runs unsplit and XLA partitions it.
    context = context_size() if context_size() > 1 and splits(shape, context_size()) else 1
    check_gist_kernel(cfg.attention, comp)
    impl = resolve_gist_kernel(cfg.kernels.gist, shape.whole_segments, cfg.dtype,
                                  windowed=comp.windowed, context=context)
    if impl == "bank" and stop_gist_memory_gradient:
        impl = "decomposed"  # the bank has one view of each gist key; this needs two
    if impl == "dense":
        spec = variant_of(comp).reference_spec(arrays, comp, tokens_BxN.shape[0], stop_gist_memory_gradient)
    else:
        kernel = GIST_KERNELS[impl].for_layout(arrays, shape, comp)
        structure: AttentionStructure = kernel
        if context > 1 and impl == "windowed":
            structure = ContextParallelWindowedKV(kernel)
        elif context > 1:
            structure = ContextParallelKV(kernel, physical_segments(arrays, shape))
        spec = structured_spec(arrays, comp, tokens_BxN.shape[0], structure, stop_gist_memory_gradient)
    kwargs = raw_embed_inputs(raw_embeds_BxNxE, shape, arrays["raw_index"])
    if kv_layer is None:
        return cast(jax.Array, Decoder(cfg).apply({"params": params}, tokens_BxT, spec, head=head, **kwargs))
    logits, state = Decoder(cfg).apply({"params": params}, tokens_BxT, spec, head=head,
                                       mutable=["intermediates"], **kwargs)
    k_LxBxTxKxH, v_LxBxTxKxH = collect_kv(state["intermediates"], cfg)
    return logits, (k_LxBxTxKxH[kv_layer], v_LxBxTxKxH[kv_layer])


@overload
def compressed_logits(cfg: ModelConfig, comp: CompressionConfig, shape: LayoutShape | None,
                      params: Params, tokens_BxN: jax.Array, arrays: LayoutArrays, *,
                      kv_layer: None = None, **kwargs: Any) -> jax.Array: ...


@overload
def compressed_logits(cfg: ModelConfig, comp: CompressionConfig, shape: LayoutShape | None,
                      params: Params, tokens_BxN: jax.Array, arrays: LayoutArrays, *,
                      kv_layer: int, **kwargs: Any) -> tuple[jax.Array, LayerKV]: ...


def compressed_logits(cfg: ModelConfig, comp: CompressionConfig, shape: LayoutShape | None,
                      params: Params, tokens_BxN: jax.Array, arrays: LayoutArrays, *,
                      kv_layer: int | None = None, **kwargs: Any) -> jax.Array | tuple[jax.Array, LayerKV]:
    """Training forward for a compression config, the registered variant's
    (``variants.variant_of``): KV variants in one pass, recurrent as a scan, and ``none`` the
    plain model itself (its layout is the raw sequence). Returns logits, or
    ``(logits, (k, v))`` of layer ``kv_layer`` when that keyword is given (not for ``none``);
    ``head=False`` puts final-norm hidden states in place of the logits. ``shape`` may be None
    for ``none`` (no layout)."""
    return variant_of(comp).forward(cfg, comp, shape, params, tokens_BxN, arrays, kv_layer=kv_layer, **kwargs)


@overload
def compressed_hidden(cfg: ModelConfig, comp: CompressionConfig, shape: LayoutShape | None,
                      params: Params, tokens_BxN: jax.Array, arrays: LayoutArrays, *,
                      kv_layer: None = None, **kwargs: Any) -> jax.Array: ...


@overload
def compressed_hidden(cfg: ModelConfig, comp: CompressionConfig, shape: LayoutShape | None,
                      params: Params, tokens_BxN: jax.Array, arrays: LayoutArrays, *,
                      kv_layer: int, **kwargs: Any) -> tuple[jax.Array, LayerKV]: ...


def compressed_hidden(cfg: ModelConfig, comp: CompressionConfig, shape: LayoutShape | None,
                      params: Params, tokens_BxN: jax.Array, arrays: LayoutArrays, *,
                      kv_layer: int | None = None, **kwargs: Any) -> jax.Array | tuple[jax.Array, LayerKV]:
    """``compressed_logits`` without the LM head: final-norm hidden states ``[B, T, E]`` in
    layout order (and ``(k, v)`` with ``kv_layer``). What every loss consumes: the head is
    applied by ``gist_jax.model.loss`` to the labelled rows only, chunk by chunk."""
    return compressed_logits(cfg, comp, shape, params, tokens_BxN, arrays, head=False, kv_layer=kv_layer, **kwargs)
