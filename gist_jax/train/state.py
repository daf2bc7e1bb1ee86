"""Train state, created directly in its sharded layout.

``params`` holds the trainable tree ``{"model": ..., "ae": ...}`` ("ae" only with the
autoencoding objective) in float32 master weights; ``ref_params`` is the frozen base model
for online TIE (sharded like the model params, never updated). Shardings come from the logical
axis names of the parameters through one rules table; nothing is first materialised on one
device: random init runs under ``jit`` with ``out_shardings``, pretrained host arrays are
placed leaf by leaf.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.params import add_gist_params, model_config_for, trainable_mask
from gist_jax.model.config import ModelConfig
from gist_jax.model.transformer import Params, init_params, param_logical_specs, to_layout
from gist_jax.train.config import StepConfig
from gist_jax.train.mesh import replicated, shardings_for
from gist_jax.train.objectives import objectives
from gist_jax.train.optimizer import make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Params
    opt_state: Any
    rng: jax.Array
    ref_params: Params | None = None

    if TYPE_CHECKING:  # added by flax.struct.dataclass at runtime
        def replace(self, **updates: Any) -> Self: ...


def logical_param_specs(base_cfg: ModelConfig, comp: CompressionConfig, step_cfg: StepConfig) -> dict:
    """Logical PartitionSpecs of ``state.params`` (the golden table tests compare against)."""
    cfg = model_config_for(base_cfg, comp)
    return {"model": param_logical_specs(cfg), **objectives(step_cfg, comp).param_specs(cfg)}


def trainable_tree(params: Params, comp: CompressionConfig) -> Params:
    mask = {"model": trainable_mask(params["model"], comp)}
    for name in params.keys() - {"model"}:  # a loss term's own params (the AE decoder) always train
        mask[name] = jax.tree.map(lambda _: True, params[name])
    return mask


def _dict_key_suffix(path: jax.tree_util.KeyPath) -> tuple[str, ...]:
    keys = []
    for entry in reversed(path):
        if not isinstance(entry, jax.tree_util.DictKey):
            break
        keys.append(str(entry.key))
    return tuple(reversed(keys))


def optimizer_shardings(opt_abstract: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Each optimizer leaf that mirrors a parameter (Adam moments) is sharded like it;
    scalars (counts) are replicated."""
    by_path = {_dict_key_suffix(path): sh
               for path, sh in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

    def pick(path, leaf):
        sharding = by_path.get(_dict_key_suffix(path))
        return sharding if sharding is not None and leaf.ndim > 0 else replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, opt_abstract)


def initial_base_params(base_cfg: ModelConfig, seed: int, mesh: Mesh,
                        base_params: Params | None = None) -> tuple[Params, Any]:
    """(the base model's weights at step 0, their shardings): ``base_params`` placed leaf by leaf
    in the storage dtype, or the random init of ``seed`` when None. The train state's model and
    ``ref_params`` start from these, and precomputed TIE (``train/tie_precompute.py``) scores with
    them, so its reference is bit for bit the online reference."""
    rng = jax.random.key(seed)
    base_abstract = jax.eval_shape(lambda: init_params(base_cfg, rng))
    base_shardings = shardings_for(param_logical_specs(base_cfg), base_abstract, mesh)
    if base_params is None:
        base = jax.jit(lambda: init_params(base_cfg, rng), out_shardings=base_shardings)()
    else:
        # numpy in, so every process contributes its shards of a global array (multi-host safe)
        base = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x).astype(base_cfg.storage_dtype), s),
                            to_layout(base_params, base_cfg), base_shardings)
    return base, base_shardings


def create_train_state(base_cfg: ModelConfig, comp: CompressionConfig, step_cfg: StepConfig,
                       mesh: Mesh, base_params: Params | None = None
                       ) -> tuple[TrainState, optax.GradientTransformation, Any]:
    """Sharded state, the optimizer, and the state's shardings (for the step's in/out specs).

    ``base_params``: pretrained base weights (host or device arrays, either layer layout);
    random init when None.
    """
    cfg = model_config_for(base_cfg, comp)
    rng = jax.random.key(step_cfg.seed)
    base, base_shardings = initial_base_params(base_cfg, step_cfg.seed, mesh, base_params)

    def build(base):
        model = add_gist_params(base, cfg)
        return {"model": model, **objectives(step_cfg, comp).init_params(cfg, comp, model, step_cfg.seed)}

    abstract = jax.eval_shape(build, base)
    param_shardings = shardings_for(logical_param_specs(base_cfg, comp, step_cfg), abstract, mesh)
    params = jax.jit(build, out_shardings=param_shardings)(base)
    tx = make_optimizer(step_cfg.optimizer, trainable_tree(params, comp))
    opt_abstract = jax.eval_shape(tx.init, abstract)
    opt_state = jax.jit(tx.init, out_shardings=optimizer_shardings(opt_abstract, param_shardings, mesh))(params)
    ref = jax.jit(lambda b: jax.tree.map(jnp.copy, b), out_shardings=base_shardings)(base) \
        if objectives(step_cfg, comp).needs_reference_params else None
    state = TrainState(step=jax.device_put(np.zeros((), np.int32), replicated(mesh)),
                       params=params, opt_state=opt_state,
                       rng=jax.device_put(np.asarray(jax.random.key_data(rng)), replicated(mesh)),
                       ref_params=ref)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return state, tx, shardings
