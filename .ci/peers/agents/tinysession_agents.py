"""A pytest plugin: the Agents SDK's SQLiteSession, wherever its tests import it, becomes a tinysession AgentsSession.

``SQLiteSession`` is replaced by a subclass of ``tinysession.AgentsSession``
taking SQLiteSession's arguments, so the tests that subclass it, check
``isinstance`` or ``patch.object`` it work as with the SDK's class. Each
``SQLiteSession(session_id, db_path)`` keeps its items in an ``SQLiteStore``
at ``db_path`` (a fresh temporary file for ``:memory:``).
"""

import os
import sys
import tempfile

import agents
import agents.memory.sqlite_session

import tinysession

_ORIGINAL = agents.memory.sqlite_session.SQLiteSession


class SQLiteSession(tinysession.AgentsSession):
    """SQLiteSession's signature, served by tinysession."""

    def __init__(self, session_id, db_path=":memory:", create_tables=True, session_settings=None, **_):
        if str(db_path) == ":memory:":
            db_path = os.path.join(tempfile.mkdtemp(prefix="tinysession-agents-"), "memory.db")
        super().__init__(session_id, tinysession.SQLiteStore(os.fspath(db_path)))
        if isinstance(session_settings, dict):
            session_settings = agents.SessionSettings(**session_settings)
        self.session_settings = session_settings or agents.SessionSettings()

    def close(self):
        """Close the store, as SQLiteSession.close closes its connections."""
        self.log.store.close()


for _module in list(sys.modules.values()):
    if getattr(_module, "__name__", "").startswith("agents") and getattr(_module, "SQLiteSession", None) is _ORIGINAL:
        _module.SQLiteSession = SQLiteSession
