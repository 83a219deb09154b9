"""The worker's first moments: turn a fresh fork of the snapshot into a kernel.

Runs in the child right after `os.fork()` in the snapshot. It undoes what
must not be shared with the snapshot (atexit handlers, signal dispositions,
random state), then builds the kernel machinery from scratch (zmq context,
event loop, threads) and starts a full IPython kernel on private ipc
sockets, with the forkreload agent installed in its shell.
"""

from __future__ import annotations

import atexit
import itertools
import os
import random
import signal
import sys
from typing import Any

from .channel import set_parent_death_signal

__all__ = ["run_worker", "worker_connection"]


def worker_connection(privdir: str, wid: int, key: str) -> dict[str, Any]:
    """The connection info of worker `wid`: ipc sockets in the private dir."""
    return {
        "transport": "ipc",
        "ip": os.path.join(privdir, f"w{wid}"),
        "shell_port": 1,
        "iopub_port": 2,
        "stdin_port": 3,
        "control_port": 4,
        "hb_port": 5,
        "key": key,
        "signature_scheme": "hmac-sha256",
        "kernel_name": "forkreload-worker",
    }


def _reseed() -> None:
    # Every fork would otherwise start from the snapshot's identical state.
    # (numpy 2 imports numpy.random at its first use, seeded from the OS
    # then: only a snapshot that imported it holds a state to reseed.)
    random.seed()
    npr = sys.modules.get("numpy.random")
    if npr is not None:
        try:
            npr.seed()
        except Exception:
            pass


class _File:
    """A module as ipykernel's kernel start reads it: its file only."""

    __slots__ = ("__file__",)

    def __init__(self, file: str) -> None:
        self.__file__ = file


class _Modules:
    """What `sys.modules.copy().values()` gives, from files listed before the fork."""

    def __init__(self, files: tuple[_File, ...]) -> None:
        self.files = files
        self.count = len(sys.modules)  # the modules these are the files of

    def since(self) -> _Modules | None:
        """These and the modules imported since (the last ones of sys.modules,
        as none is removed at a worker's start); None if that cannot be so."""
        extra = len(sys.modules) - self.count
        if extra == 0:
            return self
        if not 0 < extra <= 64:
            return None
        names = list(itertools.islice(reversed(sys.modules), extra))
        files = [getattr(sys.modules[n], "__file__", None) for n in reversed(names)]
        return _Modules(self.files + tuple(_File(f) for f in files if isinstance(f, str) and f))

    def copy(self) -> _Modules:
        return self

    def values(self) -> tuple[_File, ...]:
        return self.files


class _SysView:
    """`sys`, but its `modules` is the list made in the snapshot (and the
    modules imported since: the kernel reads it after its sockets' imports)."""

    def __init__(self, modules: _Modules) -> None:
        self._modules = modules

    @property
    def modules(self) -> Any:
        global _lean_start
        view = self._modules.since()
        _lean_start = view is not None
        return view if view is not None else sys.modules

    def __getattr__(self, name: str) -> Any:
        return getattr(sys, name)


_KERNEL_MODULES: _Modules | None = None
_lean_start = False  # whether this worker's kernel started from the list


def prepare_kernel_modules() -> None:
    """In the snapshot, last: the module files ipykernel's kernel lists at its
    start (`IPythonKernel._kernel_modules`, for its debugger). Listed in each
    worker, that walk takes a reference to every module and file name of the
    snapshot, a write to ~3,000 of its pages with torch preloaded; without
    it a worker or spare copied 4 MiB less and started ~6 ms sooner (other
    start code touches the rest). Used only where ipykernel's source reads
    `sys.modules` exactly there, so that nothing else sees the list."""
    global _KERNEL_MODULES
    import inspect

    import ipykernel.ipkernel

    try:
        src = inspect.getsource(ipykernel.ipkernel)
    except (OSError, TypeError):
        return
    if src.count("sys.modules") != 1 or "for m in sys.modules.copy().values() if hasattr(m, \"__file__\") and m.__file__" not in src:
        return
    # Copies of the strings, allocated together: reading them touches a few
    # pages instead of one per module and per file name.
    files = [m.__file__ for m in sys.modules.copy().values() if hasattr(m, "__file__") and m.__file__]
    _KERNEL_MODULES = _Modules(tuple(_File((f + " ")[:-1]) for f in files))


def kernel_modules_before_fork() -> None:
    """Before a fork: the list again if the snapshot imported more since."""
    if _KERNEL_MODULES is not None and _KERNEL_MODULES.count != len(sys.modules):
        import gc

        prepare_kernel_modules()
        gc.freeze()  # as the rest of the snapshot: no worker's collection walks it


def _initialize(app: Any) -> None:
    import ipykernel.ipkernel

    if _KERNEL_MODULES is None:
        app.initialize([])
        return
    ipykernel.ipkernel.sys = _SysView(_KERNEL_MODULES)  # type: ignore[attr-defined,assignment]
    try:
        app.initialize([])
    finally:
        ipykernel.ipkernel.sys = sys  # type: ignore[attr-defined]


def run_worker(cfg: dict[str, Any], request: dict[str, Any]) -> None:
    """Become worker `request['wid']`; never returns."""
    snapshot_pid = os.getppid()
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != snapshot_pid:
        os._exit(0)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    atexit._clear()
    _reseed()

    import json

    from ipykernel.kernelapp import IPKernelApp

    from . import agent
    from .debugger import prepare_worker

    conn = worker_connection(cfg["privdir"], request["wid"], cfg["key"])
    cf = os.path.join(cfg["privdir"], f"w{request['wid']}.json")
    with open(os.open(cf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(conn, f)

    os.chdir(request.get("cwd") or cfg["cwd"])
    app = IPKernelApp.instance(
        connection_file=cf,
        parent_handle=snapshot_pid,
    )
    _initialize(app)
    prepare_worker(app.kernel, cfg["privdir"])  # the debugger: cell files shared by the session's workers
    # ipykernel puts '' on sys.path; the user's directory must be importable
    # by absolute path too, as the worker may chdir later.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(1 if sys.path and sys.path[0] == "" else 0, cwd)
    agent.install(app.kernel, cwd=cwd, watch=cfg.get("watch", []))
    app.start()
    os._exit(0)
