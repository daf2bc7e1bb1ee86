"""Llama-3.1-8B, the paper's recipe (Deng et al., ACL 2025): 16K context, 2K segments, 4 sinks,
ratios {4, 8, 16, 32} sampled per instance, lr 1e-5, 1% warmup, cosine to 50%, 2.5B tokens of
SlimPajama with long documents upsampled. The recipe itself is in ``experiments/_paper.py``.

Point it at a local Hugging Face download of the base model (config.json, safetensors,
tokenizer files; nothing is fetched from a hub) and at your corpus; the default variant is
Fine-KV without AE/TIE:

    python -m gist_jax.main --config experiments/llama3_8b_paper.py --workdir runs/llama3_fine_kv \\
        --config.model.init=hf:/path/to/Meta-Llama-3.1-8B \\
        --config.data.tokenizer=hf:/path/to/Meta-Llama-3.1-8B \\
        --config.data.sources="(('jsonl:/data/slimpajama/train/**/*.jsonl#text', 1.0),)"

(``tfds:<name>[:<version>][@<data_dir>]#<field>`` sources work too; ``gist_jax.data.local_text_builder``
turns a directory of files into one.) The study's variants and switches, comma-separated after ``:``:

    python -m gist_jax.main --config experiments/llama3_8b_paper.py:coarse_rec --workdir runs/llama3_coarse_rec ...
    python -m gist_jax.main --config experiments/llama3_8b_paper.py:coarse_kv --workdir runs/llama3_coarse_kv ...
    python -m gist_jax.main --config experiments/llama3_8b_paper.py:fine_kv,ae,tie \\
        --workdir runs/llama3_fine_kv_ae_tie ...
    python -m gist_jax.main --config experiments/llama3_8b_paper.py:full --workdir runs/llama3_full ...

(``...`` = the three ``--config`` overrides above.) All of them over a grid:
``python -m launch.sweep experiments/sweeps/paper_variants.py --print``.

Sizing: 128 sequences x 16K per step in 16 microbatches on a mesh of fsdp x tensor=8, e.g. 64
accelerators with 80 GiB (8 nodes of 8 H100, a v5p-128): about 23 GiB per device with AE and
TIE at the worst-case ratio 4 (the planner reads this file; only the model's shape comes from
the preset) by

    python -m gist_jax.train.plan --config experiments/llama3_8b_paper.py:ae,tie --devices 64 \\
        --config.model.init=preset:llama3_8b

On N devices keep batch_size / microbatches = N / 8 (``--config.step.microbatches=...``).
Multi-host launch: ``launch/tpu_pod.sh`` and ``launch/slurm.sbatch``.

The recipe at toy scale (random 2-layer byte model, 8 segments of 32 tokens, seconds on a CPU):

    python -m gist_jax.main --config experiments/llama3_8b_paper.py:tiny --workdir /tmp/llama3_paper_tiny
    python -m gist_jax.main --config experiments/llama3_8b_paper.py:coarse_rec,ae,tie,tiny \\
        --workdir /tmp/llama3_paper_rec_tiny
"""

from __future__ import annotations

from gist_jax.experiments import _common, _paper
from gist_jax.train.experiment import default_config

VARIANTS = _paper.VARIANTS  # the shared architectures and objectives, and the recipe's own tiny

HF_DIR = "/path/to/Meta-Llama-3.1-8B"  # placeholder: override model.init and data.tokenizer


def get_config(arg: str | None = None) -> _common.ConfigDict:
    c = default_config()
    _paper.paper_recipe(c, hf_dir=HF_DIR, tensor=8, microbatches=16)  # 32 heads, 8 KV heads: tensor 8 divides both
    return _common.apply_variants(c, arg, VARIANTS, "llama3_8b_paper.py")
