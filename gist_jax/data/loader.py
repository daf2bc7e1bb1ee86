"""Deterministic, resumable, multi-host batches as global ``jax.Array``s.

Row ``b`` of the global batch at step ``k`` is sequence ``k * B + b`` of an endless stream of
epochs (``gist_jax.data.packing``). Each process builds only the rows its devices hold under
the batch sharding and the global array is assembled from those shards, so no process reads
data it does not need and the global batch is identical for any number of processes. The
iterator state is the next step (plus a fingerprint of what the stream depends on): resuming at
step k reproduces an uninterrupted run exactly, also after changing the process count.

Per-row data computed offline from the same sequences (precomputed TIE weights,
``gist_jax/train/tie_store.py``) rides along as ``extra_rows``: a function of the global
sequence index, so it follows the tokens through every process count, resume and prefetch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

from gist_jax.data.config import DataConfig
from gist_jax.data.packing import EpochPlan, framed_slice, plan_epoch
from gist_jax.data.store import TokenStore, ensure_store
from gist_jax.errors import ConfigError

HostBatch = dict[str, np.ndarray]
# batch key -> (global sequence indices [n] -> that key's rows [n, seq_len]); see the module docstring
RowSource = Callable[[np.ndarray], np.ndarray]


def open_stores(cfg: DataConfig, split: str) -> list[TokenStore]:
    return [ensure_store(spec, split, cfg.tokenizer, cfg.cache_dir, cfg.max_documents) for spec, _ in cfg.sources]


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    bos: int | None
    eos: int
    pad: int

    @classmethod
    def from_tokenizer_spec(cls, spec: str) -> SpecialIds:
        from gist_jax.data.tokenizer import tokenizer_from_spec

        tok = tokenizer_from_spec(spec)
        if tok.eos_id is None:
            raise ConfigError(f"data.tokenizer={spec!r} has no EOS token; packing needs one as the document boundary")
        return cls(tok.bos_id, tok.eos_id, tok.pad_id if tok.pad_id is not None else tok.eos_id)


class Sequencer:
    """The endless stream of packed sequences of one split: row g -> (tokens, valid)."""

    def __init__(self, cfg: DataConfig, stores: list[TokenStore], seq_len: int, ids: SpecialIds):
        if cfg.add_bos and ids.bos is None:
            raise ConfigError(f"data.add_bos=True but data.tokenizer={cfg.tokenizer!r} has no BOS token")
        self.cfg, self.stores, self.seq_len, self.ids = cfg, stores, seq_len, ids
        extra = 1 + int(cfg.add_bos)
        self._framed = [s.lengths.astype(np.int64) + extra for s in stores]
        if sum(len(f) for f in self._framed) == 0:
            raise ConfigError(f"data.sources {[s for s, _ in cfg.sources]} hold no documents")
        self._epoch_ends: list[int] = []  # cumulative sequence counts
        self._lock = threading.Lock()  # the prefetch thread and the caller may both ask for rows

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one loader per run; the cache goes with it
    def plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(self._framed, self.cfg, self.seq_len, epoch)

    def locate(self, g: int) -> tuple[int, int]:
        """(epoch, row inside the epoch) of global sequence g; epochs may differ in size."""
        while not self._epoch_ends or self._epoch_ends[-1] <= g:
            size = self.plan(len(self._epoch_ends)).num_sequences
            if size == 0:
                raise ConfigError("an epoch produced no sequences: every document was dropped by data.upsampling")
            self._epoch_ends.append((self._epoch_ends[-1] if self._epoch_ends else 0) + size)
        epoch = int(np.searchsorted(self._epoch_ends, g, side="right"))
        return epoch, g - (self._epoch_ends[epoch - 1] if epoch else 0)

    def epoch_size(self, epoch: int) -> int:
        return self.plan(epoch).num_sequences

    def sequence(self, plan: EpochPlan, q: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.full(self.seq_len, self.ids.pad, np.int32)
        valid = np.zeros(self.seq_len, bool)
        bos = self.ids.bos if self.cfg.add_bos else None
        for p in range(plan.first[q], plan.first[q + 1]):
            doc = self.stores[plan.source[p]].document(plan.doc[p])
            off, n = int(plan.offset[p]), int(plan.length[p])
            tokens[off:off + n] = framed_slice(doc, int(plan.start[p]), n, bos, self.ids.eos)
            valid[off:off + n] = True
        return tokens, valid

    def rows(self, global_rows: np.ndarray) -> HostBatch:
        tokens = np.empty((len(global_rows), self.seq_len), np.int32)
        valid = np.empty((len(global_rows), self.seq_len), bool)
        with self._lock:
            for i, g in enumerate(global_rows.tolist()):
                epoch, j = self.locate(g)
                plan = self.plan(epoch)
                tokens[i], valid[i] = self.sequence(plan, int(plan.order[j]))
        return {"tokens": tokens, "loss_mask": loss_mask_from_valid(valid)}


def loss_mask_from_valid(valid_BxN: np.ndarray) -> np.ndarray:
    """Position j carries loss iff it and its target j + 1 are real tokens."""
    mask = np.zeros_like(valid_BxN)
    mask[:, :-1] = valid_BxN[:, :-1] & valid_BxN[:, 1:]
    return mask


def local_row_slices(sharding: Sharding, global_shape: tuple[int, ...]) -> dict[Any, slice]:
    """Rows of the global batch each of this process's devices holds."""
    out = {}
    for device, index in sharding.addressable_devices_indices_map(global_shape).items():
        rows = index[0]
        out[device] = slice(rows.start or 0, global_shape[0] if rows.stop is None else rows.stop)
    return out


