"""A pytest plugin: the Agents SDK's SQLiteSession, as its tests import it, becomes a tinysession AgentsSession.

Each ``SQLiteSession(session_id, db_path)`` is an ``AgentsSession`` over a
``SQLiteStore`` at ``db_path`` (a fresh temporary file for ``:memory:``).
"""

import os
import tempfile

import agents

import tinysession


def SQLiteSession(session_id, db_path=":memory:", create_tables=True, session_settings=None, **_):
    if str(db_path) == ":memory:":
        db_path = os.path.join(tempfile.mkdtemp(prefix="tinysession-agents-"), "memory.db")
    session = tinysession.AgentsSession(session_id, tinysession.SQLiteStore(os.fspath(db_path)))
    if isinstance(session_settings, dict):
        session_settings = agents.SessionSettings(**session_settings)
    session.session_settings = session_settings or agents.SessionSettings()
    session.close = lambda: session.log.store.close()
    return session


agents.SQLiteSession = SQLiteSession
