"""A chat page whose history lives in a server-side session.

Run ``python examples/chat.py`` and open http://127.0.0.1:8000/. The
"assistant" echoes; the history is trimmed to the last few rounds with
``tinysession.trim_messages``. Sessions go to a temporary directory unless
``--store`` names a directory (FileStore) or a ``.db`` file (SQLiteStore).
"""

import argparse
import html
import os
import sys
import tempfile
import urllib.parse
from wsgiref.simple_server import make_server

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tinysession

SYSTEM_PROMPT = {"role": "system", "content": "You are an echo. You repeat what you are told."}
MAX_ROUNDS = 5

PAGE = """<!doctype html>
<meta charset="utf-8"><title>tinysession chat</title>
<h1>tinysession chat</h1>
<ol>{items}</ol>
<form method="post" action="/"><input name="message" autofocus> <button>Send</button></form>
<form method="post" action="/logout"><button>Forget me</button></form>
"""


def make_app(store):
    """Return the chat as a WSGI app wrapped in SessionMiddleware over ``store``."""

    def chat(environ, start_response):
        session = tinysession.get_session(environ)
        if environ["REQUEST_METHOD"] == "POST":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            form = urllib.parse.parse_qs(environ["wsgi.input"].read(size).decode("utf-8", "replace"))
            if environ["PATH_INFO"] == "/logout":
                session.invalidate()
            else:
                text = form.get("message", [""])[0].strip()[:2000]
                if text:
                    history = session.get("messages") or [SYSTEM_PROMPT]
                    history.append({"role": "user", "content": text})
                    history.append({"role": "assistant", "content": f"You said: {text}"})
                    session["messages"] = tinysession.trim_messages(history, MAX_ROUNDS)
            start_response("303 See Other", [("Location", "/")])
            return [b""]
        items = "".join(
            f"<li><b>{html.escape(message['role'])}</b>: {html.escape(message['content'])}</li>"
            for message in session.get("messages", [])[1:]
        )
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        return [PAGE.format(items=items).encode("utf-8")]

    return tinysession.SessionMiddleware(chat, store)


def open_store(spec):
    """Return a SQLiteStore for a ``.db`` path, else a FileStore for a directory."""
    if spec.endswith((".db", ".sqlite", ".sqlite3")):
        return tinysession.SQLiteStore(spec, max_age=3600)
    return tinysession.FileStore(spec, max_age=3600)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="a session directory, or an SQLite file ending in .db")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    store_spec = args.store or os.path.join(tempfile.mkdtemp(prefix="tinysession-chat-"), "sessions")
    with make_server("127.0.0.1", args.port, make_app(open_store(store_spec))) as server:
        print(f"chat on http://127.0.0.1:{server.server_port}/ (sessions in {store_spec}); Ctrl-C stops")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
