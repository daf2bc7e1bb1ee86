"""HF directories and GGUF files -> (ModelConfig, params) for gist_jax.

Both sources are reduced to "a transformers config dict plus a way to fetch a tensor by its
transformers name", then one function applies the family's name table. Missing tensors and
tensors nobody asked for are errors that list the names: silent partial loads are the most
common way conversions break.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from gist_jax import families
from gist_jax.errors import ConfigError
from gist_jax.model.config import ModelConfig
from gist_jax.model.transformer import Params, to_layout
from gist_jax.utils.progress import progress

if TYPE_CHECKING:  # imported where used: the plain importer needs no gist code
    from gist_jax.gist.config import CompressionConfig


class CheckpointMismatch(ValueError):
    """The tensors on disk do not match what the config says the model has."""


def params_from_hf_tensors(cfg: ModelConfig, get: Callable[[str], np.ndarray],
                           available: Iterable[str], rules: list | None = None,
                           desc: str = "converting tensors") -> Params:
    """Apply the family's name table (or ``rules``: the table plus gist tensors, see
    ``gist_names.all_rules``); returns params in ``cfg``'s layer layout (host numpy). A progress
    bar ``desc`` counts the tensors: reading a sharded checkpoint tensor by tensor takes minutes."""
    available = set(available)
    rules = families.expand_rules(cfg) if rules is None else rules
    missing = [r.hf_name for r in rules if r.hf_name not in available]
    if missing:
        raise CheckpointMismatch(
            f"{len(missing)} tensors the {cfg.family} config needs are missing, e.g. "
            f"{missing[:8]}; the checkpoint and config.json disagree")
    wanted = {r.hf_name for r in rules}
    ignored = families.family_for(cfg.family).ignored_suffixes
    if cfg.tie_embeddings:
        ignored = ignored + ("lm_head.weight",)  # some tied checkpoints store the copy too
    unexpected = sorted(n for n in available - wanted if not n.endswith(ignored))
    if unexpected:
        raise CheckpointMismatch(
            f"{len(unexpected)} tensors are not used by the {cfg.family} mapping, e.g. "
            f"{unexpected[:8]}; refusing a partial import")

    params: dict[str, Any] = {}
    for rule in progress(rules, desc=desc, unit="tensor"):
        hf_array = np.asarray(get(rule.hf_name))
        ours = families.TRANSFORMS[rule.transform].to_ours(hf_array, families.head_count(cfg, rule))
        node = params
        for key in rule.path[:-1]:
            node = node.setdefault(key, {})
        node[rule.path[-1]] = np.ascontiguousarray(ours.astype(cfg.storage_dtype))
    return to_layout(params, cfg)


def read_hf_config(directory: str | pathlib.Path) -> dict[str, Any]:
    """``config.json`` of an HF directory; ``ConfigError`` naming the path when the directory, the
    file or valid JSON is missing (instead of a bare ``FileNotFoundError`` traceback)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"HF directory {str(directory)!r} does not exist; give a directory with config.json "
                          "and *.safetensors (a save_pretrained output)")
    path = directory / "config.json"
    if not path.is_file():
        raise ConfigError(f"{str(directory)!r} has no config.json: not a Hugging Face model directory; give "
                          "a save_pretrained output")
    try:
        hf_config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({e}); re-download or re-save the model") from None
    if not isinstance(hf_config, dict):
        raise ConfigError(f"{str(path)!r} holds a {type(hf_config).__name__}, not a config object; re-save the model")
    return hf_config


def check_hf_weights(directory: str | pathlib.Path) -> None:
    """The safetensors files ``SafetensorsCheckpoint`` will open exist and their headers are valid
    (``hf.safetensors_io.read_header``: bounds, dtypes, shapes, contiguous offsets); only headers
    are read. ``ConfigError`` naming the file otherwise, before anything is loaded or written."""
    from gist_jax.hf.safetensors_io import SafetensorsCheckpoint

    SafetensorsCheckpoint(directory)


def model_config_from_hf(hf_config: dict[str, Any], source: str | pathlib.Path, **overrides: Any) -> ModelConfig:
    """``families.config_from_hf``, with a key the family needs but ``source`` lacks reported as
    ``ConfigError`` naming the file and the key (not a ``KeyError`` traceback)."""
    try:
        return families.config_from_hf(hf_config, **overrides)
    except KeyError as e:
        raise ConfigError(f"{str(source)!r} has no {e.args[0]!r}, which a {hf_config.get('model_type')!r} config "
                          "needs; re-download or re-save the model") from None


