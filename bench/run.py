"""Benchmark tinysession against plain baselines and peer session libraries.

    python bench/run.py [--quick] [--dir PARENT] [--redis | --no-redis] [--sections 0123456789c]

Everything runs in one process except where a fresh process is the point
(cleaning and importing). Contenders are interleaved across repetitions (for
each repetition, every contender in a rotated order measures one batch), so
machine drift hits them all alike; tables show medians over repetitions.

0. Serializers: dumps and loads of a 1 KB and a 100 KB chat session, json
   beside TaggedJSON and pickle.
1. Store operations: save (new key), load and update (load, append a message,
   save) of a ~2 KB chat session, per operation, against a plain baseline of
   the same kind: ``raw-file`` (json + temp file + os.replace) for file stores,
   ``raw-sqlite`` (one table, WAL, INSERT OR REPLACE / SELECT) for SQLite
   stores, raw redis-py SET/GET for Redis; the baselines and tinysession's
   stores again with a 64 KB session; wall and CPU time. Then one load in a
   new thread per request (as threaded servers run them) against the same load
   in a reused thread and against starting a thread alone.
2. A full WSGI request cycle, called in-process with prepared environs and a
   cookie jar per user: a request that appends a chat message, one that only
   reads, one that never touches the session.
3. Cleaning a store of which half the sessions are expired, each cleaner in a
   fresh process, with its time and peak memory.
4. The cost of importing each library in a fresh interpreter.
5. Over HTTP: the same Flask app (flask.session) under gunicorn with
   HTTP_WORKERS sync workers, each load-generator connection with its own
   session holding a chat history of 1 KB and of 100 KB: a view that never
   touches the session, one that reads it, one that appends to it, in
   requests/s and the server's CPU per request (from /proc), tinysession's
   stores beside Flask-Session's file, Redis and SQLAlchemy backends and
   Flask's signed cookie.
6. Writers racing on one session, in process.
7. A flood of new sessions against max_sessions, and write latency during a
   large clean; then a writer saving every 10 ms through a SQLiteStore
   clean(keep=1000) at each evict batch size (_SQLITE_EVICT_BATCH set at run
   time), the clean in a thread and in another process, with and without a
   CPU-bound process per core.
8. Over HTTP: the same Starlette app under uvicorn (1 worker), 1 KB sessions:
   no sessions, Starlette's signed-cookie SessionMiddleware, starsessions on
   Redis and tinysession's ASGISessionMiddleware on each store; req/s and
   server CPU per request.
9. The message log: one append and a read of the last 5 rounds on
   conversations of 10 to 10,000 messages, against rewriting the record and
   the store's raw append.
c. Redis Cluster against one server: each RedisStore operation (save, load,
   conditional update, touch, remove, len, stats, clean(keep), clean(max_age))
   on a private 6-node cluster (redis-server --cluster-enabled, joined by
   redis-cli --cluster create) beside one redis-server, and how evenly 10,000
   sessions spread over its 3 masters. Skipped with a note without
   redis-server, redis-cli or redis-py; every node it starts is stopped when
   the section ends, on an error or Ctrl-C too.

The HTTP sections load the servers with wrk (apt-get install wrk) when it is
on PATH, else with a Python load generator in a child process; they need
gunicorn and Flask (5) or uvicorn and Starlette (8), else they are skipped
with a note. --quick runs them with two apps each and 1 s runs.

Every timed batch (a store phase, a request batch, a wrk run) starts after
os.sync() and gc.collect(), untimed, so it does not time the kernel writing
back the previous batch's files.

Markdown goes to stdout, progress to stderr. Peers that cannot be imported are
skipped with a note, so ``--quick`` runs with the standard library alone
(tinysession and the baselines). The peer versions used are pinned in
bench/requirements.txt. tinysession is the tinysession.py of the folder above
this script (or of $TINYSESSION_ROOT), copied and byte-compiled when the run
starts, so one run measures one version even if the checkout changes.
"""

import argparse
import datetime
import functools
import gc
import hashlib
import io
import json
import os
import pickle
import platform
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.environ.get("TINYSESSION_ROOT") or os.path.join(HERE, ".."))

# The module under test, imported by load_tinysession() from a byte-compiled
# snapshot of ROOT/tinysession.py taken when the run starts: the parent and
# every child process then measure the same version, even if the checkout
# changes during the run.
tinysession = None

FULL = {"store_n": 2000, "store_big_n": 500, "big_messages": 440, "thread_n": 2000, "store_reps": 3,
            "req_n": 400, "req_reps": 3, "users": 200,
            "clean_n": 100_000, "clean_reps": 1, "import_runs": 7, "http_s": 2, "http_reps": 3, "http_warmup_s": 1,
            "contended_saves": 50, "flood_keep": 1000, "flood_returning": 300, "flood_new": 20000,
            "busy_files": 100_000, "busy_rows": 300_000, "busy_writes": 2000, "evict_reps": 3,
            "log_n": 200, "log_reps": 3,
            "log_sizes": (10, 100, 1000, 10_000), "http_sizes": ["1 KB", "100 KB"], "http_only": None,
            "cluster_n": 2000, "cluster_reps": 3, "cluster_spread": 10_000}
# One cleaning run each in the full run: building and tearing down a 100,000-file
# layout costs ~30 s per cleaner on a 2-core VM disk; raise clean_reps on a faster one.
QUICK = {"store_n": 100, "store_big_n": 30, "big_messages": 440, "thread_n": 100, "store_reps": 1,
             "req_n": 30, "req_reps": 1, "users": 20,
             "clean_n": 1200, "clean_reps": 1, "import_runs": 1, "contended_saves": 5, "flood_keep": 50,
             "flood_returning": 15, "flood_new": 500, "busy_files": 1500, "busy_rows": 3000, "busy_writes": 100,
             "evict_reps": 1, "log_n": 20, "log_reps": 1, "log_sizes": (10, 100), "http_s": 1, "http_reps": 1,
             "http_warmup_s": 0,
             "http_sizes": ["1 KB"], "http_only": ["no sessions", "tinysession SQLiteStore"], "cluster_n": 100,
             "cluster_reps": 1, "cluster_spread": 2000}
# --quick is CI's smoke run (once per build, under 2 minutes on a loaded 2-core VM): one repetition of small
# sizes, every section and check run; its figures are not the ones to quote.
WARMUP = 20  # operations or requests per contender before any timing

MAX_AGE = 2 * 3600  # the cleaning section's expiry: half the sessions are 3 hours old
SQLITE_PRAGMAS = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL"
DJANGO_SECRET = "bench-secret-key-not-secret-" + "x" * 30
FLASK_SECRET = "bench-flask-secret"
APPEND_TEXT = "And can you check whether my second order has shipped too?"


def log(message):
    print(message, file=sys.stderr, flush=True)


def rotated(items, rep):
    """Return ``items`` rotated by ``rep``, so each contender takes every position in turn."""
    if not items:
        return []
    shift = rep % len(items)
    return items[shift:] + items[:shift]


def proc_status_kb(field, pid="self"):
    """Return a ``/proc/PID/status`` field in kB (VmRSS, VmHWM), or None off Linux."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def wait_for_cleans():
    """Wait until tinysession's background cleans (started by its default max_sessions) have ended."""
    import threading

    for thread in threading.enumerate():
        if thread.name == "tinysession-clean":
            thread.join(60)


def settle():
    """Write every dirty page back to disk and collect garbage: call it, untimed, before a timed batch.

    Without it a batch partly times the kernel's writeback of the previous batch's files.
    """
    wait_for_cleans()
    os.sync()
    gc.collect()


def reset_peak_rss():
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


# -- The payload --


def chat_record(user_id=42):
    """A realistic chat session: user id, CSRF token, a system message and ten messages (~2 KB)."""
    turns = [
        ("Hi, I ordered a pair of trail running shoes last week and they haven't arrived yet.",
         ("Sorry to hear that! I can look into it. Could you give me your order number? It starts "
         "with ACME- and you can find it in the confirmation email we sent you.")),
        ("Sure, it's ACME-2024-118734.",
         ("Thanks. Order ACME-2024-118734 shipped on Monday with the standard carrier and is "
         "currently at the regional sorting centre. The expected delivery date is this Thursday.")),
        ("Thursday is a problem, I won't be home. Can I change the delivery address?",
         ("You can redirect it to a pickup point near you while it's still in transit. I can send "
         "you the link to choose one, or redirect it to your workplace if you give me the address.")),
        ("A pickup point is fine, please send me the link.",
         ("Done: the link is in your inbox. Pick a point before Wednesday noon and the parcel will "
         "be rerouted at no cost. You'll get a text message when it's ready to collect.")),
        ("Great. Also, what's your return policy if they don't fit?",
         ("You have 30 days from delivery to return unworn shoes for a full refund or an exchange. "
         "Returns are free at any pickup point; just print the label from your account page.")),
    ]
    messages = [{"role": "system", "content": "You are the support assistant of ACME Outdoor. "
                 "Be brief and friendly, and always quote the order number when there is one."}]
    for question, answer in turns:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return {"user_id": user_id, "csrf_token": "Xq3v9kR2mT7wLp0sN4yB8cZ1eH6jU5aD-fG_iK2oQ9r",
            "messages": messages}


def new_message():
    return {"role": "user", "content": APPEND_TEXT}


def trim(messages):
    """Keep the system message and the last ten: the same plain rule in every app."""
    if len(messages) > 11:
        del messages[1:len(messages) - 10]


def payload_size():
    return len(json.dumps(chat_record(), separators=(",", ":")).encode())


# -- Peers: imported lazily, skipped with a note when missing --


class Notes:
    def __init__(self):
        self.items = []

    def add(self, text):
        if text not in self.items:
            self.items.append(text)


NOTES = Notes()


def try_import(label, *modules):
    """Import ``modules``; on failure note the peer as skipped and return False."""
    import importlib

    try:
        for module in modules:
            importlib.import_module(module)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means: skip this peer
        NOTES.add(f"skipped {label}: {type(exc).__name__}: {exc}")
        return False


_DJANGO = {}


def django_settings(file_path, db_path, **extra):
    import django

    options = {"init_command": SQLITE_PRAGMAS} if django.VERSION >= (5, 1) else {}
    return dict(
        SECRET_KEY=DJANGO_SECRET,
        INSTALLED_APPS=["django.contrib.sessions"],
        SESSION_FILE_PATH=file_path,
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": db_path, "OPTIONS": options}},
        USE_TZ=True,
        **extra,
    )


def django_ready(workdir):
    """Configure Django once in this process; return the path of an empty migrated database, or None."""
    if "template" in _DJANGO:
        return _DJANGO["template"]
    _DJANGO["template"] = None
    if not try_import("Django", "django.conf"):
        return None
    import django
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connections

    files = os.path.join(workdir, "django-files")
    os.makedirs(files)
    template = os.path.join(workdir, "django-template.sqlite3")
    settings.configure(**django_settings(files, template))
    django.setup()
    call_command("migrate", "sessions", verbosity=0)
    connections["default"].close()
    if django.VERSION < (5, 1):
        NOTES.add("Django < 5.1 has no SQLite init_command: its db backend ran with SQLite's default journal")
    _DJANGO["template"] = template
    return template


def django_use_database(path):
    from django.db import connections

    connection = connections["default"]
    connection.close()
    connection.settings_dict["NAME"] = path


_SQLALCHEMY_PRAGMAS = []


