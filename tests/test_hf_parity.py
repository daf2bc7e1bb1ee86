"""Random tiny transformers models, saved with save_pretrained, imported, compared logit by logit."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import tiny_hf
import torch

from gist_jax.hf.importer import CheckpointMismatch, load_hf_dir
from gist_jax.model.attention import AttentionSpec
from gist_jax.model.transformer import forward


@pytest.fixture(scope="module", params=sorted(tiny_hf.MODELS))
def hf_model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return path, tiny_hf.build(request.param, path)


def _torch_logits(model, tokens: np.ndarray, positions: np.ndarray, valid: np.ndarray):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens), position_ids=torch.from_numpy(positions),
                    attention_mask=torch.from_numpy(valid.astype(np.int64)))
    return out.logits.float().numpy()


def _batch(length: int, pad: int, rng: np.random.Generator, offset: int = 0):
    """Left-padded batch: `pad` leading pad tokens on row 0, none elsewhere."""
    tokens = rng.integers(0, tiny_hf.TINY["vocab_size"], size=(3, length)).astype(np.int64)
    valid = np.ones((3, length), bool)
    valid[0, :pad] = False
    positions = np.clip(np.cumsum(valid, axis=1) - 1, 0, None) + offset
    return tokens, positions.astype(np.int64), valid


@pytest.mark.parametrize("length,pad,offset", [(1, 0, 0), (7, 0, 0), (33, 0, 0), (33, 5, 0),
                                               (20, 3, 200)])
def test_logits_match_transformers(hf_model_dir, length, pad, offset):
    path, model = hf_model_dir
    cfg, params = load_hf_dir(path, dtype="float32", scan_layers=False)
    tokens, positions, valid = _batch(length, pad, np.random.default_rng(length + pad))
    positions = positions + offset
    spec = AttentionSpec(positions=jnp.asarray(positions, jnp.int32), valid=jnp.asarray(valid))
    ours = np.asarray(forward(cfg, params, jnp.asarray(tokens, jnp.int32), spec))
    theirs = _torch_logits(model, tokens, positions, valid)
    assert np.abs(theirs).max() > 0.1  # the comparison is not between near-zero logits
    diff = np.abs(ours - theirs)[valid].max()
    assert diff <= 1e-4, f"max |logit diff| {diff:.2e}"


def test_wrong_rope_is_detected(hf_model_dir):
    """Negative control: the parity check above is sensitive to a RoPE mistake."""
    path, model = hf_model_dir
    cfg, params = load_hf_dir(path, dtype="float32", scan_layers=False)
    cfg = dataclasses.replace(cfg, rope_theta=cfg.rope_theta * 2)
    tokens, positions, valid = _batch(33, 0, np.random.default_rng(1))
    ours = np.asarray(forward(cfg, params, jnp.asarray(tokens, jnp.int32),
                              AttentionSpec(positions=jnp.asarray(positions, jnp.int32))))
    theirs = _torch_logits(model, tokens, positions, valid)
    assert np.abs(ours - theirs).max() > 1e-3


def test_missing_and_unknown_tensors_are_named(tmp_path, hf_model_dir):
    from safetensors.numpy import load_file, save_file

    path, _ = hf_model_dir
    tensors = load_file(path / "model.safetensors") if (path / "model.safetensors").exists() else None
    if tensors is None:
        pytest.skip("sharded save")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    dropped = dict(tensors)
    del dropped["model.layers.1.mlp.up_proj.weight"]
    save_file(dropped, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatch, match="model.layers.1.mlp.up_proj.weight"):
        load_hf_dir(tmp_path)
    extra = dict(tensors, **{"model.layers.0.mystery.weight": np.zeros(3, np.float32)})
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatch, match="mystery"):
        load_hf_dir(tmp_path)


def test_sharded_bf16_checkpoint(tmp_path, hf_model_dir):
    """Sharded index + bfloat16 storage (what real checkpoints look like)."""
    path, model = hf_model_dir
    model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20KB")
    model.to(torch.float32)
    assert (tmp_path / "model.safetensors.index.json").exists()
    cfg, params = load_hf_dir(tmp_path, dtype="float32")
    ref_cfg, ref_params = load_hf_dir(path, dtype="float32")
    assert cfg == ref_cfg
    import jax
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=2e-2, rtol=1e-2)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    with pytest.raises(ValueError, match="gpt_neox"):
        load_hf_dir(tmp_path)
