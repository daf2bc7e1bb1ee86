"""The converter CLI: HF directory -> Orbax params checkpoint -> same logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_hf

from gist_jax import convert
from gist_jax.data.tokenizer import HFTokenizer, load_tokenizer
from gist_jax.hf.importer import load_hf_dir
from gist_jax.model.params_io import load_params
from gist_jax.model.transformer import forward


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, smollm2_gguf):
    path = tmp_path_factory.mktemp("qwen2")
    tiny_hf.build("qwen2_bias", path)
    HFTokenizer.from_gguf(smollm2_gguf).save_pretrained(path)  # any real tokenizer will do
    return path


@pytest.mark.parametrize("flags", [[], ["--unscanned"]])
def test_cli_converts_hf_dir(hf_dir, tmp_path, flags):
    out = tmp_path / "ckpt"
    assert convert.main(["--hf", str(hf_dir), "--out", str(out), *flags]) == 0
    cfg, params = load_params(out, dtype="float32", scan_layers=False)
    ref_cfg, ref_params = load_hf_dir(hf_dir, dtype="float32", scan_layers=False)
    assert cfg == ref_cfg
    tokens = jnp.arange(24, dtype=jnp.int32)[None] % cfg.vocab_size
    np.testing.assert_array_equal(forward(cfg, params, tokens), forward(ref_cfg, ref_params, tokens))
    assert load_tokenizer(out).encode("hello world") == HFTokenizer.from_dir(hf_dir).encode("hello world")
    # refuses to overwrite
    with pytest.raises(FileExistsError):
        convert.main(["--hf", str(hf_dir), "--out", str(out)])


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "params").mkdir()
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        load_params(tmp_path)


def test_bf16_storage(hf_dir, tmp_path):
    convert.main(["--hf", str(hf_dir), "--out", str(tmp_path / "c"), "--param-dtype", "bfloat16"])
    cfg, params = load_params(tmp_path / "c")
    assert cfg.param_dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
