"""Attention pairs of UniGist (``compression.window`` W > 0): what its mask allows and what its
structured path computes, counted from the layout in O(tokens) numpy, no T x T matrix.

Exact (``specs.windowed_mask``): a live query t sees the live keys s <= t that are a sink, a gist,
or a raw token at or after t's ``window_start``. Per query that is

    (live sinks and gists up to t) + (live non-sink raw tokens up to t)
                                   - (live non-sink raw tokens before window_start[t])

(every raw token before ``window_start[t]`` precedes t in the layout: a window starts at or
before the query's own gist unit, and a fine gist follows its span).

Computed (``gist/window.py``, ``WindowedKV.attend``, geometry ``window.window_plan``): the layout
is cut into blocks of bq query rows (padded to whole blocks); every row of block j scores the band,
C layout keys ending at the block's end (C static: the longest block-to-band-start span), and, for
blocks whose band start has sinks or gists before it, the memory buffer prefix of its group's
bound. Rows are scored whole: padding rows, dead keys, future keys, keys before the band start
and raw keys outside the window are computed and masked.
"""

from __future__ import annotations

import numpy as np

from gist_jax.gist.layout import GistLayout


def windowed_visible_pairs(layout: GistLayout) -> int:
    """Pairs ``specs.windowed_mask`` allows over the live queries of ``layout`` (module doc)."""
    alive = layout.alive
    always = (layout.is_gist | layout.is_sink) & alive
    raw_key = alive & ~always & (layout.raw_index >= 0)
    seen_always_T = np.cumsum(always, dtype=np.int64)
    seen_raw_T = np.cumsum(raw_key, dtype=np.int64)
    raw_keys_sorted = np.sort(layout.raw_index[raw_key])
    before_T = np.searchsorted(raw_keys_sorted, layout.window_start, side="left")
    per_query_T = seen_always_T + seen_raw_T - before_T
    return int(per_query_T[alive].sum())


def windowed_memory_pairs(layout: GistLayout, window: int) -> int:
    """The exact pairs whose key lies in the memory part (sinks and live gists laid out before the
    band start of the query's block, ``window.window_plan``): the rest are band pairs."""
    from gist_jax.gist.window import window_plan

    plan = window_plan(layout.shape, window)
    memory_key = (layout.is_gist | layout.is_sink) & layout.alive
    before_T = np.concatenate([[0], np.cumsum(memory_key, dtype=np.int64)])  # keys before index a
    block_T = np.arange(layout.length) // plan.query_block
    band_start_T = np.asarray(plan.band_start, np.int64)[block_T]
    return int(before_T[band_start_T][layout.alive].sum())


def windowed_pair_report(layout: GistLayout, window: int) -> dict[str, float]:
    """Computed against exact, split into the band and memory parts (``computed_over_exact``,
    ``band_over_exact``: band computed / band exact, ``memory_over_exact`` likewise)."""
    from gist_jax.gist.window import windowed_pairs  # the kernel's own count of what it computes

    exact = windowed_visible_pairs(layout)
    memory_exact = windowed_memory_pairs(layout, window)
    computed = windowed_pairs(layout.shape, window)
    band_exact = exact - memory_exact
    return {"exact": exact, "exact_band": band_exact, "exact_memory": memory_exact,
            "computed": computed["total"], "computed_band": computed["band"],
            "computed_memory": computed["memory"],
            "computed_over_exact": computed["total"] / exact,
            "band_over_exact": computed["band"] / band_exact if band_exact else float("nan"),
            "memory_over_exact": computed["memory"] / memory_exact if memory_exact else float("nan")}
