"""The loss a training step minimises, as registered terms, decided once from the configs.

The step's loss is the LM loss over raw tokens, weighted per token (TIE's weights or the plain
mask), plus every registered additive term that is on (``TERM_FACTORIES``; built in: the AE
loss). The step sums the terms it is given and knows none of them by name; the state, the
memory plan and the loader ask the same ``Objectives`` what each term needs (its own
parameters, a layer's gist K/V, batch fields, the frozen reference model). A new objective is
one ``LossTerm`` class and one ``register_term`` line (docs/architecture.md, "How to add...").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gist_jax.gist.config import CompressionConfig
from gist_jax.train.config import StepConfig
from gist_jax.train.loss_terms import LossTerm, TermInputs

if TYPE_CHECKING:
    from gist_jax.model.config import ModelConfig
    from gist_jax.model.transformer import Params

__all__ = ["TERM_FACTORIES", "LossTerm", "Objectives", "TermInputs", "objectives", "register_term"]


# name -> (step config, compression config) -> the term, or None when it is off for this run.
TermFactory = Callable[[StepConfig, CompressionConfig], "LossTerm | None"]


def _ae_term(step_cfg: StepConfig, comp: CompressionConfig) -> LossTerm | None:
    obj = step_cfg.objective
    if not (obj.ae and comp.enabled and obj.ae_lambda > 0):  # a zero lambda builds no decoder at all
        return None
    from gist_jax.train.ae import AETerm  # the model stack; objectives stays importable by configs

    return AETerm(obj)


TERM_FACTORIES: dict[str, TermFactory] = {"ae": _ae_term}


def register_term(name: str, factory: TermFactory) -> None:
    """Adds an objective: ``factory`` decides from the configs whether it runs and builds it."""
    if name in TERM_FACTORIES or name in ("model", "lm"):
        raise ValueError(f"a loss term named {name!r} is already registered (or reserved)")
    TERM_FACTORIES[name] = factory


@dataclasses.dataclass(frozen=True)
class Objectives:
    """The LM loss's weighting and the additive terms of one step's loss, and what they need.

    ``tie``: the LM loss is TIE-weighted (compression on); ``tie_online``: the weights come from
    the two frozen reference passes inside the step (the state keeps ``ref_params``; FLOPs and
    the memory plan count the passes); otherwise from the batch field ``tie_weights``.
    ``terms``: the additive terms that run, in registration order."""

    tie: bool
    tie_online: bool
    terms: tuple[LossTerm, ...] = ()

    @property
    def ae(self) -> bool:
        """The AE decoder runs and has parameters (FLOPs and the plan count it)."""
        return any(term.name == "ae" for term in self.terms)

    @property
    def batch_fields(self) -> tuple[str, ...]:
        """What the loader puts in every batch ([B, N] each)."""
        fields = ("tokens", "loss_mask") + (("tie_weights",) if self.tie_precomputed else ())
        return fields + tuple(f for term in self.terms for f in term.batch_fields if f not in fields)

    @property
    def tie_precomputed(self) -> bool:
        """The weights are read from the batch (``objective.tie_weights_path``'s file)."""
        return self.tie and not self.tie_online

    @property
    def needs_reference_params(self) -> bool:
        """The frozen copy of the base model online TIE scores with (``TrainState.ref_params``)."""
        return self.tie_online

    @property
    def kv_layer(self) -> int | None:
        """The layer whose gist K/V the forward also returns (the one the terms read)."""
        layers = {term.kv_layer for term in self.terms if term.kv_layer is not None}
        if len(layers) > 1:
            raise ValueError(f"loss terms read the K/V of layers {sorted(layers)}; the forward returns one")
        return next(iter(layers), None)

    def init_params(self, cfg: ModelConfig, comp: CompressionConfig, model_params: Params,
                    seed: int = 0) -> dict[str, Params]:
        """Every term's own parameters, by term name (beside ``model`` in ``state.params``)."""
        out = {}
        for term in self.terms:
            params = term.init_params(cfg, comp, model_params, seed)
            if params is not None:
                out[term.name] = params
        return out

    def param_specs(self, cfg: ModelConfig) -> dict[str, Any]:
        """Logical PartitionSpecs of ``init_params``' trees."""
        return {term.name: specs for term in self.terms if (specs := term.param_specs(cfg)) is not None}


def objectives(step_cfg: StepConfig, comp: CompressionConfig) -> Objectives:
    obj = step_cfg.objective
    tie = obj.tie and comp.enabled
    terms = tuple(term for factory in TERM_FACTORIES.values() if (term := factory(step_cfg, comp)) is not None)
    return Objectives(tie=tie, tie_online=tie and obj.tie_source == "online", terms=terms)
