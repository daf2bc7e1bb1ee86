"""One run, one schema: the ml_collections config an experiment file returns, turned into the
frozen, validated dataclasses the code uses.

``default_config()`` holds every key with its default, so ``--config.<key>=<value>`` can only
name keys that exist (ml_collections rejects the rest), and ``run_config()`` rejects unknown keys
that an experiment file adds. Cross-field checks (sequence vs segment length, tokenizer vs
model) live here too, so a bad config fails before anything loads or compiles, with the key
and the fix in one line.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the GPU machine has no ml_collections
    import ml_collections

from gist_jax.data.config import DataConfig
from gist_jax.errors import ConfigError
from gist_jax.gist.config import CompressionConfig, check_gist_kernel
from gist_jax.gist.context_parallel import check_context_parallel
from gist_jax.model.config import (
    PRESETS,
    ModelConfig,
    check_attention,
    check_dtype_name,
    check_int,
    check_remat_policy,
)
from gist_jax.model.kernels import LEGACY_KEYS, legacy_attention
from gist_jax.train.config import MeshConfig, ObjectiveConfig, OptimizerConfig, StepConfig
from gist_jax.train.objectives import objectives


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Where the base weights come from and how the model runs.

    init: ``preset:<name>`` (random init of a preset, e.g. ``preset:tiny``), ``gguf:smollm2`` or
    ``gguf:<file>``, ``hf:<dir>`` (config.json + safetensors), ``params:<dir>`` (a
    ``gist_jax.convert`` output). Empty strings below keep the source's own setting.
    """

    init: str = "preset:tiny"
    dtype: str = ""
    param_dtype: str = ""
    scan_layers: bool = True
    remat_policy: str = "none"
    # The attention kernels of every pass (model/kernels.py): auto | dense | a kernel | '<causal>,<gist>'.
    attention: str = "auto"

    def __post_init__(self) -> None:
        kind, sep, where = self.init.partition(":")
        if kind not in ("preset", "gguf", "hf", "params") or not sep or not where:
            raise ConfigError(f"model.init={self.init!r}: use preset:<name>, gguf:smollm2, gguf:<file>, "
                              "hf:<dir> or params:<dir>")
        if kind == "preset" and where not in PRESETS:
            raise ConfigError(f"model.init={self.init!r}: no preset {where!r}; use one of "
                              f"{', '.join('preset:' + name for name in sorted(PRESETS))}")
        for key in ("dtype", "param_dtype"):  # empty: keep the checkpoint's own
            if getattr(self, key):
                check_dtype_name(f"model.{key}", getattr(self, key))
        check_remat_policy("model.remat_policy", self.remat_policy)
        check_attention("model.attention", self.attention)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """Loop length and side-effect cadence (all in steps; 0 = off)."""

    max_steps: int = 0  # 0: run to optimizer.total_steps (set it lower for a partial run)
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 4
    eval_at_start: bool = False
    # Print the planner's per-device memory estimate before compiling (train/plan.py; one trace
    # of the step's backward on abstract inputs: seconds, against minutes of compile at scale).
    plan_memory: bool = True
    profile_start: int = 0  # trace steps [profile_start, profile_start + profile_steps) with jax.profiler
    profile_steps: int = 0

    def __post_init__(self) -> None:
        check_int("train.max_steps", self.max_steps, 0, fix="use 0 to run to optimizer.total_steps")
        for key in ("eval_every", "eval_batches", "profile_steps"):
            check_int(f"train.{key}", getattr(self, key), 0, fix="use 0 for off")
        check_int("train.profile_start", self.profile_start, 0, fix="give the first step to trace, e.g. 10")
        check_int("train.log_every", self.log_every, 1, fix="metrics need a cadence; use 1 or more")


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """Orbax checkpoints in ``<workdir>/checkpoints``: every N steps and at exit, the last
    ``keep`` plus every ``milestone_every``-th step forever. ``export_hf_every``: also write a
    Hugging Face export (``gist_jax.hf.export``) to ``<workdir>/hf/<step>`` every N steps and at
    the end (0: never)."""

    every: int = 100
    keep: int = 3
    milestone_every: int = 0
    async_save: bool = True
    export_hf_every: int = 0

    def __post_init__(self) -> None:
        check_int("checkpoint.every", self.every, 1, fix="save every N steps, e.g. 100")
        check_int("checkpoint.keep", self.keep, 1, fix="keep at least the newest checkpoint, e.g. 3")
        check_int("checkpoint.milestone_every", self.milestone_every, 0, fix="use 0 for no milestones")
        check_int("checkpoint.export_hf_every", self.export_hf_every, 0, fix="use 0 for no exports")


