"""The gist kernel ``split`` (``model.attention="split"``: segment-local call + memory call,
merged by log-sum-exp, custom backward with the merged output and lse) against the dense
reference, on the XLA backend; the cuDNN module's self-test and fallback logic as far as a CPU
can check them."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gist_helpers import comp_config, gist_kernel, model, tokens
from test_gist_core import _raw_embedding_grads
from test_structured_attention import CASES, _assert_equal, _dense_and_structured

from gist_jax.errors import ConfigError
from gist_jax.gist import cudnn_stats, forward, split, split_kernel
from gist_jax.gist.config import check_gist_kernel
from gist_jax.gist.forward import compressed_logits, resolve_gist_kernel
from gist_jax.gist.layout import build_layout
from gist_jax.gist.partials import partial_attention
from gist_jax.gist.specs import layout_arrays, parallel_spec
from gist_jax.model.kernels import NEG


@dataclasses.dataclass(frozen=True)
class OwnLseMemoryBackward(split_kernel.XlaBackend):
    """A mutated split: the memory part's backward uses that part's *own* log-sum-exp instead
    of the merged one (what a naive per-part backward does). Must fail the gradient tests."""

    name: str = "xla-own-lse"

    def backward(self, q, k, v, out, lse, dout, q_len, kv_len, causal):
        if not causal:  # the memory call
            lse = self.forward(q, k, v, q_len, kv_len, causal)[1]
        return super().backward(q, k, v, out, lse, dout, q_len, kv_len, causal)


# -- the whole model against dense: values and gradients ---------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_split_equals_dense(case):
    """Fine/Coarse-KV, compressed/aligned positions, 0-4 sinks, 1-4 segments, GQA (the tiny
    model has 4 query heads on 2 KV heads)."""
    granularity, positions, sinks, seg_len, ratio, segments = case
    comp = comp_config("kv", granularity, positions, sinks, ratio=ratio, segment_length=seg_len)
    layout, out = _dense_and_structured(comp, segments * seg_len, impls=("split",))
    _assert_equal(layout, out, case)


@pytest.mark.parametrize("granularity,positions,num_raw,ratios", [
    ("fine", "aligned", 21, (2, 8, 4)),  # padded last segment: live gists after dead raw tokens
    ("coarse", "compressed", 29, (8, 2, 4, 2)),
    ("fine", "compressed", 32, (2, 8, 4, 8)),  # whole segments, dead slots at segment tails
])
def test_split_mixed_ratios_padding_projections_per_slot(granularity, positions, num_raw, ratios):
    """Per-segment ratios in one batch (dead gist slots), padding up to whole segments (the
    local part compacts live tokens to the front), gist projections, per-slot embeddings."""
    comp = comp_config("kv", granularity, positions, sinks=3, ratio=2, pad_to_segments=True,
                       gist_projections=True, gist_embedding="per_slot")
    layout, out = _dense_and_structured(comp, num_raw, per_segment_ratios=ratios, impls=("split",))
    assert (~layout.alive).sum() > 0
    assert layout.shape.whole_segments == (num_raw == 32)
    _assert_equal(layout, out, f"split, ratios {ratios}")


def test_split_stop_gradient_and_pre_padded_tokens():
    """``stop_gist_memory_gradient`` holds the compacted memory's gists (not its sinks) fixed;
    tokens already padded by the caller are still dead."""
    comp = comp_config("kv", "fine", sinks=2, ratio=4)
    layout, out = _dense_and_structured(comp, 24, batch=1, impls=("split",),
                                        stop_gist_memory_gradient=True)
    _assert_equal(layout, out, "stop_gist_memory_gradient")
    comp = comp_config("kv", "coarse", "aligned", sinks=2, ratio=4, segment_length=16,
                       pad_to_segments=True)
    layout, out = _dense_and_structured(comp, 37, batch=1, impls=("split",), pre_padded=True)
    _assert_equal(layout, out, "pre-padded")


@pytest.mark.parametrize("granularity,positions", [("fine", "compressed"), ("coarse", "aligned")])
def test_no_leak_in_split_attention(granularity, positions):
    """Raw tokens reach later segments only through gists (as for decomposed and flash in
    tests/test_gist_core.py): with the gist memory held, earlier raw tokens but the sinks
    get no gradient from a loss on segment 2; without it they do."""
    comp = comp_config("kv", granularity, positions, sinks=2, ratio=4)
    L, s = comp.segment_length, comp.num_sinks
    held = _raw_embedding_grads(comp, stop=True, gist="split")
    assert np.all(held[s:2 * L] == 0.0), "a raw token leaked past its segment"
    assert np.all(held[:s] > 0) and np.all(held[2 * L:] > 0)
    assert np.all(_raw_embedding_grads(comp, stop=False, gist="split")[s:2 * L] > 0)


def test_mutated_backward_fails_the_model_gradient_test(monkeypatch):
    """The memory part's own lse in its backward (instead of the merged one): forward values
    stay equal, the model's gradients must not."""
    comp = comp_config("kv", "fine", "compressed", sinks=2, ratio=4)
    monkeypatch.setattr(split, "XLA", OwnLseMemoryBackward())
    layout, out = _dense_and_structured(comp, 24, batch=1, impls=("split",))
    (_, dense), _ = out["dense"]
    (_, got), _ = out["split"]
    np.testing.assert_allclose(got[:, layout.alive], dense[:, layout.alive], atol=1e-5)
    with pytest.raises(AssertionError, match="split gradients"):
        _assert_equal(layout, out, "mutated")


