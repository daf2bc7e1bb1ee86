"""Which loss terms a training step runs, decided once from the step and compression configs.

The step's loss is the LM loss, optionally weighted per token by TIE, plus ``ae_lambda`` times
the AE loss. Whether each term runs, and what it needs, used to be re-derived wherever it
mattered (the state builds the frozen reference and the decoder, the step branches, FLOPs and
the memory plan count the passes); every one of those now asks ``objectives``.
"""

from __future__ import annotations

import dataclasses

from gist_jax.gist.config import CompressionConfig
from gist_jax.train.config import StepConfig


@dataclasses.dataclass(frozen=True)
class Objectives:
    """The terms of one step's loss, and what each needs.

    ``tie``: the LM loss is TIE-weighted (compression on); ``tie_online``: the weights come from
    the two frozen reference passes inside the step (the state keeps ``ref_params``; FLOPs and
    the memory plan count the passes); otherwise from the batch field ``tie_weights``. ``ae``:
    the AE decoder runs and has parameters (compression on and ``ae_lambda`` > 0: a zero
    lambda builds no decoder at all)."""

    tie: bool
    tie_online: bool
    ae: bool

    @property
    def batch_fields(self) -> tuple[str, ...]:
        """What the loader puts in every batch ([B, N] each)."""
        return ("tokens", "loss_mask") + (("tie_weights",) if self.tie_precomputed else ())

    @property
    def tie_precomputed(self) -> bool:
        """The weights are read from the batch (``objective.tie_weights_path``'s file)."""
        return self.tie and not self.tie_online

    @property
    def needs_reference_params(self) -> bool:
        """The frozen copy of the base model online TIE scores with (``TrainState.ref_params``)."""
        return self.tie_online


def objectives(step_cfg: StepConfig, comp: CompressionConfig) -> Objectives:
    obj = step_cfg.objective
    tie = obj.tie and comp.enabled
    return Objectives(tie=tie, tie_online=tie and obj.tie_source == "online",
                      ae=obj.ae and comp.enabled and obj.ae_lambda > 0)
