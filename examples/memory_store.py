"""An in-process store written only against tinysession's store hooks: five for records, six for logs.

    store = MemoryStore(max_age=3600)
    app = tinysession.SessionMiddleware(app, store)

Records live in a dict guarded by one lock, so every hook is atomic against
the other threads of the process. They vanish with the process and no other
process sees them: use it in tests, or as the template of a store of your own.

Needs nothing but the standard library. ``python examples/memory_store.py
[--port N]`` from a checkout serves a visit counter on it at
http://127.0.0.1:8000/.
"""

import argparse
import os
import sys
import threading
from wsgiref.simple_server import make_server

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tinysession


class MemoryStore(tinysession.Store):
    """Keep records as ``key -> (data, mtime)`` in a dict; every option of ``tinysession.Store`` applies."""

    def __init__(self, **options):
        super().__init__(**options)
        self._records = {}
        self._logs = {}
        self._lock = threading.Lock()

    def read(self, key):
        with self._lock:
            return self._records[key]

    def write(self, key, data, mtime, expected=None):
        with self._lock:
            if expected is not None and self._records.get(key, (None,))[0] != expected:
                return False
            self._records[key] = (bytes(data), mtime)
            return True

    def remove(self, key, expected=None):
        with self._lock:
            if key not in self._records or expected not in (None, self._records[key][0]):
                return False
            del self._records[key]
            return True

    def set_mtime(self, key, mtime):
        with self._lock:
            if key not in self._records:
                return False
            self._records[key] = (self._records[key][0], mtime)
            return True

    def scan(self):
        with self._lock:
            return [(key, mtime, len(data)) for key, (data, mtime) in self._records.items()]

    def log_append(self, key, lines):
        with self._lock:
            log = self._logs.setdefault(key, [])
            log.extend(bytes(line) for line in lines)
            return len(log)

    def log_read(self, key, start=0, stop=None):
        with self._lock:
            return self._logs.get(key, [])[start:stop]

    def log_length(self, key):
        with self._lock:
            return len(self._logs.get(key, ()))

    def log_trim(self, key, start, stop, expected):
        with self._lock:
            if len(self._logs.get(key, ())) != expected:
                return False
            del self._logs[key][start:stop]
            return True

    def log_remove(self, key):
        with self._lock:
            return self._logs.pop(key, None) is not None

    def log_scan(self):
        with self._lock:
            return [(key, sum(map(len, lines))) for key, lines in self._logs.items()]


def visits(environ, start_response):
    """Count this session's visits: a WSGI app to wrap in SessionMiddleware."""
    session = tinysession.get_session(environ)
    session["visits"] = session.get("visits", 0) + 1
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
    return [f"visits: {session['visits']}\n".encode()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="the port on 127.0.0.1 (default: 8000)")
    server = make_server("127.0.0.1", parser.parse_args().port, tinysession.SessionMiddleware(visits, MemoryStore()))
    print(f"serving http://127.0.0.1:{server.server_port}/ (sessions in memory); Ctrl-C stops", file=sys.stderr)
    server.serve_forever()
