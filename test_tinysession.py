"""The specification of tinysession, as tests.

Run with ``python -m unittest -v`` (or pytest). Tests that need a component
this machine may lack (a Redis server, Flask, Bottle) skip with the reason;
with ``TINYSESSION_REQUIRE_ALL=1`` in the environment (CI sets it) such a skip
is a failure instead.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import datetime
import doctest
import email.utils
import hashlib
import heapq
import http.client
import http.cookies
import importlib.util
import inspect
import io
import itertools
import json
import logging
import os
import pickle
import random
import re
import resource
import shutil
import signal
import socket
import socketserver
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.cookiejar import CookieJar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import tinysession

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRE_ALL = os.environ.get("TINYSESSION_REQUIRE_ALL") == "1"


def require(condition, reason):
    """Skip the test when ``condition`` is false, or fail under CI."""
    if condition:
        return
    if REQUIRE_ALL:
        raise AssertionError(f"required by TINYSESSION_REQUIRE_ALL=1: {reason}")
    raise unittest.SkipTest(reason)


def temp_dir(test):
    """Return a fresh temporary directory removed when ``test`` ends."""
    holder = tempfile.TemporaryDirectory(prefix="tinysession-test-")
    test.addCleanup(holder.cleanup)
    return holder.name


def python_process(code, *args, **popen_options):
    """Start ``python -c code args`` that can import tinysession."""
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, **popen_options)


class LogRecords(logging.Handler):
    """Collect the ``tinysession`` logger's records at WARNING and above."""

    def __enter__(self):
        self.records = []
        self.setLevel(logging.WARNING)
        logging.getLogger("tinysession").addHandler(self)
        return self.records

    def __exit__(self, *exc_info):
        logging.getLogger("tinysession").removeHandler(self)

    def emit(self, record):
        self.records.append(record.getMessage())


class _MarkerWriter:
    """Unpickling this writes a marker file: proof that a planted pickle ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class StoreContract:
    """Behaviour every store shares; a subclass per store supplies the hooks.

    Hooks: ``make_store(**options)``, ``set_age(store, key, seconds)``,
    ``mtime(store, key)``, ``raw(store, key)``, ``put_raw(store, key, data)``,
    ``physical_count(store)`` (records kept, expired or not) and
    ``store_code`` (an expression building the same store in a child process).
    """

    def test_round_trip_returns_a_fresh_copy(self):
        store = self.make_store()
        record = {"user": 42, "messages": [{"role": "user", "content": "hé"}]}
        store["abc"] = record
        loaded = store["abc"]
        self.assertEqual(loaded, record)
        loaded["messages"].append("changed")
        self.assertEqual(store["abc"], record)
        self.assertIsNot(store["abc"], store["abc"])

    def test_missing_key(self):
        store = self.make_store()
        with self.assertRaises(KeyError):
            store["nope"]
        self.assertIsNone(store.get("nope"))
        self.assertEqual(store.get("nope", "default"), "default")
        self.assertNotIn("nope", store)
        with self.assertRaises(KeyError):
            del store["nope"]

    def test_overwrite_delete_len_iter(self):
        store = self.make_store()
        for key in ("a", "b", "c"):
            store[key] = {"k": key}
        store["b"] = {"k": "new"}
        self.assertEqual(store["b"], {"k": "new"})
        self.assertEqual(len(store), 3)
        self.assertEqual(sorted(store), ["a", "b", "c"])
        del store["a"]
        self.assertNotIn("a", store)
        self.assertEqual(sorted(store), ["b", "c"])
        self.assertEqual(self.physical_count(store), 2)

    def test_expired_records_are_missing_without_clean(self):
        store = self.make_store(max_age=60)
        store["old"] = {"v": 1}
        store["new"] = {"v": 2}
        self.set_age(store, "old", 61)
        self.set_age(store, "new", 59)
        with self.assertRaises(KeyError):
            store["old"]
        self.assertIsNone(store.get("old"))
        self.assertNotIn("old", store)
        self.assertEqual(list(store), ["new"])
        self.assertEqual(len(store), 1)
        self.assertFalse(store.touch("old"))
        with self.assertRaises(KeyError):
            del store["old"]
        self.assertEqual(store["new"], {"v": 2})

    def test_touch_refreshes_the_mtime_without_rewriting(self):
        store = self.make_store(max_age=60)
        store["a"] = {"v": 1}
        self.set_age(store, "a", 50)
        before = self.raw(store, "a")
        now = time.time()
        self.assertTrue(store.touch("a", now=now))
        self.assertAlmostEqual(self.mtime(store, "a"), now, delta=0.01)
        self.assertEqual(self.raw(store, "a"), before)
        self.assertFalse(store.touch("missing"))

    def test_clean_removes_expired_then_all_but_the_newest(self):
        store = self.make_store()
        ages = {"e1": 500, "e2": 400, "k1": 300, "k2": 200, "k3": 100, "k4": 10}
        for key, age in ages.items():
            store[key] = {"key": key}
            self.set_age(store, key, age)
        self.assertEqual(store.clean(max_age=350, keep=3), 3)
        self.assertEqual(sorted(store), ["k2", "k3", "k4"])
        self.assertEqual(self.physical_count(store), 3)
        self.assertEqual(store.clean(max_age=350, keep=3), 0)

    def test_keep_removes_exactly_the_oldest(self):
        store = self.make_store()
        rng = random.Random(7)
        ages = {f"key{index}": rng.uniform(1, 10000) for index in range(60)}
        for key, age in ages.items():
            store[key] = {}
            self.set_age(store, key, age)
        self.assertEqual(store.clean(keep=17), 43)
        self.assertEqual(sorted(store), sorted(heapq.nsmallest(17, ages, key=ages.get)))
        self.assertEqual(store.clean(keep=0), 17)
        self.assertEqual(self.physical_count(store), 0)

    def test_clean_uses_the_store_options_and_otherwise_removes_nothing(self):
        store = self.make_store()
        for index in range(5):
            store[f"k{index}"] = {}
            self.set_age(store, f"k{index}", 1000 * (index + 1))
        self.assertEqual(store.clean(), 0)
        self.assertEqual(self.physical_count(store), 5)
        configured = self.make_store(max_age=2500, max_sessions=1)
        self.assertEqual(configured.clean(), 4)
        self.assertEqual(list(configured), ["k0"])

    def test_invalid_keys_raise_before_any_io(self):
        store = self.make_store()
        store["good"] = {"v": 1}
        bad_keys = ["", "../x", "a/b", "a\\b", "..", "a\0b", "x" * 129, "é", "a b", "a.b", "ts-x\n"]
        for key in bad_keys:
            with self.subTest(key=key):
                with self.assertRaises(ValueError):
                    store[key] = {"v": 2}
                with self.assertRaises(ValueError):
                    store[key]
                with self.assertRaises(ValueError):
                    del store[key]
                self.assertRaises(ValueError, store.__contains__, key)
                with self.assertRaises(ValueError):
                    store.touch(key)
        with self.assertRaises(TypeError):
            store[b"good"]
        self.assertEqual(list(store), ["good"])
        self.assertEqual(self.physical_count(store), 1)

    def test_corrupt_record_is_missing_and_logged(self):
        store = self.make_store()
        for index, garbage in enumerate([b"", b"{not json", b'{"truncated": [1, 2', b"\xff\xfe\x00"]):
            key = f"bad{index}"
            self.put_raw(store, key, garbage)
            with self.assertLogs("tinysession", "WARNING") as logs:
                with self.assertRaises(KeyError):
                    store[key]
                self.assertIsNone(store.get(key))
            self.assertIn(key, logs.output[0])

    def test_signed_records_reject_tampering(self):
        store = self.make_store(secret="s3cret")
        store["a"] = {"role": "user"}
        store["b"] = {"role": "admin"}
        self.assertEqual(store["a"], {"role": "user"})
        signed = self.raw(store, "a")
        self.assertNotIn(b"s3cret", signed)
        tampered = signed.replace(b"user", b"root")
        self.put_raw(store, "a", tampered)
        with self.assertLogs("tinysession", "WARNING"):
            self.assertIsNone(store.get("a"))
        self.put_raw(store, "c", self.raw(store, "b"))  # a valid record moved to another key
        with self.assertLogs("tinysession", "WARNING"):
            self.assertIsNone(store.get("c"))
        self.put_raw(store, "d", b'{"role": "admin"}')  # unsigned
        with self.assertLogs("tinysession", "WARNING"):
            self.assertIsNone(store.get("d"))
        other = self.make_store(secret="another secret")
        with self.assertLogs("tinysession", "WARNING"):
            self.assertIsNone(other.get("b"))

    def test_pickle_needs_a_secret_and_never_runs_a_planted_record(self):
        with self.assertRaises(ValueError):
            self.make_store(serializer="pickle")
        store = self.make_store(serializer="pickle", secret=b"k")
        store["a"] = {"when": {1, 2}, "bytes": b"\x00"}
        self.assertEqual(store["a"], {"when": {1, 2}, "bytes": b"\x00"})
        marker = os.path.join(temp_dir(self), "ran")
        planted = pickle.dumps(_MarkerWriter(marker))
        for data in (planted, b"\x00" * 32 + planted):
            self.put_raw(store, "evil", data)
            with self.assertLogs("tinysession", "WARNING"):
                self.assertIsNone(store.get("evil"))
        self.assertFalse(os.path.exists(marker))

    def test_custom_serializer(self):
        class Upper:
            def dumps(self, obj):
                return obj.upper().encode()

            def loads(self, data):
                return data.decode().lower()

        store = self.make_store(serializer=Upper())
        store["a"] = "hello"
        self.assertEqual(store["a"], "hello")
        self.assertIn(b"HELLO", self.raw(store, "a"))
        with self.assertRaises(ValueError):
            self.make_store(serializer="yaml")
        with self.assertRaises(ValueError):
            self.make_store(serializer=object())

    def test_bad_records_and_sizes_leave_the_previous_record(self):
        store = self.make_store(max_bytes=100)
        store["a"] = {"v": "small"}
        with self.assertRaises(tinysession.RecordTooLarge) as caught:
            store["a"] = {"v": "x" * 200}
        self.assertIsInstance(caught.exception, ValueError)
        self.assertIn("max_bytes=100", str(caught.exception))
        with self.assertRaises(TypeError):
            store["a"] = {"v": object()}
        self.assertEqual(store["a"], {"v": "small"})
        self.assertEqual(self.physical_count(store), 1)
        self.assertEqual(tinysession.DEFAULT_MAX_BYTES, 256 * 1024)

    def test_max_sessions_holds_at_write_time(self):
        store = self.make_store(max_sessions=20)
        highest = 0
        for index in range(200):
            store[f"flood{index}"] = {"i": index}
            highest = max(highest, self.physical_count(store))
        self.assertLessEqual(highest, 20 + 10)
        self.assertIn("flood199", store)

    def test_close_is_safe_twice_and_works_as_a_context_manager(self):
        with self.make_store() as store:
            store["a"] = {"v": 1}
        store.close()
        self.assertEqual(self.make_store()["a"], {"v": 1})

    def test_threads_share_one_store(self):
        store = self.make_store()
        errors = []

        def work(worker):
            try:
                for index in range(100):
                    store[f"t{worker}"] = {"i": index, "pad": "x" * index}
                    self.assertEqual(store[f"t{worker}"]["i"], index)
                    store.get(f"t{(worker + 1) % 8}")
            except (AssertionError, KeyError, tinysession.SessionError) as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(store), 8)

    def test_a_writer_killed_mid_write_leaves_whole_records(self):
        self.make_store()["k0"] = {"seq": -1}
        code = (
            "import sys, tinysession\n"
            f"store = {self.store_code}\n"
            "seq = 0\n"
            "while True:\n"
            "    store['k%d' % (seq % 5)] = {'seq': seq, 'pad': 'x' * (seq * 7919 % 20000)}\n"
            "    seq += 1\n"
            "    if seq % 50 == 0:\n"
            "        print(seq, flush=True)\n"
        )
        for _ in range(3):
            child = python_process(code, stdout=subprocess.PIPE)
            self.addCleanup(child.stdout.close)
            for _ in range(random.randint(1, 6)):
                child.stdout.readline()
            child.send_signal(signal.SIGKILL)
            child.wait()
            store = self.make_store()
            with LogRecords() as warnings:
                for key in store:
                    record = store[key]
                    self.assertEqual(len(record["pad"]), record["seq"] * 7919 % 20000)
            self.assertEqual(warnings, [])

    def test_four_processes_write_read_and_clean_at_once(self):
        self.make_store()
        code = (
            "import sys, random, tinysession\n"
            f"store = {self.store_code}\n"
            "worker = int(sys.argv[1])\n"
            "for step in range(150):\n"
            "    key = 'p%d' % random.randrange(12)\n"
            "    store[key] = {'key': key, 'pad': 'y' * random.randrange(5000)}\n"
            "    other = store.get('p%d' % random.randrange(12))\n"
            "    assert other is None or other['pad'] == 'y' * len(other['pad']), other\n"
            "    if step % 25 == worker:\n"
            "        store.clean(keep=8)\n"
            "    if step % 40 == 0:\n"
            "        list(store)\n"
            "print('ok')\n"
        )
        children = [
            python_process(code, str(n), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for n in range(4)
        ]
        for child in children:
            out, err = child.communicate(timeout=120)
            self.assertEqual((child.returncode, out.strip(), err), (0, b"ok", b""))


class FileStoreTest(StoreContract, unittest.TestCase):
    """The store contract, on FileStore."""

    def setUp(self):
        self.directory = os.path.join(temp_dir(self), "sessions")
        self.store_code = f"tinysession.FileStore({self.directory!r})"

    def make_store(self, **options):
        return tinysession.FileStore(self.directory, **options)

    def path(self, key):
        return os.path.join(self.directory, "ts-" + key)

    def set_age(self, store, key, seconds):
        then = time.time() - seconds
        os.utime(self.path(key), (then, then))

    def mtime(self, store, key):
        return os.stat(self.path(key)).st_mtime

    def raw(self, store, key):
        with open(self.path(key), "rb") as file:
            return file.read()

    def put_raw(self, store, key, data):
        with open(self.path(key), "wb") as file:
            file.write(data)

    def physical_count(self, store):
        return sum(name.startswith("ts-") for name in os.listdir(self.directory))


class SQLiteStoreTest(StoreContract, unittest.TestCase):
    """The store contract, on SQLiteStore."""

    def setUp(self):
        self.path = os.path.join(temp_dir(self), "sessions.sqlite3")
        self.store_code = f"tinysession.SQLiteStore({self.path!r})"

    def make_store(self, **options):
        store = tinysession.SQLiteStore(self.path, **options)
        self.addCleanup(store.close)
        return store

    def sql(self, statement, parameters=()):
        with sqlite3.connect(self.path, timeout=5) as connection:
            return connection.execute(statement, parameters).fetchall()

    def set_age(self, store, key, seconds):
        self.sql("UPDATE sessions SET mtime = ? WHERE key = ?", (time.time() - seconds, key))

    def mtime(self, store, key):
        return self.sql("SELECT mtime FROM sessions WHERE key = ?", (key,))[0][0]

    def raw(self, store, key):
        return self.sql("SELECT data FROM sessions WHERE key = ?", (key,))[0][0]

    def put_raw(self, store, key, data):
        self.sql("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)", (key, data, time.time()))

    def physical_count(self, store):
        return self.sql("SELECT COUNT(*) FROM sessions")[0][0]


REDIS_SERVER = shutil.which("redis-server")
HAVE_REDIS_PY = importlib.util.find_spec("redis") is not None
_prefix_numbers = itertools.count()
_shared_redis = []


class RedisServer:
    """A private redis-server on a free loopback port that persists nothing and has no KEYS command."""

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="tinysession-redis-")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = None
        self.start()

    def start(self):
        """Start the server and wait until it answers PING."""
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.directory, "--rename-command", "KEYS", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                    connection.sendall(b"PING\r\n")
                    if connection.recv(7) == b"+PONG\r\n":
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.01)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def close(self):
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def client(self, **options):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, **options)


def _close_shared_redis():
    while _shared_redis:
        _shared_redis.pop().close()


def redis_case(test):
    """Give ``test`` the shared server (started on first use), a flushed client and its own prefix."""
    require(REDIS_SERVER is not None, "redis-server is not installed (apt-get install redis-server)")
    require(HAVE_REDIS_PY, "redis-py is not installed (pip install redis)")
    if not _shared_redis:
        _shared_redis.append(RedisServer())
        unittest.addModuleCleanup(_close_shared_redis)
        atexit.register(_close_shared_redis)
    test.server = _shared_redis[0]
    test.redis = test.server.client()
    test.addCleanup(test.redis.close)
    test.redis.flushdb()
    test.prefix = f"test{next(_prefix_numbers)}:"
    test.index = test.prefix + "#index"


def set_redis_age(test, key, seconds):
    """Move a record's mtime, in its hash and in the index, ``seconds`` into the past; keep its TTL."""
    then = time.time() - seconds
    test.redis.hset(test.prefix + key, "mtime", then)
    test.redis.zadd(test.index, {key: then})


