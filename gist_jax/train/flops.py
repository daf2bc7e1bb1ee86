"""Model FLOPs of a gist-compressed training step, counted with causal and mask sparsity, and MFU.

Gist compression saves compute only through the attention pairs it removes, so a "6 x params
x tokens" figure says nothing about it, and a dense-kernel count would make compression look
*more* expensive than full attention. This module counts what the model needs, not what a
particular kernel happens to execute:

    forward(sequence) = dense + attention
    dense     = 2 * ( num_layers * P_layer * tokens_processed  +  E * V * logit_tokens )
    P_layer   = E*H*(N_q + 2*N_kv) + N_q*H*E + 3*E*F          (q, k, v, o projections; SwiGLU)
    attention = 4 * H * N_q * visible_pairs * num_layers       (QK^T and PV, 2 FLOPs per MAC)
    train(sequence) = 3 * forward                              (backward = 2 x forward)
                      gist_only: attention 3x, dense 2x + the gist projections' weight
                      gradients on gist tokens (frozen weights get no weight-gradient matmul)
                    + TIE: forward of the frozen reference, causal + segment-local (no backward)
                    + AE: 3 * forward of the one-block weak decoder
    per step  = train(sequence) * global batch;  MFU = per step / (seconds * devices * peak)

with E hidden size, F MLP size, V vocabulary, H head dim, N_q / N_kv query / KV heads.

Counted: every matmul with a weight (biases, norms, RoPE, softmax, SwiGLU gating, residuals and
the loss are elementwise and ignored; embedding lookups are free). ``tokens_processed`` is raw
tokens plus live gist tokens (dead per-segment slots and padding are not counted); Coarse-Rec
also re-encodes its memory (sinks and earlier gists) in front of every segment, which counts.
Logits are counted for raw tokens only (gists predict nothing), although the reference
implementation applies the head to every layout token. ``visible_pairs`` counts the (query,
key) pairs the attention mask allows, with live queries only (see
``visible_attention_pairs``): causal masking halves full attention, gist masks remove much
more. Separate gist projections replace the base ones at gist tokens, so they cost nothing
extra (the dense reference computes both and selects). Remat recomputation is not counted
(this is MFU, not hardware FLOPs utilisation).

Throughput unit: raw tokens per second. Gist tokens are work the model does, hence in the
FLOPs, but they are not text the run consumed; report tokens/s over raw tokens.

``model_flops_6n`` is the usual non-sparsity-aware figure (6 x parameter count x raw tokens,
attention ignored, embedding table included), reported only for comparison.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from gist_jax.gist.config import CompressionConfig, PairCounts, variant_of
from gist_jax.gist.layout import GistLayout, cached_layout
from gist_jax.model import causal as causal_kernel
from gist_jax.model.causal import causal_pairs
from gist_jax.model.config import ModelConfig
from gist_jax.train.objectives import objectives

PEAK_FLOPS_ENV = "GIST_JAX_PEAK_FLOPS"

# Dense (no structured sparsity) bf16 peak FLOP/s per jax device, keyed by a case-insensitive
# substring of ``jax.Device.device_kind``; the first matching key wins, so more specific keys
# come first. TPU v4 and later expose one device per chip (megacore); v5p reports "TPU v5".
PEAK_FLOPS_PER_DEVICE: dict[str, float] = {
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v4": 275e12,
    "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,  # "NVIDIA H100 80GB HBM3": SXM
    "H200": 989e12,  # also matches "NVIDIA GH200 480GB"
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12, "L4": 121e12,
}


def layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights one token multiplies in one layer: q, k, v, o projections and the SwiGLU MLP."""
    e, h = cfg.hidden_size, cfg.head_dim
    return e * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * e * cfg.intermediate_size


def _layout(num_raw: int, comp: CompressionConfig, ratios: tuple[int, ...] | None) -> GistLayout:
    """The layout the training step builds (per-segment sampling pads to L / min(ratios) slots)."""
    slots = comp.max_gists_per_segment if comp.ratio_sampling == "per_segment" else None
    return cached_layout(num_raw, comp, None if ratios is None else tuple(ratios), slots)


def _sequence_counts(num_raw: int, comp: CompressionConfig,
                     ratios: tuple[int, ...] | None) -> PairCounts:
    """Tokens and visible pairs from the layout arrays the model's masks are built from: the
    variant counts its own mask (``variants.Variant.visible_pairs``)."""
    return variant_of(comp).visible_pairs(_layout(num_raw, comp, ratios), num_raw)


