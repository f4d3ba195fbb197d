"""A pytest plugin that puts tinysession behind Flask-Session's ``Session(app)``.

Loaded with ``-p tinysession_flask_session``. ``TINYSESSION_STORE`` picks the
store that replaces Flask-Session's backends (``file``, ``sqlite`` or
``redis``; ``flask-session`` leaves Flask-Session's own backends in place,
for the baseline run), ``TINYSESSION_REDIS_URL`` the Redis server (Flask-Session's
own Redis test, which calls ``Redis()``, is pointed at it too), and
``TINYSESSION_SECRET_KEY`` a SECRET_KEY to give apps that have none (unset:
the apps keep none, as Flask-Session's tests write them).

Only the backend changes: ``Session(app)`` still reads the configuration and
refuses what Flask-Session refuses; for the four session types under test
(filesystem, cachelib, redis, sqlalchemy) it installs
``tinysession.FlaskSessionInterface`` over a fresh store instead of
Flask-Session's interface. Two checks in the tests ask Flask-Session's
objects, and the adapter answers them from tinysession's public API:

- ``isinstance(flask.session, FileSystemSession)`` (which backend ``Session``
  picked): tinysession's Flask session types are registered as virtual
  subclasses of the session class of each type ``Session`` was configured
  with (Flask's ``SessionMixin`` makes those classes ABCs);
- ``app.session_interface.cache.get("session:<cookie>")`` (what the backend
  stored for a cookie): the session that cookie opens through
  ``FlaskSessionInterface.open_session``, read from the store.

Flask-Session's Redis and SQLAlchemy tests read the backend's own storage
(a Redis key, an SQLAlchemy model); those are not emulated.
"""

import functools
import os
import tempfile

import flask
import flask_session
import pytest
import redis

import tinysession

_SESSION_CLASSES = {
    "filesystem": ("flask_session.filesystem", "FileSystemSession"),
    "cachelib": ("flask_session.cachelib", "CacheLibSession"),
    "redis": ("flask_session.redis", "RedisSession"),
    "sqlalchemy": ("flask_session.sqlalchemy", "SqlAlchemySession"),
}


class _ConfiguredRedis(redis.Redis):
    """``redis.Redis`` whose ``Redis()`` (no address) is the server in TINYSESSION_REDIS_URL."""

    def __init__(self, host=None, port=None, db=None, *args, **kwargs):
        url = redis.connection.parse_url(os.environ["TINYSESSION_REDIS_URL"])
        super().__init__(host or url["host"], port or url["port"], db or url.get("db", 0), *args, **kwargs)


class _StoredSessions:
    """``session_interface.cache`` of the adapter: ``get("session:<cookie>")`` is that cookie's session."""

    def __init__(self, interface):
        self.interface = interface

    def get(self, key):
        app = flask.current_app
        cookie = f"{app.config['SESSION_COOKIE_NAME']}={key.removeprefix('session:')}"
        with app.test_request_context(headers={"Cookie": cookie}):
            session = self.interface.open_session(app, flask.request)
            if session is None or session.new:
                return None
            return dict(session)


class _Interface(tinysession.FlaskSessionInterface):
    """FlaskSessionInterface with the ``cache`` attribute Flask-Session's tests read."""

    @property
    def cache(self):
        return _StoredSessions(self)


def _make_store(kind, directory):
    serializer = tinysession.TaggedJSON()
    if kind == "file":
        return tinysession.FileStore(os.path.join(directory, "sessions"), max_age=3600, serializer=serializer)
    if kind == "sqlite":
        return tinysession.SQLiteStore(os.path.join(directory, "sessions.db"), max_age=3600, serializer=serializer)
    if kind == "redis":
        client = redis.Redis.from_url(os.environ["TINYSESSION_REDIS_URL"])
        client.flushdb()
        return tinysession.RedisStore(client, max_age=3600, serializer=serializer)
    raise ValueError(f"TINYSESSION_STORE must be file, sqlite, redis or flask-session, not {kind!r}")


@functools.cache
def _our_session_types():
    """Return the types of tinysession's Flask sessions, with and without a SECRET_KEY."""
    app = flask.Flask(__name__)
    app.secret_key = "only to see the session's type"
    with tempfile.TemporaryDirectory() as directory, app.test_request_context():
        store = _make_store("file", directory)
        interface = tinysession.FlaskSessionInterface(store)
        types = type(interface.open_session(app, flask.request)), type(interface.make_null_session(app))
        store.close()
    return types


def pytest_configure(config):
    if "TINYSESSION_REDIS_URL" in os.environ:
        redis.Redis = _ConfiguredRedis  # before the test modules run "from redis import Redis"


@pytest.fixture(autouse=True)
def _tinysession_backend(monkeypatch):
    kind = os.environ.get("TINYSESSION_STORE", "file")
    if kind == "flask-session":
        yield
        return
    original = flask_session.Session._get_interface
    stores = []

    def get_interface(self, app):
        session_type = str(app.config.get("SESSION_TYPE")).lower()
        if session_type not in _SESSION_CLASSES:
            return original(self, app)
        module, name = _SESSION_CLASSES[session_type]
        for ours in _our_session_types():
            getattr(__import__(module, fromlist=[name]), name).register(ours)
        if os.environ.get("TINYSESSION_SECRET_KEY") and not app.secret_key:
            app.secret_key = os.environ["TINYSESSION_SECRET_KEY"]
        stores.append(_make_store(kind, tempfile.mkdtemp(dir=directory)))
        return _Interface(stores[-1])

    with tempfile.TemporaryDirectory(prefix="tinysession-peer-") as directory:
        monkeypatch.setattr(flask_session.Session, "_get_interface", get_interface)
        yield
        for store in stores:
            store.close()
