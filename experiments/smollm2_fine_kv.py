"""SmolLM2-135M, Fine-KV continued training with AE + TIE, sized for one 8-accelerator host.

The paper's recipe scaled to a small model: 8K context in 8 segments of 1024, one ratio per
sequence from {4, 8, 16, 32}, 4 sinks, bf16 compute with fp32 master weights, remat of
everything but the q/k/v projections and attention outputs. 32 sequences x 8192 tokens per
step (262K tokens) in 4 microbatches; 2000 steps is about 0.5B tokens.

    python -m gist_jax.main --config experiments/smollm2_fine_kv.py --workdir runs/smollm2_fine_kv

Weights: the packaged GGUF (``gguf:smollm2``, SmolLM2-135M-Instruct) by default. For the base
model, point at a local Hugging Face download and use its tokenizer:

    python -m gist_jax.main --config experiments/smollm2_fine_kv.py --workdir runs/smollm2_fine_kv \\
        --config.model.init=hf:/path/to/SmolLM2-135M --config.data.tokenizer=hf:/path/to/SmolLM2-135M

Data: the built-in ``stdlib`` corpus so the command runs as is; for a real run give your own
text, e.g. ``--config.data.sources="(('jsonl:/data/slimpajama/train/*.jsonl#text', 1.0),)"``
(documents of 4K+ tokens are upsampled 2x, see ``data.upsampling``).

Memory per device before launching (about 2.6 GiB each on 8 devices at the worst-case ratio 4):

    python -m gist_jax.train.plan --config experiments/smollm2_fine_kv.py --devices 8

Variants (comma-separated after ``:``): the architectures and objectives of the study, and
``tiny`` (random 2-layer byte model, 64-token sequences, seconds on a CPU):

    python -m gist_jax.main --config experiments/smollm2_fine_kv.py:tiny --workdir /tmp/smollm2_fine_kv_tiny
    python -m gist_jax.main --config experiments/smollm2_fine_kv.py:coarse_kv --workdir runs/smollm2_coarse_kv
    python -m gist_jax.main --config experiments/smollm2_fine_kv.py:coarse_rec --workdir runs/smollm2_coarse_rec
    python -m gist_jax.main --config experiments/smollm2_fine_kv.py:full --workdir runs/smollm2_full
    python -m gist_jax.main --config experiments/smollm2_fine_kv.py:noae,notie --workdir runs/smollm2_fine_kv_plain
"""

from __future__ import annotations

from gist_jax.experiments import _common
from gist_jax.train.experiment import default_config


def base() -> _common.ConfigDict:
    c = default_config()
    c.model.init = "gguf:smollm2"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.scan_layers = True
    c.model.remat_policy = "qkv_proj_attn_out"
    c.compression.memory = "kv"
    c.compression.granularity = "fine"
    c.model.attention = "auto"  # flash (cuDNN) on GPU, decomposed elsewhere (docs/performance.md)
    c.compression.segment_length = 1024
    c.compression.ratios = (4, 8, 16, 32)
    c.compression.ratio_sampling = "per_instance"
    c.compression.num_sinks = 4
    c.objective.ae = True
    c.objective.tie = True
    c.step.batch_size = 32
    c.step.seq_len = 8192
    c.step.microbatches = 4
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.optimizer.learning_rate = 5e-5  # a 135M model tolerates more than the paper's 1e-5 for 8B
    c.optimizer.warmup_fraction = 0.01
    c.optimizer.min_lr_ratio = 0.5
    c.optimizer.total_steps = 2000
    c.data.sources = (("stdlib", 1.0),)
    c.data.tokenizer = "gguf:smollm2"
    c.data.packing = "concat"
    c.data.upsampling = (("*", 4096, 2.0),)
    _common.recipe_cadence(c, every=200, eval_batches=16, milestone_every=1000)
    return c


def _tiny(c: _common.ConfigDict) -> None:
    _common.make_tiny(c, seq_len=128, segment_length=32, ratios=(4, 8, 16, 32))


VARIANTS: dict[str, _common.Variant] = {
    **_common.SHARED,
    "tiny": _common.Variant("size", _tiny, "random preset:tiny, bytes, 128-token sequences of 4 segments, 6 steps"),
}


def get_config(arg: str | None = None) -> _common.ConfigDict:
    return _common.apply_variants(base(), arg, VARIANTS, "smollm2_fine_kv.py")
