"""`forkreload doctor`: is this machine and this project ready for forkreload?

Prints, short and aligned: Python and package versions, whether `os.fork`
exists, the settings in force for the project and where each came from, the
learned preloads, which Jupyter front ends on PATH show which forkreload
kernelspec and how their "Restart kernel" goes, and what a real snapshot
does with the preload set: how long each import took, which failed, and the
threads the preloads started (a thread other than a known fork-safe pool is
a fork-safety risk).

Exit status 0 when healthy, 1 when fork is unavailable, the snapshot could
not start, or a front end finds a forkreload kernelspec and drops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from . import __version__

__all__ = ["run_doctor", "report_front_ends", "front_ends", "FrontEnd", "PACKAGES"]

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
        _row(out, "os.fork", "NOT AVAILABLE", "forkreload needs os.fork (it is built and tested on Linux)")
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
    for key in ("mode", "preload", "quiet", "watch", "learn", "server", "server_idle"):
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
    healthy = report_front_ends(out) and healthy
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
        # A snapshot of its own, with the preloads imported while it waits
        # (a shared server's first worker would not wait for them).
        env={**os.environ, "FORKRELOAD_SERVER": "0"},
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


# -- Jupyter front ends ------------------------------------------------------------

# Run by each front end's interpreter: what its jupyter_client finds and
# lists (a kernelspec whose provisioner it cannot load is found, not listed)
# and whether it can load forkreload's provisioner entry point.
_PROBE = """\
import json, sys
sys.path[:] = [p for p in sys.path if p not in ('', '.')]
out = {'python': sys.executable, 'version': sys.version.split()[0]}
try:
    import jupyter_client
    from jupyter_client.kernelspec import KernelSpecManager
except Exception as exc:
    out['error'] = 'cannot import jupyter_client (%s)' % type(exc).__name__
else:
    import logging
    logging.disable(logging.WARNING)  # the provisioner factory warns per dropped spec
    out['jupyter_client'] = jupyter_client.__version__
    ksm = KernelSpecManager()
    out['found'] = ksm.find_kernel_specs()
    out['listed'] = sorted(ksm.get_all_specs())
    try:
        import jupyter_client.provisioning
    except ImportError:
        out['provisioner'] = None  # jupyter_client 6: no provisioners at all
    else:
        from importlib.metadata import entry_points
        eps = entry_points()
        group = 'jupyter_client.kernel_provisioners'
        eps = eps.select(group=group) if hasattr(eps, 'select') else eps.get(group, [])
        try:
            [ep] = [ep for ep in eps if ep.name == NAME]
            ep.load()
            out['provisioner'] = True
        except Exception as exc:
            out['provisioner'] = False
            out['provisioner_error'] = type(exc).__name__
