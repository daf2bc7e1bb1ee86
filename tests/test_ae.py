"""Fine-grained autoencoding objective: batched loss = per-gist reference, gradient paths,
lambda = 0, initialisation, and a sanity check that the loss reads the gist KV."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gist_helpers import comp_config, model, tokens

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.forward import compressed_logits
from gist_jax.gist.layout import build_layout
from gist_jax.gist.specs import layout_arrays
from gist_jax.model.transformer import unstack_layers
from gist_jax.train.ae import ae_loss, ae_loss_reference, init_ae_params

PER_SEGMENT = CompressionConfig(memory="kv", granularity="fine", segment_length=8, ratios=(2, 4, 8),
                                ratio_sampling="per_segment", num_sinks=2)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _gist_kv(cfg, comp, shape, params, toks, arrays):
    _, kv = compressed_logits(cfg, comp, shape, params, toks, arrays, kv_layer=-1)
    return kv


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _ae(cfg, comp, shape, params, ae_params, toks, arrays, k, v):
    return ae_loss(cfg, comp, shape, params, ae_params, toks, arrays, k, v)


def _setup(comp, n, ratios=None, slots=None, batch=2):
    cfg, params = model(comp)
    layout = build_layout(n, comp, ratios, slots)
    arrays = layout_arrays(layout)
    toks = tokens(batch, n, seed=5)
    ae_params = init_ae_params(cfg, comp, params)
    # Perturb the decoder so it differs from the base layer and the [ae] rows from each other.
    leaves, tree = jax.tree.flatten(ae_params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    ae_params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                          for x, k in zip(leaves, keys)])
    return cfg, params, layout, arrays, toks, ae_params


CASES = {
    "fine_kv": (comp_config("kv", "fine", sinks=2, ratio=4), 24, None, None),
    "coarse_kv": (comp_config("kv", "coarse", sinks=2, ratio=4), 24, None, None),
    "coarse_rec": (comp_config("recurrent", "coarse", sinks=2, ratio=4), 24, None, None),
    "per_segment_dead_slots": (PER_SEGMENT, 24, (2, 8, 4), 4),
    "padded_last_segment": (comp_config("kv", "fine", sinks=2, ratio=2, pad_to_segments=True),
                            19, None, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_loss_equals_per_gist_reference(case):
    comp, n, ratios, slots = CASES[case]
    cfg, params, layout, arrays, toks, ae_params = _setup(comp, n, ratios, slots)
    k, v = _gist_kv(cfg, comp, layout.shape, params, toks, arrays)
    loss, metrics = _ae(cfg, comp, layout.shape, params, ae_params, toks, arrays, k, v)
    ref = ae_loss_reference(cfg, comp, layout, params, ae_params, toks, k, v)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5, atol=1e-5)
    assert float(metrics["ae_loss"]) == float(loss)
    # Every real raw token is covered by exactly one live gist, once per sequence.
    assert int(metrics["ae_tokens"]) == toks.shape[0] * n
    assert 0.0 <= float(metrics["ae_accuracy"]) <= 1.0


def test_gradient_reaches_decoder_gist_embedding_and_base_layers():
    comp = PER_SEGMENT
    cfg, params, layout, arrays, toks, ae_params = _setup(comp, 24, (4, 2, 4), 4)

    @jax.jit
    def grads(params, ae_params):
        def loss(params, ae_params):
            _, (k, v) = compressed_logits(cfg, comp, layout.shape, params, toks, arrays, kv_layer=-1)
            return ae_loss(cfg, comp, layout.shape, params, ae_params, toks, arrays, k, v,
                           train_shared=True)[0]  # method.md as written
        return jax.grad(loss, argnums=(0, 1))(params, ae_params)

    g_params, g_ae = grads(params, ae_params)
    nonzero = lambda x: bool(np.any(np.asarray(x) != 0))
    assert all(nonzero(x) for x in jax.tree.leaves(g_ae["block"]))
    rows = np.abs(np.asarray(g_ae["ae_embedding"])).sum(-1)
    assert rows[0] > 0 and rows[1] > 0, "ratios 2 and 4 are used"
    assert rows[2] == 0.0, "ratio 8 is unused: its [ae] row must get no gradient"
    assert nonzero(g_params["gist_embedding"])
    assert nonzero(g_params["final_norm"]["scale"]) and nonzero(g_params["lm_head"]["kernel"])
    assert nonzero(g_params["embed"]["embedding"])
    k_proj = np.asarray(g_params["layers"]["attn"]["k_proj"]["kernel"])
    assert all(nonzero(k_proj[i]) for i in range(cfg.num_layers)), "gist KV path to every layer"
    assert nonzero(np.asarray(g_params["layers"]["attn"]["q_proj"]["kernel"])[0])


@pytest.mark.parametrize("projections", [False, True])
def test_init_copies_the_layer_and_the_eos_row(projections):
    comp = comp_config("kv", "fine", sinks=2, ratio=4, gist_projections=projections)
    cfg, params = model(comp)
    for layer in (-1, 0):
        ae = init_ae_params(cfg, comp, params, ae_layer=layer)
        flat = unstack_layers(params)
        expected = dict(flat[f"layers_{layer % cfg.num_layers}"])
        expected["attn"] = {k: x for k, x in expected["attn"].items() if not k.startswith("gist_")}
        jax.tree.map(np.testing.assert_array_equal, ae["block"], expected)
        jax.tree.map(np.testing.assert_array_equal, init_ae_params(cfg, comp, flat, layer)["block"],
                     expected)
    ae = init_ae_params(cfg, comp, params)
    assert "gist_q_proj" not in ae["block"]["attn"]
    eos = np.asarray(params["embed"]["embedding"][cfg.eos_token_id])
    assert ae["ae_embedding"].shape == (len(comp.ratios), cfg.hidden_size)
    np.testing.assert_array_equal(np.asarray(ae["ae_embedding"]), np.broadcast_to(eos, (1, eos.size)))
    # Not the base layer with a different layout: the last layer differs from the first.
    assert not np.array_equal(np.asarray(init_ae_params(cfg, comp, params, 0)["block"]["mlp_norm"]["scale"]),
                              np.asarray(ae["block"]["mlp_norm"]["scale"]))


def test_loss_reads_the_gist_kv():
    comp = CASES["coarse_kv"][0]
    cfg, params, layout, arrays, toks, ae_params = _setup(comp, 24)
    k, v = _gist_kv(cfg, comp, layout.shape, params, toks, arrays)
    loss, metrics = _ae(cfg, comp, layout.shape, params, ae_params, toks, arrays, k, v)
    zero, _ = _ae(cfg, comp, layout.shape, params, ae_params, toks, arrays,
                  jnp.zeros_like(k), jnp.zeros_like(v))
    assert 0.0 <= float(metrics["ae_accuracy"]) <= 1.0
    assert np.isfinite(float(loss)) and abs(float(loss) - float(zero)) > 1e-4


@pytest.mark.parametrize("case", ["fine_kv", "per_segment_dead_slots"])
def test_update_output_equals_its_reference_and_drops_the_input_embedding(case):
    """objective.ae_decoder_output='update': the head reads the block's output minus its input."""
    comp, n, ratios, slots = CASES[case]
    cfg, params, layout, arrays, toks, ae_params = _setup(comp, n, ratios, slots)
    k, v = _gist_kv(cfg, comp, layout.shape, params, toks, arrays)
    update = jax.jit(functools.partial(ae_loss, decoder_output="update"), static_argnums=(0, 1, 2))
    loss, _ = update(cfg, comp, layout.shape, params, ae_params, toks, arrays, k, v)
    ref = ae_loss_reference(cfg, comp, layout, params, ae_params, toks, k, v, decoder_output="update")
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5, atol=1e-5)
    residual, _ = _ae(cfg, comp, layout.shape, params, ae_params, toks, arrays, k, v)
    assert abs(float(loss) - float(residual)) > 1e-3


