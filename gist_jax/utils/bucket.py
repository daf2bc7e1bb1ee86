"""Run directories in a bucket: ``--workdir=gs://<bucket>/<path>``.

Orbax writes the checkpoints there itself: TensorStore's ``gcs`` driver for the arrays,
``etils.epath`` for the directory operations, and on GCS a finished step is marked by its
``commit_success.txt`` (there is no atomic rename). Everything else a run reads or writes in its
workdir goes through ``etils.epath.Path`` as well (``as_path``), whose ``gs://`` backend is
pinned to gcsfs here (``EPATH_USE_TF=false`` unless the user set it): TensorFlow's own GCS
filesystem cannot be pointed at an emulator, so gcsfs is the backend the tests exercise
(tests/test_bucket_workdir.py, against fake-gcs-server).

Where an object store differs from a disk, and what the run does about it:
  * no append: ``ObjectLog`` keeps ``metrics.jsonl`` in memory and rewrites the object (an
    atomic replace) at most every ``ObjectLog.SYNC_S`` seconds, before every checkpoint and at
    the end; a kill loses at most the lines since the last upload, never a checkpointed step's;
  * no directory rename: ``move`` copies and deletes, an export is written to a local
    directory and uploaded (``staged_dir``), ``config.json`` last, so "done?" stays one object;
  * no disk to fill: the free-space checks of a save do not apply;
  * no ``flock``: ``workdir_lock`` creates ``run.lock`` with a generation precondition.

A ``gs://`` workdir needs the ``gcs`` extra: ``pip install 'gist_jax[gcs]'`` (gcsfs,
google-cloud-storage).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any, cast

from gist_jax.errors import ConfigError

SCHEMES = ("gs",)
NEEDS = ("gcsfs", "google.cloud.storage")
INSTALL = "pip install 'gist_jax[gcs]'"


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def check_url(key: str, url: str | os.PathLike) -> None:
    """``ConfigError`` unless ``url`` is a ``gs://<bucket>/...`` this process can write through
    (the modules are installed); nothing is contacted or created."""
    text = os.fspath(url)
    scheme, _, rest = text.partition("://")
    if scheme not in SCHEMES:
        raise ConfigError(f"{key}={text}: {scheme}:// is not supported; use gs://<bucket>/<path> or a local path "
                          "(e.g. a gcsfuse mount)")
    if not rest.split("/", 1)[0]:
        raise ConfigError(f"{key}={text}: no bucket; use gs://<bucket>/<path>")
    missing = [m for m in NEEDS if not _importable(m)]
    if missing:
        raise ConfigError(f"{key}={text}: a gs:// workdir needs {', '.join(missing)}; {INSTALL}")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def as_path(path: str | os.PathLike, absolute: bool = True) -> pathlib.Path:
    """A local path as before (``pathlib.Path``, made absolute unless ``absolute`` is False), or a
    URL as an ``etils.epath.Path`` on gcsfs. Typed ``pathlib.Path``: the run only uses the
    methods both have (``/``, ``name``, ``parent``, ``exists``, ``is_dir``, ``is_file``,
    ``iterdir``, ``glob``, ``mkdir``, ``read_text``, ``write_text``, ``open``); what differs is in
    this module. Never ``.absolute()`` a URL path (epath turns it into a local one)."""
    if not is_url(path):
        local = pathlib.Path(path)
        return local.absolute() if absolute else local
    os.environ.setdefault("EPATH_USE_TF", "false")  # before epath first picks a backend for a URL
    from etils import epath

    return cast(pathlib.Path, epath.Path(os.fspath(path)))


def _fs() -> Any:
    import fsspec

    return fsspec.filesystem("gs")


def move(src: pathlib.Path, dst: pathlib.Path) -> None:
    """``shutil.move`` of a directory; in a bucket, a copy of every object and a delete."""
    if is_url(src):
        _fs().mv(os.fspath(src), os.fspath(dst), recursive=True)
    else:
        shutil.move(str(src), str(dst))


def write_text(path: pathlib.Path, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never a part: a local file is written
    beside it and renamed; an object is replaced whole by its upload."""
    if is_url(path):
        path.write_text(text)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


class ObjectLog:
    """An append-only text log kept as one object: what is there is read once, lines are added
    in memory, and the whole object is rewritten (an atomic replace) by ``flush``, at most every
    ``SYNC_S`` seconds by ``write``, and by ``close``."""

    SYNC_S = 30.0

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        text = path.read_text() if path.exists() else ""
        self._parts = [text + "\n" if text and not text.endswith("\n") else text]
        self._dirty, self._synced = False, time.monotonic()

    def write(self, text: str) -> None:
        self._parts.append(text)
        self._dirty = True
        if time.monotonic() - self._synced >= self.SYNC_S:
            self.flush()

    def flush(self) -> None:
        if self._dirty:
            text = "".join(self._parts)
            self._parts = [text]
            self.path.write_text(text)
            self._dirty = False
        self._synced = time.monotonic()

    def close(self) -> None:
        self.flush()


@contextlib.contextmanager
def staged_dir(dest: pathlib.Path, upload: bool = True, last: str = "config.json") -> Iterator[pathlib.Path]:
    """Where to write a directory that belongs at ``dest``: ``dest`` itself on a disk; for a URL,
    a local directory (not yet created) whose files are uploaded to ``dest`` when the block
    ends without an error (``upload``: by this process), the file ``last`` after all others,
    so a reader that waits for it never sees a partial directory."""
    if not is_url(dest):
        yield dest
        return
    with tempfile.TemporaryDirectory(prefix="gist_jax_upload_") as tmp:
        local = pathlib.Path(tmp) / dest.name
        yield local
        if upload:
            fs = _fs()
            files = sorted(p for p in local.rglob("*") if p.is_file())
            for f in sorted(files, key=lambda p: p.relative_to(local).as_posix() == last):
                fs.put_file(str(f), f"{os.fspath(dest)}/{f.relative_to(local).as_posix()}")
