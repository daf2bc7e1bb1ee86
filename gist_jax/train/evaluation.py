"""Perplexity of one set of weights with full attention and with compression at each ratio: the
one evaluator behind both the in-training validation (``PerplexityEvaluator``) and every
evaluation suite (``gist_jax.evaluate``), so a number in ``metrics.jsonl`` and the same number
from ``python -m gist_jax.evaluate`` come from the same settings, layouts and targets.

* Settings: ``full`` runs the base model alone (the gist parameters unused), which is what a
  user compares against; ``r<k>`` runs the trained compression at the single ratio k with a fixed
  layout of L / k gists per segment (``ratio_sampling='fixed'``), whatever sampling the run
  trained with, so a ratio's number never depends on how training drew ratios.
* Targets: perplexity counts the predictions of raw positions j >= L (token j + 1), the
  positions the LM loss trains (``train.step.loss_positions``): only from there on does
  compression change what a token sees, so every setting is scored on exactly the same targets.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.errors import ConfigError
from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.forward import compressed_hidden
from gist_jax.gist.layout import cached_layout
from gist_jax.gist.params import GIST_PARAM_NAMES, model_config_for
from gist_jax.gist.specs import layout_arrays, raw_rows
from gist_jax.model.config import ModelConfig
from gist_jax.model.loss import lm_token_scores
from gist_jax.model.transformer import Params


def strip_gist_params(params: Params) -> Params:
    """The base model's tree: every gist leaf (embedding, gist projections) removed."""
    if isinstance(params, dict):
        return {k: strip_gist_params(v) for k, v in params.items() if k not in GIST_PARAM_NAMES}
    return params


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way to run the weights: ``full`` (the base model, gist params unused) or ``r<k>``."""

    name: str
    ratio: int | None  # None: full attention
    cfg: ModelConfig
    comp: CompressionConfig


def eval_settings(model_cfg: ModelConfig, comp: CompressionConfig,
                  ratios: Sequence[int] | None = None) -> list[Setting]:
    """Full attention plus every ratio ``comp`` trains (or ``ratios``). ``model_cfg`` is the
    model config *with* the trained gist parameters (``model_config_for(base, comp)``): a single
    ratio's layout indexes the same gist-embedding table the run trained."""
    none = comp.full_attention()
    out = [Setting("full", None, model_config_for(model_cfg, none), none)]
    if comp.enabled:
        for r in (comp.ratios if ratios is None else ratios):
            if comp.segment_length % int(r):
                raise ConfigError(f"--config.compression.ratios: {r} does not divide the segment length "
                                  f"{comp.segment_length}; use ratios from {comp.ratios}")
            fixed = comp.replace(ratios=(int(r),), ratio_sampling="fixed", pad_to_segments=True)
            out.append(Setting(f"r{r}", int(r), model_cfg, fixed))
    return out


def setting_params(params: Params, setting: Setting) -> Params:
    """The params tree a setting reads: the base model's alone for full attention."""
    return strip_gist_params(params) if setting.ratio is None else params


def first_scored_position(comp: CompressionConfig) -> int:
    """The first raw position whose prediction counts: L when compressing, 0 otherwise."""
    return comp.segment_length if comp.enabled else 0


def scored_positions(comp: CompressionConfig, length: int) -> np.ndarray:
    """``[length - 1]`` bool over the predictions ``token_nll_fn`` returns (position j predicts
    token j + 1): True where perplexity counts it."""
    return np.arange(length - 1) >= first_scored_position(comp)


def _raw_hidden(setting: Setting, length: int) -> tuple[Callable, dict]:
    """``(fn(params, tokens, arrays) -> [B, N, E] final-norm states of the raw tokens, arrays)``;
    the layout arrays are arguments, not constants baked into the program."""
    if setting.ratio is None:
        def full(params, tokens_BxN, arrays):
            return compressed_hidden(setting.cfg, setting.comp, None, params, tokens_BxN, arrays)
        return full, {}
    layout = cached_layout(length, setting.comp)
    shape = layout.shape

    def compressed(params, tokens_BxN, arrays):
        hidden = compressed_hidden(setting.cfg, setting.comp, shape, params, tokens_BxN, arrays)
        return raw_rows(hidden, arrays, length)
    return compressed, layout_arrays(layout)


@functools.lru_cache(maxsize=64)
def token_nll_fn(setting: Setting, length: int) -> Callable:
    """Jitted ``(params, tokens [B, N]) -> (nll, correct)`` ``[B, N-1]``: the raw rows' hidden
    states, then the chunked head + CE (``gist_jax.model.loss``), never ``[B, N, V]`` logits."""
    run, arrays = _raw_hidden(setting, length)

    @jax.jit
    def scores(params, tokens_BxN, arrays):
        hidden_BxNxE = run(params, tokens_BxN, arrays)
        out = lm_token_scores(setting.cfg, params, hidden_BxNxE[:, :-1], tokens_BxN[:, 1:])
        return out.nll, out.correct

    return lambda params, tokens_BxN: scores(params, tokens_BxN, arrays)


@functools.lru_cache(maxsize=64)
def nll_sums_fn(setting: Setting, length: int, first_position: int) -> Callable:
    """Jitted ``(params, tokens [B, N], loss_mask [B, N]) -> (sum of NLL, count)`` over the
    predictions of positions ``j >= first_position`` that ``loss_mask`` keeps; reduced on the
    devices, so a batch sharded across processes needs no host gather."""
    run, arrays = _raw_hidden(setting, length)

    @jax.jit
    def sums(params, tokens_BxN, loss_mask_BxN, arrays):
        # loss_mask[j]: position j and its target are real tokens (data.loader.loss_mask_from_valid).
        mask_BxM = loss_mask_BxN[:, :-1] & (jnp.arange(length - 1) >= first_position)[None]
        hidden_BxNxE = run(params, tokens_BxN, arrays)
        nll = lm_token_scores(setting.cfg, params, hidden_BxNxE[:, :-1], tokens_BxN[:, 1:], mask_BxM).nll
        return jnp.sum(jnp.where(mask_BxM, nll, 0.0)), jnp.sum(mask_BxM)

    return lambda params, tokens_BxN, loss_mask_BxN: sums(params, tokens_BxN, loss_mask_BxN, arrays)


class PerplexityEvaluator:
    """In-training validation: ``eval/ppl_<setting>`` over fixed batches, each setting compiled
    once (``nll_sums_fn``); call with the model params (``state.params['model']``)."""

    def __init__(self, base_cfg: ModelConfig, comp: CompressionConfig, seq_len: int,
                 batches: list[dict[str, jax.Array]]):
        self.settings = eval_settings(model_config_for(base_cfg, comp), comp)
        self.seq_len, self.batches = seq_len, batches
        self.first_position = first_scored_position(comp)  # the same targets for every setting

    def __call__(self, model_params: Params) -> dict[str, float]:
        out = {}
        for setting in self.settings:
            fn = nll_sums_fn(setting, self.seq_len, self.first_position)
            params = setting_params(model_params, setting)
            sums = [fn(params, b["tokens"], b["loss_mask"]) for b in self.batches]
            nll = float(np.sum([jax.device_get(s[0]) for s in sums]))
            count = float(np.sum([jax.device_get(s[1]) for s in sums]))
            out[f"eval/ppl_{setting.name}"] = math.exp(nll / max(count, 1.0))
            out["eval/tokens"] = count
        return out
