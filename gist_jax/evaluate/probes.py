"""Generation probes on synthetic examples (``gist_jax.data.synthetic``), answered by greedy
decoding from the compressed cache (``gist_jax.inference``):

* ``surprise`` ("lost if surprise"): a needle "{subject}'s special {food|number} is {value}"
  in a document about the subject; relevant (the document's subject) vs unrelated name, on
  pairs that share everything else (same seed); accuracy per setting and the gap.
* ``uuid`` ("lost along the way"): reproduce a 32-character UUID; exact match of its first
  8 / 16 / 32 characters.
* ``recall`` (RULER-style): passkey and multi-key needles at several context lengths and
  needle depths; accuracy heat map (depth x length) per setting.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from gist_jax.data import synthetic
from gist_jax.errors import ConfigError
from gist_jax.evaluate import common
from gist_jax.evaluate.metrics import mean_prefix_scores, score_exact
from gist_jax.utils.progress import progress


def _haystack(ck: common.Checkpoint, datasets: Sequence[str], split: str, max_documents: int) -> list[str]:
    """Every document of the split: probes need documents with a salient subject, which a small
    ``--max_documents`` (meant for the perplexity windows) may not contain."""
    return common.documents(datasets[0], split, ck.tokenizer_spec, 0)


def _examples(kind: str, hay: list[str], ck: common.Checkpoint, **kw: Any) -> list[synthetic.RecallExample]:
    try:
        return synthetic.generate(kind, hay, ck.tokenizer, **kw)
    except ValueError as e:
        raise ConfigError(f"cannot build {kind} examples: {e} (options: --context_tokens, --datasets)") from e


def _context_tokens(ck: common.Checkpoint, context_tokens: int | None) -> int:
    return context_tokens or ck.seq_len


def _prompts(examples: Sequence[synthetic.RecallExample]) -> list[str]:
    return [synthetic.as_text(e)[0] for e in examples]


def _settings(suite: str, ck: common.Checkpoint, ratios: Sequence[int] | None) -> Any:
    """The settings to decode, under a progress bar: each one greedy-decodes every example (the
    suite's minutes go there), so the bar advances per setting."""
    return progress(common.settings(ck, ratios), desc=suite, unit="setting")


def run_surprise(ck: common.Checkpoint, out_dir: pathlib.Path, *, datasets=("stdlib",), split: str = "validation",
                 max_documents: int = 0, num_examples: int = 8, context_tokens: int | None = None,
                 ratios=None, seed: int = 0, answer_tokens: int = 8, **_: Any) -> dict:
    hay = _haystack(ck, datasets, split, max_documents)
    n_ctx = _context_tokens(ck, context_tokens)
    pairs = {rel: _examples("surprise_needle", hay, ck, context_tokens=n_ctx, depth=(0.1, 0.9),
                                     seed=seed, num_examples=num_examples, relevant=rel) for rel in (True, False)}
    rows, per_example = [], []
    for setting in _settings("surprise", ck, ratios):
        acc = {}
        both = common.generate_texts(ck, setting, _prompts(pairs[True] + pairs[False]), answer_tokens)
        for rel, examples in pairs.items():
            preds = both[:len(examples)] if rel else both[len(pairs[True]):]
            scores = [score_exact(p, e) for p, e in zip(preds, examples)]
            acc[rel] = float(np.mean(scores))
            per_example += [{"setting": setting.name, "relevant": rel, "attribute": e.metadata["attribute"],
                             "answer": e.answers[0], "prediction": p, "score": s}
                            for e, p, s in zip(examples, preds, scores)]
        rows.append({"checkpoint": ck.name, "setting": setting.name, "ratio": setting.ratio or 1,
                     "acc_relevant": acc[True], "acc_unrelated": acc[False], "gap": acc[True] - acc[False],
                     "examples": num_examples, "context_tokens": n_ctx})
    _plot_accuracy(rows, ("acc_relevant", "acc_unrelated"), "accuracy", out_dir / "surprise_accuracy_vs_ratio.png")
    return common.write_results(out_dir, "surprise", rows, {"examples": per_example})


def run_uuid(ck: common.Checkpoint, out_dir: pathlib.Path, *, datasets=("stdlib",), split: str = "validation",
             max_documents: int = 0, num_examples: int = 8, context_tokens: int | None = None, ratios=None,
             seed: int = 0, uuid_tokens: int | None = None, **_: Any) -> dict:
    hay = _haystack(ck, datasets, split, max_documents)
    n_ctx = _context_tokens(ck, context_tokens)
    examples = _examples("uuid_recall", hay, ck, context_tokens=n_ctx, depth=(0.1, 0.9),
                                  seed=seed, num_examples=num_examples)
    uuids = [e.answers[0] for e in examples]
    # Enough tokens for 32 characters plus the leading space, whatever the tokenizer.
    max_new = uuid_tokens or len(ck.tokenizer.encode(" " + uuids[0])) + 4
    rows, per_example = [], []
    for setting in _settings("uuid", ck, ratios):
        preds = common.generate_texts(ck, setting, _prompts(examples), max_new)
        scores = mean_prefix_scores(preds, uuids)
        rows.append({"checkpoint": ck.name, "setting": setting.name, "ratio": setting.ratio or 1,
                     **{f"prefix{p}": v for p, v in scores.items()}, "examples": len(examples),
                     "context_tokens": n_ctx})
        per_example += [{"setting": setting.name, "uuid": u, "prediction": p} for u, p in zip(uuids, preds)]
    _plot_prefixes(rows, out_dir / "uuid_prefix_accuracy.png")
    return common.write_results(out_dir, "uuid", rows, {"examples": per_example})


def run_recall(ck: common.Checkpoint, out_dir: pathlib.Path, *, datasets=("stdlib",), split: str = "validation",
               max_documents: int = 0, num_examples: int = 4, recall_lengths: Sequence[int] | None = None,
               depths: Sequence[float] = (0.1, 0.5, 0.9), kinds: Sequence[str] = ("passkey", "multikey_needle"),
               ratios=None, seed: int = 0, answer_tokens: int = 12, **_: Any) -> dict:
    hay = _haystack(ck, datasets, split, max_documents)
    lengths = list(recall_lengths or (ck.seq_len // 2, ck.seq_len))
    cells = [(kind, n, d) for kind in kinds for n in lengths for d in depths]
    examples = {c: _examples(c[0], hay, ck, context_tokens=c[1], depth=c[2], seed=seed,
                                      num_examples=num_examples) for c in cells}
    rows, per_example = [], []
    for setting in _settings("recall", ck, ratios):
        flat = [e for c in cells for e in examples[c]]
        preds = iter(common.generate_texts(ck, setting, _prompts(flat), answer_tokens))
        for kind, n, d in cells:
            scores = [score_exact(next(preds), e) for e in examples[(kind, n, d)]]
            rows.append({"checkpoint": ck.name, "setting": setting.name, "ratio": setting.ratio or 1, "kind": kind,
                         "context_tokens": n, "depth": d, "accuracy": float(np.mean(scores)), "examples": len(scores)})
            per_example += [{"setting": setting.name, "kind": kind, "context_tokens": n, "depth": d, "score": s}
                            for s in scores]
    _plot_heatmap(rows, lengths, depths, out_dir / "recall_depth_heatmap.png")
    return common.write_results(out_dir, "recall", rows, {"examples": per_example})


# ----------------------------------------------------------------------------- plots
def _plot_accuracy(rows, keys, ylabel, path: pathlib.Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    comp = [r for r in rows if r["setting"] != "full"]
    for key in keys:
        line = ax.plot([r["ratio"] for r in comp], [r[key] for r in comp], "o-", label=key)
        for r in rows:
            if r["setting"] == "full":
                ax.axhline(r[key], ls="--", color=line[0].get_color(), label=f"{key} (full)")
    if comp:  # a full-attention checkpoint has no ratio axis to log-scale
        ax.set_xscale("log", base=2)
    ax.set_xlabel("compression ratio")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    _save(fig, plt, path)


def _plot_prefixes(rows, path: pathlib.Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        ax.plot([8, 16, 32], [r["prefix8"], r["prefix16"], r["prefix32"]], "o-", label=r["setting"])
    ax.set_xlabel("UUID prefix length (characters)")
    ax.set_ylabel("exact match")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    _save(fig, plt, path)


def _plot_heatmap(rows, lengths, depths, path: pathlib.Path) -> None:
    plt = common.pyplot()
    names = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = np.zeros((len(depths), len(lengths)))
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                grid[i, j] = np.mean([r["accuracy"] for r in rows
                                      if r["setting"] == name and r["depth"] == d and r["context_tokens"] == n])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.5 else "k")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("context tokens", fontsize=7)
    axes[0][0].set_ylabel("needle depth", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    _save(fig, plt, path, tight=False)  # tight_layout does not know the shared colour bar


def _save(fig, plt, path: pathlib.Path, tight: bool = True) -> None:
    if tight:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches=None if tight else "tight")
    plt.close(fig)
