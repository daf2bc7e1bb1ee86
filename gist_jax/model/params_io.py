"""Parameter checkpoints: an Orbax PyTree plus the model config and tokenizer next to it.

This is what the converters write and what training starts from. The layout (scanned or not,
family, dtype) is recorded in ``model_config.json`` and restored params are converted to the
layout the caller asks for, so a checkpoint written unscanned can feed a scanned run.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax

from gist_jax.errors import ConfigError
from gist_jax.model.config import ModelConfig
from gist_jax.model.transformer import Params, to_layout

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


def save_params(directory: str | pathlib.Path, cfg: ModelConfig, params: Params,
                tokenizer: Any | None = None) -> pathlib.Path:
    """Write params (Orbax), then the config last: a directory without the config is
    incomplete and ``load_params`` refuses it."""
    directory = pathlib.Path(directory).absolute()
    check_out_dir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    import orbax.checkpoint as ocp  # local: reading a checkpoint's config (start-up checks) needs no Orbax

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    if tokenizer is not None:
        tokenizer.save_pretrained(directory / TOKENIZER_DIR)
    meta = {"format_version": FORMAT_VERSION, "model": cfg.to_dict(),
            "layout": {"scan_layers": "layers" in params}}
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    tmp.rename(directory / CONFIG_FILE)
    return directory


def check_out_dir(directory: str | pathlib.Path) -> None:
    """``directory`` can take a new checkpoint: it holds none yet and is not a file.
    ``FileExistsError`` otherwise (a converter checks before loading anything)."""
    directory = pathlib.Path(directory).absolute()
    if (directory / CONFIG_FILE).exists():
        raise FileExistsError(f"{directory} already holds a checkpoint; choose another --out")
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"--out={directory} is a file; give a directory (it is created if missing)")


def read_params_config(directory: str | pathlib.Path) -> ModelConfig:
    """The saved model config (in the saved layout) of a params checkpoint, without touching the
    params: what ``load_params`` restores into, and what start-up checks read to know the model
    before anything loads. ``FileNotFoundError`` when it is not a complete checkpoint,
    ``ConfigError`` when its config is damaged."""
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist; give a gist_jax.convert --out directory")
    if not (directory / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: not a gist_jax params "
                                "checkpoint, or one whose save did not finish")
    if not (directory / PARAMS_DIR).is_dir():
        raise FileNotFoundError(f"{directory} has no {PARAMS_DIR}/ next to its {CONFIG_FILE}: the checkpoint is "
                                "incomplete; convert the model again")
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
        saved_cfg = ModelConfig.from_dict(meta["model"])
        return saved_cfg.replace(scan_layers=meta["layout"]["scan_layers"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{directory / CONFIG_FILE} is damaged ({type(e).__name__}: {e}); convert the "
                          "model again") from None


def load_params(directory: str | pathlib.Path, **overrides: Any) -> tuple[ModelConfig, Params]:
    """Restore (config, params) on the host; ``overrides`` change e.g. dtype or scan_layers."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    saved_cfg = read_params_config(directory)
    abstract = jax.eval_shape(lambda: _abstract_params(saved_cfg))
    params = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR, abstract)
    cfg = saved_cfg.replace(**overrides)
    return cfg, to_layout(params, cfg)


def _abstract_params(cfg: ModelConfig) -> Params:
    from gist_jax.model.transformer import init_params

    return init_params(cfg, jax.random.key(0))
