# Quick start: `make test` (set up, then run every test and every chapter in the smoke setting) and
# `make course` (run every chapter with its default parameters, write executed copies and figures).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export COURSE_CACHE ?= $(CURDIR)/.cache
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
SETTING ?= cpu

.PHONY: setup test unit notebooks course figures lab bench clean clean-cache

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[notebooks,test,traker,kronfluence]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (pda-course)" >/dev/null
	touch $(STAMP)

# Unit tests, then every chapter with setting="smoke" injected by papermill and executed by nbval.
test: $(STAMP)
	rm -rf build/smoke
	$(PY) tests/prepare_notebooks.py build/smoke setting=smoke
	$(PY) -m pytest tests build/smoke --nbval-lax --durations=15 -rs

unit: $(STAMP)
	$(PY) -m pytest tests -rs

# Every chapter with its default parameters (SETTING=cpu); executed copies go to output/, figures to figures/.
course: $(STAMP)
	mkdir -p output
	@for nb in $(NOTEBOOKS); do \
		echo "== $$nb"; \
		COURSE_SAVE_FIGS=1 $(PY) -m papermill --log-output --no-progress-bar $$nb output/$$(basename $$nb) \
			-p setting $(SETTING) || exit 1; \
	done

figures: course

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf build output

clean-cache:
	rm -rf $(COURSE_CACHE)
