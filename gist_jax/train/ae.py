"""Fine-grained autoencoding objective (method.md section 4.1).

Every live gist must let a weak decoder (one transformer block with its own parameters,
initialised as a copy of base layer ``ae_layer``) rebuild the r raw tokens it covers:

    decoder input for gist i: [ g_i^kv ; [ae]_r ; x_1 .. x_(r-1) ]  predicting x_1 .. x_r
    L_ae = mean over live gists i of ( mean over j of -log P(x_j | g_i^kv, [ae]_r, x_<j) )

Decoder positions are local: the gist's key/value is a one-entry prefix memory at position 0,
``[ae]_r`` sits at 1 and x_j at j + 1. The raw inputs use the model's token embedding and the
outputs the model's final norm and LM head. By default (``objective.ae_train_shared=False``)
L_ae sends those three no gradient: the untrained decoder starts at ~32 nats/token on SmolLM2
(its residual stream is the input token's embedding, and with a tied head that predicts the
input token itself), and its gradient on the tied embedding is ~4x the LM's, so training them
through this loss rewrote the base model's vocabulary and raised full-attention perplexity by
9.5% in 20 demo steps (docs/ae.md). ``ae_train_shared=True`` is method.md as written.

Batching: all ``S * slots`` gist slots of all sequences form one batch of ``B * S * slots``
short sequences of static length R (the longest span a gist can have), padded and masked, so
shorter spans, dead slots and padding tokens past the real sequence contribute nothing and
nothing loops over gists. Per-gist facts (layout index, span start, ratio, ratio row) are
derived on device from the ordinary ``specs.layout_arrays``: the caller passes no extra
arrays. A segment's ratio is L / (live gists of the segment), and a gist in slot j of segment i
covers raw tokens ``i * L + j * r ..`` for both granularities (this is ``layout.span_start``).
Gists whose span lies wholly in padding (``pad_to_segments``) have no target and are left out
of the mean.

Cost: the decoder sees ``S * slots * R`` tokens per sequence, i.e. the raw length for one ratio
per batch, more with ``per_segment`` (R = max ratio, slots = L / min ratio).

lambda_ae = 0: the train step skips ``ae_loss`` and the ``kv_layer`` request altogether, so the
step is exactly the step without AE (tested in tests/test_train_step.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from gist_jax.errors import ConfigError
from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.context_parallel import splits
from gist_jax.gist.layout import GistLayout, LayoutShape
from gist_jax.gist.params import GIST_PARAM_NAMES
from gist_jax.gist.specs import LayoutArrays, pad_raw, segment_take
from gist_jax.model.attention import AttentionSpec, LayerMemory
from gist_jax.model.config import ModelConfig
from gist_jax.model.layers import RMSNorm, apply_rope, rope_inverse_frequencies
from gist_jax.model.loss import DEFAULT_CHUNK, TokenScores, dense_token_scores, lm_head, lm_token_scores
from gist_jax.model.sharding import CONTEXT_AXIS, constrain, context_size, override_rules
from gist_jax.model.transformer import Block, Params, param_logical_specs
from gist_jax.train.config import AE_DECODER_OUTPUTS, AE_INITS, AE_NORMALIZATIONS, ObjectiveConfig

if TYPE_CHECKING:
    from gist_jax.train.loss_terms import TermInputs


def decoder_config(cfg: ModelConfig) -> ModelConfig:
    """The AE decoder is a plain block: no gist projections (it never sees gist tokens)."""
    return cfg.replace(gist_projections=False)


# What the decoder shares with the model: the token embedding (its inputs), the final norm and
# the LM head (its outputs). ``lm_head`` is absent when the head is tied to the embedding.
SHARED_PARAM_NAMES = ("embed", "final_norm", "lm_head")


def init_ae_params(cfg: ModelConfig, comp: CompressionConfig, params: Params,
                   ae_layer: int = -1, eos_id: int | None = None, *, init: str = "copy",
                   seed: int = 0) -> dict:
    """``{'block': the decoder block, 'ae_embedding': [len(comp.ratios), E] rows = EOS
    embedding}``. ``init`` (``objective.ae_init``): ``copy`` = a copy of layer ``ae_layer``
    (method.md 4.1), ``copy_first`` = a copy of layer 0 (the block that reads token embeddings
    in the base model, which is what the decoder's inputs are), ``fresh`` = the model's random
    init of one block (``seed``). Gist projections are dropped from a copy."""
    if not comp.enabled:
        raise ConfigError("the autoencoding objective needs gists; compression.memory='none' has none")
    if init not in AE_INITS:
        raise ConfigError(f"objective.ae_init={init!r} must be one of {', '.join(AE_INITS)}")
    if init == "fresh":
        from gist_jax.model.transformer import init_params  # the model's own block initialiser

        one = decoder_config(cfg).replace(num_layers=1, scan_layers=False)
        block = init_params(one, jax.random.key(seed))["layers_0"]
    else:
        layer = 0 if init == "copy_first" else ae_layer % cfg.num_layers
        if "layers" in params:
            block = jax.tree.map(lambda x: jnp.array(x[layer]), params["layers"])
        else:
            block = jax.tree.map(jnp.array, params[f"layers_{layer}"])
    block = dict(block)
    block["attn"] = {k: v for k, v in block["attn"].items() if k not in GIST_PARAM_NAMES}
    eos_id = cfg.eos_token_id if eos_id is None else eos_id
    if eos_id is None:
        raise ConfigError("model.eos_token_id is unset; [ae]_r is initialised from the EOS "
                          "embedding, so set it (or pass eos_id)")
    row_E = params["embed"]["embedding"][eos_id]
    return {"block": block, "ae_embedding": jnp.tile(row_E[None], (len(comp.ratios), 1))}


def _gate_gradient(x: jax.Array, gate: jax.Array | float) -> jax.Array:
    """``x`` in value; its gradient scaled by ``gate`` (0 stops it, 1 passes it)."""
    frozen = jax.lax.stop_gradient(x)
    return frozen + jnp.asarray(gate, x.dtype) * (x - frozen)


def max_span(comp: CompressionConfig, shape: LayoutShape) -> int:
    """R: the longest span one gist can cover (static decoder length)."""
    if comp.ratio_sampling == "per_segment":
        return max(comp.ratios)
    return shape.segment_length // shape.slots


def _final_norm(cfg: ModelConfig, params: Params, hidden_XxE: jax.Array) -> jax.Array:
    """The model's own final norm; its LM head is applied by ``gist_jax.model.loss``."""
    norm = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.storage_dtype)
    return cast(jax.Array, norm.apply({"params": params["final_norm"]}, hidden_XxE))


