"""CPU smoke test of ``python -m gist_jax.bench``: output fields, not speed."""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

from gist_jax.bench.__main__ import main
from gist_jax.bench.recipe import DEFAULT_CONFIG

REPO = pathlib.Path(__file__).resolve().parents[1]

# The built-in config (gist_jax/bench/default_config.py) shrunk to 4 segments of 16 tokens, ratio 4.
TINY = ["--config.step.seq_len=64", "--config.compression.segment_length=16", "--config.compression.ratios=(4,)"]

FIELDS = ("tokens_per_s", "step_s", "compile_s", "peak_bytes", "train_flops_per_step",
          "model_tflops_per_s", "mfu", "layout_tokens", "device")


def test_train_bench_compare_and_peer(tmp_path):
    out_path = tmp_path / "bench.json"
    out = main([*TINY, "--steps", "1", "--compare", "--peer", "--json", str(out_path)])
    assert [r["attention"] for r in out["results"]] == ["dense", "decomposed", "flash", "split"]
    for r in out["results"]:
        assert all(k in r for k in FIELDS)
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 and r["mfu"] is None  # CPU: no peak
        assert r["layout_tokens"] == 64 + 16  # 4 gists per 16-token segment
    assert out["decomposed_over_dense"] > 0 and out["flash_over_dense"] > 0
    assert out["peer"]["sdpa"]["ours_over_peer"] > 0
    assert json.loads(out_path.read_text())["results"][0]["variant"] == "fine_kv"


