"""The decomposed path's segment kernel (``structured.segment_attention``) with its static
skipping switched on at test sizes: several query blocks per segment (uneven last block) and
memory groups that share a bound (so masked memory entries are computed and must stay
invisible), against the dense reference in values and gradients. The shared cases in
``test_structured_attention.py`` run with one block and one segment per group."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gist_helpers import comp_config
from test_structured_attention import _assert_equal, _dense_and_structured

from gist_jax.gist import structured


@pytest.fixture
def small_blocks(monkeypatch):
    """Query blocks of 5 rows (segments of 12 or 20 tokens: 3-4 blocks, the last one short), at
    most 2 memory groups (5 memory segments: groups of 3 and 2) and memory key blocks of 3
    entries (several per prefix, the last one padded with dead entries)."""
    monkeypatch.setattr(structured, "QUERY_BLOCK", 5)
    monkeypatch.setattr(structured, "MAX_MEMORY_GROUPS", 2)
    monkeypatch.setattr(structured, "MEMORY_KEY_BLOCK", 3)


@pytest.mark.parametrize("granularity,positions,sinks,ratio", [
    ("fine", "compressed", 4, 2),
    ("coarse", "aligned", 0, 4),
])
def test_blocks_and_groups_equal_dense(small_blocks, granularity, positions, sinks, ratio):
    comp = comp_config("kv", granularity, positions, sinks, ratio=ratio, segment_length=8)
    layout, out = _dense_and_structured(comp, 6 * 8, impls=("decomposed",))
    _assert_equal(layout, out, (granularity, positions, sinks, ratio))


def test_blocks_and_groups_dead_slots_and_padding(small_blocks):
    """Per-segment ratios (dead slots: rows and keys that see / are seen by nothing) and a
    padded last segment, through the blocked, grouped kernel."""
    comp = comp_config("kv", "fine", "compressed", sinks=2, ratio=2, pad_to_segments=True)
    layout, out = _dense_and_structured(comp, 45, per_segment_ratios=(2, 8, 4, 2, 8, 4),
                                        impls=("decomposed",))
    assert (~layout.alive).sum() > 0
    _assert_equal(layout, out, "dead slots, padding")


def test_segment_plan_covers_the_staircase():
    plan = structured.segment_plan(num_segments=32, segment_tokens=576, num_sinks=4, slots=64,
                                   query_block=288, max_groups=8)
    assert plan.query_blocks == ((0, 288), (288, 576))
    firsts = [g[0] for g in plan.groups]
    ends = [g[1] for g in plan.groups]
    assert firsts[0] == 1 and ends[-1] == 32 and firsts[1:] == ends[:-1]
    assert len(plan.groups) <= 8
    # Each group's bound is its last segment's prefix: sinks + (end - 1) * slots entries.
    assert all(bound == 4 + (end - 1) * 64 for _, end, bound in plan.groups)
    one = structured.segment_plan(1, 12, 0, 2)
    assert one.groups == () and one.query_blocks[-1][1] == 12


def test_fully_masked_rows_give_zero_and_finite_gradients():
    """A query that sees nothing (all keys dead, no memory) gets 0 and contributes no NaN."""
    s, b, kh, g, ts, h = 2, 1, 1, 2, 6, 4
    keys = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(keys[0], (s, b, kh, g, ts, h))
    k, v = (jax.random.normal(kk, (s, b, kh, ts, h)) for kk in keys[1:3])
    km, vm = (jax.random.normal(kk, (b, kh, 3, h)) for kk in keys[3:5])
    valid = jnp.ones((s, b, ts), bool).at[0].set(False)  # segment 0: every key dead
    live = jnp.array([True, False, True])
    plan = structured.segment_plan(s, ts, 1, 2, query_block=4)
    index = jnp.arange(s, dtype=jnp.int32)

    def loss(q, k, v, km, vm):
        return jnp.sum(structured.segment_attention(q, k, v, km, vm, valid, live, index, plan) ** 2)

    out = structured.segment_attention(q, k, v, km, vm, valid, live, index, plan)
    np.testing.assert_array_equal(out[0], 0.0)
    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, km, vm)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in grads)
    np.testing.assert_array_equal(grads[0][0], 0.0)
