"""Training checkpoints: Orbax ``CheckpointManager`` with the state, the data iterator state,
the resolved run config, the layout metadata and the state's checksums in every step directory.

Guarantees:
  * a save is asynchronous (the loop continues while shards are written) and atomic: Orbax
    writes ``<step>.orbax-checkpoint-tmp-*`` and renames it when every process is done, so a
    save cut short by a kill is never listed (in a ``gs://`` workdir, where nothing renames,
    Orbax writes ``<step>`` in place and lists it only once its ``commit_success.txt`` exists);
  * a non-finite state is never saved, and a save that would not fit on the disk is not started
    (``DiskFull``: one line naming the step, the path and the newest complete checkpoint);
  * restore walks the steps newest first and takes the first one that is complete *and* whose
    arrays match the checksums written with them (Orbax reads a bit-flipped file without an
    error). A damaged step is named in one warning line and moved to
    ``<workdir>/checkpoints_set_aside/<step>.damaged`` (kept for the user, never deleted), so
    the run can save that step again;
  * the layout (model family, layer layout, vocabulary, gist parameters, which trees exist) and
    the run config are compared before any array is read: restoring into a different layout,
    or resuming with changed keys that cannot change (``integrity.RESUMABLE_KEYS``), fails
    with the differing keys instead of silently training something else;
  * the data iterator state is checked against the checkpoint's step (the batch at step k is a
    function of the config and k, so a mismatch is rebuilt from k, with a warning).
The frozen TIE reference weights are not saved: they are the base model, reloaded at start-up.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gist_jax.errors import ConfigError
from gist_jax.gist.config import CompressionConfig
from gist_jax.model.config import ModelConfig
from gist_jax.train.distributed import is_primary
from gist_jax.train.integrity import check_resume_config, first_mismatch, state_checksums
from gist_jax.train.state import TrainState
from gist_jax.utils import bucket

LAYOUT_KEYS = ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "scan_layers", "num_gist_embeddings", "gist_projections", "tie_embeddings")
SET_ASIDE = "checkpoints_set_aside"
# Room needed beyond the state's raw bytes: Orbax's metadata files and the filesystem's slack.
SPACE_MARGIN_BYTES = 1 << 20

logger = logging.getLogger(__name__)


def layout_metadata(model_cfg: ModelConfig, comp: CompressionConfig, state: TrainState) -> dict[str, Any]:
    """What a checkpoint's arrays mean; anything here must match to restore into a state."""
    meta = {k: getattr(model_cfg, k) for k in LAYOUT_KEYS}
    meta.update(trainable=comp.trainable, gist_embedding=comp.gist_embedding if comp.enabled else None,
                trees=sorted(state.params), bos_token_id=model_cfg.bos_token_id, eos_token_id=model_cfg.eos_token_id)
    return meta


class CheckpointLayoutError(ConfigError):
    pass


class DiskFull(RuntimeError):
    """No room for a checkpoint; the newest complete one is intact."""


class CheckpointSaveFailed(RuntimeError):
    """Orbax did not finalize a save for a reason other than space."""


class NonFiniteState(RuntimeError):
    """The state to save holds NaN or inf; it is not written."""


class CheckpointDamaged(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _saved_part(state: TrainState) -> TrainState:
    return state.replace(ref_params=None)


def _all_processes(ok: bool) -> bool:
    """True only if every process says ok: processes never take different branches of a
    collective protocol (restore, save) because one of them saw something the others did not."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the chain: OSError errno 28, or TensorStore's text for it."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) == 28 or "No space left on device" in str(e) or "os_error_code='28'" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class _OrbaxDiskFullFilter(logging.Filter):
    """Drops the log records Orbax's writer threads emit for ENOSPC (several per failed save,
    each with a traceback): ``Checkpointer`` reports that fault itself, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        error = record.exc_info[1] if record.exc_info else None
        disk_full = (error is not None and is_disk_full(error)) or "No space left on device" in record.getMessage()
        return not disk_full  # any other failure keeps its log: CheckpointSaveFailed points at it


