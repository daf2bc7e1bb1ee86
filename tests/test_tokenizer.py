"""Tokenizers: GGUF-built tokenizer gives transformers' ids; HF-dir save/load; ByteTokenizer."""

from __future__ import annotations

import inspect
import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

from gist_jax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, gguf_tokenizer
from gist_jax.hf.gguf import smollm2_gguf_path

PROMPTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? I think it's Paris, isn't it?",
    "  Leading spaces,\ttabs\nand newlines\n\n   in 2024: 3.14159 vs 1,000,000 items.",
    "Ünïcødé naïve café — “quotes” 😀 日本語",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\nSure!<|im_end|><|endoftext|>",
]
STDLIB_SOURCE = inspect.getsource(textwrap)  # ~19 kB of real Python source


@pytest.fixture(scope="module")
def ours() -> HFTokenizer:
    return HFTokenizer.from_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def reference():
    """transformers' tokenizer for the same GGUF file, loaded once for this file."""
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def saved_dir(ours, tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("hf_tok")
    ours.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("text", PROMPTS + [STDLIB_SOURCE], ids=lambda t: t[:20])
def test_gguf_tokenizer_matches_transformers(ours, reference, text: str) -> None:
    ids = ours.encode(text)
    assert ids == reference(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == text


def test_stdlib_text_is_long(ours) -> None:
    assert len(STDLIB_SOURCE) > 4000 and len(ours.encode(STDLIB_SOURCE)) > 1000


def test_special_tokens_and_ids(ours, reference) -> None:
    assert ours.encode("<|im_start|>user\nhi<|im_end|>")[::4] == [1, 2]  # matched whole, not spelled out
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)
    assert (ours.bos_id, ours.eos_id) == (reference.bos_token_id, reference.eos_token_id)
    assert ours.vocab_size == 49152 == len(reference)
    ref_added = json.loads(reference.backend_tokenizer.to_str())["added_tokens"]
    assert json.loads(ours.tokenizer.to_str())["added_tokens"] == ref_added
    assert ours.add_bos is False and "<|im_start|>" in ours.chat_template


def test_encode_adds_special_tokens_only_when_asked(ours) -> None:
    plain = ours.encode("Hello world!")
    assert plain[0] != ours.bos_id
    assert ours.encode("Hello world!", add_bos=True) == [ours.bos_id, *plain]
    assert ours.encode("Hello world!", add_eos=True) == [*plain, ours.eos_id]
    assert ours.decode([ours.bos_id, *plain], skip_special_tokens=True) == "Hello world!"


def test_gguf_tokenizer_shorthand_and_protocol(ours) -> None:
    assert isinstance(ours, Tokenizer)
    assert gguf_tokenizer(smollm2_gguf_path()).encode(PROMPTS[1]) == ours.encode(PROMPTS[1])


def test_saved_dir_roundtrip_with_from_dir(ours, saved_dir: pathlib.Path) -> None:
    assert {p.name for p in saved_dir.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    loaded = HFTokenizer.from_dir(saved_dir)
    for text in PROMPTS + [STDLIB_SOURCE]:
        assert loaded.encode(text) == ours.encode(text)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert loaded.chat_template == ours.chat_template and loaded.add_bos is False


def test_saved_dir_loads_in_transformers(ours, saved_dir: pathlib.Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(saved_dir))
    for text in PROMPTS + [STDLIB_SOURCE]:
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    # add_bos_token is false in this GGUF, so HF's default call adds nothing either.
    assert hf(PROMPTS[0])["input_ids"] == ours.encode(PROMPTS[0])
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)


def test_from_dir_falls_back_to_config_ids(saved_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((saved_dir / "tokenizer.json").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    loaded = HFTokenizer.from_dir(tmp_path)
    assert (loaded.bos_token, loaded.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert loaded.pad_id == loaded.eos_id == 2  # no pad token: falls back to EOS


def test_unsupported_gguf_tokenizer_model() -> None:
    with pytest.raises(ValueError, match="'llama'"):
        HFTokenizer.from_gguf_metadata({"model": "llama", "tokens": ["<unk>"], "scores": [0.0]})


@pytest.mark.parametrize("text", ["", "abc", "Ünïcødé 😀\n\x00\xff", PROMPTS[5]])
def test_byte_tokenizer_roundtrip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    wrapped = tok.encode(text, add_bos=True, add_eos=True)
    assert wrapped[0] == tok.bos_id and wrapped[-1] == tok.eos_id and tok.decode(wrapped) == text
    assert tok.decode([*ids, tok.pad_id, tok.pad_id]) == text
    assert tok.vocab_size == 259 and len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert max(ids, default=0) < 256


def test_tokenizer_module_imports_without_heavy_frameworks() -> None:
    code = (
        "import sys, gist_jax.data.tokenizer\n"
        "heavy = [m for m in ('torch', 'transformers', 'tensorflow', 'gguf') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
