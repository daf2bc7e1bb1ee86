"""Data pipeline: token stores, packing, deterministic resumable batches, seqio tasks.

Only `vocabularies`, `tasks` and `local_text_builder` import tensorflow/seqio; everything else
here (store, packing, loader, synthetic) is numpy, so the core and benchmarks never need tf.
"""
