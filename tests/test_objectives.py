"""Objectives as registered terms: a toy term registered by this test runs in the real train
step (its own parameter trains, its metric is reported, its value adds to the loss) without
an edit to ``train/step.py``, and the registry refuses what it cannot serve."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gist_helpers import BASE, comp_config
from jax.sharding import PartitionSpec
from test_train_step import _batch, _text_batch, guarded_step

from gist_jax.gist.forward import compressed_hidden
from gist_jax.gist.layout import build_layout
from gist_jax.gist.params import model_config_for
from gist_jax.gist.specs import layout_arrays
from gist_jax.train import objectives as objectives_module
from gist_jax.train.config import MeshConfig, ObjectiveConfig, OptimizerConfig, StepConfig
from gist_jax.train.mesh import make_mesh
from gist_jax.train.objectives import Objectives, objectives, register_term
from gist_jax.train.plan_trace import abstract_params
from gist_jax.train.state import create_train_state, logical_param_specs
from gist_jax.train.step import build_train_step

SEQ = 24
COMP = comp_config("kv", "fine", sinks=2)
OPT = OptimizerConfig(learning_rate=1e-2, total_steps=20, warmup_fraction=0.0)


@dataclasses.dataclass(frozen=True)
class HiddenNormTerm:
    """A toy objective: ``scale`` x the mean squared final hidden state, with ``scale`` a
    parameter of its own (init 0.5) that trains."""

    name: str = "toy"
    kv_layer: int | None = None
    batch_fields: tuple[str, ...] = ()
    mean_metrics: tuple[str, ...] = ("toy_value",)

    def init_params(self, cfg, comp, model_params, seed):
        return {"scale": jnp.full((), 0.5, jnp.float32)}

    def param_specs(self, cfg):
        return {"scale": PartitionSpec()}

    def __call__(self, inputs):
        value = jnp.mean(jnp.square(inputs.hidden_BxTxE.astype(jnp.float32)))
        return inputs.params["toy"]["scale"] * value / inputs.microbatches, {"toy_value": value}


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(objectives_module.TERM_FACTORIES, "toy", lambda step_cfg, comp: HiddenNormTerm())


def one_step(step_cfg, comp=COMP):
    """(params before, params after, metrics) of one real train step on one device."""
    mesh = make_mesh(step_cfg.mesh, jax.devices()[:1])
    state, tx, shardings = create_train_state(BASE, comp, step_cfg, mesh)
    before = jax.device_get(state.params)
    layout = build_layout(step_cfg.seq_len, comp)
    step = build_train_step(BASE, comp, step_cfg, layout.shape, tx, mesh, shardings)
    state, metrics = guarded_step(step, mesh, state, _batch(_text_batch(2)), layout)
    return before, jax.device_get(state.params), jax.tree.map(float, metrics)


def test_a_registered_term_trains_and_reports_through_the_real_step(toy_registered):
    step_cfg = StepConfig(batch_size=2, seq_len=SEQ, mesh=MeshConfig(1, 1, 1), optimizer=OPT,
                          objective=ObjectiveConfig(ae=False, tie=False))
    terms = objectives(step_cfg, COMP)
    assert [t.name for t in terms.terms] == ["toy"] and not terms.ae
    before, after, metrics = one_step(step_cfg)
    # Its parameter lives beside the model's, trains (Adam moves it by about the learning rate),
    # and its sharding comes from the term's own specs.
    assert set(after) == {"model", "toy"}
    assert logical_param_specs(BASE, COMP, step_cfg)["toy"] == {"scale": PartitionSpec()}
    assert abs(float(after["toy"]["scale"]) - 0.5) > 1e-3
    # Its value, computed here from the same forward, is what the step reports, and the loss is
    # the LM loss plus scale x value.
    cfg = model_config_for(BASE, COMP)
    layout = build_layout(SEQ, COMP)
    hidden = compressed_hidden(cfg, COMP, layout.shape, before["model"], jnp.asarray(_text_batch(2)),
                               layout_arrays(layout))
    expected = float(jnp.mean(jnp.square(hidden)))
    np.testing.assert_allclose(metrics["toy_value"], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], metrics["lm_loss"] + 0.5 * expected, rtol=1e-5)


def test_terms_run_beside_the_ae_term_and_the_plan_sees_their_params(toy_registered):
    step_cfg = StepConfig(batch_size=2, seq_len=SEQ, mesh=MeshConfig(1, 1, 1), optimizer=OPT,
                          objective=ObjectiveConfig(ae=True, ae_lambda=0.5, tie=False))
    terms = objectives(step_cfg, COMP)
    assert [t.name for t in terms.terms] == ["ae", "toy"] and terms.ae and terms.kv_layer == -1
    assert set(abstract_params(BASE, COMP, step_cfg)) == {"model", "ae", "toy"}
    _, _, metrics = one_step(step_cfg)
    assert {"ae_loss", "ae_accuracy", "toy_value"} <= set(metrics)


def test_the_registry_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="already registered"):
        register_term("ae", lambda s, c: None)
    with pytest.raises(ValueError, match="reserved"):
        register_term("model", lambda s, c: None)
    two_layers = Objectives(tie=False, tie_online=False,
                            terms=(HiddenNormTerm(kv_layer=0), HiddenNormTerm(name="other", kv_layer=1)))
    with pytest.raises(ValueError, match="layers \\[0, 1\\]"):
        _ = two_layers.kv_layer
    fields = Objectives(tie=True, tie_online=False,
                        terms=(HiddenNormTerm(batch_fields=("doc_ids", "tie_weights")),)).batch_fields
    assert fields == ("tokens", "loss_mask", "tie_weights", "doc_ids")
