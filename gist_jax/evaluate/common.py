"""What every suite shares: the checkpoint, its settings (full attention and each ratio), text,
token log-likelihoods through the training forward, generation, and the result files."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.errors import ConfigError
from gist_jax.gist.config import CompressionConfig
from gist_jax.model.config import ModelConfig
from gist_jax.model.transformer import Params
from gist_jax.train.evaluation import Setting, eval_settings, setting_params, token_nll_fn


@dataclasses.dataclass
class Checkpoint:
    """A trained model ready to evaluate: gist model config, compression config, model params."""

    name: str
    step_dir: pathlib.Path
    cfg: ModelConfig  # with gist parameters
    comp: CompressionConfig
    params: Params  # state.params["model"]
    run: dict[str, Any]

    @property
    def tokenizer_spec(self) -> str:
        return (self.run.get("data") or {}).get("tokenizer", "bytes")

    @functools.cached_property
    def tokenizer(self):
        from gist_jax.data.tokenizer import tokenizer_from_spec

        return tokenizer_from_spec(self.tokenizer_spec)

    @property
    def seq_len(self) -> int:
        return int(self.run["step"]["seq_len"])


def load_checkpoint(path: str | pathlib.Path, step: int | None = None) -> Checkpoint:
    """A run's --workdir, its ``checkpoints`` dir or one ``<step>`` dir; only ``params['model']``
    is read (not the optimizer state), checked against its checksums, in float32 compute for
    exact comparisons. A damaged newest step falls back to the newest sound one with a warning;
    a damaged ``step`` is a ``ConfigError`` (``train.step_reader.sound_step``)."""
    from gist_jax.train.step_reader import ModelParamsReader, checkpoint_configs, sound_step

    def read(step_dir: pathlib.Path) -> Checkpoint:
        cfg, comp, run = checkpoint_configs(step_dir)
        params = jax.tree.map(jnp.asarray, ModelParamsReader(step_dir).load_all())
        name = step_dir.parent.parent.name  # the run's workdir name
        return Checkpoint(name, step_dir, cfg, comp, params, run)

    return sound_step(path, step, read)


def settings(ck: Checkpoint, ratios: Sequence[int] | None = None, local: bool = False) -> list[Setting]:
    """Full attention, no memory (``local``, for suites that score it), and every ratio the
    checkpoint trained (or ``ratios``): the in-training validation's settings
    (``train.evaluation.eval_settings``)."""
    return eval_settings(ck.cfg, ck.comp, ratios, local)


# ----------------------------------------------------------------------------- text
def documents(spec: str, split: str, tokenizer_spec: str, max_documents: int = 0) -> list[str]:
    """Texts of a local source spec (``stdlib``, ``files:<glob>``, ``jsonl:<glob>#field``)."""
    from gist_jax.data.sources import iter_source

    out = []
    for _, text in iter_source(spec, split, tokenizer_spec):
        out.append(text)
        if max_documents and len(out) >= max_documents:
            break
    if not out:
        raise ConfigError(f"--data={spec} split {split} has no documents; pass another source spec")
    return out


def windows(ck: Checkpoint, texts: Iterable[str], length: int, count: int) -> np.ndarray:
    """``count`` non-overlapping windows of ``length`` tokens (stride = window) cut from the
    documents joined by EOS, the way training packs them. Fewer if the text runs out."""
    eos = ck.tokenizer.eos_id
    stream: list[int] = []
    for text in texts:
        stream += ck.tokenizer.encode(text) + ([eos] if eos is not None else [])
        if len(stream) >= length * count:
            break
    n = min(count, len(stream) // length)
    if n == 0:
        raise ConfigError(f"the evaluation text has {len(stream)} tokens, less than one window of {length}; "
                          "use more documents (--max-documents 0) or a shorter window (--config.step.seq_len)")
    return np.asarray(stream[:n * length], np.int32).reshape(n, length)


# ----------------------------------------------------------------------------- log-likelihoods
def token_nll(ck: Checkpoint, setting: Setting, tokens_BxN: np.ndarray,
              batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """NLL and argmax-correctness ``[B, N-1]`` of token j+1 given tokens <= j (teacher forcing)."""
    fn = token_nll_fn(setting, tokens_BxN.shape[1])
    params = setting_params(ck.params, setting)
    nll, correct = [], []
    for i in range(0, len(tokens_BxN), batch):
        a, b = fn(params, jnp.asarray(tokens_BxN[i:i + batch]))
        nll.append(np.asarray(a))
        correct.append(np.asarray(b))
    return np.concatenate(nll), np.concatenate(correct)


def generate_texts(ck: Checkpoint, setting: Setting, prompts: Sequence[str], max_new_tokens: int,
                   batch: int = 8) -> list[str]:
    """Greedy continuations from the gist-compressed cache (full attention: a plain cache)."""
    from gist_jax.inference import generate

    tok = ck.tokenizer
    ids = [tok.encode(p) for p in prompts]
    params = setting_params(ck.params, setting)
    out: list[str] = []
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch]
        capacity = -(-(max(len(p) for p in ids) + max_new_tokens) // 64) * 64  # one compilation for all chunks
        gen = generate(setting.cfg, setting.comp, params, chunk, max_new_tokens, ratio=setting.ratio, capacity=capacity,
                       pad_batch_to=batch, tokenizer_size=tok.vocab_size)  # never an id the tokenizer lacks
        out += [tok.decode(t) for t in gen.tokens]
    return out


# ----------------------------------------------------------------------------- results
def write_results(out_dir: pathlib.Path, suite: str, rows: list[dict[str, Any]], extra: dict | None = None) -> dict:
    """``<suite>.json`` (rows + extra) and ``<suite>.csv`` (rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"suite": suite, "rows": rows, **(extra or {})}
    (out_dir / f"{suite}.json").write_text(json.dumps(payload, indent=1, default=_jsonable))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out_dir / f"{suite}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return payload


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def format_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A markdown table (floats to 4 significant digits)."""
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, ax, xlabel: str, ylabel: str, path: pathlib.Path) -> None:
    """The labels, legend and file handling every suite's line plot shares."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