class RedisStoreTest(StoreContract, unittest.TestCase):
    """The store contract, on RedisStore."""

    def setUp(self):
        redis_case(self)
        self.store_code = (
            f"tinysession.RedisStore(__import__('redis').Redis(host='127.0.0.1', port={self.server.port}),"
            f" prefix={self.prefix!r})"
        )

    def make_store(self, **options):
        return tinysession.RedisStore(self.redis, prefix=self.prefix, **options)

    def set_age(self, store, key, seconds):
        set_redis_age(self, key, seconds)

    def mtime(self, store, key):
        mtime = float(self.redis.hget(self.prefix + key, "mtime"))
        self.assertEqual(self.redis.zscore(self.index, key), mtime)
        return mtime

    def raw(self, store, key):
        return self.redis.hget(self.prefix + key, "data")

    def put_raw(self, store, key, data):
        now = time.time()
        self.redis.hset(self.prefix + key, mapping={"data": data, "mtime": now})
        self.redis.zadd(self.index, {key: now})

    def physical_count(self, store):
        return sum(name != self.index.encode() for name in self.redis.scan_iter(self.prefix + "*"))


class RedisSpecifics(unittest.TestCase):
    """RedisStore's layout, TTLs, index, neighbours and failures."""

    def setUp(self):
        redis_case(self)

    def make_store(self, client=None, **options):
        return tinysession.RedisStore(client or self.redis, prefix=self.prefix, **options)

    def names(self):
        """Return the keys of the records in Redis, whatever the index says."""
        names = {name.decode()[len(self.prefix):] for name in self.redis.scan_iter(self.prefix + "*")}
        return names - {"#index"}

    def members(self):
        return {member.decode() for member in self.redis.zrange(self.index, 0, -1)}

    def assert_ttl(self, key, milliseconds):
        self.assertLessEqual(milliseconds - 1000, self.redis.pttl(self.prefix + key))
        self.assertLessEqual(self.redis.pttl(self.prefix + key), milliseconds)

    def test_layout_one_hash_per_record_and_a_sorted_index(self):
        store = self.make_store(max_age=3600)
        self.assertEqual(store.prefix, self.prefix)
        self.assertEqual(tinysession.RedisStore(self.redis).prefix, "session:")
        before = time.time()
        store["abc"] = {"v": 1}
        store["index"] = {"v": 2}  # a valid key cannot collide with the index
        name = self.prefix + "abc"
        self.assertEqual(self.redis.type(name), b"hash")
        fields = self.redis.hgetall(name)
        self.assertEqual(set(fields), {b"data", b"mtime"})
        self.assertEqual(fields[b"data"], b'{"v":1}')
        mtime = float(fields[b"mtime"])
        self.assertTrue(before <= mtime <= time.time())
        self.assertEqual(self.redis.zscore(self.index, "abc"), mtime)
        self.assertEqual(self.redis.type(self.index), b"zset")
        self.assertEqual((sorted(store), len(store), store["index"]), (["abc", "index"], 2, {"v": 2}))
        self.assertEqual(self.names(), {"abc", "index"})
        self.assertIn(repr(self.prefix), repr(store))
        self.assertIn(str(self.server.port), repr(store))

    def test_writes_and_touches_set_the_ttl_to_max_age(self):
        store = self.make_store(max_age=3600)
        store["a"] = {"v": 1}
        self.assert_ttl("a", 3600000)
        self.redis.pexpire(self.prefix + "a", 5000)
        self.assertTrue(store.touch("a"))
        self.assert_ttl("a", 3600000)
        self.redis.pexpire(self.prefix + "a", 5000)
        store["a"] = {"v": 2}
        self.assert_ttl("a", 3600000)
        self.make_store(max_age=30.5)["b"] = {}
        self.assert_ttl("b", 30500)

    def test_a_conditional_write_never_creates_a_record_and_keeps_the_ttl(self):
        store = self.make_store(max_age=60)
        payload = store.dump("a", {"v": 2})
        self.assertFalse(store.save("a", payload, expected=b'{"v":1}'))
        self.assertEqual((self.names(), self.members()), (set(), set()))
        store["a"] = {"v": 1}
        self.redis.pexpire(self.prefix + "a", 5000)
        self.assertTrue(store.save("a", payload, expected=b'{"v":1}'))
        self.assertEqual(store["a"], {"v": 2})
        self.assert_ttl("a", 60000)

    def test_an_oversized_record_is_not_loaded(self):
        store = self.make_store(max_bytes=100)
        store["a"] = {"v": "x" * 90}
        self.redis.hset(self.prefix + "a", "data", b'{"v": "' + b"x" * 200 + b'"}')
        with LogRecords() as warnings:
            self.assertIsNone(store.get("a"))
        self.assertEqual(len(warnings), 1)
        self.assertIn(self.prefix + "a", warnings[0])
        self.assertIn("over the size limit", warnings[0])

    def test_without_max_age_records_never_expire_in_redis(self):
        self.make_store(max_age=60)["a"] = {"v": 1}
        store = self.make_store()
        store["a"] = {"v": 2}  # a rewrite drops the TTL an earlier writer set
        store["b"] = {"v": 3}
        self.assertTrue(store.touch("b"))
        self.assertEqual([self.redis.pttl(self.prefix + key) for key in "ab"], [-1, -1])

    def test_redis_removes_expired_records_by_itself(self):
        store = self.make_store(max_age=0.15)
        store["a"] = {"v": 1}
        self.assertTrue(0 < self.redis.pttl(self.prefix + "a") <= 150)
        deadline = time.monotonic() + 5
        while self.redis.exists(self.prefix + "a") and time.monotonic() < deadline:
            time.sleep(0.01)  # Redis's own clock expires the key: nothing here can age it
        self.assertEqual(self.redis.exists(self.prefix + "a"), 0)  # no clean ran
        self.assertEqual((store.get("a"), len(store), list(store)), (None, 0, []))
        self.assertEqual(self.members(), {"a"})
        store["b"] = {"v": 2}  # a write drops index members past max_age
        self.assertEqual(self.members(), {"b"})

    def test_clean_drops_index_members_whose_record_is_gone_without_counting_them(self):
        store = self.make_store()
        for key, age in (("gone", 400), ("old", 300), ("new", 100), ("gone2", 50), ("newest", 10)):
            store[key] = {}
            set_redis_age(self, key, age)
        self.redis.delete(self.prefix + "gone", self.prefix + "gone2")  # as if Redis had expired them
        sweep = store.sweep(250, 1, dry_run=True)
        self.assertEqual((sweep.seen, sweep.removed), (3, 2))
        self.assertEqual(len(self.members()), 5)
        self.assertEqual(store.clean(max_age=250), 1)
        self.assertEqual(self.members(), {"new", "gone2", "newest"})
        self.assertEqual(store.clean(keep=1), 1)
        self.assertEqual((self.members(), self.names()), ({"newest"}, {"newest"}))

    def test_sweep_reports_sizes_and_times_and_a_dry_run_removes_nothing(self):
        store = self.make_store()
        for key, age in (("old", 500), ("mid", 300), ("new", 10)):
            store[key] = {"pad": "x" * age}
            set_redis_age(self, key, age)
        mtimes = {key: self.redis.zscore(self.index, key) for key in ("old", "mid", "new")}
        sizes = {key: self.redis.hstrlen(self.prefix + key, "data") for key in mtimes}
        sweep = store.sweep(400, 1, dry_run=True)
        self.assertEqual((sweep.seen, sweep.seen_bytes), (3, sum(sizes.values())))
        self.assertEqual((sweep.removed, sweep.removed_bytes), (2, sizes["old"] + sizes["mid"]))
        self.assertEqual((sweep.oldest, sweep.newest), (mtimes["old"], mtimes["new"]))
        self.assertEqual((self.names(), self.members()), ({"old", "mid", "new"},) * 2)
        sweep = store.sweep(400, 1)
        self.assertEqual((sweep.removed, self.names(), self.members()), (2, {"new"}, {"new"}))
        empty = store.sweep(None, 0)
        self.assertEqual((empty.seen, empty.seen_bytes, empty.oldest), (1, None, mtimes["new"]))
        self.assertEqual(store.sweep(None, 0).oldest, None)

    def test_keep_leaves_exactly_the_newest_after_concurrent_writers(self):
        store = self.make_store()

        def write(worker):
            for index in range(50):
                store[f"w{worker}k{index}"] = {"worker": worker, "index": index}

        threads = [threading.Thread(target=write, args=(worker,)) for worker in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(len(store), 400)
        mtimes = {key: float(self.redis.hget(self.prefix + key, "mtime")) for key in store}
        newest = set(sorted(mtimes, key=lambda key: (mtimes[key], key))[-20:])  # Redis breaks ties by key
        self.assertEqual(store.clean(keep=20), 380)
        self.assertEqual((set(store), self.names(), self.members()), (newest,) * 3)

    def test_writes_and_cleans_at_once_keep_index_and_records_in_step(self):
        store = self.make_store()
        writing = threading.Event()
        errors = []

        def write(worker):
            try:
                for index in range(150):
                    store[f"k{(worker * 7 + index) % 60}"] = {"worker": worker, "index": index}
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        def clean():
            try:
                while writing.is_set():
                    store.clean(keep=20)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        writing.set()
        writers = [threading.Thread(target=write, args=(worker,)) for worker in range(6)]
        cleaner = threading.Thread(target=clean)
        for thread in [*writers, cleaner]:
            thread.start()
        for thread in writers:
            thread.join()
        writing.clear()
        cleaner.join()
        self.assertEqual(errors, [])
        self.assertEqual(self.names(), self.members())
        store.clean(keep=20)
        self.assertEqual((len(store), len(self.names())), (20, 20))
        self.assertEqual(self.names(), self.members())

    def test_keys_of_others_are_never_touched(self):
        self.redis.set("plain", b"not a session")
        self.redis.hset(self.prefix.rstrip(":"), "data", b"no prefix")
        self.redis.set(self.prefix.replace("test", "tset") + "a", b"another prefix")
        other = tinysession.RedisStore(self.redis, prefix="other:")
        other["a"] = {"theirs": True}
        foreign = {name: self.redis.dump(name) for name in self.redis.scan_iter()}
        store = self.make_store(max_age=60, max_sessions=2)
        for index in range(30):
            store[f"k{index}"] = {"i": index}
        store.touch("k29")
        del store["k29"]
        count = len(self.names())
        self.assertEqual((len(store), len(list(store))), (count, count))
        self.assertEqual(store.clean(max_age=0, keep=0), count)
        self.assertEqual((len(store), list(store), self.names()), (0, [], set()))
        self.assertEqual({name: self.redis.dump(name) for name in foreign}, foreign)
        self.assertTrue(all(self.redis.pttl(name) == -1 for name in foreign))
        self.assertEqual((other["a"], len(other), list(other)), ({"theirs": True}, 1, ["a"]))

    def test_a_stopped_server_raises_store_error_and_a_restarted_one_serves_again(self):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        server = RedisServer()
        self.addCleanup(server.close)
        client = server.client(retry=Retry(NoBackoff(), 0), socket_connect_timeout=2, socket_timeout=2)
        self.addCleanup(client.close)
        store = self.make_store(client, max_age=60)
        store["a"] = {"v": 1}
        self.assertTrue(store.touch("a"))
        server.stop()

        def write():
            store["a"] = {"v": 2}

        def delete():
            del store["a"]

        operations = {
            "read": lambda: store["a"],
            "get": lambda: store.get("a"),
            "contains": lambda: "a" in store,
            "write": write,
            "delete": delete,
            "touch": lambda: store.touch("a"),
            "len": lambda: len(store),
            "iterate": lambda: list(store),
            "clean": lambda: store.clean(keep=1),
        }
        for name, operation in operations.items():
            with self.subTest(operation=name):
                with self.assertRaises(tinysession.StoreError) as caught:
                    operation()
                self.assertNotIsInstance(caught.exception, KeyError)
                self.assertIsInstance(caught.exception.__cause__, redis.RedisError)
                self.assertIn(f"prefix={self.prefix!r}", str(caught.exception))
                self.assertIn(f":{server.port}/", str(caught.exception))
        server.start()
        self.assertIsNone(store.get("a"))  # started with --save '': the data is gone
        store["b"] = {"v": 2}
        self.assertEqual(store["b"], {"v": 2})
        self.assertTrue(store.touch("b"))  # the scripts are loaded again
        self.assertEqual((len(store), list(store), "b" in store), (1, ["b"], True))
        self.assertEqual(store.clean(keep=0), 1)

    def test_a_client_that_decodes_responses_is_rejected(self):
        client = self.server.client(decode_responses=True)
        self.addCleanup(client.close)
        with self.assertRaises(ValueError) as caught:
            self.make_store(client)
        self.assertIn("decode_responses=False", str(caught.exception))
        with self.assertRaises(TypeError):
            tinysession.RedisStore(self.redis, prefix=b"session:")

    def test_close_leaves_the_client_to_its_owner(self):
        with self.make_store() as store:
            store["a"] = {"v": 1}
        store.close()
        self.assertTrue(self.redis.ping())
        self.assertEqual(store["a"], {"v": 1})


class FileStoreOnDisk(unittest.TestCase):
    """FileStore's files: modes, names, debris, strays and links."""

    def setUp(self):
        self.directory = os.path.join(temp_dir(self), "sessions")
        self.store = tinysession.FileStore(self.directory)

    def test_modes_and_names(self):
        self.store["abc"] = {"v": 1}
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)
        self.assertEqual(os.listdir(self.directory), ["ts-abc"])
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.directory, "ts-abc")).st_mode), 0o600)
        with open(os.path.join(self.directory, "ts-abc"), "rb") as file:
            self.assertEqual(json.loads(file.read()), {"v": 1})

    def test_clean_removes_only_its_own_files(self):
        old = time.time() - 10**6
        strays = ["notes.txt", "ts-", "ts-bad.name", ".ts-x.keep", "session-abc", "TS-abc"]
        for name in strays:
            with open(os.path.join(self.directory, name), "w") as file:
                file.write("keep me")
            os.utime(os.path.join(self.directory, name), (old, old))
        os.mkdir(os.path.join(self.directory, "ts-dir"))
        outside = os.path.join(temp_dir(self), "outside")
        with open(outside, "w") as file:
            file.write("outside")
        os.utime(outside, (old, old))
        os.symlink(outside, os.path.join(self.directory, "ts-link"))
        self.store["real"] = {}
        os.utime(os.path.join(self.directory, "ts-real"), (old, old))
        self.assertEqual(self.store.clean(max_age=60, keep=0), 1)
        self.assertEqual(
            sorted(os.listdir(self.directory)), sorted(strays + ["ts-dir", "ts-link"])
        )
        self.assertTrue(os.path.exists(outside))
        self.assertEqual(list(self.store), [])

    def test_debris_of_killed_writers_goes_once_old(self):
        old = time.time() - 3600
        for name in (".ts-old.tmp", ".ts-young.tmp"):
            with open(os.path.join(self.directory, name), "w") as file:
                file.write("{")
        os.utime(os.path.join(self.directory, ".ts-old.tmp"), (old, old))
        self.assertEqual(self.store.clean(), 0)
        self.assertEqual(os.listdir(self.directory), [".ts-young.tmp"])
        self.assertEqual(list(self.store), [])

    def test_symbolic_links_are_not_followed(self):
        secret_file = os.path.join(temp_dir(self), "secret.json")
        with open(secret_file, "w") as file:
            file.write('{"stolen": true}')
        os.symlink(secret_file, os.path.join(self.directory, "ts-link"))
        with self.assertLogs("tinysession", "WARNING"):
            self.assertIsNone(self.store.get("link"))
        self.assertNotIn("link", self.store)
        self.assertFalse(self.store.touch("link"))

    def test_a_fifo_is_not_read(self):
        os.mkfifo(os.path.join(self.directory, "ts-fifo"))
        with self.assertLogs("tinysession", "WARNING"):
            self.assertIsNone(self.store.get("fifo"))

    def test_oversized_file_is_not_read(self):
        store = tinysession.FileStore(self.directory, max_bytes=10)
        with open(os.path.join(self.directory, "ts-big"), "wb") as file:
            file.write(b'"' + b"x" * 1000 + b'"')
        with self.assertLogs("tinysession", "WARNING"):
            self.assertIsNone(store.get("big"))