def _memory(cfg: ModelConfig, k_XxKxH: jax.Array, v_XxKxH: jax.Array) -> LayerMemory:
    """One-entry prefix memory; the key is rotated at local position 0 (a no-op, kept explicit)."""
    inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    k_Xx1xKxH = apply_rope(k_XxKxH[:, None], jnp.zeros((k_XxKxH.shape[0], 1), jnp.int32), inv_freq)
    return LayerMemory(k_Xx1xKxH, v_XxKxH[:, None])


def _context_split(shape: LayoutShape) -> Callable[[jax.Array], jax.Array] | None:
    """With the layout split over the ``context`` mesh axis: ``[B, G, ...] -> [B, S, slots, ...]``
    with the segment axis on it (gists are in segment order, ``slots`` per segment); else None."""
    context = context_size()
    if context == 1 or not splits(shape, context):
        return None

    def split(x_BxGx: jax.Array) -> jax.Array:
        x = x_BxGx.reshape((x_BxGx.shape[0], shape.num_segments, shape.slots) + x_BxGx.shape[2:])
        return constrain(x, ("activation_batch", "activation_length") + (None,) * (x.ndim - 2))

    return split


def gist_table(comp: CompressionConfig, shape: LayoutShape, arrays: LayoutArrays) -> dict:
    """Per gist slot (G = S * slots, layout order), derived on device from layout arrays:
    ``token`` layout index, ``live``, ``ratio``, ``ratio_row`` (row of comp.ratios; 0 if the
    ratio is not in the set), ``start`` first raw index of the span."""
    g = shape.num_segments * shape.slots
    (token_G,) = jnp.nonzero(arrays["is_gist"], size=g, fill_value=0)
    seg_G, slot_G = arrays["segment"][token_G], arrays["gist_slot"][token_G]
    live_G = arrays["alive"][token_G]
    live_per_segment_S = jax.ops.segment_sum(live_G.astype(jnp.int32), seg_G, shape.num_segments)
    ratio_G = shape.segment_length // jnp.maximum(live_per_segment_S[seg_G], 1)
    ratio_row_G = jnp.argmax(ratio_G[:, None] == jnp.asarray(comp.ratios)[None, :], axis=1)
    start_G = seg_G * shape.segment_length + slot_G * ratio_G
    return {"token": token_G, "live": live_G, "ratio": ratio_G, "ratio_row": ratio_row_G,
            "start": start_G}


