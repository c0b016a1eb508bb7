# Two entry points: `make demo` and `make test`. Both create .venv and install on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench peers clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m specdec.cli fetch --models smollm2-135m gemma3-270m --datasets humaneval sharegpt
	$(PY) experiments/demo.py

test: $(STAMP)
	$(PY) -m specdec.cli fetch --models smollm2-135m gemma3-270m --datasets humaneval sharegpt
	$(PY) -m pytest -q -n auto --dist loadgroup

# Side-by-side benchmarks need the independent peers (PyTorch + transformers).
peers: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,peers,plots]'

bench: peers
	$(PY) experiments/bench_autoregressive.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
