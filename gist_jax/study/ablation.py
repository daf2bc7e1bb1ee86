"""The recipe ablation behind the demo's defaults (docs/recipe.md): train one row at a time on
the demo's shape, score each on held-out windows with the perplexity suite, and tabulate memory
efficacy at every ratio with its 95% bootstrap interval.

    python -m gist_jax.study.ablation --out runs/recipe --rows lead,shipped [--steps 20] [--windows 32]
    python -m gist_jax.study.ablation --out runs/recipe --rows lead --steps 200 --curve 20,50,100,200

Every row is the demo's experiment file (``experiments/demo.py``) with the *whole* recipe spelled
out as ``--config.<key>=<value>`` overrides (``RECIPE`` plus the row's changes), so a row means
the same thing whatever the demo's defaults become. Each row is an ordinary run,
``python -m gist_jax.main``, in ``<out>/runs/<row>`` (a finished one is not retrained), and an
ordinary ``python -m gist_jax.evaluate --suite perplexity`` per evaluated step in
``<out>/eval/<row>/<step>`` (skipped when its JSON is there). The table, with the command, the
machine, the load average and the date of every row, goes to ``<out>/ablation.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time

# The recipe every row starts from: the measured lead (gist parameters only, Beacon-style gist
# projections, aligned positions, lr 1e-3, no AE/TIE) on the demo's shape.
RECIPE: dict[str, str] = {
    "compression.trainable": "gist_only",
    "compression.gist_projections": "True",
    "compression.positions": "aligned",
    "compression.num_sinks": "4",
    "compression.window": "0",
    "optimizer.learning_rate": "1e-3",
    "optimizer.warmup_fraction": "0.1",
    "objective.ae": "False",
    "objective.tie": "False",
    "data.sources": "(('stdlib',1.0),)",
    "data.packing": "concat",
}
# Passkey retrieval over stdlib text, one example per sequence (``doc_start`` packing): about 480
# tokens of context with the key in its first 70% (mostly a compressed segment), then the question.
PASSKEY = "synthetic:passkey?haystack=stdlib&context_tokens=480&depth_max=0.7&num_examples=2000"
ROWS: dict[str, tuple[str, dict[str, str]]] = {
    "shipped": ("the demo until now: all weights, compressed positions, lr 1e-4, AE + TIE",
                {"compression.trainable": "all", "compression.gist_projections": "False",
                 "compression.positions": "compressed", "optimizer.learning_rate": "1e-4",
                 "objective.ae": "True", "objective.tie": "True"}),
    "lead": ("gist only + gist q/k/v, aligned positions, lr 1e-3", {}),
    "compressed": ("lead with compressed positions", {"compression.positions": "compressed"}),
    "no_projections": ("lead without gist projections (only the gist embedding trains)",
                       {"compression.gist_projections": "False"}),
    "all_weights": ("lead, but every weight trains (lr 1e-4)",
                    {"compression.trainable": "all", "optimizer.learning_rate": "1e-4"}),
    "lr3e-4": ("lead at lr 3e-4", {"optimizer.learning_rate": "3e-4"}),
    "lr3e-3": ("lead at lr 3e-3", {"optimizer.learning_rate": "3e-3"}),
    "no_warmup": ("lead without warm-up", {"optimizer.warmup_fraction": "0.0"}),
    "sinks0": ("lead with no sink tokens", {"compression.num_sinks": "0"}),
    "sinks16": ("lead with 16 sink tokens", {"compression.num_sinks": "16"}),
    "unigist16": ("UniGist (window 128, no chunks) with 16 sink tokens: compare with sinks16",
                  {"compression.num_sinks": "16", "compression.window": "128"}),
    "tie": ("lead + TIE", {"objective.tie": "True"}),
    "ae": ("lead + AE (the demo's AE settings)", {"objective.ae": "True"}),
    "passkey25": ("lead, 25% of sequences passkey retrieval over stdlib text",
                  {"data.sources": f"(('stdlib',0.75),('{PASSKEY}',0.25))", "data.packing": "doc_start"}),
}


def row_overrides(name: str, steps: int, save_steps: tuple[int, ...]) -> list[str]:
    """The row's whole recipe and its run length as ``--config`` flags."""
    keys = {**RECIPE, **ROWS[name][1]}
    keys.update({"optimizer.total_steps": str(steps), "train.eval_every": "0", "train.eval_at_start": "False",
                 "checkpoint.every": str(min(save_steps)) if len(save_steps) > 1 else str(steps),
                 "checkpoint.milestone_every": str(min(save_steps)) if len(save_steps) > 1 else "0",
                 "checkpoint.keep": "1"})
    return [f"--config.{k}={v}" for k, v in keys.items()]


