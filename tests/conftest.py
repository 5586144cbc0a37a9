"""Shared test configuration: real Redis (tests/redis_server.py) and the HTTP/2 push fakes."""

pytest_plugins = [
    "tests.redis_server",
    "tests.redis_sentinel",
    "tests.redis_cluster",
    "tests.fakes.apns_server",
    "tests.fakes.fcm_server",
]
