"""Synthetic recall examples as a data source: spec parsing, determinism per seed and split, the
seqio training and evaluation tasks, and the token store path.

Kept fast: a few examples, contexts of a few hundred byte tokens, the ``bytes`` tokenizer.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from gist_jax.data import sources
from gist_jax.data.store import ensure_store

SPEC = "synthetic:multikey_needle?haystack=stdlib&context_tokens=300&depth_min=0.1&depth_max=0.9&num_examples=3&seed=5"


def test_parse_synthetic_spec_fields_and_defaults():
    parsed = sources.parse_source_spec(SPEC)
    assert parsed.kind == "synthetic" and parsed.is_local
    s = parsed.synthetic
    assert (s.kind, s.haystack, s.context_tokens, s.depth_min, s.depth_max, s.num_examples, s.seed) == (
        "multikey_needle", "stdlib", 300, 0.1, 0.9, 3, 5)
    default = sources.parse_source_spec("synthetic:passkey").synthetic
    assert (default.haystack, default.context_tokens, default.options) == ("stdlib", 1024, ())
    options = sources.parse_source_spec("synthetic:surprise_needle?relevant=true&attribute=food").synthetic.options
    assert dict(options) == {"relevant": True, "attribute": "food"}
    assert sources.parse_source_spec("synthetic:json_kv?num_pairs=2&tokenizer=bytes").synthetic.tokenizer == "bytes"
    passkey = sources.SyntheticSpec("passkey")
    assert passkey.split_seed("train") != passkey.split_seed("validation")


@pytest.mark.parametrize("spec, message", [
    ("synthetic:needle", r"unknown synthetic kind 'needle'; use one of \('multikey_needle'"),
    ("synthetic:passkey?num_keys=2", (r"unknown parameter 'num_keys' for synthetic kind 'passkey'; known parameters: "
                                      r"haystack, .*filler")),
    ("synthetic:passkey?context_tokens=lots", r"context_tokens='lots' is not an integer; write e.g. context_tokens="),
    ("synthetic:passkey?filler=maybe", r"filler='maybe' is not true/false"),
    ("synthetic:passkey?seed", r"parameter 'seed' is not key=value"),
    ("synthetic:passkey?seed=1&seed=2", r"parameter 'seed' is given twice"),
    ("synthetic:passkey?depth_min=0.9&depth_max=0.1", r"depth_min <= depth_max"),
    ("synthetic:multivalue?num_values=0", r"num_values=0 must be >= 1"),
    ("synthetic:passkey?num_examples=0", r"num_examples >= 1"),
    ("synthetic:passkey?haystack=tfds:c4", r"haystack='tfds:c4' must be a local text source"),
    ("synthetic:surprise_needle?attribute=color", r"attribute='color'; use attribute=food or attribute=number"),
])
def test_synthetic_spec_errors_name_the_key_and_the_fix(spec: str, message: str):
    with pytest.raises(ValueError, match=message):
        sources.parse_source_spec(spec)


def test_synthetic_source_needs_a_tokenizer():
    with pytest.raises(ValueError, match=r"tokenizer=bytes"):
        list(sources.iter_source("synthetic:passkey?context_tokens=64&num_examples=1", "train"))


def test_same_seed_same_documents_and_splits_differ():
    first = list(sources.iter_source(SPEC, "train", "bytes"))
    assert first == list(sources.iter_source(SPEC, "train", "bytes"))
    assert len(first) == 3 and len({text for _, text in first}) == 3
    assert [doc_id for doc_id, _ in first] == [f"synthetic:multikey_needle/train/{i}" for i in range(3)]
    validation = list(sources.iter_source(SPEC, "validation", "bytes"))
    assert not {text for _, text in first} & {text for _, text in validation}
    other_seed = list(sources.iter_source(SPEC.replace("seed=5", "seed=6"), "train", "bytes"))
    assert {text for _, text in first}.isdisjoint(text for _, text in other_seed)
    # Each document is the whole example: context, question, and the answer as its last line's end.
    for _, text in first:
        assert "What is the special magic number for" in text and text.rstrip()[-1].isdigit()
        assert len(text.encode("utf-8")) <= 300 + 400  # context budget plus the question and answer


def test_spec_tokenizer_overrides_the_data_tokenizer():
    spec = "synthetic:passkey?context_tokens=128&num_examples=1&tokenizer=bytes"
    assert list(sources.iter_source(spec, "train")) == list(sources.iter_source(spec, "train", "gguf:nonexistent"))


def test_token_store_from_a_synthetic_source(tmp_path: pathlib.Path):
    store = ensure_store(SPEC, "train", "bytes", tmp_path)
    texts = [text for _, text in sources.iter_source(SPEC, "train", "bytes")]
    assert store.num_documents == 3
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(store.document(i), np.frombuffer(text.encode("utf-8"), np.uint8))
    assert ensure_store(SPEC, "train", "bytes", tmp_path).path == store.path  # built once
    assert ensure_store(SPEC, "validation", "bytes", tmp_path).num_tokens != store.num_tokens


def test_text_task_matches_document_stream():
    from gist_jax.data import tasks

    task = tasks.text_task(SPEC, "bytes")
    dataset = task.get_dataset(sequence_length=None, split="train", use_cached=False, shuffle=False, seed=None,
                               num_epochs=1)
    got = [ex["targets"] for ex in dataset.as_numpy_iterator()]
    want = list(tasks.document_stream(SPEC, "train", "bytes"))
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("kind, options", [("multivalue", "&num_values=3"), ("uuid_recall", ""),
                                           ("json_kv", "&num_pairs=2")])
def test_eval_task_answers_are_recoverable_from_inputs(kind: str, options: str):
    """Oracle: every answer in ``targets`` occurs in the decoded context, and nowhere in the question."""
    from gist_jax.data import tasks
    from gist_jax.data.vocabularies import vocabulary_from_spec

    spec = f"synthetic:{kind}?context_tokens=400&num_examples=2&seed=3{options}"
    task = tasks.synthetic_eval_task(spec, "bytes")
    assert tasks.synthetic_eval_task(spec, "bytes") is task
    vocabulary = vocabulary_from_spec("bytes")
    dataset = task.get_dataset(sequence_length=None, split="validation", use_cached=False, shuffle=False, seed=None,
                               num_epochs=1)
    examples = list(dataset.as_numpy_iterator())
    assert len(examples) == 2
    for ex in examples:
        inputs = vocabulary.decode(ex["inputs"].tolist())
        assert inputs == ex["inputs_pretokenized"].decode()
        targets = vocabulary.decode(ex["targets"].tolist())
        answers = [a.strip() for a in targets.split(", ")]
        assert answers == [a.decode() for a in ex["answers"]]
        context, _, question = inputs.rpartition("\n\n")
        for answer in answers:
            assert answer in context and answer not in question
        assert ex["context_tokens"] <= 400 and len(ex["needle_depths"]) >= 1
        assert task.metric_fns[0]([ex["targets_pretokenized"]], [targets])["recall"] == 1.0
    # The eval task and the training source draw the same examples of a split.
    training = [text for _, text in sources.iter_source(spec, "validation", "bytes")]
    assert [(ex["inputs_pretokenized"] + ex["targets_pretokenized"]).decode() for ex in examples] == training


def test_recall_metrics():
    from gist_jax.data.tasks import recall_metrics

    assert recall_metrics("multivalue", [b" 11, 22, 33, 44"], ["11 and 22"]) == {"recall": 0.5}
    assert recall_metrics("passkey", [" 12345"], ["it is 12345."]) == {"recall": 1.0}
    uuid = "0123456789abcdef0123456789abcdef"
    out = recall_metrics("uuid_recall", [" " + uuid], [" " + uuid[:20] + "x" * 12])
    assert out == {"recall": 0.0, "uuid_prefix_8": 1.0, "uuid_prefix_16": 1.0, "uuid_prefix_32": 0.0}


def test_eval_task_rejects_other_sources():
    from gist_jax.data import tasks

    with pytest.raises(ValueError, match="synthetic_eval_task needs a synthetic source spec"):
        tasks.synthetic_eval_task("stdlib", "bytes")
