"""What makes a checkpoint trustworthy to resume from, beyond "Orbax could read it".

* ``state_checksums``: a position-weighted sum of every leaf's bits, computed on the devices at
  save time and stored next to the arrays. Orbax/TensorStore reads a bit-flipped chunk without
  complaint (checked: a flipped byte in an OCDBT data file restores different weights and no
  error), so restore recomputes the sums and refuses a mismatch. The weights are odd, so any
  single flipped bit changes its leaf's sum; the same pass says whether every float is finite,
  which keeps a diverged state from ever being saved.
* ``check_resume_config``: which run-config keys may differ between a checkpoint and the run
  that resumes from it. Everything that changes what the state means or which batches come next
  is refused; cadence, length, learning rate and how the step is executed may change.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.errors import ConfigError
from gist_jax.model.kernels import LEGACY_KEYS

_UINT_OF_WIDTH = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_sums(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(checksum as uint32, all finite) of one array."""
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.bool_(True)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        width = jnp.dtype(x.dtype).itemsize
        if width not in _UINT_OF_WIDTH:
            raise TypeError(f"no checksum for dtype {x.dtype}")
        bits = jax.lax.bitcast_convert_type(x, _UINT_OF_WIDTH[width]).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)  # flat index, wrapping modulo 2**32 like the sum
    stride = 1
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= x.shape[axis]
    weighted = jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    return weighted, finite


@jax.jit
def _tree_sums(leaves: list[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
    return [_leaf_sums(x) for x in leaves]


def state_checksums(tree: Any) -> tuple[dict[str, int], bool]:
    """({leaf path: checksum}, every float finite) of a pytree of (global) arrays; collective."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        return {}, True
    paths = [jax.tree_util.keystr(p) for p, _ in leaves]
    arrays = [x for _, x in leaves]
    # Outputs are replicated scalars; addressable_data works with several processes too.
    results = [(np.asarray(s.addressable_data(0)), np.asarray(f.addressable_data(0))) for s, f in _tree_sums(arrays)]
    return {p: int(s) for p, (s, _) in zip(paths, results)}, all(bool(f) for _, f in results)


def first_mismatch(saved: dict[str, int], actual: dict[str, int]) -> str | None:
    """The first leaf whose checksum differs (or is missing), or None."""
    for path in sorted(set(saved) | set(actual)):
        if saved.get(path) != actual.get(path):
            return path
    return None


# Keys that may differ on resume: cadence and length of the run, learning rate and clipping
# (the fix a divergence message suggests), and how the same update is executed (mesh,
# microbatches, compute dtype, remat, attention implementation, data cache and prefetch; where
# precomputed TIE weights live, since their sidecar is checked against the run at every start).
RESUMABLE_KEYS = (
    "name", "train.", "checkpoint.", "optimizer.total_steps", "optimizer.learning_rate",
    "optimizer.grad_clip_norm", "mesh.", "step.microbatches", "model.dtype", "model.remat_policy",
    "model.attention", *LEGACY_KEYS, "objective.loss_chunk", "data.prefetch", "data.cache_dir",
    "objective.tie_weights_path",
)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


# An objective's settings have no effect while the objective is off: (switch, its settings' prefix).
INERT_WHEN_OFF = (("objective.ae", "objective.ae_"), ("objective.tie", "objective.tie_"))


def _inert(key: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """True for a setting of an objective that is off on both sides (e.g. ``objective.ae_lambda``
    with ``objective.ae`` False before and after): it shapes nothing either run computes."""
    return any(key.startswith(prefix) and old.get(switch) is False and new.get(switch) is False
               for switch, prefix in INERT_WHEN_OFF)


def changed_keys(saved_run: dict[str, Any], run: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (checkpoint value, this run's value)} of the keys that may not change on resume.
    Both sides go through JSON so tuples and lists compare equal."""
    old, new = _flat(json.loads(json.dumps(saved_run))), _flat(json.loads(json.dumps(run)))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not _resumable(k) and not _inert(k, old, new)}


def check_resume_config(saved_run: dict[str, Any], run: dict[str, Any], where: Any) -> None:
    changed = changed_keys(saved_run, run)
    if changed:
        detail = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"checkpoint {where} was made with other values of keys that cannot change on resume "
                          f"({detail}); rerun with the checkpoint's values or use a new --workdir "
                          "(train.*, checkpoint.*, optimizer.total_steps/learning_rate/grad_clip_norm, mesh.* and "
                          "execution settings may change)")
