"""Tokenised documents on disk: one flat token array plus document offsets, memory-mapped.

Tokenising is the slow part of the input pipeline; it is done once per (source, split,
tokenizer) and every later run, process or epoch reads token ranges by index. That random
access is what makes batches a pure function of (config, seed, step): any process can build
any row without replaying a stream, so resume and a change of process count are free.

A store is written into a temporary directory and renamed into place, so a crash never leaves a
half-written store under the final name, and processes racing on a shared filesystem are safe
(the loser discards its copy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from gist_jax.utils.progress import progress

STORE_FORMAT = 1
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenStore:
    """``tokens[offsets[i]:offsets[i+1]]`` is document i (no BOS/EOS)."""

    path: pathlib.Path
    tokens: np.ndarray  # int32 [total], memory-mapped
    offsets: np.ndarray  # int64 [num_docs + 1]
    meta: dict

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @classmethod
    def open(cls, path: str | pathlib.Path) -> TokenStore:
        path = pathlib.Path(path)
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != STORE_FORMAT:
            raise ValueError(f"token store {path} has format {meta.get('format')}, expected {STORE_FORMAT}; delete it")
        return cls(path, np.load(path / "tokens.npy", mmap_mode="r"), np.load(path / "offsets.npy"), meta)


def store_key(source_spec: str, split: str, tokenizer_spec: str, max_documents: int) -> str:
    """Directory name: readable prefix plus a hash of everything the tokens depend on."""
    ident = json.dumps([STORE_FORMAT, source_spec, split, tokenizer_spec, max_documents])
    digest = hashlib.sha1(ident.encode()).hexdigest()[:12]
    readable = "".join(c if c.isalnum() else "_" for c in f"{source_spec}.{split}")[:48]
    return f"{readable}-{digest}"


def write_store(path: pathlib.Path, documents: Iterable[np.ndarray], meta: dict) -> TokenStore:
    """Streams documents to disk (bounded memory) and publishes the store atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        lengths: list[int] = []
        start = time.perf_counter()
        total = meta.get("max_documents") or None  # a cap is the only count known before reading the source
        with open(tmp / "tokens.raw", "wb") as f, progress(desc=f"tokenising {path.name}", total=total,
                                                           unit="doc") as bar:
            for doc in documents:
                doc = np.asarray(doc, dtype=np.int32)
                if doc.size:
                    f.write(doc.tobytes())
                    lengths.append(doc.size)
                bar.update(1)
        raw = np.fromfile(tmp / "tokens.raw", dtype=np.int32)
        np.save(tmp / "tokens.npy", raw)
        (tmp / "tokens.raw").unlink()
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(tmp / "offsets.npy", offsets)
        meta = {**meta, "format": STORE_FORMAT, "num_documents": len(lengths), "num_tokens": int(offsets[-1]),
                "build_seconds": round(time.perf_counter() - start, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks the store complete
        try:
            os.rename(tmp, path)
        except OSError:  # another process published first; its store is identical
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("token store %s: %d documents, %d tokens in %.1fs", path, meta["num_documents"],
                    meta["num_tokens"], meta["build_seconds"])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenStore.open(path)


def _limited(docs: Iterator[np.ndarray], max_documents: int) -> Iterator[np.ndarray]:
    for i, doc in enumerate(docs):
        if max_documents and i >= max_documents:
            return
        yield doc


def ensure_store(source_spec: str, split: str, tokenizer_spec: str, cache_dir: str | pathlib.Path,
                 max_documents: int = 0,
                 document_stream: Callable[[str, str, str], Iterator[np.ndarray]] | None = None) -> TokenStore:
    """Opens the store for (source, split, tokenizer), tokenising the source on first use.

    ``document_stream`` defaults to the seqio task pipeline (``gist_jax.data.tasks``), imported
    only when a store has to be built, so training from existing stores never loads tensorflow.
    """
    path = pathlib.Path(cache_dir) / store_key(source_spec, split, tokenizer_spec, max_documents)
    if (path / "meta.json").exists():
        return TokenStore.open(path)
    if document_stream is None:
        from gist_jax.data.tasks import document_stream
    meta = {"source": source_spec, "split": split, "tokenizer": tokenizer_spec, "max_documents": max_documents}
    logger.info("building token store %s (source %s, split %s, tokenizer %s): tokenising once, later runs reuse it",
                path, source_spec, split, tokenizer_spec)
    docs = _limited(document_stream(source_spec, split, tokenizer_spec), max_documents)
    return write_store(path, docs, meta)
