"""Memory planning: will this model, context and mesh fit, before anything is launched?

    python -m gist_jax.train.plan --model llama3_8b --seq 16384 --batch 64 --mesh 1,64,1 \
        --memory kv --granularity fine --ratio 4 [--tie] [--ae] [--microbatches 4] \
        [--remat full] [--device_gib 80] [--compile]

Per-device bytes are exact for what is stored (parameter shards from the same rules table the
step uses, Adam moments for trainable leaves, the gradient accumulator, the frozen TIE
reference) and estimated for activations:

  saved per layer  = tokens_per_device * hidden * bytes(dtype) * saved_factor(remat policy)
  attention scores = microbatch_per_device * heads_per_device * (largest score tensor of the
                     attention implementation, ``attention_score_bytes``: T x 2T for the dense
                     reference, S x Ts^2 + Ts x M decomposed, O(T) for cuDNN flash / Splash;
                     without gists the ``model.attention_impl`` causal kernel: T x T dense,
                     one block x block tile blockwise, O(T) cuDNN / Splash)
  logits           = microbatch_per_device * loss_chunk * vocab_per_device * 4 * 2
                     (one chunk's float32 logits + their gradient: ``gist_jax/model/loss.py``
                     applies the head chunk-wise to raw rows only, never to all T at once)

``--compile`` (small configs, mesh <= local devices) also lowers and compiles the real step on
this machine and prints XLA's own memory analysis next to the estimate.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from gist_jax.gist.config import ATTENTION_IMPL, CompressionConfig
from gist_jax.gist.layout import build_layout
from gist_jax.gist.parallel import resolve_attention_impl
from gist_jax.gist.params import add_gist_params, model_config_for
from gist_jax.model.causal import DEFAULT_BLOCK, resolve_impl
from gist_jax.model.config import ModelConfig, preset
from gist_jax.model.transformer import init_params, param_logical_specs
from gist_jax.sharding import LOGICAL_AXIS_RULES, MESH_AXES, fit_spec, logical_to_mesh
from gist_jax.train.config import MeshConfig, ObjectiveConfig, StepConfig
from gist_jax.train.mesh import resolve_mesh_shape
from gist_jax.train.state import logical_param_specs, trainable_tree, uses_ae

# Fraction of a block's activations kept for the backward pass, in units of hidden-size
# vectors per token (rough, documented in docs/training.md).
SAVED_VECTORS_PER_LAYER = {"none": 34.0, "dots": 20.0, "dots_no_batch": 16.0,
                           "qkv_proj": 3.0, "qkv_proj_attn_out": 4.0, "minimal_mlp": 10.0, "full": 1.0}


def _shard_bytes(shape: tuple[int, ...], dtype, spec: PartitionSpec, sizes: dict[str, int]) -> int:
    fitted = fit_spec(spec, shape, sizes)  # the same divisibility fallback as the real state
    count = 1
    for dim, axes in zip(shape, tuple(fitted) + (None,) * (len(shape) - len(fitted))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        count *= dim // math.prod(sizes[n] for n in names)
    return count * np.dtype(dtype).itemsize


def _tree_bytes(abstract: Any, logical: Any, sizes: dict[str, int], select: Any = None) -> int:
    mesh_specs = logical_to_mesh(logical, LOGICAL_AXIS_RULES)
    leaves = jax.tree.leaves(abstract)
    specs = jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    keep = jax.tree.leaves(select) if select is not None else [True] * len(leaves)
    return sum(_shard_bytes(x.shape, x.dtype, s, sizes) for x, s, k in zip(leaves, specs, keep) if k)


def attention_score_bytes(comp: CompressionConfig, seq_len: int, rows: int, backend: str = "gpu",
                          compute_dtype: str = "bfloat16", causal_impl: str = "auto") -> int:
    """float32 bytes of the largest per-layer score tensor the attention implementation holds
    (``rows`` = sequences x heads per device), for ``comp.attention_impl`` as it resolves on
    ``backend`` with ``compute_dtype`` (``parallel.resolve_attention_impl``):

      dense       T x K per row (K = 2T with compression: every token also as memory)
      decomposed  S segments x Ts^2 (local, all at once) + Ts x M (one memory step of the scan)
      flash       cuDNN (gpu): S x E softmax statistics, E = M + Ts; XLA: S x E^2
      bank        Splash (tpu): T softmax statistics (x2)

    Without gists (``memory='none'``) the plain causal kernel ``causal_impl``
    (``model.attention_impl``, ``causal.resolve_impl``) runs instead.
    """
    if not comp.enabled:
        head_dim = 128  # only decides whether cuDNN takes it; every preset's head size does
        impl = resolve_impl(causal_impl, backend, compute_dtype, head_dim)
        block = min(DEFAULT_BLOCK, seq_len)
        per_row = {"dense": seq_len * seq_len, "blockwise": block * block}.get(impl, seq_len)
        return rows * per_row * 4
    shape = build_layout(seq_len, comp).shape
    t, s, ts, m = shape.length, shape.num_segments, shape.segment_tokens, shape.memory_size
    impl = resolve_attention_impl(comp.attention_impl, compute_dtype=compute_dtype, backend=backend)
    if impl == "bank" and backend != "tpu":  # Pallas interpret mode: plain XLA arrays per block
        impl = "dense"
    per_row = {"dense": t * 2 * t, "decomposed": s * ts * ts + ts * m, "bank": 2 * t,
               "flash": s * (m + ts) * (1 if backend == "gpu" else m + ts)}[impl]
    return rows * per_row * 4


def plan(base: ModelConfig, comp: CompressionConfig, step: StepConfig, num_devices: int,
         backend: str = "gpu") -> dict[str, float]:
    """Per-device bytes by category (and the total); attention as it runs on ``backend``."""
    sizes = resolve_mesh_shape(step.mesh, num_devices)
    cfg = model_config_for(base, comp)
    abstract = jax.eval_shape(lambda: {"model": add_gist_params(init_params(base, jax.random.key(0)), cfg)})
    if uses_ae(step, comp):
        from gist_jax.train.ae import init_ae_params

        abstract = jax.eval_shape(lambda p: {**p, "ae": init_ae_params(cfg, comp, p["model"])}, abstract)
    logical = logical_param_specs(base, comp, step)
    trainable = trainable_tree(abstract, comp)
    param_bytes = _tree_bytes(abstract, logical, sizes)
    trainable_bytes = _tree_bytes(abstract, logical, sizes, trainable)
    out = {"params": param_bytes, "optimizer_state": 2 * trainable_bytes, "gradients": trainable_bytes}
    if step.objective.tie and step.objective.tie_source == "online" and comp.enabled:
        base_abstract = jax.eval_shape(lambda: init_params(base, jax.random.key(0)))
        out["tie_reference"] = _tree_bytes(base_abstract, param_logical_specs(base), sizes)

    dp = sizes["data"] * sizes["fsdp"]
    micro_per_device = max(step.batch_size // step.microbatches // dp, 1)
    layout_len = build_layout(step.seq_len, comp).length if comp.enabled else step.seq_len
    tokens = micro_per_device * layout_len
    act_bytes = np.dtype(cfg.dtype).itemsize
    saved = SAVED_VECTORS_PER_LAYER.get(cfg.remat_policy, 34.0)
    out["activations_saved"] = cfg.num_layers * tokens * cfg.hidden_size * act_bytes * saved
    heads = cfg.num_heads // sizes["tensor"] if cfg.num_heads % sizes["tensor"] == 0 else cfg.num_heads
    out["attention_scores"] = attention_score_bytes(comp, step.seq_len, micro_per_device * heads, backend,
                                                    cfg.dtype, cfg.attention_impl)
    vocab = cfg.vocab_size // sizes["tensor"] if cfg.vocab_size % sizes["tensor"] == 0 else cfg.vocab_size
    chunk_tokens = micro_per_device * min(step.objective.loss_chunk, step.seq_len)
    out["logits"] = chunk_tokens * vocab * 4 * 2
    out["total"] = sum(out.values())
    return out


def _parse_mesh(text: str) -> MeshConfig:
    values = [int(v) for v in text.split(",")]
    if len(values) != len(MESH_AXES):
        raise SystemExit(f"--mesh needs {len(MESH_AXES)} comma-separated sizes ({','.join(MESH_AXES)})")
    return MeshConfig(*values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3_8b")
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor (one may be -1)")
    p.add_argument("--devices", type=int, default=None, help="device count (default: product of --mesh)")
    p.add_argument("--memory", default="kv", choices=["kv", "recurrent", "none"])
    p.add_argument("--granularity", default="fine", choices=["fine", "coarse"])
    p.add_argument("--positions", default="compressed", choices=["compressed", "aligned"])
    p.add_argument("--attention", default="auto", choices=list(ATTENTION_IMPL),
                   help="compression.attention_impl (KV variants; others use dense)")
    p.add_argument("--backend", default="gpu", choices=["gpu", "tpu", "cpu"],
                   help="where the run will be: decides what auto/flash/bank hold")
    p.add_argument("--segment", type=int, default=2048)
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--tie", action="store_true")
    p.add_argument("--ae", action="store_true")
    p.add_argument("--remat", default="full")
    p.add_argument("--device_gib", type=float, default=80.0, help="memory per device to compare with")
    p.add_argument("--compile", action="store_true", help="also compile the real step here (small configs)")
    args = p.parse_args(argv)

    mesh_cfg = _parse_mesh(args.mesh)
    devices = args.devices or math.prod(v for v in mesh_cfg.sizes().values() if v > 0)
    base = preset(args.model, remat_policy=args.remat)
    comp = CompressionConfig(memory=args.memory, granularity=args.granularity, segment_length=args.segment,
                             ratios=(args.ratio,), ratio_sampling="fixed", positions=args.positions,
                             attention_impl=args.attention if args.memory == "kv" else "dense")
    step = StepConfig(batch_size=args.batch, seq_len=args.seq, microbatches=args.microbatches, mesh=mesh_cfg,
                      objective=ObjectiveConfig(tie=args.tie, ae=args.ae))
    result = plan(base, comp, step, devices, args.backend)
    gib = 2 ** 30
    print(f"{args.model}, {args.seq} tokens x {args.batch} sequences, mesh {resolve_mesh_shape(mesh_cfg, devices)}, "
          f"{args.memory}/{args.granularity} r={args.ratio}, remat={args.remat}, "
          f"attention={comp.attention_impl} on {args.backend}, causal kernel "
          f"{resolve_impl(base.attention_impl, args.backend, base.dtype, base.head_dim)}")
    for key, value in result.items():
        print(f"  {key:>18}: {value / gib:9.2f} GiB per device")
    verdict = "fits" if result["total"] <= args.device_gib * gib else "does NOT fit"
    print(f"  estimate {verdict} in {args.device_gib:g} GiB per device")
    if args.compile:
        print(f"  compiled (XLA memory analysis): {compiled_memory(base, comp, step) / gib:.3f} GiB per device")
    return 0


def compiled_memory(base: ModelConfig, comp: CompressionConfig, step: StepConfig) -> int:
    """Compile the real step on this machine's devices and return XLA's per-device estimate
    (arguments + outputs + temporaries - aliased)."""
    from gist_jax.gist.specs import layout_arrays
    from gist_jax.train.mesh import make_mesh
    from gist_jax.train.state import create_train_state
    from gist_jax.train.step import build_train_step

    mesh = make_mesh(step.mesh)
    state, tx, shardings = create_train_state(base, comp, step, mesh)
    layout = build_layout(step.seq_len, comp)
    fn = build_train_step(base, comp, step, layout.shape, tx, mesh, shardings)
    batch = {"tokens": jax.ShapeDtypeStruct((step.batch_size, step.seq_len), np.int32),
             "loss_mask": jax.ShapeDtypeStruct((step.batch_size, step.seq_len), bool)}
    stats = fn.lower(state, batch, layout_arrays(layout)).compile().memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


if __name__ == "__main__":
    sys.exit(main())
