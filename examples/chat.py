"""A small chat whose history lives in a server-side session.

Run ``python examples/chat.py`` and open http://127.0.0.1:8000/. The
"assistant" echoes, streaming its reply in a few words at a time (with
JavaScript; without it the form posts and the page reloads). The history is
the session's message log, ``session.history``: each message is appended in
place, and the log is trimmed to the last ``MAX_ROUNDS`` rounds as it grows,
so no request rewrites the whole chat; the page says what the session holds. Sessions are kept in
``<temp dir>/tinysession-chat`` (one fixed directory, so history survives a
restart) unless ``--store`` names a directory (FileStore) or a ``.db`` file
(SQLiteStore). ``--port`` picks the port (8000; 0 for any free one).

Needs nothing but the standard library. The page's "What the server holds"
panel shows the session as the store keeps it: the record, its file or row,
the last lines of its log, refreshed while a reply streams; "Log in" calls
``regenerate()`` and shows the id change.
"""

import argparse
import base64
import contextlib
import errno
import hashlib
import html
import json
import os
import re
import socketserver
import sys
import tempfile
import time
import urllib.parse
from wsgiref.simple_server import WSGIServer, make_server

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tinysession

SYSTEM_PROMPT = {"role": "system", "content": "You are an echo. You repeat what you are told."}
MAX_ROUNDS = 5
MAX_MESSAGE_CHARS = 2000
MAX_BODY_BYTES = 64 * 1024
IDLE_SECONDS = 86400
STREAM_PIECE_SECONDS = 0.05
STREAM_TOTAL_SECONDS = 1.0
ROUTES = {"/": ("GET", "HEAD", "POST"), "/reply": ("POST",), "/forget": ("POST",), "/login": ("POST",),
          "/server": ("GET",)}
LOG_LINES_SHOWN = 3

STYLE = """
:root { color-scheme: light dark; --bg: #f5f6f8; --fg: #1c2230; --muted: #5b6676; --accent: #2f6fde;
  --bubble: #fff; --line: #d7dce4; }
@media (prefers-color-scheme: dark) { :root { --bg: #15181d; --fg: #e5e8ee; --muted: #9ba5b3;
  --accent: #3f7cea; --bubble: #22262d; --line: #363d48; } }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 42rem; padding: 1rem; background: var(--bg); color: var(--fg);
  font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
h1 { font-size: 1.4rem; margin: 0; }
header p { margin: .25rem 0 1rem; color: var(--muted); }
#chat { display: flex; flex-direction: column; gap: .5rem; }
.msg { max-width: 85%; padding: .5rem .8rem; border-radius: 1rem; white-space: pre-wrap;
  overflow-wrap: anywhere; }
.msg small { display: block; font-size: .75rem; opacity: .8; }
.user { align-self: flex-end; background: var(--accent); color: #fff; border-bottom-right-radius: .3rem; }
.assistant { align-self: flex-start; background: var(--bubble); border: 1px solid var(--line);
  border-bottom-left-radius: .3rem; }
.note, .empty { color: var(--muted); font-size: .875rem; text-align: center; margin: .25rem 0; }
.notice { background: #e3f4e7; color: #1b5a2a; padding: .5rem .8rem; border-radius: .8rem; }
#send { display: flex; flex-wrap: wrap; gap: .5rem; margin: 1rem 0; }
#send label { width: 100%; font-weight: 600; }
textarea { flex: 1; min-width: 0; font: inherit; padding: .5rem .8rem; border: 1px solid var(--line);
  border-radius: .8rem; background: var(--bubble); color: inherit; resize: vertical; }
button { font: inherit; padding: .5rem 1rem; border: 0; border-radius: .8rem; background: var(--accent);
  color: #fff; cursor: pointer; }
button:disabled { opacity: .6; }
#session { border-top: 1px solid var(--line); margin-top: 1.5rem; color: var(--muted); font-size: .875rem; }
#session h2 { font-size: 1rem; color: var(--fg); margin-bottom: .25rem; }
#session ul { padding-left: 1.2rem; }
#session button { background: #c03a3a; }
#session form { display: inline-block; margin-right: .5rem; }
#session #login button { background: var(--accent); }
#server p { overflow-wrap: anywhere; }
#server pre { white-space: pre-wrap; overflow-wrap: anywhere; background: var(--bubble); padding: .5rem;
  border: 1px solid var(--line); border-radius: .5rem; font-size: .8rem; }
.error { background: #fbe3e3; color: #8a1f1f; padding: .5rem .8rem; border-radius: .8rem; }
code { overflow-wrap: anywhere; }
"""

