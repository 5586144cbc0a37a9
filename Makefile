# Two commands for a fresh clone:  `make run` (the server)  and  `make test` (the whole suite).
# Both install .venv/ from uv.lock first (exact versions and hashes; `make upgrade` re-locks).
SHELL := /bin/bash
VENV  := .venv
PY    := $(shell command -v python3.11 || command -v python3)
UV    := UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=$(VENV) $(VENV)/bin/uv
UV_VERSION := $(shell sed -n 's/^uv==\([0-9.]*\).*/\1/p' requirements-uv.txt)
STAMP := $(VENV)/.synced-$(shell cat uv.lock requirements-uv.txt | cksum | cut -d' ' -f1)
SOURCES := realtime notifications loadtest bench tests clients/python
#: The suites run a second time on the compiled per-delivery path and its send from C
#: (realtime/native.py).
NATIVE_TESTS := tests/test_native.py tests/test_sendfast.py tests/test_ws_protocol.py tests/test_hot_path.py tests/test_delivery.py tests/test_tiers_e2e.py tests/test_dashboard.py

.PHONY: run test fuzz lint format bench upgrade clean venv native

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

# The per-delivery path compiled with mypyc (realtime/native.py): built when missing or stale,
# where the machine has a C compiler and Python's headers; otherwise it says why and the
# server runs interpreted.
native: venv
	@$(VENV)/bin/python -m realtime.native_build --if-needed --optional

run: venv native
	$(VENV)/bin/realtime serve

test: venv native
	@command -v redis-server >/dev/null || [ -n "$$REALTIME_TEST_REDIS_URL" ] || [ -x /usr/bin/redis-server ] || [ -x /usr/sbin/redis-server ] || { \
		echo "make test: redis-server is not installed. The tests run a real Redis."; \
		echo "  Debian/Ubuntu: sudo apt-get install redis-server    macOS: brew install redis"; \
		echo "  or point REALTIME_TEST_REDIS_URL at a Redis you can flush."; exit 1; }
	@rm -f .coverage .coverage.*
	REALTIME_NATIVE=off $(VENV)/bin/coverage run -m pytest $(PYTEST_ARGS)
	@$(VENV)/bin/coverage combine --quiet
	$(VENV)/bin/coverage report
	@# The suites of the per-delivery path once more, on the compiled modules.
	@if $(VENV)/bin/python -c 'import realtime, sys; sys.exit(not realtime.NATIVE.startswith("compiled"))'; then \
		echo "make test: the per-delivery path's suites on the compiled modules"; \
		$(VENV)/bin/python -m pytest -q $(NATIVE_TESTS); \
	else \
		echo "make test: no compiled pass ($$($(VENV)/bin/python -c 'import realtime; print(realtime.NATIVE)'))"; \
	fi

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

bench: venv native
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
	rm -rf $(VENV) realtime/_native .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.* htmlcov
