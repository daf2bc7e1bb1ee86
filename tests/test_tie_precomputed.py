"""Precomputed TIE end to end (method.md 4.2, ``objective.tie_source=precomputed``): the weights
``python -m gist_jax.train.tie_precompute`` writes are the online weights of the very sequences
the loader serves, a run on them trains like online TIE, resumes exactly, and a file that does
not fit the run is refused at start-up in one line (exit 2) naming it and the fix."""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_helpers import REPO, TINY, logged, main_command, main_env, run

PRE = "--config.objective.tie_source=precomputed"
# The tiny variant (random 2-layer model, bytes, 64 tokens, batch 8, 6 steps), TIE on, no eval.
RUN = ("--config.objective.tie=True", "--config.train.eval_every=0", "--config.train.eval_at_start=False",
       "--config.checkpoint.every=2")
STEPS = 6


def score(token_cache: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gist_jax.train.tie_precompute", f"--config={TINY}", *overrides],
                          cwd=REPO, env=main_env(token_cache), capture_output=True, text=True, timeout=300,
                          check=False)


def per_step(workdir, key: str) -> dict[int, float]:
    return {m["step"]: m[key] for m in logged(workdir) if key in m}


@pytest.fixture(scope="module")
def weights(token_cache):
    """The default-location file of the tiny run (48 = 6 steps x 8 sequences), scored once."""
    result = score(token_cache, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("wrote ") and "48 sequences x 64 tokens" in line, line
    path = line.split()[1]
    again = score(token_cache, *RUN)  # same identity, enough rows: kept, not rescored
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1].startswith(f"up to date: {path}"), \
        again.stdout + again.stderr[-2000:]
    return path


