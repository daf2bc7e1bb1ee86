"""``python -m gist_jax.inspect_data``: its numbers are the token stores' numbers, its histogram
counts every document, and its sample rows carry exactly the gists the training loop inserts.

Runs in-process on ``experiments/demo.py:tiny`` (bytes tokenizer, 20 documents per split) with the
token cache in ``tmp_path``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import numpy as np
import pytest

from gist_jax import inspect_data
from gist_jax.data.loader import Sequencer, SpecialIds
from gist_jax.data.store import ensure_store
from gist_jax.train.experiment import run_config
from gist_jax.train.step_layouts import step_ratios

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.py"


def tiny_run(variants: str = "tiny"):
    spec = importlib.util.spec_from_file_location("inspect_test_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return run_config(module.get_config(variants))


def run_inspect(capsys, *args: str) -> str:
    code = inspect_data.main(["inspect_data", f"--config={DEMO}:tiny", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def section(out: str, title: str) -> list[str]:
    """Lines of the first ``== <title>...`` section."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"== {title}"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("== ")), len(lines))
    return lines[start + 1:end]


@pytest.fixture
def cache(tmp_path: pathlib.Path, monkeypatch) -> pathlib.Path:
    monkeypatch.setenv("GIST_JAX_CACHE", str(tmp_path))
    return tmp_path


