"""Joining JAX's distributed runtime: one call, the same on a TPU pod, a SLURM cluster and
local CPU processes (gloo collectives on loopback, which is how the tests run multi-host code).

Environment (set by the scripts in ``launch/``):
  GIST_JAX_COORDINATOR   host:port of process 0 (unset: single process, or cluster auto-detect)
  GIST_JAX_NUM_PROCESSES number of processes
  GIST_JAX_PROCESS_ID    this process's rank
  GIST_JAX_DISTRIBUTED   ``auto``: let JAX detect the cluster (Cloud TPU, SLURM, Open MPI)
  GIST_JAX_INIT_TIMEOUT  seconds to wait for every worker (default 300)
"""

from __future__ import annotations

import os
import sys

import jax

_initialized = False


MISSING_WORKER_HINT = ("If it stops with DEADLINE_EXCEEDED (RegisterTask), a worker is missing: start every worker "
                       "with the same GIST_JAX_COORDINATOR and GIST_JAX_NUM_PROCESSES, a distinct "
                       "GIST_JAX_PROCESS_ID, and make the coordinator port reachable.")


class DistributedInitError(RuntimeError):
    pass


# XLA:CPU's concurrency-optimised scheduler let independent collectives of one program run in a
# different order on different fake devices; with context parallelism's gist all-gathers beside
# XLA's own collectives the device threads then waited on each other until the 40 s rendezvous
# timeout aborted the process (reproduced 3 of 3 times with the step loaded from the compilation
# cache; 5 of 5 runs passed with the scheduler off).
SEQUENTIAL_CPU_COLLECTIVES = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def order_cpu_collectives(context: int) -> None:
    """Before the backend starts: with ``mesh.context`` > 1, turn XLA:CPU's concurrency-optimised
    scheduler off (``SEQUENTIAL_CPU_COLLECTIVES``); a CPU-only flag, ignored by other backends."""
    flags = os.environ.get("XLA_FLAGS", "")
    if context > 1 and SEQUENTIAL_CPU_COLLECTIVES.split("=")[0] not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {SEQUENTIAL_CPU_COLLECTIVES}".strip()


def initialize_from_env() -> bool:
    """Initialises ``jax.distributed`` when the environment asks for it; returns whether it did."""
    global _initialized  # noqa: PLW0603 - once per process
    if _initialized:
        return True
    coordinator = os.environ.get("GIST_JAX_COORDINATOR")
    auto = os.environ.get("GIST_JAX_DISTRIBUTED") == "auto"
    if not coordinator and not auto:
        return False
    timeout = int(os.environ.get("GIST_JAX_INIT_TIMEOUT", "300"))
    kwargs: dict = {"initialization_timeout": timeout}
    if coordinator:
        try:
            kwargs.update(coordinator_address=coordinator, num_processes=int(os.environ["GIST_JAX_NUM_PROCESSES"]),
                          process_id=int(os.environ["GIST_JAX_PROCESS_ID"]))
        except KeyError as e:
            raise DistributedInitError(f"GIST_JAX_COORDINATOR is set but {e.args[0]} is not; set "
                                       "GIST_JAX_NUM_PROCESSES and GIST_JAX_PROCESS_ID too") from None
        if coordinator.startswith(("127.", "localhost")):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's coordination client aborts the process (a C++ fatal error, no Python exception) when a
    # worker never joins, so the facts a user needs are printed before it can happen.
    where = coordinator or "auto-detected cluster"
    print(f"jax.distributed: process {os.environ.get('GIST_JAX_PROCESS_ID', '?')} of "
          f"{os.environ.get('GIST_JAX_NUM_PROCESSES', '?')} joining {where}, waiting up to {timeout}s "
          f"(GIST_JAX_INIT_TIMEOUT) for every worker. {MISSING_WORKER_HINT}", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:
        raise DistributedInitError(
            f"jax.distributed.initialize failed after up to {timeout}s (coordinator {where}, process "
            f"{os.environ.get('GIST_JAX_PROCESS_ID', '?')} of {os.environ.get('GIST_JAX_NUM_PROCESSES', '?')}): "
            f"{e}. {MISSING_WORKER_HINT}") from e
    _initialized = True
    return True


def enable_compilation_cache() -> None:
    """Persistent XLA compilation cache (``GIST_JAX_COMPILE_CACHE``, ``off`` to disable): a
    restarted or resumed run skips recompiling its train steps."""
    cache = os.environ.get("GIST_JAX_COMPILE_CACHE", os.path.expanduser("~/.cache/gist_jax/jax"))
    if cache != "off":
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def is_primary() -> bool:
    """Process 0 writes logs, metrics and summaries; every process checkpoints."""
    return jax.process_index() == 0
