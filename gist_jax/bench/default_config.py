"""The benchmark's built-in run config: what ``python -m gist_jax.bench`` times without ``--config``.

    python -m gist_jax.bench --peer
    python -m gist_jax.bench --config gist_jax/bench/default_config.py:coarse_kv --config.step.seq_len=2048

A random ``preset:tiny`` model, one device, Fine-KV at 4096 tokens in segments of 512, ratio 8
(fixed), 4 sinks, batch 1, no remat, no AE/TIE: one step in about a second on a CPU. Every key
is a ``--config.<key>=<value>`` away (``--config.model.init=preset:bench_1b``,
``--config.model.attention=split``, ``--config.objective.tie=True``, ...). Variants
(comma-separated after ``:``): the architectures ``full``, ``fine_kv``, ``coarse_kv``,
``coarse_rec``, ``unigist`` (``ARCHITECTURES``, the same keys as ``experiments/_common.py`` sets). A plain
config file with no imports from ``experiments/``, so it works wherever the package is installed.
"""

from __future__ import annotations

from typing import Any

# name -> the keys an architecture sets (as experiments/_common.py's variants of the same names).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "full": {"compression.memory": "none", "compression.granularity": "fine",
             "objective.ae": False, "objective.tie": False, "compression.trainable": "all",
             "compression.bptt_segments": 0, "compression.window": 0},
    "fine_kv": {"compression.memory": "kv", "compression.granularity": "fine", "compression.bptt_segments": 0,
                "compression.window": 0},
    "coarse_kv": {"compression.memory": "kv", "compression.granularity": "coarse", "compression.bptt_segments": 0,
                  "compression.window": 0},
    "coarse_rec": {"compression.memory": "recurrent", "compression.granularity": "coarse",
                   "compression.window": 0},
    # UniGist with a window of the built-in segment length (512 raw tokens); aligned positions.
    "unigist": {"compression.memory": "kv", "compression.granularity": "fine", "compression.bptt_segments": 0,
                "compression.positions": "aligned", "compression.window": 512},
}


def base():
    from gist_jax.train.experiment import default_config

    c = default_config()
    c.name = "bench"
    c.model.init = "preset:tiny"
    c.model.remat_policy = "none"
    c.compression.memory = "kv"
    c.compression.granularity = "fine"
    c.compression.segment_length = 512
    c.compression.ratios = (8,)
    c.compression.ratio_sampling = "fixed"
    c.compression.num_sinks = 4
    c.model.attention = "auto"
    c.objective.ae = False
    c.objective.tie = False
    c.step.batch_size = 1
    c.step.seq_len = 4096
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.optimizer.learning_rate = 1e-4
    c.optimizer.total_steps = 1000
    c.data.tokenizer = "bytes"
    return c


def get_config(arg: str | None = None):
    from gist_jax.errors import ConfigError

    c = base()
    names = [n.strip() for n in (arg or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in ARCHITECTURES]
    if unknown or len(names) > 1:
        raise ConfigError(f"default_config.py:{arg}: name one architecture variant of {', '.join(ARCHITECTURES)}")
    for name in names:
        for key, value in ARCHITECTURES[name].items():
            section, field = key.split(".")
            c[section][field] = value
        c.name = f"bench:{name}"
    return c
