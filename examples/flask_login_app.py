"""Flask-Login over tinysession: ``python examples/flask_login_app.py [--port N]``.

Needs Flask and Flask-Login (``pip install flask flask-login``). Run it from a
checkout, open http://127.0.0.1:8000/ and log in at /login?user=ann; every
page has a "Log out" button. Logging in or out changes the session id and
removes the old record (the interface's ``identity_key``, Flask-Login's
``_user_id``), so an id planted before login is worthless afterwards.
"""

import argparse
import os
import secrets
import sys
import tempfile

from flask import Flask, request, session
from flask_login import LoginManager, UserMixin, current_user, login_required, login_user, logout_user

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tinysession

USERS = ("ann", "bob")
LOGOUT_FORM = '<form method="post" action="/logout"><button type="submit">Log out</button></form>\n'


class User(UserMixin):
    def __init__(self, name):
        self.id = name


def create_app(store=None):
    """Return a Flask app with Flask-Login whose sessions live in ``store`` (a FileStore by default)."""
    if store is None:
        directory = tempfile.mkdtemp(prefix="tinysession-login-")
        store = tinysession.FileStore(directory, max_age=3600, serializer=tinysession.TaggedJSON())
    app = Flask(__name__)
    app.secret_key = os.environ.get("SECRET_KEY") or secrets.token_hex(32)
    app.session_interface = tinysession.FlaskSessionInterface(store)
    login_manager = LoginManager(app)
    login_manager.user_loader(lambda name: User(name) if name in USERS else None)

    @app.route("/")
    def home():
        session["visits"] = session.get("visits", 0) + 1
        name = current_user.id if current_user.is_authenticated else "stranger"
        return f"hello {name}, visit {session['visits']}\n" + LOGOUT_FORM

    @app.route("/login")
    def login():
        name = request.args.get("user", "")
        if name not in USERS:  # a real app checks a password here
            return "unknown user\n", 403
        login_user(User(name))
        return f"logged in as {name}\n" + LOGOUT_FORM

    @app.route("/private")
    @login_required
    def private():
        return f"private page of {current_user.id}\n" + LOGOUT_FORM

    @app.route("/logout", methods=["POST"])
    def logout():
        logout_user()
        return 'bye\n<a href="/">home</a>\n'

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="the port on 127.0.0.1 (default: 8000)")
    create_app().run(host="127.0.0.1", port=parser.parse_args().port)
