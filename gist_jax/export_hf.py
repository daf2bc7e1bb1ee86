"""Export a gist_jax training checkpoint to a Hugging Face directory (see docs/export.md).

    python -m gist_jax.export_hf --checkpoint WORKDIR --out HF_DIR [--step N] [--shard-size 2GB] [--overwrite]
        [--dtype bfloat16] [--config.model.init=hf:/moved/base] [--config.data.tokenizer=hf:/moved/base]

``--checkpoint`` is a run's --workdir, its ``checkpoints`` directory or one ``<step>`` directory;
the newest sound step is exported unless ``--step`` names one (every leaf is checked against the
checksums training wrote; a damaged newest step falls back to the next older one with a warning,
a damaged ``--step`` is refused). The export is written beside ``--out`` and renamed when complete.
The result loads with
``AutoModelForCausalLM.from_pretrained(HF_DIR)`` (plain, uncompressed) or with
``trust_remote_code=True`` (gist-compressed inference from the bundled ``modeling_gist.py``).
The run config is the one stored with the checkpoint (``gist_jax/cli_config.py``); only the
paths it names that may have moved since training (``OVERRIDABLE``) can be overridden, and the
model they describe is still checked against the checkpoint's recorded layout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from gist_jax import cli_config

# Run-config keys an export may change: where the base model's config and the tokenizer are now.
OVERRIDABLE = ("model.init", "data.tokenizer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gist_jax.export_hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run workdir, its checkpoints/ dir, or a <step> dir")
    parser.add_argument("--out", required=True, help="output directory (new, empty, or an earlier export with "
                        "--overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the export already in --out")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument(*cli_config.option("shard_size"), dest="shard_size", default="2GB",
                        help="largest safetensors shard, e.g. 2GB, 500MB")
    parser.add_argument("--dtype", default=None, help="stored dtype (float32, bfloat16); default: as trained")
    cli_config.add_checkpoint_overrides(parser, OVERRIDABLE)
    args, overrides = cli_config.parse_tool_args(parser, argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # export reads to the host; no accelerator needed

    from gist_jax.errors import ConfigError
    from gist_jax.train.hf_export import export_checkpoint

    try:
        run = (cli_config.checkpoint_run(cli_config.stored_run(args.checkpoint, args.step), overrides, OVERRIDABLE)
               if overrides else None)
    except (cli_config.CliConfigError, ConfigError, FileNotFoundError) as e:
        cli_config.exit_config_error(e)
    start = time.time()
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.step, dtype=args.dtype, shard_size=args.shard_size,
                                run=run, overwrite=args.overwrite)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:  # a damaged or missing step, a taken --out
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"exported {args.checkpoint} to {out} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
