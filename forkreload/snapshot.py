"""The snapshot ("zygote"): a clean interpreter that forks workers.

The controller spawns it as a fresh interpreter (so it carries none of the
controller's sockets, keys or threads). It imports the preload set and the
kernel machinery a worker needs, freezes the heap so the pages stay shared,
and then does one thing: fork a worker on request. It never imports the
user's modules, never starts a Python thread or a zmq context, and checks
before each fork that it is still single-threaded. Its preloads are imported
with the project directory off sys.path; if its own start-up imported a
project file (a csv.py in the project shadows the standard library's csv),
it starts itself again without the project directory on sys.path.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from .channel import Channel, ForgedMessage, set_parent_death_signal
from .command import project_modules
from .watch import file_sha
from .worker import kernel_modules_before_fork, prepare_kernel_modules

__all__ = ["main", "command", "native_threads", "prepare", "fork_child", "send_forked", "describe_status", "restart_if_project_imported", "KERNEL_MODULES"]

# What a forked worker needs to start its kernel quickly. ipykernel.debugger
# pulls in debugpy lazily (~60 ms on the first execute) unless imported here.
KERNEL_MODULES = [
    "zmq",
    "tornado.ioloop",
    "jupyter_client.session",
    "IPython",
    "IPython.core.interactiveshell",
    "ipykernel.kernelapp",
    "ipykernel.ipkernel",
    "ipykernel.zmqshell",
    "ipykernel.comm",
    "ipykernel.debugger",
    "cloudpickle",
    "forkreload.agent",
    "forkreload.worker",
    "forkreload.migrate",
    "forkreload.debugger",
]

# What every worker's kernel imports as it starts (IPython's debugger and
# history, the storemagic extension, tornado's asyncio platform): imported
# here, a fork's start skips ~8 ms of imports and the pages they would
# write. Optional: a Python without sqlite3 still starts a kernel.
WORKER_START_MODULES = [
    "sqlite3",
    "pdb",
    "faulthandler",
    "tornado.platform.asyncio",
    "IPython.core.debugger",
    "IPython.core.completerlib",
    "IPython.core.oinspect",
    "IPython.core.logger",
    "IPython.extensions.storemagic",
    "IPython.utils.wildcard",
]

# Modules whose native threads are known to be fork-safe: OpenBLAS (numpy and
# scipy wheels) registers pthread_atfork handlers and rebuilds its pool in
# the child, where matrix products work.
_KNOWN_SAFE_MODULES = ("numpy", "scipy", "pandas", "sklearn")

_started: dict[str, int] = {}


def native_threads() -> list[str]:
    """Names of this process's OS threads other than the main one."""
    names: list[str] = []
    me = str(os.getpid())
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return names
    for tid in tids:
        if tid == me:
            continue
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            names.append("?")
    return names


def _blas_pool_threads() -> int:
    """Worker threads one OpenBLAS copy starts at import (its pool, less the caller)."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return max(int(value) - 1, 0)
    return max((os.cpu_count() or 1) - 1, 0)


def _preload(names: list[str], started: dict[str, int]) -> tuple[dict[str, float], dict[str, str]]:
    """Import each module; note its time, its failure, and the threads it started.

    Threads are counted around each import. numpy and scipy each bring an
    OpenBLAS whose pool starts at import; when another preload imports them
    (torch imports numpy), those threads are put down to numpy or scipy.
    """
    timings: dict[str, float] = {}
    failures: dict[str, str] = {}
    for name in names:
        before = len(native_threads())
        known = set(sys.modules)
        t0 = time.perf_counter()
        try:
            importlib.import_module(name)
        except BaseException as exc:  # a broken preload must not kill the snapshot
            failures[name] = f"{type(exc).__name__}: {exc}"
        else:
            timings[name] = round(time.perf_counter() - t0, 4)
        extra = len(native_threads()) - before
        if extra <= 0:
            continue
        for lib in ("numpy", "scipy"):
            if lib in sys.modules and lib not in known and lib != name.split(".")[0]:
                share = min(extra, _blas_pool_threads())
                if share:
                    started[lib] = started.get(lib, 0) + share
                    extra -= share
        if extra > 0:
            started[name] = started.get(name, 0) + extra
    return timings, failures


def _thread_report(started: dict[str, int]) -> dict[str, Any]:
    # Thread names do not say who made them (OpenBLAS's are called 'python'),
    # so threads are attributed to the import that started them.
    risky = {m: n for m, n in started.items() if m.split(".")[0] not in _KNOWN_SAFE_MODULES}
    return {
        "python_threads": threading.active_count(),
        "native_threads": len(native_threads()),
        "started_by": started,
        "risky": risky,
    }


def fork_child(child: Callable[[], None]) -> int | str:
    """Fork, run `child()` in the child (which must not return), and give the
    parent the child's pid, or why no fork was made."""
    report = _thread_report(_started)
    if report["python_threads"] != 1:
        return f"snapshot has {report['python_threads']} Python threads; refusing to fork"
    sys.stdout.flush()
    sys.stderr.flush()
    kernel_modules_before_fork()
    with warnings.catch_warnings():
        # Python 3.12+ warns when the process has any OS thread besides the
        # main one; OpenBLAS's pool is fork-safe and checked above.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            child()
        finally:
            os._exit(1)
    return pid