class FileStoreWriteFailures(unittest.TestCase):
    """A write that fails raises StoreError and keeps the previous record."""

    def setUp(self):
        self.directory = os.path.join(temp_dir(self), "sessions")
        self.store = tinysession.FileStore(self.directory)
        self.store["a"] = {"v": "before"}

    def assert_previous_kept(self):
        self.assertEqual(self.store["a"], {"v": "before"})
        self.assertEqual(os.listdir(self.directory), ["ts-a"])

    def test_file_size_limit_like_a_full_disk(self):
        previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        self.addCleanup(signal.signal, signal.SIGXFSZ, previous_handler)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
        try:
            with self.assertRaises(tinysession.StoreError) as caught:
                self.store["a"] = {"v": "x" * 5000}
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        self.assertNotIsInstance(caught.exception, OSError)  # a WSGI server would take it for a socket error
        self.assertIsInstance(caught.exception, tinysession.SessionError)
        self.assertIn(os.path.join(self.directory, "ts-a"), str(caught.exception))
        self.assertIsInstance(caught.exception.__cause__, OSError)
        self.assert_previous_kept()

    def test_read_only_directory(self):
        if os.geteuid() == 0:
            self.skipTest("root writes to read-only directories; covered by the size limit test")
        os.chmod(self.directory, 0o500)
        self.addCleanup(os.chmod, self.directory, 0o700)
        with self.assertRaises(tinysession.StoreError):
            self.store["a"] = {"v": "after"}
        self.assert_previous_kept()

    def test_directory_removed_under_the_store(self):
        os.rename(self.directory, self.directory + ".moved")
        with self.assertRaises(tinysession.StoreError) as caught:
            self.store["b"] = {}
        self.assertIn(self.directory, str(caught.exception))
        with self.assertRaises(tinysession.StoreError):
            list(self.store)


class SQLiteStoreOnDisk(unittest.TestCase):
    """SQLiteStore's database: schema, WAL, tables and bad files."""

    def setUp(self):
        self.path = os.path.join(temp_dir(self), "sessions.db")

    def test_schema_and_journal_mode(self):
        store = tinysession.SQLiteStore(self.path, table="web_sessions")
        self.addCleanup(store.close)
        store["a"] = {"v": 1}
        with sqlite3.connect(self.path) as connection:
            columns = connection.execute("PRAGMA table_info(web_sessions)").fetchall()
            self.assertEqual(
                [(name, kind, primary) for _, name, kind, _, _, primary in columns],
                [("key", "TEXT", 1), ("data", "BLOB", 0), ("mtime", "REAL", 0)],
            )
            indexes = connection.execute("PRAGMA index_list(web_sessions)").fetchall()
            self.assertIn("web_sessions_mtime", [row[1] for row in indexes])
            self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone(), ("wal",))
            data, mtime = connection.execute("SELECT data, mtime FROM web_sessions").fetchone()
        self.assertEqual(json.loads(data), {"v": 1})
        self.assertAlmostEqual(mtime, time.time(), delta=5)

    def test_invalid_table_names(self):
        for table in ("", "x; DROP TABLE y", 'a"b', "1abc", "a" * 65):
            with self.subTest(table=table), self.assertRaises(ValueError):
                tinysession.SQLiteStore(self.path, table=table)

    def test_a_file_that_is_not_a_database(self):
        with open(self.path, "wb") as file:
            file.write(b"this is not a database" * 100)
        with self.assertRaises(tinysession.StoreError) as caught:
            tinysession.SQLiteStore(self.path)
        self.assertIn(self.path, str(caught.exception))
        with open(self.path, "rb") as file:
            self.assertTrue(file.read().startswith(b"this is not a database"))

    def test_oversized_row_is_not_read(self):
        store = tinysession.SQLiteStore(self.path, max_bytes=10)
        self.addCleanup(store.close)
        with sqlite3.connect(self.path) as connection:
            connection.execute("INSERT INTO sessions VALUES ('big', ?, ?)", (b'"' + b"x" * 1000 + b'"', time.time()))
        with self.assertLogs("tinysession", "WARNING"):
            self.assertIsNone(store.get("big"))

    @unittest.skipUnless(os.path.isdir("/proc/self/fd"), "counts open files in /proc/self/fd (Linux)")
    def test_connections_of_finished_threads_are_closed(self):
        store = tinysession.SQLiteStore(self.path)
        self.addCleanup(store.close)
        store["a"] = {}

        def read():
            store.get("a")

        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            thread = threading.Thread(target=read)
            thread.start()
            thread.join()
        self.assertLess(len(os.listdir("/proc/self/fd")), before + 10)

    def test_closed_store_raises_store_error(self):
        store = tinysession.SQLiteStore(self.path)
        store["a"] = {}
        store.close()
        with self.assertRaises(tinysession.StoreError):
            store["a"]


class Options(unittest.TestCase):
    """Options are checked when a store is made."""

    def test_bad_options(self):
        directory = temp_dir(self)
        for options in (
            {"max_age": -1},
            {"max_age": "1h"},
            {"max_sessions": -1},
            {"max_sessions": 1.5},
            {"max_bytes": -5},
            {"secret": ""},
            {"secret": 42},
        ):
            with self.subTest(options=options), self.assertRaises(ValueError):
                tinysession.FileStore(directory, **options)
        store = tinysession.FileStore(directory)
        with self.assertRaises(ValueError):
            store.clean(keep=-1)

    def test_signing_key_is_not_the_secret(self):
        directory = temp_dir(self)
        store = tinysession.FileStore(directory, secret="s")
        store["a"] = {}
        with open(os.path.join(directory, "ts-a"), "rb") as file:
            data = file.read()
        self.assertEqual(len(data), 32 + 2)
        self.assertNotEqual(data[:32], hashlib.sha256(b"s").digest())


class ModuleSurface(unittest.TestCase):
    """The module's public surface and its import-time behaviour."""

    def test_docstring_examples_run(self):
        results = doctest.testmod(tinysession, verbose=False)
        self.assertGreater(results.attempted, 0)
        self.assertEqual(results.failed, 0)

    def test_all_is_sorted_and_complete(self):
        self.assertEqual(tinysession.__all__, sorted(tinysession.__all__))
        imported = {"annotations", "Mapping", "MutableMapping", "Sequence"}
        public = {
            name
            for name, value in vars(tinysession).items()
            if not name.startswith("_") and not inspect.ismodule(value) and name not in imported
        }
        self.assertEqual(public, set(tinysession.__all__))
        for name in tinysession.__all__:
            self.assertTrue(getattr(tinysession, name).__doc__, name)

    def test_import_does_not_load_optional_modules(self):
        lazy = "{'sqlite3', 'pickle', 'argparse', 'hashlib', 'hmac', 'secrets', 'http.cookies'}"
        code = f"import sys, tinysession; print(sorted({lazy} & set(sys.modules)))"
        child = python_process(code, stdout=subprocess.PIPE)
        out, _ = child.communicate(timeout=60)
        self.assertEqual(out.strip(), b"[]")

    def test_logger_has_no_handlers_configured(self):
        self.assertEqual(logging.getLogger("tinysession").handlers, [])


# -- Message window --


def system(text="sys"):
    return {"role": "system", "content": text}


def user(text="u"):
    return {"role": "user", "content": text}


def assistant(text="a"):
    return {"role": "assistant", "content": text}


def tool_call(call_id="c1"):
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": call_id, "type": "function",
                            "function": {"name": "f", "arguments": "{}"}}]}


def tool(text="t", call_id="c1"):
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def alternating(rounds, with_system=True):
    messages = [system()] if with_system else []
    for n in range(rounds):
        messages += [user(f"u{n}"), assistant(f"a{n}")]
    return messages


def assert_same_objects(test, result, expected):
    test.assertEqual(len(result), len(expected))
    for got, want in zip(result, expected):
        test.assertIs(got, want)


class TrimKeepsSystemMessages(unittest.TestCase):
    def test_all_leading_system_messages_kept_in_place(self):
        s1, s2 = system("one"), system("two")
        messages = [s1, s2] + alternating(4, with_system=False)
        result = tinysession.trim_messages(messages, max_rounds=1)
        assert_same_objects(self, result, [s1, s2] + messages[-2:])

    def test_later_system_message_dropped_with_its_round(self):
        late = system("late")
        messages = [system(), user("u0"), late, assistant("a0"), user("u1"), assistant("a1")]
        result = tinysession.trim_messages(messages, max_rounds=1)
        self.assertNotIn(late, result)
        assert_same_objects(self, result, [messages[0]] + messages[-2:])

    def test_later_system_message_kept_with_its_round(self):
        late = system("late")
        messages = [system(), user("u0"), assistant("a0"), user("u1"), late, assistant("a1")]
        result = tinysession.trim_messages(messages, max_rounds=1)
        assert_same_objects(self, result, [messages[0], messages[3], late, messages[5]])

    def test_system_message_after_greeting_is_not_pinned(self):
        messages = [system("s"), assistant("hello"), system("late"),
                    user("u0"), assistant("a0"), user("u1"), assistant("a1")]
        result = tinysession.trim_messages(messages, max_rounds=1)
        assert_same_objects(self, result, [messages[0]] + messages[-2:])

    def test_system_messages_kept_even_when_they_exceed_max_chars(self):
        messages = [system("x" * 50), user("u0"), assistant("a0"), user("u1"), assistant("a1")]
        result = tinysession.trim_messages(messages, max_chars=10)
        assert_same_objects(self, result, [messages[0]] + messages[-2:])

    def test_only_system_messages_unchanged(self):
        messages = [system("a"), system("b")]
        result = tinysession.trim_messages(messages, max_rounds=1, max_chars=0)
        self.assertEqual(result, messages)
        self.assertIsNot(result, messages)