def sqlalchemy_pragmas():
    """Give every SQLAlchemy SQLite connection WAL and synchronous=NORMAL, like the other SQLite rows."""
    if _SQLALCHEMY_PRAGMAS:
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "connect")
    def set_pragmas(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        for pragma in SQLITE_PRAGMAS.split(";"):
            cursor.execute(pragma)
        cursor.close()

    _SQLALCHEMY_PRAGMAS.append(set_pragmas)


# -- Redis --


class RedisServer:
    """A throwaway redis-server on a free loopback port, no persistence; ``options`` go to its command line."""

    def __init__(self, workdir, *options, name="redis"):
        self.process = None
        self.port = None
        self.options = options
        self.workdir = os.path.join(workdir, name)

    def start(self, max_port=65535):
        """Start the server and wait until it answers PING; return None, or what went wrong.

        The port is drawn again until it is at most ``max_port`` (a cluster node needs port + 10000 free
        for its bus).
        """
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            return "no redis-server binary"
        import redis

        self.port = max_port + 1
        while self.port > max_port:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
        os.makedirs(self.workdir)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.workdir, *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    if client.ping():
                        return None
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        return f"redis-server on port {self.port} did not answer within 10 s"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def open_redis_store(client):
    return tinysession.RedisStore(client, prefix="bench:", max_age=86400)


# -- 1. Store operations --
#
# A store contender is a dict: name, group ("file", "sqlite" or "redis"),
# open(directory) -> handle, create(handle, key, record) -> the key it was
# stored under, load(handle, key) -> record, update(handle, key, message)
# and close(handle). The first contender of each group is its baseline.


def kv_contender(name, group, open_, get, put, close=lambda handle: None):
    """A contender for a store addressed by key with get and put."""

    def create(handle, key, record):
        put(handle, key, record)
        return key

    def update(handle, key, message):
        record = get(handle, key)
        record["messages"].append(message)
        put(handle, key, record)

    return {"name": name, "group": group, "open": open_, "create": create, "load": get, "update": update, "close": close}


def raw_file_contender():
    def put(directory, key, record):
        data = json.dumps(record).encode()
        temp = os.path.join(directory, f".{key}.{secrets.token_hex(4)}.tmp")
        with open(temp, "wb") as file:
            file.write(data)
        os.replace(temp, os.path.join(directory, key))

    def get(directory, key):
        with open(os.path.join(directory, key), "rb") as file:
            return json.loads(file.read())

    return kv_contender("raw-file (json, temp file, os.replace)", "file", lambda d: d, get, put)


def raw_sqlite_contender():
    def open_(directory):
        connection = sqlite3.connect(os.path.join(directory, "raw.sqlite3"), isolation_level=None)
        for pragma in SQLITE_PRAGMAS.split(";"):
            connection.execute(pragma)
        connection.execute("CREATE TABLE s (k TEXT PRIMARY KEY, v BLOB NOT NULL, mtime REAL NOT NULL)")
        connection.execute("CREATE INDEX s_mtime ON s (mtime)")
        return connection

    def put(connection, key, record):
        connection.execute("INSERT OR REPLACE INTO s (k, v, mtime) VALUES (?, ?, ?)",
                           (key, json.dumps(record).encode(), time.time()))

    def get(connection, key):
        row = connection.execute("SELECT v FROM s WHERE k = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return json.loads(row[0])

    return kv_contender("raw-sqlite (WAL, INSERT OR REPLACE / SELECT)", "sqlite", open_, get, put,
                        lambda connection: connection.close())


def tinysession_contenders(redis_server):
    def put(store, key, record):
        store[key] = record

    def get(store, key):
        return store[key]

    def close(store):
        wait_for_cleans()  # the default max_sessions starts background cleans: let them end first
        store.close()

    def conditional(contender):
        """The same store, its update a conditional write on the bytes loaded, as the session core saves."""

        def update(store, key, message):
            record, data, _ = store.load(key)
            record["messages"].append(message)
            if not store.save(key, store.encode(key, record), expected=data):
                raise AssertionError("a conditional write failed with no other writer")

        return {**contender, "name": contender["name"] + ", conditional update", "update": update}

    file_store = kv_contender("tinysession FileStore", "file",
                              lambda d: tinysession.FileStore(os.path.join(d, "s"), max_age=86400), get, put, close)
    sqlite_store = kv_contender("tinysession SQLiteStore", "sqlite",
                                lambda d: tinysession.SQLiteStore(os.path.join(d, "s.sqlite3"), max_age=86400),
                                get, put, close)
    contenders = [file_store, conditional(file_store), sqlite_store, conditional(sqlite_store)]
    if redis_server is not None:
        def open_redis(_directory):
            client = redis_server.client()
            client.flushdb()
            return open_redis_store(client)

        contenders.append(kv_contender("tinysession RedisStore", "redis", open_redis, get, put, close))
    return contenders


def raw_redis_contender(redis_server):
    def open_(_directory):
        client = redis_server.client()
        client.flushdb()
        return client

    def put(client, key, record):
        client.set("raw:" + key, json.dumps(record), ex=86400)

    def get(client, key):
        data = client.get("raw:" + key)
        if data is None:
            raise KeyError(key)
        return json.loads(data)

    return kv_contender("raw redis-py (SET EX / GET)", "redis", open_, get, put, lambda c: c.close())


def cachelib_contender(threshold):
    from cachelib.file import FileSystemCache

    def get(cache, key):
        record = cache.get(key)
        if record is None:
            raise KeyError(key)
        return record

    def put(cache, key, record):
        if not cache.set(key, record):
            raise OSError(f"cachelib could not store {key}")

    label = "no count" if threshold == 0 else f"threshold={threshold:,}, counts files"
    return kv_contender(
        f"cachelib FileSystemCache ({label})", "file",
        lambda d: FileSystemCache(os.path.join(d, "c"), threshold=threshold, default_timeout=86400), get, put)


def beaker_contender():
    from beaker.session import Session

    def open_(directory):
        return {"type": "file", "data_dir": os.path.join(directory, "data"),
                    "lock_dir": os.path.join(directory, "lock"), "use_cookies": False}

    def create(options, key, record):
        session = Session({}, id=key, **options)
        session.update(record)
        session.save()
        return key

    def load(options, key):
        session = Session({}, id=key, **options)
        if "messages" not in session:
            raise KeyError(key)
        return session

    def update(options, key, message):
        session = Session({}, id=key, **options)
        session["messages"].append(message)
        session.save()

    return {"name": "Beaker file Session", "group": "file", "open": open_, "create": create, "load": load,
                "update": update, "close": lambda options: None}


def django_contender(backend, template):
    """Django's file or db SessionStore; Django picks the keys, so create returns its own."""
    if backend == "file":
        from django.contrib.sessions.backends.file import SessionStore

        def open_(directory):
            SessionStore._storage_path = directory  # what SESSION_FILE_PATH is read into, once per class
    else:
        from django.contrib.sessions.backends.db import SessionStore

        def open_(directory):
            path = os.path.join(directory, "django.sqlite3")
            shutil.copyfile(template, path)
            django_use_database(path)

    def create(_handle, _key, record):
        session = SessionStore()
        session.update(record)
        session.save()
        return session.session_key

    def load(_handle, key):
        record = SessionStore(key).load()
        if not record:
            raise KeyError(key)
        return record

    def update(_handle, key, message):
        session = SessionStore(key)
        messages = session["messages"]
        messages.append(message)
        session["messages"] = messages
        session.save()

    return {"name": f"Django {backend} SessionStore", "group": "file" if backend == "file" else "sqlite",
                "open": open_, "create": create, "load": load, "update": update, "close": lambda handle: None}


def sqlitedict_contender():
    from sqlitedict import SqliteDict

    def put(table, key, record):
        table[key] = record

    return kv_contender("sqlitedict (autocommit, pickle)", "sqlite",
                        lambda d: SqliteDict(os.path.join(d, "s.sqlite"), autocommit=True),
                        lambda table, key: table[key], put, lambda table: table.close())


def diskcache_contender():
    import diskcache

    def get(cache, key):
        record = cache.get(key)
        if record is None:
            raise KeyError(key)
        return record

    def put(cache, key, record):
        cache.set(key, record)

    return kv_contender("diskcache Cache", "sqlite", lambda d: diskcache.Cache(d), get, put,
                        lambda cache: cache.close())


def store_contenders(workdir, redis_server):
    contenders = [raw_file_contender(), raw_sqlite_contender()]
    if redis_server is not None:
        contenders.append(raw_redis_contender(redis_server))
    contenders += tinysession_contenders(redis_server)
    for contender in contenders:
        contender["big"] = True  # the baselines and tinysession's stores also run at 64 KB
        if contender["group"] == "redis":
            contender["server_pid"] = redis_server.process.pid  # its CPU counts with the client's
    if try_import("cachelib", "cachelib.file"):
        contenders += [cachelib_contender(0), cachelib_contender(100_000)]
    if try_import("Beaker", "beaker.session"):
        contenders.append(beaker_contender())
    template = django_ready(workdir)
    if template is not None:
        contenders += [django_contender("file", template), django_contender("db", template)]
    if try_import("sqlitedict", "sqlitedict"):
        contenders.append(sqlitedict_contender())
    if try_import("diskcache", "diskcache"):
        contenders.append(diskcache_contender())
    return contenders


def store_batch(contender, directory, count, record):
    """Save ``count`` new keys, load them all, update them all; return µs per op of each, wall then CPU.

    Each of the three timed phases starts after settle(), outside its timing. CPU = this process's
    (every thread's, background cleans included) plus the server's for a contender with a "server_pid".
    """
    os.makedirs(directory)
    create, load, update = contender["create"], contender["load"], contender["update"]
    server = contender.get("server_pid")

    def cpu():
        return time.process_time() + (0.0 if server is None else cpu_seconds(server))

    message = new_message()
    handle = contender["open"](directory)
    try:
        keys = [secrets.token_hex(16) for _ in range(count)]
        settle()
        cpu_started, started = cpu(), time.perf_counter()
        keys = [create(handle, key, record) for key in keys]
        saved, cpu_saved = time.perf_counter(), cpu()
        settle()
        cpu_load_started, load_started = cpu(), time.perf_counter()
        for key in keys:
            load(handle, key)
        loaded, cpu_loaded = time.perf_counter(), cpu()
        settle()
        cpu_update_started, update_started = cpu(), time.perf_counter()
        for key in keys:
            update(handle, key, message)
        updated, cpu_updated = time.perf_counter(), cpu()
        for key in (keys[0], keys[-1]):
            messages = load(handle, key)["messages"]
            if len(messages) != len(record["messages"]) + 1 or messages[-1]["content"] != APPEND_TEXT:
                raise AssertionError(f"{contender['name']}: update was not stored")
    finally:
        contender["close"](handle)
    shutil.rmtree(directory, ignore_errors=True)
    scale = 1e6 / count
    return ((saved - started) * scale, (loaded - load_started) * scale, (updated - update_started) * scale,
            (cpu_saved - cpu_started) * scale, (cpu_loaded - cpu_load_started) * scale,
            (cpu_updated - cpu_update_started) * scale)


# -- 1. (cont.) A request in a new thread --
#
# A server that runs each request in a new thread (wsgiref's or werkzeug's
# threaded server, socketserver.ThreadingMixIn) pays for whatever a store
# keeps per thread on every request. One load of a saved session, timed
# around starting a thread that runs it and joining it, against the same
# load in a thread that has run many (a thread pool's worker, or a
# single-threaded server) and against starting and joining a thread that
# does nothing. raw-sqlite opens its connection in the thread, as a store
# with one connection per thread (threading.local) would.

THREAD_MODES = ("reused", "new", "thread")  # a reused thread; a new thread per request; a new thread alone
THREAD_CHUNK = 50


def nothing(*_args):
    """A thread's target that does nothing: what starting and joining a thread costs alone."""


def thread_contenders():
    """(name, open(directory) -> handle, load(handle, key), save(handle, key, record), close(handle))."""

    def tinysession_store(name, factory):
        def save(store, key, record):
            store[key] = record

        def close(store):
            wait_for_cleans()
            store.close()

        return (name, factory, lambda store, key: store.load(key), save, close)

    def raw_open(directory):
        connection = raw_sqlite_contender()["open"](directory)
        return {"path": os.path.join(directory, "raw.sqlite3"), "connection": connection,
                "local": threading.local()}

    def raw_load(handle, key):
        local = handle["local"]
        if not hasattr(local, "connection"):  # closed with the thread's locals when it ends
            local.connection = sqlite3.connect(handle["path"], isolation_level=None)
            local.connection.execute("PRAGMA synchronous=NORMAL")
        row = local.connection.execute("SELECT v FROM s WHERE k = ?", (key,)).fetchone()
        return json.loads(row[0])

    def raw_save(handle, key, record):
        handle["connection"].execute("INSERT OR REPLACE INTO s (k, v, mtime) VALUES (?, ?, ?)",
                                     (key, json.dumps(record).encode(), time.time()))

    return [
        tinysession_store("tinysession SQLiteStore",
                          lambda d: tinysession.SQLiteStore(os.path.join(d, "s.sqlite3"), max_age=86400)),
        tinysession_store("tinysession FileStore",
                          lambda d: tinysession.FileStore(os.path.join(d, "s"), max_age=86400)),
        ("raw-sqlite, a connection per thread (threading.local)", raw_open, raw_load, raw_save,
         lambda handle: handle["connection"].close()),
    ]


def thread_batch(contender, directory, count, record):
    """Return µs per request of ``count`` loads: in this thread, each in a new thread, and a new thread alone.

    Each mode's wall time, and the process's CPU time (every thread's) under "<mode> cpu". The
    modes take turns every THREAD_CHUNK requests, so a change in the machine's load hits all three.
    """
    _name, open_, load, save, close = contender
    os.makedirs(directory)
    handle = open_(directory)
    try:
        keys = [secrets.token_hex(16) for _ in range(count)]
        for key in keys:
            save(handle, key, record)
        load(handle, keys[0])  # this thread has run one before the timing, as a server's has
        figures = dict.fromkeys([*THREAD_MODES, *(mode + " cpu" for mode in THREAD_MODES)], 0.0)
        settle()
        for turn, start in enumerate(range(0, count, THREAD_CHUNK)):
            for mode in rotated(list(THREAD_MODES), turn):
                started, cpu_started = time.perf_counter(), time.process_time()
                for key in keys[start:start + THREAD_CHUNK]:
                    if mode == "reused":
                        load(handle, key)
                        continue
                    thread = threading.Thread(target=load if mode == "new" else nothing, args=(handle, key))
                    thread.start()
                    thread.join()
                figures[mode] += (time.perf_counter() - started) * 1e6 / count
                figures[mode + " cpu"] += (time.process_time() - cpu_started) * 1e6 / count
    finally:
        close(handle)
    shutil.rmtree(directory, ignore_errors=True)
    return figures


def run_store_section(config, workdir, redis_server):
    contenders = store_contenders(workdir, redis_server)
    big_record = chat_history(config["big_messages"])
    sizes = [("1 KB", chat_record(), contenders, config["store_n"]),
             ("64 KB", big_record, [c for c in contenders if c.get("big")], config["store_big_n"])]
    results = {(label, c["name"]): [] for label, _, members, _ in sizes for c in members}
    log(f"1. store operations: {len(contenders)} contenders, {config['store_n']} keys at 1 KB, "
        f"{len(sizes[1][2])} contenders, {config['store_big_n']} keys at 64 KB, {config['store_reps']} repetitions")
    for label, record, members, _ in sizes:  # warm-up: lazy imports, caches, first connections
        for contender in members:
            store_batch(contender, os.path.join(workdir, "warmup"), WARMUP, record)
    for rep in range(config["store_reps"]):
        for label, record, members, count in sizes:
            for contender in rotated(members, rep):
                directory = os.path.join(workdir, f"store-{rep}-{secrets.token_hex(4)}")
                results[(label, contender["name"])].append(store_batch(contender, directory, count, record))
        log(f"  repetition {rep + 1}/{config['store_reps']} done")
    threads = thread_contenders()
    record = chat_record()
    results.update({("thread", contender[0]): [] for contender in threads})
    for rep in range(config["store_reps"]):
        for contender in rotated(threads, rep):
            directory = os.path.join(workdir, f"thread-{rep}-{secrets.token_hex(4)}")
            results[("thread", contender[0])].append(thread_batch(contender, directory, config["thread_n"], record))
    log("  requests in new threads done")
    info = {"contenders": contenders, "sizes": [(label, len(json.dumps(record, separators=(",", ":")).encode()),
                                                 len(record["messages"]), members, count)
                                                for label, record, members, count in sizes],
            "threads": [c[0] for c in threads]}
    return info, results


def print_store_section(config, info, results):
    print(f"## 1. Store operations: µs per operation (median of {config['store_reps']} repetitions)\n")
    print("save = a new key; load = read it back; update = load, append one message, save. Each of the "
          "three phases starts after os.sync() and gc.collect(), untimed. "
          "× = time relative to the first row of the table (the plain baseline of that kind; "
          "lower is faster). At 64 KB only the baselines and tinysession's stores run.\n")
    titles = {"file": "File stores, against raw-file", "sqlite": "SQLite stores, against raw-sqlite",
              "redis": "Redis, against raw redis-py"}
    for label, size, messages, members, count in info["sizes"]:
        print(f"### {label}: a chat session of {messages} messages, {size:,} bytes as compact JSON "
              f"({count:,} sessions)\n")
        for group, title in titles.items():
            rows = [c["name"] for c in members if c["group"] == group]
            if not rows:
                continue
            print(f"#### {title}, {label}\n")
            print("| contender | save µs | × | load µs | × | update µs | × |")
            print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
            baseline = [statistics.median(r[i] for r in results[(label, rows[0])]) for i in range(3)]
            for name in rows:
                medians = [statistics.median(r[i] for r in results[(label, name)]) for i in range(3)]
                cells = " | ".join(f"{m:.1f} | {m / b:.2f}x" for m, b in zip(medians, baseline))
                print(f"| {name} | {cells} |")
            print()
        print(f"#### CPU time, {label}\n")
        print("The same operations in CPU µs per operation: this process's (every thread's, background cleans "
              "included) plus redis-server's for the Redis rows; steadier than wall time on a busy machine. "
              "× = against the baseline of the row's kind.\n")
        print("| contender | save CPU µs | × | load CPU µs | × | update CPU µs | × |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for group in titles:
            rows = [c["name"] for c in members if c["group"] == group]
            if not rows:
                continue
            baseline = [statistics.median(r[i] for r in results[(label, rows[0])]) for i in range(3, 6)]
            for name in rows:
                medians = [statistics.median(r[i] for r in results[(label, name)]) for i in range(3, 6)]
                cells = " | ".join(f"{m:.1f} | {m / b:.2f}x" for m, b in zip(medians, baseline))
                print(f"| {name} | {cells} |")
        print()
    print(f"### A request in a new thread ({config['thread_n']:,} loads of the 1 KB session)\n")
    print("µs per request: one load in a thread that has run many (reused), the load in a new thread "
          "started and joined for it (new thread, as wsgiref's and werkzeug's threaded servers run each "
          "request), and starting and joining a thread that does nothing; added = new thread − reused − "
          "thread alone, what the store pays for being in a new thread; the same in CPU time (the process's, every "
          "thread's: steadier than wall time on a busy machine). FileStore keeps nothing per thread: its added "
          "time is what any work pays for running in a fresh thread. raw-sqlite keeps a connection per "
          "thread in a threading.local, opened by the thread's first load.\n")
    print("| store | reused thread µs | new thread µs | thread alone µs | added µs | CPU µs: reused | new thread "
          "| thread alone | added |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in info["threads"]:
        cells = []
        for suffix in ("", " cpu"):
            reused, new, alone = (statistics.median(r[mode + suffix] for r in results[("thread", name)])
                                  for mode in THREAD_MODES)
            cells.append(f"{reused:.1f} | {new:.1f} | {alone:.1f} | {new - reused - alone:.1f}")
        print(f"| {name} | {' | '.join(cells)} |")
    print()


# -- 2. Request cycle --
#
# An app contender is a dict: name, framework ("bare WSGI" or "Flask"),
# make(directory) -> WSGI app, sessions (False for the no-session floor).
# Apps answer /login (create the session), /append (read it and append a
# message), /read (only read) and /ping (never touch it).

BASE_ENVIRON = {
    "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "QUERY_STRING": "", "SERVER_NAME": "localhost",
    "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "localhost", "REMOTE_ADDR": "127.0.0.1",
    "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr, "wsgi.multithread": False,
    "wsgi.multiprocess": False, "wsgi.run_once": False,
}
REQUEST_KINDS = [("append", "/append"), ("read", "/read"), ("untouched", "/ping")]


class Browser:
    """One user: a cookie jar that sends back what the previous responses set."""

    def __init__(self):
        self.jar = {}
        self.header = ""

    def request(self, app, path):
        environ = dict(BASE_ENVIRON)
        environ["PATH_INFO"] = path
        environ["wsgi.input"] = io.BytesIO(b"")
        if self.header:
            environ["HTTP_COOKIE"] = self.header
        captured = []

        def start_response(status, headers, exc_info=None):
            captured.append((status, headers))
            return lambda data: None

        body = app(environ, start_response)
        try:
            content = b"".join(body)
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        status, headers = captured[-1]
        if status[:3] != "200":
            raise AssertionError(f"{path}: {status}")
        for name, value in headers:
            if name.lower() == "set-cookie":
                self.set_cookie(value)
        return content

    def set_cookie(self, header):
        pair, _, attributes = header.partition(";")
        name, _, value = pair.partition("=")
        name, value, attributes = name.strip(), value.strip(), attributes.lower()
        if not value or "max-age=0" in attributes or "1970" in attributes:
            self.jar.pop(name, None)
        else:
            self.jar[name] = value
        self.header = "; ".join(f"{k}={v}" for k, v in self.jar.items())


def session_view(path, session, save=None):
    """The views' shared logic on a dict-like session; returns the response body."""
    if path == "/login":
        session.update(chat_record())
    elif path == "/append":
        messages = session["messages"]
        messages.append(new_message())
        trim(messages)
        session["messages"] = messages
    else:
        return session["messages"][-1]["content"]
    if save is not None:
        save(session)
    return "ok"


def bare_app(session_of=None, save=None):
    """A plain WSGI app; ``session_of(environ)`` gives it a session, or it has none."""

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/ping" or session_of is None:
            text = "pong"
        else:
            text = session_view(path, session_of(environ), save)
        body = text.encode()
        start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    return app


def flask_app(get_session=None, configure=None):
    """The same views as a Flask app; ``get_session()`` returns the session inside a request."""
    from flask import Flask

    app = Flask(__name__)
    if configure is not None:
        configure(app)

    def view(path):
        if get_session is None:
            return "pong"
        return session_view(path, get_session())

    app.add_url_rule("/login", "login", lambda: view("/login"))
    app.add_url_rule("/append", "append", lambda: view("/append"))
    app.add_url_rule("/read", "read", lambda: view("/read"))
    app.add_url_rule("/ping", "ping", lambda: "pong")
    return app


def app_contenders(workdir):
    contenders = [
        {"name": "no sessions", "framework": "bare WSGI", "sessions": False, "make": lambda d: bare_app()},
        {"name": "tinysession FileStore", "framework": "bare WSGI", "sessions": True,
             "make": lambda d: tinysession.SessionMiddleware(
                 bare_app(tinysession.get_session), tinysession.FileStore(os.path.join(d, "s"), max_age=86400))},
        {"name": "tinysession SQLiteStore", "framework": "bare WSGI", "sessions": True,
             "make": lambda d: tinysession.SessionMiddleware(
                 bare_app(tinysession.get_session),
                 tinysession.SQLiteStore(os.path.join(d, "s.sqlite3"), max_age=86400))},
    ]
    if try_import("Beaker", "beaker.middleware"):
        from beaker.middleware import SessionMiddleware as BeakerMiddleware

        contenders.append({
            "name": "Beaker SessionMiddleware (type=file)", "framework": "bare WSGI", "sessions": True,
            "make": lambda d: BeakerMiddleware(
                bare_app(lambda environ: environ["beaker.session"], lambda session: session.save()),
                type="file", data_dir=os.path.join(d, "data"), lock_dir=os.path.join(d, "lock"))})
    if not try_import("Flask", "flask"):
        return contenders
    import flask

    def tinysession_flask(store_factory):
        def make(directory):
            def configure(app):
                app.wsgi_app = tinysession.SessionMiddleware(app.wsgi_app, store_factory(directory))

            return flask_app(lambda: tinysession.get_session(flask.request.environ), configure)

        return make

    def interface_flask(store_factory):
        def make(directory):
            def configure(app):
                app.secret_key = FLASK_SECRET
                app.session_interface = tinysession.FlaskSessionInterface(store_factory(directory))

            return flask_app(lambda: flask.session, configure)

        return make

    def cookie_flask(directory):
        def configure(app):
            app.secret_key = FLASK_SECRET

        return flask_app(lambda: flask.session, configure)

    contenders += [
        {"name": "no session use (floor)", "framework": "Flask", "sessions": False, "make": lambda d: flask_app()},
        {"name": "tinysession FileStore", "framework": "Flask", "sessions": True,
             "make": tinysession_flask(lambda d: tinysession.FileStore(os.path.join(d, "s"), max_age=86400))},
        {"name": "tinysession SQLiteStore", "framework": "Flask", "sessions": True,
             "make": tinysession_flask(
                 lambda d: tinysession.SQLiteStore(os.path.join(d, "s.sqlite3"), max_age=86400))},
        {"name": "tinysession FlaskSessionInterface, FileStore", "framework": "Flask", "sessions": True,
             "make": interface_flask(lambda d: tinysession.FileStore(
                 os.path.join(d, "s"), max_age=86400, serializer=tinysession.TaggedJSON()))},
        {"name": "tinysession FlaskSessionInterface, SQLiteStore", "framework": "Flask", "sessions": True,
             "make": interface_flask(lambda d: tinysession.SQLiteStore(
                 os.path.join(d, "s.sqlite3"), max_age=86400, serializer=tinysession.TaggedJSON()))},
        {"name": "Flask signed-cookie session (default)", "framework": "Flask", "sessions": True, "make": cookie_flask},
    ]
    if try_import("Flask-Session (cachelib)", "flask_session", "cachelib.file"):
        def cachelib_flask(directory):
            from cachelib.file import FileSystemCache
            from flask_session import Session

            def configure(app):
                app.secret_key = FLASK_SECRET
                app.config.update(SESSION_TYPE="cachelib",
                                  SESSION_CACHELIB=FileSystemCache(os.path.join(directory, "c"), threshold=500))
                Session(app)

            return flask_app(lambda: flask.session, configure)

        contenders.append({"name": "Flask-Session cachelib FileSystemCache", "framework": "Flask",
                               "sessions": True, "make": cachelib_flask})
    if try_import("Flask-Session (SQLAlchemy)", "flask_session", "flask_sqlalchemy", "sqlalchemy"):
        def sqlalchemy_flask(directory):
            from flask_session import Session
            from flask_sqlalchemy import SQLAlchemy

            sqlalchemy_pragmas()

            def configure(app):
                app.secret_key = FLASK_SECRET
                app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + os.path.join(directory, "fs.sqlite3")
                app.config.update(SESSION_TYPE="sqlalchemy", SESSION_SQLALCHEMY=SQLAlchemy(app))
                Session(app)

            return flask_app(lambda: flask.session, configure)

        contenders.append({"name": "Flask-Session SQLAlchemy (SQLite)", "framework": "Flask",
                               "sessions": True, "make": sqlalchemy_flask})
    return contenders


def prepare_app(contender, directory, users):
    """Build the app, log every user in (one session each) and check a round trip."""
    os.makedirs(directory)
    app = contender["make"](directory)
    browsers = [Browser() for _ in range(users)]
    for browser in browsers:
        browser.request(app, "/login")
        if contender["sessions"] and not browser.jar:
            raise AssertionError(f"{contender['name']}: /login set no cookie")
    if contender["sessions"]:
        probe = browsers[0]
        before = probe.request(app, "/read").decode()
        probe.request(app, "/append")
        after = probe.request(app, "/read").decode()
        if before == APPEND_TEXT or after != APPEND_TEXT:
            raise AssertionError(f"{contender['name']}: the appended message did not come back")
    pong = browsers[0].request(app, "/ping")
    if pong != b"pong":
        raise AssertionError(f"{contender['name']}: /ping answered {pong!r}")
    return {"app": app, "browsers": browsers, "next": 0}


def request_batch(state, path, count):
    """Send ``count`` requests to ``path``, cycling over the users; return µs per request."""
    app, browsers = state["app"], state["browsers"]
    users = len(browsers)
    first = state["next"]
    settle()
    started = time.perf_counter()
    for index in range(first, first + count):
        browsers[index % users].request(app, path)
    elapsed = time.perf_counter() - started
    state["next"] = (first + count) % users
    return elapsed * 1e6 / count


def run_request_section(config, workdir):
    contenders = app_contenders(workdir)
    log(f"2. request cycle: {len(contenders)} apps, {config['users']} users each")
    states = {}
    for contender in contenders:
        key = (contender["framework"], contender["name"])
        states[key] = prepare_app(contender, os.path.join(workdir, f"app-{len(states)}"), config["users"])
        for _, path in REQUEST_KINDS:  # warm-up
            request_batch(states[key], path, WARMUP)
    results = {key: {kind: [] for kind, _ in REQUEST_KINDS} for key in states}
    for rep in range(config["req_reps"]):
        for contender in rotated(contenders, rep):
            key = (contender["framework"], contender["name"])
            for kind, path in REQUEST_KINDS:
                results[key][kind].append(request_batch(states[key], path, config["req_n"]))
        log(f"  repetition {rep + 1}/{config['req_reps']} done")
    return contenders, results


def print_request_section(config, contenders, results):
    print(f"## 2. Request cycle: µs per request and requests/s ({config['req_n']} requests per kind "
          f"per repetition over {config['users']} users, median of {config['req_reps']} repetitions)\n")
    print("In-process WSGI calls with prepared environs, no sockets; each request carries the cookies "
          "the previous response set; the body is drained and closed. The Flask rows named tinysession "
          "FileStore and SQLiteStore use SessionMiddleware and get_session(); the FlaskSessionInterface rows "
          "use flask.session, their store with serializer=TaggedJSON(). append = read the session and "
          "append a chat message; read = only read it; untouched = never touch it (the browser still "
          "sends its cookie). µs cells show (+ the time added over the same framework's app without "
          "sessions); × = time relative to the same framework's tinysession FileStore (lower is faster). "
          "Each batch starts after os.sync() and gc.collect(), untimed.\n")
    for framework in dict.fromkeys(c["framework"] for c in contenders):
        members = [c for c in contenders if c["framework"] == framework]
        medians = {c["name"]: {kind: statistics.median(results[(framework, c["name"])][kind])
                               for kind, _ in REQUEST_KINDS} for c in members}
        floor = next((medians[c["name"]] for c in members if not c["sessions"]), None)
        reference = medians.get("tinysession FileStore")
        print(f"### {framework}\n")
        print("| contender | append µs | req/s | × | read µs | req/s | × | untouched µs | req/s | × |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for contender in members:
            cells = []
            for kind, _ in REQUEST_KINDS:
                value = medians[contender["name"]][kind]
                added = f" ({value - floor[kind]:+.0f})" if floor is not None and contender["sessions"] else ""
                ratio = f"{value / reference[kind]:.2f}x" if reference else "-"
                cells.append(f"{value:.0f}{added} | {1e6 / value:,.0f} | {ratio}")
            print(f"| {contender['name']} | {' | '.join(cells)} |")
        print()


# -- 6. Writers racing on one session --
#
# Several threads append to one session through SessionMiddleware at once, in
# process: every save of a loaded session is a conditional write, and a lost
# race is merged and written again. The store counts the conditional writes
# that failed (the retries); the session must end with every message.


def contended_batch(contender, directory, writers, saves):
    """Run ``writers`` threads each appending ``saves`` messages to one session; return (saves/s, retries/save)."""
    import threading

    class Counting(contender["class"]):
        retries = 0

        def write(self, key, data, mtime, expected=None):
            done = super().write(key, data, mtime, expected)
            if expected is not None and not done:
                Counting.retries += 1
            return done

    os.makedirs(directory, exist_ok=True)
    store = contender["open"](directory, Counting)

    def app(environ, start_response):
        session = tinysession.get_session(environ)
        session.setdefault("messages", []).append(environ["QUERY_STRING"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = tinysession.SessionMiddleware(app, store)
    started = {}

    def request(query, cookie=""):
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "QUERY_STRING": query, "HTTP_COOKIE": cookie,
                   "wsgi.url_scheme": "http"}
        headers = {}
        middleware(environ, lambda status, response_headers, exc_info=None: headers.update(response_headers))
        return headers

    cookie = request("first")["Set-Cookie"].split(";")[0]
    Counting.retries = 0

    def work(number):
        for index in range(saves):
            request(f"{number}-{index}", cookie)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(writers)]
    settle()
    started["at"] = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started["at"]
    key = hashlib.sha256(cookie.split("=", 1)[1].encode()).hexdigest()
    messages = store[key]["data"]["messages"]
    if len(messages) != writers * saves + 1:
        raise AssertionError(f"{len(messages)} messages kept of {writers * saves + 1}")
    wait_for_cleans()
    store.close()
    shutil.rmtree(directory, ignore_errors=True)
    return writers * saves / elapsed, Counting.retries / (writers * saves)


def run_contended_section(config, workdir, redis_server):
    def file_store(directory, cls=tinysession.FileStore):
        return cls(os.path.join(directory, "s"))

    def sqlite_store(directory, cls=tinysession.SQLiteStore):
        return cls(os.path.join(directory, "s.sqlite3"))

    contenders = [{"name": "tinysession FileStore", "class": tinysession.FileStore, "open": file_store},
                  {"name": "tinysession SQLiteStore", "class": tinysession.SQLiteStore, "open": sqlite_store}]
    if redis_server is not None:
        def redis_store(directory, cls=tinysession.RedisStore):
            client = redis_server.client()
            client.flushdb()
            return cls(client, prefix="contended:")

        contenders.append({"name": "tinysession RedisStore", "class": tinysession.RedisStore, "open": redis_store})
    saves = config["contended_saves"]
    results = {(c["name"], writers): [] for c in contenders for writers in (1, 8)}
    log(f"6. writers racing on one session: {len(contenders)} stores, 1 and 8 writers, {saves} saves each")
    for rep in range(config["store_reps"]):
        for contender in rotated(contenders, rep):
            for writers in (1, 8):
                directory = os.path.join(workdir, f"contended-{rep}-{secrets.token_hex(4)}")
                results[(contender["name"], writers)].append(
                    contended_batch(contender, directory, writers, saves))
    return contenders, results


def print_contended_section(config, contenders, results):
    print(f"## 6. Writers racing on one session ({config['contended_saves']} appends per writer, "
          f"median of {config['store_reps']} repetitions)\n")
    print("In-process WSGI calls through SessionMiddleware, every writer appending to the same session at "
          "once; each save is a conditional write, a lost race is merged and written again. Every run "
          "checks that the session ends with every message. Retries = failed conditional writes per save.\n")
    print("| store | 1 writer: saves/s | retries/save | 8 writers: saves/s | retries/save |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for contender in contenders:
        cells = []
        for writers in (1, 8):
            rates, retries = zip(*results[(contender["name"], writers)])
            cells.append(f"{statistics.median(rates):,.0f} | {statistics.median(retries):.2f}")
        print(f"| {contender['name']} | {' | '.join(cells)} |")
    print()


# -- 7. Floods and cleaning under load --
#
# A bounded store under a flood of new sessions, and the latency of writes
# while a large clean runs beside them (FileStore and SQLiteStore), in process.


def flood_batch(open_store, directory, returning, new, keep):
    """Fill a store bounded at ``keep`` with returning sessions, then a flood of new ones; return counts."""
    os.makedirs(directory)
    store = open_store(directory, keep)
    regulars = [f"regular{n}" for n in range(returning)]
    for key in regulars:
        store.save(key, store.encode(key, {"user": key}), new=True)
        store.touch(key)  # it came back: promoted
    peak = 0
    started = time.perf_counter()
    for n in range(new):
        key = f"flood{n}"
        store.save(key, store.encode(key, {}), new=True)
        if n % 1000 == 0:
            peak = max(peak, len(store))
    wait_for_cleans()
    elapsed = time.perf_counter() - started
    result = (sum(key in store for key in regulars), peak, len(store), elapsed)
    store.close()
    return result


def write_latencies(store, count, during=None):
    """Time ``count`` session writes (ms each), with ``during`` running in a thread meanwhile."""
    thread = None if during is None else threading.Thread(target=during)
    if thread is not None:
        thread.start()
    latencies = []
    for n in range(count):
        key = f"w{n}"
        data = store.encode(key, {"n": n})
        started = time.perf_counter()
        store.save(key, data)
        latencies.append((time.perf_counter() - started) * 1000)
    if thread is not None:
        thread.join()
    latencies.sort()
    return latencies[-1], latencies[int(len(latencies) * 0.99)]


def run_flood_section(config, workdir, redis_server):
    def file_store(directory, keep):
        return tinysession.FileStore(os.path.join(directory, "s"), max_sessions=keep)

    def sqlite_store(directory, keep):
        return tinysession.SQLiteStore(os.path.join(directory, "s.db"), max_sessions=keep)

    stores = [("tinysession FileStore", file_store, config["busy_files"]),
              ("tinysession SQLiteStore", sqlite_store, config["busy_rows"])]
    results = {}
    log(f"7. floods and cleaning under load: {config['flood_new']} new sessions against "
        f"{config['flood_returning']} returning, max_sessions={config['flood_keep']}")
    for name, open_store, busy in stores:
        directory = os.path.join(workdir, f"flood-{secrets.token_hex(4)}")
        results[(name, "flood")] = flood_batch(open_store, directory, config["flood_returning"],
                                               config["flood_new"], config["flood_keep"])
        shutil.rmtree(directory, ignore_errors=True)
        directory = os.path.join(workdir, f"busy-{secrets.token_hex(4)}")
        os.makedirs(directory)
        store = open_store(directory, None)
        old = time.time() - 10 * 86400
        for n in range(busy):
            key = f"old{n}"
            store.save(key, store.encode(key, {}), now=old)
        settle()
        results[(name, "quiet")] = write_latencies(store, config["busy_writes"])
        results[(name, "clean")] = write_latencies(store, config["busy_writes"],
                                                   during=lambda store=store: store.clean(keep=1000))
        wait_for_cleans()
        store.close()
        shutil.rmtree(directory, ignore_errors=True)
        log(f"  {name} done")
    if hasattr(tinysession, "_SQLITE_EVICT_BATCH"):
        results["evict"] = run_evict_batch_part(config, workdir)
    return stores, results


# -- 7. (cont.) The SQLite clean's batch size against a writer's wait --
#
# SQLiteStore.sweep removes rows in transactions of _SQLITE_EVICT_BATCH rows.
# While one is open, a writer's statement waits in SQLite's busy handler,
# which sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100 ms between its
# tries: a writer that keeps losing the lock to the next batch waits in those
# steps. A writer saving a session every 10 ms while clean(keep=1000) runs
# over busy_rows old rows, at each batch size (the module attribute set at
# run time, in this process and in the child), with the clean in a thread of
# the writer's process (as a background clean runs) and in another process
# (as `tinysession clean` from cron runs), on the machine as it is and with
# one CPU-bound process per core added.

EVICT_MODES = ("thread", "process")
EVICT_LOADS = ("as is", "+1 CPU hog per core")
WRITE_EVERY = 0.010


def evict_batches():
    """The batch sizes to compare: the module's own first, then 500, 250 and 100."""
    current = getattr(tinysession, "_SQLITE_EVICT_BATCH", None)
    return [size for size in dict.fromkeys([current, 500, 250, 100]) if size is not None]


def build_old_rows(path, count):
    """Write ``count`` ten-day-old sessions into a new SQLiteStore database at ``path``, checkpointed."""
    store = tinysession.SQLiteStore(path, max_sessions=None)
    data = store.encode("old", {})
    store.save("old", data)  # creates the schema
    store.close()
    old = time.time() - 10 * 86400
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        table = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        connection.execute("BEGIN")
        connection.executemany(f'INSERT OR REPLACE INTO "{table}" (key, data, mtime) VALUES (?, ?, ?)',
                               ((f"old{n}", data, old + n // 1000) for n in range(count)))
        connection.execute("COMMIT")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


def evict_child_main(path, batch):
    """The `run.py _evict DB BATCH` subprocess: clean(keep=1000) at that batch size, timed, as JSON."""
    tinysession._SQLITE_EVICT_BATCH = batch
    store = tinysession.SQLiteStore(path, max_sessions=None)
    len(store)  # opens the connection before the parent starts writing
    print("go", flush=True)
    started = time.perf_counter()
    removed = store.clean(keep=1000)
    print(json.dumps({"seconds": time.perf_counter() - started, "removed": removed}), flush=True)
    store.close()
    return 0


def paced_writes(store, done):
    """Save a new session every WRITE_EVERY s until ``done()``; return each save's ms."""
    latencies = []
    due = time.perf_counter()
    while not done():
        key = f"w{len(latencies)}-{secrets.token_hex(4)}"
        data = store.encode(key, {"n": len(latencies)})
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        started = time.perf_counter()
        store.save(key, data)
        finished = time.perf_counter()
        latencies.append((finished - started) * 1000)
        due = max(due + WRITE_EVERY, finished)  # a late write is not followed by a burst
    return latencies


def evict_batch_run(template, directory, batch, mode):
    """One clean of a copy of ``template`` at ``batch`` beside a paced writer: (latencies ms, clean s)."""
    path = os.path.join(directory, f"evict-{batch}-{mode}.db")
    shutil.copy(template, path)
    store = tinysession.SQLiteStore(path, max_sessions=None)
    len(store)
    saved = tinysession._SQLITE_EVICT_BATCH
    try:
        if mode == "thread":
            tinysession._SQLITE_EVICT_BATCH = batch
            outcome = {}

            def clean():
                started = time.perf_counter()
                outcome["removed"] = store.clean(keep=1000)
                outcome["seconds"] = time.perf_counter() - started

            thread = threading.Thread(target=clean)
            thread.start()
            latencies = paced_writes(store, lambda: not thread.is_alive())
            thread.join()
        else:
            child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_evict", path, str(batch)],
                                     stdout=subprocess.PIPE, text=True,
                                     env=dict(os.environ, TINYSESSION_ROOT=os.path.dirname(tinysession.__file__)))
            with child:  # waits for it, its pipe closed, on an error too
                try:
                    if child.stdout.readline().strip() != "go":
                        raise AssertionError("the cleaning child did not start")
                    latencies = paced_writes(store, lambda: child.poll() is not None)
                    outcome = json.loads(child.stdout.read())
                except BaseException:
                    child.kill()
                    raise
    finally:
        tinysession._SQLITE_EVICT_BATCH = saved
        store.close()
    os.remove(path)
    if outcome.get("removed", 0) < 1:
        raise AssertionError(f"the clean removed nothing: {outcome}")
    return latencies, outcome["seconds"]


def cpu_hogs(count):
    """Start ``count`` processes that spin on a CPU; return them (terminate and wait when done)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def run_evict_batch_part(config, workdir):
    """Return {(batch, mode, load): [(latencies, clean s), ...]} over config["evict_reps"] repetitions."""
    directory = os.path.join(workdir, f"evict-{secrets.token_hex(4)}")
    os.makedirs(directory)
    template = os.path.join(directory, "template.db")
    build_old_rows(template, config["busy_rows"])
    batches = evict_batches()
    runs = [(batch, mode) for batch in batches for mode in EVICT_MODES]
    results = {(batch, mode, load): [] for batch, mode in runs for load in EVICT_LOADS}
    log(f"  evict batch: {config['busy_rows']:,} rows, batches {batches}, {config['evict_reps']} repetitions")
    for load in EVICT_LOADS:
        hogs = cpu_hogs(os.cpu_count() or 1) if load != EVICT_LOADS[0] else []
        try:
            for rep in range(config["evict_reps"]):
                for batch, mode in rotated(runs, rep):
                    settle()
                    results[(batch, mode, load)].append(evict_batch_run(template, directory, batch, mode))
        finally:
            for hog in hogs:
                hog.terminate()
                hog.wait()
    shutil.rmtree(directory, ignore_errors=True)
    return batches, results


def print_evict_batch_part(config, batches, results):
    print(f"### The SQLite clean's batch size against a writer's wait ({config['busy_rows']:,} rows, "
          "clean(keep=1000))\n")
    print(f"A writer saves a new session every {WRITE_EVERY * 1000:.0f} ms while `clean(keep=1000)` runs; "
          "the clean in a thread of the writer's process or in another process, on the machine as it is "
          "and with a CPU-bound process per core added. Each batch size is `_SQLITE_EVICT_BATCH` set at "
          f"run time (this version's: {getattr(tinysession, '_SQLITE_EVICT_BATCH', 'none')}). "
          f"Figures over {config['evict_reps']} repetitions: the writes' worst (the largest of the "
          "repetitions' worsts), p99 and median (of all writes pooled), the count over 100 ms, and the "
          "clean's median seconds.\n")
    print("| load | clean in | batch | writes | worst ms | p99 ms | median ms | > 100 ms | clean s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for load in EVICT_LOADS:
        for mode in EVICT_MODES:
            for batch in batches:
                runs = results[(batch, mode, load)]
                pooled = sorted(ms for latencies, _ in runs for ms in latencies)
                worst = max(max(latencies) for latencies, _ in runs)
                p99 = pooled[min(len(pooled) - 1, int(len(pooled) * 0.99))]
                over = sum(ms > 100 for ms in pooled)
                seconds = statistics.median(s for _, s in runs)
                print(f"| {load} | {mode} | {batch} | {len(pooled):,} | {worst:.1f} | {p99:.1f} | "
                      f"{statistics.median(pooled):.2f} | {over} | {seconds:.2f} |")
    print()


def print_flood_section(config, stores, results):
    print("## 7. Floods and cleaning under load\n")
    print(f"A store with max_sessions={config['flood_keep']:,} holding {config['flood_returning']} sessions "
          f"that came back, then {config['flood_new']:,} new sessions written one after another (their "
          "background cleans included): how many of the returning sessions survive, the most records seen "
          "during the flood (sampled every 1,000 writes) and after it.\n")
    print("| store | returning kept | peak records | final records | flood s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, _, _ in stores:
        kept, peak, final, elapsed = results[(name, "flood")]
        print(f"| {name} | {kept}/{config['flood_returning']} | {peak:,} | {final:,} | {elapsed:.1f} |")
    print(f"\nWrites of new sessions ({config['busy_writes']} of them) while nothing else runs, and while "
          "`clean(keep=1000)` runs in another thread over a store of old records "
          f"({config['busy_files']:,} files, {config['busy_rows']:,} SQLite rows): worst and p99 latency in ms.\n")
    print("| store | quiet: worst | p99 | during the clean: worst | p99 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, _, _ in stores:
        quiet, busy = results[(name, "quiet")], results[(name, "clean")]
        print(f"| {name} | {quiet[0]:.1f} | {quiet[1]:.2f} | {busy[0]:.1f} | {busy[1]:.2f} |")
    print()
    if "evict" in results:
        print_evict_batch_part(config, *results["evict"])


# -- 3. Cleaning --
#
# A clean contender is a dict: name, group ("file" against find, "sqlite"
# against a raw DELETE), layout (a builder below), and either child (a
# function run in a fresh `run.py _clean` process that sets up and returns
# the zero-argument cleaner to time) or command (an external program), plus
# removes(n) and remaining(directory) to check the work was done (extra:
# files the cleaner adds itself, such as cachelib's trigger key).


def _old_or_new(index, now):
    """Odd indexes are three hours old (expired at MAX_AGE), even ones fresh."""
    return now - 3 * 3600 if index % 2 else now


def _write_file(path, data, mtime):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.utime(path, (mtime, mtime))


def _key(index):
    return hashlib.sha256(b"session %d" % index).hexdigest()


def fill_tinysession_store(store, count, now):
    """Write ``count`` chat records through the public API, then date the odd ones back by touch().

    Open ``store`` with max_sessions=None: the default bound (10,000) would clean the layout down to it.
    """
    record = chat_record()
    try:
        for index in range(count):
            store[_key(index)] = record
            if index % 2:
                store.touch(_key(index), now=_old_or_new(index, now))
    finally:
        wait_for_cleans()  # SQLiteStore.close() closes the connection a background clean may be using
        store.close()


def build_tinysession_files(directory, count, now):
    fill_tinysession_store(tinysession.FileStore(directory, max_sessions=None), count, now)


def build_cachelib_files(directory, count, now):
    os.makedirs(directory, mode=0o700)
    body = pickle.dumps(chat_record(), pickle.HIGHEST_PROTOCOL)
    for index in range(count):
        expires = int(now) - 3600 if index % 2 else int(now) + 86400
        name = hashlib.sha256(("session:" + _key(index)).encode()).hexdigest()
        _write_file(os.path.join(directory, name), struct.pack("I", expires) + body, _old_or_new(index, now))


def build_django_files(directory, count, now):
    from django.contrib.sessions.backends.file import SessionStore

    os.makedirs(directory, mode=0o700)
    data = SessionStore().encode(chat_record()).encode("ascii")
    for index in range(count):
        _write_file(os.path.join(directory, "sessionid" + _key(index)[:32]), data, _old_or_new(index, now))


def _sqlite_rows(path, create, insert, rows):
    connection = sqlite3.connect(path, isolation_level=None)
    for pragma in SQLITE_PRAGMAS.split(";"):
        connection.execute(pragma)
    for statement in create:
        connection.execute(statement)
    connection.execute("BEGIN")
    connection.executemany(insert, rows)
    connection.execute("COMMIT")
    connection.close()


def build_raw_sqlite(directory, count, now):
    os.makedirs(directory)
    data = json.dumps(chat_record()).encode()
    _sqlite_rows(os.path.join(directory, "raw.sqlite3"),
                 ["CREATE TABLE s (k TEXT PRIMARY KEY, v BLOB NOT NULL, mtime REAL NOT NULL)",
                  "CREATE INDEX s_mtime ON s (mtime)"],
                 "INSERT INTO s (k, v, mtime) VALUES (?, ?, ?)",
                 ((_key(i), data, _old_or_new(i, now)) for i in range(count)))


def build_tinysession_sqlite(directory, count, now):
    os.makedirs(directory)
    fill_tinysession_store(tinysession.SQLiteStore(os.path.join(directory, "s.sqlite3"), max_sessions=None), count, now)


def build_django_db(directory, count, now):
    from django.contrib.sessions.backends.db import SessionStore

    os.makedirs(directory)
    path = os.path.join(directory, "django.sqlite3")
    shutil.copyfile(_DJANGO["template"], path)
    data = SessionStore().encode(chat_record())

    def expiry(index):  # Django keeps expire_date as naive UTC text in SQLite
        moment = datetime.datetime.fromtimestamp(now + (-3600 if index % 2 else 86400), datetime.timezone.utc)
        return moment.replace(tzinfo=None, microsecond=500000).isoformat(" ")

    _sqlite_rows(path, [], "INSERT INTO django_session (session_key, session_data, expire_date) VALUES (?, ?, ?)",
                 ((_key(i)[:32], data, expiry(i)) for i in range(count)))


def build_diskcache(directory, count, now):
    import diskcache

    record = chat_record()
    # cull_limit=0: else each set() would already remove up to ten expired items
    with diskcache.Cache(directory, cull_limit=0) as cache, cache.transact():
            for index in range(count):
                cache.set(_key(index), record, expire=-3600 if index % 2 else 86400)


def count_records(open_store):
    """Count the records of the tinysession store ``open_store(directory)`` opens (no max_age: all of them)."""
    def count(directory):
        store = open_store(directory)
        try:
            return len(store)
        finally:
            store.close()

    return count


def count_files(prefix="", exclude=()):
    def count(directory):
        return sum(1 for name in os.listdir(directory) if name.startswith(prefix) and name not in exclude
                   and not name.endswith(".__wz_cache"))

    return count


def count_rows(filename, table):
    def count(directory):
        with sqlite3.connect(os.path.join(directory, filename)) as connection:
            return connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    return count


def child_tinysession_files(directory, _count, **clean):
    store = tinysession.FileStore(directory, max_sessions=None)
    return lambda: store.clean(**clean)


def child_tinysession_sqlite(directory, _count):
    store = tinysession.SQLiteStore(os.path.join(directory, "s.sqlite3"), max_sessions=None)
    return lambda: store.clean(max_age=MAX_AGE)


def child_raw_sqlite(directory, _count):
    connection = sqlite3.connect(os.path.join(directory, "raw.sqlite3"), isolation_level=None)
    for pragma in SQLITE_PRAGMAS.split(";"):
        connection.execute(pragma)
    return lambda: connection.execute("DELETE FROM s WHERE mtime < ?", (time.time() - MAX_AGE,)).rowcount


def child_cachelib(directory, count, threshold):
    from cachelib.file import FileSystemCache

    cache = FileSystemCache(directory, threshold=threshold, default_timeout=86400)  # counts the files
    record = chat_record()
    return lambda: cache.set("session:trigger", record)


def _child_django(directory, backend):
    import django
    from django.conf import settings

    settings.configure(**django_settings(directory, os.path.join(directory, "django.sqlite3"),
                                         SESSION_COOKIE_AGE=MAX_AGE))
    django.setup()
    if backend == "file":
        from django.contrib.sessions.backends.file import SessionStore
    else:
        from django.contrib.sessions.backends.db import SessionStore
        from django.db import connection

        connection.ensure_connection()
    return SessionStore.clear_expired


def child_diskcache(directory, _count):
    import diskcache

    cache = diskcache.Cache(directory, cull_limit=10)  # diskcache's default, stored back in the cache
    return cache.expire


FIND = ["find", "{dir}", "-type", "f", "-mmin", f"+{MAX_AGE // 60}", "-delete"]
CACHELIB_COUNT_FILE = hashlib.sha256(b"__wz_cache_count").hexdigest()


def clean_contenders(workdir):
    half = lambda n: n // 2
    ts_files = count_records(tinysession.FileStore)
    ts_rows = count_records(lambda d: tinysession.SQLiteStore(os.path.join(d, "s.sqlite3")))
    contenders = [
        {"name": f"find -type f -mmin +{MAX_AGE // 60} -delete", "group": "file", "layout": build_tinysession_files,
             "command": FIND, "remaining": ts_files, "removes": half},
        {"name": "tinysession FileStore clean(max_age=2h)", "group": "file", "layout": build_tinysession_files,
             "child": "tinysession-files-max-age", "remaining": ts_files, "removes": half},
        {"name": "tinysession FileStore clean(keep=1000)", "group": "file", "layout": build_tinysession_files,
             "child": "tinysession-files-keep", "remaining": ts_files, "removes": lambda n: n - 1000},
        {"name": "raw sqlite DELETE WHERE mtime < ?", "group": "sqlite", "layout": build_raw_sqlite,
             "child": "raw-sqlite", "remaining": count_rows("raw.sqlite3", "s"), "removes": half},
        {"name": "tinysession SQLiteStore clean(max_age=2h)", "group": "sqlite", "layout": build_tinysession_sqlite,
             "child": "tinysession-sqlite", "remaining": ts_rows, "removes": half},
    ]
    if try_import("cachelib", "cachelib.file"):
        remaining = count_files(exclude={CACHELIB_COUNT_FILE})
        contenders.append(
            {"name": "cachelib FileSystemCache: one set() over threshold=n-1 (prunes expired)", "group": "file",
                 "layout": build_cachelib_files, "child": "cachelib", "remaining": remaining, "removes": half, "extra": 1})
    if django_ready(workdir) is not None:
        contenders += [
            {"name": "Django file SessionStore.clear_expired()", "group": "file", "layout": build_django_files,
                 "child": "django-file", "remaining": count_files("sessionid"), "removes": half},
            {"name": "Django db SessionStore.clear_expired()", "group": "sqlite", "layout": build_django_db,
                 "child": "django-db", "remaining": count_rows("django.sqlite3", "django_session"), "removes": half},
        ]
    if try_import("diskcache", "diskcache"):
        contenders.append({"name": "diskcache Cache.expire()", "group": "sqlite", "layout": build_diskcache,
                               "child": "diskcache", "remaining": count_rows("cache.db", "Cache"), "removes": half})
    return contenders


CLEAN_CHILDREN = {
    "tinysession-files-max-age": lambda d, n: child_tinysession_files(d, n, max_age=MAX_AGE),
    "tinysession-files-keep": lambda d, n: child_tinysession_files(d, n, keep=1000),
    "tinysession-sqlite": child_tinysession_sqlite,
    "raw-sqlite": child_raw_sqlite,
    "cachelib": lambda d, n: child_cachelib(d, n, threshold=n - 1),
    "django-file": lambda d, n: _child_django(d, "file"),
    "django-db": lambda d, n: _child_django(d, "db"),
    "diskcache": child_diskcache,
}


def clean_child_main(name, directory, count):
    """The `run.py _clean NAME DIR N` subprocess: set up, then time the clean and its peak RSS."""
    warnings.simplefilter("ignore")
    cleaner = CLEAN_CHILDREN[name](directory, count)
    gc.collect()
    reset = reset_peak_rss()
    before = proc_status_kb("VmRSS")
    started = time.perf_counter()
    cleaner()
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_kb": proc_status_kb("VmHWM"), "before_kb": before,
                      "reset": reset}))
    return 0


def _gnu_time():
    path = shutil.which("time")
    if path is None:
        return None
    probe = subprocess.run([path, "-f", "%M", "true"], capture_output=True, check=False, text=True)
    return path if probe.returncode == 0 and probe.stderr.strip().isdigit() else None


def run_command_clean(command, directory):
    """Run an external cleaner; its peak RSS comes from GNU time, or from polling /proc."""
    argv = [part.replace("{dir}", directory) for part in command]
    time_binary = _gnu_time()
    started = time.perf_counter()
    if time_binary is not None:
        process = subprocess.run([time_binary, "-f", "%M"] + argv, capture_output=True, check=False, text=True)
        seconds = time.perf_counter() - started
        if process.returncode != 0:
            raise RuntimeError(f"{argv} failed: {process.stderr.strip()}")
        return {"seconds": seconds, "peak_kb": int(process.stderr.strip().splitlines()[-1]), "before_kb": None}
    process = subprocess.Popen(argv)
    peak = 0
    while process.poll() is None:
        peak = max(peak, proc_status_kb("VmHWM", process.pid) or 0)
        time.sleep(0.001)
    seconds = time.perf_counter() - started
    NOTES.add("GNU time not found: find's peak RSS was sampled from /proc every millisecond (a lower bound)")
    return {"seconds": seconds, "peak_kb": peak or None, "before_kb": None}


def run_child_clean(name, directory, count):
    process = subprocess.run([sys.executable, os.path.abspath(__file__), "_clean", name, directory, str(count)],
                             capture_output=True, check=False, text=True,
                             env=dict(os.environ, TINYSESSION_ROOT=os.path.dirname(tinysession.__file__)))
    if process.returncode != 0:
        raise RuntimeError(f"clean child {name} failed:\n{process.stderr}")
    result = json.loads(process.stdout.strip().splitlines()[-1])
    if not result.pop("reset"):
        NOTES.add("could not reset VmHWM before cleaning: peak RSS includes the child's setup")
    return result


def run_clean_section(config, workdir):
    contenders = clean_contenders(workdir)
    count = config["clean_n"]
    results = {c["name"]: [] for c in contenders}
    log(f"3. cleaning: {len(contenders)} cleaners, {count:,} sessions, {config['clean_reps']} repetitions")
    for rep in range(config["clean_reps"]):
        for contender in rotated(contenders, rep):
            directory = os.path.join(workdir, f"clean-{rep}-{secrets.token_hex(4)}")
            contender["layout"](directory, count, time.time())
            built = contender["remaining"](directory)
            if built != count:
                raise AssertionError(f"{contender['name']}: built {built} sessions, not {count}")
            os.sync()
            if "command" in contender:
                result = run_command_clean(contender["command"], directory)
            else:
                result = run_child_clean(contender["child"], directory, count)
            remaining = contender["remaining"](directory)
            expected = count - contender["removes"](count) + contender.get("extra", 0)
            if remaining != expected:
                NOTES.add(f"{contender['name']} left {remaining:,} sessions, expected {expected:,}")
            results[contender["name"]].append(result)
            shutil.rmtree(directory, ignore_errors=True)
            log(f"  {contender['name']}: {result['seconds']:.2f} s")
    return contenders, results


def print_clean_section(config, contenders, results):
    count = config["clean_n"]
    runs = "one run" if config["clean_reps"] == 1 else f"median of {config['clean_reps']} runs"
    print(f"## 3. Cleaning {count:,} sessions of which half are expired "
          f"({runs} each, in a fresh process on a freshly built layout)\n")
    print("Expired = last written 3 hours ago, against a 2 hour limit; clean(keep=1000) also removes "
          "all but the 1,000 newest live sessions. cachelib has no public cleanup call: FileSystemCache "
          "prunes inside set() once its file count is over its threshold, so its row times one set() on a "
          "cache opened with threshold=n-1 (opening it, which counts the files, is not timed). "
          "seconds = the clean "
          "itself (Python cleaners time it in-process after their imports and setup; find is timed "
          "around its whole process). peak RSS = the cleaning process's resident high-water mark "
          "during the clean (Python: VmHWM reset just before it, so the interpreter and imports are "
          "included but setup peaks are not; find: GNU time's %M); added = peak minus RSS just "
          "before the clean (diskcache memory-maps its database, 64 MiB by default, and mapped pages "
          "count). × = time relative to the first row of the table.\n")
    titles = {"file": "File layouts, against find", "sqlite": "SQLite layouts, against a raw DELETE"}
    for group, title in titles.items():
        members = [c for c in contenders if c["group"] == group]
        if not members:
            continue
        print(f"### {title}\n")
        print("| cleaner | removes | seconds | × | peak RSS MB | added MB |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        baseline = statistics.median(r["seconds"] for r in results[members[0]["name"]])
        for contender in members:
            runs = results[contender["name"]]
            seconds = statistics.median(r["seconds"] for r in runs)
            peaks = [r["peak_kb"] for r in runs if r["peak_kb"]]
            peak = f"{max(peaks) / 1024:.1f}" if peaks else "-"
            added = [r["peak_kb"] - r["before_kb"] for r in runs if r["peak_kb"] and r["before_kb"]]
            added = f"{max(0, max(added)) / 1024:.1f}" if added else "-"
            removes = contender["removes"](count)
            print(f"| {contender['name']} | {removes:,} | {seconds:.3f} | {seconds / baseline:.2f}x | "
                  f"{peak} | {added} |")
        print()
    print("No cleanup API, so not measured: Beaker file sessions (nothing in beaker removes old session "
          "files; a cron job with find does it, as in the first row); sqlitedict (no expiry at all); "
          "Redis (keys expire by their TTL in the server).\n")


# -- 4. Import cost --

IMPORT_PROBE = """\
import sys, time
sys.path.insert(0, {root!r})
def rss():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
{setup}
before = rss()
started = time.perf_counter()
{statement}
elapsed = time.perf_counter() - started
print(elapsed, rss() - before)
"""

DJANGO_IMPORT = (
    "import django\nfrom django.conf import settings\n"
    "settings.configure(INSTALLED_APPS=['django.contrib.sessions'], SECRET_KEY='x')\n"
    "django.setup()\nfrom django.contrib.sessions.backends.{backend} import SessionStore"
)


def import_contenders():
    """Return (label, untimed setup, timed statement) for each import to measure."""
    django_label = "import django; settings.configure(); django.setup(); import sessions.backends.{}"
    candidates = [
        ("tinysession", "import tinysession", "", "import tinysession"),
        ("tinysession", "import tinysession, sqlite3 (what SQLiteStore adds)", "", "import tinysession, sqlite3"),
        ("cachelib", "from cachelib.file import FileSystemCache", "", "from cachelib.file import FileSystemCache"),
        ("beaker", "from beaker.middleware import SessionMiddleware", "",
         "from beaker.middleware import SessionMiddleware"),
        ("django", django_label.format("file"), "", DJANGO_IMPORT.format(backend="file")),
        ("django", django_label.format("db"), "", DJANGO_IMPORT.format(backend="db")),
        ("sqlitedict", "import sqlitedict", "", "import sqlitedict"),
        ("diskcache", "import diskcache", "", "import diskcache"),
        ("flask_session", "import flask_session, flask_session.cachelib (Flask already imported)",
         "import flask", "import flask_session, flask_session.cachelib"),
        ("flask", "import flask (for scale, not a session library)", "", "import flask"),
    ]
    if hasattr(tinysession, "RedisStore"):
        candidates.append(("redis", "import redis (redis-py, RedisStore's client)", "", "import redis"))
    peers = {"beaker": "Beaker", "django": "Django", "flask_session": "Flask-Session", "flask": "Flask",
             "redis": "redis-py"}
    return [(label, setup, statement) for module, label, setup, statement in candidates
            if try_import(peers.get(module, module), module)]


def run_import_section(config, snapshot):
    contenders = import_contenders()
    root = snapshot
    results = {label: [] for label, _, _ in contenders}
    log(f"4. imports: {len(contenders)} statements, {config['import_runs']} fresh interpreters each")
    for run in range(config["import_runs"]):
        for label, setup, statement in rotated(contenders, run):
            code = IMPORT_PROBE.format(root=root, setup=setup, statement=statement)
            process = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False, text=True)
            if process.returncode != 0:
                NOTES.add(f"import probe failed for {label}: {process.stderr.strip().splitlines()[-1]}")
                continue
            seconds, added_kb = process.stdout.split()
            results[label].append((float(seconds), int(added_kb)))
    return contenders, results


def print_import_section(config, contenders, results):
    print(f"## 4. Import cost in a fresh interpreter (median of {config['import_runs']} runs)\n")
    print("Time around the statement with time.perf_counter(); added RSS = VmRSS after minus before "
          "(/proc/self/status). Every module imports from bytecode (tinysession from the run's byte-compiled "
          "snapshot, as pip would install it). Django needs settings.configure() and django.setup() before its session "
          "backends import, so both are counted. × = relative to `import tinysession`.\n")
    print("| statement | ms | × | added RSS MB | × |")
    print("| --- | ---: | ---: | ---: | ---: |")
    reference = results.get("import tinysession")
    base_ms = statistics.median(s for s, _ in reference) * 1000 if reference else None
    base_kb = statistics.median(k for _, k in reference) if reference else None
    for label, _, _ in contenders:
        runs = results[label]
        if not runs:
            continue
        ms = statistics.median(s for s, _ in runs) * 1000
        kb = statistics.median(k for _, k in runs)
        ms_ratio = f"{ms / base_ms:.1f}x" if base_ms else "-"
        kb_ratio = f"{kb / base_kb:.1f}x" if base_kb else "-"
        print(f"| `{label}` | {ms:.1f} | {ms_ratio} | {kb / 1024:.2f} | {kb_ratio} |")
    print()


# -- HTTP: 5 (Flask under gunicorn) and 8 (Starlette under uvicorn), loaded by wrk --
#
# Every contender of a section is the same app served by its own server on a
# free loopback port, all started before the first run; the server builds it
# through `run:http_app()` (Flask) or `run:asgi_app()` (Starlette) from
# $BENCH_HTTP_*, so each worker opens its own store. Before the timed runs
# every connection gets its own session by one /login; wrk's generated Lua
# script gives each thread (one connection each) that cookie. Without wrk a
# Python load generator runs in a child process (`run.py _load`) instead.
#
# Server CPU per request: the utime + stime that the server's processes (and
# redis-server, for a contender on Redis) spent during a run, from
# /proc/<pid>/stat, divided by the requests answered. It stays steady on a
# busy machine, where requests/s does not.

HTTP_WORKERS = 2  # gunicorn sync workers (section 5); uvicorn runs one (section 8)
HTTP_CONNECTIONS = 16
HTTP_SIZES = {"1 KB": 7, "100 KB": 700}  # messages in the session's chat history: 1,053 and ~100,800 bytes
HTTP_PATHS = {"untouched": "/ping", "read": "/read", "append": "/append"}
COOKIE_LIMIT = 4093  # bytes of name, value and attributes: Werkzeug warns above it, browsers drop the cookie
WRK_SCRIPT = """\
local cookies = {%s}
local count = 0
function setup(thread)
  count = count + 1
  thread:set("cookie", cookies[count])
end
function init(args)
  if cookie ~= "" then wrk.headers["Cookie"] = cookie end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, '
    .. '"errors": %%d}\\n', summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def chat_history(count):
    """chat_record() grown (or cut) to ``count`` messages, the system message first.

    Each added message has the role and word count of one of chat_record()'s and words drawn from
    them (the same for every call), so the history compresses about as well as real text would,
    not as well as one conversation repeated.
    """
    record = chat_record()
    system, turns = record["messages"][0], record["messages"][1:]
    words = " ".join(message["content"] for message in turns).split()
    chooser = random.Random(count)
    messages = [system]
    for index in range(count - 1):
        model = turns[index % len(turns)]
        text = " ".join(chooser.choice(words) for _ in model["content"].split())
        messages.append({"role": model["role"], "content": text})
    record["messages"] = messages
    return record


def history_bytes(count):
    return len(json.dumps(chat_history(count), separators=(",", ":")).encode())


def read_answer(messages):
    return f"{len(messages)} messages; last: {messages[-1]['content']}"


def append_message(messages):
    """Append one message and drop the oldest after the system message: the history keeps its size."""
    messages.append(new_message())
    del messages[1]


def http_flask_app(get_session=None, configure=None):
    """Section 5's Flask app; without ``get_session`` it has no sessions and only /ping is used.

    /login?n=N stores chat_history(N), /read answers the history's length and last message, /append
    appends one message and drops the oldest, /ping never touches the session.
    """
    from flask import Flask, request

    app = Flask(__name__)
    if configure is not None:
        configure(app)

    def login():
        get_session().update(chat_history(int(request.args["n"])))
        return "ok"

    def append():
        session = get_session()
        messages = session["messages"]
        append_message(messages)
        session["messages"] = messages
        return "ok"

    app.add_url_rule("/ping", "ping", lambda: "pong")
    if get_session is not None:
        app.add_url_rule("/login", "login", login)
        app.add_url_rule("/read", "read", lambda: read_answer(get_session()["messages"]))
        app.add_url_rule("/append", "append", append)
    return app


def make_http_app(name, directory, redis_port):
    """Build section 5's contender ``name`` (a key of HTTP_CONTENDERS) in a gunicorn worker."""
    import flask

    def with_tinysession(open_store):
        def configure(app):
            app.secret_key = FLASK_SECRET
            app.session_interface = tinysession.FlaskSessionInterface(open_store())

        return http_flask_app(lambda: flask.session, configure)

    def with_flask_session(**config):
        def configure(app):
            from flask_session import Session

            app.secret_key = FLASK_SECRET
            app.config.update(config)
            if config["SESSION_TYPE"] == "sqlalchemy":
                from flask_sqlalchemy import SQLAlchemy

                sqlalchemy_pragmas()
                app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + os.path.join(directory, "fs.sqlite3")
                app.config["SESSION_SQLALCHEMY"] = SQLAlchemy(app)
            Session(app)

        return http_flask_app(lambda: flask.session, configure)

    def cachelib():
        from cachelib.file import FileSystemCache

        return FileSystemCache(os.path.join(directory, "c"), threshold=500)

    def cookie_app(app):
        app.secret_key = FLASK_SECRET

    # The 100 KB session is past the default max_bytes of 64 KiB: lifted here.
    options = {"max_age": 86400, "max_bytes": None, "serializer": tinysession.TaggedJSON()}
    builders = {
        "no sessions": lambda: http_flask_app(),
        "tinysession FileStore": lambda: with_tinysession(
            lambda: tinysession.FileStore(os.path.join(directory, "s"), **options)),
        "tinysession SQLiteStore": lambda: with_tinysession(
            lambda: tinysession.SQLiteStore(os.path.join(directory, "s.sqlite3"), **options)),
        "tinysession RedisStore": lambda: with_tinysession(
            lambda: tinysession.RedisStore(redis_client(redis_port), prefix="bench:", **options)),
        "Flask signed-cookie session": lambda: http_flask_app(lambda: flask.session, cookie_app),
        "Flask-Session cachelib FileSystemCache": lambda: with_flask_session(
            SESSION_TYPE="cachelib", SESSION_CACHELIB=cachelib()),
        "Flask-Session redis": lambda: with_flask_session(SESSION_TYPE="redis", SESSION_REDIS=redis_client(redis_port)),
        "Flask-Session SQLAlchemy (SQLite)": lambda: with_flask_session(SESSION_TYPE="sqlalchemy"),
    }
    return builders[name]()


def redis_client(port):
    import redis

    return redis.Redis(host="127.0.0.1", port=int(port))


def http_app():
    """The WSGI app a gunicorn worker serves (`run:http_app()`), described by $BENCH_HTTP_*."""
    warnings.simplefilter("ignore")
    load_tinysession(os.environ["TINYSESSION_ROOT"])
    return make_http_app(os.environ["BENCH_HTTP_APP"], os.environ["BENCH_HTTP_DIR"],
                         os.environ.get("BENCH_REDIS_PORT"))


# name -> (label of what it needs, modules, needs Redis)
HTTP_CONTENDERS = {
    "no sessions": ("Flask", ["flask"], False),
    "tinysession FileStore": ("Flask", ["flask"], False),
    "tinysession SQLiteStore": ("Flask", ["flask"], False),
    "tinysession RedisStore": ("redis-py", ["flask", "redis"], True),
    "Flask signed-cookie session": ("Flask", ["flask"], False),
    "Flask-Session cachelib FileSystemCache": ("Flask-Session (cachelib)", ["flask_session", "cachelib.file"], False),
    "Flask-Session redis": ("Flask-Session (redis)", ["flask_session", "redis"], True),
    "Flask-Session SQLAlchemy (SQLite)": ("Flask-Session (SQLAlchemy)", ["flask_session", "flask_sqlalchemy"], False),
}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(port, path, cookie=""):
    """GET ``path``; return (status, body, the Cookie header its Set-Cookie headers amount to)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        response = connection.getresponse()
        body = response.read()
        pairs = [header.split(";", 1)[0].strip() for header in response.msg.get_all("Set-Cookie") or []]
        return response.status, body, "; ".join(pair for pair in pairs if pair.partition("=")[2])
    finally:
        connection.close()


def cpu_seconds(pid):
    """Return the user + system CPU seconds process ``pid`` has used so far (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(parent):
    """Return the ids of the processes whose parent is ``parent`` (gunicorn's workers)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    if int(file.read().rpartition(")")[2].split()[1]) == parent:
                        children.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue  # a process that ended while we looked
    return children


class AppServer:
    """One HTTP contender: a gunicorn (section 5) or uvicorn (section 8) on a free loopback port."""

    def __init__(self, name, kind, workdir, redis_server):
        self.name, self.kind = name, kind
        self.directory = os.path.join(workdir, f"http-{secrets.token_hex(4)}")
        self.redis_server = redis_server
        self.port = None
        self.process = None
        self.pids = []

    def argv(self, log_path):
        if self.kind == "asgi":
            return [sys.executable, "-m", "uvicorn", "--factory", "run:asgi_app", "--app-dir", HERE,
                    "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                    "--log-level", "warning", "--no-access-log"]
        return [sys.executable, "-m", "gunicorn", "--workers", str(HTTP_WORKERS), "--worker-class", "sync",
                "--bind", f"127.0.0.1:{self.port}", "--chdir", HERE, "--error-logfile", log_path,
                "--log-level", "warning", "--timeout", "60", "--graceful-timeout", "10", "run:http_app()"]

    def start(self):
        """Start the server and wait for /ping; raise RuntimeError with its log if it does not answer."""
        os.makedirs(self.directory)
        self.port = free_port()
        log_path = os.path.join(self.directory, "server.log")
        redis_port = self.redis_server.port if self.redis_server is not None else ""
        env = dict(os.environ, TINYSESSION_ROOT=os.path.dirname(tinysession.__file__), BENCH_HTTP_APP=self.name,
                   BENCH_HTTP_DIR=self.directory, BENCH_REDIS_PORT=str(redis_port))
        with open(log_path, "ab") as server_log:
            self.process = subprocess.Popen(self.argv(log_path), env=env, stdin=subprocess.DEVNULL,
                                            stdout=server_log, stderr=server_log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if http_get(self.port, "/ping")[:2] == (200, b"pong"):
                    self.pids = [self.process.pid, *child_pids(self.process.pid)]
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        with open(log_path, errors="replace") as file:
            raise RuntimeError(f"the server of {self.name} did not answer /ping:\n{file.read()[-2000:]}")

    def cpu(self):
        """CPU seconds used so far by the server's processes, and redis-server's if the contender uses it."""
        pids = list(self.pids)
        if self.redis_server is not None:
            pids.append(self.redis_server.process.pid)
        return sum(cpu_seconds(pid) for pid in pids)

    def stop(self):
        """SIGTERM (a graceful stop), then SIGKILL after 20 s."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def http_problem(modules):
    """Why an HTTP section cannot run here, or None."""
    import importlib

    if not os.path.exists("/proc/self/stat"):
        return "no /proc to read the server's CPU time from"
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"{module} does not import ({exc})"
    return None


def http_contenders(table, redis_server):
    """The names of ``table``'s contenders that can run: their modules import, and Redis runs if they need it."""
    names = []
    for name, (label, modules, needs_redis) in table.items():
        if needs_redis and (redis_server is None or not hasattr(tinysession, "RedisStore")):
            continue  # the header's Redis note says why
        if try_import(label, *modules):
            names.append(name)
    return names


def flask_cookie_bytes(record):
    """The size of the Set-Cookie pair Flask's default session would send for ``record``."""
    from flask import Flask

    app = Flask(__name__)
    app.secret_key = FLASK_SECRET
    serializer = app.session_interface.get_signing_serializer(app)
    return len(app.config["SESSION_COOKIE_NAME"]) + 1 + len(serializer.dumps(dict(record)))


def check_http_round_trip(name, port, cookie, count):
    """Read, append, read again with one session: the history must keep its length and end with the append."""
    prefix = f"{count} messages; last: "
    before = http_get(port, "/read", cookie)[1].decode()
    status, _, new_cookie = http_get(port, "/append", cookie)
    after = http_get(port, "/read", new_cookie or cookie)[1].decode()  # a cookie session sends a new cookie
    if not before.startswith(prefix) or status != 200 or after != prefix + APPEND_TEXT:
        raise AssertionError(f"{name}: /read gave {before[:60]!r}, /append {status}, then /read {after[:60]!r}")


def http_sessions(name, port, count):
    """Log one session of ``count`` messages in per connection; return their Cookie headers."""
    cookies = []
    for _ in range(HTTP_CONNECTIONS):
        status, _, cookie = http_get(port, f"/login?n={count}")
        if status != 200 or not cookie:
            raise AssertionError(f"{name}: /login answered {status}, cookie {cookie!r}")
        cookies.append(cookie)
    if len(set(cookies)) != len(cookies) and "cookie" not in name:  # a cookie session: same data, same cookie
        raise AssertionError(f"{name}: two logins got the same session cookie")
    check_http_round_trip(name, port, cookies[0], count)
    return cookies


def load_batch(server, path, cookie_file, seconds):
    """Run wrk (else `run.py _load`) on ``path`` for ``seconds`` after settle(); return its figures.

    req/s, p50 and p99 in ms, failed requests, requests, and the server's CPU µs per request.
    """
    settle()
    if shutil.which("wrk"):
        argv = ["wrk", "-t", str(HTTP_CONNECTIONS), "-c", str(HTTP_CONNECTIONS), "-d", f"{seconds}s",
                "--timeout", "10s", "-s", cookie_file + ".lua", f"http://127.0.0.1:{server.port}{path}"]
    else:
        argv = [sys.executable, os.path.abspath(__file__), "_load", str(server.port), path, str(seconds), cookie_file]
    cpu_before = server.cpu()
    process = subprocess.run(argv, capture_output=True, check=False, text=True, timeout=seconds + 60)
    cpu = server.cpu() - cpu_before
    lines = [line for line in process.stdout.splitlines() if line.startswith("BENCH ")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"{argv[0]} failed ({process.returncode}): {process.stderr.strip() or process.stdout.strip()}")
    data = json.loads(lines[-1][len("BENCH "):])
    requests = max(1, data["requests"])
    return {"rps": data["requests"] * 1e6 / data["duration_us"], "p50_ms": data["p50_us"] / 1000,
            "p99_ms": data["p99_us"] / 1000, "errors": data["errors"], "requests": data["requests"],
            "cpu_us": cpu * 1e6 / requests}


def load_child_main(port, path, seconds, cookie_file):
    """`run.py _load`: wrk's job in Python, one thread and keep-alive connection per cookie; print BENCH."""
    import http.client

    with open(cookie_file) as file:
        cookies = json.load(file)
    latencies, errors = [], []
    deadline = time.monotonic() + seconds

    def client(cookie):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Cookie": cookie} if cookie else {}
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                errors.append(1)
                continue
            latencies.append(time.perf_counter() - started)
            if response.status != 200:
                errors.append(1)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(cookie,)) for cookie in cookies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    duration = time.perf_counter() - started
    latencies = sorted(latencies) or [0.0]
    print("BENCH " + json.dumps({
        "requests": len(latencies), "duration_us": int(duration * 1e6), "errors": len(errors),
        "p50_us": int(latencies[len(latencies) // 2] * 1e6), "p99_us": int(latencies[len(latencies) * 99 // 100] * 1e6)}))
    return 0


def write_cookie_file(path, cookies):
    """Write ``cookies`` for both load generators: ``path`` (JSON, for `_load`) and ``path.lua`` (for wrk)."""
    if any("]==]" in cookie or "\n" in cookie for cookie in cookies):
        raise ValueError("a cookie that does not fit a Lua long string")
    with open(path, "w") as file:
        json.dump(cookies, file)
    with open(path + ".lua", "w") as file:
        file.write(WRK_SCRIPT % ", ".join(f"[==[{cookie}]==]" for cookie in cookies))


def http_plan(server, cells):
    """Log the sessions of ``cells`` ((size, kind) pairs) in, and write their cookie files; return the plan."""
    plan = {}
    for size in dict.fromkeys(size for size, _ in cells):
        if server.name == "no sessions":
            cookies = [""] * HTTP_CONNECTIONS
        else:
            cookies = http_sessions(server.name, server.port, HTTP_SIZES[size])
        cookie_file = os.path.join(server.directory, f"cookies-{size.replace(' ', '')}.json")
        write_cookie_file(cookie_file, cookies)
        plan.update({(size, kind): cookie_file for s, kind in cells if s == size})
    return plan


def run_http(kind, cells_of, config, workdir, redis_server, table, title):
    """Start every contender of ``table``, measure its cells (``cells_of(name)``) interleaved; return results."""
    names = http_contenders(table, redis_server)
    if config["http_only"] is not None:
        NOTES.add(f"--quick: the HTTP sections ran only {' and '.join(config['http_only'])}")
        names = [name for name in names if name in config["http_only"]]
    seconds, reps = config["http_s"], config["http_reps"]
    log(f"{title}: {len(names)} apps, {seconds} s per run, {reps} repetitions")
    servers, plans = {}, {}
    try:
        for name in names:
            server = servers[name] = AppServer(name, kind, workdir, redis_server)
            server.start()
            plans[name] = http_plan(server, cells_of(name))
            for (size, cell_kind), cookie_file in plans[name].items():
                if config["http_warmup_s"]:
                    load_batch(server, HTTP_PATHS[cell_kind], cookie_file, config["http_warmup_s"])
        results = {name: {cell: [] for cell in plans[name]} for name in names}
        for rep in range(reps):
            for name in rotated(names, rep):
                for (size, cell_kind), cookie_file in plans[name].items():
                    result = load_batch(servers[name], HTTP_PATHS[cell_kind], cookie_file, seconds)
                    results[name][size, cell_kind].append(result)
                    log(f"    {name}, {size} {cell_kind}: {result['rps']:,.0f} req/s, {result['cpu_us']:,.0f} µs CPU")
            log(f"  repetition {rep + 1}/{reps} done")
    finally:
        for server in servers.values():
            server.stop()
    for name, cells in results.items():
        for (size, cell_kind), runs in cells.items():
            failed = sum(run["errors"] for run in runs)
            if failed:
                NOTES.add(f"HTTP {name}, {size} {cell_kind}: {failed:,} of "
                          f"{sum(run['requests'] for run in runs):,} requests failed")
    return names, results


def print_http_table(names, results, size, kinds):
    """One Markdown table: per kind, req/s, server CPU µs per request and × (CPU against no sessions)."""
    floor = statistics.median(run["cpu_us"] for run in results["no sessions"]["1 KB", "untouched"])
    header = " | ".join(f"{kind} req/s | CPU µs | ×" for kind in kinds)
    print(f"| app | {header} |")
    print("| --- |" + " ---: | ---: | ---: |" * len(kinds))
    for name in names:
        cells = []
        for kind in kinds:
            runs = results[name].get((size, kind))
            if not runs:
                cells.append("- | - | -")
                continue
            rps = statistics.median(run["rps"] for run in runs)
            cpu = statistics.median(run["cpu_us"] for run in runs)
            cells.append(f"{rps:,.0f} | {cpu:,.0f} | {cpu / floor:.2f}x")
        print(f"| {name} | {' | '.join(cells)} |")
    print()


def http_method_text(config, server):
    generator = (f"wrk -t {HTTP_CONNECTIONS} -c {HTTP_CONNECTIONS}" if shutil.which("wrk")
                 else f"a Python load generator in a child process ({HTTP_CONNECTIONS} threads)")
    return (f"One {server} per app on 127.0.0.1, all started before the first run; {generator}, each "
            "connection sending the cookie of its own session, logged in beforehand by one request. "
            "untouched = a view that never touches the session; read = read it, answer its length and last "
            "message; append = append one message, drop the oldest, save. Each run starts after os.sync(). "
            "CPU µs = the server's CPU time per request (utime + stime of its processes from /proc, plus "
            "redis-server's for the apps on Redis); × = that CPU against the app without sessions on its "
            f"untouched view (lower is cheaper). Median of {config['http_reps']} runs of {config['http_s']} s.\n")


# -- 5. HTTP: a Flask app under gunicorn --


def flask_cells(name):
    if name == "no sessions":
        return [("1 KB", "untouched")]
    cells = [("1 KB", "read"), ("1 KB", "append")]  # untouched: section 2 in process, section 8 over HTTP
    if name == "Flask signed-cookie session" and "100 KB" in HTTP_SIZES:
        size = flask_cookie_bytes(chat_history(HTTP_SIZES["100 KB"]))
        NOTES.add(f"Flask's signed-cookie session: the 100 KB history makes a {size:,}-byte cookie, over the "
                  f"{COOKIE_LIMIT:,} bytes Werkzeug allows, so its 100 KB cells are skipped")
        return cells
    return cells + [("100 KB", "read"), ("100 KB", "append")]


def run_http_section(config, workdir, redis_server):
    problem = http_problem(["gunicorn", "flask"])
    if problem is not None:
        NOTES.add(f"section 5 (HTTP, Flask) skipped: {problem}")
        return [], {}
    def cells_of(name):
        return [cell for cell in flask_cells(name) if cell[0] in config["http_sizes"]]

    return run_http("wsgi", cells_of, config, workdir, redis_server, HTTP_CONTENDERS, "5. HTTP, Flask")


def print_http_section(config, names, results):
    if not names:
        return
    print(f"## 5. HTTP: Flask under gunicorn ({HTTP_WORKERS} sync workers), server CPU per request\n")
    print(http_method_text(config, "gunicorn") + "\nThe Flask apps use `flask.session`: tinysession through "
          "`FlaskSessionInterface` on a store with `serializer=TaggedJSON()`, Flask-Session with its "
          "defaults (permanent sessions, written on every request), Flask's own signed cookie. Sync "
          "workers close the connection after each response, so every request includes a TCP connect.\n")
    for size in config["http_sizes"]:
        count = HTTP_SIZES[size]
        kinds = ["untouched", "read", "append"] if size == "1 KB" else ["read", "append"]
        print(f"### {size}: a chat history of {count:,} messages ({history_bytes(count):,} bytes as compact JSON)\n")
        print_http_table(names, results, size, kinds)


# -- 8. HTTP: a Starlette app under uvicorn --

ASGI_CONTENDERS = {
    "no sessions": ("Starlette and uvicorn", ["starlette", "uvicorn"], False),
    "Starlette SessionMiddleware (signed cookie)": ("Starlette's SessionMiddleware (itsdangerous)",
                                                    ["starlette.middleware.sessions", "itsdangerous"], False),
    "starsessions on Redis": ("starsessions", ["starsessions", "starsessions.stores.redis"], True),
    "tinysession FileStore": ("Starlette and uvicorn", ["starlette", "uvicorn"], False),
    "tinysession SQLiteStore": ("Starlette and uvicorn", ["starlette", "uvicorn"], False),
    "tinysession RedisStore": ("redis-py", ["starlette", "uvicorn", "redis"], True),
}


def asgi_app():
    """The ASGI app uvicorn serves (`run:asgi_app`, a factory), described by $BENCH_HTTP_*."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    warnings.simplefilter("ignore")
    load_tinysession(os.environ["TINYSESSION_ROOT"])
    name, directory, redis_port = (os.environ["BENCH_HTTP_APP"], os.environ["BENCH_HTTP_DIR"],
                                   os.environ.get("BENCH_REDIS_PORT"))

    async def login(request):
        request.session.update(chat_history(int(request.query_params["n"])))
        return PlainTextResponse("ok")

    async def read(request):
        return PlainTextResponse(read_answer(request.session["messages"]))

    async def append(request):
        messages = request.session["messages"]
        append_message(messages)
        request.session["messages"] = messages
        return PlainTextResponse("ok")

    async def ping(request):
        return PlainTextResponse("pong")

    routes = [Route("/ping", ping)]
    if name != "no sessions":
        routes += [Route("/login", login), Route("/read", read), Route("/append", append)]
    app = Starlette(routes=routes)
    options = {"max_age": 86400}
    if name == "Starlette SessionMiddleware (signed cookie)":
        from starlette.middleware.sessions import SessionMiddleware

        app.add_middleware(SessionMiddleware, secret_key=FLASK_SECRET, max_age=86400)
    elif name == "starsessions on Redis":
        from starsessions import SessionAutoloadMiddleware, SessionMiddleware
        from starsessions.stores.redis import RedisStore

        app.add_middleware(SessionAutoloadMiddleware)
        app.add_middleware(SessionMiddleware, store=RedisStore(f"redis://127.0.0.1:{redis_port}"),
                           lifetime=86400, cookie_https_only=False)
    elif name == "tinysession FileStore":
        app.add_middleware(tinysession.ASGISessionMiddleware,
                           store=tinysession.FileStore(os.path.join(directory, "s"), **options))
    elif name == "tinysession SQLiteStore":
        app.add_middleware(tinysession.ASGISessionMiddleware,
                           store=tinysession.SQLiteStore(os.path.join(directory, "s.sqlite3"), **options))
    elif name == "tinysession RedisStore":
        app.add_middleware(tinysession.ASGISessionMiddleware,
                           store=tinysession.RedisStore(redis_client(redis_port), prefix="bench:", **options))
    return app


def asgi_cells(name):
    return [("1 KB", "untouched")] + ([] if name == "no sessions" else [("1 KB", "read"), ("1 KB", "append")])


def run_asgi_section(config, workdir, redis_server):
    problem = http_problem(["uvicorn", "starlette"])
    if problem is not None:
        NOTES.add(f"section 8 (HTTP, ASGI) skipped: {problem}")
        return [], {}
    return run_http("asgi", asgi_cells, config, workdir, redis_server, ASGI_CONTENDERS, "8. HTTP, ASGI")


def print_asgi_section(config, names, results):
    if not names:
        return
    count = HTTP_SIZES["1 KB"]
    print("## 8. HTTP: a Starlette app under uvicorn (1 worker), server CPU per request\n")
    print(http_method_text(config, "uvicorn") + f"\nSessions hold a chat history of {count} messages "
          f"({history_bytes(count):,} bytes as compact JSON), read through `request.session`. "
          "starsessions runs with its SessionAutoloadMiddleware (it loads the session of every request "
          "that sends its cookie), as its documentation shows.\n")
    print_http_table(names, results, "1 KB", list(HTTP_PATHS))


# -- 9. The message log --
#
# MessageLog in process, per store, on conversations of 10 to 10,000 messages:
# one append; reading the last 5 rounds; against rewriting the whole record
# (the session-dict recipe) and the raw limit of one append (a write with
# O_APPEND, one SQLite INSERT, one RPUSH).

REWRITE_LIMIT = 1000  # past it the record is megabytes: rewriting it is the problem the log solves


def log_messages(count):
    """``count`` messages of about 200 characters, user and assistant in turn (a round is two)."""
    roles = ("user", "assistant")
    return [{"role": roles[index % 2], "content": f"{index} " + "x" * 200} for index in range(count)]


def raw_log_append(name, store, directory):
    """Return a function doing the raw limit's one append for ``store``."""
    line = json.dumps(log_messages(1)[0], separators=(",", ":")).encode() + b"\n"
    if name == "FileStore":
        fd = os.open(os.path.join(directory, "raw.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return lambda: os.write(fd, line)
    if name == "SQLiteStore":
        connection = sqlite3.connect(os.path.join(directory, "raw.sqlite3"), isolation_level=None)
        connection.executescript(SQLITE_PRAGMAS + "; CREATE TABLE m (seq INTEGER PRIMARY KEY, key TEXT, line BLOB)")
        return lambda: connection.execute("INSERT INTO m (key, line) VALUES ('k', ?)", (line,))
    return lambda: store.client.rpush("bench:raw", line)


def median_us(function, count, budget_s=3.0, clock=time.perf_counter):
    """Median µs of ``count`` calls of ``function`` after settle(), or of those made in ``budget_s`` (at least 5).

    ``clock`` is wall time by default; time.thread_time for pure computation (the thread's CPU time,
    which other processes on a busy machine do not inflate).
    """
    settle()
    samples = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < count and (len(samples) < 5 or time.perf_counter() < deadline):
        started = clock()
        function()
        samples.append((clock() - started) * 1e6)
    return statistics.median(samples)


def log_batch(name, store, directory, config):
    """One repetition for one store: {(measure, messages): µs}."""
    count, message = config["log_n"], log_messages(1)
    results = {("raw", 0): median_us(raw_log_append(name, store, directory), count)}
    for size in config["log_sizes"]:
        log = tinysession.MessageLog(store, f"log{size}-{secrets.token_hex(4)}")
        log.extend(log_messages(size))
        results["append", size] = median_us(lambda log=log: log.extend(message), count)
        results["read", size] = median_us(lambda log=log: log.read(max_rounds=5), count)
        log.clear()
        if size <= REWRITE_LIMIT:
            key = f"rec{size}-{secrets.token_hex(4)}"
            record = {"messages": log_messages(size)}
            store[key] = record

            def rewrite(key=key, record=record):
                record["messages"].append(message[0])
                del record["messages"][0]
                store[key] = record

            results["rewrite", size] = median_us(rewrite, count)
            del store[key]
    return results


def run_log_section(config, workdir, redis_server):
    if not hasattr(tinysession, "MessageLog"):
        NOTES.add("section 9 (message log) skipped: this tinysession has no MessageLog")
        return [], {}
    stores = [("FileStore", lambda d: tinysession.FileStore(os.path.join(d, "s"), max_bytes=None)),
              ("SQLiteStore", lambda d: tinysession.SQLiteStore(os.path.join(d, "s.sqlite3"), max_bytes=None))]
    if redis_server is not None:
        stores.append(("RedisStore", lambda d: tinysession.RedisStore(redis_server.client(), prefix="bench:log:",
                                                                        max_bytes=None)))
    log(f"9. message log: {len(stores)} stores, {config['log_n']} calls per figure, {config['log_reps']} repetitions")
    results = {name: [] for name, _ in stores}
    for rep in range(config["log_reps"]):
        for name, open_store in rotated(stores, rep):
            directory = os.path.join(workdir, f"log-{name}-{rep}")
            os.makedirs(directory)
            store = open_store(directory)
            try:
                results[name].append(log_batch(name, store, directory, config))
            finally:
                wait_for_cleans()
                store.close()
                shutil.rmtree(directory, ignore_errors=True)
    return [name for name, _ in stores], results


def print_log_section(config, names, results):
    if not names:
        return
    print(f"## 9. The message log: µs per call (median of {config['log_n']} calls or of 3 s of calls, median of "
          f"{config['log_reps']} repetitions)\n")
    print("`MessageLog` in process, on a conversation of N messages of about 200 characters (user and "
          "assistant in turn). append = `extend()` of one message; read = `read(max_rounds=5)`, the last 5 "
          "rounds; rewrite = the session-dict recipe: append to the record's list, drop the oldest, save "
          f"the whole record (up to {REWRITE_LIMIT:,} messages); raw append = the store's raw limit (a "
          "`write` with O_APPEND, one SQLite INSERT, one RPUSH). × = against the same store at "
          f"{config['log_sizes'][0]:,} messages.\n")
    print("| store | messages | append µs | × | read last 5 rounds µs | × | rewrite µs | raw append µs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    first = config["log_sizes"][0]
    for name in names:
        def median(measure, size, name=name):
            return statistics.median(run[measure, size] for run in results[name])

        raw = median("raw", 0)
        for size in config["log_sizes"]:
            append, read = median("append", size), median("read", size)
            rewrite = f"{median('rewrite', size):,.0f}" if size <= REWRITE_LIMIT else "-"
            print(f"| {name} | {size:,} | {append:,.0f} | {append / median('append', first):.2f}x | {read:,.0f} | "
                  f"{read / median('read', first):.2f}x | {rewrite} | {raw:,.0f} |")
    print()


# -- c. Redis Cluster against one server --
#
# The same RedisStore operations on a private 6-node Redis Cluster (3 masters,
# 3 replicas, through redis-py's RedisCluster: the bucketed layout) and on the
# one redis-server the other sections use, interleaved in one run; then how
# evenly CLUSTER_SPREAD sessions spread over the masters.

CLUSTER_NODES = 6
CLUSTER_MAX_PORT = 55535  # a node's cluster bus listens on port + 10000
CLUSTER_TIMED = ["save", "load", "conditional update", "touch", "remove"]  # µs per operation
CLUSTER_CALLS = ["len()", "stats()", "clean(keep)", "clean(max_age)"]  # ms per call


class RedisCluster:
    """A private Redis Cluster of CLUSTER_NODES redis-servers on loopback (a replica per master), no persistence."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.servers = []

    def start(self):
        """Start the nodes, join them with ``redis-cli --cluster create``; return None, or what went wrong.

        On any failure (Ctrl-C included) the nodes already started are stopped.
        """
        cli = shutil.which("redis-cli")
        if cli is None:
            return "no redis-cli binary"
        try:
            for number in range(CLUSTER_NODES):
                server = RedisServer(self.workdir, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                     "--cluster-node-timeout", "2000", name=f"cluster-{number}")
                self.servers.append(server)
                problem = server.start(max_port=CLUSTER_MAX_PORT)
                if problem is not None:
                    self.stop()
                    return problem
            created = subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in self.servers), "--cluster-replicas",
                 "1", "--cluster-yes"], capture_output=True, check=False, timeout=60)
            deadline = time.monotonic() + 30
            while created.returncode == 0 and b"cluster_state:ok" not in subprocess.run(
                    [cli, "-p", str(self.servers[0].port), "cluster", "info"], capture_output=True, check=False,
                    timeout=10).stdout:
                if time.monotonic() > deadline:
                    self.stop()
                    return "the cluster did not reach cluster_state:ok within 30 s"
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        if created.returncode != 0:
            self.stop()
            return f"redis-cli --cluster create failed: {created.stderr.decode(errors='replace').strip()[-200:]}"
        return None

    def client(self):
        import redis.cluster

        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.servers[0].port)

    def stop(self):
        for server in self.servers:
            server.stop()
        self.servers = []


def cluster_batch(store, count, record):
    """One repetition on one store: {operation: µs per operation, or ms per call for CLUSTER_CALLS}.

    The store starts empty; every phase is timed alone after gc.collect(), untimed (no os.sync:
    Redis here writes nothing to disk). It ends empty.
    """
    message = new_message()
    keys = [secrets.token_hex(16) for _ in range(count)]
    results = {}

    def timed(operation, calls, function, scale):
        gc.collect()
        started = time.perf_counter()
        for call in calls:
            function(call)
        results[operation] = (time.perf_counter() - started) * scale / len(calls)

    def put(key):
        store[key] = record

    def update(key):
        loaded, data, _ = store.load(key)
        loaded["messages"].append(message)
        if not store.save(key, store.encode(key, loaded), expected=data):
            raise AssertionError("a conditional write failed with no other writer")

    def remove(key):
        del store[key]

    timed("save", keys, put, 1e6)
    timed("load", keys, store.__getitem__, 1e6)
    timed("conditional update", keys, update, 1e6)
    timed("touch", keys, store.touch, 1e6)
    timed("len()", range(5), lambda _: len(store), 1e3)
    timed("stats()", range(3), lambda _: store.stats(), 1e3)
    if len(store) != count:
        raise AssertionError(f"{store!r}: {len(store)} sessions, {count} saved")
    timed("remove", keys[:count // 2], remove, 1e6)
    timed("clean(keep)", [None], lambda _: store.clean(keep=count // 4), 1e3)
    timed("clean(max_age)", [None], lambda _: store.clean(max_age=MAX_AGE, now=time.time() + 2 * MAX_AGE), 1e3)
    if len(store) != 0:
        raise AssertionError(f"{store!r}: {len(store)} sessions left after the cleans, none expected")
    return results


def cluster_spread(client, count, record):
    """Save ``count`` sessions on the cluster; return each master's key count (DBSIZE), largest first."""
    store = tinysession.RedisStore(client, prefix="bench:spread:", max_age=86400, max_sessions=10**9)
    try:
        for _ in range(count):
            store[secrets.token_hex(16)] = record
        return sorted((node.redis_connection.dbsize() for node in client.get_primaries()), reverse=True)
    finally:
        store.close()


def run_cluster_section(config, workdir, redis_server):
    """Return ({"version": ..., "repr": ...}, {"server": [...], "cluster": [...], "spread": [...]}) or ({}, {})."""
    if redis_server is None:
        NOTES.add("section c (Redis Cluster) skipped: no single redis-server to compare with (see the Redis rows)")
        return {}, {}
    cluster = RedisCluster(os.path.join(workdir, "cluster"))
    log(f"c. Redis Cluster: starting {CLUSTER_NODES} nodes")
    problem = cluster.start()
    if problem is not None:
        NOTES.add(f"section c (Redis Cluster) skipped: {problem}")
        return {}, {}
    clients = []
    try:
        version = subprocess.run([shutil.which("redis-server") or "redis-server", "--version"], capture_output=True,
                                 check=False).stdout.decode().split()
        clients = [redis_server.client(), cluster.client()]
        clients[0].flushdb()
        clients[1].flushdb(target_nodes="primaries")
        # max_sessions far above the sizes here: no background clean starts in the middle of a timed phase
        stores = {name: tinysession.RedisStore(client, prefix="bench:c:", max_age=86400,
                                            max_sessions=10**9)
                  for name, client in zip(("server", "cluster"), clients)}
        record = chat_record()
        log(f"  {config['cluster_n']} sessions, {config['cluster_reps']} repetitions, then {config['cluster_spread']:,}"
            " sessions for the spread")
        for store in stores.values():
            cluster_batch(store, WARMUP, record)
        results = {name: [] for name in stores}
        for rep in range(config["cluster_reps"]):
            for name in rotated(list(stores), rep):
                results[name].append(cluster_batch(stores[name], config["cluster_n"], record))
        info = {"version": " ".join(version[:3]), "repr": repr(stores["cluster"])}
        for store in stores.values():
            store.close()
        results["spread"] = cluster_spread(clients[1], config["cluster_spread"], record)
        return info, results
    finally:
        for client in clients:
            client.close()
        cluster.stop()


def print_cluster_section(config, info, results):
    if not info:
        return
    print(f"## c. Redis Cluster against one server ({config['cluster_n']:,} sessions, median of "
          f"{config['cluster_reps']} repetitions)\n")
    print(f"The same `RedisStore` (max_age=1 day, max_sessions=10**9, so no background clean runs) on one private redis-server and on a "
          f"private {CLUSTER_NODES}-node Redis Cluster ({CLUSTER_NODES // 2} masters, a replica each, {info['version']}; "
          f"{info['repr']}) through redis-py's `RedisCluster`, all on loopback, interleaved in one run. "
          "A phase runs over every session: save a new key, load, conditional update (load, append a message, "
          "save on the bytes loaded, as the session core does), touch, then len() and stats() at the full "
          "size, remove half the sessions, clean(keep=a quarter) and clean(max_age) of the rest. × = cluster "
          "against one server (lower is faster).\n")
    print("| operation | one server | cluster | × |")
    print("| --- | ---: | ---: | ---: |")
    for operation in CLUSTER_TIMED + CLUSTER_CALLS:
        unit = "µs" if operation in CLUSTER_TIMED else "ms"
        server, cluster = (statistics.median(run[operation] for run in results[name]) for name in ("server", "cluster"))
        print(f"| {operation} | {server:,.1f} {unit} | {cluster:,.1f} {unit} | {cluster / server:.2f}x |")
    spread = results["spread"]
    ratio = spread[0] / spread[-1]
    print(f"\nSpread: {config['cluster_spread']:,} sessions saved on the cluster; keys per master (DBSIZE: the "
          f"records and the 256 buckets' two sorted sets) {' / '.join(f'{n:,}' for n in spread)}; largest / "
          f"smallest {ratio:.3f} (target at most 1.2: {'holds' if ratio <= 1.2 else 'not met'}).\n")


# -- 0. Serializers --
#
# dumps and loads of the chat session at 1 KB and 100 KB (HTTP_SIZES), in
# process: the standard library's json (the floor, what tinysession's default
# serializer runs), TaggedJSON (Flask's types; json alone where nothing needs
# a tag) and pickle.


def serializer_contenders():
    tagged = tinysession.TaggedJSON()
    return [("json (compact, the floor)", json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode,
             json.loads),
            ("tinysession TaggedJSON", tagged.dumps, tagged.loads),
            ("pickle", pickle.dumps, pickle.loads)]


def run_serializer_section(config, workdir):
    contenders = serializer_contenders()
    log(f"0. serializers: {len(contenders)} serializers, {config['log_n']} calls per figure")
    records = {size: chat_history(count) for size, count in HTTP_SIZES.items()}
    results = {(name, size): [] for name, _, _ in contenders for size in HTTP_SIZES}
    for rep in range(config["log_reps"]):
        for name, dumps, loads in rotated(contenders, rep):
            for size, record in records.items():
                data = dumps(record)
                results[name, size].append(
                    (median_us(functools.partial(dumps, record), config["log_n"], clock=time.thread_time),
                     median_us(functools.partial(loads, data), config["log_n"], clock=time.thread_time)))
    return [name for name, _, _ in contenders], results


def print_serializer_section(config, names, results):
    print(f"## 0. Serializers: µs per call (median of {config['log_n']} calls, median of {config['log_reps']} "
          "repetitions)\n")
    print("The chat session at 1 KB and 100 KB, in process; the thread's CPU time per call. × = against "
          "json (lower is faster).\n")
    print("| serializer | " + " | ".join(f"{size} dumps | × | {size} loads | ×" for size in HTTP_SIZES) + " |")
    print("| --- |" + " ---: | ---: | ---: | ---: |" * len(HTTP_SIZES))
    floor = {size: [statistics.median(run[i] for run in results[names[0], size]) for i in (0, 1)] for size in HTTP_SIZES}
    for name in names:
        cells = []
        for size in HTTP_SIZES:
            dumps, loads = (statistics.median(run[i] for run in results[name, size]) for i in (0, 1))
            cells.append(f"{dumps:,.0f} | {dumps / floor[size][0]:.2f}x | {loads:,.0f} | {loads / floor[size][1]:.2f}x")
        print(f"| {name} | {' | '.join(cells)} |")
    print()


# -- Report --


def peer_versions():
    from importlib import metadata

    names = ["Flask", "Flask-Session", "cachelib", "Beaker", "Django", "sqlitedict", "diskcache",
             "SQLAlchemy", "Flask-SQLAlchemy", "Werkzeug", "msgspec", "redis", "starlette", "starsessions",
             "gunicorn", "uvicorn"]
    versions = []
    for name in names:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(versions) or "none installed"


def snapshot_tinysession(workdir):
    """Copy ROOT/tinysession.py into the work dir with its bytecode; return (folder, revision text).

    Installed peers come with .pyc files; a checkout may have none (or be read-only, or
    PYTHONDONTWRITEBYTECODE is set), which would time the compiler in the import section.
    The revision names the checkout's commit and whether the copy differs from it.
    """
    import importlib.util
    import py_compile

    folder = os.path.join(workdir, "tinysession-under-test")
    os.makedirs(folder)
    copy = os.path.join(folder, "tinysession.py")
    shutil.copyfile(os.path.join(ROOT, "tinysession.py"), copy)
    py_compile.compile(copy, cfile=importlib.util.cache_from_source(copy), doraise=True)
    with open(copy, "rb") as file:
        source = file.read()
    revision = f"sha256 {hashlib.sha256(source).hexdigest()[:12]}"
    try:
        def git(*argv):
            return subprocess.run(["git", "-C", ROOT, *argv], capture_output=True, check=False, timeout=10)

        commit = git("rev-parse", "--short", "HEAD")
        if commit.returncode == 0:
            committed = git("show", "HEAD:tinysession.py").stdout
            state = "" if committed == source else " plus uncommitted changes"
            revision = f"commit {commit.stdout.decode().strip()}{state}, {revision}"
    except (OSError, subprocess.SubprocessError):
        pass
    return folder, revision


def load_tinysession(folder):
    """Import tinysession from ``folder`` as this module's global ``tinysession``."""
    import importlib

    global tinysession
    sys.path.insert(0, folder)
    tinysession = importlib.import_module("tinysession")


def print_header(args, config, redis_note, load, revision):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print("# tinysession benchmark\n")
    print(f"{platform.python_implementation()} {platform.python_version()} on {platform.platform()}, "
          f"{os.cpu_count()} CPUs; {now}; tinysession {tinysession.__version__} ({revision}); "
          f"{'--quick' if args.quick else 'full run'}; temp dir on {args.dir or tempfile.gettempdir()}; "
          f"1-minute load average {load[0]:.2f} at the start, {load[1]:.2f} at the end.\n")
    print(f"Payload: a chat session of {payload_size():,} bytes as compact JSON (user id, CSRF token, "
          "a system message and ten user/assistant messages).\n")
    print(f"Peers: {peer_versions()}.\n")
    print("Configuration: every SQLite contender runs in WAL mode with synchronous=NORMAL as tinysession "
          "does (raw-sqlite, Django via OPTIONS init_command, SQLAlchemy via a connect listener; diskcache "
          "does so by default), except sqlitedict, left at its defaults (rollback journal, "
          "synchronous=OFF). tinysession stores have max_age=1 day and its middleware keeps its defaults "
          "(touch_interval=60 s); cachelib default_timeout=1 day; the "
          "others keep their defaults, which means Beaker (save_accessed_time) and Flask-Session "
          "(SESSION_REFRESH_EACH_REQUEST with permanent sessions) write the session on every request "
          f"that loads it. {redis_note}\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and 1 s HTTP runs, for CI (under 2 minutes)")
    parser.add_argument("--dir", default=None, help="parent of the temporary directories (default: system temp)")
    redis_group = parser.add_mutually_exclusive_group()
    redis_group.add_argument("--redis", action="store_true", help="require the Redis rows (start a server)")
    redis_group.add_argument("--no-redis", action="store_true", help="skip the Redis rows")
    parser.add_argument("--sections", default="0123456789c", help="which sections to run (default: 0123456789c)")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    warnings.simplefilter("ignore")
    # SIGTERM ends the run as Ctrl-C does: through the finally blocks that stop the servers it started.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    started = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="tinysession-bench-", dir=args.dir)
    redis_server = None
    try:
        snapshot, revision = snapshot_tinysession(workdir)
        load_tinysession(snapshot)
        redis_note = "Redis rows: skipped, this tinysession has no RedisStore."
        if args.no_redis:
            redis_note = "Redis rows: skipped (--no-redis)."
        elif hasattr(tinysession, "RedisStore") and not try_import("redis-py", "redis"):
            redis_note = "Redis rows: skipped, redis-py is not installed."
        elif hasattr(tinysession, "RedisStore"):
            redis_server = RedisServer(workdir)
            problem = redis_server.start()
            if problem is None:
                redis_note = f"Redis rows: a private redis-server on 127.0.0.1:{redis_server.port}, no persistence."
            else:
                redis_server, redis_note = None, f"Redis rows: skipped, {problem}."
        if args.redis and redis_server is None:
            parser.error(f"--redis: {redis_note}")
        load_before = os.getloadavg()[0]
        runners = {
            "0": (print_serializer_section, lambda: run_serializer_section(config, workdir)),
            "1": (print_store_section, lambda: run_store_section(config, workdir, redis_server)),
            "2": (print_request_section, lambda: run_request_section(config, workdir)),
            "3": (print_clean_section, lambda: run_clean_section(config, workdir)),
            "4": (print_import_section, lambda: run_import_section(config, snapshot)),
            "5": (print_http_section, lambda: run_http_section(config, workdir, redis_server)),
            "6": (print_contended_section, lambda: run_contended_section(config, workdir, redis_server)),
            "7": (print_flood_section, lambda: run_flood_section(config, workdir, redis_server)),
            "8": (print_asgi_section, lambda: run_asgi_section(config, workdir, redis_server)),
            "9": (print_log_section, lambda: run_log_section(config, workdir, redis_server)),
            "c": (print_cluster_section, lambda: run_cluster_section(config, workdir, redis_server)),
        }
        sections = []
        for number, (printer, runner) in runners.items():
            if number in args.sections:
                section_started = time.perf_counter()
                sections.append((printer, runner()))
                log(f"  section {number}: {time.perf_counter() - section_started:.1f} s")
        load = (load_before, os.getloadavg()[0])
        print_header(args, config, redis_note, load, revision)
        for printer, (contenders, results) in sections:
            printer(config, contenders, results)
        print("## Notes\n")
        for note in NOTES.items:
            print(f"- {note}")
        print("- peak RSS is read inside each cleaning process (/proc/self/status VmHWM), not from "
              "wait4()'s ru_maxrss: on Linux a child's ru_maxrss starts at its parent's high-water mark, "
              "whether it was forked or posix_spawned, so it would report this benchmark's own size.")
        print(f"- total benchmark time: {time.perf_counter() - started:.0f} s")
    finally:
        if redis_server is not None:
            redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "_load":
        sys.exit(load_child_main(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5]))
    if len(sys.argv) == 4 and sys.argv[1] == "_evict":
        load_tinysession(ROOT)
        sys.exit(evict_child_main(sys.argv[2], int(sys.argv[3])))
    if len(sys.argv) == 5 and sys.argv[1] == "_clean":
        load_tinysession(ROOT)  # the parent's snapshot, passed as TINYSESSION_ROOT
        sys.exit(clean_child_main(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    sys.exit(main())
