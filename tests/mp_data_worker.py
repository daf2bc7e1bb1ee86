"""One process of the two-process data test: joins jax.distributed (gloo on loopback), builds
the global batches of steps 0..20 from only its own rows, gathers them, process 0 saves them."""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(__file__))

import jax
import numpy as np
from jax.experimental import multihost_utils

from gist_jax.train.distributed import initialize_from_env


def main(cache_dir: str, out: str, steps: int) -> None:
    assert initialize_from_env()
    from data_helpers import BYTE_IDS, byte_stores

    from gist_jax.data.config import DataConfig
    from gist_jax.data.loader import BatchLoader
    from gist_jax.train.config import MeshConfig
    from gist_jax.train.mesh import batch_sharding, make_mesh

    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())
    cfg = DataConfig(sources=(("stdlib", 1.0),), tokenizer="bytes", cache_dir=cache_dir, prefetch=2)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=1))
    loader = BatchLoader(cfg, seq_len=256, global_batch=8, sharding=batch_sharding(mesh),
                         stores=byte_stores(cfg), ids=BYTE_IDS)
    local_rows = loader.local_rows.tolist()
    tokens, masks = [], []
    for _ in range(steps):
        batch = next(loader)
        tokens.append(multihost_utils.process_allgather(batch["tokens"], tiled=True))
        masks.append(multihost_utils.process_allgather(batch["loss_mask"], tiled=True))
    loader.close()
    all_rows = multihost_utils.process_allgather(np.asarray(local_rows, np.int32))
    if jax.process_index() == 0:
        np.savez(out, tokens=np.stack(tokens), loss_mask=np.stack(masks), rows=all_rows)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
