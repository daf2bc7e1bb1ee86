"""Memory planning: stored bytes match the real sharded state; the CLI and compiled analysis run."""

from __future__ import annotations

import pathlib

import jax
import pytest
from gist_helpers import BASE, comp_config

from gist_jax.model.config import preset
from gist_jax.model.kernels import AttentionChoice
from gist_jax.train import plan
from gist_jax.train.config import MeshConfig, ObjectiveConfig, StepConfig
from gist_jax.train.mesh import make_mesh
from gist_jax.train.state import create_train_state


def _device0_bytes(tree) -> int:
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "addressable_shards")
               and x.ndim > 0)


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 8, 1)])
def test_planned_state_bytes_equal_the_real_sharded_state(mesh):
    comp = comp_config("kv", "fine", sinks=2, gist_projections=True)
    step = StepConfig(batch_size=8, seq_len=24, mesh=MeshConfig(*mesh), objective=ObjectiveConfig(tie=True, ae=True))
    planned = plan.plan(BASE, comp, step, 8)
    state, _, _ = create_train_state(BASE, comp, step, make_mesh(step.mesh))
    assert planned["params"] == _device0_bytes(state.params)
    assert planned["optimizer_state"] == _device0_bytes(state.opt_state)
    assert planned["tie_reference"] == _device0_bytes(state.ref_params)
    assert planned["total"] > planned["params"] + planned["optimizer_state"]


def test_cli_prints_a_verdict_and_compiled_analysis(capsys):
    demo = str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "demo.py")
    assert plan.main(["--config", f"{demo}:tiny,noae,notie", "--config.step.seq_len=32", "--config.step.batch_size=8",
                      "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                      "--config.compression.segment_length=8", "--config.compression.num_sinks=2",
                      "--config.model.remat_policy=full", "--compile"]) == 0
    out = capsys.readouterr().out
    assert "MiB per device" in out and "fits" in out and "compiled (XLA memory analysis)" in out
    # demo:tiny draws ratios (4, 8) per instance: both planned, the worst case (r=4) reported
    assert "planned the worst case r=4" in out and "r=8:" in out


def test_llama3_8b_at_16k_is_planned_without_allocating():
    step = StepConfig(batch_size=64, seq_len=16384, mesh=MeshConfig(1, 64, 1))
    result = plan.plan(preset("llama3_8b"), comp_config("kv", "fine", segment_length=2048), step, 64)
    assert 0.4 * 2**30 < result["params"] < 0.6 * 2**30  # 8B fp32 / 64 devices


def test_attention_scores_follow_the_implementation():
    """Per row (sequence x head), float32: L = 8, r = 4, 2 sinks, 32 tokens -> S = 4 segments of
    Ts = 10 layout tokens, T = 40, memory M = 2 + 4 x 2 = 10, flash rows E = M + Ts = 20."""
    def per_row(impl, backend, positions="compressed"):  # impl: the gist part of model.attention
        comp = comp_config("kv", "fine", positions, sinks=2)
        return plan.attention_score_bytes(comp, 32, 1, backend, attention=impl) // 4

    assert per_row("dense", "gpu") == 40 * 80
    assert per_row("decomposed", "gpu") == 10 * 10 + 10 * 10  # one query block (all 10 rows) x Ts
    assert per_row("flash", "gpu") == 4 * 20 and per_row("auto", "gpu") == 4 * 20
    assert per_row("flash", "cpu") == 4 * 20 * 20
    assert per_row("auto", "tpu") == per_row("decomposed", "tpu")
    assert per_row("bank", "tpu", "aligned") == 2 * 40
    assert per_row("bank", "gpu", "aligned") == per_row("flash", "gpu")
    assert per_row("cudnn,flash", "gpu") == per_row("flash", "gpu")  # the causal part: not a KV pass's
    assert per_row("blockwise", "gpu") == per_row("auto", "gpu")  # a causal name leaves the gist kernel auto
    none = comp_config("none", "fine")  # full attention: the causal part of model.attention
    assert plan.attention_score_bytes(none, 32, 3, attention="dense") == 3 * 32 * 32 * 4
    assert plan.attention_score_bytes(none, 32, 3, attention="dense,decomposed") == 3 * 32 * 32 * 4
    assert plan.attention_score_bytes(none, 1024, 3, "cpu", attention="auto") == 3 * 512 * 512 * 4
    assert plan.attention_score_bytes(none, 1024, 3, "gpu", attention="auto") == 3 * 1024 * 4
    assert plan.attention_score_bytes(none, 1024, 3, "gpu", attention="auto,dense") == 3 * 1024 * 4
    assert plan.attention_score_bytes(none, 1024, 3, "gpu", attention="blockwise") == 3 * 512 * 512 * 4


