"""`forkreload.Session`: the Python API for scripts, tests and benchmarks.

A Session starts a controller process (the same one that serves notebooks
and the console) and talks to it as an ordinary Jupyter client does, over
jupyter_client. Nothing here takes a shortcut around the controller.
"""

from __future__ import annotations

import os
import queue
import time
from dataclasses import dataclass, field
from typing import Any

import zmq
from jupyter_client.blocking.client import BlockingKernelClient

from .launcher import LaunchSettings, launch_controller
from .protocol import CONTROL_REQUEST, REPLY_METADATA_KEY, TAG_NOTICE, TAG_PROGRESS, Reload

__all__ = ["Session", "Result", "Reload", "SessionError", "ForkUnavailable"]


class SessionError(RuntimeError):
    """The session's controller could not be started or stopped answering."""


class ForkUnavailable(SessionError):
    """This platform has no os.fork, which forkreload is built on."""


@dataclass
class Result:
    """What one `Session.execute` produced."""

    status: str  # 'ok' or 'error'
    stdout: str = ""
    stderr: str = ""
    result: str | None = None  # text/plain of the last expression
    error: tuple[str, str] | None = None  # (exception name, value)
    traceback: list[str] = field(default_factory=list)
    reload: Reload | None = None
    notice: str = ""  # forkreload's own one-line notices for this cell
    execution_count: int | None = None
    displays: list[dict[str, Any]] = field(default_factory=list)


