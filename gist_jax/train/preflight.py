"""Start-up checks of everything a run names on disk, before anything heavy loads.

``check_paths`` runs after the config is validated and before ``train()``: it reads headers and
directory listings only (no weights, no tensorflow, no tokenizer build), so a missing model
directory, a truncated GGUF download, a corpus glob that matches nothing or a read-only workdir
fail in a second with one line naming the key and the file, and with nothing written to the
workdir, instead of a traceback minutes later (or after ``config.json`` is already there).

Each check raises ``ConfigError`` as ``<key>=<value>: <what is wrong>; <the fix>``. What a
check calls is the same code the loaders use to read the header or config (``read_gguf_header``,
``read_hf_config``, ``read_params_config``), so the two cannot disagree about what a valid input is.
"""

from __future__ import annotations

import functools
import os
import pathlib
import stat
from collections.abc import Sequence
from typing import Any

from gist_jax.errors import ConfigError
from gist_jax.model.config import ModelConfig, preset
from gist_jax.train.experiment import ModelSection, RunConfig, check_model_matches_run
from gist_jax.train.objectives import objectives


def check_paths(run: RunConfig, workdir: str | os.PathLike, argv: Sequence[str] | None = None) -> None:
    """Every path-bearing key of ``run`` and the workdir; ``ConfigError`` for the first bad one.

    Where the model's config is known without loading weights (all four ``model.init`` kinds),
    the checks that need the model's shape (``check_model_matches_run``) run here too, and so
    does the check of precomputed TIE weights against the run (``argv``: the command line, whose
    ``--config`` and overrides make the scoring command a refusal suggests).
    """
    check_workdir(workdir)
    check_cache_dir(run)
    model_cfg = model_config_before_loading(run.model)
    check_model_matches_run(model_cfg, run)
    check_tokenizer(run.data.tokenizer)
    for spec, _ in run.data.sources:
        check_source(spec)
    check_tie_weights(run, model_cfg, argv)


# -- objective.tie_source=precomputed ----------------------------------------------------------------
def check_tie_weights(run: RunConfig, model_cfg: ModelConfig, argv: Sequence[str] | None = None) -> None:
    """With precomputed TIE: the weights file exists, is complete, was made for this run's data
    stream, token stores, reference model and TIE settings, and holds a row for every sequence the
    run will train on (``train/tie_store.py check_weights``: sidecar and file stats only, no
    weights are read). The loop checks again against the opened stores (one not built yet is
    skipped here)."""
    from gist_jax.train import tie_store

    if objectives(run.step, run.compression).tie_precomputed:
        tie_store.check_weights(run, model_cfg, fix=tie_store.fix_command(argv))


# -- workdir ----------------------------------------------------------------------------------------
def check_workdir(workdir: str | os.PathLike) -> None:
    """The workdir is a directory, or can be created as one, and is writable. Nothing is created
    here: a run refused by a later check leaves no trace.

    A URL must be a ``gs://<bucket>/...`` with the modules to reach it installed
    (``utils/bucket.py``); the bucket itself is first contacted when ``train()`` takes its lock.
    """
    from gist_jax.utils import bucket

    if bucket.is_url(workdir):
        bucket.check_url("--workdir", workdir)
    else:
        check_writable_dir("--workdir", workdir)


def check_cache_dir(run: RunConfig) -> None:
    """``data.cache_dir`` is a directory (or can be one); it must be writable only when a token
    store the run reads is not built yet: a shared, read-only cache of tokenised corpora is fine."""
    from gist_jax.data.store import store_key

    data = run.data
    splits = {data.train_split}
    if (run.train.eval_every or run.train.eval_at_start) and run.train.eval_batches:
        splits.add(data.eval_split)
    cache = pathlib.Path(data.cache_dir).expanduser()
    built = all((cache / store_key(spec, split, data.tokenizer, data.max_documents) / "meta.json").exists()
                for spec, _ in data.sources for split in splits)
    check_writable_dir("data.cache_dir", cache, writable=not built)


def check_writable_dir(key: str, directory: str | os.PathLike, writable: bool = True) -> None:
    """``directory`` exists as a directory, or can be created as one under its nearest existing
    ancestor, and (``writable``) may be written; checked with ``os.access`` and the mode bits,
    without writing anything."""
    path = pathlib.Path(directory).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={directory}: is a file, not a directory; give a directory (it is created "
                          "if missing)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={directory}: {existing} is a file, so the directory cannot be created; give a "
                          "path under a directory")
    if writable and not _writable(existing):
        where = "is read-only" if existing == path else f"cannot be created: {existing} is read-only"
        raise ConfigError(f"{key}={directory}: {where}; give a writable directory or change its permissions")


