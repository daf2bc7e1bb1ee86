"""Reading a finished run back: the perplexity table (before vs after training, full attention
vs each compression ratio) and its plot, from ``<workdir>/metrics.jsonl``."""

from __future__ import annotations

import json
import logging
import math
import pathlib
from typing import Any

logger = logging.getLogger(__name__)


def _record(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return None
    return value if isinstance(value, dict) else None


def read_records(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log (``metrics.jsonl``), none dropped without a warning.

    A last line without its newline that is not a record is what a kill or a full disk leaves
    (or a live run mid-write): skipped with a warning. A damaged line before it is a warning
    naming the line, not an error: the log is the run's output, not an input, and every other
    record (the evaluations a report compares, each named by its step) is still good; refusing
    would make a whole run unreadable for one line. Such lines come from runs that were resumed
    after a kill by a version that did not trim the torn record (``hooks.trim_torn_record``), so
    the half record is glued to the next one: that next record is kept when it parses whole.
    """
    path = pathlib.Path(path)
    lines = path.read_bytes().split(b"\n")
    torn = lines.pop()  # b"" when the file ends in a newline
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _record(line)
        if record is None:
            glued = line.rfind(b'{"step"')
            record = _record(line[glued:]) if glued > 0 else None
            logger.warning("%s:%d is not a JSON record (%d bytes)%s", path, number, len(line),
                           f"; kept the complete record at its end (step {record.get('step')})" if record else
                           "; skipped it")
        if record is not None:
            records.append(record)
    if torn.strip():
        record = _record(torn)
        if record is None:
            logger.warning("%s ends in a partial record (%d bytes, from a kill, a full disk or a run still writing); "
                           "skipped it", path, len(torn))
        else:
            records.append(record)
    return records


def eval_entries(workdir: str | pathlib.Path) -> list[dict]:
    entries = read_records(pathlib.Path(workdir) / "metrics.jsonl")
    return [e for e in entries if any(k.startswith("eval/ppl_") for k in e)]


def before_after(workdir: str | pathlib.Path) -> tuple[dict, dict]:
    """The first evaluation (step 0 when the run evaluated at start) and the last one."""
    entries = eval_entries(workdir)
    if not entries:
        raise ValueError(f"{workdir}/metrics.jsonl has no evaluation; set train.eval_at_start or train.eval_every")
    return min(entries, key=lambda e: e["step"]), max(entries, key=lambda e: e["step"])


def _settings(entry: dict) -> list[str]:
    names = [k[len("eval/ppl_"):] for k in entry if k.startswith("eval/ppl_")]
    return sorted(names, key=lambda n: (n != "full", n != "local", int(n[1:]) if n[1:].isdigit() else 0))


LABELS = {"full": "full attention", "local": "no memory (each segment alone)",
          "window": "sliding window + sinks, no gists (UniGist)"}


def setting_label(name: str) -> str:
    return LABELS.get(name, f"compressed, ratio {name[1:]}")


def perplexity_table(workdir: str | pathlib.Path) -> str:
    """Markdown table: validation perplexity per setting, before and after training, and each
    ratio's memory efficacy (1: as good as full attention, 0: as good as no memory)."""
    before, after = before_after(workdir)
    has_efficacy = any(k.startswith("eval/efficacy_") for k in after)
    header = f"| setting | ppl at step {before['step']} | ppl at step {after['step']} | change |"
    if has_efficacy:
        header += f" efficacy at step {before['step']} | efficacy at step {after['step']} |"
    rows = [header, "|" + "---|" * header.count(" |")]
    for name in _settings(after):
        a, b = before.get(f"eval/ppl_{name}"), after[f"eval/ppl_{name}"]
        change = f"{(b - a) / a:+.1%}" if a else "n/a"
        row = f"| {setting_label(name)} | {a:.3f} | {b:.3f} | {change} |" if a else \
            f"| {setting_label(name)} | n/a | {b:.3f} | n/a |"
        if has_efficacy:
            row += "".join(f" {_fmt(e.get(f'eval/efficacy_{name}'))} |" for e in (before, after))
        rows.append(row)
    return "\n".join(rows)


def _fmt(value: float | None) -> str:
    """Blank for a setting with no efficacy; n/a where full attention did not beat no memory."""
    if value is None:
        return ""
    return "n/a" if math.isnan(value) else f"{value:+.3f}"


def plot_perplexity(workdir: str | pathlib.Path, out: str | pathlib.Path | None = None) -> pathlib.Path:
    """Grouped bars (before / after) per setting; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = before_after(workdir)
    names = _settings(after)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    ax.bar([i - width / 2 for i in x], [before.get(f"eval/ppl_{n}", 0) for n in names], width,
           label=f"step {before['step']}")
    ax.bar([i + width / 2 for i in x], [after[f"eval/ppl_{n}"] for n in names], width, label=f"step {after['step']}")
    short = {"full": "full", "local": "no memory", "window": "window"}
    ax.set_xticks(list(x), [short.get(n, f"r = {n[1:]}") for n in names])
    ax.set_ylabel("validation perplexity (segments 2+)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Full attention vs gist compression")
    fig.tight_layout()
    out = pathlib.Path(out) if out else pathlib.Path(workdir) / "perplexity.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
