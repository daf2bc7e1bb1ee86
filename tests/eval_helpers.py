"""The tiny checkpoint the evaluation tests share (test_evaluate, test_ruler, test_kvpress_peer,
test_ruler_press), and module-scoped fixtures over it (``checkpoint``, ``ck``, and ``model``, its
torch base model), registered for every test file by ``conftest.pytest_plugins``; a file may
override ``checkpoint`` with one of its own."""

from __future__ import annotations

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_step0_checkpoint(workdir: pathlib.Path) -> pathlib.Path:
    """A step-0 checkpoint of ``experiments/demo.py:tiny`` (random preset:tiny, Fine-KV, L = 16,
    ratios 4/8, byte tokenizer) in ``workdir``, written by the training Checkpointer without
    training; returns ``workdir``."""
    import jax

    sys.path.insert(0, str(REPO))
    from experiments.demo import get_config
    from gist_jax.gist.params import model_config_for
    from gist_jax.model.config import preset
    from gist_jax.train.checkpoint import Checkpointer, layout_metadata
    from gist_jax.train.experiment import run_config
    from gist_jax.train.mesh import make_mesh
    from gist_jax.train.state import create_train_state

    run = run_config(get_config("tiny"))
    base = preset("tiny").replace(dtype="float32")
    mesh = make_mesh(run.step.mesh, jax.devices()[:1])
    state, _, _ = create_train_state(base, run.compression, run.step, mesh)
    ckpt = Checkpointer(workdir / "checkpoints", keep=1, async_save=False)
    ckpt.save(0, state, {}, run.to_dict(), layout_metadata(model_config_for(base, run.compression), run.compression,
                                                           state))
    ckpt.close()
    return workdir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    """``tiny_step0_checkpoint`` in a directory of the test module's own."""
    return tiny_step0_checkpoint(tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture(scope="module")
def ck(checkpoint):
    from gist_jax.evaluate.common import load_checkpoint

    return load_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def model(ck):
    """The checkpoint's base model in PyTorch (``torch_base``)."""
    from gist_jax.evaluate.torch_base import torch_base_model

    return torch_base_model(ck)