def test_the_custom_backward_runs(monkeypatch):
    """The gradient goes through split's own backward (the T x T check is in
    test_structured_attention.test_no_t_by_t_array_in_forward_or_backward)."""
    calls: list[str] = []

    class CountingBackward(split_kernel.XlaBackend):  # the custom VJP's backward calls the backend's
        def backward(self, *args, **kwargs):
            calls.append("backward")
            return super().backward(*args, **kwargs)

    monkeypatch.setattr(split, "XLA", CountingBackward())
    comp = comp_config("kv", "fine", sinks=4, ratio=4, segment_length=16)
    cfg, params = model(comp)
    cfg = gist_kernel(cfg, "split")
    layout = build_layout(64, comp)
    arrays, toks = layout_arrays(layout), tokens(1, 64)
    jax.make_jaxpr(jax.grad(lambda p: jnp.sum(compressed_logits(cfg, comp, layout.shape, p, toks, arrays))))(params)
    assert calls  # jax 0.11 inlines custom_vjp_call into the grad jaxpr, so count the calls


# -- the core function and the backend interface ----------------------------------------------


def _core_case(seed=0, b=2, s=3, ts=8, n=4, kh=2, h=16, c=7):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, s, ts, n, h))
    k = jax.random.normal(ks[1], (b, s, ts, kh, h))
    v = jax.random.normal(ks[2], (b, s, ts, kh, h))
    k_mem = jax.random.normal(ks[3], (b, c, kh, h))
    v_mem = jax.random.normal(ks[4], (b, c, kh, h))
    local_len = jnp.array([[8, 8, 5], [8, 6, 8]], jnp.int32)
    memory_len = jnp.array([[3, 7], [2, 5]], jnp.int32)
    return q, k, v, local_len, k_mem, v_mem, memory_len


def _core_dense(q, k, v, local_len, k_mem, v_mem, memory_len):
    """The same attention as one masked softmax per segment over [own segment | memory]."""
    b, s, ts = q.shape[:3]
    c = k_mem.shape[1]
    causal = jnp.tril(jnp.ones((ts, ts), bool))
    own = causal[None, None] & (jnp.arange(ts) < local_len[:, :, None])[:, :, None, :]
    mem_len = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), memory_len], axis=1)
    mem = jnp.broadcast_to((jnp.arange(c) < mem_len[:, :, None])[:, :, None, :], (b, s, ts, c))
    mask = jnp.concatenate([own, mem], axis=-1)
    keys = jnp.concatenate([k, jnp.broadcast_to(k_mem[:, None], (b, s) + k_mem.shape[1:])], axis=2)
    vals = jnp.concatenate([v, jnp.broadcast_to(v_mem[:, None], (b, s) + v_mem.shape[1:])], axis=2)
    fold = lambda x: x.reshape((b * s,) + x.shape[2:])
    out, _ = partial_attention(fold(q), fold(keys), fold(vals), fold(mask))
    return out.reshape(q.shape)