def hf_model_config(directory: str | pathlib.Path, **overrides: Any) -> ModelConfig:
    """The ModelConfig of an HF directory from ``config.json`` alone, its weight files checked
    for presence: what start-up checks need to know before any tensor is read."""
    cfg = model_config_from_hf(read_hf_config(directory), pathlib.Path(directory) / "config.json", **overrides)
    check_hf_weights(directory)
    return cfg


def load_hf_dir(directory: str | pathlib.Path, **overrides: Any) -> tuple[ModelConfig, Params]:
    """Local HF directory (config.json + safetensors, sharded or not) -> (config, params)."""
    from gist_jax.hf.safetensors_io import SafetensorsCheckpoint

    directory = pathlib.Path(directory)
    hf_config = read_hf_config(directory)
    cfg = model_config_from_hf(hf_config, directory / "config.json", **overrides)
    ckpt = SafetensorsCheckpoint(directory)  # every header validated before a tensor is read
    keys = ckpt.keys()
    if "gist" in hf_config:  # a gist_jax export: the base model only (load_gist_hf_dir keeps the gists)
        keys = [k for k in keys if not k.startswith("gist.")]
    return cfg, params_from_hf_tensors(cfg, ckpt.get, keys, desc=f"reading {directory.name}")


def load_gist_hf_dir(directory: str | pathlib.Path,
                     **overrides: Any) -> tuple[ModelConfig, CompressionConfig, Params]:
    """A gist_jax export (``gist_jax.hf.export``) -> (gist model config, CompressionConfig,
    params with the gist embedding and projections). A directory without a ``gist`` section
    gives ``memory='none'`` and the plain model."""
    from gist_jax.gist.config import CompressionConfig
    from gist_jax.gist.params import model_config_for
    from gist_jax.hf import gist_names
    from gist_jax.hf.safetensors_io import SafetensorsCheckpoint

    directory = pathlib.Path(directory)
    hf_config = read_hf_config(directory)
    section = hf_config.get(gist_names.SECTION)
    comp = (gist_names.compression_from_section(section) if section
            else CompressionConfig(memory="none", ratios=(1,), ratio_sampling="fixed", num_sinks=0))
    cfg = model_config_for(model_config_from_hf(hf_config, directory / "config.json", **overrides), comp)
    ckpt = SafetensorsCheckpoint(directory)
    return cfg, comp, params_from_hf_tensors(cfg, ckpt.get, ckpt.keys(), gist_names.all_rules(cfg),
                                             desc=f"reading {directory.name}")


def load_gguf(path: str | pathlib.Path, **overrides: Any) -> tuple[ModelConfig, Params]:
    """GGUF file (any quantisation the ``gguf`` package dequantises) -> (config, params)."""
    from gist_jax.hf.gguf import read_gguf

    contents = read_gguf(path)
    cfg = model_config_from_hf(contents.hf_config, path, **overrides)
    state = contents.state_dict
    return cfg, params_from_hf_tensors(cfg, state.__getitem__, state.keys())


def base_model_config(model_section: dict[str, Any]) -> ModelConfig:
    """The base ModelConfig a run's ``model`` section names (``model.init``: ``preset:``,
    ``gguf:``, ``hf:`` or a converted params directory), with its dtype overrides, without
    reading any weights. Checkpoint readers rebuild a trained model's config from it."""
    kind, where = model_section["init"].split(":", 1)
    if kind == "preset":
        from gist_jax.model.config import preset

        cfg = preset(where)
    elif kind == "gguf":
        import gguf

        from gist_jax.hf.gguf import hf_config_from_metadata, smollm2_gguf_path

        reader = gguf.GGUFReader(str(smollm2_gguf_path() if where == "smollm2" else where))
        metadata = {k: f.contents() for k, f in reader.fields.items()}
        cfg = families.config_from_hf(hf_config_from_metadata(metadata, [t.name for t in reader.tensors]))
    elif kind == "hf":
        cfg = families.config_from_hf(json.loads((pathlib.Path(where) / "config.json").read_text()))
    else:
        from gist_jax.model.params_io import CONFIG_FILE

        cfg = ModelConfig.from_dict(json.loads((pathlib.Path(where) / CONFIG_FILE).read_text())["model"])
    overrides = {k: model_section[k] for k in ("dtype", "param_dtype") if model_section.get(k)}
    return cfg.replace(**overrides)