def test_base_gate_stops_the_gradient_into_the_gist_kv_not_the_value():
    comp = CASES["fine_kv"][0]
    cfg, params, layout, arrays, toks, ae_params = _setup(comp, 24)
    k, v = _gist_kv(cfg, comp, layout.shape, params, toks, arrays)

    @jax.jit
    def value_and_grads(gate, ae_params, k, v):
        f = lambda ae_params, k, v: ae_loss(cfg, comp, layout.shape, params, ae_params, toks, arrays, k, v,
                                            base_gate=gate)[0]
        return jax.value_and_grad(f, argnums=(0, 1, 2))(ae_params, k, v)

    (l_off, (g_ae_off, gk_off, gv_off)) = value_and_grads(0.0, ae_params, k, v)
    (l_on, (g_ae_on, gk_on, gv_on)) = value_and_grads(1.0, ae_params, k, v)
    assert float(l_off) == float(l_on)
    assert not np.any(np.asarray(gk_off)) and not np.any(np.asarray(gv_off))
    assert np.any(np.asarray(gk_on)) and np.any(np.asarray(gv_on))
    jax.tree.map(np.testing.assert_array_equal, g_ae_off, g_ae_on)  # the decoder trains either way


# -- the defaults chosen by measurement (docs/ae.md) -------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_default_ae_leaves_embedding_final_norm_and_head_to_the_lm_loss(tied):
    """The chosen fix (objective.ae_train_shared=False, docs/ae.md): the decoder *uses* the
    model's token embedding, final norm and LM head but sends them no gradient; the AE trains
    the gists, the layers that write their KV and its own block. Reverting the default, or the
    stop-gradient in ae_loss, puts the AE's gradient back on them."""
    from gist_helpers import BASE

    from gist_jax.gist.params import add_gist_params, model_config_for
    from gist_jax.model.transformer import init_params
    from gist_jax.train.config import ObjectiveConfig

    default = ObjectiveConfig()
    comp = CASES["fine_kv"][0]
    base = BASE.replace(tie_embeddings=tied)
    cfg = model_config_for(base, comp)
    params = add_gist_params(init_params(base, jax.random.key(0)), cfg)
    layout = build_layout(24, comp)
    arrays = layout_arrays(layout)
    toks = tokens(2, 24, seed=5)
    k, v = _gist_kv(cfg, comp, layout.shape, params, toks, arrays)  # fixed: only the decoder path
    ae_params = init_ae_params(cfg, comp, params, default.ae_layer, init=default.ae_init)

    @functools.partial(jax.jit, static_argnums=0)
    def grads(train_shared, params, ae_params):
        return jax.grad(lambda p, a: ae_loss(cfg, comp, layout.shape, p, a, toks, arrays, k, v,
                                             train_shared=train_shared,
                                             normalization=default.ae_normalization)[0],
                        argnums=(0, 1))(params, ae_params)

    shared = ["embed", "final_norm"] + ([] if tied else ["lm_head"])
    g, g_ae = grads(default.ae_train_shared, params, ae_params)
    for name in shared:
        assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(g[name])), name
    assert all(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(g_ae["block"]))
    # The paper's setting stays available and does train them.
    paper, _ = grads(True, params, ae_params)
    for name in shared:
        assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(paper[name])), name


