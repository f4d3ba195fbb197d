"""A pytest plugin that serves every Quart app's session from tinysession.

Loaded with ``-p tinysession_quart``; ``TINYSESSION_STORE=quart`` leaves
Quart's own cookie sessions in place, for the baseline run; otherwise each
test gets a fresh, empty FileStore behind ``QuartSessionInterface``.
"""

import os
import tempfile

import pytest
import quart

import tinysession


@pytest.fixture(autouse=True)
def _tinysession_interface(monkeypatch):
    if os.environ.get("TINYSESSION_STORE") == "quart":
        yield
        return
    with tempfile.TemporaryDirectory(prefix="tinysession-peer-") as directory:
        store = tinysession.FileStore(directory, max_age=3600, serializer=tinysession.TaggedJSON())
        monkeypatch.setattr(quart.Quart, "session_interface", tinysession.QuartSessionInterface(store))
        yield
        store.close()
