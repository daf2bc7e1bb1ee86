"""The recipe of Deng et al. (ACL 2025, section 4 of docs/method.md), shared by the Llama
and Qwen configs so the two can only differ in what the models force to differ.

Stated by the paper: continued pretraining of a base model on SlimPajama with long documents
upsampled (Fu et al. 2024), documents separated by EOS, 16K context in 2K segments, 4 sinks,
ratios {4, 8, 16, 32} sampled per instance, peak lr 1e-5 with 1% warmup and cosine decay to 50%.
Not stated, decided here: AdamW (b2 0.95, weight decay 0.1, clip 1.0), 128 x 16K = 2.1M tokens
per step (UniGist's ~2M), 1200 steps = 2.5B tokens (the paper's 2-3B), bf16 compute with fp32
master weights, full remat, the upsampling rates below, and AE/TIE off by default (they are the
paper's additions on top of the plain variants; turn them on with the ``ae`` and ``tie``
variants).
"""

from __future__ import annotations

from gist_jax.experiments import _common

SEQ_LEN = 16384
SEGMENT_LENGTH = 2048
RATIOS = (4, 8, 16, 32)
NUM_SINKS = 4
BATCH_SIZE = 128  # sequences per step: 2.1M tokens
TOTAL_STEPS = 1200  # 2.5B tokens
# Fu et al. 2024 per-source length upsampling: keep each source's share of tokens, but within it
# repeat documents of 4K+ tokens twice and 16K+ (a whole training sequence) four times per epoch.
# Rules name "*" so they apply to every source; a rule per source spec overrides it.
LONG_DOC_UPSAMPLING = (("*", 4096, 2.0), ("*", 16384, 4.0))
# A placeholder corpus: decompress SlimPajama's .jsonl.zst shards to .jsonl first (the reader
# takes plain JSONL); or name any other source spec (files:, jsonl:, tfds:, seqio:).
SLIMPAJAMA = "jsonl:/path/to/SlimPajama-627B/train/**/*.jsonl#text"


def paper_recipe(c: _common.ConfigDict, *, hf_dir: str, tensor: int, microbatches: int) -> None:
    """Fills ``c`` (from ``default_config()``) with the recipe; Fine-KV, no AE/TIE."""
    c.model.init = f"hf:{hf_dir}"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.scan_layers = True
    c.model.remat_policy = "full"
    c.compression.memory = "kv"
    c.compression.granularity = "fine"
    c.model.attention = "auto"  # flash (cuDNN) on GPU, decomposed elsewhere (docs/performance.md)
    c.compression.segment_length = SEGMENT_LENGTH
    c.compression.ratios = RATIOS
    c.compression.ratio_sampling = "per_instance"
    c.compression.num_sinks = NUM_SINKS
    c.compression.positions = "compressed"
    c.compression.trainable = "all"
    c.objective.ae = False
    c.objective.tie = False
    c.objective.include_first_segment = True
    c.step.seq_len = SEQ_LEN
    c.step.batch_size = BATCH_SIZE
    c.step.microbatches = microbatches
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, tensor
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_fraction = 0.01
    c.optimizer.min_lr_ratio = 0.5
    c.optimizer.total_steps = TOTAL_STEPS
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.95
    c.optimizer.weight_decay = 0.1
    c.optimizer.grad_clip_norm = 1.0
    c.data.sources = ((SLIMPAJAMA, 1.0),)
    c.data.tokenizer = f"hf:{hf_dir}"
    c.data.packing = "concat"  # documents joined with EOS, as the paper does
    c.data.upsampling = LONG_DOC_UPSAMPLING
    c.data.add_bos = False  # EOS after every document is the only separator
    _common.recipe_cadence(c, every=100, eval_batches=32, milestone_every=400)


def tiny(c: _common.ConfigDict) -> None:
    """The recipe at toy scale, same structure: 8 segments per sequence, every ratio of the
    recipe, 4 sinks, long-document upsampling (thresholds scaled to bytes), 2 microbatches,
    full remat; random ``preset:tiny`` weights on the stdlib corpus."""
    _common.make_tiny(c, seq_len=256, segment_length=32, ratios=RATIOS, batch_size=16)
    c.step.microbatches = 2
    c.model.remat_policy = "full"
    c.data.upsampling = (("*", 256, 2.0), ("*", 1024, 4.0))


VARIANTS: dict[str, _common.Variant] = {
    **_common.SHARED,
    "tiny": _common.Variant("size", tiny, "random preset:tiny on stdlib bytes; 256 tokens = 8 segments of 32, 6 steps"),
}
