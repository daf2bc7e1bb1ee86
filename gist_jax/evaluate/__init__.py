"""Evaluation suites for gist checkpoints (``python -m gist_jax.evaluate``, docs/evaluation.md).

``run_suites(checkpoint_dir, suites, out_dir, **options)`` is the library entry point (the demo
calls it): it loads the checkpoint once, runs each suite, writes ``<suite>.json``, ``.csv`` and
PNG plots into ``out_dir``, prints a summary table per suite and returns ``{suite: payload}``.
"""

from __future__ import annotations

import logging
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from gist_jax.errors import ConfigError
from gist_jax.utils.progress import progress, write

logger = logging.getLogger(__name__)

# The paper's probes (``all``), then the suites that compare with what users measure elsewhere and
# need the ``eval`` extra: RULER generated offline, kvpress's training-free presses at each
# ratio's cache budget, and RULER answered through those presses. They are named explicitly (they
# take longer on a CPU).
PAPER_SUITES = ("perplexity", "boundary", "surprise", "uuid", "recall", "reconstruction")
SUITES = PAPER_SUITES + ("ruler", "kvpress", "ruler_press")
# Bumped when a suite's numbers change meaning for the same checkpoint and options, so cached
# results (``gist_jax.study``) are recomputed rather than mixed with new ones. perplexity 2: the
# targets are the predictions of positions j >= L only (version 1 also scored L - 1's);
# perplexity 3: a compressing checkpoint is also scored with no memory (``local``), for efficacy.
SUITE_VERSIONS = {"perplexity": 3}


def suite_version(name: str) -> int:
    return SUITE_VERSIONS.get(name, 1)


def _suite_fn(name: str) -> Callable:
    if name == "perplexity":
        from gist_jax.evaluate.perplexity import run
    elif name == "boundary":
        from gist_jax.evaluate.boundary import run
    elif name == "surprise":
        from gist_jax.evaluate.probes import run_surprise as run
    elif name == "uuid":
        from gist_jax.evaluate.probes import run_uuid as run
    elif name == "recall":
        from gist_jax.evaluate.probes import run_recall as run
    elif name == "reconstruction":
        from gist_jax.evaluate.reconstruction import run
    elif name == "ruler":
        from gist_jax.evaluate.ruler import run
    elif name == "kvpress":
        from gist_jax.evaluate.kvpress_peer import run
    elif name == "ruler_press":
        from gist_jax.evaluate.ruler_press import run
    else:
        raise ConfigError(f"--suite={name!r} is unknown; use one of {', '.join(SUITES)} or all")
    return run


def resolve_suites(suites: str | Sequence[str]) -> list[str]:
    names = [s.strip() for s in (suites.split(",") if isinstance(suites, str) else suites) if s.strip()]
    if "all" in names:
        return list(PAPER_SUITES) + [n for n in names if n != "all" and n not in PAPER_SUITES]
    for name in names:
        _suite_fn(name)
    if not names:
        raise ConfigError(f"--suite is empty; use one of {', '.join(SUITES)} or all")
    return names


SUMMARY_COLUMNS = {
    "perplexity": ("checkpoint", "dataset", "setting", "ppl", "efficacy", "efficacy_lo", "efficacy_hi", "tokens"),
    "boundary": None,
    "surprise": ("checkpoint", "setting", "acc_relevant", "acc_unrelated", "gap"),
    "uuid": ("checkpoint", "setting", "prefix8", "prefix16", "prefix32"),
    "recall": ("checkpoint", "setting", "kind", "context_tokens", "depth", "accuracy"),
    "reconstruction": None,
    "ruler": ("checkpoint", "setting", "task", "context_tokens", "score", "score_lo", "score_hi", "examples"),
    "kvpress": ("checkpoint", "dataset", "setting", "ratio", "ppl", "efficacy", "efficacy_lo", "efficacy_hi",
                "tokens"),
    "ruler_press": ("checkpoint", "setting", "task", "context_tokens", "score", "score_lo", "score_hi", "examples"),
}


def run_suites(checkpoint_dir: str | pathlib.Path, suites: str | Sequence[str], out_dir: str | pathlib.Path, *,
               step: int | None = None, verbose: bool = True,
               on_result: Callable[[str, dict], None] | None = None, **options: Any) -> dict[str, dict]:
    """Run ``suites`` on one checkpoint; see the suite modules for ``options`` (all small-scale
    knobs: num_windows, window, num_examples, context_tokens, ratios, max_documents, ...).
    ``on_result(suite, payload)`` is called as each suite finishes (the study caches it there,
    so a kill loses at most the suite in progress, with the checkpoint loaded once)."""
    from gist_jax.evaluate.common import format_table, load_checkpoint

    names = resolve_suites(suites)
    out_dir = pathlib.Path(out_dir)
    ck = load_checkpoint(checkpoint_dir, step)
    results = {}
    # One bar over the suites (each suite draws its own below it); the tables print above both.
    for name in progress(names, desc="suites", unit="suite", leave=len(names) > 1):
        logger.info("suite %s on %s", name, ck.step_dir)
        start = time.perf_counter()
        payload = _suite_fn(name)(ck, out_dir, **options)
        payload["seconds"] = time.perf_counter() - start
        results[name] = payload
        if on_result is not None:
            on_result(name, payload)
        if verbose:
            write(f"\n## {name} ({ck.step_dir}, {payload['seconds']:.1f}s)\n")
            write(format_table(payload["rows"], SUMMARY_COLUMNS.get(name)))
            if name == "boundary":
                write()
                write(format_table(payload["continuation"]))
    return results


def compare(checkpoint_dirs: Sequence[str | pathlib.Path], suites: str | Sequence[str], out_dir: str | pathlib.Path,
            **options: Any) -> dict[str, list[dict]]:
    """Several checkpoints side by side: each runs into ``out_dir/<i>_<name>/``; the rows of every
    suite are merged (a ``checkpoint`` column tells them apart) into ``out_dir/compare_<suite>``."""
    from gist_jax.evaluate.common import format_table, write_results

    out_dir = pathlib.Path(out_dir)
    merged: dict[str, list[dict]] = {}
    for i, path in enumerate(checkpoint_dirs):
        sub = out_dir / f"{i}_{pathlib.Path(path).absolute().name}"
        for name, payload in run_suites(path, suites, sub, verbose=False, **options).items():
            merged.setdefault(name, []).extend({**row, "checkpoint": f"{i}:{row.get('checkpoint', path)}"}
                                               for row in payload["rows"])
    for name, rows in merged.items():
        write_results(out_dir, f"compare_{name}", rows)
        print(f"\n## {name}: {len(checkpoint_dirs)} checkpoints\n")
        print(format_table(rows, SUMMARY_COLUMNS.get(name)))
    return merged
