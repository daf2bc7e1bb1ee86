"""Gist parameters: how a compression config changes the model, their initialisation from
the base weights, and which leaves train under ``trainable``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gist_jax.errors import ConfigError
from gist_jax.gist.config import CompressionConfig
from gist_jax.model.config import ModelConfig
from gist_jax.model.transformer import Params

GIST_PARAM_NAMES = ("gist_embedding", "gist_q_proj", "gist_k_proj", "gist_v_proj")


def model_config_for(model: ModelConfig, comp: CompressionConfig) -> ModelConfig:
    """The model config with the gist parameters the compression config asks for."""
    if not comp.enabled:
        return model.replace(num_gist_embeddings=0, gist_projections=False)
    rows = 1 if comp.gist_embedding == "shared" else comp.max_gists_per_segment
    return model.replace(num_gist_embeddings=rows, gist_projections=comp.gist_projections)


def add_gist_params(params: Params, cfg: ModelConfig, eos_id: int | None = None) -> Params:
    """Base params + gist params initialised as the method says: every gist embedding row is
    the EOS embedding; gist q/k/v projections are copies of the base ones (biases too)."""
    params = dict(params)
    if cfg.num_gist_embeddings:
        eos_id = cfg.eos_token_id if eos_id is None else eos_id
        if eos_id is None:
            raise ConfigError("model.eos_token_id is unset; the gist embedding is initialised "
                              "from the EOS embedding, so set it (or pass eos_id)")
        row_E = params["embed"]["embedding"][eos_id]
        params["gist_embedding"] = jnp.broadcast_to(row_E, (cfg.num_gist_embeddings,) + row_E.shape)
    if cfg.gist_projections:
        layer_keys = ["layers"] if "layers" in params else [f"layers_{i}" for i in range(cfg.num_layers)]
        for key in layer_keys:
            layer = dict(params[key])
            attn = dict(layer["attn"])
            for proj in ("q_proj", "k_proj", "v_proj"):
                attn[f"gist_{proj}"] = jax.tree.map(jnp.copy, attn[proj])
            layer["attn"] = attn
            params[key] = layer
    return params


def is_gist_param(path: tuple) -> bool:
    names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    return any(n in GIST_PARAM_NAMES for n in names)


def trainable_mask(params: Params, comp: CompressionConfig) -> Params:
    """Tree of bools: True for leaves the optimizer updates."""
    if comp.trainable == "all":
        return jax.tree.map(lambda _: True, params)
    return jax.tree_util.tree_map_with_path(lambda path, _: is_gist_param(path), params)