def _check_core(backend, atol=2e-5):
    args = _core_case()
    live = (jnp.arange(8)[None, None, :] < args[3][:, :, None])[..., None, None]
    w = jax.random.normal(jax.random.key(9), args[0].shape) * live

    def loss(fn):
        return lambda q, k, v, km, vm: jnp.sum(w * fn(q, k, v, args[3], km, vm, args[6]))

    diff = (0, 1, 2, 3, 4)
    core = lambda *a: split_kernel.split_attention(backend, *a)
    primal = [args[i] for i in (0, 1, 2, 4, 5)]
    want = jax.jit(jax.value_and_grad(loss(_core_dense), argnums=diff))(*primal)
    got = jax.jit(jax.value_and_grad(loss(core), argnums=diff))(*primal)
    np.testing.assert_allclose(got[0], want[0], atol=atol, rtol=1e-5, err_msg="value")
    for name, g, r in zip(("dq", "dk", "dv", "dk_mem", "dv_mem"), got[1], want[1]):
        np.testing.assert_allclose(g, r, atol=atol, rtol=0, err_msg=name)


def test_core_equals_one_softmax_and_the_mutation_is_caught():
    """GQA 4 on 2, padded segments (local lengths 5, 6), per-segment memory lengths."""
    _check_core(split_kernel.XLA)
    with pytest.raises(AssertionError, match="dq|dk|dv"):
        _check_core(OwnLseMemoryBackward())


def test_xla_backend_backward_is_the_gradient_of_its_forward():
    """With its own output and lse, ``backward`` is autodiff of ``forward`` (GQA, padding
    rows, causal and not): the interface the cuDNN backend shares."""
    ks = jax.random.split(jax.random.key(1), 4)
    q, dout = (jax.random.normal(x, (2, 6, 4, 8)) for x in ks[:2])
    k, v = (jax.random.normal(x, (2, 6, 2, 8)) for x in ks[2:])
    q_len, kv_len = jnp.array([6, 4]), jnp.array([6, 4])
    for causal in (True, False):
        @jax.jit
        def both(q, k, v, dout, causal=causal):
            out, lse = split_kernel.XLA.forward(q, k, v, q_len, kv_len, causal)
            _, vjp = jax.vjp(lambda *a: split_kernel.XLA.forward(*a, q_len, kv_len, causal)[0], q, k, v)
            return out, lse, split_kernel.XLA.backward(q, k, v, out, lse, dout, q_len, kv_len, causal), vjp(dout)

        out, lse, grads, want = both(q, k, v, dout)
        assert lse.shape == (2, 4, 6) and float(lse[1, :, 4:].max()) <= NEG / 2
        assert float(jnp.abs(out[1, 4:]).max()) == 0.0
        for g, r in zip(grads, want):
            np.testing.assert_allclose(g, r, atol=1e-5)


def test_pairs_are_the_dense_mask_entries_of_live_queries():
    """``split_pairs`` counts exactly the (query, key) pairs the dense reference admits, live
    queries only; and exceeds none of flash's."""
    comp = comp_config("kv", "fine", "compressed", sinks=3, ratio=2, pad_to_segments=True)
    for num_raw, ratios in ((21, (2, 8, 4)), (32, (2, 8, 4, 8))):
        layout = build_layout(num_raw, comp, ratios)
        spec = parallel_spec(layout_arrays(layout), comp, batch=1)
        alive = layout.alive
        admitted = np.asarray(spec.mask[0] | (spec.memory_mask[0] & alive[None, :]))[alive]
        pairs = split.split_pairs(layout)
        assert pairs["split"] == int(admitted.sum()) == pairs["local"] + pairs["memory"]
        assert pairs["flash"] > pairs["split"]


# -- cuDNN module and the implementation choice -----------------------------------------------


def test_cudnn_module_reports_unavailable_off_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU the module really runs its self-test")
    assert cudnn_stats.available() is False
    assert "unavailable" in cudnn_stats.unavailable_reason()
    assert cudnn_stats.ready() is None and cudnn_stats.ready("gpu") is None
    q = jnp.zeros((1, 4, 2, 64), jnp.bfloat16)
    assert cudnn_stats.takes(q) and not cudnn_stats.usable_for(q)
    assert split.backend_for(q, None) is split_kernel.XLA


