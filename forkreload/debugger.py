"""The front end's visual debugger across worker swaps.

ipykernel's debugger (debugpy) lives inside each worker: `debug_request`
reaches the current worker's control socket through the proxy unchanged,
its `debug_reply` and `debug_event` messages come back the same way. What
the proxy adds is continuity: a front end that started a debug session
believes it talks to one kernel, so when the current worker is replaced
(a swap, a crash, `%forkreload back`) the new worker gets the session the
front end built, by replaying the requests that built it (`initialize`,
`attach`, the breakpoints of each source, `configurationDone`). The front
end never sees the replay, and its breakpoints keep working. The old
worker, when kept for `back`, leaves the session (`disconnect`) and gets it
replayed if it is current again. If the replay fails, the front end gets
the DAP `terminated` event and the cell a one-line notice, so it never
debugs a process that is gone.

debugpy is imported by the snapshot (no thread, nothing listening); the
first `initialize` in a worker starts it there, after the fork: its
threads and its adapter process belong to that worker and end with it.

Cells are dumped to files named by a hash of their code in ipykernel's
temporary directory, which carries the worker's pid; every worker of a
session uses one directory (`prepare_worker`), so a cell's file, and the
breakpoints set in it, are the same in the new worker.

A front end's clean restart ends the session (`forget`), as a restarted
ipykernel does: the front end starts it again itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import zmq

from . import notices

if TYPE_CHECKING:
    from .controller import Controller
    from .pool import WorkerHandle

__all__ = ["DebugSession", "prepare_worker", "CELLS_DIR"]

log = logging.getLogger("forkreload.debugger")

DELIM = b"<IDS|MSG>"
CELLS_DIR = "cells"  # under the controller's private directory
# Requests a session is built with, replayed once each (the last one sent).
_SESSION_COMMANDS = ("initialize", "attach", "setExceptionBreakpoints", "setFunctionBreakpoints", "configurationDone")
# Without these the new worker has no session: the replay failed.
_ESSENTIAL = ("initialize", "attach")
# Starting debugpy in a new worker spawns its adapter process (about a
# second on a busy machine); a replay that takes longer has failed.
REPLAY_TIMEOUT = 30.0
DISCONNECT = {"type": "request", "seq": 0, "command": "disconnect", "arguments": {"restart": False, "terminateDebuggee": False}}


def prepare_worker(kernel: Any, privdir: str) -> None:
    """In a worker, before its first cell: its debugger as ipykernel's own.

    ipykernel dumps cells into a directory named by the kernel's pid; every
    worker of a session uses the session's instead, so a cell's file name
    (its code's hash) and the debugger's `tmpFilePrefix` are the same in
    every worker, and the front end's breakpoints in a cell still apply
    after a swap (the controller removes the directory with its private
    directory). And the worker's first frame, the snapshot's `python -c`
    code, is hidden from the call stack like the rest of the kernel's.
    """
    import ipykernel.compiler
    import ipykernel.debugger

    path = os.path.join(privdir, CELLS_DIR)

    def get_tmp_directory() -> str:
        return path

    # compiler.get_file_name looks it up in its module; the debugger imported its own name.
    ipykernel.compiler.get_tmp_directory = get_tmp_directory
    ipykernel.debugger.get_tmp_directory = get_tmp_directory  # type: ignore[attr-defined]  # its import of the compiler's name
    # Sent as debugpy's exclusion rules at attach, with the kernel's own
    # files (no debugger without debugpy; no such list in older ipykernels).
    hidden = getattr(getattr(kernel, "debugger", None), "kernel_modules", None)
    if isinstance(hidden, list):
        hidden.append("<string>")


def _json(frame: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(frame) if frame else {}
    return parsed


def _parts(frames: list[bytes]) -> list[bytes]:
    return frames[frames.index(DELIM) + 1 :]


class DebugSession:
    """The controller's record of the front end's debug session.

    It keeps the requests that built the session, as they were sent, once
    the worker answered them with success: the last of each of
    `_SESSION_COMMANDS` and the last `setBreakpoints` of each source.
    """

    def __init__(self, proxy: Controller) -> None:
        self.proxy = proxy
        self.requests: dict[str, dict[str, Any]] = {}  # command -> request content
        self.breakpoints: dict[str, dict[str, Any]] = {}  # source path -> setBreakpoints content
        self.pending: dict[str, dict[str, Any]] = {}  # msg_id -> a front end's request, until its reply
        self.own: set[str] = set()  # the controller's requests: their replies are not forwarded
        self.quiet: set[str] = set()  # while replaying: requests whose events are not forwarded
        self.notice: str | None = None  # told in the next cell
        # Replies to the requests a spare was given ahead, read before its
        # switch (an agent call to it reads its control socket too).
        self.ahead: dict[str, dict[str, Any] | None] = {}

    @property
    def active(self) -> bool:
        """Whether the front end has a debug session in the current worker."""
        return all(c in self.requests for c in _ESSENTIAL)

    def forget(self) -> None:
        """The session ended (disconnect, a front end's restart)."""
        self.requests.clear()
        self.breakpoints.clear()
        self.pending.clear()
        # A spare that was given the session ahead holds one no one has now.
        pool = self.proxy.swapper.pool
        if pool is not None and pool.spare is not None and pool.spare.debug_prepared:
            pool.retire(pool.spare)
            self.proxy.swapper.want_spare = True

    def prepare_spare(self, w: WorkerHandle | None) -> None:
        """Give a spare the session's start (`initialize`, `attach`) now,
        while it waits: debugpy's start (its adapter process, ~0.4 s) and the
        attach (~0.2 s) then leave the swap's path. The replies are read at
        the switch; what the spare says about them is never forwarded."""
        if w is None or w.debug_prepared or w.dead or not self.active:
            return
        if len(self.ahead) > 100:
            self.ahead.clear()  # spares retired unused
        for command in _ESSENTIAL:
            msg_id = self._send(w, self.requests[command])
            self.quiet.discard(msg_id)  # (the ids below outlive this replay's quiet set)
            self.proxy.internal_ids.add(msg_id)  # what it causes is dropped wherever it is read
            self.ahead[msg_id] = None
            w.debug_prepared.append((command, msg_id))

    # -- the front end's requests and the worker's replies --------------------------

    def on_request(self, header: dict[str, Any], content_frame: bytes) -> None:
        """A control request from the front end, about to reach the worker."""
        if header.get("msg_type") != "debug_request":
            return
        if len(self.pending) > 1000:
            self.pending.clear()  # requests never answered (their worker died)
        try:
            content = _json(content_frame)
        except ValueError:
            return
        self.pending[str(header.get("msg_id", ""))] = content
        if content.get("command") == "initialize":
            self.proxy.swapper.fresh_for_debugger()

    def forward_reply(self, frames: list[bytes]) -> bool:
        """A control reply from a worker: whether it goes to the front end
        (the answer to one of the controller's own requests does not)."""
        parts = _parts(frames)
        msg_id = str(_json(parts[2]).get("msg_id", ""))
        if msg_id in self.own:
            self.own.discard(msg_id)
            if msg_id in self.ahead:
                self.ahead[msg_id] = _json(parts[4])
            return False
        request = self.pending.pop(msg_id, None)
        if request is not None and _json(parts[1]).get("msg_type") == "debug_reply":
            self._record(request, _json(parts[4]))
        return True

    def _record(self, request: dict[str, Any], reply: dict[str, Any]) -> None:
        command = request.get("command")
        if command == "disconnect":
            self.forget()
            return
        if not reply.get("success"):
            return
        if command == "initialize":
            self.forget()  # a new session
        if command in _SESSION_COMMANDS:
            self.requests[str(command)] = request
            if command == "attach":
                pool = self.proxy.swapper.pool
                self.prepare_spare(pool.spare if pool is not None else None)
        elif command == "setBreakpoints":
            args = request.get("arguments") or {}
            path = str((args.get("source") or {}).get("path", ""))
            if args.get("breakpoints"):
                self.breakpoints[path] = request
            else:
                self.breakpoints.pop(path, None)

    # -- a new current worker --------------------------------------------------------

    def switched(self, old: WorkerHandle | None, new: WorkerHandle | None, parent: dict[str, Any] | None, previous: WorkerHandle | None) -> None:
        """`new` just replaced `old` (`Swapper.switch`): carry the session over.

        The old worker, kept as the previous one, leaves the session (it
        would hold stale breakpoints if `%forkreload back` made it current
        again, and gets the session replayed then).
        """
        if not self.active or new is old:
            return
        if old is not None and old is previous and not old.dead:
            self._call(old, DISCONNECT, 5.0)
            # What it says of it later (debugpy's events) is read only if it
            # is current again, and is not the front end's.
            self.proxy.internal_ids.update(self.quiet)
        if new is None:
            self._end(parent, "no worker could be started")
            return
        if new.origin is not None:
            # Restored from a checkpoint: the next cell gets a fresh worker,
            # and the session is replayed there.
            self.proxy.swapper.fresh_for_debugger()
            return
        t0 = time.perf_counter()
        why, started = self._replay(new)
        if why is not None:
            # What the failed replay still says is not the front end's, and
            # a half-built session in the new worker is taken down (one that
            # did not answer in time is left alone: it would interleave).
            if started:
                self._call(new, DISCONNECT, 5.0)
            self.proxy.internal_ids.update(self.quiet)
            self.quiet.clear()
            self._end(parent, why)
            return
        # Once replayed, debugpy's events are parented to the last request
        # replayed (the control thread's parent) until the front end's next.
        self.quiet.clear()
        log.debug("debug session replayed in worker %s (%d sources with breakpoints) in %.1f ms",
                  new.pid, len(self.breakpoints), (time.perf_counter() - t0) * 1000)

    def _replay(self, w: WorkerHandle) -> tuple[str | None, bool]:
        """Send `w` the requests that built the session: None or why it
        failed, and whether `w`'s debugger was started."""
        deadline = time.monotonic() + REPLAY_TIMEOUT
        prepared = w.debug_prepared
        w.debug_prepared = []
        sequence: list[tuple[dict[str, Any], str | None]] = [(self.requests[c], msg_id) for c, msg_id in prepared]
        if not prepared:
            sequence += [(self.requests["initialize"], None), (self.requests["attach"], None)]
        sequence += [(request, None) for request in self.breakpoints.values()]
        sequence += [(self.requests[c], None) for c in _SESSION_COMMANDS[2:] if c in self.requests]
        started = False
        for request, sent in sequence:
            command = request.get("command")
            if sent is not None:
                # Read already (by an agent call, or while waiting for the
                # one before), or still to come.
                reply = self.ahead.pop(sent, None) or self._wait(w, sent, deadline - time.monotonic(), idle=False)
            else:
                reply = self._call(w, request, deadline - time.monotonic())
            if reply is None:
                return f"the new worker did not answer {command}", False
            if not reply.get("success"):
                why = f"{command} failed in the new worker" + (f": {reply['message']}" if reply.get("message") else "")
                if command in _ESSENTIAL:
                    return why, started
                log.warning("debug session replay: %s", why)
            started = True
        return None, started

    def _call(self, w: WorkerHandle, content: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """One debug request to `w`, answered to the controller; its reply content, or None.

        While it waits, `w`'s output is handled as usual, but the status
        and debug events of this request are not forwarded: the front end
        did not send it. A reply that comes after the timeout is dropped.
        """
        return self._wait(w, self._send(w, content), timeout)

    def _wait(self, w: WorkerHandle, msg_id: str, timeout: float, idle: bool = True) -> dict[str, Any] | None:
        """The reply to the controller's request `msg_id` to `w`, once its
        idle came too (see `_call`; `idle` False: the reply is enough, what
        the request caused is dropped as an internal id's), or None."""
        proxy = self.proxy
        poller = zmq.Poller()
        poller.register(w.control, zmq.POLLIN)
        poller.register(w.iopub, zmq.POLLIN)
        poller.register(w.pidfd, zmq.POLLIN)
        deadline = time.monotonic() + max(timeout, 0.0)
        reply: dict[str, Any] | None = None
        idled = not idle
        # The reply, then this request's idle: the events it caused come before it.
        while not (reply is not None and idled):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            events = dict(poller.poll(int(min(left, 1.0) * 1000)))
            if w.iopub in events:
                frames = w.iopub.recv_multipart()
                parts = _parts(frames)
                parent_id = _json(parts[2]).get("msg_id")
                if parent_id == msg_id and _json(parts[1]).get("msg_type") == "status" and _json(parts[4]).get("execution_state") == "idle":
                    idled = True
                elif parent_id in self.quiet:
                    pass  # debugpy's events of a replayed request, after its idle
                elif w is proxy.worker:
                    proxy._on_worker_iopub(w, frames)
            if w.control in events:
                frames = w.control.recv_multipart()
                parts = _parts(frames)
                if _json(parts[2]).get("msg_id") == msg_id:
                    self.own.discard(msg_id)
                    self.ahead.pop(msg_id, None)
                    reply = _json(parts[4])
                elif self.forward_reply(frames):
                    # The front end's, even from the old worker (a `continue`
                    # answered as an agent call ended): it waits for it.
                    proxy.fe_control.send_multipart(frames)
            if w.pidfd in events:
                break  # the loop's pidfd watch handles the death
        return reply if idled else None

    def _send(self, w: WorkerHandle, content: dict[str, Any]) -> str:
        """Send `w` a debug request of the controller's own; its msg_id."""
        msg = self.proxy.session.msg("debug_request", content)
        msg_id: str = msg["header"]["msg_id"]
        if len(self.own) > 1000:
            self.own.clear()  # replies that never came (their worker died)
        self.own.add(msg_id)
        self.quiet.add(msg_id)
        self.proxy.session.send(w.control, msg)
        return msg_id

    def _end(self, parent: dict[str, Any] | None, why: str) -> None:
        """The session could not follow: the front end is told it ended."""
        log.warning("the debug session ended: %s", why)
        self.forget()
        event = {"type": "event", "seq": 0, "event": "terminated", "body": {}}
        self.proxy.session.send(self.proxy.fe_iopub, "debug_event", event, parent=parent, ident=b"debug_event")
        text = notices.debugger_ended(why)
        if parent is not None:
            self.proxy.notice(parent, text, error=True)
        else:
            self.notice = text

    def before_cell(self, parent: dict[str, Any]) -> None:
        """The next cell: a session that ended without a cell to say it in is told here."""
        if self.notice is not None:
            text, self.notice = self.notice, None
            self.proxy.notice(parent, text, error=True)