print(json.dumps(out))
"""


THIS_ENVIRONMENT = "this environment (nbclient, papermill, jupyter_client here)"


@dataclass
class FrontEnd:
    """One Jupyter installation, as its own interpreter sees the kernelspecs."""

    command: str  # the `jupyter` found on PATH, or "this environment"
    python: str | None = None
    version: str = ""
    jupyter_client: str = ""
    found: dict[str, str] = field(default_factory=dict)  # every kernelspec it finds: name -> directory
    listed: list[str] = field(default_factory=list)  # those it shows (and can start)
    provisioner: bool | None = None  # can it load forkreload's provisioner (None: no provisioners)
    error: str = ""

    def verdict(self, name: str, spec: dict[str, Any] | None) -> tuple[bool, str]:
        """(problem, what this front end does with the kernelspec `name`)."""
        from .kernelspec import has_provisioner

        if name not in self.found:
            return False, "not seen: installed where this Jupyter does not look (install it with --user)"
        if name not in self.listed:
            return True, "NOT SHOWN: it names forkreload's provisioner, which this Python cannot import (reinstall it without --provisioner)"
        if spec is not None and has_provisioner(spec) and self.provisioner:
            return False, 'shown · "Restart kernel" is fast (provisioner: a clean worker from the snapshot)'
        return False, 'shown · "Restart kernel" relaunches the controller (plain kernelspec)'


def jupyter_commands(path: str | None = None) -> list[str]:
    """Every `jupyter` executable on PATH, first one first, each file once."""
    found, seen = [], set()
    for d in (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep):
        exe = os.path.join(d or ".", "jupyter")
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            real = os.path.realpath(exe)
            if real not in seen:
                seen.add(real)
                found.append(exe)
    return found


def interpreter_of(script: str) -> str | None:
    """The Python a console script runs with, from its first lines."""
    try:
        with open(script, "rb") as f:
            head = f.read(2048).decode(errors="replace")
    except OSError:
        return None
    lines = head.splitlines()
    if not lines or not lines[0].startswith("#!"):
        return None
    parts = lines[0][2:].split()
    if not parts:
        return None
    if os.path.basename(parts[0]) == "env":
        names = [p for p in parts[1:] if not p.startswith("-")]
        return shutil.which(names[0]) if names and names[0].startswith("python") else None
    if os.path.basename(parts[0]).startswith("python"):
        return parts[0]
    # pip's form for long paths or spaces: #!/bin/sh, then '''exec' "PYTHON" "$0" "$@"
    for line in lines[1:4]:
        m = re.match(r"""'''exec' (?:"([^"]+)"|(\\S+))""", line)
        if m:
            return m.group(1) or m.group(2)
    return None


def probe_front_end(command: str, python: str | None) -> FrontEnd:
    """Ask the front end's own interpreter what its jupyter_client sees."""
    from .kernelspec import PROVISIONER

    fe = FrontEnd(command, python)
    if python is None:
        fe.error = "its Python could not be told from the script"
        return fe
    try:
        r = subprocess.run(
            [python, "-c", f"NAME = {PROVISIONER!r}\n" + _PROBE],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tempfile.gettempdir(),
        )
        answer = json.loads(r.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        fe.error = f"its Python ({python}) did not answer"
        return fe
    fe.version = answer.get("version", "")
    fe.error = answer.get("error", "")
    fe.jupyter_client = answer.get("jupyter_client", "")
    fe.found = answer.get("found", {})
    fe.listed = answer.get("listed", [])
    fe.provisioner = answer.get("provisioner")
    return fe


def front_ends() -> list[FrontEnd]:
    """The Jupyter installations on PATH and this environment's, probed."""
    # One entry per environment: the directory of the interpreter, not the
    # file it links to (every venv's python links to the same one).
    out, envs = [], set()
    for exe in jupyter_commands():
        python = interpreter_of(os.path.realpath(exe))
        key = os.path.dirname(os.path.abspath(python)) if python else exe
        if key in envs:
            continue
        envs.add(key)
        out.append(probe_front_end(exe, python))
    if os.path.dirname(os.path.abspath(sys.executable)) not in envs:
        out.append(probe_front_end(THIS_ENVIRONMENT, sys.executable))
    return out


def report_front_ends(out: Callable[[str], None], fronts: list[FrontEnd] | None = None) -> bool:
    """Which front end shows which forkreload kernelspec, and how it restarts.

    False when some front end finds a forkreload kernelspec and drops it.
    """
    from .kernelspec import is_forkreload_spec, read_specs

    fronts = front_ends() if fronts is None else fronts
    specs: dict[str, dict[str, dict[str, Any]]] = {}  # name -> directory -> kernel.json
    for name, (directory, spec) in read_specs().items():
        specs.setdefault(name, {})[directory] = spec
    for fe in fronts:
        for name, directory in fe.found.items():
            if directory not in specs.get(name, {}):
                try:
                    with open(os.path.join(directory, "kernel.json")) as f:
                        found = json.load(f)
                except (OSError, ValueError):
                    continue
                if isinstance(found, dict) and is_forkreload_spec(found):
                    specs.setdefault(name, {})[directory] = found
    out("jupyter front ends")
    if not specs:
        out("  no forkreload kernelspec installed (forkreload kernel install --user)")
    healthy = True
    for fe in fronts:
        what = f"jupyter_client {fe.jupyter_client}, Python {fe.version}" if fe.jupyter_client else ""
        out(f"  {fe.command}" + (f"  ({what})" if what else ""))
        if fe.error:
            out(f"    {fe.error}")
            continue
        for name in sorted(specs):
            problem, verdict = fe.verdict(name, specs[name].get(fe.found.get(name, "")))
            healthy = healthy and not problem
            out(f"    {name:<{_W + 4}}{verdict}")
    if all(fe.command == THIS_ENVIRONMENT for fe in fronts):
        out("  (no `jupyter` command on PATH)")
    return healthy
