"""The model families: one module each, registered in ``FAMILIES`` (the one table).

To add a family, write ``gist_jax/families/<name>.py`` building a ``Family`` (see
``families/mistral.py``, the smallest) and add it to ``FAMILIES`` below; docs/architecture.md
("How to add...") lists its tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gist_jax.errors import ConfigError
from gist_jax.families.base import TRANSFORMS, Family, TensorRule
from gist_jax.model.config import ModelConfig

from . import base, llama, mistral, qwen2

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, qwen2.FAMILY, mistral.FAMILY)}

__all__ = ["FAMILIES", "TRANSFORMS", "Family", "TensorRule", "config_from_hf", "config_to_hf", "expand", "expand_rules",
           "family_for", "gguf_family", "head_count"]


def family_for(name: str, key: str = "model.family") -> Family:
    """The registered family ``name``; a ``ConfigError`` naming ``key`` and the choices otherwise."""
    if name not in FAMILIES:
        raise ConfigError(f"{key}={name!r} is not supported; supported families: {sorted(FAMILIES)}")
    return FAMILIES[name]


def gguf_family(architecture: Any) -> Family:
    """The family whose GGUF files carry ``general.architecture == architecture``."""
    for family in FAMILIES.values():
        if family.gguf_architecture is not None and family.gguf_architecture == architecture:
            return family
    known = sorted(f.gguf_architecture for f in FAMILIES.values() if f.gguf_architecture)
    raise ValueError(f"Unsupported GGUF architecture {architecture!r}; supported: {known}")


def config_from_hf(hf_config: dict[str, Any], **overrides: Any) -> ModelConfig:
    """HF ``config.json`` dict -> ModelConfig (overrides: dtype, scan_layers, ...)."""
    family = family_for(hf_config.get("model_type", "<missing>"), key="HF model_type")
    return base.config_from_hf(family, hf_config, overrides)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return base.config_to_hf(family_for(cfg.family), cfg)


def expand(cfg: ModelConfig, rules: list[TensorRule]) -> list[TensorRule]:
    """``rules`` with ``{i}`` expanded for every layer."""
    out: list[TensorRule] = []
    for rule in rules:
        if "{i}" in rule.hf_name:
            out.extend(dataclasses.replace(rule, hf_name=rule.hf_name.format(i=i),
                                           path=tuple(p.format(i=i) for p in rule.path))
                       for i in range(cfg.num_layers))
        else:
            out.append(rule)
    return out


def expand_rules(cfg: ModelConfig) -> list[TensorRule]:
    """The family's tensor table with ``{i}`` expanded for every layer."""
    return expand(cfg, family_for(cfg.family).rules(cfg))


def head_count(cfg: ModelConfig, rule: TensorRule) -> int:
    return {"q": cfg.num_heads, "kv": cfg.num_kv_heads, None: 0}[rule.heads]
