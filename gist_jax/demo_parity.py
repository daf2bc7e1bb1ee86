"""The foundation demo: real SmolLM2-135M from its GGUF, in gist_jax, checked against
transformers, then a greedy continuation.

    python -m gist_jax.demo_parity [--prompt TEXT] [--max_new_tokens 20]

This stands in for the training demo until the training loop exists; ``make demo`` runs it.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

PASSAGE = (
    "The Industrial Revolution, which began in Britain in the late eighteenth century, "
    "transformed the way goods were produced. Machines powered by water and later by steam "
    "replaced much of the work that had been done by hand, and factories grew up around "
    "the new sources of power."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max_new_tokens", type=int, default=20)
    args = parser.parse_args(argv)
    from gist_jax.utils.logs import setup_logging

    setup_logging()

    from gist_jax.data.tokenizer import HFTokenizer
    from gist_jax.hf import reference
    from gist_jax.hf.gguf import smollm2_gguf_path
    from gist_jax.hf.importer import load_gguf
    from gist_jax.inference.reference_decode import greedy_generate
    from gist_jax.model.transformer import forward

    path = smollm2_gguf_path()
    print(f"[1/4] loading {path.name} into gist_jax (dequantising Q4_1 with the gguf package)")
    start = time.time()
    cfg, params = load_gguf(path, dtype="float32")
    params = jax.device_put(params)
    tokenizer = HFTokenizer.from_gguf(path)
    print(f"      {cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_heads}/{cfg.num_kv_heads} heads, vocab {cfg.vocab_size}, "
          f"{cfg.num_params() / 1e6:.1f}M params, tied={cfg.tie_embeddings} "
          f"({time.time() - start:.1f}s)")

    print("[2/4] loading the same file with transformers (the reference)")
    start = time.time()
    torch_model = reference.load_transformers_gguf(path)
    print(f"      done ({time.time() - start:.1f}s)")

    ids = tokenizer.encode(PASSAGE)
    print(f"[3/4] logit agreement on a {len(ids)}-token English passage (float32)")
    ours = np.asarray(forward(cfg, params, jnp.asarray([ids], jnp.int32)))
    theirs = reference.transformers_logits(torch_model, np.asarray([ids]))
    for key, value in reference.logit_agreement(ours, theirs).items():
        print(f"      {key:>15}: {value:.3g}")

    print(f"[4/4] greedy continuation, {args.max_new_tokens} tokens")
    prompt_ids = tokenizer.encode(args.prompt)
    start = time.time()
    ours_ids = greedy_generate(cfg, params, [prompt_ids], args.max_new_tokens)[0]
    took = time.time() - start
    theirs_ids = reference.transformers_greedy(torch_model, prompt_ids, args.max_new_tokens)
    print(f"      prompt      : {args.prompt!r}")
    print(f"      gist_jax    : {tokenizer.decode(ours_ids)!r} ({took:.1f}s incl. compile)")
    print(f"      transformers: {tokenizer.decode(theirs_ids)!r}")
    same = ours_ids == theirs_ids
    print(f"      identical token ids: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