_DISK_FULL_FILTER = _OrbaxDiskFullFilter()


class _QuietClosedLoops:
    """Orbax's abandoned async work, reported as "unraisable": after a failed save, TensorStore's
    callbacks find Orbax's event loop closed (dozens of tracebacks); after a failed read (a cut or
    bit-rotted array), the read coroutines left suspended raise again when they are collected,
    each printed as "Exception ignored in <coroutine ...>" with a ~100-line TensorStore spec.
    Nothing there is actionable: the save or restore that failed is reported by ``Checkpointer``
    (or the tool) in one line. An ``sys.unraisablehook`` that drops those (a DEBUG log line
    keeps a trace) and passes everything else to ``previous``."""

    gist_jax_quiet = True  # marks the hook as installed (``install_quiet_logging``)

    def __init__(self, previous: Callable[[sys.UnraisableHookArgs], Any]) -> None:
        self.previous = previous

    @staticmethod
    def _from_checkpoint_io(unraisable: sys.UnraisableHookArgs) -> bool:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
            return True
        frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
        return any("orbax" in f.filename or "tensorstore" in f.filename for f in frames)

    def __call__(self, unraisable: sys.UnraisableHookArgs) -> None:
        if self._from_checkpoint_io(unraisable):
            error = unraisable.exc_value
            logger.debug("dropped Orbax's abandoned async error: %s", short_reason(error) if error else "?")
        else:
            self.previous(unraisable)


def _quiet_closed_loops(previous: Callable[[sys.UnraisableHookArgs], Any]) -> _QuietClosedLoops:
    return _QuietClosedLoops(previous)


def install_quiet_logging() -> None:
    """Orbax's noise after a failed save or read dropped (``_OrbaxDiskFullFilter``,
    ``_QuietClosedLoops``); every process that reads or writes checkpoints calls it."""
    logging.getLogger("absl").addFilter(_DISK_FULL_FILTER)  # adding it twice is a no-op
    if not getattr(sys.unraisablehook, "gist_jax_quiet", False):
        sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)