class TrimKeepsWholeRounds(unittest.TestCase):
    def test_keeps_last_rounds(self):
        messages = alternating(6)
        result = tinysession.trim_messages(messages, max_rounds=2)
        self.assertEqual([m["content"] for m in result], ["sys", "u4", "a4", "u5", "a5"])

    def test_default_max_rounds_is_five(self):
        messages = alternating(7)
        result = tinysession.trim_messages(messages)
        assert_same_objects(self, result, [messages[0]] + messages[-10:])

    def test_tool_calls_and_results_stay_in_their_round(self):
        round_with_tools = [user("u1"), tool_call("c1"), tool("r1", "c1"), tool("r2", "c1"),
                            tool_call("c2"), tool("r3", "c2"), assistant("a1")]
        messages = ([system(), user("u0"), assistant("a0")] + round_with_tools
                    + [user("u2"), assistant("a2")])
        result = tinysession.trim_messages(messages, max_rounds=2)
        assert_same_objects(self, result, [messages[0]] + round_with_tools + messages[-2:])

    def test_tail_never_starts_with_assistant_or_tool(self):
        messages = [system(), user("u0"), tool_call(), tool(), assistant("a0"),
                    user("u1"), tool_call(), tool(), assistant("a1")]
        result = tinysession.trim_messages(messages, max_rounds=1)
        self.assertEqual(result[1]["role"], "user")
        assert_same_objects(self, result, [messages[0]] + messages[5:])

    def test_other_roles_belong_to_their_round(self):
        note = {"role": "developer", "content": "note"}
        messages = [user("u0"), assistant("a0"), user("u1"), note, assistant("a1")]
        result = tinysession.trim_messages(messages, max_rounds=1)
        assert_same_objects(self, result, messages[2:])

    def test_unchanged_when_within_limits(self):
        messages = alternating(3)
        result = tinysession.trim_messages(messages, max_rounds=3)
        assert_same_objects(self, result, messages)
        self.assertIsNot(result, messages)

    def test_greeting_kept_when_nothing_is_trimmed(self):
        messages = [system(), assistant("Hi, how can I help?")] + alternating(2, with_system=False)
        result = tinysession.trim_messages(messages, max_rounds=2)
        assert_same_objects(self, result, messages)

    def test_greeting_dropped_when_a_round_is_trimmed(self):
        messages = [system(), assistant("Hi, how can I help?")] + alternating(3, with_system=False)
        result = tinysession.trim_messages(messages, max_rounds=2)
        assert_same_objects(self, result, [messages[0]] + messages[-4:])

    def test_no_user_message_returns_input_unchanged(self):
        messages = [system(), assistant("a"), tool(), assistant("b")]
        result = tinysession.trim_messages(messages, max_rounds=1, max_chars=0)
        assert_same_objects(self, result, messages)
        self.assertIsNot(result, messages)

    def test_empty_list(self):
        self.assertEqual(tinysession.trim_messages([]), [])

    def test_trailing_user_message_is_a_round(self):
        messages = alternating(3) + [user("u3")]
        result = tinysession.trim_messages(messages, max_rounds=2)
        assert_same_objects(self, result, [messages[0]] + messages[-3:])

    def test_tuple_input_returns_list(self):
        messages = tuple(alternating(3))
        result = tinysession.trim_messages(messages, max_rounds=1)
        self.assertIsInstance(result, list)
        assert_same_objects(self, result, [messages[0]] + list(messages[-2:]))

    def test_matches_familiar_slice_for_alternating_conversations(self):
        for rounds in range(25):
            for max_rounds in range(1, 12):
                messages = alternating(rounds)
                result = tinysession.trim_messages(messages, max_rounds=max_rounds)
                if len(messages) > 1 + 2 * max_rounds:
                    expected = [messages[0]] + messages[-2 * max_rounds:]
                else:
                    expected = messages
                with self.subTest(rounds=rounds, max_rounds=max_rounds):
                    assert_same_objects(self, result, expected)


class TrimMaxChars(unittest.TestCase):
    def test_drops_oldest_rounds_until_within_budget(self):
        messages = [system("ss")]
        for _ in range(4):
            messages += [user("uuu"), assistant("aaaaa")]
        # 2 chars of system message plus 8 per round
        for max_chars, kept_rounds in ((17, 1), (18, 2), (25, 2), (26, 3), (33, 3), (34, 4)):
            with self.subTest(max_chars=max_chars):
                result = tinysession.trim_messages(messages, max_chars=max_chars)
                assert_same_objects(self, result, [messages[0]] + messages[-2 * kept_rounds:])

    def test_budget_is_inclusive(self):
        messages = [user("12345"), assistant("12345")]
        self.assertEqual(tinysession.trim_messages(messages, max_chars=10), messages)

    def test_newest_round_kept_even_when_over_budget(self):
        messages = [system("s"), user("u0"), assistant("a0"),
                    user("x" * 100), assistant("y" * 100)]
        result = tinysession.trim_messages(messages, max_chars=5)
        assert_same_objects(self, result, [messages[0]] + messages[-2:])

    def test_zero_budget_keeps_system_and_newest_round(self):
        messages = alternating(3)
        result = tinysession.trim_messages(messages, max_chars=0)
        assert_same_objects(self, result, [messages[0]] + messages[-2:])

    def test_system_messages_count_towards_budget(self):
        messages = [system("s" * 10), user("u0"), assistant("a0"), user("u1"), assistant("a1")]
        # rounds alone fit in 8, but not with the 10-char system message
        result = tinysession.trim_messages(messages, max_chars=15)
        assert_same_objects(self, result, [messages[0]] + messages[-2:])
        self.assertEqual(tinysession.trim_messages(messages, max_chars=18), messages)

    def test_greeting_goes_first(self):
        messages = [system("s"), assistant("hello")] + alternating(2, with_system=False)
        # total 1 + 5 + 8 = 14; dropping the greeting alone is enough for 9
        result = tinysession.trim_messages(messages, max_chars=9)
        assert_same_objects(self, result, [messages[0]] + messages[2:])
        self.assertEqual(tinysession.trim_messages(messages, max_chars=14), messages)

    def test_max_rounds_applies_before_max_chars(self):
        messages = alternating(5)
        result = tinysession.trim_messages(messages, max_rounds=3, max_chars=1000)
        assert_same_objects(self, result, [messages[0]] + messages[-6:])

    def test_list_of_parts_counts_text_parts_only(self):
        picture = {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 500}},
            {"type": "text", "text": "here"},
        ]}
        messages = [system("s"), user("u0"), assistant("a0"), picture, assistant("ok")]
        # 1 + 4 + 10 = 15 fits, although the image URL alone is over 500 chars
        self.assertEqual(tinysession.trim_messages(messages, max_chars=15), messages)
        assert_same_objects(self, tinysession.trim_messages(messages, max_chars=14),
                            [messages[0]] + messages[-2:])

    def test_str_parts_count_and_odd_parts_do_not(self):
        odd = {"role": "user", "content": ["abc", {"type": "text", "text": None},
                                           {"type": "text"}, {"text": "zzzzzz"}, 42]}
        messages = [user("u0"), odd]
        self.assertEqual(tinysession.trim_messages(messages, max_chars=5), messages)
        self.assertEqual(tinysession.trim_messages(messages, max_chars=4), [odd])

    def test_none_or_missing_content_counts_zero(self):
        messages = [user("u"), tool_call(), tool(""), {"role": "assistant"}, user("v")]
        self.assertEqual(tinysession.trim_messages(messages, max_chars=2), messages)
        self.assertEqual(tinysession.trim_messages(messages, max_chars=1), [messages[-1]])

    def test_other_content_counts_its_str_length(self):
        messages = [user("u"), {"role": "assistant", "content": 12345}, user("v")]
        self.assertEqual(tinysession.trim_messages(messages, max_chars=7), messages)
        self.assertEqual(tinysession.trim_messages(messages, max_chars=6), [messages[-1]])


class TrimRejectsBadInput(unittest.TestCase):
    def test_non_mapping_message_names_its_index(self):
        messages = alternating(1) + ["hello"]
        with self.assertRaises(TypeError) as caught:
            tinysession.trim_messages(messages)
        self.assertEqual(str(caught.exception), "messages[3] is not a mapping: 'hello'")

    def test_missing_role_names_its_index(self):
        for bad in ({"content": "x"}, {"role": None, "content": "x"}):
            with self.subTest(bad=bad):
                with self.assertRaises(ValueError) as caught:
                    tinysession.trim_messages([user(), assistant(), bad, user()])
                self.assertIn("messages[2]", str(caught.exception))
                self.assertIn("role", str(caught.exception))

    def test_bad_message_rejected_even_when_nothing_is_trimmed(self):
        with self.assertRaises(TypeError):
            tinysession.trim_messages([user(), None], max_rounds=10)

    def test_max_rounds_below_one(self):
        for value in (0, -1):
            with self.subTest(value=value), self.assertRaisesRegex(ValueError, "max_rounds"):
                tinysession.trim_messages(alternating(1), max_rounds=value)

    def test_max_rounds_not_an_int(self):
        for value in (1.5, 2.0, "3", None, True):
            with self.subTest(value=value), self.assertRaisesRegex(TypeError, "max_rounds"):
                tinysession.trim_messages(alternating(1), max_rounds=value)

    def test_max_chars_negative(self):
        with self.assertRaisesRegex(ValueError, "max_chars"):
            tinysession.trim_messages(alternating(1), max_chars=-1)

    def test_max_chars_not_an_int(self):
        for value in (10.0, "10", False):
            with self.subTest(value=value), self.assertRaisesRegex(TypeError, "max_chars"):
                tinysession.trim_messages(alternating(1), max_chars=value)

    def test_max_chars_is_keyword_only(self):
        with self.assertRaises(TypeError):
            tinysession.trim_messages(alternating(1), 5, 100)

    def test_messages_not_a_sequence(self):
        for value in (None, "user: hi", b"hi", {"role": "user"}, iter([user()]), 3):
            with self.subTest(value=value), self.assertRaises(TypeError):
                tinysession.trim_messages(value)


ROLES_FOR_CHAOS = ["system", "user", "assistant", "tool", "developer"]


def realistic_conversation(rng):
    """Return messages where tool results always follow the assistant that called them."""
    messages = [system(f"s{n}") for n in range(rng.choice([0, 0, 1, 1, 2]))]
    if rng.random() < 0.25:
        messages.append(assistant("hello"))
    for n in range(rng.randrange(0, 9)):
        messages.append(user(rng.choice(["", "u", "question " * rng.randrange(1, 4)])))
        if rng.random() < 0.1:
            messages.append(system("late"))
        for call in range(rng.choice([0, 0, 1, 2])):
            messages.append(tool_call(f"c{n}.{call}"))
            for result in range(rng.randrange(1, 3)):
                messages.append(tool("r" * rng.randrange(0, 6), f"c{n}.{call}"))
        if rng.random() < 0.85:
            messages.append(assistant("a" * rng.randrange(0, 8)))
    return messages


def chaotic_conversation(rng):
    messages = []
    for _ in range(rng.randrange(0, 15)):
        content = rng.choice([None, "x" * rng.randrange(0, 6),
                              [{"type": "text", "text": "p" * rng.randrange(0, 4)},
                               {"type": "image_url", "image_url": {"url": "u" * 9}}]])
        messages.append({"role": rng.choice(ROLES_FOR_CHAOS), "content": content})
    return messages


def rounds_in(messages, start):
    return sum(1 for m in messages[start:] if m["role"] == "user")


def content_length(messages):
    total = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p["text"]) for p in content if p.get("type") == "text")
    return total


class TrimProperties(unittest.TestCase):
    def check_invariants(self, messages, max_rounds, max_chars):
        snapshot = copy.deepcopy(messages)
        identities = [id(m) for m in messages]
        result = tinysession.trim_messages(messages, max_rounds, max_chars=max_chars)

        self.assertEqual(messages, snapshot, "input mutated")
        self.assertEqual([id(m) for m in messages], identities, "input reordered")
        self.assertIsNot(result, messages)

        leading = 0
        while leading < len(messages) and messages[leading]["role"] == "system":
            leading += 1
        assert_same_objects(self, result[:leading], messages[:leading])
        tail = result[leading:]
        if tail:
            assert_same_objects(self, tail, messages[len(messages) - len(tail):])

        user_count = rounds_in(messages, leading)
        kept_rounds = rounds_in(result, leading)
        within_limits = user_count <= max_rounds and (
            max_chars is None or content_length(messages) <= max_chars)
        if len(result) == len(messages):
            lone_round_without_greeting = user_count == 1 and (
                leading < len(messages) and messages[leading]["role"] == "user")
            self.assertTrue(user_count == 0 or within_limits or lone_round_without_greeting)
        else:
            self.assertFalse(within_limits, "trimmed although nothing needed to go")
            self.assertGreaterEqual(kept_rounds, 1)
            self.assertLessEqual(kept_rounds, max_rounds)
            self.assertEqual(tail[0]["role"], "user")
            if max_chars is not None and kept_rounds > 1:
                self.assertLessEqual(content_length(result), max_chars)
            if kept_rounds < min(max_rounds, user_count):
                # one more round would have been over budget
                start = len(messages) - len(tail) - 1
                while messages[start]["role"] != "user":
                    start -= 1
                bigger = messages[:leading] + messages[start:]
                self.assertIsNotNone(max_chars)
                self.assertGreater(content_length(bigger), max_chars)

        positions = {id(m): i for i, m in enumerate(messages)}
        kept_ids = {id(m) for m in result}
        for m in result:
            if m["role"] == "tool":
                caller = positions[id(m)] - 1
                while caller >= 0 and messages[caller]["role"] == "tool":
                    caller -= 1
                if caller >= 0 and messages[caller]["role"] == "assistant":
                    self.assertIn(id(messages[caller]), kept_ids, "tool result lost its caller")

        again = tinysession.trim_messages(result, max_rounds, max_chars=max_chars)
        assert_same_objects(self, again, result)
        return result

    def test_realistic_conversations(self):
        rng = random.Random(20240611)
        trimmed = 0
        for _ in range(3000):
            messages = realistic_conversation(rng)
            max_rounds = rng.randrange(1, 7)
            max_chars = rng.choice([None, None, 0, rng.randrange(0, 60)])
            result = self.check_invariants(messages, max_rounds, max_chars)
            trimmed += len(result) < len(messages)
        self.assertGreater(trimmed, 1000, "generator rarely exercises trimming")

    def test_chaotic_conversations(self):
        rng = random.Random(7)
        for _ in range(3000):
            messages = chaotic_conversation(rng)
            max_rounds = rng.randrange(1, 5)
            max_chars = rng.choice([None, rng.randrange(0, 40)])
            self.check_invariants(messages, max_rounds, max_chars)


