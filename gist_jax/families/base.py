"""What every model family is made of, and the parts Llama-shaped families share.

A family (``gist_jax.families.llama``, ``qwen2``, ``mistral``...) is one module that builds one
``Family``: how its transformers ``config.json`` maps to and from ``ModelConfig``, its tensor-name
table, the transformers class it loads as, and the llama.cpp architecture its GGUF files carry.
The model itself is family-agnostic (``ModelConfig``'s switches: q/k/v biases, tying, RoPE
scaling); a family is the Hugging Face vocabulary around it.

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


HfConfig = dict[str, Any]


def _accept_all(hf: HfConfig) -> None:
    del hf


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family. ``name`` is both ``ModelConfig.family`` and transformers' ``model_type``.

    ``qkv_bias``: whether transformers' class has q/k/v biases (it decides ``ModelConfig.qkv_bias``
    on import, and an export whose config disagrees is refused). ``check_hf`` refuses, in one
    ``ConfigError`` line, the family's HF settings gist_jax does not compute; ``hf_extras`` writes
    the family's own keys back.
    """

    name: str
    hf_class: str  # transformers' causal-LM class, e.g. "LlamaForCausalLM"
    rules: Callable[[ModelConfig], list[TensorRule]]
    hf_extras: Callable[[ModelConfig], HfConfig]
    qkv_bias: bool = False
    check_hf: Callable[[HfConfig], None] = _accept_all
    gguf_architecture: str | None = None  # llama.cpp's general.architecture, if it writes one
    gguf_permuted_qk: bool = False  # llama.cpp permutes q/k rows for rotary (undone on read)
    # HF tensors that carry no parameters (recomputed buffers).
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    @property
    def export_class(self) -> str:
        """The compressed-inference class an export names (``hf/modeling_gist.py`` builds it)."""
        return "Gist" + self.hf_class

    def check_export(self, cfg: ModelConfig) -> None:
        """Refuse a config that transformers' class could not load (its biases differ)."""
        if cfg.qkv_bias != self.qkv_bias:
            has = "with" if cfg.qkv_bias else "without"
            raise ConfigError(f"a {self.name}-family model {has} q/k/v biases has no transformers equivalent "
                              f"({self.hf_class} {'always has' if self.qkv_bias else 'has no'} them)")


def llama_like_rules(cfg: ModelConfig) -> list[TensorRule]:
    """The tensor table of a Llama-shaped decoder (Llama, Qwen2, Mistral...)."""
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


def require(hf: HfConfig, key: str, expected: Any, why: str) -> None:
    """Refuse an HF setting gist_jax does not compute, naming the key and the value it needs."""
    if hf.get(key, expected) != expected:
        raise ConfigError(f"HF config {key}={hf[key]!r} is not supported ({why}); "
                          f"gist_jax needs {key}={expected!r}")


def _rope_from_hf(hf: HfConfig) -> tuple[float, RopeScaling]:
    # transformers 5 writes rope_parameters; 4.x wrote rope_theta + rope_scaling.
    merged: dict[str, Any] = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta: Any = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    theta = float(theta)
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    kwargs = {k: merged[k] for k in fields if merged.get(k) is not None}
    return theta, RopeScaling(rope_type=rope_type, **kwargs)


def _rope_to_hf(cfg: ModelConfig) -> HfConfig:
    params: HfConfig = {"rope_type": cfg.rope_scaling.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling.rope_type != "default":
        params.update(dataclasses.asdict(cfg.rope_scaling))
    return params


def config_from_hf(family: Family, hf: HfConfig, overrides: dict[str, Any]) -> ModelConfig:
    """The fields every Llama-shaped config shares, after the family's refusals; q/k/v biases are the family's."""
    require(hf, "hidden_act", "silu", "SwiGLU with SiLU only")
    require(hf, "mlp_bias", False, "MLP biases")
    theta, scaling = _rope_from_hf(hf)
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    fields = dict(
        family=family.name, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )
    family.check_hf(hf)
    fields["qkv_bias"] = family.qkv_bias
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_hf(family: Family, cfg: ModelConfig) -> HfConfig:
    hf = dict(
        architectures=[family.hf_class], model_type=family.name, vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters=_rope_to_hf(cfg),
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )
    hf.update(family.hf_extras(cfg))
    return hf
