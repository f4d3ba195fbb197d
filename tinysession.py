"""Server-side web sessions in one file, on the standard library only.

Quick start: wrap any WSGI app (Flask: ``FlaskSessionInterface``; Quart:
``QuartSessionInterface``) and use the session::

    import tinysession

    store = tinysession.FileStore("/var/lib/myapp/sessions", max_age=3600)
    app = tinysession.SessionMiddleware(app, store)

    # inside the app, for each request:
    session = tinysession.get_session(environ)
    session.setdefault("messages", []).append({"role": "user", "content": "hi"})
    session.regenerate()      # on login: new id, same data
    session.invalidate()      # on logout

ASGI (Starlette, FastAPI): ``app.add_middleware(tinysession.ASGISessionMiddleware,
store=store)``; ``request.session`` is then a dict saved server-side, with
``regenerate()``, ``invalidate()`` and ``await save()``.

Stores are ``collections.abc.MutableMapping``s from a key (1 to 128 of
``[A-Za-z0-9_-]``) to a record, and can be used on their own::

    store["abc123"] = {"user": 42}
    store["abc123"]            # -> {'user': 42}, a fresh copy
    store.touch("abc123")      # slide the idle expiry without rewriting
    store.clean(keep=10000)    # -> how many records it removed

Three stores share one contract, the ``Store`` base class: ``FileStore(directory)``,
one file per record written atomically; ``SQLiteStore(path)``, one table in WAL
mode; and ``RedisStore(client)``, for several machines, over a client the
caller makes. A store of your own subclasses ``Store`` and implements five
bytes-level hooks (``read``, ``write``, ``remove``, ``set_mtime``, ``scan``);
keys, serializers, signing, sizes, expiry and bounds come from the base.
Records expire by modification time: with ``max_age`` (seconds) a record not
written or touched for that long is missing on every read, cleaned or not.
``clean()``, the store's background clean as it is written, or the command line
``python -m tinysession clean STORE --max-age 7d`` reclaim the space.
``trim_messages`` keeps a chat history stored in a session bounded, whole
rounds at a time, in the OpenAI, Anthropic and LangChain dict formats.

Threads and processes: stores and the middleware may be shared by the
threads of a process, and several processes (or machines, with Redis) may use
one store at once. A reader never sees a partial record. Writes and removals
can be conditional on the bytes stored (``expected=``), atomically against
every thread and process; the session core writes a loaded session only if
its record is still the one it loaded, so a logout is never undone by a
slower request.

Security: session ids are 256 random bits and the store only sees their
SHA-256. Records are JSON by default. ``serializer="pickle"`` requires a
``secret``: every record is then signed with HMAC-SHA256 and the signature is
checked before anything is unpickled, because unpickling data that someone
else could write runs their code. A record that fails its check is treated as
missing and logged on the ``tinysession`` logger. ``secret=[old, new]``
rotates a secret: records are signed with the newest, accepted under any.
Files are 0600 and session directories 0700; FileStore refuses a directory
that group or others may write to, since they could plant records there.

Sections: errors, records (serializers, ``TaggedJSON``), cleaning, the store
protocol, FileStore, SQLiteStore, RedisStore, merging, chat history, the message log,
cookies, the session core, WSGI, Flask (and Quart), ASGI, command line.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import datetime
import errno
import fcntl
import functools
import hashlib
import heapq
import hmac
import http.cookies
import itertools
import json
import logging
import marshal
import os
import pickle
import re
import secrets
import stat
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from collections.abc import Mapping, MutableMapping, Sequence

__version__ = "0.2.0"
__all__ = [  # noqa: RUF022 (plain sorted(), as ModuleSurface checks)
    "ASGISession",
    "ASGISessionMiddleware",
    "AgentsSession",
    "DEFAULT_COOKIE_NAME",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_SESSIONS",
    "EncodeError",
    "FileStore",
    "FlaskSessionInterface",
    "MessageLog",
    "QuartSessionInterface",
    "RecordTooLarge",
    "RedisStore",
    "SQLiteStore",
    "Session",
    "SessionError",
    "SessionMiddleware",
    "Store",
    "StoreError",
    "Sweep",
    "TaggedJSON",
    "get_session",
    "main",
    "merge_sessions",
    "trim_messages",
]

_logger = logging.getLogger("tinysession")


# -- Errors --


class SessionError(Exception):
    """Root of every error tinysession raises on its own account."""


class StoreError(SessionError):
    """The backing storage failed: file system, database or server.

    The message names the path (or address) and the cause; the original
    exception is chained as ``__cause__``. It is deliberately not an
    ``OSError``: WSGI servers take an ``OSError`` escaping an app for a
    broken client socket and close the connection without a response, where
    a storage failure must reach the client as an HTTP 500.
    """


class RecordTooLarge(SessionError, ValueError):
    """A serialized record is larger than the store's ``max_bytes``."""


class EncodeError(SessionError, TypeError):
    """The serializer cannot encode a record: a value of a type it does not know, or nesting too deep.

    The serializer's own error is chained as ``__cause__``; nothing was written.
    """


# -- Records --

DEFAULT_MAX_BYTES = 64 * 1024
"""Largest serialized record a store accepts unless told otherwise (64 KiB)."""

DEFAULT_MAX_SESSIONS = 10000
"""Records a store keeps unless told otherwise: with ``DEFAULT_MAX_BYTES``, at most about 640 MiB."""

_KEY_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
_SIGNATURE_BYTES = 32
_compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # thread-safe, as json's own
_raw_decode_json = json.JSONDecoder().raw_decode  # json.loads without its checks and whitespace scans


class _JSONSerializer:
    """Compact UTF-8 JSON: dicts, lists, strings, numbers, booleans and None."""

    def dumps(self, obj):
        return _compact_json(obj).encode("utf-8")

    def loads(self, data):
        text = data.decode("utf-8")
        value, end = _raw_decode_json(text)
        if end != len(text):
            raise ValueError(f"extra data after the JSON value at offset {end}")
        return value


class _PickleSerializer:
    """Pickle at the highest protocol; only ever used on signed records."""

    loads = staticmethod(pickle.loads)
    dumps = staticmethod(functools.partial(pickle.dumps, protocol=pickle.HIGHEST_PROTOCOL))


_TUPLE, _BYTES, _MARKUP, _UUID, _DATETIME, _ONE_KEY_DICT = " t", " b", " m", " u", " d", " di"
_TAGS = frozenset((_TUPLE, _BYTES, _MARKUP, _UUID, _DATETIME, _ONE_KEY_DICT))


class TaggedJSON:
    """Compact JSON that also round-trips what Flask apps keep in sessions; a serializer for any store.

    ``FileStore(path, serializer=TaggedJSON())`` (any store takes it). JSON
    values are stored as plain JSON; these become a one-key object whose key
    is a tag: ``tuple`` (``" t"``), ``bytes`` (``" b"``, base64),
    ``uuid.UUID`` (``" u"``), ``datetime.datetime`` (``" d"``, ISO 8601,
    aware or naive, microseconds kept), and anything with ``__html__``, such
    as ``markupsafe.Markup`` (``" m"``, read back as ``markupsafe.Markup`` when
    markupsafe is loaded, as it always is under Flask, else as a str with ``__html__``).
    A dict whose one key is a tag is stored as ``{" di": [key, value]}``, so
    it comes back as it was. Plain JSON records read the same as with the
    "json" serializer. ``dumps`` raises TypeError for other types. A value
    that needs no tag is written and read by ``json`` alone, at its C speed.
    """

    _PLAIN = frozenset((str, int, float, bool, type(None), list, dict))
    _TAGGED = re.compile("|".join(f'"{tag}"' for tag in _TAGS)).search  # also finds a tag inside a string: harmless

    def __init__(self):
        self._decode = json.JSONDecoder(object_hook=self._untag).decode
        self._untaggers = {_TUPLE: tuple, _BYTES: base64.b64decode, _UUID: uuid.UUID, _MARKUP: _markup,
                           _DATETIME: datetime.datetime.fromisoformat, _ONE_KEY_DICT: lambda pair: {pair[0]: pair[1]}}

    def dumps(self, obj):
        """Return ``obj`` as UTF-8 tagged JSON bytes."""
        # json alone does the work (in C) when nothing needs a tag: it would write a tuple as a list
        # and a subclass as its base, so _plain() looks at the types, a level at a time.
        try:
            text = _compact_json(obj)
        except (TypeError, ValueError, RecursionError):  # a bytes, a cycle...: the walk says which
            text = None
        if text is None or not self._plain(obj) or self._TAGGED(text):
            text = _compact_json(self._tag(obj))
        return text.encode("utf-8")

    def loads(self, data):
        """Return the value in UTF-8 tagged JSON ``data``; ValueError if it is not JSON."""
        text = data.decode("utf-8")
        return self._decode(text) if self._TAGGED(text) else json.loads(text)  # the hook only where a tag can be

    def _plain(self, obj):
        """Return True if ``obj`` holds only str, int, float, bool, None, list and dict, no subclass."""
        level = [obj]
        while level and set(map(type, level)) <= self._PLAIN:
            level = [item for value in level if type(value) is dict or type(value) is list
                     for item in (value.values() if type(value) is dict else value)]
        return not level

    def _tag(self, value):
        kind = type(value)
        if kind is str or kind is int or kind is float or kind is bool or value is None:
            return value
        if kind is list:
            return [self._tag(item) for item in value]
        if kind is dict:
            tagged = {key: self._tag(item) for key, item in value.items()}
            if len(tagged) == 1 and tagged.keys() <= _TAGS:  # it would read back as a tagged value
                return {_ONE_KEY_DICT: list(*tagged.items())}  # [key, value]
            return tagged
        if kind is tuple:
            return {_TUPLE: [self._tag(item) for item in value]}
        if hasattr(value, "__html__"):
            return {_MARKUP: str(value.__html__())}
        if isinstance(value, bytes):
            return {_BYTES: base64.b64encode(value).decode("ascii")}
        if isinstance(value, datetime.datetime):
            return {_DATETIME: value.isoformat()}
        if isinstance(value, uuid.UUID):
            return {_UUID: value.hex}
        for base in (int, float, str, list, tuple, dict):
            if isinstance(value, base):  # an IntEnum, a namedtuple, an OrderedDict: stored as their base
                return self._tag(str.__str__(value) if base is str else base(value))
        raise TypeError(f"cannot store a {kind.__name__!r} in a session: not JSON, and no tag for it")

    def _untag(self, obj):
        if len(obj) == 1 and obj.keys() <= self._untaggers.keys():
            ((tag, value),) = obj.items()
            return self._untaggers[tag](value)
        return obj


def _markup(text):
    """Return ``text`` read back as Markup: ``markupsafe.Markup`` where markupsafe is loaded, else an _HTML."""
    # Never imported here: Flask has loaded it already (through Jinja2) when it is in use.
    markupsafe = sys.modules.get("markupsafe")
    return _HTML(text) if markupsafe is None else markupsafe.Markup(text)


class _HTML(str):
    """Markup read back where markupsafe is not loaded: a str that says it is already HTML."""

    __slots__ = ()

    def __html__(self):
        return str(self)


def _now():
    """Return the current time as a POSIX timestamp: the module's one clock."""
    return time.time()


def _check_key(key):
    """Return ``key`` if it is a valid store key, else raise before any I/O."""
    if type(key) is not str:
        raise TypeError(f"session key must be a str, not {type(key).__name__}")
    if not _is_key(key):
        raise ValueError(f"invalid session key {key!r}: expected 1 to 128 of [A-Za-z0-9_-]")
    return key


def _is_key(text):
    """Return True if ``text`` (a str) is 1 to 128 of ``[A-Za-z0-9_-]``."""
    return 0 < len(text) <= 128 and not text.strip(_KEY_CHARACTERS)


def _check_int(value, name, minimum=0, wrong_type=TypeError, kinds=int):
    """Return ``value`` if it is an int (or one of ``kinds``, never a bool) of at least ``minimum``.

    Raise ``wrong_type`` for another type, ValueError below ``minimum`` (NaN too).
    """
    if isinstance(value, bool) or not isinstance(value, kinds):
        expected = "an int" if kinds is int else "a number"
        raise wrong_type(f"{name} must be {expected}, not {type(value).__name__}")
    if not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_count(value, name):
    """Return ``value`` if it is None or an int >= 0; ValueError otherwise, as for every option of a store."""
    return None if value is None else _check_int(value, name, 0, ValueError)


def _check_seconds(value, name):
    """Return ``value`` as a float if it is a number (int or float) >= 0, or None; ValueError otherwise."""
    return None if value is None else float(_check_int(value, name, 0, ValueError, (int, float)))


def _keys_of(secret):
    """Return the HMAC keys derived from ``secret`` (None, a str or bytes, or a list of them), oldest first."""
    if secret is None:
        return []
    secrets = list(secret) if isinstance(secret, (list, tuple)) else [secret]
    secrets = [each.encode("utf-8") if isinstance(each, str) else each for each in secrets]
    if not secrets or not all(isinstance(each, bytes) and each for each in secrets):
        kinds = ", ".join(type(each).__name__ for each in secrets)  # never a value: it is a secret
        raise ValueError(
            "secret must be a non-empty str or bytes, or a non-empty list of them, newest last;"
            f" got a {type(secret).__name__} of [{kinds}]"
        )
    return [hashlib.sha256(b"tinysession record\0" + each).digest() for each in secrets]


def _signature(signing_key, key, payload):
    """Return the HMAC-SHA256 of the key and the payload under ``signing_key``: records cannot move."""
    return hmac.digest(signing_key, key.encode("ascii") + b"\0" + payload, "sha256")


def _make_serializer(serializer, secret):
    """Return the serializer object that ``serializer`` names."""
    if serializer == "json":
        return _JSONSerializer()
    if serializer == "pickle":
        if secret is None:
            raise ValueError("serializer='pickle' requires a secret: unsigned pickles run code")
        return _PickleSerializer()
    if callable(getattr(serializer, "dumps", None)) and callable(getattr(serializer, "loads", None)):
        return serializer
    raise ValueError(f"serializer must be 'json', 'pickle' or an object with dumps() and loads(), not {serializer!r}")


# -- Cleaning --

_EVICT_BATCH = 256
_CLOSE_WAIT_SECONDS = 10.0
# A probationary mtime is a millisecond plus half of one; a returning one is a whole millisecond.
_PROBATION_SECONDS = 0.0005


class Sweep:
    """What one pass of ``Store.sweep`` saw and removed (or, in a dry run, would remove).

    ``seen`` and ``seen_bytes`` count every record met, expired ones included (``seen_bytes`` is None
    where a clean does not sum them); ``removed`` and ``removed_bytes`` those removed, always among the
    seen; ``oldest`` and ``newest`` are the extreme mtimes (None for an empty store); ``stats`` also
    fills ``logs`` and ``log_bytes``, the message logs kept.
    """

    # Defaults; a pass sets its own on the instance.
    seen = seen_bytes = removed = removed_bytes = 0
    logs = log_bytes = 0
    oldest = newest = None

    def __repr__(self):
        return f"<Sweep seen={self.seen} removed={self.removed}>"


def _stamp(now=None, *, new=False):
    """Return the mtime a write or touch at ``now`` stores: to the millisecond, plus half of one when ``new``.

    So every store keeps a session's segment (probationary or returning)
    in its mtime's sub-millisecond digits, with no field of its own.
    """
    now = _now() if now is None else now
    return round(now, 3) + (_PROBATION_SECONDS if new else 0.0)


def _on_probation(mtime):
    """Return True if ``mtime`` is a probationary one (lost on clocks coarser than a quarter millisecond)."""
    scaled = mtime * 1000.0
    return 0.25 <= scaled - int(scaled) <= 0.75


def _no_progress(sweep):
    """Report nothing: what ``sweep`` calls where no ``progress`` is given."""


def _log_totals(store):
    """Return ``(count, bytes)`` of the store's message logs; ``(0, 0)`` for a store that keeps none."""
    with contextlib.suppress(NotImplementedError):
        sizes = [size for _, size in store.log_scan()]
        return len(sizes), sum(sizes)
    return 0, 0