# -- Middleware --


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass

    def get_stderr(self):
        return io.StringIO()


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve(test, app):
    """Serve ``app`` on a free loopback port in a thread; return its base URL."""
    server = make_server("127.0.0.1", 0, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    test.addCleanup(thread.join)
    test.addCleanup(server.server_close)
    test.addCleanup(server.shutdown)
    return f"http://127.0.0.1:{server.server_port}"


class Browser:
    """An HTTP client with a cookie jar, as a browser would talk to the app."""

    def __init__(self, base_url):
        self.base_url = base_url
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def request(self, path="/", data=None, headers=None):
        """Return ``(status, headers, body)``; HTTP errors are returned, not raised."""
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers or {})
        try:
            response = self.opener.open(request, timeout=30)
        except urllib.error.HTTPError as error:
            response = error
        with response:
            return response.status, response.headers, response.read()

    def json(self, path="/read"):
        status, _, body = self.request(path)
        assert status == 200, (status, body)
        return json.loads(body)

    def session_id(self):
        values = [cookie.value for cookie in self.jar if cookie.name == tinysession.DEFAULT_COOKIE_NAME]
        return values[0] if values else None


class CountingFileStore(tinysession.FileStore):
    """A FileStore that records every backend access, to prove there was none."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accesses = []

    def read(self, key):
        self.accesses.append(("read", key))
        return super().read(key)

    def write(self, key, data, mtime, expected=None):
        self.accesses.append(("write", key))
        return super().write(key, data, mtime, expected)

    def set_mtime(self, key, mtime):
        self.accesses.append(("touch", key))
        return super().set_mtime(key, mtime)

    def remove(self, key, expected=None):
        self.accesses.append(("delete", key))
        return super().remove(key, expected)

    def scan(self):
        self.accesses.append(("scan", None))
        return super().scan()


VALIDATED_KEY = "tinysession.session"
NAME = tinysession.DEFAULT_COOKIE_NAME


def probe_app(environ, start_response):
    """A WSGI app whose path says what to do with the session.

    Behind ``wsgiref.validate`` the session sits at a dotted key, since the
    validator takes dotless keys for CGI variables, which must be strings.
    """
    path = environ["PATH_INFO"]
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/untouched":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"no session here"]
    session = tinysession.get_session(environ, VALIDATED_KEY if VALIDATED_KEY in environ else "tinysession")
    if path == "/set":
        for name, values in query.items():
            session[name] = values[0]
    elif path == "/append":
        session.setdefault("messages", []).append(query.get("m", ["x"])[0])
    elif path == "/login":
        session.regenerate()
        session["user"] = query.get("user", ["ann"])[0]
    elif path == "/logout":
        session.invalidate()
    elif path == "/clear":
        session.clear()
    elif path == "/fail":
        session["broken"] = True
        raise RuntimeError("the app failed")
    elif path in ("/stream", "/stream-fail"):
        len(session)  # loaded before the response starts, so Vary is sent
        start_response("200 OK", [("Content-Type", "text/plain"), ("Vary", "Accept")])

        def body():
            yield b"start "
            session.setdefault("messages", []).append("streamed")
            if path == "/stream-fail":
                raise RuntimeError("failed mid-body")
            yield b"end"

        return body()
    body = json.dumps(dict(session)).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


def call(app, path="/read", cookie=None, scheme="http", query=""):
    """Call ``app`` in-process; return ``(status, headers as a list, body)``."""
    environ = {"PATH_INFO": path, "QUERY_STRING": query, "wsgi.url_scheme": scheme}
    setup_testing_defaults(environ)
    environ.setdefault("SCRIPT_NAME", "")
    if cookie is not None:
        environ["HTTP_COOKIE"] = cookie
    response = {}

    def start_response(status, headers, exc_info=None):
        response["status"], response["headers"] = status, headers
        return lambda data: None

    body = app(environ, start_response)
    try:
        data = b"".join(body)
    finally:
        if hasattr(body, "close"):
            body.close()
    return response["status"], response["headers"], data


def set_cookies(headers):
    return [value for name, value in headers if name.lower() == "set-cookie"]


class MiddlewareCase(unittest.TestCase):
    """A probe app behind SessionMiddleware over a FileStore, served over HTTP."""

    middleware_options = {"clean_interval": None}
    store_options = {}

    def setUp(self):
        self.directory = os.path.join(temp_dir(self), "sessions")
        self.store = CountingFileStore(self.directory, **self.store_options)
        self.app = tinysession.SessionMiddleware(
            validator(probe_app), self.store, environ_key=VALIDATED_KEY, **self.middleware_options
        )
        self.browser = Browser(serve(self, validator(self.app)))

    def session_files(self):
        return sorted(name for name in os.listdir(self.directory) if name.startswith("ts-"))

    def age_session(self, seconds):
        for name in self.session_files():
            then = time.time() - seconds
            os.utime(os.path.join(self.directory, name), (then, then))


class CookieRoundTrip(MiddlewareCase):
    def test_written_data_comes_back_on_the_next_request(self):
        self.assertEqual(self.browser.json("/set?user=42&lang=fr"), {"user": "42", "lang": "fr"})
        self.assertEqual(self.browser.json(), {"user": "42", "lang": "fr"})
        session_id = self.browser.session_id()
        self.assertRegex(session_id, r"^[A-Za-z0-9_-]{43}$")
        expected_key = hashlib.sha256(session_id.encode()).hexdigest()
        self.assertEqual(self.session_files(), ["ts-" + expected_key])
        with open(os.path.join(self.directory, "ts-" + expected_key), "rb") as file:
            stored = file.read()
        self.assertNotIn(session_id.encode(), stored)
        self.assertEqual(json.loads(stored)["data"], {"user": "42", "lang": "fr"})

    def test_each_browser_gets_its_own_session(self):
        other = Browser(self.browser.base_url)
        self.browser.json("/set?user=ann")
        other.json("/set?user=bob")
        self.assertEqual(self.browser.json(), {"user": "ann"})
        self.assertEqual(other.json(), {"user": "bob"})
        self.assertNotEqual(self.browser.session_id(), other.session_id())

    def test_get_session_outside_the_middleware(self):
        with self.assertRaises(tinysession.SessionError):
            tinysession.get_session({})


class LazyLoading(MiddlewareCase):
    def test_untouched_requests_cost_nothing(self):
        status, headers, _ = self.browser.request("/untouched")
        self.assertEqual(status, 200)
        self.assertIsNone(headers.get("Set-Cookie"))
        self.assertIsNone(headers.get("Vary"))
        self.browser.json("/set?a=1")
        self.store.accesses.clear()
        status, headers, _ = self.browser.request("/untouched")
        self.assertEqual((status, headers.get("Set-Cookie")), (200, None))
        self.assertEqual(self.store.accesses, [])

    def test_reading_an_empty_session_saves_nothing(self):
        status, headers, body = self.browser.request("/read")
        self.assertEqual((status, json.loads(body)), (200, {}))
        self.assertIsNone(headers.get("Set-Cookie"))
        self.assertEqual(headers.get("Vary"), "Cookie")
        self.assertEqual(self.session_files(), [])


class ChangeDetection(MiddlewareCase):
    def test_nested_mutation_is_saved(self):
        for message in ("hello", "how are you", "bye"):
            self.browser.request(f"/append?m={urllib.parse.quote(message)}")
        self.assertEqual(self.browser.json(), {"messages": ["hello", "how are you", "bye"]})

    def test_unchanged_session_is_not_rewritten(self):
        self.browser.json("/set?a=1")
        self.store.accesses.clear()
        self.browser.json()
        self.assertEqual([kind for kind, _ in self.store.accesses], ["read"])


class Touching(MiddlewareCase):
    store_options = {"max_age": 600}

    def test_reads_slide_the_expiry_at_most_once_a_minute(self):
        self.browser.json("/set?a=1")
        path = os.path.join(self.directory, self.session_files()[0])
        inode = os.stat(path).st_ino
        self.age_session(30)
        self.browser.json()
        self.assertAlmostEqual(os.stat(path).st_mtime, time.time() - 30, delta=5)
        self.age_session(90)
        self.browser.json()
        self.assertAlmostEqual(os.stat(path).st_mtime, time.time(), delta=5)
        self.assertEqual(os.stat(path).st_ino, inode)


class Expiry(MiddlewareCase):
    store_options = {"max_age": 600}

    def test_an_idle_session_expires_and_is_not_adopted(self):
        self.browser.json("/set?user=ann")
        old_id = self.browser.session_id()
        self.age_session(601)
        self.assertEqual(self.browser.json("/set?user=bob"), {"user": "bob"})
        self.assertNotEqual(self.browser.session_id(), old_id)


class AbsoluteLifetime(MiddlewareCase):
    middleware_options = {"clean_interval": None, "max_lifetime": 3600}

    def rewrite_created(self, seconds_ago):
        key = self.session_files()[0][len("ts-") :]
        record = self.store[key]
        record["created"] = time.time() - seconds_ago
        self.store[key] = record
        return record["created"]

    def test_a_session_past_its_lifetime_is_discarded_even_if_just_used(self):
        self.browser.json("/set?user=ann")
        self.rewrite_created(3601)
        self.assertEqual(self.browser.json(), {})
        self.assertEqual(self.session_files(), [])

    def test_regenerate_keeps_the_creation_time(self):
        self.browser.json("/set?user=ann")
        created = self.rewrite_created(3000)
        self.browser.json("/login?user=ann")
        key = self.session_files()[0][len("ts-") :]
        self.assertEqual(self.store[key]["created"], created)
        self.rewrite_created(3601)
        self.assertEqual(self.browser.json(), {})


class RegenerateAndInvalidate(MiddlewareCase):
    def test_regenerate_keeps_data_and_kills_the_old_id(self):
        self.browser.json("/set?cart=3")
        old_id = self.browser.session_id()
        self.assertEqual(self.browser.json("/login?user=ann"), {"cart": "3", "user": "ann"})
        new_id = self.browser.session_id()
        self.assertNotEqual(new_id, old_id)
        self.assertEqual(self.session_files(), ["ts-" + hashlib.sha256(new_id.encode()).hexdigest()])
        thief = Browser(self.browser.base_url)
        _status, _headers, body = thief.request("/read", headers={"Cookie": f"{NAME}={old_id}"})
        self.assertEqual(json.loads(body), {})

    def test_invalidate_deletes_the_session_and_expires_the_cookie(self):
        self.browser.json("/set?user=ann")
        _status, headers, body = self.browser.request("/logout")
        self.assertEqual(json.loads(body), {})
        self.assertIn("Max-Age=0", headers["Set-Cookie"])
        self.assertEqual(self.session_files(), [])
        self.assertIsNone(self.browser.session_id())

    def test_an_emptied_session_is_deleted(self):
        self.browser.json("/set?user=ann")
        _status, headers, _ = self.browser.request("/clear")
        self.assertIn("Max-Age=0", headers["Set-Cookie"])
        self.assertEqual(self.session_files(), [])

    def test_a_concurrent_logout_is_not_undone_by_a_slower_request(self):
        self.browser.json("/set?user=ann")
        cookie = f"{NAME}={self.browser.session_id()}"
        logout = tinysession.SessionMiddleware(probe_app, self.store, clean_interval=None)

        def slow_request(environ, start_response):
            tinysession.get_session(environ)["visits"] = 1
            call(logout, "/logout", cookie=cookie)  # another tab logs out meanwhile
            start_response("200 OK", [])
            return [b""]

        call(tinysession.SessionMiddleware(slow_request, self.store, clean_interval=None), cookie=cookie)
        self.assertEqual(self.session_files(), [])
        self.assertEqual(call(logout, cookie=cookie)[2], b"{}")

    def test_regenerate_after_the_response_started_raises_even_if_loaded_late(self):
        def app(environ, start_response):
            start_response("200 OK", [])
            tinysession.get_session(environ).regenerate()
            return [b""]

        self.browser.json("/set?user=ann")
        with self.assertRaises(tinysession.SessionError):
            call(tinysession.SessionMiddleware(app, self.store, clean_interval=None),
                 cookie=f"{NAME}={self.browser.session_id()}")
        self.assertEqual(self.browser.json(), {"user": "ann"})

    def test_regenerate_after_the_response_started_raises(self):
        def app(environ, start_response):
            session = tinysession.get_session(environ)
            session["a"] = 1
            start_response("200 OK", [])
            session.regenerate()
            return [b""]

        with self.assertRaises(tinysession.SessionError):
            call(tinysession.SessionMiddleware(app, self.store, clean_interval=None))


class StrictMode(MiddlewareCase):
    def test_a_forged_id_is_never_adopted(self):
        forged = "A" * 43
        self.browser.request("/set?user=ann", headers={"Cookie": f"{NAME}={forged}"})
        issued = self.browser.session_id()
        self.assertNotEqual(issued, forged)
        self.assertNotIn("ts-" + hashlib.sha256(forged.encode()).hexdigest(), self.session_files())
        self.assertEqual(len(self.session_files()), 1)

    def test_the_first_live_session_among_several_cookies_wins(self):
        self.browser.json("/set?user=ann")
        live = self.browser.session_id()
        header = f'{NAME}="{"B" * 43}"; {NAME}=garbage; other=1; {NAME}={live}'
        _status, _headers, body = Browser(self.browser.base_url).request("/read", headers={"Cookie": header})
        self.assertEqual(json.loads(body), {"user": "ann"})


class ExceptionRollback(MiddlewareCase):
    def test_nothing_is_saved_when_the_app_raises(self):
        self.browser.json("/set?user=ann")
        status, _, _ = self.browser.request("/fail")
        self.assertEqual(status, 500)
        self.assertEqual(self.browser.json(), {"user": "ann"})

    def test_nothing_is_saved_when_the_body_raises(self):
        self.browser.json("/set?user=ann")
        with self.assertRaises(RuntimeError):
            call(self.app, "/stream-fail", cookie=f"{NAME}={self.browser.session_id()}")
        self.assertEqual(self.browser.json(), {"user": "ann"})


class HybridRollback(MiddlewareCase):
    @staticmethod
    def hybrid_app(environ, start_response):
        session = tinysession.get_session(environ)
        session["user"] = "mallory"
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            yield b"partial"
            raise RuntimeError("failed mid-body")

        return body()

    def test_changes_made_before_a_failing_body_are_undone(self):
        self.browser.json("/set?user=ann")
        app = tinysession.SessionMiddleware(self.hybrid_app, self.store, clean_interval=None)
        with self.assertRaises(RuntimeError):
            call(app, cookie=f"{NAME}={self.browser.session_id()}")
        self.assertEqual(self.browser.json(), {"user": "ann"})
        with self.assertRaises(RuntimeError):
            call(app)
        self.assertEqual(len(self.session_files()), 1)


class Streaming(MiddlewareCase):
    def test_changes_made_while_streaming_are_saved_on_close(self):
        self.browser.json("/set?user=ann")
        _status, headers, body = self.browser.request("/stream")
        self.assertEqual(body, b"start end")
        self.assertEqual(headers["Vary"], "Accept, Cookie")
        self.assertEqual(self.browser.json(), {"user": "ann", "messages": ["streamed"]})

    def test_a_finished_body_is_saved_before_it_is_returned(self):
        def app(environ, start_response):
            tinysession.get_session(environ)["n"] = 1
            start_response("200 OK", [])
            return [b"done"]

        middleware = tinysession.SessionMiddleware(app, self.store, clean_interval=None)
        environ = {}
        setup_testing_defaults(environ)
        body = middleware(environ, lambda status, headers, exc_info=None: None)
        self.assertEqual(body, [b"done"])
        self.assertEqual(len(self.session_files()), 1)


class CookieAttributes(MiddlewareCase):
    def cookie_for(self, scheme="http", **options):
        middleware = tinysession.SessionMiddleware(probe_app, self.store, clean_interval=None, **options)
        _status, headers, _ = call(middleware, "/set", query="a=1", scheme=scheme)
        (cookie,) = set_cookies(headers)
        return cookie

    def test_defaults_over_real_http(self):
        _status, headers, _ = self.browser.request("/set?a=1")
        cookie = headers["Set-Cookie"]
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
        self.assertEqual(attributes, {"path", "httponly", "samesite"})
        self.assertIn("Path=/", cookie)
        self.assertIn("SameSite=Lax", cookie)
        self.assertEqual(headers["Vary"], "Cookie")

    def test_vary_is_merged_by_token(self):
        def app(environ, start_response):
            tinysession.get_session(environ)["a"] = 1
            start_response("200 OK", [("Vary", "Accept-Encoding, X-Cookie-Consent")])
            return [b""]

        _, headers, _ = call(tinysession.SessionMiddleware(app, self.store, clean_interval=None))
        self.assertIn(("Vary", "Accept-Encoding, X-Cookie-Consent, Cookie"), headers)

    def test_secure_follows_the_scheme_unless_forced(self):
        self.assertIn("Secure", self.cookie_for("https"))
        self.assertNotIn("Secure", self.cookie_for("http"))
        self.assertIn("Secure", self.cookie_for("http", secure=True))
        self.assertNotIn("Secure", self.cookie_for("https", secure=False))

    def test_options(self):
        cookie = self.cookie_for(
            cookie_name="sid", path="/app", domain="example.org", samesite="none", cookie_max_age=600,
            httponly=False,
        )
        self.assertTrue(cookie.startswith("sid="))
        for part in ("Path=/app", "Domain=example.org", "SameSite=None", "Secure", "Max-Age=600"):
            self.assertIn(part, cookie)
        self.assertNotIn("HttpOnly", cookie)
        self.assertIn("SameSite=Strict", self.cookie_for(samesite="Strict"))

    def test_a_cookie_max_age_of_zero_or_less_is_a_browser_session_cookie(self):
        for max_age in (0, -1, None):
            with self.subTest(max_age=max_age):
                cookie = self.cookie_for(cookie_max_age=max_age)
                self.assertNotIn("max-age", cookie.lower())
                self.assertNotIn("expires", cookie.lower())

    def test_partitioned_cookies_are_secure(self):
        cookie = self.cookie_for(partitioned=True)
        self.assertEqual(cookie.split("; ")[-1], "Partitioned")
        self.assertIn("Secure", cookie)
        self.assertNotIn("Partitioned", self.cookie_for())

    def test_bad_options(self):
        for options in (
            {"cookie_name": "bad name"},
            {"cookie_name": "a;b"},
            {"path": "/x;y"},
            {"domain": "a b"},
            {"samesite": "sometimes"},
            {"secure": "yes"},
            {"cookie_max_age": 1.5},
            {"cookie_max_age": "600"},
            {"cookie_name": "Path"},
            {"path": None},
        ):
            with self.subTest(options=options), self.assertRaises(ValueError):
                tinysession.SessionMiddleware(probe_app, self.store, **options)
        with self.assertRaises(TypeError):
            tinysession.SessionMiddleware(probe_app, {})


class MalformedCookies(MiddlewareCase):
    def random_header(self, rng):
        alphabet = NAME + "=;\"' ,\t\\abcXYZ019-_+/.%\x7f\x80\xe9\xff" + "A" * 10
        parts = []
        for _ in range(rng.randint(0, 6)):
            kind = rng.random()
            if kind < 0.3:
                value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
            elif kind < 0.5:
                value = "A" * rng.choice([0, 1, 42, 44, 100, 5000])
            elif kind < 0.7:
                value = '"' + "A" * 42 + rng.choice(["é", "!", " ", "\\"]) + '"'
            else:
                value = "".join(rng.choice(alphabet) for _ in range(43))
            if len(value) == 43 and all(c.isascii() and (c.isalnum() or c in "-_") for c in value):
                continue  # well formed: that one would be looked up, by design
            parts.append(rng.choice([NAME + "=", NAME + " =", NAME.capitalize() + "=", " " + NAME + "=", ""]) + value)
        return rng.choice(["; ", ";", ",", " "]).join(parts)

    def test_thousands_of_malformed_headers_never_raise_nor_touch_the_store(self):
        app = tinysession.SessionMiddleware(probe_app, self.store, clean_interval=None)
        rng = random.Random(1234)
        for _ in range(3000):
            header = self.random_header(rng)
            status, headers, body = call(app, "/read", cookie=header)
            self.assertEqual((status, json.loads(body)), ("200 OK", {}), header)
            for cookie in set_cookies(headers):
                self.assertIn("Max-Age=0", cookie)
        self.assertEqual(self.store.accesses, [])

    def test_raw_bytes_over_real_http(self):
        host, port = self.browser.base_url[len("http://") :].split(":")
        for raw in (NAME.encode() + b"=\xff\xfe" * 20, NAME.encode() + b"=" + b"A" * 60000, NAME.encode() + b'="', b";;;==;"):
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
            self.addCleanup(connection.close)
            connection.putrequest("GET", "/read")
            connection.putheader("Cookie", raw)
            connection.endheaders()
            response = connection.getresponse()
            self.assertEqual((response.status, response.read()), (200, b"{}"))
        self.assertEqual(self.store.accesses, [])


class ThreadsOnOneSession(MiddlewareCase):
    def test_many_threads_on_one_session(self):
        self.browser.json("/set?user=ann")
        cookie = f"{NAME}={self.browser.session_id()}"
        statuses = []

        def work(worker):
            client = Browser(self.browser.base_url)
            for index in range(15):
                status, _, _ = client.request(f"/append?m={worker}-{index}", headers={"Cookie": cookie})
                statuses.append(status)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        with LogRecords() as warnings:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        self.assertEqual(statuses, [200] * 120)
        self.assertEqual(warnings, [])
        record = self.browser.json()
        self.assertEqual(record["user"], "ann")
        self.assertTrue(1 <= len(record["messages"]) <= 120)


class BackgroundCleaning(unittest.TestCase):
    def wait_for_cleaners(self):
        for thread in threading.enumerate():
            if thread.name == "tinysession-clean":
                thread.join(30)

    def test_a_request_starts_a_clean_in_the_background(self):
        directory = temp_dir(self)
        store = tinysession.FileStore(directory, max_age=60)
        store["old"] = {}
        old = time.time() - 120
        os.utime(os.path.join(directory, "ts-old"), (old, old))
        app = tinysession.SessionMiddleware(probe_app, store, clean_interval=300)
        call(app, "/untouched")
        self.wait_for_cleaners()
        self.assertEqual(os.listdir(directory), [])
        store["old"] = {}
        os.utime(os.path.join(directory, "ts-old"), (old, old))
        call(app, "/untouched")
        self.wait_for_cleaners()
        self.assertEqual(os.listdir(directory), ["ts-old"])

    def test_clean_errors_are_logged_not_raised(self):
        class BrokenStore(tinysession.FileStore):
            def clean(self, max_age=None, keep=None, *, now=None):
                raise tinysession.StoreError("disk on fire")

        app = tinysession.SessionMiddleware(probe_app, BrokenStore(temp_dir(self)), clean_interval=0)
        with self.assertLogs("tinysession", "ERROR") as logs:
            status, _, _ = call(app, "/untouched")
            self.wait_for_cleaners()
        self.assertEqual(status, "200 OK")
        self.assertIn("disk on fire", "\n".join(logs.output))


class StoreFailuresDuringRequests(unittest.TestCase):
    def test_a_failing_store_fails_the_request_instead_of_starting_afresh(self):
        directory = os.path.join(temp_dir(self), "sessions")
        app = tinysession.SessionMiddleware(probe_app, tinysession.FileStore(directory), clean_interval=None)
        _, headers, _ = call(app, "/set", query="user=ann")
        cookie = set_cookies(headers)[0].split(";")[0]
        os.rename(directory, directory + ".moved")
        with open(directory, "w"):
            pass  # reading a session now fails with ENOTDIR
        with self.assertRaises(tinysession.StoreError):
            call(app, "/read", cookie=cookie)


# -- Flask --

HAS_FLASK = importlib.util.find_spec("flask") is not None
NO_FLASK = "Flask is not installed (pip install flask)"


def flask_probe_app(store, **options):
    """The probe app's paths in Flask, on ``flask.session`` served by FlaskSessionInterface."""
    import flask

    app = flask.Flask("tinysession_probe")
    app.config.update(SECRET_KEY="probe key", SESSION_COOKIE_NAME=NAME)
    app.session_interface = tinysession.FlaskSessionInterface(store, **options)
    session = flask.session

    @app.route("/<path:path>")
    def probe(path):
        args = flask.request.args
        if path == "untouched":
            return "no session here"
        if path == "set":
            for name in args:
                session[name] = args[name]
        elif path == "append":
            session.setdefault("messages", []).append(args.get("m", "x"))
        elif path == "login":
            session.regenerate()
            session["user"] = args.get("user", "ann")
        elif path == "logout":
            session.invalidate()
        elif path == "clear":
            session.clear()
        elif path == "fail":
            session["broken"] = True
            raise RuntimeError("the app failed")
        elif path == "forbidden":
            session["tried"] = True
            flask.abort(403)
        return flask.Response(json.dumps(dict(session)), content_type="application/json")

    return app


