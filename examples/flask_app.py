"""flask.session kept on the server by tinysession.

Run ``python examples/flask_app.py`` or ``flask --app examples/flask_app run``.
Sessions go to a temporary directory unless ``TINYSESSION_DIR`` names one;
``SECRET_KEY`` signs the session cookie (a random one if unset, so a restart
logs everyone out).
"""

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
        store = tinysession.FileStore(directory, max_age=3600)
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
    create_app().run(host="127.0.0.1", port=8000)