class _Cleaning:
    """The cleaning every store inherits through ``Store``: ``clean``, ``stats``, ``sweep``, the background clean.

    It is written over the store protocol of the next section: the hooks
    ``scan``, ``read`` and ``remove`` (and ``log_scan``, ``log_remove``), and
    what ``Store`` keeps (``max_age``, ``max_sessions``, ``_checked()``, ``_current()``, the
    background clean's lock and state); a session's segment is read from its
    mtime (``_on_probation``, above). A store may override ``sweep`` whole
    (SQLiteStore, RedisStore), or only ``_sweep_scan`` and ``_evict`` (FileStore).
    """

    def clean(self, max_age=None, keep=None, *, now=None):
        """Remove expired records, then all but ``keep`` of the others; return how many.

        Past ``keep`` go sessions on probation first, then returning ones,
        oldest first in each (the README's "Which sessions a full store
        evicts"). ``max_age`` and ``keep`` default to the store's ``max_age``
        and ``max_sessions``; with neither, only debris goes. A record written
        or touched after the pass began is never removed, nor counted in ``keep``.
        """
        return self.sweep(max_age, keep, now=now).removed

    def stats(self, max_age=None, *, now=None):
        """Return a dry-run ``Sweep``: the records, their bytes and times, and how many are past ``max_age``."""
        sweep = self.sweep(max_age, now=now, dry_run=True)
        sweep.logs, sweep.log_bytes = _log_totals(self)
        return sweep

    def sweep(self, max_age=None, keep=None, *, now=None, dry_run=False, progress=None):
        """Run one cleaning pass, as ``clean`` describes, and return its ``Sweep``.

        With ``dry_run`` nothing is removed. ``progress``, if given, is called
        with the live ``Sweep`` at the start and every 10,000 records, so an
        interrupted caller (Ctrl-C) can report what was done. One pass over
        ``scan()``, in memory bounded by ``keep`` (a heap of the records kept
        so far). A closed store stops the pass at its next batch (StoreError).
        """
        floor, keep, started, now = self._sweep_limits(max_age, keep, now)
        self._checked()
        sweep = Sweep()
        kept = []  # min-heap of (returning, mtime, key, size): the `keep` to keep so far
        doomed = []
        progress = progress or _no_progress
        progress(sweep)
        # The counts live in locals, and reach the Sweep every 10,000 records and when the pass ends or is
        # interrupted: this loop runs once per file.
        seen = seen_bytes = 0
        oldest, newest = float("inf"), float("-inf")
        try:
            for key, mtime, size in self._sweep_scan(now, dry_run):
                seen += 1
                seen_bytes += size
                oldest, newest = min(oldest, mtime), max(newest, mtime)
                if not seen % 10000:
                    self._checked()
                    sweep.seen, sweep.seen_bytes, sweep.oldest, sweep.newest = seen, seen_bytes, oldest, newest
                    progress(sweep)
                if mtime < floor:
                    doomed.append((key, mtime, size))
                elif keep is not None and mtime <= started:
                    entry = (not _on_probation(mtime), mtime, key, size)
                    if len(kept) < keep:
                        heapq.heappush(kept, entry)
                    else:
                        _, mtime, key, size = heapq.heappushpop(kept, entry)
                        doomed.append((key, mtime, size))
                if len(doomed) >= _EVICT_BATCH:
                    self._evict_counted(doomed, sweep, dry_run)
        finally:
            sweep.seen, sweep.seen_bytes = seen, seen_bytes
            if seen:
                sweep.oldest, sweep.newest = oldest, newest
        self._evict_counted(doomed, sweep, dry_run)
        return sweep

    def _sweep_limits(self, max_age, keep, now):
        """Return ``(floor, keep, started, now)`` for a sweep, the store's options filling in the defaults.

        A record with an mtime below ``floor`` (-inf without a ``max_age``) is
        expired; one above ``started``, written after the pass began, is never
        removed. ``started`` is what ``_stamp()`` makes of the present: rounded
        up, perhaps on probation.
        """
        max_age = self.max_age if max_age is None else _check_seconds(max_age, "max_age")
        keep = self.max_sessions if keep is None else _check_count(keep, "keep")
        now = _now() if now is None else now
        return (float("-inf") if max_age is None else now - max_age), keep, _now() + 0.001, now

    def _sweep_scan(self, now, dry_run):
        """Return what a sweep iterates: ``scan()``, which a store may extend (FileStore removes debris)."""
        return self.scan()

    def _evict_counted(self, doomed, sweep, dry_run):
        """Remove the doomed ``(key, mtime, size)`` entries, count them into ``sweep``, empty the list."""
        sizes = [size for _, _, size in doomed] if dry_run else self._evict(doomed)
        sweep.removed += len(sizes)
        sweep.removed_bytes += sum(sizes)
        doomed.clear()

    def _evict(self, doomed):
        """Remove each entry whose record still has the mtime the scan saw, and its log; return their sizes."""
        sizes = []
        for key, mtime, size in doomed:
            data, current = self._current(key)  # (None, None) if removed by someone else meanwhile
            if current == mtime and self.remove(key, expected=data):
                sizes.append(size)
                _forget_log(self, key)
        return sizes

    def _clean_in_background(self):
        """Start ``clean()`` in a daemon thread unless this store object's runs; return the thread or None.

        A clean asked for while one runs makes the running one sweep again.
        """
        with self._lock:
            self._clean_again = True
            if self._closed or self._cleaner is not None:
                return None
            thread = threading.Thread(target=self._clean_until_done, name="tinysession-clean", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # at interpreter shutdown
                _logger.exception("could not start a background clean of %s", repr(self))
                return None
            self._cleaner = thread
            return thread

    def _clean_until_done(self):
        """Sweep until no clean is asked for, logging each pass (INFO) or its failure; the cleaner's thread."""
        while True:
            with self._lock:
                if not self._clean_again or self._closed:
                    self._cleaner = None
                    return
                self._clean_again = False
            started = time.perf_counter()
            try:
                sweep = self.sweep()
            except Exception:
                if self._closed:
                    _logger.debug("cleaning %s stopped: the store was closed", repr(self))
                else:
                    _logger.exception("cleaning %s failed", repr(self))  # a lone Mapping argument: bool()-ed
                continue
            _logger.info(
                "cleaned %r in %.2f s: met %d sessions, removed %d of them, kept %d",
                self, time.perf_counter() - started, sweep.seen, sweep.removed, sweep.seen - sweep.removed,
            )


# -- The store protocol --

_MISSING = object()
_RETRIES = 16
# [forks of this process], counted without a system call: a store made before a fork must not use its
# handles in the child.
_FORKS = [0]
os.register_at_fork(after_in_child=lambda: _FORKS.__setitem__(0, _FORKS[0] + 1))


def _refused_once_closed(hook):
    """Return ``hook`` wrapped to raise StoreError, before any I/O, once its store is closed (see ``Store._checked``)."""
    @functools.wraps(hook)
    def checked(self, *args, **options):
        self._checked()
        return hook(self, *args, **options)
    return checked


class Store(_Cleaning, MutableMapping):
    """A mapping from keys to session records, over five bytes-level hooks (see the README, "Writing a store").

    A backend implements ``read``, ``write``, ``remove``, ``set_mtime`` and
    ``scan``, and may override ``sweep``, ``__len__`` and ``close``. Key
    checks, serialization, signatures, ``max_bytes``, expiry, the
    ``max_sessions`` bound, cleaning (from ``_Cleaning``, above) and the
    mapping interface live here once; ``pop``, ``popitem``, ``clear`` and ``del`` are built on conditional
    removals. The keyword options (``serializer``, ``secret``, ``max_age``,
    ``max_sessions``, ``max_bytes``) are the README's table. A hook sees the
    stored bytes: the serialized record, preceded by its signature when there
    is a secret.

    Threads: one store object may be shared by all the threads of a process.
    ``close()`` is safe at any moment: operations already running finish,
    later ones raise StoreError, and a background clean stops at its next
    batch and is waited for (ten seconds at most).
    """

    def __init__(
        self, *, serializer="json", secret=None, max_age=None, max_sessions=DEFAULT_MAX_SESSIONS, max_bytes=DEFAULT_MAX_BYTES
    ):
        self._signing_keys = _keys_of(secret)
        self.serializer = _make_serializer(serializer, secret)
        self.max_age = _check_seconds(max_age, "max_age")
        self.max_sessions = _check_count(max_sessions, "max_sessions")
        self.max_bytes = _check_count(max_bytes, "max_bytes")
        self._closed = False
        self._forks = _FORKS[0]
        self._forked()
        self._writes = itertools.count(1)  # its next() is atomic: no lock per write
        self._clean_every = None if self.max_age is None else 1000
        if self.max_sessions is not None:
            self._clean_every = max(10, self.max_sessions // 10)

    def __init_subclass__(cls, **options):
        """Make each hook a subclass defines refuse to run once the store is closed: the one check, for every store."""
        super().__init_subclass__(**options)
        for name in ("read", "write", "remove", "set_mtime", "scan", "log_append", "log_read", "log_length",
                     "log_trim", "log_remove", "log_scan", "log_move"):
            if name in vars(cls):
                setattr(cls, name, _refused_once_closed(vars(cls)[name]))

    # The five hooks a backend implements.

    @abc.abstractmethod
    def read(self, key):
        """Return ``(data, mtime)``, the bytes stored for ``key`` and their mtime; KeyError if absent.

        Expired records may be returned: the base class checks the mtime.
        """

    @abc.abstractmethod
    def write(self, key, data, mtime, expected=None):
        """Store ``data`` (bytes) for ``key`` with modification time ``mtime``; return True.

        With ``expected`` (bytes), write only if the bytes stored now are
        exactly these, atomically against every thread and process, and
        return False, changing nothing, otherwise (also when absent). A
        reader sees the old bytes or the new ones, never a mix.
        """

    @abc.abstractmethod
    def remove(self, key, expected=None):
        """Remove the record for ``key``; return True if it removed one (``expected`` as for ``write``)."""

    @abc.abstractmethod
    def set_mtime(self, key, mtime):
        """Set the record's mtime without rewriting its data; return False if there is none."""

    @abc.abstractmethod
    def scan(self):
        """Return an iterable of ``(key, mtime, size)`` for every record, expired ones included; skip what vanishes."""

    # Records.

    def encode(self, key, record):
        """Return the bytes ``write`` stores for ``record``: serialized, size-checked, signed.

        Raises EncodeError if the serializer cannot encode it, RecordTooLarge
        past ``max_bytes``, StoreError if the store is closed.
        """
        self._checked(key)
        try:
            payload = self.serializer.dumps(record)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            cause = exc
            if isinstance(exc, RecursionError):
                cause = f"nested too deep (past sys.getrecursionlimit() = {sys.getrecursionlimit()})"
            raise EncodeError(f"cannot encode the session record for key {key!r}: {cause}") from exc
        if self.max_bytes is not None and len(payload) > self.max_bytes:
            raise RecordTooLarge(
                f"session record for key {key!r} is {len(payload)} bytes, over max_bytes={self.max_bytes}"
            )
        if not self._signing_keys:
            return payload
        return _signature(self._signing_keys[-1], key, payload) + payload

    def load(self, key, *, now=None):
        """Return ``(record, data, mtime)``: the record, its stored bytes and its mtime.

        Raise KeyError if the record is missing, expired, over the size limit,
        badly signed or not deserializable (the last three are logged).
        """
        data, mtime = self.read(self._checked(key))
        if self._expired(mtime, now):
            raise KeyError(key)
        return self.decode(key, data), data, mtime

    def save(self, key, data, *, expected=None, now=None, new=False):
        """Write bytes made by ``encode`` with mtime ``_stamp(now, new=new)``; return False if ``expected`` did not match.

        ``new`` marks a first write, which stays on probation until touched or
        written again. Every ``max(10, max_sessions // 10)`` writes of this
        store object (every 1,000 with ``max_age`` alone) a clean starts in a
        background thread, one at a time; its errors are logged.
        """
        if not self.write(self._checked(key), data, _stamp(now, new=new), expected):
            return False
        if self._clean_every is not None and next(self._writes) % self._clean_every == 0:
            self._clean_in_background()
        return True

    def _expired(self, mtime, now):
        return self.max_age is not None and mtime < (_now() if now is None else now) - self.max_age

    def _current(self, key):
        """Return ``(data, mtime)``, what ``read`` returns for ``key``, or ``(None, None)`` if it raises KeyError."""
        try:
            return self.read(key)
        except KeyError:
            return None, None

    def _live_mtime(self, key, now):
        """Return the mtime of the record for ``key`` if it is there and live at ``now``, else None."""
        _, mtime = self._current(key)
        return None if mtime is None or self._expired(mtime, now) else mtime

    def _read_limit(self):
        """Return the largest stored record size worth reading: ``sys.maxsize`` without a ``max_bytes``."""
        if self.max_bytes is None:
            return sys.maxsize
        return self.max_bytes + (_SIGNATURE_BYTES if self._signing_keys else 0)

    def decode(self, key, data):
        """Return the record in the stored bytes ``data`` of ``key``, as ``encode`` made them.

        Raise KeyError (logged) if they are oversized, badly signed or corrupt;
        the log line says when the secret probably changed.
        """
        try:
            if len(data) > self._read_limit():
                raise ValueError(f"{len(data)} bytes, over the size limit")
            if not self._signing_keys:
                return self.serializer.loads(data)
            signature, payload = data[:_SIGNATURE_BYTES], data[_SIGNATURE_BYTES:]
            expected = (_signature(signing_key, key, payload) for signing_key in reversed(self._signing_keys))
            if not any(hmac.compare_digest(signature, each) for each in expected):
                raise ValueError("bad signature: the secret probably changed (or the record was altered)")
            return self.serializer.loads(payload)
        except Exception as exc:  # noqa: BLE001 - any serializer, any damage: the record is unreadable
            cause = f"{type(exc).__name__}: {exc}"
            if not self._signing_keys and len(data) > _SIGNATURE_BYTES:
                # A record signed by a secret decodes once a signature's length is cut off.
                with contextlib.suppress(Exception):
                    self.serializer.loads(data[_SIGNATURE_BYTES:])
                    cause = "it is signed and this store has no secret: the secret probably changed"
            _logger.warning("unreadable session record %s: %s", self._where(key), cause)
            raise KeyError(key) from None

    def _where(self, key):
        """Return where the record for ``key`` lives, for log messages."""
        return f"{self!r} key {key!r}"

    def _checked(self, key=_MISSING):
        """Return ``key`` if the store is open and ``key`` is valid (or not given); raise before any I/O otherwise."""
        self._own()
        if self._closed:
            raise StoreError(f"{self!r} is closed")
        return key if key is _MISSING else _check_key(key)

    def _own(self):
        """In a forked child, drop the parent's clean, locks and handles (``_forked``) before any is used."""
        if self._forks != _FORKS[0]:
            self._forks = _FORKS[0]
            self._forked()

    def _forked(self):
        """Start afresh in a new process: no background clean, new locks; a store also drops its handles here."""
        self._lock = threading.Lock()  # guards the background clean's state and _closed's change
        self._cleaner = None
        self._clean_again = False

    def _take(self, key):
        """Remove the record for ``key`` atomically; return its bytes if it was live, else None."""
        for _ in range(_RETRIES):
            data, mtime = self._current(key)
            if data is None:
                return None
            if self.remove(key, expected=data):
                _forget_log(self, key)
                return None if self._expired(mtime, None) else data
        _forget_log(self, key)
        return data if self.remove(key) else None  # rewritten under us every time: remove what is there

    # The mapping interface.

    def __getitem__(self, key):
        return self.load(key)[0]

    def __setitem__(self, key, record):
        self.save(key, self.encode(key, record))

    def __delitem__(self, key):
        if self._take(self._checked(key)) is None:
            raise KeyError(key)

    def __contains__(self, key):
        return self._live_mtime(self._checked(key), None) is not None

    def __iter__(self):
        now = _now()
        return (key for key, mtime, _ in self.scan() if not self._expired(mtime, now))

    def __len__(self):
        return sum(1 for _ in self)

    def pop(self, key, default=_MISSING):
        """Remove the record for ``key`` and return it, atomically; ``default`` (or KeyError) if absent."""
        data = self._take(self._checked(key))
        if data is not None:
            with contextlib.suppress(KeyError):  # unreadable (logged): as if absent
                return self.decode(key, data)
        if default is _MISSING:
            raise KeyError(key)
        return default

    def popitem(self):
        """Remove and return some ``(key, record)``; KeyError if the store is empty."""
        for key in self:
            with contextlib.suppress(KeyError):  # removed (or unreadable) meanwhile: the next one
                return key, self.pop(key)
        raise KeyError("popitem(): the store is empty")

    def clear(self):
        """Remove every record."""
        for key in list(self):
            self.pop(key, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        """Refuse every later operation and wait (ten seconds at most) for this store object's background clean.

        Safe to call twice, and from inside the clean. A store holding
        resources releases them in its own ``close``, after this one.
        """
        self._own()
        with self._lock:
            self._closed = True
            cleaner = self._cleaner
        if cleaner is not None and cleaner is not threading.current_thread():
            cleaner.join(_CLOSE_WAIT_SECONDS)
            if cleaner.is_alive():
                _logger.warning("closed %s while its background clean still runs", repr(self))

    # Maintenance.

    def touch(self, key, *, now=None):
        """Set the record's mtime to ``_stamp(now)`` without rewriting it: it is then a returning session.

        Return True if the record exists and is live, False if it is missing
        or expired (an expired record is not brought back).
        """
        key = self._checked(key)
        if self.max_age is not None and self._live_mtime(key, now) is None:
            return False
        return self.set_mtime(key, _stamp(now))

    # The message log: optional hooks, for MessageLog. A store without them raises NotImplementedError.

    def log_append(self, key, lines):
        """Append ``lines`` (bytes without newlines) to the log of ``key``, atomically; return the lines now stored.

        No append is ever lost, and the lines of one call stay together.
        """
        raise NotImplementedError(f"{type(self).__name__} has no message log: it does not implement log_append")

    def log_read(self, key, start=0, stop=None):
        """Return ``lines[start:stop]`` of the log of ``key``, oldest first; ``[]`` if there is none.

        A negative ``start`` counts from the end: ``log_read(key, -n)`` costs the last n lines only.
        """
        raise NotImplementedError(f"{type(self).__name__} has no message log: it does not implement log_read")

    def log_length(self, key):
        """Return how many lines the log of ``key`` holds; stores override this default to make it O(1)."""
        return len(self.log_read(key))

    def log_trim(self, key, start, stop, expected):
        """Remove ``lines[start:stop]`` of the log if it holds exactly ``expected`` lines now, atomically; True if it did."""
        raise NotImplementedError(f"{type(self).__name__} has no message log: it does not implement log_trim")

    def log_remove(self, key):
        """Remove the log of ``key``; return True if there was one."""
        raise NotImplementedError(f"{type(self).__name__} has no message log: it does not implement log_remove")

    def log_scan(self):
        """Return an iterable of ``(key, size)``, the bytes of every log (about, for Redis)."""
        raise NotImplementedError(f"{type(self).__name__} has no message log: it does not implement log_scan")

    def log_move(self, old, new):
        """Move the log of ``old`` to ``new``, replacing any there; True if there was one. This default is not atomic."""
        lines = self.log_read(old)
        if lines:
            self.log_remove(new)
            self.log_append(new, lines)
        return bool(lines) and self.log_remove(old)


def _forget_log(store, key):
    """Remove the log of ``key`` from ``store``, if it keeps logs; return True if there was one."""
    with contextlib.suppress(NotImplementedError):  # a store without message logs
        return store.log_remove(key)
    return False


# -- FileStore --

_FILE_PREFIX = "ts-"
_TEMP_PREFIX = ".ts-"
_TEMP_SUFFIX = ".tmp"
_TEMP_MAX_AGE = 120.0
# POSIX flags, all defined wherever fcntl (imported above) is.
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_LOG_SUFFIX = ".log"
_LOG_APPEND_FLAGS = _READ_FLAGS | os.O_RDWR | os.O_APPEND | os.O_CREAT  # O_RDONLY is 0


@contextlib.contextmanager
def _os_errors(action, path, errors=OSError):
    """Raise ``errors`` (OSError) of the block as StoreError("cannot <action> <path>: <reason>"), chained."""
    try:
        yield
    except errors as exc:
        raise StoreError(f"cannot {action} {path!r}: {getattr(exc, 'strerror', None) or exc}") from exc


def _write_all(fd, data):
    """Write all of ``data`` to ``fd``, however many calls it takes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FileStore(Store):
    """Store each record in its own file ``ts-<key>`` (0600) in one directory (0700), POSIX only.

    The README's "FileStore" section has the details: atomic writes through a
    temporary file renamed over the record, the two-minute debris rule, the
    refusal of a directory others may write to, no symbolic links followed.

    Threads and processes: any number of both may share one directory. Every
    change happens under one exclusive ``flock`` of the directory itself, held
    only to compare and rename, never while a record is written out; reads
    take no lock. ``close()`` closes the directory handle once no thread holds
    the lock. Records are not fsynced.
    """

    def __init__(self, directory, **options):
        super().__init__(**options)
        self.directory = os.fspath(directory)
        self._log_counts = {}  # (key, inode, size, mtime) of a log ending in a newline -> its lines
        # Create the directory 0700, or check that the existing one is writable by its owner alone.
        with _os_errors("create session directory", self.directory), contextlib.suppress(FileExistsError):
            os.makedirs(self.directory, 0o700)
            os.chmod(self.directory, 0o700)  # whatever the umask took away or left
        with _os_errors("use session directory", self.directory):
            mode = os.stat(os.path.join(self.directory, "")).st_mode  # the trailing "/": ENOTDIR for a file
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            advice = "make it writable by its owner alone (chmod go-w)"
            if mode & (stat.S_ISVTX | stat.S_IWOTH):  # /tmp and its kind: never to be chmod-ed
                private = os.path.join(self.directory, "sessions")
                advice = f"use a private subdirectory, such as {private!r}, which FileStore creates 0700"
            raise StoreError(
                f"session directory {self.directory!r} is writable by group or others"
                f" (mode {stat.S_IMODE(mode):04o}): whoever can write there can plant or remove sessions; {advice}"
            )

    def __repr__(self):
        return f"FileStore({self.directory!r})"

    def close(self):
        """Refuse later operations (see ``Store.close``), then close the directory handle of the lock."""
        super().close()
        with self._thread_lock:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            self._lock_fd = None

    def _forked(self):
        super()._forked()
        self._thread_lock, self._lock_fd = threading.Lock(), None  # the parent's handle is shared: never used

    def _path(self, key):
        return os.path.join(self.directory, _FILE_PREFIX + key)

    _where = _path  # a record lives at its path

    @contextlib.contextmanager
    def _locked(self):
        """Hold the directory's lock against every other thread and process; StoreError once closed."""
        with self._thread_lock:  # a forked child's own: every caller ran _checked() first
            self._checked()
            with _os_errors("lock session directory", self.directory):
                if self._lock_fd is None:
                    self._lock_fd = os.open(self.directory, _DIRECTORY_FLAGS)
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _temporary(self, data, mtime=None):
        """Yield the path of a new temporary file holding ``data`` (and ``mtime``), to rename; removed on error."""
        temp_path = os.path.join(self.directory, _TEMP_PREFIX + os.urandom(8).hex() + _TEMP_SUFFIX)
        try:
            fd = os.open(temp_path, _CREATE_FLAGS, 0o600)
            try:
                _write_all(fd, data)
                if mtime is not None:
                    os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
            yield temp_path
        except BaseException:
            with contextlib.suppress(OSError):  # never created, already renamed, or the directory is gone
                os.unlink(temp_path)
            raise

    def read(self, key):
        path = self._path(key)
        try:
            fd = os.open(path, _READ_FLAGS)
            try:
                status = os.fstat(fd)
                if not stat.S_ISREG(status.st_mode):
                    _logger.warning("session file %s is not a regular file: ignored", path)
                    raise KeyError(key)
                if status.st_size > self._read_limit():
                    _logger.warning("session file %s is %d bytes, over the limit: ignored", path, status.st_size)
                    raise KeyError(key)
                return os.read(fd, status.st_size), status.st_mtime
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise StoreError(f"cannot read session file {path!r}: {exc.strerror}") from exc
            _logger.warning("session file %s is a symbolic link: ignored", path)
            raise KeyError(key) from None

    def write(self, key, data, mtime, expected=None):
        path = self._path(key)
        with _os_errors("write session file", path), self._temporary(data, mtime) as temp_path, self._locked():
            if expected is not None and self._current(key)[0] != expected:
                os.unlink(temp_path)
                return False
            os.replace(temp_path, path)
        return True

    def remove(self, key, expected=None):
        path = self._path(key)
        with self._locked(), _os_errors("remove session file", path), contextlib.suppress(FileNotFoundError):
            if expected is None or self._current(key)[0] == expected:
                os.unlink(path)
                return True
        return False

    def set_mtime(self, key, mtime):
        path = self._path(key)
        with _os_errors("touch session file", path), contextlib.suppress(FileNotFoundError):
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.utime(path, (mtime, mtime), follow_symlinks=False)
                return True
        return False

    def scan(self):
        return self._sweep_scan(None, True)

    def _sweep_scan(self, now, dry_run):
        """Yield ``(key, mtime, size)`` of every record file; unless ``dry_run``, remove old debris."""
        with _os_errors("open session directory", self.directory):
            directory_fd = os.open(self.directory, _DIRECTORY_FLAGS)
        is_regular = stat.S_ISREG
        try:
            with _os_errors("list session directory", self.directory), os.scandir(directory_fd) as entries:
                for entry in entries:
                    name = entry.name
                    key = name[3:]  # after _FILE_PREFIX; _is_key, inlined: this loop runs once per file
                    if name[:3] == _FILE_PREFIX and 0 < len(key) <= 128 and not key.strip(_KEY_CHARACTERS):
                        try:
                            status = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if is_regular(status.st_mode):
                            yield key, status.st_mtime, status.st_size
                    elif not dry_run and name.startswith(_TEMP_PREFIX) and name.endswith(_TEMP_SUFFIX):
                        # A killed writer's, once nothing changed it for two minutes: its ctime, not its mtime,
                        # which a writer sets as it likes before it renames. Another cleaner may be first.
                        with contextlib.suppress(FileNotFoundError):
                            status = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
                            if stat.S_ISREG(status.st_mode) and status.st_ctime < now - _TEMP_MAX_AGE:
                                os.unlink(name, dir_fd=directory_fd)
        finally:
            os.close(directory_fd)

    def _evict(self, doomed):
        """Remove, under one lock, each record file (and its log) that has the mtime the scan saw."""
        sizes = []
        with self._locked():
            for key, mtime, size in doomed:
                path = self._path(key)
                # FileNotFoundError: removed by another cleaner (not counted), or a record without a log.
                with _os_errors("remove session file", path), contextlib.suppress(FileNotFoundError):
                    if os.lstat(path).st_mtime == mtime:  # else written or touched since the scan saw it
                        os.unlink(path)
                        sizes.append(size)
                        os.unlink(path + _LOG_SUFFIX)  # the message log goes with its record
        return sizes

    # The message log: the file ts-<key>.log beside the record, one JSON line per message.

    def _log_path(self, key):
        return self._path(_check_key(key)) + _LOG_SUFFIX

    @contextlib.contextmanager
    def _log_file(self, path, action, flags=_READ_FLAGS):
        """Yield the log file at ``path`` open, or None if there is none; wrap OSError in StoreError.

        A log that is not a regular file (a symbolic link, a FIFO) is ignored
        and logged, as a corrupt record is; an append (``O_CREAT``) replaces it.
        """
        with _os_errors(f"{action} message log", path):
            try:
                regular = stat.S_ISREG(os.lstat(path).st_mode)
            except FileNotFoundError:
                regular = None
            if regular is False:
                _logger.warning("message log %r is not a regular file: ignored, as a corrupt record is", path)
                if flags & os.O_CREAT:
                    os.unlink(path)
            fd = os.open(path, flags, 0o600) if regular or flags & os.O_CREAT else None
            try:
                yield fd
            finally:
                if fd is not None:
                    os.close(fd)

    def _log_count(self, key, fd, lines=None, repair=False):
        """Return the whole lines of the open log of ``key``, counted or remembered by its state; remember ``lines``.

        A log with a torn last line (a crash) is never remembered, so that
        the next append, which passes ``repair``, counts it and cuts that line off.
        """
        status = os.fstat(fd)
        state = (key, status.st_ino, status.st_size, status.st_mtime_ns)
        lines = self._log_counts.get(state) if lines is None else lines
        if lines is None:
            data = os.pread(fd, status.st_size, 0)
            end = data.rfind(b"\n") + 1
            lines = data.count(b"\n", 0, end)
            if end != len(data):
                if repair:
                    _logger.warning("message log of key %r: dropped a torn last line of %d bytes", key, len(data) - end)
                    os.ftruncate(fd, end)
                return lines
        if len(self._log_counts) > 4096:
            self._log_counts.clear()
        self._log_counts[state] = lines
        return lines

    def log_append(self, key, lines):
        """Append under the directory lock with ``O_APPEND``; a torn last line (a crash) is cut off first."""
        data = b"".join(bytes(line) + b"\n" for line in lines)
        with self._locked(), self._log_file(self._log_path(key), "append to", _LOG_APPEND_FLAGS) as fd:
            count = self._log_count(key, fd, repair=True)
            _write_all(fd, data)
            return self._log_count(key, fd, count + len(lines))

    def log_read(self, key, start=0, stop=None):
        """Read back from the end of the file for a negative ``start``, from its head up to ``stop``, else all of it."""
        with self._log_file(self._log_path(key), "read") as fd:
            if fd is None:
                return []
            size, data, offset = os.fstat(fd).st_size, b"", 0
            if start < 0 and (stop is None or stop < 0):
                offset = size  # back in doubling chunks until -start whole lines are in
                while offset and data.count(b"\n") <= -start:
                    step = min(offset, max(2 * len(data), 4096))
                    offset -= step
                    data = os.pread(fd, step, offset) + data
            elif start >= 0 and stop is not None and stop >= 0:  # the first `stop` lines, and no more
                with open(fd, "rb", closefd=False) as file:
                    data = b"".join(file.readline() for _ in range(stop))
            else:
                data = os.pread(fd, size, 0)
        # A line cut by the chunk's start is dropped, and a last line without its newline is torn: ignored.
        return data.split(b"\n")[bool(offset) : -1][start:stop]

    def log_length(self, key):
        with self._log_file(self._log_path(key), "read") as fd:
            return 0 if fd is None else self._log_count(key, fd)

    def log_trim(self, key, start, stop, expected):
        """Rewrite the log without ``lines[start:stop]``: a temporary file renamed over it, under the lock."""
        path = self._log_path(key)
        with self._locked(), _os_errors("trim message log", path):
            lines = self.log_read(key)
            if len(lines) != expected:
                return False
            with self._temporary(b"".join(line + b"\n" for line in lines[:start] + lines[stop:])) as temp_path:
                os.replace(temp_path, path)
            return True

    def log_remove(self, key):
        return self._log_rename("remove", self._log_path(key), os.unlink)

    def log_move(self, old, new):
        return self._log_rename("move", self._log_path(old), os.replace, self._log_path(new))

    def _log_rename(self, action, path, rename, *args):
        """Call ``rename(path, *args)`` under the lock; return False if there was no log."""
        with self._locked(), _os_errors(f"{action} message log", path), contextlib.suppress(FileNotFoundError):
            rename(path, *args)
            return True
        return False

    def log_scan(self):
        with _os_errors("list session directory", self.directory):
            names = os.listdir(self.directory)
        for name in names:
            key = name[len(_FILE_PREFIX) : -len(_LOG_SUFFIX)]
            if name.startswith(_FILE_PREFIX) and name.endswith(_LOG_SUFFIX) and _is_key(key):
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                    yield key, os.lstat(os.path.join(self.directory, name)).st_size


# -- SQLiteStore --

_TABLE_PATTERN = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
_SQLITE_BUSY_SECONDS = 5.0
_SQLITE_IDLE_CONNECTIONS = 8
_SQLITE_EVICT_BATCH = 250
# 1 for a returning session, 0 for one on probation: _on_probation in SQL (see _stamp).
_SQL_RETURNING = "(mtime * 1000 - CAST(mtime * 1000 AS INTEGER) NOT BETWEEN 0.25 AND 0.75)"
_SQL_SCHEMA = (
    "PRAGMA journal_mode=WAL;"
    'CREATE TABLE IF NOT EXISTS "{table}" (key TEXT PRIMARY KEY, data BLOB NOT NULL, mtime REAL NOT NULL);'
    'CREATE INDEX IF NOT EXISTS "{table}_mtime" ON "{table}" (mtime);'
    'CREATE INDEX IF NOT EXISTS "{table}_segment" ON "{table}" (' + _SQL_RETURNING + ", mtime);"
    # The message log: its own table; triggers remove a session's log with its record and keep each
    # log's length (counted from the lines once, when the length table is new), whatever changes the
    # lines, an older version too.
    'CREATE TABLE IF NOT EXISTS "{table}_log" '
    "(seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, line BLOB NOT NULL);"
    'CREATE INDEX IF NOT EXISTS "{table}_log_key" ON "{table}_log" (key, seq);'
    'CREATE TRIGGER IF NOT EXISTS "{table}_log_gone" AFTER DELETE ON "{table}" '
    'BEGIN DELETE FROM "{table}_log" WHERE key = old.key; END;'
    'CREATE TABLE IF NOT EXISTS "{table}_log_length" (key TEXT PRIMARY KEY, lines INTEGER NOT NULL);'
    'INSERT OR IGNORE INTO "{table}_log_length" SELECT key, COUNT(*) FROM "{table}_log" '
    'WHERE NOT EXISTS (SELECT 1 FROM "{table}_log_length") GROUP BY key;'
    'CREATE TRIGGER IF NOT EXISTS "{table}_log_added" AFTER INSERT ON "{table}_log" BEGIN '
    'INSERT INTO "{table}_log_length" VALUES (new.key, 1) ON CONFLICT (key) DO UPDATE SET lines = lines + 1; END;'
    'CREATE TRIGGER IF NOT EXISTS "{table}_log_removed" AFTER DELETE ON "{table}_log" BEGIN '
    'UPDATE "{table}_log_length" SET lines = lines - 1 WHERE key = old.key; '
    'DELETE FROM "{table}_log_length" WHERE key = old.key AND lines <= 0; END;'
    'CREATE TRIGGER IF NOT EXISTS "{table}_log_moved" AFTER UPDATE OF key ON "{table}_log" BEGIN '
    'UPDATE "{table}_log_length" SET lines = lines - 1 WHERE key = old.key; '
    'DELETE FROM "{table}_log_length" WHERE key = old.key AND lines <= 0; '
    'INSERT INTO "{table}_log_length" VALUES (new.key, 1) ON CONFLICT (key) DO UPDATE SET lines = lines + 1; END;'
)
_SQL_READ = 'SELECT CASE WHEN LENGTH(data) <= ? THEN data END, mtime FROM "{table}" WHERE key = ?'
_SQL_PUT = (
    'INSERT INTO "{table}" (key, data, mtime) VALUES (?, ?, ?) '
    "ON CONFLICT (key) DO UPDATE SET data = excluded.data, mtime = excluded.mtime"
)
_SQL_REPLACE = 'UPDATE "{table}" SET data = ?, mtime = ? WHERE key = ? AND data = ?'
_SQL_SET_MTIME = 'UPDATE "{table}" SET mtime = ? WHERE key = ?'
_SQL_DELETE = 'DELETE FROM "{table}" WHERE key = ? AND (? IS NULL OR data = ?)'
_SQL_DELETE_SEEN = 'DELETE FROM "{table}" WHERE key = ? AND mtime = ?'
_SQL_SCAN = 'SELECT key, mtime, LENGTH(data) FROM "{table}"'
_SQL_COUNT = 'SELECT COUNT(*) FROM "{table}" WHERE mtime >= ?'
# A clean's tally, all from the indexes; a dry run's (stats) sums the bytes too, which reads every row.
_SQL_TALLY = (
    'SELECT (SELECT COUNT(*) FROM "{table}"), NULL, (SELECT MIN(mtime) FROM "{table}"),'
    ' (SELECT MAX(mtime) FROM "{table}"), (SELECT MAX(rowid) FROM "{table}")'
)
_SQL_SUMMARY = 'SELECT COUNT(*), TOTAL(LENGTH(data)), MIN(mtime), MAX(mtime), MAX(rowid) FROM "{table}"'
# What a sweep removes, among the rows its tally counted (rowid <= the last one then; a new row's is
# larger): the expired, then the live rows past `keep` stamped before the pass began (probation first,
# oldest first, in the segment index's order). "+" keeps the planner on the mtime and segment indexes.
_SQL_EXPIRED = 'SELECT key, mtime, LENGTH(data) AS size FROM "{table}" WHERE mtime < ? AND +rowid <= ? LIMIT ? OFFSET ?'
_SQL_BEYOND = (
    'SELECT key, mtime, LENGTH(data) AS size FROM "{table}" WHERE +mtime >= ? AND +mtime <= ? AND +rowid <= ? '
    "ORDER BY " + _SQL_RETURNING + " DESC, mtime DESC LIMIT ? OFFSET ?"
)
_INHERITED = []  # a forked child's copies of its parent's connections


# The message log's statements (its tables and triggers are in _SQL_SCHEMA).
_SQL_LOG_FOUND = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '{table}_log_length'"
_SQL_LOG_APPEND = 'INSERT INTO "{table}_log" (key, line) VALUES (?, ?)'
_SQL_LOG_LENGTH = 'SELECT COALESCE((SELECT lines FROM "{table}_log_length" WHERE key = ?), 0)'
_SQL_LOG_READ = 'SELECT line FROM "{table}_log" WHERE key = ? ORDER BY seq LIMIT ? OFFSET ?'
_SQL_LOG_TAIL = 'SELECT line FROM "{table}_log" WHERE key = ? ORDER BY seq DESC LIMIT ?'
_SQL_LOG_TRIM = (
    'DELETE FROM "{table}_log" WHERE seq IN '
    '(SELECT seq FROM "{table}_log" WHERE key = ? ORDER BY seq LIMIT ? OFFSET ?)'
)
_SQL_LOG_REMOVE = 'DELETE FROM "{table}_log" WHERE key = ?'
_SQL_LOG_MOVE = 'UPDATE "{table}_log" SET key = ? WHERE key = ?'
_SQL_LOG_SCAN = 'SELECT key, TOTAL(LENGTH(line)) FROM "{table}_log" GROUP BY key'


@contextlib.contextmanager
def _transaction(connection):
    """Run the block in one ``BEGIN IMMEDIATE`` transaction on ``connection``: committed, or rolled back."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


class SQLiteStore(Store):
    """Store records in one table (``key TEXT PRIMARY KEY, data BLOB, mtime REAL``) of an SQLite database.

    The README's "SQLiteStore" section has the details: a file created 0600,
    WAL mode, ``synchronous=NORMAL``, a five-second busy timeout, conditional
    writes as one statement. With ``read_only=True`` nothing about the file is
    changed and every write raises StoreError.

    Threads and processes: each operation takes a connection from a small
    pool of idle ones (at most eight kept) and gives it back, so a new thread
    opens none; any number of processes may open the file (not on a network
    file system). ``close()`` closes the idle connections at once and each
    busy one when its operation ends. An in-memory database (``":memory:"``,
    ``""``) is refused (ValueError): each pooled connection would see its own.
    """

    def __init__(self, path, *, table="sessions", read_only=False, **options):
        import sqlite3  # costly to import (about 3 ms), and needed by this store alone

        super().__init__(**options)
        if not isinstance(table, str) or re.fullmatch(_TABLE_PATTERN, table) is None:
            raise ValueError(f"invalid table name {table!r}: expected a letter or _, then [A-Za-z0-9_]")
        self.path = os.fspath(path)
        if self.path in ("", ":memory:"):
            raise ValueError(f"SQLiteStore needs a database file, not {self.path!r}: each pooled connection"
                             " would open an in-memory database of its own; use a file in a temporary directory")
        self.table = table
        self.read_only = bool(read_only)
        self._sqlite3 = sqlite3
        # Every SQL template of this section, "_SQL_*", for this table.
        self._sql = {sql: sql.format(table=table) for name, sql in globals().items()
                     if name.startswith("_SQL_") and isinstance(sql, str)}
        self._schema_ready = self.read_only  # the first connection of this store object sets it up
        if not self.read_only and not os.path.exists(self.path):
            # The file is created 0600 (SQLite gives its -wal and -shm the same mode), its directory 0700.
            directory = os.path.dirname(os.path.abspath(self.path))
            try:
                os.makedirs(directory, 0o700, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create session database {self.path!r}: its directory {directory!r} is missing"
                    f" and cannot be created: {exc.strerror}"
                ) from exc
            # FileExistsError: another process created it meanwhile.
            with _os_errors("create session database", self.path), contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
                os.chmod(self.path, 0o600)  # whatever the umask took away
        # The first query opens a connection (a file that is not a database fails here). The log's tables
        # are there unless a read-only store opened a database that predates them.
        self._log_ready = bool(self._execute(_SQL_LOG_FOUND))

    def __repr__(self):
        return f"SQLiteStore({self.path!r}, table={self.table!r})"

    def close(self):
        """Refuse later operations (see ``Store.close``), close the idle connections; busy ones close when done."""
        super().close()
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _forked(self):
        super()._forked()
        _INHERITED.extend(getattr(self, "_idle", ()))  # the parent's connections: never used, never closed
        self._idle, self._pool_lock = [], threading.Lock()  # _idle: open connections no operation is using

    def _checkout(self):
        """Return an idle connection, or open one, for one operation; StoreError if the store is closed.

        The first connection of this store object sets up the schema (the message log's tables too)
        and WAL mode.
        """
        self._checked()  # StoreError if closed; in a forked child, before its parent's lock is taken
        with self._pool_lock:
            if self._idle:
                return self._idle.pop()
        target = f"file:{urllib.parse.quote(self.path)}?mode=ro" if self.read_only else self.path
        with _os_errors("open session database", self.path, self._sqlite3.Error):
            connection = self._sqlite3.connect(
                target, uri=self.read_only, timeout=_SQLITE_BUSY_SECONDS, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA synchronous=NORMAL")  # this connection's own setting: changes no file
            if not self._schema_ready:
                connection.executescript(self._sql[_SQL_SCHEMA])
                self._schema_ready = True
        return connection

    def _checkin(self, connection):
        """Give back a connection ``_checkout`` returned: kept idle, or closed if the store is closed."""
        with self._pool_lock:
            if not self._closed and len(self._idle) < _SQLITE_IDLE_CONNECTIONS:
                self._idle.append(connection)
                return
        connection.close()

    @contextlib.contextmanager
    def _connected(self, action):
        """Hold a pooled connection for several statements (a sweep, a transaction); sqlite3.Error as StoreError."""
        connection = self._checkout()
        try:
            with _os_errors(f"{action} session database", self.path, self._sqlite3.Error):
                yield connection
        finally:
            self._checkin(connection)

    def _execute(self, template, parameters=()):
        """Run one statement on a pooled connection; return its rows, or how many rows it changed."""
        connection = self._checkout()
        try:
            cursor = connection.execute(self._sql[template], parameters)
            return cursor.fetchall() if cursor.description else cursor.rowcount
        except self._sqlite3.Error as exc:
            raise StoreError(f"session database {self.path!r}: {exc}") from exc
        finally:
            self._checkin(connection)

    def read(self, key):
        rows = self._execute(_SQL_READ, (self._read_limit(), key))
        if not rows:
            raise KeyError(key)
        if rows[0][0] is None:
            _logger.warning("session record %s is over the size limit: ignored", self._where(key))
            raise KeyError(key)
        return rows[0]

    def write(self, key, data, mtime, expected=None):
        if expected is None:
            return self._execute(_SQL_PUT, (key, data, mtime)) > 0  # an upsert: always 1 row
        return self._execute(_SQL_REPLACE, (data, mtime, key, expected)) > 0

    def remove(self, key, expected=None):
        return self._execute(_SQL_DELETE, (key, expected, expected)) > 0

    def set_mtime(self, key, mtime):
        return self._execute(_SQL_SET_MTIME, (mtime, key)) > 0

    def scan(self):
        return self._execute(_SQL_SCAN)

    def __len__(self):
        return self._execute(_SQL_COUNT, (float("-inf") if self.max_age is None else _now() - self.max_age,))[0][0]

    def sweep(self, max_age=None, keep=None, *, now=None, dry_run=False, progress=None):
        """Run one cleaning pass in SQL (see ``Store.sweep``), in batches that keep writers waiting a few milliseconds.

        A clean counts from the indexes alone (``seen_bytes`` is None); a dry
        run sums the bytes too. The rows to remove are picked by plain reads
        and removed in transactions of at most 250 rows, ``progress`` called
        after each; rows written meanwhile are neither counted nor removed.
        """
        floor, keep, started, _ = self._sweep_limits(max_age, keep, now)
        sweep = Sweep()
        with self._connected("clean") as connection:
            tally = self._sql[_SQL_SUMMARY if dry_run else _SQL_TALLY]
            sweep.seen, size, sweep.oldest, sweep.newest, last = connection.execute(tally).fetchone()
            sweep.seen_bytes = None if size is None else int(size)
            progress = progress or _no_progress
            progress(sweep)
            passes = [(_SQL_EXPIRED, (floor, last), 0)]  # last: NULL for an empty table, which picks nothing
            if keep is not None:
                passes.append((_SQL_BEYOND, (floor, started, last), keep))
            for select, parameters, offset in passes:
                if not dry_run:
                    self._evict_batches(connection, select, parameters, offset, sweep, progress)
                    continue
                summary = f"SELECT COUNT(*), TOTAL(size) FROM ({self._sql[select]})"
                count, size = connection.execute(summary, (*parameters, -1, offset)).fetchone()
                sweep.removed, sweep.removed_bytes = sweep.removed + count, sweep.removed_bytes + int(size)
        return sweep

    def _evict_batches(self, connection, select, parameters, offset, sweep, progress):
        """Remove the rows ``select`` picks, a batch per ``BEGIN IMMEDIATE`` transaction, until it picks too few."""
        while True:
            self._checked()
            started = time.perf_counter()
            rows = connection.execute(self._sql[select], (*parameters, _SQLITE_EVICT_BATCH, offset)).fetchall()
            if not rows:
                return
            delete = self._sql[_SQL_DELETE_SEEN]
            with _transaction(connection):
                sizes = [size for key, mtime, size in rows if connection.execute(delete, (key, mtime)).rowcount]
            sweep.removed += len(sizes)
            sweep.removed_bytes += sum(sizes)
            # The cleaner copies its own WAL pages back, so that no writer's commit pays a large checkpoint.
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
            progress(sweep)
            if len(rows) < _SQLITE_EVICT_BATCH:
                return
            # Leave the write lock free as long as the batch held it: a writer asleep in SQLite's busy handler
            # (steps of up to 100 ms) then finds it free when it wakes, not taken by the next batch.
            time.sleep(time.perf_counter() - started)

    # The message log: the table <table>_log, one row per message, removed with its record by a trigger;
    # <table>_log_length, each log's length, kept by triggers.

    def log_append(self, key, lines):
        with self._connected("append to the message log in") as connection, _transaction(connection):
            connection.executemany(self._sql[_SQL_LOG_APPEND], [(key, bytes(line)) for line in lines])
            return self._log_lines(key, connection)

    def log_read(self, key, start=0, stop=None):
        """The last lines through the index on ``(key, seq)``, newest first; others by ``LIMIT`` and ``OFFSET``."""
        if not self._log_ready:
            return []
        if start < 0 and stop is None:
            rows = self._execute(_SQL_LOG_TAIL, (key, -start))[::-1]
        else:
            start, stop, _ = slice(start, stop).indices(self.log_length(key))
            rows = self._execute(_SQL_LOG_READ, (key, max(0, stop - start), start))
        return [bytes(row[0]) for row in rows]

    def log_length(self, key):
        return self._execute(_SQL_LOG_LENGTH, (key,))[0][0] if self._log_ready else 0

    def log_trim(self, key, start, stop, expected):
        with self._connected("trim the message log in") as connection, _transaction(connection):
            if self._log_lines(key, connection) != expected:
                return False
            connection.execute(self._sql[_SQL_LOG_TRIM], (key, max(0, stop - start), start))
            return True

    def log_remove(self, key):
        return self._log_ready and self._execute(_SQL_LOG_REMOVE, (key,)) > 0  # one statement: atomic alone

    def log_move(self, old, new):
        with self._connected("move the message log in") as connection, _transaction(connection):
            if not self._log_lines(old, connection):
                return False
            connection.execute(self._sql[_SQL_LOG_REMOVE], (new,))
            connection.execute(self._sql[_SQL_LOG_MOVE], (new, old))
            return True

    def log_scan(self):
        return [(key, int(size)) for key, size in self._execute(_SQL_LOG_SCAN)] if self._log_ready else []

    def _log_lines(self, key, connection):
        """Return how many lines the log of ``key`` holds, 0 for none, on ``connection`` (in a transaction)."""
        return connection.execute(self._sql[_SQL_LOG_LENGTH], (key,)).fetchone()[0]


# -- RedisStore --

# Every script touches the keys of one bucket only (see RedisStore), all declared: KEYS[1] the record,
# KEYS[2] the index, KEYS[3] the message log, KEYS[4] the probation set.
# The size is checked in the server, so an oversized record never crosses the network.
_REDIS_READ = """
local size = redis.call('HSTRLEN', KEYS[1], 'data')
if size > tonumber(ARGV[1]) then return {size, redis.call('HGET', KEYS[1], 'mtime')} end
return redis.call('HMGET', KEYS[1], 'data', 'mtime')
"""
# ARGV[4] is '1' for a conditional write, '2' for a touch (mtime only, an existing record only); ARGV[8]
# is '1' for a session on probation: its member joins KEYS[4] and leaves KEYS[2], or the other way round.
# The first command that writes is HSET, which Redis refuses when out of memory under noeviction;
# once a script has written, Redis lets the rest run, so nothing that grows memory may come first.
_REDIS_WRITE = """
if ARGV[4] == '1' and redis.call('HGET', KEYS[1], 'data') ~= ARGV[5] then return 0 end
if ARGV[4] == '2' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'mtime', ARGV[2])
if ARGV[4] ~= '2' then redis.call('HSET', KEYS[1], 'data', ARGV[1]) end
if ARGV[3] ~= '' then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[6])
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[6])
    redis.call('PEXPIRE', KEYS[3], ARGV[3])
else
    redis.call('PERSIST', KEYS[1])
    redis.call('PERSIST', KEYS[3])
end
local segment = ARGV[8] == '1' and 4 or 2
redis.call('ZADD', KEYS[segment], ARGV[2], ARGV[7])
redis.call('ZREM', KEYS[6 - segment], ARGV[7])
return 1
"""
# Only commands Redis allows when it is out of memory: a logout always works.
_REDIS_REMOVE = """
if ARGV[1] == '1' and redis.call('HGET', KEYS[1], 'data') ~= ARGV[2] then return 0 end
local removed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[3])
return removed
"""
# A clean's removal of the record of member ARGV[1], which it saw at mtime ARGV[2]: unless written since
# (-2), the record, its log and its member go; returns the record's size, or -1 for a record already gone.
_REDIS_EVICT = """
local mtime = redis.call('HGET', KEYS[1], 'mtime')
if mtime and tonumber(mtime) ~= tonumber(ARGV[2]) then return -2 end
local size = mtime and redis.call('HSTRLEN', KEYS[1], 'data') or -1
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return size
"""
_REDIS_SCAN_BATCH = 1000
_REDIS_BUCKETS = 256
# The message log of a key is the list "#log:" + key in its bucket; its TTL follows the record's.
# RPUSH in runs of 1,000 lines: Lua's unpack() has a limit.
_REDIS_LOG_APPEND = """
for i = 2, #ARGV, 1000 do redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV))) end
if ARGV[1] ~= '' and #ARGV > 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return redis.call('LLEN', KEYS[1])
"""
# Mark lines[ARGV[2]:ARGV[3]] with a newline, which no line holds, then remove the marks from the nearer end.
_REDIS_LOG_TRIM = """
local length, start, stop = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('LLEN', KEYS[1]) ~= length then return 0 end
for i = start, stop - 1 do redis.call('LSET', KEYS[1], i, '\\n') end
redis.call('LREM', KEYS[1], start < length - stop and stop - start or start - stop, '\\n')
return 1
"""
_REDIS_LOG_MOVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
"""
# Remove the lines ARGV from the head of a log, if they are still there.
_REDIS_LOG_CUT = """
local lines = redis.call('LRANGE', KEYS[1], 0, #ARGV - 1)
for i = 1, #ARGV do if lines[i] ~= ARGV[i] then return 0 end end
redis.call('LTRIM', KEYS[1], #ARGV, -1)
return 1
"""


