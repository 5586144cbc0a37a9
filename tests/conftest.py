"""Shared test configuration: registers the real-Redis fixtures (tests/redis_server.py)."""

pytest_plugins = ["tests.redis_server"]
