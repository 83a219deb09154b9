"""The snapshot process and the workers forked from it, as the controller sees them.

A `WorkerPool` spawns one snapshot (a fresh interpreter, in its own session
so that a terminal's Ctrl-C reaches only the controller), checks who
connected to it, asks it for workers, keeps one spare worker started ahead
of need, and learns from it how each worker ended. A `WorkerHandle` is the
controller's side of one worker: its zmq sockets and its pidfd.

A `ServerPool` (the default) is the same pool whose snapshot is the user's
shared snapshot server (server.py) instead of a process of its own; it
falls back to being a plain `WorkerPool` when no server can be used.
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
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import zmq

from .channel import Channel
from .config import Settings
from .prestart import prestarted_ready
from .server import connect as server_connect
from .server import server_dir, server_key, server_starting
from .server import snapshot_env as _snapshot_env
from .server import spawn as server_spawn
from .snapshot import command as snapshot_command
from .watch import SourceWatch
from .worker import worker_connection

__all__ = ["ControllerError", "Stopping", "WorkerDied", "WorkerHandle", "WorkerPool", "ServerPool"]

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
        # A spare given the front end's debug session ahead (command, msg_id
        # of the requests sent): debugpy's start is then off the swap's path.
        self.debug_prepared: list[tuple[str, str]] = []
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
        # False while a shared server that handed its first worker out has
        # not imported yet: a fork would wait for those imports, so a spare
        # waits for its word (`prepared`) instead.
        self.prepared = True
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
        env = _snapshot_env()
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
        return self._take_hello(hello)

    def _take_hello(self, hello: dict[str, Any]) -> dict[str, Any]:
        """What a snapshot says once its preloads are imported: its report,
        and the preloaded files that are the user's own (an edit rebuilds it)."""
        self.info = hello
        self.prepared = hello.get("prepared", True) is not False
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
        elif msg.get("op") == "prepared":
            self.prepared = True
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

    def launch_later(self, delay: float) -> None:
        """`launch`, for a build that must not slow the first cells: a
        per-kernel snapshot has no reason to wait."""
        self.launch()

    def warm(self) -> bool:
        """Whether a start from this pool is just a fork (its snapshot is up).
        A per-kernel snapshot is never up before `start`, but nothing is gained
        by starting a smaller one first: it would be a second interpreter."""
        return True

    def _request_fork(self, wid: int) -> None:
        assert self.chan is not None
        self.chan.send({"op": "fork", "wid": wid, "cwd": self.settings.cwd})

    def fork(self) -> WorkerHandle:
        assert self.chan is not None
        wid = next(self.wids)
        self._request_fork(wid)
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


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


class _LaterLaunch(threading.Timer):
    """The timer of `ServerPool.launch_later`; `cancelled` once the pool closed."""

    cancelled = False


