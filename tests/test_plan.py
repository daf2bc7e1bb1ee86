"""Memory planning: stored bytes match the real sharded state; the CLI and compiled analysis run."""

from __future__ import annotations

import jax
import pytest
from gist_helpers import BASE, comp_config

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
    assert plan.main(["--model", "tiny", "--seq", "32", "--batch", "8", "--mesh", "2,2,2", "--segment", "8",
                      "--ratio", "4", "--remat", "full", "--compile"]) == 0
    out = capsys.readouterr().out
    assert "GiB per device" in out and "fits" in out and "compiled (XLA memory analysis)" in out


def test_llama3_8b_at_16k_is_planned_without_allocating():
    step = StepConfig(batch_size=64, seq_len=16384, mesh=MeshConfig(1, 64, 1))
    result = plan.plan(plan.preset("llama3_8b"), comp_config("kv", "fine", segment_length=2048), step, 64)
    assert 0.4 * 2**30 < result["params"] < 0.6 * 2**30  # 8B fp32 / 64 devices


def test_attention_scores_follow_the_implementation():
    """Per row (sequence x head), float32: L = 8, r = 4, 2 sinks, 32 tokens -> S = 4 segments of
    Ts = 10 layout tokens, T = 40, memory M = 2 + 4 x 2 = 10, flash rows E = M + Ts = 20."""
    def per_row(impl, backend, positions="compressed"):
        comp = comp_config("kv", "fine", positions, sinks=2, attention_impl=impl)
        return plan.attention_score_bytes(comp, 32, 1, backend) // 4

    assert per_row("dense", "gpu") == 40 * 80
    assert per_row("decomposed", "gpu") == 4 * 10 * 10 + 10 * 10
    assert per_row("flash", "gpu") == 4 * 20 and per_row("auto", "gpu") == 4 * 20
    assert per_row("flash", "cpu") == 4 * 20 * 20
    assert per_row("auto", "tpu") == per_row("decomposed", "tpu")
    assert per_row("bank", "tpu", "aligned") == 2 * 40
    assert per_row("bank", "gpu", "aligned") == per_row("flash", "gpu")
    none = comp_config("none", "fine")
    assert plan.attention_score_bytes(none, 32, 3, causal_impl="dense") == 3 * 32 * 32 * 4
    assert plan.attention_score_bytes(none, 1024, 3, "cpu", causal_impl="auto") == 3 * 512 * 512 * 4
    assert plan.attention_score_bytes(none, 1024, 3, "gpu", causal_impl="auto") == 3 * 1024 * 4
