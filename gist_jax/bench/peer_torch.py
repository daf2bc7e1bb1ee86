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
  ``create_block_mask`` from the same rule over the gists-first (gist bank, ``gist/bank.py``)
  order: all gists segment-major, then the raw tokens in order, each with its own position
  id, so the mask is a few contiguous staircases and block-diagonal blocks that the block
  mask can skip, as fair a layout for it as the bank is for Splash.

Memory: when our step rematerialises (``model.remat_policy`` not ``none``), the peer turns on
transformers' gradient checkpointing, so both sides make the same trade (recorded as
``peer_gradient_checkpointing``).

Device: CUDA when ``torch.cuda.is_available()`` (model, inputs and block mask on it; the timer
is read after ``torch.cuda.synchronize()``), the CPU otherwise.

Comparison (``compare_alternating``): ours and the peer are stepped alternately in one process,
A B A B ... after both warmed up, so the machine's load moves both sides of each pair alike;
the result is the median of the per-pair ratios with its min/max and quartiles, the load
average before and after, and both sides' thread counts (XLA's pinned by ``bench.__main__``
through ``XLA_FLAGS`` before jax starts its backend; torch's with ``torch.set_num_threads``).
Ratios of separate invocations are not a result: between two runs the peer's step moved 6x
while ours moved 1.8x (docs/performance.md).

One position per key: a 4D mask cannot rotate a gist key at a second (memory) position, so
the peer computes the aligned scheme's function; the work is identical for both schemes,
which is what a speed comparison needs. The peer's result is only throughput.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from gist_jax.bench.train_bench import StepSetup, environment
from gist_jax.gist.layout import GistLayout


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


def _hf_config(setup: StepSetup, impl: str):
    from transformers import LlamaConfig

    cfg = setup.base_cfg
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=max(cfg.max_position_embeddings, 2 * setup.step_cfg.seq_len),
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.qkv_bias,
        attn_implementation=impl, use_cache=False)


def gists_first_order(layout: GistLayout) -> np.ndarray:
    """Layout index of each row of the gists-first order: every gist slot (segment-major, as
    in the layout), then every other token in layout order (``bank.GistBankKV.permutation``'s
    order, computed from the layout so it also holds for sinks, dead slots and padding)."""
    idx = np.arange(layout.length)
    return np.concatenate([idx[layout.is_gist], idx[~layout.is_gist]])


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class PeerStep:
    """The transformers training step for ``setup`` (``impl``: sdpa | flex_attention), built
    once; calling it runs one step and returns its seconds (device synchronised)."""

    def __init__(self, setup: StepSetup, impl: str = "sdpa", threads: int | None = None):
        import torch
        from transformers import LlamaForCausalLM

        self.impl, self.device = impl, torch_device()
        torch.manual_seed(0)
        if threads:
            torch.set_num_threads(threads)
        comp, layout = setup.comp, setup.layout
        batch, seq = setup.step_cfg.batch_size, setup.step_cfg.seq_len
        order = gists_first_order(layout) if impl == "flex_attention" and comp.enabled else np.arange(layout.length)
        model = LlamaForCausalLM(_hf_config(setup, impl))
        # Same memory trade as ours: when our step rematerialises, the peer checkpoints every
        # layer (transformers' gradient checkpointing), so neither side keeps what the other
        # recomputes (SmolLM2-sized at 16K does not fit 23 GB without it).
        self.gradient_checkpointing = setup.base_cfg.remat_policy != "none"
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        dtype = torch.bfloat16 if setup.base_cfg.dtype == "bfloat16" else torch.float32
        self.model = model.to(device=self.device, dtype=dtype)
        rng = np.random.default_rng(0)
        raw = rng.integers(0, model.config.vocab_size, (batch, seq))
        ids = np.where(layout.raw_index >= 0, raw[:, np.maximum(layout.raw_index, 0)], 0)[:, order]
        position = np.broadcast_to(layout.position[order], ids.shape).copy()
        row_of = np.argsort(order)  # layout index -> row in the peer's order
        dev = self.device
        self.input_ids = torch.as_tensor(ids, dtype=torch.long, device=dev)
        self.position_ids = torch.as_tensor(position, dtype=torch.long, device=dev)
        self.raw_pos = torch.as_tensor(row_of[layout.live_raw_positions()], device=dev)
        self.labels = torch.as_tensor(np.roll(raw, -1, axis=1), dtype=torch.long, device=dev)[:, :-1]
        self.kwargs: dict[str, Any] = {}
        if comp.enabled and impl == "sdpa":
            self.kwargs["attention_mask"] = torch.as_tensor(allowed_mask(layout, True), device=dev)[
                None, None].expand(batch, 1, -1, -1)
        elif impl == "flex_attention":
            self.kwargs["attention_mask"] = _block_mask(layout, comp.enabled, order, dev)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.threads = torch.get_num_threads()
        self.torch_version = torch.__version__
        self.loss = float("nan")

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def __call__(self) -> float:
        import torch

        self._sync()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(input_ids=self.input_ids, position_ids=self.position_ids, **self.kwargs).logits
        raw_logits = logits[:, self.raw_pos][:, :-1].float()
        loss = torch.nn.functional.cross_entropy(raw_logits.reshape(-1, raw_logits.shape[-1]),
                                                 self.labels.reshape(-1))
        loss.backward()
        self.opt.step()
        self._sync()
        seconds = time.perf_counter() - t0
        self.loss = float(loss.detach())
        return seconds


