"""Compression core invariants: no leak, truncation, full-attention identity, compile counts,
gist parameters and config validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gist_helpers import BASE, comp_config, gist_kernel, model, tokens

from gist_jax.errors import ConfigError
from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.forward import compressed_logits
from gist_jax.gist.layout import build_layout, cached_layout, sample_ratios
from gist_jax.gist.params import add_gist_params, model_config_for, trainable_mask
from gist_jax.gist.specs import layout_arrays, parallel_spec
from gist_jax.model.transformer import forward, init_params

VARIANTS = [("kv", "fine"), ("kv", "coarse"), ("recurrent", "coarse")]


def _raw_embedding_grads(comp, stop, segments=3, loss_segment=2, gist="dense"):
    """|d loss / d raw embedding| per raw token, the loss on ``loss_segment``; ``gist``: the gist
    kernel of a KV pass (default the dense reference masks; other memories ignore it)."""
    cfg, params = model(comp)
    cfg = gist_kernel(cfg, gist)
    n = segments * comp.segment_length
    toks = tokens(1, n, seed=3)
    layout = build_layout(n, comp)
    arrays = layout_arrays(layout)
    raw_embeds = params["embed"]["embedding"][toks]
    weights = jax.random.normal(jax.random.key(9), (1, layout.length, cfg.vocab_size))
    weights = weights * jnp.asarray((layout.segment == loss_segment) & layout.alive)[None, :, None]

    def loss(e):
        logits = compressed_logits(cfg, comp, layout.shape, params, toks, arrays,
                                   raw_embeds_BxNxE=e, stop_gist_memory_gradient=stop)
        return jnp.sum(logits * weights)

    return np.abs(np.asarray(jax.jit(jax.grad(loss))(raw_embeds))[0]).sum(-1)  # [N]


@pytest.mark.parametrize("memory,granularity", VARIANTS)
@pytest.mark.parametrize("positions", ["compressed", "aligned"])
def test_no_leak_raw_tokens_reach_later_segments_only_through_gists(memory, granularity, positions):
    comp = comp_config(memory, granularity, positions, sinks=2, ratio=4)
    L, s = comp.segment_length, comp.num_sinks
    held = _raw_embedding_grads(comp, stop=True)
    earlier = np.arange(2 * L)
    assert np.all(held[earlier[s:]] == 0.0), "a raw token leaked past its segment"
    assert np.all(held[:s] > 0), "sinks must stay visible to later segments"
    assert np.all(held[2 * L:] > 0)
    free = _raw_embedding_grads(comp, stop=False)
    assert np.all(free[earlier[s:]] > 0), "earlier segments must reach later ones through gists"


@pytest.mark.parametrize("impl", ["decomposed", "flash"])
@pytest.mark.parametrize("granularity", ["fine", "coarse"])
@pytest.mark.parametrize("positions", ["compressed", "aligned"])
def test_no_leak_in_structured_attention(impl, granularity, positions):
    """The same no-leak check on the structured KV paths (the gist bank's mask is checked in
    tests/test_structured_attention.py: it has one view per key, so no held-memory switch)."""
    comp = comp_config("kv", granularity, positions, sinks=2, ratio=4)
    L, s = comp.segment_length, comp.num_sinks
    held = _raw_embedding_grads(comp, stop=True, gist=impl)
    assert np.all(held[s:2 * L] == 0.0), "a raw token leaked past its segment"
    assert np.all(held[:s] > 0) and np.all(held[2 * L:] > 0)
    assert np.all(_raw_embedding_grads(comp, stop=False, gist=impl)[s:2 * L] > 0)


@pytest.mark.parametrize("positions", ["compressed", "aligned"])
def test_parallel_masks_never_connect_raw_tokens_across_segments(positions):
    for granularity in ("fine", "coarse"):
        comp = comp_config("kv", granularity, positions, sinks=3, ratio=2)
        layout = build_layout(32, comp)
        spec = parallel_spec(layout_arrays(layout), comp, batch=1)
        visible = np.asarray(spec.mask[0] | spec.memory_mask[0])
        raw = ~layout.is_gist
        other_earlier = layout.segment[None, :] < layout.segment[:, None]
        leak = visible & raw[:, None] & raw[None, :] & other_earlier & ~layout.is_sink[None, :]
        assert not leak.any()
        assert not (np.asarray(spec.mask[0]) & np.asarray(spec.memory_mask[0])).any()


def test_recurrent_truncation_changes_only_the_cut_paths():
    def grads(k):
        return _raw_embedding_grads(comp_config("recurrent", "coarse", sinks=0, bptt_segments=k),
                                    stop=False, segments=4, loss_segment=3)

    full, cut, wide = grads(0), grads(1), grads(3)
    L = 8
    np.testing.assert_array_equal(wide, full)  # K >= segments - 1 cuts nothing
    np.testing.assert_allclose(cut[2 * L:], full[2 * L:], rtol=1e-5)  # own + newest memory
    for seg in (0, 1):  # the direct paths are gone, the path through later gists remains
        part = slice(seg * L, (seg + 1) * L)
        assert not np.allclose(cut[part], full[part], rtol=1e-3)
        assert np.all(cut[part] > 0)


def test_truncation_leaves_the_forward_unchanged():
    out = []
    for k in (0, 1):
        comp = comp_config("recurrent", "coarse", bptt_segments=k)
        cfg, params = model(comp_config("recurrent", "coarse"))
        layout = build_layout(32, comp)
        out.append(compressed_logits(cfg, comp, layout.shape, params, tokens(1, 32), layout_arrays(layout)))
    np.testing.assert_array_equal(out[0], out[1])


def test_full_attention_is_the_plain_model_bit_for_bit():
    comp = CompressionConfig(memory="none", segment_length=8, ratios=(4,), ratio_sampling="fixed")
    cfg = model_config_for(BASE, comp)
    assert cfg == BASE
    params = init_params(BASE, jax.random.key(0))
    toks = tokens(2, 24)
    layout = build_layout(24, comp)
    ours = compressed_logits(cfg, comp, layout.shape, params, toks, layout_arrays(layout))
    np.testing.assert_array_equal(ours, forward(BASE, params, toks))
    np.testing.assert_array_equal(layout.raw_index, np.arange(24))


def test_ratio_mixing_compiles_once_per_ratio():
    comp = CompressionConfig(memory="kv", granularity="fine", segment_length=32,
                             ratios=(4, 8, 16, 32), ratio_sampling="per_instance", num_sinks=2)
    cfg, params = model(comp)
    step = jax.jit(compressed_logits, static_argnums=(0, 1, 2))
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(10):
        ratios, slots = sample_ratios(comp, 2, rng)
        seen.add(ratios[0])
        layout = cached_layout(64, comp, ratios, slots)
        step(cfg, comp, layout.shape, params, tokens(1, 64), layout_arrays(layout))
    assert len(seen) >= 3
    assert step._cache_size() == len(seen)

    per_segment = comp.replace(ratio_sampling="per_segment")
    cfg2, params2 = model(per_segment)
    # A separate function object: jit caches are shared between wrappers of the same function.
    def fresh_logits(*a):
        return compressed_logits(*a)

    step2 = jax.jit(fresh_logits, static_argnums=(0, 1, 2))
    drawn = set()
    for _ in range(5):
        ratios, slots = sample_ratios(per_segment, 2, rng)
        drawn.add(ratios)
        layout = cached_layout(64, per_segment, ratios, slots)
        step2(cfg2, per_segment, layout.shape, params2, tokens(1, 64), layout_arrays(layout))
    assert len(drawn) > 1 and step2._cache_size() == 1


def test_gist_params_initialisation_and_trainable_mask():
    comp = comp_config("kv", "fine", gist_projections=True, gist_embedding="per_slot",
                       trainable="gist_only")
    cfg = model_config_for(BASE, comp)
    assert cfg.num_gist_embeddings == comp.segment_length // 4 and cfg.gist_projections
    base = init_params(BASE, jax.random.key(0))
    params = add_gist_params(base, cfg)
    expected = base["embed"]["embedding"][BASE.eos_token_id]
    np.testing.assert_array_equal(params["gist_embedding"], np.broadcast_to(expected, (2, 64)))
    attn = params["layers"]["attn"]
    for proj in ("q_proj", "k_proj", "v_proj"):
        np.testing.assert_array_equal(attn[f"gist_{proj}"]["kernel"], attn[proj]["kernel"])
    # The tree add_gist_params builds is exactly the tree the gist model initialises.
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(params))
    mask = trainable_mask(params, comp)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    trained = sorted(jax.tree_util.keystr(p) for p, m in flat if m)
    assert trained == sorted([
        "['gist_embedding']", "['layers']['attn']['gist_k_proj']['kernel']",
        "['layers']['attn']['gist_q_proj']['kernel']", "['layers']['attn']['gist_v_proj']['kernel']"])
    assert all(jax.tree.leaves(trainable_mask(params, comp.replace(trainable="all"))))


def test_gist_projections_apply_only_at_gist_positions():
    """Coarse-KV segment 0 raw tokens never see a gist, so perturbing the gist projections
    leaves them unchanged while the gists themselves and later segments change."""
    comp = comp_config("kv", "coarse", gist_projections=True)
    cfg, params = model(comp)
    layout = build_layout(16, comp)
    run = lambda p: compressed_logits(cfg, comp, layout.shape, p, tokens(1, 16), layout_arrays(layout))
    changed = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 1.5 if "gist_k_proj" in jax.tree_util.keystr(path) or
        "gist_q_proj" in jax.tree_util.keystr(path) else x, params)
    before, after = run(params), run(changed)
    first_raw = (layout.segment == 0) & ~layout.is_gist
    np.testing.assert_array_equal(before[:, first_raw], after[:, first_raw])
    assert float(jnp.abs(before - after)[:, layout.segment == 1].max()) > 1e-4


@pytest.mark.parametrize("kwargs,key", [
    (dict(memory="recurrent", granularity="fine"), "granularity='fine'"),
    (dict(segment_length=10, ratios=(4,)), "segment_length=10"),
    (dict(num_sinks=8, segment_length=8, ratios=(4,)), "num_sinks"),
    (dict(ratio_sampling="fixed", ratios=(4, 8)), "ratio_sampling='fixed'"),
    (dict(memory="disk"), "compression.memory"),
    (dict(positions="absolute"), "compression.positions"),
    (dict(bptt_segments=2, memory="kv"), "bptt_segments"),
])
def test_invalid_compression_config_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(")", r"\)")):
        CompressionConfig(**kwargs)


def test_sequence_not_whole_segments_needs_padding():
    comp = comp_config("kv", "fine")
    with pytest.raises(ConfigError, match="pad_to_segments"):
        build_layout(20, comp)
    assert build_layout(20, comp.replace(pad_to_segments=True)).num_segments == 3
