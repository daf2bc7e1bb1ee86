"""Damaged and hostile safetensors files are refused in one line naming the file, before any
tensor is read or allocated, exactly where the reference reader (the ``safetensors`` package)
refuses them; valid files (sharded or not) still read bit for bit.

The run-level half (``python -m gist_jax.main`` with such a file as ``model.init``: exit 2, one
line, nothing written) is in ``test_bad_inputs.py``.
"""

from __future__ import annotations

import json
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from gist_jax.hf.safetensors_io import SafetensorsCheckpoint, SafetensorsError, SafetensorsFile

TENSORS = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(6, dtype=np.int64),
           "c": np.ones((2, 2), np.float16)}


def _valid_bytes(tmp: pathlib.Path) -> bytes:
    path = tmp / "valid.safetensors"
    safetensors.numpy.save_file(TENSORS, str(path))
    return path.read_bytes()


def _with_header(header: object, data: bytes, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def hostile_files(tmp: pathlib.Path) -> dict[str, bytes]:
    """Every damage a download, a disk or an attacker can do to the header, by name."""
    blob = _valid_bytes(tmp)
    header, data = _split(blob)
    first = min(header, key=lambda k: header[k]["data_offsets"][0] if k != "__metadata__" else 1 << 62)

    def edited(**entry: object) -> bytes:
        h = json.loads(json.dumps(header))
        h[first].update(entry)
        return _with_header(h, data)

    begin, end = header[first]["data_offsets"]
    overlapping = json.loads(json.dumps(header))
    for k in overlapping:  # every tensor reads the same first bytes: each range is the right length
        if k != "__metadata__":
            n = overlapping[k]["data_offsets"][1] - overlapping[k]["data_offsets"][0]
            overlapping[k]["data_offsets"] = [0, n]
    return {
        "empty": b"",
        "four_bytes": blob[:4],
        "cut_to_60_percent": blob[: int(len(blob) * 0.6)],
        "cut_by_one_byte": blob[:-1],
        "header_length_2_62": struct.pack("<Q", 2**62) + blob[8:],
        "header_length_past_end": struct.pack("<Q", len(blob)) + blob[8:],
        "header_json_list": _with_header([1, 2, 3], data),
        "header_garbage": _with_header(None, data, raw=b"\x00\xffnot json at all{"),
        "header_not_utf8": _with_header(None, data, raw=b'{"a": "\xff"}'),
        "tensor_not_an_object": _with_header({**header, first: 7}, data),
        "offsets_past_end": edited(data_offsets=[begin + len(data), end + len(data)]),
        "negative_offsets": edited(data_offsets=[-8, end - begin - 8]),
        "offsets_reversed": edited(data_offsets=[end, begin]),
        "unknown_dtype": edited(dtype="F128"),
        "shape_not_matching_bytes": edited(shape=[5, 5]),
        "shape_4_tib": edited(shape=[1 << 20, 1 << 20, 1 << 10]),
        "shape_negative": edited(shape=[-3, -4]),
        "overlapping_offsets": _with_header(overlapping, data),
        "trailing_bytes": blob + b"\x00" * 16,
        "metadata_not_strings": _with_header({**header, "__metadata__": {"format": 3}}, data),
        "duplicate_tensor_name": _with_header(None, data, raw=(b'{"' + first.encode() + b'": '
                                                               + json.dumps(header[first]).encode() + b", "
                                                               + json.dumps(header)[1:].encode())),
    }


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("hostile")
    out = {}
    for name, blob in hostile_files(root).items():
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(blob)
        out[name] = root / name / "model.safetensors"
    return out


def test_every_hostile_header_is_refused_in_one_line_naming_the_file(hostile):
    for name, path in hostile.items():
        with pytest.raises(SafetensorsError) as info:
            SafetensorsCheckpoint(path.parent)
        line = str(info.value)
        assert str(path) in line and "\n" not in line, (name, line)
        assert "re-download" in line or "cannot be read" in line, (name, line)


def test_the_reference_reader_refuses_what_we_refuse(hostile):
    """No file we accept is one the ``safetensors`` package rejects, and the damage we refuse
    is damage it refuses too (except where it is more lenient: noted per case)."""
    lenient = {"duplicate_tensor_name"}  # serde keeps the last entry; an ambiguous file either way
    for name, path in hostile.items():
        if name in lenient:
            continue
        assert not _reference_reads(path), name


def _reference_reads(path: pathlib.Path) -> bool:
    """Whether the ``safetensors`` package reads every tensor of ``path`` without an error."""
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                f.get_tensor(key)
    except Exception:  # noqa: BLE001 - the package raises several types for a bad file
        return False
    return True


def test_valid_single_and_sharded_files_read_exactly(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    safetensors.numpy.save_file(TENSORS, str(single / "model.safetensors"), metadata={"format": "np"})
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    safetensors.numpy.save_file({"a": TENSORS["a"]}, str(sharded / "model-00001-of-00002.safetensors"))
    safetensors.numpy.save_file({"b": TENSORS["b"], "c": TENSORS["c"]},
                                str(sharded / "model-00002-of-00002.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"}}))
    for directory in (single, sharded):
        ckpt = SafetensorsCheckpoint(directory)
        assert sorted(ckpt.keys()) == sorted(TENSORS)
        for k, v in TENSORS.items():
            got = ckpt.get(k)
            assert got.dtype == v.dtype and np.array_equal(got, v)
    assert SafetensorsFile(single / "model.safetensors").metadata == {"format": "np"}


def test_a_damaged_index_is_refused_naming_it(tmp_path):
    safetensors.numpy.save_file({"a": TENSORS["a"]}, str(tmp_path / "shard.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    cases = {"garbage": "{not json", "list": "[1]", "no_map": "{}", "map_of_ints": '{"weight_map": {"a": 1}}',
             "escapes_dir": '{"weight_map": {"a": "../shard.safetensors"}}',
             "missing_shard": '{"weight_map": {"a": "other.safetensors"}}',
             "tensor_not_in_shard": '{"weight_map": {"a": "shard.safetensors", "z": "shard.safetensors"}}'}
    for name, text in cases.items():
        index.write_text(text)
        with pytest.raises(SafetensorsError) as info:
            SafetensorsCheckpoint(tmp_path)
        assert str(tmp_path) in str(info.value), (name, str(info.value))


def test_hostile_headers_allocate_nothing_they_claim(hostile):
    """Peak RSS of a process that opens every hostile file stays far under 1 GiB (a 2**62-byte
    header or a 4 TiB shape would otherwise be a MemoryError or an OOM kill)."""
    # VmHWM, not getrusage's ru_maxrss: the latter carries over the forking parent's peak (a
    # pytest worker holding compiled JAX programs), VmHWM is this process image's own.
    code = ("import sys\n"
            "from gist_jax.hf.safetensors_io import SafetensorsCheckpoint, SafetensorsError\n"
            "for d in sys.argv[1:]:\n"
            "    try:\n        SafetensorsCheckpoint(d)\n    except SafetensorsError:\n        pass\n"
            "status = open('/proc/self/status').read().splitlines()\n"
            "print(next(line.split()[1] for line in status if line.startswith('VmHWM:')))\n")
    out = subprocess.run([sys.executable, "-c", code, *[str(p.parent) for p in hostile.values()]],
                         capture_output=True, text=True, check=True)
    peak_kib = int(out.stdout.strip())
    assert peak_kib < 1024 * 1024, peak_kib
