"""Precomputed TIE weights on disk (method.md section 4.2, ``objective.tie_source=precomputed``).

Online TIE runs two forwards of the frozen reference model inside every step. The weights they
give depend only on the sequence, the reference model and four settings (segment length, gamma,
rescale, whether segment 0 carries loss), so they can be computed once
(``python -m gist_jax.train.tie_precompute``) and read with the tokens.

Storage unit: row g of the file is global sequence g of the training stream, the sequence the
loader puts in row ``g % B`` of step ``g // B`` (``gist_jax/data/loader.py``: an endless stream of
packed epochs, a pure function of the data config and ``step.seq_len``, independent of the batch
size). The file holds rows ``0 .. R-1`` as float32 ``[R, seq_len]`` (``.npy``, memory-mapped:
each process reads only its own rows); any run of the same stream with ``steps x batch <= R``
can use it, and resume needs nothing: row g is row g.

What the weights were made for is recorded in a ``.json`` sidecar as flat ``identity`` fields
named like config keys (``data.packing``, ``step.seq_len``, ``compression.segment_length``,
``objective.tie_gamma``, ``reference.weights``, ``token store <dir>`` ...). A run that asks for
precomputed weights compares them with its own before anything loads (``check_weights``, called
from ``train/preflight.py``) and is refused in one line naming the file, every field that
differs and the command that rewrites it. The reference model is identified by its config and a
content hash of its weight files (random init: the preset and ``step.seed``); the hash is
memoised in the sidecar by (path, size, mtime), so a start-up hashes nothing unless the files
changed. Token stores are identified by their directory, document and token counts and a hash of
their document offsets (what the packing reads), not by hashing the tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gist_jax.errors import ConfigError

if TYPE_CHECKING:
    from gist_jax.data.store import TokenStore
    from gist_jax.model.config import ModelConfig
    from gist_jax.train.experiment import RunConfig

FORMAT = 1
COMMAND = "python -m gist_jax.train.tie_precompute"
KEY = "objective.tie_weights_path"
# Model config fields that say how the model runs, not what it computes.
# (``attention_impl``: the name ``attention`` had in stores made before it replaced it.)
_EXECUTION_FIELDS = ("scan_layers", "remat_policy", "attention", "attention_impl")


# -- where ------------------------------------------------------------------------------------------
def stream_fields(run: RunConfig) -> dict[str, Any]:
    """What the sequences depend on: the data config (not where it is cached, nor the eval split)
    and the sequence length. JSON-normalised so a sidecar's values compare equal."""
    data = run.data.fingerprint_fields()
    data.pop("eval_split")
    fields = {f"data.{k}": v for k, v in data.items()}
    fields["step.seq_len"] = run.step.seq_len
    return json.loads(json.dumps(fields))


def default_path(run: RunConfig) -> pathlib.Path:
    """``<data.cache_dir>/tie_weights/<sources>.<split>.<seq_len>-<hash of the stream>.npy``:
    beside the token stores, one file per data stream (a rescore with other TIE settings or
    another model replaces it, and a run with the old settings is then refused, not misled)."""
    digest = hashlib.sha1(json.dumps(stream_fields(run), sort_keys=True).encode()).hexdigest()[:12]
    sources = "+".join(spec for spec, _ in run.data.sources)
    readable = "".join(c if c.isalnum() else "_" for c in f"{sources}.{run.data.train_split}")[:48]
    return pathlib.Path(run.data.cache_dir).expanduser() / "tie_weights" / f"{readable}.{run.step.seq_len}-{digest}.npy"


def weights_path(run: RunConfig) -> pathlib.Path:
    path = run.step.objective.tie_weights_path
    return pathlib.Path(path).expanduser() if path else default_path(run)


def sidecar_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_suffix(".json")


def fix_command(argv: Sequence[str] | None) -> str:
    """The scoring command for the run typed as ``argv`` (its ``--config`` and overrides, not
    ``--workdir``): what a refusal tells the user to run."""
    if not argv:
        return f"{COMMAND} --config <the run's FILE.py[:VARIANTS]> [its --config.<key>=<value> overrides]"
    kept, args = [], list(argv)
    for i, arg in enumerate(args):
        if arg.lstrip("-").split("=", 1)[0] == "config" or arg.lstrip("-").startswith("config."):
            kept.append(arg if "=" in arg or i + 1 >= len(args) else f"{arg}={args[i + 1]}")
    return " ".join([COMMAND, *kept])