def test_default_train_step_ae_gradient_misses_final_norm_and_head():
    """Through the train step's own loss: adding the AE (defaults) changes the gradients of the
    layers and gists but not of the final norm and untied LM head (which sit only after the
    last layer, so the gist-KV path cannot reach them either)."""
    from gist_helpers import BASE

    from gist_jax.train.config import ObjectiveConfig, StepConfig
    from gist_jax.train.step import make_microbatch_loss

    comp = CASES["fine_kv"][0]
    cfg, params = model(comp)
    layout = build_layout(24, comp)
    arrays = layout_arrays(layout)
    micro = {"tokens": tokens(2, 24, seed=5), "loss_mask": jnp.ones((2, 24), bool)}

    def grads(objective):
        tree = {"model": params}
        if objective.ae:
            tree["ae"] = init_ae_params(cfg, comp, params, objective.ae_layer, init=objective.ae_init)
        fn = make_microbatch_loss(BASE, comp, StepConfig(batch_size=2, seq_len=24, objective=objective),
                                  layout.shape)
        return jax.jit(jax.grad(lambda p: fn(p, None, micro, arrays, jnp.float32(46.0))[0]))(tree)["model"]

    with_ae, without = grads(ObjectiveConfig(ae=True)), grads(ObjectiveConfig(ae=False))
    for name in ("final_norm", "lm_head"):
        jax.tree.map(np.testing.assert_array_equal, with_ae[name], without[name])
    assert np.any(np.asarray(with_ae["gist_embedding"]) != np.asarray(without["gist_embedding"]))
    k_with, k_without = (np.asarray(g["layers"]["attn"]["k_proj"]["kernel"]) for g in (with_ae, without))
    assert np.any(k_with != k_without)