class FlaskBrowser(Browser):
    """A Browser whose ``session_id()`` is the id inside the signed cookie ``<id>.<p|s>.<signature>``."""

    def cookie_value(self):
        values = [cookie.value for cookie in self.jar if cookie.name == NAME]
        return values[0] if values else None

    def session_id(self):
        value = self.cookie_value()
        return value.split(".")[0] if value else None


class FlaskFrontEnd:
    """Serve the middleware behaviour tests' probe through Flask and FlaskSessionInterface instead."""

    def setUp(self):
        require(HAS_FLASK, NO_FLASK)
        self.directory = os.path.join(temp_dir(self), "sessions")
        self.store = CountingFileStore(self.directory, **self.store_options)
        self.app = flask_probe_app(self.store, **self.middleware_options)
        self.browser = FlaskBrowser(serve(self, self.app))


class FlaskCookieRoundTrip(FlaskFrontEnd, CookieRoundTrip):
    pass


class FlaskLazyLoading(FlaskFrontEnd, LazyLoading):
    pass


class FlaskChangeDetection(FlaskFrontEnd, ChangeDetection):
    pass


class FlaskTouching(FlaskFrontEnd, Touching):
    pass


class FlaskExpiry(FlaskFrontEnd, Expiry):
    pass


class FlaskAbsoluteLifetime(FlaskFrontEnd, AbsoluteLifetime):
    pass


class FlaskRegenerateAndInvalidate(FlaskFrontEnd, RegenerateAndInvalidate):
    def test_a_replayed_signed_cookie_is_dead_after_regenerate(self):
        self.browser.json("/set?cart=3")
        old_cookie = self.browser.cookie_value()
        self.browser.json("/login?user=ann")
        thief = Browser(self.browser.base_url)
        _status, _headers, body = thief.request("/read", headers={"Cookie": f"{NAME}={old_cookie}"})
        self.assertEqual(json.loads(body), {})


class FlaskStrictMode(FlaskFrontEnd, StrictMode):
    def test_the_first_live_session_among_several_cookies_wins(self):
        self.browser.json("/set?user=ann")
        live = self.browser.cookie_value()
        forged = "B" * 43 + ".s." + "C" * 43
        header = f'{NAME}="{forged}"; {NAME}={self.browser.session_id()}; other=1; {NAME}={live}'
        _status, _headers, body = Browser(self.browser.base_url).request("/read", headers={"Cookie": header})
        self.assertEqual(json.loads(body), {"user": "ann"})

    def test_an_unknown_cookie_is_ignored_and_not_expired(self):
        self.browser.json("/set?user=ann")
        cookie = self.browser.cookie_value()
        self.browser.request("/logout")
        stale = Browser(self.browser.base_url)
        _status, headers, body = stale.request("/clear", headers={"Cookie": f"{NAME}={cookie}"})
        self.assertEqual((json.loads(body), headers.get("Set-Cookie")), ({}, None))


class FlaskExceptionRollback(FlaskFrontEnd, ExceptionRollback):
    def test_nothing_is_saved_when_the_body_raises(self):
        self.browser.json("/set?user=ann")
        status, _, _ = self.browser.request("/forbidden")
        self.assertEqual(status, 403)
        self.assertEqual(self.browser.json(), {"user": "ann", "tried": True}, "an HTTP error is a handled response")


