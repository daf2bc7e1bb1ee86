"""The structured attention paths (decomposed, flash, gist bank) against the dense-mask
reference: values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gist_helpers import BASE, comp_config, gist_kernel, model, tokens

from gist_jax.errors import ConfigError
from gist_jax.gist.config import CompressionConfig, check_gist_kernel
from gist_jax.gist.forward import compressed_logits, resolve_gist_kernel
from gist_jax.gist.layout import build_layout
from gist_jax.gist.partials import merge_partials, partial_attention
from gist_jax.gist.specs import layout_arrays, parallel_spec
from gist_jax.model.causal import dot_product_attention


def _dense_and_structured(comp, num_raw, per_segment_ratios=None, batch=2,
                          impls=("decomposed", "flash"), pre_padded=False, **kwargs):
    """Logits and parameter gradients of a random linear loss on live tokens, per path (the gist
    part of ``model.attention``; ``dense``, the reference, always runs first).
    ``pre_padded``: the token array is already zero-padded to whole segments."""
    cfg, params = model(comp)
    toks = tokens(batch, num_raw, seed=num_raw)
    layout = build_layout(num_raw, comp, per_segment_ratios)
    if pre_padded:
        toks = jnp.pad(toks, ((0, 0), (0, layout.padded_raw - num_raw)))
    arrays = layout_arrays(layout)
    weights = jax.random.normal(jax.random.key(3), (batch, layout.length, cfg.vocab_size))
    weights = weights * jnp.asarray(layout.alive)[None, :, None]
    out = {}
    for impl in ("dense",) + tuple(impls):
        kernel_cfg = gist_kernel(cfg, impl)

        def loss(p, kernel_cfg=kernel_cfg):
            logits = compressed_logits(kernel_cfg, comp, layout.shape, p, toks, arrays, **kwargs)
            return jnp.sum(logits * weights), logits

        out[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return layout, out


def _assert_equal(layout, out, what):
    (_, dense), g_dense = out["dense"]
    alive = layout.alive
    for impl in out.keys() - {"dense"}:
        (_, dec), g_dec = out[impl]
        np.testing.assert_allclose(dec[:, alive], dense[:, alive], atol=1e-5, rtol=0,
                                   err_msg=f"{impl} logits {what}")
        for a, b in zip(jax.tree.leaves(g_dec), jax.tree.leaves(g_dense)):
            np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(b).max())), rtol=0,
                                       err_msg=f"{impl} gradients {what}")


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
    layout, out = _dense_and_structured(comp, segments * seg_len)
    _assert_equal(layout, out, case)


def test_decomposed_dead_slots_padding_projections_per_slot():
    """Per-segment ratios (dead slots), a padded last segment, gist projections and per-slot
    embeddings at once (L = 8, ratios 2/8/4, 4 sinks)."""
    comp = comp_config("kv", "fine", "aligned", sinks=4, ratio=2, pad_to_segments=True,
                       gist_projections=True, gist_embedding="per_slot")
    layout, out = _dense_and_structured(comp, 21, per_segment_ratios=(2, 8, 4))
    assert (~layout.alive).sum() > 0
    _assert_equal(layout, out, "per-segment ratios")


def test_decomposed_stop_gradient_and_kv_layer():
    """``stop_gist_memory_gradient`` holds the same memory fixed; ``kv_layer`` still returns the
    layer's keys and values."""
    comp = comp_config("kv", "fine", sinks=2, ratio=4)
    layout, out = _dense_and_structured(comp, 24, batch=1, stop_gist_memory_gradient=True)
    _assert_equal(layout, out, "stop_gist_memory_gradient")
    cfg, params = model(comp)
    arrays, toks = layout_arrays(layout), tokens(1, 24)
    dense, dec = (jax.jit(lambda p, c=c: compressed_logits(c, comp, layout.shape, p, toks, arrays,
                                                           kv_layer=0))(params)
                  for c in (gist_kernel(cfg, "dense"), gist_kernel(cfg, "decomposed")))
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


@pytest.mark.parametrize("impl,expect_square", [("dense", True), ("decomposed", False), ("flash", False),
                                                ("split", False)])
