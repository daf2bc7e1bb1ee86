"""Parallel training paths against the sequential reference, for every variant."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gist_helpers import comp_config, model, tokens

from gist_jax.gist.forward import compressed_logits
from gist_jax.gist.layout import build_layout
from gist_jax.gist.sequential import sequential_logits
from gist_jax.gist.specs import layout_arrays

# (ratio, segments): covers ratios 2/4/8 and 1..4 segments of L = 8.
CASES = [(2, 1), (4, 2), (8, 3), (2, 4), (4, 4)]


def _loss_weights(layout, vocab):
    w = jax.random.normal(jax.random.key(5), (2, layout.length, vocab))
    return w * jnp.asarray(layout.alive)[None, :, None]


def _both(comp, ratio_segments, per_segment_ratios=None, num_raw=None):
    """Logits and parameter gradients of a random linear loss, parallel and sequential, jitted."""
    ratio, segments = ratio_segments
    comp = comp.replace(ratios=(ratio,))
    cfg, params = model(comp)
    n = num_raw or segments * comp.segment_length
    toks = tokens(2, n, seed=segments)
    layout = build_layout(n, comp, per_segment_ratios)
    arrays = layout_arrays(layout)
    weights = _loss_weights(layout, cfg.vocab_size)

    def par_loss(p):
        logits = compressed_logits(cfg, comp, layout.shape, p, toks, arrays)
        return jnp.sum(logits * weights), logits

    def seq_loss(p):
        logits = sequential_logits(cfg, comp, layout, p, toks)
        return jnp.sum(logits * weights), logits

    (_, par), g_par = jax.jit(jax.value_and_grad(par_loss, has_aux=True))(params)
    (_, seq), g_seq = jax.jit(jax.value_and_grad(seq_loss, has_aux=True))(params)
    return layout, par, seq, g_par, g_seq


def _assert_match(layout, par, seq, g_par, g_seq, case):
    alive = layout.alive
    np.testing.assert_allclose(par[:, alive], seq[:, alive], atol=1e-5, rtol=0,
                               err_msg=f"logits, (ratio, segments) = {case}")
    for a, b in zip(jax.tree.leaves(g_par), jax.tree.leaves(g_seq)):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(b).max())), rtol=0,
                                   err_msg=f"gradients, (ratio, segments) = {case}")


KV_COMBOS = [(g, p, s) for g in ("fine", "coarse") for p in ("compressed", "aligned") for s in (0, 4)]


@pytest.mark.parametrize("combo", range(len(KV_COMBOS)))
def test_kv_parallel_equals_sequential(combo):
    """Each (granularity, positions, sinks) combination gets two (ratio, segments) cases;
    together the combinations cover ratios 2/4/8 and 1 to 4 segments for every variant."""
    granularity, positions, sinks = KV_COMBOS[combo]
    comp = comp_config("kv", granularity, positions, sinks)
    for case in (CASES[combo % len(CASES)], CASES[(combo + 2) % len(CASES)]):
        _assert_match(*_both(comp, case), case)


@pytest.mark.parametrize("positions,sinks,case", [("compressed", 0, (2, 1)), ("compressed", 4, (4, 3)),
                                                  ("aligned", 0, (8, 4)), ("aligned", 4, (2, 2))])
def test_recurrent_scan_equals_sequential(positions, sinks, case):
    comp = comp_config("recurrent", "coarse", positions, sinks)
    _assert_match(*_both(comp, case), case)


@pytest.mark.parametrize("bptt", [1, 2])
def test_recurrent_truncation_scan_equals_sequential(bptt):
    comp = comp_config("recurrent", "coarse", sinks=4, bptt_segments=bptt)
    _assert_match(*_both(comp, (4, 4)), (4, 4))


def test_gist_projections_and_per_slot_embeddings_match_sequential():
    comp = comp_config("kv", "fine", sinks=4, gist_projections=True, gist_embedding="per_slot")
    _assert_match(*_both(comp, (4, 3)), (4, 3))


def test_memory_is_actually_used():
    """Guard against a trivial pass: later segments must depend on earlier ones."""
    for comp in (comp_config("kv", "fine"), comp_config("kv", "coarse"),
                 comp_config("recurrent", "coarse")):
        cfg, params = model(comp)
        layout = build_layout(24, comp)
        a = tokens(1, 24, seed=1)
        b = a.at[:, :8].set((a[:, :8] + 7) % cfg.vocab_size)  # change segment 0 only
        arrays = layout_arrays(layout)
        la = compressed_logits(cfg, comp, layout.shape, params, a, arrays)
        lb = compressed_logits(cfg, comp, layout.shape, params, b, arrays)
        last = layout.segment == 2
        assert float(jnp.abs(la - lb)[:, last].max()) > 1e-4


@pytest.mark.parametrize("memory,granularity", [("kv", "fine"), ("kv", "coarse"),
                                                ("recurrent", "coarse")])
def test_per_segment_ratios_with_dead_slots_and_padding(memory, granularity):
    """Beacon-style mixed ratios (segments padded to L / min r slots) and a sequence that is
    not a whole number of segments (pad_to_segments): dead slots and padding change nothing."""
    comp = comp_config(memory, granularity, sinks=4, pad_to_segments=True)
    layout, par, seq, g_par, g_seq = _both(comp, (2, 3), per_segment_ratios=(2, 8, 4), num_raw=21)
    assert layout.slots == 4 and (~layout.alive).sum() == (4 - 1) + (4 - 2) + 3
    _assert_match(layout, par, seq, g_par, g_seq, "per-segment")


@pytest.mark.parametrize("layers", [dict(scan_layers=False), dict(remat_policy="full"),
                                    dict(scan_layers=False, remat_policy="dots")])
def test_sequential_memory_works_with_any_layer_layout(layers):
    """The carried KV memory is collected per layer whether layers are scanned, unrolled or
    rematerialised."""
    from gist_jax.model.transformer import to_layout

    comp = comp_config("kv", "fine", sinks=2, gist_projections=True)
    cfg, params = model(comp)
    layout = build_layout(24, comp)
    toks = tokens(1, 24)
    reference = sequential_logits(cfg, comp, layout, params, toks)
    cfg2 = cfg.replace(**layers)
    params2 = to_layout(params, cfg2)
    for logits in (sequential_logits(cfg2, comp, layout, params2, toks),
                   compressed_logits(cfg2, comp, layout.shape, params2, toks, layout_arrays(layout))):
        np.testing.assert_allclose(logits[:, layout.alive], reference[:, layout.alive], atol=1e-5)


def test_recurrent_scan_with_layer_remat_matches():
    """The model's own remat policy inside a segment step changes neither values nor gradients."""
    from gist_jax.model.transformer import to_layout

    comp = comp_config("recurrent", "coarse", sinks=2)
    cfg, params = model(comp)
    layout = build_layout(32, comp)
    arrays, toks = layout_arrays(layout), tokens(2, 32)
    weights = _loss_weights(layout, cfg.vocab_size)
    cfg2 = cfg.replace(remat_policy="full")
    params2 = to_layout(params, cfg2)

    def loss(p, c):
        return jnp.sum(compressed_logits(c, comp, layout.shape, p, toks, arrays) * weights)

    ref, g_ref = jax.jit(jax.value_and_grad(lambda p: loss(p, cfg)))(params)
    out, g_out = jax.jit(jax.value_and_grad(lambda p: loss(p, cfg2)))(params2)
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_out), jax.tree.leaves(to_layout(g_ref, cfg2))):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(b).max())), rtol=0)


