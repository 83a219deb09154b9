"""Checkpoints, on the controller's side: the session's list of saved states.

Each checkpoint is a process (a fork of the worker after a cell that
changed something, see `checkpoint`) that connected to the controller's
checkpoint socket and waits there. The `Timeline` accepts them, checks who
they are, keeps them oldest first within a memory budget, and turns one
back into a worker on request: for `%forkreload undo`, and when the worker
dies in a cell.

A checkpoint's cost is its unique memory (USS: the pages the live worker
has rewritten since the fork), read from /proc/PID/smaps_rollup; RSS
would count the shared pages once per checkpoint. When the checkpoints
together use more than the budget (a quarter of the memory available at
start by default, `checkpoints` in settings), the oldest go first. A
checkpoint a live worker was restored from is that worker's parent and is
kept while the worker lives.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import zmq

from .channel import Channel, ForgedMessage
from .pool import WorkerDied, WorkerHandle, WorkerPool
from .worker import worker_connection

__all__ = ["Checkpoint", "Timeline", "unique_memory"]

log = logging.getLogger("forkreload.timeline")

MAX_CHECKPOINTS = 10
_RESTORE_TIMEOUT = 10.0
_HELLO_TIMEOUT = 2.0


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def memory(pid: int) -> dict[str, int]:
    """A process's Rss, Pss and private (unshared) memory in bytes, from
    /proc/PID/smaps_rollup; zeros if it is gone."""
    found = {"rss": 0, "pss": 0, "private": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    found[key.lower()] = int(rest.split()[0]) * 1024
                elif key in ("Private_Clean", "Private_Dirty"):
                    found["private"] += int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return found


def unique_memory(pid: int) -> int:
    """A process's private (unshared) memory in bytes, 0 if it is gone."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    return total


class Checkpoint:
    """One saved state: a waiting fork of a worker, after cell `cell`."""

    def __init__(self, chan: Channel, pid: int, pidfd: int, worker_pid: int, cell: int, wall: float) -> None:
        self.chan = chan
        self.pid = pid
        self.pidfd = pidfd
        self.worker_pid = worker_pid
        self.cell = cell
        self.wall = wall
        self.taken = time.monotonic()
        self.restored: WorkerHandle | None = None  # the live worker made from it
        self.exit_statuses: dict[int, str] = {}
        self.pss = 0  # its share of the pages it maps, when last measured
        self.dead = False
        self.threads: list[str] = []  # the user's threads in the worker then: not in the copy

    def age(self) -> float:
        return time.monotonic() - self.taken

    def alive(self) -> bool:
        if self.dead:
            return False
        ready, _, _ = select.select([self.pidfd], [], [], 0)
        if ready:
            self.dead = True
        return not self.dead

    def _read(self, timeout: float) -> dict[str, Any] | None:
        ready, _, _ = select.select([self.chan.fileno()], [], [], timeout)
        if not ready:
            return None
        try:
            msg, fds = self.chan.recv()
        except ForgedMessage:
            log.warning("dropped a checkpoint message with a bad signature")
            return None
        except OSError:
            msg, fds = None, []
        if msg is None:
            self.dead = True
            return None
        if msg.get("op") == "exited":
            self.exit_statuses[msg["pid"]] = msg["status"]
        if fds and msg.get("op") == "restored":
            msg["pidfd"] = fds[0]
        else:
            for fd in fds:
                os.close(fd)
        return msg

    def exit_status(self, pid: int) -> str:
        """How the worker restored from this checkpoint ended."""
        deadline = time.monotonic() + 1.0
        while pid not in self.exit_statuses and time.monotonic() < deadline and not self.dead:
            self._read(0.05)
        return self.exit_statuses.pop(pid, "exited")

    def restore(self, ctx: zmq.Context[zmq.Socket[bytes]], privdir: str, key: bytes, wid: int,
                count: int = 0, inputs: dict[int, str] | None = None) -> WorkerHandle:
        """A running worker with this checkpoint's state (the checkpoint stays);
        its next cell is number `count`, the cells since in its input history."""
        if not self.alive():
            raise WorkerDied("the checkpoint is gone")
        self.chan.send({"op": "restore", "wid": wid, "privdir": privdir, "key": key.decode(),
                        "count": count, "inputs": {str(n): code for n, code in (inputs or {}).items()}})
        deadline = time.monotonic() + _RESTORE_TIMEOUT
        while True:
            msg = self._read(max(deadline - time.monotonic(), 0.0))
            if msg is None and (self.dead or time.monotonic() > deadline):
                raise WorkerDied("the checkpoint did not answer")
            if msg is not None and msg.get("op") == "restored" and "pidfd" in msg:
                break
        conn = worker_connection(privdir, wid, key.decode())
        w = WorkerHandle(ctx, wid, msg["pid"], msg["pidfd"], conn)
        w.origin = self
        try:
            WorkerPool.wait_ready(w)
        except WorkerDied:
            w.kill()
            w.close()
            raise
        self.restored = w
        return w

    def discard(self) -> None:
        if self.chan.fileno() >= 0:
            try:
                self.chan.send({"op": "discard"})
            except OSError:
                pass
            self.chan.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self.dead = True

    def in_use(self) -> bool:
        """A live worker was restored from it (and dies with it)."""
        return self.restored is not None and not self.restored.dead and self.restored.pidfd >= 0

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "cell": self.cell, "age": round(self.age(), 1), "pss": self.pss, "in_use": self.in_use()}


