"""Which of the user's source files changed since the worker imported them.

Only the files of the user's modules are checked (a stat each, then a hash
when the stat moved or is too recent to trust), so the cost per cell does
not grow with the number of modules loaded. mtime and size alone miss an
editor's second save within the same tick at the same length, so the
decision is always made on the content's hash.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

__all__ = ["SourceWatch", "file_sha", "source_sha"]

# A file modified this recently may be modified again within the same
# timestamp tick; hash it on every check until it has settled.
_SETTLE_NS = 2_000_000_000


@dataclass
class _File:
    sha: str  # content hash as the worker executed it
    modules: set[str] = field(default_factory=set)
    stat: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) when last hashed
    current: str | None = None  # hash at last check


def source_sha(data: bytes) -> str:
    """The hash a source's content is known by everywhere (watch, agent, snapshot)."""
    return hashlib.sha256(data).hexdigest()


def file_sha(path: str) -> str | None:
    """`source_sha` of a file's content; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return source_sha(f.read())
    except OSError:
        return None


class SourceWatch:
    """The user's module files and their content as imported."""

    def __init__(self) -> None:
        self.files: dict[str, _File] = {}
        self.modules: dict[str, str] = {}  # module name -> file

    def add(self, name: str, path: str, sha: str) -> None:
        """Module `name` executed the content `sha` of `path`."""
        self.modules[name] = path
        entry = self.files.get(path)
        if entry is None:
            entry = self.files[path] = _File(sha=sha, current=sha)
        elif entry.modules <= {name}:
            # The same module executed it again (importlib.reload in a cell):
            # it now runs this content. Under a second name, the first keeps
            # what it ran, and an edit still counts for it.
            entry.sha = sha
        entry.modules.add(name)

    def accept(self, path: str, sha: str) -> None:
        """The worker now runs this content of `path` (patched in place)."""
        entry = self.files.get(path)
        if entry is not None:
            entry.sha = sha

    def clear(self) -> None:
        self.files.clear()
        self.modules.clear()

    def changed(self) -> dict[str, str | None]:
        """Files whose content differs from what was imported: path -> new hash (None: gone)."""
        out: dict[str, str | None] = {}
        now = time.time_ns()
        for path, entry in self.files.items():
            try:
                st = os.stat(path)
            except OSError:
                out[path] = None
                continue
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            if key != entry.stat or now - st.st_mtime_ns < _SETTLE_NS:
                entry.current = file_sha(path)
                entry.stat = key
            if entry.current != entry.sha:
                out[path] = entry.current
        return out

    def modules_of(self, paths: list[str]) -> list[str]:
        return sorted({m for p in paths for m in self.files[p].modules})
