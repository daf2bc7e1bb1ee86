"""Reading a finished training step for anything other than resuming: evaluation, export,
comparison, the study. The one checkpoint reader of the tools, with the checks resuming makes.

A step is read through Orbax's handlers directly (PyTreeCheckpointHandler for the state,
JsonCheckpointHandler for the run and layout items): ``PyTreeCheckpointer.metadata(<step>/state)``
would look for a per-item ``_CHECKPOINT_METADATA`` that a CheckpointManager never writes (it
keeps one per step) and log "Metadata file does not exist" on every read; the handlers read only
what the item holds.

Orbax reads a bit-flipped file without an error, so every leaf of ``params["model"]`` a tool
reads is checked against the checksum training wrote with it (``integrity.state_checksums``,
the same sums ``Checkpointer`` verifies on resume); a cut data file or an unreadable item is
damage too. ``sound_step`` decides what a tool does about damage: the newest step (no step
asked for) falls back to the newest sound one with one warning per damaged step; a step the
user named is refused in one line. Damaged steps are never moved: tools only read.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from gist_jax.errors import ConfigError
from gist_jax.gist.config import CompressionConfig
from gist_jax.model.config import ModelConfig
from gist_jax.train.checkpoint import LAYOUT_KEYS, CheckpointDamaged, install_quiet_logging, short_reason
from gist_jax.train.integrity import state_checksums
from gist_jax.utils import bucket

LeafPath = tuple[str, ...]
T = TypeVar("T")
MODEL_PREFIX = ".params['model']"  # how state_checksums names params["model"] of a TrainState

logger = logging.getLogger(__name__)


def _checkpoints_root(path: pathlib.Path) -> pathlib.Path:
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def _is_step_dir(path: pathlib.Path) -> bool:
    return (path / "state").is_dir() and (path / "run").is_dir()


def finished_steps(path: str | pathlib.Path) -> list[int]:
    """The finished steps under a workdir or its ``checkpoints`` dir (Orbax's unfinished
    ``*.orbax-checkpoint-tmp*`` directories are never steps; in a bucket, a ``<step>`` without
    its ``commit_success.txt`` is not one either), oldest first."""
    root = _checkpoints_root(bucket.as_path(path))
    if not root.is_dir():
        return []
    url = bucket.is_url(root)
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()
                  and (not url or ocp.path.step.is_path_finalized(p)))


def resolve_step_dir(path: str | pathlib.Path, step: int | None = None) -> pathlib.Path:
    """A run's --workdir, its ``checkpoints`` dir or one ``<step>`` dir -> the step directory
    (the newest finished step unless ``step`` is given)."""
    path = bucket.as_path(path)
    if _is_step_dir(path):
        if step is not None and path.name != str(step):
            raise ConfigError(f"--checkpoint={path} is step {path.name} but --step={step}; pass the workdir")
        return path
    root = _checkpoints_root(path)
    steps = finished_steps(path)
    if not steps:
        raise FileNotFoundError(f"--checkpoint={path}: no finished checkpoints (<step>/state) under {root}")
    if step is None:
        return root / str(steps[-1])
    if step not in steps:
        raise FileNotFoundError(f"--step={step} is not in {root}; available steps: {steps}")
    return root / str(step)


def sound_step(path: str | pathlib.Path, step: int | None, use: Callable[[pathlib.Path], T]) -> T:
    """``use(step_dir)`` on the step a tool was asked for. ``use`` reads the step through this
    module and raises ``CheckpointDamaged`` at the first damage it finds (and must leave nothing
    half-written behind when it does). Asked for the newest step (``step`` None, ``path`` not a
    step dir): each damaged step is named in one warning and the next older one is tried.
    Asked for one step: its damage is a ``ConfigError`` naming the step and the sound choices."""
    path = bucket.as_path(path)
    first = resolve_step_dir(path, step)
    if step is not None or _is_step_dir(path):
        try:
            return use(first)
        except CheckpointDamaged as e:
            raise ConfigError(f"checkpoint {first} is damaged ({e.reason}); read another step "
                              f"(finished: {finished_steps(first.parent)}) or pass the workdir without --step to "
                              "use the newest sound one") from None
    root = first.parent
    damaged: list[str] = []
    for candidate in sorted(finished_steps(root), reverse=True):
        try:
            return use(root / str(candidate))
        except CheckpointDamaged as e:
            damaged.append(f"{candidate}: {e.reason}")
            logger.warning("checkpoint %s/%d is damaged (%s); trying the next older step", root, candidate, e.reason)
    raise ConfigError(f"--checkpoint={path}: every finished step is damaged ({'; '.join(damaged)[:300]}); "
                      "nothing sound to read")


def read_item(step_dir: pathlib.Path, item: str) -> Any:
    """A JSON item of a step (``run``: the resolved run config, ``layout``: ``layout_metadata``);
    ``CheckpointDamaged`` when it cannot be read."""
    try:
        return ocp.JsonCheckpointHandler().restore(bucket.as_path(step_dir, absolute=False) / item)
    except Exception as e:  # noqa: BLE001 - any unreadable item makes the step unusable
        raise CheckpointDamaged(f"{item} unreadable: {short_reason(e)}") from None


def checkpoint_configs(step_dir: pathlib.Path, run: dict[str, Any] | None = None
                       ) -> tuple[ModelConfig, CompressionConfig, dict[str, Any]]:
    """(gist model config, compression config, run dict) of a step, checked against the layout
    it recorded. ``run``: the stored run dict with a tool's overrides (``cli_config.checkpoint_run``,
    e.g. a moved ``model.init``); default: as stored."""
    from gist_jax.gist.params import model_config_for
    from gist_jax.hf.importer import base_model_config

    run = read_item(step_dir, "run") if run is None else run
    layout = read_item(step_dir, "layout")
    if not (isinstance(run, dict) and isinstance(layout, dict) and "compression" in run and "model" in run):
        raise CheckpointDamaged("run or layout item is not the config training writes")
    comp = CompressionConfig(**run["compression"])
    cfg = model_config_for(base_model_config(run["model"]), comp).replace(scan_layers=layout["scan_layers"])
    diff = {k: (getattr(cfg, k), layout[k]) for k in LAYOUT_KEYS if k in layout and getattr(cfg, k) != layout[k]}
    if diff:
        raise ConfigError(f"{step_dir}: model.init={run['model']['init']!r} now describes a different model than "
                          f"the checkpoint ({diff}); restore the base model the run used")
    return cfg, comp, run


def _checksum_key(path: LeafPath) -> str:
    return MODEL_PREFIX + "".join(f"[{key!r}]" for key in path)


class ModelParamsReader:
    """``state.params["model"]`` of a step, on the host as numpy (any saved sharding), leaf by
    leaf (``load``: an export holds one leaf at a time) or whole (``load_all``); nothing else of
    the state (optimizer, AE decoder) is read. Also the params source of ``hf.export``.

    Every leaf read is checked against the step's saved checksum (``CheckpointDamaged`` on a
    mismatch or an unreadable array). A step written before checksums existed has none and is
    read unverified, as resume does."""

    def __init__(self, step_dir: pathlib.Path) -> None:
        install_quiet_logging()  # a failed read's abandoned coroutines are reported here in one line
        self.step_dir = bucket.as_path(step_dir, absolute=False)
        self.state_dir = self.step_dir / "state"
        if not (self.state_dir / "_METADATA").is_file():
            raise CheckpointDamaged("state/_METADATA is missing")
        self._handler = ocp.PyTreeCheckpointHandler()
        try:
            meta = self._handler.metadata(self.state_dir)
        except Exception as e:  # noqa: BLE001
            raise CheckpointDamaged(f"state metadata unreadable: {short_reason(e)}") from None
        tree = getattr(meta, "tree", meta)
        try:
            model = tree["params"]["model"]
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{self.state_dir} has no params['model'] tree: not a gist_jax training "
                              "checkpoint (pass the run's --workdir or a <workdir>/checkpoints/<step>)") from e
        self.model_metadata = model
        self.leaves = {_path_tuple(p): x for p, x in jax.tree_util.tree_flatten_with_path(model)[0]}
        self.checksums: dict[str, int] | None = None
        if (self.step_dir / "checksums").exists():
            sums = read_item(self.step_dir, "checksums")
            if not isinstance(sums, dict):
                raise CheckpointDamaged("checksums item is not a mapping")
            self.checksums = sums

    def shape_dtype(self, path: LeafPath) -> tuple[tuple[int, ...], np.dtype]:
        x = self.leaves[path]
        return tuple(x.shape), np.dtype(x.dtype)

    def _restore(self, model_item: Any, model_args: Any) -> Any:
        args = ocp.args.PyTreeRestore(item={"params": {"model": model_item}},
                                      restore_args={"params": {"model": model_args}}, partial_restore=True)
        try:
            return self._handler.restore(self.state_dir, args=args)["params"]["model"]
        except Exception as e:  # noqa: BLE001 - a cut or missing data file, whatever TensorStore calls it
            raise CheckpointDamaged(short_reason(e)) from None

    def _verify(self, arrays: dict[LeafPath, np.ndarray]) -> None:
        if self.checksums is None:
            return
        paths = list(arrays)
        sums, _ = state_checksums([arrays[p] for p in paths])  # keyed "[0]", "[1]", ... in this order
        for i, path in enumerate(paths):
            key = _checksum_key(path)
            if self.checksums.get(key) != sums[f"[{i}]"]:
                raise CheckpointDamaged(f"checksum mismatch in {key} (bit rot or a partial copy)")

    def load(self, path: LeafPath) -> np.ndarray:
        item: dict[str, Any] = {}
        args: dict[str, Any] = {}
        node_i, node_a = item, args
        for key in path[:-1]:
            node_i, node_a = node_i.setdefault(key, {}), node_a.setdefault(key, {})
        node_i[path[-1]] = 0
        node_a[path[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
        node = self._restore(item, args)
        for key in path:
            node = node[key]
        leaf = np.asarray(node)
        self._verify({path: leaf})
        return leaf

    def load_all(self) -> Any:
        """The whole ``params["model"]`` tree as numpy arrays, in one restore."""
        item = jax.tree.map(lambda _: 0, self.model_metadata)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), self.model_metadata)
        tree = self._restore(item, args)
        self._verify({_path_tuple(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]})
        return tree


def _path_tuple(path: Any) -> LeafPath:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