def _redis_cluster_tags(client):
    """Return the bucket tags of a cluster: ``_REDIS_BUCKETS`` hash tags, one slot in each equal band of slots.

    The search is deterministic, so every process finds the same tags.
    """
    tags, numbers = {}, itertools.count()
    while len(tags) < _REDIS_BUCKETS:
        tag = f"{{{next(numbers):x}}}"
        tags.setdefault(client.keyslot(tag) * _REDIS_BUCKETS // 16384, tag)  # a cluster has 16,384 slots
    return [tags[band] for band in range(_REDIS_BUCKETS)]


class RedisStore(Store):
    """Store records in Redis, Valkey or a Redis Cluster, through a redis-py client that the caller owns.

    ``RedisStore(redis.Redis(host="127.0.0.1"), prefix="session:", max_age=3600)``,
    or ``redis.cluster.RedisCluster(...)`` for a cluster: the options and the
    contract of every store. The client must be synchronous and return bytes
    (``decode_responses=False``, the default); this module never imports redis.

    Layout: sessions live in buckets: one on a server, ``prefix``; 256 on a
    cluster client (one with ``get_nodes``), ``prefix + "{tag}"``, their hash
    tags one in each 64-slot band, so the sessions spread evenly over the
    masters; a key's bucket is its CRC-32 modulo their number. In its bucket
    the record for ``key`` is the hash ``bucket + key`` (fields ``data`` and
    ``mtime``), whose TTL is ``max_age`` from each write or touch, so Redis
    removes expired records by itself. Two sorted sets per bucket score every
    key by its mtime: ``#probation`` the sessions on probation (see
    ``Store._stamp``), ``#index`` the others. A read, a write, a removal and a
    touch are one Lua script each on one bucket: atomic, sets included, one
    round trip, O(log N); a write drops the members past ``max_age``, so
    stores sharing a prefix should share ``max_age``. ``len()``, iteration and
    ``clean()`` read the sets, pipelined over the buckets (never KEYS or
    SCAN); see ``sweep``. Keys without the prefix are never touched. Needs
    Redis 4 or later (or Valkey); a maxmemory policy must not evict the sets
    (use noeviction or a volatile-* one). Out of memory under noeviction, a
    write raises StoreError while removals and cleans still work.

    Threads and processes: redis-py clients are thread-safe, and any number
    of processes and machines may share one server or cluster. Any failure of
    the client or server raises StoreError; redis-py reconnects (and follows
    a cluster's failover) by itself, so the store works again once the server
    is back. ``close()`` leaves the client to its owner: later calls raise StoreError.
    """

    def __init__(self, client, *, prefix="session:", **options):
        super().__init__(**options)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        # 0x80 is inspect.CO_COROUTINE: an asyncio client's execute_command is a coroutine function.
        if getattr(getattr(getattr(client, "execute_command", None), "__code__", None), "co_flags", 0) & 0x80:
            raise TypeError(f"RedisStore needs a synchronous client, not {type(client).__module__}."
                            f"{type(client).__name__}: pass redis.Redis or redis.cluster.RedisCluster"
                            f" (the ASGI middleware already runs store I/O in threads)")
        if getattr(client.get_encoder(), "decode_responses", False):
            raise ValueError("RedisStore needs a client that returns bytes: pass decode_responses=False")
        self.client, self.prefix, self._scripts = client, prefix, {}
        if callable(getattr(client, "get_nodes", None)):
            nodes = ",".join(sorted(f"{node.host}:{node.port}" for node in client.get_nodes()))
            self._address = f"redis+cluster://{nodes}"
            if "{" in prefix or "}" in prefix:
                raise StoreError(f"{self!r}: on a cluster RedisStore spreads the sessions over hash tags of its"
                                 f" own, so the prefix must hold no '{{' or '}}': pass prefix='session:'")
            self._buckets = [prefix + tag for tag in _redis_cluster_tags(client)]
        else:
            options = client.get_connection_kwargs()
            db = options.get("db", 0)
            self._address = (f"unix://{options['path']}?db={db}" if "path" in options
                             else f"redis://{options.get('host')}:{options.get('port', 6379)}/{db}")
            self._buckets = [prefix]
        # Every sorted set, probation sets first: the order in which a clean evicts from them.
        self._sets = [bucket + name for name in ("#probation", "#index") for bucket in self._buckets]

    def __repr__(self):
        return f"RedisStore({self._address!r}, prefix={self.prefix!r})"

    def _call(self, function, *args):
        """Return ``function(*args)``; any failure of the client or server becomes a StoreError."""
        self._checked()
        try:
            return function(*args)
        except Exception as exc:
            raise StoreError(f"{self!r}: {type(exc).__name__}: {exc}") from exc

    def _command(self, *command):
        return self._call(self.client.execute_command, *command)

    def _pipelined(self, commands):
        """Run ``commands`` (tuples) in one pipeline, which a cluster client splits by node; return the replies.

        A command that ends in WITHSCORES replies ``(member, score)`` pairs, whatever the protocol.
        """
        pipeline = self.client.pipeline(transaction=False)
        for command in commands:  # withscores=True, as redis-py's own zrange() passes it, pairs the reply
            options = {"withscores": True} if command[-1] == "WITHSCORES" else {}
            pipeline.execute_command(*command, **options)
        return self._call(pipeline.execute)

    def _script(self, source, keys, arguments):
        """Run a script by EVALSHA (redis-py loads it on NOSCRIPT): one round trip once loaded."""
        if source not in self._scripts:
            self._scripts[source] = self.client.register_script(source)  # a race makes two alike: harmless
        return self._call(self._scripts[source], keys, arguments)

    def _ttl(self):
        return "" if self.max_age is None else max(1, round(self.max_age * 1000))

    def _bucket(self, key):
        return self._buckets[zlib.crc32(key.encode("ascii")) % len(self._buckets)]

    def _where(self, key):
        return f"{self!r} key {self._bucket(key) + key!r}"

    def _keys(self, key):
        bucket = self._bucket(key)
        return [bucket + key, bucket + "#index", bucket + "#log:" + key, bucket + "#probation"]

    def read(self, key):
        data, mtime = self._script(_REDIS_READ, self._keys(key)[:1], [self._read_limit()])
        if data is None or mtime is None:
            raise KeyError(key)
        if isinstance(data, int):
            _logger.warning("unreadable session record %s: %d bytes, over the size limit", self._where(key), data)
            raise KeyError(key)
        return data, float(mtime)

    def write(self, key, data, mtime, expected=None):
        return self._write(key, data, mtime, int(expected is not None), expected or b"")

    def _write(self, key, data, mtime, mode, expected):
        # Scores and mtimes travel as repr(float): exact decimals, which Redis parses back to the same doubles.
        cutoff = "" if self.max_age is None else repr(mtime - self.max_age)
        arguments = [data, repr(mtime), self._ttl(), mode, expected, cutoff, key, int(_on_probation(mtime))]
        return self._script(_REDIS_WRITE, self._keys(key), arguments) == 1

    def remove(self, key, expected=None):
        arguments = [int(expected is not None), expected or b"", key]
        return self._script(_REDIS_REMOVE, self._keys(key), arguments) == 1

    def set_mtime(self, key, mtime):
        return self._write(key, b"", mtime, 2, b"")

    def scan(self):
        """Yield ``(key, mtime, size)`` of every record, in pipelined pages of 1,000 members per set (by rank)."""
        sets, start = self._sets, 0
        while sets:
            stop = start + _REDIS_SCAN_BATCH - 1
            pages = self._pipelined([("ZRANGE", name, start, stop, "WITHSCORES") for name in sets])
            entries = [(member.decode("ascii"), mtime) for page in pages for member, mtime in page]
            sizes = self._pipelined([("HSTRLEN", self._keys(key)[0], "data") for key, _ in entries])
            yield from ((key, mtime, size) for (key, mtime), size in zip(entries, sizes) if size)
            sets = [name for name, page in zip(sets, pages) if len(page) == _REDIS_SCAN_BATCH]
            start += _REDIS_SCAN_BATCH

    def sweep(self, max_age=None, keep=None, *, now=None, dry_run=False, progress=None):
        """Run one cleaning pass, as ``Store.sweep`` does; a clean reads only the records it removes.

        A dry run (``stats``) scans every record, for their bytes. A clean
        counts the members of the sets, removes those past ``max_age``, then
        the ``keep`` excess, probation sets first (see ``_evict_lowest``). It
        passes its live Sweep to ``progress`` once; ``seen`` counts the
        members, ``seen_bytes`` the bytes it removed.
        """
        if dry_run:
            return super().sweep(max_age, keep, now=now, dry_run=True, progress=progress)
        floor, keep, started, _ = self._sweep_limits(max_age, keep, now)
        floor, started, sweep = repr(floor), repr(started), Sweep()  # as scores travel: "-inf" for no max_age
        replies = self._pipelined([command for name in self._sets for command in (
            ("ZCARD", name), ("ZCOUNT", name, floor, started),
            ("ZRANGE", name, 0, 0, "WITHSCORES"), ("ZRANGE", name, -1, -1, "WITHSCORES"))])
        scores = [score for reply in replies[2::4] + replies[3::4] for _, score in reply]
        sweep.seen, due = sum(replies[0::4]), sum(replies[1::4])
        sweep.oldest, sweep.newest = min(scores, default=None), max(scores, default=None)
        (progress or _no_progress)(sweep)
        # Loaded for each clean, on every master: a failover may lose the scripts a master had loaded.
        self._evict_sha = self._call(self.client.script_load, _REDIS_EVICT)
        if floor != "-inf":
            self._evict_lowest(self._sets, "-inf", "(" + floor, sys.maxsize, sweep)
        excess = 0 if keep is None else due - keep
        for sets in (self._sets[:len(self._buckets)], self._sets[len(self._buckets):]):  # probation first
            excess = self._evict_lowest(sets, floor, started, excess, sweep)
        sweep.seen_bytes = sweep.removed_bytes
        return sweep

    def _evict_lowest(self, sets, low, high, count, sweep):
        """Remove the ``count`` lowest members of ``sets`` from ``low`` to ``high``; return how many are left.

        Lowest by (score, member): a merge of pipelined pages, at most 1,000
        members per set and about 10,000 in all per round. Each round removes
        the members up to the lowest end of a full page, below which no set
        holds a member unread. A member written since the pass began counts
        among the ``count``, and stays.
        """
        while count > 0:
            page = min(_REDIS_SCAN_BATCH, 1 + 10 * _REDIS_SCAN_BATCH // len(sets), count)  # per set
            pages = self._pipelined(
                [("ZRANGEBYSCORE", name, low, high, "LIMIT", 0, page, "WITHSCORES") for name in sets])
            bound = min([(part[-1][1], part[-1][0]) for part in pages if len(part) == page], default=None)
            entries = sorted((mtime, member) for part in pages for member, mtime in part)
            entries = [entry for entry in entries if bound is None or entry <= bound][:count]
            if not entries or not self._evict(entries, sweep):
                break
            count -= len(entries)
        return count

    def _evict(self, entries, sweep):
        """Remove the record of each ``(mtime, member)`` still at that mtime, in one pipeline.

        Count the records removed into ``sweep``; return True if any member left its set.
        """
        replies = self._pipelined([("EVALSHA", self._evict_sha, 4, *self._keys(member.decode()), member,
                                    repr(mtime)) for mtime, member in entries])
        sizes = [size for size in replies if size >= 0]
        sweep.removed, sweep.removed_bytes = sweep.removed + len(sizes), sweep.removed_bytes + sum(sizes)
        return any(size != -2 for size in replies)

    def __iter__(self):
        floor = "-inf" if self.max_age is None else repr(_now() - self.max_age)
        pages = self._pipelined([("ZRANGEBYSCORE", name, floor, "+inf") for name in self._sets])
        return iter([member.decode("ascii") for page in pages for member in page])

    def __len__(self):
        """Count the live records: the members of the sorted sets not older than ``max_age``."""
        floor = "-inf" if self.max_age is None else repr(_now() - self.max_age)
        return sum(self._pipelined([("ZCOUNT", name, floor, "+inf") for name in self._sets]))

    # The message log: a list per key, RPUSH to append (LSET and LREM to trim), its TTL the record's.
    def _log_key(self, key):
        return self._keys(_check_key(key))[2]

    def log_append(self, key, lines):
        return self._script(_REDIS_LOG_APPEND, [self._log_key(key)], [self._ttl(), *map(bytes, lines)])

    def log_read(self, key, start=0, stop=None):
        if stop == 0:
            return []
        return list(self._command("LRANGE", self._log_key(key), start, -1 if stop is None else stop - 1))

    def log_length(self, key):
        return self._command("LLEN", self._log_key(key))

    def log_trim(self, key, start, stop, expected):
        return self._script(_REDIS_LOG_TRIM, [self._log_key(key)], [expected, start, stop]) == 1

    def log_remove(self, key):
        return self._command("DEL", self._log_key(key)) == 1

    def log_move(self, old, new):
        """Move the log of ``old`` to ``new``: a RENAME in one bucket; across buckets, copy first, then cut.

        The copied lines leave ``old`` only if they are still its head;
        otherwise (a trim meanwhile) they leave ``new`` and the round starts
        again. A crash between the copy and the cut leaves lines twice, never
        none; lines appended to ``old`` meanwhile are moved by the next round.
        """
        source, target = self._log_key(old), self._log_key(new)
        if self._bucket(old) == self._bucket(new):
            return self._script(_REDIS_LOG_MOVE, [source, target], []) == 1
        self.log_remove(new)
        for rounds in itertools.count():
            lines = self._command("LRANGE", source, 0, _REDIS_SCAN_BATCH - 1)
            if not lines:
                return rounds > 0
            length = self.log_append(new, lines)
            if not self._script(_REDIS_LOG_CUT, [source], lines):
                self.log_trim(new, length - len(lines), length, length)

    def log_scan(self):
        """Yield ``(key, bytes)`` of every log, found with SCAN; the bytes are Redis's MEMORY USAGE."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + ("{*}" if len(self._buckets) > 1 else "") + "#log:*"
        for name in self._call(lambda: list(self.client.scan_iter(match=pattern, count=_REDIS_SCAN_BATCH))):
            size = self._command("MEMORY", "USAGE", name)
            if size is not None:
                yield name.rpartition(b"#log:")[2].decode("ascii", "replace"), size


# -- Merging --


def merge_sessions(base, ours, theirs):
    """Merge two requests' changes to one session and return the merged data (a new dict).

    ``base`` is the data both requests loaded, ``theirs`` what the other
    request saved meanwhile, ``ours`` what this request has now. Applied to
    the top-level keys, and recursively inside dict values:

    - a key changed (added, replaced or removed) by one side only takes that
      side's value; changed by both to equal values, that value;
    - a key removed by one side and changed by the other keeps the change;
    - a list that both sides grew at the end (or both created), perhaps
      after dropping one run of items from its front or from just after a
      kept head (as ``trim_messages`` drops the oldest rounds and keeps the
      leading instructions), but keeping at least the base's last item,
      becomes: the base's items that neither side dropped, then their new
      items, then ours. So two requests that each append a round to a chat
      held at its cap (a system message and 5 rounds, each dropping the
      oldest round) keep both new rounds, and the app's next trim brings
      the window back to size;
    - any other key changed by both takes ours (the later save) and is
      logged at INFO on the ``tinysession`` logger by name, never by value.

    None of the arguments is modified.
    """
    return _merge_dicts(base, ours, theirs, "")


def _merge_dicts(base, ours, theirs, path):
    # {**ours, **theirs}: ours' keys first, then theirs' new ones.
    merged = {key: _merge_values(base.get(key, _MISSING), ours.get(key, _MISSING), theirs.get(key, _MISSING),
                                 f"{path}{key}") for key in {**ours, **theirs}}
    return {key: value for key, value in merged.items() if value is not _MISSING}


def _merge_values(base, ours, theirs, path):
    if _same(ours, base) or _same(ours, theirs):
        return theirs
    if _same(theirs, base):
        return ours
    if ours is _MISSING or theirs is _MISSING:
        return theirs if ours is _MISSING else ours
    if type(ours) is dict and type(theirs) is dict and (base is _MISSING or type(base) is dict):
        return _merge_dicts({} if base is _MISSING else base, ours, theirs, f"{path}.")
    if type(ours) is list and type(theirs) is list and (base is _MISSING or type(base) is list):
        base = [] if base is _MISSING else base
        mine, other = _kept_and_new(base, ours), _kept_and_new(base, theirs)
        if mine is not None and other is not None:
            kept = [item for index, item in enumerate(base) if index in mine[0] and index in other[0]]
            return kept + other[1] + mine[1]
    _logger.info("two requests changed session key %r at once: the later save's value is kept", path)
    return ours


def _same(a, b):
    return a is b or (type(a) is type(b) and a == b)  # _MISSING, a bare object, equals only itself


def _kept_and_new(base, grown):
    """Return ``(indexes of base kept, new items)`` if ``grown`` is ``base`` less one run, then appended to; else None.

    The run dropped starts at the front or after a kept head, and the base's
    last item must remain: a list that kept none of its end was replaced,
    not grown. Of several readings, the one with the longest head wins.
    """
    common = next((i for i, (old, new) in enumerate(zip(base, grown)) if old != new), min(len(base), len(grown)))
    if common == len(base):
        return range(common), grown[common:]
    for end in range(min(len(grown), len(base) - 1), 0, -1):  # where the run kept ends in grown, latest first
        kept = max(1, end - common)  # the shortest run kept that leaves a common head: the longest head
        if grown[end - 1] == base[-1] and grown[end - kept : end] == base[len(base) - kept :]:
            return set(range(end - kept)) | set(range(len(base) - kept, len(base))), grown[end:]
    return None


# -- Chat history --

# What a message is to trimming: instructions, a user turn (which may start a round), or anything else.
_INSTRUCTIONS, _USER, _OTHER = "instructions", "user", "other"
_ROLE_KINDS = {
    "system": _INSTRUCTIONS, "developer": _INSTRUCTIONS, "user": _USER, "human": _USER,
    "assistant": _OTHER, "ai": _OTHER, "tool": _OTHER, "function": _OTHER,
}
# The Responses item types that end in neither _call nor _call_output.
_ITEM_TYPES = frozenset({"reasoning", "mcp_list_tools", "mcp_approval_request", "mcp_approval_response",
                         "item_reference"})
# LangChain's BaseMessage.type without a role; its ChatMessage ("chat") carries one.
_LANGCHAIN_TYPES = frozenset({"system", "human", "ai", "tool", "function"})
# The key of a content part's text, by the part's type; a tool's input and result count as text too.
_PART_TEXT_KEYS = {
    "text": "text", "input_text": "text", "output_text": "text", "summary_text": "text",
    "reasoning_text": "text", "refusal": "refusal", "thinking": "thinking", "reasoning": "reasoning",
    "tool_use": "input", "tool_result": "content",
}


def trim_messages(messages, max_rounds=5, *, budget=None, count=None, max_chars=None):
    """Keep the leading instructions and the last ``max_rounds`` whole rounds.

    Takes Chat Completions, Responses / Agents SDK, Anthropic or LangChain dicts: role-keyed ones,
    ``BaseMessage.model_dump()`` ones (``type`` ``human``, ``ai``...) or ``messages_to_dict()`` entries
    (``{"type": ..., "data": {...}}``). The leading ``system`` / ``developer`` messages are always kept.
    A round starts at a user turn (role ``user`` or ``human``, without ``tool_result`` blocks, not inside
    a tool call/result pair with the same id) and holds everything up to the next, so calls, results and
    reasoning stay with it. Messages before the first round go first.

    With ``budget``, the oldest rounds are then dropped until the total, instructions included, is at
    most ``budget``; the newest round stays even alone over. ``count(message) -> int >= 0`` measures a
    message (tokens, say); by default, its characters of text: str content, text parts of every kind,
    tool-call arguments and tool outputs (JSON length when not a str; images count 0). ``max_chars=n``
    is ``budget=n`` with that default.

    Returns a new list of the same message objects (all of them when nothing needs trimming or there is
    no round); never mutates ``messages``; linear. TypeError for a non-sequence, a non-mapping item, a
    non-int limit or count result, ``count`` without ``budget`` or with ``max_chars``; ValueError for an
    unknown role or item type, ``max_rounds < 1``, a negative budget or count, or leading instructions
    alone over the budget. Errors name the message index.

    >>> chat = [{"role": "developer", "content": "Be brief."}]
    >>> for n in range(3):
    ...     chat += [{"role": "user", "content": f"q{n}"},
    ...              {"role": "assistant", "content": f"a{n}"}]
    >>> [m["content"] for m in trim_messages(chat, max_rounds=1)]
    ['Be brief.', 'q2', 'a2']
    """
    budget, count = _checked_arguments(messages, max_rounds, budget, count, max_chars)
    items = list(messages)
    kinds = [_message_kind(message, index) for index, message in enumerate(items)]
    lead = next((index for index, kind in enumerate(kinds) if kind != _INSTRUCTIONS), len(kinds))
    sizes = [_check_int(count(message), f"count(messages[{index}])") for index, message in enumerate(items)]
    if sum(sizes[:lead]) > budget:
        raise ValueError(f"the leading instructions, messages[:{lead}], count {sum(sizes[:lead])}: "
                         f"over the budget of {budget}")
    starts = _round_starts(items, kinds, lead)
    if not starts or (len(starts) <= max_rounds and sum(sizes) <= budget):
        return items
    first = max(len(starts) - max_rounds, 0)
    total = sum(sizes[:lead]) + sum(sizes[starts[first]:])
    while total > budget and first < len(starts) - 1:  # drop the oldest rounds, but keep the newest
        total -= sum(sizes[starts[first]:starts[first + 1]])
        first += 1
    return items[:lead] + items[starts[first]:]


def _checked_arguments(messages, max_rounds, budget, count, max_chars):
    """Check trim_messages' arguments; return its ``(budget, count)``: with no budget, 0 and a count of 0."""
    if isinstance(messages, (str, bytes, bytearray)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a sequence, not {type(messages).__name__}")
    _check_int(max_rounds, "max_rounds", 1)
    if max_chars is not None:
        if budget is not None or count is not None:
            raise TypeError("max_chars=n is budget=n counting characters: give one or the other, "
                            "and count only with budget")
        return _check_int(max_chars, "max_chars"), _message_chars
    if budget is None:
        if count is not None:
            raise TypeError("count is only used with a budget: pass budget= too")
        return 0, lambda message: 0
    if count is not None and not callable(count):
        raise TypeError(f"count must be callable, not {type(count).__name__}")
    return _check_int(budget, "budget"), count or _message_chars


def _message_kind(message, index):
    """Return whether ``message`` is instructions, a user turn or other (a reply, a tool call or result)."""
    if not isinstance(message, Mapping):
        raise TypeError(f"messages[{index}] is not a mapping: {message!r}")
    message = _unwrapped(message)
    role, item_type = message.get("role"), message.get("type")
    if isinstance(item_type, str) and item_type.endswith("MessageChunk"):  # LangChain chunks, merged
        item_type = item_type[:-len("MessageChunk")].lower()
    if role is None:
        if item_type in _LANGCHAIN_TYPES:
            return _ROLE_KINDS[item_type]
        if not isinstance(item_type, str) or item_type == "message":
            raise ValueError(f"messages[{index}] has no 'role' and no known 'type': keys {list(message)!r}")
        if item_type.endswith(("_call", "_call_output")) or item_type in _ITEM_TYPES:
            return _OTHER
        raise ValueError(f"messages[{index}] has an unknown type {item_type!r}")
    kind = _ROLE_KINDS.get(role) if isinstance(role, str) else None
    if kind is None or item_type not in (None, "message", "chat"):
        raise ValueError(f"messages[{index}] has an unknown role {role!r} (type {item_type!r}); "
                         f"known roles: {', '.join(_ROLE_KINDS)}")
    if kind == _USER and _blocks(message, "tool_result"):
        return _OTHER
    return kind


def _round_starts(items, kinds, lead):
    """Return the indexes of the user turns, from ``lead`` on, that no call/result pair spans."""
    reach = list(range(len(items)))  # reach[i]: the last result answering a call made at i
    call_at = {}
    for index, message in enumerate(items):
        calls, results = _tool_ids(message)
        call_at.update(dict.fromkeys(calls, index))
        for call_id in results:
            reach[call_at.get(call_id, index)] = index
    starts, spanned = [], -1  # spanned: the last index inside a pair whose call came earlier
    for index, kind in enumerate(kinds):
        if index >= lead and kind == _USER and spanned < index:
            starts.append(index)
        spanned = max(spanned, reach[index])
    return starts


def _tool_ids(message):
    """Return the str ids of the tool calls ``message`` makes and of those it answers."""
    message = _unwrapped(message)
    item_type = message.get("type") or ""  # None or a str: _message_kind has checked every message
    calls = [call.get("id") for call in _as_list(message.get("tool_calls")) if isinstance(call, Mapping)]
    calls += [block.get("id") for block in _blocks(message, "tool_use")]
    results = [message.get("tool_call_id")]
    results += [block.get("tool_use_id") for block in _blocks(message, "tool_result")]
    if item_type.endswith("_call"):
        calls.append(message.get("call_id"))
    elif item_type.endswith("_call_output"):
        results.append(message.get("call_id"))
    return ([i for i in calls if isinstance(i, str)], [i for i in results if isinstance(i, str)])


def _unwrapped(message):
    """Return the message a LangChain ``messages_to_dict()`` entry holds in ``data``, else ``message``."""
    data = message.get("data")
    return data if isinstance(data, Mapping) and isinstance(message.get("type"), str) else message


def _as_list(value):
    """Return ``value`` if it is a list or tuple, else an empty tuple."""
    return value if isinstance(value, (list, tuple)) else ()


def _blocks(message, block_type):
    """Return the parts of a message's list content that are mappings of type ``block_type``."""
    parts = _as_list(message.get("content"))
    return [part for part in parts if isinstance(part, Mapping) and part.get("type") == block_type]


def _message_chars(message):
    """Return the characters of text in ``message``, as ``trim_messages`` counts them by default."""
    message = _unwrapped(message)
    total = sum(_content_length(message.get(key)) for key in ("content", "arguments", "output", "summary"))
    # The legacy Chat Completions ``function_call`` is one more call, as {"function": ...} is in ``tool_calls``.
    for call in [*_as_list(message.get("tool_calls")), {"function": message.get("function_call")}]:
        if isinstance(call, Mapping):
            function = call.get("function")
            arguments = function.get("arguments") if isinstance(function, Mapping) else call.get("args")
            total += _content_length(arguments)
    return total


def _content_length(content):
    """Return the characters of text in a value: a str, a list of parts, or other (its JSON; 0 for None)."""
    if isinstance(content, (list, tuple)):
        return sum(_content_length(_part_text(part)) for part in content)
    if isinstance(content, str):
        return len(content)
    return 0 if content is None else len(json.dumps(content, ensure_ascii=False, default=str))


def _part_text(part):
    """Return the text of one content part or block (a str is its own), or None if it has none."""
    part_type = part.get("type") if isinstance(part, Mapping) else None
    if isinstance(part_type, str) and part_type in _PART_TEXT_KEYS:
        return part.get(_PART_TEXT_KEYS[part_type])
    return part if isinstance(part, str) else None



# -- Message log --

_LOG_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _log_key(conversation_id):
    """Return the store key of a conversation: the id itself if it is a valid key, else its SHA-256."""
    if isinstance(conversation_id, str) and _is_key(conversation_id):
        return conversation_id
    if not isinstance(conversation_id, (str, bytes)):
        raise TypeError(f"conversation_id must be a str or bytes, not {type(conversation_id).__name__}")
    data = conversation_id.encode("utf-8") if isinstance(conversation_id, str) else conversation_id
    return hashlib.sha256(data).hexdigest()


class MessageLog:
    """A conversation's messages, appended in place in a store: O(new messages) per append.

    ``MessageLog(store, conversation_id, max_rounds=None, max_messages=1000)``:
    ids that are not valid store keys are hashed (SHA-256) into one.
    Messages are JSON, one line each; a request's ``session.history`` is the
    log of its session. With ``max_rounds``, every append that leaves more
    than that many rounds (``trim_messages``'s rule) drops the oldest,
    keeping leading instructions; a trim that races with another writer is
    retried, then left to the next append, so ``read`` also applies the
    limit. ``max_messages`` bounds every log (None for no bound): an append
    that leaves more drops the oldest whole rounds, the same way, until at
    most three quarters of it remain, so that trims come once in hundreds
    of appends; the newest round stays, even alone over.

    ``read(max_rounds=n)`` and trims read the first and last lines of a long
    log, as many as the rounds take, never the whole log; ``len()`` asks the
    store (O(1) on the stores here).

    Threads and processes: appends are atomic in the store; from any number
    of threads, processes or machines, none is ever lost. The store must
    implement the log hooks (``Store.log_append`` and the rest).
    """

    def __init__(self, store, conversation_id, *, max_rounds=None, max_messages=1000):
        self.store = store
        self.key = _log_key(conversation_id)
        self.max_rounds = None if max_rounds is None else _check_int(max_rounds, "max_rounds", 1)
        self.max_messages = None if max_messages is None else _check_int(max_messages, "max_messages", 1)

    def __repr__(self):
        return f"<MessageLog {self.key!r} in {self.store!r}>"

    def _encode(self, message, index):
        try:
            line = _LOG_ENCODER.encode(message).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise TypeError(f"messages[{index}] is not JSON-serializable: {exc}") from None
        limit = self.store.max_bytes
        if limit is not None and len(line) > limit:
            raise RecordTooLarge(f"messages[{index}] is {len(line)} bytes of JSON, over max_bytes={limit}")
        return line

    def _decoded(self, lines, first=0):
        """Return ``(line index, message)`` of every line that is JSON, counting from ``first``; log the others."""
        pairs = []
        for index, line in enumerate(lines, first):
            try:
                pairs.append((index, json.loads(line)))
            except ValueError:
                _logger.warning("message log %s: line %d is not JSON: ignored", self.key[:12], index)
        return pairs

    def _window(self, max_rounds, budget=sys.maxsize):
        """Return ``(lead, kept, length)``: the leading instructions, the last ``max_rounds`` rounds (within
        ``budget`` messages), each as ``(line index, message)``, and the lines the log held.

        A long log is read from both ends, 8 lines a round from each, four
        times more at each try, until the rounds kept are all in the last part.
        """
        length = self.store.log_length(self.key)
        size = 8 * max_rounds
        while True:
            whole = 2 * size >= length
            head = self._decoded(self.store.log_read(self.key, 0, None if whole else size))
            tail = [] if whole else self._decoded(self.store.log_read(self.key, -size), length - size)
            pairs = head + tail
            messages = [message for _, message in pairs]
            kept = trim_messages(messages, max_rounds, budget=budget, count=lambda message: 1)
            lead = next((i for i, message in enumerate(kept) if message is not messages[i]), 0)
            if whole or lead < len(head) and len(kept) - lead <= len(tail):
                return pairs[:lead], pairs[len(pairs) - len(kept) + lead :], length
            size *= 4

    def extend(self, messages):
        """Append ``messages`` in order, atomically; then trim to ``max_rounds`` and ``max_messages``.

        Raises TypeError for a message that is not JSON-serializable and
        RecordTooLarge for one over the store's ``max_bytes``, before
        anything is written; StoreError if the store fails. A log whose
        messages ``trim_messages`` cannot read is not trimmed (logged).
        """
        lines = [self._encode(message, index) for index, message in enumerate(messages)]
        if not lines:
            return
        count = self.store.log_append(self.key, lines)
        over = self.max_messages is not None and count > self.max_messages
        try:
            if over or (self.max_rounds is not None and count > self.max_rounds):
                self._trim(self.max_rounds or count, self.max_messages * 3 // 4 if over else sys.maxsize)
        except (TypeError, ValueError) as exc:  # the messages are in: an error would invite a retry, a duplicate
            _logger.warning("message log %s: not trimmed, its messages are not a chat: %s", self.key[:12], exc)

    def append(self, message):
        """Append one message: ``extend([message])``."""
        self.extend([message])

    def _trim(self, max_rounds, budget):
        for _ in range(_RETRIES):
            lead, kept, length = self._window(max_rounds, budget)
            start, stop = lead[-1][0] + 1 if lead else 0, kept[0][0] if kept else length
            if start >= stop or self.store.log_trim(self.key, start, stop, length):
                return

    def read(self, max_rounds=None):
        """Return the messages, oldest first: the last ``max_rounds`` rounds (default: the log's own limit).

        With neither limit, every message stored. Lines that are not JSON are
        skipped (logged).
        """
        max_rounds = self.max_rounds if max_rounds is None else max_rounds
        if max_rounds is None:
            return [message for _, message in self._decoded(self.store.log_read(self.key))]
        lead, kept, _ = self._window(max_rounds)
        return [message for _, message in lead + kept]

    def pop(self):
        """Remove and return the newest message, atomically; None if the log is empty.

        A newest line that is not JSON is removed (logged) and the one before it popped.
        """
        for _ in range(_RETRIES):
            length = self.store.log_length(self.key)
            if not length:
                return None
            lines = self.store.log_read(self.key, -1)
            if self.store.log_trim(self.key, length - 1, length, length):
                pairs = self._decoded(lines, length - 1)
                return pairs[0][1] if pairs else self.pop()  # a line that was not JSON is gone: pop the one before
        raise StoreError(f"message log {self.key[:12]} kept changing: could not pop its newest message")

    def clear(self):
        """Remove every message."""
        self.store.log_remove(self.key)

    def __len__(self):
        return self.store.log_length(self.key)


class AgentsSession:
    """An OpenAI Agents SDK session whose items live in a tinysession store's message log.

    ``Runner.run(agent, text, session=AgentsSession("user-42", store))``: it
    has the SDK's session methods (``get_items``, ``add_items``,
    ``pop_item``, ``clear_session``, ``session_id``, ``session_settings``),
    duck-typed, without importing the SDK. The store calls run in a thread,
    so the event loop never waits on them. ``max_rounds`` trims on append,
    as in ``MessageLog``. Safe from several tasks, threads and processes.
    """

    session_settings = None

    def __init__(self, session_id, store, *, max_rounds=None):
        self.session_id = session_id
        self.log = MessageLog(store, session_id, max_rounds=max_rounds)

    async def get_items(self, limit=None):
        """Return the stored items, oldest first: the last ``limit`` of them (default: ``session_settings.limit``), or all."""
        items = await _in_thread(self.log.read)
        limit = getattr(self.session_settings, "limit", None) if limit is None else limit
        return items if limit is None else items[max(len(items) - limit, 0) :]

    async def add_items(self, items):
        """Append ``items`` in order (see ``MessageLog.extend``)."""
        await _in_thread(self.log.extend, list(items))

    async def pop_item(self):
        """Remove and return the newest item; None if there is none."""
        return await _in_thread(self.log.pop)

    async def clear_session(self):
        """Remove every item."""
        await _in_thread(self.log.clear)


async def _in_thread(function, *args):
    """Return ``function(*args)``, run in a thread so that the event loop goes on."""
    import asyncio  # costly to import, and only agents and ASGI apps need it

    return await asyncio.to_thread(function, *args)


# -- Cookies --

DEFAULT_COOKIE_NAME = "tinysession"
"""The session cookie's default name: unlike ``session`` (Flask), ``sessionid`` (Django) or ``PHPSESSID``."""

_SESSION_ID_LENGTH = 43
_MAX_COOKIE_CANDIDATES = 4
_TOKEN_PATTERN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_ATTRIBUTE_PATTERN = r"[\x21-\x3a\x3c-\x7e]+"


def _new_session_id():
    """Return a fresh session id: 256 random bits, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def _store_key(session_id):
    """Return the store key for ``session_id``: a one-way hash, so stored keys cannot be replayed."""
    return hashlib.sha256(session_id.encode("ascii")).hexdigest()


def _session_ids(header, name):
    """Return the well-formed session ids of the cookies called ``name`` in a Cookie header.

    Tolerant: a malformed pair is skipped without hiding the pairs after it.
    Surrounding double quotes (allowed by RFC 6265) are removed.
    """
    pairs = (pair.partition("=") for pair in header.split(";")) if name in header else ()
    values = (value.strip().strip('"') for pair_name, _, value in pairs if pair_name.strip() == name)
    return [value for value in values if len(value) == _SESSION_ID_LENGTH and _is_key(value)]


def _vary_cookie(headers, name):
    """Return the list of (name, value) str pairs ``headers`` with Cookie in its Vary, a header ``name`` if none."""
    for index, (header, value) in enumerate(headers):
        if header.lower() == "vary":
            tokens = {token.strip().lower() for token in value.split(",")}
            if "cookie" not in tokens and "*" not in tokens:
                headers[index] = (header, value + ", Cookie" if value.strip() else "Cookie")
            return headers
    return [*headers, (name, "Cookie")]


class _Settings:
    """A front end's validated session options, shared by all its requests.

    Every front end takes the same keyword options (see ``SessionMiddleware``)
    and hands them here, so they are checked and applied in one place.
    """

    def __init__(self, store, *, cookie_name=DEFAULT_COOKIE_NAME, path="/", domain=None, secure=None, httponly=True,
                 samesite="Lax", partitioned=False, cookie_max_age=None, refresh_each_request=False,
                 max_lifetime=None, identity_key="_user_id", merge=merge_sessions, touch_interval=60):
        if not isinstance(store, Store):
            raise TypeError(f"store must be a tinysession.Store (FileStore, SQLiteStore, RedisStore...), not {store!r}")
        if not (isinstance(cookie_name, str) and re.fullmatch(_TOKEN_PATTERN, cookie_name)
                and not http.cookies.Morsel().isReservedKey(cookie_name)):
            raise ValueError(f"invalid cookie name {cookie_name!r}")
        if not (isinstance(path, str) and re.fullmatch(_ATTRIBUTE_PATTERN, path)):
            raise ValueError(f"invalid cookie path {path!r}")
        if domain is not None and not (isinstance(domain, str) and re.fullmatch(_ATTRIBUTE_PATTERN, domain)):
            raise ValueError(f"invalid cookie domain {domain!r}")
        if samesite is not None and str(samesite).capitalize() not in ("Lax", "Strict", "None"):
            raise ValueError(f"samesite must be 'Lax', 'Strict', 'None' or None, not {samesite!r}")
        if secure not in (None, True, False):
            raise ValueError(f"secure must be None, True or False, not {secure!r}")
        if cookie_max_age is not None and type(cookie_max_age) is not int:
            raise ValueError(f"cookie_max_age must be an int number of seconds or None, not {cookie_max_age!r}")
        if identity_key is not None and not isinstance(identity_key, str):
            raise TypeError(f"identity_key must be a str or None, not {type(identity_key).__name__}")
        if merge is not None and not callable(merge):
            raise TypeError(f"merge must be a callable merge(base, ours, theirs) -> dict or None, not {merge!r}")
        self.store = store
        self.cookie_name = cookie_name
        self.path = path
        samesite = None if samesite is None else samesite.capitalize()
        self.secure = True if samesite == "None" or partitioned else secure  # as browsers require
        self.partitioned = bool(partitioned)
        # As in Starlette: 0 or less sends Max-Age=0, and a cookie that dies at once needs no record.
        self.cookie_max_age = None if cookie_max_age is None else max(cookie_max_age, 0)
        self.identity_key = identity_key
        self.merge = merge
        self.refresh_each_request = bool(refresh_each_request) and cookie_max_age is not None  # as documented
        self.max_lifetime = _check_seconds(max_lifetime, "max_lifetime")
        self.touch_interval = _check_seconds(touch_interval, "touch_interval")
        # The attributes of every Set-Cookie, as Morsel takes them: "" (or False) leaves one out.
        self._attributes = {"path": path, "domain": domain or "", "httponly": bool(httponly),
                            "samesite": samesite or "",
                            "max-age": "" if self.cookie_max_age is None else self.cookie_max_age}

    def set_cookie(self, session_id, secure_request):
        """Return the Set-Cookie value for ``session_id``, or one that expires the cookie if it is None."""
        morsel = http.cookies.Morsel()
        morsel.set(self.cookie_name, session_id or "", session_id or "")
        morsel.update(self._attributes)
        morsel["secure"] = secure_request if self.secure is None else self.secure
        if session_id is None:
            morsel.update({"max-age": 0, "expires": "Thu, 01 Jan 1970 00:00:00 GMT"})
        # Morsel knows Partitioned only from Python 3.14 on.
        return morsel.OutputString() + ("; Partitioned" if self.partitioned else "")


# -- Session core --

_UNLOADED, _NEW, _LOADED, _GONE = "unloaded", "new", "loaded", "gone"
_SAVE_ATTEMPTS = 32


def _snapshot(data):
    """Return a cheap exact image of ``data`` to detect changes, or None if marshal cannot take it."""
    try:
        return marshal.dumps(data if type(data) is dict else dict(dict.items(data)), 2)
    except ValueError:
        return None


class Session(MutableMapping):
    """One request's session: a dict loaded from the store on first use, and the request's lifecycle.

    The framework-free core every front end drives, given the request's
    facts (the Cookie header, None outside the cookie's path where no cookie
    may be sent, or verified ``ids``; ``secure``): ``load()``,
    ``cookie()`` or ``response_headers()`` when the headers go out, then
    ``save()``, or ``rollback()`` if the request failed, ``abandon()`` if it
    never ended. ``state``: "unloaded", "new", "loaded" or "gone" (another
    request removed it). ``accessed``: True once loaded, or set by a front
    end; the response then varies with the Cookie header (``Vary``).
    ``id``: the session's id, as its cookie carries it; None until
    ``cookie()`` or ``save()`` gives it one. ``has_id_cookie``: True if
    the request carries a well-formed session id; only then does
    ``load()`` do store I/O. These are plain attributes for front ends to
    read: only the core changes ``state``, ``id`` and ``has_id_cookie``.
    Belongs to one request; not shared between threads.
    """

    def __init__(self, settings, cookie_header="", *, secure=False, ids=None, data_class=dict):
        self._settings = settings
        if ids is None:
            ids = _session_ids(cookie_header or "", settings.cookie_name)
        self._ids = ids[:_MAX_COOKIE_CANDIDATES]
        self.has_id_cookie = bool(self._ids)
        self._secure = bool(secure)
        self._data_class = data_class
        self.state, self._doomed, self._undo, self._logged = _UNLOADED, [], [], False
        self._data = self._client_id = self.id = self._key = self._stored = self._created = self._image = None
        self.accessed = False
        self._cookie = (None,) if cookie_header is None else None  # (Set-Cookie value or None,) once decided

    def __getitem__(self, name):
        return self.load()[name]

    def __setitem__(self, name, value):
        self.load()[name] = value

    def __delitem__(self, name):
        del self.load()[name]

    def __iter__(self):
        return iter(self.load())

    def __len__(self):
        return len(self.load())

    def __repr__(self):
        return f"<Session {self.state} {self._data!r}>"

    def regenerate(self):
        """Give the session a new id and keep its data (login); SessionError once the headers are out."""
        self.load()
        if self._cookie is not None:
            raise SessionError("regenerate() after the response started: the new cookie cannot be sent")
        self._forget_record(carry=True)

    def invalidate(self):
        """Empty the session, remove it from the store and expire its cookie: logout."""
        self.load()
        self._forget_record(carry=False)
        dict.clear(self._data)
        self._created, self._logged = None, False

    def _forget_record(self, carry):
        """Leave the id's record and log, removed (or moved) at save; ``carry``: keep another request's change."""
        if self.id is not None and (self.state == _LOADED or self._logged):
            self._doomed.append((_store_key(self.id), self._stored, carry))
        self.state, self.id, self._key, self._stored = _NEW, None, None, None

    @property
    def new(self):
        """True if the request brought no live session: this one started afresh (loads the session)."""
        self.load()
        return self._fresh

    @property
    def key(self):
        """The store key of the session's record (the SHA-256 of its id, never the id), or None."""
        return None if self.id is None else _store_key(self.id)

    @property
    def live(self):
        """True if the store holds the session under ``id`` as this request last read or saved it."""
        return self.state == _LOADED

    @property
    def pending(self):
        """True if ``save()`` has store I/O to do now: a front end on an event loop then calls it in a thread."""
        if self.state != _LOADED:
            return bool(self._doomed) or self.state == _NEW and self._holds()
        image = _snapshot(self._data)
        changed = image is None or image != self._image or self._identity_now() != self._identity
        return changed or bool(self._doomed) or self._touch_due(_now())

    def load(self):
        """Load the session if it is not loaded yet (store I/O) and return its data dict."""
        if self._data is not None:
            return self._data
        now, settings = _now(), self._settings
        self.state = _NEW
        self.accessed = True
        data = {}
        for value in self._ids:
            key = _store_key(value)
            try:
                record, stored, mtime = settings.store.load(key, now=now)
            except KeyError:
                continue
            if not (type(record) is dict and type(record.get("data")) is dict
                    and isinstance(record.get("created"), (int, float))):
                _logger.warning("session record %s is not a session: ignored", key[:12])
                continue
            self._client_id = value
            if settings.max_lifetime is not None and now - record["created"] > settings.max_lifetime:
                self._doomed.append((key, None, False))
                continue
            self.state, self.id, self._key, self._stored, self._mtime = _LOADED, value, key, stored, mtime
            self._promote = _on_probation(mtime)  # it came back: promote it at save
            self._created, data, self._logged = record["created"], record["data"], record.get("log") is True
            self._image = _snapshot(data)
            break
        self._fresh = self.state == _NEW
        self._data = data if self._data_class is dict else self._data_class(data)
        self._identity = self._identity_now()
        return self._data

    def _identity_now(self):
        key = self._settings.identity_key
        return None if key is None else dict.get(self._data, key, _MISSING)

    def _rotate_on_new_identity(self):
        """Regenerate the id if the identity key changed since loading; once the headers are out, remove it."""
        if self.state != _LOADED or self._identity_now() == self._identity:
            return
        if self._cookie is not None:
            _logger.warning("session %s: its identity changed after the response headers, when no new id could "
                            "be sent: the session is removed, not kept under the old id", self._key[:12])
        self._forget_record(carry=self._cookie is None)

    def cookie(self):
        """Return the Set-Cookie value this response must carry, or None: decided once, on the first call."""
        if self._cookie is None:
            self._rotate_on_new_identity()
            self._cookie = (self._decide_cookie(),)
        return self._cookie[0]

    def _decide_cookie(self):
        if self.state == _UNLOADED or (self.state == _GONE and self._holds()):
            return None
        if not self._holds():
            return None if self._client_id is None else self._settings.set_cookie(None, self._secure)
        self.id = self.id or _new_session_id()
        if self.id != self._client_id or self._settings.refresh_each_request:
            return self._settings.set_cookie(self.id, self._secure)
        return None

    def response_headers(self, headers, *, names=("Vary", "Set-Cookie")):
        """Return the (name, value) str pairs ``headers`` plus ``names``: Vary if the session was loaded, Set-Cookie."""
        cookie = self.cookie()
        if not self.accessed and cookie is None:
            return headers
        headers = _vary_cookie(list(headers), names[0])
        if cookie is not None:
            headers.append((names[1], cookie))
        return headers

    def save(self, *, now=None, keep=False):
        """Write, touch or remove the record as left so far (store I/O); with ``keep``, no later rollback() undoes it.

        Raises StoreError, or before writing anything RecordTooLarge or EncodeError, after rolling back.
        """
        try:
            self._save(_now() if now is None else now)
        except BaseException:
            self.rollback()
            raise
        if keep:
            self._undo = []

    def _save(self, now):
        if self.state == _UNLOADED:
            return
        self._rotate_on_new_identity()
        image = _snapshot(self._data)
        if self.state == _LOADED and image is not None and image == self._image:
            self._touch(now)
        elif self.state == _LOADED:
            self._write(self._key, now)  # before the old record goes: a failed login keeps it
        elif self.state == _NEW and self._holds():
            if self._settings.cookie_max_age == 0:
                self.abandon()  # its cookie expires with this response: the session ends with it
            elif self.id is None and self._cookie is not None:
                _logger.warning("session started after the response headers or outside the cookie's path: not saved")
            else:
                self.id = self.id or _new_session_id()
                self._write(_store_key(self.id), now)
        if self._remove_doomed() and self.state == _LOADED:
            self._write(self._key, now)  # another request's change, carried here

    def _encode(self, key):
        """Return the record's bytes; EncodeError names the first top-level key the serializer refuses."""
        store = self._settings.store
        record = {"created": self._created, "data": self._data}
        try:
            return store.encode(key, {**record, "log": True} if self._logged else record)
        except EncodeError as exc:
            for name, value in dict.items(self._data):
                try:
                    store.serializer.dumps(value)
                except (TypeError, ValueError, OverflowError, RecursionError):
                    raise EncodeError(f"session key {name!r} holds a value the store's serializer cannot encode "
                                      f"({exc}): use serializer=tinysession.TaggedJSON() or convert the value; "
                                      "nothing was written") from exc
            raise

    def _remove_doomed(self):
        """Remove the records this request left; return True if another request's change was carried here."""
        store, carried = self._settings.store, False
        for key, previous, carry in self._doomed:
            if carry and self._logged:  # regenerated: the log moves to the new id, made now if need be
                self.id = self.id or _new_session_id()
                store.log_move(key, _store_key(self.id))
            removed = previous is not None and store.remove(key, expected=previous)
            if not removed:
                theirs = self._merge_theirs(key, previous) if carry is not False and previous is not None else None
                carried = carried or theirs is not None
                removed = store.remove(key) and previous is not None
                previous = previous if theirs is None else theirs
            if carry is False:
                _forget_log(store, key)
            elif removed:
                self._undo.append((key, previous, None))  # a logout (no carry) is never undone
        self._doomed = []
        return carried

    def _merge_theirs(self, key, base_stored):
        """Merge what another request saved under ``key`` into this session's data; return its bytes, None if gone."""
        store, merge = self._settings.store, self._settings.merge
        try:
            record, stored, _ = store.load(key)
        except KeyError:
            return None
        if type(record) is not dict or type(record.get("data")) is not dict:
            return None
        if merge is not None:
            base = store.decode(key, base_stored)["data"]
            merged = merge(base, dict(dict.items(self._data)), record["data"])
            if not isinstance(merged, dict):
                raise TypeError(f"merge() must return a dict, not {type(merged).__name__}")
            dict.clear(self._data)
            dict.update(self._data, merged)
        return stored

    def _touch_due(self, now):
        """True once ``touch_interval`` has passed since the mtime, or at once if the session is on probation.

        The interval is at most a quarter of the store's ``max_age``, so a
        session used at least every three quarters of ``max_age`` never expires.
        """
        interval, max_age = self._settings.touch_interval, self._settings.store.max_age
        if interval is not None and max_age is not None:
            interval = min(interval, max_age / 4)
        return self._promote or (interval is not None and now - self._mtime >= interval)

    def _touch(self, now):
        if not self._touch_due(now):
            return
        try:
            if not self._settings.store.set_mtime(self._key, _stamp(now)):
                self.state = _GONE  # another request removed it meanwhile: no cookie may name it again
        except StoreError as exc:
            _logger.warning("could not refresh the mtime of session %s: %s", self._key[:12], exc)
        self._mtime, self._promote = now, False

    def _write(self, key, now):
        """Write the data under ``key``, or remove the record if the session holds nothing; ``now`` stamps it.

        A save another request made since this one read the record is merged
        in and the write tried again. A session's first write goes on probation.
        """
        store, expected = self._settings.store, self._stored
        new = self._created is None
        self._created = now if new else self._created
        for attempt in range(_SAVE_ATTEMPTS + 1):
            image = _snapshot(self._data)
            stored = self._encode(key) if self._holds() else None
            if stored == expected:  # the store holds it already (what another request saved, merged in)
                self._stored, self._image = stored, image
                self._touch(now)
                return
            if attempt == _SAVE_ATTEMPTS:
                _logger.warning("session %s kept changing under this request: the later save wins", key[:12])
                expected = None
            if stored is None:
                done = store.remove(key, expected=expected) or expected is None
            else:
                done = store.save(key, stored, expected=expected, now=now, new=new)
            if done:
                self._undo.append((key, expected, stored))
                if stored is None:
                    _forget_log(store, key)
                    self.state, self.id, self._key, self._stored = _NEW, None, None, None
                else:
                    self.state, self._key, self._stored, self._mtime, self._promote = _LOADED, key, stored, now, False
                    self._image = image
                    self._identity = self._identity_now()
                return
            # Back off a random while before trying again, so that writers racing on one session spread out.
            time.sleep(min(0.05, 0.0005 * 2**attempt) * int.from_bytes(os.urandom(2), "big") / 65536)
            expected = self._merge_theirs(key, expected)
            if expected is None:
                _logger.info("session %s was removed by another request: its changes are dropped", key[:12])
                self.state = _GONE
                return

    def rollback(self):
        """Put back the records a failed request changed, but not a logout; log, never raise."""
        store = self._settings.store
        # A logout still happens (removed as a record this request created): its expiring cookie may be out.
        self._undo += [(key, None, None) for key, _, carry in self._doomed if carry is False]
        self._doomed = []
        try:
            while self._undo:
                key, previous, written = self._undo.pop()
                if previous is None:
                    store.remove(key, expected=written)
                    _forget_log(store, key)
                else:
                    store.save(key, previous, expected=written)
            self.abandon()
        except SessionError:
            _logger.exception("could not undo the session changes of a failed request")

    def abandon(self):
        """Remove the message log of a new session that will never be saved (store I/O); never raise."""
        if self.state == _NEW and self._logged and self.id is not None:
            try:
                _forget_log(self._settings.store, _store_key(self.id))
            except SessionError:
                _logger.exception("could not remove the message log of an abandoned session")

    def _holds(self):
        return dict.__len__(self._data) > 0 or self._logged

    @property
    def history(self):
        """The session's ``MessageLog``, kept with it (even empty); new: SessionError once the headers are out."""
        self.load()
        if self.state != _LOADED and self.id is None:
            if self._cookie is not None:
                raise SessionError("history of a new session after the response started: no cookie can be sent")
            self.id = _new_session_id()
        key = _store_key(self.id)
        for index, (old_key, previous, carry) in enumerate(self._doomed):
            if carry and self._logged:  # regenerated this request: the log follows now, so it reads the same
                self._settings.store.log_move(old_key, key)
                self._doomed[index] = (old_key, previous, None)
        if not self._logged:
            self._logged, self._image = True, None  # the record must now say it has a log
        return MessageLog(self._settings.store, key)


# -- WSGI --


def get_session(environ, environ_key="tinysession"):
    """Return the request's Session from a WSGI ``environ``.

    Raises SessionError when the app is not wrapped in SessionMiddleware (or
    the middleware was given another ``environ_key``).
    """
    if environ_key not in environ:
        raise SessionError(f"no session at environ[{environ_key!r}]: wrap the app in tinysession.SessionMiddleware")
    return environ[environ_key]


class _SessionBody:
    """The app's response body: saves later session changes when the server closes it.

    If producing the body raises, the session's changes are rolled back, so
    a failed request leaves the store as it found it.
    """

    def __init__(self, body, session):
        self._body = body
        self._session = session  # None once the body failed: nothing more is saved

    def __iter__(self):
        try:
            yield from self._body
        except Exception:
            self._session.rollback()
            self._session = None
            raise

    def close(self):
        try:
            if hasattr(self._body, "close"):
                self._body.close()
        finally:
            if self._session is not None:
                self._session.save()


class SessionMiddleware:
    """Give every request of a WSGI app a server-side session.

    ``app = SessionMiddleware(app, store)`` wraps any WSGI app; inside it,
    ``get_session(environ)`` returns the request's Session. ``store`` is any
    ``Store`` (FileStore, SQLiteStore, RedisStore or your own); its
    ``max_age`` is the idle timeout.

    Options (keyword only, the same on every front end): ``cookie_name``
    (default ``DEFAULT_COOKIE_NAME``), ``path``, ``domain`` (sent only when
    given), ``secure`` (None: when the request came over https), ``httponly``,
    ``samesite`` ("Lax", "Strict", "None" which forces Secure, or None to
    omit it), ``partitioned`` (CHIPS; forces Secure), ``cookie_max_age``
    (seconds; None for a browser-session cookie; 0 or less, as in
    Starlette, a cookie sent with ``Max-Age=0`` and no record kept: a
    session that lasts one request),
    ``refresh_each_request`` (with ``cookie_max_age``: send the
    cookie on every response that used the session, not only when it is new),
    ``max_lifetime`` (seconds since the session was created, after which it
    is discarded however recently used), ``identity_key`` (the session key
    naming the logged-in user, ``"_user_id"`` as Flask-Login writes it, or
    None: when its value changes the session gets a new id, against
    fixation), ``merge`` (how a save merges another request's save made
    meanwhile) and ``touch_interval`` (seconds between mtime refreshes of a
    session read but not changed, at most a quarter of the store's
    ``max_age``; None never); and here ``environ_key``.

    The session id is 256 random bits; the store only sees its SHA-256, and a
    cookie the server did not issue, or whose session is gone, is never
    adopted. Wrapping a Flask app (or its ``wsgi_app``) logs a WARNING:
    ``flask.session`` stays Flask's own cookie unless the app uses
    ``FlaskSessionInterface``. Thread-safe; several processes may share one store.
    """

    def __init__(self, app, store, *, environ_key="tinysession", **options):
        self.app = app
        self.environ_key = environ_key
        self.settings = _Settings(store, **options)
        self.store = store
        self.cookie_name = self.settings.cookie_name
        interface = getattr(getattr(app, "__self__", app), "session_interface", None)
        if interface is not None and type(interface).__module__ != __name__:
            _logger.warning("SessionMiddleware wraps a Flask app whose flask.session is still Flask's own cookie, "
                            "never the store: set app.session_interface = tinysession.FlaskSessionInterface(store) "
                            "to serve it from the store (get_session(request.environ) is the middleware's session)")

    def __call__(self, environ, start_response):
        secure = environ.get("wsgi.url_scheme") == "https"
        session = environ[self.environ_key] = Session(self.settings, environ.get("HTTP_COOKIE", ""), secure=secure)

        def session_start_response(status, headers, exc_info=None):
            # The cookie is decided now even when unused: a later first write cannot get one.
            return start_response(status, session.response_headers(headers), exc_info)

        try:
            body = self.app(environ, session_start_response)
        except BaseException:
            session.rollback()
            raise
        try:
            session.save()
        except BaseException:
            if hasattr(body, "close"):
                body.close()
            raise
        if type(body) is list or type(body) is tuple:
            return body
        return _SessionBody(body, session)


# -- Flask --

def _cookie_keys(app):
    """Return the HMAC keys derived from the app's SECRET_KEY then its SECRET_KEY_FALLBACKS."""
    if not app.secret_key:
        return []
    secrets = [app.secret_key, *(app.config.get("SECRET_KEY_FALLBACKS") or ())]
    secrets = [each.encode("utf-8") if isinstance(each, str) else each for each in secrets]
    return [hashlib.sha256(b"tinysession flask cookie\0" + each).digest() for each in secrets]


def _signed_cookie(key, session_id, permanent):
    """Return the cookie value ``<id>.<p|s>.<signature>``: the id, whether permanent, an HMAC of both."""
    payload = f"{session_id}.{'p' if permanent else 's'}"
    signature = base64.urlsafe_b64encode(hmac.digest(key, payload.encode("ascii"), "sha256")).rstrip(b"=")
    return payload + "." + signature.decode("ascii")


def _verify_cookie(value, keys):
    """Return ``(session_id, permanent)`` from a cookie value one of ``keys`` signed, or None."""
    session_id, _, rest = value.partition(".")
    permanent = rest.startswith("p.")
    # A non-ASCII value is never ours, and compare_digest refuses non-ASCII str.
    if value.isascii() and any(hmac.compare_digest(value, _signed_cookie(key, session_id, permanent)) for key in keys):
        return session_id, permanent
    return None


class _FlaskSession(Session):
    """``flask.session`` for one request: the core Session with Flask's ``SessionMixin`` flags.

    Flask 3.1.3's request context sets ``accessed`` itself; ``modified`` is set
    by every write.

    ``request_cookie`` is ``(session_id, permanent)`` from the request's
    verified cookie, or ``(None, False)``.
    """

    modified = False

    def __init__(self, settings, verified, secure):
        super().__init__(settings, ids=[session_id for session_id, _ in verified], secure=secure)
        self.request_cookie = verified[0] if verified else (None, False)

    def __setitem__(self, name, value):
        super().__setitem__(name, value)
        self.modified = True

    def __delitem__(self, name):
        super().__delitem__(name)
        self.modified = True

    @property
    def permanent(self):
        """True if the session outlives the browser: its cookie has Expires and Max-Age."""
        return bool(self.get("_permanent", False))

    @permanent.setter
    def permanent(self, value):
        self["_permanent"] = bool(value)


class _FlaskNullSession(dict):
    """The empty, read-only session of an app without a SECRET_KEY; any write raises RuntimeError."""

    permanent = modified = accessed = False
    new = True

    def _fail(self, *args, **kwargs):
        raise RuntimeError("The session is unavailable because no secret key was set. Set the secret_key on the"
                           " application to something unique and secret.")

    __setitem__ = __delitem__ = pop = popitem = update = setdefault = clear = __ior__ = _fail
    regenerate = invalidate = _fail


class FlaskSessionInterface:
    """Serve ``flask.session`` from a store: ``app.session_interface = FlaskSessionInterface(store)``.

    Duck-typed to Flask's ``SessionInterface`` (nothing is imported from
    Flask), over the same session core as ``SessionMiddleware``: lazy
    loading (a request that never touches ``session`` costs no store
    access), change detection, conditional writes, hashed ids, strict mode,
    rotation of the id when ``identity_key`` changes, and rollback when the
    request ends in an unhandled exception.

    Flask's configuration sets the cookie, read on every request:
    ``SESSION_COOKIE_NAME``, ``_DOMAIN``, ``_PATH`` (else ``APPLICATION_ROOT``),
    ``_HTTPONLY``, ``_SECURE``, ``_SAMESITE``, ``_PARTITIONED``,
    ``PERMANENT_SESSION_LIFETIME`` (the cookie lifetime of a permanent
    session) and ``SESSION_REFRESH_EACH_REQUEST``. The cookie carries the id,
    whether the session is permanent, and an HMAC of both under
    ``SECRET_KEY``; one signed with a key in ``SECRET_KEY_FALLBACKS`` is
    accepted and re-signed when next sent. Without a SECRET_KEY the session
    is an empty one that raises RuntimeError on writes, as Flask's is.

    The store is used as it is given: build it with
    ``serializer=tinysession.TaggedJSON()`` to keep the values Flask's own
    sessions keep (tuples, bytes, datetimes, Markup...); a store on the plain
    "json" serializer logs a WARNING here. Options (keyword only):
    ``identity_key``, ``max_lifetime`` and ``touch_interval``, as for
    ``SessionMiddleware``. Thread-safe.
    """

    pickle_based = False

    def __init__(self, store, *, identity_key="_user_id", max_lifetime=None, touch_interval=60):
        self.settings = _Settings(store, identity_key=identity_key, max_lifetime=max_lifetime,
                                  touch_interval=touch_interval)
        self.store = store
        if type(store.serializer) is _JSONSerializer:
            _logger.warning("FlaskSessionInterface: the store's serializer is plain json, which cannot keep the "
                            "tuples, bytes, datetimes and Markup Flask apps put in flask.session: build the store "
                            "with serializer=tinysession.TaggedJSON()")

    def make_null_session(self, app):
        """Return the session of an app without a SECRET_KEY: empty, and any write raises RuntimeError."""
        return _FlaskNullSession()

    def is_null_session(self, obj):
        """Return True if ``obj`` is a session made by ``make_null_session``."""
        return isinstance(obj, _FlaskNullSession)

    def open_session(self, app, request):
        """Return the request's session, not loaded yet (no store access); None without a SECRET_KEY."""
        keys = _cookie_keys(app)
        if not keys:
            return None
        values = request.cookies.getlist(app.config["SESSION_COOKIE_NAME"])[:_MAX_COOKIE_CANDIDATES]
        verified = [found for found in (_verify_cookie(value, keys) for value in values) if found is not None]
        return _FlaskSession(self.settings, verified, request.is_secure)

    def save_session(self, app, session, response):
        """Write what changed (store I/O), then set the response's cookie and Vary from the outcome.

        If an exception is being handled (the request failed), the changes
        are rolled back instead. Raises StoreError if the store fails.
        """
        if sys.exc_info()[0] is not None:
            session.rollback()
            return
        refresh = app.config["SESSION_REFRESH_EACH_REQUEST"]
        session_id, permanent = session.request_cookie  # an unused session: refreshed from its cookie alone
        send = permanent and refresh
        if session.state != "unloaded":
            if set(session) <= {"_permanent"}:
                session.pop("_permanent", None)  # a session holding only its permanence is empty
            decision = session.cookie()
            permanent = session.permanent
            session.save()  # first: a session another request logged out meanwhile gets no cookie
            session_id = session.id
            send = session.live and (decision is not None or session.modified or (permanent and refresh))
            if decision is not None and not session.live:
                response.delete_cookie(**self._cookie_options(app, None))
        if session.accessed or send:
            response.vary.add("Cookie")
        if send:
            value = _signed_cookie(_cookie_keys(app)[0], session_id, permanent)
            response.set_cookie(value=value, **self._cookie_options(app, permanent))

    def _cookie_options(self, app, permanent):
        """Return the keywords of Werkzeug's set_cookie / delete_cookie from the app's configuration."""
        config = app.config
        options = {
            "key": config["SESSION_COOKIE_NAME"],
            "domain": config.get("SESSION_COOKIE_DOMAIN") or None,
            "path": config.get("SESSION_COOKIE_PATH") or config.get("APPLICATION_ROOT") or "/",
            "secure": bool(config.get("SESSION_COOKIE_SECURE")),
            "httponly": bool(config.get("SESSION_COOKIE_HTTPONLY", True)),
            "samesite": config.get("SESSION_COOKIE_SAMESITE"),
        }
        if config.get("SESSION_COOKIE_PARTITIONED"):
            options["partitioned"] = True  # a keyword only Werkzeug 3.1 and later know
        if permanent:
            options["max_age"] = app.permanent_session_lifetime  # a timedelta: Werkzeug adds the Expires it makes
        return options


class QuartSessionInterface(FlaskSessionInterface):
    """Serve Quart's ``session`` from a store: ``app.session_interface = QuartSessionInterface(store)``.

    ``FlaskSessionInterface`` for Quart, which awaits ``open_session``,
    ``save_session`` and ``make_null_session``: the same cookie, Flask
    configuration keys, options and session object (``regenerate()``,
    ``invalidate()``, ``history``). Without a SECRET_KEY the session is the
    empty read-only one, and routes that do not write it work.

    Store I/O runs in the event loop's default thread pool, never on the
    loop. As views use ``session`` synchronously, a request whose cookie
    holds a validly signed id is loaded in a thread before the view runs,
    used or not (and its response then carries ``Vary: Cookie``); without
    one, nothing is read. The session is saved after the response is made,
    before it is sent, so a failed save is a 500; when the request ends in
    an unhandled exception (Quart's 500 page) this request's changes are
    rolled back instead. A websocket's cookie is decided when it opens, as
    none can be sent once it is accepted: a websocket can change or end a
    session it came with, whose changes are saved when it closes; one it
    starts is not saved (logged), nor is one started by a websocket refused
    with an HTTP response, whose response is otherwise sent as a request's.
    """

    async def make_null_session(self, app):
        """Return the session of an app without a SECRET_KEY: empty, and any write raises RuntimeError."""
        return super().make_null_session(app)

    async def open_session(self, app, request):
        """Return the request's session, loaded in a thread if its cookie names one; None without a SECRET_KEY."""
        session = super().open_session(app, request)
        if session is not None and session.has_id_cookie:
            await _in_thread(session.load)
        if session is not None and request.scope["type"] == "websocket":
            session.cookie()  # decided now: once the socket is accepted, no cookie can be sent
        return session

    async def save_session(self, app, session, response):
        """Save as ``FlaskSessionInterface.save_session`` does, store I/O in a thread; ``response`` None on a websocket.

        Roll back instead when an exception is being handled: Quart's
        ``handle_exception`` saves inside its ``except`` block, which the
        thread would not see.
        """
        if response is None:
            response = app.response_class("")  # an accepted websocket's: its cookie went with the accept
        if sys.exc_info()[0] is not None:
            await _in_thread(session.rollback)
        elif session.state == "unloaded":
            super().save_session(app, session, response)  # the cookie alone: no store I/O
        else:
            await _in_thread(super().save_session, app, session, response)


# -- ASGI --

_OPENING_MESSAGES = ("http.response.start", "websocket.http.response.start", "websocket.accept")
_BODY_MESSAGES = ("http.response.body", "websocket.http.response.body", "http.response.zerocopysend",
                  "http.response.pathsend", "websocket.close")  # and the close that ends a socket


def _marking_use(method, on_core=False):
    """Return ``method`` wrapped to mark the session accessed first; ``on_core``: a Session's, run on the core."""

    @functools.wraps(method)
    def marked(self, *args, **kwargs):
        self.accessed = True
        return method(self._core if on_core else self, *args, **kwargs)

    return marked


class ASGISession(dict):
    """The session an ASGI app finds at ``scope["session"]``: a plain dict, plus login and logout.

    Starlette and FastAPI return it from ``request.session`` and
    ``websocket.session``; being a dict, it goes into ``JSONResponse`` as it
    is, and ``|=``, ``copy()`` and ``popitem()`` (the newest key) behave as on
    any dict. It is the core Session's own data, not a copy of it.
    ``regenerate()``, ``invalidate()`` and ``history`` are the core
    Session's (see ``Session``; the history's store calls block: use a
    thread); ``await save()`` writes the changes made so far.

    It belongs to one request or socket, on its event loop: change it only
    from that request's tasks.
    """

    accessed = False  # as in Starlette's session: set by any use of the dict

    def __init__(self, data, core, run):
        super().__init__(data)
        self._core, self._run = core, run  # the request's Session, and how it runs store I/O in a thread

    def mark_accessed(self):
        """Note that the app used the session: the response then carries ``Vary: Cookie``.

        Any use of the dict (a read, a write, iteration, ``items()`` as
        ``json.dumps`` calls it) marks it too, so this is only for an app
        that learns something from the session without touching the dict.
        Starlette's ``request.session`` calls it.
        """
        self.accessed = True

    regenerate = _marking_use(Session.regenerate, on_core=True)
    invalidate = _marking_use(Session.invalidate, on_core=True)
    history = property(_marking_use(Session.history.fget, on_core=True))

    async def save(self):
        """Write the changes made so far, in a thread (store I/O); they then stay whatever happens next.

        The middleware saves when the response is complete or the socket
        closes, and calls it when the app returns; call it yourself in a
        long-lived websocket. Raises StoreError
        (after undoing this request's writes) if the store fails.
        """
        self.accessed = True
        if self._core.pending:
            await self._run(lambda: self._core.save(keep=True))


for _name in ("__getitem__", "__setitem__", "__delitem__", "__contains__", "__iter__", "__len__", "__eq__", "__ne__",
              "__or__", "__ior__", "get", "keys", "values", "items", "setdefault", "pop", "popitem", "update", "clear",
              "copy"):
    setattr(ASGISession, _name, _marking_use(getattr(dict, _name)))
del _name


class _HeldSend:
    """One response's ``send``: holds the start (and, with a Content-Length, each body message) until the next.

    So the session is saved before the client has the whole response (see ``ASGISessionMiddleware``).
    """

    def __init__(self, session, core, run, send):
        self.session, self.core, self._run, self._send = session, core, run, send
        self.opened = self.completed = None  # the message that opened the response, and the one that ended it
        self.start, self.body, self.sized = [], [], False

    def _with_session(self, start):
        """Return the start message with the session's Vary and Set-Cookie headers (decides the cookie)."""
        if self.core.cookie() is None and not self.session.accessed:
            return start  # the app never used the dict (the core, loaded before it ran, would say Vary)
        pairs = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in start.get("headers", ())]
        pairs = self.core.response_headers(pairs, names=("vary", "set-cookie"))
        return {**start, "headers": [(name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs]}

    async def flush(self):
        if self.start:
            await self._send(self._with_session(self.start.pop()))
        if self.body:
            await self._send(self.body.pop())

    async def send(self, message):
        kind = message["type"]
        if kind in _OPENING_MESSAGES:
            if self.opened:
                raise RuntimeError(f"ASGI: {kind} after {self.opened}: a response starts once")
            self.opened = kind
            self.start.append(message)
            self.sized = any(name.lower() == b"content-length" for name, _ in message.get("headers", ()))
            if kind == "websocket.accept":  # its cookie goes now, none can follow
                await self.flush()
        elif kind not in _BODY_MESSAGES:
            await self._send(message)
        elif message.get("more_body", False):
            if self.body:
                await self.flush()  # the body goes one message late (the start with it): the last waits for the save
            self.body.append(message)
            if not self.sized:  # a chunked response is whole only with its last message: the others need not wait
                await self.flush()
        else:
            if self.opened:  # a socket refused before its accept has no cookie to reach a record: not saved
                try:
                    if self.core.pending:
                        await self._run(self.core.save)  # while start is held, a failure is a whole 500
                except BaseException:
                    if not self.start:
                        _logger.error("session %s could not be saved after the response headers went out: the "
                                      "response is cut off", (self.core.key or "(none)")[:12])
                    raise
                self.completed = kind
            await self.flush()
            await self._send(message)


class ASGISessionMiddleware:
    """Give every HTTP request and websocket of an ASGI app a server-side session.

    ``app.add_middleware(ASGISessionMiddleware, store=store)`` in Starlette
    or FastAPI, or ``app = ASGISessionMiddleware(app, store)``; the app finds
    an ``ASGISession`` at ``scope["session"]`` (``request.session``).
    ``lifespan`` and other scopes pass through untouched. The options are
    ``SessionMiddleware``'s, plus ``threads``: how many store operations may
    run at once (default 32).

    Store I/O runs in threads, never on the event loop: a request makes no
    store call when its session is unused and carries no session cookie (or
    its path is outside the cookie's ``path``: the browser does not send
    ours there), one to read, two to change it (the load, then one save).
    As the app's dict is used synchronously, a request whose Cookie header
    carries a well-formed session id is loaded in a thread before the app
    runs, used or not. ``http.response.start`` is held until the first body
    message, and in a response that declares its Content-Length each body
    message until the next one comes, so the session is saved before the
    client has the whole response: when nothing was sent yet (one body
    message, or one and an empty last one), a failed save is a whole HTTP 500
    (the error goes up to the server) and the previous record stays; a
    response that really streams is cut off instead (the held bytes are not
    sent, the error goes up) and one ERROR line names the session's store
    key. Changes made after the response are saved when the app returns. An
    exception from the app undoes the request's saves, even after a complete
    response; a response never completed (the client went away) saves
    nothing. Outside the cookie's ``path`` nothing is saved. A second
    ``http.response.start`` raises RuntimeError. A websocket is saved when
    the app sends ``websocket.close`` (not if it was never accepted), when
    the app returns normally, and on ``await
    session.save()``. Runs on an asyncio event loop (uvicorn, hypercorn, daphne...).
    """

    def __init__(self, app, store, *, threads=32, **options):
        import concurrent.futures  # as asyncio: costly to import, and only ASGI apps need it

        self.app = app
        self.settings = _Settings(store, **options)
        self.store = store
        threads = _check_count(threads, "threads")  # None: the executor's default
        self._threads = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="tinysession-asgi")

    def _cookie_header(self, scope):
        """Return the request's Cookie header, or None outside the cookie's path (where ours is never sent)."""
        path, root = scope.get("path", ""), scope.get("root_path", "")
        path = path if path.startswith(root) else root + path  # servers differ on whether path includes it
        if path != self.settings.path and not path.startswith(self.settings.path.rstrip("/") + "/"):
            return None
        cookies = [value for name, value in scope.get("headers", ()) if name.lower() == b"cookie"]
        return b"; ".join(cookies).decode("latin-1")

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        import asyncio  # as concurrent.futures

        in_thread = functools.partial(asyncio.get_running_loop().run_in_executor, self._threads)
        header = self._cookie_header(scope)  # None outside the cookie's path: the core then sends no cookie
        secure = scope.get("scheme") in ("https", "wss")
        # The app's dict is the core's own data, made by core.load() (core is bound by then) with the core in it.
        core = Session(self.settings, header, secure=secure,
                       data_class=lambda data: ASGISession(data, core, in_thread))
        session = scope["session"] = await in_thread(core.load) if core.has_id_cookie else core.load()
        sender = _HeldSend(session, core, in_thread, send)
        try:
            await self.app(scope, receive, sender.send)
        except BaseException:
            await in_thread(core.rollback)  # even after a complete response (an error page)
            raise
        if not (sender.completed or sender.opened == "websocket.accept"):
            await in_thread(core.abandon)  # a new session's log, never to be saved
        else:
            await session.save()  # what the app changed after the response


# -- Command line --

_DURATION_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_NUMBER = r"\d+(?:\.\d+)?"
_DURATION_PATTERN = "".join(rf"(?:({_DURATION_NUMBER}){unit})?" for unit in _DURATION_UNITS)
_SQLITE_HEADER = b"SQLite format 3\0"
# The command line removes what its flags say and no more: no default bound of the stores applies.
_UNBOUNDED = {"max_sessions": None, "max_bytes": None}
_EXIT_FAILED, _EXIT_NO_SESSIONS, _EXIT_INTERRUPTED = 1, 3, 130
_SPECIAL_FILES = {"p": "a FIFO", "s": "a socket", "c": "a character device", "b": "a block device"}  # by filemode()
_CLI_EXAMPLES = """examples:
  python -m tinysession clean /var/lib/myapp/sessions --max-age 7d --quiet --strict
  python -m tinysession clean /var/lib/myapp/sessions.db --keep 10000 --dry-run
  python -m tinysession stats redis://127.0.0.1:6379/0 --max-age 12h --json

exit status: 0 done, 1 failed, 2 usage error, 3 (with --strict) the directory
holds other files but no session files, 130 interrupted (Ctrl-C)."""


def _seconds(text):
    """Return the seconds in ``90``, ``1.5h`` or ``1h30m`` (text the parser has already checked)."""
    parts = re.findall(r"([\d.]+)(\D?)", text)  # "1h30m": ("1", "h"), ("30", "m"); "90": ("90", "")
    return sum(float(number) * _DURATION_UNITS.get(unit, 1) for number, unit in parts)


def _format_bytes(size):
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000


def _format_time(timestamp):
    return "-" if timestamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _open_store(spec, table, prefix, read_only):
    """Open the store at ``spec`` without creating anything; SessionError if there is none.

    A file must be an SQLite database with a session table named ``table``;
    with ``read_only`` it is opened read-only, so nothing in the file changes.
    FIFOs, sockets and devices are refused before they are opened.
    """
    if spec.startswith(("redis://", "rediss://", "unix://", "redis+cluster://", "redis+sentinel://")):
        return _open_redis(spec, prefix)
    mode = os.stat(spec).st_mode
    kind = _SPECIAL_FILES.get(stat.filemode(mode)[0])
    if kind is not None:
        raise SessionError(f"{spec}: is {kind}, neither a session directory nor an SQLite database")
    if stat.S_ISDIR(mode):
        return FileStore(spec, **_UNBOUNDED)
    with open(os.open(spec, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:  # a FIFO swapped in must not hang us
        header = file.read(len(_SQLITE_HEADER))
    if header != _SQLITE_HEADER:
        raise SessionError(f"{spec}: neither a session directory nor an SQLite database")
    import sqlite3  # as in SQLiteStore: costly, and only SQLite files need it

    uri = f"file:{urllib.parse.quote(spec)}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=_SQLITE_BUSY_SECONDS)) as connection:
            columns = {row[1] for row in connection.execute("SELECT * FROM pragma_table_info(?)", (table,))}
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read session database {spec!r}: {exc}") from exc
    if not columns:
        raise SessionError(f"{spec}: no table {table!r} (is --table right?)")
    if not {"key", "data", "mtime"} <= columns:
        raise SessionError(f"{spec}: table {table!r} is not a session table: its columns are {sorted(columns)}")
    return SQLiteStore(spec, table=table, read_only=read_only, **_UNBOUNDED)


def _open_redis(spec, prefix):
    try:
        import redis
    except ImportError:
        raise SessionError(f"{spec}: Redis stores need redis-py: pip install redis") from None
    url = urllib.parse.urlsplit(spec)
    try:
        if url.scheme == "redis+cluster":  # any node: the client finds the others
            client = redis.RedisCluster.from_url(spec.replace("redis+cluster://", "redis://", 1))
        elif url.scheme == "redis+sentinel":  # redis+sentinel://host:port/service: the service's master
            client = redis.Sentinel([(url.hostname, url.port or 26379)]).master_for(url.path.strip("/"))
        else:
            client = redis.Redis.from_url(spec)
    except ValueError as exc:
        raise SessionError(f"{spec}: invalid Redis URL: {exc}") from None
    return RedisStore(client, prefix=prefix, **_UNBOUNDED)


def _no_sessions_status(args, store, sweep):
    """Warn if a session directory holds no session files but other files; return the exit status."""
    if sweep.seen or not isinstance(store, FileStore):
        return 0
    others = sum(1 for name in os.listdir(store.directory) if not name.startswith((_FILE_PREFIX, _TEMP_PREFIX)))
    if not others:
        return 0
    print(f"{args.prog}: warning: {args.store} holds no session files ({_FILE_PREFIX}*) but {others} other"
          f" entr{'y' if others == 1 else 'ies'}: is it the session directory?", file=sys.stderr)
    return _EXIT_NO_SESSIONS if args.strict else 0


def _cmd_clean(args):
    if args.max_age is None and args.keep is None:
        args.usage.error("clean needs --max-age, --keep or both; it will not guess what to remove")
    live = Sweep()  # what the pass has counted so far, for a Ctrl-C
    terminal = not args.quiet and sys.stderr.isatty()
    clear_line = "\r\033[K" if terminal else ""

    def progress(sweep):
        nonlocal live
        live = sweep
        if terminal:
            print(f"\rscanned {sweep.seen} sessions...", end="", file=sys.stderr, flush=True)

    with _open_store(args.store, args.table, args.prefix, args.dry_run) as store:
        started = time.perf_counter()
        # Only a report shows the logs' counts: with --quiet no listing of every log, before or after.
        logs = None if args.quiet and not args.dry_run else _log_totals(store)
        try:
            sweep = store.sweep(args.max_age, args.keep, dry_run=args.dry_run, progress=progress)
        except KeyboardInterrupt:
            verb = "would have removed" if args.dry_run else "removed"
            print(f"{clear_line}{args.prog}: interrupted: {verb} {live.removed} of the {live.seen}"
                  f" sessions seen ({_format_bytes(live.removed_bytes)})", file=sys.stderr)
            return _EXIT_INTERRUPTED
        print(clear_line, end="", file=sys.stderr)
        kept = None if args.quiet or args.dry_run else _log_totals(store)
    removed = f"{sweep.removed} of {sweep.seen} sessions ({_format_bytes(sweep.removed_bytes)})"
    if args.dry_run:
        print(f"would remove {removed} and their message logs (of {logs[0]}, {_format_bytes(logs[1])}),"
              f" keep {sweep.seen - sweep.removed}; dry run, nothing removed")
    elif not args.quiet:
        print(f"removed {removed} and {logs[0] - kept[0]} of {logs[0]} message logs"
              f" ({_format_bytes(logs[1] - kept[1])}) in {time.perf_counter() - started:.2f} s,"
              f" kept {sweep.seen - sweep.removed}")
    return _no_sessions_status(args, store, sweep)


def _cmd_stats(args):
    with _open_store(args.store, args.table, args.prefix, True) as store:
        sweep = store.stats(args.max_age)
    report = {
        "store": args.store, "sessions": sweep.seen, "bytes": sweep.seen_bytes, "logs": sweep.logs,
        "log_bytes": sweep.log_bytes, "oldest": sweep.oldest, "newest": sweep.newest, "max_age": args.max_age,
        "expired": None if args.max_age is None else sweep.removed,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"store:    {args.store}")
        print(f"sessions: {sweep.seen} ({_format_bytes(sweep.seen_bytes)})")
        print(f"logs:     {sweep.logs} ({_format_bytes(sweep.log_bytes)})")
        print(f"oldest:   {_format_time(sweep.oldest)}")
        print(f"newest:   {_format_time(sweep.newest)}")
        if args.max_age is not None:
            print(f"expired:  {sweep.removed} older than {args.max_age:g} s")
    return _no_sessions_status(args, store, sweep)


def _parser(prog):
    import argparse

    def checked(pattern, convert, what, expected):
        def check(text):
            if re.fullmatch(pattern, text.strip()) is None:
                raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: expected {expected}")
            return convert(text.strip())

        return check

    duration = checked(f"{_DURATION_NUMBER}|(?=.){_DURATION_PATTERN}", _seconds, "duration",
                       "seconds or units largest first, e.g. 90, 30m, 1h30m, 7d or 2w")
    table = checked(_TABLE_PATTERN, str, "table name", "a letter or _, then [A-Za-z0-9_]")
    count = checked(r"\d+", int, "count", "a whole number >= 0")
    text = {"description": "Clean and inspect tinysession stores.", "epilog": _CLI_EXAMPLES,
            "formatter_class": argparse.RawDescriptionHelpFormatter}
    parser = argparse.ArgumentParser(prog=prog, **text)
    parser.add_argument("--version", action="version", version=f"tinysession {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, run, summary in (
        ("clean", _cmd_clean, "remove expired sessions, then all but the newest N, with their message logs"),
        ("stats", _cmd_stats, "count sessions, message logs, bytes, oldest and newest, and how many are past a max age"),
    ):
        command = commands.add_parser(name, help=summary, **dict(text, description=summary))
        command.set_defaults(run=run, usage=command, prog=prog)
        command.add_argument("store", metavar="STORE", help="session directory, SQLite file or redis:// URL (needs redis-py)")
        command.add_argument("--max-age", type=duration, metavar="DURATION",
                             help="sessions older than this: seconds, or w, d, h, m, s largest first (30m, 1h30m, 7d)")
        command.add_argument("--table", type=table, default="sessions", help="SQLite table (default: sessions)")
        command.add_argument("--prefix", default="session:", help="Redis key prefix (default: session:)")
        command.add_argument("--strict", action="store_true",
                             help="exit 3 if the directory holds other files but no session files")
        if name == "clean":
            command.add_argument("--keep", type=count, metavar="N", help="then keep only the N newest")
            command.add_argument("--dry-run", action="store_true", help="report, remove nothing (read-only)")
            command.add_argument("--quiet", action="store_true", help="print nothing on success (cron)")
        else:
            command.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv=None, *, prog="python -m tinysession"):
    """Run the command line; return the exit status.

    0 done, 1 failed, 2 usage error, 3 (with ``--strict``) a directory with
    other files but no session files, 130 interrupted. ``prog`` names the
    command in messages (the ``tinysession`` console script passes its own name).
    """
    try:
        args = _parser(prog).parse_args(argv)
        return args.run(args)
    except SystemExit as exit:  # argparse exits for --help, --version and usage errors; return the status instead
        return exit.code
    except (SessionError, OSError) as exc:  # an OSError names its path and cause: no traceback needed
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return _EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED


def _console_script():
    """Run the command line as the ``tinysession`` console script that ``pip install`` makes."""
    return main(prog="tinysession")


if __name__ == "__main__":
    sys.exit(main())
