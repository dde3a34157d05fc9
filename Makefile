# The two commands of the README: `make demo` runs the main job, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-slow bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $@

demo: install
	$(VENV)/bin/bmm demo --out bmm_demo_output

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) bmm_demo_output build *.egg-info
