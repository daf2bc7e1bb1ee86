"""Running ``python -m gist_jax.main`` as a real subprocess (kills, signals, several processes)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "experiments/demo.py:tiny"


def main_env(token_cache: str, devices: int = 8) -> dict[str, str]:
    env = dict(os.environ)
    extra_flags = os.environ.get("GIST_JAX_TEST_XLA_FLAGS", "")
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {extra_flags}".strip(),
               GIST_JAX_CACHE=token_cache, GIST_JAX_COMPILE_CACHE=str(REPO / ".jax_cache"),
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    return env


def main_command(workdir: pathlib.Path, *overrides: str, config: str = TINY) -> list[str]:
    return [sys.executable, "-m", "gist_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]


def start(workdir: pathlib.Path, token_cache: str, *overrides: str, config: str = TINY) -> subprocess.Popen:
    return subprocess.Popen(main_command(workdir, *overrides, config=config), cwd=REPO, env=main_env(token_cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(workdir: pathlib.Path, token_cache: str, *overrides: str, config: str = TINY,
        timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(workdir, *overrides, config=config), cwd=REPO, env=main_env(token_cache),
                          capture_output=True, text=True, timeout=timeout, check=False)


def logged(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip().endswith("}")]


def losses(workdir: pathlib.Path) -> dict[int, float]:
    """Loss per step; a step logged twice (work redone after a kill) keeps its last value."""
    return {m["step"]: m["loss"] for m in logged(workdir) if "loss" in m}


def wait_for_step(proc: subprocess.Popen, workdir: pathlib.Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(losses(workdir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (code {proc.returncode}) before step {step}:\n"
                                 f"{proc.stdout.read()[-3000:]}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout}s")


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def parse_like_main(argv: list[str]) -> flags.FlagValues:
    """The flags of ``gist_jax.main`` (config file + overrides, workdir), on a fresh flag set."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=["main", *argv])
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    fv(["main", *argv])
    return fv
