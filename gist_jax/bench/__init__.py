"""Benchmarks of the training step on synthetic data (``python -m gist_jax.bench``); imports
no tensorflow. See ``docs/performance.md`` for the method and the measured tables."""
