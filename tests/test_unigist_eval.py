"""UniGist (``compression.window`` > 0) through the evaluation suites: the ``window`` control it
gets besides ``local`` (its sliding window and sinks with every gist dead,
``train.evaluation.no_memory_window``) against the base model with the whole [N, N] window mask,
and every suite on a step-0 ``demo.py:tiny,unigist`` checkpoint."""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gist_jax.model.attention import AttentionSpec
from gist_jax.model.config import preset
from gist_jax.model.transformer import Decoder, init_params

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sinks,impl", [(0, "decomposed"), (3, "decomposed"), (3, "dense")])
def test_window_control_is_the_sliding_window_over_raw_tokens(sinks, impl):
    """UniGist's ``window`` setting: raw token q sees raw tokens q - W .. q and the first
    ``num_sinks`` tokens at their original positions, through every layer: the base model with
    that [N, N] mask. (The window's reach grows by W per layer, so it is not a per-block pass.)"""
    from gist_jax.gist.config import CompressionConfig
    from gist_jax.gist.params import add_gist_params, model_config_for
    from gist_jax.model.kernels import with_gist_kernel
    from gist_jax.train.evaluation import _raw_hidden, eval_settings, setting_params

    base = preset("tiny", dtype="float32", num_layers=2)
    n, L, W = 36, 8, 8  # a padded last segment
    comp = CompressionConfig(memory="kv", granularity="fine", positions="aligned", segment_length=L, ratios=(4,),
                             ratio_sampling="fixed", num_sinks=sinks, window=W, gist_projections=True)
    cfg = model_config_for(base.replace(attention=with_gist_kernel(base.attention, impl)), comp)
    params = add_gist_params(init_params(base, jax.random.key(0)), cfg)
    setting = next(s for s in eval_settings(cfg, comp, local=True, sinks_only=True) if s.name == "window")
    tokens = jax.random.randint(jax.random.key(1), (2, n), 0, base.vocab_size)
    run, arrays = _raw_hidden(setting, n)
    got = run(setting_params(params, setting), tokens, arrays)
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    mask = (k <= q) & ((k >= q - W) | (k < sinks))
    spec = AttentionSpec(positions=jnp.broadcast_to(jnp.arange(n), (2, n)),
                         mask=jnp.broadcast_to(jnp.asarray(mask), (2, n, n)))
    want = Decoder(base).apply({"params": init_params(base, jax.random.key(0))}, tokens, spec, head=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    """A step-0 checkpoint of ``experiments/demo.py:tiny,unigist`` (random preset:tiny, L = W = 16,
    ratios 4/8 per instance, aligned positions), written by the training Checkpointer."""
    sys.path.insert(0, str(REPO))
    from experiments.demo import get_config
    from gist_jax.gist.params import model_config_for
    from gist_jax.train.checkpoint import Checkpointer, layout_metadata
    from gist_jax.train.experiment import run_config
    from gist_jax.train.mesh import make_mesh
    from gist_jax.train.state import create_train_state

    run = run_config(get_config("tiny,unigist"))
    assert run.compression.window == run.compression.segment_length == 16
    base = preset("tiny").replace(dtype="float32")
    mesh = make_mesh(run.step.mesh, jax.devices()[:1])
    state, _, _ = create_train_state(base, run.compression, run.step, mesh)
    workdir = tmp_path_factory.mktemp("unigist_run")
    ckpt = Checkpointer(workdir / "checkpoints", keep=1, async_save=False)
    ckpt.save(0, state, {}, run.to_dict(), layout_metadata(model_config_for(base, run.compression),
                                                           run.compression, state))
    ckpt.close()
    return workdir


def test_every_suite_runs_on_a_unigist_checkpoint(checkpoint, tmp_path):
    from gist_jax.evaluate import run_suites

    small = dict(num_windows=2, num_examples=2, context_tokens=128, recall_lengths=(128,), depths=(0.5,),
                 kinds=("passkey",), probe_steps=2, batch=2)
    payloads = run_suites(checkpoint, "all", tmp_path, **small)
    assert set(payloads) == {"perplexity", "boundary", "surprise", "uuid", "recall", "reconstruction"}
    ppl = {r["setting"]: r for r in payloads["perplexity"]["rows"]}
    assert set(ppl) == {"full", "local", "window", "r4", "r8"}
    for row in ppl.values():
        assert 1.0 < row["ppl"] < 2 * 264 and row["tokens"] == 2 * (64 - 16 - 1)
    assert json.loads((tmp_path / "perplexity.json").read_text())["rows"] == payloads["perplexity"]["rows"]
    # ``local`` is every architecture's (each segment alone), so efficacies compare; ``window``
    # is UniGist's own control: its sliding window and sinks without gists.
    from gist_jax.evaluate import common

    local = [s for s in common.settings(common.load_checkpoint(checkpoint), local=True) if s.local]
    assert [(s.name, s.windowed, s.comp.window, s.comp.ratios) for s in local] == [
        ("local", False, 0, (4, 8)), ("window", True, 16, (1,))]
    for row in payloads["reconstruction"]["rows"]:
        assert 0.0 <= row["token_accuracy"] <= 1.0 and row["test_tokens"] > 0
    assert {r["setting"] for r in payloads["boundary"]["rows"]} == {"full", "r4", "r8"}
