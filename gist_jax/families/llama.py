"""Llama 2/3/3.1 and SmolLM2: transformers' ``LlamaForCausalLM``, llama.cpp's ``llama``."""

from __future__ import annotations

from typing import Any

from gist_jax.errors import ConfigError
from gist_jax.families.base import Family, HfConfig, llama_like_rules, require
from gist_jax.model.config import ModelConfig


def _fields_from_hf(hf: HfConfig) -> dict[str, Any]:
    # Llama's attention_bias also adds an o_proj bias, which no supported checkpoint uses.
    require(hf, "attention_bias", False, "Llama attention biases")
    return {"qkv_bias": False}


def _check_export(cfg: ModelConfig) -> None:
    if cfg.qkv_bias:
        raise ConfigError("a llama-family model with q/k/v biases has no transformers equivalent")


FAMILY = Family(
    name="llama", hf_class="LlamaForCausalLM", rules=llama_like_rules, fields_from_hf=_fields_from_hf,
    hf_extras=lambda cfg: {"attention_bias": False, "mlp_bias": False}, check_export=_check_export,
    gguf_architecture="llama", gguf_permuted_qk=True,
)
