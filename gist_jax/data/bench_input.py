"""Input pipeline throughput: can the host feed the accelerators?

    python -m gist_jax.data.bench_input --seq_len 16384 --batch 8 --steps 50 --tokenizer gguf:smollm2

Measures, on this host's CPU:

  (a) tokenisation: building the token store of ``--source`` (default ``stdlib``, train split)
      from scratch in a temporary cache directory, in tokens/s. Importing tensorflow/seqio and
      loading the tokenizer are timed apart (one-off costs, not throughput);
  (b) batch assembly: `BatchLoader` batches of ``--batch`` x ``--seq_len`` tokens from that store,
      in tokens/s and batches/s, in steady state (after ``--warmup`` batches, which also plan the
      first epoch; best of ``--repeats`` runs of ``--steps`` batches): ``host_batch`` alone (the
      rows this process builds), ``next()`` without the prefetch thread (rows + assembly into a
      global ``jax.Array`` on the default device), and ``next()`` with the prefetch thread
      (``data.prefetch`` batches built ahead).

Tokenisation happens once per (source, split, tokenizer); (b) is what every training step pays,
so it is the number to compare with the tokens per second a training step consumes.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence


def cpu_description() -> str:
    """``<n> cores (nproc), <model>, load average ...``: the numbers depend on all three."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{len(os.sched_getaffinity(0))} cores (nproc), {model}, load average {load}"


def time_tokenisation(source: str, tokenizer: str, cache_dir: str, max_documents: int) -> dict[str, float]:
    """Builds the (source, train, tokenizer) store from scratch in ``cache_dir``; setup timed apart."""
    start = time.perf_counter()
    from gist_jax.data import tasks  # tensorflow + seqio: imported once per process, not per store
    from gist_jax.data.vocabularies import vocabulary_from_spec

    vocabulary_from_spec(tokenizer)  # parses the tokenizer (seconds for a GGUF vocabulary), cached
    setup = time.perf_counter() - start
    from gist_jax.data.store import ensure_store

    start = time.perf_counter()
    store = ensure_store(source, "train", tokenizer, cache_dir, max_documents, document_stream=tasks.document_stream)
    seconds = time.perf_counter() - start
    return {"setup_s": setup, "seconds": seconds, "documents": store.num_documents, "tokens": store.num_tokens,
            "tokens_per_s": store.num_tokens / seconds}


def _rate(fn: Callable[[int], object], warmup: int, steps: int, repeats: int) -> float:
    """Seconds per call of ``fn(step)``: mean over ``steps`` consecutive calls after ``warmup`` untimed
    ones, best of ``repeats`` such runs (timeit's rule: other load on the host only ever adds time)."""
    for step in range(warmup):
        fn(step)
    best, step = float("inf"), warmup
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn(step)
            step += 1
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def time_batches(source: str, tokenizer: str, cache_dir: str, max_documents: int, seq_len: int, batch: int,
                 steps: int, warmup: int, repeats: int, packing: str, prefetch: int) -> list[tuple[str, float]]:
    """(mode, seconds per batch) for the three ways of getting a batch (module docstring)."""
    import jax
    from jax.sharding import SingleDeviceSharding

    from gist_jax.data.config import DataConfig
    from gist_jax.data.loader import BatchLoader

    sharding = SingleDeviceSharding(jax.devices()[0])

    def loader(prefetch_depth: int) -> BatchLoader:
        cfg = DataConfig(sources=((source, 1.0),), tokenizer=tokenizer, packing=packing, max_documents=max_documents,
                         prefetch=prefetch_depth, cache_dir=cache_dir)
        return BatchLoader(cfg, seq_len, batch, sharding)

    def take(it: BatchLoader) -> Callable[[int], object]:
        return lambda _: jax.block_until_ready(next(it))

    out = []
    sync = loader(0)
    out.append(("host_batch (rows only)", _rate(sync.host_batch, warmup, steps, repeats)))
    out.append(("next(), no prefetch thread", _rate(take(sync), warmup, steps, repeats)))
    threaded = loader(prefetch)
    try:
        out.append((f"next(), prefetch thread ({prefetch} ahead)", _rate(take(threaded), warmup, steps, repeats)))
    finally:
        threaded.close()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_len", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=8, help="global batch (all rows built by this process)")
    parser.add_argument("--steps", type=int, default=50, help="timed batches per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches per mode before timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of --steps batches per mode; best kept")
    parser.add_argument("--tokenizer", default="gguf:smollm2", help="tokenizer spec (gist_jax.data.tokenizer)")
    parser.add_argument("--source", default="stdlib", help="source spec (gist_jax.data.sources)")
    parser.add_argument("--max_documents", type=int, default=0, help="first N documents only (0: all)")
    parser.add_argument("--packing", default="concat", choices=("concat", "doc_start", "none"))
    parser.add_argument("--prefetch", type=int, default=2, help="batches built ahead by the prefetch thread")
    args = parser.parse_args(argv)
    from gist_jax.utils.logs import setup_logging

    setup_logging()
    if min(args.seq_len, args.batch, args.steps, args.repeats, args.prefetch) < 1 or args.warmup < 0:
        parser.error("--seq_len, --batch, --steps, --repeats and --prefetch must be >= 1, --warmup >= 0")

    print(f"host: {cpu_description()}")
    cache_dir = tempfile.mkdtemp(prefix="gist_jax_bench_input.")
    try:
        tok = time_tokenisation(args.source, args.tokenizer, cache_dir, args.max_documents)
        print(f"\n(a) tokenisation: {args.source} train split, {args.tokenizer}, fresh store in {cache_dir}")
        print(f"    setup (tensorflow/seqio import + tokenizer load, once per process): {tok['setup_s']:.1f} s")
        print(f"    {tok['documents']:,} documents, {tok['tokens']:,} tokens in {tok['seconds']:.1f} s: "
              f"{tok['tokens_per_s']:,.0f} tokens/s")
        rates = time_batches(args.source, args.tokenizer, cache_dir, args.max_documents, args.seq_len, args.batch,
                             args.steps, args.warmup, args.repeats, args.packing, args.prefetch)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    tokens = args.seq_len * args.batch
    print(f"\n(b) batch assembly: batch {args.batch} x seq_len {args.seq_len} = {tokens:,} tokens, packing "
          f"{args.packing}, best of {args.repeats} runs of {args.steps} batches after {args.warmup} warmup")
    print(f"    {'mode':<38} {'ms/batch':>10} {'batches/s':>10} {'tokens/s':>14}")
    for mode, seconds in rates:
        print(f"    {mode:<38} {1e3 * seconds:>10.2f} {1 / seconds:>10.1f} {tokens / seconds:>14,.0f}")
    print(f"\nslowest batch path sustains {tokens / max(s for _, s in rates):,.0f} tokens/s on this host; "
          "compare with the tokens/s a training step consumes (docs/performance.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
