"""The real SmolLM2-135M from its GGUF: gist_jax against transformers' own GGUF load."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gist_jax.data.tokenizer import HFTokenizer
from gist_jax.hf import reference
from gist_jax.hf.importer import load_gguf
from gist_jax.inference.reference_decode import greedy_generate
from gist_jax.model.params_io import load_params, save_params
from gist_jax.model.transformer import forward

pytestmark = pytest.mark.slow

PROMPT = ("Gist tokens compress a long context into a few learned summary vectors, so that a "
          "language model can read documents far longer than its attention window. Whether the "
          "compressed memory keeps enough detail to answer questions is what this study measures.")


@pytest.fixture(scope="module")
def models(smollm2_gguf):
    cfg, params = load_gguf(smollm2_gguf, dtype="float32")
    return cfg, jax.device_put(params), HFTokenizer.from_gguf(smollm2_gguf), \
        reference.load_transformers_gguf(smollm2_gguf)


def test_logits_match_transformers_gguf_load(models):
    cfg, params, tokenizer, torch_model = models
    ids = tokenizer.encode(PROMPT)
    assert len(ids) > 30
    ours = np.asarray(forward(cfg, params, jnp.asarray([ids], jnp.int32)))
    theirs = reference.transformers_logits(torch_model, np.asarray([ids]))
    agreement = reference.logit_agreement(ours, theirs)
    assert agreement["max_abs_diff"] <= 1e-3, agreement
    assert agreement["top1_agreement"] == 1.0


def test_twenty_greedy_tokens_identical(models):
    cfg, params, tokenizer, torch_model = models
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode(PROMPT[:80])]
    ours = greedy_generate(cfg, params, prompts, max_new_tokens=20)  # batched, left-padded
    for prompt, generated in zip(prompts, ours):
        assert generated == reference.transformers_greedy(torch_model, prompt, 20)
    assert "Paris" in tokenizer.decode(ours[0])


def test_params_checkpoint_round_trip(models, tmp_path):
    cfg, params, tokenizer, _ = models
    save_params(tmp_path / "ckpt", cfg, params, tokenizer)
    cfg2, params2 = load_params(tmp_path / "ckpt", scan_layers=False)
    assert cfg2 == cfg.replace(scan_layers=False)
    restored_scanned = load_params(tmp_path / "ckpt")[1]
    assert "layers" in restored_scanned and "layers_0" in params2
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(
            __import__("gist_jax.model.transformer", fromlist=["x"]).unstack_layers(params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError):
        save_params(tmp_path / "ckpt", cfg, params)
