"""In-training validation: perplexity of the same weights with full attention and with
compression at each ratio the config trains, on fixed validation batches.

Perplexity is over the tokens after the first segment (positions j >= L predicting j + 1):
only there does compression change what a token can see, so full-attention and compressed
numbers are over exactly the same targets. The full-attention row runs the base model alone
(the gist parameters unused), which is what a user compares against.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.forward import compressed_hidden
from gist_jax.gist.layout import cached_layout
from gist_jax.gist.params import GIST_PARAM_NAMES, model_config_for
from gist_jax.gist.specs import layout_arrays, raw_rows
from gist_jax.model.config import ModelConfig
from gist_jax.model.loss import lm_token_scores, next_token_labels
from gist_jax.model.transformer import Params


def strip_gist_params(params: Params) -> Params:
    """The base model's tree: every gist leaf (embedding, gist projections) removed."""
    if isinstance(params, dict):
        return {k: strip_gist_params(v) for k, v in params.items() if k not in GIST_PARAM_NAMES}
    return params


def eval_settings(comp: CompressionConfig) -> dict[str, tuple[int, ...] | None]:
    """Setting name -> ratio per segment (None = full attention)."""
    out: dict[str, tuple[int, ...] | None] = {"full": None}
    if comp.enabled:
        out.update({f"r{r}": (r,) for r in comp.ratios})
    return out


def _nll_sums(cfg: ModelConfig, params: Params, hidden_BxNxE: jax.Array, tokens_BxN: jax.Array,
              loss_mask_BxN: jax.Array, first_target: int) -> tuple[jax.Array, jax.Array]:
    """(sum of NLL, count) over the targets; ``hidden`` = the raw rows' final-norm states."""
    n = tokens_BxN.shape[1]
    j = jnp.arange(n)
    mask = loss_mask_BxN & (j < n - 1)[None] & (j >= first_target)[None]
    nll = lm_token_scores(cfg, params, hidden_BxNxE, next_token_labels(tokens_BxN), mask).nll
    return jnp.sum(nll), jnp.sum(mask)


class PerplexityEvaluator:
    """Compiles one loss function per setting once; call with the trained model params."""

    def __init__(self, base_cfg: ModelConfig, comp: CompressionConfig, seq_len: int,
                 batches: list[dict[str, jax.Array]]):
        self.base_cfg, self.comp, self.seq_len, self.batches = base_cfg, comp, seq_len, batches
        self.first_target = comp.segment_length if comp.enabled else 0
        self._fns: dict[str, Callable] = {}

    def _fn(self, name: str, ratios: tuple[int, ...] | None) -> Callable:
        if name in self._fns:
            return self._fns[name]
        comp, first = self.comp, self.first_target
        if ratios is None:
            none = comp.full_attention()
            cfg = model_config_for(self.base_cfg, none)

            def loss(params, tokens, loss_mask, arrays):
                base = strip_gist_params(params)
                hidden = compressed_hidden(cfg, none, None, base, tokens, arrays)
                return _nll_sums(cfg, base, hidden, tokens, loss_mask, first)
            arrays = {}
        else:
            num_segments = comp.num_segments(self.seq_len)
            per_segment = ratios * num_segments
            padded = comp.ratio_sampling == "per_segment"
            slots = comp.max_gists_per_segment if padded else comp.segment_length // ratios[0]
            layout = cached_layout(self.seq_len, comp, per_segment, slots)
            cfg, shape = model_config_for(self.base_cfg, comp), layout.shape
            arrays = layout_arrays(layout)

            def loss(params, tokens, loss_mask, arrays):
                hidden = compressed_hidden(cfg, comp, shape, params, tokens, arrays)
                raw = raw_rows(hidden, arrays, tokens.shape[1])
                return _nll_sums(cfg, params, raw, tokens, loss_mask, first)
        jitted = jax.jit(loss)
        self._fns[name] = lambda params, batch: jitted(params, batch["tokens"], batch["loss_mask"], arrays)
        return self._fns[name]

    def __call__(self, model_params: Params) -> dict[str, float]:
        out = {}
        for name, ratios in eval_settings(self.comp).items():
            fn = self._fn(name, ratios)
            sums = [fn(model_params, b) for b in self.batches]
            nll = float(np.sum([jax.device_get(s[0]) for s in sums]))
            count = float(np.sum([jax.device_get(s[1]) for s in sums]))
            out[f"eval/ppl_{name}"] = math.exp(nll / max(count, 1.0))
            out["eval/tokens"] = count
        return out
