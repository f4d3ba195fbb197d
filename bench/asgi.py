"""Requests/s of one Starlette app under uvicorn with each session middleware, and the thread hop's cost.

Usage: ``python bench/asgi.py [--seconds 5]`` (needs starlette, uvicorn,
itsdangerous, and wrk on PATH; RedisStore rows need redis-server and redis-py).
Each row serves ``GET /`` (reads the session, adds one to a counter) on
127.0.0.1 with one uvicorn worker, driven by ``wrk -t2 -c32`` with one
session cookie. Prints a Markdown table.
"""

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

SERVER = r"""
import sys
sys.path.insert(0, {root!r})
import uvicorn, tinysession
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

async def count(request):
    session = request.session
    session["n"] = session.get("n", 0) + 1
    return PlainTextResponse(str(session["n"]))

app = Starlette(routes=[Route("/", count)])
kind = {kind!r}
if kind == "starlette":
    from starlette.middleware.sessions import SessionMiddleware
    app.add_middleware(SessionMiddleware, secret_key="bench")
elif kind == "sqlite":
    app.add_middleware(tinysession.ASGISessionMiddleware, store=tinysession.SQLiteStore({path!r}))
elif kind == "redis":
    import redis
    client = redis.Redis(unix_socket_path={path!r})
    app.add_middleware(tinysession.ASGISessionMiddleware, store=tinysession.RedisStore(client))
uvicorn.run(app, host="127.0.0.1", port={port}, log_level="error", access_log=False)
"""


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url, seconds=20):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return urllib.request.urlopen(url, timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def requests_per_second(kind, path, seconds):
    port = free_port()
    code = SERVER.format(root=os.path.join(HERE, ".."), kind=kind, path=path, port=port)
    server = subprocess.Popen([sys.executable, "-c", code])
    try:
        response = wait_for(f"http://127.0.0.1:{port}/")
        cookie = (response.headers.get("Set-Cookie") or "").split(";")[0]
        command = ["wrk", "-t2", "-c32", f"-d{seconds}s", f"http://127.0.0.1:{port}/"]
        if cookie:
            command[1:1] = ["-H", f"Cookie: {cookie}"]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        return float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
    finally:
        server.terminate()
        server.wait()


def hop_microseconds(count=20000):
    """Return the mean extra microseconds of one call run as the middleware runs store I/O: in a thread pool."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(32)

    async def measure():
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        for _ in range(count):
            await loop.run_in_executor(pool, int)
        return (time.perf_counter() - start) / count * 1e6

    return asyncio.run(measure())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="tinysession-bench-asgi-")
    rows = [("Starlette's signed-cookie SessionMiddleware", "starlette", ""),
            ("tinysession ASGISessionMiddleware, SQLiteStore", "sqlite", os.path.join(work, "s.db"))]
    redis_server = shutil.which("redis-server")
    if redis_server:
        sock = os.path.join(work, "redis.sock")
        redis = subprocess.Popen([redis_server, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no"],
                                 stdout=subprocess.DEVNULL)
        while not os.path.exists(sock):
            time.sleep(0.05)
        rows.append(("tinysession ASGISessionMiddleware, RedisStore", "redis", sock))
    try:
        print("| middleware (Starlette app, uvicorn, wrk -t2 -c32) | requests/s |")
        print("| --- | ---: |")
        for label, kind, path in rows:
            print(f"| {label} | {requests_per_second(kind, path, args.seconds):,.0f} |", flush=True)
        print(f"\nthread hop (run_in_executor of a no-op): {hop_microseconds():.1f} µs per store call")
    finally:
        if redis_server:
            redis.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
