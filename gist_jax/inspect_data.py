"""Look at the data a run will train on, before spending accelerator time on it.

    python -m gist_jax.inspect_data --config experiments/demo.py:tiny [--split train] [--steps 1] \
        [--sample-rows 1] [--config.<key>=<value> ...]

Loads the run config exactly as ``python -m gist_jax.main`` does (``gist_jax/cli_config.py``: same
``--config`` file, variants and overrides, same validation), builds or opens the token stores of every configured source
(``GIST_JAX_CACHE``), and prints:

  1. per source: documents and tokens of the train and validation splits (store counts: no
     BOS/EOS);
  2. per source: a histogram of document lengths in log2 buckets for ``--split``;
  3. the packed sequences of epoch 0 at ``step.seq_len``: sequences per epoch, fill rate and
     padding, documents (pieces) per sequence;
  4. ``--sample-rows`` rows of each of the first ``--steps`` batches, decoded, with the gist layout
     the training loop uses at that step: ``│`` at segment boundaries, ``⟦G×k⟧`` where k gist
     tokens are inserted (after the text they summarise), ``⟨eos⟩``/``⟨bos⟩`` for document
     boundaries and ``⟨pad×n⟩`` for padding.

Needs no accelerator and no network (jax runs on the CPU; nothing is compiled).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

import numpy as np

from gist_jax.data.config import DataConfig
from gist_jax.data.loader import Sequencer, SpecialIds, open_stores
from gist_jax.data.packing import EpochPlan
from gist_jax.data.sources import SPLITS
from gist_jax.data.store import TokenStore
from gist_jax.gist.layout import GistLayout
from gist_jax.train.step_layouts import host_layout, step_layout_key

if TYPE_CHECKING:
    from gist_jax.train.experiment import RunConfig

BAR_WIDTH = 40


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, ``--config.<key>`` overrides); a private parser per call, so it runs in-process
    (tests) beside gist_jax.main's absl flags."""
    from gist_jax import cli_config

    p = argparse.ArgumentParser(prog="python -m gist_jax.inspect_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli_config.add_config_flag(p, what="the run whose data to inspect")
    p.add_argument("--split", default="train", choices=list(SPLITS),
                   help="split for the histogram, packing stats and sample rows")
    p.add_argument("--steps", type=_non_negative, default=1, help="sample rows from each of the first N steps' batches")
    p.add_argument("--sample-rows", "--sample_rows", dest="sample_rows", type=_non_negative, default=1,
                   help="rows decoded per step")
    return cli_config.parse_tool_args(p, argv)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use 0 or more")
    return value


# -- statistics -------------------------------------------------------------------------------------------
def length_histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """``(low, high, count)`` for buckets ``[2^k, 2^(k+1))`` from the shortest to the longest document."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.size == 0:
        return []
    k = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    counts = np.bincount(k - k.min())
    return [(2 ** (k.min() + i), 2 ** (k.min() + i + 1) - 1, int(c)) for i, c in enumerate(counts)]


def packing_stats(sequencer: Sequencer, epoch: int = 0) -> dict[str, float]:
    """What packing does to one epoch: sequences, real-token fill, pieces (documents) per sequence."""
    plan = sequencer.plan(epoch)
    pieces = np.diff(plan.first)
    tokens = int(plan.length.sum())
    capacity = plan.num_sequences * plan.seq_len
    copies = sum(int(c.sum()) for c in plan.copies)
    cut = int(np.sum(plan.start > 0))  # pieces that continue a document begun in another sequence
    return {"sequences": plan.num_sequences, "tokens": tokens, "fill": tokens / capacity if capacity else 0.0,
            "documents": copies, "pieces_mean": float(pieces.mean()) if len(pieces) else 0.0,
            "pieces_min": int(pieces.min()) if len(pieces) else 0,
            "pieces_max": int(pieces.max()) if len(pieces) else 0, "continued": cut}


# -- rendering a row ---------------------------------------------------------------------------------------
def render_row(tokens: np.ndarray, valid: np.ndarray, layout: GistLayout, decode: Callable[[list[int]], str],
               ids: SpecialIds) -> str:
    """The row as text with the layout's segment boundaries and gist slots marked (see module docstring)."""
    out: list[str] = []
    pending: list[int] = []
    pad_run = 0

    def flush() -> None:
        nonlocal pad_run
        if pending:
            out.append(decode(pending))
            pending.clear()
        if pad_run:
            out.append(f"⟨pad×{pad_run}⟩")
            pad_run = 0

    gists = 0
    for i in range(layout.length):
        if i and layout.segment[i] != layout.segment[i - 1]:
            flush()
            out.append("│")
        if layout.is_gist[i]:
            if layout.alive[i]:
                flush()
                gists += 1
                if i + 1 == layout.length or not (layout.is_gist[i + 1] and layout.alive[i + 1]):
                    out.append(f"⟦G×{gists}⟧")
                    gists = 0
            continue
        raw = int(layout.raw_index[i])
        if raw >= len(tokens) or not layout.alive[i]:
            continue  # padding up to whole segments (pad_to_segments)
        if not valid[raw]:
            if pending:
                flush()
            pad_run += 1
            continue
        if pad_run:
            flush()
        token = int(tokens[raw])
        special = {ids.eos: "⟨eos⟩", ids.bos: "⟨bos⟩"}.get(token)
        if special is None:
            pending.append(token)
        else:
            flush()
            out.append(special)
    flush()
    return "".join(out)


# -- printing ----------------------------------------------------------------------------------------------
def _split_config(data: DataConfig, split: str) -> DataConfig:
    """The evaluator reads the eval split without length upsampling (gist_jax.train.loop.make_evaluator)."""
    return dataclasses.replace(data, upsampling=()) if split == data.eval_split else data


def print_report(run: RunConfig, split: str, steps: int, sample_rows: int, file: TextIO | None = None) -> None:
    """The four sections of the module docstring, for ``run`` (a `gist_jax.train.experiment.RunConfig`)."""
    from gist_jax.data.tokenizer import tokenizer_from_spec

    file = sys.stdout if file is None else file
    data, seq_len, batch = run.data, run.step.seq_len, run.step.batch_size
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p(f"config {run.name}: tokenizer {data.tokenizer}, packing {data.packing}, seq_len {seq_len}, "
      f"batch {batch}, max_documents {data.max_documents or 'all'}, cache {data.cache_dir}")

    stores: dict[str, list[TokenStore]] = {s: open_stores(data, s) for s in dict.fromkeys((data.train_split,
                                                                                              data.eval_split, split))}
    p("\n== Sources (token store counts, without BOS/EOS)")
    p(f"{'source':<40} {'rate':>6} {'split':<11} {'documents':>10} {'tokens':>14} {'mean length':>12}")
    for i, (spec, rate) in enumerate(data.sources):
        for s, per_source in stores.items():
            st = per_source[i]
            mean = st.num_tokens / st.num_documents if st.num_documents else 0.0
            p(f"{spec[:40]:<40} {rate:>6.2f} {s:<11} {st.num_documents:>10,} {st.num_tokens:>14,} {mean:>12,.0f}")

    for i, (spec, _) in enumerate(data.sources):
        st = stores[split][i]
        hist = length_histogram(st.lengths)
        p(f"\n== Document lengths: {spec} ({split}, {st.num_documents:,} documents, tokens per document)")
        top = max((c for _, _, c in hist), default=1)
        for low, high, count in hist:
            bar = "█" * max(1 if count else 0, round(BAR_WIDTH * count / top))
            p(f"{low:>10,} - {high:>10,} │ {bar:<{BAR_WIDTH}} {count:,}")

    ids = SpecialIds.from_tokenizer_spec(data.tokenizer)
    sequencer = Sequencer(_split_config(data, split), stores[split], seq_len, ids)
    st = packing_stats(sequencer)
    p(f"\n== Packed sequences ({split}, epoch 0, seq_len {seq_len}, packing {data.packing})")
    p(f"sequences per epoch      {st['sequences']:,} ({st['sequences'] // batch:,} full batches of {batch})")
    p(f"tokens per epoch         {st['tokens']:,} (documents framed with EOS{' and BOS' if data.add_bos else ''}, "
      f"after upsampling and mixture rates: {st['documents']:,} document copies)")
    p(f"fill rate                {100 * st['fill']:.2f}% real tokens, padding {100 * (1 - st['fill']):.2f}%")
    p(f"documents per sequence   mean {st['pieces_mean']:.2f}, min {st['pieces_min']}, max {st['pieces_max']} "
      f"({st['continued']:,} pieces continue a document from an earlier sequence)")

    tokenizer = tokenizer_from_spec(data.tokenizer)
    comp = run.compression
    for step in range(steps):
        layout = host_layout(run, step_layout_key(run, step))
        for r in range(min(sample_rows, batch)):
            tokens, valid = sequencer.sequence(*_plan_row(sequencer, step * batch + r))
            if comp.enabled:
                what = (f"{comp.granularity} {comp.memory}, {layout.num_segments} segments of {layout.segment_length}, "
                        f"ratios {list(layout.ratios)}, {layout.live_gists()} gists")
            else:
                what = "no compression (memory='none'): no gists"
            p(f"\n== Sample: step {step}, row {r} ({split}): {what}")
            p("   │ segment boundary, ⟦G×k⟧ k gist tokens inserted here, ⟨eos⟩ document end, ⟨pad×n⟩ padding")
            p(render_row(tokens, valid, layout, tokenizer.decode, ids))
            p(f"── end of step {step}, row {r}")


def _plan_row(sequencer: Sequencer, g: int) -> tuple[EpochPlan, int]:
    """(plan, sequence index) of global row ``g``: what ``Sequencer.rows`` reads (valid kept, not the loss mask)."""
    epoch, j = sequencer.locate(g)
    plan = sequencer.plan(epoch)
    return plan, int(plan.order[j])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 usage or configuration error, as gist_jax.main)."""
    from gist_jax import cli_config
    from gist_jax.errors import ConfigError

    argv = list(sys.argv if argv is None else argv)[1:]  # argv[0]: the program, as in sys.argv
    try:
        args, overrides = _parse(argv)
    except SystemExit as e:  # argparse: usage error (2) or --help (0)
        return int(e.code or 0)
    try:
        run = cli_config.load_run(args.config, overrides)
    except cli_config.CliConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        print_report(run, args.split, args.steps, args.sample_rows)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
