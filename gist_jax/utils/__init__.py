"""Leaf helpers every layer may import (model, data, train, evaluate, hf, the CLIs).

Nothing here imports another ``gist_jax`` module, so no import from here is ever upward:
``progress`` is the one policy for progress bars, ``logs`` the one logging set-up of the entry
points and the one way to silence native libraries' start-up chatter.
"""
