"""The data config: which text, which tokenizer, how documents become fixed-length sequences.

Sequence length and global batch size live in the step config (one place); the loader takes
them from there. Everything here, plus the seed, fully determines the batch at every step.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

from gist_jax.model.config import ConfigError

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
        sources = tuple((str(s), float(r)) for s, r in self.sources)
        object.__setattr__(self, "sources", sources)
        object.__setattr__(self, "upsampling",
                           tuple((str(s), int(n), float(r)) for s, n, r in self.upsampling))
        if not sources:
            raise ConfigError("data.sources is empty; give at least one (source_spec, rate), e.g. ('stdlib', 1.0)")
        if any(r <= 0 for _, r in sources):
            raise ConfigError(f"data.sources rates {[r for _, r in sources]} must all be positive")
        if len({s for s, _ in sources}) != len(sources):
            raise ConfigError(f"data.sources lists a source twice: {[s for s, _ in sources]}")
        if self.packing not in PACKING:
            raise ConfigError(f"data.packing={self.packing!r} must be one of {PACKING}")
        known = {s for s, _ in sources} | {"*"}
        for spec, min_tokens, rate in self.upsampling:
            if spec not in known:
                raise ConfigError(f"data.upsampling rule for {spec!r} names no source in data.sources {sorted(known)}")
            if min_tokens < 0 or rate < 0:
                raise ConfigError(f"data.upsampling rule {(spec, min_tokens, rate)}: min_tokens and rate must be >= 0")
        if self.max_documents < 0 or self.prefetch < 0:
            raise ConfigError("data.max_documents and data.prefetch must be >= 0")

    def fingerprint_fields(self) -> dict[str, Any]:
        """What the batch stream depends on (not the cache location or the prefetch depth)."""
        d = dataclasses.asdict(self)
        d.pop("cache_dir")
        d.pop("prefetch")
        return d
