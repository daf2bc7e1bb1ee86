"""seqio tasks and mixtures from source specs, and `document_stream`, what the token store reads.

A *source spec* is a compact string (so a command line can override it), see
`gist_jax.data.sources.SOURCE_SPEC_FORMS`:

    stdlib                                  the Python standard library source (built in)
    files:<glob>[,<glob>...]                local files, one document per file (.jsonl: one per line)
    jsonl:<glob>[,<glob>...][#<field>]      JSON lines, one document per line (field "text")
    tfds:<name>[:<version>][@<data_dir>][#<field>]   a prepared tfds dataset (e.g. local_text)
    seqio:<task>                            a registered seqio task, used as is ("targets")
    synthetic:<kind>[?<param>=<value>&...]  RULER-style recall examples (`gist_jax.data.synthetic`)

`text_task(source_spec, vocab_spec)` registers a seqio Task whose ``"targets"`` are the token ids
of each document (no EOS: the packer adds EOS at document boundaries), with the raw ``"text"``
and ``"doc_id"`` passed through. `document_stream` yields those ids as numpy arrays, one per
document, in the source's own order; for local sources it tokenises in Python batches on all
cores instead of one tf py-function call per document (same ids, tested), which is several
times faster.

A ``synthetic:`` source trains on whole examples (context, question and answer as one document);
`synthetic_eval_task(source_spec, vocab_spec)` registers the same examples for evaluation, with
``"inputs"`` (context + question) and ``"targets"`` (the answer) kept apart and a recall metric.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterator, Sequence

from gist_jax.utils.quiet_tf import tf  # first: tensorflow without its C++ start-up lines on stderr

# isort: split

import numpy as np
import seqio
import tensorflow_datasets as tfds

from gist_jax.data import sources, synthetic
from gist_jax.data.local_text_builder import LOCAL_TEXT_VERSION, build_local_text, local_text_spec  # noqa: F401
from gist_jax.data.vocabularies import encode_batch, vocabulary_from_spec

TASK_PREFIX = "gist_jax_text"
EVAL_TASK_PREFIX = "gist_jax_synthetic_eval"
_BATCH_CHARS = 1 << 21  # characters per Python tokenisation batch: big enough to keep both cores busy


def task_name(source_spec: str, vocab_spec: str, prefix: str = TASK_PREFIX) -> str:
    """A valid seqio task name unique to (source, vocabulary): readable prefix plus a hash of both."""
    digest = hashlib.sha1(f"{source_spec}\0{vocab_spec}".encode()).hexdigest()[:10]
    readable = re.sub(r"[^\w.]+", "_", f"{source_spec}.{vocab_spec}").strip("_")[:80]
    return f"{prefix}.{readable}.{digest}"


def text_task(source_spec: str, vocab_spec: str) -> seqio.Task:
    """The seqio task for a source tokenised with a vocabulary, registered once per (source, vocab).

    ``seqio:<task>`` returns that task itself, after checking its ``"targets"`` vocabulary is
    the one asked for (otherwise its ids would not be this model's ids).
    """
    parsed = sources.parse_source_spec(source_spec)
    vocabulary = vocabulary_from_spec(vocab_spec)
    if parsed.kind == "seqio":
        return _registered_task(parsed.task_name, vocabulary, vocab_spec)
    name = task_name(source_spec, vocab_spec)
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    doc_id_key = "doc_id" if parsed.kind != "tfds" or "doc_id" in _tfds_features(parsed) else None
    return seqio.TaskRegistry.add(
        name,
        source=_data_source(parsed, vocab_spec),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey,
                              key_map={"targets": parsed.text_field, "text": parsed.text_field, "doc_id": doc_id_key}),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            _drop_empty_targets,
        ],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32, rank=1)},
        shuffle_buffer_size=None,
    )


def register_mixture(name: str, weighted_specs: Sequence[tuple[str, float]], vocab_spec: str) -> seqio.Mixture:
    """A seqio mixture of ``(source_spec, rate)`` pairs, replacing any mixture of that name."""
    weighted_tasks = [(text_task(spec, vocab_spec).name, float(rate)) for spec, rate in weighted_specs]
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, weighted_tasks)


def document_stream(source_spec: str, split: str, vocab_spec: str) -> Iterator[np.ndarray]:
    """int32 token ids of every non-empty document of ``split``, one array each, no BOS/EOS.

    Deterministic: one epoch, no shuffling, the source's order, the same on every call.
    """
    if split not in sources.SPLITS:
        raise ValueError(f"split={split!r} must be one of {sources.SPLITS}")
    parsed = sources.parse_source_spec(source_spec)
    if parsed.is_local:
        return _python_stream(parsed, split, vocab_spec)
    return _seqio_stream(source_spec, split, vocab_spec)


def _python_stream(parsed: sources.SourceSpec, split: str, vocab_spec: str) -> Iterator[np.ndarray]:
    vocabulary = vocabulary_from_spec(vocab_spec)
    batch: list[str] = []
    size = 0
    for _, text in sources.iter_source(parsed, split, vocab_spec):
        batch.append(text)
        size += len(text)
        if size >= _BATCH_CHARS:
            yield from _encoded(vocabulary, batch)
            batch, size = [], 0
    yield from _encoded(vocabulary, batch)


def _encoded(vocabulary: seqio.Vocabulary, texts: list[str]) -> Iterator[np.ndarray]:
    for ids in encode_batch(vocabulary, texts) if texts else []:
        if len(ids):
            yield np.asarray(ids, np.int32)


def _seqio_stream(source_spec: str, split: str, vocab_spec: str) -> Iterator[np.ndarray]:
    task = text_task(source_spec, vocab_spec)
    if split not in task.splits:
        if source_spec.startswith("tfds:local_text"):
            return  # local_text leaves out a split that has no document
        raise ValueError(f"source {source_spec!r} has no split {split!r} (it has {sorted(task.splits)})")
    dataset = task.get_dataset(sequence_length=None, split=split, use_cached=False, shuffle=False, seed=None,
                               num_epochs=1)
    for example in dataset.as_numpy_iterator():
        ids = example["targets"]
        if ids.size:
            yield ids.astype(np.int32, copy=False)


# -- synthetic recall evaluation ------------------------------------------------------------------------
def synthetic_eval_task(source_spec: str, vocab_spec: str) -> seqio.Task:
    """The seqio task evaluating a ``synthetic:<kind>?...`` source, registered once per (source, vocab).

    Examples: ``"inputs"`` (context, blank line, question ending in the answer prefix) and
    ``"targets"`` (" " + the answer(s)) as ids without EOS, their ``*_pretokenized`` strings,
    ``"answers"`` (every acceptable answer), ``"example_id"``, ``"context_tokens"`` and
    ``"needle_depths"``. Same examples as the source's training documents of that split (the split
    picks the seed). Metric: `recall_metrics` on the decoded predictions.
    """
    parsed = sources.parse_source_spec(source_spec)
    if parsed.kind != "synthetic":
        raise ValueError(f"synthetic_eval_task needs a synthetic source spec, got {source_spec!r}; "
                         "e.g. synthetic:passkey?context_tokens=2048&num_examples=200")
    name = task_name(source_spec, vocab_spec, EVAL_TASK_PREFIX)
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    spec, vocabulary = parsed.synthetic, vocabulary_from_spec(vocab_spec)

    def examples(split: str) -> Iterator[dict]:
        for index, example in enumerate(sources.synthetic_examples(spec, split, vocab_spec)):
            inputs, targets = synthetic.as_text(example)
            yield {"example_id": f"synthetic:{spec.kind}/{split}/{index}", "inputs": inputs, "targets": targets,
                   "answers": list(example.answers), "context_tokens": example.context_tokens,
                   "needle_depths": np.asarray(example.needle_depths, np.float32)}

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # example order is the seed's order
        strings = {k: tf.TensorSpec([], tf.string) for k in ("example_id", "inputs", "targets")}
        return tf.data.Dataset.from_generator(lambda: examples(split), output_signature={
            **strings, "answers": tf.TensorSpec([None], tf.string), "context_tokens": tf.TensorSpec([], tf.int32),
            "needle_depths": tf.TensorSpec([None], tf.float32)})

    feature = seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32, rank=1)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn, splits=sources.SPLITS, caching_permitted=False),
        preprocessors=[functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=True)],
        output_features={"inputs": feature, "targets": feature},
        metric_fns=[functools.partial(recall_metrics, spec.kind)],
        shuffle_buffer_size=None,
    )


def recall_metrics(kind: str, targets: Sequence[str | bytes], predictions: Sequence[str | bytes]) -> dict[str, float]:
    """seqio metric: mean `synthetic.score_exact` (RULER string match; multivalue: fraction of values found).

    ``targets`` are the pretokenized targets (" a" or " a, b, ..."), the answers joined by ", ".
    UUID recall also reports the paper's prefix scores (8/16/32 characters).
    """
    def text(s: str | bytes) -> str:
        return s.decode("utf-8", errors="replace") if isinstance(s, bytes) else str(s)

    scores, prefixes = [], []
    for target, prediction in zip(targets, predictions):
        answers = tuple(a.strip() for a in text(target).split(", "))
        example = synthetic.RecallExample(kind, "", "", answers, (), 0)
        scores.append(synthetic.score_exact(text(prediction), example))
        if kind == "uuid_recall":
            prefixes.append(synthetic.score_uuid_prefixes(text(prediction), answers[0]))
    out = {"recall": float(np.mean(scores)) if scores else 0.0}
    for p in (8, 16, 32) if prefixes else ():
        out[f"uuid_prefix_{p}"] = float(np.mean([s[p] for s in prefixes]))
    return out


# -- sources --------------------------------------------------------------------------------------------
def _data_source(parsed: sources.SourceSpec, vocab_spec: str) -> seqio.DataSource:
    if parsed.kind == "tfds":
        return seqio.TfdsDataSource(tfds_name=parsed.tfds_name, tfds_data_dir=parsed.data_dir, read_only=True)

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # corpus order: determinism and resume come from the token store
        return tf.data.Dataset.from_generator(
            lambda: ({"doc_id": doc_id, "text": text}
                     for doc_id, text in sources.iter_source(parsed, split, vocab_spec)),
            output_signature={"doc_id": tf.TensorSpec([], tf.string), "text": tf.TensorSpec([], tf.string)},
        )

    return seqio.FunctionDataSource(dataset_fn, splits=sources.SPLITS, caching_permitted=False)


def _tfds_features(parsed: sources.SourceSpec) -> list[str]:
    """The dataset's feature names, after checking the text field is one of them (a clear error early)."""
    builder = tfds.builder(parsed.tfds_name, data_dir=parsed.data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"source {parsed.spec!r}: tfds dataset {parsed.tfds_name!r} is not prepared in {builder.data_dir!r} "
            "(nothing is downloaded here); for your own files run "
            "gist_jax.data.local_text_builder.build_local_text(manual_dir, data_dir) first")
    features = list(builder.info.features)
    if parsed.text_field not in features:
        raise ValueError(f"source {parsed.spec!r}: tfds dataset {parsed.tfds_name!r} has no feature "
                         f"{parsed.text_field!r} (it has {features}); name one with #<field>")
    return features


def _registered_task(name: str, vocabulary: seqio.Vocabulary, vocab_spec: str) -> seqio.Task:
    task = seqio.get_mixture_or_task(name)
    if not isinstance(task, seqio.Task):
        raise TypeError(f"seqio:{name} is a mixture; name a task (mixtures are built from DataConfig.sources)")
    feature = task.output_features.get("targets")
    if feature is None:
        raise ValueError(f"seqio task {name!r} has no 'targets' feature (it has {sorted(task.output_features)})")
    if feature.vocabulary != vocabulary:
        raise ValueError(f"seqio task {name!r} tokenises 'targets' with {feature.vocabulary!r}, "
                         f"not the vocabulary of tokenizer spec {vocab_spec!r}")
    return task


def _drop_empty_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Documents that tokenise to nothing carry no training signal (and `document_stream` skips them)."""
    return dataset.filter(lambda x: tf.size(x["targets"]) > 0)
