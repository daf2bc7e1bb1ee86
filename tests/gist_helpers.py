"""Tiny gist models shared by the compression tests."""

from __future__ import annotations

import functools

import jax

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.params import add_gist_params, model_config_for
from gist_jax.model.config import ModelConfig, preset
from gist_jax.model.kernels import with_gist_kernel
from gist_jax.model.transformer import init_params

BASE = preset("tiny", eos_token_id=3, num_layers=2)


def comp_config(memory: str, granularity: str, positions: str = "compressed", sinks: int = 0,
                ratio: int = 4, segment_length: int = 8, **kw) -> CompressionConfig:
    return CompressionConfig(memory=memory, granularity=granularity, segment_length=segment_length,
                             ratios=(ratio,), ratio_sampling="fixed", num_sinks=sinks,
                             positions=positions, **kw)


def gist_kernel(cfg: ModelConfig, gist: str) -> ModelConfig:
    """``cfg`` with the gist-structure part of ``model.attention`` set to ``gist`` (``auto``,
    ``dense`` or a gist kernel), its causal part kept: ``dense`` here makes only the gist pass the
    reference, where ``attention='dense'`` would make both passes dense."""
    return cfg.replace(attention=with_gist_kernel(cfg.attention, gist))


@functools.cache
def model(comp: CompressionConfig, seed: int = 0):
    """(model config, params) with gist params; base weights perturbed so gists differ from EOS."""
    cfg = model_config_for(BASE, comp)
    params = add_gist_params(init_params(BASE, jax.random.key(seed)), cfg)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return cfg, jax.tree.unflatten(tree, leaves)


def tokens(batch: int, n: int, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, n), 0, BASE.vocab_size)
