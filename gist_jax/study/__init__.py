"""The paper's study in one command (``python -m gist_jax.study --scale ... --out DIR``).

From one base model: train the grid of Deng et al. (ACL 2025) -- full attention, Fine-KV,
Coarse-KV, Coarse-Rec (each evaluated at ratios 4 and 8), and Fine-KV with AE, with TIE and
with both -- through the real training entry point, evaluate every checkpoint with
``gist_jax.evaluate``'s suites, and write a report mirroring the paper's tables and figures
with a bootstrap interval on every number.

Modules: ``plan`` (the study file, ``experiments/study.py``), ``runner`` (train / evaluate /
cache), ``numbers`` (the estimates from the suites' payloads), ``figures`` (PNGs), ``report``
(markdown + JSON); the bootstrap and its sentences are ``gist_jax.evaluate.stats``, shared with
the suites. docs/study.md describes it.
"""
