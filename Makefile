# Two commands do all the set-up on a fresh machine (Python >= 3.10 and pip):
#   make train   install into .venv when missing, then train the default experiment on the devset
#   make test    install when missing, then lint + docs build + tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.matsciml-installed
CONSTRAINTS := requirements/constraints.txt
PIP_FLAGS ?=
TRAIN_ARGS ?=

.PHONY: install train test lint format docs pytest clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIP_FLAGS) -c $(CONSTRAINTS) -e '.[dev,docs,all]'
	# mace-torch pins e3nn==0.4.4; it runs (and is tested) on our e3nn, so its pin is skipped
	$(PY) -m pip install --quiet $(PIP_FLAGS) -c $(CONSTRAINTS) --no-deps mace-torch
	@touch $(STAMP)

# One thread: the default model is small, and a second thread only adds synchronisation.
train: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) experiments/training_script.py \
		-e experiments/configs/experiments/devset_energy.yaml \
		-t experiments/configs/trainer/devset_cpu.yaml $(TRAIN_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

pytest: $(STAMP)
	$(PY) -m pytest -q

test: lint docs pytest

clean:
	rm -rf docs/_build .pytest_cache .ruff_cache
