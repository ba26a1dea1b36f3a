# The two commands of the README.
#   make demo   set up, build the sample corpus, run the whole pipeline locally (smoke preset) into ./work
#   make test   set up and run the test suite (Slurm tests need `sudo scripts/slurm_local.sh start`)
PY := .venv/bin/python

.PHONY: setup demo test test-slow slurm-start slurm-stop

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m tools.sample_corpus
	$(PY) launch.py --stage all --cluster local --preset smoke --workdir work

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

slurm-start:
	bash scripts/slurm_local.sh start

slurm-stop:
	bash scripts/slurm_local.sh stop
