"""pytest plugin: Starlette's own session tests with tinysession's ASGI middleware in its place.

Loaded with ``-p tinysession_starlette`` before the test modules import
``starlette.middleware.sessions``; it swaps that module's SessionMiddleware
for a subclass of ``tinysession.ASGISessionMiddleware`` over a FileStore in a
temporary directory, taking Starlette's arguments under their own names.
"""

import shutil
import tempfile

import starlette.middleware.sessions

import tinysession

_directories = []


class SessionMiddleware(tinysession.ASGISessionMiddleware):
    """Starlette's SessionMiddleware signature, served by tinysession (``secret_key`` is not needed)."""

    def __init__(self, app, secret_key, session_cookie="session", max_age=14 * 24 * 60 * 60, path="/",
                 same_site="lax", https_only=False, domain=None, partitioned=False):
        directory = tempfile.mkdtemp(prefix="tinysession-starlette-")
        _directories.append(directory)
        super().__init__(
            app, tinysession.FileStore(directory), cookie_name=session_cookie, cookie_max_age=max_age, path=path,
            samesite=same_site, secure=bool(https_only), domain=domain, partitioned=partitioned,
        )


starlette.middleware.sessions.SessionMiddleware = SessionMiddleware


def pytest_unconfigure(config):
    for directory in _directories:
        shutil.rmtree(directory, ignore_errors=True)
