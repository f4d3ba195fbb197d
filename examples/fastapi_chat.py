"""A FastAPI chat that streams its (echo) reply over server-sent events; the history lives in the session.

Run ``python examples/fastapi_chat.py`` (needs fastapi and uvicorn) and open
http://127.0.0.1:8000/. Sessions go to an SQLite file in a temporary
directory unless ``--store`` names one.
"""

import argparse
import json
import os
import sys
import tempfile

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tinysession

MAX_ROUNDS = 5
PAGE = """<!doctype html><meta charset="utf-8"><title>tinysession chat</title>
<ol id="chat"></ol><form id="f"><input id="m" autofocus> <button>Send</button></form>
<script>
f.onsubmit = (e) => { e.preventDefault(); const li = chat.appendChild(document.createElement("li"));
  const source = new EventSource("/chat?message=" + encodeURIComponent(m.value)); m.value = "";
  source.onmessage = (e) => { if (e.data === "[DONE]") source.close(); else li.textContent += JSON.parse(e.data); };
};
</script>"""


def make_app(store):
    """Return the chat as a FastAPI app with tinysession's ASGI middleware over ``store``."""
    app = FastAPI()
    app.add_middleware(tinysession.ASGISessionMiddleware, store=store)

    @app.get("/")
    def page():
        return HTMLResponse(PAGE)

    @app.get("/history")
    def history(request: Request):
        return JSONResponse({"messages": request.session.get("messages", [])})

    @app.get("/chat")
    async def chat(request: Request, message: str):
        session = request.session
        session["messages"] = session.get("messages", []) + [{"role": "user", "content": message}]

        async def reply():
            words = []
            for word in f"You said: {message}".split():
                words.append(word)
                yield f"data: {json.dumps(word + ' ')}\n\n"
            messages = session["messages"] + [{"role": "assistant", "content": " ".join(words)}]
            session["messages"] = tinysession.trim_messages(messages, MAX_ROUNDS)
            await session.save()  # before [DONE]: the browser's next question must see this reply
            yield "data: [DONE]\n\n"

        return StreamingResponse(reply(), media_type="text/event-stream")

    return app


def main():
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--store", default=os.path.join(tempfile.mkdtemp(), "sessions.db"))
    args = parser.parse_args()
    uvicorn.run(make_app(tinysession.SQLiteStore(args.store)), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
