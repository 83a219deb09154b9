"""A `WorkerPool` of fake workers (fake_worker.py), and a controller launcher.

`FakePool` gives `Swapper` what it uses of `pool.WorkerPool` without a
snapshot and without forking one: each worker is a fresh interpreter running
fake_worker.py, started by the controller (so the controller reaps it and
learns its exit status), handed back as a real `pool.WorkerHandle` with a
pidfd from `os.pidfd_open`. Taking the spare, waiting for a worker's
iopub welcome and retiring a worker are `WorkerPool`'s own code.

Run as a script, `python fake_pool.py CONNECTION_FILE SETTINGS_JSON`, it is
the controller process of a test: `Controller(connection, Settings(...),
pool_factory=FakePool).start(); .run()` in its main thread (run() installs
signal handlers).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
from typing import Any

import zmq
from forkreload.config import Settings
from forkreload.pool import ControllerError, WorkerHandle, WorkerPool
from forkreload.worker import worker_connection

FAKE_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_worker.py")


class FakePool(WorkerPool):
    """Workers are fake_worker.py processes the controller starts itself."""

    def __init__(self, ctx: zmq.Context, key: bytes, privdir: str, settings: Settings, preload: list[str],
                 wids: itertools.count[int]) -> None:
        super().__init__(ctx, key, privdir, settings, preload, wids)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        # The controller polls the pool's fd for snapshot messages: a fake
        # pool never has any (exit statuses come from waiting on the child).
        self._rfd, self._wfd = os.pipe()

    def start(self) -> dict[str, Any]:
        self.info = {"op": "hello", "pid": os.getpid(), "python": sys.version.split()[0], "preload": {},
                     "preload_failed": {}, "kernel_failed": {}, "seconds": 0.0, "threads": {}, "modules": 0,
                     "preload_files": []}
        return self.info

    def fileno(self) -> int:
        return self._rfd

    def read_message(self) -> dict[str, Any]:
        return {}

    def fork(self) -> WorkerHandle:
        wid = next(self.wids)
        try:
            proc = subprocess.Popen(
                [sys.executable, FAKE_WORKER, self.privdir, str(wid), self.key.decode(), str(os.getpid())],
                cwd=self.settings.cwd,
                start_new_session=True,  # as a forked worker: a terminal's Ctrl-C is the controller's
            )
        except OSError as exc:
            raise ControllerError(f"could not start a fake worker: {exc}") from exc
        self.procs[proc.pid] = proc
        conn = worker_connection(self.privdir, wid, self.key.decode())
        return WorkerHandle(self.ctx, wid, proc.pid, os.pidfd_open(proc.pid), conn)

    def exit_status(self, pid: int) -> str:
        proc = self.procs.pop(pid, None)
        if proc is None:
            return "exited"
        try:
            rc = proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.procs[pid] = proc
            return "exited"
        if rc < 0:
            return f"was killed by {signal.Signals(-rc).name}"
        return f"exited with status {rc}"

    def retire(self, w: WorkerHandle) -> None:
        super().retire(w)
        self._reap(w.pid)

    def _reap(self, pid: int) -> None:
        proc = self.procs.pop(pid, None)
        if proc is not None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """The spare, then every worker this pool started (a snapshot's death
        would take them along)."""
        if self.spare is not None:
            self.retire(self.spare)
        for pid in list(self.procs):
            self._reap(pid)
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass


def main() -> None:
    from forkreload.controller import Controller

    with open(sys.argv[1]) as f:
        conn = json.load(f)
    with open(sys.argv[2]) as f:
        settings = Settings(**json.load(f))
    log_file = os.environ.get("FORKRELOAD_LOG")
    logging.basicConfig(level=logging.DEBUG if log_file else logging.WARNING, format="%(name)s: %(message)s", filename=log_file)
    controller = Controller(conn, settings, pool_factory=FakePool)
    try:
        controller.start()
    except BaseException:
        controller.close()
        raise
    controller.run()


if __name__ == "__main__":
    main()