class _Spans(NamedTuple):
    """What the decoder reconstructs: each gist's span of raw tokens, ``[B, G, R]`` (R = the
    longest span; shorter spans and dead gists are masked)."""

    gists: dict  # ``gist_table``
    target_BxGxR: jax.Array  # the span's token ids
    in_span_BxGxR: jax.Array  # row r < the gist's ratio, gist live, inside the padded sequence
    live_BxG: jax.Array
    valid_BxGxR: jax.Array  # in_span and a real raw token (not padding past the sequence): a target


def _spans(comp: CompressionConfig, shape: LayoutShape, arrays: LayoutArrays, tokens_BxN: jax.Array) -> _Spans:
    b, p, r_max = tokens_BxN.shape[0], shape.padded_raw, max_span(comp, shape)
    gists = gist_table(comp, shape, arrays)
    g = gists["token"].shape[0]
    # Real raw tokens (not padding past the sequence), from the layout's alive raw tokens.
    is_raw_T = ~arrays["is_gist"]
    real_P = jnp.zeros(p, bool).at[jnp.where(is_raw_T, arrays["raw_index"], p)].set(
        arrays["alive"], mode="drop")
    j_R = jnp.arange(r_max)
    raw_GxR = gists["start"][:, None] + j_R[None, :]
    in_span_GxR = (j_R[None, :] < gists["ratio"][:, None]) & gists["live"][:, None] & (raw_GxR < p)
    raw_GxR = jnp.clip(raw_GxR, 0, p - 1)
    target_valid_GxR = in_span_GxR & real_P[raw_GxR]
    return _Spans(gists, pad_raw(tokens_BxN, shape)[:, raw_GxR], jnp.broadcast_to(in_span_GxR, (b, g, r_max)),
                  jnp.broadcast_to(gists["live"], (b, g)), jnp.broadcast_to(target_valid_GxR, (b, g, r_max)))


def _decode(cfg: ModelConfig, params: Params, ae_params: dict, decoder_output: str,
            target_BxJxR: jax.Array, ratio_row_J: jax.Array, k_BxJxKxH: jax.Array, v_BxJxKxH: jax.Array,
            in_span_BxJxR: jax.Array, live_BxJ: jax.Array) -> jax.Array:
    """The decoder over B x J gists' spans, one short sequence each: [B, J, R, E] out."""
    dec, dtype = decoder_config(cfg), cfg.compute_dtype
    b, r_max = target_BxJxR.shape[0], target_BxJxR.shape[-1]
    bj = b * live_BxJ.shape[1]
    # Inputs: [ae]_r at row 0, then x_1 .. x_(R-1) (the targets shifted right by one).
    x_BxJxRxE = params["embed"]["embedding"][target_BxJxR[..., :-1]].astype(dtype)
    ae_JxE = ae_params["ae_embedding"][ratio_row_J].astype(dtype)
    ae_BxJx1xE = jnp.broadcast_to(ae_JxE[None, :, None], x_BxJxRxE.shape[:2] + (1, ae_JxE.shape[-1]))
    x_BxJxRxE = jnp.concatenate([ae_BxJx1xE, x_BxJxRxE], axis=2)
    x_XxRxE = x_BxJxRxE.reshape(bj, r_max, -1)
    spec = AttentionSpec(positions=jnp.broadcast_to(jnp.arange(r_max) + 1, (bj, r_max)).astype(jnp.int32),
                         valid=in_span_BxJxR.reshape(bj, r_max), prefix_valid=live_BxJ.reshape(bj, 1),
                         is_gist=jnp.zeros((bj, r_max), bool))
    memory = _memory(dec, k_BxJxKxH.reshape((bj,) + k_BxJxKxH.shape[2:]),
                     v_BxJxKxH.reshape((bj,) + v_BxJxKxH.shape[2:]))
    hidden_XxRxE, _ = Block(dec).apply({"params": ae_params["block"]}, x_XxRxE, spec, memory)
    if decoder_output == "update":
        hidden_XxRxE = hidden_XxRxE - x_XxRxE
    return _final_norm(cfg, params, hidden_XxRxE).reshape(x_BxJxRxE.shape)


