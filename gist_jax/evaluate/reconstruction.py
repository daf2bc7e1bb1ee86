"""Suite ``reconstruction``: how much of its span a frozen gist still holds (method.md section 6).

For each ratio a fresh probe decoder (one transformer block initialised as a copy of the
checkpoint's last layer, plus one ``[ae]`` embedding; the same architecture as the AE objective,
``gist_jax.train.ae``) is trained for ``probe_steps`` Adam steps to rebuild every gist's r raw
tokens from that gist's last-layer key/value alone. The model is frozen (its final norm and LM
head are read, never updated). Token accuracy on held-out windows is the score: the paper's
one-block probe gets 53.9 / 19.2 / 9.6 / 5.1 % at ratios 4 / 8 / 16 / 32 on Llama3.1-8B.
Windows are split in two halves: the probe trains on the first and is scored on the second.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gist_jax.errors import ConfigError
from gist_jax.evaluate import common
from gist_jax.gist.forward import compressed_logits
from gist_jax.gist.layout import cached_layout
from gist_jax.gist.specs import layout_arrays
from gist_jax.train.ae import ae_loss, init_ae_params
from gist_jax.utils.progress import progress


def run(ck: common.Checkpoint, out_dir: pathlib.Path, *, datasets=("stdlib",), split: str = "validation",
        window: int | None = None, num_windows: int = 4, max_documents: int = 0, ratios=None,
        probe_steps: int = 200, probe_lr: float = 1e-3, batch: int = 4, seed: int = 0, **_: Any) -> dict:
    if not ck.comp.enabled:
        raise ConfigError(f"{ck.step_dir} has no gists (compression.memory='none'); the reconstruction "
                                 "probe needs a compressed checkpoint")
    window = window or ck.seq_len
    texts = common.documents(datasets[0], split, ck.tokenizer_spec, max_documents)
    tokens = common.windows(ck, texts, window, max(2, num_windows))
    half = len(tokens) // 2
    train_tokens, test_tokens = tokens[:half], tokens[half:]
    rows = []
    compressed = [s for s in common.settings(ck, ratios) if s.ratio is not None]
    # Per ratio: probe_steps training steps, then one scoring call per held-out window.
    with progress(desc="reconstruction", total=len(compressed) * (probe_steps + len(test_tokens)), unit="step") as bar:
        for setting in compressed:
            rows.append(_probe(ck, setting, train_tokens, test_tokens, probe_steps, probe_lr, batch, seed, bar))
    per_window = [{"setting": r["setting"], "correct": r.pop("window_correct"), "tokens": r.pop("window_tokens")}
                  for r in rows]  # for bootstrap intervals over the held-out windows
    _plot(rows, out_dir / "reconstruction_accuracy_vs_ratio.png")
    return common.write_results(out_dir, "reconstruction", rows, {"per_window": per_window})


@functools.lru_cache(maxsize=16)
def _probe_fns(setting: common.Setting, length: int, lr: float) -> tuple:
    """(optimizer, jitted update, jitted score) for one setting, with the model's params as arguments (not
    captured constants), so checkpoints of one architecture share their compilations."""
    comp, cfg = setting.comp, setting.cfg
    layout = cached_layout(length, comp)
    shape, arrays = layout.shape, layout_arrays(layout)
    last = cfg.num_layers - 1
    tx = optax.adam(lr)

    def gist_kv(model, tokens_BxN):  # frozen: the checkpoint's last-layer KV of every layout token
        _, (k, v) = compressed_logits(cfg, comp, shape, model, tokens_BxN, arrays, kv_layer=last)
        return jax.lax.stop_gradient(k), jax.lax.stop_gradient(v)

    def loss_fn(ae, model, tokens_BxN, k, v):
        return ae_loss(cfg, comp, shape, model, ae, tokens_BxN, arrays, k, v)

    @jax.jit
    def update(ae, opt, model, tokens_BxN):
        k, v = gist_kv(model, tokens_BxN)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(ae, model, tokens_BxN, k, v)
        updates, opt = tx.update(grads, opt, ae)
        return optax.apply_updates(ae, updates), opt, loss

    @jax.jit
    def score(ae, model, tokens_BxN):
        return loss_fn(ae, model, tokens_BxN, *gist_kv(model, tokens_BxN))[1]

    return tx, update, score


def _probe(ck, setting, train_tokens, test_tokens, steps, lr, batch, seed, bar) -> dict:
    model = ck.params
    tx, update, score = _probe_fns(setting, train_tokens.shape[1], float(lr))
    ae = init_ae_params(setting.cfg, setting.comp, model, -1)
    opt = tx.init(ae)

    rng = np.random.default_rng(seed)
    loss = float("nan")
    for _ in range(steps):
        rows = rng.choice(len(train_tokens), size=min(batch, len(train_tokens)), replace=False)
        ae, opt, loss = update(ae, opt, model, jnp.asarray(train_tokens[rows]))
        if not bar.disable:  # a shown bar counts finished steps, not dispatched ones (its ETA stays true)
            jax.block_until_ready(loss)
        bar.update()
    # One held-out window at a time: per-window counts for bootstrap intervals over windows.
    window_correct, window_tokens = [], []
    for i in range(len(test_tokens)):
        metrics = score(ae, model, jnp.asarray(test_tokens[i:i + 1]))
        window_correct.append(float(metrics["ae_accuracy"]) * float(metrics["ae_tokens"]))
        window_tokens.append(float(metrics["ae_tokens"]))
        bar.update()
    correct, total = sum(window_correct), sum(window_tokens)
    return {"checkpoint": ck.name, "setting": setting.name, "ratio": setting.ratio, "probe_steps": steps,
            "final_train_loss": float(loss), "token_accuracy": correct / max(total, 1.0), "test_tokens": int(total),
            "window_correct": window_correct, "window_tokens": window_tokens}


def _plot(rows, path: pathlib.Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["ratio"] for r in rows], [r["token_accuracy"] for r in rows], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression ratio")
    ax.set_ylabel("probe token accuracy")
    ax.set_ylim(-0.05, 1.05)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
