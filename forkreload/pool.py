"""The snapshot process and the workers forked from it, as the controller sees them.

A `WorkerPool` spawns one snapshot (a fresh interpreter, in its own session
so that a terminal's Ctrl-C reaches only the controller), checks who
connected to it, asks it for workers, keeps one spare worker started ahead
of need, and learns from it how each worker ended. A `WorkerHandle` is the
controller's side of one worker: its zmq sockets and its pidfd.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import zmq

from .channel import Channel
from .config import Settings
from .snapshot import command as snapshot_command
from .watch import SourceWatch
from .worker import worker_connection

__all__ = ["ControllerError", "Stopping", "WorkerDied", "WorkerHandle", "WorkerPool"]

log = logging.getLogger("forkreload.pool")

# A worker answers ~0.1 s after its fork; far beyond that, it is stuck.
_READY_TIMEOUT = 20.0
_SNAPSHOT_TIMEOUT = 300.0


class ControllerError(RuntimeError):
    """The controller could not start or lost its snapshot."""


class WorkerDied(RuntimeError):
    """A worker exited while the controller was waiting on it."""


class Stopping(WorkerDied):
    """The session ends (SIGTERM, the front end gone) while the controller
    waits on a worker: the wait is given up as if the worker had gone."""


class WorkerHandle:
    """The controller's side of one worker: its sockets and its process."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], wid: int, pid: int, pidfd: int, conn: dict[str, Any]) -> None:
        self.wid = wid
        self.pid = pid
        self.pidfd = pidfd
        self.ready = False
        self.dead = False
        self.pool: WorkerPool | None = None  # the snapshot it was forked from
        self.origin: Any = None  # the checkpoint it was restored from (timeline.Checkpoint)
        # Front-end requests forwarded and not answered yet: msg_id -> (identities, header).
        self.inflight: dict[str, tuple[list[bytes], dict[str, Any]]] = {}
        # Requests the worker said busy for and not idle yet.
        self.busy_for: set[str] = set()
        base = f"ipc://{conn['ip']}-"
        identity = f"forkreload-{uuid.uuid4().hex[:8]}".encode()
        self.shell = ctx.socket(zmq.DEALER)
        self.stdin = ctx.socket(zmq.DEALER)
        # input_request is routed to the shell request's identity: the stdin
        # socket must carry the same one or it never comes back.
        for s in (self.shell, self.stdin):
            s.setsockopt(zmq.IDENTITY, identity)
        self.control = ctx.socket(zmq.DEALER)
        self.iopub = ctx.socket(zmq.SUB)
        self.iopub.setsockopt(zmq.RCVHWM, 0)
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        # The worker binds after this connects: zmq retries on its own
        # timer. A stdin not yet connected when the first cell runs would
        # lose its input_request, so wait_ready watches for its handshake.
        for s in (self.shell, self.stdin, self.control, self.iopub):
            s.setsockopt(zmq.RECONNECT_IVL, 10)
        self.stdin_monitor: zmq.Socket[bytes] | None = self.stdin.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.shell.connect(base + str(conn["shell_port"]))
        self.stdin.connect(base + str(conn["stdin_port"]))
        self.control.connect(base + str(conn["control_port"]))
        self.iopub.connect(base + str(conn["iopub_port"]))
        # iopub first: a cell's output must be forwarded before its reply.
        self.sockets = (self.iopub, self.shell, self.stdin, self.control)

    def kill(self) -> None:
        if not self.dead:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_monitor(self) -> None:
        if self.stdin_monitor is not None:
            self.stdin.disable_monitor()
            self.stdin_monitor.close(linger=0)
            self.stdin_monitor = None

    def close(self) -> None:
        self.stop_monitor()
        for s in self.sockets:
            s.close(linger=0)
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class WorkerPool:
    """One snapshot process, the workers it forks, and a spare among them."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], key: bytes, privdir: str, settings: Settings, preload: list[str], wids: Iterator[int]) -> None:
        self.ctx = ctx
        self.key = key
        self.privdir = privdir
        self.settings = settings
        self.preload = preload
        # Worker ids name their ipc sockets: unique across the session's pools.
        self.wids = wids
        self.spare: WorkerHandle | None = None
        self.info: dict[str, Any] = {}
        # Source files of preloaded modules that are the user's own code.
        self.watch = SourceWatch()
        self.exit_statuses: dict[int, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.chan: Channel | None = None
        self._listener: socket.socket | None = None  # while the snapshot starts

    # -- the snapshot ------------------------------------------------------

    def start(self) -> dict[str, Any]:
        """Spawn the snapshot and wait for its hello (the preload report)."""
        self.launch()
        return self.connect()

    def launch(self) -> None:
        """Spawn the snapshot; `connect` takes its hello once `pending_fileno`
        is readable (it connects when its preloads are imported)."""
        sock_path = os.path.join(self.privdir, f"snapshot-{uuid.uuid4().hex[:8]}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(sock_path)
        listener.listen(1)
        self._listener = listener
        env = dict(os.environ)
        env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
        # debugpy (pre-imported for fast worker start) warns about frozen modules.
        env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
        self.proc = subprocess.Popen(
            snapshot_command(),
            stdin=subprocess.PIPE,
            cwd=self.settings.cwd,
            env=env,
            # Ctrl-C in a terminal must reach the controller only; it decides
            # whether the worker gets an interrupt.
            start_new_session=True,
        )
        cfg = {
            "key": self.key.decode(),
            "sock": sock_path,
            "controller_pid": os.getpid(),
            "privdir": self.privdir,
            "cwd": self.settings.cwd,
            "preload": self.preload,
            "watch": self.settings.watch,
        }
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cfg).encode() + b"\n")
        self.proc.stdin.close()

    def _drop_listener(self) -> None:
        """Close the socket the snapshot connects to, and remove its name."""
        if self._listener is None:
            return
        sock_path = self._listener.getsockname()
        self._listener.close()
        self._listener = None
        try:
            os.unlink(sock_path)
        except OSError:
            pass

    def pending_fileno(self) -> int | None:
        """While the snapshot starts: a descriptor readable once it connected."""
        return self._listener.fileno() if self._listener is not None else None

    def starting_failed(self) -> bool:
        """The snapshot died before it connected."""
        return self._listener is not None and self.proc is not None and self.proc.poll() is not None

    def connect(self) -> dict[str, Any]:
        """Accept the launched snapshot and read its hello (the preload report)."""
        listener = self._listener
        assert listener is not None
        try:
            conn = self._accept(listener)
        finally:
            self._drop_listener()
        self.chan = Channel(conn, self.key)
        hello, _ = self.chan.recv()
        if not hello or hello.get("op") != "hello":
            raise ControllerError("the snapshot did not say hello")
        self.info = hello
        for m in hello.get("preload_files", []):
            self.watch.add(m["name"], m["file"], m["sha"])
        if hello.get("kernel_failed"):
            raise ControllerError(f"the snapshot could not import the kernel: {hello['kernel_failed']}")
        return hello

    def _accept(self, listener: socket.socket) -> socket.socket:
        assert self.proc is not None
        listener.settimeout(1.0)
        deadline = time.monotonic() + _SNAPSHOT_TIMEOUT
        while True:
            try:
                conn, _ = listener.accept()
                break
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise ControllerError(f"the snapshot process exited at start (status {self.proc.returncode})") from None
                if time.monotonic() > deadline:
                    raise ControllerError(f"the snapshot did not start within {_SNAPSHOT_TIMEOUT:.0f} s") from None
        # Only the process we spawned may speak for the snapshot.
        pid, _uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if pid != self.proc.pid:
            conn.close()
            raise ControllerError("an unexpected process connected to the snapshot socket")
        conn.settimeout(None)
        return conn

    def fileno(self) -> int:
        assert self.chan is not None
        return self.chan.fileno()

    def read_message(self) -> dict[str, Any]:
        """One message from the snapshot (readable now); notes exit statuses."""
        assert self.chan is not None
        msg, fds = self._recv()
        for fd in fds:
            os.close(fd)
        return msg

    def _recv(self) -> tuple[dict[str, Any], list[int]]:
        assert self.chan is not None
        msg, fds = self.chan.recv()
        if msg is None:
            raise ControllerError("the snapshot process is gone")
        if msg.get("op") == "exited":
            self.exit_statuses[msg["pid"]] = msg["status"]
        return msg, fds

    def exit_status(self, pid: int) -> str:
        """How a worker ended, as the snapshot (its parent) reaped it."""
        deadline = time.monotonic() + 1.0
        while pid not in self.exit_statuses and time.monotonic() < deadline:
            ready, _, _ = select.select([self.fileno()], [], [], 0.05)
            if ready:
                self.read_message()
        return self.exit_statuses.pop(pid, "exited")

    # -- workers -------------------------------------------------------------

    def fork(self) -> WorkerHandle:
        assert self.chan is not None
        wid = next(self.wids)
        self.chan.send({"op": "fork", "wid": wid, "cwd": self.settings.cwd})
        while True:
            msg, fds = self._recv()
            if msg.get("op") == "fork":
                break
            for fd in fds:
                os.close(fd)
        if msg.get("error") or not fds:
            for fd in fds:
                os.close(fd)
            raise ControllerError(f"could not fork a worker: {msg.get('error', 'no process handle')}")
        conn = worker_connection(self.privdir, wid, self.key.decode())
        w = WorkerHandle(self.ctx, wid, msg["pid"], fds[0], conn)
        w.pool = self
        return w

    @staticmethod
    def wait_ready(w: WorkerHandle) -> None:
        """Block until the worker's iopub welcome arrived and its stdin is
        connected: only then is routing safe (output and input_request reach
        the front end). Nothing else a worker publishes before it is routed
        to matters.
        """
        deadline = time.monotonic() + _READY_TIMEOUT
        poller = zmq.Poller()
        poller.register(w.iopub, zmq.POLLIN)
        poller.register(w.pidfd, zmq.POLLIN)
        monitor = w.stdin_monitor
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        stdin_ready = monitor is None
        while not (w.ready and stdin_ready):
            if time.monotonic() > deadline:
                raise WorkerDied("the new worker did not start in time")
            events = dict(poller.poll(200))
            if w.pidfd in events:
                w.dead = True
                raise WorkerDied("the new worker exited while starting")
            if w.iopub in events:
                frames = w.iopub.recv_multipart()
                header = json.loads(frames[frames.index(b"<IDS|MSG>") + 2] or b"{}")
                w.ready = w.ready or header.get("msg_type") == "iopub_welcome"
            if monitor is not None and monitor in events:
                monitor.recv_multipart()  # only the handshake event is subscribed
                stdin_ready = True
        w.stop_monitor()

    def take_spare(self) -> WorkerHandle:
        """A started worker with no user state: the spare, or a new fork.

        A worker that does not come up in time is replaced once, so that one
        stuck start costs a delay, not the swap.
        """
        w, self.spare = self.spare, None
        for attempt in range(2):
            if w is None or w.dead:
                if w is not None:
                    self.retire(w)
                w = self.fork()
            try:
                self.wait_ready(w)
                return w
            except WorkerDied as exc:
                log.warning("a new worker did not start (%s)%s", exc, "; trying another" if attempt == 0 else "")
                self.retire(w)
                w = None
        raise WorkerDied("no new worker could be started")

    def refill_spare(self) -> None:
        if self.spare is None:
            try:
                self.spare = self.fork()
            except ControllerError as exc:
                log.warning("no spare worker: %s", exc)

    def retire(self, w: WorkerHandle) -> None:
        """End a worker; output still queued from it belongs to cells that ended."""
        if w is self.spare:
            self.spare = None
        w.kill()
        w.close()
        for name in os.listdir(self.privdir):
            if name.startswith(f"w{w.wid}-") or name == f"w{w.wid}.json":
                try:
                    os.unlink(os.path.join(self.privdir, name))
                except OSError:
                    pass

    def close(self) -> None:
        """End the spare and the snapshot (whose death ends its other workers)."""
        self._drop_listener()
        if self.spare is not None:
            self.retire(self.spare)
        if self.chan is not None:
            self.chan.close()  # the snapshot exits on EOF
        elif self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # still importing its preloads: nothing to wait for
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
