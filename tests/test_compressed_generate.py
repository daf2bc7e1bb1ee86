"""Compressed inference (gist_jax/inference) against the parallel training forward, transformers
and the method's cache-size formula."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gist_jax.errors import ConfigError
from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.forward import compressed_logits
from gist_jax.gist.layout import build_layout
from gist_jax.gist.params import add_gist_params, model_config_for
from gist_jax.gist.specs import layout_arrays
from gist_jax.inference import Plan, expected_entries, generate
from gist_jax.inference.cache import entry_bytes
from gist_jax.inference.decode import sample, sampleable_ids
from gist_jax.model.config import preset
from gist_jax.model.transformer import init_params

# Smaller than preset:tiny (compilation dominates on a 2-core machine); two layers so KV from
# one layer to the next is exercised, GQA (2 heads over 1 KV head).
BASE = preset("tiny", hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, head_dim=16)
L, R = 8, 4  # segments of 8 raw tokens, 2 gists each


def comp_for(memory: str, granularity: str, positions: str, sinks: int, **kw) -> CompressionConfig:
    return CompressionConfig(memory=memory, granularity=granularity, segment_length=L, ratios=(R,),
                             ratio_sampling="fixed", num_sinks=sinks, positions=positions, pad_to_segments=True, **kw)


@functools.cache
def model(comp: CompressionConfig):
    cfg = model_config_for(BASE, comp)
    params = add_gist_params(init_params(BASE, jax.random.key(0)), cfg)
    leaves, tree = jax.tree.flatten(params)  # perturb so gists differ from EOS and sinks matter
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return cfg, jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def parallel_raw_logits(cfg, comp, params, seq: list[int]) -> np.ndarray:
    layout = build_layout(len(seq), comp)
    logits = compressed_logits(cfg, comp, layout.shape, params, jnp.asarray([seq]), layout_arrays(layout))
    return np.asarray(logits)[0][layout.live_raw_positions()]


VARIANTS = [(m, g, p, s) for m, g in (("kv", "fine"), ("kv", "coarse"), ("recurrent", "coarse"))
            for p in ("compressed", "aligned") for s in (0, 4)]


@pytest.mark.parametrize("memory,granularity,positions,sinks", VARIANTS)
def test_decode_equals_parallel_forward(memory, granularity, positions, sinks):
    """Three prompts of different lengths (13, 6 and 16 raw tokens), 19 new tokens each: row 0
    ends at 32 raw tokens = 4 segments (3 boundaries; one crossed in prefill, two while
    decoding), row 1 at 25 (a padded last segment), row 2's prompt is exactly two segments (the
    first token is sampled from prefill logits). Every raw token's logits equal the parallel
    forward."""
    comp = comp_for(memory, granularity, positions, sinks)
    cfg, params = model(comp)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (13, 6, 16)]
    out = generate(cfg, comp, params, prompts, 19, record_logits=True)
    for row, prompt in enumerate(prompts):
        seq = prompt + out.tokens[row]
        assert len(out.tokens[row]) == 19
        want = parallel_raw_logits(cfg, comp, params, seq)
        np.testing.assert_allclose(out.logits[row, :len(seq)], want, atol=1e-4, rtol=0)
        # greedy: each generated token is the argmax of the previous raw token's logits
        assert out.tokens[row] == np.argmax(want[len(prompt) - 1:-1], axis=-1).tolist()
    # cache: sinks + gists so far + current segment, per layer, in bytes
    plan = Plan.create(comp, 32)
    seg, off = np.asarray(out.cache.segment), np.asarray(out.cache.offset)
    for row, stats in enumerate(out.cache_stats):
        assert stats["entries"] == expected_entries(plan, int(seg[row]), int(off[row]))
        assert stats["bytes"] == stats["entries"] * entry_bytes(cfg)
    # row 0: 32 raw tokens, in segment 3 with 8 raw (+ 1 gist if fine) fed
    assert seg[0] == 3 and out.cache_stats[0]["entries"] == sinks + 3 * (L // R) + 8 + (granularity == "fine")
    assert out.cache_stats[0]["uncompressed_bytes"] == 32 * entry_bytes(cfg)


def test_decode_detects_a_wrong_memory():
    """The parity check can fail: dropping the gist memory (no compression memory at all) changes
    the logits after the first segment by far more than the tolerance."""
    comp = comp_for("kv", "fine", "compressed", 4)
    cfg, params = model(comp)
    prompt = list(range(30, 50))
    out = generate(cfg, comp, params, [prompt], 4, record_logits=True)
    broken = params | {"gist_embedding": params["gist_embedding"] * 0 + 1.0}
    want = parallel_raw_logits(cfg, comp, broken, prompt + out.tokens[0])
    assert np.abs(out.logits[0, L:24] - want[L:]).max() > 1e-2


def test_sampling_greedy_temperature_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    assert int(sample(logits, jax.random.key(0), 0.0, 1.0)[0]) == 0
    draws = [int(sample(logits, jax.random.key(i), 1.0, 0.6)[0]) for i in range(60)]
    assert set(draws) <= {0, 1} and {0, 1} <= set(draws)  # nucleus {0.5, 0.3} reaches 0.6
    draws = [int(sample(logits, jax.random.key(i), 1.0, 1.0)[0]) for i in range(200)]
    assert len(set(draws)) >= 3
    comp = comp_for("kv", "fine", "compressed", 4)
    cfg, params = model(comp)
    a = generate(cfg, comp, params, [[5, 6, 7]], 6, temperature=1.0, top_p=0.9, seed=1).tokens
    b = generate(cfg, comp, params, [[5, 6, 7]], 6, temperature=1.0, top_p=0.9, seed=1).tokens
    assert a == b and len(a[0]) == 6


def test_never_samples_gist_or_ids_beyond_tokenizer():
    """Greedy, temperature and nucleus sampling skip the ``<gist>`` id and ids at or beyond the
    tokenizer's size even where they hold almost all the probability; so does ``generate`` on
    a model whose LM-head rows past the byte tokenizer (259 ids of 264) dominate every step."""
    allowed = sampleable_ids(6, tokenizer_size=5, gist_token_id=3)
    assert allowed.tolist() == [True, True, True, False, True, False]
    logits = jnp.log(jnp.asarray([[0.02, 0.01, 0.02, 0.5, 0.05, 0.4]]))
    assert int(sample(logits, jax.random.key(0), 0.0, 1.0, allowed)[0]) == 4
    for top_p in (1.0, 0.9, 0.5):
        draws = {int(sample(logits, jax.random.key(i), 1.0, top_p, allowed)[0]) for i in range(40)}
        assert draws <= {0, 1, 2, 4} and 4 in draws, top_p
    with pytest.raises(ConfigError, match="no id can be generated"):
        sampleable_ids(4, tokenizer_size=1, gist_token_id=0)
    comp = comp_for("kv", "fine", "compressed", 4)
    cfg, params = model(comp)
    kernel_ExV = params["lm_head"]["kernel"].at[:, 259:].set(0.0)
    for j, v in enumerate(range(259, cfg.vocab_size)):  # +-100 e_k: one of them wins everywhere
        kernel_ExV = kernel_ExV.at[j // 2, v].set(100.0 * (1 - 2 * (j % 2)))
    params = params | {"lm_head": {"kernel": kernel_ExV}}
    prompt = list(range(30, 41))
    kw = dict(temperature=1.0, top_p=0.9, seed=3)
    unmasked = generate(cfg, comp, params, [prompt], 12, **kw).tokens[0]
    assert min(unmasked) >= 259  # the test bites: unrestricted, only those rows are sampled
    masked = generate(cfg, comp, params, [prompt], 12, tokenizer_size=259, **kw).tokens[0]
    assert len(masked) == 12 and max(masked) < 259


@pytest.mark.parametrize("chunk", [None, 4, 3])
def test_full_attention_cache_matches_plain_forward(chunk):
    """Prompts prefilled in chunks (ending inside, at the end of, and before a chunk) give the
    one-pass forward's logits at every position, prompt and generated."""
    comp = CompressionConfig(memory="none")
    cfg = model_config_for(BASE, comp)
    params = init_params(BASE, jax.random.key(0))
    prompts = [[1, 2, 3, 4, 5], [9, 8], [7, 6, 5, 4, 3, 2, 1, 9], [11]]
    out = generate(cfg, comp, params, prompts, 7, record_logits=True, prefill_chunk=chunk)
    for row, prompt in enumerate(prompts):
        seq = prompt + out.tokens[row]
        from gist_jax.model.transformer import forward
        want = np.asarray(forward(cfg, params, jnp.asarray([seq])))[0]
        np.testing.assert_allclose(out.logits[row, :len(seq)], want, atol=1e-4, rtol=0)
        assert out.cache_stats[row]["entries"] == len(seq)