SCRIPT = """
const form = document.getElementById("send"), box = document.getElementById("message");
function bubble(role, label, text) {
  const div = document.createElement("div"), small = document.createElement("small");
  div.className = "msg " + role;
  small.textContent = label;
  div.append(small, text);
  document.getElementById("chat").append(div);
  return div;
}
box.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
});
async function refresh(ids) {
  const response = await fetch(ids.length === 1 ? "/server" : "/");
  if (!response.ok) throw new Error("the server answered " + response.status);
  const page = new DOMParser().parseFromString(await response.text(), "text/html");
  for (const id of ids) document.getElementById(id).replaceWith(page.getElementById(id));
}
form.addEventListener("submit", async (event) => {
  const text = box.value.trim(), error = document.getElementById("error");
  event.preventDefault();
  if (!text) return;
  form.querySelector("button").disabled = true;
  error.hidden = true;
  document.querySelector("#chat .empty")?.remove();
  const user = bubble("user", "You", text), reply = bubble("assistant", "Echo", "");
  box.value = "";
  try {
    const response = await fetch("/reply", {method: "POST", body: new URLSearchParams({message: text})});
    if (!response.ok) throw new Error("the server answered " + response.status + " " + response.statusText);
    await refresh(["server"]);  // the message is in the log already; the reply joins it at the stream's end
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    for (let part = await reader.read(); !part.done; part = await reader.read()) {
      reply.lastChild.textContent += part.value;
      reply.scrollIntoView({block: "end"});
    }
    await refresh(["chat", "session", "server"]);
  } catch (failure) {
    user.remove();
    reply.remove();
    if (!box.value) box.value = text;
    const reason = failure instanceof TypeError ? "the server cannot be reached (is it running?)" : failure.message;
    error.textContent = "Your message was not sent: " + reason + ". Your text is kept: press Send to try again.";
    error.hidden = false;
  } finally {
    form.querySelector("button").disabled = false;
    box.focus();
  }
});
"""


def _sha256_source(text):
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


