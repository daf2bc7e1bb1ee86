"""CPU smoke test of ``python -m gist_jax.bench``: output fields, not speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from gist_jax.bench.__main__ import main

FIELDS = ("tokens_per_s", "step_s", "compile_s", "peak_bytes", "train_flops_per_step",
          "model_tflops_per_s", "mfu", "layout_tokens", "device")


def test_train_bench_compare_and_peer(tmp_path):
    out_path = tmp_path / "bench.json"
    out = main(["--model", "tiny", "--seq", "64", "--segment", "16", "--ratio", "4",
                "--variant", "fine_kv", "--steps", "1", "--compare", "--peer",
                "--json", str(out_path)])
    assert [r["attention"] for r in out["results"]] == ["dense", "decomposed", "flash"]
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
            "main(['--model', 'tiny', '--seq', '64', '--segment', '16', '--ratio', '4', '--steps', '1']); "
            "print('LOADED', [m for m in ('tensorflow', 'seqio') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED []" in result.stdout, result.stdout[-2000:]


def test_sweep_table_and_plot(tmp_path, capsys):
    plot = tmp_path / "sweep.png"
    out = main(["--model", "tiny", "--sweep", "--contexts", "32", "64", "--variants", "full",
                "coarse_rec", "--segment", "16", "--ratio", "4", "--steps", "1", "--plot", str(plot)])
    rows = out["sweep"]
    assert {(r["variant"], r["seq"]) for r in rows} == {
        (v, n) for v in ("full", "coarse_rec") for n in (32, 64)}
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| context |" in capsys.readouterr().out


def test_decode_bench_fields():
    out = main(["--model", "tiny", "--seq", "64", "--segment", "16", "--ratio", "4", "--steps", "0",
                "--decode", "16"])
    assert "step_s" not in out["results"][0] and out["results"][0]["peak_bytes"] > 0  # compile only
    d = out["decode"]
    assert d["new_tokens"] == 16 and "decode_tokens_per_s" in d  # None when below timing noise
    # 64 + 32 raw tokens fed: 4 sinks + 5 finished segments x 4 gists + the open segment.
    assert 0 < d["cache_bytes"] < d["uncompressed_cache_bytes"]
