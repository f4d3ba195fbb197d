"""The tinysession wiring for Bottle: run ``python examples/bottle_app.py``."""

import os
import sys
import tempfile

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
    directory = os.path.join(tempfile.mkdtemp(prefix="tinysession-bottle-"), "sessions")
    bottle.run(make_app(tinysession.FileStore(directory, max_age=3600)), host="127.0.0.1", port=8000)
