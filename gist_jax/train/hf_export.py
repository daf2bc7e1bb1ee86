"""A training checkpoint -> a Hugging Face directory (``python -m gist_jax.export_hf``).

Here, in train, because it reads a training checkpoint: through ``gist_jax.train.step_reader``
(step resolution, the stored run and layout, a checksum-verified leaf-by-leaf restore of
``params["model"]``). The writing is ``gist_jax.hf.export``, which never reads a checkpoint, so
the hf package stays below train and the training loop's export hook uses the same writer.
"""

from __future__ import annotations

import pathlib
from typing import Any

from gist_jax.data.tokenizer import hf_tokenizer_copy
from gist_jax.hf.export import check_export_dir, export_source
from gist_jax.train.step_reader import ModelParamsReader, checkpoint_configs, sound_step


def export_checkpoint(checkpoint_dir_or_workdir: str | pathlib.Path, out_dir: str | pathlib.Path,
                      step: int | None = None, *, dtype: str | None = None, shard_size: str | int = "2GB",
                      run: dict[str, Any] | None = None, overwrite: bool = False) -> pathlib.Path:
    """Export a training checkpoint (newest sound step, or ``step``) to a transformers directory
    (``run``: the stored run config with overrides, see ``train.step_reader.checkpoint_configs``).
    A damaged leaf found mid-way discards the partial export; without ``step`` the next older
    step is exported instead (``step_reader.sound_step``)."""
    check_export_dir(out_dir, overwrite)  # before any leaf is read

    def export(step_dir: pathlib.Path) -> pathlib.Path:
        cfg, comp, resolved = checkpoint_configs(step_dir, run)
        spec = (resolved.get("data") or {}).get("tokenizer")
        tokenizer = hf_tokenizer_copy(spec) if spec else None
        return export_source(cfg, comp, ModelParamsReader(step_dir), tokenizer, out_dir, dtype, shard_size, overwrite)

    return sound_step(checkpoint_dir_or_workdir, step, export)
