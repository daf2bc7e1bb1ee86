"""The experiment files: every file and variant resolves, every documented command parses and
resolves, the paper configs hold the paper's numbers, and bad variant names fail loudly."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import shlex
import types

import pytest
from run_helpers import parse_like_main

from gist_jax.train.experiment import run_config

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
FILES = sorted(p for p in EXPERIMENTS.glob("*.py") if not p.name.startswith("_"))
PAPER_FILES = ["llama3_8b_paper.py", "qwen2_7b_paper.py"]
ARCHITECTURES = ("fine_kv", "coarse_kv", "coarse_rec", "full")
MAIN = "python -m gist_jax.main"


def load(name: str) -> types.ModuleType:
    path = EXPERIMENTS / name
    spec = importlib.util.spec_from_file_location(f"test_cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_expected_files_exist():
    names = {p.name for p in FILES}
    assert {"demo.py", "smollm2_fine_kv.py", "llama3_8b_paper.py", "qwen2_7b_paper.py", "beacon_recipe.py"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_variant_resolves(path):
    module = load(path.name)
    assert set(module.VARIANTS) >= {*ARCHITECTURES, "ae", "noae", "tie", "notie", "tiny"}
    args = [None, ""] + sorted(module.VARIANTS)
    args += [f"{v},tiny" for v in sorted(module.VARIANTS) if v != "tiny"]
    args += [f"{a},ae,tie,tiny" for a in ARCHITECTURES]
    for arg in args:
        run = run_config(module.get_config(arg))
        assert run.name.startswith(path.stem)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_variants_do_what_they_say(path):
    module = load(path.name)
    expect = {"fine_kv": ("kv", "fine"), "coarse_kv": ("kv", "coarse"), "coarse_rec": ("recurrent", "coarse")}
    for name, (memory, granularity) in expect.items():
        comp = run_config(module.get_config(name)).compression
        assert (comp.memory, comp.granularity) == (memory, granularity)
    full = run_config(module.get_config("full"))
    assert full.compression.memory == "none" and not full.step.objective.ae and not full.step.objective.tie
    assert run_config(module.get_config("ae,tie")).step.objective.ae
    assert run_config(module.get_config("ae,tie")).step.objective.tie
    assert not run_config(module.get_config("noae,notie")).step.objective.ae
    tiny = run_config(module.get_config("tiny"))
    assert tiny.model.init == "preset:tiny" and tiny.data.tokenizer == "bytes"
    assert tiny.step.seq_len <= 256 and tiny.num_steps <= 10 and tiny.data.max_documents > 0


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_unknown_and_conflicting_variants_raise(path):
    module = load(path.name)
    with pytest.raises(ValueError, match="unknown variant 'no_such_variant'.*known variants: .*fine_kv"):
        module.get_config("tiny,no_such_variant")
    with pytest.raises(ValueError, match="both set the architecture"):
        module.get_config("fine_kv,coarse_kv")


def documented_commands(doc: str) -> list[list[str]]:
    """Every ``python -m gist_jax.main ...`` command of a docstring, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", doc)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith(MAIN):
            argv = shlex.split(line)
            commands.append([a for a in argv if a != "..."])
    return commands



@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_docstring_commands_run_this_file_and_resolve(path):
    doc = load(path.name).__doc__
    assert f"{MAIN} --config experiments/{path.name}" in doc
    commands = documented_commands(doc)
    assert commands, f"{path.name}: no '{MAIN}' command in the docstring"
    for argv in commands:
        rest = argv[3:]
        config = rest[rest.index("--config") + 1]
        assert config.split(":")[0] == f"experiments/{path.name}", argv
        assert "--workdir" in rest
        fv = parse_like_main([str(REPO / a) if a.startswith("experiments/") else a for a in rest])  # any cwd
        run_config(fv.config)


