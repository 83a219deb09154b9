"""`forkreload doctor`: is this machine and this project ready for forkreload?

Prints, short and aligned: Python and package versions, whether `os.fork`
exists, the settings in force for the project and where each came from, the
learned preloads, and what a real snapshot does with the preload set: how
long each import took, which failed, and the threads the preloads started
(a thread other than a known fork-safe pool is a fork-safety risk).

Exit status 0 when healthy, 1 when fork is unavailable or the snapshot
could not start.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from typing import Any

from . import __version__

__all__ = ["run_doctor", "PACKAGES"]

# (name shown, distribution name)
PACKAGES = (
    ("forkreload", "forkreload"),
    ("ipykernel", "ipykernel"),
    ("jupyter_client", "jupyter_client"),
    ("pyzmq", "pyzmq"),
    ("cloudpickle", "cloudpickle"),
    ("IPython", "ipython"),
    ("jupyter_console", "jupyter_console"),
    ("prompt_toolkit", "prompt_toolkit"),
)

_W = 16  # label column


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _row(out: Callable[[str], None], label: str, value: str, note: str = "") -> None:
    line = f"  {label:<{_W}}{value}"
    if note:
        line = f"{line:<{_W + 32}}  {note}"
    out(line.rstrip())


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) if value else "-"
    return str(value)


def _seconds(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 0.01:
        return f"{s * 1000:.1f} ms"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def run_doctor(cwd: str = ".", cli: dict[str, Any] | None = None, out: Callable[[str], None] = print, start_snapshot: bool = True) -> int:
    """Print the report; return the exit status (0 healthy, 1 not)."""
    from .config import ConfigError, LearnedModules, load_settings

    healthy = True
    out(f"forkreload {__version__} doctor")
    impl = platform.python_implementation()
    _row(out, "python", f"{platform.python_version()} ({impl})", sys.executable)
    _row(out, "platform", f"{platform.system()} {platform.release()} {platform.machine()}", sys.platform)
    fork = hasattr(os, "fork")
    if fork:
        _row(out, "os.fork", "available")
    else:
        _row(out, "os.fork", "NOT AVAILABLE", "forkreload needs fork (Linux, macOS)")
        healthy = False

    out("")
    out("packages")
    for shown, dist in PACKAGES:
        _row(out, shown, _version(dist))

    out("")
    try:
        settings = load_settings(cwd, {k: v for k, v in (cli or {}).items() if v is not None})
    except ConfigError as exc:
        out(f"settings: {exc}")
        return 1
    out(f"settings for {settings.cwd}")
    if settings.project_root != settings.cwd:
        _row(out, "project root", settings.project_root)
    for key in ("mode", "preload", "quiet", "watch", "learn"):
        _row(out, key, _show(getattr(settings, key)), settings.sources.get(key, "default"))
    if settings.learn:
        learned = LearnedModules(settings.project_root)
        _row(out, "learned", _show(learned.modules), "what past sessions imported")
        _row(out, "learned file", str(learned.path))
    else:
        _row(out, "learned", "not used (learn is off)")
    from .console import history_path

    _row(out, "history file", str(history_path(settings.project_root)))

    out("")
    if not fork:
        out("snapshot          not started: no os.fork on this platform")
        return 1
    if not start_snapshot:
        return 0 if healthy else 1
    # The controller's own log lines (a failed preload, risky threads) would
    # repeat this report out of order: keep them, show them on failure only.
    with tempfile.TemporaryFile(mode="w+") as log:
        try:
            with _stderr_to(log):
                status = _snapshot_status(settings)
        except Exception as exc:  # any failure to start is the finding itself
            out(f"snapshot          COULD NOT START: {type(exc).__name__}: {exc}")
            log.seek(0)
            for line in log.read().splitlines()[-10:]:
                out(f"  {line}")
            return 1
    healthy = _report_snapshot(out, status.get("snapshot", {}), explicit=settings.preload) and healthy
    return 0 if healthy else 1


@contextlib.contextmanager
def _stderr_to(f: Any) -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(f.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _snapshot_status(settings: Any) -> dict[str, Any]:
    from . import Session

    with Session(
        cwd=settings.cwd,
        preload=settings.preload,
        mode=settings.mode,
        watch=settings.watch,
        learn=settings.learn,
        startup_timeout=120,
    ) as session:
        return session.status()


def _report_snapshot(out: Callable[[str], None], snap: dict[str, Any], explicit: Iterable[str] = ()) -> bool:
    out(f"snapshot          ready in {_seconds(snap.get('seconds'))}, pid {snap.get('pid', '?')}")
    preload: dict[str, float] = snap.get("preload") or {}
    failed: dict[str, str] = snap.get("preload_failed") or {}
    if not preload and not failed:
        _row(out, "preload", "-", "nothing but the kernel's own modules")
    for i, (name, secs) in enumerate(preload.items()):
        _row(out, "preload" if i == 0 else "", f"{name:<20} {_seconds(secs):>8}", "" if name in explicit else "learned")
    for name, why in failed.items():
        _row(out, "FAILED", f"{name:<20} {why}")
    threads = snap.get("threads") or {}
    started: dict[str, int] = threads.get("started_by") or {}
    risky: dict[str, int] = threads.get("risky") or {}
    _row(out, "threads", f"{threads.get('native_threads', '?')} besides the main one")
    healthy = True
    if threads.get("python_threads", 1) != 1:
        _row(out, "FAILED", f"{threads['python_threads']} Python threads: the snapshot refuses to fork")
        healthy = False
    for name, n in started.items():
        if name not in risky:
            _row(out, "", f"{name} started {n}", "known fork-safe (BLAS pool)")
    for name, n in risky.items():
        _row(out, "WARNING", f"{name} started {n} thread{'s' if n != 1 else ''} before the fork: a fork-safety risk")
    if risky:
        out("  (a thread does not survive fork: a lock it held stays locked in every worker;")
        out("   take the module off the preload set with --preload/--no-learn if workers hang)")
    return healthy