# -- identity ---------------------------------------------------------------------------------------
def objective_fields(run: RunConfig) -> dict[str, Any]:
    """The settings of ``compute_tie_weights`` and of the loss mask it normalises over."""
    obj = run.step.objective
    return {"compression.segment_length": run.compression.segment_length, "objective.tie_gamma": float(obj.tie_gamma),
            "objective.tie_rescale": bool(obj.tie_rescale),
            "objective.include_first_segment": bool(obj.include_first_segment)}


def store_fields(run: RunConfig, stores: Sequence[TokenStore] | None = None) -> dict[str, str | None]:
    """``token store <dir>`` -> its fingerprint, for each train-split store the stream reads;
    None for a store not built yet, or damaged (the check then leaves it to the loader, which
    builds or rebuilds it, or refuses it in one line)."""
    from gist_jax.data.store import DamagedStore, TokenStore, store_key

    data, out = run.data, {}
    for i, (spec, _) in enumerate(data.sources):
        path = pathlib.Path(data.cache_dir).expanduser() / store_key(spec, data.train_split, data.tokenizer,
                                                                    data.max_documents)
        store = stores[i] if stores is not None else None
        if stores is None and (path / "meta.json").exists():
            try:
                store = TokenStore.open(path)
            except DamagedStore:
                store = None
        out[f"token store {path.name}"] = None if store is None else (
            f"{store.num_documents} documents, {store.num_tokens} tokens, offsets sha1 "
            f"{hashlib.sha1(np.ascontiguousarray(store.offsets).tobytes()).hexdigest()[:16]}")
    return out


def reference_model_fields(run: RunConfig, model_cfg: ModelConfig) -> dict[str, Any]:
    """``reference.<field>`` of the base model's config as the run computes with it (the
    ``model.dtype`` / ``param_dtype`` overrides applied, execution-only fields left out).
    ``model_cfg``: the config read before loading (``preflight.model_config_before_loading``),
    which every caller uses, so the scorer and the check cannot disagree."""
    overrides = {k: getattr(run.model, k) for k in ("dtype", "param_dtype") if getattr(run.model, k)}
    cfg = model_cfg.replace(**overrides).to_dict()
    return json.loads(json.dumps({f"reference.{k}": v for k, v in cfg.items() if k not in _EXECUTION_FIELDS}))


def weight_files(init: str) -> list[pathlib.Path]:
    """The files ``model.init`` reads its weights from (none for a preset's random init)."""
    kind, where = init.split(":", 1)
    if kind == "preset":
        return []
    if kind == "gguf":
        from gist_jax.hf.gguf import smollm2_gguf_path

        return [smollm2_gguf_path() if where == "smollm2" else pathlib.Path(where).expanduser()]
    root = pathlib.Path(where).expanduser()
    if kind == "hf":
        return sorted(p for p in root.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name in (
            "config.json", "model.safetensors.index.json")))
    return sorted(p for p in root.rglob("*") if p.is_file())  # params:<dir>: config and the Orbax arrays


_DIGESTS: dict[tuple, str] = {}  # per process: preflight and the loop check the same files


def _file_stats(files: list[pathlib.Path]) -> list[list[Any]]:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def weights_digest(run: RunConfig, memo: dict[str, Any] | None = None) -> tuple[str, list[list[Any]]]:
    """(the reference weights' identity, the (path, size, mtime) of their files). ``memo``: a
    sidecar's ``reference_files`` and ``identity``; when the files are unchanged since it was
    written its digest is reused instead of hashing gigabytes at every start."""
    if run.model.init.startswith("preset:"):
        return f"random init of {run.model.init} with step.seed={run.step.seed}", []
    files = weight_files(run.model.init)
    stats = _file_stats(files)
    key = tuple(tuple(s) for s in stats)
    if memo and memo.get("reference_files") == stats and memo.get("identity", {}).get("reference.weights"):
        return memo["identity"]["reference.weights"], stats
    if key not in _DIGESTS:
        h = hashlib.sha256()
        for path in files:
            h.update(path.name.encode() + b"\0")
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        _DIGESTS[key] = f"sha256 {h.hexdigest()[:32]} of {len(files)} file(s) of model.init"
    return _DIGESTS[key], stats


def identity(run: RunConfig, model_cfg: ModelConfig, stores: Sequence[TokenStore] | None = None,
             memo: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[list[Any]]]:
    """(every field the weights depend on, the reference files' stats for the sidecar's memo)."""
    digest, stats = weights_digest(run, memo)
    fields = {**stream_fields(run), **store_fields(run, stores), **objective_fields(run),
              **reference_model_fields(run, model_cfg), "reference.weights": digest}
    return fields, stats


