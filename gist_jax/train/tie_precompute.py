"""Score a run's training sequences once with the frozen reference model: precomputed TIE weights.

    python -m gist_jax.train.tie_precompute --config experiments/demo.py [--config.<key>=<value> ...]
    python -m gist_jax.main --config experiments/demo.py --workdir runs/demo \\
        --config.objective.tie_source=precomputed [the same overrides]

Give the run's own ``--config`` and overrides: the sequences scored are exactly those its loader
will serve (``gist_jax/data/loader.py``: global sequence g, for rows 0 .. ``--sequences`` - 1,
default ``optimizer.total_steps x step.batch_size``), with the reference the online step uses:
the base model's weights at step 0 (``train/state.py initial_base_params``: the loaded
checkpoint, or the preset's random init of ``step.seed``), both passes of
``train/tie.py compute_tie_weights`` over the step's own loss positions (``train/step.py
loss_positions``). The weights go to ``objective.tie_weights_path`` or, by default, beside the
token stores under ``data.cache_dir`` (``train/tie_store.py`` says where and what the sidecar
records). ``objective.tie_source`` may be either value here. Scoring runs on this process's
devices, sharded like the run's mesh, one microbatch of sequences at a time; several processes
are not supported (score on one host, train on many: each process reads its own rows).

Writing is atomic (a temporary file in the same directory, renamed when complete). An existing
file with the same identity and enough sequences is kept (``--force`` rescores). Exit 2 with one
line on a bad config.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from gist_jax.errors import ConfigError
from gist_jax.train import tie_store
from gist_jax.train.experiment import RunConfig


def _scorer(run: RunConfig, base_cfg: Any, mesh: Any) -> Any:
    """A jitted ``(base params, tokens [b, N], loss_mask [b, N]) -> weights [b, N]`` with the
    step's own loss positions and TIE settings."""
    from gist_jax.model.sharding import activation_mesh
    from gist_jax.train.mesh import replicated
    from gist_jax.train.step import loss_positions
    from gist_jax.train.tie import compute_tie_weights

    obj, seg = run.step.objective, run.compression.segment_length

    def score(base: Any, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
        with activation_mesh(mesh):
            mask = loss_positions(tokens, loss_mask, seg, obj.include_first_segment)
            return compute_tie_weights(base_cfg, base, tokens, mask, seg, obj.tie_gamma, obj.tie_rescale)

    return jax.jit(score, out_shardings=replicated(mesh))


def precompute(run: RunConfig, sequences: int | None = None, force: bool = False,
               command: str = "") -> tuple[pathlib.Path, bool]:
    """(path of the run's weights file, whether it was written now): scores rows 0 ..
    ``sequences`` - 1 of the run's training stream (rounded up to whole microbatches)."""
    from gist_jax.data.loader import BatchLoader
    from gist_jax.data.tokenizer import tokenizer_from_spec
    from gist_jax.train.experiment import check_model_matches_data, check_model_matches_run
    from gist_jax.train.loop import load_base_model
    from gist_jax.train.mesh import batch_sharding, check_batch, make_mesh
    from gist_jax.train.preflight import check_cache_dir, check_source, check_tokenizer, model_config_before_loading
    from gist_jax.train.state import initial_base_params
    from gist_jax.utils.progress import progress

    obj, step = run.step.objective, run.step
    if not obj.tie:
        raise ConfigError("objective.tie=False: a run without TIE reads no weights; give the run's config with "
                          "--config.objective.tie=True")
    if not run.compression.enabled:
        raise ConfigError(f"compression.memory={run.compression.memory!r}: TIE weighs tokens against their "
                          "segment and is off without compression; give a compressing run's config")
    if jax.process_count() > 1:
        raise ConfigError(f"{tie_store.COMMAND} runs as one process (found {jax.process_count()}); score on one "
                          "host, then train on any number")
    check_cache_dir(run)  # the same one-line refusals as a run's start-up, before anything loads
    check_tokenizer(run.data.tokenizer)
    for spec, _ in run.data.sources:
        check_source(spec)
    chunk = step.batch_size // step.microbatches
    want = sequences if sequences is not None else step.optimizer.total_steps * step.batch_size
    if want < 1:
        raise ConfigError(f"--sequences={want}: give a positive count, e.g. {run.num_steps * step.batch_size}")
    rows = -(-want // chunk) * chunk
    path = tie_store.weights_path(run)
    model_cfg = model_config_before_loading(run.model)

    mesh = make_mesh(step.mesh)
    check_batch(step.batch_size, step.microbatches, mesh)
    loader = BatchLoader(dataclasses.replace(run.data, prefetch=0), step.seq_len, step.batch_size,
                         batch_sharding(mesh))
    old = _existing(path)
    fields, stats = tie_store.identity(run, model_cfg, loader.sequencer.stores, memo=old)
    if not force and old is not None and not tie_store.differences(old["identity"], fields) \
            and int(old.get("rows", 0)) >= rows:
        return path, False

    base_cfg, host_params = load_base_model(run.model)
    check_model_matches_run(base_cfg, run)
    tok = tokenizer_from_spec(run.data.tokenizer)
    check_model_matches_data(base_cfg, tok.vocab_size, tok.eos_id, run.data.tokenizer)
    base, _ = initial_base_params(base_cfg, step.seed, mesh, host_params)
    del host_params
    score = _scorer(run, base_cfg, mesh)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    start = time.perf_counter()
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, step.seq_len))
        sharding = batch_sharding(mesh)
        for lo in progress(range(0, rows, chunk), desc=f"scoring {path.name}", unit="batch"):
            host = loader.sequencer.rows(np.arange(lo, lo + chunk))
            w = score(base, jax.device_put(host["tokens"], sharding), jax.device_put(host["loss_mask"], sharding))
            out[lo:lo + chunk] = np.asarray(jax.device_get(w), np.float32)
        out.flush()
        del out
        meta = {"format": tie_store.FORMAT, "rows": rows, "seq_len": step.seq_len, "dtype": "float32",
                "identity": fields, "reference_files": stats, "model_init": run.model.init,
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "score_seconds": round(time.perf_counter() - start, 2), "command": command,
                "row_meaning": "row g = global sequence g of the training stream (step g // B, row g % B)"}
        tie_store.publish(tmp, path, meta)
    except BaseException:
        tmp.unlink(missing_ok=True)
        pathlib.Path(str(tmp) + ".json").unlink(missing_ok=True)
        raise
    return path, True


