# The two commands of the README: `make demo` runs the main job, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-slow docs docs-tutorials clean

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

# The documentation site, offline, into site/ (broken links and missing references fail the build).
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Re-run the tutorials (small settings) and save their output and figures for the site.
docs-tutorials: install
	$(PY) docs/hooks/tutorial_pages.py

clean:
	rm -rf $(VENV) bmm_demo_output build site *.egg-info