def test_cudnn_backend_traces_with_the_private_primitives():
    """Off GPU nothing runs, but tracing checks the private signatures of this jax version (the
    twin runs 0.11.2): split's forward binds the cuDNN forward twice (local, memory) and its
    gradient the backward twice, with gradients shaped like their inputs."""
    b, s, ts, n, kh, h, c = 2, 3, 16, 4, 2, 64, 12
    q = jnp.zeros((b, s, ts, n, h), jnp.bfloat16)
    k = jnp.zeros((b, s, ts, kh, h), jnp.bfloat16)
    k_mem = jnp.zeros((b, c, kh, h), jnp.bfloat16)
    local_len, memory_len = jnp.full((b, s), ts, jnp.int32), jnp.full((b, s - 1), 5, jnp.int32)

    def loss(q, k, v, km, vm):
        out = split_kernel.split_attention(cudnn_stats.CUDNN, q, k, v, local_len, km, vm, memory_len)
        return jnp.sum(out.astype(jnp.float32))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, k, k_mem, k_mem)
    text = str(jaxpr)
    assert text.count("dot_product_attention_fwd_wrapper") == 2
    assert text.count("dot_product_attention_bwd_wrapper") == 2
    assert [x.aval.shape for x in jaxpr.jaxpr.outvars] == [q.shape, k.shape, k.shape, k_mem.shape, k_mem.shape]


def test_self_test_passes_xla_fails_the_mutation_and_runs_inside_a_trace():
    """The self-test's comparison on backends a CPU has: XLA against itself (0 in float32,
    bf16 rounding well inside the tolerance), the mutated backward far outside it; and it
    evaluates eagerly even when first reached while tracing (``ensure_compile_time_eval``)."""
    assert cudnn_stats.self_test(split_kernel.XLA, dtype=jnp.float32) < 1e-5
    assert cudnn_stats.self_test(split_kernel.XLA) < cudnn_stats.SELF_TEST_TOLERANCE / 3
    assert cudnn_stats.self_test(OwnLseMemoryBackward(), dtype=jnp.float32) > cudnn_stats.SELF_TEST_TOLERANCE
    seen = []

    @jax.jit
    def traced(x):
        with jax.ensure_compile_time_eval():
            seen.append(cudnn_stats.self_test(split_kernel.XLA, dtype=jnp.float32))
        return x + 1

    traced(jnp.zeros(()))
    assert seen and seen[0] < 1e-5


def test_resolve_split_and_auto(monkeypatch):
    if jax.default_backend() != "gpu":  # off GPU: the XLA backend, exact for every layout
        assert resolve_gist_kernel("split") == "split"
        assert resolve_gist_kernel("split", whole_segments=False) == "split"
    monkeypatch.setattr(forward, "_WARNED", set())
    monkeypatch.setattr(cudnn_stats, "ready", lambda backend=None: False)
    monkeypatch.setattr(cudnn_stats, "unavailable_reason", lambda: "no cuDNN here")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_gist_kernel("split", backend="gpu") == "flash"
        assert resolve_gist_kernel("split", backend="gpu") == "flash"
        assert resolve_gist_kernel("auto", backend="gpu") == "flash"
    assert len([w for w in caught if "no cuDNN here" in str(w.message)]) == 1
    monkeypatch.setattr(cudnn_stats, "ready", lambda backend=None: True)
    assert resolve_gist_kernel("auto", backend="gpu") == "split"
    assert resolve_gist_kernel("auto", backend="gpu", compute_dtype="float32") == "decomposed"
    assert resolve_gist_kernel("split", backend="gpu", whole_segments=False) == "split"
    assert resolve_gist_kernel("auto", backend="cpu") == "decomposed"


def test_config_accepts_split_and_other_memories_ignore_it():
    """``split`` is a gist kernel of every KV layout but UniGist's window; Coarse-Rec and the
    full-attention baseline have no gist structure and ignore it (no longer an error)."""
    assert gist_kernel(model(comp_config("kv", "fine"))[0], "split").kernels.gist == "split"
    check_gist_kernel("split", comp_config("kv", "fine"))
    check_gist_kernel("cudnn,split", comp_config("kv", "coarse", "aligned"))
    check_gist_kernel("split", comp_config("recurrent", "coarse"))
    check_gist_kernel("split", comp_config("kv", "coarse").full_attention())
    with pytest.raises(ConfigError, match="no windowed"):
        check_gist_kernel("split", comp_config("kv", "fine", "aligned", window=8))