def _block_mask(layout: GistLayout, memory_enabled: bool, order: np.ndarray, device: str):
    """FlexAttention ``BlockMask`` of ``allowed_mask`` over the rows ``order`` (layout indices)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    def rows(x: np.ndarray):
        return torch.as_tensor(np.ascontiguousarray(x[order]), device=device)

    seg, alive, idx = rows(layout.segment), rows(layout.alive), rows(np.arange(layout.length))
    memory_key = rows((layout.is_gist & layout.alive) | layout.is_sink) & memory_enabled

    def mask_mod(b, h, q, k):
        local = (seg[q] == seg[k]) & (idx[k] <= idx[q]) & alive[k]
        return local | ((seg[k] < seg[q]) & memory_key[k])

    t = layout.length
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=t, KV_LEN=t, device=device)


def pair_ratios(ours_s: list[float], peer_s: list[float]) -> dict[str, Any]:
    """Ours / peer tokens/s of each (ours_i, peer_i) pair (= peer_i / ours_i seconds), their
    median, min, max and quartiles."""
    if len(ours_s) != len(peer_s) or not ours_s:
        raise ValueError(f"pairs need equal, non-zero repeats (ours {len(ours_s)}, peer {len(peer_s)})")
    ratios = [p / o for o, p in zip(ours_s, peer_s)]
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return {"ratios": ratios, "median": statistics.median(ratios), "min": min(ratios),
            "max": max(ratios), "q1": q[0], "q3": q[2]}


def alternate(ours: Callable[[], float], peer: Callable[[], float], repeats: int,
              warmup: int = 1, progress: bool = False) -> tuple[list[float], list[float]]:
    """Warm both up, then time ``repeats`` pairs A B A B ...; (ours seconds, peer seconds).

    ``progress`` prints each pair as it completes (a large model takes minutes per step on a CPU,
    so a run stopped early still shows what it measured)."""
    for _ in range(max(warmup, 1)):  # the first call allocates (and compiles flex attention)
        ours()
        peer()
    ours_s, peer_s = [], []
    for i in range(repeats):
        ours_s.append(ours())
        peer_s.append(peer())
        if progress:
            print(f"  pair {i + 1}/{repeats}: ours {ours_s[-1]:.3f} s, peer {peer_s[-1]:.3f} s, "
                  f"ours / peer {peer_s[-1] / ours_s[-1]:.2f}x, load {os.getloadavg()[0]:.2f}", flush=True)
    return ours_s, peer_s


def compare_alternating(ours: Callable[[], float], setup: StepSetup, repeats: int, warmup: int = 1,
                        flex: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Ours against the peer(s), alternating in this process; prints one line per peer."""
    batch_tokens = setup.step_cfg.batch_size * setup.step_cfg.seq_len
    out: dict[str, Any] = {}
    for impl in ("sdpa",) + (("flex_attention",) if flex else ()):
        try:
            peer = PeerStep(setup, impl, threads)
            load_before = list(os.getloadavg())
            ours_s, peer_s = alternate(ours, peer, repeats, warmup, progress=True)
            ratio = pair_ratios(ours_s, peer_s)
            r = {"impl": impl, "device": peer.device, "repeats": repeats, "warmup": warmup,
                 "ours_step_s": ours_s, "peer_step_s": peer_s,
                 "ours_tokens_per_s": batch_tokens / statistics.median(ours_s),
                 "peer_tokens_per_s": batch_tokens / statistics.median(peer_s),
                 "ours_over_peer": ratio["median"], "ratio": ratio, "torch": peer.torch_version,
                 "torch_threads": peer.threads, "peer_gradient_checkpointing": peer.gradient_checkpointing,
                 "loadavg_before": load_before,
                 "loadavg_after": list(os.getloadavg()), **environment()}
            print(f"peer transformers Llama {impl} on {peer.device} ({peer.threads} threads, torch "
                  f"{peer.torch_version}), alternating {repeats} pairs: ours {r['ours_tokens_per_s']:,.0f} "
                  f"tok/s, peer {r['peer_tokens_per_s']:,.0f} tok/s; ours / peer median "
                  f"{ratio['median']:.2f}x (IQR {ratio['q1']:.2f}-{ratio['q3']:.2f}, min {ratio['min']:.2f}, "
                  f"max {ratio['max']:.2f}); load {load_before[0]:.2f} -> {r['loadavg_after'][0]:.2f}", flush=True)
        except Exception as e:  # noqa: BLE001 - report, e.g. flex attention unsupported on CPU
            r = {"impl": impl, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"peer {impl}: FAILED {r['error']}", flush=True)
        out[impl] = r
    return out