class ServerPool(WorkerPool):
    """A `WorkerPool` whose snapshot is the user's shared server (server.py).

    Same interface, so the swapper does not know which it has: `launch`
    connects to the live server of this pool's key, or spawns it (detached:
    it outlives this controller), `pending_fileno` is readable once the
    server answered, `fork` sends what the worker needs from this
    controller (its private directory, the Jupyter key, the environment,
    its stdout and stderr). When no server can be used (the directory is
    unsafe, it fails to start) it says why once and becomes the per-kernel
    snapshot it subclasses. If the server dies while in use, its workers die
    with it (parent-death signal); the next message read reconnects to a
    respawned one, so the session goes on with a fresh worker.
    """

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], key: bytes, privdir: str, settings: Settings, preload: list[str], wids: Iterator[int]) -> None:
        super().__init__(ctx, key, privdir, settings, preload, wids)
        self.direct = False  # fell back to a per-kernel snapshot
        self.kid, self.desc = server_key(preload, settings.watch, settings.cwd)
        self.dir: str | None = None
        self.server_proc: subprocess.Popen[bytes] | None = None  # the server, when this pool spawned it
        self._ready: int | None = None  # the spawned server writes 'ready' here
        self._conn: tuple[socket.socket, bytes] | None = None
        self._forked: set[int] = set()
        self._replaced_stale = False
        self._retried = False
        self._timer: _LaterLaunch | None = None
        self._blocking = False  # `start`: connect follows launch at once
        self._await_listening = False
        self._prestart_pipe: int | None = None
        self._gone = False  # the connection to the server broke

    # -- reaching the server -----------------------------------------------------

    def warm(self) -> bool:
        """Whether a server of this key is up now (False: starting means importing)."""
        try:
            self.dir = server_dir()
            if self._conn is None:
                self._conn = server_connect(self.dir, self.kid)
        except OSError:
            return True  # no server can be used: the fallback is one snapshot anyway
        return self._conn is not None

    def launch(self) -> None:
        try:
            self._launch_server()
        except OSError as exc:
            self._fall_back(exc)

    def _fall_back(self, why: BaseException) -> None:
        log.warning("the snapshot server cannot be used (%s); this kernel starts its own snapshot", why)
        self._close_server_side()
        self.direct = True
        super().launch()

    def launch_later(self, delay: float) -> None:
        """Start this server `delay` seconds from now, from a thread;
        `pending_fileno` is readable once it listens, as after `launch`.

        The full server of a cold start imports the same libraries as the
        first worker's first cell (the user's imports), on the same CPUs:
        started at once, it makes that cell slower than in a plain kernel.
        """
        try:
            self.dir = server_dir()
        except OSError as exc:
            self._fall_back(exc)
            return
        r, w = os.pipe2(os.O_CLOEXEC)
        self._ready = r
        d = self.dir

        def fire() -> None:
            line = b"failed: not started\n"
            try:
                if timer.cancelled:
                    return  # the pool was closed first
                conn = server_connect(d, self.kid)
                if conn is not None:
                    conn[0].close()
                    line = b"ready\n"
                else:
                    proc, ready = server_spawn(d, self.kid, self.desc, self.preload, self.settings.watch,
                                               self.settings.cwd, self.settings.server_idle, _snapshot_env())
                    self.server_proc = proc
                    with os.fdopen(ready, "rb") as f:
                        line = f.readline() or b"failed: it exited\n"
            except Exception as exc:  # said to the controller's loop through the pipe
                line = f"failed: {exc}\n".encode()
            finally:
                try:
                    os.write(w, line)
                except OSError:
                    pass  # the pool was closed meanwhile
                os.close(w)

        timer = _LaterLaunch(delay, fire)
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _launch_server(self) -> None:
        self.dir = server_dir()
        conn, self._conn = self._conn, None
        if conn is None:
            conn = server_connect(self.dir, self.kid)
        if conn is not None:
            self._attach(conn)
        elif self._blocking and not self.preload and self._take_prestarted():
            self._await_listening = True  # `connect` waits for it (`forkreload kernel` started it)
        elif self._blocking and server_starting(self.dir, self.kid):
            self._await_listening = True
        else:
            self._spawn()

    def start(self) -> dict[str, Any]:
        self._blocking = True
        return super().start()

    def _attach(self, conn: tuple[socket.socket, bytes]) -> None:
        sock, key = conn
        self.chan = Channel(sock, key)
        try:
            self.chan.send({"op": "hello", "watch": self.settings.watch, "pid": os.getpid()})
        except OSError:
            pass  # a server exiting as this connected: reading its hello says so

    def _spawn(self) -> None:
        assert self.dir is not None
        self.server_proc, self._ready = server_spawn(
            self.dir, self.kid, self.desc, self.preload, self.settings.watch, self.settings.cwd,
            self.settings.server_idle, _snapshot_env(),
        )

    def pending_fileno(self) -> int | None:
        if self.direct:
            return super().pending_fileno()
        if self._ready is not None:
            return self._ready
        return self.chan.fileno() if self.chan is not None and not self.info else None

    def starting_failed(self) -> bool:
        # A server that dies while starting closes its pipe: `connect` says why.
        return super().starting_failed() if self.direct else False

    def connect(self) -> dict[str, Any]:
        if self.direct:
            return super().connect()
        if not self._blocking:
            return self._connect_server()
        try:
            return self._connect_server()
        except (OSError, ControllerError) as exc:
            # A kernel that starts waits for a snapshot anyway: its own.
            self._fall_back(exc)
            return super().connect()

    def _connect_server(self) -> dict[str, Any]:
        deadline = time.monotonic() + _SNAPSHOT_TIMEOUT
        if self._ready is not None:
            line = self._read_ready(deadline)
            if not line.startswith("ready"):
                self._close_server_side()
                log_file = os.path.join(self.dir or "", f"{self.kid}.log")
                raise ControllerError(f"the snapshot server did not start ({line or 'it exited'}); see {log_file}")
            # Ours listens, or another controller's of this key does.
            self._attach(self._wait_listening(deadline))
        elif self._await_listening:
            self._await_listening = False
            self._attach(self._wait_listening(deadline))
        assert self.chan is not None
        try:
            hello = self._read_hello(deadline)
        except ControllerError:
            if self._retried:
                raise
            # It was exiting (idle) as this connection came in: another one.
            self._retried = True
            self._close_server_side()
            self._launch_server()
            return self._connect_server()
        if hello.get("stale_files") and not self._replaced_stale:
            # It imported a preloaded module of the user's before its last
            # edit: it serves its clients till they go, a new one the rest.
            log.info("the snapshot server %s holds older %s: replacing it", hello.get("pid"), hello["stale_files"])
            self._replaced_stale = True
            self.chan.send({"op": "retire"})
            self._read_hello(deadline, op="retired")
            self._close_server_side()
            self._launch_server()
            return self._connect_server()
        return self._take_hello(hello)

    def _read_ready(self, deadline: float) -> str:
        assert self._ready is not None
        data = b""
        try:
            while not data.endswith(b"\n") and time.monotonic() < deadline:
                ready, _, _ = select.select([self._ready], [], [], 1.0)
                if ready:
                    chunk = os.read(self._ready, 256)
                    if not chunk:
                        break
                    data += chunk
        finally:
            os.close(self._ready)
            self._ready = None
        return data.decode(errors="replace").strip()

    def _take_prestarted(self) -> bool:
        self._prestart_pipe = prestarted_ready()
        return self._prestart_pipe is not None

    def _wait_listening(self, deadline: float) -> tuple[socket.socket, bytes]:
        assert self.dir is not None
        pipe, self._prestart_pipe = self._prestart_pipe, None
        if pipe is not None:
            # The prestarted server says once it listens (a poll would be
            # up to 10 ms late), or that one was up, or fails (EOF): the loop
            # below then finds which, and starts one if none is.
            try:
                select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
            finally:
                os.close(pipe)
        spawned = False
        while time.monotonic() < deadline:
            conn = server_connect(self.dir, self.kid)
            if conn is not None:
                return conn
            if not server_starting(self.dir, self.kid):
                conn = server_connect(self.dir, self.kid)  # it may have just begun to listen
                if conn is not None:
                    return conn
                if spawned:
                    raise ControllerError(f"the snapshot server exited at start; see {os.path.join(self.dir, self.kid)}.log")
                # The one starting it gave up (or was a server dying): start one.
                spawned = True
                self._spawn()
                if not self._read_ready(deadline).startswith("ready"):
                    raise ControllerError(f"the snapshot server did not start; see {os.path.join(self.dir, self.kid)}.log")
                continue
            time.sleep(0.01)
        raise ControllerError(f"the snapshot server did not start within {_SNAPSHOT_TIMEOUT:.0f} s")

    def _read_hello(self, deadline: float, op: str = "hello") -> dict[str, Any]:
        assert self.chan is not None
        while True:
            ready, _, _ = select.select([self.chan.fileno()], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise ControllerError("the snapshot server did not answer")
            try:
                msg, fds = self.chan.recv()
            except OSError:
                msg, fds = None, []
            for fd in fds:
                os.close(fd)
            if msg is None:
                raise ControllerError("the snapshot server closed the connection")
            if msg.get("op") == op:
                return msg

    # -- workers -----------------------------------------------------------------

    def _request_fork(self, wid: int) -> None:
        if self.direct:
            return super()._request_fork(wid)
        assert self.chan is not None
        # The worker writes where this kernel's output goes, as a worker of
        # a per-kernel snapshot (its grandchild) would.
        stdio = []
        for fd in (1, 2):
            try:
                os.fstat(fd)
                stdio.append(fd)
            except OSError:
                break
        request = {
            "op": "fork",
            "wid": wid,
            "cwd": self.settings.cwd,
            "privdir": self.privdir,
            "key": self.key.decode(),
            "watch": self.settings.watch,
            "env": _snapshot_env(),
            "umask": _umask(),
        }
        try:
            self.chan.send(request, fds=stdio if len(stdio) == 2 else [])
        except OSError:
            self._server_gone()
            raise

    def fork(self) -> WorkerHandle:
        if self.direct:
            return super().fork()
        try:
            w = super().fork()
        except (OSError, ControllerError):
            if not self._gone and self.chan is not None:
                raise  # the server answered: it could not fork
            self._reconnect()
            w = super().fork()
        self._forked.add(w.pid)
        return w

    def _recv(self) -> tuple[dict[str, Any], list[int]]:
        try:
            msg, fds = super()._recv()
        except (ControllerError, OSError):
            if not self.direct:
                self._server_gone()
            raise
        if msg.get("op") == "exited":
            self._forked.discard(msg["pid"])
        return msg, fds

    def _server_gone(self) -> None:
        """Its workers died with it (parent-death signal); no one else will say how."""
        self._gone = True
        for pid in self._forked:
            self.exit_statuses.setdefault(pid, "was killed: its snapshot server ended")
        self._forked.clear()

    def read_message(self) -> dict[str, Any]:
        """One message from the server; if it is gone, a connection to a new one."""
        try:
            return super().read_message()
        except (ControllerError, OSError):
            if self.direct:
                raise
        hello = self._reconnect()
        return {"op": "reconnected", "pid": hello.get("pid")}

    def _reconnect(self) -> dict[str, Any]:
        """The server is gone (killed, stopped): a new one, for the next workers."""
        log.warning("the snapshot server ended; connecting to a new one")
        if self.spare is not None:
            self.retire(self.spare)
        self._close_server_side()
        self.info = {}
        self._gone = False
        self._retried = False
        self._blocking = True  # this session waits for its snapshot now
        self.launch()
        return self.connect()

    def exit_status(self, pid: int) -> str:
        if pid not in self.exit_statuses and self.chan is not None:
            try:
                return super().exit_status(pid)
            except (ControllerError, OSError):
                pass
        return self.exit_statuses.pop(pid, "exited")

    # -- the end -----------------------------------------------------------------

    def _close_server_side(self) -> None:
        if self._timer is not None:
            self._timer.cancelled = True  # it fires anyway, only to close its pipe
            self._timer = None
        if self._ready is not None:
            os.close(self._ready)
            self._ready = None
        if self._conn is not None:
            self._conn[0].close()
            self._conn = None
        if self.chan is not None:
            self.chan.close()  # the server kills this connection's workers
            self.chan = None
        if self.server_proc is not None:
            self.server_proc.poll()  # reaped if it exited; never killed: it serves others

    def close(self) -> None:
        """End the spare and leave the server (which ends this pool's other workers)."""
        if self.direct:
            return super().close()
        if self.spare is not None:
            self.retire(self.spare)
        self._close_server_side()