class FlaskMalformedCookies(FlaskFrontEnd, MalformedCookies):
    def test_thousands_of_malformed_headers_never_raise_nor_touch_the_store(self):
        rng = random.Random(1234)
        for _ in range(1000):
            header = self.random_header(rng)
            status, headers, body = call(self.app, "/read", cookie=header)
            self.assertEqual((status, json.loads(body), set_cookies(headers)), ("200 OK", {}, []), header)
        self.assertEqual(self.store.accesses, [])


class FlaskCase(unittest.TestCase):
    """A bare Flask app on FlaskSessionInterface over a counting FileStore; tests add the views."""

    def setUp(self):
        require(HAS_FLASK, NO_FLASK)
        import flask

        self.flask = flask
        self.directory = os.path.join(temp_dir(self), "sessions")
        self.store = CountingFileStore(self.directory, max_age=7 * 86400)
        self.app = flask.Flask("tinysession_test")
        self.app.config.update(SECRET_KEY="test key")
        self.app.session_interface = tinysession.FlaskSessionInterface(self.store, clean_interval=None)
        self.client = self.app.test_client()

    def records(self):
        return sorted(name for name in os.listdir(self.directory) if name.startswith("ts-"))

    def route(self, path, view):
        self.app.add_url_rule(path, path, view, methods=["GET", "POST"])


class FlaskCookieConfiguration(FlaskCase):
    def cookie(self, **config):
        self.app.config.update(config)
        self.route("/", lambda: self.flask.session.update(a=1) or "")
        return self.client.get("/", "http://www.example.com/").headers["Set-Cookie"]

    def test_defaults_are_flasks(self):
        name_value, *attributes = self.cookie().split("; ")
        self.assertRegex(name_value, r"^session=[A-Za-z0-9_-]{43}\.s\.[A-Za-z0-9_-]{43}$")
        self.assertEqual(sorted(attributes), ["HttpOnly", "Path=/"], "no SameSite: Flask's default")

    def test_every_session_cookie_key(self):
        cookie = self.cookie(
            SESSION_COOKIE_NAME="sid", SESSION_COOKIE_DOMAIN=".example.com", SESSION_COOKIE_PATH="/app",
            SESSION_COOKIE_HTTPONLY=False, SESSION_COOKIE_SECURE=True, SESSION_COOKIE_SAMESITE="Strict",
            SESSION_COOKIE_PARTITIONED=True,
        )
        self.assertTrue(cookie.startswith("sid="))
        for part in ("Domain=example.com", "Path=/app", "Secure", "SameSite=Strict", "Partitioned"):
            self.assertIn(part, cookie)
        self.assertNotIn("HttpOnly", cookie)
        self.assertNotIn("Expires", cookie)

    def test_the_path_falls_back_to_application_root(self):
        self.assertIn("Path=/root", self.cookie(APPLICATION_ROOT="/root"))


class FlaskPermanentSessions(FlaskCase):
    def setUp(self):
        super().setUp()
        self.app.config["PERMANENT_SESSION_LIFETIME"] = datetime.timedelta(days=7)
        self.permanent = True

        @self.app.before_request
        def make_permanent():
            if self.flask.request.path != "/untouched":
                self.flask.session.permanent = self.permanent

        self.route("/set", lambda: self.flask.session.update(self.flask.request.args) or "")
        self.route("/read", lambda: {k: v for k, v in self.flask.session.items() if k != "_permanent"})
        self.route("/pop", lambda: str(self.flask.session.pop("a")))
        self.route("/untouched", lambda: "")
        self.client = self.app.test_client(use_cookies=False)
        self.jar = RestartingJar()

    def get(self, path):
        response = self.client.get(path, headers={"Cookie": self.jar.header()})
        self.jar.receive(response.headers.getlist("Set-Cookie"))
        return response

    def test_a_permanent_cookie_has_expires_and_max_age(self):
        cookie = self.get("/set?a=1").headers["Set-Cookie"]
        self.assertIn("Max-Age=604800", cookie)
        expires = email.utils.parsedate_to_datetime(re.search(r"Expires=([^;]+)", cookie).group(1))
        self.assertAlmostEqual(expires.timestamp(), time.time() + 604800, delta=60)
        self.permanent = False  # the same session: re-sent because it was modified
        cookie = self.get("/set?a=2").headers["Set-Cookie"]
        self.assertNotIn("Expires", cookie)
        self.assertNotIn("Max-Age", cookie)

    def test_a_permanent_session_survives_a_browser_restart_until_the_documented_lifetime(self):
        self.get("/set?user=ann")
        self.jar.restart()
        self.assertEqual(self.get("/read").json, {"user": "ann"})
        self.jar.advance(6 * 86400)  # six idle days: inside both the cookie's lifetime and max_age
        os.utime(os.path.join(self.directory, self.records()[0]), (time.time() - 6 * 86400,) * 2)
        self.jar.restart()
        self.assertEqual(self.get("/read").json["user"], "ann")
        self.jar.advance(6 * 86400)  # each request renewed both: six more days still inside
        os.utime(os.path.join(self.directory, self.records()[0]), (time.time() - 6 * 86400,) * 2)
        self.jar.restart()
        self.assertEqual(self.get("/read").json["user"], "ann")
        self.jar.advance(7 * 86400 + 1)
        self.assertEqual(self.jar.header(), "", "the cookie expired after PERMANENT_SESSION_LIFETIME")

    def test_the_record_expires_after_max_age_even_if_the_cookie_would_live(self):
        self.get("/set?user=ann")
        os.utime(os.path.join(self.directory, self.records()[0]), (time.time() - 7 * 86400 - 1,) * 2)
        self.assertEqual(self.get("/read").json, {})

    def test_a_browser_session_cookie_dies_with_the_browser(self):
        self.permanent = False
        self.get("/set?user=ann")
        self.jar.restart()
        self.assertEqual(self.get("/read").json, {})

    def test_a_session_holding_only_its_permanence_is_empty(self):
        for _visitor in range(20):
            response = self.app.test_client().get("/read")
            self.assertEqual((response.json, response.headers.get("Set-Cookie")), ({}, None))
        self.assertEqual(self.records(), [])
        self.get("/set?a=1")
        self.assertIn("Max-Age=0", self.get("/pop").headers["Set-Cookie"])
        self.assertEqual(self.records(), [])

    def test_an_untouched_request_refreshes_a_permanent_cookie_without_store_access(self):
        self.get("/set?a=1")
        self.store.accesses.clear()
        response = self.get("/untouched")
        self.assertIn("Max-Age=604800", response.headers["Set-Cookie"])
        self.assertEqual(response.headers["Vary"], "Cookie")
        self.assertEqual(self.store.accesses, [])
        self.app.config["SESSION_REFRESH_EACH_REQUEST"] = False
        self.assertNotIn("Set-Cookie", self.get("/untouched").headers)


class RestartingJar:
    """A cookie jar on a clock of its own, that drops its session cookies on ``restart()``, as a browser."""

    def __init__(self):
        self.now = time.time()
        self.cookies = {}  # name -> (value, expiry timestamp or None)

    def receive(self, set_cookie_values):
        for value in set_cookie_values:
            morsel = next(iter(http.cookies.SimpleCookie(value).values()))
            max_age = int(morsel["max-age"]) if morsel["max-age"] else None
            if max_age is not None and max_age <= 0:
                self.cookies.pop(morsel.key, None)
            else:
                self.cookies[morsel.key] = (morsel.value, None if max_age is None else self.now + max_age)

    def restart(self):
        self.cookies = {name: kept for name, kept in self.cookies.items() if kept[1] is not None}

    def advance(self, seconds):
        self.now += seconds

    def header(self):
        return "; ".join(
            f"{name}={value}" for name, (value, expiry) in self.cookies.items() if expiry is None or expiry > self.now
        )


class FlaskSecretKeys(FlaskCase):
    def setUp(self):
        super().setUp()
        self.route("/set", lambda: self.flask.session.update(a=1) or "")
        self.route("/read", lambda: dict(self.flask.session))

    def test_a_new_key_logs_everyone_out_and_a_fallback_key_keeps_them(self):
        self.app.secret_key, self.app.config["SECRET_KEY_FALLBACKS"] = "0 key", ["-1 key"]
        self.client.get("/set")
        self.assertEqual(self.client.get("/read").json, {"a": 1})
        self.app.secret_key = "? key"
        self.assertEqual(self.client.get("/read").json, {})
        self.app.secret_key, self.app.config["SECRET_KEY_FALLBACKS"] = "+1 key", ["0 key"]
        self.assertEqual(self.client.get("/read").json, {"a": 1})
        self.app.config["SECRET_KEY_FALLBACKS"] = []
        self.assertEqual(self.client.get("/read").json, {})

    def test_a_tampered_cookie_is_not_adopted(self):
        self.client.get("/set")
        value = self.client.get_cookie("session").value
        session_id, _, signature = value.split(".")
        for forged in (f"{session_id}.p.{signature}", f"{session_id}.s.{'A' * 43}", session_id):
            with self.subTest(forged=forged):
                client = self.app.test_client(use_cookies=False)
                self.assertEqual(client.get("/read", headers={"Cookie": f"session={forged}"}).json, {})
        client = self.app.test_client(use_cookies=False)
        self.assertEqual(client.get("/read", headers={"Cookie": f"session={value}"}).json, {"a": 1})

    def test_without_a_secret_key_the_session_is_read_only_and_empty(self):
        self.app.secret_key = None
        self.app.config["TESTING"] = True
        self.assertEqual(self.client.get("/read").json, {})
        with self.assertRaisesRegex(RuntimeError, "no secret key was set"):
            self.client.get("/set")
        self.assertEqual(self.store.accesses, [])


class FlaskTaggedValues(FlaskCase):
    def values(self):
        import markupsafe

        return {
            "tuple": (1, (2, "three"), [4]),
            "bytes": b"\xff\x00",
            "aware": datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc),
            "naive": datetime.datetime(2024, 5, 6, 7, 8, 9, 654321),
            "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
            "markup": markupsafe.Markup("<em>hi</em>"),
            "tag keys": [{" t": "not a tuple"}, {" di": "not a dict"}, {" t": 1, " b": 2}],
            "json": {"list": [1.5, None, True], "nested": {"x": "é"}},
        }

    def test_values_flask_apps_keep_round_trip_through_every_store(self):
        serializer = tinysession.TaggedJSON()
        values = self.values()
        self.assertEqual(serializer.loads(serializer.dumps(values)), values)
        for store in (tinysession.FileStore(temp_dir(self), serializer=serializer),
                      tinysession.SQLiteStore(os.path.join(temp_dir(self), "s.db"), serializer=serializer)):
            with self.subTest(store=store), store:
                store["k"] = values
                loaded = store["k"]
                self.assertEqual(loaded, values)
                self.assertEqual([type(loaded[name]) for name in values], [type(values[name]) for name in values])
                self.assertIsNone(loaded["naive"].tzinfo)

    def test_through_flask_session_and_flashed_messages(self):
        self.route("/set", lambda: self.flask.session.update(self.values()) or "")
        import markupsafe

        self.route("/flash", lambda: self.flask.flash(markupsafe.Markup("<b>saved</b>"), "info") or "")
        self.route("/check", lambda: str(dict(self.flask.session) == self.values()))
        self.route("/flashes", lambda: repr(self.flask.get_flashed_messages(with_categories=True)))
        self.client.get("/set")
        self.assertEqual(self.client.get("/check").text, "True")
        self.client.get("/flash")
        self.assertEqual(self.client.get("/flashes").text, "[('info', Markup('<b>saved</b>'))]")

    def test_plain_json_records_read_the_same_and_other_types_are_a_type_error(self):
        plain = tinysession.FileStore(self.directory)
        plain["k"] = {"a": [1, {"b": None}]}
        self.assertEqual(self.store["k"], {"a": [1, {"b": None}]})
        self.assertIsInstance(self.store.serializer, tinysession.TaggedJSON)
        with self.assertRaisesRegex(TypeError, "'set'"):
            tinysession.TaggedJSON().dumps({"a": {1, 2}})


class FlaskSessionFlags(FlaskCase):
    def test_modified_accessed_new_and_permanent(self):
        session = self.flask.session
        seen = {}

        def view():
            seen["before"] = (session.accessed, session.modified)
            seen["new"], seen["permanent"] = session.new, session.permanent
            if self.flask.request.args.get("write"):
                session["a"] = 1
            seen["after"] = (session.accessed, session.modified)
            return ""

        self.route("/", view)
        self.route("/nothing", lambda: "")
        self.client.get("/?write=1")
        self.assertEqual(seen, {"before": (True, False), "new": True, "permanent": False, "after": (True, True)})
        response = self.client.get("/")
        self.assertEqual((seen["new"], seen["after"]), (False, (True, False)))
        self.assertEqual((response.headers["Vary"], response.headers.get("Set-Cookie")), ("Cookie", None))
        self.store.accesses.clear()
        response = self.client.get("/nothing")
        self.assertNotIn("Vary", response.headers)
        self.assertEqual(self.store.accesses, [])

    def test_session_transaction_of_the_test_client(self):
        self.route("/", lambda: dict(self.flask.session))
        with self.client.session_transaction() as session:
            session["user"] = "ann"
        self.assertEqual(self.client.get("/").json, {"user": "ann"})
        with self.client.session_transaction() as session:
            self.assertEqual(dict(session), {"user": "ann"})
        self.assertEqual(len(self.records()), 1)

    def test_a_failing_store_is_an_http_500(self):
        self.route("/set", lambda: self.flask.session.update(a=1) or "")
        self.route("/read", lambda: dict(self.flask.session))
        self.client.get("/set")
        os.rename(self.directory, self.directory + ".moved")
        with open(self.directory, "w"):
            pass
        for path in ("/read", "/set"):
            with self.subTest(path=path), self.assertLogs(self.app.logger, "ERROR"):
                self.assertEqual(self.client.get(path).status_code, 500)