def _writable(directory: pathlib.Path) -> bool:
    """Writable by this process; a directory whose mode grants write to nobody also counts as
    read-only, even for root (who may write anyway): it was made read-only on purpose, e.g. a
    finished run kept for reference, and a run must not resume into it."""
    return os.access(directory, os.W_OK | os.X_OK) and bool(stat.S_IMODE(directory.stat().st_mode) & 0o222)


# -- model.init -------------------------------------------------------------------------------------
def model_config_before_loading(section: ModelSection) -> ModelConfig:
    """The base model's config from what ``model.init`` names, read from headers only: the preset
    table, a GGUF header, an HF ``config.json``, a params checkpoint's ``model_config.json``.
    ``ConfigError`` prefixed with the key when the source is missing, incomplete or damaged."""
    kind, where = section.init.split(":", 1)
    try:
        if kind == "preset":
            return preset(where)
        if kind == "gguf":
            from gist_jax.hf.importer import model_config_from_hf

            path = _gguf_path(where)
            return model_config_from_hf(_gguf_header(path).hf_config(), path)
        if kind == "hf":
            from gist_jax.hf.importer import hf_model_config

            return hf_model_config(where)
        from gist_jax.model.params_io import read_params_config

        return read_params_config(where)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, or e.g. a GGUF architecture no family maps
        raise ConfigError(f"model.init={section.init!r}: {e}") from None


def _gguf_path(where: str) -> pathlib.Path:
    if where == "smollm2":
        from gist_jax.hf.gguf import smollm2_gguf_path

        return smollm2_gguf_path()  # FileNotFoundError with the pip command when the package is missing
    return pathlib.Path(where).expanduser()


@functools.lru_cache(maxsize=8)
def _gguf_header(path: pathlib.Path) -> Any:
    """One header walk per file and process: model.init and data.tokenizer often name the same file."""
    from gist_jax.hf.gguf import read_gguf_header

    return read_gguf_header(path)


# -- data.tokenizer ---------------------------------------------------------------------------------
def check_tokenizer(spec: str, key: str = "data.tokenizer") -> None:
    """What ``tokenizer_from_spec(spec)`` will open exists (the tokenizer is not built)."""
    from gist_jax.data.tokenizer import split_tokenizer_spec
    from gist_jax.model.params_io import TOKENIZER_DIR

    try:
        kind, arg = split_tokenizer_spec(spec)
        if kind == "gguf":
            _gguf_header(_gguf_path(arg))
        elif kind == "hf":
            _require_file(pathlib.Path(arg).expanduser(), "tokenizer.json", "a Hugging Face model or tokenizer "
                          "directory (save_pretrained output)")
        elif kind == "sentencepiece":
            _require_file(pathlib.Path(arg).expanduser(), None, "a SentencePiece .model file")
        elif kind == "checkpoint":
            _require_file(pathlib.Path(arg).expanduser() / TOKENIZER_DIR, "tokenizer.json",
                          "a gist_jax params checkpoint (gist_jax.convert --out) or export with a tokenizer")
    except (ValueError, FileNotFoundError) as e:  # ValueError: ConfigError or an unknown spec form
        raise ConfigError(f"{key}={spec!r}: {e}") from None


def _require_file(path: pathlib.Path, name: str | None, what: str) -> None:
    """``path`` is a file (``name`` None) or a directory holding the file ``name``."""
    if name is None:
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} does not exist or is not a file; give {what}")
    elif not (path / name).is_file():
        missing = "does not exist" if not path.exists() else f"has no {name}"
        raise FileNotFoundError(f"{str(path)!r} {missing}; give {what}")


# -- data.sources -----------------------------------------------------------------------------------
def check_source(spec: str) -> None:
    """Local corpora named by ``spec`` exist: every ``files:``/``jsonl:`` pattern (a synthetic
    source's haystack included) matches a file, a ``tfds:...@<dir>`` data directory exists, a
    synthetic source's own tokenizer can be opened."""
    from gist_jax.data.sources import matches_any_file, parse_source_spec

    parsed = parse_source_spec(spec)  # DataConfig already parsed it: this cannot fail
    if parsed.kind == "synthetic" and parsed.synthetic is not None:
        check_source(parsed.synthetic.haystack)
        if parsed.synthetic.tokenizer:
            check_tokenizer(parsed.synthetic.tokenizer, key=f"data.sources={spec!r}: tokenizer")
    for pattern in parsed.patterns:
        if not matches_any_file(pattern):
            raise ConfigError(f"data.sources={spec!r}: {pattern!r} matches no file (relative paths are from "
                              f"{os.getcwd()}); check the path or glob")
    if parsed.data_dir and "://" not in parsed.data_dir and not pathlib.Path(parsed.data_dir).expanduser().is_dir():
        raise ConfigError(f"data.sources={spec!r}: tfds data_dir {parsed.data_dir!r} does not exist; prepare the "
                          "dataset there first (e.g. gist_jax.data.local_text_builder.build_local_text)")