def _existing(path: pathlib.Path) -> dict[str, Any] | None:
    """The sidecar of a complete earlier write at ``path``, or None."""
    try:
        meta = tie_store.read_sidecar(path, str(path), "")
    except ConfigError:
        return None
    return meta if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    from gist_jax import cli_config

    p = argparse.ArgumentParser(prog=tie_store.COMMAND, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli_config.add_config_flag(p, what="the run whose sequences are scored")
    p.add_argument("--sequences", type=int, default=None,
                   help="sequences of the training stream to score (default: optimizer.total_steps x step.batch_size)")
    p.add_argument("--force", action="store_true", help="rescore even when an up-to-date file exists")
    args, overrides = cli_config.parse_tool_args(p, argv)
    command = " ".join([tie_store.COMMAND, *(sys.argv[1:] if argv is None else argv)])
    try:
        run = cli_config.load_run(args.config, overrides)
        path, written = precompute(run, args.sequences, args.force, command)
    except (cli_config.CliConfigError, ConfigError) as e:
        cli_config.exit_config_error(e)
    meta = tie_store.read_sidecar(path, str(path), command)
    verb = "wrote" if written else "up to date:"
    print(f"{verb} {path} ({meta['rows']} sequences x {meta['seq_len']} tokens, float32); train with "
          f"--config.objective.tie_source=precomputed"
          + (f" --config.{tie_store.KEY}={run.step.objective.tie_weights_path}"
             if run.step.objective.tie_weights_path else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
