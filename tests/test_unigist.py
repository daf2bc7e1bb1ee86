"""UniGist (``compression.window`` > 0): the config's one-line errors (its own and the gist
kernels ``check_gist_kernel`` refuses for it), the mask against the
paper's definition written out independently, the windowed structured path against the dense
reference in values and gradients, and the no-leak property of both."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gist_helpers import comp_config, gist_kernel, model, tokens

from gist_jax.errors import ConfigError
from gist_jax.gist import window as window_module
from gist_jax.gist.config import CompressionConfig, check_gist_kernel
from gist_jax.gist.forward import compressed_logits
from gist_jax.gist.layout import build_layout
from gist_jax.gist.specs import layout_arrays, windowed_mask
from gist_jax.gist.structured import DecomposedKV
from gist_jax.gist.window import layout_geometry, window_plan


def unigist(sinks: int, ratio: int, segment_length: int, window: int, **kw) -> CompressionConfig:
    return comp_config("kv", "fine", "aligned", sinks, ratio=ratio, segment_length=segment_length,
                       window=window, **kw)


@pytest.mark.parametrize("change, key", [
    ({"memory": "recurrent", "granularity": "coarse"}, "compression.memory"),
    ({"granularity": "coarse"}, "compression.granularity"),
    ({"positions": "compressed"}, "compression.positions"),
    ({"ratio_sampling": "per_segment", "ratios": (2, 4)}, "compression.ratio_sampling"),
    ({"window": 6}, "not a multiple of ratio"),
    ({"window": -4}, "compression.window"),
])
def test_window_config_errors_name_the_key(change, key):
    fields = {"memory": "kv", "granularity": "fine", "positions": "aligned", "segment_length": 16,
              "ratios": (4,), "ratio_sampling": "fixed", "window": 8} | change
    with pytest.raises(ConfigError) as err:
        CompressionConfig(**fields)
    message = str(err.value)
    assert key in message and "\n" not in message


@pytest.mark.parametrize("attention", ["flash", "split", "bank", "cudnn,flash", "auto,split"])
def test_window_refuses_every_gist_kernel_but_decomposed(attention):
    """The window has one structured kernel (``window.py``, named 'decomposed'); 'auto' and the
    dense reference run too. The refusal names ``model.attention`` in one line."""
    comp = unigist(2, 4, 16, 8)
    with pytest.raises(ConfigError) as err:
        check_gist_kernel(attention, comp)
    message = str(err.value)
    assert f"model.attention={attention!r}" in message and "no windowed" in message and "\n" not in message
    for fine in ("auto", "dense", "decomposed", "blockwise", "cudnn,decomposed", "auto,dense"):
        check_gist_kernel(fine, comp)


def _paper_mask(layout, window: int, ratio: int) -> np.ndarray:
    """The mask as the paper states it, from raw indices and gist spans alone: a token of gist
    unit u (raw token j: u = j // r; the gist after raw tokens u*r .. u*r+r-1: u) sees, causally,
    the sinks, every gist, and the raw tokens of units u - W/r .. u."""
    t = layout.length
    unit = np.where(layout.is_gist, layout.span_start // ratio, layout.raw_index // ratio)
    mask = np.zeros((t, t), bool)
    for q in range(t):
        for k in range(q + 1):
            if not layout.alive[k]:
                continue
            raw_k = layout.raw_index[k]
            sink = 0 <= raw_k < layout.num_sinks
            mask[q, k] = layout.is_gist[k] or sink or raw_k // ratio >= unit[q] - window // ratio
    return mask


# (sinks, ratio, segment length L, window W, raw tokens): windows inside one segment, across
# one, two and three segments, sinks 0-4, a padded last segment.
CASES = [
    (0, 2, 8, 4, 24),
    (2, 4, 8, 8, 32),
    (4, 2, 8, 12, 40),
    (3, 4, 16, 32, 64),
    (1, 2, 8, 24, 36),
    (4, 4, 16, 16, 16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_windowed_mask_is_the_papers(case):
    sinks, ratio, seg_len, window, num_raw = case
    comp = unigist(sinks, ratio, seg_len, window, pad_to_segments=True)
    layout = build_layout(num_raw, comp)
    got = np.asarray(windowed_mask(layout_arrays(layout)))
    np.testing.assert_array_equal(got, _paper_mask(layout, window, ratio))
    # Aligned positions: raw tokens keep their index, a gist takes the next raw token's.
    gists = layout.is_gist & layout.alive
    np.testing.assert_array_equal(layout.position[gists], layout.span_start[gists] + ratio)
    raw = ~layout.is_gist
    np.testing.assert_array_equal(layout.position[raw], layout.raw_index[raw])


@pytest.mark.parametrize("case", CASES + [(7, 2, 8, 8, 64)], ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("query_block, groups", [(5, 3), (8, 12), (64, 12)])
def test_window_plan_splits_the_mask_into_band_and_memory(case, query_block, groups):
    """The host geometry is ``build_layout``'s; every block's band (C keys ending at its padded
    end) holds every key its rows see at or after the band start, the sinks and gists before it
    lie in its group's buffer bound, and no seen raw key lies before it: the two parts are
    disjoint and cover the mask."""
    sinks, ratio, seg_len, window, num_raw = case
    comp = unigist(sinks, ratio, seg_len, window, pad_to_segments=True)
    layout = build_layout(num_raw, comp)
    arrays = layout_arrays(layout)
    geo = layout_geometry(layout.shape, window)
    np.testing.assert_array_equal(geo["raw_index"], layout.raw_index)
    np.testing.assert_array_equal(geo["window_start"], layout.window_start)
    token_M = np.asarray(DecomposedKV.from_arrays(arrays, layout.shape).memory_token_M)
    live_M = np.asarray(arrays["buffer_live"])
    np.testing.assert_array_equal(geo["memory_token"][live_M], token_M[live_M])

    plan = window_plan(layout.shape, window, query_block, groups)
    t, bq = layout.length, plan.query_block
    assert plan.num_blocks == -(-t // bq) and len(plan.groups) <= groups + 1
    assert [j for first, end, _ in plan.groups for j in range(first, end)] == list(range(plan.num_blocks))
    mask = np.asarray(windowed_mask(arrays))
    always = layout.is_gist | layout.is_sink
    for first, end, bound in plan.groups:
        for j in range(first, end):
            a, rows = plan.band_start[j], slice(j * bq, min((j + 1) * bq, t))
            seen = mask[rows].any(axis=0)
            assert not (seen[:a] & ~always[:a]).any(), "a seen raw key before the band start"
            assert (j + 1) * bq - plan.band <= a <= j * bq
            memory = np.nonzero(live_M & (token_M < a))[0]
            assert memory.size == 0 or memory.max() < bound


def _logits_and_grads(comp, num_raw, batch=2, stop=False, raw_embeds=None, weights_seed=3):
    cfg, params = model(comp)
    toks = tokens(batch, num_raw, seed=num_raw)
    layout = build_layout(num_raw, comp)
    arrays = layout_arrays(layout)
    weights = jax.random.normal(jax.random.key(weights_seed), (batch, layout.length, cfg.vocab_size))
    weights = weights * jnp.asarray(layout.alive)[None, :, None]
    out = {}
    for impl in ("dense", "decomposed"):
        kernel_cfg = gist_kernel(cfg, impl)

        def loss(p, kernel_cfg=kernel_cfg):
            logits = compressed_logits(kernel_cfg, comp, layout.shape, p, toks, arrays)
            return jnp.sum(logits * weights), logits

        out[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return layout, out


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_windowed_structured_equals_dense(case, monkeypatch):
    """Blocks of 7 rows (the layout padded to whole blocks, bands across segment edges) and 3
    memory groups; the default block (64, one or two blocks here) in the next test."""
    monkeypatch.setattr(window_module, "QUERY_BLOCK", 7)
    monkeypatch.setattr(window_module, "MAX_MEMORY_GROUPS", 3)
    sinks, ratio, seg_len, window, num_raw = case
    comp = unigist(sinks, ratio, seg_len, window, pad_to_segments=True)
    layout, out = _logits_and_grads(comp, num_raw)
    (_, dense), g_dense = out["dense"]
    (_, fast), g_fast = out["decomposed"]
    alive = layout.alive
    np.testing.assert_allclose(fast[:, alive], dense[:, alive], atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_dense)):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(b).max())), rtol=0)


@pytest.mark.parametrize("query_block, groups", [(8, 2), (None, None)])
def test_windowed_structured_with_gist_projections_and_many_groups(query_block, groups, monkeypatch):
    """Gist q/k/v projections, per-slot embeddings, more blocks than memory groups (blocks of 8,
    2 groups), and the defaults (blocks of 64 over 168 layout tokens: the last one padded)."""
    if query_block:
        monkeypatch.setattr(window_module, "QUERY_BLOCK", query_block)
        monkeypatch.setattr(window_module, "MAX_MEMORY_GROUPS", groups)
    comp = unigist(2, 2, 8, 8, gist_projections=True, gist_embedding="per_slot")
    _, out = _logits_and_grads(comp, 112, batch=1)
    (_, dense), g_dense = out["dense"]
    (_, fast), g_fast = out["decomposed"]
    np.testing.assert_allclose(fast, dense, atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_dense)):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(b).max())), rtol=0)


@pytest.mark.parametrize("impl", ["dense", "decomposed"])
def test_no_leak_beyond_the_window_but_through_gists(impl, monkeypatch):
    """With every gist's keys and values held fixed, a query's output depends on exactly the
    raw tokens its windows reach without gists: the sinks, its window, and what those tokens'
    own windows reached at the layers below (a sliding window's receptive field grows by one
    window per layer). The gradient is zero for every raw token outside that reach and
    non-zero inside it; without the hold, the gists carry the tokens outside it."""
    monkeypatch.setattr(window_module, "QUERY_BLOCK", 16)  # 5 blocks over the 72 layout tokens
    monkeypatch.setattr(window_module, "MAX_MEMORY_GROUPS", 2)
    sinks, ratio, seg_len, window, num_raw = 2, 2, 8, 6, 48
    comp = unigist(sinks, ratio, seg_len, window)
    cfg, params = model(comp)
    cfg = gist_kernel(cfg, impl)
    layout = build_layout(num_raw, comp)
    arrays = layout_arrays(layout)
    embeds = jax.random.normal(jax.random.key(5), (1, num_raw, cfg.hidden_size))
    query = int(np.nonzero(layout.raw_index == num_raw - 2)[0][0])  # a raw token of the last unit

    # Reach without gists: paths of at most num_layers attention hops between non-gist tokens.
    hop = _paper_mask(layout, window, ratio) & ~layout.is_gist[None, :] & ~layout.is_gist[:, None]
    reach = np.eye(layout.length, dtype=bool)
    for _ in range(cfg.num_layers):
        reach = reach | ((reach.astype(int) @ hop.astype(int)) > 0)
    raw_positions = layout.live_raw_positions()
    reached = reach[query, raw_positions]
    assert 0 < reached.sum() < num_raw - sinks - window, "the reach must leave raw tokens out"

    def query_logits(e, stop):
        logits = compressed_logits(cfg, comp, layout.shape, params, jnp.zeros((1, num_raw), jnp.int32),
                                   arrays, raw_embeds_BxNxE=e, stop_gist_memory_gradient=stop)
        return jnp.sum(logits[0, query] * jnp.linspace(-1.0, 1.0, logits.shape[-1]))

    held = np.abs(np.asarray(jax.grad(query_logits)(embeds, True))[0]).sum(-1)
    free = np.abs(np.asarray(jax.grad(query_logits)(embeds, False))[0]).sum(-1)
    np.testing.assert_array_equal(held[~reached], 0.0)
    assert np.all(held[reached] > 0)
    earlier = np.arange(num_raw) < num_raw - 2  # the query's own raw index is num_raw - 2
    assert np.all(free[~reached & earlier] > 0), "the gists carry the earlier tokens when not held"
    assert np.all(free[~earlier & ~reached] == 0.0)  # and nothing comes from the future