SECURITY_HEADERS = [
    (
        "Content-Security-Policy",
        (
            f"default-src 'none'; style-src {_sha256_source(STYLE)}; script-src {_sha256_source(SCRIPT)}; "
            "connect-src 'self'; form-action 'self'; img-src data:; base-uri 'none'; frame-ancestors 'none'"
        ),
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
]

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="data:,">
<style>{style}</style>
</head>
<body>
<header><h1>tinysession chat</h1><p>An echo bot whose conversation lives in a server-side session.</p></header>
{body}
</body>
</html>
"""

CHAT = """{notice}<main id="chat" aria-live="polite">
{messages}
</main>
<p id="error" class="error" role="alert" hidden></p>
<form id="send" method="post" action="/">
<label for="message">Your message</label>
<textarea id="message" name="message" rows="2" maxlength="{limit}" required autofocus
 placeholder="Say something; Enter sends, Shift+Enter starts a new line"></textarea>
<button type="submit">Send</button>
</form>
<section id="session" aria-labelledby="session-title">
<h2 id="session-title">What your session holds</h2>
<ul>{facts}</ul>
<form method="post" action="/forget"><button type="submit">Forget me</button></form>
<form id="login" method="post" action="/login"><button type="submit">Log in as ann</button></form>
</section>
{server}
<script>{script}</script>"""


def history(session):
    """Return the session's message log, trimmed to the last ``MAX_ROUNDS`` rounds on append."""
    log = session.history
    log.max_rounds = MAX_ROUNDS
    return log


def add_message(session, role, content):
    """Append a message to the session's log; raises RecordTooLarge, writing nothing, past the store's limit.

    A ``user`` message starts a round; ``session["rounds"]`` counts every round
    ever sent, so the page can say how many were trimmed. A model would be
    given ``[SYSTEM_PROMPT, *history(session).read()]``.
    """
    history(session).append({"role": role, "content": content})
    if role == "user":
        session["rounds"] = session.get("rounds", 0) + 1


def echo(text, length):
    """Return the assistant's reply to ``text``, saying so when a message of ``length`` was cut."""
    if length > MAX_MESSAGE_CHARS:
        return f"You said (the first {MAX_MESSAGE_CHARS:,} of your {length:,} characters): {text}"
    return f"You said: {text}"


def stream_reply(session, reply):
    """Yield ``reply`` a few words at a time, then add it to the session.

    The session changes while the response streams; the middleware saves it
    when the server closes the body, even if the client went away mid-reply.
    """
    pieces = re.findall(r"\s*\S+", reply)
    pause = min(STREAM_PIECE_SECONDS, STREAM_TOTAL_SECONDS / max(len(pieces), 1))
    try:
        for piece in pieces:
            yield piece.encode("utf-8")
            time.sleep(pause)
    finally:
        add_message(session, "assistant", reply)


def read_message(environ):
    """Return ``(text, length)`` from the posted form: the stripped text cut to the limit, its full length.

    Returns None when the body is over ``MAX_BODY_BYTES``.
    """
    size = int(environ.get("CONTENT_LENGTH") or 0)
    if size > MAX_BODY_BYTES:
        return None
    form = urllib.parse.parse_qs(environ["wsgi.input"].read(size).decode("utf-8", "replace"))
    text = form.get("message", [""])[0].strip()
    return text[:MAX_MESSAGE_CHARS], len(text)


def render_messages(session):
    """Return the history as HTML, each round numbered from the first ever sent."""
    messages = history(session).read() if session.get("rounds") else []
    kept = sum(message["role"] == "user" for message in messages)
    trimmed = session.get("rounds", kept) - kept
    parts = []
    if trimmed:
        first = "Round 1 was" if trimmed == 1 else f"Rounds 1–{trimmed} were"
        parts.append(f'<p class="note">{first} trimmed: the session keeps the last {MAX_ROUNDS}.</p>')
    elif not messages:
        parts.append('<p class="empty">No messages yet. Say something and the echo answers.</p>')
    number = trimmed
    for message in messages:
        if message["role"] == "user":
            number += 1
            label = f"You · round {number}"
        else:
            label = "Echo"
        role = "user" if message["role"] == "user" else "assistant"
        parts.append(f'<div class="msg {role}"><small>{label}</small>{html.escape(message["content"])}</div>')
    return "\n".join(parts), kept, trimmed


def render_chat(session, store_label, notice="", server=""):
    """Return the chat page for ``session`` as bytes."""
    messages, kept, trimmed = render_messages(session)
    facts = [
        (
            f"{kept} round{'s' * (kept != 1)} kept, at most {MAX_ROUNDS}; "
            f"{trimmed} older round{'s' * (trimmed != 1)} trimmed."
        ),
        f"Stored in {html.escape(store_label)}, kept a day after your last visit.",
        "Your browser holds only a random id, in an HttpOnly, SameSite=Lax cookie that scripts cannot read.",
    ]
    body = CHAT.format(
        notice=f'<p class="notice" role="status">{notice}</p>\n' if notice else "",
        messages=messages,
        limit=MAX_MESSAGE_CHARS,
        facts="".join(f"<li>{fact}</li>" for fact in facts),
        server=server,
        script=SCRIPT,
    )
    return PAGE.format(title="tinysession chat", style=STYLE, body=body).encode("utf-8")


def render_server(session, store):
    """Return the "What the server holds" panel: the record, where it lives, the last lines of its log."""
    if not session:  # loads it; an empty session has no record (and the page must not make one)
        return '<section id="server"><h2>What the server holds</h2><p>Nothing: no session yet.</p></section>'
    key = session.history.key  # the session's store key: the SHA-256 of its id, for the record and the log
    try:
        record = json.dumps(store[key], indent=1, ensure_ascii=False)
    except KeyError:
        record = "(not saved yet)"
    if isinstance(store, tinysession.FileStore):
        where = f"the file {os.path.join(store.directory, 'ts-' + key)}, its log beside it in ts-{key}.log"
    else:
        where = f"the row key = '{key}' of table {store.table} in {store.path}, its log in {store.table}_log"
    lines = [line.decode("utf-8", "replace") for line in store.log_read(key)[-LOG_LINES_SHOWN:]]
    facts = [f"Session id (the cookie): {html.escape(session.id[:8])}…, store key: {key[:12]}…"]
    if session.get("previous_id"):
        facts.append(f"Logged in as {html.escape(session['user'])}: regenerate() changed the id from "
                     f"{html.escape(session['previous_id'])}… to {html.escape(session.id[:8])}…; the old one is dead.")
    facts.append(f"Kept in {html.escape(where)}.")
    return (
        '<section id="server" aria-labelledby="server-title"><h2 id="server-title">What the server holds</h2>'
        + "".join(f"<p>{fact}</p>" for fact in facts)
        + f"<h3>The record</h3><pre>{html.escape(record)}</pre>"
        + f"<h3>The last {LOG_LINES_SHOWN} lines of its log</h3><pre>{html.escape(chr(10).join(lines))}</pre></section>"
    )


def plain_page(title, text):
    """Return a small HTML page saying ``text``, as bytes."""
    body = f"<main><h2>{html.escape(title)}</h2><p>{text}</p></main>"
    return PAGE.format(title=html.escape(title), style=STYLE, body=body).encode("utf-8")


def make_app(store, store_label=None):
    """Return the chat as a WSGI app wrapped in SessionMiddleware over ``store``.

    ``store_label`` says on the page where sessions are kept. Routes: ``GET /``
    the page, ``POST /`` a message (then 303 to ``/``), ``POST /reply`` a
    message answered by a streamed text/plain reply, ``POST /forget`` deletes
    the session (then 303 to ``/?forgotten``); other paths are 404, other
    methods 405.
    """
    store_label = store_label or f"a {type(store).__name__}"

    def respond(start_response, status, body, content_type="text/html; charset=utf-8", extra=()):
        start_response(status, [("Content-Type", content_type), *SECURITY_HEADERS, *extra])
        return [body]

    def chat(environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO") or "/"
        if path not in ROUTES:
            return respond(start_response, "404 Not Found", plain_page("Not found", 'Try <a href="/">the chat</a>.'))
        if method not in ROUTES[path]:
            allow = [("Allow", ", ".join(ROUTES[path]))]
            return respond(start_response, "405 Method Not Allowed", plain_page("Method not allowed", ""), extra=allow)
        session = tinysession.get_session(environ)
        if path == "/server":
            return respond(start_response, "200 OK", render_server(session, store).encode("utf-8"))
        if method in ("GET", "HEAD"):
            forgotten = environ.get("QUERY_STRING") == "forgotten"
            notice = "Forgotten: your session was deleted and its cookie expired." if forgotten else ""
            page = render_chat(session, store_label, notice, render_server(session, store))
            return respond(start_response, "200 OK", page)
        if path == "/login":  # a real app checks a password here
            previous = session.id if session else None  # `if session` loads it, so its id is known
            session.regenerate()
            session["user"], session["previous_id"] = "ann", previous[:8] if previous else "(none)"
            return respond(start_response, "303 See Other", b"", extra=[("Location", "/")])
        if path == "/forget":
            session.invalidate()
            return respond(start_response, "303 See Other", b"", extra=[("Location", "/?forgotten")])
        message = read_message(environ)
        if message is None:
            return respond(start_response, "413 Content Too Large", plain_page("Too large", f"Messages are limited to {MAX_MESSAGE_CHARS:,} characters."))
        text, length = message
        if not text:
            return respond(start_response, "303 See Other", b"", extra=[("Location", "/")])
        try:
            add_message(session, "user", text)
        except tinysession.RecordTooLarge:
            return respond(start_response, "413 Content Too Large", plain_page("Too large", "That message is too large to keep; the chat goes on."))
        if path == "/reply":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"), *SECURITY_HEADERS])
            return stream_reply(session, echo(text, length))
        add_message(session, "assistant", echo(text, length))
        return respond(start_response, "303 See Other", b"", extra=[("Location", "/")])

    return tinysession.SessionMiddleware(chat, store)


def default_store_path():
    """Return the store used without ``--store``: one fixed directory in the temp directory."""
    return os.path.join(tempfile.gettempdir(), "tinysession-chat")


def open_store(spec):
    """Return a SQLiteStore for a ``.db`` path, else a FileStore for a directory."""
    if spec.endswith((".db", ".sqlite", ".sqlite3")):
        return tinysession.SQLiteStore(spec, max_age=IDLE_SECONDS)
    return tinysession.FileStore(spec, max_age=IDLE_SECONDS)


def unwritable(store, spec):
    """Return the directory or file of ``store`` this user cannot write to, or None if it can write to them all."""
    paths = [store.directory] if isinstance(store, tinysession.FileStore) else [os.path.dirname(os.path.abspath(spec)), spec]
    return next((path for path in paths if not os.access(path, os.W_OK)), None)


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


def main(argv=None):
    """Serve the chat on 127.0.0.1 until Ctrl-C; return 0, or 1 when the port or the store is unusable."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help=f"a session directory, or an SQLite file ending in .db "
                        f"(default: {default_store_path()})")
    parser.add_argument("--port", type=int, default=8000, help="the port on 127.0.0.1 (default: 8000)")
    args = parser.parse_args(argv)
    store_spec = args.store or default_store_path()
    try:
        store = open_store(store_spec)
    except (OSError, tinysession.SessionError) as exc:
        print(f"chat.py: cannot open the session store {store_spec!r}: {exc}", file=sys.stderr)
        return 1
    unusable = unwritable(store, store_spec)
    if unusable:
        print(f"chat.py: cannot keep sessions in {unusable}: this user (id {os.getuid()}) may not write there"
              f" (it belongs to user id {os.stat(unusable).st_uid}); pick a place of yours with --store PATH",
              file=sys.stderr)
        store.close()
        return 1
    label = f"{'an SQLiteStore' if isinstance(store, tinysession.SQLiteStore) else 'a FileStore'} at {store_spec}"
    try:
        server = make_server("127.0.0.1", args.port, make_app(store, label), server_class=_ThreadingServer)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            problem = f"port {args.port} on 127.0.0.1 is already in use"
        else:
            problem = f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror}"
        print(f"chat.py: {problem}; pick another with --port N, or --port 0 for any free one", file=sys.stderr)
        return 1
    with server, contextlib.closing(store):
        print(f"chat on http://127.0.0.1:{server.server_port}/ (sessions in {label}); Ctrl-C stops", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
