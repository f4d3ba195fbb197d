"""A FastAPI chat that streams its (echo) reply over server-sent events; the history lives in the session.

Needs FastAPI and uvicorn (``pip install fastapi uvicorn``). Run
``python examples/fastapi_chat.py [--port N] [--store FILE]`` from a checkout
and open http://127.0.0.1:8000/. The page shows both sides of the chat, as
the session holds it, on every load. A message is a POST (never a GET: the
text stays out of URLs and access logs); the reply streams as server-sent
events when the page's script asks for them, and without JavaScript the form
posts and the page reloads. Sessions go to an SQLite file in a new temporary
directory unless ``--store`` names one.
"""

import argparse
import asyncio
import html
import json
import os
import sys
import tempfile
import urllib.parse

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tinysession

MAX_ROUNDS = 5
MAX_MESSAGE_CHARS = 2000
STREAM_PIECE_SECONDS = 0.05  # as a model's reply comes: a word at a time
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tinysession FastAPI chat</title>
<style>
:root { color-scheme: light dark; }
body { margin: 0 auto; max-width: 42rem; padding: 1rem; font: 16px/1.5 system-ui, sans-serif; }
#chat { display: flex; flex-direction: column; gap: .5rem; }
.msg { max-width: 85%; padding: .5rem .8rem; border-radius: 1rem; white-space: pre-wrap; overflow-wrap: anywhere; }
.msg small { display: block; font-size: .75rem; opacity: .8; }
.user { align-self: flex-end; background: #2f6fde; color: #fff; }
.assistant { align-self: flex-start; border: 1px solid #8884; }
.error { color: #c03a3a; }
form { display: flex; gap: .5rem; margin: 1rem 0; }
textarea { flex: 1; min-width: 0; font: inherit; padding: .5rem; }
button { font: inherit; padding: .5rem 1rem; }
</style>
</head>
<body>
<h1>tinysession FastAPI chat</h1>
<main id="chat" aria-live="polite">{messages}</main>
<p id="error" class="error" role="alert" hidden></p>
<form id="send" method="post" action="/chat">
<textarea id="message" name="message" rows="2" maxlength="{limit}" required aria-label="Your message"></textarea>
<button type="submit">Send</button>
</form>
<script>
const form = document.getElementById("send"), box = document.getElementById("message");
const error = document.getElementById("error"), button = form.querySelector("button");
function bubble(role, text) {
  const div = document.createElement("div"), small = document.createElement("small");
  div.className = "msg " + role;
  small.textContent = role === "user" ? "You" : "Echo";
  div.append(small, text);
  document.getElementById("chat").append(div);
  return div;
}
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = box.value.trim();
  if (!text) return;
  button.disabled = true;
  error.hidden = true;
  let user = null, reply = null;
  try {
    const response = await fetch("/chat", {method: "POST", headers: {Accept: "text/event-stream"},
                                           body: new URLSearchParams({message: text})});
    if (!response.ok) throw new Error("the server answered " + response.status);
    user = bubble("user", text);
    reply = bubble("assistant", "");
    box.value = "";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "", done = false;
    while (!done) {
      const part = await reader.read();
      if (part.done) throw new Error("the reply stopped before its end");
      buffer += part.value;
      const events = buffer.split("\\n\\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") done = true;
        else reply.lastChild.textContent += JSON.parse(data);
      }
      reply.scrollIntoView({block: "end"});
    }
  } catch (failure) {
    user?.remove();
    reply?.remove();
    box.value = text;
    error.textContent = "Not sent: " + failure.message + ". Your text is kept; try again.";
    error.hidden = false;
  } finally {
    button.disabled = false;
    box.focus();
  }
});
</script>
</body>
</html>
"""


def render(messages):
    """Return the page with ``messages``, both sides, as HTML."""
    bubbles = "".join(
        f'<div class="msg {"user" if m["role"] == "user" else "assistant"}">'
        f'<small>{"You" if m["role"] == "user" else "Echo"}</small>{html.escape(m["content"])}</div>'
        for m in messages
    )
    return PAGE.replace("{messages}", bubbles).replace("{limit}", str(MAX_MESSAGE_CHARS))


def make_app(store):
    """Return the chat as a FastAPI app with tinysession's ASGI middleware over ``store``.

    ``GET /`` the page, ``GET /history`` the session's messages as JSON,
    ``POST /chat`` a message (form field ``message``): the reply as
    server-sent events when the request accepts ``text/event-stream``, else a
    303 back to the page.
    """
    app = FastAPI()
    app.add_middleware(tinysession.ASGISessionMiddleware, store=store)

    @app.get("/")
    def page(request: Request):
        return HTMLResponse(render(request.session.get("messages", [])))

    @app.get("/history")
    def history(request: Request):
        return JSONResponse({"messages": request.session.get("messages", [])})

    @app.post("/chat")
    async def chat(request: Request):
        form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
        message = form.get("message", [""])[0].strip()[:MAX_MESSAGE_CHARS]
        if not message:
            return JSONResponse({"error": "an empty message"}, status_code=400)
        session = request.session
        session["messages"] = session.get("messages", []) + [{"role": "user", "content": message}]
        answer = f"You said: {message}"
        if "text/event-stream" not in request.headers.get("accept", ""):
            session["messages"] = tinysession.trim_messages(
                session["messages"] + [{"role": "assistant", "content": answer}], MAX_ROUNDS
            )
            return RedirectResponse("/", status_code=303)

        async def reply():
            words = []
            for word in answer.split():
                words.append(word)
                yield f"data: {json.dumps(word + ' ')}\n\n"
                await asyncio.sleep(STREAM_PIECE_SECONDS)
            messages = session["messages"] + [{"role": "assistant", "content": " ".join(words)}]
            session["messages"] = tinysession.trim_messages(messages, MAX_ROUNDS)
            await session.save()  # before [DONE]: the browser's next question must see this reply
            yield "data: [DONE]\n\n"

        return StreamingResponse(reply(), media_type="text/event-stream")

    return app


def main():
    """Serve the chat on 127.0.0.1 with uvicorn until Ctrl-C."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="the port on 127.0.0.1 (default: 8000)")
    parser.add_argument("--store", help="the SQLite file of the sessions (default: one in a new temporary directory)")
    args = parser.parse_args()
    path = args.store or os.path.join(tempfile.mkdtemp(prefix="tinysession-fastapi-"), "sessions.db")
    uvicorn.run(make_app(tinysession.SQLiteStore(path, max_age=86400)), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