class BatchLoader:
    """Iterator of global batches ``{"tokens", "loss_mask"}`` [B, N] for a batch sharding, plus
    one [B, N] entry per ``extra_rows`` key (e.g. ``tie_weights``) for the same sequences."""

    def __init__(self, cfg: DataConfig, seq_len: int, global_batch: int, sharding: Sharding,
                 split: str | None = None, start_step: int = 0, stores: list[TokenStore] | None = None,
                 ids: SpecialIds | None = None, extra_rows: Mapping[str, RowSource] | None = None):
        self.split = split or cfg.train_split
        stores = stores if stores is not None else open_stores(cfg, self.split)
        self.sequencer = Sequencer(cfg, stores, seq_len, ids or SpecialIds.from_tokenizer_spec(cfg.tokenizer))
        self.cfg, self.global_batch, self.sharding = cfg, global_batch, sharding
        self.global_shape = (global_batch, seq_len)
        self.slices = local_row_slices(sharding, self.global_shape)
        self.local_rows = np.unique(np.concatenate([np.arange(s.start, s.stop) for s in self.slices.values()]))
        self.fingerprint = self._fingerprint(stores)
        self.extra_rows = dict(extra_rows or {})
        self.step = start_step
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _fingerprint(self, stores: list[TokenStore]) -> str:
        ident = {"data": self.cfg.fingerprint_fields(), "split": self.split, "seq_len": self.global_shape[1],
                 "batch": self.global_batch, "stores": [s.meta.get("num_tokens") for s in stores]}
        return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    # ---- the pure part: step -> rows ------------------------------------------------------------
    def host_batch(self, step: int, rows: np.ndarray | None = None) -> HostBatch:
        """This process's rows (or ``rows``, indices into the global batch) of step ``step``."""
        rows = self.local_rows if rows is None else np.asarray(rows)
        global_rows = step * self.global_batch + rows
        batch = self.sequencer.rows(global_rows)
        for key, source in self.extra_rows.items():
            batch[key] = source(global_rows)
        return batch

    def to_global(self, host: HostBatch) -> dict[str, jax.Array]:
        where = {int(r): i for i, r in enumerate(self.local_rows.tolist())}
        out = {}
        for key, local in host.items():
            shards = [jax.device_put(local[[where[r] for r in range(s.start, s.stop)]], d)
                      for d, s in self.slices.items()]
            out[key] = jax.make_array_from_single_device_arrays(self.global_shape, self.sharding, shards)
        return out

    # ---- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Tiny and JSON-serialisable: stored in every checkpoint."""
        return {"step": int(self.step), "fingerprint": self.fingerprint}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue at ``state['step']``; refused when the stream is not the one the checkpoint
        was reading (another corpus, tokenizer or packing: resuming would silently train on other
        batches than an uninterrupted run)."""
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"the data stream changed since the checkpoint (fingerprint {state.get('fingerprint')} "
                              f"-> {self.fingerprint}: the corpus, its token store, the tokenizer or the packing "
                              "differ); restore them or use a new --workdir")
        self.close()
        self.step = int(state["step"])

    # ---- iteration with prefetch ---------------------------------------------------------------
    def _produce(self, first_step: int, q: queue.Queue, stop: threading.Event) -> None:
        step = first_step
        try:
            while not stop.is_set():
                item = (step, self.host_batch(step))
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step += 1
        except BaseException as e:  # noqa: BLE001 - surfaced on the consumer side
            q.put((step, e))

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if self.cfg.prefetch == 0:
            host = self.host_batch(self.step)
        else:
            if self._thread is None:
                self._stop = threading.Event()
                self._queue = queue.Queue(maxsize=self.cfg.prefetch)
                self._thread = threading.Thread(target=self._produce, args=(self.step, self._queue, self._stop),
                                                daemon=True, name="gist_jax-prefetch")
                self._thread.start()
            step, host = self._queue.get()
            if isinstance(host, BaseException):
                raise host
            assert step == self.step, (step, self.step)
        self.step += 1
        return self.to_global(host)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread, self._queue = None, None
