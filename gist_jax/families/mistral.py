"""Mistral: Llama-shaped, no biases; transformers' ``MistralForCausalLM``.

Its one difference, sliding-window attention, is refused unless the window covers every position
the model can reach (``sliding_window`` null, as from Mistral 7B v0.2 on, or at least
``max_position_embeddings``): then it is plain causal attention. llama.cpp writes Mistral GGUF
files as ``llama``, so they load as the llama family.
"""

from __future__ import annotations

from typing import Any

from gist_jax.errors import ConfigError
from gist_jax.families.base import Family, HfConfig, llama_like_rules
from gist_jax.model.config import ModelConfig


def _fields_from_hf(hf: HfConfig) -> dict[str, Any]:
    window, reach = hf.get("sliding_window"), hf.get("max_position_embeddings", 4096)
    if window is not None and window < reach:
        raise ConfigError(f"HF config sliding_window={window!r} is not supported (sliding-window attention); "
                          f"gist_jax needs sliding_window=null or >= max_position_embeddings={reach}")
    return {"qkv_bias": False}


def _check_export(cfg: ModelConfig) -> None:
    if cfg.qkv_bias:
        raise ConfigError("a mistral-family model with q/k/v biases has no transformers equivalent")


FAMILY = Family(
    name="mistral", hf_class="MistralForCausalLM", rules=llama_like_rules, fields_from_hf=_fields_from_hf,
    hf_extras=lambda cfg: {"sliding_window": None}, check_export=_check_export,
)
