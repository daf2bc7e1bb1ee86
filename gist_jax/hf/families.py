"""One entry per model family: HF config <-> ModelConfig, and the HF tensor-name table.

Every transpose and reshape between transformers' layout and ours is a named transform in
``TRANSFORMS`` with its inverse next to it, so import and export cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from gist_jax.errors import ConfigError
from gist_jax.model.config import ModelConfig, RopeScaling


@dataclasses.dataclass(frozen=True)
class Transform:
    """HF array -> our array (``to_ours``) and back (``to_hf``); ``n`` is a head count."""

    to_ours: Callable[[np.ndarray, int], np.ndarray]
    to_hf: Callable[[np.ndarray, int], np.ndarray]


TRANSFORMS: dict[str, Transform] = {
    "copy": Transform(lambda w, n: w, lambda w, n: w),
    # nn.Dense kernel [in, out] vs torch Linear weight [out, in]
    "transpose": Transform(lambda w, n: w.T, lambda w, n: w.T),
    # q/k/v: torch [N*H, E] -> ours [E, N, H]
    "split_heads_out": Transform(lambda w, n: w.T.reshape(w.shape[1], n, -1),
                                 lambda w, n: w.reshape(w.shape[0], -1).T),
    # o: torch [E, N*H] -> ours [N, H, E]
    "split_heads_in": Transform(lambda w, n: w.T.reshape(n, -1, w.shape[0]),
                                lambda w, n: w.reshape(-1, w.shape[-1]).T),
    # q/k/v bias: [N*H] -> [N, H]
    "split_heads_bias": Transform(lambda w, n: w.reshape(n, -1), lambda w, n: w.reshape(-1)),
}


@dataclasses.dataclass(frozen=True)
class TensorRule:
    hf_name: str  # may contain {i} for the layer index
    path: tuple[str, ...]  # in the unscanned param tree; "layers_{i}" for per-layer tensors
    transform: str = "copy"
    heads: str | None = None  # "q" or "kv": which head count the transform needs


def _llama_like_rules(cfg: ModelConfig) -> list[TensorRule]:
    layer = "model.layers.{i}."
    rules = [
        TensorRule("model.embed_tokens.weight", ("embed", "embedding")),
        TensorRule("model.norm.weight", ("final_norm", "scale")),
        TensorRule(layer + "input_layernorm.weight", ("layers_{i}", "attn_norm", "scale")),
        TensorRule(layer + "post_attention_layernorm.weight", ("layers_{i}", "mlp_norm", "scale")),
        TensorRule(layer + "self_attn.q_proj.weight", ("layers_{i}", "attn", "q_proj", "kernel"),
                   "split_heads_out", "q"),
        TensorRule(layer + "self_attn.k_proj.weight", ("layers_{i}", "attn", "k_proj", "kernel"),
                   "split_heads_out", "kv"),
        TensorRule(layer + "self_attn.v_proj.weight", ("layers_{i}", "attn", "v_proj", "kernel"),
                   "split_heads_out", "kv"),
        TensorRule(layer + "self_attn.o_proj.weight", ("layers_{i}", "attn", "o_proj", "kernel"),
                   "split_heads_in", "q"),
        TensorRule(layer + "mlp.gate_proj.weight", ("layers_{i}", "mlp", "gate_proj", "kernel"),
                   "transpose"),
        TensorRule(layer + "mlp.up_proj.weight", ("layers_{i}", "mlp", "up_proj", "kernel"),
                   "transpose"),
        TensorRule(layer + "mlp.down_proj.weight", ("layers_{i}", "mlp", "down_proj", "kernel"),
                   "transpose"),
    ]
    if cfg.qkv_bias:
        for proj, heads in (("q_proj", "q"), ("k_proj", "kv"), ("v_proj", "kv")):
            rules.append(TensorRule(layer + f"self_attn.{proj}.bias",
                                    ("layers_{i}", "attn", proj, "bias"), "split_heads_bias", heads))
    if not cfg.tie_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head", "kernel"), "transpose"))
    return rules


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
    # transformers 5 writes rope_parameters; 4.x wrote rope_theta + rope_scaling.
    merged = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    kwargs = {k: merged[k] for k in fields if merged.get(k) is not None}
    return theta, RopeScaling(rope_type=rope_type, **kwargs)


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": cfg.rope_scaling.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling.rope_type != "default":
        params.update(dataclasses.asdict(cfg.rope_scaling))
    return params


def _require(hf: dict[str, Any], key: str, expected: Any, why: str) -> None:
    if hf.get(key, expected) != expected:
        raise ConfigError(f"HF config {key}={hf[key]!r} is not supported ({why}); "
                          f"gist_jax needs {key}={expected!r}")


def _config_from_hf(family: str, hf: dict[str, Any], overrides: dict[str, Any]) -> ModelConfig:
    _require(hf, "hidden_act", "silu", "SwiGLU with SiLU only")
    _require(hf, "mlp_bias", False, "MLP biases")
    if family == "llama":
        # Llama's attention_bias also adds an o_proj bias, which no supported checkpoint uses.
        _require(hf, "attention_bias", False, "Llama attention biases")
    if family == "qwen2":
        _require(hf, "use_sliding_window", False, "sliding-window attention")
    theta, scaling = _rope_from_hf(hf)
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    fields = dict(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=(family == "qwen2"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg.family]
    hf = dict(
        architectures=[arch], model_type=cfg.family, vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters=_rope_to_hf(cfg),
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )
    if cfg.family == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False)
    return hf


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    rules: Callable[[ModelConfig], list[TensorRule]]
    # HF tensors that carry no parameters (recomputed buffers).
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", _llama_like_rules),
    "qwen2": Family("qwen2", _llama_like_rules),
}


def family_for(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ConfigError(f"HF model_type={model_type!r} is not supported; supported model types: "
                          f"{sorted(FAMILIES)}")
    return FAMILIES[model_type]


def config_from_hf(hf_config: dict[str, Any], **overrides: Any) -> ModelConfig:
    """HF ``config.json`` dict -> ModelConfig (overrides: dtype, scan_layers, ...)."""
    family = family_for(hf_config.get("model_type", "<missing>")).name
    return _config_from_hf(family, hf_config, overrides)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return _config_to_hf(cfg)


def expand_rules(cfg: ModelConfig) -> list[TensorRule]:
    """Rules with ``{i}`` expanded for every layer."""
    out: list[TensorRule] = []
    for rule in FAMILIES[cfg.family].rules(cfg):
        if "{i}" in rule.hf_name:
            out.extend(TensorRule(rule.hf_name.format(i=i),
                                  tuple(p.format(i=i) for p in rule.path), rule.transform, rule.heads)
                       for i in range(cfg.num_layers))
        else:
            out.append(rule)
    return out


def head_count(cfg: ModelConfig, rule: TensorRule) -> int:
    return {"q": cfg.num_heads, "kv": cfg.num_kv_heads, None: 0}[rule.heads]
