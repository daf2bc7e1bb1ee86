"""Tools that read a training checkpoint (``export_hf``, ``evaluate``, ``compare_hf``, and the
study through ``evaluate``) check it the way resuming does: every params leaf against the
checksum training wrote, every item readable. The newest step falls back to the newest sound one
with one warning; a step the user named is refused in one line; an export is written aside and
renamed when complete; a taken ``--out`` is one line. And no load the project does runs a
``modeling_gist.py`` found in a directory instead of the package's own.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from run_helpers import REPO, main_env, run
from test_run_faults import DAMAGE, copy_run

from gist_jax import export_hf
from gist_jax.errors import ConfigError
from gist_jax.train.step_reader import ModelParamsReader

RUN = ("--config.optimizer.total_steps=4", "--config.checkpoint.every=2", "--config.checkpoint.keep=3",
       "--config.train.eval_every=0", "--config.train.eval_at_start=False", "--config.model.scan_layers=False")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, token_cache) -> pathlib.Path:
    """A real tiny run with sound steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    result = run(workdir, token_cache, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def _params(step_dir: pathlib.Path) -> dict:
    reader = ModelParamsReader(step_dir)
    return {p: reader.load(p) for p in reader.leaves}


def _flip_every_array_file(step_dir: pathlib.Path) -> None:
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x10
            path.write_bytes(bytes(data))


def _truncate_every_array_file(step_dir: pathlib.Path) -> None:
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            os.truncate(path, path.stat().st_size // 2)


def _edit_one_params_checksum(step_dir: pathlib.Path) -> None:
    meta = step_dir / "checksums" / "metadata"
    sums = json.loads(meta.read_text())
    key = next(k for k in sorted(sums) if k.startswith(".params['model']"))
    sums[key] = (sums[key] + 1) % 2**32
    meta.write_text(json.dumps(sums))


TOOL_DAMAGE = {**DAMAGE, "bit rot in every array file": _flip_every_array_file,
               "every array file cut in half": _truncate_every_array_file,
               "a params leaf that does not match its checksum": _edit_one_params_checksum}
# One flipped byte in the largest array file may land in the optimizer state, which no tool reads:
# then the export must be the step's true params, else a warning and the older step.
MAY_MISS_PARAMS = {"bit-rotted array file", "truncated array file"}
# Damage to what a tool does not read (the data-iterator state) is not the tool's concern.
NOT_READ = {"garbage data state", "wrong-shaped data state", "missing data state"}


def _damaged_copies(trained: pathlib.Path, tmp_path: pathlib.Path) -> Iterator[tuple[int, str, pathlib.Path]]:
    """(index, damage name, a copy of the run with that damage to its newest step 4), for every
    damage a tool reads."""
    for i, (name, damage) in enumerate(TOOL_DAMAGE.items()):
        if name not in NOT_READ:
            workdir = copy_run(trained, tmp_path / f"case{i}")
            damage(workdir / "checkpoints" / "4")
            yield i, name, workdir


def _exported(out: pathlib.Path) -> dict[str, np.ndarray]:
    from gist_jax.hf.safetensors_io import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(out)
    return {k: np.asarray(ckpt.get(k)) for k in ckpt.keys()}  # noqa: SIM118 - not a mapping


def test_export_falls_back_from_a_damaged_newest_step_and_refuses_a_damaged_named_one(
        trained, tmp_path, caplog, capsys):
    sound = {2: _exported_of(trained, 2, tmp_path / "ref2"), 4: _exported_of(trained, 4, tmp_path / "ref4")}
    for i, name, workdir in _damaged_copies(trained, tmp_path):
        caplog.clear()
        capsys.readouterr()
        out = tmp_path / f"out{i}"
        with caplog.at_level(logging.WARNING):
            code = export_hf.main(["--checkpoint", str(workdir), "--out", str(out)])
        warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
        got = _exported(out)
        if name in MAY_MISS_PARAMS and not warnings:  # the flipped byte was not in params["model"]
            assert code == 0 and all(np.array_equal(got[k], sound[4][k]) for k in got), name
            continue
        assert code == 0 and len(warnings) == 1 and "checkpoints/4 is damaged" in warnings[0], (name, warnings)
        assert got.keys() == sound[2].keys() and all(np.array_equal(got[k], sound[2][k]) for k in got), name
        pinned = tmp_path / f"pinned{i}"
        assert export_hf.main(["--checkpoint", str(workdir), "--step", "4", "--out", str(pinned)]) == 2, name
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("error: checkpoint ") and "/4 is damaged" in line and "finished: [2, 4]" in line, line
        assert not pinned.exists() and not any(p.name.startswith(".pinned") for p in tmp_path.iterdir()), name


def _exported_of(workdir: pathlib.Path, step: int, out: pathlib.Path) -> dict[str, np.ndarray]:
    assert export_hf.main(["--checkpoint", str(workdir), "--step", str(step), "--out", str(out)]) == 0
    return _exported(out)


def test_evaluate_reads_the_newest_sound_step(trained, tmp_path, caplog):
    from gist_jax.evaluate.common import load_checkpoint

    want = _params(trained / "checkpoints" / "2")
    for _, name, workdir in _damaged_copies(trained, tmp_path):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ck = load_checkpoint(workdir)
        if name in MAY_MISS_PARAMS and ck.step_dir.name == "4":
            continue  # the export test checks that such a step's params are its true ones
        assert ck.step_dir.name == "2", name
        assert sum("is damaged" in r.getMessage() for r in caplog.records) == 1, name
        got = ck.params
        for path, x in want.items():
            node = got
            for key in path:
                node = node[key]
            assert np.array_equal(np.asarray(node), x), (name, path)
        with pytest.raises(ConfigError, match="/4 is damaged"):
            load_checkpoint(workdir, step=4)


def test_every_step_damaged_is_one_line(trained, tmp_path, capsys):
    workdir = copy_run(trained, tmp_path / "run")
    for step in (2, 4):
        _edit_one_params_checksum(workdir / "checkpoints" / str(step))
    assert export_hf.main(["--checkpoint", str(workdir), "--out", str(tmp_path / "out")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "every finished step is damaged" in line and not (tmp_path / "out").exists(), line


def test_tools_on_damage_exit_2_in_one_line_without_traceback(trained, tmp_path, token_cache):
    """Through the real entry points: a cut array file at a named step, only an unfinished
    Orbax step, a taken --out (and --overwrite), evaluate on a damaged named step."""
    cut = copy_run(trained, tmp_path / "cut")
    _truncate_every_array_file(cut / "checkpoints" / "4")
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    shutil.copytree(trained / "checkpoints" / "4", unfinished / "checkpoints" / "4.orbax-checkpoint-tmp-123")
    taken = tmp_path / "taken"
    assert export_hf.main(["--checkpoint", str(trained), "--out", str(taken)]) == 0
    py = [sys.executable, "-m"]
    commands = {
        "export_cut_step": py + ["gist_jax.export_hf", "--checkpoint", str(cut), "--step", "4", "--out",
                                 str(tmp_path / "o1")],
        "export_unfinished_only": py + ["gist_jax.export_hf", "--checkpoint", str(unfinished), "--out",
                                        str(tmp_path / "o2")],
        "export_taken_out": py + ["gist_jax.export_hf", "--checkpoint", str(trained), "--out", str(taken)],
        "evaluate_cut_step": py + ["gist_jax.evaluate", "--checkpoint", str(cut), "--step", "4", "--suite",
                                   "perplexity", "--out", str(tmp_path / "o3")],
    }
    names = {"export_cut_step": "/4 is damaged", "export_unfinished_only": "no finished checkpoints",
             "export_taken_out": "--overwrite", "evaluate_cut_step": "/4 is damaged"}
    env = main_env(token_cache, devices=1)
    procs = {k: subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, c in commands.items()}
    for key, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and "Traceback" not in err, (key, proc.returncode, err[-2000:])
        assert "Exception ignored" not in err, (key, err[-2000:])
        assert names[key] in err.strip().splitlines()[-1], (key, err[-500:])
    for out in ("o1", "o2", "o3"):
        assert not (tmp_path / out / "config.json").exists()
    before = (taken / "config.json").stat().st_mtime_ns
    assert export_hf.main(["--checkpoint", str(trained), "--out", str(taken), "--overwrite"]) == 0
    assert (taken / "config.json").stat().st_mtime_ns != before


def test_an_export_cut_short_leaves_nothing_and_is_redone(trained, tmp_path, monkeypatch):
    from gist_jax.train import step_reader

    out = tmp_path / "hf"
    calls = {"n": 0}
    real = step_reader.ModelParamsReader.load

    def dies_after_two_leaves(self, path):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt  # a kill mid-export, as the process sees it
        return real(self, path)

    monkeypatch.setattr(step_reader.ModelParamsReader, "load", dies_after_two_leaves)
    with pytest.raises(KeyboardInterrupt):
        export_hf.main(["--checkpoint", str(trained), "--out", str(out)])
    assert not out.exists() and not (tmp_path / ".hf.partial").exists()
    monkeypatch.setattr(step_reader.ModelParamsReader, "load", real)
    (tmp_path / ".hf.partial").mkdir()  # what a SIGKILL leaves: removed by the next export
    (tmp_path / ".hf.partial" / "model.safetensors").write_bytes(b"half")
    assert export_hf.main(["--checkpoint", str(trained), "--out", str(out)]) == 0
    assert (out / "config.json").exists() and not (tmp_path / ".hf.partial").exists()


def test_a_directory_of_other_files_is_never_an_export_target(trained, tmp_path, capsys):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert export_hf.main(["--checkpoint", str(trained), "--out", str(other), "--overwrite"]) == 2
    assert "holds other files" in capsys.readouterr().err and (other / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- our own modeling code
def test_a_planted_modeling_file_is_refused_and_never_runs(trained, tmp_path, token_cache):
    from gist_jax.hf.own_code import check_modeling_file, load_gist_model

    out = tmp_path / "hf"
    assert export_hf.main(["--checkpoint", str(trained), "--out", str(out)]) == 0
    check_modeling_file(out)  # the package's own copy: fine
    model = load_gist_model(out)
    assert type(model).__module__ == "gist_jax.hf.modeling_gist"  # our class, not a dynamic module's
    marker = tmp_path / "planted_ran"
    (out / "modeling_gist.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                          + (out / "modeling_gist.py").read_text())
    with pytest.raises(ConfigError, match="differs from the modeling_gist.py"):
        load_gist_model(out)
    proc = subprocess.run([sys.executable, "-m", "gist_jax.compare_hf", "--hf", str(out), "--mode", "compressed",
                           "--max-tokens", "16"], cwd=REPO, env=main_env(token_cache, devices=1),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "differs from the modeling_gist.py" in proc.stderr.strip().splitlines()[-1]
    assert not marker.exists()


def test_orbax_abandoned_async_errors_are_dropped_and_others_kept():
    """The unraisable hook drops what Orbax/TensorStore's abandoned coroutines raise (after a
    failed read or save, already reported in one line) and passes anything else on."""
    import types

    from gist_jax.train.checkpoint import _quiet_closed_loops

    def unraisable(filename: str, error: Exception) -> types.SimpleNamespace:
        namespace: dict = {}
        exec(compile(f"def read():\n    raise {type(error).__name__}({str(error)!r})\n", filename, "exec"), namespace)
        try:
            namespace["read"]()
        except Exception as e:  # noqa: BLE001
            return types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__,
                                         err_msg=None, object=None)
        raise AssertionError("unreachable")

    passed: list = []
    hook = _quiet_closed_loops(passed.append)
    hook(unraisable("/site-packages/orbax/checkpoint/_src/serialization/tensorstore_utils.py",
                    ValueError("OUT_OF_RANGE: Error reading ... TensorStore({...})")))
    hook(unraisable("/usr/lib/python3.11/asyncio/base_events.py", RuntimeError("Event loop is closed")))
    assert passed == []
    mine = unraisable("/work/user_code.py", ValueError("a real bug"))
    hook(mine)
    assert passed == [mine]
