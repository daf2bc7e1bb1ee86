"""Small real-text token stores for data tests: stdlib files as UTF-8 bytes, no tensorflow."""

from __future__ import annotations

import pathlib
import sysconfig

import numpy as np

from gist_jax.data.config import DataConfig
from gist_jax.data.loader import SpecialIds
from gist_jax.data.store import TokenStore, ensure_store
from gist_jax.data.tokenizer import ByteTokenizer

BYTE_IDS = SpecialIds(bos=ByteTokenizer.bos_id, eos=ByteTokenizer.eos_id, pad=ByteTokenizer.pad_id)


def stdlib_bytes_stream(source_spec: str, split: str, tokenizer_spec: str):
    """Documents of a few stdlib modules as byte ids; the split picks alternate files."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[:200]
    files = files[0::2] if split == "train" else files[1::2]
    for f in files:
        data = f.read_bytes()[:6000]  # short and long documents, still fast
        yield np.frombuffer(data, np.uint8).astype(np.int32)


def byte_stores(cfg: DataConfig, split: str = "train") -> list[TokenStore]:
    return [ensure_store(spec, split, cfg.tokenizer, cfg.cache_dir, cfg.max_documents,
                         document_stream=stdlib_bytes_stream) for spec, _ in cfg.sources]
