"""Where the CPU of a Flask read of a 1 KB session on SQLiteStore goes, against the same view without sessions.

    python bench/profile_read.py [--requests N] [--reps R] [--top K]

In process, no HTTP server: each request is one call of the Flask app's WSGI
callable with an environ prepared once (werkzeug's EnvironBuilder), the
session cookie in it, so the figures are Flask's and tinysession's alone
(section 5 of bench/run.py adds gunicorn's parsing and the socket to every
row). Four views, timed in CPU µs per request (time.process_time; the
median of R repetitions, the views interleaved):

- plain /ping: a Flask app without sessions, a view that returns a constant;
- plain /read: the same app, a view that answers from a chat history of 7
  messages (1,053 bytes as compact JSON) held in a module global, as section
  5's /read answers from the session: the same view without sessions;
- tinysession /ping: FlaskSessionInterface on SQLiteStore (TaggedJSON, as
  section 5), the session cookie sent, the view never touches the session;
- tinysession /read: the same, the view reads the history from flask.session.

Then each tinysession view under cProfile beside its plain twin, and the
functions the session adds, by own time per request (profiled µs are
inflated about 2-3x by cProfile itself: read them as shares, not as times).
The tinysession.py of the folder above this script is the one measured.
"""

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import run  # bench/run.py: the same app, history and secret as section 5

import tinysession

run.tinysession = tinysession
MESSAGES = run.HTTP_SIZES["1 KB"]


def build_apps(directory):
    """Return (pieces(), {view name: (app, environ)} for the four views)."""
    import flask
    from werkzeug.test import EnvironBuilder

    history = run.chat_history(MESSAGES)
    plain = run.http_flask_app()
    plain.add_url_rule("/read", "read", lambda: run.read_answer(history["messages"]))

    def configure(app):
        app.secret_key = run.FLASK_SECRET
        store = tinysession.SQLiteStore(os.path.join(directory, "s.sqlite3"), max_age=86400, max_bytes=None,
                                        serializer=tinysession.TaggedJSON())
        app.session_interface = tinysession.FlaskSessionInterface(store)

    sessions = run.http_flask_app(lambda: flask.session, configure)
    client = sessions.test_client()
    client.get(f"/login?n={MESSAGES}")
    cookie = client.get_cookie(sessions.config["SESSION_COOKIE_NAME"])
    header = {"Cookie": f"{cookie.key}={cookie.value}"}

    def environ(path, headers=None):
        return EnvironBuilder(path=path, headers=headers).get_environ()

    pieces_of_read = pieces(sessions, cookie.value)
    return pieces_of_read, {
        "plain /ping": (plain, environ("/ping")),
        "plain /read": (plain, environ("/read")),
        "tinysession /ping": (sessions, environ("/ping", header)),
        "tinysession /read": (sessions, environ("/read", header)),
    }


def pieces(app, cookie):
    """Return [(label, zero-argument callable)]: the steps of a session read, each alone.

    They reach private names of tinysession.py (a step whose name is gone is left out): what is
    timed is the function the request runs, on the request's own cookie, key and bytes.
    """
    from werkzeug.http import parse_cookie

    store = app.session_interface.store
    (key, _mtime, _size), = store.scan()
    data, _mtime = store.read(key)
    record = store.decode(key, data)
    header = f"{app.config['SESSION_COOKIE_NAME']}={cookie}"
    cookie_keys = getattr(tinysession, "_cookie_keys", None)
    verify = getattr(tinysession, "_verify_cookie", None)
    snapshot = getattr(tinysession, "_snapshot", None)
    steps = [("werkzeug parse_cookie of the Cookie header", lambda: parse_cookie(header))]
    if cookie_keys is not None:
        steps.append(("_cookie_keys(app): the HMAC keys derived from SECRET_KEY (SHA-256 each)",
                      lambda: cookie_keys(app)))
        if verify is not None:
            keys = cookie_keys(app)
            steps.append(("_verify_cookie: the cookie's HMAC checked", lambda: verify(cookie, keys)))
    steps += [
        ("store.load(key): the whole store read below", lambda: store.load(key)),
        ("store.read(key): the SQLite SELECT", lambda: store.read(key)),
        ("store.decode(key, bytes): TaggedJSON loads of the record", lambda: store.decode(key, data)),
        ("json.loads of the same bytes (for comparison)", lambda: run.json.loads(data)),
    ]
    if snapshot is not None:
        steps.append(("_snapshot(session dict): marshal image for change detection (twice per read)",
                      lambda: snapshot(record["data"])))
    return steps


