"""lm-evaluation-harness on an export vs gist_jax's own JAX model, on the same examples and the
same token ids.

    python -m gist_jax.evaluate.lm_eval_compare --tasks TASK_DIR --out OUT [--batch_size 1] \
        [--gist_forward compressed|full] [--ratio R] [--task NAME] [--samples LM_EVAL_OUTPUT_PATH]

``TASK_DIR`` is written by ``python -m gist_jax.evaluate.lm_eval_task write``.

Why: a harness score is only worth reporting if it is the compressed model's. The harness calls
the export's remote code (PyTorch); this module scores every example again with gist_jax's
compressed forward (``train.evaluation.token_nll_fn``, the evaluation suites' path) and greedy
generation from the gist cache (``gist_jax.inference.generate``), after tokenizing exactly as
lm-eval's hf backend does (``_encode_pair``, ``tok_encode``, left truncation to ``max_length``),
and reports the largest per-example log-likelihood difference and how many generations agree.
With ``gist_forward=full`` both sides run the uncompressed base model instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from gist_jax.errors import ConfigError
from gist_jax.evaluate import lm_eval_task

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}


# ----------------------------------------------------------------------------- lm-eval's tokenization
def max_length(export: pathlib.Path, tokenizer: Any) -> int:
    """lm-eval's ``HFLM.max_length`` without ``max_length=`` in model_args
    (``resolve_max_length``): the config's context length, else the tokenizer's, else 2048."""
    config = json.loads((export / "config.json").read_text())
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if config.get(key):
            return int(config[key])
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 1e29 else 2048


def tok_encode(tokenizer: Any, text: str) -> list[int]:
    """``HFLM.tok_encode`` with no ``add_bos_token``: the tokenizer's default special tokens,
    none when the text already starts with the prefix token (BOS, else EOS)."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    starts = prefix is not None and text.startswith(tokenizer.decode(prefix))
    return tokenizer.encode(text, add_special_tokens=False) if starts else tokenizer.encode(text)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``TemplateLM._encode_pair`` for a causal model: trailing whitespace of the context moves to
    the continuation, the whole text is encoded once and split after the context's tokens."""
    if not context:
        raise ConfigError("an empty context is scored after the prefix token; our tasks never have one")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = tok_encode(tokenizer, context + continuation), tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


# ----------------------------------------------------------------------------- our scores
def _setting(ck: Any, gist_forward: str, ratio: int) -> Any:
    from gist_jax.evaluate.common import settings

    name = "full" if gist_forward == "full" else f"r{ratio}"
    return next(s for s in settings(ck, ratios=[ratio]) if s.name == name)


