"""A pytest plugin that serves every Flask app's session from tinysession.

Loaded with ``-p tinysession_plugin``; ``TINYSESSION_STORE`` picks the store
(``file``, ``sqlite`` or ``redis``; ``flask`` leaves Flask's own cookie
sessions in place, for the comparison run), ``TINYSESSION_REDIS_URL`` the
Redis server. Each test gets a fresh, empty store.
"""

import os
import tempfile

import flask
import pytest

import tinysession


def _options():
    """The store options of a Flask app's store: TaggedJSON, as the README's Flask quick start builds it."""
    return {"max_age": 3600, "serializer": tinysession.TaggedJSON()}


def _make_store(kind, directory):
    if kind == "file":
        return tinysession.FileStore(os.path.join(directory, "sessions"), **_options())
    if kind == "sqlite":
        return tinysession.SQLiteStore(os.path.join(directory, "sessions.db"), **_options())
    if kind == "redis":
        import redis

        client = redis.Redis.from_url(os.environ["TINYSESSION_REDIS_URL"])
        client.flushdb()
        return tinysession.RedisStore(client, **_options())
    raise ValueError(f"TINYSESSION_STORE must be file, sqlite, redis or flask, not {kind!r}")


@pytest.fixture(autouse=True)
def _tinysession_interface(monkeypatch):
    kind = os.environ.get("TINYSESSION_STORE", "file")
    if kind == "flask":
        yield
        return
    with tempfile.TemporaryDirectory(prefix="tinysession-peer-") as directory:
        store = _make_store(kind, directory)
        monkeypatch.setattr(
            flask.Flask, "session_interface", tinysession.FlaskSessionInterface(store)
        )
        yield
        store.close()
