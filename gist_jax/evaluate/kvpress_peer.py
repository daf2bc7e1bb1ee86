"""Suite ``kvpress``: NVIDIA kvpress's training-free KV-cache presses beside our trained
compressors, at the same cache budget, on the same windows and targets (docs/evaluation.md).

Why: a gist compressor is trained; a press (StreamingLLM, SnapKV, Knorm, expected attention)
is not. If a press reaches the same memory efficacy at the same budget, the training buys
nothing. So each press is run at compression ratio ``1 - 1/r`` for every ratio r the
checkpoint trained (0.75 for r = 4, 0.875 for r = 8: the cache keeps ``context / r`` entries),
on the base model of the checkpoint (``torch_base``: with a frozen base the pretrained model),
on the windows and targets of the ``perplexity`` suite. Each target segment k >= 1 sees its
earlier context through the press exactly as it sees it through the gists: the context
(segments < k) is prefilled with the press active (kvpress's one-shot prefill compression),
then segment k is scored on that cache with its original positions (``torch_base.pressed_nll``).
``full`` and ``local`` are recomputed in torch on the same targets (they equal the JAX suite's:
tested), and each press row gets its memory efficacy with a 95% bootstrap interval over
windows, as ``perplexity._add_efficacy`` does.

Budget: the press keeps ``context / r`` entries per layer and head (``budget='ratio'``, the
issue's definition). A gist checkpoint also keeps its ``num_sinks`` first raw tokens beside the
gists, so its memory is ``context / r + num_sinks``; ``budget='with_sinks'`` gives the press that
same count. After every prefill the cache length is checked against the budget (a press that
silently keeps everything would look like a perfect compressor).

Imports torch and kvpress inside functions only: the core never needs them.
"""

from __future__ import annotations

import contextlib
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gist_jax.errors import ConfigError
from gist_jax.evaluate import common, stats
from gist_jax.evaluate.metrics import perplexity
from gist_jax.train.evaluation import scored_positions

DEFAULT_PRESSES = ("streaming_llm", "snapkv", "knorm", "expected_attention")
BUDGETS = ("ratio", "with_sinks")


# ----------------------------------------------------------------------------- presses
def _press_classes() -> dict[str, Any]:
    import kvpress

    return {"streaming_llm": kvpress.StreamingLLMPress, "snapkv": kvpress.SnapKVPress,
            "snapkv_fit": kvpress.SnapKVPress, "knorm": kvpress.KnormPress,
            "expected_attention": kvpress.ExpectedAttentionPress, "tova": kvpress.TOVAPress,
            "random": kvpress.RandomPress}