def test_no_t_by_t_array_in_forward_or_backward(impl, expect_square):
    comp = comp_config("kv", "fine", sinks=4, ratio=4, segment_length=16)
    cfg, params = model(comp)
    cfg = gist_kernel(cfg, impl)
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
    """The gist kernel is the gist part of ``model.attention`` (auto by default: decomposed on
    CPU); ``check_gist_kernel`` refuses the ones a layout cannot run exactly, and a memory other
    than 'kv' ignores it (Coarse-Rec and full attention have no gist structure to run)."""
    assert BASE.kernels.gist == "auto"
    with pytest.raises(ConfigError, match="model.attention='splash,splash'"):
        check_gist_kernel("splash,splash", comp_config("kv", "fine"))  # splash is no gist kernel
    for impl in ("decomposed", "flash", "split", "bank", "auto", "dense"):  # no memory='kv': ignored
        check_gist_kernel(impl, comp_config("recurrent", "coarse"))
        check_gist_kernel(impl, comp_config("kv", "fine", "compressed", trainable="gist_only").full_attention())
    base = comp_config("kv", "fine", "aligned", trainable="gist_only").full_attention()  # evaluations build it
    assert (base.memory, base.trainable) == ("none", "all")
    assert comp_config("recurrent", "coarse", bptt_segments=2).full_attention().bptt_segments == 0
    with pytest.raises(ConfigError, match="positions='aligned'"):
        check_gist_kernel("bank", comp_config("kv", "fine", "compressed"))
    with pytest.raises(ConfigError, match="per_segment"):
        check_gist_kernel("cudnn,bank", CompressionConfig(memory="kv", ratios=(4, 8), ratio_sampling="per_segment",
                                                          positions="aligned"))
    check_gist_kernel("bank", comp_config("kv", "fine", "aligned"))  # aligned, one ratio: accepted


@pytest.mark.parametrize("layers", [dict(scan_layers=False, remat_policy="full")])
def test_decomposed_under_any_layer_layout_and_remat(layers):
    """Unrolled or scanned layers, with remat: the decomposed path's nested checkpoint and
    scan compose with the layer stack (values; gradients are covered above)."""
    from gist_jax.model.transformer import to_layout

    comp = comp_config("kv", "coarse", sinks=2, ratio=4)
    cfg, params = model(comp)
    layout = build_layout(32, comp)
    arrays, toks = layout_arrays(layout), tokens(1, 32)
    ref = compressed_logits(gist_kernel(cfg, "dense"), comp, layout.shape, params, toks, arrays)
    cfg2 = cfg.replace(**layers)
    out = jax.jit(lambda p: compressed_logits(gist_kernel(cfg2, "decomposed"), comp,
                                              layout.shape, p, toks, arrays))(to_layout(params, cfg2))
    np.testing.assert_allclose(out[:, layout.alive], ref[:, layout.alive], atol=1e-5)


# -- flash (memory prefix + one causal call) and gist bank (Splash) ---------------------------


def test_flash_dead_slots_projections_per_slot():
    """Per-segment ratios leave dead slots at segment tails; flash must still equal dense
    (whole segments, so the flash path really runs: ``resolve_gist_kernel`` keeps it)."""
    comp = comp_config("kv", "fine", "compressed", sinks=3, ratio=2, gist_projections=True,
                       gist_embedding="per_slot")
    assert resolve_gist_kernel("flash", whole_segments=True) == "flash"
    layout, out = _dense_and_structured(comp, 32, per_segment_ratios=(2, 8, 4, 8), impls=("flash",))
    assert (~layout.alive).sum() > 0
    _assert_equal(layout, out, "flash, per-segment ratios")