@pytest.fixture(scope="module")
def runs(weights, token_cache, tmp_path_factory):
    """The same 6 steps with precomputed and with online TIE."""
    out = {}
    for name, extra in (("precomputed", (PRE,)), ("online", ())):
        workdir = tmp_path_factory.mktemp(name)
        result = run(workdir, token_cache, *RUN, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = workdir
    return out


def test_served_weights_are_the_online_weights_of_the_served_tokens(weights, token_cache):
    """(a) In the loop's own loader: each batch's ``tie_weights`` equal ``compute_tie_weights`` of
    that batch's tokens with the step's loss positions and the initial base model; also for a
    subset of rows (what one of several processes reads) and after ``restore`` (resume)."""
    from gist_jax.cli_config import load_run
    from gist_jax.train.loop import load_base_model, make_train_loader
    from gist_jax.train.mesh import make_mesh
    from gist_jax.train.state import initial_base_params
    from gist_jax.train.step import loss_positions
    from gist_jax.train.tie import compute_tie_weights

    run_cfg = load_run(TINY, [*RUN, PRE, f"--config.data.cache_dir={token_cache}"])
    mesh = make_mesh(run_cfg.step.mesh)
    loader = make_train_loader(run_cfg, mesh)
    base_cfg, _ = load_base_model(run_cfg.model)
    base, _ = initial_base_params(base_cfg, run_cfg.step.seed, mesh)
    obj, seg = run_cfg.step.objective, run_cfg.compression.segment_length

    @jax.jit
    def online(tokens, loss_mask):
        mask = loss_positions(tokens, loss_mask, seg, obj.include_first_segment)
        return compute_tie_weights(base_cfg, base, tokens, mask, seg, obj.tie_gamma, obj.tie_rescale)

    served, expected = {}, {}
    for step in range(STEPS):
        batch = next(loader)
        assert set(batch) == {"tokens", "loss_mask", "tie_weights"} and batch["tie_weights"].dtype == jnp.float32
        served[step] = np.asarray(batch["tie_weights"])
        expected[step] = np.asarray(online(batch["tokens"], batch["loss_mask"]))
        np.testing.assert_allclose(served[step], expected[step], atol=2e-6, rtol=0)
    # The comparison can tell batches apart: another step's weights are far outside the tolerance.
    assert np.abs(served[0] - expected[1]).max() > 1e-3
    assert np.abs(served[2][:, 1:-1] - 1).max() > 1e-3  # not all-uniform weights either
    # A process holding rows [5, 2] of step 4 reads exactly those rows.
    part = loader.host_batch(4, rows=np.array([5, 2]))
    np.testing.assert_array_equal(part["tie_weights"], served[4][[5, 2]])
    # Resume at step 3 (a checkpoint's data state): the weights of step 3 again.
    state = loader.state()
    loader.restore({**state, "step": 3})
    np.testing.assert_array_equal(np.asarray(next(loader)["tie_weights"]), served[3])
    loader.close()


def test_precomputed_run_trains_like_online_tie(runs):
    """(b) Same losses and TIE-weight entropies per step as online TIE (whose reference is the
    frozen initial model), while the entropy tells steps apart at far more than the tolerance."""
    pre_loss, onl_loss = per_step(runs["precomputed"], "loss"), per_step(runs["online"], "loss")
    pre_ent, onl_ent = per_step(runs["precomputed"], "tie_entropy"), per_step(runs["online"], "tie_entropy")
    assert sorted(pre_loss) == sorted(onl_loss) == list(range(1, STEPS + 1))
    for step in pre_loss:
        assert pre_loss[step] == pytest.approx(onl_loss[step], rel=1e-6, abs=1e-6), step
        assert pre_ent[step] == pytest.approx(onl_ent[step], abs=1e-6), step
        assert pre_ent[step] < math.log(63) - 1e-3  # weights that are not uniform over the 63 loss tokens
    assert max(pre_ent.values()) - min(pre_ent.values()) > 1e-5  # a shifted row would show


def test_stopped_and_continued_run_matches_uninterrupted(runs, token_cache, tmp_path):
    """(c) Three steps (checkpoint at the end), then the same command to six: every step's loss
    and entropy are those of the uninterrupted precomputed run."""
    first = run(tmp_path, token_cache, *RUN, PRE, "--config.train.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(per_step(tmp_path, "loss")) == [1, 2, 3]
    second = run(tmp_path, token_cache, *RUN, PRE)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    want_loss, want_ent = per_step(runs["precomputed"], "loss"), per_step(runs["precomputed"], "tie_entropy")
    got_loss, got_ent = per_step(tmp_path, "loss"), per_step(tmp_path, "tie_entropy")
    assert sorted(got_loss) == list(range(1, STEPS + 1))
    for step in got_loss:
        assert abs(got_loss[step] - want_loss[step]) <= 1e-6, (step, got_loss[step], want_loss[step])
        assert abs(got_ent[step] - want_ent[step]) <= 1e-6, (step, got_ent[step], want_ent[step])


def _copy(weights: str, dst, edit=None) -> str:
    """The scored file and sidecar under another name, the sidecar changed by ``edit``."""
    dst.mkdir(parents=True, exist_ok=True)
    npy = dst / "w.npy"
    shutil.copy(weights, npy)
    meta = json.loads(pathlib.Path(weights).with_suffix(".json").read_text())
    if edit is not None:
        edit(meta)
        (dst / "w.json").write_text(json.dumps(meta))
    return str(npy)


def _other_store(meta: dict) -> None:
    key = next(k for k in meta["identity"] if k.startswith("token store "))
    meta["identity"][key] = meta["identity"][key].replace("20 documents", "21 documents")


def test_mismatched_weights_are_refused_in_one_line_naming_the_file(weights, token_cache, tmp_path):
    """(d) Each exits 2 before anything is written, with one line naming the file, what differs
    and the scoring command."""
    path_key = "--config.objective.tie_weights_path"
    store = _copy(weights, tmp_path / "files" / "store", _other_store)
    no_sidecar = _copy(weights, tmp_path / "files" / "no_sidecar")
    cases = {  # name -> (overrides, what the line must say besides the file)
        "missing_default": ((f"--config.data.cache_dir={tmp_path / 'empty_cache'}",), "no such file"),
        "missing_path": ((f"{path_key}={tmp_path / 'nothing.npy'}",), "no such file"),
        "no_sidecar": ((f"{path_key}={no_sidecar}",), "sidecar"),
        "store": ((f"{path_key}={store}",), "token store stdlib_train-"),
        "packing": ((f"{path_key}={weights}", "--config.data.packing=doc_start"),
                    "data.packing 'concat' (file) vs 'doc_start' (run)"),
        "seq_len": ((f"{path_key}={weights}", "--config.step.seq_len=32"), "step.seq_len 64 (file) vs 32 (run)"),
        "segment": (("--config.compression.segment_length=32",), "compression.segment_length 16 (file) vs 32 (run)"),
        "gamma": (("--config.objective.tie_gamma=1.0",), "objective.tie_gamma 2.0 (file) vs 1.0 (run)"),
        "model": (("--config.step.seed=1",), "reference.weights"),
        "rows": (("--config.optimizer.total_steps=7",), "holds 48 sequences but the run needs 56"),
    }
    procs = {name: subprocess.Popen(main_command(tmp_path / "runs" / name, *RUN, PRE, *args), cwd=REPO,
                                    env=main_env(token_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, out[-2000:], err[-2000:])
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("config error: "), (name, err[-2000:])
        expected_file = {"store": store, "no_sidecar": no_sidecar, "missing_path": str(tmp_path / "nothing.npy"),
                         "packing": weights, "seq_len": weights}.get(name, ".npy")
        assert expected_file in lines[0] and cases[name][1] in lines[0], (name, lines[0])
        assert "python -m gist_jax.train.tie_precompute --config=" in lines[0], (name, lines[0])
        assert not (tmp_path / "runs" / name).exists(), name  # refused before the workdir is touched


def test_bad_weights_path_value_is_a_config_error():
    from gist_jax.errors import ConfigError
    from gist_jax.train.config import ObjectiveConfig

    with pytest.raises(ConfigError, match=r"objective.tie_weights_path='w.txt': give a local file path ending in "):
        ObjectiveConfig(tie_weights_path="w.txt")
    with pytest.raises(ConfigError, match=r"objective.tie_weights_path=3 must be a string"):
        ObjectiveConfig(tie_weights_path=3)  # type: ignore[arg-type]
    assert ObjectiveConfig(tie_weights_path="/data/tie.npy").tie_weights_path == "/data/tie.npy"


def test_scoring_a_run_without_tie_exits_2(token_cache):
    result = score(token_cache, "--config.objective.tie=False")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        ("config error: objective.tie=False: a run without TIE reads no weights; give the run's config with "
         "--config.objective.tie=True")]