def _decode_spans(decode: Callable[..., jax.Array], spans: _Spans, shape: LayoutShape,
                  gist_k_BxTxKxH: jax.Array, gist_v_BxTxKxH: jax.Array) -> jax.Array:
    """Every gist's span decoded, ``[B, G * R, E]``."""
    gists, (b, g, r_max) = spans.gists, spans.target_BxGxR.shape
    split = _context_split(shape)
    if not split:
        hidden_BxGxRxE = decode(spans.target_BxGxR, gists["ratio_row"], gist_k_BxTxKxH[:, gists["token"]],
                                gist_v_BxTxKxH[:, gists["token"]], spans.in_span_BxGxR, spans.live_BxG)
        return hidden_BxGxRxE.reshape(b, g * r_max, -1)
    # Context parallelism: the decoder runs per segment, vmapped with the segment axis on the
    # context mesh axis, so every block builds and decodes its own gists' spans from its own
    # K/V rows (gathered per segment; token ids are replicated) and nothing activation-sized
    # crosses devices.
    s, slots = shape.num_segments, shape.slots
    in_segment_SxJ = (gists["token"].reshape(s, slots)
                      - (jnp.arange(s, dtype=jnp.int32) * shape.segment_tokens)[:, None])
    k_BxSxJxKxH = segment_take(gist_k_BxTxKxH, in_segment_SxJ, shape)
    v_BxSxJxKxH = segment_take(gist_v_BxTxKxH, in_segment_SxJ, shape)
    with override_rules(activation_length=None):
        hidden_BxSxJxRxE = jax.vmap(decode, in_axes=(1, 0, 1, 1, 1, 1), out_axes=1, spmd_axis_name=CONTEXT_AXIS)(
            split(spans.target_BxGxR), gists["ratio_row"].reshape(s, slots), k_BxSxJxKxH, v_BxSxJxKxH,
            split(spans.in_span_BxGxR), split(spans.live_BxG))
    return hidden_BxSxJxRxE.reshape(b, g * r_max, -1)


def _reduce(scores: TokenScores, valid_BxGxR: jax.Array, normalization: str) -> tuple[jax.Array, dict]:
    """(L_ae, metrics) from the per-token scores: a mean per gist then over gists (``gist``),
    or over all span tokens (``token``)."""
    b, g, r_max = valid_BxGxR.shape
    nll_BxGxR = scores.nll.reshape(b, g, r_max)
    weight_BxGxR = valid_BxGxR.astype(jnp.float32)
    count_BxG = weight_BxGxR.sum(-1)
    per_gist_BxG = (nll_BxGxR * weight_BxGxR).sum(-1) / jnp.maximum(count_BxG, 1.0)
    has_target_BxG = (count_BxG > 0).astype(jnp.float32)
    if normalization == "token":
        loss = (nll_BxGxR * weight_BxGxR).sum() / jnp.maximum(weight_BxGxR.sum(), 1.0)
    else:
        loss = (per_gist_BxG * has_target_BxG).sum() / jnp.maximum(has_target_BxG.sum(), 1.0)
    correct = scores.correct.reshape(b, g, r_max).astype(jnp.float32)
    tokens = weight_BxGxR.sum()
    metrics = {"ae_loss": loss, "ae_accuracy": (correct * weight_BxGxR).sum() / jnp.maximum(tokens, 1.0),
               "ae_tokens": tokens}
    return loss, metrics


