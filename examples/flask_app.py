"""The tinysession wiring for Flask: run ``python examples/flask_app.py``.

Flask's own ``session`` is a signed cookie; this app keeps its data on the
server instead and reaches it through the WSGI environ.
"""

import os
import sys
import tempfile

from flask import Flask, request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tinysession


def make_app(store):
    """Return a Flask app whose sessions live in ``store``."""
    app = Flask(__name__)
    app.wsgi_app = tinysession.SessionMiddleware(app.wsgi_app, store)

    @app.route("/")
    def visits():
        session = tinysession.get_session(request.environ)
        session["visits"] = session.get("visits", 0) + 1
        return f"visits: {session['visits']}\n"

    @app.route("/logout", methods=["POST"])
    def logout():
        tinysession.get_session(request.environ).invalidate()
        return "bye\n"

    return app


if __name__ == "__main__":
    directory = os.path.join(tempfile.mkdtemp(prefix="tinysession-flask-"), "sessions")
    make_app(tinysession.FileStore(directory, max_age=3600)).run(host="127.0.0.1", port=8000)
