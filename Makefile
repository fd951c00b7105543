VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: help bootstrap demo test lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

bootstrap: ## install missing apt packages (nginx, redis-server, docker-registry, skopeo, wrk) and .venv
	bash script/bootstrap

$(PY): bootstrap

demo: ## run the demo: push, pull, replicate, pull, move a tag, pull (real components)
	bash script/demo

test: ## run the whole test suite (real redis-server, docker-registry, nginx, skopeo, gunicorn)
	bash script/test

lint: bootstrap ## ruff and mypy
	$(VENV)/bin/ruff check geo_route tests benchmarks
	$(VENV)/bin/ruff format --check geo_route tests benchmarks
	$(VENV)/bin/mypy

bench: bootstrap ## the /auth decision benchmark (gunicorn, 2 workers, real Redis, wrk)
	$(PY) benchmarks/auth_bench.py

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
