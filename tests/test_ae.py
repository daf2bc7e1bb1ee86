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
from gist_jax.gist.layout import build_layout
from gist_jax.gist.parallel import compressed_logits
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
            return ae_loss(cfg, comp, layout.shape, params, ae_params, toks, arrays, k, v)[0]
        return jax.grad(loss, argnums=(0, 1))(params, ae_params)

    g_params, g_ae = grads(params, ae_params)
    nonzero = lambda x: bool(np.any(np.asarray(x) != 0))  # noqa: E731
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
