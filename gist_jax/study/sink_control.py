"""The sinks-only control of memory efficacy (docs/recipe.md): how much of a checkpoint's
efficacy its gists carry, and how much the sink tokens it keeps verbatim would carry alone.

    python -m gist_jax.study.sink_control --checkpoint RUN [--step N] --out DIR [--num-windows 32]

A compressed setting keeps the window's first ``num_sinks`` raw tokens besides its gists, and
``local`` (no memory) keeps nothing, so efficacy over ``local`` credits the gists with whatever
the sinks do: serve the frozen base as an attention sink, and hand every later segment a few
tokens of the earlier text. The ``sinks`` setting (``train.evaluation``: each segment alone
behind those tokens) scores the sinks without the gists, on the perplexity suite's windows and
targets. Reported, each with a 95% bootstrap interval over windows (windows resampled together
for every setting):

* ``efficacy`` of ``sinks`` and of each ratio over no memory (the suite's number);
* ``over_sinks`` of each ratio: ``(NLL_sinks - NLL_r) / (NLL_sinks - NLL_full)``: 1 as good as
  full attention, 0 no better than the sinks alone: what the gists add.
* UniGist (``compression.window`` > 0) also keeps a sliding window of raw tokens, so its control
  is ``window`` (the window and the sinks, no gists): ``over_window`` of each ratio is what its
  gists add to everything else it keeps.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

import numpy as np


def measure(checkpoint: str | pathlib.Path, step: int | None = None, num_windows: int = 32,
            batch: int = 4, dataset: str = "stdlib", split: str = "validation") -> dict[str, Any]:
    """Per-setting perplexity and the efficacies above for one checkpoint."""
    from gist_jax.errors import ConfigError
    from gist_jax.evaluate import common, stats
    from gist_jax.evaluate.metrics import perplexity
    from gist_jax.train.evaluation import eval_settings, scored_positions

    ck = common.load_checkpoint(checkpoint, step)
    tokens = common.windows(ck, common.documents(dataset, split, ck.tokenizer_spec), ck.seq_len, num_windows)
    scored_M = scored_positions(ck.comp, ck.seq_len)
    sums, ppl = {}, {}
    for setting in eval_settings(ck.cfg, ck.comp, local=True, sinks_only=True):
        nll, _ = common.token_nll(ck, setting, tokens, batch)
        mask = np.broadcast_to(scored_M, nll.shape)
        ppl[setting.name] = perplexity(nll, mask)
        sums[setting.name] = np.where(mask, nll.astype(np.float64), 0.0).sum(axis=1)
    if "sinks" not in sums:
        raise ConfigError(f"{ck.step_dir}: compression.num_sinks is 0 or the run does not compress; there are no "
                          "sinks to control for (the suite's efficacy is already over no memory)")
    controls = [name for name in ("sinks", "window") if name in sums]
    ratios = [name for name in sums if name not in ("full", "local", *controls)]
    efficacy = {name: stats.efficacy(sums["local"], sums[name], sums["full"]).to_dict()
                for name in (*controls, *ratios)}
    # Each ratio over each control, paired per window: what the gists add to what the control keeps.
    over = {control: {name: stats.efficacy(sums[control], sums[name], sums["full"]).to_dict() for name in ratios}
            for control in controls}
    return {"checkpoint": str(ck.step_dir), "num_sinks": ck.comp.num_sinks, "windows": int(tokens.shape[0]),
            "window": ck.seq_len, "dataset": dataset, "split": split, "ppl": ppl, "efficacy": efficacy,
            "over_sinks": over["sinks"], **({"over_window": over["window"]} if "window" in over else {})}


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per setting."""
    from gist_jax.evaluate.stats import Estimate

    def cell(d: dict | None) -> str:
        return Estimate(**d).fmt() if d else ""

    window = "over_window" in result
    lines = ["| setting | ppl | efficacy over no memory [95%] | over sinks alone [95%] |"
             + (" over window + sinks, no gists [95%] |" if window else ""),
             "|---|---|---|---|" + ("---|" if window else "")]
    for name, p in result["ppl"].items():
        lines.append(f"| {name} | {p:.3f} | {cell(result['efficacy'].get(name))} | "
                     f"{cell(result['over_sinks'].get(name))} |"
                     + (f" {cell(result['over_window'].get(name))} |" if window else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gist_jax.study.sink_control", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run workdir, its checkpoints/ dir, or a <step> dir")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--out", required=True, help="directory for sink_control.json and .md")
    parser.add_argument("--num-windows", dest="num_windows", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    from gist_jax.errors import ConfigError

    try:
        result = measure(args.checkpoint, args.step, args.num_windows, args.batch)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sink_control.json").write_text(json.dumps(result, indent=1) + "\n")
    text = f"{result['checkpoint']}: {result['num_sinks']} sinks, {result['windows']} windows\n\n{table(result)}\n"
    (out / "sink_control.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