def visible_attention_pairs(num_raw: int, comp: CompressionConfig,
                            ratios: tuple[int, ...] | None = None) -> int:
    """(query, key) pairs the attention mask allows for one sequence of ``num_raw`` raw tokens,
    per layer and head, over live queries (dead gist slots and padding compute nothing useful).

    ``memory='none'``: N (N + 1) / 2. KV variants and Coarse-Rec: counted exactly per segment
    from the layout (``ratios``: one per segment, as ``build_layout`` takes them); O(tokens)
    numpy, no T x T matrix.
    """
    return _sequence_counts(num_raw, comp, ratios).pairs


def _forward(cfg: ModelConfig, counts: PairCounts, num_layers: int) -> dict[str, float]:
    dense = 2.0 * (num_layers * layer_matmul_params(cfg) * counts.tokens
                   + cfg.hidden_size * cfg.vocab_size * counts.logit_tokens)
    attention = 4.0 * cfg.head_dim * cfg.num_heads * counts.pairs * num_layers
    return {"dense": dense, "attention": attention, "total": dense + attention}


def forward_flops_per_sequence(model_cfg: ModelConfig, comp: CompressionConfig, num_raw: int,
                               ratios: tuple[int, ...] | None = None) -> dict[str, float]:
    """``{'dense', 'attention', 'total'}`` FLOPs of one compressed forward pass (module doc)."""
    return _forward(model_cfg, _sequence_counts(num_raw, comp, ratios), model_cfg.num_layers)


def tie_reference_flops(model_cfg: ModelConfig, comp: CompressionConfig, num_raw: int) -> float:
    """Online TIE: two forward passes of the frozen base model over the raw sequence, causal
    and segment-local causal (``train/tie.py``), each with logits on every raw token."""
    L = comp.segment_length
    whole, rest = divmod(num_raw, L)
    segment_local = whole * causal_pairs(L) + causal_pairs(rest)
    total = 0.0
    for pairs in (causal_pairs(num_raw), segment_local):
        total += _forward(model_cfg, PairCounts(num_raw, num_raw, pairs), model_cfg.num_layers)["total"]
    return total