def test_flash_extended_rows_put_memory_in_front_of_each_segment():
    """The index tables: segment i's rows are its c_i memory entries (live, earlier segments),
    then its own tokens in order; outputs are read back from those rows."""
    from gist_jax.gist.flash import PrefixCausalKV

    comp = comp_config("kv", "coarse", sinks=2, ratio=4)
    layout = build_layout(24, comp, (4, 8, 4))
    arrays = layout_arrays(layout)
    flash = PrefixCausalKV.from_arrays(arrays, layout.shape)
    key_src, query_src, length, out_row = map(np.asarray, flash.extended_indices())
    m, ts, e = layout.memory_size, layout.shape.segment_tokens, layout.memory_size + layout.shape.segment_tokens
    live = np.asarray(arrays["buffer_live"])
    for i in range(layout.num_segments):
        c = length[i] - ts
        owner = np.concatenate([np.zeros(2, int), np.repeat(np.arange(3), layout.slots)])
        assert sorted(key_src[i, :c]) == list(np.nonzero(live & (owner < i))[0])
        assert list(key_src[i, c:c + ts] - m) == list(range(i * ts, (i + 1) * ts))
        assert list(query_src[i, c:c + ts]) == list(range(i * ts, (i + 1) * ts))
        assert list(out_row[i * ts:(i + 1) * ts]) == list(range(i * e + c, i * e + c + ts))
    assert list(length - ts) == [0, 2 + 2, 2 + 2 + 1]  # sinks, then 2 and 1 live gists


@pytest.mark.parametrize("granularity,sinks,ratio,segments,seg_len",
                         [("fine", 4, 4, 3, 16), ("fine", 0, 8, 2, 16), ("coarse", 3, 2, 4, 8),
                          ("coarse", 0, 4, 1, 16)])
def test_gist_bank_mask_function_is_the_dense_reference_mask(granularity, sinks, ratio, segments, seg_len):
    """The bank's arithmetic mask and permutation (no layout, no T x T host array) equal the
    dense reference mask (``parallel_spec``) in bank order; padding rows see only themselves."""
    from gist_jax.gist.bank import GistBankKV

    comp = comp_config("kv", granularity, "aligned", sinks, ratio=ratio, segment_length=seg_len)
    layout = build_layout(segments * seg_len, comp)
    bank = GistBankKV.for_shape(layout.shape, comp, block=32)
    t, tp = layout.length, bank.padded_length
    perm = np.concatenate([np.nonzero(layout.is_gist)[0], np.nonzero(~layout.is_gist)[0]])
    np.testing.assert_array_equal(bank.permutation()[:t], perm)
    assert (bank.permutation()[t:] == -1).all() and tp % 32 == 0
    ids = np.arange(tp)
    mask = bank.mask_function(ids[:, None], ids[None, :])
    spec = parallel_spec(layout_arrays(layout), comp, batch=1)  # aligned: one position per key
    dense = np.asarray(spec.mask[0] | spec.memory_mask[0])
    np.testing.assert_array_equal(mask[:t, :t], dense[perm][:, perm])
    np.testing.assert_array_equal(mask[t:], np.eye(tp, dtype=bool)[t:])
    # No leak, read off the arithmetic mask itself: a raw row never sees a raw row of an earlier
    # segment unless that row is a sink.
    seg, _, gist, sink = bank._rows(ids[:t])
    raw_leak = (~gist[:, None] & ~gist[None, :] & (seg[None, :] < seg[:, None]) & ~sink[None, :])
    assert not (mask[:t, :t] & raw_leak).any() and (mask[:t, :t] & sink[None, :]).any() == (sinks > 0)
    assert not mask[:t, t:].any()
    jax_mask = bank.mask_function(jnp.asarray(ids)[:, None], jnp.asarray(ids)[None, :])
    np.testing.assert_array_equal(np.asarray(jax_mask), mask)  # the in-kernel (jax) evaluation


@pytest.mark.parametrize("granularity,sinks", [("fine", 4), ("coarse", 1)])
def test_gist_bank_model_equals_dense(granularity, sinks):
    """The whole model with the gist kernel 'bank' (Splash in Pallas interpret mode on CPU):
    logits and parameter gradients equal the dense reference, aligned scheme."""
    comp = comp_config("kv", granularity, "aligned", sinks, ratio=4, segment_length=16)
    layout, out = _dense_and_structured(comp, 48, batch=1, impls=("bank",))
    _assert_equal(layout, out, f"bank {granularity}")


