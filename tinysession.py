"""Server-side web sessions in one file, on the standard library only.

Quick start: wrap any WSGI app (Flask: ``app.wsgi_app``) and use the session::

    import tinysession

    store = tinysession.FileStore("/var/lib/myapp/sessions", max_age=3600)
    app = tinysession.SessionMiddleware(app, store)

    # inside the app, for each request:
    session = tinysession.get_session(environ)
    session.setdefault("messages", []).append({"role": "user", "content": "hi"})
    session.regenerate()      # on login: new id, same data
    session.invalidate()      # on logout

Stores are ``collections.abc.MutableMapping``s from a key (1 to 128 of
``[A-Za-z0-9_-]``) to a record, and can be used on their own::

    store["abc123"] = {"user": 42}
    store["abc123"]            # -> {'user': 42}, a fresh copy
    store.touch("abc123")      # slide the idle expiry without rewriting
    store.clean(keep=10000)    # -> how many records it removed

Three stores share one contract: ``FileStore(directory)``, one file per
record written atomically; ``SQLiteStore(path)``, one table in WAL mode; and
``RedisStore(client)``, for several machines, over a client the caller makes.
Records expire by modification time: with ``max_age`` (seconds) a record not
written or touched for that long is missing on every read, cleaned or not.
``clean()``, the middleware's background thread or the command line
``python -m tinysession clean STORE --max-age 7d`` reclaim the space.
``trim_messages`` keeps a chat history stored in a session bounded, whole
rounds at a time, in the OpenAI, Anthropic and LangChain dict formats.

Threads and processes: stores and the middleware may be shared by the
threads of a process, and several processes (or machines, with Redis) may use
one store at once. The last write of a record wins; a reader never sees a
partial record.

Security: session ids are 256 random bits and the store only sees their
SHA-256. Records are JSON by default. ``serializer="pickle"`` requires a
``secret``: every record is then signed with HMAC-SHA256 and the signature is
checked before anything is unpickled, because unpickling data that someone
else could write runs their code. A record that fails its check is treated as
missing and logged on the ``tinysession`` _logger.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import json
import logging
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping, Sequence

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_MAX_BYTES",
    "FileStore",
    "RecordTooLarge",
    "RedisStore",
    "SQLiteStore",
    "Session",
    "SessionError",
    "SessionMiddleware",
    "StoreError",
    "get_session",
    "main",
    "trim_messages",
]

_logger = logging.getLogger("tinysession")

# -- Constants --

DEFAULT_MAX_BYTES = 256 * 1024
"""Largest serialized record a store accepts unless told otherwise (256 KiB)."""

_KEY_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
_TABLE_PATTERN = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
_SIGNATURE_BYTES = 32
_FILE_PREFIX = "ts-"
_TEMP_PREFIX = ".ts-"
_TEMP_SUFFIX = ".tmp"
_TEMP_MAX_AGE = 120.0
_DIRECTORY_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = (
    os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
)
_CREATE_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)
_SQLITE_BUSY_SECONDS = 5.0
_SESSION_ID_LENGTH = 43
_MAX_COOKIE_CANDIDATES = 4
_TOKEN_PATTERN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_ATTRIBUTE_PATTERN = r"[\x21-\x3a\x3c-\x7e]+"

_SQL_CREATE = (
    'CREATE TABLE IF NOT EXISTS "{table}" '
    "(key TEXT PRIMARY KEY, data BLOB NOT NULL, mtime REAL NOT NULL)"
)
_SQL_INDEX = 'CREATE INDEX IF NOT EXISTS "{table}_mtime" ON "{table}" (mtime)'
_SQL_GET = (
    'SELECT CASE WHEN LENGTH(data) <= ? THEN data END, mtime FROM "{table}" WHERE key = ? AND mtime >= ?'
)
_SQL_HAS = 'SELECT 1 FROM "{table}" WHERE key = ? AND mtime >= ?'
_SQL_PUT = (
    'INSERT INTO "{table}" (key, data, mtime) VALUES (?, ?, ?) '
    "ON CONFLICT (key) DO UPDATE SET data = excluded.data, mtime = excluded.mtime"
)
_SQL_UPDATE = 'UPDATE "{table}" SET data = ?, mtime = ? WHERE key = ?'
_SQL_TOUCH = 'UPDATE "{table}" SET mtime = ? WHERE key = ? AND mtime >= ?'
_SQL_DELETE = 'DELETE FROM "{table}" WHERE key = ?'
_SQL_KEYS = 'SELECT key FROM "{table}" WHERE mtime >= ?'
_SQL_COUNT = 'SELECT COUNT(*) FROM "{table}" WHERE mtime >= ?'
_SQL_SUMMARY = 'SELECT COUNT(*), TOTAL(LENGTH(data)), MIN(mtime), MAX(mtime) FROM "{table}"'
_SQL_SUMMARY_EXPIRED = 'SELECT COUNT(*), TOTAL(LENGTH(data)) FROM "{table}" WHERE mtime < ?'
_SQL_DELETE_EXPIRED = 'DELETE FROM "{table}" WHERE mtime < ?'
_SQL_OLDEST_BEYOND = (
    'SELECT key FROM "{table}" WHERE mtime >= ? ORDER BY mtime DESC, key DESC LIMIT -1 OFFSET ?'
)
_SQL_SUMMARY_BEYOND = (
    'SELECT COUNT(*), TOTAL(LENGTH(data)) FROM "{table}" WHERE key IN (' + _SQL_OLDEST_BEYOND + ")"
)
_SQL_DELETE_BEYOND = 'DELETE FROM "{table}" WHERE key IN (' + _SQL_OLDEST_BEYOND + ")"
_SQL_TEMPLATES = (
    _SQL_CREATE,
    _SQL_INDEX,
    _SQL_GET,
    _SQL_HAS,
    _SQL_PUT,
    _SQL_UPDATE,
    _SQL_TOUCH,
    _SQL_DELETE,
    _SQL_KEYS,
    _SQL_COUNT,
    _SQL_SUMMARY,
    _SQL_SUMMARY_EXPIRED,
    _SQL_DELETE_EXPIRED,
    _SQL_SUMMARY_BEYOND,
    _SQL_DELETE_BEYOND,
)

_REDIS_WRITE = """
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'mtime', ARGV[2])
if ARGV[3] ~= '' then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[5])
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[6])
return 1
"""
_REDIS_TOUCH = """
local mtime = redis.call('HGET', KEYS[1], 'mtime')
if not mtime or (ARGV[2] ~= '' and tonumber(mtime) < tonumber(ARGV[2])) then return 0 end
redis.call('HSET', KEYS[1], 'mtime', ARGV[1])
if ARGV[3] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[4])
return 1
"""
# Removes the expired, then the live ones past `keep`, each with its index
# member; members whose record is already gone go uncounted. Only a dry run
# sums the size of every record (seen_bytes is nil otherwise): a real clean
# must stay O(log N + removed), as the server serves no one while it runs.
_REDIS_SWEEP = """
local index, prefix, cutoff, keep = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local dry_run = ARGV[4] == '1'
local seen, seen_bytes, removed, removed_bytes = redis.call('ZCARD', index), false, 0, 0
local oldest = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')[2] or false
local newest = redis.call('ZREVRANGE', index, 0, 0, 'WITHSCORES')[2] or false
if dry_run then
    seen_bytes = 0
    for start = 0, seen - 1, 1000 do
        for _, member in ipairs(redis.call('ZRANGE', index, start, start + 999)) do
            seen_bytes = seen_bytes + redis.call('HSTRLEN', prefix .. member, 'data')
        end
    end
end
local function remove(members)
    for _, member in ipairs(members) do
        local name = prefix .. member
        local size = redis.call('HSTRLEN', name, 'data')
        if redis.call(dry_run and 'EXISTS' or 'DEL', name) == 1 then
            removed, removed_bytes = removed + 1, removed_bytes + size
        else
            seen = seen - 1
        end
        if not dry_run then redis.call('ZREM', index, member) end
    end