def _run(cmd: list[str], log: pathlib.Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        raise SystemExit(f"{cmd[2]} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def run_row(out: pathlib.Path, name: str, steps: int, eval_steps: tuple[int, ...], windows: int,
            config: str = "experiments/demo.py") -> list[dict]:
    """Trains the row (unless finished) and scores each of ``eval_steps``; one record per step."""
    run = f"{name}_{steps}"
    workdir, log = out / "runs" / run, out / "logs" / f"{run}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    train_cmd = [sys.executable, "-m", "gist_jax.main", "--config", config, "--workdir", str(workdir),
                 *row_overrides(name, steps, eval_steps)]
    record = {"row": name, "steps": steps, "what": ROWS[name][0], "command": shlex.join(train_cmd[1:]),
              "machine": _machine()}
    if not (workdir / "final_metrics.json").is_file():
        record.update(load_before=os.getloadavg()[0], date=_now())
        record["train_seconds"] = _run(train_cmd, log)
        record["load_after"] = os.getloadavg()[0]
        (workdir / "ablation_record.json").write_text(json.dumps(record))
    record = {**json.loads((workdir / "ablation_record.json").read_text()), "command": record["command"]}
    results = []
    for step in eval_steps:
        ev = out / "eval" / run / str(step)
        if not (ev / "perplexity.json").is_file():
            _run([sys.executable, "-m", "gist_jax.evaluate", "--checkpoint", str(workdir), "--step", str(step),
                  "--suite", "perplexity", "--num-windows", str(windows), "--batch", "4", "--out", str(ev)], log)
        rows = json.loads((ev / "perplexity.json").read_text())["rows"]
        results.append({**record, "step": step, **summarise(rows)})
    return results


def summarise(rows: list[dict]) -> dict:
    """``ppl_<setting>`` for every setting, ``efficacy_r<k>`` as ``[value, lo, hi]``, windows."""
    out: dict = {"windows": rows[0]["windows"]}
    for r in rows:
        out[f"ppl_{r['setting']}"] = r["ppl"]
        if r["setting"] not in ("full", "local"):  # None: full attention gained nothing over no memory
            out[f"efficacy_{r['setting']}"] = [r.get("efficacy"), r.get("efficacy_lo"), r.get("efficacy_hi")]
    return out


def _interval(value: list | None) -> str:
    return f"{value[0]:+.3f} [{value[1]:+.3f}, {value[2]:+.3f}]" if value and value[0] is not None else "n/a"


def markdown(records: list[dict]) -> str:
    """One line per record: efficacy and perplexity per ratio; a no-gist control a run was scored
    with (UniGist's ``window``, the ``sinks``) goes in its own column, not among the ratios."""
    keys = {k for r in records for k in r if k.startswith("efficacy_")}
    ratios = sorted((k for k in keys if k[len("efficacy_r"):].isdigit() and k.startswith("efficacy_r")),
                    key=lambda k: int(k[len("efficacy_r"):]))
    controls = sorted(keys - set(ratios))
    header = ["row", "step of", "what"] + [f"efficacy {k[len('efficacy_'):]}" for k in ratios] + [
        "ppl full", "ppl no memory"] + [f"ppl {k[len('efficacy_'):]}" for k in ratios] + (
        ["no-gist control: efficacy"] if controls else []) + ["train s", "load", "date"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        eff = [_interval(r.get(k)) for k in ratios]
        ppl = [f"{r.get('ppl_' + k[len('efficacy_'):], float('nan')):.3f}" for k in ratios]
        control = ["; ".join(f"{k[len('efficacy_'):]} {_interval(r[k])}" for k in controls if k in r)
                   ] if controls else []
        load = f"{r.get('load_before', float('nan')):.1f}-{r.get('load_after', float('nan')):.1f}"
        lines.append("| " + " | ".join([r["row"], f"{r['step']}/{r['steps']}", r["what"], *eff, f"{r['ppl_full']:.3f}",
                                         f"{r['ppl_local']:.3f}", *ppl, *control,
                                         f"{r.get('train_seconds', 0):.0f}", load, r.get("date", "")]) + " |")
    commands = sorted({f"- {r['row']}: `python {r['command']}`" for r in records})
    return "\n".join(lines) + f"\n\nMachine: {records[0]['machine']}\n\nCommands:\n" + "\n".join(commands) + "\n"


def _machine() -> str:
    """The CPU model (``/proc/cpuinfo`` where there is one), core count and OS: every row is CPU."""
    model = platform.processor() or platform.machine()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores, {platform.system()} (CPU)"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory: runs/, eval/, logs/, ablation.md/.json")
    p.add_argument("--rows", required=True, help=f"comma-separated, of: {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, default=20, help="training steps per row (the demo's 20)")
    p.add_argument("--curve", default="", help="comma-separated steps to evaluate (default: the last)")
    p.add_argument("--windows", type=int, default=32, help="held-out windows per evaluation")
    p.add_argument("--config", default="experiments/demo.py", help="experiment file[:variants] the rows change")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        print(f"--rows: unknown row {unknown[0]!r}; use any of {', '.join(ROWS)}", file=sys.stderr)
        return 2
    steps = tuple(int(s) for s in args.curve.split(",") if s.strip()) or (args.steps,)
    if max(steps) != args.steps:
        print(f"--curve {args.curve}: its last step must be --steps ({args.steps})", file=sys.stderr)
        return 2
    from gist_jax.cli_config import CliConfigError, load_run

    for name in names:  # every row's config, validated before anything trains
        try:
            load_run(args.config, row_overrides(name, args.steps, steps))
        except CliConfigError as e:
            print(f"config error in row {name!r}: {e}", file=sys.stderr)
            return 2
    out = pathlib.Path(args.out).absolute()
    table = out / "ablation.json"
    records = json.loads(table.read_text()) if table.is_file() else []
    for name in names:
        fresh = run_row(out, name, args.steps, steps, args.windows, args.config)
        keys = {(r["row"], r["steps"], r["step"]) for r in fresh}
        records = [r for r in records if (r["row"], r["steps"], r["step"]) not in keys] + fresh
        table.write_text(json.dumps(records, indent=1))
        (out / "ablation.md").write_text(markdown(records))
        print(markdown(fresh), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
