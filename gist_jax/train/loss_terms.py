"""The interface of an additive loss term (``train/objectives.py`` registers them; the step sums
them). Its own module so a term's module (``train/ae.py``) can name it without importing the
registry that imports the term."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import jax

    from gist_jax.gist.config import CompressionConfig
    from gist_jax.gist.layout import LayoutShape
    from gist_jax.gist.specs import LayoutArrays
    from gist_jax.model.config import ModelConfig
    from gist_jax.model.transformer import Params


@dataclasses.dataclass(frozen=True)
class TermInputs:
    """What an additive term reads inside one microbatch's loss: the compressed forward's
    final-norm hidden states in layout order, and (``LossTerm.kv_layer``) that layer's
    un-rotated ``(k, v)`` of every layout token."""

    cfg: ModelConfig  # the model config with its gist parameters
    comp: CompressionConfig
    shape: LayoutShape
    params: Params  # the state's params: ``model`` and each term's own under its name
    tokens_BxN: jax.Array
    arrays: LayoutArrays
    hidden_BxTxE: jax.Array
    layer_kv: tuple[jax.Array, jax.Array] | None
    step: jax.Array | None  # the update's index (None: the memory planner's trace)
    microbatches: int


class LossTerm(Protocol):
    """An additive term of the step's loss. ``name`` keys its parameters in ``state.params``
    (if ``init_params`` returns any; they always train) and its metrics; ``mean_metrics`` are
    averaged over microbatches into the step's metrics. ``__call__`` returns the term's
    contribution to the microbatch loss (already scaled: the LM part is a sum over the global
    token count, so a per-microbatch mean is divided by the microbatch count) and its metrics."""

    name: str
    kv_layer: int | None
    batch_fields: tuple[str, ...]
    mean_metrics: tuple[str, ...]

    def init_params(self, cfg: ModelConfig, comp: CompressionConfig, model_params: Params,
                    seed: int) -> Params | None: ...

    def param_specs(self, cfg: ModelConfig) -> Any: ...

    def __call__(self, inputs: TermInputs) -> tuple[jax.Array, dict[str, jax.Array]]: ...
