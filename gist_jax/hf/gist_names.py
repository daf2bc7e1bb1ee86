"""The gist half of an exported Hugging Face directory: tensor names and the ``gist`` config section.

Base weights keep transformers' own names (``gist_jax/families/``); the gist parameters are extra
tensors under a ``gist.`` prefix, named after the module tree of ``modeling_gist.py``
(``gist.embedding``, ``gist.layers.{i}.{q,k,v}_proj.{weight,bias}``) so that transformers'
``from_pretrained`` of the exported class loads them like any other weight. The gist q/k/v
rules are derived from the family's own q/k/v rules, so the transposes can never differ
between base and gist projections, nor between import and export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gist_jax import families
from gist_jax.errors import ConfigError
from gist_jax.families import TensorRule
from gist_jax.gist.config import CompressionConfig
from gist_jax.model.config import ModelConfig

GIST_PREFIX = "gist."
GIST_TOKEN = "<gist>"
SECTION = "gist"
FORMAT_VERSION = 1
_BASE_ATTN = "model.layers.{i}.self_attn."
_GIST_LAYER = "gist.layers.{i}."


def gist_rules(cfg: ModelConfig) -> list[TensorRule]:
    """Rules (``{i}`` unexpanded) for the gist parameters ``cfg`` has."""
    rules = []
    if cfg.num_gist_embeddings:
        rules.append(TensorRule("gist.embedding", ("gist_embedding",)))
    if cfg.gist_projections:
        for rule in families.family_for(cfg.family).rules(cfg):
            if rule.hf_name.startswith(_BASE_ATTN) and rule.path[2] in ("q_proj", "k_proj", "v_proj"):
                rules.append(dataclasses.replace(
                    rule, hf_name=rule.hf_name.replace(_BASE_ATTN, _GIST_LAYER),
                    path=(rule.path[0], "attn", "gist_" + rule.path[2], *rule.path[3:])))
    return rules


def all_rules(cfg: ModelConfig) -> list[TensorRule]:
    """Every tensor of an export: the family's base table, then the gist tensors."""
    return families.expand_rules(cfg) + families.expand(cfg, gist_rules(cfg))


def variant_name(comp: CompressionConfig) -> str:
    """The architecture's name (the ``experiments`` variant that builds it), for people: what an
    export does is read from the whole compression config it also carries."""
    if not comp.enabled:
        return "full"
    if comp.windowed:
        return "unigist"
    return f"{comp.granularity}_{comp.memory}".replace("coarse_recurrent", "coarse_rec")


def gist_section(cfg: ModelConfig, comp: CompressionConfig, gist_token_id: int | None) -> dict[str, Any]:
    """The ``gist`` entry of ``config.json``: the whole compression config (so an import
    restores it exactly) plus what inference needs and cannot derive: the gist embedding rows,
    the default inference ratio and the tokenizer id of the ``<gist>`` marker."""
    section = {"format_version": FORMAT_VERSION, "variant": variant_name(comp), **comp.to_dict()}
    section["ratios"] = list(comp.ratios)
    section.update(num_gist_embeddings=cfg.num_gist_embeddings, inference_ratio=comp.ratios[0],
                   gist_token_id=gist_token_id)
    return section


def compression_from_section(section: dict[str, Any]) -> CompressionConfig:
    """The ``CompressionConfig`` an export was written with."""
    if section.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"config.json gist.format_version={section.get('format_version')!r} is not "
                          f"{FORMAT_VERSION}; re-export with this version of gist_jax")
    fields = {f.name for f in dataclasses.fields(CompressionConfig)}
    kwargs: dict[str, Any] = {k: (tuple(v) if k == "ratios" else v) for k, v in section.items() if k in fields}
    return CompressionConfig(**kwargs)
