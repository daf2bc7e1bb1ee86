"""UniGist through the entry points a user runs (subprocesses): ``gist_jax.main`` trains
``experiments/demo.py:tiny,unigist`` and resumes it exactly, ``gist_jax.export_hf`` exports it
with its window, and the export's own PyTorch code generates what JAX's decode does."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from run_helpers import REPO, losses, main_env, run

CONFIG = "experiments/demo.py:tiny,unigist"
STEPS = 6
RUN = (f"--config.optimizer.total_steps={STEPS}", "--config.checkpoint.every=2", "--config.train.eval_every=0",
       "--config.train.eval_at_start=False")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, token_cache):
    workdir = tmp_path_factory.mktemp("unigist_run")
    result = run(workdir, token_cache, *RUN, config=CONFIG)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir


def test_unigist_trains_and_resumes_exactly(trained, token_cache, tmp_path):
    want = losses(trained)
    assert sorted(want) == list(range(1, STEPS + 1)) and all(np.isfinite(list(want.values())))
    config = json.loads((trained / "config.json").read_text())
    assert config["compression"]["window"] == config["compression"]["segment_length"] == 16
    first = run(tmp_path, token_cache, *RUN, "--config.train.max_steps=3", config=CONFIG)
    assert first.returncode == 0, first.stderr[-3000:]
    rest = run(tmp_path, token_cache, *RUN, config=CONFIG)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "resumed from" in rest.stdout + rest.stderr
    got = losses(tmp_path)
    for step in range(1, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])


def test_unigist_exports_and_the_export_generates_as_jax_decodes(trained, token_cache, tmp_path):
    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, "-m", "gist_jax.export_hf", "--checkpoint", str(trained), "--out", str(out)],
                          cwd=REPO, env=main_env(token_cache, devices=1), capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    gist = json.loads((out / "config.json").read_text())["gist"]
    assert (gist["variant"], gist["window"]) == ("unigist", 16)

    import torch

    from gist_jax.evaluate import common
    from gist_jax.hf.own_code import load_gist_model
    from gist_jax.inference.decode import generate

    model = load_gist_model(out)
    ck = common.load_checkpoint(trained)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 200, 41)]  # crosses two segments
    ratio = ck.comp.ratios[0]
    jax_tokens = generate(ck.cfg, ck.comp, ck.params, [prompt], 24, ratio=ratio).tokens[0]
    with torch.no_grad():
        torch_tokens = model.generate(torch.tensor([prompt]), max_new_tokens=24, ratio=ratio)
    assert len(jax_tokens) == 24 and jax_tokens == [int(t) for t in torch_tokens[0][len(prompt):]]
