"""Decode throughput and cache bytes at a given context, through ``gist_jax.inference``.

``generate`` prefills the prompt segment by segment and decodes in one jitted loop, so its
wall time is prefill + decode. Decode tokens/s is taken from the difference of two warm runs
that share the prompt and differ only in new tokens (K and 2K, K a multiple of 16, the loop's
rounding): ``batch * K / (t(2K) - t(K))``; prefill cancels. Each run is repeated and the
fastest taken (the least disturbed by other load); when the difference is not resolvable
(under 5% of the run, e.g. K too small for the noise) the rate is reported as None: raise K.
Cache bytes are ``inference.cache.cache_stats`` of the first row after the 2K run: bytes
in use (memory + current segment, all layers), what an uncompressed KV cache would hold for the
same raw tokens, and the bytes allocated.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from gist_jax.bench.train_bench import StepSetup
from gist_jax.gist.params import add_gist_params, model_config_for
from gist_jax.model.transformer import init_params


def run_decode_bench(setup: StepSetup, new_tokens: int = 256, repeats: int = 3) -> dict[str, Any]:
    """Decoding with the model and compression of ``setup`` (a ratio the setup's step uses)
    after a prompt of ``step.seq_len`` tokens, ``step.batch_size`` rows."""
    from gist_jax.inference.decode import generate

    if new_tokens <= 0 or new_tokens % 16:
        raise ValueError(f"--decode {new_tokens} must be a positive multiple of 16")
    base, comp = setup.base_cfg, setup.comp
    if comp.enabled:
        comp = comp.replace(ratios=(setup.layout.ratios[0],), ratio_sampling="fixed")
    batch, seq = setup.step_cfg.batch_size, setup.step_cfg.seq_len
    cfg = model_config_for(base, comp)
    params = add_gist_params(init_params(base, jax.random.key(0)), cfg)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, base.vocab_size, (batch, seq)).tolist()
    capacity = seq + 2 * new_tokens

    def timed(k: int) -> tuple[float, Any]:
        t0 = time.perf_counter()
        gen = generate(cfg, comp, params, prompts, k, capacity=capacity)
        return time.perf_counter() - t0, gen

    t0 = time.perf_counter()
    timed(new_tokens)
    timed(2 * new_tokens)
    first_s = time.perf_counter() - t0  # both compilations + one run each
    short = min(timed(new_tokens)[0] for _ in range(repeats))
    runs = [timed(2 * new_tokens) for _ in range(repeats)]
    long = min(t for t, _ in runs)
    stats = runs[-1][1].cache_stats[0]
    delta = long - short
    resolved = delta > 0.05 * long
    return {"variant": setup.variant, "seq": seq, "batch": batch, "new_tokens": new_tokens,
            "decode_tokens_per_s": batch * new_tokens / delta if resolved else None,
            "decode_ms_per_step": 1e3 * delta / new_tokens if resolved else None,
            "generate_s": long, "prefill_and_decode_s_short": short, "compile_and_first_runs_s": first_s,
            "cache_bytes": stats["bytes"], "uncompressed_cache_bytes": stats["uncompressed_bytes"],
            "allocated_cache_bytes": stats["allocated_bytes"], "cache_entries": stats["entries"]}


def format_decode(r: dict[str, Any]) -> str:
    rate = ("not resolvable (raise --decode)" if r["decode_tokens_per_s"] is None else
            f"{r['decode_tokens_per_s']:,.1f} tok/s ({r['decode_ms_per_step']:.2f} ms/step)")
    return (f"decode {r['variant']} context={r['seq']} batch={r['batch']}: {rate}, cache "
            f"{r['cache_bytes'] / 2**10:,.1f} KiB in use vs {r['uncompressed_cache_bytes'] / 2**10:,.1f} KiB "
            f"uncompressed ({r['cache_entries']} entries/layer; allocated "
            f"{r['allocated_cache_bytes'] / 2**10:,.1f} KiB)")