def test_long_prompt_bounded_cache():
    """A 32K-token prompt on a one-layer model: the cache holds s + n / r + (current segment)
    entries, allocated up front, against n for an uncompressed cache."""
    base = BASE.replace(num_layers=1)
    comp = CompressionConfig(memory="kv", granularity="fine", segment_length=256, ratios=(32,),
                             ratio_sampling="fixed", num_sinks=4)
    cfg = model_config_for(base, comp)
    params = add_gist_params(init_params(base, jax.random.key(0)), cfg)
    n = 32768
    prompt = np.random.default_rng(0).integers(0, 256, n).tolist()
    out = generate(cfg, comp, params, [prompt], 4)
    stats = out.cache_stats[0]
    assert stats["raw_tokens"] == n + 4
    assert stats["entries"] == 4 + (n // 256) * 8 + 4 + 0  # sinks + gists + 4 raw of the new segment
    assert stats["allocated_bytes"] <= (4 + (n // 256 + 1) * 8 + 256 + 8) * entry_bytes(cfg)
    assert stats["bytes"] * 20 < stats["uncompressed_bytes"]


def test_clear_errors():
    comp = comp_for("kv", "fine", "compressed", 0)
    cfg, params = model(comp)
    with pytest.raises(ConfigError, match="ratio=3"):
        generate(cfg, comp, params, [[1, 2]], 2, ratio=3)
    with pytest.raises(ConfigError, match="capacity"):
        generate(cfg, comp, params, [[1, 2]], 2, capacity=2)
    with pytest.raises(ValueError, match="non-empty"):
        generate(cfg, comp, params, [[]], 2)


@pytest.mark.slow
def test_smollm2_full_attention_matches_transformers_greedy(smollm2_gguf):
    from gist_jax.data.tokenizer import HFTokenizer
    from gist_jax.hf import reference
    from gist_jax.hf.importer import load_gguf

    cfg, params = load_gguf(smollm2_gguf, dtype="float32")
    tokenizer = HFTokenizer.from_gguf(smollm2_gguf)
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("def fibonacci(n):\n    ")]
    comp = CompressionConfig(memory="none")
    ours = generate(model_config_for(cfg, comp), comp, jax.device_put(params), prompts, 10).tokens
    torch_model = reference.load_transformers_gguf(smollm2_gguf)
    for prompt, got in zip(prompts, ours):
        assert got == reference.transformers_greedy(torch_model, prompt, 10)
