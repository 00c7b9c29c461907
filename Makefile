# depthuda: two commands on a fresh machine with Python 3.11 and pip.
#   make demo   create .venv, install, run the toy pipeline end to end, print results
#   make test   create .venv, install with the test extra (adds torch), run the test suite
#   make test-cluster  the whole pipeline on several local processes, against one process
#   make rehearse  the five experiment configs, tiny network, on synthetic data of real size

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
WORKDIR ?= runs/toy
# Test processes: XLA's compiler, most of the suite's time, uses one core per process. Each
# needs up to ~5.5 GB (the serial suite peaked at 5.4 GB resident).
TEST_JOBS ?= 2

.PHONY: demo test test-cluster rehearse install clean

# `demo` installs depthuda alone; `test` adds the test extra (pytest and the CPU build of torch,
# the reference the tests compare with).
$(VENV)/.venv:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.venv
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.venv
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

demo: install
	$(PY) -m depthuda.main --config=configs/toy.py --workdir=$(WORKDIR)

test: $(VENV)/.installed-test
	$(PY) -m pytest tests -m 'not cluster' -n $(TEST_JOBS)

test-cluster: $(VENV)/.installed-test
	$(PY) -m pytest tests -m cluster

rehearse: install
	$(PY) tests/rehearse.py

clean:
	rm -rf $(VENV) runs
