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

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gist_jax.evaluate import common
from gist_jax.gist.layout import cached_layout
from gist_jax.gist.parallel import compressed_logits
from gist_jax.gist.specs import layout_arrays
from gist_jax.train.ae import ae_loss, init_ae_params


def run(ck: common.Checkpoint, out_dir: pathlib.Path, *, datasets=("stdlib",), split: str = "validation",
        window: int | None = None, num_windows: int = 4, max_documents: int = 0, ratios=None,
        probe_steps: int = 200, probe_lr: float = 1e-3, batch: int = 4, seed: int = 0, **_: Any) -> dict:
    if not ck.comp.enabled:
        raise common.ConfigError(f"{ck.step_dir} has no gists (compression.memory='none'); the reconstruction "
                                 "probe needs a compressed checkpoint")
    window = window or ck.seq_len
    texts = common.documents(datasets[0], split, ck.tokenizer_spec, max_documents)
    tokens = common.windows(ck, texts, window, max(2, num_windows))
    half = len(tokens) // 2
    train_tokens, test_tokens = tokens[:half], tokens[half:]
    rows = []
    for setting in common.settings(ck, ratios):
        if setting.ratio is None:
            continue
        rows.append(_probe(ck, setting, train_tokens, test_tokens, probe_steps, probe_lr, batch, seed))
    _plot(rows, out_dir / "reconstruction_accuracy_vs_ratio.png")
    return common.write_results(out_dir, "reconstruction", rows)


def _probe(ck, setting, train_tokens, test_tokens, steps, lr, batch, seed) -> dict:
    comp, cfg = setting.comp, setting.cfg
    layout = cached_layout(train_tokens.shape[1], comp)
    shape, arrays = layout.shape, layout_arrays(layout)
    last = cfg.num_layers - 1
    model = ck.params

    @jax.jit
    def gist_kv(tokens_BxN):  # frozen: the checkpoint's last-layer KV of every layout token
        _, (k, v) = compressed_logits(cfg, comp, shape, model, tokens_BxN, arrays, kv_layer=last)
        return jax.lax.stop_gradient(k), jax.lax.stop_gradient(v)

    def loss_fn(ae, tokens_BxN, k, v):
        return ae_loss(cfg, comp, shape, model, ae, tokens_BxN, arrays, k, v)

    ae = init_ae_params(cfg, comp, model, -1)
    tx = optax.adam(lr)
    opt = tx.init(ae)

    @jax.jit
    def update(ae, opt, tokens_BxN):
        k, v = gist_kv(tokens_BxN)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(ae, tokens_BxN, k, v)
        updates, opt = tx.update(grads, opt, ae)
        return optax.apply_updates(ae, updates), opt, loss

    rng = np.random.default_rng(seed)
    loss = float("nan")
    for _ in range(steps):
        rows = rng.choice(len(train_tokens), size=min(batch, len(train_tokens)), replace=False)
        ae, opt, loss = update(ae, opt, jnp.asarray(train_tokens[rows]))
    correct = total = 0.0
    for i in range(0, len(test_tokens), batch):
        chunk = jnp.asarray(test_tokens[i:i + batch])
        _, metrics = loss_fn(ae, chunk, *gist_kv(chunk))
        correct += float(metrics["ae_accuracy"]) * float(metrics["ae_tokens"])
        total += float(metrics["ae_tokens"])
    return {"checkpoint": ck.name, "setting": setting.name, "ratio": setting.ratio, "probe_steps": steps,
            "final_train_loss": float(loss), "token_accuracy": correct / max(total, 1.0), "test_tokens": int(total)}


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
