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
	$(PY) -m pip install -q -e '.[notebooks,test,traker,kronfluence,cluster]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (pda-course)" >/dev/null
	touch $(STAMP)

# Unit tests, then every chapter with setting="smoke" injected by papermill and executed by nbval.
test: $(STAMP)
	rm -rf build/smoke
	$(PY) tests/prepare_notebooks.py build/smoke setting=smoke
	$(PY) -m pytest tests build/smoke --nbval-lax --durations=15 -rs

unit: $(STAMP)
	$(PY) -m pytest tests -rs

# Every chapter with its default parameters (SETTING=cpu); executed copies go to output/, figures to figures/,
# a line per chapter with its wall time when it ends, and the table of run times (papermill's) to output/runtimes.md.
course: $(STAMP)
	mkdir -p output
	@i=0; for nb in $(NOTEBOOKS); do \
		i=$$((i + 1)); name=$$(basename $$nb); t0=$$(date +%s); \
		echo "[$$i/$(words $(NOTEBOOKS))] $$name ..."; \
		COURSE_SAVE_FIGS=1 $(PY) -m papermill --log-output --no-progress-bar $$nb output/$$name \
			-p setting $(SETTING) || exit 1; \
		echo "[$$i/$(words $(NOTEBOOKS))] $$name ... $$(($$(date +%s) - t0)) s"; \
	done
	$(PY) tools/runtimes.py output/ > output/runtimes.md
	@cat output/runtimes.md

figures: course

# Jupyter refuses to run as root (a container's default user) without --allow-root; a normal user gets no flag.
LAB_FLAGS := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root)
lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(LAB_FLAGS) notebooks

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# Student copies of the chapters in student/: each solution between `### BEGIN SOLUTION` and `### END SOLUTION`
# replaced by a stub that sets its answer variables to None (see tools/make_student.py), outputs cleared.
.PHONY: student
student: $(STAMP)
	rm -rf student
	$(PY) tools/make_student.py notebooks student

clean:
	rm -rf build output

clean-cache:
	rm -rf $(COURSE_CACHE)
