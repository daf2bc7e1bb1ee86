"""UniGist (``compression.window`` > 0) inference: chunked prefill + token-by-token decoding with
a rolling window cache equal the one-pass forward, the cache stays bounded by sinks + gists +
W + r while the context grows, and the exported ``modeling_gist.py`` does the same in PyTorch."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gist_helpers import comp_config, gist_kernel, model

from gist_jax.errors import ConfigError
from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.forward import compressed_logits
from gist_jax.gist.layout import build_layout
from gist_jax.gist.specs import layout_arrays
from gist_jax.inference import Plan, expected_entries, generate
from gist_jax.inference.cache import Cache
from gist_jax.inference.decode import feed_jit, prefill


def unigist(sinks: int, ratio: int, segment_length: int, window: int, **kw) -> CompressionConfig:
    return comp_config("kv", "fine", "aligned", sinks, ratio=ratio, segment_length=segment_length,
                       window=window, pad_to_segments=True, **kw)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _parallel(cfg, comp, shape, params, tokens, arrays):
    return compressed_logits(cfg, comp, shape, params, tokens, arrays)


def parallel_raw_logits(cfg, comp, params, seq: list[int]) -> np.ndarray:
    """The one-pass forward's logits of the raw tokens of ``seq`` [N, V], on the dense reference
    masks (the gist part of ``model.attention``; its default, auto, runs the windowed kernel)."""
    layout = build_layout(len(seq), comp)
    padded = np.zeros((1, layout.padded_raw), np.int32)
    padded[0, :len(seq)] = seq
    logits = _parallel(gist_kernel(cfg, "dense"), comp, layout.shape, params, jnp.asarray(padded),
                       layout_arrays(layout))
    return np.asarray(logits)[0][layout.live_raw_positions()]


# (sinks, ratio r, segment length L, window W, prefill chunk): W inside a segment; W = 2 L
# (the window spans two segments and more); W across 1.5 segments with chunks of 6 raw tokens
# (not a multiple of L, so chunks straddle segment boundaries); per-slot gist embeddings with
# gist projections.
CASES = [
    (2, 2, 8, 4, None, {}),
    (4, 4, 8, 16, None, {}),
    (0, 2, 8, 12, 6, {}),
    (3, 2, 8, 8, 4, {"gist_embedding": "per_slot", "gist_projections": True}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:5])))
def test_decode_equals_parallel_forward(case):
    """Prompts of 13 and 22 raw tokens, 15 new each (28 and 37 raw tokens: neither a multiple of
    L): every raw token's logits (prefill and decoding) equal the one-pass forward, each
    generated token is the argmax of the previous raw token's, and each row holds exactly
    sinks + gists fed + min(W + r, non-sink raw tokens) entries per layer."""
    sinks, ratio, seg_len, window, chunk, extra = case
    comp = unigist(sinks, ratio, seg_len, window, **extra)
    cfg, params = model(comp)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (13, 22)]
    out = generate(cfg, comp, params, prompts, 15, record_logits=True, prefill_chunk=chunk)
    plan = Plan.create(comp, 64)
    for row, prompt in enumerate(prompts):
        seq = prompt + out.tokens[row]
        assert len(out.tokens[row]) == 15
        want = parallel_raw_logits(cfg, comp, params, seq)
        np.testing.assert_allclose(out.logits[row, :len(seq)], want, atol=1e-5, rtol=0)
        assert out.tokens[row] == np.argmax(want[len(prompt) - 1:-1], axis=-1).tolist()
        # the last raw token's gist (if its unit is complete) is not fed yet
        gists = len(seq) // ratio - (len(seq) % ratio == 0)
        raw_part = min(window + ratio, len(seq) - sinks)
        stats = out.cache_stats[row]
        assert stats["entries"] == sinks + gists + raw_part
        assert stats["entries"] == expected_entries(plan, int(out.cache.segment[row]), int(out.cache.offset[row]))
    assert out.cache.seg_k.shape[2] == window + ratio  # the raw part is allocated at W + r


def test_decode_detects_a_wrong_window():
    """The parity check can fail: the same tokens under a window one unit wider differ by far
    more than the tolerance once the context outgrows the window."""
    comp = unigist(2, 2, 8, 4)
    cfg, params = model(comp)
    prompt = list(range(30, 60))
    out = generate(cfg, comp, params, [prompt], 4, record_logits=True)
    seq = prompt + out.tokens[0]
    wider = parallel_raw_logits(cfg, comp.replace(window=6), params, seq)
    assert np.abs(out.logits[0, :len(seq)] - wider).max() > 1e-2


def test_greedy_equals_rerunning_the_parallel_forward():
    """Greedy generation equals re-running the one-pass forward on the growing sequence and
    taking the argmax of the last raw token, for 20 steps across 3 segment boundaries."""
    comp = unigist(1, 2, 8, 6)
    cfg, params = model(comp)
    prompt = np.random.default_rng(1).integers(0, 256, 11).tolist()
    got = generate(cfg, comp, params, [prompt], 20, prefill_chunk=4).tokens[0]
    seq = list(prompt)
    for _ in range(20):
        seq.append(int(parallel_raw_logits(cfg, comp, params, seq)[-1].argmax()))
    assert got == seq[len(prompt):]


def test_window_cache_stays_bounded_and_keeps_the_window():
    """Token by token over 30 gist units (4 sinks, r = 4, W = 8), and a 3-chunk prefill: the raw
    part never exceeds W + r, holds exactly the last min(W + r, n - s) non-sink raw tokens (the
    ones that left the window are dropped), is the same size at two context lengths, and the
    memory holds the sinks and every gist fed."""
    sinks, ratio, window = 4, 4, 8
    comp = unigist(sinks, ratio, 8, window)
    cfg, params = model(comp)
    plan = Plan.create(comp, 128)
    cache = Cache.empty(cfg, plan, 1)
    tokens = np.random.default_rng(2).integers(0, 256, 200)
    raw_parts, n, gists = {}, 0, 0
    for step in range(30 * (ratio + 1)):
        is_gist = step % (ratio + 1) == ratio
        _, cache = feed_jit(cfg, plan, params, cache, jnp.asarray([[0 if is_gist else tokens[n]]], jnp.int32),
                            jnp.ones((1, 1), bool))
        n, gists = n + (not is_gist), gists + is_gist
        held = sorted(int(p) for p in np.asarray(cache.seg_pos[0]) if p >= 0)
        assert len(held) <= window + ratio
        assert held == list(range(max(sinks, n - window - ratio), n))
        assert int(cache.mem_valid.sum()) == min(n, sinks) + gists
        raw_parts[n] = len(held)
    assert raw_parts[60] == raw_parts[120] == window + ratio
    # Prefill drops what leaves the window as well (chunks of 3 units).
    cache = Cache.empty(cfg, plan, 1)
    buffer = np.zeros((1, 64), np.int32)
    buffer[0, :40] = tokens[:40]
    cache, _, fed = prefill(cfg, plan, params, cache, buffer, np.asarray([40]), chunk=12)
    assert fed.tolist() == [36]
    assert sorted(int(p) for p in np.asarray(cache.seg_pos[0]) if p >= 0) == list(range(36 - window - ratio, 36))
    assert int(cache.mem_valid.sum()) == sinks + 36 // ratio


def test_prefill_chunk_errors():
    comp = unigist(2, 4, 8, 8)
    cfg, params = model(comp)
    with pytest.raises(ConfigError, match="multiple of the ratio 4"):
        generate(cfg, comp, params, [[1, 2, 3]], 2, prefill_chunk=6)
    chunked = comp_config("kv", "fine", "aligned", 2)
    cfg, params = model(chunked)
    with pytest.raises(ConfigError, match="prefills whole segments"):
        generate(cfg, chunked, params, [[1, 2, 3]], 2, prefill_chunk=4)
    cfg, params = model(comp)
    with pytest.raises(ConfigError, match="does not divide compression.window=8"):
        generate(cfg, unigist(2, 4, 16, 8), params, [[1]], 1, ratio=16)


# ----------------------------------------------------------------------------- PyTorch export
def _export(tmp_path, sinks: int, ratio: int, window: int):
    from gist_jax.gist.params import model_config_for
    from gist_jax.hf import export
    from gist_jax.model.config import ModelConfig
    from gist_jax.model.transformer import init_params

    base = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, dtype="float32", family="qwen2", qkv_bias=True,
                       tie_embeddings=False)
    comp = CompressionConfig(memory="kv", granularity="fine", positions="aligned", segment_length=8,
                             ratios=(ratio,), ratio_sampling="fixed", num_sinks=sinks, window=window,
                             gist_embedding="per_slot", gist_projections=True)
    cfg = model_config_for(base, comp)
    params = init_params(cfg, jax.random.key(0))
    leaves, treedef = jax.tree.flatten_with_path(params)
    rng = np.random.default_rng(3)
    params = jax.tree.unflatten(treedef, [
        jnp.asarray((1 if "scale" in jax.tree_util.keystr(p) else 0) + 0.15 * rng.normal(size=x.shape), jnp.float32)
        for p, x in leaves])
    directory = export.export_params(cfg, comp, params, None, tmp_path / "hf")
    return cfg, comp, params, directory


def test_export_matches_gist_jax(tmp_path):
    """The export carries the window; modeling_gist.py's compressed forward (one call, and
    chunk by chunk through its rolling cache) matches gist_jax's one-pass forward for three
    (sinks, r, W) settings, and its greedy generation equals gist_jax's rolling-cache decoding."""
    import torch
    import transformers

    from gist_jax.hf.gist_names import compression_from_section

    cfg, comp, params, directory = _export(tmp_path, 2, 2, 12)
    section = json.loads((directory / "config.json").read_text())["gist"]
    assert section["window"] == 12 and compression_from_section(section) == comp
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True,
                                                           dtype=torch.float32, attn_implementation="eager").eval()
    tokens = np.random.default_rng(4).integers(3, 128, size=(2, 37))
    for sinks, ratio, window in ((2, 2, 12), (4, 4, 16), (0, 2, 4)):
        case = comp.replace(num_sinks=sinks, ratios=(ratio,), window=window, pad_to_segments=True)
        hf.config.gist = {**hf.config.gist, **case.to_dict(), "inference_ratio": ratio}
        ours = np.stack([parallel_raw_logits(cfg, case, params, row.tolist()) for row in tokens])
        theirs = hf.compressed_forward(torch.from_numpy(tokens)).numpy()
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
        with torch.no_grad():
            logits, state = hf.consume(torch.from_numpy(tokens[:, :10]))  # a chunk that ends mid-unit
            parts = [logits]
            for start, end in ((10, 11), (11, 24), (24, 37)):
                logits, state = hf.consume(torch.from_numpy(tokens[:, start:end]), state)
                parts.append(logits)
                assert len(state.window_raw) <= window + ratio
        np.testing.assert_allclose(torch.cat(parts, 1).numpy(), ours, atol=1e-4, rtol=0)
        assert state.window_raw == list(range(max(sinks, 37 - window - ratio), 37))
    prompt = tokens[:1, :13]
    theirs_ids = hf.generate(torch.from_numpy(prompt), max_new_tokens=20).numpy()[0, 13:]
    assert theirs_ids.tolist() == generate(cfg, case, params, prompt.tolist(), 20).tokens[0]