def ae_loss(cfg: ModelConfig, comp: CompressionConfig, shape: LayoutShape, params: Params,
            ae_params: dict, tokens_BxN: jax.Array, arrays: LayoutArrays,
            gist_k_BxTxKxH: jax.Array, gist_v_BxTxKxH: jax.Array, *,
            chunk: int = DEFAULT_CHUNK, train_shared: bool = True,
            normalization: str = "gist", decoder_output: str = "residual",
            base_gate: jax.Array | float = 1.0) -> tuple[jax.Array, dict]:
    """Batched L_ae. ``arrays`` = ``specs.layout_arrays(layout)`` (nothing extra);
    ``gist_*`` = layer ``ae_layer`` un-rotated (k, v) of every layout token, as returned by
    ``compressed_logits(..., kv_layer=ae_layer)``; ``chunk``: decoder tokens per LM-head
    chunk. Returns (scalar loss, metrics).

    ``train_shared`` (``objective.ae_train_shared``): whether L_ae's gradient reaches the
    model's token embedding, final norm and LM head. False stops it there (they are still
    *used*), so the AE trains the gists, the layers that write the gist KV and its own decoder,
    never the base model's input/output vocabulary; with a tied head (SmolLM2) the
    untrained decoder's huge early loss otherwise rewrites the token embeddings.
    ``normalization`` (``objective.ae_normalization``): ``gist`` = mean over gists of the
    per-token mean (method.md), ``token`` = mean over all span tokens (long spans weigh more;
    equal to ``gist`` when every gist covers the same number of tokens, e.g. per_instance).
    ``decoder_output`` (``objective.ae_decoder_output``): ``residual`` normalises the block's
    output stream (method.md); ``update`` subtracts the decoder's input embedding first, so the
    tied head does not see the input token x_(j-1). ``base_gate``: a 0/1 scalar multiplying
    the gradient that flows into the gist key/value (0 during ``objective.ae_base_warmup_steps``:
    the decoder trains alone); the loss's value does not depend on it."""
    if normalization not in AE_NORMALIZATIONS:
        raise ConfigError(f"objective.ae_normalization={normalization!r} must be one of "
                          f"{', '.join(AE_NORMALIZATIONS)}")
    if decoder_output not in AE_DECODER_OUTPUTS:
        raise ConfigError(f"objective.ae_decoder_output={decoder_output!r} must be one of "
                          f"{', '.join(AE_DECODER_OUTPUTS)}")
    gist_k_BxTxKxH, gist_v_BxTxKxH = (_gate_gradient(x, base_gate) for x in (gist_k_BxTxKxH, gist_v_BxTxKxH))
    if not train_shared:
        params = {k: (jax.lax.stop_gradient(v) if k in SHARED_PARAM_NAMES else v) for k, v in params.items()}
    spans = _spans(comp, shape, arrays, tokens_BxN)
    decode = functools.partial(_decode, cfg, params, ae_params, decoder_output)
    hidden_BxGRxE = _decode_spans(decode, spans, shape, gist_k_BxTxKxH, gist_v_BxTxKxH)
    # G * R rows per sequence (about the raw length): the head + CE run chunk-wise over them,
    # so the decoder's [B, G, R, V] logits are never built either.
    b, g, r_max = spans.target_BxGxR.shape
    scores = lm_token_scores(cfg, params, hidden_BxGRxE, spans.target_BxGxR.reshape(b, g * r_max),
                             spans.valid_BxGxR.reshape(b, g * r_max), chunk=chunk)
    return _reduce(scores, spans.valid_BxGxR, normalization)


def ae_loss_reference(cfg: ModelConfig, comp: CompressionConfig, layout: GistLayout,
                      params: Params, ae_params: dict, tokens_BxN: jax.Array,
                      gist_k_BxTxKxH: jax.Array, gist_v_BxTxKxH: jax.Array,
                      decoder_output: str = "residual") -> jax.Array:
    """Slow reference (tests): a Python loop over sequences and live gists, each span built
    from the host layout (``span_start``, ``ratios``) and decoded alone at its exact length."""
    tokens = np.asarray(tokens_BxN)
    losses = []
    for bi in range(tokens.shape[0]):
        for t in np.flatnonzero(layout.is_gist & layout.alive):
            r = layout.ratios[layout.segment[t]]
            start = int(layout.span_start[t])
            targets = tokens[bi, start:min(start + r, layout.num_raw)]
            if targets.size:
                ae_E = ae_params["ae_embedding"][comp.ratios.index(r)]
                losses.append(_span_loss(cfg, params, ae_params["block"], ae_E,
                                         gist_k_BxTxKxH[bi, t], gist_v_BxTxKxH[bi, t], targets,
                                         decoder_output))
    return jnp.mean(jnp.stack(losses))


