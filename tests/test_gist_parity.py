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


def test_recurrent_scan_remat_at_segment_boundaries():
    """With a remat policy the recurrent scan's step is checkpointed (the backward's scan keeps
    one gist memory per segment, not every activation) and gives the same values and gradients."""
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

    def eqns(jaxpr, name):  # every equation named ``name``, sub-jaxprs included
        for e in jaxpr.eqns:
            if e.primitive.name == name:
                yield e
            for sub in e.params.values():
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from eqns(inner, name)

    def segment_scan_is_checkpointed(c, p):
        """Some scan whose body is a checkpoint around the layer stack (a scan of its own):
        the layer scan's own per-layer remat does not count."""
        jaxpr = jax.make_jaxpr(lambda q: loss(q, c))(p).jaxpr
        return any(any(True for _ in eqns(ck.params["jaxpr"], "scan"))
                   for sc in eqns(jaxpr, "scan") for ck in sc.params["jaxpr"].jaxpr.eqns
                   if ck.primitive.name in ("checkpoint", "remat2"))

    assert segment_scan_is_checkpointed(cfg2, params2)
    assert not segment_scan_is_checkpointed(cfg, params)


@pytest.mark.parametrize("memory", ["kv", "recurrent"])
def test_layer_kv_output_matches_the_sequential_memory(memory):
    """``kv_layer`` returns a layer's keys/values without changing the logits; for KV variants
    the gists' values equal what the sequential reference keeps in memory."""
    from gist_jax.gist.sequential import sequential_kv

    comp = comp_config(memory, "coarse", sinks=2)
    cfg, params = model(comp)
    layout = build_layout(24, comp)
    toks, arrays = tokens(1, 24), layout_arrays(layout)
    plain = compressed_logits(cfg, comp, layout.shape, params, toks, arrays)
    logits, (k, v) = compressed_logits(cfg, comp, layout.shape, params, toks, arrays, kv_layer=-1)
    np.testing.assert_array_equal(plain, logits)
    assert k.shape == v.shape == (1, layout.length, cfg.num_kv_heads, cfg.head_dim)
    if memory == "kv":
        memory_state = sequential_kv(cfg, comp, layout, params, toks)[1]
        gist = layout.is_gist
        np.testing.assert_allclose(memory_state.v[-1][:, layout.memory_slot[gist]], v[:, gist], atol=1e-5)