class FlaskLoginFixation(unittest.TestCase):
    """Flask-Login never calls regenerate(): the identity key rotates the id on login and logout."""

    def setUp(self):
        require(HAS_FLASK and importlib.util.find_spec("flask_login") is not None,
                "Flask-Login is not installed (pip install flask-login)")
        self.directory = temp_dir(self)
        self.store = tinysession.FileStore(self.directory)
        self.app = load_example("flask_login_app").create_app(self.store)

    def request(self, path, cookie, method="GET"):
        """Return ``(body, the cookie the client holds afterwards)``."""
        client = self.app.test_client()
        if cookie:
            client.set_cookie("session", cookie)
        response = client.open(path, method=method)
        held = client.get_cookie("session")
        return response.text, held.value if held else None

    def test_a_planted_pre_login_id_is_worthless_after_login_and_logout(self):
        _body, planted = self.request("/", None)
        self.assertEqual(len(os.listdir(self.directory)), 1)
        body, victim = self.request("/login?user=ann", planted)
        self.assertEqual(body, "logged in as ann\n")
        self.assertNotEqual(victim, planted)
        self.assertEqual(self.request("/", victim)[0], "hello ann, visit 2\n")
        self.assertEqual(self.request("/", planted)[0], "hello stranger, visit 1\n")
        self.assertEqual(len(os.listdir(self.directory)), 2, "the victim's record and the attacker's new one")
        _body, after_logout = self.request("/logout", victim, method="POST")
        self.assertNotEqual(after_logout, victim)
        self.assertEqual(self.request("/private", victim)[0][:3], "<!d", "the logged-in id no longer works")
        self.assertNotIn("ann", self.request("/", victim)[0])


class FlaskExamples(unittest.TestCase):
    def test_the_flask_cli_finds_the_app(self):
        require(HAS_FLASK, NO_FLASK)
        env = dict(os.environ, TINYSESSION_DIR=temp_dir(self))
        result = subprocess.run(
            [sys.executable, "-m", "flask", "--app", os.path.join(HERE, "examples", "flask_app"), "routes"],
            capture_output=True, env=env, timeout=60, check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"visits", result.stdout)


class SessionIdForFrontEnds(unittest.TestCase):
    def test_id_is_none_until_cookie_gives_one_and_none_after_invalidate(self):
        settings = tinysession.SessionMiddleware(probe_app, tinysession.FileStore(temp_dir(self)), clean_interval=None).settings
        session = tinysession.Session(settings, "")
        self.assertIsNone(session.id)
        session["a"] = 1
        self.assertIsNone(session.id)
        cookie = session.cookie()
        self.assertEqual(cookie.split(";")[0], f"{NAME}={session.id}")
        session.save()
        again = tinysession.Session(settings, f"{NAME}={session.id}")
        self.assertEqual((again["a"], again.id), (1, session.id))
        again.invalidate()
        self.assertIsNone(again.id)


# -- Examples --


def load_example(name):
    """Import ``examples/<name>.py`` as a module."""
    path = os.path.join(HERE, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ChatExample(unittest.TestCase):
    def setUp(self):
        self.chat = load_example("chat")

    def post(self, browser, path="/", **form):
        return browser.request(path, data=urllib.parse.urlencode(form).encode())

    def test_history_lives_in_the_session_and_is_trimmed(self):
        for spec in ("sessions", "sessions.db"):
            store = self.chat.open_store(os.path.join(temp_dir(self), spec))
            browser = Browser(serve(self, self.chat.make_app(store)))
            for number in range(1, 8):
                status, _, page = self.post(browser, message=f"message {number}")
                self.assertEqual(status, 200)
            page = page.decode()
            self.assertIn("You said: message 7", page)
            self.assertIn("message 3", page)
            self.assertNotIn("message 2<", page)
            self.assertEqual(page.count("<li>"), 2 * self.chat.MAX_ROUNDS)
            stranger = Browser(browser.base_url)
            self.assertNotIn("message 7", stranger.request("/")[2].decode())
            status, _, page = self.post(browser, "/logout")
            self.assertNotIn("<li>", page.decode())
            self.assertEqual(len(store), 0)

    def test_the_readme_command_serves_the_page(self):
        directory = os.path.join(temp_dir(self), "sessions")
        script = os.path.join(HERE, "examples", "chat.py")
        child = subprocess.Popen(
            [sys.executable, script, "--port", "0", "--store", directory], stdout=subprocess.PIPE
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.stdout.close)
        self.addCleanup(child.terminate)
        url = child.stdout.readline().decode().split()[2]
        browser = Browser(url.rstrip("/"))
        status, _, page = self.post(browser, message="hello over a real server")
        self.assertEqual(status, 200)
        self.assertIn("You said: hello over a real server", page.decode())
        self.assertEqual(len(os.listdir(directory)), 1)


class FrameworkExamples(unittest.TestCase):
    def check_visits(self, make_app):
        directory = temp_dir(self)
        browser = Browser(serve(self, make_app(tinysession.FileStore(directory))))
        bodies = [browser.request("/")[2] for _ in range(3)]
        self.assertEqual(bodies, [b"visits: 1\n", b"visits: 2\n", b"visits: 3\n"])
        self.assertEqual(len(os.listdir(directory)), 1)
        self.assertEqual(browser.request("/logout", data=b"")[2], b"bye\n")
        self.assertEqual(os.listdir(directory), [])

    def test_flask(self):
        require(importlib.util.find_spec("flask") is not None, "Flask is not installed (pip install flask)")
        self.check_visits(load_example("flask_app").create_app)

    def test_bottle(self):
        require(importlib.util.find_spec("bottle") is not None, "Bottle is not installed (pip install bottle)")
        self.check_visits(load_example("bottle_app").make_app)


# -- Command line --


class CommandLineCase(unittest.TestCase):
    """Runs ``tinysession.main`` in-process over a FileStore with aged records."""

    def setUp(self):
        self.directory = os.path.join(temp_dir(self), "sessions")
        self.store = tinysession.FileStore(self.directory)
        for index, age in enumerate([10, 20, 30, 4000, 5000, 90000]):
            self.store[f"k{index}"] = {"pad": "x" * 100}
            then = time.time() - age
            os.utime(os.path.join(self.directory, f"ts-k{index}"), (then, then))

    def run_main(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = tinysession.main(list(argv))
        return status, out.getvalue(), err.getvalue()


class CommandLineClean(CommandLineCase):
    def test_max_age_removes_the_expired_and_reports(self):
        status, out, err = self.run_main("clean", self.directory, "--max-age", "1h")
        self.assertEqual((status, err), (0, ""))
        self.assertRegex(out, r"^removed 3 of 6 sessions \(\d+ bytes\) in \d+\.\d\d s, kept 3\n$")
        self.assertEqual(sorted(self.store), ["k0", "k1", "k2"])

    def test_keep_removes_all_but_the_newest(self):
        status, out, _ = self.run_main("clean", self.directory, "--keep", "2")
        self.assertEqual(status, 0)
        self.assertIn("removed 4 of 6 sessions", out)
        self.assertEqual(sorted(self.store), ["k0", "k1"])

    def test_dry_run_removes_nothing(self):
        status, out, _ = self.run_main("clean", self.directory, "--max-age", "2h", "--keep", "1", "--dry-run")
        self.assertEqual(status, 0)
        self.assertIn("would remove 5 of 6 sessions", out)
        self.assertEqual(len(self.store), 6)

    def test_quiet_prints_nothing(self):
        self.assertEqual(self.run_main("clean", self.directory, "--max-age", "1d", "--quiet"), (0, "", ""))
        self.assertEqual(len(self.store), 5)

    def test_other_files_are_kept(self):
        for name in ("notes.txt", "ts-bad.name"):
            with open(os.path.join(self.directory, name), "w") as file:
                file.write("mine")
            os.utime(os.path.join(self.directory, name), (0, 0))
        status, _, _ = self.run_main("clean", self.directory, "--max-age", "1", "--keep", "0")
        self.assertEqual(status, 0)
        self.assertEqual(sorted(os.listdir(self.directory)), ["notes.txt", "ts-bad.name"])

    def test_durations(self):
        for text, seconds in (("90", 90), ("45s", 45), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("1.5h", 5400)):
            with self.subTest(text=text):
                status, out, _ = self.run_main("stats", self.directory, "--json", "--max-age", text)
                self.assertEqual((status, json.loads(out)["max_age"]), (0, seconds))

    def test_usage_errors_exit_2_naming_the_bad_value(self):
        for argv, named in (
            (["clean", self.directory, "--max-age", "5x"], "'5x'"),
            (["clean", self.directory, "--max-age=-1h"], "'-1h'"),
            (["clean", self.directory, "--keep=-1"], "'-1'"),
            (["clean", self.directory, "--keep", "many"], "'many'"),
            (["clean", self.directory], "--max-age, --keep"),
            (["vacuum", self.directory], "vacuum"),
            (["stats", self.directory, "--table", "my-t"], "'my-t'"),
            ([], "COMMAND"),
        ):
            with self.subTest(argv=argv):
                status, out, err = self.run_main(*argv)
                self.assertEqual(status, 2)
                self.assertIn(named, err)
                self.assertEqual(out, "")
        self.assertEqual(len(self.store), 6)

    def test_operational_errors_exit_1_without_a_traceback(self):
        not_a_store = os.path.join(temp_dir(self), "notes.txt")
        with open(not_a_store, "w") as file:
            file.write("hello")
        other_database = os.path.join(temp_dir(self), "other.db")
        with sqlite3.connect(other_database) as connection:
            connection.execute("CREATE TABLE things (x)")
        missing = os.path.join(temp_dir(self), "missing")
        for store, cause, table in (
            (missing, "no such directory or file", "sessions"),
            (not_a_store, "neither a session directory nor an SQLite database", "sessions"),
            (other_database, "no table 'sessions'", "sessions"),
            (other_database, "not a session table", "things"),
            ("redis://127.0.0.1:notaport/0", "invalid Redis URL" if HAVE_REDIS_PY else "pip install redis", "sessions"),
        ):
            with self.subTest(store=store, table=table):
                status, out, err = self.run_main("clean", store, "--keep", "1", "--table", table)
                self.assertEqual((status, out), (1, ""))
                self.assertIn(store, err)
                self.assertIn(cause, err)
                self.assertNotIn("Traceback", err)
        self.assertFalse(os.path.exists(missing))
        with sqlite3.connect(other_database) as connection:
            self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone(), ("delete",))
            self.assertEqual(connection.execute("SELECT name FROM sqlite_master").fetchall(), [("things",)])

    def test_help_shows_an_example(self):
        for argv in (["--help"], ["clean", "--help"], ["stats", "--help"]):
            with self.subTest(argv=argv):
                status, out, _ = self.run_main(*argv)
                self.assertEqual(status, 0)
                self.assertIn("python -m tinysession clean /var/lib/myapp/sessions --max-age 7d", out)

    def test_sqlite_store_and_table(self):
        path = os.path.join(temp_dir(self), "sessions.db")
        store = tinysession.SQLiteStore(path, table="web")
        self.addCleanup(store.close)
        for index in range(5):
            store[f"k{index}"] = {}
        status, out, _ = self.run_main("clean", path, "--table", "web", "--keep", "2")
        self.assertEqual(status, 0)
        self.assertIn("removed 3 of 5 sessions", out)
        self.assertEqual(len(store), 2)


class CommandLineStats(CommandLineCase):
    def test_text(self):
        status, out, err = self.run_main("stats", self.directory, "--max-age", "1h")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("sessions: 6\n", out)
        self.assertIn("expired:  3 older than 3600 s", out)

    def test_json(self):
        status, out, _ = self.run_main("stats", self.directory, "--json", "--max-age", "1h")
        self.assertEqual(status, 0)
        report = json.loads(out)
        self.assertEqual((report["sessions"], report["expired"]), (6, 3))
        self.assertEqual(report["bytes"], sum(os.path.getsize(os.path.join(self.directory, n)) for n in os.listdir(self.directory)))
        self.assertAlmostEqual(report["oldest"], time.time() - 90000, delta=60)
        self.assertAlmostEqual(report["newest"], time.time() - 10, delta=60)


class CommandLineRedis(CommandLineCase):
    def test_clean_and_stats_on_a_redis_url(self):
        redis_case(self)
        store = tinysession.RedisStore(self.redis, prefix=self.prefix)
        for index in range(5):
            store[f"k{index}"] = {"i": index}
        self.redis.set("foreign", b"keep me")
        url = f"redis://127.0.0.1:{self.server.port}/0"
        status, out, _ = self.run_main("stats", url, "--prefix", self.prefix, "--json")
        self.assertEqual((status, json.loads(out)["sessions"]), (0, 5))
        status, out, _ = self.run_main("clean", url, "--prefix", self.prefix, "--keep", "2")
        self.assertEqual(status, 0)
        self.assertIn("removed 3 of 5 sessions", out)
        self.assertEqual(sorted(store), ["k3", "k4"])
        self.assertEqual(self.redis.get("foreign"), b"keep me")

    def test_an_unreachable_server_is_an_operational_error(self):
        require(HAVE_REDIS_PY, "redis-py is not installed (pip install redis)")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        status, out, err = self.run_main("clean", f"redis://127.0.0.1:{port}/0", "--keep", "1")
        self.assertEqual((status, out), (1, ""))
        self.assertIn(str(port), err)
        self.assertNotIn("Traceback", err)


class CommandLineProcess(unittest.TestCase):
    """``python -m tinysession`` as cron runs it: a real process."""

    def run_module(self, *argv):
        env = dict(os.environ, PYTHONPATH=HERE)
        return subprocess.run(
            [sys.executable, "-m", "tinysession", *argv], capture_output=True, text=True, env=env, timeout=60, check=False
        )

    def test_clean_a_file_store(self):
        directory = temp_dir(self)
        store = tinysession.FileStore(directory)
        store["old"], store["new"] = {}, {}
        os.utime(os.path.join(directory, "ts-old"), (0, 0))
        result = self.run_module("clean", directory, "--max-age", "7d")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertTrue(result.stdout.startswith("removed 1 of 2 sessions"))
        self.assertEqual(os.listdir(directory), ["ts-new"])

    def test_clean_an_sqlite_store(self):
        path = os.path.join(temp_dir(self), "sessions.sqlite3")
        store = tinysession.SQLiteStore(path)
        self.addCleanup(store.close)
        for index in range(4):
            store[f"k{index}"] = {}
        result = self.run_module("clean", path, "--keep", "1", "--quiet")
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "", ""))
        self.assertEqual(list(store), ["k3"])

    def test_redis_url_without_redis_py(self):
        code = "import sys; sys.modules['redis'] = None; import tinysession; sys.exit(tinysession.main(sys.argv[1:]))"
        child = python_process(code, "stats", "redis://127.0.0.1:1/0", stderr=subprocess.PIPE)
        _, err = child.communicate(timeout=60)
        self.assertEqual(child.returncode, 1)
        self.assertIn(b"pip install redis", err)


if __name__ == "__main__":
    unittest.main()
