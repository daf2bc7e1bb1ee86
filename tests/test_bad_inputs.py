"""Bad inputs fail at start-up with one line naming the key or file and the fix, exit code 2,
and nothing written (issue 13, "clear errors").

The run-level cases go through the real entry points (``python -m gist_jax.main`` and
``python -m gist_jax.convert``) as concurrent subprocesses; the value checks of every config
section are also covered in-process through ``run_config``, which is where they live.
"""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest
from run_helpers import REPO, main_command, main_env
from test_safetensors_hostile import hostile_files

from gist_jax.errors import ConfigError
from gist_jax.hf.gguf import open_reader, read_gguf_header, read_gguf_metadata, smollm2_gguf_path
from gist_jax.model.config import preset
from gist_jax.train.experiment import check_model_matches_run, run_config
from gist_jax.train.preflight import check_paths, check_workdir

PARALLEL = 4  # concurrent subprocesses: each is mostly a JAX import
LLAMA = {"model_type": "llama", "vocab_size": 264, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Broken inputs, made once: a GGUF cut in its header and one cut in its tensor data, a file
    that is not GGUF, an HF directory of an unsupported model type, an empty corpus directory."""
    root = tmp_path_factory.mktemp("inputs")
    data = smollm2_gguf_path().read_bytes()
    (root / "header_cut.gguf").write_bytes(data[:100_000])
    (root / "data_cut.gguf").write_bytes(data[: len(data) // 2])
    (root / "not.gguf").write_text("<html>404 Not Found</html>\n")
    (root / "gpt2").mkdir()
    (root / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 64}))
    (root / "incomplete").mkdir()
    (root / "incomplete" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "no_weights").mkdir()
    (root / "no_weights" / "config.json").write_text(json.dumps(LLAMA))
    for name, blob in hostile_files(root).items():
        if name in ("cut_to_60_percent", "overlapping_offsets", "header_length_2_62"):
            (root / f"hf_{name}").mkdir()
            (root / f"hf_{name}" / "config.json").write_text(json.dumps(LLAMA))
            (root / f"hf_{name}" / "model.safetensors").write_bytes(blob)
    (root / "empty_corpus").mkdir()
    (root / "a_file").write_text("not a directory\n")
    (root / "read_only").mkdir()
    (root / "read_only").chmod(0o555)
    (root / "params_without_params").mkdir()
    (root / "params_without_params" / "model_config.json").write_text("{}")
    return {p.name: p for p in root.iterdir()}


def run_all(commands: dict[str, list[str]], env: dict[str, str]) -> dict[str, subprocess.CompletedProcess]:
    """Runs the commands ``PARALLEL`` at a time; their results by name."""
    results: dict[str, subprocess.CompletedProcess] = {}
    pending = list(commands.items())
    running: dict[str, subprocess.Popen] = {}
    while pending or running:
        while pending and len(running) < PARALLEL:
            name, cmd = pending.pop(0)
            running[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True)
        name, proc = next(iter(running.items()))
        out, err = proc.communicate(timeout=120)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        del running[name]
    return results


def assert_one_line_exit_2(result: subprocess.CompletedProcess, *names: str) -> None:
    err = result.stderr
    assert result.returncode == 2, (result.args, result.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(("config error: ", "error: ")), last
    for name in names:
        assert name in last, (name, last)


def assert_untouched(workdir: pathlib.Path) -> None:
    """Nothing a later good run in the same workdir would find (no config.json, no checkpoints)."""
    assert not workdir.exists() or not any(workdir.iterdir()), sorted(p.name for p in workdir.iterdir())


Case = tuple[list[str], pathlib.Path, tuple[str, ...]]  # command, what must stay untouched, what the line names


def main_case(workdir: pathlib.Path, *args: str, names: tuple[str, ...]) -> Case:
    config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), "experiments/demo.py:tiny")
    overrides = [a for a in args if not a.startswith("--config=")]
    return main_command(workdir, *overrides, config=config), workdir, names


def convert_case(out: pathlib.Path, *args: str, names: tuple[str, ...]) -> Case:
    return [sys.executable, "-m", "gist_jax.convert", *args, "--out", str(out)], out, names


def cases(inputs: dict[str, pathlib.Path], tmp: pathlib.Path) -> dict[str, Case]:
    """Every fault of the issue, by name."""
    i = {k: str(v) for k, v in inputs.items()}
    return {
        "batch_size_0": main_case(tmp / "a", "--config.step.batch_size=0", names=("step.batch_size=0",)),
        "batch_size_negative": main_case(tmp / "b", "--config.step.batch_size=-8", names=("step.batch_size=-8",)),
        "seq_len_0": main_case(tmp / "c", "--config.step.seq_len=0", names=("step.seq_len=0",)),
        "nan_learning_rate": main_case(tmp / "d", "--config.optimizer.learning_rate=nan",
                                       names=("optimizer.learning_rate=nan",)),
        "negative_grad_clip": main_case(tmp / "e", "--config.optimizer.grad_clip_norm=-1.0",
                                        names=("optimizer.grad_clip_norm=-1.0",)),
        "ae_layer_out_of_range": main_case(tmp / "f", "--config.objective.ae=True", "--config.objective.ae_layer=2",
                                           names=("objective.ae_layer=2", "2 layers")),
        "unknown_variant": main_case(tmp / "g", "--config=experiments/demo.py:tiny,no_such_variant",
                                     names=("no_such_variant", "fine_kv")),
        "missing_config_file": main_case(tmp / "h", "--config=experiments/no_such_file.py:tiny",
                                         names=("experiments/no_such_file.py", "does not exist")),
        "missing_config_file_with_override": main_case(tmp / "i", "--config=experiments/no_such_file.py",
                                                       "--config.step.seq_len=64",
                                                       names=("experiments/no_such_file.py", "does not exist")),
        "unknown_override_key": main_case(tmp / "j", "--config.compression.foo=1",
                                          names=("compression.foo", "segment_length")),
        "missing_params_dir": main_case(tmp / "k", f"--config.model.init=params:{tmp}/no_params",
                                        names=("model.init", "no_params", "does not exist")),
        "params_dir_without_params": main_case(tmp / "l", f"--config.model.init=params:{i['params_without_params']}",
                                               names=("model.init", "params/")),
        "missing_hf_dir": main_case(tmp / "m", f"--config.model.init=hf:{tmp}/no_hf",
                                    names=("model.init", "no_hf", "does not exist")),
        "hf_dir_without_weights": main_case(tmp / "n", f"--config.model.init=hf:{i['no_weights']}",
                                            names=("model.init", "safetensors")),
        "hf_config_incomplete": main_case(tmp / "o", f"--config.model.init=hf:{i['incomplete']}",
                                          names=("model.init", "config.json", "num_attention_heads")),
        "hf_unsupported_model_type": main_case(tmp / "p", f"--config.model.init=hf:{i['gpt2']}",
                                               names=("model.init", "gpt2")),
        "gguf_header_cut": main_case(tmp / "q", f"--config.model.init=gguf:{i['header_cut.gguf']}",
                                     names=("model.init", i["header_cut.gguf"], "truncated")),
        "gguf_data_cut": main_case(tmp / "r", f"--config.model.init=gguf:{i['data_cut.gguf']}",
                                   names=("model.init", i["data_cut.gguf"], "truncated")),
        "not_gguf": main_case(tmp / "s", f"--config.model.init=gguf:{i['not.gguf']}",
                              names=("model.init", i["not.gguf"], "not a GGUF")),
        **{f"hf_safetensors_{n}": main_case(tmp / f"st_{n}", f"--config.model.init=hf:{i[f'hf_{n}']}",
                                            names=("model.init", f"{i[f'hf_{n}']}/model.safetensors", "not a valid"))
           for n in ("cut_to_60_percent", "overlapping_offsets", "header_length_2_62")},
        "missing_tokenizer_dir": main_case(tmp / "t", f"--config.data.tokenizer=hf:{tmp}/no_tokenizer",
                                           names=("data.tokenizer", "no_tokenizer")),
        "corpus_glob_matches_nothing": main_case(
            tmp / "u", f"--config.data.sources=(('files:{i['empty_corpus']}/*.txt', 1.0),)",
            names=("data.sources", "*.txt", "matches no file")),
        "corpus_dir_empty": main_case(tmp / "v", f"--config.data.sources=(('jsonl:{i['empty_corpus']}#text', 1.0),)",
                                      names=("data.sources", "empty_corpus", "matches no file")),
        "workdir_is_a_file": main_case(inputs["a_file"], names=("--workdir", i["a_file"], "is a file")),
        "workdir_read_only": main_case(inputs["read_only"], names=("--workdir", "read-only")),
        "workdir_under_read_only": main_case(inputs["read_only"] / "run", names=("--workdir", "read-only")),
        "convert_unsupported_model_type": convert_case(tmp / "w", "--hf", i["gpt2"],
                                                       names=("model_type='gpt2'", "llama")),
        "convert_gguf_data_cut": convert_case(tmp / "x", "--gguf", i["data_cut.gguf"],
                                              names=(i["data_cut.gguf"], "truncated")),
        "convert_not_gguf": convert_case(tmp / "y", "--gguf", i["not.gguf"], names=(i["not.gguf"], "not a GGUF")),
    }


# One of each kind of check, for the default (fast) run; the slow test runs every case.
FAST = ("nan_learning_rate", "ae_layer_out_of_range", "unknown_variant", "missing_config_file",
        "unknown_override_key", "missing_params_dir", "hf_safetensors_overlapping_offsets", "gguf_header_cut",
        "not_gguf", "missing_tokenizer_dir",
        "corpus_glob_matches_nothing", "workdir_read_only", "convert_unsupported_model_type")


def check_cases(chosen: dict[str, Case], tmp: pathlib.Path) -> None:
    results = run_all({name: command for name, (command, _, _) in chosen.items()},
                      main_env(str(tmp / "tokens"), devices=1))
    for name, (_, untouched, names) in chosen.items():
        assert_one_line_exit_2(results[name], *names)
        if untouched.is_file():  # --workdir names a file
            assert untouched.read_text() == "not a directory\n"
        else:
            assert_untouched(untouched)


def test_bad_runs_exit_2_with_one_line_and_write_nothing(inputs, tmp_path):
    check_cases({name: case for name, case in cases(inputs, tmp_path).items() if name in FAST}, tmp_path)


@pytest.mark.slow
def test_every_bad_run_exits_2_with_one_line_and_writes_nothing(inputs, tmp_path):
    check_cases(cases(inputs, tmp_path), tmp_path)


# -- the value checks, in-process ---------------------------------------------------------------------
NAN, INF = math.nan, math.inf
BAD_VALUES = [
    ("step.batch_size", 0), ("step.batch_size", -1), ("step.seq_len", 0), ("step.seq_len", -64),
    ("step.microbatches", 0), ("step.seed", -1),
    ("optimizer.learning_rate", NAN), ("optimizer.learning_rate", INF), ("optimizer.learning_rate", 0.0),
    ("optimizer.warmup_fraction", NAN), ("optimizer.min_lr_ratio", NAN), ("optimizer.total_steps", 0),
    ("optimizer.b1", 1.0), ("optimizer.b2", NAN), ("optimizer.eps", 0.0), ("optimizer.eps", INF),
    ("optimizer.weight_decay", -0.1), ("optimizer.weight_decay", NAN),
    ("optimizer.grad_clip_norm", -1.0), ("optimizer.grad_clip_norm", 0.0), ("optimizer.grad_clip_norm", NAN),
    ("objective.tie_gamma", NAN), ("objective.tie_gamma", 0.0), ("objective.ae_lambda", NAN),
    ("objective.ae_lambda", -1.0), ("objective.ae_lambda", INF),
    ("train.max_steps", -1), ("train.log_every", 0), ("train.eval_every", -1), ("train.eval_batches", -1),
    ("train.profile_start", -1), ("train.profile_steps", -1),
    ("checkpoint.every", 0), ("checkpoint.keep", 0), ("checkpoint.milestone_every", -1),
    ("checkpoint.export_hf_every", -1),
    ("compression.segment_length", 0), ("compression.segment_length", -16), ("compression.num_sinks", -1),
    ("compression.bptt_segments", -1), ("compression.ratios", (0,)), ("compression.ratios", (2.5,)),
    ("data.max_documents", -1), ("data.prefetch", -1), ("data.seed", -1), ("data.tokenizer", ""),
    ("data.sources", (("stdlib", NAN),)), ("data.sources", (("stdlib", INF),)), ("data.sources", (("stdlib", 0.0),)),
    ("data.sources", (("fils:*.txt", 1.0),)), ("data.upsampling", (("*", 100, NAN),)),
    ("data.upsampling", (("*", -1, 1.0),)),
    ("model.init", "preset:no_such_preset"), ("model.init", "gguf:"), ("model.dtype", "float33"),
    ("model.remat_policy", "sometimes"),
]


def _tiny_config():
    from gist_jax.experiments import demo

    return demo.get_config("tiny")


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_bad_value_names_the_key(key, value):
    config = _tiny_config().to_dict()
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(ConfigError) as raised:
        run_config(config)
    assert key.split(".")[0] in str(raised.value) and field in str(raised.value), str(raised.value)
    assert "\n" not in str(raised.value)


def test_good_tiny_config_passes_every_start_up_check(tmp_path):
    run = run_config(_tiny_config())
    workdir = tmp_path / "new" / "run"
    check_paths(run, workdir)
    assert not (tmp_path / "new").exists()  # checked, not created
    gguf_run = run_config({**_tiny_config().to_dict(), "model": {"init": "gguf:smollm2"}})
    check_paths(gguf_run, tmp_path)


def test_ae_layer_range_is_the_model_layer_count():
    cfg = preset("tiny")  # 2 layers
    for layer in (-2, -1, 0, 1):
        check_model_matches_run(cfg, _with_ae_layer(layer))
    for layer in (-3, 2, 30):
        with pytest.raises(ConfigError, match=rf"objective.ae_layer={layer}: the model has 2 layers"):
            check_model_matches_run(cfg, _with_ae_layer(layer))
    off = _tiny_config().to_dict()
    off["objective"].update(ae=False, ae_layer=30)
    check_model_matches_run(cfg, run_config(off))  # unused when the AE loss is off


def _with_ae_layer(layer: int):
    config = _tiny_config().to_dict()
    config["objective"].update(ae=True, ae_layer=layer)
    return run_config(config)


def test_workdir_checks(tmp_path):
    check_workdir(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_workdir(tmp_path / "file")
    with pytest.raises(ConfigError, match="is a file, so the directory cannot be created"):
        check_workdir(tmp_path / "file" / "run")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(ConfigError, match="read-only"):
        check_workdir(ro)
    ro.chmod(0o755)
    check_workdir(ro)


def test_cache_dir_must_be_writable_only_to_build_stores(tmp_path):
    def run_with_cache(cache: pathlib.Path):
        config = _tiny_config().to_dict()
        config["data"]["cache_dir"] = str(cache)
        return run_config(config)

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="data.cache_dir=.*is a file"):
        check_paths(run_with_cache(tmp_path / "file"), tmp_path / "run")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o555)
    with pytest.raises(ConfigError, match="data.cache_dir=.*read-only"):
        check_paths(run_with_cache(shared), tmp_path / "run")
    from gist_jax.data.store import store_key

    data = run_with_cache(shared).data
    shared.chmod(0o755)
    for split in (data.train_split, data.eval_split):  # a read-only cache that holds every store is fine
        store = shared / store_key(data.sources[0][0], split, data.tokenizer, data.max_documents)
        store.mkdir()
        (store / "meta.json").write_text("{}")
    shared.chmod(0o555)
    check_paths(run_with_cache(shared), tmp_path / "run")


# -- GGUF files, in-process ---------------------------------------------------------------------------
def test_gguf_header_matches_the_reader_and_catches_every_cut(inputs, smollm2_gguf):
    header = read_gguf_header(smollm2_gguf)  # the struct walk reads what gguf's reader reads
    assert header.metadata == {k: v for k, v in read_gguf_metadata(smollm2_gguf).items() if not k.startswith("GGUF.")}
    assert header.hf_config()["num_hidden_layers"] == 30 and len(header.tensor_names) == 272
    head = inputs["header_cut.gguf"].read_bytes()
    cut = inputs["header_cut.gguf"].parent / "cut.gguf"
    for size in (4, 8, 23, 5_000):
        cut.write_bytes(head[:size])
        with pytest.raises(ConfigError, match=rf"{cut}.*truncated or damaged.*re-download"):
            read_gguf_header(cut)
    with pytest.raises(ConfigError, match=rf"{inputs['data_cut.gguf']}.*truncated.*its tensors need"):
        read_gguf_header(inputs["data_cut.gguf"])
    with pytest.raises(ConfigError, match=rf"{inputs['header_cut.gguf']}.*truncated or damaged"):
        open_reader(inputs["header_cut.gguf"])  # the reader itself (convert, eval) says the same
    with pytest.raises(ConfigError, match="not a GGUF file"):
        open_reader(inputs["not.gguf"])
    with pytest.raises(ConfigError, match="does not exist"):
        read_gguf_header(inputs["not.gguf"].parent / "absent.gguf")


def test_tokenizer_spec_forms_are_one_parser():
    from gist_jax.data.tokenizer import split_tokenizer_spec

    assert split_tokenizer_spec("bytes") == ("bytes", "")
    assert split_tokenizer_spec("hf:/m/x") == ("hf", "/m/x")
    for bad in ("byte", "hf:", "spm:/x.model", ""):
        with pytest.raises(ValueError, match="unknown tokenizer spec"):
            split_tokenizer_spec(bad)
