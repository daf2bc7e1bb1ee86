"""The one exception every layer raises for a configuration fault.

Its own module, below every package, so the model, the data layer, the training loop and the
tools raise and catch the same class without importing each other (it used to live in
``model/config.py``, which made "raise a config error" an import of the model). Every entry
point turns it into one line naming the key and the fix, and exit code 2.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""
