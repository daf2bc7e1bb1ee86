"""Sparsity-aware FLOP counting (gist_jax/train/flops.py): visible pairs against the masks the model
really builds, the FLOP formula by hand, peak table and MFU arithmetic."""

from __future__ import annotations

import functools
import pathlib

import jax
import numpy as np
import pytest

import gist_jax.model.attention as attention_module
from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.forward import compressed_logits
from gist_jax.gist.layout import build_layout
from gist_jax.gist.params import add_gist_params, model_config_for
from gist_jax.gist.specs import layout_arrays
from gist_jax.model import causal
from gist_jax.model.config import ModelConfig, preset
from gist_jax.model.transformer import init_params
from gist_jax.train import flops
from gist_jax.train.config import ObjectiveConfig, StepConfig
from gist_jax.train.objectives import objectives

# Unrolled: flax nn.scan keeps a second traced copy of the body, which would record twice.
ONE_LAYER = preset("tiny", eos_token_id=3, num_layers=1, scan_layers=False)


@functools.lru_cache(maxsize=1)
def _base_params():
    return jax.jit(init_params, static_argnums=0)(ONE_LAYER, jax.random.key(0))


def _comp(memory: str, granularity: str, sinks: int, positions: str = "compressed",
          ratios: tuple[int, ...] = (4,), **kw) -> CompressionConfig:
    sampling = "fixed" if len(ratios) == 1 else "per_segment"
    return CompressionConfig(memory=memory, granularity=granularity, segment_length=8,
                             ratios=ratios, ratio_sampling=sampling, num_sinks=sinks,
                             positions=positions, **kw)


def _cfg(comp: CompressionConfig, attention: str) -> ModelConfig:
    """The one-layer model for ``comp`` with ``model.attention=attention`` (what runs and what
    ``flops.attention_pairs`` is asked about must name the same kernels)."""
    return model_config_for(ONE_LAYER, comp).replace(attention=attention)


def _model_masks(comp: CompressionConfig, num_raw: int, ratios, monkeypatch) -> list[np.ndarray]:
    """Every [T, S] boolean mask the one-layer model hands to its dense attention while running
    ``compressed_logits`` (one per layer call: one for KV, one per segment for recurrent)."""
    # The dense reference for both pass families (model.attention='dense'): the other kernels
    # build no mask to read.
    cfg = _cfg(comp, "dense")
    params = add_gist_params(_base_params(), cfg)
    layout = build_layout(num_raw, comp, ratios,
                          comp.max_gists_per_segment if comp.ratio_sampling == "per_segment" else None)
    tokens = jax.random.randint(jax.random.key(1), (1, num_raw), 0, ONE_LAYER.vocab_size)
    captured: list[np.ndarray] = []
    original = attention_module.dot_product_attention

    def recording(q, k, v, mask_BxTxS):
        jax.debug.callback(lambda m: captured.append(np.asarray(m)[0]), mask_BxTxS)
        return original(q, k, v, mask_BxTxS)

    monkeypatch.setattr(attention_module, "dot_product_attention", recording)
    run = jax.jit(lambda p, t, a: compressed_logits(cfg, comp, layout.shape, p, t, a))
    jax.block_until_ready(run(params, tokens, layout_arrays(layout)))
    jax.effects_barrier()
    return captured


def _brute_force(masks: list[np.ndarray]) -> tuple[int, int]:
    """(live queries, allowed pairs of live queries). A query is live iff it may see itself: the
    model's masks put each token's own key first (no external memory in these paths), and the
    diagonal is False exactly for padding / dead slots / unused memory entries."""
    queries = pairs = 0
    for mask_TxS in masks:
        live_T = np.diagonal(mask_TxS[:, :mask_TxS.shape[0]])
        queries += int(live_T.sum())
        pairs += int(mask_TxS[live_T].sum())
    return queries, pairs


CASES = [  # (memory, granularity, sinks, positions, ratios config, num_raw, per-segment ratios)
    ("none", "fine", 0, "compressed", (4,), 24, None),
    ("kv", "fine", 0, "compressed", (4,), 24, None),
    ("kv", "fine", 4, "aligned", (2,), 24, None),
    ("kv", "coarse", 0, "compressed", (4,), 16, None),
    ("kv", "fine", 4, "compressed", (2, 4), 20, (4, 2, 4)),  # dead slots + padded last segment
    ("kv", "coarse", 4, "aligned", (2, 8), 24, (8, 2, 8)),
    ("recurrent", "coarse", 0, "compressed", (4,), 24, None),
    ("recurrent", "coarse", 4, "aligned", (2,), 24, None),
    ("recurrent", "coarse", 4, "compressed", (2, 4), 20, (4, 2, 4)),
]


