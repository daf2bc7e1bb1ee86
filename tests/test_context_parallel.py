"""Context parallelism (``mesh.context``) on 8 fake CPU devices: the sequence split in blocks of
whole segments gives the one-device step's loss, gradients and updates (Fine-KV and Coarse-KV,
TIE, precomputed or online, and AE on, alone and beside FSDP and tensor parallelism); only gist
K/V crosses the context axis in the compiled step, plus, with online TIE, its reference pass's
forward K/V; unsupported settings are refused in one line."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gist_helpers import BASE, comp_config, model, tokens

from gist_jax.bench.collectives import collectives
from gist_jax.errors import ConfigError
from gist_jax.gist import structured
from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.context_parallel import balanced_order, check_context_parallel, memory_pairs
from gist_jax.gist.forward import compressed_logits
from gist_jax.gist.layout import build_layout
from gist_jax.gist.specs import layout_arrays
from gist_jax.model import causal
from gist_jax.model.context_causal import GATHER_SCOPE, context_causal_attention
from gist_jax.model.sharding import activation_mesh
from gist_jax.train import plan
from gist_jax.train.ae import ae_loss, init_ae_params
from gist_jax.train.config import MeshConfig, ObjectiveConfig, OptimizerConfig, StepConfig
from gist_jax.train.mesh import make_mesh
from gist_jax.train.state import create_train_state
from gist_jax.train.step import build_train_step, make_microbatch_loss

SEQ = 64  # 8 segments of 8: blocks of 1, 2 or 4 segments
# A small rate: after two AdamW steps, float32 reordering noise stays far below 1e-5.
OPT = OptimizerConfig(learning_rate=1e-4, total_steps=20, warmup_fraction=0.1)
# TIE with precomputed weights (online TIE has a test of its own) and AE.
OBJECTIVE = ObjectiveConfig(tie=True, tie_source="precomputed", ae=True, ae_lambda=0.5)
ONLINE_TIE = ObjectiveConfig(tie=True, tie_source="online", ae=True, ae_lambda=0.5)


@pytest.fixture(autouse=True)
def _fresh_compiles():
    """Compile, never load, the steps these tests run. A context-parallel step loaded from the
    persistent compilation cache deadlocked the fake devices' collectives under XLA:CPU's
    concurrency-optimised scheduler (``distributed.SEQUENTIAL_CPU_COLLECTIVES``, which
    ``gist_jax.main`` sets for such runs); this process keeps the default scheduler, whose
    compiled memory the planner tests calibrate against."""
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)


def _comp(granularity: str):
    if granularity == "unigist":  # windows of 8 raw tokens: the halo reaches into the previous block
        return comp_config("kv", "fine", sinks=2, window=8, positions="aligned")
    return comp_config("kv", granularity, sinks=2)  # the gist kernel: model.attention's default, auto


def _batch(objective: ObjectiveConfig = OBJECTIVE) -> dict[str, jax.Array]:
    tokens = jax.random.randint(jax.random.key(0), (4, SEQ), 0, BASE.vocab_size)
    mask = jnp.ones(tokens.shape, bool).at[1, 40:].set(False)  # a document ends inside a block
    if objective.tie_source == "online":
        return {"tokens": tokens, "loss_mask": mask}
    weights = jax.random.uniform(jax.random.key(1), tokens.shape, minval=0.5, maxval=2.0)
    return {"tokens": tokens, "loss_mask": mask, "tie_weights": weights}


def _mesh(sizes: tuple[int, int, int, int]):
    cfg = MeshConfig(*sizes)
    return cfg, make_mesh(cfg, jax.devices()[:int(np.prod(sizes))])


def _two_steps(granularity: str, sizes: tuple[int, int, int, int], base=BASE, microbatches: int = 1,
               objective: ObjectiveConfig = OBJECTIVE):
    comp = _comp(granularity)
    mesh_cfg, mesh = _mesh(sizes)
    cfg = StepConfig(batch_size=4, seq_len=SEQ, microbatches=microbatches, mesh=mesh_cfg, optimizer=OPT,
                     objective=objective)
    state, tx, shardings = create_train_state(base, comp, cfg, mesh)
    layout = build_layout(SEQ, comp)
    step = build_train_step(base, comp, cfg, layout.shape, tx, mesh, shardings)
    history = []
    for _ in range(2):  # the first update runs at learning rate 0 (warm-up)
        state, metrics = step(state, _batch(objective), layout_arrays(layout))
        history.append(jax.tree.map(float, metrics))
    return jax.device_get(state.params), history


@pytest.fixture(scope="module")
def one_device():
    return {g: _two_steps(g, (1, 1, 1, 1)) for g in ("fine", "coarse")}


@pytest.mark.parametrize("granularity,sizes", [
    ("fine", (1, 1, 1, 2)), ("fine", (1, 1, 1, 4)), ("fine", (1, 1, 1, 8)), ("fine", (1, 2, 1, 4)),
    ("coarse", (1, 1, 1, 8)), ("coarse", (1, 2, 1, 4))])
def test_context_blocks_train_like_one_device(one_device, granularity, sizes):
    ref_params, ref_history = one_device[granularity]
    params, history = _two_steps(granularity, sizes)
    for got, want in zip(history, ref_history):
        assert set(got) == set(want) and {"tie_entropy", "ae_loss"} <= set(got)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_context_with_tensor_parallelism_remat_and_accumulation():
    """context 4 x tensor 2 (heads split too), remat of every layer, two microbatches."""
    base = BASE.replace(remat_policy="full")
    ref_params, ref_history = _two_steps("fine", (1, 1, 1, 1), base, microbatches=2)
    params, history = _two_steps("fine", (1, 1, 2, 4), base, microbatches=2)
    for got, want in zip(history, ref_history):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("granularity,key_block", [("fine", None), ("coarse", None), ("fine", 5)])
def test_context_gradients_equal_one_device(granularity, key_block, monkeypatch):
    """The microbatch loss's gradient itself (not only what AdamW makes of it), at context 8;
    also with the memory part in key blocks of 5 (several per block's memory prefix)."""
    if key_block:
        monkeypatch.setattr(structured, "MEMORY_KEY_BLOCK", key_block)
    comp = _comp(granularity)
    cfg = StepConfig(batch_size=4, seq_len=SEQ, optimizer=OPT, objective=OBJECTIVE)
    layout = build_layout(SEQ, comp)
    state, _, _ = create_train_state(BASE, comp, cfg, _mesh((1, 1, 1, 1))[1])
    params, ref_params = jax.device_get((state.params, state.ref_params))  # host: any mesh takes them
    loss = make_microbatch_loss(BASE, comp, cfg, layout.shape)
    batch, arrays = _batch(), layout_arrays(layout)
    denom = jnp.sum(batch["loss_mask"]).astype(jnp.float32)

    def grads(sizes):
        mesh = _mesh(sizes)[1]

        def f(params):
            with activation_mesh(mesh):
                return loss(params, ref_params, batch, arrays, denom)[0]

        return jax.device_get(jax.jit(jax.value_and_grad(f))(params))

    (want_loss, want), (got_loss, got) = grads((1, 1, 1, 1)), grads((1, 1, 1, 8))
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("sizes", [(1, 1, 1, 4), (1, 2, 2, 2)])
def test_context_causal_attention_equals_the_dense_reference(sizes, monkeypatch):
    """``model/context_causal.py`` (each block's queries against the gathered K/V, at the block's
    offset, key blocks of 8 so a block spans several): values and gradients equal the dense
    causal reference on one device, with padded keys, GQA heads, beside fsdp and tensor."""
    monkeypatch.setattr(causal, "DEFAULT_BLOCK", 8)
    keys = jax.random.split(jax.random.key(4), 4)
    q = jax.random.normal(keys[0], (2, SEQ, 4, 16))
    k, v = (jax.random.normal(key, (2, SEQ, 2, 16)) for key in keys[1:3])
    valid = jnp.ones((2, SEQ), bool).at[0, :5].set(False).at[1, 50:].set(False)
    cotangent = jax.random.normal(keys[3], q.shape)
    want_out, want_vjp = jax.vjp(lambda q, k, v: causal.causal_attention(q, k, v, valid, impl="dense"), q, k, v)
    mesh = _mesh(sizes)[1]

    def split(q, k, v):
        with activation_mesh(mesh):
            return context_causal_attention(q, k, v, valid)

    got_out, got_vjp = jax.vjp(jax.jit(split), q, k, v)
    live = valid[:, :, None, None]  # a query with no live key is padding: both give it nothing usable
    np.testing.assert_allclose(np.where(live, got_out, 0), np.where(live, want_out, 0), atol=2e-5)
    for got, want in zip(got_vjp(cotangent * live), want_vjp(cotangent * live)):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_ae_loss_per_segment_ratios_equals_one_device():
    """The AE decoder run per block (segments on ``context``): per-segment ratios, so blocks hold
    dead gist slots and spans of 2 to 8 tokens; loss and gradients (decoder, [ae] rows, gist K/V)
    equal the unsplit loss."""
    comp = CompressionConfig(memory="kv", granularity="fine", segment_length=8, ratios=(2, 4, 8),
                             ratio_sampling="per_segment", num_sinks=2)
    cfg, params = model(comp)
    layout = build_layout(SEQ, comp, (2, 8, 4, 2, 8, 8, 4, 2), 4)
    arrays, toks = layout_arrays(layout), tokens(2, SEQ, seed=3)
    _, (k, v) = jax.jit(compressed_logits, static_argnums=(0, 1, 2), static_argnames="kv_layer")(
        cfg, comp, layout.shape, params, toks, arrays, kv_layer=-1)
    ae_params = init_ae_params(cfg, comp, params)

    def loss_and_grads(sizes):
        mesh = _mesh(sizes)[1]

        def f(ae_params, k, v):
            with activation_mesh(mesh):
                return ae_loss(cfg, comp, layout.shape, params, ae_params, toks, arrays, k, v)[0]

        return jax.device_get(jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(ae_params, k, v))

    (want_loss, want), (got_loss, got) = loss_and_grads((1, 1, 1, 1)), loss_and_grads((1, 2, 1, 4))
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def _compiled_collectives(context: int, objective: ObjectiveConfig, seq: int = 256, window: int = 0):
    comp = comp_config("kv", "fine", sinks=2, ratio=8, segment_length=32,
                       **({"window": window, "positions": "aligned"} if window else {}))
    base = BASE.replace(scan_layers=False)  # one op per layer: the text lists every layer's traffic
    mesh_cfg, mesh = _mesh((1, 1, 1, context))
    cfg = StepConfig(batch_size=2, seq_len=seq, mesh=mesh_cfg, objective=objective)
    state, tx, shardings = create_train_state(base, comp, cfg, mesh)
    layout = build_layout(seq, comp)
    step = build_train_step(base, comp, cfg, layout.shape, tx, mesh, shardings)
    batch = {"tokens": jnp.zeros((2, seq), jnp.int32), "loss_mask": jnp.ones((2, seq), bool)}
    text = step.lower(state, batch, layout_arrays(layout)).compile().as_text()
    return collectives(text), layout.shape


@pytest.mark.parametrize("objective,window", [
    (ObjectiveConfig(tie=False, ae=False), 0), (ObjectiveConfig(tie=False, ae=True), 0), (ONLINE_TIE, 0),
    (ObjectiveConfig(tie=False, ae=True), 16)], ids=["plain", "ae", "online_tie_ae", "unigist_ae"])
def test_only_gist_kv_crosses_the_context_axis(objective, window):
    """Counted in the compiled HLO: per layer one all-gather of the gist K/V (+ each block's copy
    of the sinks) and its reduce-scatter in the backward; nothing activation-sized otherwise
    (parameter-gradient all-reduces are data parallelism's, over the replicated weights). With
    AE on, each block decodes its own gists' spans: the decoder adds no activation traffic.
    Online TIE's causal reference pass needs every earlier key: it gathers each layer's raw
    K and V once, in the forward only (the pass is frozen). UniGist also sends each block's
    last ``halo`` keys and values (and their liveness) to the next block, forward and back."""
    context, batch, seq = 4, 2, 256
    ops, shape = _compiled_collectives(context, objective, seq, window)
    layers, kv, h, f32 = BASE.num_layers, BASE.num_kv_heads, BASE.head_dim, 4
    gists = shape.num_segments * shape.slots
    entry = 2 * batch * kv * h * f32  # one memory entry's k and v
    gather = [op for op in ops if "shard_map/all_gather" in op.name]
    assert len(gather) == layers and all(op.nbytes == (gists + context * shape.num_sinks) * entry for op in gather)
    reference = [op for op in ops if GATHER_SCOPE in op.name]
    tie = objective.tie and objective.tie_source == "online"
    assert len(reference) == (2 * layers if tie else 0)
    assert all(op.nbytes == seq * entry // 2 and "transpose" not in op.name for op in reference)
    gather += reference
    halo = [op for op in ops if "shard_map/ppermute" in op.name]
    if window:  # per layer: forward k, v (f32) and liveness (bool), backward k, v
        from gist_jax.gist.window import context_window_plan

        keys = context_window_plan(shape, window, context).halo
        kv_bytes = layers * 2 * keys * entry  # the liveness is the same in every layer: XLA may send it once
        comp = comp_config("kv", "fine", sinks=2, ratio=8, segment_length=32, window=window, positions="aligned")
        step = StepConfig(batch_size=batch, seq_len=seq, mesh=MeshConfig(1, 1, 1, context))
        assert plan.context_traffic(BASE.replace(scan_layers=False), comp, step, context)["halo_permute"] == kv_bytes
        assert kv_bytes + keys * batch <= sum(op.nbytes for op in halo) <= kv_bytes + layers * keys * batch
    assert bool(halo) == bool(window)
    gather += halo
    scatter = [op for op in ops if "shard_map/reduce_scatter" in op.name]
    assert len(scatter) == layers and all(op.nbytes * context == gather[0].nbytes for op in scatter)
    # What an all-gather of every layout token's K/V would move, per layer: 1/8 of it at r = 8.
    full = shape.length * entry
    assert gists * entry * 8 <= full
    # Everything else is parameter gradients (all-reduce) or token ids / the label shift (ints).
    rest = [op for op in ops if op not in gather and op not in scatter]
    activation = shape.segment_tokens * batch * BASE.hidden_size * f32  # one segment's hidden rows
    assert all(op.op == "all-reduce" or op.nbytes < activation // 4 for op in rest), [
        (op.op, op.nbytes, op.name[-80:]) for op in rest if op.op != "all-reduce"]


def test_memory_pairs_measure_the_balance():
    """Segments placed by ``balanced_order`` (a snake over the blocks) give every block about the
    same live memory pairs, where contiguous blocks give the last one the most; past one key
    block the computed pairs follow the live ones (each segment runs the key blocks it reaches)."""
    shape = build_layout(SEQ, _comp("fine")).shape  # 8 segments of 8 + 2 slots, 2 sinks
    ts, seen = shape.segment_tokens, [0] + [2 + 2 * i for i in range(1, 8)]
    np.testing.assert_array_equal(balanced_order(8, 4), [0, 7, 1, 6, 2, 5, 3, 4])
    contiguous, computed = memory_pairs(shape, 4, order=np.arange(8))
    assert contiguous == [ts * (seen[2 * c] + seen[2 * c + 1]) for c in range(4)]
    assert computed == [2 * ts * seen[7]] * 4  # the buffer fits one key block: computed whole
    live, _ = memory_pairs(shape, 4)
    assert live == [ts * (seen[c] + seen[7 - c]) for c in range(4)] and sum(live) == sum(contiguous)
    assert max(live) / min(live) < 1.2 < max(contiguous) / min(contiguous)
    live, computed = memory_pairs(shape, 4, key_block=4)
    assert computed == [ts * sum(-(-seen[i] // 4) * 4 for i in (c, 7 - c)) for c in range(4)]


@pytest.mark.parametrize("sizes,query_block", [((1, 1, 1, 2), None), ((1, 1, 1, 4), 8), ((1, 2, 1, 4), None)])
def test_unigist_context_blocks_train_like_one_device(sizes, query_block, monkeypatch):
    """UniGist: the gathered memory, the previous block's halo for the window, and each block's
    query blocks at their global index (with ``query_block`` 8: several per block, the last
    one padded) give the one-device step's losses and parameters."""
    from gist_jax.gist import window

    if query_block:
        monkeypatch.setattr(window, "QUERY_BLOCK", query_block)
    ref_params, ref_history = _two_steps("unigist", (1, 1, 1, 1))
    params, history = _two_steps("unigist", sizes)
    for got, want in zip(history, ref_history):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_online_tie_equals_one_device():
    """TIE's frozen reference passes under context parallelism: the causal pass gathers each
    layer's K/V (``model/context_causal.py``), the block-diagonal one stays on its blocks."""
    ref_params, ref_history = _two_steps("fine", (1, 1, 1, 1), objective=ONLINE_TIE)
    params, history = _two_steps("fine", (1, 2, 1, 4), objective=ONLINE_TIE)
    for got, want in zip(history, ref_history):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("memory,granularity,kw,seq,match", [
    ("recurrent", "coarse", {}, 64, "Coarse-Rec"),
    ("none", "fine", {}, 64, "no gists"),
    ("kv", "fine", {"window": 24, "positions": "aligned"}, 64, "reaches 30 layout tokens back, past"),
    ("kv", "fine", {}, 48, "multiple of 32"),
])
def test_unsupported_context_settings_are_refused(memory, granularity, kw, seq, match):
    comp = comp_config(memory, granularity, **kw)
    with pytest.raises(ConfigError, match=match):
        check_context_parallel(comp, seq, 4)
    check_context_parallel(comp, seq, 1)  # no context parallelism: nothing to refuse


def test_traffic_report_agrees_with_the_compiled_step_and_the_planner(capsys):
    from gist_jax.bench import context_traffic

    assert context_traffic.main(["--context=2", "--seq_len=1024"]) == 0
    out = capsys.readouterr().out
    gathered = next(line for line in out.splitlines() if "gist memory all-gather" in line)
    formula = next(line for line in out.splitlines() if line.strip().startswith("formula:"))
    measured = int(gathered.split()[3].replace(",", ""))
    assert f"= {measured:,d} bytes (the planner's: {measured:,d})" in formula, out
    assert "compiled temp memory per device" in out and "memory-part pairs per block, balanced" in out
