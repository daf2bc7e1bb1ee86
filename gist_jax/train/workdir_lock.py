"""One run per workdir: process 0 of a run holds ``<workdir>/run.lock`` from before the run
reads or writes anything there until it exits.

Why: rerunning the command of a run still going (a second terminal, a job submitted twice)
started a second run that resumed from the first one's checkpoint, trained and logged the same
steps again, and could crash setting aside a step the first had just deleted. Now the second is
refused at once: ``WorkdirLocked``, a ``ConfigError`` (exit 2, one line naming the holder).

* ``fcntl.flock`` is the authority: the kernel drops it when its holder dies, however it dies
  (SIGKILL, OOM killer, the start-up SIGTERM handler's ``os._exit``). On NFS, Linux maps it to
  NFS locks, shared between clients and freed when a dead client's lease runs out.
* The file holds a record (pid, host, boot id, process start time, heartbeat) for the refusal.
  A clean exit removes the file, so a record under a granted flock is a run that died: one
  warning line, and the lock is taken over.
* Some filesystems do not share flock between hosts (gcsfuse and other FUSE mounts, Lustre's
  ``localflock``): the record is checked even under a granted flock. Same host: the holder lives
  if its pid exists with the recorded start time and boot id (a recycled pid starts later).
  Other host: it lives while its heartbeat (rewritten every ``HEARTBEAT_S``) is under ``STALE_S``.
* Only process 0 locks; the others share the workdir and wait at a barrier until it holds the
  lock, so no process of a refused run writes anything.
* A bucket (``gs://``) has no flock: ``BucketLock`` creates ``run.lock`` only if no object of
  that name exists (generation precondition 0), refreshes the heartbeat only while the object
  is still its own generation, and takes a dead holder's lock over by replacing exactly the
  generation it read; the record decides liveness as above (same host: the pid; other: the
  heartbeat).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from gist_jax.errors import ConfigError

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 120.0


class WorkdirLocked(ConfigError):
    """Another live run holds the workdir; the message names it and the fix."""


def _proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None."""
    with contextlib.suppress(OSError):  # the fields after "pid (comm)" start at field 3
        return int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return None


def _boot_id() -> str | None:
    """Changes at every boot: a record from before a reboot names no live process."""
    with contextlib.suppress(OSError):
        return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return None


def _alive(record: dict[str, Any]) -> bool:
    """Whether the run a record names still runs: on this host, whether its pid is still that
    process; on another, whether its heartbeat is fresh."""
    if record["host"] != socket.gethostname():
        return time.time() - record["heartbeat"] < STALE_S
    if record.get("boot") != _boot_id():
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    start = _proc_start(record["pid"])
    return start is None or record.get("start") in (None, start)


def _read_record(fd: int) -> dict[str, Any] | None:
    """The record, ``{}`` for an empty file, None for one that is not a record (garbage)."""
    return _parse_record(os.pread(fd, 65536, 0))


def _parse_record(raw: bytes) -> dict[str, Any] | None:
    if not raw.strip():
        return {}
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("pid"), int) and record["pid"] > 0  # not kill(0|-1)
    ok = ok and isinstance(record.get("host"), str) and isinstance(record.get("heartbeat"), int | float)
    return record if ok else None


def _holder(record: dict[str, Any] | None) -> str:
    if not record:
        return "a run whose lock record is unreadable" if record is None else "a run just starting (no record yet)"
    return f"pid {record['pid']} on host {record['host']} (started {record.get('started', '?')})"


def _new_record() -> dict[str, Any]:
    """This process's record, less the heartbeat (added at every write)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot": _boot_id(),
            "start": _proc_start(os.getpid()), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


class WorkdirLock:
    """A held lock: the open, flocked file and the thread that refreshes its heartbeat."""

    def __init__(self, path: pathlib.Path, fd: int, created: list[pathlib.Path]) -> None:
        self.path, self.fd, self.created = path, fd, created
        self.record = _new_record()
        os.ftruncate(fd, 0)
        self._write()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        # One write of a fixed-size record: a reader never sees half of an old and a new one.
        os.pwrite(self.fd, json.dumps({**self.record, "heartbeat": time.time()}).ljust(512).encode() + b"\n", 0)
        os.fsync(self.fd)  # NFS and FUSE servers show other hosts only what was flushed

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                self._write()

    def release(self) -> None:
        """Removes the file (a clean exit leaves no record behind), then drops the flock; also
        removes the directories that acquiring created, if they are still empty."""
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        os.close(self.fd)
        for directory in self.created:  # deepest first
            try:
                directory.rmdir()
            except OSError:  # not empty: the run wrote something there
                break


def acquire(workdir: pathlib.Path) -> WorkdirLock:
    """Takes ``<workdir>/run.lock``, creating the workdir if needed; ``WorkdirLocked`` if a live
    run holds it. Never blocks: the second of two runs fails at once."""
    created = [p for p in (workdir, *workdir.parents) if not p.exists()]
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = _read_record(fd)
            os.close(fd)
            raise WorkdirLocked(_refusal(workdir, path, record)) from None
        except OSError as e:  # a filesystem without locks: the record below is all there is
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                os.close(fd)
                raise
        # A releasing holder unlinks the file before it unlocks: if ours is gone, open it anew.
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        record = _read_record(fd)
        if record and _alive(record):
            raise WorkdirLocked(_refusal(workdir, path, record))
        if record != {}:
            logger.warning("%s: taking over the lock of %s, which ended without releasing it (killed?); this run "
                           "now holds it", path, _holder(record))
        return WorkdirLock(path, fd, created)
    except BaseException:  # refused, or the record could not be written (a full disk): let go of the file
        os.close(fd)
        raise


class BucketLock:
    """A held lock in a bucket: the object ``run.lock`` at the generation this process last wrote
    (``blob.generation``), and the thread that refreshes its heartbeat."""

    def __init__(self, blob: Any, path: str, record: dict[str, Any]) -> None:
        self.blob, self.path, self.record = blob, path, record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        from google.api_core import exceptions

        while not self._stop.wait(HEARTBEAT_S):
            try:
                _upload(self.blob, self.record, self.blob.generation)
            except exceptions.PreconditionFailed:
                logger.error("%s: another run took this workdir's lock over (this run's heartbeat was over %.0fs "
                             "late); both runs now write to the workdir", self.path, STALE_S)
                return
            except Exception:  # noqa: BLE001 - a network fault: the next beat tries again
                continue

    def release(self) -> None:
        """Deletes the object if it is still this process's generation."""
        from google.api_core import exceptions

        self._stop.set()
        self._thread.join()
        with contextlib.suppress(exceptions.GoogleAPIError):
            current = self.blob.bucket.get_blob(self.blob.name)  # the precondition alone: some emulators ignore it
            if current is not None and current.generation == self.blob.generation:
                self.blob.delete(if_generation_match=self.blob.generation)