SECTIONS: dict[str, type | None] = {
    "model": ModelSection, "compression": CompressionConfig, "step": None, "mesh": MeshConfig,
    "optimizer": OptimizerConfig, "objective": ObjectiveConfig, "data": DataConfig, "train": TrainSection,
    "checkpoint": CheckpointSection,
}
STEP_KEYS = ("batch_size", "seq_len", "microbatches", "seed")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSection
    compression: CompressionConfig
    step: StepConfig
    data: DataConfig
    train: TrainSection
    checkpoint: CheckpointSection
    name: str = "run"

    @property
    def num_steps(self) -> int:
        return self.train.max_steps or self.step.optimizer.total_steps

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, in the sectioned shape of the experiment files (stored with checkpoints)."""
        step = dataclasses.asdict(self.step)
        out = {"name": self.name, "model": dataclasses.asdict(self.model),
               "compression": dataclasses.asdict(self.compression),
               "step": {k: step[k] for k in STEP_KEYS}, "mesh": step["mesh"], "optimizer": step["optimizer"],
               "objective": step["objective"], "data": dataclasses.asdict(self.data),
               "train": dataclasses.asdict(self.train), "checkpoint": dataclasses.asdict(self.checkpoint)}
        return out


def _defaults(cls: type) -> dict[str, Any]:
    return dataclasses.asdict(cls())


def default_config() -> ml_collections.ConfigDict:
    """Every key with its default; experiment files start from this and change what they need."""
    step = StepConfig()
    d: dict[str, Any] = {name: _defaults(cls) for name, cls in SECTIONS.items() if cls is not None}
    d["step"] = {k: getattr(step, k) for k in STEP_KEYS}
    d["name"] = "run"
    for key in LEGACY_KEYS:  # still accepted, as a string override (read by ``_legacy_attention``)
        section, field = key.split(".")
        d[section][field] = ""
    import ml_collections

    return ml_collections.ConfigDict(d)


def _section(cd: Any, name: str, cls: type, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    values = dict(cd.get(name, {}) or {}) if cd is not None else {}
    known = keys or tuple(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key {name}.{unknown[0]}; known keys of '{name}': {', '.join(known)}")
    return {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in values.items()}


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"config section '{section}': {e}") from None


def run_config(cd: ml_collections.ConfigDict | dict) -> RunConfig:
    """Validates and converts; raises ``ConfigError`` naming the offending key."""
    cd = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
    unknown = sorted(set(cd) - set(SECTIONS) - {"name"})
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]}; top-level keys: name, {', '.join(SECTIONS)}")
    cd = _legacy_attention(cd)
    comp = _build(CompressionConfig, _section(cd, "compression", CompressionConfig), "compression")
    step = StepConfig(**_section(cd, "step", StepConfig, STEP_KEYS),
                      mesh=_build(MeshConfig, _section(cd, "mesh", MeshConfig), "mesh"),
                      optimizer=_build(OptimizerConfig, _section(cd, "optimizer", OptimizerConfig), "optimizer"),
                      objective=_build(ObjectiveConfig, _section(cd, "objective", ObjectiveConfig), "objective"))
    run = RunConfig(model=_build(ModelSection, _section(cd, "model", ModelSection), "model"), compression=comp,
                    step=step, data=_build(DataConfig, _section(cd, "data", DataConfig), "data"),
                    train=_build(TrainSection, _section(cd, "train", TrainSection), "train"),
                    checkpoint=_build(CheckpointSection, _section(cd, "checkpoint", CheckpointSection), "checkpoint"),
                    name=str(cd.get("name", "run")))
    check_cross_fields(run)
    return run


def _legacy_attention(cd: dict[str, Any]) -> dict[str, Any]:
    """The deprecation shim: a run config (an old experiment file, a checkpoint's stored run) with
    ``model.attention_impl`` / ``compression.attention_impl`` is read as the one ``model.attention``
    they meant, with one warning line; both the old and the new key is a conflict."""
    cd = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cd.items()}
    old = {}
    for key in LEGACY_KEYS:
        section, field = key.split(".")
        value = (cd.get(section) or {}).pop(field, "")
        if value:
            old[key] = value
    if not old:
        return cd
    model = cd.setdefault("model", {})
    if model.get("attention", "auto") != "auto":
        raise ConfigError(f"model.attention={model['attention']!r} and the deprecated {', '.join(old)} are both set; "
                          "keep model.attention only")
    model["attention"] = legacy_attention(*(old.get(key) for key in LEGACY_KEYS))
    return cd


def check_cross_fields(run: RunConfig) -> None:
    comp, step = run.compression, run.step
    check_gist_kernel(run.model.attention, comp)
    if comp.enabled and step.seq_len % comp.segment_length and not comp.pad_to_segments:
        raise ConfigError(f"step.seq_len={step.seq_len} is not a whole number of segments of "
                          f"compression.segment_length={comp.segment_length}; use a multiple of it "
                          "or set compression.pad_to_segments=True")
    check_context_parallel(comp, step.seq_len, step.mesh.context)
    if run.train.max_steps > step.optimizer.total_steps:
        raise ConfigError(f"train.max_steps={run.train.max_steps} exceeds optimizer.total_steps="
                          f"{step.optimizer.total_steps}; the schedule would end before the run")


def check_model_matches_run(model_cfg: ModelConfig, run: RunConfig) -> None:
    """What only the base model's shape can decide: the AE layer must be one of its layers
    (Python indexing, -1 = the last). Without this check an out-of-range index is silently
    taken modulo the layer count (``train/ae.py``) and the AE trains on the wrong layer."""
    objective, layers = run.step.objective, model_cfg.num_layers
    if objectives(run.step, run.compression).ae and not -layers <= objective.ae_layer < layers:
        raise ConfigError(f"objective.ae_layer={objective.ae_layer}: the model has {layers} layers; use an index in "
                          f"[{-layers}, {layers - 1}] (-1: the last layer)")


def check_model_matches_data(model_cfg: ModelConfig, vocab_size: int, eos_id: int | None, tokenizer_spec: str) -> None:
    """The tokenizer feeding the model must fit its embedding table and share its EOS."""
    if vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"data.tokenizer={tokenizer_spec!r} has {vocab_size} tokens but the model's vocab_size is "
                          f"{model_cfg.vocab_size}; use the model's own tokenizer")
    if model_cfg.eos_token_id is not None and eos_id is not None and eos_id != model_cfg.eos_token_id:
        raise ConfigError(f"data.tokenizer={tokenizer_spec!r} has EOS id {eos_id} but the model's eos_token_id is "
                          f"{model_cfg.eos_token_id}; use the model's own tokenizer")