class Timeline:
    """The session's checkpoints, oldest first, within a memory budget."""

    def __init__(self, privdir: str, key: bytes, budget: int | None, live_workers: Callable[[], list[int]] = list) -> None:
        self.key = key
        self.live_workers = live_workers  # pids of the current and previous workers
        self.used = 0  # bytes the checkpoints hold beyond the live workers, when last measured
        self.budget_setting = budget
        if budget is None:
            avail = available_memory()
            budget = avail // 4 if avail is not None else 1 << 30
        self.budget = budget
        self.enabled = budget > 0
        self.items: list[Checkpoint] = []
        self.sock_path = os.path.join(privdir, "checkpoints.sock")
        self.listener: socket.socket | None = None
        self.workers: set[int] = set()  # pids of the session's workers: only their forks may connect
        self.waiting: list[tuple[socket.socket, float]] = []  # connected, hello not read yet (until the deadline)
        self._measured = 0.0
        if self.enabled:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            listener.bind(self.sock_path)
            listener.listen(16)
            listener.setblocking(False)
            self.listener = listener

    def fileno(self) -> int | None:
        return self.listener.fileno() if self.listener is not None else None

    def accept(self) -> list[Checkpoint]:
        """Take the checkpoints that connected; each must be a fork of one
        of the session's workers, and sign its hello with the session key."""
        new: list[Checkpoint] = []
        if self.listener is None:
            return new
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            self.waiting.append((conn, time.monotonic() + _HELLO_TIMEOUT))
        # A connection is admitted once its hello is there: a checkpoint
        # sends it at once, and nobody can hold the controller by not sending.
        still: list[tuple[socket.socket, float]] = []
        for conn, deadline in self.waiting:
            ready, _, _ = select.select([conn], [], [], 0)
            if not ready and time.monotonic() < deadline:
                still.append((conn, deadline))
                continue
            cp = self._admit(conn, ready=bool(ready))
            if cp is not None:
                self.items.append(cp)
                new.append(cp)
                log.debug("checkpoint %d after cell %d of worker %d", cp.pid, cp.cell, cp.worker_pid)
        self.waiting = still
        if new:
            # Measured now, while the user reads the cell's output: the
            # cells since the last checkpoint are what grew the memory held.
            self.enforce()
        return new

    def _admit(self, conn: socket.socket, ready: bool) -> Checkpoint | None:
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        conn.setblocking(True)
        chan = Channel(conn, self.key)
        try:
            if uid != os.getuid():
                raise ValueError(f"uid {uid}")
            hello, fds = chan.recv() if ready else (None, [])
            for fd in fds:
                os.close(fd)
            if hello is None or hello.get("op") != "checkpoint" or hello.get("pid") != pid:
                raise ValueError("no hello")
            if hello.get("worker") not in self.workers or _parent(pid) != hello.get("worker"):
                raise ValueError(f"parent {hello.get('worker')} is not a worker of this session")
            pidfd = os.pidfd_open(pid)
        except (ValueError, ForgedMessage, OSError) as exc:
            log.warning("refused a checkpoint connection from pid %d: %s", pid, exc)
            chan.close()
            return None
        cp = Checkpoint(chan, pid, pidfd, hello["worker"], int(hello.get("cell", 0)), float(hello.get("time", time.time())))
        cp.threads = [str(t) for t in hello.get("threads", [])]
        return cp

    def live(self) -> list[Checkpoint]:
        """The checkpoints still there, oldest first (dead ones dropped)."""
        for cp in [c for c in self.items if not c.alive()]:
            self.items.remove(cp)
            cp.discard()
        return list(self.items)

    def measure(self) -> int:
        """The memory the checkpoints hold beyond the live workers'.

        Each page counted once: the sum of the proportional sizes (PSS) of
        the checkpoints and the live workers is the memory they hold
        together; what the live workers map themselves (RSS) is theirs.
        (A page only checkpoints share is private to none of them: unique
        sizes would miss it. Each checkpoint's own figure is its PSS.)
        """
        together, workers = 0, 0
        for pid in self.live_workers():
            m = memory(pid)
            together += m["pss"]
            workers += m["rss"]
        for cp in self.live():
            cp.pss = memory(cp.pid)["pss"]
            together += cp.pss
        self._measured = time.monotonic()
        self.used = max(together - workers, 0)
        return self.used

    def enforce(self) -> None:
        """Drop the oldest checkpoints (not in use) past the count or the
        budget (measured: ~5 ms per GB of a checkpoint's mappings)."""
        def droppable() -> list[Checkpoint]:
            return [c for c in self.items if not c.in_use()]

        while len(self.items) > MAX_CHECKPOINTS and droppable():
            self.drop(droppable()[0])
        while self.measure() > self.budget and droppable():
            self.drop(droppable()[0])

    def tick(self, idle: bool) -> None:
        if self.waiting:
            self.accept()
        # A cell that took no checkpoint may have written too: measured
        # again now and then between cells.
        if idle and self.items and time.monotonic() - self._measured > 30.0:
            self.enforce()

    def drop(self, cp: Checkpoint) -> None:
        if cp in self.items:
            self.items.remove(cp)
        cp.discard()

    def drop_newer(self, cp: Checkpoint) -> list[Checkpoint]:
        """After an undo to `cp`: the states after it are gone (no redo)."""
        i = self.items.index(cp)
        gone = [c for c in self.items[i + 1 :] if not c.in_use()]
        for c in gone:
            self.drop(c)
        return gone

    def wait_for(self, pids: list[int], timeout: float = 2.0) -> None:
        """Until the checkpoints with these pids connected (or died)."""
        deadline = time.monotonic() + timeout
        while self.listener is not None:
            known = {c.pid for c in self.items}
            missing = [p for p in pids if p not in known and _exists(p)]
            if not missing or time.monotonic() > deadline:
                return
            select.select([self.listener], [], [], 0.05)
            self.accept()

    def close(self) -> None:
        for conn, _ in self.waiting:
            conn.close()
        self.waiting.clear()
        for cp in self.items:
            cp.discard()
        self.items.clear()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.sock_path)
            except OSError:
                pass


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
    except (OSError, StopIteration, ValueError):
        return None


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False
