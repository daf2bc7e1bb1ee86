"""seqio vocabularies for gist_jax tokenizers, so seqio tasks tokenise exactly like the model does.

`TokenizerVocabulary` wraps any `gist_jax.data.tokenizer.Tokenizer` (SmolLM2's byte-level BPE from its
GGUF, an HF directory, the byte tokenizer), which seqio has no vocabulary for. It never adds
BOS/EOS: the packer decides where they go. `vocabulary_from_spec` maps tokenizer specs to
vocabularies, using seqio's own `SentencePieceVocabulary` for SentencePiece models.

Importing this module imports tensorflow, quietly and with GPUs hidden from it, so that tf never
takes accelerator memory that JAX needs; see `hide_gpus_from_tensorflow`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Sequence
from typing import Any

from gist_jax.utils.quiet_tf import tf  # first: tensorflow without its C++ start-up lines on stderr

# isort: split

import numpy as np
import seqio

from gist_jax.data.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer, tokenizer_from_spec
from gist_jax.utils.logs import native_stderr_silenced


def hide_gpus_from_tensorflow() -> None:
    """Keep tf off the accelerators (JAX owns them; tf only runs string ops here). Idempotent.
    Listing the devices initialises CUDA, whose C++ complaint on a machine without a GPU ("failed
    call to cuInit") would reach stderr: the call runs with fd 2 silenced."""
    try:
        with native_stderr_silenced():
            tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # tf already initialised its devices (someone used it first): leave them
        pass


hide_gpus_from_tensorflow()


class TokenizerVocabulary(seqio.Vocabulary):
    """A seqio vocabulary over a gist_jax `Tokenizer`; the tf ops call the Python tokenizer.

    ``pad_id`` is the tokenizer's pad id (seqio's default 0 is a real token in most BPE
    vocabularies). Decoding (Python and tf alike) keeps ids through the first EOS, as seqio does,
    and otherwise drops trailing padding, so ``decode`` and ``decode_tf`` agree on padded batches.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(extra_ids=0)
        self.tokenizer = tokenizer

    # -- ids -----------------------------------------------------------------------------------------
    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_id

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_id
        return 0 if pad is None else pad

    @property
    def unk_id(self) -> int | None:
        return getattr(self.tokenizer, "unk_id", None)

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # -- Python ----------------------------------------------------------------------------------------
    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, on all cores where the tokenizer can (HF tokenizers)."""
        return self.tokenizer.encode_batch(texts)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(self._trim([int(i) for i in ids]))

    def _trim(self, ids: list[int]) -> list[int]:
        eos = self.eos_id
        if eos is not None and eos in ids:
            return ids[: ids.index(eos) + 1]
        end = len(ids)
        while end and ids[end - 1] == self.pad_id:
            end -= 1
        return ids[:end]

    # -- tensorflow ------------------------------------------------------------------------------------
    def _encode_np(self, s: bytes) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(_text(s)), np.int32)

    def _encode_batch_np(self, strings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = self.tokenizer.encode_batch([_text(s) for s in strings])
        values = np.fromiter((i for row in rows for i in row), np.int32, sum(map(len, rows)))
        return values, np.asarray([len(row) for row in rows], np.int64)

    def _encode_tf(self, s: Any) -> Any:
        """Scalar string -> int32 ``[n]``; strings of shape ``[d0, ..., dk]`` -> ragged ``[d0, ..., dk, None]``."""
        s = tf.convert_to_tensor(s, tf.string)
        if s.shape.rank is None:
            raise ValueError("TokenizerVocabulary.encode_tf needs a string tensor of known rank")
        if s.shape.rank == 0:
            ids = tf.numpy_function(self._encode_np, [s], tf.int32, stateful=False)
            ids.set_shape([None])
            return ids
        values, lengths = tf.numpy_function(self._encode_batch_np, [tf.reshape(s, [-1])], [tf.int32, tf.int64],
                                            stateful=False)
        values.set_shape([None])
        lengths.set_shape([None])
        ids = tf.RaggedTensor.from_row_lengths(values, lengths)
        dims = tf.shape(s, out_type=tf.int64)
        for axis in range(s.shape.rank - 1, 0, -1):  # restore the outer dims, innermost first
            ids = tf.RaggedTensor.from_uniform_row_length(ids, dims[axis])
        return ids

    def _decode_rows_np(self, values: np.ndarray, row_splits: np.ndarray) -> np.ndarray:
        rows = [values[a:b].tolist() for a, b in itertools.pairwise(row_splits)]
        return np.asarray([self._decode(row).encode("utf-8") for row in rows], dtype=object)

    def _decode_tf(self, ids: Any) -> Any:
        """int ids ``[..., n]`` (dense, or ragged in the last dim) -> strings ``[...]``."""
        if isinstance(ids, tf.RaggedTensor):
            inner_splits = ids.nested_row_splits[-1]
            strings = self._decode_rows(ids.flat_values, inner_splits)
            outer = ids.nested_row_splits[:-1]
            return tf.RaggedTensor.from_nested_row_splits(strings, outer) if outer else strings
        ids = tf.convert_to_tensor(ids)
        if ids.shape.rank == 1:
            return tf.reshape(self._decode_rows(ids, tf.stack([0, tf.size(ids, out_type=tf.int64)])), [])
        dims = tf.shape(ids, out_type=tf.int64)
        rows = tf.reshape(ids, [-1, dims[-1]])
        splits = tf.range(tf.shape(rows, out_type=tf.int64)[0] + 1) * dims[-1]
        return tf.reshape(self._decode_rows(tf.reshape(rows, [-1]), splits), dims[:-1])

    def _decode_rows(self, values: Any, row_splits: Any) -> Any:
        strings = tf.numpy_function(
            self._decode_rows_np, [tf.cast(values, tf.int64), tf.cast(row_splits, tf.int64)], tf.string,
            stateful=False)
        strings.set_shape([None])
        return strings

    # -- identity ----------------------------------------------------------------------------------------
    @functools.cached_property
    def fingerprint(self) -> str:
        """What the ids depend on: equal fingerprints mean identical tokenisation."""
        return tokenizer_fingerprint(self.tokenizer)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenizerVocabulary) and (
            other.tokenizer is self.tokenizer or other.fingerprint == self.fingerprint)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("fingerprint", None)
        return state

    def __repr__(self) -> str:
        return f"TokenizerVocabulary({type(self.tokenizer).__name__}, vocab_size={self.vocab_size})"


