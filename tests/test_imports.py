"""The core (model, attention, gist, train step) imports without tensorflow, seqio or torch:
the GPU machines have none of them."""

from __future__ import annotations

import subprocess
import sys

CORE = ["gist_jax.model.transformer", "gist_jax.gist.forward", "gist_jax.gist.sequential",
        "gist_jax.train.step", "gist_jax.train.plan", "gist_jax.train.loop", "gist_jax.train.flops",
        "gist_jax.hf.importer", "gist_jax.hf.export", "gist_jax.data.tokenizer", "gist_jax.data.loader",
        "gist_jax.inference.decode", "gist_jax.evaluate", "gist_jax.evaluate.perplexity",
        "gist_jax.evaluate.boundary", "gist_jax.evaluate.probes",
        "gist_jax.evaluate.reconstruction", "gist_jax.gist.structured", "gist_jax.gist.flash",
        "gist_jax.gist.bank", "gist_jax.bench.train_bench", "gist_jax.bench.sweep",
        "gist_jax.bench.decode_bench", "gist_jax.cli_config", "gist_jax.bench.recipe"]


def test_core_imports_without_tensorflow_or_torch():
    code = ("import sys; " + "; ".join(f"import {m}" for m in CORE) +
            "; print(','.join(m for m in ('tensorflow', 'seqio', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core imported: {out.stdout.strip()}"
