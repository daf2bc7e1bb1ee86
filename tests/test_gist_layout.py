"""Property tests of the layout builder over random segment lengths, ratios, lengths and sinks."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.layout import build_layout


@st.composite
def layouts(draw):
    ratio = draw(st.sampled_from([1, 2, 4, 8, 16]))
    L = ratio * draw(st.integers(1, 8))
    segments = draw(st.integers(1, 5))
    sinks = draw(st.integers(0, L - 1))
    comp = CompressionConfig(memory="kv", granularity=draw(st.sampled_from(["fine", "coarse"])),
                             segment_length=L, ratios=(ratio,), ratio_sampling="fixed",
                             num_sinks=sinks, positions=draw(st.sampled_from(["compressed", "aligned"])),
                             pad_to_segments=True)
    n = draw(st.integers((segments - 1) * L + 1, segments * L))
    return comp, n, build_layout(n, comp)


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_layout_properties(case):
    comp, n, lay = case
    L, r, s, S = comp.segment_length, comp.ratios[0], comp.num_sinks, lay.num_segments
    t = L // r
    raw = lay.raw_index >= 0
    # counts: every padded raw token once, in order; t gists per segment
    assert lay.length == S * (L + t)
    np.testing.assert_array_equal(lay.raw_index[raw], np.arange(S * L))
    assert lay.is_gist.sum() == S * t == lay.live_gists()
    np.testing.assert_array_equal(np.bincount(lay.segment[lay.is_gist], minlength=S), t)
    # live raw positions: every real raw token once, in order; padding excluded; with no padding
    # exactly the raw slots
    live = lay.live_raw_positions()
    np.testing.assert_array_equal(lay.raw_index[live], np.arange(n))
    assert lay.alive[live].all() and not lay.is_gist[live].any()
    if n == S * L:
        np.testing.assert_array_equal(live, np.nonzero(raw)[0])
    else:
        assert not np.isin(np.nonzero(raw & (lay.raw_index >= n))[0], live).any()
    # granularity: fine puts a gist after every r raw tokens; coarse puts them all at the end
    for i in range(S):
        seg_gist = lay.is_gist[lay.segment_slice(i)]
        expected = np.zeros(L + t, bool)
        if comp.granularity == "fine":
            expected[np.arange(1, t + 1) * (r + 1) - 1] = True
        else:
            expected[L:] = True
        np.testing.assert_array_equal(seg_gist, expected)
    # spans: gist j of a segment summarises raw tokens [span, span + r)
    spans = lay.span_start[lay.is_gist]
    np.testing.assert_array_equal(spans, np.arange(S * t) * r)
    # memory: sinks then gists, unique slots in the buffer
    slots = lay.memory_slot[lay.memory_slot >= 0]
    assert len(set(slots.tolist())) == len(slots) == min(s, n) + S * t
    assert lay.is_sink.sum() == min(s, n)
    if comp.positions == "compressed":
        assert lay.position.max() < s + S * L / r + L
        for i in range(S):  # each segment continues right after its memory
            start = 0 if i == 0 else s + i * t
            np.testing.assert_array_equal(lay.position[lay.segment_slice(i)],
                                          start + np.arange(L + t))
        np.testing.assert_array_equal(lay.memory_position[lay.is_gist], s + np.arange(S * t))
    else:
        np.testing.assert_array_equal(lay.position[raw], lay.raw_index[raw])
        after = spans + r if comp.granularity == "fine" else (lay.segment[lay.is_gist] + 1) * L
        np.testing.assert_array_equal(lay.position[lay.is_gist], after)
        np.testing.assert_array_equal(lay.memory_position[lay.is_gist], lay.position[lay.is_gist])
    np.testing.assert_array_equal(lay.memory_position[lay.is_sink], np.arange(min(s, n)))


def test_live_raw_positions_skip_padding():
    """21 raw tokens in segments of 8 (``pad_to_segments``): the 3 padding slots of the last
    segment are raw slots (``raw_index >= 0``) but not live raw positions; 24 tokens have no
    padding and select exactly the raw slots. Per-segment ratios (dead gist slots) and full
    attention select the same way."""
    comp = CompressionConfig(memory="kv", granularity="fine", segment_length=8, ratios=(2,),
                             ratio_sampling="fixed", num_sinks=2, pad_to_segments=True)
    padded = build_layout(21, comp)
    live = padded.live_raw_positions()
    assert live.dtype == np.int32 and live.shape == (21,)
    np.testing.assert_array_equal(padded.raw_index[live], np.arange(21))
    np.testing.assert_array_equal(np.setdiff1d(np.nonzero(padded.raw_index >= 0)[0], live),
                                  np.nonzero(padded.raw_index >= 21)[0])
    whole = build_layout(24, comp)
    np.testing.assert_array_equal(whole.live_raw_positions(), np.nonzero(whole.raw_index >= 0)[0])
    dead = build_layout(21, comp, ratios=(2, 8, 4))
    assert (~dead.alive & dead.is_gist).any()
    np.testing.assert_array_equal(dead.raw_index[dead.live_raw_positions()], np.arange(21))
    full = build_layout(21, CompressionConfig(memory="none"))
    np.testing.assert_array_equal(full.live_raw_positions(), np.arange(21))