def _upload(blob: Any, record: dict[str, Any], generation: int) -> None:
    """Writes the record with a fresh heartbeat if the object is at ``generation`` (0: absent);
    ``PreconditionFailed`` otherwise. The upload updates ``blob.generation``."""
    blob.upload_from_string(json.dumps({**record, "heartbeat": time.time()}), content_type="application/json",
                            if_generation_match=generation)


def acquire_bucket(workdir: str | os.PathLike, attempts: int = 8) -> BucketLock:
    """Takes ``<workdir>/run.lock`` in a bucket (``gs://``); ``WorkdirLocked`` if a live run holds
    it, ``ConfigError`` for a bucket that does not exist or may not be written. Never blocks."""
    from google.api_core import exceptions
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    url = os.fspath(workdir).rstrip("/")
    bucket_name, _, prefix = url.partition("://")[2].partition("/")
    name = f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME
    path = f"gs://{bucket_name}/{name}"
    try:
        blob = storage.Client().bucket(bucket_name).blob(name)
    except DefaultCredentialsError:
        raise ConfigError(f"--workdir={url}: no Google Cloud credentials; run `gcloud auth application-default login` "
                          "or set GOOGLE_APPLICATION_CREDENTIALS") from None
    record, expected, held = _new_record(), 0, None
    for _ in range(attempts):
        try:
            _upload(blob, record, expected)
        except exceptions.PreconditionFailed:
            pass  # someone else's object, or not the generation we read: look again
        except (exceptions.NotFound, exceptions.Forbidden) as e:
            raise ConfigError(f"--workdir={url}: cannot write {path}: {e.message}; check the bucket name and this "
                              "account's permissions") from None
        else:
            if expected:
                logger.warning("%s: taking over the lock of %s, which ended without releasing it (killed?); this run "
                               "now holds it", path, _holder(held))
            return BucketLock(blob, path, record)
        current = blob.bucket.get_blob(name)
        if current is None:  # released since: create it
            expected, held = 0, None
            continue
        with contextlib.suppress(exceptions.NotFound):
            held = _parse_record(current.download_as_bytes(if_generation_match=current.generation))
            if held and _alive(held):
                raise WorkdirLocked(_refusal(url, path, held))
        expected = current.generation
    raise WorkdirLocked(f"--workdir={url}: the lock {path} changed hands {attempts} times while this run tried to "
                        "take it; another run is starting there: wait for it, or give this run another --workdir")


def _refusal(workdir: pathlib.Path | str, path: pathlib.Path | str, record: dict[str, Any] | None) -> str:
    stop = f"stop it (kill {record['pid']} on {record['host']})" if record else "stop it"
    line = (f"--workdir={workdir}: another run is using this workdir: {_holder(record)}, lock file {path}; "
            f"wait for it to finish, {stop}, or give this run another --workdir")
    if record and record["host"] != socket.gethostname():  # the rule that frees a dead host's lock
        line += f" (its heartbeat is {time.time() - record['heartbeat']:.0f}s old; taken over at {STALE_S:.0f}s)"
    return line


@contextlib.contextmanager
def hold(workdir: str | pathlib.Path, primary: bool) -> Iterator[WorkdirLock | BucketLock | None]:
    """The lock while the block runs, however it ends: on process 0 only (a ``gs://`` workdir's in
    the bucket); all processes wait for it."""
    lock: WorkdirLock | BucketLock | None = None
    if primary:
        lock = acquire_bucket(workdir) if "://" in str(workdir) else acquire(pathlib.Path(workdir))
    try:
        import jax
        from jax.experimental import multihost_utils

        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("workdir lock")
        yield lock
    finally:
        if lock is not None:
            lock.release()