# (variant, TIE, AE, raw tokens, remat, attention): every variant, TIE and AE on and off, two
# contexts, remat on and off; attention is model.attention's causal part for full attention
# (auto: blockwise here, or dense) and its gist part for the KV variants (auto or dense).
XLA_CASES = [  # the KV variants with the gist kernel auto (decomposed here) or dense
    ("full", False, False, 1024, "none", "auto"),
    ("full", False, False, 2048, "full", "auto"),
    ("full", False, False, 1024, "none", "dense"),
    ("fine_kv", True, True, 1024, "none", "auto"),
    ("fine_kv", True, True, 2048, "full", "auto"),
    ("coarse_kv", True, False, 2048, "none", "auto"),
    ("fine_kv", True, False, 2048, "full", "dense"),
    ("coarse_kv", False, True, 1024, "none", "dense"),
    ("coarse_rec", True, False, 1024, "none", "auto"),
    ("coarse_rec", True, False, 2048, "full", "auto"),
]
VARIANT_MEMORY = {"full": ("none", "fine"), "fine_kv": ("kv", "fine"), "coarse_kv": ("kv", "coarse"),
                  "coarse_rec": ("recurrent", "coarse")}


def _case(variant, tie, ae, seq, remat, causal):
    memory, granularity = VARIANT_MEMORY[variant]
    attention = {"none": AttentionChoice(causal=causal), "kv": AttentionChoice(gist=causal)}.get(memory,
                                                                                             AttentionChoice())
    base = preset("tiny", remat_policy=remat, attention=attention.name, max_position_embeddings=4096)
    comp = comp_config(memory, granularity, segment_length=128, ratio=8, sinks=4) if memory != "none" \
        else comp_config("none", "fine")
    devices = jax.device_count()  # one sequence per device, data parallel
    step = StepConfig(batch_size=devices, seq_len=seq, mesh=MeshConfig(-1, 1, 1),
                      objective=ObjectiveConfig(tie=tie, ae=ae))
    return base, comp, step