@pytest.mark.parametrize("memory,granularity,sinks,positions,ratio_set,num_raw,ratios", CASES)
def test_visible_pairs_and_tokens_equal_the_models_own_masks(
        memory, granularity, sinks, positions, ratio_set, num_raw, ratios, monkeypatch):
    comp = _comp(memory, granularity, sinks, positions, ratio_set,
                 pad_to_segments=num_raw % 8 != 0)
    masks = _model_masks(comp, num_raw, ratios, monkeypatch)
    assert len(masks) == (3 if memory == "recurrent" else 1)
    live_queries, pairs = _brute_force(masks)
    assert flops.visible_attention_pairs(num_raw, comp, ratios) == pairs
    # Dense FLOPs count exactly the live tokens the model processes, logits on raw tokens.
    cfg = ONE_LAYER
    dense = flops.forward_flops_per_sequence(cfg, comp, num_raw, ratios)["dense"]
    assert dense == 2.0 * (flops.layer_matmul_params(cfg) * live_queries
                           + cfg.hidden_size * cfg.vocab_size * num_raw)


def test_kv_pairs_match_a_direct_per_token_rule():
    """docs/compression.md: own segment causally, earlier segments' sinks and live gists only."""
    comp = _comp("kv", "fine", 4, ratios=(2, 4))
    layout = build_layout(32, comp, (2, 4, 4, 2), 4)
    t = np.arange(layout.length)
    memory_key = (layout.is_gist & layout.alive) | layout.is_sink
    expected = 0
    for q in np.flatnonzero(layout.alive):
        own = (layout.segment == layout.segment[q]) & (t <= q) & layout.alive
        earlier = (layout.segment < layout.segment[q]) & memory_key
        expected += int(own.sum() + earlier.sum())
    assert flops.visible_attention_pairs(32, comp, (2, 4, 4, 2)) == expected


@pytest.mark.parametrize("n", [1, 7, 4096, 32768])
def test_full_attention_pairs_are_causal(n):
    comp = CompressionConfig(memory="none", ratios=(8,), ratio_sampling="fixed")
    assert flops.visible_attention_pairs(n, comp) == n * (n + 1) // 2


