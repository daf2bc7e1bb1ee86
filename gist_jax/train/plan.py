"""Memory planning: will this model, context and mesh fit, before anything is launched?

    python -m gist_jax.train.plan --model llama3_8b --seq 16384 --batch 64 --mesh 1,64,1 \
        --memory kv --granularity fine --ratio 4 [--tie] [--ae] [--microbatches 4] \
        [--remat full] [--device_gib 80] [--compile]

Per-device bytes are exact for what is stored (parameter shards from the same rules table the
step uses, Adam moments for trainable leaves, the gradient accumulator, the frozen TIE
reference). Activations are counted from the real loss, not from a rule of thumb:

  activations_saved = the residuals ``jax.vjp`` of the step's microbatch loss keeps (compressed
                      forward, TIE's reference passes, chunked LM loss, AE), traced on abstract
                      per-device inputs for ``--backend`` (``train/plan_trace.py``)
  working_set       = the largest transient beside them: one layer's backward
                      (``WORKING_SET_LAYERS`` x what one layer keeps without remat, plus the
                      blockwise kernel's score tiles), or one loss chunk's float32 logits,
                      softmax and gradient (``gist_jax/model/loss.py`` never builds [B, T, V])

The test suite holds the total to within 30% of XLA's compiled memory analysis on CPU
(``tests/test_plan.py``). ``largest attention tensor`` is printed for reference only: the
biggest score or statistics tensor of the attention implementation (``attention_score_bytes``).

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
from gist_jax.gist.structured import QUERY_BLOCK
from gist_jax.gist.params import add_gist_params, model_config_for
from gist_jax.model.causal import DEFAULT_BLOCK, resolve_impl
from gist_jax.model.config import ModelConfig, preset
from gist_jax.model.transformer import init_params, param_logical_specs
from gist_jax.sharding import LOGICAL_AXIS_RULES, MESH_AXES, fit_spec, logical_to_mesh
from gist_jax.train.config import MeshConfig, ObjectiveConfig, StepConfig
from gist_jax.train.mesh import resolve_mesh_shape
from gist_jax.train.plan_trace import layer_residual_bytes, saved_residual_bytes
from gist_jax.train.state import logical_param_specs, trainable_tree, uses_ae


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
      decomposed  one query block x Ts (local) + Ts x M (one memory step of the scan)
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
    on_gpu = backend == "gpu"
    block = min(QUERY_BLOCK, ts)  # decomposed: one query block's scores at a time
    per_row = {"dense": t * 2 * t, "decomposed": block * ts + ts * m, "bank": 2 * t,
               "flash": s * (m + ts) * (1 if on_gpu else m + ts),
               # cuDNN: local, memory and merged statistics; XLA: both parts' scores
               "split": 3 * s * ts if on_gpu else s * ts * ts + (s - 1) * ts * m}[impl]
    return rows * per_row * 4


# Working set beyond the saved residuals, in units of one layer's residuals without remat
# (``plan_trace.layer_residual_bytes``): the backward of one layer holds its gradients beside
# what it consumes, and under remat the recomputed forward first. Calibrated against XLA's
# compiled memory analysis on CPU (tests/test_plan.py holds the planner to +-30% of it). The
# blockwise causal kernel's backward is a kernel of its own (custom VJP) and holds its score
# tiles instead (``BLOCKWISE_LIVE_TILES``); cuDNN, Splash and the gist bank cannot be measured
# here and are sized like autodiff layers, an upper bound until a device measures them.
# Coarse-Rec under remat checkpoints whole segments: its backward recomputes one segment at a
# time, so its unit is one segment's share of a layer (``recurrent_remat``, per segment).
# The dense reference under remat recomputes its [T, 2T] scores and holds their gradient and
# mask beside them (``dense_remat``).
WORKING_SET_LAYERS = {"none": 1.0, "remat": 1.2, "dense_remat": 2.0, "blockwise": 0.3, "recurrent_remat": 8.0}
# Live float32 tiles of the blockwise causal kernel (scores, probabilities, their gradients,
# the mask) per query x key block and head.
BLOCKWISE_LIVE_TILES = 5


def layer_attention_impl(cfg: ModelConfig, comp: CompressionConfig, backend: str) -> str:
    """The attention implementation the decoder layers run on ``backend``."""
    if not comp.enabled:
        return resolve_impl(cfg.attention_impl, backend, cfg.dtype, cfg.head_dim)
    if comp.memory != "kv":
        return "dense"
    impl = resolve_attention_impl(comp.attention_impl, compute_dtype=cfg.dtype, backend=backend)
    return "dense" if impl == "bank" and backend != "tpu" else impl  # Pallas interpret mode off TPU


def plan(base: ModelConfig, comp: CompressionConfig, step: StepConfig, num_devices: int,
         backend: str = "gpu") -> dict[str, float]:
    """Per-device bytes by category (and the total); attention as it runs on ``backend``.

    Stored state is exact (shards from the rules table). ``activations_saved`` is what the
    step's backward keeps, traced from the real loss (``plan_trace``). ``working_set`` is the
    largest transient: one layer's backward (``WORKING_SET_LAYERS``, plus the blockwise
    kernel's tiles) or one loss chunk's logits, their softmax and gradient.
    """
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

    micro_per_device = max(step.batch_size // step.microbatches // _data_parallel(step.mesh, num_devices), 1)
    out["activations_saved"] = saved_residual_bytes(base, comp, step, micro_per_device, backend)
    impl = layer_attention_impl(cfg, comp, backend)
    layer = layer_residual_bytes(base, comp, step, micro_per_device, backend)
    if impl == "blockwise":
        layer_set = WORKING_SET_LAYERS["blockwise"] * layer
    elif cfg.remat_policy == "none":
        layer_set = WORKING_SET_LAYERS["none"] * layer
    elif comp.memory == "recurrent":
        layer_set = WORKING_SET_LAYERS["recurrent_remat"] * layer / build_layout(step.seq_len, comp).shape.num_segments
    else:
        layer_set = WORKING_SET_LAYERS["dense_remat" if impl == "dense" else "remat"] * layer
    if sizes["fsdp"] > 1:  # one layer's weights gathered in the compute dtype, and their gradients
        full_bytes = _tree_bytes(abstract, logical, {k: 1 for k in sizes})
        layer_set += 2 * full_bytes // cfg.num_layers * np.dtype(cfg.dtype).itemsize // 4
    if impl == "blockwise":
        block_q = block_k = min(DEFAULT_BLOCK, step.seq_len)
        layer_set += BLOCKWISE_LIVE_TILES * micro_per_device * cfg.num_heads * block_q * block_k * 4
    vocab = cfg.vocab_size // sizes["tensor"] if cfg.vocab_size % sizes["tensor"] == 0 else cfg.vocab_size
    chunk_tokens = micro_per_device * min(step.objective.loss_chunk, step.seq_len)
    loss_set = chunk_tokens * vocab * 4 * 3  # logits, softmax, their gradient (float32)
    out["working_set"] = int(max(layer_set, loss_set))
    out["total"] = sum(out.values())
    return out


def _data_parallel(mesh: MeshConfig, devices: int) -> int:
    sizes = resolve_mesh_shape(mesh, devices)
    return sizes["data"] * sizes["fsdp"]


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
    heads = base.num_heads * max(args.batch // args.microbatches // _data_parallel(mesh_cfg, devices), 1)
    largest = attention_score_bytes(comp, args.seq, heads, args.backend, base.dtype, base.attention_impl)
    print(f"  (largest attention tensor, {layer_attention_impl(base, comp, args.backend)}: "
          f"{largest / gib:.2f} GiB per device per layer)")
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
