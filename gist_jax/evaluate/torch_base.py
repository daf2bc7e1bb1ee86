"""The checkpoint's base model in torch, and the per-token NLLs the kvpress suite compares.

Why a torch copy: kvpress compresses the KV cache of a transformers model through forward hooks
on its attention layers; it cannot act on our JAX forward. The copy is the checkpoint's non-gist
weights written by our own exporter (``gist_jax.hf.export.export_params``, the weights a plain
``from_pretrained`` loads as the stock Llama / Qwen2 model) and read back in float32, so the
torch ``full`` and ``local`` rows equal the JAX perplexity suite's on the same windows (tested),
and every press row is scored on exactly the targets our compressors are scored on.

Targets (``train.evaluation.scored_positions``): position j predicts token j + 1, counted for
j >= L (segment length). Segment k (positions kL .. kL + L - 1) is scored:
  * ``full``: the whole window causally (one forward pass);
  * ``local``: the segment alone, positions restarting at 0 (``segments_alone_hidden``);
  * a press: the context (segments 0 .. k - 1) prefilled with the press active, which compresses
    the context's cache one-shot as kvpress's own pipeline does; then segment k fed on top of the
    compressed cache with its ORIGINAL position ids kL + i (the pipeline's ``generate_answer``
    passes ``position_ids = context_length + i`` too). The cache is shorter than kL, so
    transformers' ``cache_position`` (hence the causal mask) counts compressed entries, while
    RoPE uses the position ids: token i of the segment sees every kept context entry and tokens
    0 .. i of its own segment, at its true distance from them.

Imports torch: only the kvpress suite and its tests import this module, never the core.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from gist_jax import families

# Positions whose logits are computed at once: the head's [rows, vocab] logits stay small.
_HEAD_CHUNK = 256


def torch_base_model(ck: Any, attn_implementation: str = "sdpa") -> Any:
    """The checkpoint's base weights as a float32 transformers model of its family's class
    (``LlamaForCausalLM``..., the stock class: the gist leaves are exported as extra tensors that a
    plain model ignores). Exported to a temporary directory with our exporter, then loaded."""
    import logging

    import torch
    import transformers

    from gist_jax.hf.export import export_params

    model_class = getattr(transformers, families.family_for(ck.cfg.family).hf_class)
    with tempfile.TemporaryDirectory(prefix="kvpress_base_") as tmp:
        out = export_params(ck.cfg, ck.comp, ck.params, None, pathlib.Path(tmp) / "hf", dtype="float32")
        # The gist.* tensors are "unused weights" to the stock class: expected, not worth a warning.
        quiet = logging.getLogger("transformers.modeling_utils")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            model = model_class.from_pretrained(str(out), dtype=torch.float32,
                                                           attn_implementation=attn_implementation)
        finally:
            quiet.setLevel(level)
    return model.eval()


def _nll(model: Any, hidden_BxTxE: Any, targets_BxT: Any) -> np.ndarray:
    """Per-token NLL ``[B, T]`` of ``targets`` from final-norm hidden states, the head applied in
    chunks of positions (never the whole ``[B, T, V]`` logits)."""
    import torch

    out = []
    for s in range(0, hidden_BxTxE.shape[1], _HEAD_CHUNK):
        logits = model.lm_head(hidden_BxTxE[:, s:s + _HEAD_CHUNK]).float()
        t = targets_BxT[:, s:s + _HEAD_CHUNK]
        out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), t, reduction="none"))
    return torch.cat(out, dim=1).double().numpy()


def full_nll(model: Any, tokens_BxN: np.ndarray) -> np.ndarray:
    """``[B, N - 1]``: token j + 1 given tokens <= j, the whole window causally."""
    import torch

    ids = torch.as_tensor(np.asarray(tokens_BxN), dtype=torch.long)
    with torch.no_grad():
        hidden = model.model(input_ids=ids[:, :-1]).last_hidden_state
        return _nll(model, hidden, ids[:, 1:])


def local_nll(model: Any, tokens_BxN: np.ndarray, segment_length: int) -> np.ndarray:
    """``[B, N - 1]``: each segment alone, positions restarting at 0; the prediction at a
    segment's last position sees that segment only and predicts the next segment's first token."""
    import torch

    b, n = tokens_BxN.shape
    L = segment_length
    ids = torch.as_tensor(np.asarray(tokens_BxN), dtype=torch.long)
    out = np.zeros((b, n - 1))
    with torch.no_grad():
        for start in range(0, n - 1, L):
            seg = ids[:, start:min(start + L, n - 1)]
            hidden = model.model(input_ids=seg).last_hidden_state
            out[:, start:start + seg.shape[1]] = _nll(model, hidden, ids[:, start + 1:start + 1 + seg.shape[1]])
    return out


def cache_lengths(cache: Any) -> list[int]:
    """Entries per layer of a transformers ``DynamicCache`` (what a press left)."""
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def pressed_nll(model: Any, tokens_BxN: np.ndarray, segment_length: int,
                press: Callable[[Any, int], contextlib.AbstractContextManager] | None,
                check_kept: Callable[[int, list[int]], None] | None = None) -> np.ndarray:
    """``[B, N - 1]``, NaN before position L: for every segment k >= 1, the context (segments
    < k) prefilled under ``press(model, context_length)`` (None: no press, the cache kept whole), then segment
    k scored on the compressed cache with its original position ids kL + i.

    ``check_kept(context_length, per_layer_cache_lengths)`` sees the cache after each prefill
    (the suite asserts the press's budget there: a press that silently kept everything would
    pass for a perfect compressor)."""
    import torch
    import transformers

    b, n = tokens_BxN.shape
    L = segment_length
    ids = torch.as_tensor(np.asarray(tokens_BxN), dtype=torch.long)
    out = np.full((b, n - 1), np.nan)
    with torch.no_grad():
        for start in range(L, n - 1, L):
            cache = transformers.DynamicCache()
            with press(model, start) if press is not None else contextlib.nullcontext():
                model.model(input_ids=ids[:, :start], past_key_values=cache, use_cache=True)
            if check_kept is not None:
                check_kept(start, cache_lengths(cache))
            stop = min(start + L, n - 1)
            out[:, start:stop] = scored_on_cache(model, ids, start, stop, cache)
    return out


@dataclasses.dataclass
class Prefill:
    """What one causal forward over a batch of windows leaves, per attention layer: the
    post-RoPE keys and values ``[B, H, T, D]``, the attention input (normed hidden states)
    ``[B, T, E]``, and the RoPE (cos, sin) ``[B, T, D]``; plus the final-norm states.

    Why: a press acts on a layer's cache after that layer's attention has run on the whole
    context, so the hidden states of a prefill never depend on the press, and in a causal model
    the first c positions of a longer forward are exactly a prefill of length c. One forward per
    window therefore serves every press, ratio and context length (``compressed_cache``)
    instead of one prefill each; ``pressed_nll`` (the hooks, as kvpress runs them) is the
    reference it is tested against."""

    keys: list[Any]
    values: list[Any]
    hidden: list[Any]
    cos: Any
    sin: Any
    last_hidden: Any


def prefill(model: Any, ids_BxT: Any) -> Prefill:
    """One causal forward over ``ids`` with a cache, recording every layer's attention input."""
    import torch
    import transformers

    lm = model.model
    hidden: list[Any] = [None] * len(lm.layers)
    rope: list[Any] = []

    def recorder(i: int):
        def hook(module, args, kwargs, output):
            hidden[i] = kwargs["hidden_states"]
            if not rope:
                rope.append(kwargs["position_embeddings"])
        return hook

    hooks = [layer.self_attn.register_forward_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
    cache = transformers.DynamicCache()
    try:
        with torch.no_grad():
            last = lm(input_ids=ids_BxT, past_key_values=cache, use_cache=True).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    cos, sin = rope[0]
    return Prefill([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], hidden,
                   cos.expand(ids_BxT.shape[0], -1, -1), sin.expand(ids_BxT.shape[0], -1, -1), last)


def compressed_cache(model: Any, pre: Prefill, context: int, press: Any | None) -> Any:
    """The ``DynamicCache`` of a prefill of the first ``context`` positions, each layer's keys
    and values compressed by ``press.compress`` with the arguments kvpress's own forward hook
    gives it (the layer, its attention input, the cache, no attention weights under sdpa, the
    kwargs holding ``position_embeddings``). Only for presses that keep kvpress's default hook
    (``hooks_are_default``); others go through ``pressed_nll``."""
    import torch
    import transformers

    lm = model.model
    cache = transformers.DynamicCache()
    if press is not None:
        press.post_init_from_model(model)
    for i, layer in enumerate(lm.layers):
        k, v = pre.keys[i][:, :, :context], pre.values[i][:, :, :context]
        if press is not None:
            layer.self_attn.rotary_emb = lm.rotary_emb  # what press(model) sets up
            hs = pre.hidden[i][:, :context]
            kwargs = {"hidden_states": hs, "position_embeddings": (pre.cos[:, :context], pre.sin[:, :context]),
                      "past_key_values": cache, "cache_position": torch.arange(context), "attention_mask": None}
            with torch.no_grad():
                k, v = press.compress(layer.self_attn, hs, k, v, None, kwargs)
        cache.update(k.contiguous(), v.contiguous(), i)
    return cache


def hooks_are_default(press: Any) -> bool:
    """Whether ``press`` compresses through kvpress's ``BasePress.forward_hook`` (then
    ``compressed_cache`` reproduces it exactly)."""
    from kvpress.presses.base_press import BasePress

    return type(press).forward_hook is BasePress.forward_hook


def scored_on_cache(model: Any, ids_BxN: Any, start: int, stop: int, cache: Any) -> np.ndarray:
    """NLL ``[B, stop - start]`` of tokens start + 1 .. stop fed as positions start .. stop - 1
    (their original ids) on top of ``cache`` (which may hold fewer than ``start`` entries)."""
    import torch

    b = ids_BxN.shape[0]
    positions = torch.arange(start, stop).unsqueeze(0).expand(b, -1)
    with torch.no_grad():
        hidden = model.model(input_ids=ids_BxN[:, start:stop], past_key_values=cache, position_ids=positions,
                             use_cache=True).last_hidden_state
        return _nll(model, hidden, ids_BxN[:, start + 1:stop + 1])


def batched(fn: Callable[[np.ndarray], np.ndarray], tokens_BxN: np.ndarray, batch: int) -> np.ndarray:
    """``fn`` over ``batch`` windows at a time, concatenated (windows stay in order)."""
    return np.concatenate([fn(tokens_BxN[i:i + batch]) for i in range(0, len(tokens_BxN), batch)])
