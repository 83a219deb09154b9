"""Start a kernel's snapshot server before the kernel imports anything else.

A first kernel start waits for the kernel-only snapshot server's imports
(~0.2 s, as a plain kernel's); the controller's own imports take ~0.15 s
more. `prestart` runs first thing in `forkreload kernel` and forks this
process, still small and single-threaded, into the server: the server's own
interpreter start and imports of forkreload, and the work of finding out
whether a server is up already (its keys), overlap the controller's
imports instead of preceding them. The fork is detached (its own session,
and a second fork, so that init and not the controller reaps it), as a
spawned server is. The controller then waits on `prestarted_ready`.

This module imports nothing but the standard library's basics, so that the
fork comes a few milliseconds into the kernel's life.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from .command import project_modules

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["prestart", "prestart_pending", "prestarted_ready"]

_ready: list[int] = []
_spawned: list[Any] = []  # a spawned server's Popen, kept so that Python reaps it


def prestart(settings: Settings) -> None:
    """Start the server this kernel's first worker will come from: the
    kernel-only server, unless one that can start this kernel (of the full
    preload set, or kernel-only) is up already."""
    if not settings.server:
        return
    if project_modules():
        # Something of the project was imported here (a kernel started
        # with its directory on sys.path): a fork would carry it.
        from .server import spawn_first

        try:
            proc, ready = spawn_first(settings)
        except OSError:
            return  # the controller tries again, and says why it cannot
        if proc is not None and ready is not None:
            _spawned.append(proc)
            _ready.append(ready)
        return
    r, w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return
    if pid == 0:
        try:
            os.close(r)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the kernel's interrupts are not the server's
            from .server import serve_first

            serve_first(settings, w)
        except BaseException as exc:
            try:
                sys.stderr.write(f"forkreload server: could not start: {type(exc).__name__}: {exc}\n")
                sys.stderr.flush()
            except BaseException:
                pass
        os._exit(1)
    os.close(w)
    os.waitpid(pid, 0)
    _ready.append(r)


def prestart_pending() -> bool:
    """Whether the server `prestart` started is still starting (its pipe
    silent): a kernel then waits for it, and does its own imports first."""
    if not _ready:
        return False
    import select

    return not select.select([_ready[-1]], [], [], 0)[0]


def prestarted_ready() -> int | None:
    """The pipe on which the server `prestart` started says `ready` once it
    listens, or `up` (a server was up already), or ends (it failed): the
    caller owns it. None: nothing was prestarted."""
    return _ready.pop() if _ready else None
