"""The decomposed attention path against the dense-mask reference: values and gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gist_helpers import comp_config, model, tokens

from gist_jax.gist.layout import build_layout
from gist_jax.gist.parallel import compressed_logits
from gist_jax.gist.specs import layout_arrays, parallel_spec
from gist_jax.gist.structured import merge_partials, partial_attention
from gist_jax.model.attention import dot_product_attention
from gist_jax.model.config import ConfigError


def _dense_and_decomposed(comp, num_raw, per_segment_ratios=None, batch=2, **kwargs):
    """Logits and parameter gradients of a random linear loss on live tokens, both paths."""
    cfg, params = model(comp)
    toks = tokens(batch, num_raw, seed=num_raw)
    layout = build_layout(num_raw, comp, per_segment_ratios)
    arrays = layout_arrays(layout)
    weights = jax.random.normal(jax.random.key(3), (batch, layout.length, cfg.vocab_size))
    weights = weights * jnp.asarray(layout.alive)[None, :, None]
    out = {}
    for impl in ("dense", "decomposed"):
        c = comp.replace(attention_impl=impl)

        def loss(p, c=c):
            logits = compressed_logits(cfg, c, layout.shape, p, toks, arrays, **kwargs)
            return jnp.sum(logits * weights), logits

        out[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return layout, out


def _assert_equal(layout, out, what):
    (_, dense), g_dense = out["dense"]
    (_, dec), g_dec = out["decomposed"]
    alive = layout.alive
    np.testing.assert_allclose(dec[:, alive], dense[:, alive], atol=1e-5, rtol=0, err_msg=f"logits {what}")
    for a, b in zip(jax.tree.leaves(g_dec), jax.tree.leaves(g_dense)):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(b).max())), rtol=0,
                                   err_msg=f"gradients {what}")


# (granularity, positions, sinks, segment_length L, ratio r, segments): both schemes, fine and
# coarse, L 8/16, r 2/4/8, sinks 0/1/3/4, 1 to 4 segments (more below).
CASES = [
    ("fine", "compressed", 0, 8, 4, 3),
    ("fine", "compressed", 4, 16, 8, 3),
    ("fine", "aligned", 3, 8, 2, 4),
    ("coarse", "compressed", 1, 8, 2, 4),
    ("coarse", "aligned", 4, 8, 8, 3),
    ("coarse", "aligned", 0, 16, 2, 1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_decomposed_equals_dense(case):
    granularity, positions, sinks, seg_len, ratio, segments = case
    comp = comp_config("kv", granularity, positions, sinks, ratio=ratio, segment_length=seg_len)
    layout, out = _dense_and_decomposed(comp, segments * seg_len)
    _assert_equal(layout, out, case)


def test_decomposed_dead_slots_padding_projections_per_slot():
    """Per-segment ratios (dead slots), a padded last segment, gist projections and per-slot
    embeddings at once (L = 8, ratios 2/8/4, 4 sinks)."""
    comp = comp_config("kv", "fine", "aligned", sinks=4, ratio=2, pad_to_segments=True,
                       gist_projections=True, gist_embedding="per_slot")
    layout, out = _dense_and_decomposed(comp, 21, per_segment_ratios=(2, 8, 4))
    assert (~layout.alive).sum() > 0
    _assert_equal(layout, out, "per-segment ratios")


def test_decomposed_stop_gradient_and_kv_layer():
    """``stop_gist_memory_gradient`` holds the same memory fixed; ``kv_layer`` still returns the
    layer's keys and values."""
    comp = comp_config("kv", "fine", sinks=2, ratio=4)
    layout, out = _dense_and_decomposed(comp, 24, batch=1, stop_gist_memory_gradient=True)
    _assert_equal(layout, out, "stop_gist_memory_gradient")
    cfg, params = model(comp)
    arrays, toks = layout_arrays(layout), tokens(1, 24)
    dense, dec = (jax.jit(lambda p, c=c: compressed_logits(cfg, c, layout.shape, p, toks, arrays,
                                                           kv_layer=0))(params)
                  for c in (comp, comp.replace(attention_impl="decomposed")))
    np.testing.assert_allclose(dec[1][1], dense[1][1], atol=1e-6)


