# depthuda: two commands on a fresh machine with Python 3.11 and pip.
#   make demo   create .venv, install, run the toy pipeline end to end, print results
#   make test   create .venv, install with test extras, run the test suite

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
WORKDIR ?= runs/toy

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m depthuda.main --config=configs/toy.py --workdir=$(WORKDIR)

test: install
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs
