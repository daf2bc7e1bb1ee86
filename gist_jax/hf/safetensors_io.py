"""Read safetensors files (single or sharded with an index) one tensor at a time, after
validating the header the way the reference reader does.

The ``safetensors`` numpy backend rejects bfloat16, the dtype most checkpoints ship in, and
its flax backend puts every tensor on an accelerator. The format is a JSON header followed by
raw little-endian bytes, so a memory map plus ``ml_dtypes`` reads every dtype on the host
without holding more than the tensor asked for.

A model file is untrusted input: a cut download, a damaged disk or a hostile file must not be
read as weights, nor allocate what its header claims. So before anything is mapped,
``SafetensorsFile`` checks what the reference reader (the ``safetensors`` crate) checks: the
header length is bounded (100 MB, as the crate) and inside the file; the header is one JSON
object; every tensor's dtype is known, its shape is non-negative integers, its byte range is
``shape x itemsize`` long; the ranges are sorted, contiguous from 0 and end exactly at the end
of the file (no overlap, no gap, no byte read twice or from the header). Any fault raises
``SafetensorsError`` (a ``ConfigError``: one line naming the file, exit 2 at start-up).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from typing import Any

import ml_dtypes
import numpy as np

from gist_jax.errors import ConfigError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_,
}
MAX_HEADER_BYTES = 100_000_000  # the reference reader's bound: a header is read whole, so bound it
_FIX = "re-download or re-save the model (save_pretrained(..., safe_serialization=True))"


class SafetensorsError(ConfigError):
    """A safetensors file or index that is not what the format promises."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: two entries for one tensor name is ambiguous."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _is_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(path: pathlib.Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """(tensor entries, ``__metadata__``, start of the data) of ``path``, validated; reads only the
    8-byte length and the header, never more than ``MAX_HEADER_BYTES``."""
    def bad(what: str) -> SafetensorsError:
        return SafetensorsError(f"{path}: not a valid safetensors file ({what}); {_FIX}")

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise bad(f"header length {header_len} is over the format's {MAX_HEADER_BYTES}")
            if 8 + header_len > size:
                raise bad(f"header length {header_len} runs past the end of the {size}-byte file (cut short?)")
            raw = f.read(header_len)
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot be read ({e.strerror or e}); check the file") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"header is not JSON: {str(e)[:120]}") from None
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ is not an object of strings")
    data_len = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= set(entry)):
            raise bad(f"tensor {name!r} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(_DTYPES)})")
        if not (isinstance(shape, list) and all(_is_index(d) for d in shape)):
            raise bad(f"tensor {name!r} has shape {str(shape)[:80]}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise bad(f"tensor {name!r} has data_offsets {str(offsets)[:80]}, not [begin, end] with 0 <= begin <= end")
        nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize  # Python ints: no overflow
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"tensor {name!r}: shape {shape} x {dtype} is {nbytes} bytes but data_offsets {offsets} "
                      f"hold {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else f"leaves a gap of {begin - end} bytes before it"
            raise bad(f"tensor {name!r} at data_offsets [{begin}, {stop}] {what}")
        end = stop
    if end != data_len:
        raise bad(f"the tensors cover {end} bytes of data but the file holds {data_len}"
                  + (" (cut short?)" if end > data_len else ""))
    return header, metadata, 8 + header_len


class SafetensorsFile:
    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self._entries, self.metadata, self._data_start = read_header(self.path)
        self._mmap: np.memmap | None = None  # mapped on the first read: validating maps nothing

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + start:self._data_start + end]
        return np.frombuffer(raw, dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def read_index(index: pathlib.Path) -> dict[str, str]:
    """``weight_map`` (tensor name -> shard file name) of a sharded checkpoint's index, validated:
    a JSON object whose ``weight_map`` maps strings to plain file names in the same directory."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not (isinstance(weight_map, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in weight_map.items())):
            raise TypeError("weight_map is not an object of strings")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise SafetensorsError(f"{index}: not a safetensors index ({type(e).__name__}: {e}); {_FIX}") from None
    escaping = [v for v in weight_map.values() if pathlib.PurePath(v).name != v or v in (".", "..")]
    if escaping:
        raise SafetensorsError(f"{index}: names shard {escaping[0]!r}, which is not a file in its directory; {_FIX}")
    return weight_map


class SafetensorsCheckpoint:
    """All tensors of an HF directory: ``model.safetensors`` or an index over shards, every file's
    header validated on open (headers only: nothing is mapped or read until ``get``)."""

    def __init__(self, directory: str | pathlib.Path):
        directory = pathlib.Path(directory)
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.exists():
            weight_map = read_index(index)
            missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
            if missing:
                raise SafetensorsError(f"{directory} lacks {len(missing)} of the {len(set(weight_map.values()))} "
                                       f"shards its index names, e.g. {missing[0]!r}; finish the download")
            files = {f: SafetensorsFile(directory / f) for f in sorted(set(weight_map.values()))}
            for name, f in weight_map.items():
                if name not in files[f]._entries:
                    raise SafetensorsError(f"{index} puts tensor {name!r} in {f}, which does not hold it; {_FIX}")
            self._where = {name: files[f] for name, f in weight_map.items()}
        elif single.exists():
            only = SafetensorsFile(single)
            self._where = dict.fromkeys(only.keys(), only)
        else:
            raise SafetensorsError(
                f"{directory} has neither model.safetensors nor model.safetensors.index.json; "
                "save the model with save_pretrained(..., safe_serialization=True)"
            )

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)
