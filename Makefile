VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: help venv test lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'

venv: $(PY) ## create .venv with the project and its test tools

test: $(PY) ## run the whole test suite (starts real redis-server and gunicorn)
	$(PY) -m pytest

lint: $(PY) ## ruff and mypy
	$(VENV)/bin/ruff check geo_route tests benchmarks
	$(VENV)/bin/ruff format --check geo_route tests benchmarks
	$(VENV)/bin/mypy

bench: $(PY) ## the /auth decision benchmark (gunicorn, 2 workers, real Redis, wrk)
	$(PY) benchmarks/auth_bench.py

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