end
if cutoff ~= '' then remove(redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. cutoff)) end
if keep then
    local floor = cutoff ~= '' and cutoff or '-inf'
    remove(redis.call('ZREVRANGEBYSCORE', index, '+inf', floor, 'LIMIT', keep, -1))
end
return {seen, seen_bytes, removed, removed_bytes, oldest, newest}
"""


# -- Exceptions --


class SessionError(Exception):
    """Root of every error tinysession raises on its own account."""


class StoreError(SessionError, OSError):
    """The backing storage failed: file system, database or server.

    The message names the path (or address) and the cause; the original
    exception is chained as ``__cause__``.
    """


class RecordTooLarge(SessionError, ValueError):
    """A serialized record is larger than the store's ``max_bytes``."""


# -- Serializers --


class _JSONSerializer:
    """Compact UTF-8 JSON: dicts, lists, strings, numbers, booleans and None."""

    def __init__(self):
        self._encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
        self._decode = json.JSONDecoder().raw_decode

    def dumps(self, obj):
        return self._encode(obj).encode("utf-8")

    def loads(self, data):
        text = data.decode("utf-8")
        value, end = self._decode(text)
        if end != len(text):
            raise ValueError(f"extra data after the JSON value at offset {end}")
        return value


class _PickleSerializer:
    """Pickle at the highest protocol; only ever used on signed records."""

    def __init__(self):
        import pickle

        self._pickle = pickle

    def dumps(self, obj):
        return self._pickle.dumps(obj, protocol=self._pickle.HIGHEST_PROTOCOL)

    def loads(self, data):
        return self._pickle.loads(data)


# -- Private helpers --


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


def _check_count(value, name):
    """Return ``value`` if it is None or a non-negative int."""
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be a non-negative int, not {value!r}")
    return value


