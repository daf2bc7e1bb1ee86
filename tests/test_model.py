"""Model-internal invariants: scan vs unrolled, remat vs none, config validation, sharding names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gist_jax.errors import ConfigError
from gist_jax.model.attention import AttentionSpec
from gist_jax.model.config import ModelConfig, preset
from gist_jax.model.remat import REMAT_POLICIES
from gist_jax.model.sharding import LOGICAL_AXIS_RULES
from gist_jax.model.transformer import forward, init_params, param_logical_specs, stack_layers, unstack_layers


def _loss_and_grads(cfg: ModelConfig, params, tokens):
    weights = jax.random.normal(jax.random.key(3), tokens.shape + (cfg.vocab_size,))

    def loss(p):
        logits = forward(cfg, p, tokens)
        return jnp.sum(logits * weights), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


@pytest.fixture(scope="module")
def reference():
    cfg = preset("tiny", scan_layers=False, num_layers=3)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    logits, grads = _loss_and_grads(cfg, params, tokens)
    return cfg, params, tokens, logits, grads


@pytest.mark.parametrize("scan,policy", [(True, "none"), (False, "full"), (True, "full"),
                                         (True, "dots"), (True, "qkv_proj_attn_out"),
                                         (False, "minimal_mlp")])
def test_scan_and_remat_do_not_change_numerics(reference, scan, policy):
    cfg, params, tokens, ref_logits, ref_grads = reference
    cfg2 = cfg.replace(scan_layers=scan, remat_policy=policy)
    params2 = stack_layers(params, cfg.num_layers) if scan else params
    logits, grads = _loss_and_grads(cfg2, params2, tokens)
    if scan:
        grads = unstack_layers(grads)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-6, rtol=0)
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, ref, atol=1e-6 * max(1.0, float(jnp.abs(ref).max())), rtol=0)


def test_stack_unstack_round_trip(reference):
    cfg, params, *_ = reference
    back = unstack_layers(stack_layers(params, cfg.num_layers))
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_scanned_init_matches_layout():
    cfg = preset("tiny")
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    assert shapes["layers"]["attn"]["q_proj"]["kernel"].shape == (
        cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim)


def test_every_param_has_logical_axes_covered_by_rules():
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    for scan in (True, False):
        specs = param_logical_specs(preset("tiny", scan_layers=scan, qkv_bias=True))
        for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
            assert len(spec) > 0 and all(name in known for name in spec), spec


def test_bf16_compute_keeps_fp32_params_and_is_close():
    cfg = preset("tiny", dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tokens = jnp.arange(16, dtype=jnp.int32)[None]
    lo = forward(cfg, params, tokens)
    hi = forward(cfg.replace(dtype="float32"), params, tokens)
    assert lo.dtype == jnp.float32
    np.testing.assert_allclose(lo, hi, atol=5e-2)


def test_padding_does_not_change_valid_positions():
    """Left padding with shifted positions gives the same logits as the unpadded sequence."""
    cfg = preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, cfg.vocab_size)
    plain = forward(cfg, params, tokens)
    padded_tokens = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), tokens], axis=1)
    valid = jnp.arange(14)[None] >= 4
    spec = AttentionSpec(positions=jnp.maximum(jnp.arange(14)[None] - 4, 0), valid=valid)
    padded = forward(cfg, params, padded_tokens, spec)
    np.testing.assert_allclose(padded[:, 4:], plain, atol=1e-5)
    assert np.isfinite(np.asarray(padded)).all()


@pytest.mark.parametrize("changes,key", [
    (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
    (dict(remat_policy="everything"), "model.remat_policy"),
    (dict(head_dim=15), "head_dim"),
    (dict(dtype="float33"), "model.dtype"),
])
def test_invalid_config_names_the_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        preset("tiny", **changes)


def test_remat_policy_names_are_documented():
    assert {"none", "full", "dots"} <= set(REMAT_POLICIES)