@pytest.mark.parametrize("options", [dict(bptt_segments=0), dict(bptt_segments=1), dict(stop_memory=True)],
                         ids=["all", "bptt1", "stop"])
def test_recurrent_backward_equals_plain_autodiff(options, monkeypatch):
    """The custom backward (rebuild step i's memory from the final buffer, recompute the step)
    against plain autodiff of the same scan, for every input it differentiates: parameters,
    raw-token embeddings of the sinks and segments (probes), layer KV outputs (AE) and hidden
    states (``head=False``), with truncation and with the memory's gradient stopped."""
    from gist_jax.gist import recurrent

    comp = comp_config("recurrent", "coarse", sinks=2, bptt_segments=options.get("bptt_segments", 0))
    cfg, params = model(comp)
    layout = build_layout(24, comp)
    arrays, toks = layout_arrays(layout), tokens(2, 24)
    embeds = jax.random.normal(jax.random.key(2), (2, 24, cfg.hidden_size))
    w_h = jax.random.normal(jax.random.key(3), (2, layout.length, cfg.hidden_size)) * layout.alive[None, :, None]
    w_k = jax.random.normal(jax.random.key(4), (2, layout.length, cfg.num_kv_heads, cfg.head_dim))

    def loss(p, e):
        hidden, (k, v) = recurrent.recurrent_scan(cfg, comp, layout.shape, p, toks, arrays, raw_embeds_BxNxE=e,
                                                  head=False, kv_layer=1,
                                                  stop_gist_memory_gradient=options.get("stop_memory", False))
        return jnp.sum(hidden * w_h) + jnp.sum((k + v) * w_k)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, embeds)
    monkeypatch.setattr(recurrent, "_segments", lambda *args: recurrent._forward(*args)[1])
    ref_value, ref_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, embeds)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    assert float(jnp.abs(ref_grads[1][:, :2]).max()) > 0  # the sinks' embeddings do reach the loss
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(b).max())), rtol=0)


def test_recurrent_backward_memory_is_linear_in_segments(monkeypatch):
    """Differentiating the scan keeps every step's memory buffer and activations, O(S^2) in the
    segment count; the custom backward holds the buffer once. Compiled temporary memory of the
    gradient at 32 and 64 segments of 8 tokens with 4 gist slots each (a buffer much longer
    than a segment, where the quadratic term shows), with and without the custom backward. The
    causal kernel's tiles are shrunk to 32 rows, as the default 512 are at long context: one
    step's own attention over ``[sinks | buffer | segment]`` is bounded by its tiles then."""
    from gist_jax.gist import recurrent
    from gist_jax.model import causal

    monkeypatch.setattr(causal, "DEFAULT_BLOCK", 32)
    comp = comp_config("recurrent", "coarse", sinks=2, ratio=2)
    cfg, params = model(comp)

    def temp_bytes(segments):
        n = segments * comp.segment_length
        layout = build_layout(n, comp)
        arrays, toks = layout_arrays(layout), tokens(1, n)

        def loss(p):
            return jnp.sum(compressed_logits(cfg, comp, layout.shape, p, toks, arrays)[:, :, 0])

        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    growth = temp_bytes(64) / temp_bytes(32)
    monkeypatch.setattr(recurrent, "_segments", lambda *args: recurrent._forward(*args)[1])
    plain_growth = temp_bytes(64) / temp_bytes(32)
    assert plain_growth > 2.5, plain_growth  # the test bites: plain autodiff is quadratic here
    assert growth <= 2.1, (growth, plain_growth)
