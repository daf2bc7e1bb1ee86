"""Compressed inference: a fixed-size gist KV cache, segment-wise prefill and jitted decoding."""

from gist_jax.inference.cache import Cache, Plan, cache_stats, expected_entries
from gist_jax.inference.decode import Generation, generate, sampleable_ids

__all__ = ["Cache", "Generation", "Plan", "cache_stats", "expected_entries", "generate", "sampleable_ids"]
