"""A token store is checked when it is opened: a cut, missing or bit-rotted file is rebuilt with
one warning naming the store, or refused in one line naming it where the cache is read-only,
never a traceback and never training on garbage. Builds killed mid-way leave no temporary
directory behind once the cache is used again; a live builder's is left alone."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from data_helpers import stdlib_bytes_stream
from run_helpers import REPO, main_command, main_env

from gist_jax.data.store import DamagedStore, TokenStore, ensure_store, store_key
from gist_jax.errors import ConfigError

SOURCE, SPLIT, TOKENIZER = "fake", "train", "bytes"


def _documents(source: str, split: str, tokenizer: str):
    del source, split, tokenizer
    rng = np.random.default_rng(0)
    for i in range(40):
        yield rng.integers(0, 256, size=50 + 13 * i, dtype=np.int32)


def build(cache: pathlib.Path) -> TokenStore:
    return ensure_store(SOURCE, SPLIT, TOKENIZER, cache, document_stream=_documents)


def _cut(file: pathlib.Path) -> None:
    os.truncate(file, file.stat().st_size - 7)


def _flip_byte(file: pathlib.Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the token data (the header is 128 bytes), still a valid id
    file.write_bytes(bytes(data))


def _out_of_vocab_legacy(path: pathlib.Path) -> None:
    """A store built before checksums, whose tokens hold an id past the byte vocabulary (what
    made training stop as "diverged: loss=nan")."""
    tokens = np.load(path / "tokens.npy")
    tokens[100] = 70_000
    np.save(path / "tokens.npy", tokens)
    meta = json.loads((path / "meta.json").read_text())
    del meta["checksum"], meta["vocab_size"]
    (path / "meta.json").write_text(json.dumps(meta))


DAMAGE = {
    "cut tokens.npy": (lambda p: _cut(p / "tokens.npy"), "tokens.npy is cut short"),
    "cut offsets.npy": (lambda p: _cut(p / "offsets.npy"), "offsets.npy is cut short"),
    "garbage meta.json": (lambda p: (p / "meta.json").write_bytes(b'\x00\x00{"format": 1, "num_'),
                          "meta.json is unreadable"),
    "missing meta.json": (lambda p: (p / "meta.json").unlink(), "meta.json is missing"),
    "flipped byte in tokens.npy": (lambda p: _flip_byte(p / "tokens.npy"),
                                   "tokens.npy does not match the checksum of its build"),
    "token id outside the vocabulary": (_out_of_vocab_legacy,
                                        "tokens.npy holds token id 70000, outside the vocabulary of 259"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_store_is_rebuilt_with_one_warning_naming_it(damage, tmp_path, caplog):
    good = build(tmp_path)
    want = np.array(good.tokens)
    damage_fn, reason = DAMAGE[damage]
    damage_fn(good.path)

    expected = rf"token store {re.escape(str(good.path))} is damaged: {re.escape(reason)}.*Delete that directory"
    with pytest.raises(DamagedStore, match=expected):
        TokenStore.open(good.path, vocab_size=259)  # opened directly: one line naming it and the fix
    caplog.set_level(logging.INFO, logger="gist_jax")
    caplog.clear()
    rebuilt = build(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(good.path) in warnings[0] and reason in warnings[0] and "Rebuilding it" in warnings[0], warnings[0]
    assert "\n" not in warnings[0]
    np.testing.assert_array_equal(rebuilt.tokens, want)
    assert rebuilt.meta["checksum"].startswith("crc32:")
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.path.name], "nothing left beside the store"
    caplog.clear()
    assert build(tmp_path).num_tokens == len(want) and not caplog.records, "a good store opens quietly"


@pytest.mark.parametrize("damage", ["cut tokens.npy", "flipped byte in tokens.npy", "missing meta.json"])
def test_a_damaged_store_in_a_read_only_cache_is_refused_in_one_line(damage, tmp_path):
    good = build(tmp_path)
    damage_fn, reason = DAMAGE[damage]
    damage_fn(good.path)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ConfigError) as error:
            build(tmp_path)
    finally:
        tmp_path.chmod(0o755)
    message = str(error.value)
    assert "\n" not in message and str(good.path) in message and reason in message, message
    assert "read-only" in message and "data.cache_dir" in message, message
    assert good.path.is_dir(), "a read-only cache is left as it is"


def test_a_store_built_before_checksums_is_checked_and_adopted(tmp_path, caplog):
    good = build(tmp_path)
    meta = json.loads((good.path / "meta.json").read_text())
    crc = meta.pop("checksum")
    meta.pop("vocab_size")
    (good.path / "meta.json").write_text(json.dumps(meta))
    caplog.set_level(logging.INFO, logger="gist_jax")
    adopted = build(tmp_path)
    assert adopted.meta["checksum"] == crc and adopted.meta["vocab_size"] == 259
    assert json.loads((good.path / "meta.json").read_text())["checksum"] == crc
    assert "predates checksums" in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- temporary directories of builds ------------------------------------------------------------------
def _temp(cache: pathlib.Path, pid: int, host: str | None = None) -> pathlib.Path:
    name = store_key(SOURCE, SPLIT, TOKENIZER, 0)
    tmp = cache / f".{name}.build-{pid}@{host or socket.gethostname()}-ab12cd34"
    tmp.mkdir(parents=True)
    (tmp / "tokens.raw").write_bytes(b"\0" * 1000)
    return tmp


def test_a_dead_builders_temp_dir_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_tmp, live_tmp = _temp(tmp_path, int(dead.stdout)), _temp(tmp_path, live.pid)
        other_host = _temp(tmp_path, 1, host="some-other-host.example")  # cannot be asked: kept while recent
        build(tmp_path)
        assert not dead_tmp.exists()
        assert live_tmp.is_dir() and other_host.is_dir()
        old = time.time() - 4 * 86400
        os.utime(other_host / "tokens.raw", (old, old))
        os.utime(other_host, (old, old))
        build(tmp_path)  # an open (no build) also sweeps
        assert not other_host.exists() and live_tmp.is_dir()
    finally:
        live.kill()
        live.wait()


BUILDER = """
import pathlib, sys, time
import numpy as np
from gist_jax.data.store import ensure_store

