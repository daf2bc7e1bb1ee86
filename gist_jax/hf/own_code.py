"""Loading an export with the package's own ``modeling_gist.py``, never the directory's copy.

An export ships ``modeling_gist.py`` so that ``trust_remote_code=True`` works for its users. But
when gist_jax itself loads a directory (``compare_hf``, the demo), that flag would run whatever
Python file the directory holds: a planted or stale copy would execute, or be compared instead
of ours. Every load the project does goes through ``load_gist_model``: the compressed-inference
class is imported from this package, and a directory whose copy differs from ours is refused in
one line (it was not written by this version, or it was changed).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from gist_jax import families
from gist_jax.errors import ConfigError
from gist_jax.hf.export import MODELING_FILE


def check_modeling_file(hf_dir: str | pathlib.Path) -> None:
    """``hf_dir``'s ``modeling_gist.py``, if any, is byte for byte the package's; ``ConfigError``
    naming the file otherwise."""
    theirs = pathlib.Path(hf_dir) / MODELING_FILE.name
    if theirs.is_file() and theirs.read_bytes() != MODELING_FILE.read_bytes():
        raise ConfigError(f"{theirs} differs from the modeling_gist.py this gist_jax ships, so it is not loaded; "
                          "re-export the checkpoint with this version (python -m gist_jax.export_hf --overwrite)")


def gist_model_class(hf_dir: str | pathlib.Path) -> Any:
    """The package's compressed-inference class for the export's family (from its ``auto_map``)."""
    from gist_jax.hf import modeling_gist

    config = pathlib.Path(hf_dir) / "config.json"
    try:
        auto_map = json.loads(config.read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{config} is missing or not a config object ({type(e).__name__}); give an export "
                          "directory (python -m gist_jax.export_hf)") from None
    name = str(auto_map.get("AutoModelForCausalLM", "")).rpartition(".")[2]
    classes = sorted(family.export_class for family in families.FAMILIES.values())
    if name not in classes:
        raise ConfigError(f"{config} names no gist model class (auto_map {auto_map!r}); it is not a compressed "
                          f"gist_jax export (expected one of {classes})")
    return getattr(modeling_gist, name)


def load_gist_model(hf_dir: str | pathlib.Path, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, **kwargs)`` as the
    export's users get it, but with the package's class: the directory's code never runs."""
    check_modeling_file(hf_dir)
    return gist_model_class(hf_dir).from_pretrained(str(hf_dir), **kwargs)
