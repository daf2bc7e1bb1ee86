"""Random tiny transformers models for parity tests (shared by several test files)."""

from __future__ import annotations

import pathlib

import torch
import transformers

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512, initializer_range=0.1, rms_norm_eps=1e-6)

MODELS = {
    "llama_gqa_untied": (transformers.LlamaConfig, dict(tie_word_embeddings=False)),
    "llama_tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "qwen2_bias": (transformers.Qwen2Config, dict(tie_word_embeddings=False)),
    "mistral": (transformers.MistralConfig, dict(tie_word_embeddings=False, sliding_window=None)),
    "llama3_rope_scaling": (transformers.LlamaConfig, dict(
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=32))),
}


def build(kind: str, path: pathlib.Path, seed: int = 0):
    """Random model of the given kind, saved to ``path``; returns the float32 eager model."""
    config_cls, extra = MODELS[kind]
    torch.manual_seed(seed)
    config = config_cls(**TINY, **extra, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF initialises biases to zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    return model
