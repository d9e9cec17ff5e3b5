# The README's two commands: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test system-deps slurm slurm-stop bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

system-deps:
	bash .ci/system-deps

# a one-node SLURM on localhost for the tests marked `slurm` (skipped, with the reason, when it cannot start);
# `make slurm-stop` ends the daemons it launched (never ones that were running before)
slurm:
	bash .ci/slurm start || echo "SLURM did not start: tests marked slurm will be skipped" >&2

slurm-stop:
	bash .ci/slurm stop

demo: system-deps $(STAMP)
	$(VENV)/bin/cspt2d demo

# style first (ruff, rules in pyproject.toml), then the tests with SLURM up; the SLURM daemons started for the tests
# are stopped afterwards whatever the tests' outcome, and the tests' exit status is kept
test: system-deps $(STAMP)
	$(VENV)/bin/ruff check .
	$(MAKE) --no-print-directory slurm
	status=0; $(PY) -m pytest -q || status=$$?; bash .ci/slurm stop; exit $$status

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) benchmarks/backproject.py
	$(PY) benchmarks/fidelity.py --refine --geometry-errors

clean:
	rm -rf $(VENV) build dist *.egg-info
