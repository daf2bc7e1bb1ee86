"""Named rematerialisation policies, so configs say ``remat_policy="dots"`` not a function.

``none`` keeps every activation (no remat); ``full`` saves only the block inputs and recomputes
the rest in the backward pass; the others save the named intermediates and recompute the
cheap elementwise work between them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

# checkpoint_name tags used inside the blocks (see model/attention.py and model/layers.py).
QKV_PROJ = ("query_proj", "key_proj", "value_proj")
ATTN_OUT = "attention_out"
MLP_HIDDEN = "mlp_hidden"

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names(*QKV_PROJ),
    "qkv_proj_attn_out": jax.checkpoint_policies.save_only_these_names(*QKV_PROJ, ATTN_OUT),
    "minimal_mlp": jax.checkpoint_policies.save_only_these_names(*QKV_PROJ, ATTN_OUT, MLP_HIDDEN),
}
