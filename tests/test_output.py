"""What a person sees on stderr: progress bars only where someone is watching (a terminal, or
``GIST_JAX_PROGRESS=1``), our log lines with absl's timestamps, no third-party INFO, and none of
TensorFlow's C++ start-up lines."""

from __future__ import annotations

import io
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from gist_jax.data import store
from gist_jax.hf.safetensors_write import PlannedTensor, ShardedWriter
from gist_jax.utils import progress

REPO = pathlib.Path(__file__).resolve().parents[1]
TF_START_UP = ("All log messages before absl::InitializeLog()", "oneDNN custom operations",
               "Could not find cuda drivers", "cuInit")
ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ \S+:\d+\] ", re.MULTILINE)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", progress.ENV)}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    return env


def test_bars_show_only_on_a_terminal_of_process_zero_unless_the_variable_says(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.delenv("GIST_JAX_PROCESS_ID", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.enabled(), "no terminal (CI, a log file, a test): no bar"
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert progress.enabled()
    for off in ("0", "false", "off"):
        monkeypatch.setenv(progress.ENV, off)
        assert not progress.enabled(), off
    monkeypatch.setenv(progress.ENV, "1")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress.enabled(), "GIST_JAX_PROGRESS=1 forces bars without a terminal"
    monkeypatch.setenv("GIST_JAX_PROCESS_ID", "1")
    assert not progress.enabled(), "never on a process other than 0"


def _documents(source: str, split: str, tokenizer: str):
    del source, split, tokenizer
    for i in range(7):
        yield np.arange(i + 1, dtype=np.int32)


def test_building_a_token_store_reports_progress_when_forced_and_is_silent_otherwise(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(progress.ENV, "1")
    built = store.ensure_store("fake", "train", "bytes", tmp_path / "forced", max_documents=5,
                               document_stream=_documents)
    err = capfd.readouterr().err
    assert built.num_documents == 5
    assert "tokenising" in err and "5/5" in err and "doc/s" in err, err

    monkeypatch.delenv(progress.ENV)  # pytest's stderr is no terminal
    store.ensure_store("fake", "train", "bytes", tmp_path / "quiet", document_stream=_documents)
    err = capfd.readouterr().err
    # The bar's own marks only: the store's log line also says "tokenising" once another test has
    # turned our INFO logging on (setup_logging) in this worker.
    assert "doc/s" not in err and "7/7" not in err, err


def test_an_export_reports_bytes_written_when_forced(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(progress.ENV, "1")
    tensors = [PlannedTensor(f"w{i}", (64, 64), np.dtype(np.float32)) for i in range(3)]
    writer = ShardedWriter(tmp_path, tensors, 1 << 20)
    for t in tensors:
        writer.write(t.name, np.ones(t.shape, np.float32))
    writer.close()
    err = capfd.readouterr().err
    assert "writing" in err and "48.0k/48.0k" in err and "B/s" in err, err


def test_setup_logging_shows_our_info_with_timestamps_and_hides_third_party_info():
    code = ("import logging; from absl import logging as absl_logging; "
            "from gist_jax.utils.logs import setup_logging; setup_logging(); "
            "logging.getLogger('gist_jax.data.store').info('ours %d', 1); "
            "absl_logging.info('orbax-style per-file INFO'); logging.getLogger('jax').info('jax INFO'); "
            "logging.getLogger('gist_jax.x').warning('our warning')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=60, check=True)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and "ours 1" in lines[0] and "our warning" in lines[1], r.stderr
    assert all(ABSL_PREFIX.match(line) for line in lines), r.stderr


def test_a_tool_that_imports_tensorflow_prints_none_of_its_start_up_lines(tmp_path):
    """inspect_data on the tiny config builds fresh token stores through the seqio layer."""
    r = subprocess.run([sys.executable, "-m", "gist_jax.inspect_data", "--config", "experiments/demo.py:tiny",
                        "--config.data.max_documents=2"], cwd=REPO, env=_env(GIST_JAX_CACHE=str(tmp_path)),
                       capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "== Sources" in r.stdout, r.stdout
    for line in TF_START_UP:
        assert line not in r.stderr, r.stderr
    store_lines = [line for line in r.stderr.splitlines() if "token store" in line]
    assert store_lines and all(ABSL_PREFIX.match(line) for line in store_lines), r.stderr


@pytest.fixture
def broken_tensorflow(tmp_path) -> pathlib.Path:
    """A ``tensorflow`` that chatters on fd 2 from "C++", says something from Python, then fails."""
    package = tmp_path / "fake" / "tensorflow"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import os, sys\n"
        "os.write(2, b'native start-up chatter\\n')\n"
        "print('python-level note', file=sys.stderr)\n"
        "raise ImportError('this tensorflow is broken: reinstall it')\n")
    return package.parent


def test_a_failing_tensorflow_import_keeps_its_message_and_python_output(broken_tensorflow):
    r = subprocess.run([sys.executable, "-c", "import gist_jax.utils.quiet_tf"], cwd=REPO,
                       env=_env(PYTHONPATH=f"{broken_tensorflow}{os.pathsep}{REPO}"), capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 1
    assert "ImportError: this tensorflow is broken: reinstall it" in r.stderr, r.stderr
    assert "python-level note" in r.stderr, r.stderr
    assert "native start-up chatter" not in r.stderr, r.stderr


def test_a_training_status_line_is_a_log_line_that_names_its_caller(tmp_path, caplog, capsys):
    """``resumed from`` and the like go through logging (stderr, timestamped), not stdout, and
    the absl prefix names the hook or loop line that wrote them, not ``MetricsWriter``."""
    import logging

    from gist_jax.train.hooks import MetricsWriter

    writer = MetricsWriter(tmp_path, tensorboard=False)
    with caplog.at_level(logging.INFO, logger="gist_jax"):
        writer.status("resumed from somewhere/4")
    writer.close()
    assert capsys.readouterr().out == ""
    [record] = [r for r in caplog.records if r.getMessage() == "resumed from somewhere/4"]
    assert record.filename == "test_output.py" and record.levelno == logging.INFO