def test_fine_kv_at_16k_sees_far_fewer_pairs_than_full_attention():
    n, L, r, s = 16384, 2048, 8, 4
    comp = CompressionConfig(memory="kv", granularity="fine", segment_length=L, ratios=(r,),
                             ratio_sampling="fixed", num_sinks=s)
    pairs = flops.visible_attention_pairs(n, comp)
    segments, t = n // L, L + L // r
    local = segments * t * (t + 1) // 2  # every layout token is live
    memory = sum(t * ((s if i else 0) + i * L // r) for i in range(segments))
    assert pairs == local + memory
    ratio = pairs / (n * (n + 1) / 2)
    # ~ (1 + 1/r)^2 L/n (local) + (1 + 1/r)(1/r)(1 - L/n) (memory): 0.158 + 0.123
    assert 0.25 < ratio < 0.30


def _tiny(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=8, eos_token_id=1, **kw)


def test_forward_flops_full_attention_by_hand():
    cfg, n = _tiny(), 10
    comp = CompressionConfig(memory="none", ratios=(2,), ratio_sampling="fixed")
    per_layer = 32 * 8 * 4 + 2 * 32 * 8 * 2 + 4 * 8 * 32 + 3 * 32 * 64  # q, k+v, o, MLP
    dense = 2 * (3 * per_layer * n + 32 * 100 * n)
    attention = 4 * 8 * 4 * (n * (n + 1) // 2) * 3
    out = flops.forward_flops_per_sequence(cfg, comp, n)
    assert out == {"dense": dense, "attention": attention, "total": dense + attention}


def test_gist_tokens_are_processed_but_only_raw_tokens_get_logits():
    cfg = _tiny()
    comp = CompressionConfig(memory="kv", segment_length=8, ratios=(4,), ratio_sampling="fixed",
                             num_sinks=0)
    dense = flops.forward_flops_per_sequence(cfg, comp, 16)["dense"]
    assert dense == 2 * (3 * flops.layer_matmul_params(cfg) * (16 + 4) + 32 * 100 * 16)


def test_train_flops_are_three_forwards_plus_tie_and_ae():
    cfg = _tiny()
    comp = CompressionConfig(memory="kv", segment_length=8, ratios=(4,), ratio_sampling="fixed",
                             num_sinks=2)
    n = 24
    fwd = flops.forward_flops_per_sequence(cfg, comp, n)
    plain = flops.train_flops_per_sequence(cfg, comp, n)
    assert plain["total"] == pytest.approx(3 * fwd["total"])
    assert plain["tie"] == plain["ae"] == 0
    both = flops.train_flops_per_sequence(cfg, comp, n, tie=True, ae=True)
    assert both["tie"] > 0 and both["ae"] > 0
    assert both["total"] == pytest.approx(plain["total"] + both["tie"] + both["ae"])
    # TIE by hand: two forwards over n raw tokens, causal and segment-local (3 x 8-token blocks).
    full = flops.forward_flops_per_sequence(cfg, comp.replace(memory="none"), n)["total"]
    seg_local = full - 4 * 8 * 4 * 3 * (n * (n + 1) // 2 - 3 * 36)
    assert both["tie"] == pytest.approx(full + seg_local)
    # AE by hand: 6 spans of 4 tokens, one block, head on each token, 4 + 10 pairs per span.
    ae_fwd = 2 * (flops.layer_matmul_params(cfg) * n + 32 * 100 * n) + 4 * 8 * 4 * 6 * 14
    assert both["ae"] == pytest.approx(3 * ae_fwd)
    step = flops.train_flops_per_step(cfg, comp, n, 5, tie=True)
    assert step["total"] == pytest.approx(5 * (plain["total"] + both["tie"]))
    # Like the step: no TIE / AE without compression.
    none = flops.train_flops_per_sequence(cfg, comp.replace(memory="none"), n, tie=True, ae=True)
    assert none["tie"] == none["ae"] == 0


@pytest.mark.parametrize("tie,source,ae,lam,memory,want", [
    (True, "online", True, 1.0, "kv", (True, True, True, False)),
    (True, "precomputed", True, 0.0, "kv", (True, False, False, True)),
    (False, "online", True, 0.5, "recurrent", (False, False, True, False)),
    (True, "online", True, 1.0, "none", (False, False, False, False))])
def test_objectives_decide_every_term_once(tie, source, ae, lam, memory, want):
    """The one decision the state, the step, FLOPs, the memory plan and the loader read: TIE and
    AE need compression on, a zero AE lambda builds no decoder, precomputed TIE adds a batch
    field and online TIE a frozen reference."""
    comp = CompressionConfig(memory=memory, granularity="coarse", ratios=(4,),
                             ratio_sampling="fixed")
    terms = objectives(StepConfig(objective=ObjectiveConfig(tie=tie, tie_source=source, ae=ae, ae_lambda=lam)), comp)
    assert (terms.tie, terms.tie_online, terms.ae, terms.tie_precomputed) == want
    assert terms.needs_reference_params == terms.tie_online
    assert ("tie_weights" in terms.batch_fields) == terms.tie_precomputed


def test_six_n_is_six_times_params_times_tokens():
    cfg = _tiny()
    assert flops.model_flops_6n(cfg, 1000) == 6 * cfg.num_params() * 1000


@pytest.mark.parametrize("kind,peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12), ("cpu", None), ("Some Future Chip", None)])
def test_peak_flops_by_device_kind(kind, peak, monkeypatch):
    monkeypatch.delenv(flops.PEAK_FLOPS_ENV, raising=False)
    assert flops.peak_flops(kind) == peak


def test_peak_flops_override_env_and_cpu(monkeypatch):
    monkeypatch.delenv(flops.PEAK_FLOPS_ENV, raising=False)
    assert flops.peak_flops() is None  # the test devices are CPUs
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", override=5e14) == 5e14
    monkeypatch.setenv(flops.PEAK_FLOPS_ENV, "1e15")
    assert flops.peak_flops() == 1e15
    monkeypatch.setenv(flops.PEAK_FLOPS_ENV, "fast")
    with pytest.raises(ValueError, match=flops.PEAK_FLOPS_ENV):
        flops.peak_flops()


def test_mfu_arithmetic():
    assert flops.mfu(4e15, 2.0, 8, 1e15) == pytest.approx(0.25)
    assert flops.mfu(4e15, 2.0, 8, None) is None
    with pytest.raises(ValueError, match="mfu needs positive step_seconds"):
        flops.mfu(4e15, 0.0, 8, 1e15)


def test_cli_compares_with_full_attention(capsys):
    demo = str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "demo.py")
    flops.main(["--config", f"{demo}:tiny,tie,ae"])  # ratios (4, 8) per instance: a row for each
    out = capsys.readouterr().out
    assert "full attention" in out and "kv/fine L=16 r=4" in out and "kv/fine L=16 r=8" in out
    assert "compressed (kv/fine L=16 r=4) / full attention" in out


# -- gist_only: no weight-gradient matmuls for frozen weights -----------------------------------------

@pytest.mark.parametrize("projections", [False, True])
def test_gist_only_drops_frozen_weight_gradients(projections):
    cfg = _tiny(gist_projections=projections)
    comp = CompressionConfig(memory="kv", segment_length=8, ratios=(4,), ratio_sampling="fixed",
                             num_sinks=2, gist_projections=projections)
    n = 24
    fwd = flops.forward_flops_per_sequence(cfg, comp, n)
    full = flops.train_flops_per_sequence(cfg, comp, n)
    frozen = flops.train_flops_per_sequence(cfg, comp.replace(trainable="gist_only"), n)
    assert full["dense"] == pytest.approx(3 * fwd["dense"])
    assert frozen["attention"] == full["attention"]  # attention's backward is activation gradient
    # forward + activation gradients; weight gradients only for the gist q/k/v projections,
    # on the 6 gist tokens of 3 segments (2 per 8-token segment), in each of the 3 layers.
    gist_weight_grads = 2 * 32 * 8 * (4 + 2 * 2) * 6 * 3 if projections else 0
    assert frozen["dense"] == pytest.approx(2 * fwd["dense"] + gist_weight_grads)
    both = flops.train_flops_per_sequence(cfg, comp.replace(trainable="gist_only"), n, tie=True, ae=True)
    assert both["ae"] == flops.train_flops_per_sequence(cfg, comp, n, ae=True)["ae"]  # the AE always trains


# -- attention pairs each implementation computes, counted while the implementation runs --------------

PAIR_CASES = [  # (memory, granularity, sinks, positions, ratio set, num_raw, per-segment ratios)
    ("kv", "fine", 0, "compressed", (4,), 24, None),
    ("kv", "coarse", 4, "aligned", (2,), 24, None),
    ("kv", "fine", 4, "compressed", (2, 4), 20, (4, 2, 4)),
]


def _run_forward(comp: CompressionConfig, num_raw: int, ratios, attention: str) -> None:
    cfg = _cfg(comp, attention)
    params = add_gist_params(_base_params(), cfg)
    layout = build_layout(num_raw, comp, ratios,
                          comp.max_gists_per_segment if comp.ratio_sampling == "per_segment" else None)
    tokens = jax.random.randint(jax.random.key(1), (1, num_raw), 0, ONE_LAYER.vocab_size)
    run = jax.jit(lambda p, t, a: compressed_logits(cfg, comp, layout.shape, p, t, a))
    jax.block_until_ready(run(params, tokens, layout_arrays(layout)))
    jax.effects_barrier()





@pytest.mark.parametrize("memory,granularity,sinks,positions,ratio_set,num_raw,ratios",
                         PAIR_CASES + [c for c in CASES if c[0] != "kv"])
def test_dense_reference_computes_its_masks_full_matrix(
        memory, granularity, sinks, positions, ratio_set, num_raw, ratios, monkeypatch):
    """Dense: every entry of every [T, S] mask it is handed (KV: [T, 2T]; Coarse-Rec: one
    square per segment step; full attention with model.attention='dense': [N, N])."""
    comp = _comp(memory, granularity, sinks, positions, ratio_set, pad_to_segments=num_raw % 8 != 0)
    masks = _model_masks(comp, num_raw, ratios, monkeypatch)
    cfg = _cfg(comp, "dense")
    pairs = flops.attention_pairs(cfg, comp, num_raw, ratios)
    assert pairs["computed"] == sum(m.size for m in masks)
    assert pairs["exact"] == _brute_force(masks)[1]


@pytest.mark.parametrize("key_block", [None, 3])
@pytest.mark.parametrize("memory,granularity,sinks,positions,ratio_set,num_raw,ratios", PAIR_CASES)
def test_decomposed_pairs_are_the_score_blocks_it_computes(
        memory, granularity, sinks, positions, ratio_set, num_raw, ratios, key_block, monkeypatch):
    """Counted as the kernel runs: each ``_partial`` call's score block, and with memory key
    blocks (``key_block``: prefixes longer than it) each segment's trip count of key blocks."""
    from gist_jax.gist import structured

    comp = _comp(memory, granularity, sinks, positions, ratio_set, pad_to_segments=num_raw % 8 != 0)
    counted: list[int] = []
    original, seen_blocks = structured._partial, structured._seen_blocks

    def recording(q, k, v, bias):  # runs once per executed call: per scan step, per query block
        jax.debug.callback(lambda _: counted.append(q.shape[0] * q.shape[3] * k.shape[2]), q[0, 0, 0, 0, 0])
        return original(q, k, v, bias)

    ts = build_layout(num_raw, comp, ratios, comp.max_gists_per_segment if comp.ratio_sampling == "per_segment"
                      else None).shape.segment_tokens

    def recording_blocks(i, bound, plan):  # once per segment of a key-blocked memory part
        blocks = seen_blocks(i, bound, plan)
        jax.debug.callback(lambda n: counted.append(int(n) * plan.key_block * ts), blocks)
        return blocks

    monkeypatch.setattr(structured, "_partial", recording)
    if key_block:
        monkeypatch.setattr(structured, "MEMORY_KEY_BLOCK", key_block)
        monkeypatch.setattr(structured, "_seen_blocks", recording_blocks)
    _run_forward(comp, num_raw, ratios, "decomposed")
    cfg = _cfg(comp, "decomposed")
    assert flops.attention_pairs(cfg, comp, num_raw, ratios)["computed"] == sum(counted)


def test_flash_xla_pairs_are_each_segments_square(monkeypatch):
    comp = _comp("kv", "fine", 4, "compressed", (4,))
    counted: list[int] = []
    original = jax.nn.dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        counted.append(q.shape[0] * q.shape[1] * k.shape[1])  # [B * S, E] x [B * S, E]
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    _run_forward(comp, 24, None, "flash")
    pairs = flops.attention_pairs(_cfg(comp, "flash"), comp, 24)
    assert pairs["impl"] == "flash:xla" and pairs["computed"] == sum(counted)


@pytest.mark.parametrize("n,block", [(24, 8), (20, 8), (16, 16)])
def test_blockwise_causal_pairs_are_the_tiles_it_visits(n, block, monkeypatch):
    """Counted at run time (one count per key tile the online-softmax loop visits) and checked
    against the causal mask itself: exactly the tiles holding a visible pair."""
    from gist_jax.model import causal

    monkeypatch.setattr(causal, "DEFAULT_BLOCK", block)
    counted: list[int] = []
    original = causal._block_mask

    def recording(i, j, bq, bk, q_offset, valid):
        jax.debug.callback(lambda _: counted.append(bq * bk), j)
        return original(i, j, bq, bk, q_offset, valid)

    monkeypatch.setattr(causal, "_block_mask", recording)
    comp = CompressionConfig(memory="none", ratios=(4,), ratio_sampling="fixed")
    _run_forward(comp, n, None, "blockwise")
    pairs = flops.attention_pairs(ONE_LAYER.replace(attention="blockwise"), comp, n)
    assert pairs["impl"] == "causal:blockwise" and pairs["computed"] == sum(counted)
    b = min(block, n)
    padded = -(-n // b) * b
    causal_PxP = np.tril(np.ones((padded, padded), bool))
    causal_PxP[n:] = False
    tiles = causal_PxP.reshape(padded // b, b, padded // b, b).any(axis=(1, 3))
    assert pairs["computed"] == int(tiles.sum()) * b * b
    assert pairs["exact"] == n * (n + 1) // 2


def test_bank_pairs_are_the_non_empty_tiles_of_the_dense_mask():
    """The bank count (from ``bank.mask_function``) against the dense reference's own mask
    (``specs.parallel_spec``) permuted to the bank order and cut into tiles."""
    from gist_jax.gist.bank import GistBankKV
    from gist_jax.gist.specs import parallel_spec

    comp = CompressionConfig(memory="kv", granularity="fine", segment_length=16, ratios=(4,),
                             ratio_sampling="fixed", num_sinks=2, positions="aligned")
    layout = build_layout(48, comp)
    spec = parallel_spec(layout_arrays(layout), comp, 1)
    allowed_TxT = np.asarray(spec.mask[0] | spec.memory_mask[0])
    bank = GistBankKV.for_shape(layout.shape, comp, block=8)
    perm = bank.permutation()
    tp = bank.padded_length
    permuted = np.zeros((tp, tp), bool)
    real = perm >= 0
    permuted[np.ix_(real, real)] = allowed_TxT[np.ix_(perm[real], perm[real])]
    permuted[~real, ~real] = True  # padding rows see themselves
    tiles = permuted.reshape(tp // 8, 8, tp // 8, 8).any(axis=(1, 3))
    assert bank.block_pairs() == int(tiles.sum()) * 64
    pairs = flops.attention_pairs(ONE_LAYER.replace(attention="bank"), comp, 48, backend="cpu")
    assert pairs["impl"] == "bank" and pairs["exact"] == int(allowed_TxT.sum())


def test_tie_pairs_cover_both_reference_passes():
    comp = CompressionConfig(memory="kv", segment_length=512, ratios=(8,), ratio_sampling="fixed")
    cfg = preset("tiny")
    pairs = flops.attention_pairs(cfg, comp, 2048, tie=True, backend="cpu")
    assert pairs["causal_impl"] == "blockwise"
    assert pairs["tie_computed"] == causal.blockwise_causal_pairs(2048) + 4 * causal.blockwise_causal_pairs(512)
    assert pairs["tie_exact"] == 2048 * 2049 // 2 + 4 * 512 * 513 // 2


@pytest.mark.parametrize("sinks,ratio_set,num_raw", [(4, (4,), 24), (0, (2, 4), 32)])
def test_split_computes_the_exact_pairs_on_cudnn_and_the_squares_on_xla(sinks, ratio_set, num_raw):
    """split on a GPU: cuDNN skips what causality and key lengths mask, so computed equals
    the mask's visible pairs; its XLA backend computes each segment's square and the
    compacted memory for every later segment's queries."""
    comp = _comp("kv", "fine", sinks, "compressed", ratio_set)
    cfg = _cfg(comp, "split").replace(dtype="bfloat16")
    on_gpu = flops.attention_pairs(cfg, comp, num_raw, backend="gpu")
    assert on_gpu["impl"] == "split:cudnn" and on_gpu["computed"] == on_gpu["exact"]
    shape = build_layout(num_raw, comp).shape
    s, ts = shape.num_segments, shape.segment_tokens
    on_cpu = flops.attention_pairs(cfg, comp, num_raw, backend="cpu")
    assert on_cpu["impl"] == "split:xla"
    assert on_cpu["computed"] == s * ts * ts + (s - 1) * ts * (shape.num_sinks + (s - 1) * shape.slots)


# -- UniGist (compression.window > 0) --------------------------------------------------------------

WINDOW_CASES = [  # (segment length, ratio, window, sinks, num_raw): nb 1, nb 2, several memory groups, padding
    (8, 2, 8, 0, 32),
    (8, 4, 16, 2, 40),
    (8, 2, 4, 4, 80),
    (8, 4, 8, 2, 27),
]


def _windowed(L: int, r: int, window: int, sinks: int, num_raw: int) -> CompressionConfig:
    return CompressionConfig(memory="kv", granularity="fine", positions="aligned", segment_length=L, ratios=(r,),
                             ratio_sampling="fixed", num_sinks=sinks, window=window,
                             pad_to_segments=num_raw % L != 0)


@pytest.mark.parametrize("L,r,window,sinks,num_raw", WINDOW_CASES)
def test_windowed_pairs_equal_a_brute_force_count_of_the_windowed_mask(L, r, window, sinks, num_raw):
    """Exact pairs: ``specs.windowed_mask`` counted entry by entry over the live queries; the memory
    share: the keys laid out before the band start of the query's block (window.py's memory part),
    counted the same way."""
    from gist_jax.gist import window_pairs
    from gist_jax.gist.specs import windowed_mask
    from gist_jax.gist.window import window_plan

    comp = _windowed(L, r, window, sinks, num_raw)
    layout = build_layout(num_raw, comp)
    mask = np.asarray(windowed_mask(layout_arrays(layout)))[layout.alive]
    assert flops.visible_attention_pairs(num_raw, comp) == int(mask.sum())
    plan = window_plan(layout.shape, window)
    band_start_T = np.asarray(plan.band_start)[np.arange(layout.length) // plan.query_block]
    key_in_memory = np.arange(layout.length)[None, :] < band_start_T[layout.alive][:, None]
    assert window_pairs.windowed_memory_pairs(layout, window) == int((mask & key_in_memory).sum())
    # The FLOP count's tokens are the live ones, as for Fine-KV.
    dense = flops.forward_flops_per_sequence(ONE_LAYER, comp, num_raw)["dense"]
    assert dense == 2.0 * (flops.layer_matmul_params(ONE_LAYER) * int(layout.alive.sum())
                           + ONE_LAYER.hidden_size * ONE_LAYER.vocab_size * num_raw)


@pytest.mark.parametrize("L,r,window,sinks,num_raw,query_block,groups",
                         [c + (None, None) for c in WINDOW_CASES[:3]] + [WINDOW_CASES[2] + (7, 3)])
def test_windowed_computed_pairs_are_the_score_blocks_window_py_computes(L, r, window, sinks, num_raw, query_block,
                                                                         groups, monkeypatch):
    """The default blocks (64 rows: one or two here) and blocks of 7 rows in 3 memory groups."""
    from gist_jax.gist import window as window_module

    if query_block:
        monkeypatch.setattr(window_module, "QUERY_BLOCK", query_block)
        monkeypatch.setattr(window_module, "MAX_MEMORY_GROUPS", groups)
    comp = _windowed(L, r, window, sinks, num_raw)
    counted: list[int] = []
    original = window_module._partial

    def recording(q, k, v, bias):  # once per scan step and part (band, memory): [B, K, G, bq, H] x [B, K, C, H]
        jax.debug.callback(lambda _: counted.append(q.shape[0] * q.shape[3] * k.shape[2]), q[0, 0, 0, 0, 0])
        return original(q, k, v, bias)

    monkeypatch.setattr(window_module, "_partial", recording)
    _run_forward(comp, num_raw, None, "decomposed")
    pairs = flops.attention_pairs(_cfg(comp, "decomposed"), comp, num_raw)
    assert pairs["impl"] == "windowed" and pairs["computed"] == sum(counted)
    assert pairs["computed_over_exact"] >= 1.0
    assert flops.attention_pairs(_cfg(comp, "auto"), comp, num_raw)["impl"] == "windowed"
    dense = flops.attention_pairs(_cfg(comp, "auto,dense"), comp, num_raw)
    t = build_layout(num_raw, comp).length
    assert dense["impl"] == "dense" and dense["computed"] == 2 * t * t  # two [T, T] views


def test_windowed_pairs_sit_between_fine_kv_and_full_attention_at_16k():
    """A window of one segment sees about what Fine-KV sees (its own segment's raw tokens, on average
    L / 2 + W back instead of L / 2), far below full attention; the train count goes through."""
    n, L, r = 16384, 2048, 8
    fine = CompressionConfig(memory="kv", granularity="fine", segment_length=L, ratios=(r,), ratio_sampling="fixed",
                             num_sinks=16, positions="aligned")
    uni = fine.replace(window=L)
    full = n * (n + 1) // 2
    p_fine, p_uni = flops.visible_attention_pairs(n, fine), flops.visible_attention_pairs(n, uni)
    assert p_fine < p_uni < 0.5 * full
    train = flops.train_flops_per_sequence(_tiny(), uni, n)
    assert train["attention"] == 3 * 4.0 * 8 * 4 * p_uni * 3  # 3 x forward; head_dim 8, 4 heads, 3 layers
