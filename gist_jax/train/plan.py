"""Memory planning: will this model, context and mesh fit, before anything is launched?

    python -m gist_jax.train.plan --config experiments/llama3_8b_paper.py:ae,tie --devices 64 \
        --config.model.init=preset:llama3_8b [--config.<key>=<value> ...] [--backend gpu] \
        [--device-gib 80] [--compile]

The run is read as ``gist_jax.main`` reads it (``gist_jax/cli_config.py``); only the model's shape
is needed, so ``model.init`` may name a preset of the same shape where the weights are elsewhere.
A recipe that draws its ratio per instance (or per segment) is planned at every ratio it can
draw and the worst case, the ratio needing the most memory, is reported. ``gist_jax.main``
prints the same summary (worst ratio only) before it compiles.

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
import dataclasses
import math
import sys
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec
from jax.typing import DTypeLike

from gist_jax.errors import ConfigError
from gist_jax.gist.config import CompressionConfig, variant_of
from gist_jax.gist.forward import resolve_gist_kernel
from gist_jax.gist.layout import build_layout
from gist_jax.gist.params import model_config_for
from gist_jax.gist.structured import MEMORY_KEY_BLOCK, QUERY_BLOCK
from gist_jax.gist.window import context_window_plan
from gist_jax.model.causal import DEFAULT_BLOCK, resolve_impl
from gist_jax.model.config import ModelConfig
from gist_jax.model.kernels import parse_attention, with_gist_kernel
from gist_jax.model.sharding import LOGICAL_AXIS_RULES, fit_spec, logical_to_mesh
from gist_jax.model.transformer import init_params, param_logical_specs
from gist_jax.train.config import MeshConfig, StepConfig
from gist_jax.train.mesh import resolve_mesh_shape
from gist_jax.train.objectives import objectives
from gist_jax.train.plan_trace import abstract_params, layer_residual_bytes, saved_residual_bytes
from gist_jax.train.state import logical_param_specs, trainable_tree


def _shard_bytes(shape: tuple[int, ...], dtype: DTypeLike, spec: PartitionSpec, sizes: dict[str, int]) -> int:
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
                          compute_dtype: str = "bfloat16", attention: str = "auto", context: int = 1) -> int:
    """float32 bytes of the largest per-layer score tensor the attention implementation holds
    (``rows`` = sequences x heads per device), for ``model.attention`` (``attention``) as it resolves on
    ``backend`` with ``compute_dtype``, the sequence split over ``context`` blocks
    (``forward.resolve_gist_kernel``):

      dense       T x K per row (K = 2T with compression: every token also as memory)
      decomposed  one query block x Ts (local) + Ts x min(M, MEMORY_KEY_BLOCK) (one memory
                  step of the scan, a key block at a time)
      flash       cuDNN (gpu): S x E softmax statistics, E = M + Ts; XLA: S x E^2
      bank        Splash (tpu): T softmax statistics (x2)
      windowed    UniGist (``window.py``): Ts x (nb + 1) Ts (one segment's band) + Ts x the
                  largest memory group's bound (one scan step)

    Without gists (``memory='none'``) the plain causal kernel (``attention``'s causal part,
    ``causal.resolve_impl``) runs instead.
    """
    if not comp.enabled:
        head_dim = 128  # only decides whether cuDNN takes it; every preset's head size does
        impl = resolve_impl(parse_attention(attention).causal, backend, compute_dtype, head_dim)
        block = min(DEFAULT_BLOCK, seq_len)
        per_row = {"dense": seq_len * seq_len, "blockwise": block * block}.get(impl, seq_len)
        return rows * per_row * 4
    shape = build_layout(seq_len, comp).shape
    t, s, ts, m = shape.length, shape.num_segments, shape.segment_tokens, shape.memory_size
    impl = resolve_gist_kernel(parse_attention(attention).gist, compute_dtype=compute_dtype, backend=backend,
                               windowed=comp.windowed, context=context)
    if impl == "windowed":  # window.py: one query block's band and memory scores
        from gist_jax.gist.window import window_plan

        wp = window_plan(shape, comp.window)
        bound = max((b for _, _, b in wp.groups), default=0)
        return rows * wp.query_block * (wp.band + bound) * 4
    if impl == "bank" and backend != "tpu":  # Pallas interpret mode: plain XLA arrays per block
        impl = "dense"
    on_gpu = backend == "gpu"
    block = min(QUERY_BLOCK, ts)  # decomposed: one query block's scores at a time
    per_row = {"dense": t * 2 * t, "decomposed": block * ts + ts * min(m, MEMORY_KEY_BLOCK), "bank": 2 * t,
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
# The dense reference under remat recomputes its [T, 2T] scores and holds their gradient and
# mask beside them (``dense_remat``). Coarse-Rec's backward recomputes one segment step at a time
# (``gist/recurrent.py``), a causal pass over ``s + S * slots + Ts`` rows: its unit is that pass's
# own plan, saved activations plus working set (``recurrent_step``, ``_recurrent_step_bytes``).
WORKING_SET_LAYERS = {"none": 1.0, "remat": 1.2, "dense_remat": 2.0, "blockwise": 0.3, "recurrent_step": 1.2}
# Live float32 tiles of the blockwise causal kernel (scores, probabilities, their gradients,
# the mask) per query x key block and head.
BLOCKWISE_LIVE_TILES = 5
# Of the blockwise kernel's forward alone (scores and probabilities): online TIE's reference pass.
TIE_LIVE_TILES = 2


def layer_attention_kernel(cfg: ModelConfig, comp: CompressionConfig, backend: str, context: int = 1) -> str:
    """The attention implementation the decoder layers run on ``backend`` (with the sequence split
    over ``context`` devices: the decomposed kernel per block, ``gist/context_parallel.py``, or
    UniGist's windowed one, ``gist/context_window.py``): the variant's answer."""
    return variant_of(comp).layer_kernel(cfg, comp, backend, context)


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
    abstract = abstract_params(base, comp, step)
    logical = logical_param_specs(base, comp, step)
    trainable = trainable_tree(abstract, comp)
    param_bytes = _tree_bytes(abstract, logical, sizes)
    trainable_bytes = _tree_bytes(abstract, logical, sizes, trainable)
    out: dict[str, float] = {"params": param_bytes, "optimizer_state": 2 * trainable_bytes,
                             "gradients": trainable_bytes}
    micro_per_device = max(step.batch_size // step.microbatches // _data_parallel(step.mesh, num_devices), 1)
    if objectives(step, comp).tie_online:
        base_abstract = jax.eval_shape(lambda: init_params(base, jax.random.key(0)))
        out["tie_reference"] = _tree_bytes(base_abstract, param_logical_specs(base), sizes)
        if sizes["context"] > 1:
            out["tie_pass"] = tie_pass_bytes(base, step, sizes, micro_per_device)
    # Context parallelism: a device holds one block of whole segments; its activations are those
    # of a sequence that long, plus the gathered memory buffer each layer keeps for its backward.
    local = _local_step(step, sizes["context"])
    if comp.memory == "kv" and resolve_gist_kernel(base.kernels.gist, windowed=comp.windowed,
                                                   context=sizes["context"]) == "decomposed":
        # the unsplit trace runs what every block runs
        base = base.replace(attention=with_gist_kernel(base.attention, "decomposed"))
    out["activations_saved"] = saved_residual_bytes(base, comp, local, micro_per_device, backend)
    if sizes["context"] > 1:
        resolved = dataclasses.replace(step, mesh=dataclasses.replace(step.mesh, tensor=sizes["tensor"]))
        out["context_memory"] = context_buffer_bytes(base, comp, resolved, sizes["context"], micro_per_device)
    impl = layer_attention_kernel(cfg, comp, backend, sizes["context"])
    if comp.memory == "recurrent":
        layer_set = WORKING_SET_LAYERS["recurrent_step"] * _recurrent_step_bytes(base, comp, step, num_devices, backend)
    else:
        layer = layer_residual_bytes(base, comp, local, micro_per_device, backend)
        if impl == "blockwise":
            layer_set = WORKING_SET_LAYERS["blockwise"] * layer
        elif cfg.remat_policy == "none":
            layer_set = WORKING_SET_LAYERS["none"] * layer
        else:
            layer_set = WORKING_SET_LAYERS["dense_remat" if impl == "dense" else "remat"] * layer
    if sizes["fsdp"] > 1:  # one layer's weights gathered in the compute dtype, and their gradients
        full_bytes = _tree_bytes(abstract, logical, dict.fromkeys(sizes, 1))
        layer_set += 2 * full_bytes // cfg.num_layers * np.dtype(cfg.dtype).itemsize // 4
    if impl == "blockwise":
        block_q = block_k = min(DEFAULT_BLOCK, step.seq_len)
        layer_set += BLOCKWISE_LIVE_TILES * micro_per_device * cfg.num_heads * block_q * block_k * 4
    vocab = cfg.vocab_size // sizes["tensor"] if cfg.vocab_size % sizes["tensor"] == 0 else cfg.vocab_size
    chunk_tokens = micro_per_device * min(step.objective.loss_chunk, local.seq_len)
    loss_set = chunk_tokens * vocab * 4 * 3  # logits, softmax, their gradient (float32)
    out["working_set"] = int(max(layer_set, loss_set))
    out["total"] = sum(out.values())
    return out


def tie_pass_bytes(base: ModelConfig, step: StepConfig, sizes: dict[str, int], sequences: int) -> int:
    """What online TIE's frozen causal reference pass adds under context parallelism (it saves
    nothing: no gradient): the causal kernel's live score tiles (``TIE_LIVE_TILES`` blocks, or
    the dense kernel's ``[T_block, T]`` scores) and one layer's raw K/V gathered from every
    block (``model/context_causal.py``). Measured, not assumed: on 8 fake CPU devices (2K tokens,
    4 blocks) the compiled step with online TIE took 20.2 MiB against 10.6 without, so the pass
    adds to the step's peak there; on one device XLA overlaps it with the step's own working
    set (counting it there put the planner's TIE cases at 1.19-1.53x of the compiled step), so
    ``plan`` counts it only with ``context`` > 1."""
    context = sizes["context"]
    queries = step.seq_len // context
    if base.kernels.causal == "dense":  # the XLA-partitioned dense reference
        scores = 2 * sequences * base.num_heads * queries * step.seq_len * 4
    else:  # every block runs the blockwise kernel, whatever the backend
        scores = TIE_LIVE_TILES * sequences * base.num_heads * min(DEFAULT_BLOCK, queries) * min(
            DEFAULT_BLOCK, step.seq_len) * 4
    resolved = dataclasses.replace(step, mesh=dataclasses.replace(step.mesh, tensor=sizes["tensor"]))
    return scores + step.seq_len * _kv_entry_bytes(base, resolved, sequences)


def _local_step(step: StepConfig, context: int) -> StepConfig:
    """The step one device of a ``context``-way split computes: its block of the sequence."""
    return step if context == 1 else dataclasses.replace(step, seq_len=step.seq_len // context)


def context_buffer_bytes(base: ModelConfig, comp: CompressionConfig, step: StepConfig, context: int,
                         sequences: int) -> int:
    """The gathered memory buffer (sinks and every segment's gist K/V) per device that the
    context-parallel kernel keeps per layer for the backward, beyond the block's own share
    (which the local trace already counts): ``layers x (M - M_local) x kv_heads x head_dim x
    2 x dtype bytes x sequences``."""
    shape = build_layout(step.seq_len, comp).shape
    local = build_layout(step.seq_len // context, comp).shape
    layers = base.num_layers if base.remat_policy == "none" else 1  # remat: recomputed per layer
    return layers * (shape.memory_size - local.memory_size) * _kv_entry_bytes(base, step, sequences)


def _kv_entry_bytes(base: ModelConfig, step: StepConfig, sequences: int) -> int:
    """One token's K and V on one device (KV heads split over ``tensor`` where they divide)."""
    tensor = step.mesh.tensor if step.mesh.tensor > 0 else 1
    kv_heads = base.num_kv_heads // tensor if base.num_kv_heads % tensor == 0 else base.num_kv_heads
    return 2 * kv_heads * base.head_dim * np.dtype(base.dtype).itemsize * sequences


def context_traffic(base: ModelConfig, comp: CompressionConfig, step: StepConfig, num_devices: int) -> dict[str, int]:
    """Bytes per device per step that context parallelism adds on the ``context`` axis, as the
    compiled HLO counts them (``gist_jax.bench.collectives``: an op's output size):

      gist_gather     per layer and microbatch, the memory buffer's all-gather,
                      ``(gists + blocks x sinks) x kv_heads x head_dim x 2 x dtype bytes x
                      sequences`` (the device's KV heads); twice when remat recomputes the
                      forward
      gist_scatter    its transpose in the backward, a reduce-scatter: 1 / blocks of it
      full_kv_gather  for comparison, what an all-gather of every raw token's K/V would move in
                      the same passes (ring or all-gather attention over the full sequence)
      tie_kv_gather   online TIE only: its causal reference pass gathers every raw token's K/V
                      once per layer and microbatch (forward only; ``model/context_causal.py``)
      halo_permute    UniGist only: each block's last ``halo`` keys and values sent to the next
                      block per layer (``gist/context_window.py``), and their gradients back

    Parameter gradients are all-reduced over ``context`` as over ``data`` (not counted here)."""
    sizes = resolve_mesh_shape(step.mesh, num_devices)
    context = sizes["context"]
    if context == 1 or not comp.enabled:
        return {}
    shape = build_layout(step.seq_len, comp).shape
    sequences = max(step.batch_size // step.microbatches // _data_parallel(step.mesh, num_devices), 1)
    entry = _kv_entry_bytes(base, dataclasses.replace(step, mesh=dataclasses.replace(
        step.mesh, tensor=sizes["tensor"])), sequences)
    passes = step.microbatches * base.num_layers * (1 if base.remat_policy == "none" else 2)
    gathered = (shape.num_segments * shape.slots + context * shape.num_sinks) * entry
    full = passes * step.seq_len * entry
    traffic = {"gist_gather": passes * gathered,
               "gist_scatter": step.microbatches * base.num_layers * gathered // context,
               "full_kv_gather": full}
    if objectives(step, comp).tie_online:
        traffic["tie_kv_gather"] = step.microbatches * base.num_layers * step.seq_len * entry
    if comp.windowed:  # each block's last keys to the next block, and their gradients back
        halo = context_window_plan(shape, comp.window, context).halo * entry
        traffic["halo_permute"] = passes * halo + step.microbatches * base.num_layers * halo
    return traffic


def _recurrent_step_bytes(base: ModelConfig, comp: CompressionConfig, step: StepConfig, num_devices: int,
                          backend: str) -> int:
    """What the backward of one Coarse-Rec segment step holds: the plan (saved activations and
    working set) of the plain causal pass it recomputes, over ``[sinks | memory | segment]``."""
    shape = build_layout(step.seq_len, comp).shape
    rows = shape.num_sinks + shape.num_segments * shape.slots + shape.segment_tokens
    one_pass = dataclasses.replace(step, seq_len=rows, objective=dataclasses.replace(step.objective, tie=False,
                                                                                         ae=False))
    sized = plan(base, dataclasses.replace(comp, memory="none"), one_pass, num_devices, backend)
    return int(sized["activations_saved"] + sized["working_set"])


def _data_parallel(mesh: MeshConfig, devices: int) -> int:
    sizes = resolve_mesh_shape(mesh, devices)
    return sizes["data"] * sizes["fsdp"]


def plan_ratios(comp: CompressionConfig, worst_only: bool = False) -> tuple[int, ...]:
    """The fixed ratios to plan a recipe at: every ratio it can draw (``per_instance`` or
    ``per_segment`` sampling draws any of them), or only the smallest with ``worst_only``.
    A smaller ratio means more gist tokens in every segment and a longer layout, so it needs
    the most memory; planning it is the worst case a step can meet."""
    if not comp.enabled:
        return ()
    ratios = tuple(sorted({int(r) for r in comp.ratios}))
    return ratios[:1] if worst_only else ratios


def plan_run(base: ModelConfig, comp: CompressionConfig, step: StepConfig, num_devices: int,
             backend: str = "gpu", worst_only: bool = False) -> tuple[int | None, dict[str, float], dict[int, float]]:
    """(planned ratio, its ``plan``, total bytes per ratio) for a recipe whose steps draw their
    ratio: each ratio is planned as a fixed layout and the one needing the most memory kept."""
    ratios = plan_ratios(comp, worst_only)
    if not ratios:
        return None, plan(base, comp, step, num_devices, backend), {}
    plans = {r: plan(base, comp.replace(ratios=(r,), ratio_sampling="fixed"), step, num_devices, backend)
             for r in ratios}
    worst = max(plans, key=lambda r: plans[r]["total"])
    return worst, plans[worst], {r: p["total"] for r, p in plans.items()}


def summary_lines(name: str, base: ModelConfig, comp: CompressionConfig, step: StepConfig, num_devices: int,
                  backend: str, device_gib: float | None = None, worst_only: bool = False) -> list[str]:
    """The planner's report: what is planned, bytes per device by category, the verdict."""
    gib = 2 ** 30
    worst, result, totals = plan_run(base, comp, step, num_devices, backend, worst_only)
    unit, scale = ("GiB", gib) if result["total"] >= gib else ("MiB", 2 ** 20)
    sizes = resolve_mesh_shape(step.mesh, num_devices)
    variant = f"{comp.memory}/{comp.granularity}" if comp.enabled else "full attention"
    lines = [(f"plan: {name}: {step.seq_len} tokens x {step.batch_size} sequences in {step.microbatches} "
              f"microbatch(es), mesh {sizes} = {num_devices} {backend} devices"),
             (f"  {variant}, L={comp.segment_length}, remat={base.remat_policy}, dtype={base.dtype}, attention "
              f"{layer_attention_kernel(base, comp, backend, sizes['context'])}, causal kernel "
              f"{resolve_impl(base.kernels.causal, backend, base.dtype, base.head_dim)}")]
    if worst is not None:
        others = ", ".join(f"r={r}: {t / scale:.2f}" for r, t in totals.items() if r != worst)
        how = "the smallest ratio has the most gist tokens" if worst_only else \
            f"the ratio needing the most memory{f'; total {unit} at ' + others if others else ''}"
        lines.append(f"  ratios {tuple(comp.ratios)} ({comp.ratio_sampling}): planned the worst case r={worst} ({how})")
    lines += [f"  {key:>18}: {value / scale:9.2f} {unit} per device" for key, value in result.items()]
    planned = comp.replace(ratios=(worst,), ratio_sampling="fixed") if worst is not None else comp
    if traffic := context_traffic(base, planned, step, num_devices):
        mib = 2 ** 20
        lines.append(f"  context axis per step: gist K/V all-gather {traffic['gist_gather'] / mib:.1f} MiB + "
                     f"reduce-scatter {traffic['gist_scatter'] / mib:.1f} MiB per device (an all-gather of "
                     f"the full K/V: {traffic['full_kv_gather'] / mib:.1f} MiB; "
                     f"{traffic['gist_gather'] / traffic['full_kv_gather']:.3f}x)")
        if "halo_permute" in traffic:
            lines.append(f"  context axis per step: UniGist's window halo {traffic['halo_permute'] / mib:.1f} MiB "
                         "per device (collective-permute to the next block and back)")
        if "tie_kv_gather" in traffic:
            lines.append(f"  context axis per step: online TIE's reference pass gathers every raw token's K/V, "
                         f"{traffic['tie_kv_gather'] / mib:.1f} MiB per device (precomputed weights need no pass)")
    heads = base.num_heads * max(step.batch_size // step.microbatches // _data_parallel(step.mesh, num_devices), 1)
    largest = attention_score_bytes(planned, step.seq_len, heads, backend, base.dtype, base.attention,
                                    context=sizes["context"])
    lines.append(f"  (largest attention tensor: {largest / scale:.2f} {unit} per device per layer)")
    if device_gib is not None:
        verdict = "fits" if result["total"] <= device_gib * gib else "does NOT fit"
        lines.append(f"  estimate {verdict} in {device_gib:g} GiB per device")
    return lines


def mesh_devices(mesh: MeshConfig, devices: int | None) -> int:
    """``devices``, or the product of the mesh's sizes when none of them is -1."""
    sizes = mesh.sizes()
    if devices is None:
        if any(v == -1 for v in sizes.values()):
            raise ConfigError(f"mesh {sizes} has an axis of -1 (all remaining devices): give the device count "
                              "to plan for, e.g. --devices 64")
        return math.prod(sizes.values())
    return devices


def main(argv: list[str] | None = None) -> int:
    from gist_jax import cli_config

    p = argparse.ArgumentParser(prog="python -m gist_jax.train.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli_config.add_config_flag(p, what="the run to plan")
    p.add_argument("--devices", type=int, default=None,
                   help="device count to plan for (default: the mesh's product; needed when an axis is -1)")
    p.add_argument("--backend", default="gpu", choices=["gpu", "tpu", "cpu"],
                   help="where the run will be: decides what auto/flash/bank hold")
    p.add_argument("--device-gib", "--device_gib", dest="device_gib", type=float, default=80.0,
                   help="memory per device to compare with")
    p.add_argument("--compile", action="store_true",
                   help="also compile the real step on this machine's devices (small configs)")
    args, overrides = cli_config.parse_tool_args(p, argv)
    try:
        run = cli_config.load_run(args.config, overrides)
        base = cli_config.model_shape(run.model)
        devices = mesh_devices(run.step.mesh, args.devices)
        resolve_mesh_shape(run.step.mesh, devices)
    except (cli_config.CliConfigError, ValueError) as e:
        cli_config.exit_config_error(e)
    for line in summary_lines(run.name, base, run.compression, run.step, devices, args.backend, args.device_gib):
        print(line)
    if args.compile:
        gib = 2 ** 30
        worst = plan_ratios(run.compression, worst_only=True)
        comp = run.compression.replace(ratios=worst, ratio_sampling="fixed") if worst else run.compression
        print(f"  compiled (XLA memory analysis): {compiled_memory(base, comp, run.step) / gib:.3f} GiB per device")
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
    if stats is None:
        raise RuntimeError(f"XLA has no memory analysis on the {jax.default_backend()} backend; "
                           "plan without --compile")
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


if __name__ == "__main__":
    sys.exit(main())
