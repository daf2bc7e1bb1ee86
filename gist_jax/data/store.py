"""Tokenised documents on disk: one flat token array plus document offsets, memory-mapped.

Tokenising is the slow part of the input pipeline; it is done once per (source, split,
tokenizer) and every later run, process or epoch reads token ranges by index. That random
access is what makes batches a pure function of (config, seed, step): any process can build
any row without replaying a stream, so resume and a change of process count are free.

A store is written into a temporary directory and renamed into place, so a crash never leaves a
half-written store under the final name, and processes racing on a shared filesystem are safe
(the loser discards its copy). Every open checks the files against each other and against the
CRC-32 of the tokens written at build time (``gist_jax.data.store_check``, which also removes
the temporary directories of killed builds): ``ensure_store`` rebuilds a damaged store with one
warning naming it, or refuses in one line where the cache is read-only.
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
import zlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from gist_jax.data import store_check
from gist_jax.data.store_check import DamagedStore, checksum_text
from gist_jax.errors import ConfigError
from gist_jax.utils.progress import progress

__all__ = ["STORE_FORMAT", "DamagedStore", "TokenStore", "ensure_store", "store_key", "write_store"]

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
    def open(cls, path: str | pathlib.Path, vocab_size: int | None = None) -> TokenStore:
        """The store at ``path`` once its files pass ``store_check.verify`` (``DamagedStore``, a
        one-line ``ConfigError`` naming it, otherwise). ``vocab_size``: the id bound for a store
        whose meta.json records none (built before it was recorded)."""
        path = pathlib.Path(path)
        files = store_check.verify(path, STORE_FORMAT, vocab_size)
        return cls(path, files.tokens, files.offsets, files.meta)


def store_key(source_spec: str, split: str, tokenizer_spec: str, max_documents: int) -> str:
    """Directory name: readable prefix plus a hash of everything the tokens depend on."""
    ident = json.dumps([STORE_FORMAT, source_spec, split, tokenizer_spec, max_documents])
    digest = hashlib.sha1(ident.encode()).hexdigest()[:12]
    readable = "".join(c if c.isalnum() else "_" for c in f"{source_spec}.{split}")[:48]
    return f"{readable}-{digest}"


def write_store(path: pathlib.Path, documents: Iterable[np.ndarray], meta: dict) -> TokenStore:
    """Streams documents to disk (bounded memory) and publishes the store atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid and host in the name: a later build removes it if this process is killed (store_check)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=store_check.temp_prefix(path.name, "build"), dir=path.parent))
    try:
        lengths: list[int] = []
        crc = 0
        start = time.perf_counter()
        total = meta.get("max_documents") or None  # a cap is the only count known before reading the source
        with open(tmp / "tokens.raw", "wb") as f, progress(desc=f"tokenising {path.name}", total=total,
                                                           unit="doc") as bar:
            for doc in documents:
                doc = np.asarray(doc, dtype=np.int32)
                if doc.size:
                    data = doc.tobytes()
                    f.write(data)
                    crc = zlib.crc32(data, crc)  # of the bytes as made; the open below reads them back
                    lengths.append(doc.size)
                bar.update(1)
        raw = np.fromfile(tmp / "tokens.raw", dtype=np.int32)
        np.save(tmp / "tokens.npy", raw)
        (tmp / "tokens.raw").unlink()
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(tmp / "offsets.npy", offsets)
        meta = {**meta, "format": STORE_FORMAT, "num_documents": len(lengths), "num_tokens": int(offsets[-1]),
                "checksum": checksum_text(crc), "build_seconds": round(time.perf_counter() - start, 2)}
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
    A store that fails its checks is rebuilt (its source is at hand) with one warning naming it;
    in a read-only cache it is refused in one line instead. The temporary directories of killed
    builds in the cache are removed first.
    """
    cache = pathlib.Path(cache_dir)
    path = cache / store_key(source_spec, split, tokenizer_spec, max_documents)
    can_write = store_check.writable(cache)
    if can_write:
        store_check.sweep_dead_temps(cache)
    vocab_size = _vocab_size(tokenizer_spec)
    if path.exists() or path.is_symlink():
        try:
            files = store_check.verify(path, STORE_FORMAT, vocab_size)
        except DamagedStore as e:
            if not can_write:
                raise ConfigError(f"token store {path} is damaged: {e.reason}. data.cache_dir={cache} is read-only, "
                                  "so it cannot be rebuilt here: delete that directory where the cache is writable "
                                  "and rerun, or set data.cache_dir to a writable directory") from None
            logger.warning("token store %s is damaged: %s. Rebuilding it from source %s", path, e.reason, source_spec)
            _discard(path, e.inode)
        else:
            meta = files.meta
            if "checksum" not in meta and can_write:
                meta = _record_checksum(path, files, vocab_size)
            return TokenStore(path, files.tokens, files.offsets, meta)
    if document_stream is None:
        from gist_jax.data.tasks import document_stream as default_stream

        document_stream = default_stream
    meta = {"source": source_spec, "split": split, "tokenizer": tokenizer_spec, "max_documents": max_documents}
    if vocab_size:
        meta["vocab_size"] = vocab_size
    logger.info("building token store %s (source %s, split %s, tokenizer %s): tokenising once, later runs reuse it",
                path, source_spec, split, tokenizer_spec)
    docs = _limited(document_stream(source_spec, split, tokenizer_spec), max_documents)
    return write_store(path, docs, meta)


def _vocab_size(tokenizer_spec: str) -> int | None:
    """The tokenizer's id bound, or None where it cannot be loaded here (the build or the loader
    then says why). Cached per spec; the loader loads the same tokenizer right after."""
    from gist_jax.data.tokenizer import tokenizer_from_spec

    try:
        return int(tokenizer_from_spec(tokenizer_spec).vocab_size)
    except (ValueError, OSError, ImportError):
        return None


def _discard(path: pathlib.Path, inode: int | None) -> None:
    """Moves a damaged store aside in one rename (a concurrent opener sees it whole or not at
    all), then deletes it. Two processes may find the same damage: the second one's rename fails,
    or, when the first has published a rebuilt store meanwhile (another inode), puts it back."""
    trash = pathlib.Path(tempfile.mkdtemp(prefix=store_check.temp_prefix(path.name, "damaged"), dir=path.parent))
    try:
        os.rename(path, trash / "store")
        if inode is not None and (trash / "store").stat().st_ino != inode:
            os.rename(trash / "store", path)
    except OSError:
        pass  # moved by another process already, or a rebuilt store stands at path again
    shutil.rmtree(trash, ignore_errors=True)


def _record_checksum(path: pathlib.Path, files: store_check.StoreFiles, vocab_size: int | None) -> dict:
    """Adopts a store built before checksums: it passed every other check (sizes, offsets, ids
    inside the vocabulary), so its tokens' CRC-32 is written into meta.json now, atomically, and
    later damage is caught. Rebuilding instead would re-tokenise the corpus (hours for a large
    one) to protect against bit rot that is far rarer than the kills and cut copies the other
    checks catch. Left as it is where the store directory cannot be written."""
    meta = {**files.meta, "checksum": checksum_text(files.crc32)}
    if vocab_size and "vocab_size" not in meta:
        meta["vocab_size"] = vocab_size
    tmp = path / f".meta.json.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, path / "meta.json")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        logger.info("token store %s predates checksums and cannot be updated (%s); checked without one", path, e)
        return files.meta
    logger.info("token store %s predates checksums; it passed every other check, so the checksum of its tokens is "
                "recorded now", path)
    return meta
