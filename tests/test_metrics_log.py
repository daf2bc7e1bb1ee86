"""``metrics.jsonl`` after a kill or a full disk, and the divergence message with and without a
checkpoint to resume from.

A kill mid-write leaves half a record without its newline; the resumed run used to append its
next record onto it, losing both and making the project's own report raise. The writer now trims
that half record (one warning naming the file and the bytes), and every reader of the log skips
nothing without a warning naming the file (and the line)."""

from __future__ import annotations

import json
import logging
import pathlib
import types

import pytest
from test_train_hooks import FakeCheckpointer

from gist_jax.train.checkpoint import NonFiniteState
from gist_jax.train.hooks import MetricsWriter, RunContext, TrainingDiverged
from gist_jax.train.report import perplexity_table, read_records
from gist_jax.train.state_hooks import CheckpointHook, MetricsHook, diverged


def _record(step: int) -> dict:
    return {"step": step, "loss": 1.0 / step, "eval/ppl_full": 10.0 - step, "eval/ppl_r4": 12.0 - step}


def _lines(*steps: int) -> bytes:
    return b"".join(json.dumps(_record(s)).encode() + b"\n" for s in steps)


TORN = {
    "half a record": json.dumps(_record(3)).encode()[:17],
    "a cut multi-byte character": b'{"step": 3, "note": "\xc3',
    "zeros a crash left": b"\0" * 300,
    "a long torn line": b'{"step": 3, "junk": "' + b"x" * 200_000,
}


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("tail", list(TORN))
def test_a_torn_last_record_is_trimmed_with_one_warning_and_the_next_run_logs_intact(tail, tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(_lines(1, 2) + TORN[tail])
    caplog.set_level(logging.INFO)
    writer = MetricsWriter(tmp_path, tensorboard=False)  # what a resumed run does first
    (warning,) = _warnings(caplog)
    assert str(path) in warning and f"({len(TORN[tail])} bytes" in warning, warning
    assert path.read_bytes() == _lines(1, 2)
    for step in (3, 4):
        writer.write(step, {k: v for k, v in _record(step).items() if k != "step"})
    writer.close()
    caplog.clear()
    assert [r["step"] for r in read_records(path)] == [1, 2, 3, 4] and not _warnings(caplog)
    assert "| ppl at step 1 | ppl at step 4 |" in perplexity_table(tmp_path)


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(_lines(1, 2).rstrip(b"\n"))
    caplog.set_level(logging.INFO)
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write(3, {"loss": 0.3})
    writer.close()
    assert not _warnings(caplog)
    assert [r["step"] for r in read_records(path)] == [1, 2, 3]


def test_the_reader_warns_of_every_line_it_skips(tmp_path, caplog):
    """A torn last line is skipped with a warning; a damaged line before it is a warning naming
    the file and line (the rest of the log is good, and the report names the steps it
    compares), and a complete record glued behind a half one is kept."""
    path = tmp_path / "metrics.jsonl"
    half = json.dumps(_record(2)).encode()[:20]
    path.write_bytes(_lines(1) + half + _lines(2) + b"not json\n" + _lines(3, 4) + half)
    caplog.set_level(logging.WARNING)
    assert [r["step"] for r in read_records(path)] == [1, 2, 3, 4]
    glued, damaged, torn = _warnings(caplog)
    assert glued.startswith(f"{path}:2 is not a JSON record"), glued
    assert "kept the complete record at its end (step 2)" in glued, glued
    assert damaged.startswith(f"{path}:3 is not a JSON record (8 bytes); skipped it"), damaged
    assert torn.startswith(f"{path} ends in a partial record ({len(half)} bytes"), torn
    caplog.clear()
    assert "| ppl at step 1 | ppl at step 4 |" in perplexity_table(tmp_path)


# -- the divergence message --------------------------------------------------------------------------------
class Checkpoints(FakeCheckpointer):
    """The hooks tests' fake Checkpointer, in a run directory, whose saves meet a non-finite state."""

    directory = pathlib.Path("/runs/x/checkpoints")

    def save(self, step, *args) -> None:
        raise NonFiniteState(f"the state after step {step} holds NaN or inf; it was not saved")


def _checkpoint_hook_message(ckpt: Checkpoints) -> str:
    ctx = RunContext(run=types.SimpleNamespace(to_dict=dict), workdir=pathlib.Path("/runs/x"), checkpointer=ckpt,
                     loader=types.SimpleNamespace(state=dict), writer=None, throughput=None, state=None,
                     start_step=0, total_steps=10, resumed=False, step=4)
    with pytest.raises(TrainingDiverged) as error:
        CheckpointHook(2, {}, MetricsHook(log_every=1)).run(ctx)
    return str(error.value)


def test_the_divergence_message_promises_a_resume_only_when_there_is_a_checkpoint():
    with_one = str(diverged(Checkpoints([2, 4]), 5, "loss=nan"))
    latest = Checkpoints([2]).describe_latest()
    assert f"Last good checkpoint: {latest}." in with_one and "rerun to resume from it" in with_one
    assert "4.diverged" in with_one
    for message in (str(diverged(Checkpoints(), 1, "loss=nan")), str(diverged(Checkpoints([2]), 3, "loss=nan")),
                    _checkpoint_hook_message(Checkpoints())):
        assert "none yet" not in message and "rerun to resume" not in message, message
        assert "No good checkpoint to resume from: a rerun starts from scratch (step 0" in message, message
        assert "model.init" in message and "Lower optimizer.learning_rate" in message, message
    assert f"Last good checkpoint: {latest}" in _checkpoint_hook_message(Checkpoints([2]))