def test_init_variants():
    comp = CASES["fine_kv"][0]
    cfg, params = model(comp)
    flat = unstack_layers(params)
    copy = init_ae_params(cfg, comp, params, ae_layer=-1, init="copy")
    first = init_ae_params(cfg, comp, params, ae_layer=-1, init="copy_first")
    fresh = init_ae_params(cfg, comp, params, init="fresh", seed=3)
    expected = dict(flat["layers_0"])
    expected["attn"] = {k: x for k, x in expected["attn"].items() if not k.startswith("gist_")}
    jax.tree.map(np.testing.assert_array_equal, first["block"], expected)
    assert jax.tree.structure(fresh["block"]) == jax.tree.structure(copy["block"])
    for a, b in zip(jax.tree.leaves(fresh["block"]), jax.tree.leaves(copy["block"])):
        assert a.shape == b.shape and a.dtype == b.dtype
    q = lambda ae: np.asarray(ae["block"]["attn"]["q_proj"]["kernel"])
    assert not np.array_equal(q(fresh), q(copy)) and not np.array_equal(q(fresh), q(first))
    np.testing.assert_array_equal(np.asarray(fresh["ae_embedding"]), np.asarray(copy["ae_embedding"]))
    with pytest.raises(ValueError, match="ae_init"):
        init_ae_params(cfg, comp, params, init="nope")


def test_token_normalization_weighs_long_spans_more():
    comp, n, ratios, slots = CASES["per_segment_dead_slots"]
    cfg, params, layout, arrays, toks, ae_params = _setup(comp, n, ratios, slots)
    k, v = _gist_kv(cfg, comp, layout.shape, params, toks, arrays)
    run = jax.jit(functools.partial(ae_loss, cfg, comp, layout.shape), static_argnames="normalization")
    gist, _ = run(params, ae_params, toks, arrays, k, v, normalization="gist")
    token, _metrics = run(params, ae_params, toks, arrays, k, v, normalization="token")
    ref = ae_loss_reference(cfg, comp, layout, params, ae_params, toks, k, v)
    np.testing.assert_allclose(float(gist), float(ref), rtol=1e-5, atol=1e-5)
    assert abs(float(token) - float(gist)) > 1e-5, "spans of 2, 4 and 8 tokens: the two means differ"
    # Equal spans (fine, fixed ratio): the two normalisations agree.
    comp = CASES["fine_kv"][0]
    cfg, params, layout, arrays, toks, ae_params = _setup(comp, 24)
    k, v = _gist_kv(cfg, comp, layout.shape, params, toks, arrays)
    run = jax.jit(functools.partial(ae_loss, cfg, comp, layout.shape), static_argnames="normalization")
    np.testing.assert_allclose(float(run(params, ae_params, toks, arrays, k, v, normalization="token")[0]),
                               float(run(params, ae_params, toks, arrays, k, v, normalization="gist")[0]),
                               rtol=1e-6)


def test_objective_rejects_unknown_ae_choices():
    from gist_jax.errors import ConfigError
    from gist_jax.train.config import ObjectiveConfig

    with pytest.raises(ConfigError, match="ae_init"):
        ObjectiveConfig(ae_init="random")
    with pytest.raises(ConfigError, match="ae_normalization"):
        ObjectiveConfig(ae_normalization="sum")
    with pytest.raises(ConfigError, match="ae_decoder_output"):
        ObjectiveConfig(ae_decoder_output="delta")
    with pytest.raises(ConfigError, match="ae_base_warmup_steps"):
        ObjectiveConfig(ae_base_warmup_steps=-1)


def test_demo_uses_the_measured_ae_recipe():
    """experiments/demo.py runs the AE docs/ae.md measured best (lambda 0.1, no gradient into the
    shared embedding/norm/head, the middle layer's gist KV, the decoder alone for the first half);
    ``ae_as_written`` keeps method.md's recipe, and the tiny shrink the plain AE."""
    import importlib.util
    import pathlib

    from gist_jax.train.experiment import run_config

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo_experiment", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    obj = run_config(demo.get_config("ae")).step.objective  # the demo's recipe has the AE off (docs/recipe.md)
    assert obj.ae and obj.ae_lambda == 0.1 and not obj.ae_train_shared
    assert (obj.ae_init, obj.ae_layer, obj.ae_normalization, obj.ae_base_warmup_steps) == ("copy", 15, "gist", 10)
    paper = run_config(demo.get_config("ae_as_written")).step.objective
    assert paper.ae and paper.ae_lambda == 1.0 and paper.ae_train_shared
    assert (paper.ae_layer, paper.ae_base_warmup_steps) == (-1, 0)
    tiny = run_config(demo.get_config("tiny")).step.objective
    assert tiny.ae and (tiny.ae_layer, tiny.ae_base_warmup_steps) == (-1, 0)