def time_pieces(steps, count, reps):
    """Return [(label, median CPU µs per call)]."""
    figures = {label: [] for label, _ in steps}
    for _ in range(reps):
        for label, step in steps:
            step()
            started = time.process_time()
            for _ in range(count):
                step()
            figures[label].append((time.process_time() - started) * 1e6 / count)
    return [(label, statistics.median(values)) for label, values in figures.items()]


# (owner, attribute, label): what instrumented() times inside a request; nested rows are inside the row above.
HOOKS = [
    ("FlaskSessionInterface", "open_session", "open_session: cookie parsed, keys derived, HMAC checked"),
    ("module", "_cookie_keys", "  _cookie_keys: the HMAC keys derived (SHA-256 each)"),
    ("module", "_verify_cookie", "  _verify_cookie: the cookie's HMAC checked"),
    ("_FlaskSession", "__init__", "  _FlaskSession(): the session core's object"),
    ("Session", "load", "Session.load (first use of flask.session): the store read below, checks, snapshot"),
    ("Store", "load", "  Store.load: SELECT, decode (TaggedJSON)"),
    ("Session", "__getitem__", "Session.__getitem__ (the view's reads, load included)"),
    ("FlaskSessionInterface", "save_session", "save_session: Vary, change detection, no write"),
    ("module", "_snapshot", "  _snapshot (marshal image), every call"),
]


def instrumented(app, environ, count):
    """Return [(label, calls per request, CPU µs per request)] of the HOOKS in ``count`` requests, the
    requests' CPU µs with the wrappers, and what one wrapped call adds to the row that contains it.

    Each hook is wrapped to add its CPU time (time.process_time_ns) to its row. That clock is a system
    call (about 1 µs on a VM), so a row holds its own calls' clock reads and those of the wrapped
    calls nested in it: the last figure, measured on a wrapped no-op, is that cost per call.
    """
    spent = {label: 0 for _owner, _name, label in HOOKS}
    calls = dict(spent)
    originals = []
    for owner_name, name, label in HOOKS:
        owner = tinysession if owner_name == "module" else getattr(tinysession, owner_name, None)
        original = getattr(owner, name, None) if owner is not None else None
        if original is None or (owner_name != "module" and name not in vars(owner)):
            continue

        def wrapper(*args, _original=original, _label=label, **options):
            calls[_label] += 1
            started = time.process_time_ns()
            try:
                return _original(*args, **options)
            finally:
                spent[_label] += time.process_time_ns() - started

        originals.append((owner, name, original))
        setattr(owner, name, wrapper)
    try:
        call(app, environ)
        for label in spent:
            spent[label] = calls[label] = 0
        started = time.process_time_ns()
        for _ in range(count):
            call(app, environ)
        total = (time.process_time_ns() - started) / 1000 / count
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    rows = [(label, calls[label] / count, spent[label] / 1000 / count) for label in spent]
    return rows, total, clock_cost(count)


def clock_cost(count):
    """Return the CPU µs one wrapped call adds to an enclosing row: a wrapper like instrumented()'s on a no-op."""
    spent = [0]

    def nothing():
        pass

    def wrapper(_original=nothing):
        started = time.process_time_ns()
        try:
            return _original()
        finally:
            spent[0] += time.process_time_ns() - started

    started = time.process_time_ns()
    for _ in range(count):
        wrapper()
    return (time.process_time_ns() - started) / 1000 / count


def call(app, environ):
    """One request: the WSGI call, its body read and closed as a server would."""
    status = []
    body = app(dict(environ), lambda code, headers, exc_info=None: status.append(code))
    try:
        for _chunk in body:
            pass
    finally:
        getattr(body, "close", lambda: None)()
    if not status or not status[0].startswith("200"):
        raise AssertionError(f"{environ['PATH_INFO']}: {status}")


def cpu_per_request(app, environ, count):
    started = time.process_time()
    for _ in range(count):
        call(app, environ)
    return (time.process_time() - started) * 1e6 / count


