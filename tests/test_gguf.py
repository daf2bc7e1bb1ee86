"""GGUF reader: parity with transformers' own GGUF loader on the real SmolLM2 file, plus tiny
synthetic files for the permutation, qwen2 biases and the error paths."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from gist_jax.hf.gguf import (
    GGUF_TO_HF,
    gguf_to_hf_name,
    hf_config_from_metadata,
    read_gguf,
    smollm2_gguf_path,
    unpermute_qk,
)

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def ours():
    return read_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def reference():
    """transformers' GGUF-loaded model (the reference), loaded once for this file."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model


def test_smollm2_path_exists() -> None:
    path = smollm2_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"


def test_state_dict_matches_transformers(ours, reference) -> None:
    ref = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    # transformers always lists the tied lm_head; we omit it when tied.
    assert ours.hf_config["tie_word_embeddings"]
    assert "lm_head.weight" not in ours.state_dict
    np.testing.assert_array_equal(ref["lm_head.weight"], ref["model.embed_tokens.weight"])
    assert set(ours.state_dict) == set(ref) - {"lm_head.weight"}
    for name, value in ours.state_dict.items():
        assert value.dtype == np.float32, name
        assert value.shape == ref[name].shape, name
        diff = float(np.max(np.abs(value - ref[name])))
        assert diff <= 1e-6, (name, diff)


def test_config_matches_transformers(ours, reference) -> None:
    ref = reference.config
    cfg = ours.hf_config
    assert cfg["model_type"] == ref.model_type == "llama"
    for field in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias",
    ):
        assert cfg[field] == getattr(ref, field), field
    assert cfg["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-7)
    ref_theta = getattr(ref, "rope_parameters", None) or {}
    assert cfg["rope_theta"] == ref_theta.get("rope_theta", getattr(ref, "rope_theta", None))
    assert cfg["rope_scaling"] is None
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (30, 576, 9)


def test_tokenizer_metadata(ours) -> None:
    meta = ours.tokenizer_metadata
    assert meta["model"] == "gpt2" and len(meta["tokens"]) == 49152
    assert len(meta["token_type"]) == 49152 and meta["merges"][0] == "Ġ t"
    assert (meta["bos_token_id"], meta["eos_token_id"]) == (1, 2)
    assert meta["add_bos_token"] is False and "<|im_start|>" in meta["chat_template"]


# --- synthetic files -------------------------------------------------------------------------

def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's forward permutation (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny(path: pathlib.Path, arch: str, tensors: dict[str, np.ndarray]) -> None:
    """A 1-layer GGUF with hidden 8, 2 heads of 4, 1 KV head, ffn 16, F32 tensors."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(10)
    for name, value in tensors.items():
        w.add_tensor(name, value.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_hf_tensors(rng: np.random.Generator, biases: bool) -> dict[str, np.ndarray]:
    """HF-layout tensors for the tiny config, keyed by GGUF name."""
    shapes = {
        "token_embd.weight": (10, 8), "output_norm.weight": (8,), "output.weight": (10, 8),
        "blk.0.attn_norm.weight": (8,), "blk.0.ffn_norm.weight": (8,),
        "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (4, 8), "blk.0.attn_v.weight": (4, 8),
        "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_gate.weight": (16, 8),
        "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16),
    }
    if biases:
        shapes.update({"blk.0.attn_q.bias": (8,), "blk.0.attn_k.bias": (4,), "blk.0.attn_v.bias": (4,)})
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def test_llama_permutation_roundtrip(tmp_path: pathlib.Path) -> None:
    hf = _tiny_hf_tensors(np.random.default_rng(0), biases=False)
    stored = dict(hf)
    stored["blk.0.attn_q.weight"] = _llama_cpp_permute(hf["blk.0.attn_q.weight"], 2)
    stored["blk.0.attn_k.weight"] = _llama_cpp_permute(hf["blk.0.attn_k.weight"], 1)
    assert not np.array_equal(stored["blk.0.attn_q.weight"], hf["blk.0.attn_q.weight"])
    _write_tiny(tmp_path / "tiny.gguf", "llama", stored)
    got = read_gguf(tmp_path / "tiny.gguf")
    assert got.hf_config["tie_word_embeddings"] is False
    assert got.hf_config["head_dim"] == 4 and got.hf_config["attention_bias"] is False
    assert set(got.state_dict) == {gguf_to_hf_name(n) for n in hf}
    for name, value in hf.items():
        np.testing.assert_array_equal(got.state_dict[gguf_to_hf_name(name)], value, err_msg=name)


def test_unpermute_inverts_permute() -> None:
    w = np.arange(9 * 64 * 3, dtype=np.float32).reshape(9 * 64, 3)
    np.testing.assert_array_equal(unpermute_qk(_llama_cpp_permute(w, 9), 9), w)
    b = np.arange(3 * 64, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk(_llama_cpp_permute(b, 3), 3), b)


def test_qwen2_biases_not_permuted(tmp_path: pathlib.Path) -> None:
    hf = _tiny_hf_tensors(np.random.default_rng(1), biases=True)
    del hf["output.weight"]
    _write_tiny(tmp_path / "qwen.gguf", "qwen2", hf)
    got = read_gguf(tmp_path / "qwen.gguf")
    cfg = got.hf_config
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["attention_bias"] is True and cfg["tie_word_embeddings"] is True
    assert "lm_head.weight" not in got.state_dict
    for name, value in hf.items():
        np.testing.assert_array_equal(got.state_dict[gguf_to_hf_name(name)], value, err_msg=name)


def test_unknown_tensor_name_raises(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="blk.0.mystery.weight"):
        gguf_to_hf_name("blk.0.mystery.weight")
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        gguf_to_hf_name("rope_freqs.weight")
    tensors = _tiny_hf_tensors(np.random.default_rng(2), biases=False)
    tensors["blk.0.attn_sinks.weight"] = np.zeros((2,), np.float32)
    _write_tiny(tmp_path / "odd.gguf", "llama", tensors)
    with pytest.raises(ValueError, match="blk.0.attn_sinks.weight"):
        read_gguf(tmp_path / "odd.gguf")


def test_unknown_architecture_raises(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="'mamba'"):
        hf_config_from_metadata({"general.architecture": "mamba"}, [])
    _write_tiny(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": np.zeros((10, 8))})
    with pytest.raises(ValueError, match="'gpt2'"):
        read_gguf(tmp_path / "gpt2.gguf")


def test_name_table_maps_every_layer_template() -> None:
    assert gguf_to_hf_name("blk.17.attn_q.weight") == "model.layers.17.self_attn.q_proj.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert all(("{i}" in g) == ("{i}" in h) for g, h in GGUF_TO_HF.items())
