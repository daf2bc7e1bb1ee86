"""A compression variant is one registered unit: a toy variant, written here as one class and
registered with one call, trains through the real step, is counted by the FLOPs model, planned
by the memory planner, and refused (one clear line) where it has no implementation, without an
edit anywhere in ``gist_jax/``. Also: the built-in variants are what each config selects."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gist_helpers import BASE, comp_config, gist_kernel, model
from test_objectives import one_step

from gist_jax.errors import ConfigError
from gist_jax.gist import config as gist_config
from gist_jax.gist import variants
from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.context_parallel import check_context_parallel
from gist_jax.gist.forward import compressed_logits
from gist_jax.gist.layout import build_layout
from gist_jax.gist.specs import layout_arrays
from gist_jax.inference.cache import Cache, Plan
from gist_jax.inference.decode import feed
from gist_jax.train import flops, plan
from gist_jax.train.config import MeshConfig, ObjectiveConfig, OptimizerConfig, StepConfig


class LocalOnly(variants.ChunkedKV):
    """Toy: Fine-KV's layout, but a segment sees no memory at all (its gists are computed and
    attended to inside their segment only). Runs the dense reference with its own mask."""

    name, memory = "local_only", "local"

    def selects(self, comp):
        return comp.memory == "local"

    def reference_spec(self, arrays, comp, batch, stop_gist_memory_gradient=False):
        spec = super().reference_spec(arrays, comp, batch, stop_gist_memory_gradient)
        return spec.replace(memory_mask=jnp.zeros_like(spec.memory_mask))

    def forward(self, cfg, comp, shape, params, tokens_BxN, arrays, **kwargs):
        return super().forward(gist_kernel(cfg, "dense"), comp, shape, params, tokens_BxN, arrays, **kwargs)

    def visible_pairs(self, layout, num_raw):
        local_pairs, live_S = variants._local_counts(layout)
        return variants.PairCounts(int(live_S.sum()), num_raw, local_pairs)

    def computed_pairs(self, cfg, comp, layout, backend):
        return "dense", 2 * layout.shape.length ** 2

    def layer_kernel(self, cfg, comp, backend, context=1):
        return "dense"

    # Neither split over context blocks nor decoded: the base class refuses both in one line.
    check_context = variants.Variant.check_context
    decode = None


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(variants.VARIANTS, "local_only", LocalOnly())
    return comp_config("local", "fine", sinks=2, ratio=4, segment_length=8)


def test_builtin_variants_are_what_each_config_selects():
    names = {(m, w): gist_config.variant_of(CompressionConfig(memory=m, granularity="coarse" if m == "recurrent"
                                                            else "fine", positions="aligned", window=w,
                                                            ratio_sampling="fixed", ratios=(4,),
                                                            segment_length=8)).name
             for m, w in (("kv", 0), ("kv", 8), ("recurrent", 0), ("none", 0))}
    assert names == {("kv", 0): "kv", ("kv", 8): "unigist", ("recurrent", 0): "recurrent", ("none", 0): "full"}
    assert gist_config.memory_values() == ("kv", "recurrent", "none")


def test_an_unregistered_memory_is_refused_with_the_registered_ones():
    with pytest.raises(ConfigError, match=r"compression.memory='local' is not one of \('kv', 'recurrent', 'none'\)"):
        comp_config("local", "fine")
    with pytest.raises(ValueError, match="already registered"):
        variants.register_variant(variants.UniGist())


def test_a_registered_variant_runs_its_own_mask_through_the_forward(toy):
    comp = toy
    cfg, params = model(comp)
    seq = 24
    layout = build_layout(seq, comp)
    tokens = jax.random.randint(jax.random.key(0), (1, seq), 0, BASE.vocab_size)
    changed = tokens.at[:, :8].set((tokens[:, :8] + 1) % BASE.vocab_size)  # segment 0 only

    def logits(c, t):
        return compressed_logits(cfg, c, layout.shape, params, t, layout_arrays(layout))

    later = np.asarray(layout.segment) > 0
    own = np.abs(np.asarray(logits(comp, tokens) - logits(comp, changed)))[0, later].max()
    assert own == 0.0  # no memory: later segments cannot see segment 0
    kv = comp.replace(memory="kv")  # the same layout with Fine-KV's memory does see it
    assert np.abs(np.asarray(logits(kv, tokens) - logits(kv, changed)))[0, later].max() > 1e-4


def test_a_registered_variant_trains_is_counted_and_planned(toy):
    comp = toy
    step_cfg = StepConfig(batch_size=2, seq_len=24, mesh=MeshConfig(1, 1, 1),
                          optimizer=OptimizerConfig(learning_rate=1e-3, total_steps=10),
                          objective=ObjectiveConfig(ae=False, tie=False))
    before, after, metrics = one_step(step_cfg, comp)  # the real state, step and transfer guard
    assert np.isfinite(metrics["loss"]) and metrics["tokens"] > 0
    assert not np.allclose(before["model"]["embed"]["embedding"], after["model"]["embed"]["embedding"])
    # FLOPs: the exact pairs are the toy's mask, counted from the mask itself.
    layout = build_layout(24, comp)
    spec = LocalOnly().reference_spec(layout_arrays(layout), comp, 1)
    live = np.asarray(layout.alive)
    allowed = np.asarray(spec.mask[0]) & live[:, None] & live[None, :]
    pairs = flops.attention_pairs(BASE, comp, 24, backend="cpu")
    assert pairs["exact"] == int(allowed[live].sum()) and pairs["impl"] == "dense"
    assert plan.layer_attention_kernel(BASE, comp, "gpu") == "dense"


def test_what_a_variant_does_not_implement_is_refused_in_one_line(toy):
    comp = toy
    with pytest.raises(ConfigError, match="mesh.context=2: compression.memory='local' \\(local_only\\) has no "
                                          "context-parallel forward"):
        check_context_parallel(comp, 32, 2)
    cfg, params = model(comp)
    decode_plan = Plan.create(comp, 32)
    cache = Cache.empty(cfg, decode_plan, 1)
    with pytest.raises(ConfigError, match="compression.memory='local' \\(local_only\\) has no compressed decoding"):
        feed(cfg, decode_plan, params, cache, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))