def test_merge_of_partials_is_one_softmax():
    """Splitting the keys anywhere and merging by log-sum-exp is the softmax over all keys,
    including rows that see nothing in one part."""
    kq, kk, kv, km = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (2, 5, 4, 8))
    k = jax.random.normal(kk, (2, 7, 2, 8))
    v = jax.random.normal(kv, (2, 7, 2, 8))
    mask = jax.random.bernoulli(km, 0.6, (2, 5, 7)).at[:, :, 0].set(True)
    mask = mask.at[:, 1, 3:].set(False)  # row 1 sees nothing in the second part
    ref = dot_product_attention(q, k, v, mask)
    o1, l1 = partial_attention(q, k[:, :3], v[:, :3], mask[:, :, :3])
    o2, l2 = partial_attention(q, k[:, 3:], v[:, 3:], mask[:, :, 3:])
    np.testing.assert_allclose(merge_partials(o1, l1, o2, l2), ref, atol=1e-6)


def _avals(jaxpr):
    """Every intermediate shape in a jaxpr, sub-jaxprs (scan, remat, jit) included."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


@pytest.mark.parametrize("impl,expect_square", [("dense", True), ("decomposed", False)])
def test_no_t_by_t_array_in_forward_or_backward(impl, expect_square):
    comp = comp_config("kv", "fine", sinks=4, ratio=4, segment_length=16, attention_impl=impl)
    cfg, params = model(comp.replace(attention_impl="dense"))
    layout = build_layout(64, comp)
    arrays, toks = layout_arrays(layout), tokens(1, 64)
    t = layout.length

    def loss(p):
        return jnp.sum(compressed_logits(cfg, comp, layout.shape, p, toks, arrays))

    shapes = list(_avals(jax.make_jaxpr(jax.grad(loss))(params).jaxpr))
    # T = 80 here; no other dimension of the tiny model is 80 or 160.
    square = [s for s in shapes if sum(d in (t, 2 * t) for d in s) >= 2]
    assert bool(square) == expect_square, square[:3]


def test_config_selects_and_rejects():
    assert comp_config("kv", "coarse").attention_impl == "dense"
    with pytest.raises(ConfigError, match="attention_impl"):
        comp_config("kv", "fine", attention_impl="flash")
    with pytest.raises(ConfigError, match="memory='kv'"):
        comp_config("recurrent", "coarse", attention_impl="decomposed")


@pytest.mark.parametrize("layers", [dict(scan_layers=False, remat_policy="full")])
def test_decomposed_under_any_layer_layout_and_remat(layers):
    """Unrolled or scanned layers, with remat: the decomposed path's nested checkpoint and
    scan compose with the layer stack (values; gradients are covered above)."""
    from gist_jax.model.transformer import to_layout

    comp = comp_config("kv", "coarse", sinks=2, ratio=4)
    cfg, params = model(comp)
    layout = build_layout(32, comp)
    arrays, toks = layout_arrays(layout), tokens(1, 32)
    ref = compressed_logits(cfg, comp, layout.shape, params, toks, arrays)
    cfg2 = cfg.replace(**layers)
    out = jax.jit(lambda p: compressed_logits(cfg2, comp.replace(attention_impl="decomposed"),
                                              layout.shape, p, toks, arrays))(to_layout(params, cfg2))
    np.testing.assert_allclose(out[:, layout.alive], ref[:, layout.alive], atol=1e-5)


@pytest.mark.parametrize("granularity,sinks,ratio", [("fine", 4, 4)])
def test_gist_bank_splash_interpret_equals_dense(granularity, sinks, ratio):
    """Gist bank (Splash, Pallas interpret mode on CPU) vs the dense masked attention, values
    and gradients, aligned scheme (one position per key)."""
    from gist_jax.gist.structured import gist_bank_attention, gist_bank_mask

    comp = comp_config("kv", granularity, "aligned", sinks, ratio=ratio, segment_length=32)
    layout = build_layout(96, comp)
    _, bank_mask = gist_bank_mask(layout)
    assert bank_mask.shape == (128, 128)
    spec = parallel_spec(layout_arrays(layout), comp, batch=1)
    dense_mask = spec.mask | spec.memory_mask
    keys = jax.random.split(jax.random.key(0), 3)
    t = layout.length
    q = jax.random.normal(keys[0], (1, t, 4, 16))
    k = jax.random.normal(keys[1], (1, t, 2, 16))
    v = jax.random.normal(keys[2], (1, t, 2, 16))
    live = jnp.asarray(layout.alive)[None, :, None, None]

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v)) * live)

    bank = functools.partial(gist_bank_attention, layout=layout)
    dense = lambda q, k, v: dot_product_attention(q, k, v, dense_mask)  # noqa: E731
    np.testing.assert_allclose(bank(q, k, v), dense(q, k, v), atol=1e-5)
    for a, b in zip(jax.grad(functools.partial(loss, bank), (0, 1, 2))(q, k, v),
                    jax.grad(functools.partial(loss, dense), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-5)
