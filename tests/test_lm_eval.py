"""lm-evaluation-harness on an export (issue 29): the real ``lm_eval`` CLI, offline, on our own
local tasks (``gist_jax/evaluate/lm_eval_task.py``), scores what gist_jax's compressed JAX model
scores on the same token ids, and is not silently the uncompressed model."""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
L = 16  # experiments/demo.py:tiny's segment length

pytestmark = pytest.mark.requires("torch", "transformers", "lm_eval", "datasets")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> pathlib.Path:
    """A step-0 ``experiments/demo.py:tiny`` checkpoint (random Fine-KV, byte tokenizer, L = 16,
    ratios 4/8), its export, and the two tasks with 4 examples each: 96 + 16-token
    continuations (7 segments) and 160-token passkey prompts."""
    import jax

    sys.path.insert(0, str(REPO))
    from experiments.demo import get_config
    from gist_jax.evaluate.lm_eval_task import write_tasks
    from gist_jax.gist.params import model_config_for
    from gist_jax.model.config import preset
    from gist_jax.train.checkpoint import Checkpointer, layout_metadata
    from gist_jax.train.experiment import run_config
    from gist_jax.train.hf_export import export_checkpoint
    from gist_jax.train.mesh import make_mesh
    from gist_jax.train.state import create_train_state

    run = run_config(get_config("tiny"))
    base = preset("tiny").replace(dtype="float32")
    state, _, _ = create_train_state(base, run.compression, run.step, make_mesh(run.step.mesh, jax.devices()[:1]))
    root = tmp_path_factory.mktemp("lm_eval")
    ckpt = Checkpointer(root / "run" / "checkpoints", keep=1, async_save=False)
    ckpt.save(0, state, {}, run.to_dict(), layout_metadata(model_config_for(base, run.compression), run.compression,
                                                          state))
    ckpt.close()
    export = export_checkpoint(root / "run", root / "hf")
    write_tasks(root / "run", export, root / "tasks", num_examples=4, context_tokens=96, continuation_tokens=16,
                recall_kinds=("passkey",), recall_context_tokens=160)
    return root / "tasks"


@pytest.fixture(scope="module")
def lm_eval_runs(task_dir, tmp_path_factory) -> dict[str, pathlib.Path]:
    """``lm_eval`` as a subprocess, compressed (the export's default) and ``gist_forward=full``,
    side by side; each must exit 0 (``run_lm_eval`` raises with the log's tail otherwise)."""
    from gist_jax.evaluate.lm_eval_compare import run_lm_eval
    from gist_jax.evaluate.lm_eval_task import read_manifest

    manifest = read_manifest(task_dir)
    caches = tmp_path_factory.mktemp("hf_caches")
    # Private caches (remote code, datasets) so concurrent test runs never share them; one thread
    # per process: two harnesses on a small shared CPU are faster than oversubscribed.
    env = {"HF_MODULES_CACHE": str(caches / "modules"), "HF_DATASETS_CACHE": str(caches / "datasets"),
           "HF_HOME": str(caches / "home"), "OMP_NUM_THREADS": "1"}
    out = tmp_path_factory.mktemp("lm_eval_out")
    runs = {mode: out / mode for mode in ("compressed", "full")}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        walls = [pool.submit(run_lm_eval, task_dir, pathlib.Path(manifest["export"]), path, batch_size=2,
                             gist_forward=mode, ratio=manifest["ratio"], timeout=600, env=env)
                 for mode, path in runs.items()]
        for wall in walls:
            wall.result()
    return runs


@pytest.fixture(scope="module")
def reports(task_dir, lm_eval_runs) -> dict[str, dict]:
    """Each run's samples against gist_jax's scores of the same setting (compressed at the
    export's ratio, or full attention)."""
    from gist_jax.evaluate.lm_eval_compare import compare

    return {mode: compare(task_dir, path.parent / f"compare_{mode}", samples=path, gist_forward=mode, batch_size=2)
            for mode, path in lm_eval_runs.items()}


def test_lm_eval_scores_equal_gist_jax_compressed(lm_eval_runs, reports):
    report = reports["compressed"]
    results = report["lm_eval_results"]
    assert {"perplexity,none", "acc,none"} <= set(results["gist_stdlib_continuation"])
    assert "exact_match,strip" in results["gist_recall"]
    assert len(report["loglikelihood"]) == 4 and len(report["generation"]) == 4
    # Every context crosses several segments, so the memory is what is being scored.
    assert min(r["tokens"] - r["continuation_tokens"] for r in report["loglikelihood"]) >= 5 * L
    assert report["max_abs_ll_diff"] <= 1e-3, report["loglikelihood"]
    assert report["greedy_agreement"] == 1.0
    assert report["generation_agreement"] == 1.0, report["generation"]  # greedy, cut at the same stop sequences
    assert np.isclose(report["ours"]["gist_stdlib_continuation"]["perplexity"],
                      results["gist_stdlib_continuation"]["perplexity,none"], rtol=1e-3)
    written = json.loads((lm_eval_runs["compressed"].parent / "compare_compressed" /
                          "comparison_compressed_bs2.json").read_text())
    assert written["max_abs_ll_diff"] == report["max_abs_ll_diff"]


def test_full_forward_is_not_what_lm_eval_scores_by_default(reports):
    """``gist_forward=full`` is the stock model (and equals gist_jax's full attention); its
    log-likelihoods differ from the default run's on every example, so a harness that silently
    ran the uncompressed model would fail the test above."""
    full, compressed = reports["full"], reports["compressed"]
    assert full["setting"] == "full" and full["max_abs_ll_diff"] <= 1e-3, full["loglikelihood"]
    gaps = [abs(f["lm_eval"] - c["lm_eval"]) for f, c in zip(full["loglikelihood"], compressed["loglikelihood"])]
    assert min(gaps) > 1e-2, gaps