def short_reason(error: BaseException) -> str:
    """One line for a warning: the exception's first sentence, without TensorStore's spec dump."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    for cut in (" See full TensorStore details", "TensorStore({", "{'"):
        text = text.split(cut)[0]
    if "Encountered error while reading array" in text:
        return "array data unreadable (truncated or damaged file)"
    return f"{type(error).__name__}: {text.strip()[:160]}"


class Checkpointer:
    """Policy layer over ``ocp.CheckpointManager`` (every process must call save/restore)."""

    ITEMS = ("state", "data", "run", "layout", "checksums")

    def __init__(self, directory: str | pathlib.Path, keep: int, milestone_every: int = 0, async_save: bool = True):
        self.directory = bucket.as_path(directory)  # a gs:// URL: an epath.Path (utils/bucket.py)
        self.set_aside_directory = self.directory.parent / SET_ASIDE
        install_quiet_logging()
        self._set_aside_empty_steps()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=milestone_every or None,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=self.ITEMS)
        self._writing: int | None = None  # step of the save that may still be in flight
        self.before_save: Callable[[], None] = lambda: None  # the loop's: metrics.jsonl into the workdir first

    def _set_aside_empty_steps(self) -> None:
        """Orbax never leaves an empty step directory (it renames finished saves into place), so
        one is damage; it is moved before Orbax lists the steps and warns about it itself."""
        empty = sorted(int(d.name) for d in self.directory.glob("*") if d.name.isdigit() and d.is_dir()
                       and not any(d.iterdir())) if self.directory.is_dir() else []
        for step in empty:
            dest = self._set_aside_path(step, "damaged")
            if is_primary():
                dest.parent.mkdir(parents=True, exist_ok=True)
                bucket.move(self.directory / str(step), dest)
            logger.warning("checkpoint %s/%d is damaged (empty step directory): moved to %s; trying an older one",
                           self.directory, step, dest)
        _sync("gist_jax_set_aside_empty_steps")

    def _set_aside_path(self, step: int, why: str) -> pathlib.Path:
        dest, n = self.set_aside_directory / f"{step}.{why}", 1
        while dest.exists():
            dest, n = self.set_aside_directory / f"{step}.{why}.{n}", n + 1
        return dest

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def describe_latest(self) -> str:
        latest = self.latest_step()
        return "none yet" if latest is None else str(self.directory / str(latest))

    # ---- save ------------------------------------------------------------------------------------
    def save(self, step: int, state: TrainState, data_state: dict, run: dict, layout: dict) -> None:
        saved = _saved_part(state)
        sums, finite = state_checksums(saved)
        if not finite:
            raise NonFiniteState(f"the state after step {step} holds NaN or inf; it was not saved")
        self.wait()  # Orbax would wait for the previous save anyway; its bytes must count as used
        self._check_space(step, saved)
        self.before_save()
        args = ocp.args.Composite(state=ocp.args.StandardSave(saved), data=ocp.args.JsonSave(data_state),
                                  run=ocp.args.JsonSave(run), layout=ocp.args.JsonSave(layout),
                                  checksums=ocp.args.JsonSave(sums))
        with self._disk_full_as(step):
            self.manager.save(step, args=args, force=True)
        self._writing = step

    def _check_space(self, step: int, saved: TrainState) -> None:
        if bucket.is_url(self.directory):  # a bucket does not fill up
            return
        needed = int(1.02 * sum(x.nbytes for x in jax.tree.leaves(saved))) + SPACE_MARGIN_BYTES
        free = shutil.disk_usage(self.directory).free
        if not _all_processes(free >= needed):
            raise DiskFull(f"no space left writing checkpoint {step} at {self.directory} (needs about "
                           f"{needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free); newest complete checkpoint "
                           f"{self.describe_latest()}. Free space or lower checkpoint.keep, then rerun to resume")

    @contextlib.contextmanager
    def _disk_full_as(self, step: int | None) -> Iterator[None]:
        """Turns ENOSPC from Orbax (raised here or by the previous async save) into ``DiskFull``."""
        try:
            yield
        except Exception as e:
            if not is_disk_full(e):
                raise
            failed = self._writing if self._writing is not None else step
            self._remove_partial(failed)
            raise DiskFull(f"no space left writing checkpoint {failed} at {self.directory}; newest complete "
                           f"checkpoint {self.describe_latest()}. Free space or lower checkpoint.keep, "
                           "then rerun to resume") from None

    def _remove_partial(self, step: int | None) -> None:
        """An unfinished save (``<step>.orbax-checkpoint-tmp*``) is never listed; it only holds space."""
        if step is None or not is_primary():
            return
        for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def wait(self) -> None:
        """Until the save in flight is finalized; a save that failed in Orbax's threads (which log
        the error and skip finalization without raising it here) raises ``DiskFull`` or
        ``CheckpointSaveFailed`` instead of leaving the run to believe it was saved."""
        writing, self._writing = self._writing, None
        with self._disk_full_as(writing):
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        if writing is None or _all_processes(writing in self.manager.all_steps()):
            return
        if not bucket.is_url(self.directory) and shutil.disk_usage(self.directory).free < SPACE_MARGIN_BYTES:
            self._writing = writing
            with self._disk_full_as(writing):
                raise OSError(28, "No space left on device")
        raise CheckpointSaveFailed(f"checkpoint {writing} at {self.directory} was not completed (see the log above); "
                                   f"newest complete checkpoint {self.describe_latest()}")

    def close(self) -> None:
        self.wait()
        self.manager.close()

    # ---- set aside -------------------------------------------------------------------------------
    def set_aside(self, step: int, why: str) -> pathlib.Path:
        """Move ``<step>`` out of the checkpoint directory (kept, never deleted), so it is not
        restored again and the step can be saved anew."""
        self.wait()
        dest = self._set_aside_path(step, why)
        if is_primary():
            self.set_aside_directory.mkdir(parents=True, exist_ok=True)
            bucket.move(self.directory / str(step), dest)
        _sync(f"gist_jax_set_aside_{step}_{why}")
        self.manager.reload()
        return dest

    # ---- restore ---------------------------------------------------------------------------------
    def check_resume(self, run: dict) -> None:
        """Before anything heavy loads: refuse a run config the newest checkpoint cannot resume
        with. An unreadable run config is left to ``restore_latest``'s damage handling."""
        latest = self.latest_step()
        if latest is None:
            return
        try:
            saved = self._read_json(latest, "run")
        except CheckpointDamaged:
            return
        check_resume_config(saved, run, self.directory / str(latest))

    def restore_latest(self, state: TrainState, layout: dict,
                       run: dict | None = None) -> tuple[int, TrainState, dict] | None:
        """(step, state, data iterator state) from the newest sound checkpoint, or None."""
        target = _saved_part(state)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored_state, data_state = self._restore_step(step, abstract, layout, run)
                damaged = None
            except CheckpointDamaged as e:
                damaged = e.reason
            if _all_processes(damaged is None):
                return step, restored_state.replace(ref_params=state.ref_params), data_state
            dest = self.set_aside(step, "damaged")
            logger.warning("checkpoint %s/%d is damaged (%s): moved to %s; trying an older one", self.directory,
                           step, damaged or "unreadable on another process", dest)
        return None

    def _read_json(self, step: int, item: str) -> Any:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
        except Exception as e:  # noqa: BLE001 - any unreadable item makes the step unusable
            raise CheckpointDamaged(f"{item} unreadable: {short_reason(e)}") from None

    def _restore_step(self, step: int, abstract: Any, layout: dict, run: dict | None) -> tuple[TrainState, dict]:
        check_layout(self._read_json(step, "layout"), layout, self.directory / str(step))
        if run is not None:
            check_resume_config(self._read_json(step, "run"), run, self.directory / str(step))
        data_state = self._read_json(step, "data")
        if not (isinstance(data_state, dict) and isinstance(data_state.get("step"), int)
                and isinstance(data_state.get("fingerprint"), str)):
            raise CheckpointDamaged(f"data-iterator state {str(data_state)[:80]!r} is not {{step, fingerprint}}")
        try:
            sums = self._read_json(step, "checksums")
        except CheckpointDamaged:
            sums = None  # written before checksums existed: restored unverified
            if (self.directory / str(step) / "checksums").exists():
                raise
        if not (self.directory / str(step) / "state" / "_METADATA").is_file():
            raise CheckpointDamaged("state/_METADATA is missing")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # noqa: BLE001
            raise CheckpointDamaged(short_reason(e)) from None
        state = restored["state"]
        if sums is not None:
            leaf = first_mismatch(sums, state_checksums(state)[0])
            if leaf is not None:
                raise CheckpointDamaged(f"checksum mismatch in {leaf} (bit rot or a partial copy)")
        state_step = int(np.asarray(state.step.addressable_data(0)))
        if state_step != step:
            raise CheckpointDamaged(f"its state is at step {state_step}, not {step}")
        if data_state["step"] != step:
            logger.warning("checkpoint %s/%d: its data-iterator state names step %d; rebuilding it from step %d",
                           self.directory, step, data_state["step"], step)
            data_state = {**data_state, "step": step}
        return state, data_state


def check_layout(saved: dict, expected: dict, where: pathlib.Path) -> None:
    diff = {k: (saved.get(k), expected.get(k)) for k in expected if saved.get(k) != expected.get(k)}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointLayoutError(f"checkpoint {where} was written with a different layout ({detail}); resume "
                                    "with the settings it was trained with, or use a new --workdir")