@functools.partial(jax.jit, static_argnums=(0, 7))
def _span_loss(cfg: ModelConfig, params: Params, block: Params, ae_E: jax.Array,
               k_KxH: jax.Array, v_KxH: jax.Array, targets_n: jax.Array,
               decoder_output: str = "residual") -> jax.Array:
    """One gist's span decoded alone at its exact length n (jitted: one compile per length)."""
    dec, n = decoder_config(cfg), targets_n.shape[0]
    x_1xnxE = jnp.concatenate([ae_E[None], params["embed"]["embedding"][targets_n[:-1]]])
    spec = AttentionSpec(positions=jnp.arange(1, n + 1, dtype=jnp.int32)[None],
                         prefix_valid=jnp.ones((1, 1), bool))
    x_1xnxE = x_1xnxE[None].astype(cfg.compute_dtype)
    hidden, _ = Block(dec).apply({"params": block}, x_1xnxE, spec, _memory(dec, k_KxH[None], v_KxH[None]))
    if decoder_output == "update":
        hidden = hidden - x_1xnxE
    h_1xnxE = _final_norm(cfg, params, hidden)
    scores = dense_token_scores(h_1xnxE, lm_head(cfg, params), targets_n[None],
                                compute_dtype=cfg.compute_dtype)
    return jnp.mean(scores.nll)


def ae_base_gate(warmup_steps: int, step: jax.Array | None) -> jax.Array | float:
    """1.0 once L_ae may train the gists and base (step >= ``objective.ae_base_warmup_steps``),
    0.0 before; ``step`` None (the memory planner's trace) counts as past the warm-up."""
    if warmup_steps == 0 or step is None:
        return 1.0
    return (step >= warmup_steps).astype(jnp.float32)


class AETerm:
    """The fine-grained autoencoding objective as a loss term (``train/objectives.py``):
    ``ae_lambda`` x L_ae per microbatch, its decoder under ``params['ae']``."""

    name: str = "ae"
    batch_fields: tuple[str, ...] = ()
    mean_metrics: tuple[str, ...] = ("ae_loss", "ae_accuracy")

    def __init__(self, objective: ObjectiveConfig) -> None:
        self.objective = objective
        self.kv_layer: int | None = objective.ae_layer

    def init_params(self, cfg: ModelConfig, comp: CompressionConfig, model_params: Params, seed: int) -> dict:
        obj = self.objective
        return init_ae_params(cfg, comp, model_params, obj.ae_layer, init=obj.ae_init, seed=seed)

    def param_specs(self, cfg: ModelConfig) -> Any:
        layer = param_logical_specs(cfg.replace(scan_layers=False, gist_projections=False))["layers_0"]
        return {"block": layer, "ae_embedding": PartitionSpec(None, "embed")}

    def __call__(self, inputs: TermInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        obj = self.objective
        assert inputs.layer_kv is not None, "the AE term reads layer ae_layer's K/V (kv_layer)"
        ae, metrics = ae_loss(inputs.cfg, inputs.comp, inputs.shape, inputs.params["model"], inputs.params["ae"],
                              inputs.tokens_BxN, inputs.arrays, *inputs.layer_kv, chunk=obj.loss_chunk,
                              train_shared=obj.ae_train_shared, normalization=obj.ae_normalization,
                              decoder_output=obj.ae_decoder_output,
                              base_gate=ae_base_gate(obj.ae_base_warmup_steps, inputs.step))
        return obj.ae_lambda * ae / inputs.microbatches, {"ae_loss": ae, "ae_accuracy": metrics["ae_accuracy"]}
