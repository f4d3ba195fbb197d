"""flask.session kept on the server by tinysession.

Needs Flask (``pip install flask``). Run ``python examples/flask_app.py
[--port N]`` from a checkout, or ``flask --app examples/flask_app run``, and
open http://127.0.0.1:8000/. Sessions go to a temporary directory unless
``TINYSESSION_DIR`` names one; ``SECRET_KEY`` signs the session cookie (a
random one if unset, so a restart logs everyone out).
"""

import argparse
import os
import secrets
import sys
import tempfile

from flask import Flask, session

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tinysession


def create_app(store=None):
    """Return a Flask app whose ``flask.session`` lives in ``store`` (a FileStore by default)."""
    if store is None:
        directory = os.environ.get("TINYSESSION_DIR") or tempfile.mkdtemp(prefix="tinysession-flask-")
        store = tinysession.FileStore(directory, max_age=3600, serializer=tinysession.TaggedJSON())
    app = Flask(__name__)
    app.secret_key = os.environ.get("SECRET_KEY") or secrets.token_hex(32)
    app.session_interface = tinysession.FlaskSessionInterface(store)

    @app.route("/")
    def visits():
        session["visits"] = session.get("visits", 0) + 1
        return f"visits: {session['visits']}\n"

    @app.route("/logout", methods=["POST"])
    def logout():
        session.clear()
        return "bye\n"

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="the port on 127.0.0.1 (default: 8000)")
    create_app().run(host="127.0.0.1", port=parser.parse_args().port)
