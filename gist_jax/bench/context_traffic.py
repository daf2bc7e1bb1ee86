"""What context parallelism sends and saves, from the compiled step (no step runs).

    python -m gist_jax.bench.context_traffic --context=8 --seq_len=65536

compiles the tiny model's Fine-KV train step on fake CPU devices (``mesh.context`` = N, the rest
of the devices unused) and prints, per step:

- the bytes of every collective, split into the gist-memory all-gather (forward), its
  reduce-scatter (backward), with ``--tie`` online TIE's reference-pass K/V all-gather (forward
  only), parameter-gradient all-reduces and anything else;
- the formula (layers x (gists + blocks x sinks) x kv_heads x head_dim x 2 x 4 bytes x batch)
  and what an all-gather of every layout token's K/V, or of every raw token's, would move;
- compiled per-device temporary memory at ``context`` = N against ``context`` = 1;
- the memory-part load balance: live query-memory pairs per block against the pairs each block
  computes, for contiguous blocks computing every segment at the whole bound (no balancing)
  and for the balanced order with key blocks (``context_parallel.memory_pairs``).

The layer scan is unrolled (``scan_layers=False``) so each layer's collectives are their own
ops in the text. CPU only: the sizes are the partitioner's, not a measured bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--segment_length", type=int, default=256)
    parser.add_argument("--ratio", type=int, default=8)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tie", action="store_true",
                        help="online TIE (its causal reference pass gathers every raw token's K/V)")
    parser.add_argument("--ae", action="store_true")
    parser.add_argument("--window", type=int, default=0, help="UniGist with this window (aligned positions)")
    return parser.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class _Setup:
    args: argparse.Namespace
    base: Any  # ModelConfig
    comp: Any  # CompressionConfig
    objective: Any  # ObjectiveConfig
    layout: Any  # GistLayout

    def step_config(self, context: int) -> Any:
        from gist_jax.train.config import MeshConfig, StepConfig

        return StepConfig(batch_size=self.args.batch, seq_len=self.args.seq_len, objective=self.objective,
                          mesh=MeshConfig(1, 1, 1, context))


def _setup(args: argparse.Namespace) -> _Setup:
    from gist_jax.gist.config import CompressionConfig
    from gist_jax.gist.layout import build_layout
    from gist_jax.model.config import preset
    from gist_jax.train.config import ObjectiveConfig

    base = preset("tiny", eos_token_id=3).replace(scan_layers=False)
    comp = CompressionConfig(memory="kv", granularity="fine", segment_length=args.segment_length,
                             ratios=(args.ratio,), ratio_sampling="fixed", num_sinks=args.sinks,
                             window=args.window,
                             positions="aligned" if args.window else "compressed")
    objective = ObjectiveConfig(tie=args.tie, tie_source="online", ae=args.ae, ae_lambda=0.5 if args.ae else 0.0)
    return _Setup(args, base, comp, objective, build_layout(args.seq_len, comp))


def _compiled(setup: _Setup, context: int) -> Any:
    """The train step compiled on ``context`` blocks (lowered with zero tokens; nothing runs)."""
    import jax
    import jax.numpy as jnp

    from gist_jax.gist.specs import layout_arrays
    from gist_jax.train.mesh import make_mesh
    from gist_jax.train.state import create_train_state
    from gist_jax.train.step import build_train_step

    args, cfg = setup.args, setup.step_config(context)
    mesh = make_mesh(cfg.mesh, jax.devices()[:context])
    state, tx, shardings = create_train_state(setup.base, setup.comp, cfg, mesh)
    step = build_train_step(setup.base, setup.comp, cfg, setup.layout.shape, tx, mesh, shardings)
    batch = {"tokens": jnp.zeros((args.batch, args.seq_len), jnp.int32),
             "loss_mask": jnp.ones((args.batch, args.seq_len), bool)}
    return step.lower(state, batch, layout_arrays(setup.layout)).compile()


def _collective_groups(hlo_text: str) -> dict[str, list]:
    from gist_jax.bench.collectives import collectives
    from gist_jax.model.context_causal import GATHER_SCOPE

    ops = collectives(hlo_text)
    reference = [o for o in ops if GATHER_SCOPE in o.name]
    groups = {"gist memory all-gather": [o for o in ops if "shard_map/all_gather" in o.name and o not in reference],
              "its reduce-scatter (backward)": [o for o in ops if "shard_map/reduce_scatter" in o.name],
              "TIE reference K/V all-gather": reference,
              "UniGist window halo (permute)": [o for o in ops if "shard_map/ppermute" in o.name],
              "parameter-gradient all-reduce": [o for o in ops if o.op == "all-reduce"]}
    seen = {id(o) for g in groups.values() for o in g}
    groups["other"] = [o for o in ops if id(o) not in seen]
    return groups


def _print_traffic(setup: _Setup, groups: dict[str, list]) -> None:
    """Every collective group's bytes, against the formula, the planner and a full-K/V gather."""
    from gist_jax.train.plan import context_traffic

    args, base, shape = setup.args, setup.base, setup.layout.shape
    entry = 2 * args.batch * base.num_kv_heads * base.head_dim * 4
    gists, layers = shape.num_segments * shape.slots, base.num_layers
    variant = "UniGist" if args.window else "Fine-KV"
    print(f"CPU, tiny model ({layers} layers, {base.num_kv_heads} kv heads x {base.head_dim}), {variant} "
          f"r={args.ratio}, "
          f"{args.seq_len} tokens in {shape.num_segments} segments, sinks {args.sinks}, batch {args.batch}, "
          f"context {args.context}, TIE {'on' if args.tie else 'off'}, AE {'on' if args.ae else 'off'}"
          f"{f', UniGist window {args.window}' if args.window else ''}")
    for name, group in groups.items():
        print(f"  {name:32s} {sum(o.nbytes for o in group):>12,d} bytes in {len(group)} ops")
    formula = layers * (gists + args.context * shape.num_sinks) * entry
    planned = context_traffic(base, setup.comp, setup.step_config(args.context), args.context)
    print(f"  formula: layers x (gists + blocks x sinks) x entry = {layers} x ({gists} + {args.context} x "
          f"{shape.num_sinks}) x {entry} = {formula:,d} bytes (the planner's: "
          f"{planned.get('gist_gather', 0):,d})")
    if args.window:
        print(f"  UniGist halo: the planner's {planned.get('halo_permute', 0):,d} bytes of keys and values "
              "(plus the keys' liveness)")
    if args.tie:
        print(f"  TIE reference: layers x raw tokens x entry = {layers} x {args.seq_len} x {entry} = "
              f"{layers * args.seq_len * entry:,d} bytes (the planner's: {planned.get('tie_kv_gather', 0):,d})")
    full_layout, full_raw = layers * shape.length * entry, layers * args.seq_len * entry
    moved = sum(o.nbytes for o in groups["gist memory all-gather"])
    print(f"  full-K/V all-gather of the layout: {full_layout:,d} bytes (gist memory moves {moved / full_layout:.3f}"
          f" of it); of the raw tokens: {full_raw:,d} ({moved / full_raw:.3f}); gists alone: "
          f"{layers * gists * entry / full_raw:.3f} of the raw")


