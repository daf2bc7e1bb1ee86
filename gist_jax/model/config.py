"""The decoder's configuration: one frozen dataclass for every supported family.

Llama 2/3/3.1, Qwen2, Mistral and SmolLM2 are the same computation with different switches
(RoPE scaling, q/k/v bias, tied head), so one config and one implementation serve them all.
``family`` is only a label here: the computation never reads it. What a family means (its HF
``config.json``, tensor names, transformers class, GGUF architecture) is its module in
``gist_jax/families/``, which validates the label wherever it is used (import, export).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax.numpy as jnp

from gist_jax.errors import ConfigError
from gist_jax.model.kernels import AttentionChoice, legacy_attention, parse_attention

ROPE_TYPES = ("default", "linear", "llama3")


# -- value checks shared by every config dataclass ---------------------------------------------------
# One wording for "a count must be >= n" and "a number must be finite and in range", so every
# section's __post_init__ reports ``<section.key>=<value>: <what is wrong>; <fix>`` the same way.
# Floats are checked for NaN/inf explicitly: every ordinary comparison with NaN is False, so a
# plain ``value <= 0`` check lets NaN through to the first training step.

def check_int(key: str, value: Any, minimum: int, fix: str = "") -> None:
    """``value`` is an integer (numpy ints too, bools not) and ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{key}={value!r}: must be an integer; {fix or f'use a whole number >= {minimum}'}")
    if value < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ConfigError(f"{key}={value}: must be {what}; {fix or f'use a value >= {minimum}'}")


def check_float(key: str, value: Any, low: float = 0.0, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False, fix: str = "") -> None:
    """``value`` is a finite real number between ``low`` and ``high`` (each end included unless open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}: must be a finite number; {fix or 'give a real value'}")
    too_low = value <= low if low_open else value < low
    # typeshed's numbers.Real declares only < and <= (as the ABC does); real numbers have all four.
    too_high = value >= high if high_open else value > high  # type: ignore[operator]
    if too_low or too_high:
        raise ConfigError(f"{key}={value!r}: must be {_interval(low, high, low_open, high_open)}; "
                          f"{fix or 'use a value in that range'}")


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if math.isinf(high):
        return f"{'>' if low_open else '>='} {low:g}" if low or not low_open else "positive"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_dtype_name(key: str, value: str) -> None:
    """``value`` names a numpy/JAX dtype (``float32``, ``bfloat16``, ...)."""
    try:
        jnp.dtype(value)
    except TypeError as e:
        raise ConfigError(f"{key}={value!r} is not a dtype name; use e.g. 'float32' or 'bfloat16'") from e


def check_remat_policy(key: str, value: str) -> None:
    from gist_jax.model.remat import REMAT_POLICIES  # local: avoids an import cycle

    if value not in REMAT_POLICIES:
        raise ConfigError(f"{key}={value!r} is unknown; use one of {sorted(REMAT_POLICIES)}")


def check_attention(key: str, value: str) -> None:
    parse_attention(value, key)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``llama3`` is Llama-3.1's piecewise rescaling of wavelengths."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    ``dtype`` is the compute dtype (activations, matmuls); ``param_dtype`` the storage dtype of
    the master weights. Training uses float32 params with bfloat16 compute; parity tests use
    float32 for both.
    """

    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    # The attention kernels, one knob for every pass (``model/kernels.py`` ``parse_attention``):
    # auto | dense | a kernel name | '<causal>,<gist>'. Execution only: every kernel computes the
    # same values and gradients (docs/performance.md).
    attention: str = "auto"
    # Gist parameters (set from the compression config, see gist_jax/gist/params.py):
    # rows of the gist embedding table (0: none, 1: shared, t: one per slot) and whether
    # gist tokens get their own q/k/v projections in every layer.
    num_gist_embeddings: int = 0
    gist_projections: bool = False

    def __post_init__(self) -> None:
        validate(self)

    @property
    def kernels(self) -> AttentionChoice:
        """What ``attention`` asks of the plain causal passes and of the gist structure."""
        return parse_attention(self.attention)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)} - {"attention_impl"})  # the shim below
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; remove them")
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if "attention_impl" in d:  # a model config saved before ``attention`` replaced it
            if d.get("attention", "auto") != "auto":
                raise ConfigError(f"model config has attention={d['attention']!r} and the deprecated "
                                  f"attention_impl={d['attention_impl']!r}; keep attention only")
            d["attention"] = legacy_attention(d.pop("attention_impl"), None)
        return cls(**d)

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        e, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = e * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * e * f + 2 * e
        if self.gist_projections:
            per_layer += attn - e * h * self.num_heads  # gist q/k/v (no extra o_proj)
        head = 0 if self.tie_embeddings else self.vocab_size * e
        gist = self.num_gist_embeddings * e
        return self.num_layers * per_layer + self.vocab_size * e + head + e + gist


def validate(cfg: ModelConfig) -> None:
    """Fail at construction with the key and the fix, not deep inside a trace."""
    if cfg.rope_scaling.rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"model.rope_scaling.rope_type={cfg.rope_scaling.rope_type!r} is not supported; "
            f"use one of {ROPE_TYPES}"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "max_position_embeddings"):
        check_int(f"model.{key}", getattr(cfg, key), 1)
    check_float("model.rms_norm_eps", cfg.rms_norm_eps, low_open=True)
    check_float("model.rope_theta", cfg.rope_theta, low_open=True)
    check_float("model.rope_scaling.factor", cfg.rope_scaling.factor, low_open=True)
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(
            f"model.num_heads={cfg.num_heads} is not a multiple of model.num_kv_heads="
            f"{cfg.num_kv_heads}; grouped-query attention needs whole groups"
        )
    if cfg.head_dim % 2:
        raise ConfigError(f"model.head_dim={cfg.head_dim} must be even for rotary embeddings")
    if cfg.num_gist_embeddings < 0:
        raise ConfigError(f"model.num_gist_embeddings={cfg.num_gist_embeddings} must be >= 0")
    for key in ("dtype", "param_dtype"):
        check_dtype_name(f"model.{key}", getattr(cfg, key))
    check_remat_policy("model.remat_policy", cfg.remat_policy)
    check_attention("model.attention", cfg.attention)


# Named shapes. Real checkpoints bring their own config through the importers; these serve
# benchmarks and tests.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        family="llama", vocab_size=256 + 8, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096,
        dtype="float32", bos_token_id=257, eos_token_id=258,  # gist_jax.data.tokenizer.ByteTokenizer ids
    ),
    "smollm2_135m": ModelConfig(
        family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ),
    # The performance issue's 1B-class benchmark model (no pretrained weights: random init).
    "bench_1b": ModelConfig(
        family="llama", vocab_size=49152, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=65536, bos_token_id=1, eos_token_id=2,
    ),
    "llama3_8b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        bos_token_id=128000, eos_token_id=128001,
    ),
    "qwen2_7b": ModelConfig(
        family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=131072, qkv_bias=True,
        eos_token_id=151643,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"model preset {name!r} is unknown; use one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
