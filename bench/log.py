"""Cost of appending one message to a chat of 10, 100 and 1,000 messages, per store.

Three ways, each per store: ``MessageLog.extend`` (the log), rewriting the
whole session record (``store[key] = {"messages": [...]}``, the old recipe),
and the raw limit (one SQLite ``INSERT``, one ``RPUSH``, one ``write`` with
``O_APPEND``). Run ``python bench/log.py [--redis-port N]``; prints a Markdown
table of microseconds per append (median of the repeats).
"""

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tinysession

MESSAGE = {"role": "user", "content": "x" * 200}
SIZES = (10, 100, 1000)
REPEATS = 200


def timed(function):
    """Return the median microseconds of ``REPEATS`` calls of ``function``."""
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def stores(directory, redis_port):
    yield "FileStore", tinysession.FileStore(os.path.join(directory, "files"), max_bytes=None)
    yield "SQLiteStore", tinysession.SQLiteStore(os.path.join(directory, "s.db"), max_bytes=None)
    if redis_port:
        import redis

        yield "RedisStore", tinysession.RedisStore(redis.Redis(port=redis_port), prefix="bench:", max_bytes=None)


def raw_append(name, store, directory):
    """Return a function doing the raw limit's one append for ``store``."""
    line = tinysession._LOG_ENCODER.encode(MESSAGE).encode() + b"\n"
    if name == "FileStore":
        fd = os.open(os.path.join(directory, "raw.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return lambda: os.write(fd, line)
    if name == "SQLiteStore":
        connection = sqlite3.connect(os.path.join(directory, "raw.db"), isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("CREATE TABLE IF NOT EXISTS m (seq INTEGER PRIMARY KEY, key TEXT, line BLOB)")
        return lambda: connection.execute("INSERT INTO m (key, line) VALUES ('k', ?)", (line,))
    return lambda: store.client.rpush("bench:raw", line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-port", type=int, help="a redis-server on 127.0.0.1 to include")
    args = parser.parse_args(argv)
    print("| store | history | log (µs) | rewrite (µs) | raw limit (µs) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as directory:
        for name, store in stores(directory, args.redis_port):
            raw = timed(raw_append(name, store, directory))
            for size in SIZES:
                log = tinysession.MessageLog(store, f"log{size}")
                log.clear()
                log.extend([MESSAGE] * size)
                record = {"messages": [MESSAGE] * size}
                store[f"rec{size}"] = record

                def rewrite(key=f"rec{size}", record=record, store=store):
                    record["messages"].append(MESSAGE)
                    del record["messages"][0]
                    store[key] = record

                print(f"| {name} | {size:,} | {timed(lambda log=log: log.extend([MESSAGE])):.0f} | "
                      f"{timed(rewrite):.0f} | {raw:.0f} |")
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
