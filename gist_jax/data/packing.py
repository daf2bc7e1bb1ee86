"""From tokenised documents to fixed-length sequences, as a pure function of (config, seed, epoch).

Per epoch:
  1. every document is *framed* as ``[BOS] doc EOS`` (EOS always: it is the document boundary);
  2. each document gets a repeat factor: its length-bucket rate (Fu et al. 2024 upsampling of
     long documents) times its source's mixture factor (so each source contributes its rate's
     share of the epoch's tokens); factor 2.6 means 2 copies plus a third with probability 0.6,
     drawn from the epoch's seed;
  3. the copies are shuffled (seeded) and laid out on one virtual token line: back to back
     (``concat``), each starting a new sequence when it would not fit (``doc_start``), or each on
     its own sequences (``none``);
  4. the line is cut every ``seq_len`` tokens into sequences, which are shuffled again.
The result is a table of *pieces* (sequence, offset, source, document, start, length), so a row
is built by reading a few token ranges: no pass over the data, any row in any order.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gist_jax.data.config import DataConfig


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """Pieces sorted by sequence; sequence ``q`` owns pieces ``first[q]:first[q+1]``."""

    seq_len: int
    order: np.ndarray  # [num_sequences] row j of the epoch is sequence order[j]
    first: np.ndarray  # [num_sequences + 1]
    offset: np.ndarray  # [P] position of the piece inside its sequence
    source: np.ndarray  # [P] source index
    doc: np.ndarray  # [P] document index inside the source's store
    start: np.ndarray  # [P] first token of the piece inside the framed document
    length: np.ndarray  # [P]
    copies: tuple[np.ndarray, ...]  # per source: copies of each document in this epoch

    @property
    def num_sequences(self) -> int:
        return len(self.order)


def upsampling_rates(lengths: np.ndarray, source_spec: str, cfg: DataConfig) -> np.ndarray:
    """Per-document length-bucket rate: the rule with the largest ``min_tokens <= length``."""
    rules = sorted((n, r) for s, n, r in cfg.upsampling if s in (source_spec, "*"))
    rates = np.ones(len(lengths))
    for min_tokens, rate in rules:  # ascending, so the largest matching threshold wins
        rates[lengths >= min_tokens] = rate
    return rates


def repeat_factors(framed_lengths: list[np.ndarray], cfg: DataConfig) -> list[np.ndarray]:
    """Bucket rate x mixture factor; mixture factors keep the epoch's total token count."""
    bucket = [upsampling_rates(n, spec, cfg) for n, (spec, _) in zip(framed_lengths, cfg.sources)]
    tokens = np.array([float(np.sum(b * n)) for b, n in zip(bucket, framed_lengths)])
    if len(tokens) == 1 or not np.all(tokens > 0):
        return bucket
    rates = np.array([r for _, r in cfg.sources])
    mixture = rates / rates.sum() * tokens.sum() / tokens
    return [b * m for b, m in zip(bucket, mixture)]


def _rng(seed: int, epoch: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, purpose])


def _line_starts(lengths: np.ndarray, seq_len: int, packing: str) -> np.ndarray:
    """Where each document starts on the epoch's virtual token line."""
    if packing == "concat":
        return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    if packing == "none":
        spans = -(-lengths // seq_len) * seq_len
        return np.concatenate([[0], np.cumsum(spans)[:-1]]).astype(np.int64)
    starts = np.empty(len(lengths), np.int64)  # doc_start: sequential by nature, scalar ops only
    pos = 0
    for i, n in enumerate(lengths.tolist()):
        used = pos % seq_len
        if used and n > seq_len - used:
            pos += seq_len - used
        starts[i] = pos
        pos += n
    return starts


def plan_epoch(framed_lengths: list[np.ndarray], cfg: DataConfig, seq_len: int, epoch: int) -> EpochPlan:
    """The epoch's sequences; depends only on the lengths, the config, the seed and ``epoch``."""
    factors = repeat_factors(framed_lengths, cfg)
    rng = _rng(cfg.seed, epoch, 0)
    copies = tuple((np.floor(f) + (rng.random(len(f)) < f - np.floor(f))).astype(np.int64) for f in factors)
    source = np.concatenate([np.full(int(c.sum()), s, np.int32) for s, c in enumerate(copies)])
    doc = np.concatenate([np.repeat(np.arange(len(c)), c) for c in copies])
    if cfg.shuffle:
        perm = _rng(cfg.seed, epoch, 1).permutation(len(doc))
        source, doc = source[perm], doc[perm]
    doc_base = np.concatenate([[0], np.cumsum([len(n) for n in framed_lengths])[:-1]]).astype(np.int64)
    lengths = np.concatenate(framed_lengths).astype(np.int64)[doc_base[source] + doc]
    line_start = _line_starts(lengths, seq_len, cfg.packing)
    line_end = line_start + lengths
    first_seq, last_seq = line_start // seq_len, (line_end - 1) // seq_len
    pieces_per_doc = last_seq - first_seq + 1
    owner = np.repeat(np.arange(len(doc)), pieces_per_doc)
    k = np.arange(len(owner)) - np.repeat(np.cumsum(pieces_per_doc) - pieces_per_doc, pieces_per_doc)
    seq = first_seq[owner] + k
    piece_begin = np.maximum(line_start[owner], seq * seq_len)
    piece_end = np.minimum(line_end[owner], (seq + 1) * seq_len)
    num_sequences = int(-(-line_end[-1] // seq_len)) if len(doc) else 0
    # Pieces are in line order, hence sorted by sequence; no sequence is empty (a doc_start gap
    # only ever follows tokens of the same sequence).
    first = np.searchsorted(seq, np.arange(num_sequences + 1), side="left").astype(np.int64)
    order = _rng(cfg.seed, epoch, 2).permutation(num_sequences) if cfg.shuffle else np.arange(num_sequences)
    return EpochPlan(seq_len=seq_len, order=order, first=first, offset=(piece_begin - seq * seq_len).astype(np.int32),
                     source=source[owner], doc=doc[owner], start=piece_begin - line_start[owner],
                     length=(piece_end - piece_begin).astype(np.int32), copies=copies)


def framed_slice(document: np.ndarray, start: int, length: int, bos_id: int | None, eos_id: int) -> np.ndarray:
    """Tokens ``start:start+length`` of ``[BOS] document EOS``."""
    head = [bos_id] if bos_id is not None else []
    n = len(head) + len(document)
    lo, hi = start, start + length
    parts = []
    if lo < len(head):
        parts.append(np.asarray(head[lo:hi], np.int32))
    body_lo, body_hi = max(lo - len(head), 0), min(hi - len(head), len(document))
    if body_hi > body_lo:
        parts.append(np.asarray(document[body_lo:body_hi], np.int32))
    if hi > n:  # the EOS slot
        parts.append(np.asarray([eos_id], np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)
