"""Gist compression. Importing the package registers the built-in compression variants
(``variants.py``) in ``config.VARIANTS``, so every config is validated against them."""

from . import variants  # noqa: F401  (registration)
