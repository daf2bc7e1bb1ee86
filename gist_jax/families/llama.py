"""Llama 2/3/3.1 and SmolLM2: transformers' ``LlamaForCausalLM``, llama.cpp's ``llama``."""

from __future__ import annotations

from gist_jax.families.base import Family, HfConfig, llama_like_rules, require


def _check_hf(hf: HfConfig) -> None:
    # Llama's attention_bias also adds an o_proj bias, which no supported checkpoint uses.
    require(hf, "attention_bias", False, "Llama attention biases")


FAMILY = Family(
    name="llama", hf_class="LlamaForCausalLM", rules=llama_like_rules, check_hf=_check_hf,
    hf_extras=lambda cfg: {"attention_bias": False, "mlp_bias": False},
    gguf_architecture="llama", gguf_permuted_qk=True,
)
