"""Read safetensors files (single or sharded with an index) one tensor at a time.

The ``safetensors`` numpy backend rejects bfloat16, the dtype most checkpoints ship in, and
its flax backend puts every tensor on an accelerator. The format is a JSON header followed by
raw little-endian bytes, so a memory map plus ``ml_dtypes`` reads every dtype on the host
without holding more than the tensor asked for.
"""

from __future__ import annotations

import json
import pathlib
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + header_len
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + start:self._data_start + end]
        return np.frombuffer(raw, dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"])


class SafetensorsCheckpoint:
    """All tensors of an HF directory: ``model.safetensors`` or an index over shards."""

    def __init__(self, directory: str | pathlib.Path):
        directory = pathlib.Path(directory)
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {f: SafetensorsFile(directory / f) for f in sorted(set(weight_map.values()))}
            self._where = {name: files[f] for name, f in weight_map.items()}
        elif single.exists():
            only = SafetensorsFile(single)
            self._where = dict.fromkeys(only.keys(), only)
        else:
            raise FileNotFoundError(
                f"{directory} has neither model.safetensors nor model.safetensors.index.json; "
                "save the model with save_pretrained(..., safe_serialization=True)"
            )

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)