def _text(s: Any) -> str:
    """A tf string as numpy hands it over (``bytes``, ``np.bytes_`` or a 0-d object array) -> str."""
    if isinstance(s, np.ndarray):
        s = s.item()
    return s.decode("utf-8", errors="replace") if isinstance(s, bytes) else str(s)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A content hash of a tokenizer (its full definition plus special ids), for equality checks."""
    if isinstance(tokenizer, HFTokenizer):
        content = tokenizer.tokenizer.to_str().encode("utf-8")
    elif isinstance(tokenizer, SentencePieceTokenizer):
        content = tokenizer.processor.serialized_model_proto()
    elif isinstance(tokenizer, ByteTokenizer):
        content = b"bytes"
    else:
        content = f"{type(tokenizer).__qualname__}@{id(tokenizer)}".encode()
    specials = (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    return hashlib.sha1(content + repr(specials).encode()).hexdigest()


@functools.cache
def vocabulary_from_spec(spec: str) -> seqio.Vocabulary:
    """seqio vocabulary for a tokenizer spec (see `gist_jax.data.tokenizer.tokenizer_from_spec`), cached per spec.

    ``sentencepiece:<file>`` gives seqio's own `SentencePieceVocabulary` (tf-native tokenisation,
    same ids as the sentencepiece package); every other spec wraps our tokenizer, so ``bytes``
    gives ids 0..255 plus pad 256 / bos 257 / eos 258, as the model's tiny preset expects.
    """
    if spec.startswith("sentencepiece:"):
        tokenizer_from_spec(spec)  # validates the path with a clear error
        return seqio.SentencePieceVocabulary(spec.partition(":")[2])
    return TokenizerVocabulary(tokenizer_from_spec(spec))


def encode_batch(vocabulary: seqio.Vocabulary, texts: Sequence[str]) -> list[list[int]]:
    """Python-side ids of ``texts`` under ``vocabulary`` (batched where the vocabulary can)."""
    if isinstance(vocabulary, TokenizerVocabulary):
        return vocabulary.encode_batch(texts)
    return [list(vocabulary.encode(text)) for text in texts]
