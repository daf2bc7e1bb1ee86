"""seqio/tfds layer: vocabularies, the local_text tfds builder, tasks, mixtures, `document_stream`."""

from __future__ import annotations

import itertools
import json
import pathlib
import pickle
import time

import numpy as np
import pytest
import seqio
from test_data_sources import names_in, train_sentencepiece  # tests/ is on sys.path, as for tiny_hf

from gist_jax.data import sources, tasks
from gist_jax.data.local_text_builder import build_local_text
from gist_jax.data.tokenizer import tokenizer_from_spec
from gist_jax.data.vocabularies import TokenizerVocabulary, tf, vocabulary_from_spec

STRINGS = ["Hello world!", "", "  tabs\tand\nnewlines\n", "Ünïcødé naïve café — “quotes” 😀 日本語",
           "def f(x):\n    return x ** 2  # square\n"]


def seqio_targets(source_spec: str, split: str, vocab_spec: str, limit: int | None = None) -> list[np.ndarray]:
    """``targets`` of the registered seqio task, through seqio's own pipeline (tf ops per document)."""
    dataset = tasks.text_task(source_spec, vocab_spec).get_dataset(
        sequence_length=None, split=split, use_cached=False, shuffle=False, seed=None, num_epochs=1)
    return [ex["targets"] for ex in itertools.islice(dataset.as_numpy_iterator(), limit)]