def our_loglikelihoods(ck: Any, setting: Any, pairs: Sequence[tuple[list[int], list[int]]], limit: int,
                       batch: int = 4) -> list[tuple[float, bool]]:
    """``(log P(continuation | context), greedy)`` per pair on the tokens lm-eval feeds
    (``(context + continuation)[-(limit + 1):]``). Rows are right-padded to one length and
    one batch shape (one compilation); padding after a row's last token changes none of its
    predictions, in the compressed layout as in full attention (both are causal)."""
    from gist_jax.evaluate.common import token_nll

    seqs = [(ctx + cont)[-(limit + 1):] for ctx, cont in pairs]
    width = -(-max(len(s) for s in seqs) // 64) * 64
    rows = np.zeros((-(-len(seqs) // batch) * batch, width), np.int32)
    for i, s in enumerate(seqs):
        rows[i, :len(s)] = s
    nll, correct = token_nll(ck, setting, rows, batch=batch)
    out = []
    for i, (s, (_, cont)) in enumerate(zip(seqs, pairs)):
        span = slice(len(s) - len(cont) - 1, len(s) - 1)  # the predictions of the continuation's tokens
        out.append((-float(np.sum(nll[i, span], dtype=np.float64)), bool(np.all(correct[i, span]))))
    return out


def our_generations(ck: Any, setting: Any, tokenizer: Any, prompts: Sequence[str], max_gen_toks: int,
                    until: Sequence[str], limit: int, gist: dict[str, Any], batch: int = 4) -> list[str]:
    """Greedy continuations from the gist cache, post-processed as lm-eval's ``generate_until``:
    the prompt left-truncated to ``max_length - max_gen_toks``, decoded without special tokens,
    cut at the first stop sequence (EOS among them). The compressed export never samples
    ``<gist>`` nor ids past its tokenizer; the stock model (``full``) bans nothing."""
    from gist_jax.evaluate.common import setting_params
    from gist_jax.inference import generate

    ids = [tokenizer(p)["input_ids"][-(limit - max_gen_toks):] for p in prompts]
    compressed = setting.ratio is not None
    stops = [*until, tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)]
    params = setting_params(ck.params, setting)
    capacity = -(-(max(len(p) for p in ids) + max_gen_toks) // 64) * 64
    out: list[str] = []
    for i in range(0, len(ids), batch):
        gen = generate(setting.cfg, setting.comp, params, ids[i:i + batch], max_gen_toks, ratio=setting.ratio,
                       capacity=capacity, pad_batch_to=batch,
                       tokenizer_size=gist.get("tokenizer_vocab_size") if compressed else None,
                       gist_token_id=gist.get("gist_token_id") if compressed else None)
        for tokens in gen.tokens:
            tokens = list(tokens)
            if tokenizer.eos_token_id in tokens:  # HF generate stops there and pads
                tokens = tokens[:tokens.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            for stop in stops:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
    return out


def our_scores(task_dir: str | pathlib.Path, out: str | pathlib.Path, *, gist_forward: str = "compressed",
               ratio: int | None = None, checkpoint: str | None = None, export: str | None = None) -> dict[str, Any]:
    """gist_jax's scores of the task files: ``loglikelihood`` [(ll, greedy)], ``generation``
    [text], ``pairs`` (lm-eval's token ids), ``setting``, ``checkpoint``, ``wall_s``,
    ``cached``. They depend only on the examples, the weights and the setting, not on lm_eval's
    batch size, so ``out/ours_<setting>.json`` serves every later comparison of the same ones."""
    import jax
    from transformers import AutoTokenizer

    from gist_jax.evaluate.common import load_checkpoint

    jax.config.update("jax_default_matmul_precision", "highest")  # float32 parity, as the export tests
    start = time.perf_counter()
    task_dir, out = pathlib.Path(task_dir).resolve(), pathlib.Path(out).resolve()
    manifest = lm_eval_task.read_manifest(task_dir)
    export_dir = pathlib.Path(export or manifest["export"]).resolve()
    ratio = int(ratio or manifest["ratio"])
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    limit = max_length(export_dir, tokenizer)
    ck = load_checkpoint(checkpoint or manifest["checkpoint"])
    setting = _setting(ck, gist_forward, ratio)
    gist = json.loads((export_dir / "config.json").read_text()).get("gist") or {}
    ll_docs, gen_docs = _docs(task_dir, lm_eval_task.LL_TASK), _docs(task_dir, lm_eval_task.GEN_TASK)
    pairs = [encode_pair(tokenizer, d["context"], d["continuation"]) for d in ll_docs]
    key = hashlib.sha256(json.dumps([ll_docs, gen_docs, str(ck.step_dir), setting.name, limit,
                                     manifest["max_gen_toks"], manifest["until"]]).encode()).hexdigest()
    cache = out / f"ours_{setting.name}.json"
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    hit = cached.get("key") == key
    if hit:
        ours_ll, ours_gen = [tuple(x) for x in cached["loglikelihood"]], cached["generation"]
    else:
        ours_ll = our_loglikelihoods(ck, setting, pairs, limit)
        ours_gen = our_generations(ck, setting, tokenizer, [d["prompt"] for d in gen_docs],
                                   manifest["max_gen_toks"], manifest["until"], limit, gist)
        out.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "loglikelihood": ours_ll, "generation": ours_gen}))
    return {"loglikelihood": ours_ll, "generation": ours_gen, "pairs": pairs, "setting": setting.name,
            "checkpoint": str(ck.step_dir), "wall_s": time.perf_counter() - start, "cached": hit}


# ----------------------------------------------------------------------------- lm-eval's run
def run_lm_eval(task_dir: pathlib.Path, export: pathlib.Path, out: pathlib.Path, *, batch_size: int,
                gist_forward: str, ratio: int | None, timeout: float | None = None,
                env: dict[str, str] | None = None, tasks: Sequence[str] = (lm_eval_task.TAG,)) -> float:
    """The documented command as a subprocess, offline; its log goes to ``out/lm_eval.log``.
    Returns the wall time. A failure raises with the log's tail (the harness's own words)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = lm_eval_task.lm_eval_command(task_dir, export, out, batch_size=batch_size, gist_forward=gist_forward,
                                       ratio=None if gist_forward == "full" else ratio, tasks=tasks)
    env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    start = time.perf_counter()
    with open(out / "lm_eval.log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
        tail = (out / "lm_eval.log").read_text()[-3000:]
        raise RuntimeError(f"lm_eval exited {proc.returncode} after {wall:.0f}s:\n{tail}")
    return wall


def read_lm_eval_output(out: pathlib.Path, tasks: Sequence[str]) -> tuple[dict[str, Any], dict[str, list[dict]]]:
    """The newest ``results_*.json`` and, per task, its newest ``samples_<task>_*.jsonl``
    (lm-eval writes them under ``<output_path>/<model name>/``), samples ordered by doc id."""
    results = sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not results:
        raise ConfigError(f"no lm_eval results_*.json under {out}")
    samples = {}
    for task in tasks:
        files = sorted(out.rglob(f"samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
        if not files:
            raise ConfigError(f"no samples_{task}_*.jsonl under {out}: run lm_eval with --log_samples")
        rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    return json.loads(results[-1].read_text()), samples


def _first_response(sample: dict[str, Any]) -> Any:
    """The model's answer in a logged sample: ``filtered_resps[0]`` (the harness's
    ``(loglikelihood, is_greedy)`` pair, or the filtered generation), else ``resps[0][0]``."""
    resp = sample.get("filtered_resps") or sample["resps"][0]
    return resp[0]


def _arguments(sample: dict[str, Any]) -> tuple[str, ...]:
    args = sample["arguments"]
    first = args["gen_args_0"] if isinstance(args, dict) else args[0]
    return tuple(first.values()) if isinstance(first, dict) else tuple(first)


# ----------------------------------------------------------------------------- comparison
def compare(task_dir: str | pathlib.Path, out: str | pathlib.Path, *, batch_size: int = 1,
            gist_forward: str = "compressed", ratio: int | None = None, samples: str | pathlib.Path | None = None,
            checkpoint: str | None = None, export: str | None = None, timeout: float | None = None,
            tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """Run lm_eval (unless ``samples`` names an earlier ``--output_path``) on ``tasks`` (default
    both), score the same examples with gist_jax, write ``out/comparison_<forward>_bs<k>.json``
    and return it."""
    task_dir, out = pathlib.Path(task_dir).resolve(), pathlib.Path(out).resolve()
    manifest = lm_eval_task.read_manifest(task_dir)
    export_dir = pathlib.Path(export or manifest["export"]).resolve()
    ratio = int(ratio or manifest["ratio"])
    tasks = list(tasks or [lm_eval_task.TAG])
    names = manifest["tasks"] if lm_eval_task.TAG in tasks else tasks
    run_dir = pathlib.Path(samples).resolve() if samples else out / f"lm_eval_{gist_forward}_bs{batch_size}"
    wall = None
    if not samples:
        wall = run_lm_eval(task_dir, export_dir, run_dir, batch_size=batch_size, gist_forward=gist_forward,
                           ratio=ratio, timeout=timeout, tasks=tasks)
    results, logged = read_lm_eval_output(run_dir, names)

    ll_task, gen_task = lm_eval_task.LL_TASK, lm_eval_task.GEN_TASK
    ll_docs, gen_docs = _docs(task_dir, ll_task), _docs(task_dir, gen_task)
    logged = {ll_task: [], gen_task: [], **logged}  # a task not run compares nothing
    mismatched = [s["doc_id"] for s in logged[ll_task]
                  if _arguments(s)[:2] != (ll_docs[s["doc_id"]]["context"], ll_docs[s["doc_id"]]["continuation"])]
    mismatched += [s["doc_id"] for s in logged[gen_task] if _arguments(s)[0] != gen_docs[s["doc_id"]]["prompt"]]
    if mismatched:
        raise ConfigError(f"lm_eval scored other text than the task files hold (doc ids {mismatched}); "
                          "the comparison would not be on the same examples")
    ours = our_scores(task_dir, out, gist_forward=gist_forward, ratio=ratio, checkpoint=checkpoint, export=export)
    ours_ll, ours_gen, pairs = ours["loglikelihood"], ours["generation"], ours["pairs"]

    per_ll, per_gen = [], []
    for s in logged[ll_task]:
        theirs_ll, theirs_greedy = _first_response(s)  # the samples log writes both as strings
        theirs_greedy = str(theirs_greedy) in ("True", "1", "true")
        mine, greedy = ours_ll[s["doc_id"]]
        ctx, cont = pairs[s["doc_id"]]
        per_ll.append({"doc_id": s["doc_id"], "tokens": len(ctx) + len(cont), "continuation_tokens": len(cont),
                       "lm_eval": float(theirs_ll), "ours": mine, "diff": float(theirs_ll) - mine,
                       "lm_eval_greedy": theirs_greedy, "ours_greedy": greedy})
    for s in logged[gen_task]:
        doc = gen_docs[s["doc_id"]]
        raw = s["resps"][0][0]
        mine = ours_gen[s["doc_id"]]
        per_gen.append({"doc_id": s["doc_id"], "kind": doc["kind"], "answer": doc["answer"], "lm_eval": raw,
                        "ours": mine, "agree": raw == mine,
                        "lm_eval_exact": float(_first_response(s).strip() == doc["answer"]),
                        "ours_exact": float(mine.strip() == doc["answer"])})
    diffs = np.abs([r["diff"] for r in per_ll])
    report = {
        "export": str(export_dir), "checkpoint": ours["checkpoint"], "gist_forward": gist_forward,
        "ratio": ratio if gist_forward != "full" else None, "setting": ours["setting"], "batch_size": batch_size,
        "command": " ".join(lm_eval_task.lm_eval_command(task_dir, export_dir, run_dir, batch_size=batch_size,
                                                         gist_forward=gist_forward,
                                                         ratio=None if gist_forward == "full" else ratio)),
        "lm_eval_wall_s": wall, "ours_wall_s": ours["wall_s"], "ours_cached": ours["cached"],
        "lm_eval_results": results.get("results", {}),
        "ours": {ll_task: {"perplexity": _mean([-r["ours"] for r in per_ll], np.exp),
                           "acc": _mean([r["ours_greedy"] for r in per_ll])},
                 gen_task: {"exact_match": _mean([r["ours_exact"] for r in per_gen])}},
        # lm-eval's ``perplexity`` is exp(-mean log-likelihood) per *continuation*; per token is readable.
        "token_perplexity": {side: _token_perplexity(per_ll, side) for side in ("lm_eval", "ours")},
        "max_abs_ll_diff": float(diffs.max()) if len(diffs) else None, "mean_abs_ll_diff": _mean(diffs),
        "greedy_agreement": _mean([r["lm_eval_greedy"] == r["ours_greedy"] for r in per_ll]),
        "generation_agreement": _mean([r["agree"] for r in per_gen]),
        "loglikelihood": per_ll, "generation": per_gen,
    }
    out.mkdir(parents=True, exist_ok=True)
    name = f"comparison_{gist_forward}_bs{batch_size}.json"
    (out / name).write_text(json.dumps(report, indent=1))
    return report


def _docs(task_dir: pathlib.Path, task: str) -> list[dict[str, Any]]:
    lines = (task_dir / f"{task}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _token_perplexity(rows: list[dict[str, Any]], side: str) -> float | None:
    tokens = sum(r["continuation_tokens"] for r in rows)
    return float(np.exp(-sum(r[side] for r in rows) / tokens)) if tokens else None


def _mean(values: Any, then: Any = float) -> float | None:
    """The mean (through ``then``), None for no values (a task that was not run)."""
    return float(then(np.mean(values))) if len(values) else None


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def format_report(report: dict[str, Any]) -> str:
    """Scores side by side and the agreement, as a markdown table and two lines."""
    ll, gen = lm_eval_task.LL_TASK, lm_eval_task.GEN_TASK
    theirs = report["lm_eval_results"]

    def metric(task: str, name: str) -> float | None:
        values = theirs.get(task, {})
        return next((v for k, v in values.items() if k.split(",")[0] == name), None)

    rows = [(ll, "perplexity"), (ll, "acc"), (gen, "exact_match")]
    lines = [f"lm_eval ({report['gist_forward']}, batch {report['batch_size']}) vs gist_jax ({report['setting']})",
             "| task | metric | lm_eval | gist_jax |", "|---|---|---|---|"]
    lines += [f"| {t} | {m} | {_num(metric(t, m))} | {_num(report['ours'][t][m])} |" for t, m in rows]
    per_token = report["token_perplexity"]
    lines.append(f"| {ll} | perplexity per token | {_num(per_token['lm_eval'])} | {_num(per_token['ours'])} |")
    if report["loglikelihood"]:
        lines.append(f"max |d loglikelihood| {report['max_abs_ll_diff']:.3g} (mean {report['mean_abs_ll_diff']:.3g}) "
                     f"over {len(report['loglikelihood'])} examples; greedy flags agree "
                     f"{report['greedy_agreement']:.0%}")
    if report["generation"]:
        lines.append(f"generations agree {report['generation_agreement']:.0%} of {len(report['generation'])}")
    if report["lm_eval_wall_s"] is not None:
        cached = " (our scores read from an earlier comparison)" if report["ours_cached"] else ""
        lines.append(f"wall: lm_eval {report['lm_eval_wall_s']:.0f}s, gist_jax {report['ours_wall_s']:.0f}s{cached}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gist_jax.evaluate.lm_eval_compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", required=True, help="the task directory written by lm_eval_task write")
    p.add_argument("--out", required=True, help="where lm_eval's output and the comparison JSON go")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--gist_forward", choices=("compressed", "full"), default="compressed")
    p.add_argument("--ratio", type=int, default=None, help="default: the manifest's ratio")
    p.add_argument("--samples", default=None, help="an earlier lm_eval --output_path to compare instead of running")
    p.add_argument("--checkpoint", default=None, help="default: the manifest's")
    p.add_argument("--export", default=None, help="default: the manifest's")
    p.add_argument("--task", action="append", choices=(lm_eval_task.LL_TASK, lm_eval_task.GEN_TASK), default=None,
                   help="run only this task (repeatable; default both)")
    args = p.parse_args(argv)
    report = compare(args.tasks, args.out, batch_size=args.batch_size, gist_forward=args.gist_forward,
                     ratio=args.ratio, samples=args.samples, checkpoint=args.checkpoint, export=args.export,
                     tasks=args.task)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
