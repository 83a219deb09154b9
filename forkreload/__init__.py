"""forkreload: keep an interactive Python session alive across source edits.

Values kept, code new: after an edit to the user's modules, the next cell runs
against the new code, either patched in place or in a fresh worker forked from
a pre-imported snapshot, with the user's variables migrated into it.
"""

__version__ = "0.1.0"

from .session import ForkUnavailable, Reload, Result, Session, SessionError

__all__ = ["Session", "Result", "Reload", "SessionError", "ForkUnavailable", "__version__"]
