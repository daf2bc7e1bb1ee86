"""The sharded training step on 8 fake CPU devices: sharding invariance, accumulation,
frozen parameters, learning, and startup errors."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gist_helpers import BASE, comp_config
from jax.sharding import PartitionSpec as P

from gist_jax.data.tokenizer import ByteTokenizer
from gist_jax.errors import ConfigError
from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.layout import build_layout
from gist_jax.gist.specs import layout_arrays, layout_host_arrays
from gist_jax.train.config import MeshConfig, ObjectiveConfig, OptimizerConfig, StepConfig
from gist_jax.train.mesh import batch_sharding, check_batch, make_mesh, replicated
from gist_jax.train.state import create_train_state, logical_param_specs
from gist_jax.train.step import build_train_step

SEQ = 24


def _text_batch(batch: int, seq: int = SEQ, offset: int = 0) -> np.ndarray:
    """Real text (this module's own source, byte-tokenised) cut into sequences."""
    ids = ByteTokenizer().encode(inspect.getsource(inspect))
    rows = [ids[offset + i * seq: offset + (i + 1) * seq] for i in range(batch)]
    return np.asarray(rows, np.int32)


def guarded_step(step, mesh, state, batch, layout):
    """One step as the training loop takes it: batch and layout placed on the mesh explicitly
    (``StepLayouts``, the loader), then the step under a transfer guard, so an implicit host
    transfer inside the step (a numpy constant fed per call, a value pulled back) fails here."""
    batch = jax.device_put(batch, batch_sharding(mesh))
    arrays = jax.device_put(layout_host_arrays(layout), replicated(mesh))
    with jax.transfer_guard("disallow"):
        return step(state, batch, arrays)


def _run(comp, step_cfg, batches, base_params=None):
    mesh = make_mesh(step_cfg.mesh)
    state, tx, shardings = create_train_state(BASE, comp, step_cfg, mesh, base_params)
    layout = build_layout(step_cfg.seq_len, comp)
    step = build_train_step(BASE, comp, step_cfg, layout.shape, tx, mesh, shardings)
    history = []
    for batch in batches:
        state, metrics = guarded_step(step, mesh, state, batch, layout)
        history.append(jax.tree.map(float, metrics))
    return state, history


def _batch(tokens, loss_mask=None):
    tokens = jnp.asarray(tokens)
    return {"tokens": tokens, "loss_mask": jnp.ones(tokens.shape, bool) if loss_mask is None else loss_mask}


FINE = comp_config("kv", "fine", sinks=2)
OPT = OptimizerConfig(learning_rate=1e-3, total_steps=20, warmup_fraction=0.1)


@pytest.fixture(scope="module")
def unsharded():
    cfg = StepConfig(batch_size=8, seq_len=SEQ, mesh=MeshConfig(1, 1, 1), optimizer=OPT)
    mesh_devices = jax.devices()[:1]
    mesh = make_mesh(cfg.mesh, mesh_devices)
    state, tx, shardings = create_train_state(BASE, FINE, cfg, mesh)
    layout = build_layout(SEQ, FINE)
    step = build_train_step(BASE, FINE, cfg, layout.shape, tx, mesh, shardings)
    state, metrics = guarded_step(step, mesh, state, _batch(_text_batch(8)), layout)
    return jax.device_get(state.params), jax.tree.map(float, metrics)


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_step_equals_unsharded(unsharded, mesh):
    ref_params, ref_metrics = unsharded
    cfg = StepConfig(batch_size=8, seq_len=SEQ, mesh=MeshConfig(*mesh), optimizer=OPT)
    state, (metrics,) = _run(FINE, cfg, [_batch(_text_batch(8))])
    for key, value in ref_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    q = state.params["model"]["layers"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 64 // mesh[1], 4 // mesh[2], 16)


def test_activation_constraints_reach_the_compiled_step():
    cfg = StepConfig(batch_size=8, seq_len=SEQ, mesh=MeshConfig(2, 2, 2), optimizer=OPT)
    mesh = make_mesh(cfg.mesh)
    state, tx, shardings = create_train_state(BASE, FINE, cfg, mesh)
    layout = build_layout(SEQ, FINE)
    step = build_train_step(BASE, FINE, cfg, layout.shape, tx, mesh, shardings)
    text = step.lower(state, _batch(_text_batch(8)), layout_arrays(layout)).as_text()
    # embeddings, q/k, MLP hidden and logits of every layer are constrained by logical names
    assert text.count("sharding_constraint") >= 6


def test_parameter_shardings_follow_the_golden_logical_table():
    specs = logical_param_specs(BASE, comp_config("kv", "fine", gist_projections=True),
                                StepConfig(objective=ObjectiveConfig(ae=False)))["model"]
    golden = {
        "embed/embedding": ("vocab", "embed"),
        "gist_embedding": (None, "embed"),
        "final_norm/scale": ("norm",),
        "lm_head/kernel": ("embed", "vocab"),
        "layers/attn/q_proj/kernel": ("layers", "embed", "q_heads", "head_dim"),
        "layers/attn/k_proj/kernel": ("layers", "embed", "kv_heads", "head_dim"),
        "layers/attn/v_proj/kernel": ("layers", "embed", "kv_heads", "head_dim"),
        "layers/attn/o_proj/kernel": ("layers", "q_heads", "head_dim", "embed"),
        "layers/attn/gist_q_proj/kernel": ("layers", "embed", "q_heads", "head_dim"),
        "layers/attn/gist_k_proj/kernel": ("layers", "embed", "kv_heads", "head_dim"),
        "layers/attn/gist_v_proj/kernel": ("layers", "embed", "kv_heads", "head_dim"),
        "layers/attn_norm/scale": ("layers", "norm"),
        "layers/mlp_norm/scale": ("layers", "norm"),
        "layers/mlp/gate_proj/kernel": ("layers", "embed", "mlp"),
        "layers/mlp/up_proj/kernel": ("layers", "embed", "mlp"),
        "layers/mlp/down_proj/kernel": ("layers", "mlp", "embed"),
    }
    flat = {"/".join(str(k.key) for k in path): tuple(spec)
            for path, spec in jax.tree_util.tree_flatten_with_path(
                specs, is_leaf=lambda x: isinstance(x, P))[0]}
    assert flat == golden


def test_gradient_accumulation_equals_one_large_batch():
    tokens = _text_batch(8)
    mask = np.ones(tokens.shape, bool)
    mask[:2, 10:] = False  # unequal loss-token counts per microbatch
    mask[5, :20] = False
    batch = _batch(tokens, jnp.asarray(mask))
    base = StepConfig(batch_size=8, seq_len=SEQ, mesh=MeshConfig(2, 1, 4), optimizer=OPT)
    one, (m1,) = _run(FINE, base, [batch])
    four, (m4,) = _run(FINE, StepConfig(batch_size=8, seq_len=SEQ, microbatches=4,
                                         mesh=MeshConfig(2, 1, 4), optimizer=OPT), [batch])
    for key in ("loss", "lm_loss", "accuracy", "tokens", "grad_norm"):
        assert m4[key] == pytest.approx(m1[key], rel=1e-5), key
    for a, b in zip(jax.tree.leaves(jax.device_get(four.params)), jax.tree.leaves(jax.device_get(one.params))):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_gist_only_freezes_everything_else():
    comp = comp_config("kv", "fine", sinks=2, gist_projections=True, trainable="gist_only")
    cfg = StepConfig(batch_size=8, seq_len=SEQ, mesh=MeshConfig(2, 2, 2), optimizer=OPT)
    mesh = make_mesh(cfg.mesh)
    state, tx, shardings = create_train_state(BASE, comp, cfg, mesh)
    before = jax.device_get(state.params)
    # no optimizer state for frozen leaves: only gist leaves have Adam moments
    moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0]
    gist_sizes = sorted(x.size for p, x in jax.tree_util.tree_flatten_with_path(before)[0]
                        if "gist" in jax.tree_util.keystr(p))
    assert sorted(x.size for x in moments) == sorted(gist_sizes * 2)
    layout = build_layout(SEQ, comp)
    step = build_train_step(BASE, comp, cfg, layout.shape, tx, mesh, shardings)
    for i in range(3):
        state, _ = step(state, _batch(_text_batch(8, offset=i * 200)), layout_arrays(layout))
    after = jax.device_get(state.params)
    for path, a in jax.tree_util.tree_flatten_with_path(after)[0]:
        b = before
        for k in path:
            b = b[k.key]
        if "gist" in jax.tree_util.keystr(path):
            assert not np.array_equal(a, b), jax.tree_util.keystr(path)
        else:
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


PLAIN = ObjectiveConfig()
VARIANTS = {
    "fine_kv": (comp_config("kv", "fine", sinks=2), PLAIN),
    "coarse_kv": (comp_config("kv", "coarse", sinks=2), PLAIN),
    "coarse_rec": (comp_config("recurrent", "coarse", sinks=2), PLAIN),
    "full": (CompressionConfig(memory="none", segment_length=8, ratios=(4,), ratio_sampling="fixed"), PLAIN),
    "fine_kv_ae_tie": (comp_config("kv", "fine", sinks=2), ObjectiveConfig(tie=True, ae=True)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fifty_steps_halve_the_loss(name):
    comp, objective = VARIANTS[name]
    cfg = StepConfig(batch_size=4, seq_len=SEQ, mesh=MeshConfig(1, 4, 1), seed=0, objective=objective,
                     optimizer=OptimizerConfig(learning_rate=3e-3, total_steps=50, warmup_fraction=0.1,
                                               weight_decay=0.0))
    batch = _batch(_text_batch(4))
    mesh = make_mesh(cfg.mesh, jax.devices()[:4])
    state, tx, shardings = create_train_state(BASE, comp, cfg, mesh)
    layout = build_layout(SEQ, comp)
    step = build_train_step(BASE, comp, cfg, layout.shape, tx, mesh, shardings)
    arrays = layout_arrays(layout)
    losses = []
    for _ in range(50):
        state, metrics = step(state, batch, arrays)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    if objective.tie:
        assert 0 < float(metrics["tie_entropy"]) <= np.log(SEQ)
    if objective.ae:
        assert float(metrics["ae_loss"]) > 0 and "ae_accuracy" in metrics


def test_ae_lambda_zero_is_exactly_the_step_without_ae():
    def run(objective):
        cfg = StepConfig(batch_size=8, seq_len=SEQ, mesh=MeshConfig(2, 4, 1), optimizer=OPT, objective=objective)
        state, (metrics,) = _run(FINE, cfg, [_batch(_text_batch(8))])
        return jax.device_get(state.params), metrics

    off, m_off = run(ObjectiveConfig(ae=False))
    zero, m_zero = run(ObjectiveConfig(ae=True, ae_lambda=0.0))
    _, m_on = run(ObjectiveConfig(ae=True, ae_lambda=1.0))
    assert m_zero["loss"] == m_off["loss"] and "ae_loss" not in m_zero and "ae" not in zero
    for a, b in zip(jax.tree.leaves(zero), jax.tree.leaves(off)):
        np.testing.assert_array_equal(a, b)
    assert m_on["loss"] > m_off["loss"] and m_on["ae_loss"] > 0


def test_precomputed_tie_weights_match_online_tie(tmp_path):
    """The offline tool's weights fed through the batch give the same step as online TIE."""
    from gist_jax.model.transformer import init_params
    from gist_jax.train.tie import load_precomputed_tie_weights, precompute_tie_weights

    tokens = _text_batch(8)
    online_cfg = StepConfig(batch_size=8, seq_len=SEQ, mesh=MeshConfig(2, 4, 1), optimizer=OPT,
                            objective=ObjectiveConfig(tie=True))
    online, (m_online,) = _run(FINE, online_cfg, [_batch(tokens)])
    base = init_params(BASE, jax.random.key(online_cfg.seed))  # the state's base init
    path = precompute_tie_weights(BASE, base, [tokens[:4], tokens[4:]], FINE.segment_length,
                                  2.0, tmp_path / "tie")
    weights, meta = load_precomputed_tie_weights(path)
    assert meta["segment_length"] == FINE.segment_length and weights.shape == tokens.shape
    offline_cfg = StepConfig(batch_size=8, seq_len=SEQ, mesh=MeshConfig(2, 4, 1), optimizer=OPT,
                             objective=ObjectiveConfig(tie=True, tie_source="precomputed"))
    batch = dict(_batch(tokens), tie_weights=jnp.asarray(weights))
    offline, (m_offline,) = _run(FINE, offline_cfg, [batch])
    assert m_offline["loss"] == pytest.approx(m_online["loss"], rel=1e-5)
    assert online.ref_params is not None and offline.ref_params is None


def test_startup_errors_name_the_numbers():
    with pytest.raises(ConfigError, match="8 are available"):
        make_mesh(MeshConfig(2, 2, 1))
    with pytest.raises(ConfigError, match="divide over the 8 data-parallel devices"):
        check_batch(12, 1, make_mesh(MeshConfig(2, 4, 1)))
    with pytest.raises(ConfigError, match="microbatches"):
        StepConfig(batch_size=8, microbatches=3)
    assert make_mesh(MeshConfig(2, -1, 2)).shape["fsdp"] == 2


def test_ae_base_warmup_trains_the_decoder_alone_then_the_compressor():
    """objective.ae_base_warmup_steps=2: in steps 0 and 1 L_ae reaches only its decoder, so the
    model's parameters take exactly the AE-off updates (the clip is a no-op, else the decoder's
    gradient would rescale the model's; step 0's learning rate is 0, hence two steps); from
    step 2 on they do not."""
    opt = OptimizerConfig(learning_rate=1e-3, total_steps=20, warmup_fraction=0.1, grad_clip_norm=1e9)

    def run(objective, steps):
        cfg = StepConfig(batch_size=8, seq_len=SEQ, mesh=MeshConfig(2, 4, 1), optimizer=opt, objective=objective)
        state, history = _run(FINE, cfg, [_batch(_text_batch(8, offset=i * SEQ)) for i in range(steps)])
        return jax.device_get(state.params), history

    def same_model(a, b):
        return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a["model"]), jax.tree.leaves(b["model"])))

    off2, _ = run(ObjectiveConfig(ae=False), 2)
    warm2, m_warm = run(ObjectiveConfig(ae=True, ae_base_warmup_steps=2), 2)
    on2, m_on = run(ObjectiveConfig(ae=True), 2)
    assert same_model(warm2, off2), "during the warm-up L_ae must not reach the gists or the base"
    assert not same_model(on2, off2), "without the warm-up L_ae trains the compressor"
    assert m_warm[0]["ae_loss"] == m_on[0]["ae_loss"], "the gate changes gradients, not the loss"
    off3, _ = run(ObjectiveConfig(ae=False), 3)
    warm3, _ = run(ObjectiveConfig(ae=True, ae_base_warmup_steps=2), 3)
    assert not same_model(warm3, off3), "after the warm-up L_ae trains the compressor"
