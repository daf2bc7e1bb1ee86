"""HF directories and GGUF files -> (ModelConfig, params) for gist_jax.

Both sources are reduced to "a transformers config dict plus a way to fetch a tensor by its
transformers name", then one function applies the family's name table. Missing tensors and
tensors nobody asked for are errors that list the names: silent partial loads are the most
common way conversions break.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Iterable

import numpy as np

from gist_jax.hf import families
from gist_jax.model.config import ModelConfig
from gist_jax.model.transformer import Params, to_layout


class CheckpointMismatch(ValueError):
    """The tensors on disk do not match what the config says the model has."""


def params_from_hf_tensors(cfg: ModelConfig, get: Callable[[str], np.ndarray],
                           available: Iterable[str], rules: list | None = None) -> Params:
    """Apply the family's name table (or ``rules``: the table plus gist tensors, see
    ``gist_names.all_rules``); returns params in ``cfg``'s layer layout (host numpy)."""
    available = set(available)
    rules = families.expand_rules(cfg) if rules is None else rules
    missing = [r.hf_name for r in rules if r.hf_name not in available]
    if missing:
        raise CheckpointMismatch(
            f"{len(missing)} tensors the {cfg.family} config needs are missing, e.g. "
            f"{missing[:8]}; the checkpoint and config.json disagree")
    wanted = {r.hf_name for r in rules}
    ignored = families.FAMILIES[cfg.family].ignored_suffixes
    if cfg.tie_embeddings:
        ignored = ignored + ("lm_head.weight",)  # some tied checkpoints store the copy too
    unexpected = sorted(n for n in available - wanted if not n.endswith(ignored))
    if unexpected:
        raise CheckpointMismatch(
            f"{len(unexpected)} tensors are not used by the {cfg.family} mapping, e.g. "
            f"{unexpected[:8]}; refusing a partial import")

    params: dict[str, Any] = {}
    for rule in rules:
        hf_array = np.asarray(get(rule.hf_name))
        ours = families.TRANSFORMS[rule.transform].to_ours(hf_array, families.head_count(cfg, rule))
        node = params
        for key in rule.path[:-1]:
            node = node.setdefault(key, {})
        node[rule.path[-1]] = np.ascontiguousarray(ours.astype(cfg.storage_dtype))
    return to_layout(params, cfg)


def load_hf_dir(directory: str | pathlib.Path, **overrides: Any) -> tuple[ModelConfig, Params]:
    """Local HF directory (config.json + safetensors, sharded or not) -> (config, params)."""
    from gist_jax.hf.safetensors_io import SafetensorsCheckpoint

    directory = pathlib.Path(directory)
    hf_config = json.loads((directory / "config.json").read_text())
    cfg = families.config_from_hf(hf_config, **overrides)
    ckpt = SafetensorsCheckpoint(directory)
    keys = ckpt.keys()
    if "gist" in hf_config:  # a gist_jax export: the base model only (load_gist_hf_dir keeps the gists)
        keys = [k for k in keys if not k.startswith("gist.")]
    return cfg, params_from_hf_tensors(cfg, ckpt.get, keys)


def load_gist_hf_dir(directory: str | pathlib.Path, **overrides: Any):
    """A gist_jax export (``gist_jax.hf.export``) -> (gist model config, CompressionConfig,
    params with the gist embedding and projections). A directory without a ``gist`` section
    gives ``memory='none'`` and the plain model."""
    from gist_jax.gist.config import CompressionConfig
    from gist_jax.gist.params import model_config_for
    from gist_jax.hf import gist_names
    from gist_jax.hf.safetensors_io import SafetensorsCheckpoint

    directory = pathlib.Path(directory)
    hf_config = json.loads((directory / "config.json").read_text())
    section = hf_config.get(gist_names.SECTION)
    comp = (gist_names.compression_from_section(section) if section
            else CompressionConfig(memory="none", ratios=(1,), ratio_sampling="fixed", num_sinks=0))
    cfg = model_config_for(families.config_from_hf(hf_config, **overrides), comp)
    ckpt = SafetensorsCheckpoint(directory)
    return cfg, comp, params_from_hf_tensors(cfg, ckpt.get, ckpt.keys(), gist_names.all_rules(cfg))


def load_gguf(path: str | pathlib.Path, **overrides: Any) -> tuple[ModelConfig, Params]:
    """GGUF file (any quantisation the ``gguf`` package dequantises) -> (config, params)."""
    from gist_jax.hf.gguf import read_gguf

    contents = read_gguf(path)
    cfg = families.config_from_hf(contents.hf_config, **overrides)
    state = contents.state_dict
    return cfg, params_from_hf_tensors(cfg, state.__getitem__, state.keys())