def test_bench_runs_without_tensorflow():
    """In a fresh process (this worker may have imported tensorflow for the data tests): the GPU
    machines have no tensorflow, so a benchmark run must never import it."""
    code = ("import sys; from gist_jax.bench.__main__ import main; "
            f"main({TINY + ['--steps', '1']!r}); "
            "print('LOADED', [m for m in ('tensorflow', 'seqio') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED []" in result.stdout, result.stdout[-2000:]


def test_sweep_table_and_plot(tmp_path, capsys):
    plot = tmp_path / "sweep.png"
    out = main([*TINY, "--sweep", "--contexts", "32", "64", "--variants", "full", "coarse_rec", "--steps", "1",
                "--plot", str(plot)])
    rows = out["sweep"]
    assert {(r["variant"], r["seq"]) for r in rows} == {
        (v, n) for v in ("full", "coarse_rec") for n in (32, 64)}
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| context |" in capsys.readouterr().out


def test_decode_bench_fields():
    out = main([*TINY, "--steps", "0", "--decode", "16"])
    assert "step_s" not in out["results"][0] and out["results"][0]["peak_bytes"] > 0  # compile only
    d = out["decode"]
    assert d["new_tokens"] == 16 and "decode_tokens_per_s" in d  # None when below timing noise
    # 64 + 32 raw tokens fed: 4 sinks + 5 finished segments x 4 gists + the open segment.
    assert 0 < d["cache_bytes"] < d["uncompressed_cache_bytes"]


@pytest.mark.requires("torch", "transformers")
def test_peer_alternates_and_reports_the_median_of_pair_ratios():
    """Both sides run the same number of timed repeats, in pairs, and the reported ratio is the
    median of the per-pair ratios (peer seconds / our seconds), with its spread and the load."""
    out = main([*TINY, "--steps", "3", "--peer"])
    peer = out["peer"]["sdpa"]
    assert "error" not in peer, peer
    assert len(peer["ours_step_s"]) == len(peer["peer_step_s"]) == peer["repeats"] == 3
    pair = [p / o for o, p in zip(peer["ours_step_s"], peer["peer_step_s"])]
    assert peer["ours_over_peer"] == pytest.approx(statistics.median(pair))
    assert peer["ratio"]["min"] == pytest.approx(min(pair)) and peer["ratio"]["max"] == pytest.approx(max(pair))
    assert len(peer["loadavg_before"]) == 3 and peer["torch_threads"] >= 1 and peer["device"] == "cpu"
    assert peer["peer_gradient_checkpointing"] is False  # the built-in config: remat none


@pytest.mark.requires("torch", "transformers")
def test_peer_checkpoints_its_layers_when_ours_rematerialises():
    """Same memory trade on both sides: remat on ours means gradient checkpointing on the peer."""
    out = main([*TINY, "--config.model.remat_policy=full", "--steps", "1", "--peer"])
    peer = out["peer"]["sdpa"]
    assert "error" not in peer, peer
    assert peer["peer_gradient_checkpointing"] is True and len(peer["peer_step_s"]) == 1


def test_alternate_runs_a_b_a_b_after_warming_both():
    from gist_jax.bench.peer_torch import alternate, pair_ratios

    calls: list[str] = []
    # After two warm-up pairs: ours 1, 3, 2 s and peer 4, 3, 10 s. Pair ratios 4, 1, 5 (median 4);
    # the ratio of the medians would be 4 / 2 = 2 and the mean 10 / 3.
    times = {"A": iter([9.0, 9.0, 1.0, 3.0, 2.0]), "B": iter([9.0, 9.0, 4.0, 3.0, 10.0])}

    def side(name: str):
        def step() -> float:
            calls.append(name)
            return next(times[name])
        return step

    ours_s, peer_s = alternate(side("A"), side("B"), repeats=3, warmup=2)
    assert calls == ["A", "B"] * 5
    assert ours_s == [1.0, 3.0, 2.0] and peer_s == [4.0, 3.0, 10.0]
    r = pair_ratios(ours_s, peer_s)
    assert (r["median"], r["min"], r["max"]) == (4.0, 1.0, 5.0)
    with pytest.raises(ValueError, match="equal, non-zero repeats"):
        pair_ratios([1.0, 2.0], [1.0])


def test_real_recipe_flags_tie_ae_gist_only_and_the_causal_path():
    out = main([*TINY, "--steps", "1", "--config.objective.tie=True", "--config.objective.ae=True",
                "--config.compression.trainable=gist_only"])
    r = out["results"][0]
    assert (r["tie"], r["ae"], r["trainable"]) == (True, True, "gist_only")
    assert r["train_flops"]["tie"] > 0 and r["train_flops"]["ae"] > 0
    pairs = r["attention_pairs"]
    assert pairs["impl"] == "decomposed" and pairs["tie_computed"] >= pairs["tie_exact"] > 0
    assert r["attention_pairs_computed_over_exact"] == pytest.approx(pairs["computed"] / pairs["exact"])
    assert len(r["loadavg"]) == 3 and r["date"] and r["argv"]
    full = main(["--config", f"{DEFAULT_CONFIG}:full", *TINY, "--steps", "0"])["results"][0]
    assert full["causal_impl"] == "blockwise" and full["attention_pairs"]["impl"] == "causal:blockwise"


def test_config_file_benchmarks_the_runs_own_step():
    """``--config file:variants`` + ``--config.<key>`` overrides: the step the run would train
    (its batch, objectives, compression), parsed by the same loader as gist_jax.main."""
    cfg = str(REPO / "experiments" / "demo.py") + ":tiny,coarse_kv"
    out = main(["--config", cfg, "--config.step.seq_len=128", "--config.objective.ae=False", "--steps", "0"])
    r = out["results"][0]
    assert (r["variant"], r["seq"], r["batch"], r["ae"], r["tie"]) == ("coarse_kv", 128, 8, False, True)
    assert r["peak_bytes"] > 0 and r["model"] == "demo:tiny,coarse_kv"  # results are filed under the run name
    with pytest.raises(SystemExit) as exit_info:
        main(["--config.step.no_such_key=128"])  # one line naming the key, exit 2 (as gist_jax.main)
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["--model", "tiny"])  # the old shape flags are run config now: --config.<key>=<value>


def test_against_alternates_the_run_with_changed_keys():
    """``--against objective.tie_source=precomputed``: the online-TIE step and the same step reading
    precomputed weights from the batch, compiled in one process and timed A B A B; the speed-up
    is the median of the per-pair ratios."""
    out = main([*TINY, "--config.objective.tie=True", "--against", "objective.tie_source=precomputed",
                "--steps", "3", "--warmup", "1"])
    r = out["against"]
    assert r["other"].endswith("with objective.tie_source=precomputed") and r["repeats"] == 3
    assert len(r["base_step_s"]) == len(r["other_step_s"]) == 3
    pairs = [b / o for b, o in zip(r["base_step_s"], r["other_step_s"])]
    assert r["speedup"] == pytest.approx(statistics.median(pairs)) and r["ratio"]["ratios"] == pytest.approx(pairs)
    assert len(r["loadavg_before"]) == 3 and r["device"]
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--against", "tie_source=precomputed"])  # no section: one line, exit 2
    assert exit_info.value.code == 2