def ae_decoder_forward_flops(model_cfg: ModelConfig, comp: CompressionConfig, num_raw: int,
                             ratios: tuple[int, ...] | None = None) -> dict[str, float]:
    """Forward of the AE weak decoder (``train/ae.py``): one block plus the LM head over each
    live gist's span of n real raw tokens, inputs ``[ae]_r x_1 .. x_(n-1)``; query j sees the
    gist's key/value and inputs 0..j, so a span has n + n (n + 1) / 2 pairs."""
    layout = _layout(num_raw, comp, ratios)
    live_gist = layout.is_gist & layout.alive
    ratio_G = np.asarray(layout.ratios)[layout.segment[live_gist]]
    span_G = np.clip(np.minimum(ratio_G, num_raw - layout.span_start[live_gist]), 0, None).astype(np.int64)
    tokens = int(span_G.sum())
    counts = PairCounts(tokens, tokens, tokens + int((span_G * (span_G + 1) // 2).sum()))
    return _forward(model_cfg, counts, num_layers=1)


def train_flops_per_sequence(model_cfg: ModelConfig, comp: CompressionConfig, num_raw: int,
                             ratios: tuple[int, ...] | None = None, *, tie: bool = False,
                             ae: bool = False) -> dict[str, float]:
    """``{'dense', 'attention', 'tie', 'ae', 'total'}`` for one sequence of one update.

    dense / attention: 3 x forward of the trained model (forward, activation gradients,
    weight gradients). ``comp.trainable='gist_only'``: the base weights are stop-gradient in
    the step (``train/step.py``), so XLA drops their weight-gradient matmuls; activation
    gradients still flow through every layer to the gist embedding, and attention's backward
    (dQ, dK, dV) is all activation gradient. So dense is 2 x forward plus the gist q/k/v
    projections' weight gradients over the live gist tokens (with ``gist_projections``).
    ``tie``: online TIE only (precomputed weights cost nothing in the step); ``ae``: the
    decoder runs (lambda > 0; it always trains). Like the step, both count only with
    compression on; ``objectives.objectives`` decides both for a ``StepConfig``.
    """
    forward = forward_flops_per_sequence(model_cfg, comp, num_raw, ratios)
    dense = 3.0 * forward["dense"]
    if comp.enabled and comp.trainable == "gist_only":
        dense = 2.0 * forward["dense"]
        if model_cfg.gist_projections or comp.gist_projections:
            layout = _layout(num_raw, comp, ratios)
            gists = int((layout.is_gist & layout.alive).sum())
            e, h = model_cfg.hidden_size, model_cfg.head_dim
            dense += 2.0 * e * h * (model_cfg.num_heads + 2 * model_cfg.num_kv_heads) * gists * model_cfg.num_layers
    tie_flops = tie_reference_flops(model_cfg, comp, num_raw) if tie and comp.enabled else 0.0
    ae_flops = 3.0 * ae_decoder_forward_flops(model_cfg, comp, num_raw, ratios)["total"] \
        if ae and comp.enabled else 0.0
    out = {"dense": dense, "attention": 3.0 * forward["attention"],
           "tie": tie_flops, "ae": ae_flops}
    out["total"] = sum(out.values())
    return out


def train_flops_per_step(model_cfg: ModelConfig, comp: CompressionConfig, num_raw: int,
                         batch_size: int, ratios: tuple[int, ...] | None = None, *,
                         tie: bool = False, ae: bool = False) -> dict[str, float]:
    """``train_flops_per_sequence`` times the global batch (every sequence of a step shares the
    layout, so pass that step's sampled ``ratios``)."""
    per_sequence = train_flops_per_sequence(model_cfg, comp, num_raw, ratios, tie=tie, ae=ae)
    return {k: v * batch_size for k, v in per_sequence.items()}


# -- attention pairs each implementation computes ---------------------------------------------------

def attention_pairs(model_cfg: ModelConfig, comp: CompressionConfig, num_raw: int,
                    ratios: tuple[int, ...] | None = None, *, backend: str | None = None,
                    tie: bool = False) -> dict[str, Any]:
    """Attention pairs per layer, head and sequence: what the implementation this config runs
    on ``backend`` computes (``computed``) against the pairs the mask allows (``exact`` =
    ``visible_attention_pairs``), for the model pass and, with ``tie``, TIE's two reference
    passes (``tie_computed``/``tie_exact``). With T layout tokens, S segments of Ts = L + slots
    tokens:

      KV dense      2 T^2: one [T, T] block per key set, keys at positions and at memory positions
      KV kernels    each gist kernel counts what it computes (``computed_pairs`` of the class
                    ``forward.GIST_KERNELS`` maps the resolved name to: ``DecomposedKV``, ``PrefixCausalKV`` (flash),
                    ``SplitKV``, ``GistBankKV``, UniGist's ``WindowedKV``), from the same geometry
                    it runs (``segment_plan``, ``window_plan``, the bank's mask)
      full / TIE    the plain causal kernel (``model.attention``'s causal part, ``causal.computed_pairs``)
                    over N raw tokens; TIE's segment-local pass over ceil(N / L) rows of L
      Coarse-Rec    S passes of the causal kernel (padding: blockwise) over s + S * slots + Ts

    Each count is the variant's (``variants.Variant.computed_pairs``). ``impl``/``causal_impl``
    name what ran (``forward.resolve_gist_kernel``, ``causal.resolve_impl``; ``backend`` None:
    this process's).
    """
    import jax

    resolve_impl = causal_kernel.resolve_impl

    backend = backend or jax.default_backend()
    causal = resolve_impl(model_cfg.kernels.causal, backend, model_cfg.dtype, model_cfg.head_dim)
    out: dict[str, Any] = {"causal_impl": causal,
                           "exact": visible_attention_pairs(num_raw, comp, ratios)}
    impl, computed = variant_of(comp).computed_pairs(model_cfg, comp, _layout(num_raw, comp, ratios), backend)
    out.update(impl=impl, computed=int(computed))
    if comp.enabled and tie:
        L = min(comp.segment_length, num_raw)
        rows = -(-num_raw // L)
        whole, rest = divmod(num_raw, L)
        out["tie_computed"] = (causal_kernel.computed_pairs(causal, num_raw)
                               + rows * causal_kernel.computed_pairs(causal, L))
        out["tie_exact"] = causal_pairs(num_raw) + whole * causal_pairs(L) + causal_pairs(rest)
    out["computed_over_exact"] = out["computed"] / out["exact"]
    return out


def model_flops_6n(model_cfg: ModelConfig, tokens: int) -> float:
    """6 x ``num_params()`` x tokens: the common, non-sparsity-aware training figure (ignores
    attention and gists, counts the embedding table); for comparison only."""
    return 6.0 * model_cfg.num_params() * tokens


def peak_flops(device: Any = None, override: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device, or None (CPU, unknown kind): print MFU as n/a.

    ``device``: a ``jax.Device`` or a ``device_kind`` string (default: ``jax.devices()[0]``).
    Precedence: ``override``, then the ``GIST_JAX_PEAK_FLOPS`` environment variable, then
    ``PEAK_FLOPS_PER_DEVICE``.
    """
    if override is not None:
        return float(override)
    if os.environ.get(PEAK_FLOPS_ENV):
        try:
            return float(os.environ[PEAK_FLOPS_ENV])
        except ValueError as e:
            raise ValueError(f"{PEAK_FLOPS_ENV}={os.environ[PEAK_FLOPS_ENV]!r} is not a number of "
                             "FLOP/s (e.g. 989e12); fix or unset it") from e
    if device is None:
        import jax

        device = jax.devices()[0]
    if not isinstance(device, str) and getattr(device, "platform", None) == "cpu":
        return None
    kind = (device if isinstance(device, str) else device.device_kind).lower()
    return next((peak for key, peak in PEAK_FLOPS_PER_DEVICE.items() if key.lower() in kind), None)


def mfu(flops_per_step: float, step_seconds: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None when the peak is unknown."""
    if peak_per_device is None:
        return None
    if step_seconds <= 0 or num_devices <= 0 or peak_per_device <= 0:
        raise ValueError(f"mfu needs positive step_seconds ({step_seconds}), num_devices "
                         f"({num_devices}) and peak_per_device ({peak_per_device})")
    return flops_per_step / (step_seconds * num_devices * peak_per_device)


def main(argv: list[str] | None = None) -> None:
    """Compare a run config's compression with full attention: pairs, FLOPs per raw token, 6N.

    python -m gist_jax.train.flops --config experiments/llama3_8b_paper.py --config.model.init=preset:llama3_8b

    One row per ratio the recipe can draw (its sequence length, segments, sinks, AE and TIE as
    the file says), then full attention. Only the model's shape is read from ``model.init``.
    """
    from gist_jax import cli_config

    p = argparse.ArgumentParser(prog="python -m gist_jax.train.flops", description=main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli_config.add_config_flag(p, what="the run to count")
    args, overrides = cli_config.parse_tool_args(p, argv)
    try:
        run = cli_config.load_run(args.config, overrides)
        cfg = cli_config.model_shape(run.model)
    except cli_config.CliConfigError as e:
        cli_config.exit_config_error(e)
    comp, n = run.compression, run.step.seq_len
    terms = objectives(run.step, comp)
    tie, ae = terms.tie_online, terms.ae
    full = comp.full_attention()
    print(f"{run.name} ({run.model.init}): raw tokens {n}; 6N: {model_flops_6n(cfg, n) / n / 1e9:.2f} GFLOP/token")
    cases = [(f"{comp.memory}/{comp.granularity} L={comp.segment_length} r={r}",
              comp.replace(ratios=(int(r),), ratio_sampling="fixed")) for r in (comp.ratios if comp.enabled else ())]
    rows = []
    for name, c in (*cases, ("full attention", full)):
        fwd = forward_flops_per_sequence(cfg, c, n)
        train = train_flops_per_sequence(cfg, c, n, tie=tie and c.enabled, ae=ae and c.enabled)
        rows.append((name, train["total"]))
        print(f"{name:>28}: pairs {visible_attention_pairs(n, c):,}  forward GFLOP/token dense "
              f"{fwd['dense'] / n / 1e9:.3f} attention {fwd['attention'] / n / 1e9:.3f} total "
              f"{fwd['total'] / n / 1e9:.3f}  train GFLOP/token {train['total'] / n / 1e9:.3f}")
    for name, total in rows[:-1]:
        print(f"train FLOPs, compressed ({name}) / full attention: {total / rows[-1][1]:.3f}")


if __name__ == "__main__":
    main()
