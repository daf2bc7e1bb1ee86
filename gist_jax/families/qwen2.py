"""Qwen2 and Qwen2.5: Llama-shaped with q/k/v biases; transformers' ``Qwen2ForCausalLM``."""

from __future__ import annotations

from gist_jax.families.base import Family, HfConfig, llama_like_rules, require


def _check_hf(hf: HfConfig) -> None:
    require(hf, "use_sliding_window", False, "sliding-window attention")


FAMILY = Family(
    name="qwen2", hf_class="Qwen2ForCausalLM", rules=llama_like_rules, qkv_bias=True, check_hf=_check_hf,
    hf_extras=lambda cfg: {"use_sliding_window": False}, gguf_architecture="qwen2", gguf_permuted_qk=False,
)
