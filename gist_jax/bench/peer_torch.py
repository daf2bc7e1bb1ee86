"""The PyTorch peer: the same model dimensions in transformers ``LlamaForCausalLM``, the same
gist layout, the mask given to the model instead of structured attention.

Per training step (timed like ours: median of ``steps`` after ``warmup``): forward over the
layout tokens, cross entropy on raw positions, backward, AdamW. Inputs: token ids in layout
order (gist slots take id 0: the compute is the same as a learned gist row), ``position_ids``
= ``layout.position``, and

- ``sdpa``: a 4D boolean mask ``[1, 1, T, T]`` (own segment causally over live tokens, plus
  sinks and live gists of earlier segments) through ``attn_implementation="sdpa"``; the full
  attention variant passes no mask, so SDPA runs its causal path;
- ``flex`` (optional): ``attn_implementation="flex_attention"`` with a ``BlockMask`` built by
  ``create_block_mask`` from the same rule, so fully masked blocks are skipped.

One position per key: a 4D mask cannot rotate a gist key at a second (memory) position, so
the peer computes the aligned scheme's function; the work is identical for both schemes,
which is what a speed comparison needs. The peer's result is only throughput.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np

from gist_jax.bench.train_bench import BenchSpec
from gist_jax.gist.layout import GistLayout, build_layout


def allowed_mask(layout: GistLayout, memory_enabled: bool) -> np.ndarray:
    """[T, T] bool: what the dense reference lets query t see (``specs.parallel_spec``).
    Host numpy, O(T^2): the peer's mask is exactly the matrix we avoid."""
    seg, alive = layout.segment, layout.alive
    idx = np.arange(len(seg))
    local = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None]) & alive[None, :]
    if not memory_enabled:
        return local
    memory_key = (layout.is_gist & layout.alive) | layout.is_sink
    return local | ((seg[None, :] < seg[:, None]) & memory_key[None, :])


def _hf_config(spec: BenchSpec, impl: str):
    from transformers import LlamaConfig

    cfg = spec.model_config()
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=max(cfg.max_position_embeddings, 2 * spec.seq),
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.qkv_bias,
        attn_implementation=impl, use_cache=False)


def time_peer(spec: BenchSpec, impl: str = "sdpa") -> dict[str, Any]:
    """Train-step time of the transformers peer for ``spec`` (``impl``: sdpa | flex_attention)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    comp = spec.compression()
    layout = build_layout(spec.seq, comp)
    model = LlamaForCausalLM(_hf_config(spec, impl))
    model.train()
    dtype = torch.bfloat16 if spec.model_config().dtype == "bfloat16" else torch.float32
    model.to(dtype)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, model.config.vocab_size, (spec.batch, spec.seq))
    ids = np.where(layout.raw_index >= 0, raw[:, np.maximum(layout.raw_index, 0)], 0)
    input_ids = torch.as_tensor(ids, dtype=torch.long)
    position_ids = torch.as_tensor(np.broadcast_to(layout.position, ids.shape).copy(), dtype=torch.long)
    raw_pos = torch.as_tensor(layout.live_raw_positions())
    labels = torch.as_tensor(np.roll(raw, -1, axis=1), dtype=torch.long)[:, :-1]
    kwargs: dict[str, Any] = {}
    if comp.enabled and impl == "sdpa":
        kwargs["attention_mask"] = torch.as_tensor(allowed_mask(layout, True))[None, None].expand(
            spec.batch, 1, -1, -1)
    elif impl == "flex_attention":
        kwargs["attention_mask"] = _block_mask(layout, comp.enabled, spec.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=input_ids, position_ids=position_ids, **kwargs).logits
        raw_logits = logits[:, raw_pos][:, :-1].float()
        loss = torch.nn.functional.cross_entropy(raw_logits.reshape(-1, raw_logits.shape[-1]),
                                                 labels.reshape(-1))
        loss.backward()
        opt.step()
        return float(loss.detach())

    t0 = time.perf_counter()
    step()  # first call: allocation / torch.compile of flex attention
    first_s = time.perf_counter() - t0
    for _ in range(max(spec.warmup - 1, 0)):
        step()
    times = []
    for _ in range(spec.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"impl": impl, "step_s": step_s, "tokens_per_s": spec.batch * spec.seq / step_s,
            "first_step_s": first_s, "torch": torch.__version__, "threads": torch.get_num_threads()}


def _block_mask(layout: GistLayout, memory_enabled: bool, batch: int):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    seg = torch.as_tensor(layout.segment)
    alive = torch.as_tensor(layout.alive)
    memory_key = torch.as_tensor((layout.is_gist & layout.alive) | layout.is_sink) & memory_enabled

    def mask_mod(b, h, q, k):
        local = (seg[q] == seg[k]) & (k <= q) & alive[k]
        return local | ((seg[k] < seg[q]) & memory_key[k])

    t = layout.length
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=t, KV_LEN=t, device="cpu")


def run_peer(spec: BenchSpec, ours: dict[str, Any], flex: bool = False) -> dict[str, Any]:
    """Time the peer(s) and print our tokens/s over theirs."""
    out: dict[str, Any] = {"ours_tokens_per_s": ours["tokens_per_s"], "ours_attention": ours["attention"]}
    for impl in ("sdpa",) + (("flex_attention",) if flex else ()):
        try:
            r = time_peer(spec, impl)
            r["ours_over_peer"] = ours["tokens_per_s"] / r["tokens_per_s"]
            print(f"peer transformers Llama {impl}: {r['tokens_per_s']:,.0f} tok/s, step "
                  f"{1e3 * r['step_s']:.1f} ms (torch {r['torch']}, {r['threads']} threads); "
                  f"ours / peer: {r['ours_over_peer']:.2f}x", flush=True)
        except Exception as e:  # noqa: BLE001 - report, e.g. flex attention unsupported on CPU
            r = {"impl": impl, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"peer {impl}: FAILED {r['error']}", flush=True)
        out[impl] = r
    return out
