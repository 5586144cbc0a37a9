# Two commands for a fresh clone:  `make run` (the server)  and  `make test` (the whole suite).
SHELL := /bin/bash
VENV  := .venv
PY    := $(shell command -v python3.11 || command -v python3)
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test lint bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed, found " + sys.version.split()[0]' \
		|| { echo "make: install Python 3.11 or newer (python3.11)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $@

run: venv
	$(VENV)/bin/realtime serve

test: venv
	@command -v redis-server >/dev/null || [ -n "$$REALTIME_TEST_REDIS_URL" ] || [ -x /usr/bin/redis-server ] || [ -x /usr/sbin/redis-server ] || { \
		echo "make test: redis-server is not installed. The tests run a real Redis."; \
		echo "  Debian/Ubuntu: sudo apt-get install redis-server    macOS: brew install redis"; \
		echo "  or point REALTIME_TEST_REDIS_URL at a Redis you can flush."; exit 1; }
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check realtime notifications loadtest bench tests
	$(VENV)/bin/mypy

bench: venv
	$(VENV)/bin/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