@pytest.mark.parametrize("name", PAPER_FILES)
def test_paper_configs_hold_the_paper_recipe(name):
    module = load(name)
    for arg in (None, *ARCHITECTURES[:3], "fine_kv,ae,tie"):
        run = run_config(module.get_config(arg))
        assert run.step.seq_len == 16384
        comp = run.compression
        assert (comp.segment_length, comp.num_sinks, comp.ratios, comp.ratio_sampling) == (
            2048, 4, (4, 8, 16, 32), "per_instance")
        opt = run.step.optimizer
        assert (opt.learning_rate, opt.warmup_fraction, opt.min_lr_ratio) == (1e-5, 0.01, 0.5)
        assert run.model.init.startswith("hf:") and run.data.tokenizer == run.model.init
        assert run.model.dtype == "bfloat16" and run.model.param_dtype == "float32"
        assert run.model.remat_policy != "none"
        assert run.step.mesh.fsdp == -1
        assert any(min_tokens >= 4096 and rate > 1 for _, min_tokens, rate in run.data.upsampling)
        assert run.step.batch_size * run.step.seq_len >= 2_000_000  # ~2M tokens per step
    tiny = run_config(module.get_config("coarse_rec,tiny"))
    assert tiny.compression.memory == "recurrent" and tiny.compression.ratios == (4, 8, 16, 32)
    assert tiny.step.seq_len // tiny.compression.segment_length == 16384 // 2048  # same number of segments
    assert tiny.step.mesh.tensor == 1 and tiny.step.microbatches > 1 and tiny.data.upsampling


def test_demo_config_is_the_cpu_demo():
    run = run_config(load("demo.py").get_config())
    assert run.model.init == "gguf:smollm2" and run.data.tokenizer == "gguf:smollm2"
    assert run.data.sources == (("stdlib", 1.0),)
    assert (run.compression.memory, run.compression.granularity) == ("kv", "fine")
    # The recipe docs/recipe.md measured best: gist parameters only, aligned positions, no AE/TIE.
    assert (run.compression.trainable, run.compression.gist_projections, run.compression.positions) == (
        "gist_only", True, "aligned")
    assert not run.step.objective.ae and not run.step.objective.tie
    long = run_config(load("demo.py").get_config("long"))
    assert long.num_steps > run.num_steps and long.compression == run.compression
    assert any(spec.startswith("synthetic:passkey") for spec, _ in long.data.sources)
    before = run_config(load("demo.py").get_config("all_weights"))
    assert before.compression.trainable == "all" and before.step.objective.ae and before.step.objective.tie
    assert before.compression.num_sinks == 4  # the recipe it reproduces
    assert (run.step.seq_len, run.compression.segment_length, run.compression.ratios) == (512, 128, (4, 8))
    assert run.compression.ratio_sampling == "per_instance" and run.compression.num_sinks == 16
    unigist = run_config(load("demo.py").get_config("unigist"))
    assert unigist.compression.window == unigist.compression.segment_length == 128
    assert unigist.compression.replace(window=0) == run.compression  # the demo's recipe, windowed
    tiny_unigist = run_config(load("demo.py").get_config("unigist,tiny"))
    assert tiny_unigist.compression.window == tiny_unigist.compression.segment_length == 16
    assert run.model.dtype == "float32" and run.step.batch_size == 1
    assert run.train.eval_at_start and run.train.eval_every == run.num_steps
    assert run.checkpoint.every == 10
    tiny = run_config(load("demo.py").get_config("tiny"))
    assert tiny.compression.trainable == "all" and tiny.step.objective.ae and tiny.step.objective.tie
    assert run_config(load("demo.py").get_config("noae,tiny")).step.objective == run_config(
        load("demo.py").get_config("tiny,noae")).step.objective  # the tests' structure does not depend on order
    assert (tiny.step.seq_len, tiny.compression.segment_length, tiny.compression.ratios) == (64, 16, (4, 8))
    assert (tiny.step.batch_size, tiny.num_steps, tiny.checkpoint.every, tiny.data.max_documents) == (8, 6, 2, 20)
    assert tiny.train.log_every == 1


def test_beacon_recipe_trains_gist_params_only():
    for arg in (None, "tiny"):
        comp = run_config(load("beacon_recipe.py").get_config(arg)).compression
        assert comp.trainable == "gist_only" and comp.gist_projections and comp.ratio_sampling == "per_segment"
    full = run_config(load("beacon_recipe.py").get_config("full"))
    assert full.compression.trainable == "all"  # gist_only with no gists would train nothing


def test_overriding_one_key_moves_no_other():
    """ml_collections FieldReferences make an override of one key change another; none used here."""
    for path in FILES:
        fv = parse_like_main(["--config", str(path) + ":tiny", "--workdir", "/tmp/x", "--config.train.eval_every=3"])
        run = run_config(fv.config)
        assert run.train.eval_every == 3 and run.num_steps == 6, path.name
