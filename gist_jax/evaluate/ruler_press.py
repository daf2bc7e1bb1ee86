"""Suite ``ruler_press``: RULER answered through kvpress's presses at each gist ratio's budget.

Why: the ``kvpress`` suite puts the training-free presses beside the trained gists on perplexity;
RULER asks the other question, whether what a compressed memory keeps still answers a needle or
a variable chain. So each RULER example (the ``ruler`` suite's, same generator, seed, lengths
and RULER metric) is answered greedily by the checkpoint's base model (``torch_base``) with the
prompt compressed by each press exactly where the gists compress it: the whole segments of
the prompt (its first ``floor(P / L) * L`` tokens) are prefilled and pressed to
``kept_entries(c, r)`` cache entries per layer and head (``1 - 1/r``), and the rest of the
prompt and the answer run uncompressed at their original positions on that cache, as a gist
model feeds its unfinished segment. The cache length is checked against the budget after every
press. Rows carry the ``ruler`` suite's columns, with ``setting = <press>_r<k>``, so the study
puts them in one table with the gists' ``r<k>`` and ``full`` rows.

One forward per example (``torch_base.prefill``) serves every press and ratio that uses
kvpress's default hook (``compressed_cache``, tested equal to the hooks); other presses are
prefilled under their own hooks. Imports torch and kvpress inside functions only.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from gist_jax.errors import ConfigError
from gist_jax.evaluate import common
from gist_jax.evaluate.kvpress_peer import applied, budget_check, kept_entries, make_press
from gist_jax.evaluate.ruler import TASKS, RulerExample, cell_rows, examples_by_cell
from gist_jax.utils.progress import progress

# RULER's decode is ~30-130 tokens per example and press: two presses by default, the classic
# window (StreamingLLM) and the best on the kvpress suite's perplexity (expected attention).
DEFAULT_RULER_PRESSES = ("streaming_llm", "expected_attention")


def _pressed_cache(model: Any, ids_1xP: Any, pre: Any, context: int, name: str, ratio: int, budget: str,
                   sinks: int) -> Any:
    """The cache of the prompt's first ``context`` tokens under press ``name`` at ratio ``ratio``,
    its length checked against the budget (a cache of nothing when ``context`` is 0)."""
    import transformers

    from gist_jax.evaluate import torch_base

    if context == 0:
        return transformers.DynamicCache()
    kept = kept_entries(context, ratio, budget, sinks)
    press = make_press(name, context, kept)
    if torch_base.hooks_are_default(press):
        cache = torch_base.compressed_cache(model, pre, context, press)
    else:
        import torch

        cache = transformers.DynamicCache()
        with applied(press, model), torch.no_grad():
            model.model(input_ids=ids_1xP[:, :context], past_key_values=cache, use_cache=True)
    budget_check(f"{name}_r{ratio}", lambda _c: kept, set())(context, torch_base.cache_lengths(cache))
    return cache


def greedy_on_cache(model: Any, ids_1xP: Any, start: int, cache: Any, max_new_tokens: int, eos_id: int | None,
                    vocab: int, last_hidden: Any = None) -> list[int]:
    """Feed prompt tokens ``start ..`` at their original positions on ``cache`` (which may hold
    fewer entries than ``start``), then decode greedily; ids >= ``vocab`` are never chosen. A
    prompt that ends on a segment boundary has nothing left to feed: its first answer token comes
    from ``last_hidden`` (the prefill's final-norm state of its last token, computed before the
    press, as a gist model's comes from its last raw token before the segment is compressed)."""
    import torch

    feed, pos, out = ids_1xP[:, start:], start, []
    if feed.shape[1] == 0 and last_hidden is None:
        raise ValueError("the whole prompt is in the cache: pass the prefill's last_hidden for the first token")
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if feed.shape[1]:
                positions = torch.arange(pos, pos + feed.shape[1]).unsqueeze(0)
                last_hidden = model.model(input_ids=feed, past_key_values=cache, position_ids=positions,
                                          use_cache=True).last_hidden_state[:, -1]
            logits = model.lm_head(last_hidden).float()
            logits[:, vocab:] = -float("inf")
            token = int(logits.argmax(-1))
            out.append(token)
            if token == eos_id:
                break
            pos += feed.shape[1]
            feed = torch.tensor([[token]], dtype=ids_1xP.dtype)
    return out


def run(ck: common.Checkpoint, out_dir: pathlib.Path, *, ruler_lengths: Sequence[int] = (1024, 4096),
        ruler_tasks: Sequence[str] | None = None, num_examples: int = 8, ratios: Sequence[int] | None = None,
        seed: int = 0, ruler_presses: Sequence[str] | None = None, budget: str = "ratio",
        ruler_max_new_tokens: int | None = None, **_: Any) -> dict:
    """Rows per (press and ratio, task, length) and the pooled mean over tasks, with intervals
    over examples; ``examples`` holds every prediction. Options as the ``ruler`` suite's, plus
    ``ruler_presses`` (default ``DEFAULT_RULER_PRESSES``) and ``budget`` (``kvpress_peer``)."""
    import torch

    from gist_jax.evaluate import torch_base

    if not ck.comp.enabled:
        raise ConfigError("the ruler_press suite compresses where the gists do; this checkpoint has no compression")
    names = tuple(ruler_presses or DEFAULT_RULER_PRESSES)
    ratios = tuple(int(r) for r in (ratios or ck.comp.ratios))
    tasks, lengths = list(ruler_tasks or TASKS), [int(n) for n in ruler_lengths]
    tok, L = ck.tokenizer, ck.comp.segment_length
    examples = examples_by_cell(tasks, lengths, num_examples, tok, seed)
    model = torch_base.torch_base_model(ck)
    vocab = min(tok.vocab_size, model.config.vocab_size)
    generated: dict[tuple[str, int], list[list[int]]] = {}
    flat_by_n: dict[int, list[RulerExample]] = {}
    for n in lengths:
        flat = flat_by_n[n] = [e for t in tasks for e in examples[(t, n)]]
        for e in progress(flat, desc=f"ruler_press {n}", unit="example"):
            ids = torch.tensor([e.prompt_ids])
            context = (len(e.prompt_ids) // L) * L
            pre = torch_base.prefill(model, ids[:, :context]) if context else None
            cap = min(e.max_new_tokens, ruler_max_new_tokens or e.max_new_tokens)
            for name in names:
                for r in ratios:
                    cache = _pressed_cache(model, ids, pre, context, name, r, budget, ck.comp.num_sinks)
                    last = pre.last_hidden[:, -1] if context == len(e.prompt_ids) else None
                    generated.setdefault((f"{name}_r{r}", n), []).append(
                        greedy_on_cache(model, ids, context, cache, cap, tok.eos_id, vocab, last))
    rows, per_example = [], []
    for (setting, n), ids_list in generated.items():
        flat = flat_by_n[n]
        caps = [min(e.max_new_tokens, ruler_max_new_tokens or e.max_new_tokens) for e in flat]
        got_rows, got_examples = cell_rows(ck.name, setting, int(setting.rsplit("_r", 1)[1]), n, tasks, examples,
                                           flat, caps, ids_list, tok, seed, ruler_max_new_tokens)
        rows += got_rows
        per_example += got_examples
    extra = {"examples": per_example, "lengths": lengths, "tasks": tasks, "num_examples": num_examples, "seed": seed,
             "presses": list(names), "budget": budget}
    return common.write_results(out_dir, "ruler_press", rows, extra)
