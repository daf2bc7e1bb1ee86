"""The study's report: ``<out>/report/study.md`` (markdown, mirroring the paper's tables and
figures), its PNGs, and ``study.json`` (every estimate, for tests and later documents).

Every number is an ``Estimate`` with a 95% bootstrap interval, printed ``value [lo, hi]``;
accuracies in percent, as the paper prints them. Findings are sentences generated from the
intervals by ``stats.compare`` / ``stats.chain`` / ``stats.sign``: nothing in them is typed in.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
from typing import Any

from gist_jax.evaluate import stats
from gist_jax.evaluate.stats import Estimate
from gist_jax.study import figures, numbers, report_peers
from gist_jax.study.markdown import cell as _cell
from gist_jax.study.markdown import label
from gist_jax.study.markdown import table as _table
from gist_jax.study.plan import Study
from gist_jax.study.runner import read_json, write_json_atomic

ARCHITECTURES = ("fine_kv", "coarse_kv", "coarse_rec")  # the paper's chain (Table 2's order)
CURVES = ARCHITECTURES + ("unigist",)  # every architecture a figure draws (UniGist is outside the chain)
PERCENT = (-3.0, 103.0)  # accuracy axes  # Table 2's order: expected best to worst
PAPER = {  # Deng et al. 2025 (Llama3.1-8B), for orientation only: different model, data and scale
    "reconstruction": "paper, one-block probe: 53.9% (r4), 19.2% (r8), 9.6% (r16), 5.1% (r32)",
    "uuid": "paper, Fine-KV: 77.3 / 52.5 / 38.2% on the first 8 / 16 / 32 characters; full attention flat",
    "surprise": "paper, ratio 8: word 50.7 vs 35.8%, number 69.2 vs 59.0% (relevant vs unrelated)",
    "recall": "paper, synthetic recall: full 93.9, Fine-KV r4 40.6 (AE 62.0, TIE 54.3)",
    "perplexity": "paper: full < Fine-KV < Coarse-KV < Coarse-Rec at every ratio; Fine-KV r4 within ~0.1 PPL of full",
    "boundary": "paper: loss high at the segment start, falling toward its end; boundary starts score far lower",
}


def _settings(study: Study, run: str) -> list[str]:
    return ["full"] + (["local"] + [f"r{r}" for r in study.ratios] if study.run(run).compressed else [])


class Report:
    """Collects markdown sections, figures and the flat list of estimates."""

    def __init__(self, out: pathlib.Path, study: Study, results: numbers.Results):
        self.out, self.study, self.results = out, study, results
        self.dir = out / "report"
        self.B = study.bootstrap
        self.md: list[str] = []
        self.findings: list[str] = []
        self.flat: list[dict[str, Any]] = []
        self.figures: list[str] = []
        self.runs = [s.name for s in study.runs]
        self.compressed = [s.name for s in study.runs if s.compressed]

    def record(self, table: str, run: str, setting: str, metric: str, e: Estimate | None) -> None:
        if e is not None:
            self.flat.append({"table": table, "run": run, "setting": setting, "metric": metric, **e.to_dict()})

    def figure(self, path: pathlib.Path, caption: str) -> None:
        self.figures.append(path.name)
        self.md.append(f"\n![{caption}]({path.name})\n")

    def finding(self, text: str) -> None:
        self.findings.append(text)
        self.md.append(f"- {text}")

    # ------------------------------------------------------------------ sections
    def perplexity(self) -> None:
        ppl = numbers.perplexity(self.results, self.B)
        self.md.append("## Perplexity by variant and ratio (Table 2)\n")
        self.md.append("Held-out windows, targets after the first segment only; *own full* is the same checkpoint "
                       "run with full attention (gist parameters unused), *no memory* the same weights on each "
                       "segment alone (every architecture alike, UniGist too). " + PAPER["perplexity"] + ".\n")
        header = ["variant", "own full", "no memory"] + [f"ratio {r}" for r in self.study.ratios]
        rows = []
        for run in self.runs:
            cells = [_cell(ppl.get((run, s))) for s in _settings(self.study, run)]
            cells += ["—"] * (len(header) - 1 - len(cells))
            rows.append([label(run)] + cells)
            for s in _settings(self.study, run):
                self.record("perplexity", run, s, "ppl", ppl.get((run, s)))
        self.md.append(_table(header, rows))
        full = ppl.get(("full", "full"))
        series = {f"ratio {r}": [ppl.get((run, f"r{r}")) for run in self.compressed] for r in self.study.ratios}
        self.figure(figures.grouped_bars(self.dir / "perplexity_by_variant.png", self.compressed, series, "perplexity",
                                         "Perplexity by variant and ratio (dashed: full-attention run)", label,
                                         hline=("full attention", full) if full else None),
                    "perplexity by variant and ratio")
        self.md.append("\nFindings:\n")
        for r in self.study.ratios:
            chain = ([("full attention", full)] if full else []) + [
                (label(a), ppl[(a, f"r{r}")]) for a in ARCHITECTURES if (a, f"r{r}") in ppl]
            if len(chain) >= 2:
                self.finding(stats.chain(chain, f"perplexity at ratio {r}"))
        for r in self.study.ratios:
            for extra in ("fine_kv_ae", "fine_kv_tie", "fine_kv_ae_tie", "unigist"):
                a, b = ppl.get(("fine_kv", f"r{r}")), ppl.get((extra, f"r{r}"))
                if a and b:
                    self.finding(stats.compare("Fine-KV", a, label(extra), b, f"perplexity at ratio {r}"))
        if full:
            for run in self.compressed:
                own = ppl.get((run, "full"))
                if own:
                    self.finding(stats.compare("the full-attention run", full, f"{label(run)} run with full attention",
                                               own, "full-attention perplexity"))

    def efficacy(self) -> None:
        """Memory efficacy per compressed run and ratio: whether the gists carry anything
        beyond what the raw tokens of the segment already give (docs/recipe.md)."""
        eff = numbers.efficacy(self.results, self.B)
        if not eff:
            return
        self.md.append("\n## Memory efficacy\n")
        self.md.append("(NLL no memory - NLL compressed) / (NLL no memory - NLL full attention), per target on the "
                       "perplexity suite's windows, all three settings from the same checkpoint. 1: as good as full "
                       "attention; 0: as good as dropping the earlier segments (*no memory* in the table "
                       "above); below 0: the gists hurt.\n")
        header = ["variant"] + [f"efficacy, ratio {r}" for r in self.study.ratios]
        rows = []
        for run in self.compressed:
            rows.append([label(run)] + [_cell(eff.get((run, f"r{r}"))) for r in self.study.ratios])
            for r in self.study.ratios:
                self.record("efficacy", run, f"r{r}", "efficacy", eff.get((run, f"r{r}")))
        self.md.append(_table(header, rows))
        windowed = [run for run in self.compressed if (run, "window") in eff]
        if windowed:  # UniGist keeps a raw window besides its gists: what each part carries
            self.md.append("\nUniGist keeps a sliding window of raw tokens besides its gists. *window alone* is "
                           "the same weights with that window and the sinks and no gists, over no memory; "
                           "*gists over the window*: (NLL window - NLL compressed) / (NLL window - NLL full), "
                           "paired per window: what the gists add.\n")
            header = ["variant", "window alone"] + [f"gists over the window, ratio {r}" for r in self.study.ratios]
            rows = []
            for run in windowed:
                over = [eff.get((run, f"r{r}_over_window")) for r in self.study.ratios]
                rows.append([label(run), _cell(eff[(run, "window")])] + [_cell(e) for e in over])
                self.record("efficacy", run, "window", "efficacy", eff[(run, "window")])
                for r, e in zip(self.study.ratios, over):
                    self.record("efficacy", run, f"r{r}", "over_window", e)
            self.md.append(_table(header, rows))
        self.md.append("\nFindings:\n")
        for run in self.compressed:
            for r in self.study.ratios:
                e = eff.get((run, f"r{r}"))
                if e is None:
                    continue
                if run in windowed:
                    self.finding(stats.sign(f"{label(run)} efficacy at ratio {r}", e,
                                            "its window and gists carry context (better than no memory)",
                                            "its window and gists hurt (worse than no memory)"))
                    over = eff.get((run, f"r{r}_over_window"))
                    if over is not None:
                        self.finding(stats.sign(f"{label(run)} gists over its window at ratio {r}", over,
                                                "the gists add to the window", "the gists hurt the window"))
                else:
                    self.finding(stats.sign(f"{label(run)} efficacy at ratio {r}", e,
                                            "the gists carry context (better than no memory)",
                                            "the gists hurt (worse than no memory)"))

    def position(self) -> None:
        curves = numbers.position_curves(self.results, self.B)
        gaps = numbers.edge_gaps(self.results, self.B, int(self.study.eval_options.get("edge", 16)))
        if not curves:
            return
        self.md.append("\n## Loss by position in a segment (Fig. 3)\n")
        self.md.append("Mean loss of the target at each 1-based position inside its segment, first segment skipped; "
                       "*gap* = mean of the first k positions minus the last k (k = min(16, L/2)), per window. "
                       "Positive: the segment start is harder. " + PAPER["boundary"] + ".\n")
        header = ["variant"] + [f"gap, {s}" for s in ["own full"] + [f"ratio {r}" for r in self.study.ratios]]
        rows = []
        for run in self.compressed:
            scored = [s for s in _settings(self.study, run) if s != "local"]  # no memory has no boundary
            rows.append([label(run)] + [_cell(gaps.get((run, s))) for s in scored])
            for s in scored:
                self.record("boundary_gap", run, s, "first_minus_last", gaps.get((run, s)))
        self.md.append(_table(header, rows))
        panels = {}
        for r in self.study.ratios:
            lines = {label(a): curves[(a, f"r{r}")] for a in CURVES if (a, f"r{r}") in curves}
            if ("fine_kv", "full") in curves:
                lines["full attention (Fine-KV weights)"] = curves[("fine_kv", "full")]
            panels[f"ratio {r}"] = lines
        self.figure(figures.curves(self.dir / "loss_by_position.png", panels, "position inside segment (log2)",
                                   "mean loss (nats)"), "loss by position in a segment")
        self.md.append("\nFindings:\n")
        for run in self.compressed:
            for r in self.study.ratios:
                e = gaps.get((run, f"r{r}"))
                if e:
                    self.finding(stats.sign(f"{label(run)} ratio {r}: first-k minus last-k loss", e,
                                            "the segment start is harder (lost by the boundary)",
                                            "the segment start is easier"))

    def continuation(self) -> None:
        cont = numbers.continuation(self.results, self.B)
        if not cont:
            return
        self.md.append("\n## Continuation at a segment boundary vs mid-segment\n")
        self.md.append("The same reference continuation scored by teacher forcing after a context that ends exactly at "
                       "a segment boundary (everything before it compressed) or half a segment later; differences "
                       "are paired over windows.\n")
        header = ["variant", "setting", "NLL boundary", "NLL mid", "NLL boundary - mid", "acc boundary %",
                  "acc mid %", "acc boundary - mid (pts)"]
        rows = []
        for run in self.compressed:
            for s in _settings(self.study, run):
                c = cont.get((run, s))
                if not c:
                    continue
                rows.append([label(run), s, _cell(c["boundary_nll"]), _cell(c["mid_nll"]), _cell(c["diff_nll"]),
                             _cell(c["boundary_acc"], True), _cell(c["mid_acc"], True), _cell(c["diff_acc"], True)])
                for k, e in c.items():
                    self.record("continuation", run, s, k, e)
        self.md.append(_table(header, rows))
        groups = [f"{run}:r{r}" for run in self.compressed for r in self.study.ratios]
        series = {"boundary - mid": [cont.get((run, f"r{r}"), {}).get("diff_nll") for run in self.compressed
                                     for r in self.study.ratios]}
        self.figure(figures.grouped_bars(self.dir / "boundary_continuation.png", groups, series,
                                         "continuation NLL, boundary - mid (nats)",
                                         "Context cut at a segment boundary vs mid-segment (paired over windows; "
                                         "> 0: boundary worse)", hline=("no difference", Estimate(0.0, 0.0, 0.0, 0))),
                    "boundary vs mid-segment continuation")
        self.md.append("\nFindings:\n")
        for run in self.compressed:
            for r in self.study.ratios:
                c = cont.get((run, f"r{r}"))
                if c:
                    self.finding(stats.sign(f"{label(run)} ratio {r}: continuation NLL boundary - mid", c["diff_nll"],
                                            "starting at a boundary is worse", "starting at a boundary is better"))

    def surprise(self) -> None:
        sur = numbers.surprise(self.results, self.B)
        if not sur:
            return
        self.md.append("\n## Surprise: relevant subject vs unrelated name (lost if surprise)\n")
        self.md.append(f"Needle accuracy (%), pairs that differ only in the needle's subject; gap paired over pairs. "
                       f"{PAPER['surprise']}.\n")
        rows = []
        for run in self.runs:
            for s in _settings(self.study, run):
                e = sur.get((run, s))
                if e:
                    rows.append([label(run), s, _cell(e["relevant"], True), _cell(e["unrelated"], True),
                                 _cell(e["gap"], True)])
                    for k, v in e.items():
                        self.record("surprise", run, s, k, v)
        self.md.append(_table(["variant", "setting", "relevant %", "unrelated %", "gap (pts)"], rows))
        groups = [f"{run}:{s}" for run in self.runs for s in _settings(self.study, run) if (run, s) in sur]
        series = {k: [sur[tuple(g.split(":"))][k] for g in groups] for k in ("relevant", "unrelated")}
        self.figure(figures.grouped_bars(self.dir / "surprise.png", groups, series, "accuracy (%)",
                                         "Needle accuracy: relevant vs unrelated subject", scale=100.0, ylim=PERCENT),
                    "surprise gap")
        self.md.append("\nFindings:\n")
        for run, s in [("full", "full")] + [(a, f"r{r}") for a in self.compressed for r in self.study.ratios]:
            if (run, s) in sur:
                    self.finding(stats.sign(f"{label(run)} {s}: surprise gap (relevant - unrelated)",
                                            sur[(run, s)]["gap"], "relevant needles are recalled more often",
                                            "unrelated needles are recalled more often"))

    def uuid(self) -> None:
        uu = numbers.uuid(self.results, self.B)
        if not uu:
            return
        self.md.append("\n## UUID recall by prefix length (Fig. 5, lost along the way)\n")
        self.md.append(f"Exact match (%) of the first 8 / 16 / 32 characters; decay = prefix 8 - prefix 32, paired "
                       f"per example. {PAPER['uuid']}.\n")
        rows = []
        for run in self.runs:
            for s in _settings(self.study, run):
                e = uu.get((run, s))
                if e:
                    rows.append([label(run), s] + [_cell(e[p], True) for p in numbers.PREFIXES]
                                + [_cell(e["decay"], True)])
                    for k, v in e.items():
                        self.record("uuid", run, s, f"prefix{k}" if isinstance(k, int) else k, v)
        self.md.append(_table(["variant", "setting", "prefix 8 %", "prefix 16 %", "prefix 32 %", "decay (pts)"], rows))
        panels = {}
        for r in self.study.ratios:
            lines = {label(run): (numbers.PREFIXES, [uu[(run, f"r{r}")][p] for p in numbers.PREFIXES])
                     for run in self.compressed if (run, f"r{r}") in uu}
            if ("full", "full") in uu:
                lines["full attention"] = (numbers.PREFIXES, [uu[("full", "full")][p] for p in numbers.PREFIXES])
            panels[f"ratio {r}"] = lines
        self.figure(figures.lines_with_errors(self.dir / "uuid_prefix.png", panels, "UUID prefix (characters)",
                                              "exact match (%)", scale=100.0, ylim=PERCENT), "UUID prefix decay")
        self.md.append("\nFindings:\n")
        for run, s in [("full", "full")] + [(a, f"r{r}") for a in CURVES for r in self.study.ratios]:
            if (run, s) in uu:
                self.finding(stats.sign(f"{label(run)} {s}: UUID decay (prefix 8 - prefix 32)", uu[(run, s)]["decay"],
                                        "accuracy falls along the UUID", "accuracy rises along the UUID"))

    def recall(self) -> None:
        rec = numbers.recall(self.results, self.B)
        if not rec:
            return
        kinds = sorted({k for v in rec.values() for k in v if k != "all"}) + ["all"]
        self.md.append("\n## Recall suite (RULER-style)\n")
        self.md.append(f"Accuracy (%) over needle depths and context lengths. {PAPER['recall']}.\n")
        rows = []
        for run in self.runs:
            for s in _settings(self.study, run):
                e = rec.get((run, s))
                if e:
                    rows.append([label(run), s] + [_cell(e.get(k), True) for k in kinds])
                    for k, v in e.items():
                        self.record("recall", run, s, k, v)
        self.md.append(_table(["variant", "setting"] + [f"{k} %" for k in kinds], rows))
        series = {f"ratio {r}": [rec.get((run, f"r{r}"), {}).get("all") for run in self.compressed]
                  for r in self.study.ratios}
        full = rec.get(("full", "full"), {}).get("all")
        self.figure(figures.grouped_bars(self.dir / "recall.png", self.compressed, series, "accuracy (%)",
                                         "Recall suite, all kinds (dashed: full-attention run)", label,
                                         scale=100.0, ylim=PERCENT,
                                         hline=("full attention", full) if full else None), "recall suite")
        self.md.append("\nFindings:\n")
        if full:
            for r in self.study.ratios:
                e = rec.get(("fine_kv", f"r{r}"), {}).get("all")
                if e:
                    self.finding(stats.compare("full attention", full, f"Fine-KV ratio {r}", e, "recall accuracy"))
        for r in self.study.ratios:
            base = rec.get(("fine_kv", f"r{r}"), {}).get("all")
            for extra in ("fine_kv_ae", "fine_kv_tie", "fine_kv_ae_tie"):
                e = rec.get((extra, f"r{r}"), {}).get("all")
                if base and e:
                    self.finding(stats.compare("Fine-KV", base, label(extra), e, f"recall accuracy at ratio {r}"))

    def reconstruction(self) -> None:
        acc = numbers.reconstruction(self.results, self.B)
        if not acc:
            return
        self.md.append("\n## Reconstruction probe accuracy by ratio (Table 4)\n")
        self.md.append(f"A fresh one-block probe trained on frozen gists; token accuracy (%) on held-out windows. "
                       f"{PAPER['reconstruction']}.\n")
        rows = [[label(run)] + [_cell(acc.get((run, f"r{r}")), True) for r in self.study.ratios]
                for run in self.compressed]
        for run in self.compressed:
            for r in self.study.ratios:
                self.record("reconstruction", run, f"r{r}", "token_accuracy", acc.get((run, f"r{r}")))
        self.md.append(_table(["variant"] + [f"ratio {r} %" for r in self.study.ratios], rows))
        panels = {"probe token accuracy": {label(run): (list(self.study.ratios),
                                                        [acc[(run, f"r{r}")] for r in self.study.ratios])
                                           for run in self.compressed
                                           if all((run, f"r{r}") in acc for r in self.study.ratios)}}
        self.figure(figures.lines_with_errors(self.dir / "reconstruction.png", panels, "compression ratio",
                                              "token accuracy (%)", scale=100.0, ylim=PERCENT, log2x=True),
                    "reconstruction accuracy by ratio")
        self.md.append("\nFindings:\n")
        lo, hi = self.study.ratios[0], self.study.ratios[-1]
        for run in self.compressed:
            a, b = acc.get((run, f"r{hi}")), acc.get((run, f"r{lo}"))
            if a and b and lo != hi:
                self.finding(stats.compare(f"{label(run)} ratio {hi}", a, f"ratio {lo}", b, "probe accuracy"))
        for r in self.study.ratios:
            for without, with_ae in (("fine_kv", "fine_kv_ae"), ("fine_kv_tie", "fine_kv_ae_tie")):
                a, b = acc.get((without, f"r{r}")), acc.get((with_ae, f"r{r}"))
                if a and b:
                    self.finding(stats.compare(label(without), a, label(with_ae), b, f"probe accuracy at ratio {r}"))

    # ------------------------------------------------------------------ assembly
    def header(self, command: str) -> list[str]:
        timings = read_json(self.out / "timings.json") or {}
        train_s = timings.get("train_seconds", {})
        eval_s = timings.get("eval_seconds", {})
        lines = [f"# Gist-token compression study: scale `{self.study.scale}`\n",
                 (f"Reproduces the analyses of Deng et al. (ACL 2025) on one base model. Command: `{command}`. "
                  f"Written {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC} on {platform.node()} "
                  f"({os.cpu_count()} CPUs, {platform.machine()}). Every number: value [95% bootstrap interval], "
                  f"{self.B} resamples of windows or examples; an ordering is stated only where intervals separate.\n"),
                 "## Runs\n"]
        rows = []
        for spec in self.study.runs:
            run, comp = spec.run, spec.run.compression
            suites = [f"{s}" for s in self.study.suites_for(spec) if s in self.results.get(spec.name, {})]
            ev = sum(v for k, v in eval_s.items() if k.startswith(spec.name + "/"))
            rows.append([label(spec.name), f"`{spec.variants}`", str(run.num_steps),
                         f"{run.step.batch_size} x {run.step.seq_len}",
                         f"{comp.segment_length} / {comp.ratios} {comp.ratio_sampling}" if comp.enabled else "—",
                         f"{train_s.get(spec.name, float('nan')):.0f}", f"{ev:.0f}", ", ".join(suites) or "none"])
        lines.append(_table(["variant", "variants", "steps", "batch x tokens", "segment / ratios", "train s",
                             "eval s", "suites cached"], rows))
        first = self.study.runs[0].run
        lines.append(f"\nBase model `{first.model.init}`, data `{first.data.sources}`; "
                     f"one run alone: `{self.study.runs[0].command}`.\n")
        return lines

    def write(self, command: str) -> pathlib.Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        for section in (self.perplexity, self.efficacy, self.position, self.continuation, self.surprise, self.uuid,
                        self.recall, self.reconstruction):
            section()
        report_peers.ruler(self)  # what users measure elsewhere: RULER, and the presses they would pick
        report_peers.kvpress(self)
        body = self.header(command) + self.md + ["\n## All findings\n"] + [f"{i + 1}. {f}" for i, f in
                                                                          enumerate(self.findings)]
        path = self.dir / "study.md"
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text("\n".join(body) + "\n")
        os.replace(tmp, path)
        write_json_atomic(self.dir / "study.json", {"scale": self.study.scale, "estimates": self.flat,
                                                    "findings": self.findings, "figures": self.figures})
        return path


def write_report(out: pathlib.Path, study: Study, results: numbers.Results, command: str) -> pathlib.Path:
    return Report(out, study, results).write(command)
