"""The tinysession wiring for Bottle: any WSGI app, wrapped in SessionMiddleware.

Needs Bottle (``pip install bottle``). Run ``python examples/bottle_app.py
[--port N]`` from a checkout and open http://127.0.0.1:8000/. Sessions go to
a new temporary directory.
"""

import argparse
import os
import sys
import tempfile
from wsgiref.simple_server import make_server

import bottle

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tinysession


def make_app(store):
    """Return a Bottle app, wrapped so that its sessions live in ``store``."""
    app = bottle.Bottle()

    @app.route("/")
    def visits():
        session = tinysession.get_session(bottle.request.environ)
        session["visits"] = session.get("visits", 0) + 1
        return f"visits: {session['visits']}\n"

    @app.route("/logout", method="POST")
    def logout():
        tinysession.get_session(bottle.request.environ).invalidate()
        return "bye\n"

    return tinysession.SessionMiddleware(app, store)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="the port on 127.0.0.1 (default: 8000)")
    port = parser.parse_args().port
    directory = os.path.join(tempfile.mkdtemp(prefix="tinysession-bottle-"), "sessions")
    server = make_server("127.0.0.1", port, make_app(tinysession.FileStore(directory, max_age=3600)))
    print(f"serving http://127.0.0.1:{server.server_port}/ (sessions in {directory}); Ctrl-C stops", file=sys.stderr)
    server.serve_forever()
