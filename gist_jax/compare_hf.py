"""Load both sides of an export and report how far apart they are on some text.

    python -m gist_jax.compare_hf --hf HF_DIR [--checkpoint WORKDIR [--step N]] [--text "..." | --text-file F]
        [--ratio R] [--mode compressed|plain|both] [--config.model.init=hf:/moved/base]
        [--batch_lengths 5,40,...,700 [--new_tokens N]]

gist_jax side: the params imported back from ``HF_DIR`` (or, with ``--checkpoint``, the training
checkpoint itself, so a broken export cannot hide behind a matching import). transformers side:
``modeling_gist.py`` (compressed) and the stock model (plain). Prints one JSON line per mode
with max/mean |logit difference|, mean KL(transformers || gist_jax) and top-1 agreement. With
``--checkpoint`` the run config is the one stored with it (``gist_jax/cli_config.py``); only
``model.init`` (where the base model's config is now) may be overridden.

``--batch_lengths`` adds the way users generate: one prompt per length (from the text, each at
another offset), left padded into one batch, greedy through transformers' ``generate`` on the
export, compared token for token with each prompt alone and with ``gist_jax.inference.generate``
(one more JSON line, mode ``batch``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from gist_jax import cli_config

OVERRIDABLE = ("model.init",)  # run-config keys a comparison may change (see gist_jax.export_hf)

DEFAULT_TEXT = ("Gist tokens compress a long context segment by segment. " * 40).strip()


def load_gist_jax(hf_dir: pathlib.Path, checkpoint: str | None, step: int | None, run: dict | None = None):
    """(cfg, comp, params) in float32 from the export or from the training checkpoint."""
    from gist_jax.hf.importer import load_gist_hf_dir

    if checkpoint is None:
        return load_gist_hf_dir(hf_dir, dtype="float32")
    from gist_jax.model.transformer import to_layout
    from gist_jax.train.step_reader import ModelParamsReader, checkpoint_configs, sound_step

    def read(step_dir):
        cfg, comp, _ = checkpoint_configs(step_dir, run)
        return cfg, comp, ModelParamsReader(step_dir).load_all()

    cfg, comp, params = sound_step(checkpoint, step, read)
    return cfg.replace(dtype="float32"), comp, to_layout(params, cfg)


def gist_jax_logits(cfg, comp, params, tokens, ratio: int | None, compressed: bool):
    import jax.numpy as jnp
    import numpy as np

    from gist_jax.gist.forward import compressed_logits
    from gist_jax.gist.layout import build_layout
    from gist_jax.gist.specs import layout_arrays
    from gist_jax.model.transformer import forward

    if not compressed:
        base = cfg.replace(num_gist_embeddings=0, gist_projections=False)
        return np.asarray(forward(base, _strip_gist(params), jnp.asarray(tokens)))
    r = ratio or comp.ratios[0]
    case = comp.replace(ratios=(r,), ratio_sampling="fixed", pad_to_segments=True)
    layout = build_layout(tokens.shape[1], case)
    logits = compressed_logits(cfg, case, layout.shape, params, jnp.asarray(tokens), layout_arrays(layout))
    return np.asarray(logits)[:, layout.live_raw_positions()]


def _strip_gist(params: dict) -> dict:
    if isinstance(params, dict):
        return {k: _strip_gist(v) for k, v in params.items() if k != "gist_embedding" and not k.startswith("gist_")}
    return params


def _compare(args: argparse.Namespace, run: dict | None) -> None:
    import numpy as np
    import torch
    import transformers

    from gist_jax.hf.own_code import check_modeling_file, load_gist_model
    from gist_jax.hf.reference import logit_agreement

    hf_dir = pathlib.Path(args.hf)
    if args.mode != "plain":
        check_modeling_file(hf_dir)  # before anything loads
    text = pathlib.Path(args.text_file).read_text() if args.text_file else (args.text or DEFAULT_TEXT)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:args.max_tokens]
    tokens = np.asarray([ids], np.int32)
    cfg, comp, params = load_gist_jax(hf_dir, args.checkpoint, args.step, run)
    modes = ["compressed", "plain"] if args.mode == "both" else [args.mode]
    if not comp.enabled:
        modes = ["plain"]
    for mode in modes:
        compressed = mode == "compressed"
        load = load_gist_model if compressed else transformers.AutoModelForCausalLM.from_pretrained
        model = load(str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            ids_t = torch.from_numpy(tokens.astype(np.int64))
            theirs = model.compressed_forward(ids_t, ratio=args.ratio) if compressed else model(input_ids=ids_t).logits
        ours = gist_jax_logits(cfg, comp, params, tokens, args.ratio, compressed)
        report = {"mode": mode, "tokens": int(tokens.shape[1]), **logit_agreement(ours, theirs.float().numpy())}
        print(json.dumps(report))
    if args.batch_lengths and comp.enabled:
        model = load_gist_model(str(hf_dir), dtype=torch.float32).eval()
        every_id = tokenizer(text, add_special_tokens=False)["input_ids"]
        print(json.dumps(_compare_batch(args, model, every_id, cfg, comp, params)))

def _compare_batch(args: argparse.Namespace, model, tokens: list[int], cfg, comp, params) -> dict:
    """Left-padded batched greedy generation vs each prompt alone vs gist_jax (JAX)."""
    import torch

    from gist_jax.inference import generate

    lengths = args.batch_lengths
    if max(lengths) + len(lengths) > len(tokens):
        raise FileNotFoundError(f"--batch_lengths up to {max(lengths)} need {max(lengths) + len(lengths)} tokens of "
                                f"text, the text has {len(tokens)}: give a longer --text-file")
    prompts = [tokens[i:i + n] for i, n in enumerate(lengths)]
    width, pad = max(lengths), 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    new = args.new_tokens
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=None,
                               pad_token_id=pad, ratio=args.ratio)[:, width:].tolist()
        alone = [model.generate(torch.tensor([p]), max_new_tokens=new, eos_token_id=None,
                                ratio=args.ratio)[0, len(p):].tolist() for p in prompts]
    g = model.config.gist
    ours = generate(cfg, comp, params, prompts, new, ratio=args.ratio or g["inference_ratio"],
                    tokenizer_size=g.get("tokenizer_vocab_size"), gist_token_id=g.get("gist_token_id")).tokens
    return {"mode": "batch", "lengths": list(lengths), "new_tokens": new,
            "batch_equals_alone": sum(b == a for b, a in zip(batch, alone)),
            "batch_equals_gist_jax": sum(b == list(o) for b, o in zip(batch, ours)), "prompts": len(prompts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gist_jax.compare_hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="exported directory")
    parser.add_argument("--checkpoint", default=None, help="compare against this training checkpoint instead")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--text", default=None)
    parser.add_argument(*cli_config.option("text_file"), dest="text_file", default=None)
    parser.add_argument(*cli_config.option("max_tokens"), dest="max_tokens", type=int, default=512)
    parser.add_argument("--ratio", type=int, default=None, help="inference compression ratio")
    parser.add_argument("--mode", choices=("compressed", "plain", "both"), default="both")
    parser.add_argument(*cli_config.option("batch_lengths"), dest="batch_lengths",
                        type=lambda t: tuple(int(x) for x in t.split(",") if x.strip()), default=(),
                        help="prompt lengths of a left-padded batched generate check (e.g. 5,40,100,700)")
    parser.add_argument(*cli_config.option("new_tokens"), dest="new_tokens", type=int, default=48,
                        help="tokens generated by the batch check")
    cli_config.add_checkpoint_overrides(parser, OVERRIDABLE)
    args, overrides = cli_config.parse_tool_args(parser, argv)
    if overrides and not args.checkpoint:
        parser.error("--config.<key> overrides apply to the run config of --checkpoint; give --checkpoint")
    try:
        run = (cli_config.checkpoint_run(cli_config.stored_run(args.checkpoint, args.step), overrides, OVERRIDABLE)
               if overrides else None)
    except (cli_config.CliConfigError, ValueError, FileNotFoundError) as e:  # ValueError: ConfigError too
        cli_config.exit_config_error(e)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from gist_jax.errors import ConfigError

    try:
        _compare(args, run)
    except (ConfigError, FileNotFoundError) as e:  # a damaged checkpoint step, a changed modeling_gist.py
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
