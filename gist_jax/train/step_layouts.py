"""The training loop's layouts: decided once per distinct layout, on the devices, with their FLOPs.

A step's layout is a function of its sampled ratios (``step_ratios``). The first step that
meets a ratio tuple builds the host layout, places its arrays on the mesh, replicated, in one
``device_put`` from numpy (never device -> host -> devices), and counts the step's FLOPs; every
later step with those ratios reuses the entry. One cache, one key (the ratios and gist slots
that determine the layout), bounded: ``per_segment`` sampling meets thousands of ratio tuples.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh

from gist_jax.gist.layout import GistLayout, build_layout, sample_ratios
from gist_jax.gist.specs import LayoutArrays, layout_host_arrays
from gist_jax.model.config import ModelConfig
from gist_jax.train.experiment import RunConfig
from gist_jax.train.flops import train_flops_per_step
from gist_jax.train.mesh import replicated
from gist_jax.train.objectives import objectives


@dataclasses.dataclass(frozen=True)
class StepLayout:
    layout: GistLayout  # host side: shape (the compiled step's static key), ratios, masks
    arrays: LayoutArrays  # the same arrays on every device of the mesh
    flops: float  # the step's training FLOPs (``train_flops_per_step(...)["total"]``)


def step_ratios(run: RunConfig, step: int, num_segments: int) -> tuple[tuple[int, ...], int]:
    """The compression ratios of step ``step``: a function of (seed, step) only."""
    return sample_ratios(run.compression, num_segments, np.random.default_rng([run.step.seed, step, 7]))


def step_layout_key(run: RunConfig, step: int) -> tuple[tuple[int, ...], int] | None:
    """What determines step ``step``'s layout: its (ratios, gist slots); None without compression."""
    comp = run.compression
    return step_ratios(run, step, comp.num_segments(run.step.seq_len)) if comp.enabled else None


def host_layout(run: RunConfig, key: tuple[tuple[int, ...], int] | None) -> GistLayout:
    return build_layout(run.step.seq_len, run.compression, *(key or (None, None)))


class StepLayouts:
    """``for_step(step)`` -> ``StepLayout``, built once per distinct key, least recently used
    evicted past ``MAX_ENTRIES``."""

    MAX_ENTRIES = 64

    def __init__(self, run: RunConfig, base_cfg: ModelConfig, mesh: Mesh) -> None:
        self.run, self.base_cfg, self.mesh = run, base_cfg, mesh
        self._entries: collections.OrderedDict[object, StepLayout] = collections.OrderedDict()
        self.builds = 0  # entries built so far (a test checks one per distinct layout)

    def for_step(self, step: int) -> StepLayout:
        key = step_layout_key(self.run, step)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        entry = self._build(key)
        self._entries[key] = entry
        if len(self._entries) > self.MAX_ENTRIES:
            self._entries.popitem(last=False)
        return entry

    def _build(self, key: tuple[tuple[int, ...], int] | None) -> StepLayout:
        self.builds += 1
        run, comp = self.run, self.run.compression
        layout = host_layout(run, key)
        arrays = jax.device_put(layout_host_arrays(layout), replicated(self.mesh))
        terms = objectives(run.step, comp)
        ratios = layout.ratios if comp.enabled else None
        flops = train_flops_per_step(self.base_cfg, comp, run.step.seq_len, run.step.batch_size, ratios,
                                     tie=terms.tie_online, ae=terms.ae)["total"]
        return StepLayout(layout, arrays, flops)

