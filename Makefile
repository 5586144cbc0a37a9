# Two commands for a fresh clone:  `make run` (the server)  and  `make test` (the whole suite).
# Both install .venv/ from uv.lock first (exact versions and hashes; `make upgrade` re-locks).
SHELL := /bin/bash
VENV  := .venv
PY    := $(shell command -v python3.11 || command -v python3)
UV    := UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=$(VENV) $(VENV)/bin/uv
UV_VERSION := $(shell sed -n 's/^uv==\([0-9.]*\).*/\1/p' requirements-uv.txt)
STAMP := $(VENV)/.synced-$(shell cat uv.lock requirements-uv.txt | cksum | cut -d' ' -f1)
SOURCES := realtime notifications loadtest bench tests clients/python

.PHONY: run test fuzz lint format bench upgrade clean venv

venv: $(STAMP)

$(STAMP): uv.lock pyproject.toml requirements-uv.txt
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed, found " + sys.version.split()[0]' \
		|| { echo "make: install Python 3.11 or newer (python3.11)"; exit 1; }
	@if [ "$$($(VENV)/bin/uv --version 2>/dev/null | cut -d' ' -f2)" != "$(UV_VERSION)" ]; then \
		echo "make: creating $(VENV) with uv $(UV_VERSION)"; \
		$(PY) -m venv --clear $(VENV) && \
		$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
			--require-hashes --no-deps -r requirements-uv.txt; \
	fi
	$(UV) sync --locked --quiet
	@rm -f $(VENV)/.synced-*; touch $@

run: venv
	$(VENV)/bin/realtime serve

test: venv
	@command -v redis-server >/dev/null || [ -n "$$REALTIME_TEST_REDIS_URL" ] || [ -x /usr/bin/redis-server ] || [ -x /usr/sbin/redis-server ] || { \
		echo "make test: redis-server is not installed. The tests run a real Redis."; \
		echo "  Debian/Ubuntu: sudo apt-get install redis-server    macOS: brew install redis"; \
		echo "  or point REALTIME_TEST_REDIS_URL at a Redis you can flush."; exit 1; }
	@rm -f .coverage .coverage.*
	$(VENV)/bin/coverage run -m pytest $(PYTEST_ARGS)
	@$(VENV)/bin/coverage combine --quiet
	$(VENV)/bin/coverage report

lint: venv
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format $(SOURCES)
	$(VENV)/bin/ruff check --fix $(SOURCES)

# The property-based fuzzing of tests/test_fuzz.py at length (CI nights; `make test` runs 40
# examples per property). FUZZ_EXAMPLES=N to change.
FUZZ_EXAMPLES ?= 2000
fuzz: venv
	REALTIME_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) REALTIME_FUZZ_SEED=random $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_fuzz.py

bench: venv
	$(VENV)/bin/python -m bench.run $(BENCH_ARGS)

# Re-lock every dependency to its newest allowed release, install it, and run the whole
# suite: commit uv.lock on its own once it passes.
upgrade: venv
	$(UV) lock --upgrade
	$(UV) sync --locked --quiet
	@rm -f $(VENV)/.synced-*; touch $(VENV)/.synced-$$(cat uv.lock requirements-uv.txt | cksum | cut -d' ' -f1)
	$(MAKE) lint test
	@git diff --stat uv.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.* htmlcov
