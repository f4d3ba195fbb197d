"""flask.session on tinysession's stores against Flask-Session's backends, in process.

Run ``python bench/flask_backends.py [--requests N] [--rounds R]``. Each
backend serves one Flask app with two views: ``/append`` adds a chat message
to ``session["messages"]`` (kept to the last 20) and ``/read`` returns how
many there are. One browser's session is replayed through ``app.wsgi_app``
with a prepared WSGI environ (no HTTP, no test client); rounds are
interleaved across backends and the table gives the median microseconds per
request. Flask-Session 0.8 (filesystem via cachelib, redis, SQLAlchemy on an
SQLite file) and a redis-server on PATH are optional: what is missing is
skipped with a note on stderr. Prints a Markdown table.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

# This file's own directory leaves the path: its name would shadow the flask_session package.
sys.path[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
import tinysession


def make_app(configure):
    """Return a Flask app with the two views, its sessions set up by ``configure(app)``."""
    import flask

    app = flask.Flask("bench")
    app.config.update(SECRET_KEY="bench key")
    configure(app)

    @app.route("/append")
    def append():
        messages = flask.session.get("messages", [])
        messages.append({"role": "user", "content": "hello " * 20})
        flask.session["messages"] = messages[-20:]
        return "ok"

    @app.route("/read")
    def read():
        return str(len(flask.session.get("messages", ())))

    return app


def tinysession_backend(store):
    def configure(app):
        app.session_interface = tinysession.FlaskSessionInterface(store, clean_interval=None)

    return configure


def flask_session_backend(kind, directory, redis_url):
    def configure(app):
        import flask_session

        app.config.update(SESSION_TYPE=kind, SESSION_PERMANENT=False)
        if kind == "cachelib":
            from cachelib import FileSystemCache

            app.config["SESSION_CACHELIB"] = FileSystemCache(os.path.join(directory, "fs-cache"), threshold=100000)
        elif kind == "redis":
            import redis

            app.config["SESSION_REDIS"] = redis.Redis.from_url(redis_url)
        elif kind == "sqlalchemy":
            from flask_sqlalchemy import SQLAlchemy

            app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + os.path.join(directory, "fs.db")
            app.config["SESSION_SQLALCHEMY"] = SQLAlchemy(app)
        flask_session.Session(app)

    return configure


def prepared_requests(app):
    """Return ``{path: environ}`` carrying the session cookie of one browser with a started session."""
    from werkzeug.test import EnvironBuilder

    response = app.test_client().get("/append")
    cookie = response.headers["Set-Cookie"].split(";")[0]
    return {path: EnvironBuilder(path=path, headers={"Cookie": cookie}).get_environ() for path in ("/append", "/read")}


def time_requests(app, environ, count):
    """Return the mean microseconds per request of ``count`` requests of ``environ``."""
    def start_response(status, headers, exc_info=None):
        if not status.startswith("200"):
            raise RuntimeError(f"benchmark request failed: {status}")

    started = time.perf_counter()
    for _ in range(count):
        body = app.wsgi_app(dict(environ), start_response)
        b"".join(body)
        body.close()
    return (time.perf_counter() - started) / count * 1e6


def start_redis(directory):
    """Start a throwaway redis-server on a free loopback port; return ``(process, url)`` or ``(None, None)``."""
    if shutil.which("redis-server") is None:
        return None, None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", directory],
        stdout=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return process, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    process.terminate()
    return None, None


def backends(directory, redis_url):
    """Yield ``(name, configure)`` for every backend this machine can run."""
    yield "tinysession FileStore", tinysession_backend(tinysession.FileStore(os.path.join(directory, "ts")))
    yield "tinysession SQLiteStore", tinysession_backend(tinysession.SQLiteStore(os.path.join(directory, "ts.db")))
    if redis_url:
        import redis

        yield "tinysession RedisStore", tinysession_backend(tinysession.RedisStore(redis.Redis.from_url(redis_url)))
    try:
        import flask_session  # noqa: F401
    except ImportError:
        print("Flask-Session is not installed: its backends are skipped", file=sys.stderr)
        return
    yield "Flask-Session filesystem (cachelib)", flask_session_backend("cachelib", directory, redis_url)
    if redis_url:
        yield "Flask-Session redis", flask_session_backend("redis", directory, redis_url)
    yield "Flask-Session sqlalchemy (SQLite)", flask_session_backend("sqlalchemy", directory, redis_url)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per round and path")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tinysession-bench-") as directory:
        redis_process, redis_url = start_redis(directory)
        if redis_url is None:
            print("no redis-server on PATH (or redis-py missing): Redis backends skipped", file=sys.stderr)
        try:
            apps = [(name, make_app(configure)) for name, configure in backends(directory, redis_url)]
            prepared = [(name, app, prepared_requests(app)) for name, app in apps]
            timings = {(name, path): [] for name, _, requests in prepared for path in requests}
            for _ in range(args.rounds):
                for name, app, requests in prepared:
                    for path, environ in requests.items():
                        timings[name, path].append(time_requests(app, environ, args.requests))
        finally:
            if redis_process is not None:
                redis_process.terminate()
                redis_process.wait()
    print("| backend | append (µs/request) | read (µs/request) |")
    print("|---|---:|---:|")
    for name, _, _ in prepared:
        append, read = (statistics.median(timings[name, path]) for path in ("/append", "/read"))
        print(f"| {name} | {append:.0f} | {read:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
