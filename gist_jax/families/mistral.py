"""Mistral: Llama-shaped, no biases; transformers' ``MistralForCausalLM``.

Its one difference, sliding-window attention, is refused unless the window covers every position
the model can reach (``sliding_window`` null, as from Mistral 7B v0.2 on, or at least
``max_position_embeddings``): then it is plain causal attention. llama.cpp writes Mistral GGUF
files as ``llama``, so they load as the llama family.
"""

from __future__ import annotations

from gist_jax.errors import ConfigError
from gist_jax.families.base import Family, HfConfig, llama_like_rules


def _check_hf(hf: HfConfig) -> None:
    window, reach = hf.get("sliding_window"), hf.get("max_position_embeddings", 4096)
    if window is not None and window < reach:
        raise ConfigError(f"HF config sliding_window={window!r} is not supported (sliding-window attention); "
                          f"gist_jax needs sliding_window=null or >= max_position_embeddings={reach}")


FAMILY = Family(
    name="mistral", hf_class="MistralForCausalLM", rules=llama_like_rules, check_hf=_check_hf,
    hf_extras=lambda cfg: {"sliding_window": None},
)