def _print_balance(setup: _Setup) -> None:
    """Memory-part pairs per block: contiguous blocks at the whole bound against the balanced
    order with key blocks (Fine-KV's kernel; UniGist's memory part is not balanced)."""
    import numpy as np

    from gist_jax.gist.context_parallel import memory_pairs

    shape = setup.layout.shape
    balances = () if setup.args.window else (("contiguous blocks, whole bound", np.arange(shape.num_segments), 1 << 30),
                                             ("balanced order, key blocks", None, None))
    for name, order, key_block in balances:
        live, computed = memory_pairs(shape, setup.args.context, order, key_block)
        total = max(sum(computed), 1)
        print(f"  memory-part pairs per block, {name}: live {live}, computed {computed}; live / computed "
              f"{sum(live) / total:.3f}, busiest block / mean {max(computed) * len(computed) / total:.3f}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(args.context, 1)}".strip()
    setup = _setup(args)
    split = _compiled(setup, args.context)
    _print_traffic(setup, _collective_groups(split.as_text()))
    if args.context > 1:
        a, b = split.memory_analysis(), _compiled(setup, 1).memory_analysis()
        print(f"  compiled temp memory per device: {a.temp_size_in_bytes / 2**20:.1f} MiB at context "
              f"{args.context}, {b.temp_size_in_bytes / 2**20:.1f} MiB at context 1 "
              f"({a.temp_size_in_bytes / b.temp_size_in_bytes:.3f}x)")
    _print_balance(setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
