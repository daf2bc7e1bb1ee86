"""What the hardware lets each attention kernel run, decided in one place.

Every kernel choice (the plain causal kernel ``causal.resolve_impl``, the gist structure
``gist.forward.resolve_attention_impl``, flash's ``kernel_for``, split's cuDNN backend, and the
FLOPs and memory models that must predict what ran) asks these functions, so a new GPU
generation or dtype is one edit. Also the one finite "minus infinity" every blockwise kernel
masks with.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.typing import DTypeLike

# Finite "minus infinity": exp(NEG - finite) == 0 without inf - inf = NaN in a log-sum-exp merge
# or its gradient (fully masked rows: padding, the memory of segment 0, dead slots).
NEG = -1e30
HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# cuDNN's fused attention: what every supported GPU takes (Hopper takes 256; kept at the common bound).
CUDNN_MAX_HEAD_DIM = 128


def is_half(dtype: DTypeLike) -> bool:
    """bfloat16 or float16: the dtypes cuDNN's fused attention computes in."""
    return jnp.dtype(dtype) in HALF_DTYPES


def cudnn_accepts(dtype: DTypeLike, head_dim: int) -> bool:
    """Whether cuDNN's fused attention takes inputs of ``dtype`` with heads of ``head_dim``."""
    return is_half(dtype) and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM


def cudnn_runs(backend: str, dtype: DTypeLike, head_dim: int) -> bool:
    """``cudnn_accepts`` on a GPU backend (``backend`` as ``jax.default_backend()`` names it)."""
    return backend == "gpu" and cudnn_accepts(dtype, head_dim)


def splash_runs(backend: str) -> bool:
    """Pallas Splash attention compiles for TPU only (elsewhere it runs interpreted, in tests)."""
    return backend == "tpu"