def kept_entries(context: int, ratio: int, budget: str = "ratio", sinks: int = 0) -> int:
    """Cache entries a press may keep of ``context`` at gist ratio ``ratio``: ``context / r``
    (``with_sinks``: plus the checkpoint's sinks, as a gist memory holds), never more than all."""
    if budget not in BUDGETS:
        raise ConfigError(f"--budget={budget!r}; use one of {', '.join(BUDGETS)}")
    return min(context, context // ratio + (sinks if budget == "with_sinks" else 0))


def make_press(name: str, context: int, kept: int) -> Any:
    """The kvpress press ``name`` that keeps ``kept`` of ``context`` entries. kvpress keeps
    ``int(context * (1 - compression_ratio))``; the half entry of slack keeps float rounding
    from dropping one. SnapKV's observation window (64 queries by default) is capped at half
    the context, for contexts (tests) shorter than it; ``snapkv_fit`` caps it at half the budget."""
    classes = _press_classes()
    if name not in classes:
        raise ConfigError(f"--presses: {name!r} is unknown; use some of {', '.join(classes)}")
    cr = 0.0 if kept >= context else 1.0 - (kept + 0.5) / context
    kwargs: dict[str, Any] = {"compression_ratio": cr}
    if name == "snapkv":
        kwargs["window_size"] = min(64, context // 2)
    elif name == "snapkv_fit":
        # SnapKV's window always stays (it gets the top score); with a budget under 64 entries the
        # default window fills the cache by ties (topk keeps its first entries, dropping the most
        # recent tokens and the sink). Here the window takes at most half the budget.
        kwargs["window_size"] = max(1, min(64, kept // 2))
    return classes[name](**kwargs)


@contextlib.contextmanager
def applied(press: Any, model: Any):
    """``press(model)`` made to work on transformers >= 5, whose attention layers no longer get
    ``cache_position``: kvpress's hook reads it only to tell the prefill (the cache holds just
    this call's tokens) from later calls, so it is rebuilt from the cache, which the layer has
    already extended by this call's ``q`` tokens: positions ``n - q .. n - 1``."""
    import torch

    original = press.forward_hook

    def hook(module, args, kwargs, output):
        if "cache_position" not in kwargs:
            n = kwargs["past_key_values"].get_seq_length(module.layer_idx)
            q = kwargs["hidden_states"].shape[1]
            kwargs = {**kwargs, "cache_position": torch.arange(n - q, n)}
        return original(module, args, kwargs, output)

    press.forward_hook = hook  # the instance attribute is what press(model) registers
    try:
        with press(model):
            yield
    finally:
        del press.forward_hook


def budget_check(name: str, kept_fn: Callable[[int], int], seen: set[tuple[int, int]]) -> Callable:
    """``check_kept`` for ``torch_base.pressed_nll``: every layer holds exactly the budget.
    Records (context, kept) in ``seen`` for the payload."""
    def check(context: int, lengths: list[int]) -> None:
        want = kept_fn(context)
        if set(lengths) != {want}:
            raise RuntimeError(f"press {name}: context {context} left cache lengths {sorted(set(lengths))} "
                               f"per layer, not the budget {want}; its numbers would not be at the budget")
        seen.add((context, want))
    return check


# ----------------------------------------------------------------------------- the suite
def run(ck: common.Checkpoint, out_dir: pathlib.Path, *, presses: Sequence[str] | None = None,
        datasets: tuple[str, ...] = ("stdlib",), split: str = "validation", window: int | None = None,
        num_windows: int = 4, max_documents: int = 0, ratios: Sequence[int] | None = None, batch: int = 4,
        budget: str = "ratio", path: str = "prefill_once", **_: Any) -> dict:
    """Rows ``full``, ``local`` and ``<press>_r<k>`` per dataset (``ppl``, ``efficacy`` with its
    interval, ``tokens``); ``per_window`` NLL sums as the perplexity suite writes them, and the
    cache entries each press kept per context length (``budgets``). ``path``: ``prefill_once``
    (one forward per window serves every press: ``torch_base.Prefill``) or ``hooks`` (a prefill
    per press, ratio and context under kvpress's own hooks; slower, the same numbers)."""
    from gist_jax.evaluate import torch_base

    if not ck.comp.enabled:
        raise ConfigError("the kvpress suite compares presses with a compressing checkpoint; this one has none")
    if path not in ("prefill_once", "hooks"):
        raise ConfigError(f"--path={path!r}; use prefill_once or hooks")
    names = tuple(presses or DEFAULT_PRESSES)
    ratios = tuple(int(r) for r in (ratios or ck.comp.ratios))
    configs = [(f"{name}_r{r}", name, r) for name in names for r in ratios]
    window = window or ck.seq_len
    scored_M = scored_positions(ck.comp, window)
    model = torch_base.torch_base_model(ck)
    rows, per_window, budgets = [], [], []
    for dataset in datasets:
        texts = common.documents(dataset, split, ck.tokenizer_spec, max_documents)
        tokens = common.windows(ck, texts, window, num_windows)
        mask = np.broadcast_to(scored_M, (tokens.shape[0], window - 1))
        seen: dict[str, set] = {setting: set() for setting, _, _ in configs}
        nll: dict[str, list[np.ndarray]] = {}
        for i in range(0, len(tokens), batch):
            got = _window_nlls(model, tokens[i:i + batch], ck, configs, budget, path, seen)
            for setting, x in got.items():
                nll.setdefault(setting, []).append(x)
        got_rows, got_windows = summarize(ck.name, dataset, window, mask,
                                          {k: np.concatenate(v) for k, v in nll.items()}, configs, budget)
        rows += got_rows
        per_window += got_windows
        budgets += [{"dataset": dataset, "setting": s_, "kept_by_context": dict(sorted(seen[s_]))}
                    for s_, _, _ in configs]
    return common.write_results(out_dir, "kvpress", rows, {"per_window": per_window, "budgets": budgets})


def summarize(checkpoint: str, dataset: str, window: int, mask: np.ndarray, nll: dict[str, np.ndarray],
              configs: list[tuple[str, str, int]], budget: str) -> tuple[list[dict], list[dict]]:
    """Rows (``ppl``, efficacy with its interval) and per-window NLL sums from the NLLs
    ``[windows, N - 1]`` of full, local and each (press, ratio); ``mask``: the scored targets."""
    rows, per_window, sums = [], [], {}
    for setting in sorted(nll, key=lambda k: (k != "full", k != "local")):  # full, local, presses in order
        x = nll[setting]
        name, r = next(((n, r) for s_, n, r in configs if s_ == setting), ("none", 1))
        extra = {} if name == "none" else {"compression_ratio": round(1.0 - 1.0 / r, 6), "budget": budget}
        rows.append({"checkpoint": checkpoint, "dataset": dataset, "setting": setting, "press": name, "ratio": r,
                     "ppl": perplexity(x, mask), "tokens": int(mask.sum()), "windows": int(x.shape[0]),
                     "window": window, **extra})
        sums[setting] = np.where(mask, x, 0.0).sum(axis=1)
        per_window.append({"dataset": dataset, "setting": setting, "tokens": mask.sum(axis=1),
                           "nll_sum": sums[setting]})
    _add_efficacy(rows, sums, dataset)
    return rows, per_window


def _window_nlls(model: Any, tokens_BxN: np.ndarray, ck: common.Checkpoint, configs: list[tuple[str, str, int]],
                 budget: str, path: str, seen: dict[str, set]) -> dict[str, np.ndarray]:
    """``{setting: NLL [B, N - 1]}`` for full, local and every (press, ratio) on one batch of
    windows; every press's cache checked against its budget after every context."""
    import torch

    from gist_jax.evaluate import torch_base

    L = ck.comp.segment_length
    b, n = tokens_BxN.shape
    ids = torch.as_tensor(np.asarray(tokens_BxN), dtype=torch.long)
    out = {"local": torch_base.local_nll(model, tokens_BxN, L)}
    pre = torch_base.prefill(model, ids[:, :-1]) if path == "prefill_once" else None
    if pre is not None:
        with torch.no_grad():
            out["full"] = torch_base._nll(model, pre.last_hidden, ids[:, 1:])
    else:
        out["full"] = torch_base.full_nll(model, tokens_BxN)
    for setting, name, r in configs:
        def kept_fn(context: int, r: int = r) -> int:
            return kept_entries(context, r, budget, ck.comp.num_sinks)

        check = budget_check(name, kept_fn, seen[setting])
        if pre is None or not torch_base.hooks_are_default(make_press(name, 2 * L, L)):
            def hooked(m: Any, c: int, name: str = name, kept_fn=kept_fn) -> Any:
                return applied(make_press(name, c, kept_fn(c)), m)

            out[setting] = torch_base.pressed_nll(model, tokens_BxN, L, hooked, check)
            continue
        x = np.full((b, n - 1), np.nan)
        for start in range(L, n - 1, L):
            cache = torch_base.compressed_cache(model, pre, start, make_press(name, start, kept_fn(start)))
            check(start, torch_base.cache_lengths(cache))
            stop = min(start + L, n - 1)
            x[:, start:stop] = torch_base.scored_on_cache(model, ids, start, stop, cache)
        out[setting] = x
    return out


def _add_efficacy(rows: list[dict], sums: dict[str, np.ndarray], dataset: str) -> None:
    """Each press row of ``dataset`` gains ``efficacy`` and its 95% interval over windows
    (the perplexity suite's rule: full, local and the press resampled together)."""
    for row in rows:
        if row["dataset"] != dataset or row["setting"] in ("full", "local"):
            continue
        e = stats.efficacy(sums["local"], sums[row["setting"]], sums["full"])
        row.update({k: None if math.isnan(v) else v for k, v in
                    (("efficacy", e.value), ("efficacy_lo", e.lo), ("efficacy_hi", e.hi))})


# ----------------------------------------------------------------------------- side by side
def comparison_rows(perplexity_payload: dict, kvpress_payload: dict, tolerance: float = 1e-3) -> list[dict]:
    """One table: per (dataset), the references (full, local), our compressor(s) and each
    press, with ``ppl_r<k>``, ``efficacy_r<k>``, ``efficacy_lo_r<k>``, ``efficacy_hi_r<k>`` per
    ratio k. Refuses to merge payloads whose ``full`` perplexities differ by more than
    ``tolerance`` (relative): they were not measured on the same windows."""
    ours = perplexity_payload["rows"]
    theirs = kvpress_payload["rows"]
    out: list[dict] = []
    for dataset in dict.fromkeys(r["dataset"] for r in theirs):
        a = {r["setting"]: r for r in ours if r["dataset"] == dataset}
        b = {r["setting"]: r for r in theirs if r["dataset"] == dataset}
        if "full" not in a or "full" not in b:
            raise ConfigError(f"dataset {dataset}: both payloads need a full row to be compared")
        gap = abs(a["full"]["ppl"] - b["full"]["ppl"]) / a["full"]["ppl"]
        if gap > tolerance or a["full"]["tokens"] != b["full"]["tokens"]:
            raise ConfigError(f"dataset {dataset}: full ppl {a['full']['ppl']:.5g} vs {b['full']['ppl']:.5g} "
                              f"({a['full']['tokens']} vs {b['full']['tokens']} targets): not the same windows")
        ratios = sorted({int(r["ratio"]) for r in theirs if r["dataset"] == dataset and r["setting"] not in
                         ("full", "local")})

        def line(method: str, kind: str, by_ratio: dict[int, dict | None], dataset: str = dataset,
                 ratios: list[int] = ratios, **extra) -> dict:
            row = {"dataset": dataset, "method": method, "kind": kind, **extra}
            for k in ratios:
                src = by_ratio.get(k) or {}
                row[f"ppl_r{k}"] = src.get("ppl")
                for col in ("efficacy", "efficacy_lo", "efficacy_hi"):
                    row[f"{col}_r{k}"] = src.get(col)
            return row

        checkpoint = a["full"]["checkpoint"]
        for ref in ("full", "local"):
            out.append(line(ref, "reference", {k: a.get(ref) for k in ratios}, checkpoint=checkpoint))
        out.append(line(f"gist ({checkpoint})", "trained", {k: a.get(f"r{k}") for k in ratios},
                        checkpoint=checkpoint))
        for press in dict.fromkeys(r["press"] for r in b.values() if r.get("press") not in (None, "none")):
            out.append(line(press, "training-free", {k: b.get(f"{press}_r{k}") for k in ratios},
                            checkpoint=b["full"]["checkpoint"]))
    return out


def format_comparison(rows: list[dict], digits: int = 3) -> str:
    """Markdown: one row per method, ``ppl`` and ``efficacy [lo, hi]`` per ratio."""
    ratios = sorted({int(k[5:]) for r in rows for k in r if k.startswith("ppl_r")})
    head = ["dataset", "method"] + [c for k in ratios for c in (f"ppl r{k}", f"efficacy r{k} [95%]")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dataset"], r["method"]]
        for k in ratios:
            ppl = r.get(f"ppl_r{k}")
            cells.append("" if ppl is None else f"{ppl:.4g}")
            e = r.get(f"efficacy_r{k}")
            cells.append("" if e is None else stats.Estimate(e, r[f"efficacy_lo_r{k}"], r[f"efficacy_hi_r{k}"],
                                                              0).fmt(digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
