"""Checks that a token store on disk is the store that was built, and the clean-up of dead builds.

A store is read by every later run without being looked at again, so damage there used to
surface far away: a cut ``tokens.npy`` as a numpy traceback, a flipped bit in a token id as a
NaN loss ("diverged ... lower optimizer.learning_rate": an out-of-range id gathers a NaN
embedding) that never named the store. Opening a store therefore checks the following, and a
failure is one line naming the store and the file (``DamagedStore``):

* ``meta.json`` is a store record; ``tokens.npy`` and ``offsets.npy`` have the dtype, length and
  file size that their ``.npy`` headers and ``meta.json`` say (cut or padded files);
* the offsets start at 0, never decrease and end at the token count;
* the token bytes match the CRC-32 written into ``meta.json`` at build time, and every id is
  inside the vocabulary when its size is known (recorded at build time, or the tokenizer's).

CRC-32 (``zlib.crc32`` in 4 Mi-token chunks over the memory map, the id range in the same pass):
3-4 GiB/s on these 2 CPUs from the page cache; the 33 MiB stdlib store of the smollm2 tokenizer
takes 8-10 ms, its whole open 13 ms (blake2b alone: 37 ms). That is below reading the data from
disk once, and every burst error shorter than 32 bits is caught. The pass is memoised per
process by the identity (inode, size, mtime) of ``tokens.npy``, so the loaders, preflight and
the TIE check pay it once.

Builds write into a temporary directory beside the store named
``.<store>.build-<pid>@<host>-<random>`` (damaged stores are moved aside into
``.<store>.damaged-...`` before they are deleted), so a build killed with SIGKILL leaves a
directory whose builder can be asked after: the next build or open of that cache removes it
when that process is gone from this host, or, for another host's builder or an older version's
directory (no pid in its name), after ``STALE_SECONDS`` without a write. A live builder's
directory is never touched, so several processes may build the same store at once, as before.
A host name is assumed to name one process-id namespace.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import stat
import time
import zlib
from typing import Any

import numpy as np

from gist_jax.errors import ConfigError

logger = logging.getLogger("gist_jax.data.store")

CHUNK = 1 << 22  # tokens per checksum chunk (16 MiB)
STALE_SECONDS = 3 * 86400  # a builder on another host (or of an older version) silent this long is dead
_NAME = r"[A-Za-z0-9_]+-[0-9a-f]{12}"  # store_key's shape
_TEMP = re.compile(rf"^\.{_NAME}\.(?:build|damaged)-(?P<pid>\d+)@(?P<host>.+)-[a-z0-9_]+$")
_OLD_TEMP = re.compile(rf"^\.{_NAME}\.[a-z0-9_]{{8}}$")  # tempfile.mkdtemp(prefix=".<store>.") before pids
_PASSES: dict[tuple, tuple[int, int, int]] = {}  # file identity -> (crc32, min id, max id)


class DamagedStore(ConfigError):
    """A store whose files disagree with each other or with the checksum of its build."""

    def __init__(self, path: pathlib.Path, reason: str) -> None:
        self.path, self.reason = path, reason
        try:
            self.inode: int | None = path.stat().st_ino
        except OSError:
            self.inode = None
        super().__init__(f"token store {path} is damaged: {reason}. Delete that directory and rerun to rebuild it")


@dataclasses.dataclass(frozen=True)
class StoreFiles:
    tokens: np.ndarray  # int32 memory map
    offsets: np.ndarray  # int64, in memory
    meta: dict[str, Any]
    crc32: int


def checksum_text(crc: int) -> str:
    return f"crc32:{crc:08x}"


def token_pass(tokens: np.ndarray) -> tuple[int, int, int]:
    """(CRC-32 of the token bytes, smallest id, largest id) in one chunked pass."""
    crc, lo, hi = 0, 0, 0  # an empty store: nothing out of range
    for start in range(0, len(tokens), CHUNK):
        chunk = np.ascontiguousarray(tokens[start:start + CHUNK])
        crc = zlib.crc32(chunk.data, crc)
        lo, hi = (min(lo, int(chunk.min())), max(hi, int(chunk.max()))) if start else (int(chunk.min()),
                                                                                     int(chunk.max()))
    return crc, lo, hi


def read_meta(path: pathlib.Path, store_format: int) -> dict[str, Any]:
    file = path / "meta.json"
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise DamagedStore(path, "meta.json is missing (no complete build made this directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedStore(path, f"meta.json is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != store_format:
        raise DamagedStore(path, f"meta.json is not a format-{store_format} store record")
    for key in ("num_tokens", "num_documents"):
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            raise DamagedStore(path, f"meta.json has no valid {key}")
    return meta


def _array(path: pathlib.Path, name: str, dtype: type, length: int) -> np.ndarray:
    file = path / name
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DamagedStore(path, f"{name} is missing") from None
    except (OSError, ValueError, EOFError) as e:
        raise DamagedStore(path, f"{name} is cut short or not an array ({type(e).__name__}: {e})") from None
    if not isinstance(array, np.memmap) or array.dtype != dtype or array.ndim != 1:
        raise DamagedStore(path, f"{name} holds {array.dtype} {array.shape}, not a {np.dtype(dtype)} vector")
    if len(array) != length:
        raise DamagedStore(path, f"{name} holds {len(array)} values where meta.json says {length}")
    size, expected = file.stat().st_size, array.offset + array.nbytes
    if size != expected:
        raise DamagedStore(path, f"{name} is {size} bytes where its header says {expected}")
    return array


def verify(path: pathlib.Path, store_format: int, vocab_size: int | None = None) -> StoreFiles:
    """The store's arrays after every check of the module docstring; ``DamagedStore`` naming
    the first that fails. ``vocab_size``: the bound for stores whose meta.json records none."""
    meta = read_meta(path, store_format)
    tokens = _array(path, "tokens.npy", np.int32, meta["num_tokens"])
    offsets = np.array(_array(path, "offsets.npy", np.int64, meta["num_documents"] + 1))
    if offsets[0] != 0 or offsets[-1] != len(tokens) or (np.diff(offsets) < 0).any():
        raise DamagedStore(path, f"offsets.npy is not a run of document offsets from 0 to {len(tokens)}")
    ident = (str(path.resolve()), *_identity(path / "tokens.npy"))
    if ident not in _PASSES:
        _PASSES[ident] = token_pass(tokens)
    crc, lo, hi = _PASSES[ident]
    recorded = meta.get("checksum")
    if recorded is not None and recorded != checksum_text(crc):
        del _PASSES[ident]  # the next open reads the files again
        raise DamagedStore(path, f"tokens.npy does not match the checksum of its build, {checksum_text(crc)} where "
                                 f"meta.json says {recorded}: bit rot or an overwrite")
    bound = meta["vocab_size"] if isinstance(meta.get("vocab_size"), int) else vocab_size
    if lo < 0 or (bound and hi >= bound):
        bad = lo if lo < 0 else hi
        raise DamagedStore(path, f"tokens.npy holds token id {bad}, outside the vocabulary of {bound} ids of "
                                 f"tokenizer {meta.get('tokenizer')!r}")
    return StoreFiles(tokens, offsets, meta, crc)


def _identity(file: pathlib.Path) -> tuple[int, int, int]:
    st = file.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def writable(directory: pathlib.Path) -> bool:
    """As ``train/preflight.py`` decides it: a directory whose mode grants write to nobody is
    read-only on purpose (a shared cache), even for root."""
    try:
        return os.access(directory, os.W_OK | os.X_OK) and bool(stat.S_IMODE(directory.stat().st_mode) & 0o222)
    except OSError:
        return False


# -- temporary directories ---------------------------------------------------------------------------
def temp_prefix(name: str, kind: str) -> str:
    """``.<store>.<kind>-<pid>@<host>-`` (``tempfile.mkdtemp`` adds the random end)."""
    return f".{name}.{kind}-{os.getpid()}@{socket.gethostname()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _idle_seconds(directory: pathlib.Path) -> float:
    newest = directory.stat().st_mtime
    for child in directory.iterdir():
        try:
            newest = max(newest, child.stat().st_mtime)
        except OSError:
            pass
    return time.time() - newest


def _dead(entry: pathlib.Path) -> bool:
    m = _TEMP.match(entry.name)
    if m and m["host"] == socket.gethostname():
        return not _alive(int(m["pid"]))
    if m or _OLD_TEMP.match(entry.name):
        return _idle_seconds(entry) > STALE_SECONDS
    return False


def sweep_dead_temps(cache: pathlib.Path) -> list[pathlib.Path]:
    """Removes the temporary directories of builds whose process is gone; returns them."""
    removed: list[pathlib.Path] = []
    try:
        entries = [e for e in cache.iterdir() if e.name.startswith(".")]
    except OSError:
        return removed
    for entry in entries:
        try:
            if entry.is_dir() and not entry.is_symlink() and _dead(entry):
                shutil.rmtree(entry)
                removed.append(entry)
        except OSError:  # gone meanwhile (another process swept it), or not ours to remove
            continue
    if removed:
        logger.info("removed %d temporary director%s of token-store builds whose process is gone: %s", len(removed),
                    "y" if len(removed) == 1 else "ies", ", ".join(p.name for p in removed))
    return removed