def _check_seconds(value, name):
    """Return ``value`` as a float if it is a non-negative number, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number of seconds, not {value!r}")
    return float(value)


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


class _Sweep:
    """What one pass of ``clean`` saw and removed (or would remove)."""

    def __init__(self):
        self.seen = 0
        self.seen_bytes = 0
        self.removed = 0
        self.removed_bytes = 0
        self.oldest = None
        self.newest = None


# -- Stores --


class _Store(MutableMapping):
    """The contract every store shares; subclasses do the I/O.

    Options, the same for every store (keyword only): ``serializer`` ("json",
    "pickle", or an object with ``dumps`` and ``loads``), ``secret`` (str or
    bytes; signs every record), ``max_age`` (seconds since the last write or
    touch), ``max_sessions`` (records kept) and ``max_bytes`` (largest
    serialized record; ``DEFAULT_MAX_BYTES`` unless given, None for no limit).

    A subclass implements ``_read``, ``_write``, ``_delete``, ``_has``,
    ``_touch``, ``_keys``, ``_sweep`` and ``_where``; everything about keys, records,
    signatures, sizes and the ``max_sessions`` bound lives here.
    """

    def __init__(
        self, *, serializer="json", secret=None, max_age=None, max_sessions=None, max_bytes=DEFAULT_MAX_BYTES
    ):
        self.serializer = _make_serializer(serializer, secret)
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        if secret is not None and (not isinstance(secret, bytes) or not secret):
            raise ValueError("secret must be a non-empty str or bytes")
        self._signing_key = None
        if secret is not None:
            import hashlib

            self._signing_key = hashlib.sha256(b"tinysession record\0" + secret).digest()
        self.max_age = _check_seconds(max_age, "max_age")
        self.max_sessions = _check_count(max_sessions, "max_sessions")
        self.max_bytes = _check_count(max_bytes, "max_bytes")
        self._write_lock = threading.Lock()
        self._writes_before_clean = 1

    # The mapping interface.

    def __getitem__(self, key):
        return self._load(key)[0]

    def __setitem__(self, key, record):
        self._save(_check_key(key), self._dumps(key, record))

    def __delitem__(self, key):
        if not self._delete(_check_key(key), self._cutoff(self.max_age, _now())):
            raise KeyError(key)

    def __contains__(self, key):
        return self._has(_check_key(key), self._cutoff(self.max_age, _now()))

    def __iter__(self):
        return iter(self._keys(self._cutoff(self.max_age, _now())))

    def __len__(self):
        return sum(1 for _ in self._keys(self._cutoff(self.max_age, _now())))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        """Release the store's resources; safe to call twice."""

    # Maintenance.

    def touch(self, key, *, now=None):
        """Set the record's mtime to ``now`` without rewriting it.

        Return True if the record exists and is live, False if it is missing
        or expired (an expired record is not brought back).
        """
        now = _now() if now is None else now
        return self._touch(_check_key(key), now, self._cutoff(self.max_age, now))

    def clean(self, max_age=None, keep=None, *, now=None):
        """Remove expired records, then all but the ``keep`` newest; return how many.

        ``max_age`` defaults to the store's ``max_age`` and ``keep`` to its
        ``max_sessions``; with neither, only debris (temporary files of killed
        writers) is removed. Debris is not counted. One pass over the records,
        in memory bounded by ``keep``.
        """
        return self._clean(max_age, keep, now=now).removed

    def _clean(self, max_age, keep, *, now=None, dry_run=False, progress=None):
        """Run ``_sweep`` with the defaults filled in and return its ``_Sweep``."""
        max_age = self.max_age if max_age is None else _check_seconds(max_age, "max_age")
        keep = self.max_sessions if keep is None else _check_count(keep, "keep")
        now = _now() if now is None else now
        return self._sweep(self._cutoff(max_age, now), keep, now, dry_run, progress)

    # Records.

    @staticmethod
    def _cutoff(max_age, now):
        """Return the oldest live mtime, or None when nothing expires."""
        return None if max_age is None else now - max_age

    def _dumps(self, key, record):
        """Serialize ``record``; raise RecordTooLarge past ``max_bytes``."""
        payload = self.serializer.dumps(record)
        if self.max_bytes is not None and len(payload) > self.max_bytes:
            raise RecordTooLarge(
                f"session record for key {key!r} is {len(payload)} bytes, "
                f"over max_bytes={self.max_bytes}"
            )
        return payload

    def _signature(self, key, payload):
        """Return the HMAC-SHA256 of the key and the payload, so a record cannot move to another key."""
        import hmac

        return hmac.digest(self._signing_key, key.encode("ascii") + b"\0" + payload, "sha256")

    def _seal(self, key, payload):
        """Return the bytes to store: the payload, signed when there is a secret."""
        if self._signing_key is None:
            return payload
        return self._signature(key, payload) + payload

    def _load(self, key):
        """Return ``(record, payload, mtime)``; KeyError if missing, expired or unreadable."""
        data, mtime = self._read(_check_key(key), self._cutoff(self.max_age, _now()))
        try:
            if self._signing_key is not None:
                import hmac

                payload = data[_SIGNATURE_BYTES:]
                if not hmac.compare_digest(data[:_SIGNATURE_BYTES], self._signature(key, payload)):
                    raise ValueError("bad signature")
            else:
                payload = data
            return self.serializer.loads(payload), payload, mtime
        except Exception as exc:  # noqa: BLE001 - any serializer, any damage: the record is unreadable
            _logger.warning("unreadable session record %s: %s: %s", self._where(key), type(exc).__name__, exc)
            raise KeyError(key) from None

    def _save(self, key, payload, must_exist=False):
        """Store an already serialized payload and hold ``max_sessions``.

        With ``must_exist``, write only over an existing record and return
        False if there is none (another request deleted it: a logout).
        """
        if not self._write(key, self._seal(key, payload), must_exist):
            return False
        if self.max_sessions is None:
            return True
        with self._write_lock:
            self._writes_before_clean -= 1
            due = self._writes_before_clean <= 0
            if due:
                self._writes_before_clean = max(10, self.max_sessions // 10)
        if due:
            try:
                self.clean()
            except StoreError:
                _logger.warning("cleaning after a write failed", exc_info=True)
        return True

    def _read_limit(self):
        """Return the largest stored record size worth reading, or None."""
        if self.max_bytes is None:
            return None
        return self.max_bytes + (_SIGNATURE_BYTES if self._signing_key is not None else 0)


class FileStore(_Store):
    """Store each record in its own file in one directory.

    Options: ``serializer``, ``secret``, ``max_age``, ``max_sessions`` and
    ``max_bytes``, as every store takes them (see the README's table).

    ``directory`` is created (mode 0700) if missing; record files are 0600 and
    named ``ts-<key>``. A write goes to a temporary file ``.ts-*.tmp`` in the
    same directory and is renamed over the record, so a reader sees the old
    record or the new one, never a partial one, even if the writer is killed.
    Files without the ``ts-`` prefix are never read or removed, and symbolic
    links are never followed.

    Threads and processes: any number of both may share one directory. The
    last write of a record wins. Records are not fsynced: a killed process
    loses nothing it finished writing, a power failure may lose the newest.
    """

    def __init__(self, directory, **options):
        super().__init__(**options)
        self.directory = os.fspath(directory)
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create session directory {self.directory!r}: {exc}") from exc

    def __repr__(self):
        return f"FileStore({self.directory!r})"

    def _path(self, key):
        return os.path.join(self.directory, _FILE_PREFIX + key)

    def _where(self, key):
        return self._path(key)

    def _read(self, key, cutoff):
        path = self._path(key)
        try:
            fd = os.open(path, _READ_FLAGS)
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                _logger.warning("session file %s is a symbolic link: ignored", path)
                raise KeyError(key) from None
            raise StoreError(f"cannot read session file {path!r}: {exc.strerror}") from exc
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                _logger.warning("session file %s is not a regular file: ignored", path)
                raise KeyError(key)
            if cutoff is not None and status.st_mtime < cutoff:
                raise KeyError(key)
            limit = self._read_limit()
            if limit is not None and status.st_size > limit:
                _logger.warning("session file %s is %d bytes, over the limit: ignored", path, status.st_size)
                raise KeyError(key)
            return os.read(fd, status.st_size), status.st_mtime
        except OSError as exc:
            raise StoreError(f"cannot read session file {path!r}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def _write(self, key, data, must_exist):
        path = self._path(key)
        if must_exist:
            # Narrows, without closing, the race with a concurrent delete.
            try:
                os.lstat(path)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise StoreError(f"cannot stat session file {path!r}: {exc.strerror}") from exc
        temp_path = os.path.join(self.directory, _TEMP_PREFIX + os.urandom(8).hex() + _TEMP_SUFFIX)
        try:
            fd = os.open(temp_path, _CREATE_FLAGS, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(temp_path, path)
        except BaseException as exc:
            try:
                os.unlink(temp_path)
            except OSError:
                pass  # never created, or the directory itself is gone
            if isinstance(exc, OSError):
                raise StoreError(f"cannot write session file {path!r}: {exc.strerror or exc}") from exc
            raise
        return True

    def _delete(self, key, cutoff):
        path = self._path(key)
        try:
            status = os.lstat(path)
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot remove session file {path!r}: {exc.strerror}") from exc
        return cutoff is None or status.st_mtime >= cutoff

    def _has(self, key, cutoff):
        try:
            status = os.lstat(self._path(key))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot stat session file {self._path(key)!r}: {exc.strerror}") from exc
        return stat.S_ISREG(status.st_mode) and (cutoff is None or status.st_mtime >= cutoff)

    def _touch(self, key, now, cutoff):
        path = self._path(key)
        try:
            status = os.lstat(path)
            if not stat.S_ISREG(status.st_mode) or (cutoff is not None and status.st_mtime < cutoff):
                return False
            os.utime(path, (now, now), follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot touch session file {path!r}: {exc.strerror}") from exc
        return True

    def _scan(self, directory_fd):
        """Yield ``(name, lstat)`` for each regular file with a store prefix.

        Names are relative to ``directory_fd``; files that vanish while the
        directory is read are skipped.
        """
        try:
            with os.scandir(directory_fd) as entries:
                for entry in entries:
                    if not entry.name.startswith((_FILE_PREFIX, _TEMP_PREFIX)):
                        continue
                    try:
                        status = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(status.st_mode):
                        yield entry.name, status
        except OSError as exc:
            raise StoreError(f"cannot list session directory {self.directory!r}: {exc.strerror}") from exc

    def _open_directory(self):
        """Return a file descriptor of the directory, for ``_scan`` and removals relative to it."""
        try:
            return os.open(self.directory, _DIRECTORY_FLAGS)
        except OSError as exc:
            raise StoreError(f"cannot open session directory {self.directory!r}: {exc.strerror}") from exc

    def _keys(self, cutoff):
        directory_fd = self._open_directory()
        try:
            for name, status in self._scan(directory_fd):
                if name.startswith(_FILE_PREFIX) and (cutoff is None or status.st_mtime >= cutoff):
                    key = name[len(_FILE_PREFIX) :]
                    if _is_key(key):
                        yield key
        finally:
            os.close(directory_fd)

    def _sweep(self, cutoff, keep, now, dry_run, progress):
        sweep = _Sweep()
        newest = []  # min-heap of (mtime, name, size): the `keep` newest so far
        directory_fd = self._open_directory()

        def remove(name, size):
            try:
                if not dry_run:
                    os.unlink(name, dir_fd=directory_fd)
            except FileNotFoundError:
                _logger.debug("already removed: %s", name)  # by another cleaner: not counted
            except OSError as exc:
                raise StoreError(f"cannot remove session file {name!r} in {self.directory!r}: {exc.strerror}") from exc
            else:
                sweep.removed += 1
                sweep.removed_bytes += size

        oldest = newest_mtime = None
        prefix_length = len(_FILE_PREFIX)
        try:
            for name, status in self._scan(directory_fd):
                mtime = status.st_mtime
                if name[0] == ".":
                    if name.endswith(_TEMP_SUFFIX) and mtime < now - _TEMP_MAX_AGE and not dry_run:
                        with contextlib.suppress(FileNotFoundError):  # another cleaner was first
                            os.unlink(name, dir_fd=directory_fd)
                    continue
                if not _is_key(name[prefix_length:]):
                    continue
                size = status.st_size
                sweep.seen += 1
                sweep.seen_bytes += size
                if oldest is None or mtime < oldest:
                    oldest = mtime
                if newest_mtime is None or mtime > newest_mtime:
                    newest_mtime = mtime
                if progress is not None and sweep.seen % 10000 == 0:
                    progress(sweep.seen)
                if (cutoff is not None and mtime < cutoff) or keep == 0:
                    remove(name, size)
                elif keep is not None:
                    item = (mtime, name, size)
                    if len(newest) < keep:
                        heapq.heappush(newest, item)
                    else:
                        _, old_name, old_size = heapq.heappushpop(newest, item)
                        remove(old_name, old_size)
            sweep.oldest, sweep.newest = oldest, newest_mtime
        finally:
            os.close(directory_fd)
        return sweep


class _ConnectionHolder:
    """One thread's SQLite connection, closed when the thread ends and drops it.

    A connection inherited through a fork is never closed by the child: it
    belongs to the parent.
    """

    __slots__ = ("__weakref__", "connection", "pid")

    def __init__(self, connection):
        self.connection = connection
        self.pid = os.getpid()

    def close(self):
        if self.pid == os.getpid():
            self.connection.close()

    __del__ = close


class SQLiteStore(_Store):
    """Store records in one table of an SQLite database.

    Options: ``serializer``, ``secret``, ``max_age``, ``max_sessions`` and
    ``max_bytes``, as every store takes them (see the README's table).

    The table (``key TEXT PRIMARY KEY, data BLOB, mtime REAL``, indexed on
    ``mtime``) is created on first use; the database runs in WAL mode with
    ``synchronous=NORMAL`` and waits up to five seconds for a lock.

    Threads and processes: each thread gets its own connection, opened on
    first use; any number of processes may open the same file. The last write
    of a record wins. Do not put the file on a network file system.
    """

    def __init__(self, path, *, table="sessions", **options):
        import sqlite3
        import weakref

        super().__init__(**options)
        if not isinstance(table, str) or re.fullmatch(_TABLE_PATTERN, table) is None:
            raise ValueError(f"invalid table name {table!r}: expected a letter or _, then [A-Za-z0-9_]")
        self.path = os.fspath(path)
        self.table = table
        self._sqlite3 = sqlite3
        self._sql = {template: template.format(table=table) for template in _SQL_TEMPLATES}
        self._local = threading.local()
        self._holders = weakref.WeakSet()
        self._holders_lock = threading.Lock()
        self._closed = False
        self._connection()

    def __repr__(self):
        return f"SQLiteStore({self.path!r}, table={self.table!r})"

    def close(self):
        """Close every thread's connection; safe to call twice."""
        with self._holders_lock:
            self._closed = True
            holders = list(self._holders)
        for holder in holders:
            holder.close()

    def _connection(self):
        """Return this thread's connection, opening it on first use (and anew after a fork)."""
        holder = getattr(self._local, "holder", None)
        if holder is not None and holder.pid == os.getpid():
            return holder.connection
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed")
        try:
            connection = self._sqlite3.connect(
                self.path, timeout=_SQLITE_BUSY_SECONDS, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(self._sql[_SQL_CREATE])
            connection.execute(self._sql[_SQL_INDEX])
        except self._sqlite3.Error as exc:
            raise StoreError(f"cannot open session database {self.path!r}: {exc}") from exc
        holder = _ConnectionHolder(connection)
        self._local.holder = holder
        with self._holders_lock:
            self._holders.add(holder)
        return connection

    def _execute(self, template, parameters=()):
        """Run one statement for this table and return its cursor; wrap database errors."""
        try:
            return self._connection().execute(self._sql[template], parameters)
        except self._sqlite3.Error as exc:
            raise StoreError(f"session database {self.path!r}: {exc}") from exc

    def _where(self, key):
        return f"{self.path} table {self.table} key {key!r}"

    @staticmethod
    def _floor(cutoff):
        return float("-inf") if cutoff is None else cutoff

    def _read(self, key, cutoff):
        limit = self._read_limit()
        row = self._execute(_SQL_GET, (2**62 if limit is None else limit, key, self._floor(cutoff))).fetchone()
        if row is None:
            raise KeyError(key)
        if row[0] is None:
            _logger.warning("session record %s is over the size limit: ignored", self._where(key))
            raise KeyError(key)
        return row

    def _write(self, key, data, must_exist):
        if must_exist:
            return self._execute(_SQL_UPDATE, (data, _now(), key)).rowcount > 0
        self._execute(_SQL_PUT, (key, data, _now()))
        return True

    def _delete(self, key, cutoff):
        live = self._has(key, cutoff)
        return self._execute(_SQL_DELETE, (key,)).rowcount > 0 and live

    def _has(self, key, cutoff):
        return self._execute(_SQL_HAS, (key, self._floor(cutoff))).fetchone() is not None

    def _touch(self, key, now, cutoff):
        return self._execute(_SQL_TOUCH, (now, key, self._floor(cutoff))).rowcount > 0

    def _keys(self, cutoff):
        return [row[0] for row in self._execute(_SQL_KEYS, (self._floor(cutoff),)).fetchall()]

    def __len__(self):
        return self._execute(_SQL_COUNT, (self._floor(self._cutoff(self.max_age, _now())),)).fetchone()[0]

    def _sweep(self, cutoff, keep, now, dry_run, progress):
        sweep = _Sweep()
        floor = self._floor(cutoff)
        connection = self._connection()
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                count, size, oldest, newest = connection.execute(self._sql[_SQL_SUMMARY]).fetchone()
                sweep.seen, sweep.seen_bytes, sweep.oldest, sweep.newest = count, int(size), oldest, newest
                batches = []
                if cutoff is not None:
                    batches.append((_SQL_SUMMARY_EXPIRED, _SQL_DELETE_EXPIRED, (cutoff,)))
                if keep is not None:
                    batches.append((_SQL_SUMMARY_BEYOND, _SQL_DELETE_BEYOND, (floor, keep)))
                for summary, delete, parameters in batches:
                    count, size = connection.execute(self._sql[summary], parameters).fetchone()
                    sweep.removed += count
                    sweep.removed_bytes += int(size)
                    if not dry_run:
                        connection.execute(self._sql[delete], parameters)
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        except self._sqlite3.Error as exc:
            raise StoreError(f"cannot clean session database {self.path!r}: {exc}") from exc
        return sweep

class RedisStore(_Store):
    """Store records in Redis, through a redis-py client that the caller owns.

    Options: ``serializer``, ``secret``, ``max_age``, ``max_sessions`` and
    ``max_bytes``, as every store takes them (see the README's table).

    ``RedisStore(redis.Redis(host="127.0.0.1"), prefix="session:", max_age=3600)``:
    the same contract and options as FileStore and SQLiteStore. The client
    must return bytes (``decode_responses=False``, the default); this module
    never imports redis.

    Layout: the record for ``key`` is the hash ``prefix + key`` with the fields
    ``data`` (the stored bytes) and ``mtime`` (a POSIX timestamp), so a read
    is one HMGET and a touch rewrites only ``mtime``. With ``max_age`` every
    write and touch also sets the hash's TTL to ``max_age``, so Redis removes
    expired records by itself; reads still check ``mtime``. The sorted set
    ``prefix + "#index"`` maps every key to its mtime: ``len()``, iteration
    and ``clean()`` use it (never KEYS or SCAN), and writes drop its members
    past ``max_age``, so stores sharing a prefix should share ``max_age``. A
    write, a touch and a clean are one Lua script each, and a delete is one
    MULTI/EXEC: atomic, index included, in one round trip. A clean costs the
    server O(log N + removed); a dry run also reads the size of every record.
    Keys without the prefix are never touched. Needs Redis 4 or later, not
    Redis Cluster; a maxmemory policy must not evict the index (use
    noeviction or a volatile-* one).

    Threads and processes: redis-py clients are thread-safe (each thread
    borrows a connection from the pool), and any number of processes and
    machines may share one server. The last write of a record wins. Any
    failure of the client or server raises StoreError; redis-py reconnects by
    itself, so the store works again once the server is back.
    """

    def __init__(self, client, *, prefix="session:", **options):
        super().__init__(**options)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        describe = getattr(client, "get_connection_kwargs", None)
        options = describe() if callable(describe) else {}
        if options.get("decode_responses"):
            raise ValueError("RedisStore needs a client that returns bytes: pass decode_responses=False")
        if "path" in options:
            self._address = f"unix://{options['path']}?db={options.get('db', 0)}"
        elif "host" in options:
            self._address = f"redis://{options['host']}:{options.get('port', 6379)}/{options.get('db', 0)}"
        else:
            self._address = type(client).__name__
        self.client = client
        self.prefix = prefix
        self._index = prefix + "#index"
        self._write_script = client.register_script(_REDIS_WRITE)
        self._touch_script = client.register_script(_REDIS_TOUCH)
        self._sweep_script = client.register_script(_REDIS_SWEEP)

    def __repr__(self):
        return f"RedisStore({self._address!r}, prefix={self.prefix!r})"

    def close(self):
        """Do nothing: the client belongs to the caller, who closes it. Safe to call twice."""

    def _call(self, function, *args):
        """Return ``function(*args)``; any failure of the client or server becomes a StoreError."""
        try:
            return function(*args)
        except Exception as exc:
            raise StoreError(f"{self!r}: {type(exc).__name__}: {exc}") from exc

    def _command(self, *command):
        return self._call(self.client.execute_command, *command)

    def _transaction(self, *commands):
        """Run the commands in one MULTI/EXEC round trip and return their replies."""

        def run():
            pipeline = self.client.pipeline(transaction=True)
            for command in commands:
                pipeline.execute_command(*command)
            return pipeline.execute()

        return self._call(run)

    def _ttl(self):
        return "" if self.max_age is None else max(1, round(self.max_age * 1000))

    @staticmethod
    def _number(value, none=""):
        """Return ``value`` as an exact decimal string for Redis, or ``none`` for None."""
        return none if value is None else repr(float(value))

    def _where(self, key):
        return f"{self!r} key {self.prefix + key!r}"

    def _read(self, key, cutoff):
        name = self.prefix + key
        data, mtime = self._command("HMGET", name, "data", "mtime")
        if data is None or mtime is None or (cutoff is not None and float(mtime) < cutoff):
            raise KeyError(key)
        limit = self._read_limit()
        if limit is not None and len(data) > limit:
            _logger.warning("session record %s is %d bytes, over the limit: ignored", self._where(key), len(data))
            raise KeyError(key)
        return data, float(mtime)

    def _write(self, key, data, must_exist):
        mtime = _now()
        cutoff = self._cutoff(self.max_age, mtime)
        arguments = [data, self._number(mtime), self._ttl(), int(must_exist), self._number(cutoff), key]
        return self._call(self._write_script, [self.prefix + key, self._index], arguments) == 1

    def _delete(self, key, cutoff):
        name = self.prefix + key
        commands = [("HGET", name, "mtime"), ("DEL", name), ("ZREM", self._index, key)]
        mtime, deleted, _ = self._transaction(*commands)
        return bool(deleted) and mtime is not None and (cutoff is None or float(mtime) >= cutoff)

    def _has(self, key, cutoff):
        mtime = self._command("HGET", self.prefix + key, "mtime")
        return mtime is not None and (cutoff is None or float(mtime) >= cutoff)

    def _touch(self, key, now, cutoff):
        arguments = [self._number(now), self._number(cutoff), self._ttl(), key]
        return self._call(self._touch_script, [self.prefix + key, self._index], arguments) == 1

    def _keys(self, cutoff):
        members = self._command("ZRANGEBYSCORE", self._index, self._number(cutoff, "-inf"), "+inf")
        return [member.decode("ascii") for member in members]

    def __len__(self):
        """Count the live records: the index members not older than ``max_age``."""
        floor = self._number(self._cutoff(self.max_age, _now()), "-inf")
        return self._command("ZCOUNT", self._index, floor, "+inf")

    def _sweep(self, cutoff, keep, now, dry_run, progress):
        arguments = [self.prefix, self._number(cutoff), "" if keep is None else keep, int(dry_run)]
        reply = self._call(self._sweep_script, [self._index], arguments)
        sweep = _Sweep()
        sweep.seen, sweep.seen_bytes, sweep.removed, sweep.removed_bytes = reply[:4]
        sweep.oldest, sweep.newest = (None if mtime is None else float(mtime) for mtime in reply[4:])
        return sweep



# -- Session --


def _new_session_id():
    """Return a fresh session id: 256 random bits, URL-safe base64 (43 characters)."""
    import secrets

    return secrets.token_urlsafe(32)


def _store_key(session_id):
    """Return the store key for ``session_id``: a one-way hash, so stored keys cannot be replayed."""
    import hashlib

    return hashlib.sha256(session_id.encode("ascii")).hexdigest()


def _cookie_values(header, name):
    """Return the values of every cookie called ``name`` in a Cookie header, in order.

    Tolerant: a malformed pair is skipped without hiding the pairs after it.
    Surrounding double quotes (allowed by RFC 6265) are removed.
    """
    if name not in header:
        return []
    values = []
    for pair in header.split(";"):
        pair_name, equals, value = pair.partition("=")
        if equals and pair_name.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            values.append(value)
    return values


class Session(MutableMapping):
    """One request's session: a dict loaded from the store on first use.

    Get it with ``get_session(environ)`` inside an app wrapped in
    ``SessionMiddleware``. Reading or writing loads it; a request that never
    touches it costs no store access and sets no cookie. Changes, nested ones
    included, are found by comparing the serialized record with the one
    loaded, and saved when the response is finished; nothing is saved if the
    app raises. A session that ends up empty is deleted and its cookie expired.

    A session belongs to one request and is not shared between threads.
    """

    __slots__ = (
        "_cookie_id",
        "_cookie_sent",
        "_created",
        "_data",
        "_dead_keys",
        "_environ",
        "_headers_sent",
        "_key",
        "_middleware",
        "_mtime",
        "_original",
        "_payload",
        "_stored",
    )

    def __init__(self, middleware, environ):
        self._middleware = middleware
        self._environ = environ
        self._data = None
        self._headers_sent = False

    def _loaded(self):
        """Return the session's data, loading it on first use."""
        if self._data is None:
            self._load()
        return self._data

    def __getitem__(self, name):
        return self._loaded()[name]

    def __setitem__(self, name, value):
        self._loaded()[name] = value

    def __delitem__(self, name):
        del self._loaded()[name]

    def __contains__(self, name):
        return name in self._loaded()

    def __iter__(self):
        return iter(self._loaded())

    def __len__(self):
        return len(self._loaded())

    def __repr__(self):
        return f"<Session {self._data!r}>" if self._data is not None else "<Session (not loaded)>"

    def regenerate(self):
        """Give the session a new id and keep its data: call it on login.

        The old id stops working when the response is finished. The creation
        time is kept, so ``max_lifetime`` still counts from the first id.
        Raises SessionError once the response has started, when the new
        cookie can no longer be sent.
        """
        self._loaded()
        if self._headers_sent:
            raise SessionError("regenerate() after start_response(): the new cookie cannot be sent")
        if self._key is not None:
            self._dead_keys.append(self._key)
        self._key = self._payload = self._cookie_id = None

    def invalidate(self):
        """Empty the session, delete it from the store and expire its cookie: logout.

        Anything written afterwards in the same request starts a new session
        with a new id.
        """
        self._loaded()
        if self._key is not None:
            self._dead_keys.append(self._key)
        self._data = {}
        self._key = self._payload = self._created = self._cookie_id = None

    def _load(self):
        middleware = self._middleware
        self._key = self._payload = self._mtime = self._created = self._cookie_id = None
        self._cookie_sent = False
        self._dead_keys = []
        self._original = (None, None)
        self._stored = False
        now = _now()
        tried = 0
        for value in _cookie_values(self._environ.get("HTTP_COOKIE", ""), middleware.cookie_name):
            self._cookie_sent = True
            if tried == _MAX_COOKIE_CANDIDATES or len(value) != _SESSION_ID_LENGTH or not _is_key(value):
                continue
            tried += 1
            key = _store_key(value)
            try:
                record, payload, mtime = middleware.store._load(key)
            except KeyError:
                continue
            if not (
                type(record) is dict
                and type(record.get("data")) is dict
                and isinstance(record.get("created"), (int, float))
            ):
                _logger.warning("session record %s is not a session: ignored", key)
                continue
            if middleware.max_lifetime is not None and now - record["created"] > middleware.max_lifetime:
                self._dead_keys.append(key)
                continue
            self._key, self._payload, self._mtime = key, payload, mtime
            self._created, self._cookie_id = record["created"], value
            self._original = (key, payload)
            self._data = record["data"]
            return
        self._data = {}

    def _response_headers(self, headers):
        """Add ``Vary: Cookie`` and the session's Set-Cookie to ``headers`` (a new list)."""
        middleware = self._middleware
        for index, (name, value) in enumerate(headers):
            if name.lower() == "vary":
                tokens = {token.strip().lower() for token in value.split(",")}
                if "cookie" not in tokens and "*" not in tokens:
                    headers[index] = (name, value + ", Cookie")
                break
        else:
            headers.append(("Vary", "Cookie"))
        if self._data:
            if self._key is None and self._cookie_id is None:
                self._cookie_id = _new_session_id()
            if self._key is None or middleware.cookie_max_age is not None:
                headers.append(middleware._set_cookie(self._environ, self._cookie_id))
        elif self._cookie_sent or self._cookie_id is not None:
            self._cookie_id = None
            headers.append(middleware._set_cookie(self._environ, None))
        return headers

    def _save(self):
        """Write, touch or delete the record as the request has left it so far.

        Safe to call again later in the request: it then writes only what
        changed since, which is how changes made while the body is produced
        are saved when the response is closed.
        """
        store = self._middleware.store
        for key in self._dead_keys:
            store._delete(key, None)
            self._stored = True
        self._dead_keys = []
        if not self._data:
            if self._key is not None:
                store._delete(self._key, None)
                self._key = self._payload = None
                self._stored = True
            return
        now = _now()
        if self._created is None:
            self._created = now
        if self._key is None and self._cookie_id is None:
            _logger.warning("session started after start_response(): no cookie was sent, not saved")
            return
        key = self._key if self._key is not None else _store_key(self._cookie_id)
        payload = store._dumps(key, {"created": self._created, "data": self._data})
        if self._key is None or payload != self._payload:
            if not store._save(key, payload, must_exist=self._key is not None):
                _logger.info("session %s was deleted by another request: changes dropped", key[:12])
                self._key = self._payload = None
                return
            self._key, self._payload, self._mtime = key, payload, now
            self._stored = True
        elif self._middleware.touch_interval is not None and now - self._mtime >= self._middleware.touch_interval:
            store.touch(key, now=now)
            self._mtime = now

    def _undo(self):
        """Put back the record as it was loaded, after the body failed; log, never raise."""
        if not self._stored:
            return
        store = self._middleware.store
        original_key, original_payload = self._original
        try:
            if self._key is not None and self._key != original_key:
                store._delete(self._key, None)
            if original_key is not None:
                store._save(original_key, original_payload, must_exist=original_key == self._key)
        except SessionError:
            _logger.exception("could not undo the session changes of a failed response")

# -- Chat history --

_INSTRUCTIONS, _USER, _REPLY, _RESULT = "instructions", "user", "reply", "result"
_ROLE_KINDS = {
    "system": _INSTRUCTIONS, "developer": _INSTRUCTIONS,
    "user": _USER, "human": _USER,
    "assistant": _REPLY, "ai": _REPLY,
    "tool": _RESULT, "function": _RESULT,
}
_REPLY_TYPES = frozenset({"reasoning", "mcp_list_tools", "mcp_approval_request", "item_reference"})
_PART_TEXT_KEYS = {
    "text": "text", "input_text": "text", "output_text": "text", "summary_text": "text",
    "reasoning_text": "text", "refusal": "refusal", "thinking": "thinking",
}


def trim_messages(messages, max_rounds=5, *, budget=None, count=None, max_chars=None):
    """Keep the leading instructions and the last ``max_rounds`` whole rounds.

    Takes Chat Completions, Responses / Agents SDK, Anthropic or LangChain
    dicts.  The leading ``system`` / ``developer`` messages are always kept.
    A round starts at a user turn (role ``user`` or ``human``, not carrying
    ``tool_result`` blocks, and not inside a tool call/result pair with the
    same id) and holds everything up to the next, so calls, results and
    reasoning stay with it.  Messages before the first round go first.

    With ``budget``, the oldest rounds are then dropped until the total,
    instructions included, is at most ``budget``; the newest round stays even
    alone over.  ``count(message) -> int >= 0`` measures a message (tokens,
    say); by default, its characters of text: str content, text parts of
    every kind, tool-call arguments and tool outputs (JSON length when not a
    str; images count 0).  ``max_chars=n`` is ``budget=n`` with that default.

    Returns a new list of the same message objects (the input's when nothing
    needs trimming or there is no round); never mutates ``messages``; linear.
    Raises TypeError for a non-sequence, a non-mapping item, a non-int limit
    or count result, ``count`` without ``budget`` or with ``max_chars``; ValueError
    for an unknown role or item type, ``max_rounds < 1``, a negative budget
    or count, or leading instructions alone over the budget.  Errors name
    the message index.

    >>> chat = [{"role": "developer", "content": "Be brief."}]
    >>> for n in range(3):
    ...     chat += [{"role": "user", "content": f"q{n}"},
    ...              {"role": "assistant", "content": f"a{n}"}]
    >>> [m["content"] for m in trim_messages(chat, max_rounds=1)]
    ['Be brief.', 'q2', 'a2']
    """
    if isinstance(messages, (str, bytes, bytearray)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a sequence, not {type(messages).__name__}")
    _check_limit("max_rounds", max_rounds, 1)
    budget, count = _budget_and_count(budget, count, max_chars)
    items = list(messages)
    kinds = [_message_kind(message, index) for index, message in enumerate(items)]
    lead = 0
    while lead < len(kinds) and kinds[lead] == _INSTRUCTIONS:
        lead += 1
    sizes = [] if budget is None else [_counted(count, m, i) for i, m in enumerate(items)]
    if budget is not None and sum(sizes[:lead]) > budget:
        raise ValueError(f"the leading instructions, messages[:{lead}], count {sum(sizes[:lead])}: "
                         f"over the budget of {budget}")
    starts = _round_starts(items, kinds, lead)
    if not starts or (len(starts) <= max_rounds and (budget is None or sum(sizes) <= budget)):
        return items
    first = max(len(starts) - max_rounds, 0)
    if budget is not None:
        first = _first_round_within(sizes, starts, first, budget - sum(sizes[:lead]))
    return items[:lead] + items[starts[first]:]


def _check_limit(name, value, minimum):
    """Raise unless ``value`` is an int of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _budget_and_count(budget, count, max_chars):
    """Return ``(budget, count)`` from trim_messages' keywords, checked; ``(None, None)`` for none."""
    if max_chars is not None:
        if budget is not None or count is not None:
            raise TypeError("max_chars=n is budget=n counting characters: give one or the other, "
                            "and count only with budget")
        budget, name = max_chars, "max_chars"
    else:
        name = "budget"
    if budget is None:
        if count is not None:
            raise TypeError("count is only used with a budget: pass budget= too")
        return None, None
    _check_limit(name, budget, 0)
    if count is not None and not callable(count):
        raise TypeError(f"count must be callable, not {type(count).__name__}")
    return budget, count or _message_chars


def _counted(count, message, index):
    """Return ``count(message)``, checked to be an int >= 0."""
    size = count(message)
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"count(messages[{index}]) must return an int, not {type(size).__name__}")
    if size < 0:
        raise ValueError(f"count(messages[{index}]) returned {size}, below 0")
    return size


def _message_kind(message, index):
    """Return whether ``message`` is instructions, a user turn, a reply or a tool result."""
    if not isinstance(message, Mapping):
        raise TypeError(f"messages[{index}] is not a mapping: {message!r}")
    role, item_type = message.get("role"), message.get("type")
    if role is None:
        if not isinstance(item_type, str) or item_type == "message":
            raise ValueError(f"messages[{index}] has no 'role' and no known 'type': "
                             f"keys {list(message)!r}")
        if item_type.endswith("_call_output") or item_type == "mcp_approval_response":
            return _RESULT
        if item_type.endswith("_call") or item_type in _REPLY_TYPES:
            return _REPLY
        raise ValueError(f"messages[{index}] has an unknown type {item_type!r}")
    kind = _ROLE_KINDS.get(role) if isinstance(role, str) else None
    if kind is None or item_type not in (None, "message"):
        raise ValueError(f"messages[{index}] has an unknown role {role!r} (type {item_type!r}); "
                         f"known roles: {', '.join(_ROLE_KINDS)}")
    if kind == _USER and any(_is_block(part, "tool_result") for part in _parts(message)):
        return _RESULT
    return kind


def _round_starts(items, kinds, lead):
    """Return the indexes of the user turns, from ``lead`` on, that no call/result pair spans."""
    spans = [0] * (len(items) + 1)
    call_at = {}
    for index, message in enumerate(items):
        calls, results = _tool_ids(message)
        for call_id in calls:
            call_at[call_id] = index
        for call_id in results:
            call = call_at.get(call_id)
            if call is not None and call < index:
                spans[call + 1] += 1
                spans[index + 1] -= 1
    starts, open_pairs = [], 0
    for index, kind in enumerate(kinds):
        open_pairs += spans[index]
        if index >= lead and kind == _USER and not open_pairs:
            starts.append(index)
    return starts


def _tool_ids(message):
    """Return the str ids of the tool calls ``message`` makes and of those it answers."""
    item_type = message.get("type")
    item_type = item_type if isinstance(item_type, str) else ""
    calls = [call.get("id") for call in _as_list(message.get("tool_calls")) if isinstance(call, Mapping)]
    calls += [block.get("id") for block in _parts(message) if _is_block(block, "tool_use")]
    results = [message.get("tool_call_id")]
    results += [block.get("tool_use_id") for block in _parts(message) if _is_block(block, "tool_result")]
    if item_type.endswith("_call"):
        calls.append(message.get("call_id"))
    elif item_type.endswith("_call_output"):
        results.append(message.get("call_id"))
    return ([i for i in calls if isinstance(i, str)], [i for i in results if isinstance(i, str)])


def _first_round_within(sizes, starts, first, room):
    """Return the oldest round from ``first`` on whose tail fits ``room``; at most the newest."""
    total = sum(sizes[starts[first]:])
    while total > room and first < len(starts) - 1:
        total -= sum(sizes[starts[first]:starts[first + 1]])
        first += 1
    return first


def _as_list(value):
    """Return ``value`` if it is a list or tuple, else an empty tuple."""
    return value if isinstance(value, (list, tuple)) else ()


def _parts(message):
    """Return the parts or blocks of a message's list content, or an empty tuple."""
    return _as_list(message.get("content"))


def _is_block(part, block_type):
    """Return whether ``part`` is a mapping of type ``block_type``."""
    return isinstance(part, Mapping) and part.get("type") == block_type


def _message_chars(message):
    """Return the characters of text in ``message``, as ``trim_messages`` counts them by default."""
    total = _content_length(message.get("content"))
    for call in _as_list(message.get("tool_calls")):
        if isinstance(call, Mapping):
            function = call.get("function")
            total += _value_length(function.get("arguments") if isinstance(function, Mapping)
                                   else call.get("args"))
    legacy_call = message.get("function_call")
    if isinstance(legacy_call, Mapping):
        total += _value_length(legacy_call.get("arguments"))
    for key in ("arguments", "output", "summary"):
        total += _content_length(message.get(key))
    return total


def _content_length(content):
    """Return the characters of text in a content value: a str, a list of parts, or other."""
    if isinstance(content, (list, tuple)):
        return sum(_part_length(part) for part in content)
    return _value_length(content)


def _part_length(part):
    """Return the characters of text in one content part or block."""
    if isinstance(part, str):
        return len(part)
    if not isinstance(part, Mapping):
        return 0
    part_type = part.get("type")
    if part_type == "tool_use":
        return _value_length(part.get("input"))
    if part_type == "tool_result":
        return _content_length(part.get("content"))
    key = _PART_TEXT_KEYS.get(part_type) if isinstance(part_type, str) else None
    text = part.get(key) if key else None
    return len(text) if isinstance(text, str) else 0


def _value_length(value):
    """Return the length of a str, 0 for None, else the length of its JSON."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    return len(json.dumps(value, ensure_ascii=False, default=str))


# -- Middleware --


def get_session(environ, environ_key="tinysession"):
    """Return the request's Session from a WSGI ``environ``.

    Raises SessionError when the app is not wrapped in SessionMiddleware (or
    the middleware was given another ``environ_key``).
    """
    try:
        return environ[environ_key]
    except KeyError:
        raise SessionError(
            f"no session at environ[{environ_key!r}]: wrap the app in tinysession.SessionMiddleware"
        ) from None


class _SessionBody:
    """The app's response body: saves later session changes when the server closes it.

    If producing the body raises, changes saved when the app returned are
    undone, so a failed request leaves the session as it found it.
    """

    __slots__ = ("_body", "_failed", "_middleware", "_session")

    def __init__(self, body, session, middleware):
        self._body = body
        self._session = session
        self._middleware = middleware
        self._failed = False

    def __iter__(self):
        try:
            yield from self._body
        except Exception:
            self._failed = True
            if self._session._data is not None:
                self._session._undo()
            raise

    def close(self):
        close = getattr(self._body, "close", None)
        if close is not None:
            close()
        if not self._failed:
            self._middleware._finish(self._session)


class SessionMiddleware:
    """Give every request of a WSGI app a server-side session.

    ``app = SessionMiddleware(app, store)`` wraps any WSGI app; inside it,
    ``get_session(environ)`` returns the request's Session. ``store`` is a
    FileStore, SQLiteStore or RedisStore; its ``max_age`` is the idle timeout.

    Options: ``cookie_name``, ``path``, ``domain`` (sent only when given),
    ``secure`` (None: when the request came over https), ``httponly``,
    ``samesite`` ("Lax", "Strict", "None" which forces Secure, or None to
    omit it), ``cookie_max_age`` (seconds; None for a browser-session cookie),
    ``max_lifetime`` (seconds since the session was created, after which it
    is discarded however recently used), ``touch_interval`` (seconds between
    mtime refreshes of a session read but not changed; None never),
    ``clean_interval`` (seconds between background cleans of the store in
    this process; None never) and ``environ_key``.

    The session id is 256 random bits; the store only sees its SHA-256, and a
    cookie the server did not issue, or whose session is gone, is never
    adopted. Thread-safe; several processes may share one store, and then the
    last write of a session wins.
    """

    def __init__(
        self,
        app,
        store,
        *,
        cookie_name="session",
        path="/",
        domain=None,
        secure=None,
        httponly=True,
        samesite="Lax",
        cookie_max_age=None,
        max_lifetime=None,
        touch_interval=60,
        clean_interval=300,
        environ_key="tinysession",
    ):
        import http.cookies

        if not isinstance(store, _Store):
            raise TypeError(f"store must be a FileStore, SQLiteStore or RedisStore, not {store!r}")
        if (
            not isinstance(cookie_name, str)
            or re.fullmatch(_TOKEN_PATTERN, cookie_name) is None
            or cookie_name.lower() in http.cookies.Morsel._reserved
        ):
            raise ValueError(f"invalid cookie name {cookie_name!r}")
        for name, value in (("path", path), ("domain", domain)):
            if (value is not None or name == "path") and (
                not isinstance(value, str) or re.fullmatch(_ATTRIBUTE_PATTERN, value) is None
            ):
                raise ValueError(f"invalid cookie {name} {value!r}")
        if samesite is not None:
            if str(samesite).capitalize() not in ("Lax", "Strict", "None"):
                raise ValueError(f"samesite must be 'Lax', 'Strict', 'None' or None, not {samesite!r}")
            samesite = samesite.capitalize()
        if secure not in (None, True, False):
            raise ValueError(f"secure must be None, True or False, not {secure!r}")
        self.app = app
        self.store = store
        self.cookie_name = cookie_name
        self.path = path
        self.domain = domain
        self.secure = secure
        self.httponly = bool(httponly)
        self.samesite = samesite
        self.cookie_max_age = _check_count(cookie_max_age, "cookie_max_age")
        if cookie_max_age == 0:
            raise ValueError("cookie_max_age must be at least 1 second, or None for a browser-session cookie")
        self.max_lifetime = _check_seconds(max_lifetime, "max_lifetime")
        self.touch_interval = _check_seconds(touch_interval, "touch_interval")
        self.clean_interval = _check_seconds(clean_interval, "clean_interval")
        self.environ_key = environ_key
        self._morsel_class = http.cookies.Morsel
        self._next_clean = None if clean_interval is None else 0.0
        self._clean_lock = threading.Lock()

    def __call__(self, environ, start_response):
        session = Session(self, environ)
        environ[self.environ_key] = session

        def session_start_response(status, headers, exc_info=None):
            session._headers_sent = True
            if session._data is not None:
                headers = session._response_headers(list(headers))
            return start_response(status, headers, exc_info)

        body = self.app(environ, session_start_response)
        if type(body) is list or type(body) is tuple:
            self._finish(session)
            return body
        if session._data is not None:
            try:
                session._save()
            except BaseException:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
                raise
        return _SessionBody(body, session, self)

    def _finish(self, session):
        """Save a loaded session, then start a background clean when one is due."""
        if session._data is not None:
            session._save()
        if self._next_clean is not None and _now() >= self._next_clean:
            self._start_clean()

    def _start_clean(self):
        if not self._clean_lock.acquire(blocking=False):
            return
        self._next_clean = _now() + self.clean_interval
        try:
            threading.Thread(target=self._clean, name="tinysession-clean", daemon=True).start()
        except RuntimeError:
            self._clean_lock.release()
            _logger.exception("could not start the background clean")

    def _clean(self):
        try:
            removed = self.store.clean()
            _logger.debug("background clean of %r removed %d sessions", self.store, removed)
        except Exception:
            _logger.exception("background clean of %r failed", self.store)
        finally:
            self._clean_lock.release()

    def _set_cookie(self, environ, session_id):
        """Return the Set-Cookie header for ``session_id``, or one that expires the cookie."""
        morsel = self._morsel_class()
        morsel.set(self.cookie_name, session_id or "", session_id or "")
        morsel["path"] = self.path
        if self.domain is not None:
            morsel["domain"] = self.domain
        secure = self.secure if self.secure is not None else environ.get("wsgi.url_scheme") == "https"
        if secure or self.samesite == "None":
            morsel["secure"] = True
        if self.httponly:
            morsel["httponly"] = True
        if self.samesite is not None:
            morsel["samesite"] = self.samesite
        if session_id is None:
            morsel["max-age"] = 0
            morsel["expires"] = "Thu, 01 Jan 1970 00:00:00 GMT"
        elif self.cookie_max_age is not None:
            morsel["max-age"] = self.cookie_max_age
        return ("Set-Cookie", morsel.OutputString())


# -- Command line --

_DURATION_PATTERN = r"(\d+(?:\.\d+)?)([smhd]?)"
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SQLITE_HEADER = b"SQLite format 3\0"
_CLI_EXAMPLES = """examples:
  python -m tinysession clean /var/lib/myapp/sessions --max-age 7d --quiet
  python -m tinysession clean /var/lib/myapp/sessions.db --keep 10000 --dry-run
  python -m tinysession stats redis://127.0.0.1:6379/0 --max-age 12h --json

STORE is a session directory (FileStore), an SQLite database (SQLiteStore), or
a redis:// URL (RedisStore; needs redis-py). DURATION is seconds, or a number
with s, m, h or d: 90, 30m, 12h, 7d.
"""


def _duration(text):
    """Parse ``90``, ``30m``, ``12h`` or ``7d`` into seconds (argparse type)."""
    import argparse

    match = re.fullmatch(_DURATION_PATTERN, text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected e.g. 90, 30m, 12h or 7d")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _count(text):
    """Parse a non-negative whole number (argparse type)."""
    import argparse

    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a whole number >= 0")
    return int(text)


def _table_name(text):
    """Check an SQLite table name (argparse type)."""
    import argparse

    if re.fullmatch(_TABLE_PATTERN, text) is None:
        raise argparse.ArgumentTypeError(f"invalid table name {text!r}: expected a letter or _, then [A-Za-z0-9_]")
    return text


def _format_bytes(size):
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000


def _format_time(timestamp):
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _open_store(spec, table, prefix):
    """Open the store at ``spec`` without creating anything; SessionError if there is none."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        try:
            import redis
        except ImportError:
            raise SessionError(f"{spec}: Redis stores need redis-py: pip install redis") from None
        try:
            client = redis.Redis.from_url(spec)
        except ValueError as exc:
            raise SessionError(f"{spec}: invalid Redis URL: {exc}") from None
        return RedisStore(client, prefix=prefix)
    if os.path.isdir(spec):
        return FileStore(spec)
    try:
        with open(spec, "rb") as file:
            header = file.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        raise SessionError(f"{spec}: no such directory or file") from None
    except OSError as exc:
        raise StoreError(f"cannot read {spec!r}: {exc.strerror}") from exc
    if header != _SQLITE_HEADER:
        raise SessionError(f"{spec}: neither a session directory nor an SQLite database")
    import sqlite3

    try:
        with sqlite3.connect(f"file:{spec}?mode=ro", uri=True, timeout=_SQLITE_BUSY_SECONDS) as connection:
            columns = {row[1] for row in connection.execute("SELECT * FROM pragma_table_info(?)", (table,))}
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read session database {spec!r}: {exc}") from exc
    if not columns:
        raise SessionError(f"{spec}: no table {table!r} (is --table right?)")
    if not {"key", "data", "mtime"} <= columns:
        raise SessionError(f"{spec}: table {table!r} is not a session table: its columns are {sorted(columns)}")
    return SQLiteStore(spec, table=table)


def _progress_printer(stream):
    """Return a progress callback that rewrites one line of ``stream``, or None if it is no terminal."""
    if not stream.isatty():
        return None

    def show(count):
        stream.write(f"\rscanned {count} sessions...")
        stream.flush()

    return show


def _cmd_clean(args):
    store = _open_store(args.store, args.table, args.prefix)
    with store:
        progress = None if args.quiet else _progress_printer(sys.stderr)
        started = time.perf_counter()
        sweep = store._clean(args.max_age, args.keep, dry_run=args.dry_run, progress=progress)
        elapsed = time.perf_counter() - started
    if progress is not None:
        sys.stderr.write("\r\033[K")
    if args.dry_run:
        print(
            f"would remove {sweep.removed} of {sweep.seen} sessions ({_format_bytes(sweep.removed_bytes)}),"
            f" keep {sweep.seen - sweep.removed}; dry run, nothing removed"
        )
    elif not args.quiet:
        print(
            f"removed {sweep.removed} of {sweep.seen} sessions ({_format_bytes(sweep.removed_bytes)})"
            f" in {elapsed:.2f} s, kept {sweep.seen - sweep.removed}"
        )
    return 0


def _cmd_stats(args):
    store = _open_store(args.store, args.table, args.prefix)
    with store:
        sweep = store._clean(args.max_age, None, dry_run=True)
    expired = sweep.removed if args.max_age is not None else None
    if args.json:
        print(
            json.dumps(
                {
                    "store": args.store,
                    "sessions": sweep.seen,
                    "bytes": sweep.seen_bytes,
                    "oldest": sweep.oldest,
                    "newest": sweep.newest,
                    "max_age": args.max_age,
                    "expired": expired,
                }
            )
        )
        return 0
    print(f"store:    {args.store}")
    print(f"sessions: {sweep.seen}")
    print(f"size:     {_format_bytes(sweep.seen_bytes)} ({sweep.seen_bytes} bytes)")
    print(f"oldest:   {_format_time(sweep.oldest)}")
    print(f"newest:   {_format_time(sweep.newest)}")
    if expired is not None:
        print(f"expired:  {expired} older than {args.max_age:g} s")
    return 0


def _parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tinysession",
        description="Clean and inspect tinysession stores.",
        epilog=_CLI_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in (
        ("clean", "remove expired sessions, then all but the newest N"),
        ("stats", "count sessions, bytes, oldest and newest, and how many are past a max age"),
    ):
        command = commands.add_parser(
            name, help=summary, description=summary, epilog=_CLI_EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_argument("store", metavar="STORE", help="session directory, SQLite file or redis:// URL")
        command.add_argument("--max-age", type=_duration, metavar="DURATION", help="sessions older than this")
        command.add_argument("--table", type=_table_name, default="sessions", help="SQLite table (default: sessions)")
        command.add_argument("--prefix", default="session:", help="Redis key prefix (default: session:)")
        if name == "clean":
            command.add_argument("--keep", type=_count, metavar="N", help="then keep only the N newest")
            command.add_argument("--dry-run", action="store_true", help="report, remove nothing")
            command.add_argument("--quiet", action="store_true", help="print nothing on success (cron)")
        else:
            command.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv=None):
    """Run the command line; return the exit status (0 done, 1 failed, 2 usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "clean" and args.max_age is None and args.keep is None:
            parser.error("clean needs --max-age, --keep or both; it will not guess what to remove")
    except SystemExit as exit:  # argparse exits for --help and usage errors; return the status instead
        return exit.code
    try:
        return _cmd_clean(args) if args.command == "clean" else _cmd_stats(args)
    except SessionError as exc:
        print(f"python -m tinysession: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