def test_counts_histogram_and_gists_match_the_stores_and_the_loop(cache: pathlib.Path, capsys):
    out = run_inspect(capsys, "--steps=2", "--sample-rows=2")
    run = tiny_run()
    assert run.data.cache_dir == str(cache) and f"cache {cache}" in out

    # 1. token counts are the stores' counts, for both splits
    rows = {m["split"]: (int(m["docs"].replace(",", "")), int(m["tokens"].replace(",", "")))
            for m in re.finditer(r"^stdlib\s+1\.00 (?P<split>\w+)\s+(?P<docs>[\d,]+)\s+(?P<tokens>[\d,]+)", out,
                                 re.MULTILINE)}
    stores = {split: ensure_store("stdlib", split, "bytes", cache, run.data.max_documents)
              for split in ("train", "validation")}
    assert rows == {split: (s.num_documents, s.num_tokens) for split, s in stores.items()}
    assert rows["train"][0] == 20

    # 2. the histogram counts every document of the split once, in the right buckets
    hist = [re.match(r"\s*([\d,]+) -\s+([\d,]+) │ █* +(\d+)$", line) for line in section(out, "Document lengths")]
    hist = [(int(m[1].replace(",", "")), int(m[2].replace(",", "")), int(m[3])) for m in hist if m]
    assert sum(count for _, _, count in hist) == stores["train"].num_documents
    lengths = stores["train"].lengths
    assert [count for low, high, count in hist] == [int(np.sum((lengths >= lo) & (lengths <= hi)))
                                                    for lo, hi, _ in hist]

    # 3. packing: concat fills every sequence but the epoch's last
    packed = "\n".join(section(out, "Packed sequences"))
    framed = stores["train"].num_tokens + stores["train"].num_documents  # + one EOS per document
    assert f"tokens per epoch         {framed:,}" in packed
    assert f"sequences per epoch      {-(-framed // run.step.seq_len):,}" in packed

    # 4. gist markers: the ratio the training loop draws at that step, t = L / r gists per segment
    comp = run.compression
    num_segments = run.step.seq_len // comp.segment_length
    samples = list(iter_samples(out))
    assert len(samples) == 4
    for header, text in samples:
        step, row, ratios, gists = re.match(r"step (\d+), row (\d+) \(train\): .*ratios \[([\d, ]+)\], (\d+) gists",
                                            header).groups()
        want_ratios, _ = step_ratios(run, int(step), num_segments)
        assert [int(r) for r in ratios.split(",")] == list(want_ratios)
        expected = sum(comp.segment_length // r for r in want_ratios)
        markers = [int(k) for k in re.findall(r"⟦G×(\d+)⟧", text)]
        assert int(gists) == sum(markers) == expected
        assert len(markers) == expected  # fine granularity: one gist after every r tokens
        assert text.count("│") == num_segments - 1
        check_text_is_the_row(run, int(step), int(row), text)


def iter_samples(out: str):
    """(header, row text) of every sample: the text lies between the legend line and its end line."""
    for block in out.split("\n== Sample: ")[1:]:
        header, _legend, rest = block.split("\n", 2)
        yield header, rest[:rest.index("\n── end of step")]


def check_text_is_the_row(run, step: int, row: int, text: str) -> None:
    """Markers removed, the sample is the loader's row (ASCII rows: bytes decode one-to-one)."""
    data = run.data
    from gist_jax.data.loader import open_stores

    ids = SpecialIds.from_tokenizer_spec(data.tokenizer)
    sequencer = Sequencer(data, open_stores(data, "train"), run.step.seq_len, ids)
    tokens = sequencer.rows(np.array([step * run.step.batch_size + row]))["tokens"][0]
    if any(128 <= t < 256 for t in tokens.tolist()):
        return
    want = "".join({ids.eos: "⟨eos⟩", ids.bos: "⟨bos⟩"}.get(t, chr(t) if t < 256 else "?") for t in tokens.tolist())
    assert re.sub(r"⟦G×\d+⟧|│", "", text) == want


def test_coarse_validation_and_errors(cache: pathlib.Path, capsys):
    code = inspect_data.main(["inspect_data", f"--config={DEMO}:tiny,coarse_kv", "--split=validation",
                              "--config.data.packing=doc_start"])
    out, _ = capsys.readouterr()
    assert code == 0
    run = tiny_run("tiny,coarse_kv")
    header, text = next(iter_samples(out))
    assert header.startswith("step 0, row 0 (validation): coarse kv")
    ratios, _ = step_ratios(run, 0, run.step.seq_len // run.compression.segment_length)
    markers = [int(k) for k in re.findall(r"⟦G×(\d+)⟧", text)]
    assert markers == [run.compression.segment_length // r for r in ratios]  # coarse: all gists after the segment
    assert "packing doc_start" in out

    assert inspect_data.main(["inspect_data", f"--config={DEMO}:tiny", "--config.data.packing=bad"]) == 2
    assert "data.packing='bad'" in capsys.readouterr().err
    assert inspect_data.main(["inspect_data", f"--config={DEMO}:tiny", "--split=test"]) == 2
    assert "split" in capsys.readouterr().err


def test_length_histogram_buckets():
    assert inspect_data.length_histogram(np.array([1, 2, 3, 4, 9])) == [(1, 1, 1), (2, 3, 2), (4, 7, 1), (8, 15, 1)]
    assert inspect_data.length_histogram(np.array([], np.int64)) == []


def test_render_row_marks_eos_padding_segments_and_gists():
    from gist_jax.data.tokenizer import ByteTokenizer
    from gist_jax.gist.config import CompressionConfig
    from gist_jax.gist.layout import build_layout

    ids = SpecialIds(bos=ByteTokenizer.bos_id, eos=ByteTokenizer.eos_id, pad=ByteTokenizer.pad_id)
    tokens = np.array([*b"abcdefgh", ids.eos, *b"xyz", *[ids.pad] * 4], np.int32)
    valid = np.arange(16) < 12
    fine = CompressionConfig(segment_length=8, ratios=(4,), ratio_sampling="fixed", num_sinks=0)
    render = inspect_data.render_row
    assert render(tokens, valid, build_layout(16, fine), ByteTokenizer().decode, ids) == \
        "abcd⟦G×1⟧efgh⟦G×1⟧│⟨eos⟩xyz⟦G×1⟧⟨pad×4⟩⟦G×1⟧"
    coarse = fine.replace(granularity="coarse")
    assert render(tokens, valid, build_layout(16, coarse), ByteTokenizer().decode, ids) == \
        "abcdefgh⟦G×2⟧│⟨eos⟩xyz⟨pad×4⟩⟦G×2⟧"
