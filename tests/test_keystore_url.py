"""The ``key_store`` setting's URL: what is accepted, what is refused, and that no message shows a password."""

from __future__ import annotations

import pytest

from gateway.keystore.url import MEMORY, RedisLocation, parse_key_store_url
from models.errors import InvalidArgumentError


def test_memory_is_the_in_process_store():
    assert parse_key_store_url("memory") == MEMORY


@pytest.mark.parametrize(
    ("url", "tls", "host", "port", "db", "username", "password"),
    [
        ("redis://127.0.0.1:6390/2", False, "127.0.0.1", 6390, 2, None, None),
        ("redis://redis.internal", False, "redis.internal", 6379, 0, None, None),
        ("redis://:s3cr%40t@cache:7000/0", False, "cache", 7000, 0, None, "s3cr@t"),
        ("redis://hegate:pw@cache:7000/", False, "cache", 7000, 0, "hegate", "pw"),
        ("rediss://[::1]:6380/1", True, "::1", 6380, 1, None, None),
    ],
)
def test_redis_urls_are_parsed(url, tls, host, port, db, username, password):
    location = parse_key_store_url(url)
    assert isinstance(location, RedisLocation)
    assert (location.tls, location.host, location.port, location.db, location.username) == (
        tls,
        host,
        port,
        db,
        username,
    )
    assert (location.password.get_secret_value() if location.password else None) == password
    assert "pw" not in location.display and "s3cr" not in location.display and "s3cr" not in repr(location)


def test_the_display_form_is_the_url_without_credentials():
    assert parse_key_store_url("redis://:hunter2@10.0.0.5:6390/4").display == "redis://10.0.0.5:6390/4"
    assert parse_key_store_url("rediss://[::1]:6380/1").display == "rediss://[::1]:6380/1"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:6379/0", "must be 'memory' or redis://"),
        ("redis.internal:6379", "must be 'memory' or redis://"),
        ("Memory", "must be 'memory' or redis://"),
        ("redis://:6379/0", "names no host"),
        ("redis://127.0.0.1:65536/0", "out of range"),
        ("redis://127.0.0.1:0/0", "port must be 1-65535"),
        ("redis://127.0.0.1:port/0", "key store URL"),
        ("redis://127.0.0.1:6379/zero", "the database must be an integer"),
        ("redis://127.0.0.1:6379/-1", "the database must be an integer"),
        ("redis://127.0.0.1:6379/0?ssl=true", "no query"),
    ],
)
def test_malformed_urls_are_refused_naming_the_problem(url, message):
    with pytest.raises(InvalidArgumentError, match=message):
        parse_key_store_url(url)


@pytest.mark.parametrize(
    "url", ["redis://:hunter2@127.0.0.1:99999/0", "http://:hunter2@host/0", "redis://:hunter2@host:1/x"]
)
def test_a_refusal_never_repeats_the_password(url):
    with pytest.raises(InvalidArgumentError) as caught:
        parse_key_store_url(url)
    assert "hunter2" not in str(caught.value) and "\n" not in str(caught.value)
