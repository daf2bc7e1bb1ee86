"""Training-step configuration: mesh, batch, optimizer, objectives. One frozen schema per
concern, validated on construction; the experiment configs (ml_collections) fill these."""

from __future__ import annotations

import dataclasses

from gist_jax.errors import ConfigError
from gist_jax.model.config import check_float, check_int


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; one of data, fsdp, tensor may be -1 for "all remaining devices".
    ``context`` splits each sequence into contiguous blocks of whole segments, one per device
    along it (context parallelism, ``gist/context_parallel.py``): only gist K/V crosses it."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    context: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 1:
            raise ConfigError(f"mesh.context={self.context!r} must be a positive number of devices "
                              "(1: no context parallelism)")
        sizes = self.sizes()
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ConfigError(f"mesh {sizes}: at most one axis may be -1")
        bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
        if bad:
            raise ConfigError(f"mesh axis sizes {bad} must be positive or -1")

    def sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "context": self.context, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping; linear warmup then cosine decay to a floor.

    Paper recipe: peak lr 1e-5, 1% warmup, cosine to 50% of peak."""

    learning_rate: float = 1e-5
    warmup_fraction: float = 0.01
    min_lr_ratio: float = 0.5
    total_steps: int = 1000
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0

    def __post_init__(self) -> None:
        check_float("optimizer.learning_rate", self.learning_rate, low_open=True, fix="use e.g. 1e-5")
        check_float("optimizer.warmup_fraction", self.warmup_fraction, 0.0, 1.0, high_open=True,
                    fix="use the share of total_steps spent warming up, e.g. 0.01")
        check_float("optimizer.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0,
                    fix="use the final learning rate as a fraction of the peak, e.g. 0.5")
        check_int("optimizer.total_steps", self.total_steps, 1)
        for key in ("b1", "b2"):
            check_float(f"optimizer.{key}", getattr(self, key), 0.0, 1.0, high_open=True,
                        fix="Adam's moment decay is in [0, 1), e.g. b1=0.9, b2=0.95")
        check_float("optimizer.eps", self.eps, low_open=True, fix="use e.g. 1e-8 (0 divides by zero on unused rows)")
        check_float("optimizer.weight_decay", self.weight_decay, fix="use 0 for none, e.g. 0.1")
        check_float("optimizer.grad_clip_norm", self.grad_clip_norm, low_open=True,
                    fix="gradients are always clipped to this global norm: use e.g. 1.0, or 1e9 to "
                        "make the clip a no-op")

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_fraction * self.total_steps)


AE_INITS = ("copy", "copy_first", "fresh")  # objective.ae_init (gist_jax/train/ae.py init_ae_params)
AE_NORMALIZATIONS = ("gist", "token")  # objective.ae_normalization (gist_jax/train/ae.py ae_loss)
AE_DECODER_OUTPUTS = ("residual", "update")  # objective.ae_decoder_output (gist_jax/train/ae.py ae_loss)


def check_tie_weights_path(path: object) -> None:
    """``objective.tie_weights_path``: empty (the default location) or a local ``.npy`` path; a
    URL is refused because the loader memory-maps the file (every process reads its own rows)."""
    key = "objective.tie_weights_path"
    if not isinstance(path, str):
        raise ConfigError(f"{key}={path!r} must be a string: a .npy path, or '' for the default location "
                          "under data.cache_dir")
    if path and (not path.endswith(".npy") or "://" in path):
        raise ConfigError(f"{key}={path!r}: give a local file path ending in .npy (its .json sidecar is written "
                          "beside it), or '' for the default location under data.cache_dir")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """LM loss (optionally TIE-weighted) plus lambda * AE loss; both extras can be off.

    tie_source: ``online`` runs the two frozen-reference passes inside the step;
    ``precomputed`` reads per-token weights from the batch (``batch['tie_weights']``), which the
    loader serves from a file ``python -m gist_jax.train.tie_precompute`` writes once
    (``gist_jax/train/tie_store.py``): the two reference forwards leave the step.
    tie_weights_path: that file (``.npy``, with its ``.json`` sidecar beside it); ``""`` puts it
    under ``data.cache_dir``, beside the token stores, named after the data stream. Only read
    with ``tie_source="precomputed"``; where the weights live may change on resume (the file's
    sidecar, not its path, is checked against the run).
    loss_chunk: tokens per chunk of the LM head + cross-entropy (``gist_jax/model/loss.py``);
    the step's logits peak is ``microbatch x loss_chunk x V`` float32, never ``x T``.

    AE keys (method.md 4.1; measurements in docs/ae.md):
    ae_lambda: weight of L_ae in ``L = L_lm + ae_lambda * L_ae``.
    ae_layer: the layer whose gist key/value the decoder reads (-1: the last).
    ae_init: the decoder block's initialisation: ``copy`` (of layer ``ae_layer``, method.md),
    ``copy_first`` (of layer 0, the block that reads token embeddings, like the decoder does) or
    ``fresh`` (random, the model's init).
    ae_train_shared: whether L_ae's gradient reaches the model's token embedding, final norm and
    LM head, which the decoder uses for its inputs and outputs. True is method.md as written;
    False stops it there, so the AE can only change the gists and the layers writing their KV.
    With a tied head the untrained decoder's early loss (~34 nats/token on SmolLM2) otherwise
    rewrites the base model's embeddings and full-attention perplexity rises.
    ae_normalization: ``gist`` (mean over gists of the per-token mean, method.md) or ``token``
    (mean over all reconstructed tokens); they differ only when spans differ in length.
    ae_decoder_output: what the final norm and LM head read: ``residual`` (the block's output
    residual stream, method.md) or ``update`` (that stream minus the decoder's input embedding,
    i.e. the block's own contribution). With a tied head the residual carries the input token
    x_(j-1), so an untrained decoder was thought to predict its own input; ``update`` removes that
    path, and measured it does not help: the start loss stays ~34 nats/token (docs/ae.md).
    ae_base_warmup_steps: for the first N steps L_ae trains the decoder (and ``[ae]_r``) alone: its
    gradient into the gist key/value, and through it into the gists and the base layers, is
    stopped, so the decoder learns to read the gist KV before its gradient shapes the compressor.
    """

    tie: bool = False
    tie_gamma: float = 2.0
    tie_rescale: bool = True
    tie_source: str = "online"
    tie_weights_path: str = ""
    ae: bool = False
    ae_lambda: float = 1.0
    ae_layer: int = -1
    ae_init: str = "copy"
    ae_train_shared: bool = False
    ae_normalization: str = "gist"
    ae_decoder_output: str = "residual"
    ae_base_warmup_steps: int = 0
    include_first_segment: bool = True
    loss_chunk: int = 1024

    def __post_init__(self) -> None:
        check_int("objective.loss_chunk", self.loss_chunk, 1, fix="use e.g. 1024 tokens")
        if self.tie_source not in ("online", "precomputed"):
            raise ConfigError(f"objective.tie_source={self.tie_source!r} must be 'online' or 'precomputed'")
        check_tie_weights_path(self.tie_weights_path)
        check_float("objective.tie_gamma", self.tie_gamma, low_open=True, fix="use e.g. 2.0")
        check_float("objective.ae_lambda", self.ae_lambda, fix="use 0 to turn the AE loss off, e.g. 1.0")
        if self.ae_init not in AE_INITS:
            raise ConfigError(f"objective.ae_init={self.ae_init!r} must be one of {', '.join(AE_INITS)} "
                              "(copy: of layer ae_layer; copy_first: of layer 0; fresh: random)")
        if self.ae_normalization not in AE_NORMALIZATIONS:
            raise ConfigError(f"objective.ae_normalization={self.ae_normalization!r} must be one of "
                              f"{', '.join(AE_NORMALIZATIONS)} (gist: mean over gists; token: mean over tokens)")
        if self.ae_decoder_output not in AE_DECODER_OUTPUTS:
            raise ConfigError(f"objective.ae_decoder_output={self.ae_decoder_output!r} must be one of "
                              f"{', '.join(AE_DECODER_OUTPUTS)} (residual: method.md; update: minus its input)")
        check_int("objective.ae_base_warmup_steps", self.ae_base_warmup_steps, 0,
                  fix="use 0 to let L_ae reach the gists from the first step")
        # ae_layer's range needs the model's layer count: gist_jax.train.experiment.check_model_matches_run
        # checks it once the model config is known (before the weights load where that is cheap).


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything the jitted update depends on besides the model and compression configs."""

    batch_size: int = 8  # global sequences per step
    seq_len: int = 2048  # raw tokens per sequence
    microbatches: int = 1  # gradient accumulation steps inside one update
    mesh: MeshConfig = MeshConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("step.batch_size", self.batch_size, 1, fix="use the global number of sequences per step, e.g. 8")
        check_int("step.seq_len", self.seq_len, 1, fix="use the raw tokens per sequence, e.g. 2048")
        check_int("step.microbatches", self.microbatches, 1, fix="use 1 for no gradient accumulation")
        check_int("step.seed", self.seed, 0)
        if self.batch_size % self.microbatches:
            raise ConfigError(f"step.batch_size={self.batch_size} is not divisible by "
                              f"step.microbatches={self.microbatches}")
