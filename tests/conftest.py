"""Shared test set-up: 8 fake CPU devices, a persistent compilation cache, float32 numerics."""

from __future__ import annotations

import os
import pathlib

# Must happen before jax initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    from gist_jax.hf.gguf import smollm2_gguf_path

    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> str:
    """A token-store cache for the subprocess runs of ``gist_jax.main`` (tokenised once per worker)."""
    return str(tmp_path_factory.mktemp("tokens"))
