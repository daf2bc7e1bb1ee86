"""Document sources (stdlib corpus, local files, split rule, source specs) and tokenizer specs.

Pure Python: nothing here imports tensorflow or seqio (that is tests/test_data_seqio.py).
"""

from __future__ import annotations

import inspect
import json
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap

import pytest

from gist_jax.data import sources
from gist_jax.data.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, tokenizer_from_spec


def train_sentencepiece(directory: pathlib.Path) -> pathlib.Path:
    """A 200-piece unigram SentencePiece model trained on real stdlib source (well under a second)."""
    import argparse

    import sentencepiece

    text = inspect.getsource(textwrap) + inspect.getsource(argparse)
    prefix = directory / "tiny_sp"
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_prefix=str(prefix),
                                             vocab_size=200, model_type="unigram", minloglevel=2)
    return prefix.with_suffix(".model")


def names_in(split: str, count: int, stem: str = "doc", suffix: str = ".txt") -> list[str]:
    """The first ``count`` file names ``{stem}{i}{suffix}`` that the split rule puts in ``split``."""
    names = (f"{stem}{i}{suffix}" for i in range(100_000))
    return [n for n in names if sources.split_of(n) == split][:count]


# -- the split rule and the built-in corpus -------------------------------------------------------------
def test_split_of_is_a_stable_hash_not_pythons_salted_hash():
    names = [f"pkg/module_{i}.py" for i in range(2000)]
    code = ("import sys; from gist_jax.data.sources import split_of; "
            "print(''.join('v' if split_of(f'pkg/module_{i}.py') == 'validation' else 't' for i in range(2000)))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    here = "".join("v" if sources.split_of(n) == "validation" else "t" for n in names)
    assert runs == {here}
    assert 0.03 < here.count("v") / len(names) < 0.07
    assert sources.split_of("anything", validation_fraction=0.0) == "train"
    assert sources.split_of("anything", validation_fraction=1.0) == "validation"


def test_stdlib_corpus_splits_by_file_stably():
    train, validation = sources.stdlib_files("train"), sources.stdlib_files("validation")
    assert train and validation
    assert not set(train) & set(validation)
    assert sources.stdlib_files("train") == train and sources.stdlib_files("validation") == validation
    root = sources.stdlib_root()
    relative = [p.relative_to(root).as_posix() for p in train]
    assert relative == sorted(relative)
    assert all(p.suffix == ".py" and "site-packages" not in p.parts and "dist-packages" not in p.parts
               for p in train + validation)
    assert 0.02 < len(validation) / (len(train) + len(validation)) < 0.10
    assert len(train) + len(validation) > 500  # the whole stdlib, not a handful of files
    with pytest.raises(ValueError, match="split"):
        sources.stdlib_files("test")


def test_iter_stdlib_yields_relative_ids_and_real_text():
    docs = list(sources.iter_stdlib("validation"))
    files = sources.stdlib_files("validation")
    assert 0 < len(docs) <= len(files)
    root = sources.stdlib_root()
    assert [d for d, _ in docs] == [p.relative_to(root).as_posix() for p in files
                                    if p.read_text(encoding="utf-8", errors="replace").strip()]
    assert all(text.strip() for _, text in docs)


# -- local files ----------------------------------------------------------------------------------------
@pytest.fixture
def corpus(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("alpha document\n")
    (root / "b.md").write_text("# beta\n")
    (root / "empty.txt").write_text("  \n")
    (root / "sub" / "c.py").write_text("print('gamma')\n")
    (root / "sub" / "deeper" / "d.txt").write_text("delta ünïcode\n")
    (root / "blob.bin").write_bytes(b"\x00\x01binary")
    (root / ".hidden" / "secret.txt").write_text("not part of the corpus")
    (root / "docs.jsonl").write_text(json.dumps({"text": "first line doc"}) + "\n\n"
                                     + json.dumps({"text": ""}) + "\n" + json.dumps({"text": "third"}) + "\n")
    return root


def test_iter_files_directory_order_ids_and_skips(corpus: pathlib.Path):
    docs = list(sources.iter_files(str(corpus)))
    ids = [d for d, _ in docs]
    c = str(corpus)
    assert ids == [os.path.join(c, "a.txt"), os.path.join(c, "b.md"), os.path.join(c, "docs.jsonl") + ":1",
                   os.path.join(c, "docs.jsonl") + ":4", os.path.join(c, "sub/c.py"),
                   os.path.join(c, "sub/deeper/d.txt")]
    assert dict(docs)[os.path.join(c, "sub/deeper/d.txt")] == "delta ünïcode\n"


def test_iter_files_globs_recursive_and_several_patterns(corpus: pathlib.Path):
    txt = [d for d, _ in sources.iter_files(str(corpus / "**" / "*.txt"))]
    assert [pathlib.Path(d).name for d in txt] == ["a.txt", "d.txt"]
    both = [d for d, _ in sources.iter_files([str(corpus / "sub"), str(corpus / "*.md"), str(corpus / "sub/c.py")])]
    assert [pathlib.Path(d).name for d in both] == ["c.py", "d.txt", "b.md"]  # pattern order, no duplicates
    names = [f.name for f in sources.match_files(str(corpus / "s*" / "**" / "*"))]
    assert names == ["sub/c.py", "sub/deeper/d.txt"]  # relative to the glob's root, for the split rule


def test_iter_files_jsonl_field_and_errors(corpus: pathlib.Path, tmp_path: pathlib.Path):
    other = tmp_path / "other.data"
    other.write_text(json.dumps({"body": "x", "text": 3}) + "\n")
    assert list(sources.iter_files(str(other), fmt="jsonl", text_field="body")) == [(f"{other}:1", "x")]
    with pytest.raises(TypeError, match="not a string"):
        list(sources.iter_files(str(other), fmt="jsonl"))
    with pytest.raises(ValueError, match="no field 'missing'"):
        list(sources.iter_files(str(other), fmt="jsonl", text_field="missing"))
    with pytest.raises(FileNotFoundError, match="nope"):
        list(sources.iter_files(str(tmp_path / "nope" / "*.txt")))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(sources.iter_files([str(corpus), str(tmp_path / "missing.txt")]))


def test_iter_files_splits_partition_the_files(tmp_path: pathlib.Path):
    names = names_in("train", 6) + names_in("validation", 3)
    for name in names:
        (tmp_path / name).write_text(f"text of {name}")
    every = list(sources.iter_files(str(tmp_path)))
    train = list(sources.iter_files(str(tmp_path), split="train"))
    validation = list(sources.iter_files(str(tmp_path), split="validation"))
    assert len(train) == 6 and len(validation) == 3
    assert sorted(train + validation) == sorted(every)
    assert [pathlib.Path(d).name for d, _ in validation] == sorted(names_in("validation", 3))


def test_parse_source_spec_forms_and_errors():
    p = sources.parse_source_spec
    assert p("stdlib").kind == "stdlib"
    assert p("files:a/*.txt,b").patterns == ("a/*.txt", "b")
    assert (p("jsonl:x.jsonl#body").patterns, p("jsonl:x.jsonl#body").text_field) == (("x.jsonl",), "body")
    assert p("jsonl:x.jsonl").text_field == "text"
    t = p("tfds:local_text:1.0.0@/data/dir#text")
    assert (t.kind, t.tfds_name, t.data_dir, t.text_field) == ("tfds", "local_text:1.0.0", "/data/dir", "text")
    assert p("tfds:c4/en:3.0.1#text").data_dir is None
    assert p("seqio:my_task").task_name == "my_task"
    for bad in ("", "stdlib:x", "file:a", "files:", "files:a#b", "tfds:@/x", "tfds:x@", "jsonl:a#", "seqio:"):
        with pytest.raises(ValueError, match="source spec"):
            p(bad)
    with pytest.raises(ValueError, match="not local"):
        sources.iter_source("tfds:x", "train")


# -- tokenizer specs ------------------------------------------------------------------------------------
def test_tokenizer_from_spec_bytes_and_errors(tmp_path: pathlib.Path):
    assert isinstance(tokenizer_from_spec("bytes"), ByteTokenizer)
    assert tokenizer_from_spec("bytes") is tokenizer_from_spec("bytes")
    for bad in ("byte", "gguf:", "wordpiece:/x", "hf"):
        with pytest.raises(ValueError, match=r"tokenizer spec .*expected one of: bytes, gguf:smollm2"):
            tokenizer_from_spec(bad)
    for missing in (f"hf:{tmp_path}/none", f"gguf:{tmp_path}/x.gguf", f"sentencepiece:{tmp_path}/x.model",
                    f"checkpoint:{tmp_path}/none"):
        with pytest.raises(FileNotFoundError, match="tokenizer spec"):
            tokenizer_from_spec(missing)


def test_tokenizer_from_spec_gguf_hf_checkpoint_agree(smollm2_gguf: pathlib.Path, tmp_path: pathlib.Path):
    smol = tokenizer_from_spec("gguf:smollm2")
    assert smol is tokenizer_from_spec("gguf:smollm2") and isinstance(smol, HFTokenizer)
    assert smol.vocab_size == 49152
    smol.save_pretrained(tmp_path / "hf")
    smol.save_pretrained(tmp_path / "ckpt" / "tokenizer")
    text = inspect.getsource(textwrap)[:3000]
    ids = smol.encode(text)
    for spec in (f"gguf:{smollm2_gguf}", f"hf:{tmp_path / 'hf'}", f"checkpoint:{tmp_path / 'ckpt'}"):
        other = tokenizer_from_spec(spec)
        assert other.encode(text) == ids, spec
        assert (other.bos_id, other.eos_id, other.pad_id) == (smol.bos_id, smol.eos_id, smol.pad_id), spec
    assert smol.encode_batch([text, "", "x y"]) == [ids, [], smol.encode("x y")]


def test_sentencepiece_tokenizer(tmp_path: pathlib.Path):
    model = train_sentencepiece(tmp_path)
    tok = tokenizer_from_spec(f"sentencepiece:{model}")
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 200
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, None)  # pad -1 in sentencepiece
    text = "def wrap(text, width):\n    return text"
    ids = tok.encode(text)
    assert ids and all(0 <= i < 200 for i in ids) and 1 not in ids and 2 not in ids
    assert tok.encode(text, add_bos=True, add_eos=True) == [1, *ids, 2]
    assert tok.decode(ids) == "def wrap(text, width): return text"  # sentencepiece folds whitespace
    assert tok.encode_batch([text, "width"]) == [ids, tok.encode("width")]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == ids


@pytest.mark.parametrize("module", ["textwrap", "argparse", "json/decoder", "asyncio/tasks",
                                    "email/_header_value_parser"])
def test_smollm2_round_trips_stdlib_text_exactly(module: str):
    tok = tokenizer_from_spec("gguf:smollm2")
    text = (sources.stdlib_root() / f"{module}.py").read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert len(ids) > 1000
    assert tok.decode(ids) == text