def differences(recorded: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """``"<field> <file's value> (file) vs <run's value> (run)"`` for each field that differs;
    a field the run cannot know yet (an unbuilt store: None) is skipped."""
    out = []
    for key in sorted(set(recorded) | set(expected)):
        want = expected.get(key, "absent")
        if want is not None and recorded.get(key, "absent") != want:
            out.append(f"{key} {recorded.get(key, 'absent')!r} (file) vs {want!r} (run)")
    return out


# -- reading ----------------------------------------------------------------------------------------
def read_sidecar(path: pathlib.Path, where: str, fix: str) -> dict[str, Any]:
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: its sidecar {side} is missing (an unfinished write?); write the weights "
                          f"again: {fix}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: its sidecar {side} is unreadable ({type(e).__name__}: {e}); write the "
                          f"weights again: {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("identity"), dict):
        raise ConfigError(f"{where}: its sidecar {side} is not a format-{FORMAT} TIE weights record; write the "
                          f"weights again: {fix}")
    return meta


def check_weights(run: RunConfig, model_cfg: ModelConfig, stores: Sequence[TokenStore] | None = None,
                  fix: str | None = None) -> tuple[pathlib.Path, dict[str, Any]]:
    """(path, sidecar) of the run's precomputed weights; ``ConfigError`` in one line naming the
    file, what differs and ``fix`` (the scoring command) when they are missing, incomplete, made
    for another stream, store, model or TIE setting, or too short for the run's steps."""
    fix = fix or fix_command(None)
    path = weights_path(run)
    where = f"{KEY}={run.step.objective.tie_weights_path}" if run.step.objective.tie_weights_path else \
        f"precomputed TIE weights {path}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file (objective.tie_source='precomputed' reads the weights from it); "
                          f"write them first: {fix}")
    meta = read_sidecar(path, where, fix)
    expected, _ = identity(run, model_cfg, stores, memo=meta)
    diff = differences(meta["identity"], expected)
    if diff:
        raise ConfigError(f"{where} was made for another run: {'; '.join(diff)}; rewrite it for this run: {fix}")
    need = run.num_steps * run.step.batch_size
    if int(meta.get("rows", 0)) < need:
        raise ConfigError(f"{where} holds {meta.get('rows')} sequences but the run needs {need} ({run.num_steps} "
                          f"steps x step.batch_size={run.step.batch_size}); score more: {fix} --sequences {need}")
    return path, meta


class WeightRows:
    """The loader's ``tie_weights`` source: global sequence indices -> float32 [n, seq_len] rows
    of the memory-mapped file (each process touches only the rows it asks for)."""

    def __init__(self, path: pathlib.Path, seq_len: int):
        try:
            self.weights = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ConfigError(f"precomputed TIE weights {path}: unreadable ({type(e).__name__}: {e}); write them "
                              f"again with {COMMAND}") from None
        if self.weights.ndim != 2 or self.weights.shape[1] != seq_len or self.weights.dtype != np.float32:
            raise ConfigError(f"precomputed TIE weights {path}: holds {self.weights.dtype} {self.weights.shape}, not "
                              f"float32 [sequences, {seq_len}]; write them again with {COMMAND}")
        self.path = path

    def __call__(self, global_rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(global_rows, np.int64)
        if rows.size and int(rows.max()) >= len(self.weights):
            raise ConfigError(f"precomputed TIE weights {self.path} hold {len(self.weights)} sequences; sequence "
                              f"{int(rows.max())} was asked for; score more: {COMMAND} --config <the run's> "
                              f"--sequences {int(rows.max()) + 1}")
        return np.asarray(self.weights[rows], np.float32)


def open_weights(run: RunConfig, model_cfg: ModelConfig, stores: Sequence[TokenStore],
                 fix: str | None = None) -> WeightRows:
    """``check_weights`` against the opened stores, then the row source for the loader."""
    path, _ = check_weights(run, model_cfg, stores, fix)
    return WeightRows(path, run.step.seq_len)


# -- writing ----------------------------------------------------------------------------------------
def publish(tmp_npy: pathlib.Path, path: pathlib.Path, meta: dict[str, Any]) -> None:
    """Rename a finished ``tmp_npy`` to ``path`` and write its sidecar, atomically for readers:
    the old sidecar goes first and the new one comes last, so at no moment does a sidecar describe
    another file's rows (a crash in between leaves weights without sidecar: refused, rewritten)."""
    side = sidecar_path(path)
    tmp_side = tmp_npy.with_name(tmp_npy.name + ".json")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_npy, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users of a shared cache
    tmp_side.write_text(json.dumps(meta, indent=1, sort_keys=True))
    side.unlink(missing_ok=True)
    os.replace(tmp_npy, path)
    os.replace(tmp_side, side)
