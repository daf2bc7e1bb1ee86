"""The study's grid on the Llama-3.1-8B paper recipe: architecture x training ratio x AE x TIE,
plus the full-attention baseline once (61 runs). Each run is a multi-host job, so print the
commands and hand them to the cluster; point every run at your model and corpus with --extra:

    python -m launch.sweep experiments/sweeps/paper_variants.py --print \\
        --launcher "sbatch --nodes=8 launch/slurm.sbatch" --extra \\
        --config.model.init=hf:/path/to/Meta-Llama-3.1-8B --config.data.tokenizer=hf:/path/to/Meta-Llama-3.1-8B \\
        --config.data.sources="(('jsonl:/data/slimpajama/train/**/*.jsonl#text', 1.0),)"

A part of it: ``--only 'fine_kv-*'`` (Fine-KV rows), ``--only 'fine_kv-mix*,full-mix'``.
When the runs are done (their workdirs under one root): ``python -m launch.sweep summary runs/paper_variants``.

Axes: ``variant`` (coarse_rec, coarse_kv, fine_kv, full), ``ratio`` (``mix``: one ratio per
sequence from {4, 8, 16, 32}, the paper's training; ``r4``..``r32``: one fixed ratio), ``ae``
and ``tie`` (label present = on). Names: ``fine_kv-mix``, ``coarse_rec-r8-ae-tie``, ``full-mix``.
The same grid at toy scale (``--variants tiny`` adds the config's ``tiny`` variant to every
run), to try it all on a CPU first (16 runs of seconds each):

    JAX_PLATFORMS=cpu python -m launch.sweep experiments/sweeps/paper_variants.py --variants tiny \\
        --only 'fine_kv-*' --workdir_root /tmp/paper_variants_tiny
"""

RATIOS = (4, 8, 16, 32)


def fixed_ratio(r: int) -> tuple[str, dict]:
    """A choice that trains at one compression ratio instead of sampling one per sequence."""
    return f"r{r}", {"compression.ratios": (r,), "compression.ratio_sampling": "fixed"}


BASE = "experiments/llama3_8b_paper.py"
AXES = {
    "variant": ["coarse_rec", "coarse_kv", "fine_kv", "full"],
    "ratio": [("mix", {}), *(fixed_ratio(r) for r in RATIOS)],
    "ae": [("", "noae"), ("ae", "ae")],
    "tie": [("", "notie"), ("tie", "tie")],
}


def include(labels: dict[str, str]) -> bool:
    """The full-attention baseline has no ratio, gists or AE/TIE: one run of it, not twenty."""
    return labels["variant"] != "full" or (labels["ratio"] == "mix" and not labels["ae"] and not labels["tie"])
