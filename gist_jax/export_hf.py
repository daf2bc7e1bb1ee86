"""Export a gist_jax training checkpoint to a Hugging Face directory (see docs/export.md).

    python -m gist_jax.export_hf --checkpoint WORKDIR --out HF_DIR [--step N] [--shard_size 2GB]
        [--dtype bfloat16]

``--checkpoint`` is a run's --workdir, its ``checkpoints`` directory or one ``<step>`` directory;
the newest finished step is exported unless ``--step`` names one. The result loads with
``AutoModelForCausalLM.from_pretrained(HF_DIR)`` (plain, uncompressed) or with
``trust_remote_code=True`` (gist-compressed inference from the bundled ``modeling_gist.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run workdir, its checkpoints/ dir, or a <step> dir")
    parser.add_argument("--out", required=True, help="output directory (must not hold an export)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--shard_size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB")
    parser.add_argument("--dtype", default=None, help="stored dtype (float32, bfloat16); default: as trained")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # export reads to the host; no accelerator needed

    from gist_jax.hf.export import export_checkpoint

    start = time.time()
    out = export_checkpoint(args.checkpoint, args.out, args.step, dtype=args.dtype, shard_size=args.shard_size)
    print(f"exported {args.checkpoint} to {out} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
