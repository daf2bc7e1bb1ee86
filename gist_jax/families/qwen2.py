"""Qwen2 and Qwen2.5: Llama-shaped with q/k/v biases; transformers' ``Qwen2ForCausalLM``."""

from __future__ import annotations

from typing import Any

from gist_jax.errors import ConfigError
from gist_jax.families.base import Family, HfConfig, llama_like_rules, require
from gist_jax.model.config import ModelConfig


def _fields_from_hf(hf: HfConfig) -> dict[str, Any]:
    require(hf, "use_sliding_window", False, "sliding-window attention")
    return {"qkv_bias": True}


def _check_export(cfg: ModelConfig) -> None:
    if not cfg.qkv_bias:
        raise ConfigError("a qwen2-family model without q/k/v biases has no transformers equivalent "
                          "(Qwen2's projections always carry them); use family='llama'")


FAMILY = Family(
    name="qwen2", hf_class="Qwen2ForCausalLM", rules=llama_like_rules, fields_from_hf=_fields_from_hf,
    hf_extras=lambda cfg: {"use_sliding_window": False}, check_export=_check_export,
    gguf_architecture="qwen2", gguf_permuted_qk=False,
)
