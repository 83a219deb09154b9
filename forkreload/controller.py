"""The controller's proxy: the process a front end starts, holding no user state.

It owns the ports of the Jupyter connection file and forwards the Jupyter
protocol to the current worker unchanged (both sides share the HMAC key):
signature and replay checks, routing, the queue of cells waiting for the
worker, comms, signals and the event loop. Which worker is current, and
which code it runs, is the other room's business (`swap.Swapper`): the
proxy asks it right before each cell reaches an idle worker.

Invariants:
- One cell at a time reaches the worker, so each cell sees the edits made
  before it (a held cell waits in `held`, in order).
- The controller's own agent calls never reach a front end, and a front end
  cannot send one.
- `_wait` is the only loop besides `run`'s: agent calls and draining a
  retiring worker wait there, with interrupts still reaching the worker.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from . import notices
from .channel import ForgedMessage, make_private_dir
from .config import Settings
from .debugger import DebugSession
from .pool import ControllerError, Stopping, WorkerDied, WorkerHandle, WorkerPool
from .protocol import (
    AGENT_REQUEST,
    COMMAND_EVENT,
    CONTROL_REPLY,
    CONTROL_REQUEST,
    INTERNAL_IDENT,
    MODULES_EVENT,
    REPLY_METADATA_KEY,
    TAG_COMMAND,
    TAG_NOTICE,
    TAG_PROGRESS,
    Reload,
)
from .swap import PoolFactory, Swapper

if TYPE_CHECKING:
    from jupyter_client.session import Session as JupyterSession

__all__ = ["Controller", "Settings", "ControllerError"]

log = logging.getLogger("forkreload.controller")

DELIM = b"<IDS|MSG>"
# Shell requests a kernel answers (ipykernel drops a type it does not know).
_ANSWERED = frozenset(
    {"execute_request", "complete_request", "inspect_request", "history_request", "is_complete_request", "kernel_info_request", "comm_info_request"}
)
# Cells that are only this magic act before they run, so the notice lands in them.
_UPFRONT = frozenset({"fresh", "back", "undo"})


class _Publisher(zmq.Socket):  # type: ignore[type-arg]
    """The front end's iopub (XPUB): subscriptions that arrived are welcomed
    before anything else is published. zmq applies a subscription as soon
    as it takes it in, so a status forwarded in the same moment could reach
    the new subscriber before its `iopub_welcome`. (One taken in by the
    send itself, after this look, still can: under a flood of output, about
    1 new subscriber in 10 was measured to see a message first.)"""

    on_subscribe: Callable[[bytes], None] | None = None
    _draining = False

    def send_multipart(self, msg_parts: Any, flags: int = 0, copy: bool = True, track: bool = False, **kwargs: Any) -> Any:
        self.welcome_new()
        return super().send_multipart(msg_parts, flags=flags, copy=copy, track=track, **kwargs)

    def welcome_new(self) -> None:
        if self._draining or self.on_subscribe is None:
            return
        self._draining = True  # the welcome itself is sent through send_multipart
        try:
            # Reading EVENTS makes libzmq take in what arrived, unthrottled;
            # on the hot path (every message forwarded) it costs no exception.
            while int(self.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                self.on_subscribe(self.recv())
        finally:
            self._draining = False


def _json(frame: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(frame) if frame else {}
    return parsed


def _split(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    i = frames.index(DELIM)
    return frames[:i], frames[i + 1 :]


Frames = list[bytes]
Verified = tuple[list[bytes], dict[str, Any]]


class Controller:
    """One session's controller; `run()` serves until shutdown."""

    session: JupyterSession

    def __init__(self, connection: dict[str, Any], settings: Settings, pool_factory: PoolFactory = WorkerPool) -> None:
        self.conn = connection
        settings.cwd = os.path.realpath(settings.cwd)
        self.settings = settings
        key = connection["key"]
        self.key: bytes = key.encode() if isinstance(key, str) else key
        self.ctx = zmq.Context()
        self.privdir = make_private_dir()
        self.worker: WorkerHandle | None = None  # set by Swapper.switch only
        self.swapper = Swapper(self, settings, pool_factory)
        self.held: list[Frames] = []  # cells waiting for the worker, in order
        self.internal_ids: set[str] = set()  # agent calls: their busy/idle are not forwarded
        self.answers: dict[str, dict[str, Any]] = {}  # agent answers not yet taken
        self.unawaited: dict[str, str] = {}  # agent calls nobody waits for: msg_id -> method
        self.posted: dict[str, dict[str, Any]] = {}  # method -> the last such answer
        self.reports: dict[str, Reload] = {}  # msg_id -> report for that cell's reply
        self.upfront: set[str] = set()  # cells whose magic was done before they ran
        # Control requests that came while waiting in `_wait`, already verified.
        self.deferred_control: list[tuple[Frames, Verified]] = []
        self.stop_on_error: set[str] = set()  # cells whose error aborts the cells queued behind
        self.comms: set[str] = set()  # comm ids open in the current worker
        self.debugger = DebugSession(self)  # the front end's debug session, replayed in a new worker
        # Requests the controller itself said busy for (a swap before the
        # cell): the worker's own busy for them is not repeated.
        self.busy_sent: set[str] = set()
        self._progress_shown = False
        self.running = False
        self._waiting = False
        self._sigfd: int | None = None  # the signal wakeup pipe, while run() runs
        self._poll_key: tuple[Any, ...] | None = None
        self._poll: tuple[zmq.Poller, list[WorkerHandle]] = (zmq.Poller(), [])
        self._ppid = os.getppid()
        self._seen_signatures: set[bytes] = set()
        # Started by forkreload's kernel provisioner: a front end's "Restart
        # kernel" is then a clean worker from the running snapshot.
        self.provisioned = os.environ.get("FORKRELOAD_PROVISIONED") == "1"

    # -- start-up ----------------------------------------------------------

    def _url(self, port: int) -> str:
        transport = self.conn.get("transport", "tcp")
        ip = self.conn.get("ip", "127.0.0.1")
        return f"ipc://{ip}-{port}" if transport == "ipc" else f"tcp://{ip}:{port}"

    def _bind_front(self) -> None:
        self.fe_shell = self.ctx.socket(zmq.ROUTER)
        self.fe_control = self.ctx.socket(zmq.ROUTER)
        self.fe_stdin = self.ctx.socket(zmq.ROUTER)
        self.fe_iopub = _Publisher(self.ctx, zmq.XPUB)
        self.fe_iopub.on_subscribe = self._welcome
        # A flood of prints must reach the front end, not be dropped here.
        self.fe_iopub.setsockopt(zmq.SNDHWM, 0)
        for s in (self.fe_shell, self.fe_control, self.fe_stdin, self.fe_iopub):
            s.setsockopt(zmq.LINGER, 1000)
        self.fe_shell.bind(self._url(self.conn["shell_port"]))
        self.fe_control.bind(self._url(self.conn["control_port"]))
        self.fe_stdin.bind(self._url(self.conn["stdin_port"]))
        self.fe_iopub.bind(self._url(self.conn["iopub_port"]))
        hb_url = self._url(self.conn["hb_port"])
        ready = threading.Event()

        def heartbeat() -> None:
            # Echo in a thread of its own so a swap never stops the heartbeat.
            s = self.ctx.socket(zmq.ROUTER)
            s.bind(hb_url)
            ready.set()
            try:
                zmq.device(zmq.QUEUE, s, s)
            except zmq.ContextTerminated:
                pass
            finally:
                s.close(linger=0)

        threading.Thread(target=heartbeat, name="forkreload-heartbeat", daemon=True).start()
        ready.wait(10)

    def _make_session(self) -> None:
        """The Jupyter session (signing, serializing) of the front end's messages.

        jupyter_client's import is ~90 ms of a kernel's start: it runs while
        the first worker starts (in its own process) when a snapshot server
        is up, or before the wait for one that is still importing."""
        if getattr(self, "session", None) is None:
            from jupyter_client.session import Session

            self.session = Session(key=self.key, signature_scheme=self.conn.get("signature_scheme", "hmac-sha256"), username="forkreload")

    def _welcome(self, sub: bytes) -> None:
        if sub[:1] == b"\x01":
            self.session.send(self.fe_iopub, "iopub_welcome", {"subscription": sub[1:].decode(errors="replace")}, ident=b"iopub_welcome")

    def start(self) -> None:
        """Bind the front end's ports, start the snapshot and a first worker."""
        if not hasattr(os, "fork"):
            raise ControllerError("forkreload needs os.fork, which this platform does not have")
        from .prestart import prestart_pending

        self._bind_front()
        if prestart_pending():
            self._make_session()
        self.swapper.start(meanwhile=self._make_session)
        self._make_session()
        self.running = True

    # -- agent calls and the one nested wait ----------------------------------------

    def call_agent(self, w: WorkerHandle, method: str, *args: Any) -> Any:
        """Run an agent call in `w`'s main thread; its answer (see `protocol`)."""
        msg = self.session.msg(AGENT_REQUEST, {"method": method, "args": list(args)})
        msg_id = msg["header"]["msg_id"]
        # Kept after the call: the worker's busy/idle for it may come later.
        if len(self.internal_ids) > 1000:
            self.internal_ids.clear()
        self.internal_ids.add(msg_id)
        self.session.send(w.shell, msg, ident=[INTERNAL_IDENT])
        t0 = time.perf_counter()
        self._wait(w, lambda: msg_id in self.answers)
        log.debug("agent call %s in worker %s: %.1f ms", method, w.pid, (time.perf_counter() - t0) * 1000)
        return self.answers.pop(msg_id)

    def post_agent(self, w: WorkerHandle, method: str, *args: Any) -> None:
        """Send an agent call and go on; its answer is logged, not awaited."""
        msg = self.session.msg(AGENT_REQUEST, {"method": method, "args": list(args)})
        msg_id = msg["header"]["msg_id"]
        self.internal_ids.add(msg_id)
        self.unawaited[msg_id] = method
        self.session.send(w.shell, msg, ident=[INTERNAL_IDENT])

    def drain(self, w: WorkerHandle, timeout: float = 2.0) -> None:
        """Forward what a retiring worker still owes the front end (the last
        idle, output published after a reply)."""
        try:
            self._wait(w, lambda: not w.busy_for, timeout)
        except WorkerDied:
            pass

    def _wait(self, w: WorkerHandle, done: Callable[[], bool], timeout: float | None = None) -> None:
        """Serve worker `w` until `done()`: its output and replies are
        forwarded, Ctrl-C and interrupt requests reach it (a user module may
        loop forever at import), other control requests wait their turn and
        no cell is routed meanwhile. Raises WorkerDied if `w` exits."""
        poller = zmq.Poller()
        for s in (w.shell, w.iopub, self.fe_control):
            poller.register(s, zmq.POLLIN)
        # User code an agent call runs (a __reduce__ while exporting) may stop
        # at a breakpoint: the front end's debugger must reach the worker.
        debugged = w is self.worker
        if debugged:
            poller.register(w.control, zmq.POLLIN)
        poller.register(w.pidfd, zmq.POLLIN)
        if self._sigfd is not None:
            poller.register(self._sigfd, zmq.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._waiting = True
        try:
            while not done():
                if deadline is not None and time.monotonic() > deadline:
                    return
                events = dict(poller.poll(50 if deadline is not None else 1000))
                if self._sigfd is not None and self._sigfd in events:
                    self._on_signals(os.read(self._sigfd, 64), w)
                if os.getppid() != self._ppid:
                    self.running = False  # the front end that started us is gone
                if not self.running:
                    raise Stopping("the session is ending")
                if self.fe_control in events:
                    frames = self.fe_control.recv_multipart()
                    verified = self._verify(frames)
                    if verified is not None and verified[1].get("msg_type") == "interrupt_request":
                        self._interrupt(w)
                        self.session.send(self.fe_control, "interrupt_reply", {"status": "ok"}, parent=verified[1], ident=verified[0])
                    elif verified is not None and debugged and verified[1].get("msg_type") == "debug_request":
                        self.debugger.on_request(verified[1], _split(frames)[1][4])
                        w.control.send_multipart(frames)
                    elif verified is not None:
                        self.deferred_control.append((frames, verified))
                if debugged and w.control in events:
                    frames = w.control.recv_multipart()
                    if self.debugger.forward_reply(frames):
                        self.fe_control.send_multipart(frames)
                if w.iopub in events:
                    self._on_worker_iopub(w, w.iopub.recv_multipart())
                if w.shell in events:
                    self._on_worker_shell(w, w.shell.recv_multipart())
                if w.pidfd in events:
                    w.dead = True
                    raise WorkerDied("the worker exited")
        finally:
            self._waiting = False

    # -- what the proxy writes to the front end ------------------------------------------

    def _stream(self, parent: dict[str, Any], text: str, tag: str, name: str = "stdout") -> None:
        self.session.send(
            self.fe_iopub, "stream", {"name": name, "text": text.rstrip("\n") + "\n"},
            parent=parent, ident=b"stream", metadata={REPLY_METADATA_KEY: tag},
        )

    def notice(self, parent: dict[str, Any] | None, text: str, error: bool = False) -> None:
        """forkreload's line in a cell (quiet hides successes, never failures)."""
        if parent is None or (self.settings.quiet and not error):
            return
        self.clear_progress(parent)
        self.status_message(parent, "busy")  # busy comes before any output of a request
        self._stream(parent, text, TAG_NOTICE, "stderr" if error else "stdout")

    def progress(self, parent: dict[str, Any] | None, text: str) -> None:
        """A status line while a swap runs; cleared before the notice."""
        if parent is None or self.settings.quiet:
            return
        self.status_message(parent, "busy")
        self._stream(parent, text, TAG_PROGRESS)
        self._progress_shown = True

    def clear_progress(self, parent: dict[str, Any] | None) -> None:
        # clear_output is safe: the cell has no output of its own yet.
        if self._progress_shown:
            self.session.send(self.fe_iopub, "clear_output", {"wait": False}, parent=parent, ident=b"clear_output", metadata={REPLY_METADATA_KEY: TAG_PROGRESS})
            self._progress_shown = False

    def command_output(self, parent: dict[str, Any], text: str) -> None:
        self._stream(parent, text, TAG_COMMAND)

    def status_message(self, parent: dict[str, Any], state: str) -> None:
        """Publish busy/idle for a request; each request gets one of each."""
        msg_id = parent.get("msg_id", "")
        if state == "busy":
            if msg_id in self.busy_sent:
                return
            self.busy_sent.add(msg_id)
        self.session.send(self.fe_iopub, "status", {"execution_state": state}, parent=parent, ident=b"status")

    def close_comms(self, parent: dict[str, Any] | None) -> None:
        """The old worker's comms (widgets) cannot follow it: close them visibly."""
        if not self.comms:
            return
        for comm_id in sorted(self.comms):
            self.session.send(self.fe_iopub, "comm_close", {"comm_id": comm_id, "data": {}}, parent=parent, ident=b"comm_close")
        n = len(self.comms)
        self.comms.clear()
        self.notice(parent, notices.comms_closed(n), error=True)

    def fail_inflight(self, w: WorkerHandle, why: str) -> None:
        """The worker died: every request it had is answered with why."""
        for msg_id, (idents, header) in list(w.inflight.items()):
            if msg_id not in w.busy_for:
                self.status_message(header, "busy")  # it died before saying busy
            self._reply_dead(idents, header, why)
            if msg_id in self.stop_on_error:
                # As for any failing cell: what was queued behind it assumed its values.
                self.stop_on_error.discard(msg_id)
                self._abort_held()
        w.inflight.clear()

    def _reply_dead(self, idents: list[bytes], header: dict[str, Any], why: str) -> None:
        msg_type = header.get("msg_type", "")
        reply_type = msg_type.replace("_request", "_reply")
        content: dict[str, Any] = {"status": "error", "ename": "WorkerDied", "evalue": why, "traceback": [f"forkreload: {why}"]}
        if msg_type == "execute_request":
            content["execution_count"] = None
            self.session.send(self.fe_iopub, "error", {k: content[k] for k in ("ename", "evalue", "traceback")}, parent=header, ident=b"error")
        self.session.send(self.fe_shell, reply_type, content, parent=header, ident=idents)
        self.status_message(header, "idle")
        self.busy_sent.discard(header.get("msg_id", ""))

    # -- messages from the current worker ----------------------------------------------

    def _on_worker_iopub(self, w: WorkerHandle, frames: Frames) -> None:
        _idents, parts = _split(frames)
        header = _json(parts[1])
        msg_type = header.get("msg_type")
        if msg_type == "iopub_welcome":
            w.ready = True
            return
        if msg_type in (COMMAND_EVENT, MODULES_EVENT):
            if w is self.worker:
                self._on_agent_event(msg_type, _json(parts[2]), _json(parts[4]))
            return
        if w is not self.worker:
            return
        if msg_type in ("comm_open", "comm_close"):
            self._track_comm(msg_type, parts[4])
        parent = _json(parts[2])
        if parent.get("msg_id") in self.internal_ids:
            return
        if msg_type == "status":
            state = _json(parts[4]).get("execution_state")
            msg_id = parent.get("msg_id", "")
            if state == "busy":
                w.busy_for.add(msg_id)
                if msg_id in self.busy_sent:
                    return  # the controller said busy already, before its swap
            elif state == "idle":
                w.busy_for.discard(msg_id)
                self.busy_sent.discard(msg_id)
                if parent.get("msg_type") == "execute_request":
                    self.fe_iopub.send_multipart(frames)
                    self.swapper.after_cell(w)
                    return
        elif msg_type == "execute_input":
            self.swapper.cell_started(str(parent.get("msg_id", "")), int(_json(parts[4]).get("execution_count") or 0))
        self.fe_iopub.send_multipart(frames)

    def _on_agent_event(self, msg_type: str, parent: dict[str, Any], content: dict[str, Any]) -> None:
        if msg_type == MODULES_EVENT:
            self.swapper.on_modules(content.get("modules", []), content.get("third_party", []))
        elif parent.get("msg_id") in self.upfront:
            self.upfront.discard(parent.get("msg_id", ""))
        else:
            self.swapper.command(parent, content.get("cmd", "status"), list(content.get("args", [])))

    def _on_worker_shell(self, w: WorkerHandle, frames: Frames) -> None:
        idents, parts = _split(frames)
        if idents[:1] == [INTERNAL_IDENT]:
            # An agent call's answer (a late one, of a call that gave up, is dropped).
            call_id = str(_json(parts[2]).get("msg_id", ""))
            if call_id in self.unawaited:
                method = self.unawaited.pop(call_id)
                self.posted[method] = _json(parts[4])
                log.debug("agent answer to %s (not awaited): %s", method, self.posted[method])
            elif call_id in self.internal_ids:
                self.answers[call_id] = _json(parts[4])
            return
        msg_id = str(_json(parts[2]).get("msg_id", ""))
        w.inflight.pop(msg_id, None)
        if msg_id in self.stop_on_error and _json(parts[1]).get("msg_type") == "execute_reply":
            self.stop_on_error.discard(msg_id)
            if _json(parts[4]).get("status") == "error":
                self._abort_held()
        report = self.reports.pop(msg_id, None)
        if report is not None:
            msg = self.session.deserialize(parts, content=True)
            msg["metadata"][REPLY_METADATA_KEY] = report.as_dict()
            self.session.send(self.fe_shell, msg, ident=idents)
        else:
            self.fe_shell.send_multipart(frames)

    # -- messages from the front end -----------------------------------------------------

    def _verify(self, frames: Frames) -> Verified | None:
        """Check a front end's message signature and freshness; None (logged) if forged.

        Returns the identities and the parsed header; the rest stays bytes
        and is forwarded as it came.
        """
        try:
            idents, parts = _split(frames)
            signature = parts[0]
            if self.session.auth is not None:
                if not hmac.compare_digest(signature, self.session.sign(parts[1:5])):
                    raise ValueError("invalid signature")
                if signature in self._seen_signatures:
                    raise ValueError("replayed signature")
                self._seen_signatures.add(signature)
                if len(self._seen_signatures) > 65536:
                    self._seen_signatures.clear()
            header = _json(parts[1])
        except Exception as exc:
            log.warning("dropped a message that failed authentication: %s", exc)
            return None
        return idents, header

    def _on_front_shell(self, frames: Frames) -> None:
        if self._verify(frames) is None:
            return
        if self.held:
            self.held.append(frames)
            return
        self._route_shell(frames)

    def _track_comm(self, msg_type: str, content: bytes) -> None:
        comm_id = _json(content).get("comm_id", "")
        if msg_type == "comm_open":
            self.comms.add(comm_id)
        else:
            self.comms.discard(comm_id)

    def _route_shell(self, frames: Frames) -> None:
        idents, parts = _split(frames)
        header = _json(parts[1])
        msg_type = header.get("msg_type", "")
        if msg_type == AGENT_REQUEST:
            log.warning("dropped a %s from a front end: the agent takes them from the controller only", AGENT_REQUEST)
            return
        if msg_type in ("comm_open", "comm_close"):
            self._track_comm(msg_type, parts[4])
        try:
            w = self.swapper.ensure_worker()
        except (WorkerDied, ControllerError) as exc:
            self.status_message(header, "busy")
            self._reply_dead(idents, header, f"no worker could be started: {exc}")
            return
        content = _json(parts[4]) if msg_type == "execute_request" else {}
        if msg_type == "execute_request":
            if self._executing(w) or (w.inflight and self.swapper.edit_pending()):
                # One cell at a time, and a check for edits right before each
                # (a cell may edit a module for the next); a swap needs the
                # worker idle.
                self.held.append(frames)
                return
            msg_id = header.get("msg_id", "")
            words = content.get("code", "").split()
            if 2 <= len(words) <= 3 and words[0] == "%forkreload" and words[1] in _UPFRONT and (len(words) == 2 or words[1:] == ["undo", words[2]] and words[2].isdigit()):
                self.upfront.add(msg_id)
                if words[1] == "fresh":
                    self.swapper.force_fresh = True
                elif words[1] == "back":
                    self.swapper.back_requested = True
                else:
                    self.swapper.undo_requested = int(words[2]) if len(words) == 3 else 1
            report = self.swapper.before_cell(header)
            self.debugger.before_cell(header)
            if report is not None:
                self.reports[msg_id] = report
            w = self.swapper.ensure_worker()
            self.swapper.cell_routed(msg_id, str(content.get("code", "")))
            if content.get("stop_on_error", True) and not content.get("silent", False):
                self.stop_on_error.add(msg_id)
        if msg_type in _ANSWERED:
            # The worker is idle again, and may be swapped, once these are
            # answered (comm messages and request types it does not know get
            # no reply).
            w.inflight[header.get("msg_id", "")] = (idents, header)
        w.shell.send_multipart(frames)

    def _dispatch_held(self) -> None:
        """Route the waiting cells once the worker is free for them."""
        w = self.worker
        if not self.held or self._waiting or (w is not None and self._executing(w)):
            return
        held, self.held = self.held, []
        for frames in held:
            if self.held:
                self.held.append(frames)  # keep the order behind one that waits again
            else:
                self._route_shell(frames)

    def _abort_held(self) -> None:
        """A cell failed: the cells queued behind it are aborted, as ipykernel does."""
        kept = []
        for frames in self.held:
            idents, parts = _split(frames)
            header = _json(parts[1])
            if header.get("msg_type") != "execute_request":
                kept.append(frames)
                continue
            self.status_message(header, "busy")
            status = {"status": "aborted"}
            self.session.send(self.fe_shell, "execute_reply", status, parent=header, ident=idents, metadata=dict(status))
            self.status_message(header, "idle")
            self.busy_sent.discard(header.get("msg_id", ""))
        self.held = kept

    @staticmethod
    def _executing(w: WorkerHandle) -> bool:
        return any(h.get("msg_type") == "execute_request" for _i, h in w.inflight.values())

    def _on_front_control(self, frames: Frames, verified: Verified | None = None) -> None:
        verified = verified or self._verify(frames)
        if verified is None:
            return
        idents, header = verified
        content_frame = _split(frames)[1][4]
        msg_type = header.get("msg_type")
        if msg_type == "interrupt_request":
            self.interrupt()
            self.session.send(self.fe_control, "interrupt_reply", {"status": "ok"}, parent=header, ident=idents)
        elif msg_type == "shutdown_request":
            restart = bool(_json(content_frame).get("restart"))
            if restart and self.provisioned:
                self.held = []
                self.debugger.forget()  # as in a restarted kernel: the front end starts it again
                self.swapper.clean_restart()
            else:
                self.running = False
            reply = {"status": "ok", "restart": restart}
            self.session.send(self.fe_control, "shutdown_reply", reply, parent=header, ident=idents)
            self.session.send(self.fe_iopub, "shutdown_reply", reply, parent=header, ident=b"shutdown_reply")
        elif msg_type == CONTROL_REQUEST:
            answer = self._control_request(_json(content_frame))
            self.session.send(self.fe_control, CONTROL_REPLY, answer, parent=header, ident=idents)
        elif self.worker is not None:
            self.debugger.on_request(header, content_frame)
            self.worker.control.send_multipart(frames)

    def _control_request(self, content: dict[str, Any]) -> dict[str, Any]:
        cmd = content.get("cmd")
        if cmd == "status":
            return {"status": "ok", **self.swapper.status()}
        if cmd == "undo":
            if self.worker is None or self.worker.inflight:
                return {"status": "error", "evalue": "the worker is busy"}
            n = content.get("n", 1)
            text = self.swapper.undo(None, n if isinstance(n, int) else 1)
            return {"status": "ok", "text": text, "undone": text.startswith(notices.PREFIX + "undone")}
        if cmd == "restart":
            if self.worker is None or self.worker.inflight:
                return {"status": "error", "evalue": "the worker is busy"}
            report = self.swapper.restart()
            return {"status": "ok" if report.ok else "error", "report": report.as_dict()}
        return {"status": "error", "evalue": f"unknown command {cmd!r}"}

    def interrupt(self) -> None:
        """Interrupt the current worker's running cell."""
        if self.worker is not None:
            self._interrupt(self.worker)

    @staticmethod
    def _interrupt(w: WorkerHandle) -> None:
        if not w.dead:
            try:
                os.kill(w.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def _on_signals(self, signums: bytes, busy: WorkerHandle | None = None) -> None:
        """Signals to the controller: SIGINT interrupts (the worker in an
        agent call, if any), SIGTERM and SIGHUP end the session."""
        for signum in signums:
            target = busy or self.worker
            if signum == signal.SIGINT and target is not None:
                self._interrupt(target)
            elif signum in (signal.SIGTERM, signal.SIGHUP):
                self.running = False

    # -- the loop ------------------------------------------------------------

    def run(self) -> None:
        """Serve until a shutdown request, SIGTERM, or the parent's death."""
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        os.set_blocking(rfd, False)
        old_wakeup = signal.set_wakeup_fd(wfd)
        self._sigfd = rfd
        signal.signal(signal.SIGINT, lambda *a: None)
        signal.signal(signal.SIGTERM, lambda *a: None)
        signal.signal(signal.SIGHUP, lambda *a: None)
        try:
            while self.running:
                try:
                    self._step(rfd)
                except ControllerError:
                    log.exception("the controller cannot go on")
                    raise
                except Exception:
                    # A bug here must not take the user's session down with it.
                    log.exception("internal error while routing a message; the session goes on")
        finally:
            signal.set_wakeup_fd(old_wakeup)
            os.close(rfd)
            os.close(wfd)
            self.close()

    def _poller(self, sigfd: int) -> tuple[zmq.Poller, list[WorkerHandle]]:
        """The poller for the current set of workers, rebuilt only when it changes."""
        pool = self.swapper.pool
        assert pool is not None
        workers = self.swapper.workers()
        building = self.swapper.pending_fileno()
        checkpoints = self.swapper.timeline.fileno()
        key = (pool.fileno(), building, checkpoints, id(self.worker), *((id(w), w.pidfd) for w in workers))
        if key != self._poll_key:
            poller = zmq.Poller()
            for s in (self.fe_shell, self.fe_control, self.fe_stdin, self.fe_iopub):
                poller.register(s, zmq.POLLIN)
            poller.register(sigfd, zmq.POLLIN)
            poller.register(pool.fileno(), zmq.POLLIN)
            if building is not None:
                poller.register(building, zmq.POLLIN)
            if checkpoints is not None:
                poller.register(checkpoints, zmq.POLLIN)
            for w in workers:
                poller.register(w.pidfd, zmq.POLLIN)
                # A spare says nothing until it is taken (its welcome is read
                # by WorkerPool.wait_ready); the previous worker is idle.
                if w is self.worker:
                    for sock in w.sockets:
                        poller.register(sock, zmq.POLLIN)
            self._poll_key, self._poll = key, (poller, workers)
        return self._poll

    def _step(self, sigfd: int) -> None:
        poller, workers = self._poller(sigfd)
        polled = self.swapper.pool
        assert polled is not None
        events = dict(poller.poll(self.swapper.poll_timeout()))
        if os.getppid() != self._ppid:
            self.running = False  # our parent died: do not outlive it
            return
        if sigfd in events:
            self._on_signals(os.read(sigfd, 64))
        while self.deferred_control:
            self._on_front_control(*self.deferred_control.pop(0))
        building = self.swapper.pending_fileno()
        if building is not None and building in events:
            self.swapper.building_ready()
        checkpoints = self.swapper.timeline.fileno()
        if checkpoints is not None and checkpoints in events:
            self.swapper.timeline.accept()
        # (A snapshot built in the background may have replaced the polled
        # one just now, and closed it: its events are no longer anyone's.)
        pool = self.swapper.pool
        if pool is polled and pool.fileno() in events:
            try:
                pool.read_message()
            except ForgedMessage:
                log.warning("dropped a snapshot message with a bad signature")
            except ControllerError:
                log.error("the snapshot process died; shutting down")
                self.running = False
                return
        for w in workers:
            if w.pidfd < 0:
                continue
            for s in w.sockets:
                # A message may have retired this worker (a held cell swapped).
                while s in events and not s.closed:
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if s is w.iopub:
                        self._on_worker_iopub(w, frames)
                    elif w is not self.worker:
                        continue
                    elif s is w.shell:
                        self._on_worker_shell(w, frames)
                    elif s is w.stdin:
                        self.fe_stdin.send_multipart(frames)
                    elif self.debugger.forward_reply(frames):
                        self.fe_control.send_multipart(frames)
            if w.pidfd in events and w.pidfd >= 0:
                self.swapper.worker_exited(w)
        if self.fe_iopub in events:
            self.fe_iopub.welcome_new()
        if self.fe_control in events:
            self._on_front_control(self.fe_control.recv_multipart())
        if self.fe_stdin in events and self.worker is not None:
            frames = self.fe_stdin.recv_multipart()
            if self._verify(frames) is not None:
                self.worker.stdin.send_multipart(frames)
        if self.fe_shell in events:
            self._on_front_shell(self.fe_shell.recv_multipart())
        self._dispatch_held()
        self.swapper.tick()

    def close(self) -> None:
        """Stop every process this controller started and free its files."""
        if self.worker is not None:
            self.worker.kill()
            self.worker.close()
            self.worker = None
        self.swapper.close()
        for s in ("fe_shell", "fe_control", "fe_stdin", "fe_iopub"):
            if hasattr(self, s):
                getattr(self, s).close(linger=200)
        self.ctx.term()
        shutil.rmtree(self.privdir, ignore_errors=True)
