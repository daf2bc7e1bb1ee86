"""Two architectures x two fixed ratios on the demo's ``tiny`` config: four 6-step runs of a
random byte-level model, about a minute in all on a CPU. The end-to-end test of the sweep
launcher runs exactly this.

    JAX_PLATFORMS=cpu python -m launch.sweep experiments/sweeps/tiny_variants.py --workdir_root /tmp/tiny_variants
    python -m launch.sweep summary /tmp/tiny_variants

Runs: fine_kv-r4, fine_kv-r8, coarse_kv-r4, coarse_kv-r8 (``--print`` shows their commands,
``--only 'fine_kv-*'`` picks some).
"""


def fixed_ratio(r: int) -> tuple[str, dict]:
    """A choice that trains at one compression ratio instead of sampling one per sequence."""
    return f"r{r}", {"compression.ratios": (r,), "compression.ratio_sampling": "fixed"}


BASE = "experiments/demo.py:tiny"
COMMON = {"train.eval_batches": 1}
AXES = {
    "variant": ["fine_kv", "coarse_kv"],
    "ratio": [fixed_ratio(4), fixed_ratio(8)],
}