def profile(app, environ, count):
    """Return (pstats' stats dict, profiled µs per request) of ``count`` requests under cProfile."""
    call(app, environ)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(count):
        call(app, environ)
    profiler.disable()
    stats = pstats.Stats(profiler)
    return stats.stats, stats.total_tt * 1e6 / count


def short(key):
    path, line, function = key
    if path == "~":
        return function
    return f"{os.path.basename(path)}:{line}({function})"


def interesting(key):
    """tinysession's functions, and the C calls a session adds: HMAC, marshal, json, sqlite3."""
    path, _line, function = key
    if path.endswith("tinysession.py"):
        return True
    return path == "~" and any(word in function for word in ("hmac", "marshal", "sqlite3", "json", "_hashlib"))


def print_profile(view, twin, stats, total, twin_total, cpu, count, top):
    """The functions a session's request spends in, cumulative, as shares of it and in estimated CPU µs."""
    print(f"## {view} under cProfile ({count:,} requests): {total:.1f} profiled µs per request against "
          f"{twin_total:.1f} for {twin}\n")
    print(f"share = the function's cumulative time (callees included) over the request's profiled total; "
          f"est. µs = share × the view's unprofiled {cpu:.1f} CPU µs. Nested rows overlap.\n")
    print("| function | calls / request | cumulative profiled µs | share | est. µs |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rows = sorted((key for key in stats if interesting(key)), key=lambda key: stats[key][3], reverse=True)
    for key in rows[:top]:
        calls, cumulative = stats[key][1] / count, stats[key][3] * 1e6 / count
        share = cumulative / total
        print(f"| {short(key)} | {calls:.1f} | {cumulative:.1f} | {share:.0%} | {share * cpu:.1f} |")
    print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="requests per view and repetition")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (median)")
    parser.add_argument("--top", type=int, default=25, help="functions listed")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    directory = tempfile.mkdtemp(prefix="tinysession-profile-")
    try:
        steps, apps = build_apps(directory)
        for app, environ in apps.values():
            cpu_per_request(app, environ, 200)  # warm-up
        figures = {name: [] for name in apps}
        for rep in range(args.reps):
            for name in run.rotated(list(apps), rep):
                run.settle()
                figures[name].append(cpu_per_request(*apps[name], args.requests))
        medians = {name: statistics.median(values) for name, values in figures.items()}
        print(f"## CPU µs per request, in process (median of {args.reps} x {args.requests:,}), "
              f"1-minute load {os.getloadavg()[0]:.2f}\n")
        print("| view | CPU µs | × plain /ping | × plain /read |")
        print("| --- | ---: | ---: | ---: |")
        for name, value in medians.items():
            print(f"| {name} | {value:.1f} | {value / medians['plain /ping']:.2f}x | "
                  f"{value / medians['plain /read']:.2f}x |")
        print()
        print("## The steps of a session read, each alone (CPU µs per call, median of "
              f"{args.reps} x {args.requests:,})\n")
        print("| step | CPU µs |")
        print("| --- | ---: |")
        for label, value in time_pieces(steps, args.requests, args.reps):
            print(f"| {label} | {value:.1f} |")
        print()
        rows, total, cost = instrumented(*apps["tinysession /read"], args.requests)
        print(f"## tinysession /read, hooks timed inside the request (CPU µs per request, {args.requests:,} "
              f"requests: {total:.1f} µs each with the wrappers, {medians['tinysession /read']:.1f} without; "
              f"plain /read {medians['plain /read']:.1f})\n")
        print(f"Each wrapped call costs about {cost:.1f} µs of clock reads, counted in every row that contains it "
              "(its own included): subtract that many per call of the row and of the rows nested in it.\n")
        print("| inside the request | calls / request | CPU µs |")
        print("| --- | ---: | ---: |")
        for label, calls, value in rows:
            print(f"| {label} | {calls:.1f} | {value:.1f} |")
        print()
        for twin, view in (("plain /ping", "tinysession /ping"), ("plain /read", "tinysession /read")):
            _, twin_total = profile(*apps[twin], args.requests)
            stats, total = profile(*apps[view], args.requests)
            print_profile(view, twin, stats, total, twin_total, medians[view], args.requests, args.top)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
