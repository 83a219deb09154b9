"""forkreload: keep an interactive Python session alive across source edits.

Values kept, code new: after an edit to the user's modules, the next cell runs
against the new code, either patched in place or in a fresh worker forked from
a pre-imported snapshot, with the user's variables migrated into it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .session import ForkUnavailable, Reload, Result, Session, SessionError

__all__ = ["Session", "Result", "Reload", "SessionError", "ForkUnavailable", "__version__"]


def __getattr__(name: str) -> Any:
    # The Session API pulls in jupyter_client's clients (~0.1 s); forkreload's
    # own processes (controller, snapshot, server) never use it, and each
    # kernel start would pay for it.
    if name in ("Session", "Result", "Reload", "SessionError", "ForkUnavailable"):
        from . import session

        return getattr(session, name)
    raise AttributeError(f"module 'forkreload' has no attribute {name!r}")
