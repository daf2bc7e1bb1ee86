"""Gist bank: the gist mask as one block-sparse kernel over a permuted sequence (Splash on TPU).

Permuting every example to ``[all gist slots, segment-major | all raw tokens, in order]`` turns
the gist mask into a few contiguous block patterns: gist x gist and raw x gist staircases, a
block-diagonal raw x raw part plus the sink columns. A block-skipping kernel then computes
only the blocks the mask touches. Pallas Splash attention is that kernel on TPU; on CPU it runs
in Pallas interpret mode, which is how the tests check it.

Attention does not care about the order of its keys once every key carries its position, so
the permutation is exact when every key has *one* position: the aligned scheme, where a gist
or sink is rotated at the same position as memory and as a local key (``compressed`` gives
memory its own positions and is refused by the config). The mask is a function of the bank
row indices alone (``mask_function``: a handful of integer operations on the static
geometry), so Splash builds its block tables without a ``T x T`` host array and evaluates
partial blocks inside the kernel.

Requirements, checked by the config (``gist.config.validate``) or by ``forward.kv_parallel``
which falls back to the decomposed path: every slot live (one ratio per step, not
``per_segment``) and whole segments (no padding). On a GPU backend ``model.attention="bank"``
runs the ``flash`` path (cuDNN) instead: JAX has no block-sparse GPU kernel to give it.
Inside the train step's ``activation_mesh`` the kernel runs under ``shard_map`` over the
batch and head axes (a Pallas call is not partitioned by XLA); the sequence axis is never
sharded, so each shard holds whole examples for its heads.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.layout import GistLayout, LayoutShape
from gist_jax.model.attention import AttentionSpec
from gist_jax.model.layers import apply_rope
from gist_jax.model.sharding import active_mesh_spec

# Bank-order activations [B, N, Tp, H]: sharded like any attention activation.
BANK_AXES = ("activation_batch", "activation_heads", "activation_length", "activation_head_dim")


@flax.struct.dataclass
class GistBankKV:
    """Static geometry of a uniform-ratio layout; ``attend`` runs Splash over the bank order."""

    num_segments: int = flax.struct.field(pytree_node=False)
    segment_length: int = flax.struct.field(pytree_node=False)
    slots: int = flax.struct.field(pytree_node=False)
    num_sinks: int = flax.struct.field(pytree_node=False)
    fine: bool = flax.struct.field(pytree_node=False)
    block: int = flax.struct.field(pytree_node=False, default=128)
    interpret: bool | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def for_shape(cls, shape: LayoutShape, comp: CompressionConfig, **kwargs: Any) -> GistBankKV:
        return cls(shape.num_segments, shape.segment_length, shape.slots, shape.num_sinks,
                   comp.granularity == "fine", **kwargs)

    @classmethod
    def for_layout(cls, arrays: dict[str, jax.Array], shape: LayoutShape, comp: CompressionConfig) -> GistBankKV:
        del arrays
        return cls.for_shape(shape, comp)

    @classmethod
    def computed_pairs(cls, layout: GistLayout, comp: CompressionConfig, backend: str, dtype: str,
                       head_dim: int) -> tuple[str, int]:
        """``block_pairs`` of the bank this config runs."""
        del backend, dtype, head_dim
        return "bank", cls.for_shape(layout.shape, comp).block_pairs()

    def block_pairs(self) -> int:
        """Entries of the non-empty ``block x block`` tiles of the mask over the padded bank order
        (Splash computes every tile its block table lists, partial or full), evaluated with the
        bank's own ``mask_function`` one row of tiles at a time (O(Tp^2) host work, O(block Tp)
        memory)."""
        tp, b = self.padded_length, self.block
        cols = np.arange(tp)
        tiles = 0
        for start in range(0, tp, b):
            rows = np.arange(start, start + b)
            visible = self.mask_function(rows[:, None], cols[None, :])
            tiles += int(visible.reshape(b, tp // b, b).any(axis=(0, 2)).sum())
        return tiles * b * b

    @property
    def length(self) -> int:
        return self.num_segments * (self.segment_length + self.slots)

    @property
    def padded_length(self) -> int:
        return -(-self.length // self.block) * self.block

    def _rows(self, p: Any) -> tuple[Any, Any, Any, Any]:
        """(segment, order inside the segment, is gist, is sink) of bank rows ``p``; numpy or
        jax integer arrays (the same code runs on the host and inside the kernel)."""
        where = jnp.where if isinstance(p, jax.Array) else np.where
        slots, length = self.slots, self.segment_length
        r = length // slots
        is_gist = p < self.num_segments * slots
        raw = p - self.num_segments * slots
        gist_slot, raw_offset = p % slots, raw % length
        segment = where(is_gist, p // slots, raw // length)
        if self.fine:  # x_1..x_r g_1 x_(r+1)..x_2r g_2 ...
            order = where(is_gist, (gist_slot + 1) * (r + 1) - 1, raw_offset + raw_offset // r)
        else:  # x_1..x_L g_1..g_t
            order = where(is_gist, length + gist_slot, raw_offset)
        is_sink = (~is_gist) & (raw < self.num_sinks)
        return segment, order, is_gist, is_sink

    def mask_function(self, q_ids: Any, kv_ids: Any) -> Any:
        """May bank row ``q_ids`` see bank row ``kv_ids``: same segment and not after it, or a
        sink / gist of an earlier segment. Padding rows (beyond the layout) see only themselves."""
        t = self.length
        seg_q, ord_q, _, _ = self._rows(q_ids)
        seg_k, ord_k, gist_k, sink_k = self._rows(kv_ids)
        local = (seg_q == seg_k) & (ord_k <= ord_q)
        memory = (seg_k < seg_q) & (gist_k | sink_k)
        real_q, real_k = q_ids < t, kv_ids < t
        return (real_q & real_k & (local | memory)) | (~real_q & (q_ids == kv_ids))

    def permutation(self) -> np.ndarray:
        """Layout index of every bank row, ``[padded_length]``; -1 for padding rows."""
        p = np.arange(self.length)
        segment, order, _, _ = self._rows(p)
        perm = segment * (self.segment_length + self.slots) + order
        return np.concatenate([perm, np.full(self.padded_length - self.length, -1)])

    def attend(self, q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
               spec: AttentionSpec, inv_freq: jax.Array) -> jax.Array:
        """Queries rotated at ``spec.positions``; keys rotated here at the same positions (one
        per key: aligned scheme). Returns [B, T, N, H] in layout order."""
        k_rot_BxTxKxH = apply_rope(k_BxTxKxH, spec.positions, inv_freq)
        return bank_attention(q_BxTxNxH, k_rot_BxTxKxH, v_BxTxKxH, self)


def _splash_mask_class() -> type:
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    class BankMask(sm._ComputableMask):  # the library's base for masks computed in-kernel
        def __init__(self, bank: GistBankKV):
            self.bank = bank
            tp = bank.padded_length
            super().__init__(shape=(tp, tp), mask_function=bank.mask_function)

        def __eq__(self, other: object) -> bool:
            return isinstance(other, BankMask) and other.bank == self.bank

        def __hash__(self) -> int:
            return hash(self.bank)

    return BankMask


def _splash_kernel(bank: GistBankKV, heads: int, interpret: bool) -> Any:
    """Block tables are built on the host at trace time (once per trace: a scanned layer stack
    traces one layer). Not memoised: the kernel object keeps arrays made during the trace
    that first built it, and reusing it in another trace leaks tracers."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b = bank.block
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                          block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sm.MultiHeadMask([_splash_mask_class()(bank)] * heads)
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def bank_attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
                   bank: GistBankKV) -> jax.Array:
    """Softmax attention under the gist mask via Splash over the bank order; q and k already
    rotated. Returns [B, T, N, H] in layout order and in the value dtype."""
    t, n, h = q_BxTxNxH.shape[1:]
    groups = n // k_BxTxKxH.shape[2]
    interpret = bank.interpret if bank.interpret is not None else jax.default_backend() != "tpu"
    perm = bank.permutation()
    take = jnp.asarray(np.maximum(perm, 0))

    def to_bank(x_BxTxNxH):  # [B, T, N, H] -> [B, N, Tp, H] (padding rows copy token 0)
        return jnp.take(x_BxTxNxH, take, axis=1).transpose(0, 2, 1, 3)

    q = to_bank(q_BxTxNxH * (h ** -0.5))
    k = to_bank(jnp.repeat(k_BxTxKxH, groups, axis=2))
    v = to_bank(jnp.repeat(v_BxTxKxH, groups, axis=2))
    out_BxNxTpxH = _run_sharded(bank, interpret, q, k, v)
    inverse = jnp.asarray(np.argsort(perm[:t]))
    return jnp.take(out_BxNxTpxH, inverse, axis=2).transpose(0, 2, 1, 3).astype(v_BxTxKxH.dtype)


def _run_sharded(bank: GistBankKV, interpret: bool, q_BxNxTpxH: jax.Array, k_BxNxTpxH: jax.Array,
                 v_BxNxTpxH: jax.Array) -> jax.Array:
    """The Splash kernel per example; inside ``activation_mesh`` under ``shard_map`` over the
    batch (data, fsdp) and head (tensor) axes, since XLA cannot partition a Pallas call. Each
    shard runs a kernel built for its own number of heads."""
    found = active_mesh_spec(BANK_AXES, q_BxNxTpxH.shape)
    if found is None:
        return jax.vmap(_splash_kernel(bank, q_BxNxTpxH.shape[1], interpret))(q_BxNxTpxH, k_BxNxTpxH, v_BxNxTpxH)
    mesh, spec = found
    head_axes = spec[1] if isinstance(spec[1], tuple) else (spec[1],) if spec[1] else ()
    local_heads = q_BxNxTpxH.shape[1] // math.prod(mesh.shape[a] for a in head_axes)
    kernel = _splash_kernel(bank, local_heads, interpret)
    return jax.shard_map(jax.vmap(kernel), mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q_BxNxTpxH, k_BxNxTpxH, v_BxNxTpxH)
