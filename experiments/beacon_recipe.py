"""Activation Beacon's recipe (Zhang et al. 2024) on SmolLM2-135M-Instruct: the base model stays
frozen and only the gist parameters train (the shared gist embedding and separate gist q/k/v
projections in every layer, initialised from the base ones), Fine-KV with a ratio drawn per
segment from {2, 4, 8, 16, 32} (Beacon's ``step-random``), 1K windows, lr 5e-5 decaying to 0,
no packing: one document per sequence, documents of 2.4K-20K tokens only, about 1B tokens.

    python -m gist_jax.main --config experiments/beacon_recipe.py --workdir runs/beacon

Beacon decays the learning rate linearly; gist_jax's schedule is warmup + cosine, so this uses
cosine to 0 (``optimizer.min_lr_ratio=0``). Beacon trains a chat model, hence the packaged
SmolLM2-135M-Instruct; for another model give its local HF download:

    python -m gist_jax.main --config experiments/beacon_recipe.py --workdir runs/beacon_llama2 \\
        --config.model.init=hf:/path/to/Llama-2-7b-chat-hf --config.data.tokenizer=hf:/path/to/Llama-2-7b-chat-hf \\
        --config.data.sources="(('jsonl:/data/redpajama_sample/*.jsonl#text', 1.0),)"

Variants (comma-separated after ``:``), e.g. the paper's objectives on top, or the toy scale:

    python -m gist_jax.main --config experiments/beacon_recipe.py:ae,tie --workdir runs/beacon_ae_tie
    python -m gist_jax.main --config experiments/beacon_recipe.py:coarse_kv --workdir runs/beacon_coarse_kv
    python -m gist_jax.main --config experiments/beacon_recipe.py:tiny --workdir /tmp/beacon_tiny
"""

from __future__ import annotations

from gist_jax.experiments import _common
from gist_jax.train.experiment import default_config

# Beacon's corpus filter as upsampling rules (a document takes the rate of the rule with the
# largest min_tokens <= its length): shorter than 2400 or longer than 20000 tokens -> dropped.
DOC_LENGTH_FILTER = (("*", 0, 0.0), ("*", 2400, 1.0), ("*", 20001, 0.0))


def base() -> _common.ConfigDict:
    c = default_config()
    c.model.init = "gguf:smollm2"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat_policy = "qkv_proj_attn_out"
    c.compression.memory = "kv"
    c.compression.granularity = "fine"
    c.model.attention = "auto"  # flash (cuDNN) on GPU, decomposed elsewhere (docs/performance.md)
    c.compression.segment_length = 1024
    c.compression.ratios = (2, 4, 8, 16, 32)
    c.compression.ratio_sampling = "per_segment"
    c.compression.num_sinks = 4
    c.compression.positions = "compressed"
    c.compression.gist_embedding = "shared"
    c.compression.gist_projections = True
    c.compression.trainable = "gist_only"
    c.objective.ae = False
    c.objective.tie = False
    c.step.batch_size = 16
    c.step.seq_len = 8192
    c.step.microbatches = 2
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.optimizer.learning_rate = 5e-5
    c.optimizer.warmup_fraction = 0.01
    c.optimizer.min_lr_ratio = 0.0
    c.optimizer.total_steps = 8000  # 16 x 8192 x 8000 = 1.05B token slots (less real text: no packing)
    c.optimizer.weight_decay = 0.0  # only a few gist parameters train
    c.data.sources = (("stdlib", 1.0),)
    c.data.tokenizer = "gguf:smollm2"
    c.data.packing = "none"
    c.data.upsampling = DOC_LENGTH_FILTER
    _common.recipe_cadence(c, every=500, eval_batches=16, milestone_every=2000)
    return c


def _tiny(c: _common.ConfigDict) -> None:
    """Toy scale, same structure: every ratio per segment, gist-only training, no packing, a
    length filter (scaled to bytes: documents under 64 bytes dropped)."""
    _common.make_tiny(c, seq_len=128, segment_length=32, ratios=(2, 4, 8, 16, 32), max_documents=40)
    c.data.upsampling = (("*", 0, 0.0), ("*", 64, 1.0))


VARIANTS: dict[str, _common.Variant] = {
    **_common.SHARED,
    "tiny": _common.Variant("size", _tiny,
                            "random preset:tiny on stdlib bytes; 128 tokens = 4 segments of 32, 6 steps"),
}


def get_config(arg: str | None = None) -> _common.ConfigDict:
    return _common.apply_variants(base(), arg, VARIANTS, "beacon_recipe.py")
