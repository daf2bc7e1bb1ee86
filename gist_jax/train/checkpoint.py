"""Training checkpoints: Orbax ``CheckpointManager`` with the state, the data iterator state,
the resolved run config and the layout metadata in every step directory.

Guarantees:
  * a save is asynchronous (the loop continues while shards are written) and atomic: Orbax
    writes ``<step>.orbax-checkpoint-tmp-*`` and renames it when every process is done, so a
    save cut short by a kill is never listed;
  * restore walks the steps newest first and skips any it cannot read completely (a directory
    damaged after the fact, a partial copy), naming it in the log;
  * the layout (model family, layer layout, vocabulary, gist parameters, which trees exist) is
    recorded and compared before any array is read: restoring into a different layout fails
    with the differing keys instead of a shape error deep inside Orbax.
The frozen TIE reference weights are not saved: they are the base model, reloaded at start-up.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from gist_jax.gist.config import CompressionConfig
from gist_jax.model.config import ConfigError, ModelConfig
from gist_jax.train.state import TrainState

LAYOUT_KEYS = ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "scan_layers", "num_gist_embeddings", "gist_projections", "tie_embeddings")


def layout_metadata(model_cfg: ModelConfig, comp: CompressionConfig, state: TrainState) -> dict[str, Any]:
    """What a checkpoint's arrays mean; anything here must match to restore into a state."""
    meta = {k: getattr(model_cfg, k) for k in LAYOUT_KEYS}
    meta.update(trainable=comp.trainable, gist_embedding=comp.gist_embedding if comp.enabled else None,
                trees=sorted(state.params), bos_token_id=model_cfg.bos_token_id, eos_token_id=model_cfg.eos_token_id)
    return meta


class CheckpointLayoutError(ConfigError):
    pass


def _saved_part(state: TrainState) -> TrainState:
    return state.replace(ref_params=None)


class Checkpointer:
    """Thin policy layer over ``ocp.CheckpointManager`` (every process must call save/restore)."""

    ITEMS = ("state", "data", "run", "layout")

    def __init__(self, directory: str | pathlib.Path, keep: int, milestone_every: int = 0, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=milestone_every or None,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=self.ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict, run: dict, layout: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(_saved_part(state)), data=ocp.args.JsonSave(data_state),
                                  run=ocp.args.JsonSave(run), layout=ocp.args.JsonSave(layout))
        self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def restore_latest(self, state: TrainState, layout: dict) -> tuple[int, TrainState, dict] | None:
        """(step, state, data iterator state) from the newest readable checkpoint, or None."""
        target = _saved_part(state)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                saved_layout = self.manager.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))["layout"]
            except Exception as e:  # noqa: BLE001 - any unreadable step is skipped, loudly
                logging.warning("checkpoint %s/%d has no readable layout (%s); trying an older one", self.directory, step, e)
                continue
            check_layout(saved_layout, layout, self.directory / str(step))
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001
                logging.warning("checkpoint %s/%d is incomplete or damaged (%s); trying an older one",
                                self.directory, step, str(e)[:300])
                continue
            return step, restored["state"].replace(ref_params=state.ref_params), restored["data"]
        return None


def check_layout(saved: dict, expected: dict, where: pathlib.Path) -> None:
    diff = {k: (saved.get(k), expected.get(k)) for k in expected if saved.get(k) != expected.get(k)}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointLayoutError(f"checkpoint {where} was written with a different layout ({detail}); resume "
                                    "with the settings it was trained with, or use a new --workdir")
