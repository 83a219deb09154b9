"""The worker's first moments: turn a fresh fork of the snapshot into a kernel.

Runs in the child right after `os.fork()` in the snapshot. It undoes what
must not be shared with the snapshot (atexit handlers, signal dispositions,
random state), then builds the kernel machinery from scratch (zmq context,
event loop, threads) and starts a full IPython kernel on private ipc
sockets, with the forkreload agent installed in its shell.
"""

from __future__ import annotations

import atexit
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
    random.seed()
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            np.random.seed()
        except Exception:
            pass


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
    app.initialize([])
    prepare_worker(app.kernel, cfg["privdir"])  # the debugger: cell files shared by the session's workers
    # ipykernel puts '' on sys.path; the user's directory must be importable
    # by absolute path too, as the worker may chdir later.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(1 if sys.path and sys.path[0] == "" else 0, cwd)
    agent.install(app.kernel, cwd=cwd, watch=cfg.get("watch", []))
    app.start()
    os._exit(0)