class Session:
    """An interactive session that survives edits of the user's modules.

    >>> with Session(cwd="myproject", preload=["numpy"]) as s:   # doctest: +SKIP
    ...     s.execute("import shapes; g = shapes.Greeter('ann')")
    ...     # edit myproject/shapes.py ...
    ...     s.execute("print(g.greet())").stdout
    """

    def __init__(
        self,
        cwd: str | os.PathLike[str] = ".",
        preload: list[str] | tuple[str, ...] | None = None,
        mode: str | None = None,
        quiet: bool | None = None,
        watch: list[str] | tuple[str, ...] | None = None,
        learn: bool = False,
        startup_timeout: float = 120.0,
        env: dict[str, str] | None = None,
        checkpoints: str | int | None = None,
    ) -> None:
        if not hasattr(os, "fork"):
            raise ForkUnavailable("forkreload needs os.fork(), which this platform does not provide")
        self.cwd = os.path.realpath(os.fspath(cwd))
        settings = LaunchSettings(
            cwd=self.cwd,
            preload=None if preload is None else list(preload),
            mode=mode,
            quiet=quiet,
            watch=None if watch is None else [os.fspath(w) for w in watch],
            learn=learn,
        )
        if checkpoints is not None:
            # The budget of the undo/crash checkpoints: "auto", "off", 0, "2G".
            env = dict(os.environ if env is None else env)
            env["FORKRELOAD_CHECKPOINTS"] = str(checkpoints)
        self._launched = launch_controller(settings, env=env)
        self.proc = self._launched.proc
        self.connection_file = self._launched.connection_file
        self.client = BlockingKernelClient()
        self.client.load_connection_file(self.connection_file)
        self.client.start_channels()
        self._closed = False
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.close()
            raise

    # -- lifecycle -----------------------------------------------------------

    @property
    def pid(self) -> int:
        """The controller's process id."""
        return self.proc.pid

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise SessionError(f"the forkreload controller exited (status {self.proc.returncode})")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        msg_id = self.client.kernel_info()
        while True:
            self._check_alive()
            if time.monotonic() > deadline:
                raise SessionError(f"the forkreload controller did not answer within {timeout:.0f} s")
            try:
                reply = self.client.get_shell_msg(timeout=0.5)
            except queue.Empty:
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        # The iopub subscription must be in place before the first cell, or
        # its output and idle are lost (a warm snapshot server answers
        # kernel_info before a slow subscriber joins): the controller greets
        # each subscription with iopub_welcome. Then the start-up chatter is
        # drained so it is not taken for a cell's.
        welcomed = False
        while True:
            try:
                msg = self.client.get_iopub_msg(timeout=0.05 if welcomed else 0.5)
            except queue.Empty:
                if welcomed:
                    break
                self._check_alive()
                if time.monotonic() > deadline:
                    raise SessionError(f"the forkreload controller did not answer within {timeout:.0f} s") from None
                continue
            welcomed = welcomed or msg["header"].get("msg_type") == "iopub_welcome"

    def close(self) -> None:
        """Shut the session down; no process it started is left behind."""
        if self._closed:
            return
        self._closed = True
        if self.proc.poll() is None:
            try:
                self.client.shutdown()
                self.proc.wait(timeout=10)
            except Exception:
                pass
        self._launched.stop()
        self.client.stop_channels()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- cells ---------------------------------------------------------------

    def execute(self, code: str, timeout: float | None = 120.0) -> Result:
        """Run one cell in the current worker (after any pending reload)."""
        self._check_alive()
        msg_id = self.client.execute(code, allow_stdin=False)
        res = Result(status="ok")
        notices: list[str] = []
        reply: dict[str, Any] | None = None
        idle = False
        deadline = None if timeout is None else time.monotonic() + timeout
        iopub, shell = self.client.iopub_channel, self.client.shell_channel
        poller = zmq.Poller()
        poller.register(iopub.socket, zmq.POLLIN)
        poller.register(shell.socket, zmq.POLLIN)
        while reply is None or not idle:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"cell did not finish within {timeout} s")
            self._check_alive()
            events = dict(poller.poll(500))
            if iopub.socket in events:
                msg = iopub.get_msg(timeout=0)
                if msg["parent_header"].get("msg_id") == msg_id:
                    idle = self._collect(msg, res, notices) or idle
            if shell.socket in events:
                m = shell.get_msg(timeout=0)
                if m["parent_header"].get("msg_id") == msg_id:
                    reply = m
        content = reply["content"]
        res.status = content.get("status", "error")
        res.execution_count = content.get("execution_count")
        if res.status == "error" and res.error is None:
            res.error = (content.get("ename", ""), content.get("evalue", ""))
        res.reload = Reload.from_dict(reply.get("metadata", {}).get(REPLY_METADATA_KEY))
        res.notice = "".join(notices)
        return res

    @staticmethod
    def _collect(msg: dict[str, Any], res: Result, notices: list[str]) -> bool:
        t = msg["msg_type"]
        c = msg["content"]
        if t == "status":
            return bool(c.get("execution_state") == "idle")
        if t == "stream":
            kind = msg.get("metadata", {}).get(REPLY_METADATA_KEY)
            if kind == TAG_NOTICE:
                notices.append(c["text"])
            elif kind == TAG_PROGRESS:
                pass  # the "preparing a fresh worker" line, cleared again
            elif c.get("name") == "stderr":
                res.stderr += c["text"]
            else:
                res.stdout += c["text"]
        elif t == "execute_result":
            res.result = c.get("data", {}).get("text/plain")
        elif t == "display_data":
            res.displays.append(c.get("data", {}))
        elif t == "error":
            res.error = (c.get("ename", ""), c.get("evalue", ""))
            res.traceback = list(c.get("traceback", []))
        return False

    # -- forkreload's own requests -------------------------------------------

    def _request(self, content: dict[str, Any], timeout: float) -> dict[str, Any]:
        self._check_alive()
        msg = self.client.session.msg(CONTROL_REQUEST, content)
        self.client.control_channel.send(msg)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                reply = self.client.control_channel.get_msg(timeout=0.5)
            except queue.Empty:
                continue
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                answer: dict[str, Any] = reply["content"]
                return answer
        raise SessionError(f"no answer to {content.get('cmd')} within {timeout:.0f} s")

    def status(self) -> dict[str, Any]:
        """The snapshot's preload set, the watched modules, the last reload."""
        return self._request({"cmd": "status"}, timeout=30)

    def restart(self, timeout: float = 120.0) -> Reload:
        """Force a fresh worker with the variables migrated, edits or not."""
        reply = self._request({"cmd": "restart"}, timeout=timeout)
        report = Reload.from_dict(reply.get("report"))
        if report is None:
            raise SessionError(reply.get("evalue", "restart failed"))
        return report

    def undo(self, n: int = 1, timeout: float = 60.0) -> str:
        """Return to the state before the last `n` cells that changed it (a
        checkpoint becomes the worker); the notice that says which.

        Raises SessionError when there is nothing that far back to undo.
        """
        reply = self._request({"cmd": "undo", "n": n}, timeout=timeout)
        text = str(reply.get("text", reply.get("evalue", "")))
        if not reply.get("undone"):
            raise SessionError(text)
        return text

    def interrupt(self) -> None:
        """Interrupt the running cell (in the worker; the session stays)."""
        msg = self.client.session.msg("interrupt_request", {})
        self.client.control_channel.send(msg)