cache, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])

def slow(source, split, tokenizer):
    for i in range(40):
        if i == 20:
            print("building", flush=True)
            while not go.exists():
                time.sleep(0.02)
        yield np.random.default_rng(0).integers(0, 256, size=50 + 13 * i, dtype=np.int32)

store = ensure_store("fake", "train", "bytes", cache, document_stream=slow)
print("done", store.num_tokens, flush=True)
"""


def _start_builder(cache: pathlib.Path, go: pathlib.Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", BUILDER, str(cache), str(go)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "building\n", proc.communicate()
    return proc


def test_a_killed_build_leaves_nothing_and_a_concurrent_build_is_left_alone(tmp_path):
    """A builder killed with SIGKILL mid-build: the next build in the cache removes its temporary
    directory. A builder still running while another process builds the same store keeps its
    directory and finishes (the second one to publish discards its copy)."""
    killed = _start_builder(tmp_path, tmp_path.parent / "never")
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert leftover.is_dir()
    store = build(tmp_path)
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [store.path.name]

    concurrent = tmp_path / "concurrent"
    go = tmp_path / "go"
    running = _start_builder(concurrent, go)
    (its_tmp,) = [p for p in concurrent.iterdir() if p.name.startswith(".")]
    assert build(concurrent).num_tokens == store.num_tokens  # builds and publishes the same store meanwhile
    assert its_tmp.is_dir(), "a live builder's directory was removed"
    go.touch()
    out, err = running.communicate(timeout=60)
    assert running.returncode == 0 and out.strip() == f"done {store.num_tokens}", err[-2000:]
    assert sorted(p.name for p in concurrent.iterdir()) == [store.path.name]


# -- through the real entry point -----------------------------------------------------------------------
def test_main_rebuilds_a_damaged_store_or_refuses_it_in_a_read_only_cache(tmp_path):
    """``python -m gist_jax.main`` with the tiny config: a bit-rotted train store is rebuilt with
    one warning and the run finishes; a cut one in a read-only cache is refused in one line
    naming it (exit 2), not a traceback."""
    from gist_jax.experiments import demo
    from gist_jax.train.experiment import run_config

    data = run_config(demo.get_config("tiny")).data
    caches = {}
    for case in ("writable", "read_only"):
        cache = caches[case] = tmp_path / case / "cache"
        for split in (data.train_split, data.eval_split):  # stores under the run's keys, made without tensorflow
            ensure_store(data.sources[0][0], split, data.tokenizer, cache, data.max_documents,
                         document_stream=stdlib_bytes_stream)
    train_store = {case: cache / store_key(data.sources[0][0], data.train_split, data.tokenizer, data.max_documents)
                   for case, cache in caches.items()}
    fake_tokens = TokenStore.open(train_store["writable"]).num_tokens
    _flip_byte(train_store["writable"] / "tokens.npy")
    _cut(train_store["read_only"] / "tokens.npy")
    caches["read_only"].chmod(0o555)
    overrides = ("--config.optimizer.total_steps=2", "--config.train.eval_at_start=False")
    try:
        procs = {case: subprocess.Popen(main_command(tmp_path / case / "run", *overrides), cwd=REPO,
                                        env=main_env(str(cache)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
                 for case, cache in caches.items()}
        results = {case: proc.communicate(timeout=400) for case, proc in procs.items()}
    finally:
        caches["read_only"].chmod(0o755)

    _, err = results["writable"]
    assert procs["writable"].returncode == 0, err[-3000:]
    damaged = [line for line in err.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and str(train_store["writable"]) in damaged[0], err[-3000:]
    assert "does not match the checksum" in damaged[0] and "Rebuilding it" in damaged[0], damaged
    assert "Traceback" not in err
    assert TokenStore.open(train_store["writable"]).num_tokens != fake_tokens, "rebuilt from the run's source"

    _, err = results["read_only"]
    assert procs["read_only"].returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("config error: token store ") and str(train_store["read_only"]) in last, last
    assert "tokens.npy is cut short" in last and "read-only" in last, last