@pytest.mark.parametrize("granularity", ["fine", "coarse"])
def test_pre_padded_tokens_every_path_equals_dense(granularity):
    """Tokens the caller already padded to whole segments (``pad_to_segments``, 37 raw tokens in
    3 segments of 16): the padding is still dead, so decomposed, flash and bank equal dense in
    values and gradients at every live position, the gists after the padding included. Whole
    segments is the layout's (``LayoutShape.whole_segments``), not the token array's width:
    flash and bank once took the padded width for whole segments and let the last segment's
    gists attend to the padding (gist logits off by ~1e-2)."""
    comp = comp_config("kv", granularity, "aligned", sinks=2, ratio=4, segment_length=16,
                       pad_to_segments=True)
    layout, out = _dense_and_structured(comp, 37, batch=1, impls=("decomposed", "flash", "bank"),
                                        pre_padded=True)
    assert not layout.shape.whole_segments and layout.padded_raw == 48
    last = layout.segment == layout.num_segments - 1
    assert (layout.is_gist & layout.alive & last).sum() == 4  # compared below, after the padding
    _assert_equal(layout, out, f"pre-padded {granularity}")
    assert build_layout(48, comp).shape.whole_segments


def test_resolve_gist_kernel_on_this_backend():
    cpu = jax.default_backend() == "cpu"
    assert resolve_gist_kernel("auto") == ("decomposed" if cpu else "flash")
    assert resolve_gist_kernel("auto", compute_dtype="float32") == "decomposed"
    assert resolve_gist_kernel("bank") == ("bank" if cpu else "flash")
    assert resolve_gist_kernel("flash", whole_segments=False) == "decomposed"
    assert resolve_gist_kernel("bank", whole_segments=False) == "decomposed"
    assert resolve_gist_kernel("dense", whole_segments=False) == "dense"


def test_gist_bank_under_a_sharded_mesh():
    """Inside the train step's activation mesh (data 2 x fsdp 2 x tensor 2 on 8 CPU devices) the
    Splash kernel runs under shard_map over batch and heads, and still equals dense."""
    from jax.sharding import Mesh

    from gist_jax.model.sharding import MESH_AXES, activation_mesh

    comp = comp_config("kv", "fine", "aligned", sinks=2, ratio=4, segment_length=16)
    cfg, params = model(comp)
    layout = build_layout(32, comp)
    arrays, toks = layout_arrays(layout), tokens(4, 32)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 1, 2), MESH_AXES)
    weights = jax.random.normal(jax.random.key(3), (4, layout.length, cfg.vocab_size))
    weights = weights * jnp.asarray(layout.alive)[None, :, None]

    def loss(p, impl):
        with activation_mesh(mesh):
            logits = compressed_logits(gist_kernel(cfg, impl), comp, layout.shape, p, toks, arrays)
        return jnp.sum(logits * weights)

    assert "shard_map" in str(jax.make_jaxpr(lambda p: loss(p, "bank"))(params))
    (ref, g_ref), (out, g_out) = (jax.jit(jax.value_and_grad(lambda p, i=i: loss(p, i)))(params)
                                  for i in ("dense", "bank"))
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_out), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(b).max())), rtol=0)


@pytest.mark.parametrize("attention,comp", [
    ("flash", comp_config("kv", "fine", sinks=2, trainable="gist_only")),
    ("auto", comp_config("recurrent", "coarse", sinks=2, bptt_segments=1)),
], ids=["flash-gist_only", "recurrent-bptt"])
def test_in_training_perplexity_builds_its_full_attention_baseline(attention, comp):
    """The evaluator's full-attention setting comes from ``comp.full_attention()``; with
    ``replace(memory='none')`` these configs failed validation at the first eval. A named gist
    kernel (flash) stays on the model config and the full-attention setting ignores it."""
    from gist_jax.train.evaluation import PerplexityEvaluator

    _, params = model(comp)
    toks = tokens(2, 32)
    batch = {"tokens": toks, "loss_mask": jnp.ones(toks.shape, bool)}
    out = PerplexityEvaluator(BASE.replace(attention=attention), comp, 32, [batch])(params)
    assert set(out) == {"eval/ppl_full", "eval/ppl_local", "eval/ppl_r4", "eval/efficacy_r4", "eval/tokens"}
    assert all(np.isfinite(v) and v > 1 for k, v in out.items() if k.startswith("eval/ppl") or k == "eval/tokens")
