"""Write safetensors files (sharded, with transformers' index) one tensor at a time.

``safetensors.numpy.save_file`` needs every tensor in memory at once, which a model gathered
from many hosts cannot afford. The format is a JSON header (names, dtypes, shapes, byte
offsets) followed by raw little-endian bytes, and every shape is known before any array is
read (checkpoint metadata), so the header is planned first and each tensor is written at its
offset whenever its source array is loaded. Output is a function of (names, shapes, dtypes,
bytes) only: no timestamps or versions, so the same model always gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import struct

import ml_dtypes
import numpy as np

from gist_jax.errors import ConfigError
from gist_jax.utils.progress import progress

_NAMES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
          np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '20KB' or a byte count (transformers' max_shard_size spelling)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ConfigError(f"--shard_size={text!r} is not a size; use e.g. 2GB, 500MB or 20KB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Tensors sorted by name, cut into consecutive shards of at most ``max_shard_bytes`` (a
    larger single tensor gets a shard of its own, as transformers does)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in sorted(tensors, key=lambda t: t.name):
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(shard: list[PlannedTensor]) -> tuple[bytes, dict[str, int]]:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets, start = {}, 0
    for t in shard:
        if np.dtype(t.dtype) not in _NAMES:
            raise ConfigError(f"tensor {t.name}: dtype {t.dtype} cannot be exported; use --dtype float32 "
                              "or bfloat16")
        entries[t.name] = {"dtype": _NAMES[np.dtype(t.dtype)], "shape": list(t.shape),
                           "data_offsets": [start, start + t.nbytes]}
        offsets[t.name] = start
        start += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw, offsets


class ShardedWriter:
    """Pre-planned shard files; ``write(name, array)`` in any order, then ``close()``.

    It draws the export's progress bar (bytes written, with rate and ETA): every tensor of an
    export passes through ``write``, so the bar spans the whole gather-and-write loop."""

    def __init__(self, directory: str | pathlib.Path, tensors: list[PlannedTensor], max_shard_bytes: int):
        self.directory = pathlib.Path(directory)
        self.shards = plan_shards(tensors, max_shard_bytes)
        n = len(self.shards)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self._where: dict[str, tuple[int, int, PlannedTensor]] = {}
        self._handles = []
        for k, (shard, name) in enumerate(zip(self.shards, self.files)):
            header, offsets = _header(shard)
            handle = open(self.directory / name, "wb")  # noqa: SIM115 - written shard by shard, closed in close()
            handle.write(header)
            handle.truncate(len(header) + sum(t.nbytes for t in shard))
            self._handles.append(handle)
            for t in shard:
                self._where[t.name] = (k, len(header) + offsets[t.name], t)
        self._written: set[str] = set()
        self._bar = progress(desc=f"writing {self.directory.name}", total=sum(t.nbytes for t in tensors), unit="B",
                             unit_scale=True, unit_divisor=1024)

    def write(self, name: str, array: np.ndarray) -> None:
        k, offset, planned = self._where[name]
        array = np.ascontiguousarray(array)
        if tuple(array.shape) != planned.shape or array.dtype != np.dtype(planned.dtype):
            raise ValueError(f"{name}: got {array.dtype}{list(array.shape)}, planned "
                             f"{np.dtype(planned.dtype)}{list(planned.shape)}")
        self._handles[k].seek(offset)
        self._handles[k].write(array.reshape(-1).view(np.uint8).data)
        self._written.add(name)
        self._bar.update(planned.nbytes)

    def close(self) -> list[str]:
        """Close the files and write the index (only when sharded); returns the file names."""
        for handle in self._handles:
            handle.close()
        self._bar.close()
        missing = sorted(set(self._where) - self._written)
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[:5]}")
        if len(self.files) > 1:
            weight_map = {t.name: f for shard, f in zip(self.shards, self.files) for t in shard}
            index = {"metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return list(self.files)
