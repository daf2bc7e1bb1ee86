"""Qwen2-7B, the paper's recipe (Deng et al., ACL 2025): 16K context, 2K segments, 4 sinks,
ratios {4, 8, 16, 32} sampled per instance, lr 1e-5, 1% warmup, cosine to 50%, 2.5B tokens of
SlimPajama with long documents upsampled. The recipe itself is in ``experiments/_paper.py``;
only the mesh differs from ``llama3_8b_paper.py`` (28 heads and 4 KV heads: tensor 4).

Point it at a local Hugging Face download of the base model and at your corpus; the default
variant is Fine-KV without AE/TIE:

    python -m gist_jax.main --config experiments/qwen2_7b_paper.py --workdir runs/qwen2_fine_kv \\
        --config.model.init=hf:/path/to/Qwen2-7B \\
        --config.data.tokenizer=hf:/path/to/Qwen2-7B \\
        --config.data.sources="(('jsonl:/data/slimpajama/train/**/*.jsonl#text', 1.0),)"

The study's variants and switches, comma-separated after ``:`` (``...`` = the overrides above):

    python -m gist_jax.main --config experiments/qwen2_7b_paper.py:coarse_rec --workdir runs/qwen2_coarse_rec ...
    python -m gist_jax.main --config experiments/qwen2_7b_paper.py:coarse_kv --workdir runs/qwen2_coarse_kv ...
    python -m gist_jax.main --config experiments/qwen2_7b_paper.py:fine_kv,ae,tie \\
        --workdir runs/qwen2_fine_kv_ae_tie ...
    python -m gist_jax.main --config experiments/qwen2_7b_paper.py:full --workdir runs/qwen2_full ...

Sizing: 128 sequences x 16K per step in 8 microbatches on a mesh of fsdp x tensor=4, e.g. 64
accelerators with 80 GiB: about 23 GiB per device with AE and TIE at the worst-case ratio 4 by

    python -m gist_jax.train.plan --config experiments/qwen2_7b_paper.py:ae,tie --devices 64 \\
        --config.model.init=preset:qwen2_7b

On N devices keep batch_size / microbatches = N / 4 (``--config.step.microbatches=...``).

The recipe at toy scale (random 2-layer byte model, 8 segments of 32 tokens, seconds on a CPU):

    python -m gist_jax.main --config experiments/qwen2_7b_paper.py:tiny --workdir /tmp/qwen2_paper_tiny
    python -m gist_jax.main --config experiments/qwen2_7b_paper.py:coarse_kv,ae,tiny --workdir /tmp/qwen2_paper_kv_tiny
"""

from __future__ import annotations

from gist_jax.experiments import _common, _paper
from gist_jax.train.experiment import default_config

VARIANTS = _paper.VARIANTS  # the shared architectures and objectives, and the recipe's own tiny

HF_DIR = "/path/to/Qwen2-7B"  # placeholder: override model.init and data.tokenizer


def get_config(arg: str | None = None) -> _common.ConfigDict:
    c = default_config()
    _paper.paper_recipe(c, hf_dir=HF_DIR, tensor=4, microbatches=8)  # 28 heads, 4 KV heads: tensor 4 divides both
    return _common.apply_variants(c, arg, VARIANTS, "qwen2_7b_paper.py")
