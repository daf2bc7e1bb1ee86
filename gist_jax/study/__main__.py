"""python -m gist_jax.study --scale {smoke,cpu,gpu,paper} --out DIR [--config experiments/study.py]

Trains the paper's grid from one base model (each run through gist_jax.train.loop.train,
resuming from its own checkpoints), evaluates every checkpoint with the suites (results cached
per checkpoint and suite), and writes DIR/report/study.md with its PNGs and study.json.
Rerun the same command after a kill to resume; on a finished study it only rewrites the report.

    --report_only   write the report from what is cached; train and evaluate nothing
    --runs a,b      only these runs of the grid (default: all)
    --max_steps N   stop every run at step N (to time a scale before running it whole)
    --add_suites ruler,kvpress,ruler_press   suites beyond the scale's list (the cpu scale leaves these
                    out: at its sizes they take longer than the rest of the study; gpu and paper run them)
Exit codes: 0 done, 2 configuration error (one line).
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the data path imports tensorflow; its start-up log is noise
logger = logging.getLogger("gist_jax.study")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from gist_jax.study.plan import DEFAULT_CONFIG

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", required=True, help="smoke | cpu | gpu | paper (experiments/study.py)")
    p.add_argument("--out", required=True, help="study directory: runs/, eval/, cache/, report/")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the study file (default experiments/study.py)")
    p.add_argument("--runs", default="", help="comma-separated subset of the grid")
    p.add_argument("--report_only", action="store_true", help="only write the report from cached results")
    p.add_argument("--max_steps", type=int, default=0, help="stop every run at this step (timing a scale); 0: all")
    p.add_argument("--add_suites", default="", help="suites beyond the scale's, e.g. ruler,kvpress,ruler_press "
                                                    "(only they are computed for a finished study)")
    args = p.parse_args(argv)
    from gist_jax.utils.logs import setup_logging

    setup_logging()
    out = pathlib.Path(args.out).absolute()
    start = time.perf_counter()

    from gist_jax.errors import ConfigError

    try:
        from gist_jax.study.plan import load_study

        study = load_study(args.scale, args.config, tuple(r for r in args.runs.split(",") if r), args.max_steps,
                           tuple(s for s in args.add_suites.split(",") if s.strip()))
        out.mkdir(parents=True, exist_ok=True)
        from gist_jax.study import runner

        runner.check_trained_configs(out, study)  # a changed recipe never re-reports old checkpoints
        if not args.report_only:
            pending = [s.name for s in study.runs
                       if not runner.is_trained(out, s) or runner.missing_suites(out, study, s)]
            if pending:  # only then pay for jax, the compilation cache and the models
                from gist_jax.train.distributed import enable_compilation_cache

                enable_compilation_cache()
                trained = runner.train_all(out, study)
                evaluated = runner.evaluate_all(out, study)
                logger.info("[study] trained %d runs, evaluated %d (run, suite) pairs", len(trained), len(evaluated))
            else:
                logger.info("[study] every run is trained and evaluated: re-reporting from the cache")
        from gist_jax.study.report import write_report
        from gist_jax.study.runner import load_results

        command = "python -m gist_jax.study " + " ".join(shlex.quote(a) for a in argv)
        path = write_report(out, study, load_results(out, study), command)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"[study] report: {path} ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
