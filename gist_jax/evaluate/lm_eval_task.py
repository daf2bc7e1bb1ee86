"""lm-evaluation-harness tasks over our own examples, written at run time from local sources.

    python -m gist_jax.evaluate.lm_eval_task write --checkpoint RUN --export HF_DIR --out TASK_DIR \
        [--num_examples 16] [--ratio R] [--context_tokens N] [--continuation_tokens 32]
    lm_eval --model hf --model_args pretrained=HF_DIR,trust_remote_code=True --device cpu \
        --include_path TASK_DIR --tasks gist_lm_eval --log_samples --output_path OUT
    python -m gist_jax.evaluate.lm_eval_compare --tasks TASK_DIR --out OUT [--batch_size 1] \
        [--gist_forward compressed|full] [--ratio R] [--task NAME] [--samples LM_EVAL_OUTPUT_PATH]

Why: ``lm_eval --model hf`` is how users score a Hugging Face model, and an export's remote code
runs compressed by default, so the harness measures the gist model as shipped. Two tasks:

* ``gist_stdlib_continuation`` (loglikelihood): a held-out validation window of the run's corpus,
  cut inside one document (no EOS in the text), long enough to cross several segments; the
  context is the window's text, the continuation the text of the next tokens.
* ``gist_recall`` (generate_until): our synthetic recall examples (``gist_jax.data.synthetic``,
  as the ``recall``/``uuid`` probes build them), stopped at a newline or a full stop, scored by
  exact match of the stripped answer.

No third-party text enters the repository: the JSONL files are written from the local corpus
(the Python standard library) and our synthetic generators into ``TASK_DIR`` when you run
``write``. ``lm_eval_compare`` runs the harness and scores the same examples
with gist_jax's own compressed JAX model, token for token.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

LL_TASK = "gist_stdlib_continuation"
GEN_TASK = "gist_recall"
TAG = "gist_lm_eval"  # ``--tasks gist_lm_eval`` runs both (not ``gist_jax``: lm_eval reads a directory of that name)
MANIFEST = "gist_tasks.json"
UNTIL = ("\n", ".")  # every recall answer is a word, number or UUID: it ends at either


def _continuation_docs(ck: Any, num_examples: int, context_tokens: int, continuation_tokens: int,
                       dataset: str, split: str) -> list[dict[str, Any]]:
    """One window per document, from its middle: no EOS inside (the text is one file), and the
    decoded text has no broken UTF-8 (a window cut inside a character is skipped), so the text
    re-encodes to what the harness and our scorer both see."""
    from gist_jax.evaluate.common import documents

    tok, need = ck.tokenizer, context_tokens + continuation_tokens
    docs: list[dict[str, Any]] = []
    for index, text in enumerate(documents(dataset, split, ck.tokenizer_spec)):
        ids = tok.encode(text)
        if len(ids) < need:
            continue
        start = (len(ids) - need) // 2
        context = tok.decode(ids[start:start + context_tokens])
        continuation = tok.decode(ids[start + context_tokens:start + need])
        if "\ufffd" in context + continuation or not context.strip() or not continuation.strip():
            continue
        docs.append({"id": len(docs), "document": index, "start_token": start, "context": context,
                     "continuation": continuation, "context_tokens": context_tokens,
                     "continuation_tokens": continuation_tokens})
        if len(docs) == num_examples:
            return docs
    if not docs:
        from gist_jax.errors import ConfigError

        raise ConfigError(f"no {dataset} {split} document has {need} tokens; lower --context_tokens")
    return docs


def _recall_docs(ck: Any, num_examples: int, kinds: Sequence[str], context_tokens: int, seed: int,
                 dataset: str, split: str) -> list[dict[str, Any]]:
    """``num_examples`` synthetic recall examples, kinds taking turns, needles at depths drawn
    from 0.1..0.9; prompt = context, blank line, query (``synthetic.as_text``)."""
    from gist_jax.data import synthetic
    from gist_jax.evaluate.common import documents

    hay = documents(dataset, split, ck.tokenizer_spec)
    per_kind = {k: -(-num_examples // len(kinds)) for k in kinds}
    made = {k: synthetic.generate(k, hay, ck.tokenizer, context_tokens=context_tokens, depth=(0.1, 0.9), seed=seed,
                                  num_examples=n) for k, n in per_kind.items()}
    docs = []
    for i in range(num_examples):
        e = made[kinds[i % len(kinds)]][i // len(kinds)]
        docs.append({"id": i, "kind": e.kind, "prompt": synthetic.as_text(e)[0], "answer": ", ".join(e.answers),
                     "needle_depth": e.needle_depths[0], "context_tokens": e.context_tokens})
    return docs


def _yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000)


def task_configs(task_dir: pathlib.Path, max_gen_toks: int) -> dict[str, dict[str, Any]]:
    """The two task YAMLs: local JSONL through the ``json`` dataset builder (works with
    ``HF_DATASETS_OFFLINE=1``), zero-shot, the document's own fields as text and target
    (``target_delimiter: ''`` so the continuation is scored exactly as written)."""
    def data(name: str) -> dict[str, Any]:
        return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(task_dir / f"{name}.jsonl")}},
                "test_split": "test", "num_fewshot": 0}

    return {
        LL_TASK: {"task": LL_TASK, "tag": [TAG], **data(LL_TASK), "output_type": "loglikelihood",
                  "doc_to_text": "context", "doc_to_target": "continuation", "target_delimiter": "",
                  "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                  {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                  "metadata": {"version": 1.0}},
        GEN_TASK: {"task": GEN_TASK, "tag": [TAG], **data(GEN_TASK), "output_type": "generate_until",
                   "doc_to_text": "prompt", "doc_to_target": "answer", "target_delimiter": "",
                   "generation_kwargs": {"until": list(UNTIL), "max_gen_toks": max_gen_toks, "do_sample": False},
                   "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                                 {"function": "take_first"}]}],
                   "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
                   "metadata": {"version": 1.0}},
    }


def write_tasks(checkpoint: str | pathlib.Path, export: str | pathlib.Path, out: str | pathlib.Path, *,
                num_examples: int = 16, ratio: int | None = None, context_tokens: int | None = None,
                continuation_tokens: int = 32, recall_kinds: Sequence[str] = ("passkey", "uuid_recall"),
                recall_context_tokens: int | None = None, seed: int = 0, dataset: str = "stdlib",
                split: str = "validation", step: int | None = None) -> dict[str, Any]:
    """Write ``<task>.yaml`` + ``<task>.jsonl`` for both tasks and ``gist_tasks.json`` (the
    manifest ``compare`` reads: checkpoint, export, ratio, task names). ``context_tokens``
    defaults to the run's ``seq_len`` less the continuation (several segments);
    ``recall_context_tokens`` to ``seq_len``."""
    from gist_jax.evaluate.common import load_checkpoint

    ck = load_checkpoint(checkpoint, step)
    export = pathlib.Path(export).resolve()
    gist = json.loads((export / "config.json").read_text()).get("gist") or {}
    ratio = int(ratio or gist.get("inference_ratio") or ck.comp.ratios[0])
    n_ctx = context_tokens or ck.seq_len - continuation_tokens
    out = pathlib.Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ll = _continuation_docs(ck, num_examples, n_ctx, continuation_tokens, dataset, split)
    gen = _recall_docs(ck, num_examples, tuple(recall_kinds), recall_context_tokens or ck.seq_len, seed, dataset, split)
    # Room for the answer, the stop character and a token of slack, whatever the tokenizer.
    max_gen_toks = max(len(ck.tokenizer.encode(" " + d["answer"] + ".")) for d in gen) + 2
    for name, docs in ((LL_TASK, ll), (GEN_TASK, gen)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name, config in task_configs(out, max_gen_toks).items():
        (out / f"{name}.yaml").write_text(_yaml(config))
    manifest = {"checkpoint": str(ck.step_dir.resolve()), "export": str(export), "ratio": ratio,
                "segment_length": ck.comp.segment_length, "tasks": [LL_TASK, GEN_TASK], "tag": TAG,
                "loglikelihood_examples": len(ll), "generation_examples": len(gen), "context_tokens": n_ctx,
                "continuation_tokens": continuation_tokens, "recall_kinds": list(recall_kinds),
                "max_gen_toks": max_gen_toks, "until": list(UNTIL), "dataset": dataset, "split": split}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(task_dir: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(task_dir) / MANIFEST
    if not path.is_file():
        from gist_jax.errors import ConfigError

        raise ConfigError(f"{task_dir} has no {MANIFEST}; write the tasks first "
                          "(python -m gist_jax.evaluate.lm_eval_task write ...)")
    return json.loads(path.read_text())


def lm_eval_command(task_dir: str | pathlib.Path, export: str | pathlib.Path, output_path: str | pathlib.Path, *,
                    batch_size: int = 1, gist_forward: str | None = None, ratio: int | None = None,
                    tasks: Sequence[str] = (TAG,), device: str = "cpu") -> list[str]:
    """The documented ``lm_eval`` command (``python -m lm_eval`` so it is this interpreter's):
    the hf backend, the export's remote code, per-sample logs. ``gist_forward`` / ``ratio``
    become ``from_pretrained`` kwargs that the remote code reads from its config."""
    model_args = [f"pretrained={export}", "trust_remote_code=True", "dtype=float32"]
    if gist_forward:
        model_args.append(f"gist_forward={gist_forward}")
    if ratio:
        model_args.append(f"gist_ratio={int(ratio)}")
    return [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", ",".join(model_args),
            "--include_path", str(task_dir), "--tasks", ",".join(tasks), "--device", device,
            "--batch_size", str(batch_size), "--log_samples", "--output_path", str(output_path)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gist_jax.evaluate.lm_eval_task", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the task directory")
    w.add_argument("--checkpoint", required=True, help="run workdir, its checkpoints/ dir, or a <step> dir")
    w.add_argument("--export", required=True, help="the Hugging Face export of that checkpoint")
    w.add_argument("--out", required=True, help="task directory (lm_eval --include_path)")
    w.add_argument("--step", type=int, default=None)
    w.add_argument("--num_examples", type=int, default=16, help="examples per task")
    w.add_argument("--ratio", type=int, default=None, help="default: the export's inference_ratio")
    w.add_argument("--context_tokens", type=int, default=None, help="default: seq_len - continuation_tokens")
    w.add_argument("--continuation_tokens", type=int, default=32)
    w.add_argument("--recall_kinds", default="passkey,uuid_recall")
    w.add_argument("--recall_context_tokens", type=int, default=None, help="default: seq_len")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--dataset", default="stdlib")
    w.add_argument("--split", default="validation")
    args = p.parse_args(argv)
    if args.command == "write":  # the only command; `compare` is lm_eval_compare's, which reads these tasks
        manifest = write_tasks(args.checkpoint, args.export, args.out, num_examples=args.num_examples, ratio=args.ratio,
                               context_tokens=args.context_tokens, continuation_tokens=args.continuation_tokens,
                               recall_kinds=tuple(k for k in args.recall_kinds.split(",") if k),
                               recall_context_tokens=args.recall_context_tokens, seed=args.seed,
                               dataset=args.dataset, split=args.split, step=args.step)
        print(json.dumps(manifest, indent=1))
        command = lm_eval_command(args.out, manifest["export"], "OUT")[3:]  # after `python -m lm_eval`
        print("run (offline: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1): lm_eval " + " ".join(command))
    return 0


if __name__ == "__main__":
    from gist_jax.errors import ConfigError

    try:
        sys.exit(main())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