def send_forked(chan: Channel, pid: int | str, wid: int) -> bool:
    """Answer a fork request: the worker's pid and its pidfd (False: no worker)."""
    if isinstance(pid, str):
        chan.send({"op": "fork", "error": pid})
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        chan.send({"op": "fork", "pid": pid, "error": "worker exited at once"})
        return False
    try:
        chan.send({"op": "fork", "pid": pid, "wid": wid}, fds=[pidfd])
    finally:
        os.close(pidfd)
    return True


def _fork_worker(chan: Channel, cfg: dict[str, Any], request: dict[str, Any]) -> None:
    def child() -> None:
        from .worker import run_worker

        chan.close()
        run_worker(cfg, request)

    send_forked(chan, fork_child(child), request["wid"])


def _user_files(preloads: set[str], watch: list[str]) -> list[dict[str, str]]:
    """Source files of preloaded modules that are the user's code (editable
    installs, watched paths): an edit to one means rebuilding the snapshot."""
    from .agent import user_module_file, watch_prefixes

    prefixes = watch_prefixes(watch)
    found = []
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] not in preloads or mod is None:
            continue
        path = user_module_file(mod, prefixes)
        if path is None:
            continue
        sha = file_sha(path)
        if sha is not None:
            found.append({"name": name, "file": path, "sha": sha})
    return found


def describe_status(status: int) -> str:
    """A worker's wait status in words: 'was killed by SIGKILL'."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"was killed by {name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def reaped() -> Iterator[tuple[int, str]]:
    """The children that ended since the last look: (pid, how, in words)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, describe_status(status)


def _reap(chan: Channel) -> None:
    for pid, how in reaped():
        try:
            chan.send({"op": "exited", "pid": pid, "status": how})
        except OSError:
            return


def command(python: str = sys.executable) -> list[str]:
    """The command line that starts a snapshot in the project directory.

    Unlike `python -m forkreload.snapshot`, it takes the project directory off
    sys.path before anything is imported, so no project file (a csv.py) runs
    in the snapshot.
    """
    from .command import python_command

    return python_command("forkreload.snapshot", python=python)


def _restart_without_project_path() -> None:
    """Start this snapshot again with the project directory off sys.path (never returns)."""
    os.environ[_RESTARTED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    argv = command()
    os.execv(argv[0], argv)


_RESTARTED = "FORKRELOAD_SNAPSHOT_RESTARTED"


def prepare(cfg: dict[str, Any]) -> dict[str, Any]:
    """Import the preloads and the kernel machinery, freeze the heap, and
    return the hello (the preload report) for the one who asked."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    # The user's directory must not shadow preloads, and user modules must
    # never be imported here: drop it from sys.path while preloading.
    cwd = os.path.realpath(cfg["cwd"])
    saved_path = list(sys.path)
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p or ".") != cwd]

    t0 = time.perf_counter()
    # Imports make few cycles but many objects: collections during them
    # (~40 ms of the kernel machinery's ~0.25 s) find almost nothing.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        timings, failures = _preload(cfg["preload"], _started)
        _kt, kfail = _preload(KERNEL_MODULES, _started)
        _preload(WORKER_START_MODULES, _started)
        if not kfail:
            prepare_kernel_modules()
    finally:
        sys.path[:] = saved_path
        if cfg["preload"]:
            # Off a start's path (a server built in the background): the
            # garbage of big imports is not kept for the snapshot's life.
            # The kernel-only one starts kernels; its ~1k objects of
            # garbage are not worth a 30 ms collection there.
            gc.collect()
        gc.freeze()  # workers' collections never touch (and copy) the snapshot's objects
        if was_enabled:
            gc.enable()
    preload_files = _user_files(set(cfg["preload"]), cfg.get("watch", []))
    from .agent import library_modules

    return {
        "op": "hello",
        "pid": os.getpid(),
        "python": sys.version.split()[0],
        "preload": timings,
        "preload_failed": failures,
        "kernel_failed": kfail,
        "seconds": round(time.perf_counter() - t0, 4),
        "threads": _thread_report(_started),
        "modules": len(sys.modules),
        # What a worker forked from here has imported already: the preloads
        # and everything they brought (torch brings sympy, jinja2, ...).
        "libs": library_modules(),
        "preload_files": preload_files,
    }


def restart_if_project_imported() -> None:
    """Start again without the project directory on sys.path if importing
    forkreload ran a project file (see `command.project_modules`)."""
    if os.environ.pop(_RESTARTED, None) is None and project_modules():
        _restart_without_project_path()


def main() -> None:
    restart_if_project_imported()
    cfg = json.loads(sys.stdin.readline())
    key = cfg["key"].encode()
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != cfg["controller_pid"]:
        os._exit(0)  # the controller died before we could arm the signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    hello = prepare(cfg)

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(cfg["sock"])
    chan = Channel(sock, key)
    chan.send(hello)
    # Reap workers as they end and tell the controller how (a worker is not
    # the controller's child, so only we can learn its exit status).
    signal.signal(signal.SIGCHLD, lambda *_: _reap(chan))
    while True:
        try:
            msg, fds = chan.recv()
        except ForgedMessage:
            sys.stderr.write("forkreload snapshot: dropped a message with a bad signature\n")
            continue
        except OSError:
            break
        for fd in fds:
            os.close(fd)
        if msg is None or msg.get("op") == "exit":
            break
        if msg.get("op") == "fork":
            _fork_worker(chan, cfg, msg)
    os._exit(0)


if __name__ == "__main__":
    main()
