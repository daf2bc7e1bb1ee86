"""``from gist_jax.utils.quiet_tf import tf``: tensorflow, imported without its C++ start-up lines.

The one place the data layer's tensorflow is first imported (``vocabularies``, ``tasks`` and
``local_text_builder`` import this before seqio or tfds, with an ``# isort: split`` after it).
Loading tensorflow writes "All log messages before absl::InitializeLog() is called are written
to STDERR", "oneDNN custom operations are on ..." and "Could not find cuda drivers ..." to file
descriptor 2 from C++, whatever ``TF_CPP_MIN_LOG_LEVEL`` says, so the import runs with fd 2 on
/dev/null (`gist_jax.utils.logs.native_stderr_silenced`). Python's own output still reaches
stderr, and an ImportError (tensorflow missing or broken) propagates with its message intact.
"""

from __future__ import annotations

import os

from gist_jax.utils.logs import native_stderr_silenced

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # tf's own logging once it runs
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # tf runs only string ops here: oneDNN buys nothing

with native_stderr_silenced():
    import tensorflow as tf

__all__ = ["tf"]
