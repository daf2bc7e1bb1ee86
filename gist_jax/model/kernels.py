"""What the hardware lets each attention kernel run, decided in one place.

Every kernel choice (the plain causal kernel ``causal.resolve_impl``, the gist structure
``gist.forward.resolve_gist_kernel``, flash's ``kernel_for``, split's cuDNN backend, and the
FLOPs and memory models that must predict what ran) asks these functions, so a new GPU
generation or dtype is one edit. Also the one finite "minus infinity" every blockwise kernel
masks with, and the one knob that names the kernels (``model.attention``, ``parse_attention``).
"""

from __future__ import annotations

import dataclasses
import warnings

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


# -- the one attention knob (``model.attention``) ---------------------------------------------------
# Kernels of the plain causal passes (no gists: full attention, TIE's references, prefill;
# ``model/causal.py``) and of the gist structure (Fine-KV / Coarse-KV / UniGist's parallel pass;
# ``gist.forward.GIST_KERNELS``). Every name belongs to one pass family, so one string can name
# both. ``auto`` and ``dense`` (the reference masks) apply to both.
#
# Causal (``model/causal.py``): ``blockwise`` (pure-JAX online softmax, any backend), ``cudnn``
# (NVIDIA, bf16/fp16), ``splash`` (Pallas, TPU); ``auto`` picks per backend.
# Gist structure, all with the same values and gradients (docs/performance.md): ``dense`` (the
# reference masks, a T x 2T score matrix per head); ``decomposed`` (segment-local causal attention
# + gist-memory attention merged by log-sum-exp, no T x T matrix, ``gist/structured.py``; UniGist's
# windowed form is ``gist/window.py``); ``flash`` (memory laid in front of each segment, one causal
# ``jax.nn.dot_product_attention`` call: cuDNN on NVIDIA GPUs, ``gist/flash.py``); ``split``
# (segment-local causal call + memory call with key lengths, merged by log-sum-exp, custom
# backward: exactly the admitted pairs on cuDNN, ``gist/split.py``); ``bank`` (gists-first
# permutation, one block-sparse Splash kernel on TPU; aligned positions, one ratio per step,
# ``gist/bank.py``); ``auto`` (on GPU in bf16/fp16 ``split`` when its cuDNN self-test passes,
# else ``flash``; elsewhere ``decomposed``).
CAUSAL_KERNELS = ("blockwise", "cudnn", "splash")
GIST_KERNEL_NAMES = ("decomposed", "flash", "split", "bank")
BOTH = ("auto", "dense")
# The keys ``model.attention`` replaced; a run config or saved model config that still has them
# is read through ``legacy_attention`` with one deprecation line.
LEGACY_KEYS = ("model.attention_impl", "compression.attention_impl")


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    """What ``model.attention`` asks of each pass family (``auto``, ``dense`` or a kernel name);
    what actually runs also depends on the backend and layout (``causal.resolve_impl``,
    ``gist.forward.resolve_gist_kernel``)."""

    causal: str = "auto"
    gist: str = "auto"

    @property
    def name(self) -> str:
        """The canonical ``model.attention`` string for this choice."""
        if self.causal == self.gist:
            return self.causal
        if self.gist == "auto" and self.causal in CAUSAL_KERNELS:
            return self.causal
        if self.causal == "auto" and self.gist in GIST_KERNEL_NAMES:
            return self.gist
        return f"{self.causal},{self.gist}"


def parse_attention(value: str, key: str = "model.attention") -> AttentionChoice:
    """``auto`` | ``dense`` | one kernel name (the other pass family stays ``auto``) |
    ``<causal>,<gist>`` (each ``auto``, ``dense`` or a kernel of that family). Raises
    ``ConfigError`` naming ``key`` and the accepted names."""
    from gist_jax.errors import ConfigError  # local: kernels imports nothing of the package at load

    fix = (f"use auto, dense, a causal kernel {CAUSAL_KERNELS}, a gist kernel {GIST_KERNEL_NAMES}, "
           "or '<causal>,<gist>' (e.g. 'cudnn,split')")
    parts = [p.strip() for p in str(value).split(",")]
    if len(parts) == 1:
        (name,) = parts
        if name in BOTH:
            return AttentionChoice(name, name)
        if name in CAUSAL_KERNELS:
            return AttentionChoice(causal=name)
        if name in GIST_KERNEL_NAMES:
            return AttentionChoice(gist=name)
    elif len(parts) == 2 and parts[0] in BOTH + CAUSAL_KERNELS and parts[1] in BOTH + GIST_KERNEL_NAMES:
        return AttentionChoice(*parts)
    raise ConfigError(f"{key}={value!r} is not an attention choice; {fix}")


def with_gist_kernel(attention: str, gist: str) -> str:
    """``attention`` with its gist-structure part replaced (the causal part kept)."""
    name = dataclasses.replace(parse_attention(attention), gist=gist).name
    parse_attention(name)  # a causal kernel named as the gist part fails here, not later
    return name


def legacy_attention(causal: str | None, gist: str | None) -> str:
    """The ``model.attention`` value equal to the old pair of keys (``model.attention_impl`` for the
    causal passes, ``compression.attention_impl`` for the gist structure; None: not given, so
    ``auto``). Warns, in one line, that the keys are deprecated and what to write instead."""
    from gist_jax.errors import ConfigError

    given = [f"{k}={v!r}" for k, v in zip(LEGACY_KEYS, (causal, gist)) if v is not None]
    for key, value, names in zip(LEGACY_KEYS, (causal, gist), (CAUSAL_KERNELS, GIST_KERNEL_NAMES)):
        if value is not None and value not in BOTH + names:
            raise ConfigError(f"{key}={value!r} (deprecated) is unknown; use model.attention: {BOTH + names}")
    name = AttentionChoice(causal or "auto", gist or "auto").name
    warnings.warn(f"{' and '.join(given)}: deprecated keys, read as model.attention={name!r}; write that "
                  "instead", FutureWarning, stacklevel=3)
    return name
