# The README's two commands: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test system-deps slurm bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

system-deps:
	bash .ci/system-deps

# a one-node SLURM on localhost for the tests marked `slurm` (skipped, with the reason, when it cannot start)
slurm:
	bash .ci/slurm start || echo "SLURM did not start: tests marked slurm will be skipped" >&2

demo: system-deps $(STAMP)
	$(VENV)/bin/cspt2d demo

test: system-deps slurm $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) benchmarks/backproject.py
	$(PY) benchmarks/fidelity.py --refine --geometry-errors

clean:
	rm -rf $(VENV) build dist *.egg-info