def assert_same_arrays(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == np.int32
        np.testing.assert_array_equal(g, w)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> pathlib.Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture
def text_corpus(tmp_path: pathlib.Path) -> pathlib.Path:
    """Text and JSONL files with documents in both splits (names chosen by the split rule)."""
    root = tmp_path / "corpus"
    (root / "nested").mkdir(parents=True)
    for i, name in enumerate(names_in("train", 3) + names_in("validation", 2)):
        (root / name).write_text(f"document {i}: {name}\nwith ünïcode — and 😀 {i * 7}\n")
    (root / "nested" / names_in("train", 1, stem="n", suffix=".py")[0]).write_text("def f():\n    return 1\n")
    lines = [json.dumps({"text": f"json line {i} ü"}) for i in range(3)] + [json.dumps({"text": ""})]
    (root / names_in("train", 1, stem="rows", suffix=".jsonl")[0]).write_text("\n".join(lines) + "\n")
    (root / names_in("validation", 1, stem="rows", suffix=".jsonl")[0]).write_text(lines[0] + "\n")
    return root


# -- vocabularies ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["bytes", "gguf:smollm2"])
def test_tokenizer_vocabulary_python_and_tf_agree(spec: str):
    vocab = vocabulary_from_spec(spec)
    tokenizer = tokenizer_from_spec(spec)
    assert isinstance(vocab, TokenizerVocabulary) and vocab is vocabulary_from_spec(spec)
    assert (vocab.vocab_size, vocab.eos_id, vocab.bos_id) == (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id)
    want = [tokenizer.encode(s) for s in STRINGS]  # no BOS/EOS ever added
    assert [vocab.encode(s) for s in STRINGS] == want
    for s, ids in zip(STRINGS, want):
        got = vocab.encode_tf(tf.constant(s))
        assert got.dtype == tf.int32 and got.shape.rank == 1
        assert got.numpy().tolist() == ids
    batched = vocab.encode_tf(tf.constant(STRINGS))
    assert isinstance(batched, tf.RaggedTensor) and batched.dtype == tf.int32
    assert batched.to_list() == want
    grid = vocab.encode_tf(tf.constant([STRINGS[:2], STRINGS[2:4]]))
    assert grid.shape[:2] == [2, 2] and grid.to_list() == [want[:2], want[2:4]]
    in_graph = tf.data.Dataset.from_tensor_slices(STRINGS).map(vocab.encode_tf)
    assert [x.tolist() for x in in_graph.as_numpy_iterator()] == want
    # decode: python and tf agree, dense padded and ragged batches included
    texts = [vocab.decode(ids) for ids in want]
    assert texts == [tokenizer.decode(ids) for ids in want]
    assert [t.decode() for t in vocab.decode_tf(batched).numpy()] == texts
    padded = batched.to_tensor(vocab.pad_id)
    assert [t.decode() for t in vocab.decode_tf(padded).numpy()] == [vocab.decode(row) for row in padded.numpy()]
    if vocab.pad_id != vocab.eos_id:  # SmolLM2 pads with EOS: there a padded row decodes with its EOS
        assert [vocab.decode(row) for row in padded.numpy()] == texts
    assert vocab.decode_tf(tf.constant(want[0])).numpy().decode() == texts[0]
    with_eos = want[0] + [vocab.eos_id] + want[4]
    assert vocab.decode_tf(tf.constant(with_eos)).numpy().decode() == vocab.decode(with_eos)
    assert vocab.decode(with_eos) == tokenizer.decode(want[0] + [vocab.eos_id])
    clone = pickle.loads(pickle.dumps(vocab))
    assert clone == vocab and clone.encode(STRINGS[3]) == want[3]


def test_vocabulary_spec_identity_and_equality(tmp_path: pathlib.Path):
    assert vocabulary_from_spec("bytes") != vocabulary_from_spec("gguf:smollm2")
    tokenizer_from_spec("gguf:smollm2").save_pretrained(tmp_path / "hf")
    assert vocabulary_from_spec(f"hf:{tmp_path / 'hf'}") == vocabulary_from_spec("gguf:smollm2")
    byte = vocabulary_from_spec("bytes")
    assert (byte.pad_id, byte.bos_id, byte.eos_id, byte.vocab_size) == (256, 257, 258, 259)


def test_sentencepiece_spec_uses_seqio_vocabulary(sp_model: pathlib.Path):
    spec = f"sentencepiece:{sp_model}"
    vocab = vocabulary_from_spec(spec)
    assert isinstance(vocab, seqio.SentencePieceVocabulary)
    tokenizer = tokenizer_from_spec(spec)
    for s in STRINGS:
        assert list(vocab.encode(s)) == tokenizer.encode(s)
        assert vocab.encode_tf(tf.constant(s)).numpy().tolist() == tokenizer.encode(s)


# -- local_text tfds builder ----------------------------------------------------------------------------
def test_local_text_builder_round_trip(text_corpus: pathlib.Path, tmp_path: pathlib.Path):
    spec = build_local_text(text_corpus, tmp_path / "tfds")
    assert spec == f"tfds:local_text:1.0.0@{tmp_path / 'tfds'}#text"
    vocab = tokenizer_from_spec("bytes")
    for split in sources.SPLITS:
        docs = list(sources.iter_files(str(text_corpus), split=split))
        assert docs, split
        got = list(tasks.document_stream(spec, split, "bytes"))
        assert_same_arrays(got, [np.array(vocab.encode(text)) for _, text in docs])
        examples = list(tasks.text_task(spec, "bytes").get_dataset(
            sequence_length=None, split=split, use_cached=False, shuffle=False, num_epochs=1).as_numpy_iterator())
        root = str(text_corpus) + "/"
        assert [(e["doc_id"].decode(), e["text"].decode()) for e in examples] == [
            (doc_id.removeprefix(root), text) for doc_id, text in docs]
    with pytest.raises(ValueError, match="no feature 'body'"):
        tasks.text_task(spec.replace("#text", "#body"), "bytes")
    with pytest.raises(FileNotFoundError, match="build_local_text"):
        tasks.text_task(f"tfds:local_text:1.0.0@{tmp_path / 'elsewhere'}#text", "bytes")


def test_local_text_missing_split_reads_as_empty(tmp_path: pathlib.Path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / names_in("train", 1)[0]).write_text("only a training document")
    spec = build_local_text(tmp_path / "corpus", tmp_path / "tfds")
    assert len(list(tasks.document_stream(spec, "train", "bytes"))) == 1
    assert list(tasks.document_stream(spec, "validation", "bytes")) == []


# -- tasks, mixtures, document_stream -------------------------------------------------------------------
def test_files_and_jsonl_streams_match_seqio_tasks(text_corpus: pathlib.Path, sp_model: pathlib.Path):
    files = f"files:{text_corpus}/*.txt,{text_corpus}/nested"
    jsonl = f"jsonl:{text_corpus}/**/*.jsonl#text"
    for vocab_spec in ("bytes", "gguf:smollm2", f"sentencepiece:{sp_model}"):
        vocab = vocabulary_from_spec(vocab_spec)
        for source_spec, fmt in ((files, "auto"), (jsonl, "jsonl")):
            for split in sources.SPLITS:
                patterns = sources.parse_source_spec(source_spec).patterns
                want = [np.array(vocab.encode(t)) for _, t in sources.iter_files(patterns, split, fmt)]
                assert want, (source_spec, split)
                got = list(tasks.document_stream(source_spec, split, vocab_spec))
                assert_same_arrays(got, want)
                assert_same_arrays(seqio_targets(source_spec, split, vocab_spec), want)
    assert len(list(tasks.document_stream(jsonl, "train", "bytes"))) == 3  # the empty line's document is skipped


def test_stdlib_stream_matches_seqio_task_on_first_documents():
    python = list(itertools.islice(tasks.document_stream("stdlib", "validation", "gguf:smollm2"), 4))
    assert_same_arrays(python, seqio_targets("stdlib", "validation", "gguf:smollm2", limit=4))
    again = list(itertools.islice(tasks.document_stream("stdlib", "validation", "gguf:smollm2"), 4))
    assert_same_arrays(again, python)


def test_text_task_registration_and_seqio_source(text_corpus: pathlib.Path):
    spec = f"files:{text_corpus}"
    task = tasks.text_task(spec, "bytes")
    assert tasks.text_task(spec, "bytes") is task
    assert task.name.startswith(tasks.TASK_PREFIX) and seqio.get_mixture_or_task(task.name) is task
    assert tasks.text_task(spec, "gguf:smollm2").name != task.name
    assert not task.output_features["targets"].add_eos
    via_seqio = list(tasks.document_stream(f"seqio:{task.name}", "train", "bytes"))
    assert_same_arrays(via_seqio, list(tasks.document_stream(spec, "train", "bytes")))
    with pytest.raises(ValueError, match="not the vocabulary"):
        tasks.text_task(f"seqio:{task.name}", "gguf:smollm2")
    with pytest.raises(ValueError, match="unknown source spec"):
        tasks.document_stream("stdlib:3.11", "train", "bytes")
    with pytest.raises(ValueError, match="split"):
        tasks.document_stream("stdlib", "test", "bytes")


def test_register_mixture_yields_examples_from_every_source(text_corpus: pathlib.Path):
    files, jsonl = f"files:{text_corpus}/*.txt", f"jsonl:{text_corpus}/*.jsonl"
    mixture = tasks.register_mixture("gist_jax_test_mix", [(files, 1.0), (jsonl, 3.0)], "bytes")
    assert seqio.get_mixture_or_task("gist_jax_test_mix") is mixture
    assert sorted(mixture.get_rate(t) for t in mixture.tasks) == [1.0, 3.0]
    dataset = mixture.get_dataset(sequence_length=None, split="train", use_cached=False, shuffle=False, seed=0,
                                  num_epochs=None)
    examples = list(itertools.islice(dataset.as_numpy_iterator(), 40))
    texts = {vocabulary_from_spec("bytes").decode(e["targets"]) for e in examples}  # mixtures keep only targets
    assert any(t.startswith("json line") for t in texts) and any(t.startswith("document") for t in texts)
    assert all(e["targets"].dtype == np.int32 and e["targets"].size for e in examples)
    again = tasks.register_mixture("gist_jax_test_mix", [(files, 1.0)], "bytes")  # re-registering replaces
    assert len(again.tasks) == 1


@pytest.mark.slow
def test_stdlib_corpus_has_over_five_million_smollm2_tokens():
    tokenizer_from_spec("gguf:smollm2")
    start = time.perf_counter()
    counts = {split: sum(ids.size for ids in tasks.document_stream("stdlib", split, "gguf:smollm2"))
              for split in sources.SPLITS}
    seconds = time.perf_counter() - start
    print(f"stdlib with SmolLM2's tokenizer: {counts} tokens ({sum(counts.values()):,} total) in {seconds:.1f} s")
    assert sum(counts.values()) > 5_000_000
    assert 0.01 < counts["validation"] / counts["train"] < 0.15