@pytest.mark.parametrize("case", XLA_CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_planned_total_is_within_30_percent_of_xla_compiled_memory(case):
    """The planner against XLA's own analysis of the compiled step on this backend: a dropped
    pass (TIE, AE, the loss chunks), a residual it forgets, or a working set of the wrong
    order moves the estimate out of the band."""
    base, comp, step = _case(*case)
    estimate = plan.plan(base, comp, step, jax.device_count(), jax.default_backend())["total"]
    compiled = plan.compiled_memory(base, comp, step)
    assert 0.7 < estimate / compiled < 1.3, (estimate, compiled)


@pytest.mark.parametrize("ae,tie,window,seq,context", [
    (False, False, 0, 2048, 4), (True, False, 0, 4096, 8), (False, True, 0, 2048, 4), (True, True, 0, 4096, 8),
    (True, False, 128, 4096, 8)])
def test_context_parallel_plan_is_within_30_percent_of_xla(ae, tie, window, seq, context):
    """With the sequence split over ``mesh.context``: one block's activations, the gathered gist
    buffer, online TIE's reference pass and the traffic report, against the compiled step on 8
    fake devices (UniGist with ``window``)."""
    base = preset("tiny", attention="auto", max_position_embeddings=8192)
    comp = comp_config("kv", "fine", segment_length=128, ratio=8, sinks=4,
                       **({"window": window, "positions": "aligned"} if window else {}))
    step = StepConfig(batch_size=8 // context, seq_len=seq, mesh=MeshConfig(-1, 1, 1, context),
                      objective=ObjectiveConfig(ae=ae, tie=tie, tie_source="online"))
    estimate = plan.plan(base, comp, step, 8, "cpu")
    assert estimate["context_memory"] > 0
    compiled = plan.compiled_memory(base, comp, step)
    assert 0.7 < estimate["total"] / compiled < 1.3, (estimate, compiled)
    traffic = plan.context_traffic(base, comp, step, 8)
    assert traffic["gist_gather"] * 8 <= traffic["full_kv_gather"] * 1.1  # 1/r, plus the sinks
    assert traffic["gist_scatter"] * context == traffic["gist_gather"]
    lines = plan.summary_lines("cp", base, comp, step, 8, "gpu")
    assert f"attention {'windowed' if window else 'decomposed'}" in lines[1]  # every block's kernel, cuDNN or not
    assert any("context axis per step: gist K/V all-gather" in line for line in lines), lines
    assert ("tie_kv_gather" in traffic) == tie == ("tie_pass" in estimate)
    if tie:  # every raw token's K and V, per layer, once (the frozen pass has no backward)
        assert traffic["tie_kv_gather"] == base.num_layers * seq * 2 * base.num_kv_heads * base.head_dim * 4


def test_planned_activations_follow_every_pass_and_the_attention_kernel():
    """Saved activations are traced from the real loss: AE's decoder and the dense causal
    kernel's T x T scores appear in them, the blockwise kernel's O(T) residuals do not grow
    quadratically, and remat keeps less than no remat."""
    def saved(*case):
        base, comp, step = _case(*case)
        return plan.plan(base, comp, step, jax.device_count(), "cpu")["activations_saved"]

    assert saved("fine_kv", True, True, 1024, "none", "auto") > saved("fine_kv", True, False, 1024, "none", "auto")
    dense_growth = (saved("full", False, False, 2048, "none", "dense")
                    / saved("full", False, False, 1024, "none", "dense"))
    blockwise_growth = (saved("full", False, False, 2048, "none", "auto")
                        / saved("full", False, False, 1024, "none", "auto"))
    assert dense_growth > 3.0 and blockwise_growth < 2.1
    assert (saved("fine_kv", False, False, 1024, "full", "auto")
            < saved("fine_kv", False, False, 1024, "none", "auto") / 5)


def test_plan_for_a_gpu_traces_cudnn_as_its_residuals():
    """Planning a GPU run here: cuDNN's fused attention is traced as a stand-in that keeps
    (q, k, v, out, lse), so a bf16 full-attention plan keeps O(T) per layer, not T x T."""
    base = preset("tiny", remat_policy="none", dtype="bfloat16", max_position_embeddings=8192)
    none = comp_config("none", "fine")
    short, long = (StepConfig(batch_size=1, seq_len=n, mesh=MeshConfig(1, 1, 1)) for n in (2048, 4096))
    growth = (plan.plan(base, none, long, 1, "gpu")["activations_saved"]
              / plan.plan(base, none, short, 1, "gpu")["activations_saved"])
    assert plan.layer_attention_kernel(base, none, "gpu") == "cudnn" and 1.9 < growth < 2.1
    assert jax.nn.dot_product_attention.__module__.startswith("jax")  # the stand-in is gone afterwards


def test_a_windowed_config_plans_the_windowed_path():
    """UniGist (compression.window > 0): the layers run window.py on every backend (dense stays the
    reference), whose largest score tensor is one scan step's band and memory scores."""
    from gist_jax.gist.config import CompressionConfig
    from gist_jax.gist.layout import build_layout
    from gist_jax.gist.window import window_plan

    comp = CompressionConfig(memory="kv", granularity="fine", positions="aligned", segment_length=8, ratios=(4,),
                             ratio_sampling="fixed", num_sinks=2, window=8)
    base = preset("tiny")
    assert {plan.layer_attention_kernel(base, comp, b) for b in ("cpu", "gpu", "tpu")} == {"windowed"}
    assert plan.layer_attention_kernel(base.replace(attention="decomposed"), comp, "gpu") == "windowed"
    assert plan.layer_attention_kernel(base.replace(attention="auto,dense"), comp, "gpu") == "dense"
    wp = window_plan(build_layout(32, comp).shape, 8)  # 32 tokens: 4 segments of 8 + 2 gists
    bound = max(b for _, _, b in wp.groups)
    assert (wp.query_block, wp.band, bound) == (40, 40, 0)  # one block: the whole layout, no memory
    assert plan.attention_score_bytes(comp, 32, 3, "gpu") == 3 * wp.query_block * (wp.band + bound) * 4
