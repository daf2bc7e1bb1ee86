"""The data config: which text, which tokenizer, how documents become fixed-length sequences.

Sequence length and global batch size live in the step config (one place); the loader takes
them from there. Everything here, plus the seed, fully determines the batch at every step.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

from gist_jax.data.sources import parse_source_spec
from gist_jax.errors import ConfigError
from gist_jax.model.config import check_float, check_int

PACKING = ("concat", "doc_start", "none")


def default_cache_dir() -> str:
    return os.environ.get("GIST_JAX_CACHE", str(pathlib.Path.home() / ".cache" / "gist_jax" / "tokens"))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Sources, tokenizer and packing.

    sources:      ``(source_spec, rate)`` pairs; rates are the share of *tokens* each source
                  contributes per epoch (after length upsampling). Specs: ``stdlib`` (the built-in
                  corpus), ``files:<glob>``, ``jsonl:<glob>#<field>``, ``tfds:<name>...#<field>``,
                  ``seqio:<task>`` (see ``gist_jax.data.tasks``), ``synthetic:<kind>?<params>``
                  (recall tasks over a haystack, ``gist_jax.data.sources``; docs/data.md).
    tokenizer:    ``bytes``, ``gguf:smollm2``, ``gguf:<path>``, ``hf:<dir>``,
                  ``sentencepiece:<path>``, ``checkpoint:<dir>``.
    packing:      ``concat`` (documents joined with EOS and cut into sequences; no padding but the
                  last sequence of an epoch), ``doc_start`` (every sequence starts at a document
                  start; a document that does not fit is moved to the next sequence and the gap
                  is padding; documents longer than a sequence are cut into whole sequences),
                  ``none`` (one document per sequence, padded; long ones cut).
    upsampling:   ``(source_spec or "*", min_tokens, rate)`` rules, Fu et al. 2024 style: a
                  document of n tokens takes the rate of the matching rule with the largest
                  ``min_tokens <= n`` (default 1.0). Rates above 1 repeat long documents within an
                  epoch (the fractional part is drawn per epoch from the seed); 0 drops them.
    add_bos:      put BOS before every document (EOS always follows every document).
    max_documents: use only the first n documents of each source (smoke runs); 0 = all.
    shuffle:      permute documents and sequences per epoch (seeded); off = corpus order.
    prefetch:     batches prepared ahead on a host thread.
    """

    sources: tuple[tuple[str, float], ...] = (("stdlib", 1.0),)
    tokenizer: str = "gguf:smollm2"
    train_split: str = "train"
    eval_split: str = "validation"
    packing: str = "concat"
    upsampling: tuple[tuple[str, int, float], ...] = ()
    add_bos: bool = False
    max_documents: int = 0
    shuffle: bool = True
    seed: int = 0
    prefetch: int = 2
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", _sources(self.sources))
        object.__setattr__(self, "upsampling", _upsampling(self.upsampling, {s for s, _ in self.sources} | {"*"}))
        if self.packing not in PACKING:
            raise ConfigError(f"data.packing={self.packing!r} must be one of {PACKING}")
        check_int("data.max_documents", self.max_documents, 0, fix="use 0 for all documents")
        check_int("data.prefetch", self.prefetch, 0, fix="use 0 for no prefetching")
        check_int("data.seed", self.seed, 0)
        if not self.tokenizer:
            raise ConfigError("data.tokenizer='': name a tokenizer, e.g. 'bytes' or 'gguf:smollm2'")

    def fingerprint_fields(self) -> dict[str, Any]:
        """What the batch stream depends on (not the cache location or the prefetch depth)."""
        d = dataclasses.asdict(self)
        d.pop("cache_dir")
        d.pop("prefetch")
        return d


def _sources(pairs: Any) -> tuple[tuple[str, float], ...]:
    """``(spec, rate)`` pairs, checked before conversion (``float('x')`` would raise a bare ValueError)
    and with each spec parsed, so a typo fails here and not when the loader first reads it."""
    sources = []
    for i, (spec, rate) in enumerate(pairs):
        check_float(f"data.sources[{i}] rate", rate, low_open=True,
                    fix=f"the rate of {spec!r} is its share of tokens; give a positive number, e.g. 1.0")
        try:
            parse_source_spec(str(spec))
        except ValueError as e:
            raise ConfigError(f"data.sources: {e}") from None
        sources.append((str(spec), float(rate)))
    if not sources:
        raise ConfigError("data.sources is empty; give at least one (source_spec, rate), e.g. ('stdlib', 1.0)")
    if len({s for s, _ in sources}) != len(sources):
        raise ConfigError(f"data.sources lists a source twice: {[s for s, _ in sources]}")
    return tuple(sources)


def _upsampling(rules: Any, known: set[str]) -> tuple[tuple[str, int, float], ...]:
    """``(spec or "*", min_tokens, rate)`` rules, each naming a source of ``known``."""
    out = []
    for spec, min_tokens, rate in rules:
        if spec not in known:
            raise ConfigError(f"data.upsampling rule for {spec!r} names no source in data.sources {sorted(known)}")
        rule = f"data.upsampling rule {(spec, min_tokens, rate)}"
        check_int(f"{rule}: min_tokens", min_tokens, 0)
        check_float(f"{rule}: rate", rate, fix="use 0 to drop, 1 to keep, 2 to repeat such documents")
        out.append((str(spec), int(min_tokens), float(rate)))
    return tuple(out)
