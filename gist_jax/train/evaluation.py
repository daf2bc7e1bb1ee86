"""Perplexity of one set of weights with full attention and with compression at each ratio: the
one evaluator behind both the in-training validation (``PerplexityEvaluator``) and every
evaluation suite (``gist_jax.evaluate``), so a number in ``metrics.jsonl`` and the same number
from ``python -m gist_jax.evaluate`` come from the same settings, layouts and targets.

* Settings: ``full`` runs the base model alone (the gist parameters unused), which is what a
  user compares against; ``local`` runs the same base weights with no memory at all: each
  segment alone, as if the earlier context were thrown away (the prediction at a segment's last
  position sees that segment only and predicts the next segment's first token); ``r<k>`` runs
  the trained compression at the single ratio k with a fixed layout of L / k gists per segment
  (``ratio_sampling='fixed'``), whatever sampling the run trained with, so a ratio's number
  never depends on how training drew ratios. ``sinks`` (asked for separately: a control) is
  ``local`` with the window's first ``num_sinks`` tokens in front of every segment: the raw
  tokens a compressed setting keeps besides its gists, without the gists. ``local`` is the
  same for every architecture, UniGist (``compression.window`` W > 0) included, so efficacies
  compare across architectures (and, with a frozen base, across runs). A windowed checkpoint
  adds ``window``: the base model under UniGist's sliding window with the sinks and no gists
  (raw token q sees the sinks and raw tokens q - W .. q, original positions), i.e. what a
  windowed setting sees without its gists, less the up to r - 1 raw tokens of its own gist
  unit (its window starts at the unit's start). Its efficacy over ``local`` is what the
  window alone recovers; a ratio that does not beat it carries nothing the window does not.
  It runs the windowed path itself (``no_memory_window``), never an N x N matrix.
* Targets: perplexity counts the predictions of raw positions j >= L (token j + 1), the
  positions the LM loss trains (``train.step.loss_positions``): only from there on does
  compression change what a token sees, so every setting is scored on exactly the same targets.
* Memory efficacy at ratio k: ``(NLL_local - NLL_rk) / (NLL_local - NLL_full)``, NLL the mean
  per target. 1 is as good as full attention, 0 no better than dropping the earlier context,
  below 0 harmful. Perplexity alone cannot tell these apart: a compressor can beat its untrained
  self and still lose to no memory (``memory_efficacy``).
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
from gist_jax.model.loss import lm_token_scores, next_token_pairs
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
    ratio: int | None  # None: full attention, or no memory (``local``)
    cfg: ModelConfig
    comp: CompressionConfig
    local: bool = False  # each segment of comp.segment_length run alone, the base weights
    sinks: int = 0  # with local: the window's first ``sinks`` tokens in front of every segment

    @property
    def windowed(self) -> bool:
        """UniGist's ``window`` control: a local setting run through the windowed layout with
        every gist dead (``no_memory_window``), not segments alone."""
        return self.local and self.comp.windowed


def eval_settings(model_cfg: ModelConfig, comp: CompressionConfig,
                  ratios: Sequence[int] | None = None, local: bool = False,
                  sinks_only: bool = False) -> list[Setting]:
    """Full attention, no memory (``local``, when asked and ``comp`` compresses), the sinks
    without the gists (``sinks_only``, when asked and ``comp`` keeps sinks), then every
    ratio ``comp`` trains (or ``ratios``). ``model_cfg`` is the model config *with* the trained
    gist parameters (``model_config_for(base, comp)``): a single ratio's layout indexes the same
    gist-embedding table the run trained."""
    none = comp.full_attention()
    base_cfg = model_config_for(model_cfg, none)
    out = [Setting("full", None, base_cfg, none)]
    if comp.enabled and local:
        out.append(Setting("local", None, base_cfg, none, local=True))
        if comp.windowed:  # what a UniGist setting keeps besides its gists (``no_memory_window``)
            window = comp.replace(ratios=(1,), ratio_sampling="fixed", pad_to_segments=True)
            out.append(Setting("window", None, model_cfg, window, local=True))
    if comp.enabled and sinks_only and comp.num_sinks:
        out.append(Setting("sinks", None, base_cfg, none, local=True, sinks=comp.num_sinks))
    if comp.enabled:
        for r in (comp.ratios if ratios is None else ratios):
            if comp.segment_length % int(r):
                raise ConfigError(f"--config.compression.ratios: {r} does not divide the segment length "
                                  f"{comp.segment_length}; use ratios from {comp.ratios}")
            fixed = comp.replace(ratios=(int(r),), ratio_sampling="fixed", pad_to_segments=True)
            out.append(Setting(f"r{r}", int(r), model_cfg, fixed))
    return out


def setting_params(params: Params, setting: Setting) -> Params:
    """The params tree a setting reads: the base model's alone for full attention and local
    (UniGist's ``window`` control keeps the gist leaves its dead gist slots embed; no raw token
    reads them)."""
    return strip_gist_params(params) if setting.ratio is None and not setting.windowed else params


def no_memory_window(arrays: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """A windowed layout's arrays with every gist dead, in the tokens and in the memory buffer:
    no query sees a gist, so the windowed path computes the base model under UniGist's sliding
    window (and the layout's sinks). With ratio 1 a raw token's unit is itself, so its window
    is raw tokens q - W .. q. Gist projections apply at gist rows only, so raw rows are the
    base model's."""
    return {**arrays, "alive": arrays["alive"] & ~arrays["is_gist"],
            "buffer_live": arrays["buffer_live"] & (arrays["buffer_segment"] < 0)}


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
    if setting.local and not setting.windowed:
        segment_length = setting.comp.segment_length

        def alone(params, tokens_BxN, arrays):
            return segments_alone_hidden(setting.cfg, setting.comp, params, tokens_BxN, segment_length,
                                         setting.sinks)
        return alone, {}
    if setting.ratio is None and not setting.windowed:
        def full(params, tokens_BxN, arrays):
            return compressed_hidden(setting.cfg, setting.comp, None, params, tokens_BxN, arrays)
        return full, {}
    layout = cached_layout(length, setting.comp)
    shape = layout.shape
    arrays = layout_arrays(layout)
    if setting.windowed:  # UniGist's window control: the same path with every gist dead
        arrays = no_memory_window(arrays)

    def compressed(params, tokens_BxN, arrays):
        hidden = compressed_hidden(setting.cfg, setting.comp, shape, params, tokens_BxN, arrays)
        return raw_rows(hidden, arrays, length)
    return compressed, arrays


def fold_segments(tokens_BxN: jax.Array, segment_length: int) -> jax.Array:
    """``[B, N] -> [B * S, L]``: every segment its own row (the last padded at its end, where no
    live query sees the padding), so a plain causal pass runs each segment alone."""
    pad = -tokens_BxN.shape[1] % segment_length
    return jnp.pad(tokens_BxN, ((0, 0), (0, pad))).reshape(-1, segment_length)


def segments_alone_hidden(cfg: ModelConfig, comp_none: CompressionConfig, params: Params,
                          tokens_BxN: jax.Array, segment_length: int, sinks: int = 0) -> jax.Array:
    """Final-norm states ``[B, N, E]`` of the base model run on each segment alone, positions
    restarting at 0 in every segment: what a model with no memory of earlier segments sees.
    ``sinks``: each segment behind the window's first ``sinks`` tokens (at positions 0..s-1,
    the segment right after them), the memory a compressed setting keeps besides its gists.
    Segment 0 then sees its own first tokens twice; no target of it is scored."""
    b, n = tokens_BxN.shape
    tokens_BSxL = fold_segments(tokens_BxN, segment_length)
    if sinks:
        sinks_BSxS = jnp.repeat(tokens_BxN[:, :sinks], tokens_BSxL.shape[0] // b, axis=0)
        tokens_BSxL = jnp.concatenate([sinks_BSxS, tokens_BSxL], axis=1)
    hidden_BSxLxE = compressed_hidden(cfg, comp_none, None, params, tokens_BSxL, {})[:, sinks:]
    return hidden_BSxLxE.reshape(b, -1, hidden_BSxLxE.shape[-1])[:, :n]


def memory_efficacy(nll_local: float, nll_compressed: float, nll_full: float) -> float:
    """``(NLL_local - NLL_r) / (NLL_local - NLL_full)``, mean NLL per target of each setting on
    the same targets. NaN when full attention does not beat no memory (the gap is not positive):
    then there is no context benefit for a memory to carry, and the ratio has no meaning."""
    gap = nll_local - nll_full
    return (nll_local - nll_compressed) / gap if gap > 0 else float("nan")


def efficacy_metrics(mean_nll: dict[str, float]) -> dict[str, float]:
    """``{'eval/efficacy_r<k>': ...}`` from the mean NLL of each setting name (``full``,
    ``local``, ``r<k>``); empty without ``local``."""
    if "local" not in mean_nll or "full" not in mean_nll:
        return {}
    return {f"eval/efficacy_{name}": memory_efficacy(mean_nll["local"], nll, mean_nll["full"])
            for name, nll in mean_nll.items() if name not in ("full", "local")}


@functools.lru_cache(maxsize=64)
def token_nll_fn(setting: Setting, length: int) -> Callable:
    """Jitted ``(params, tokens [B, N]) -> (nll, correct)`` ``[B, N-1]``: the raw rows' hidden
    states, then the chunked head + CE (``gist_jax.model.loss``), never ``[B, N, V]`` logits."""
    run, arrays = _raw_hidden(setting, length)

    @jax.jit
    def scores(params, tokens_BxN, arrays):
        hidden_BxNxE = run(params, tokens_BxN, arrays)
        out = lm_token_scores(setting.cfg, params, *next_token_pairs(hidden_BxNxE, tokens_BxN))
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
        nll = lm_token_scores(setting.cfg, params, *next_token_pairs(hidden_BxNxE, tokens_BxN), mask_BxM).nll
        return jnp.sum(jnp.where(mask_BxM, nll, 0.0)), jnp.sum(mask_BxM)

    return lambda params, tokens_BxN, loss_mask_BxN: sums(params, tokens_BxN, loss_mask_BxN, arrays)


class PerplexityEvaluator:
    """In-training validation: ``eval/ppl_<setting>`` (full, local, each ratio) and
    ``eval/efficacy_r<k>`` over fixed batches, each setting compiled once (``nll_sums_fn``);
    call with the model params (``state.params['model']``)."""

    def __init__(self, base_cfg: ModelConfig, comp: CompressionConfig, seq_len: int,
                 batches: list[dict[str, jax.Array]]):
        self.settings = eval_settings(model_config_for(base_cfg, comp), comp, local=True)
        self.seq_len, self.batches = seq_len, batches
        self.first_position = first_scored_position(comp)  # the same targets for every setting

    def __call__(self, model_params: Params) -> dict[str, float]:
        out, mean_nll = {}, {}
        for setting in self.settings:
            fn = nll_sums_fn(setting, self.seq_len, self.first_position)
            params = setting_params(model_params, setting)
            sums = [fn(params, b["tokens"], b["loss_mask"]) for b in self.batches]
            nll = float(np.sum([jax.device_get(s[0]) for s in sums]))
            count = float(np.sum([jax.device_get(s[1]) for s in sums]))
            mean_nll[setting.name] = nll / max(count, 1.0)
            out[f"eval/ppl_{setting.name}"] = math.exp(mean_nll[setting.name])
            out["eval/tokens"] = count
        return {**out, **efficacy_metrics(mean_nll)}
