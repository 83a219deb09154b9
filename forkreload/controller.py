"""The controller: the process a front end starts, holding no user state.

It owns the ports of the Jupyter connection file and proxies the Jupyter
protocol to the current worker (messages pass through unchanged: both sides
share the HMAC key). Before forwarding an `execute_request` after an edit of
the user's files it decides, with the worker's agent, between patching in
place and swapping in a fresh worker (from its `WorkerPool`) with the
user's variables migrated. A worker that dies is replaced; the controller
never runs user code.
"""

from __future__ import annotations

import collections
import hmac
import itertools
import json
import logging
import os
import shutil
import signal
import statistics
import threading
import time
import uuid
from typing import Any

import zmq
from jupyter_client.session import Session as JupyterSession

from . import notices
from .channel import ForgedMessage, make_private_dir
from .config import MODES, LearnedModules, Settings
from .pool import ControllerError, WorkerDied, WorkerHandle, WorkerPool
from .watch import SourceWatch

__all__ = ["Controller", "Settings", "ControllerError"]

log = logging.getLogger("forkreload.controller")

DELIM = b"<IDS|MSG>"
INTERNAL = b"forkreload-internal"


def _json(frame: bytes) -> dict[str, Any]:
    return json.loads(frame) if frame else {}


def _split(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    i = frames.index(DELIM)
    return frames[:i], frames[i + 1 :]


class Controller:
    """One session's controller; `run()` serves until shutdown."""

    def __init__(self, connection: dict[str, Any], settings: Settings) -> None:
        self.conn = connection
        self.settings = settings
        self.settings.cwd = os.path.realpath(settings.cwd)
        self.key = connection["key"].encode() if isinstance(connection["key"], str) else connection["key"]
        self.session = JupyterSession(key=self.key, signature_scheme=connection.get("signature_scheme", "hmac-sha256"), username="forkreload")
        self.ctx = zmq.Context()
        self.privdir = make_private_dir()
        self.watch = SourceWatch()
        self.pool: WorkerPool | None = None
        self._wids = itertools.count(1)
        self.worker: WorkerHandle | None = None
        self.held: list[list[bytes]] = []
        self.internal_ids: set[str] = set()
        self.reports: dict[str, dict[str, Any]] = {}
        self.pending_report: dict[str, Any] | None = None  # told with the next cell
        self.failed_signature: frozenset[tuple[str, str | None]] | None = None
        self.force_fresh = False
        self.fresh_done: set[str] = set()  # cells whose %forkreload fresh was done up front
        self._in_agent_call = False
        self._sigfd: int | None = None  # the signal wakeup pipe, while run() runs
        # Control requests that came during an agent call, already verified.
        self.deferred_control: list[tuple[list[bytes], tuple[list[bytes], dict[str, Any]]]] = []
        self.stop_on_error: set[str] = set()  # cells whose error aborts the cells queued behind
        self.comms: set[str] = set()  # comm ids open in the current worker
        self._cleared = True  # no progress line waiting to be cleared
        # How long the check before each cell takes (reported by status()).
        self.check_times: collections.deque[float] = collections.deque(maxlen=500)
        self.last_report: dict[str, Any] | None = None
        self.running = False
        self.want_spare = False
        self._poll_key: tuple[Any, ...] | None = None
        self._poll: tuple[zmq.Poller, list[WorkerHandle]] = (zmq.Poller(), [])
        self._ppid = os.getppid()
        self._seen_signatures: set[bytes] = set()
        self.learned = LearnedModules(settings.project_root) if settings.learn else None
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
        self.fe_iopub = self.ctx.socket(zmq.XPUB)
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

    def start(self) -> None:
        """Bind the front end's ports, start the snapshot and a first worker."""
        if not hasattr(os, "fork"):
            raise ControllerError("forkreload needs os.fork, which this platform does not have")
        self._bind_front()
        self.pool = self._new_pool()
        self.worker = self.pool.take_spare()
        self.pool.refill_spare()
        self.running = True

    def _new_pool(self) -> WorkerPool:
        """Start a snapshot (with this session's preloads) and report on it."""
        pool = WorkerPool(self.ctx, self.key, self.privdir, self.settings, self.preload_list(), self._wids)
        try:
            hello = pool.start()
        except BaseException:
            pool.close()
            raise
        for name, why in hello.get("preload_failed", {}).items():
            if name in self.settings.preload:
                log.warning("preload %s failed: %s", name, why)
        if self.learned is not None:
            self.learned.forget(list(hello.get("preload_failed", {})))
        risky = hello.get("threads", {}).get("risky")
        if risky:
            log.warning("preload modules started threads %s: forking with them is a fork-safety risk", risky)
        return pool

    # -- talking to a worker's agent ---------------------------------------

    def call_agent(self, w: WorkerHandle, method: str, *args: Any) -> dict[str, Any]:
        """Run an agent method in `w`'s main thread; its JSON answer, parsed.

        A `forkreload_request` on the worker's shell socket, handled by the
        agent: it runs between cells like an execute would, but without
        IPython's cell machinery, history or execution count.
        """
        msg = self.session.msg("forkreload_request", {"method": method, "args": list(args)})
        msg_id = msg["header"]["msg_id"]
        # Kept after the call: the worker's busy/idle for it may come later.
        self.internal_ids.add(msg_id)
        if len(self.internal_ids) > 1000:
            self.internal_ids.clear()
            self.internal_ids.add(msg_id)
        self.session.send(w.shell, msg, ident=[INTERNAL])
        # Replies to the front end that arrive meanwhile are forwarded, but
        # the cells held back wait: no swap may start inside this one.
        self._in_agent_call = True
        try:
            return self._agent_reply(w, msg_id)
        finally:
            self._in_agent_call = False

    def _agent_reply(self, w: WorkerHandle, msg_id: str) -> dict[str, Any]:
        """Wait for the agent's answer; meanwhile Ctrl-C and interrupt
        requests reach the worker running the call (a user module may loop
        forever at import), and other control requests wait their turn."""
        poller = zmq.Poller()
        poller.register(w.shell, zmq.POLLIN)
        poller.register(w.iopub, zmq.POLLIN)
        poller.register(w.pidfd, zmq.POLLIN)
        poller.register(self.fe_control, zmq.POLLIN)
        if self._sigfd is not None:
            poller.register(self._sigfd, zmq.POLLIN)
        while True:
            events = dict(poller.poll(1000))
            if self._sigfd is not None and self._sigfd in events:
                self._on_signals(os.read(self._sigfd, 64), w)
            if self.fe_control in events:
                frames = self.fe_control.recv_multipart()
                verified = self._verify(frames)
                if verified is not None and verified[1].get("msg_type") == "interrupt_request":
                    self._interrupt(w)
                    self.session.send(self.fe_control, "interrupt_reply", {"status": "ok"}, parent=verified[1], ident=verified[0])
                elif verified is not None:
                    self.deferred_control.append((frames, verified))
            if w.iopub in events:
                self._on_worker_iopub(w, w.iopub.recv_multipart())
            if w.shell in events:
                frames = w.shell.recv_multipart()
                idents, parts = _split(frames)
                if idents[:1] == [INTERNAL]:
                    if _json(parts[2]).get("msg_id") == msg_id:
                        return json.loads(_json(parts[4])["result"])
                    continue
                self._on_worker_shell(w, frames)
            if w.pidfd in events:
                w.dead = True
                raise WorkerDied("the worker exited")

    # -- the swap ------------------------------------------------------------

    def _notice(self, parent: dict[str, Any] | None, text: str, error: bool = False) -> None:
        if parent is None or (self.settings.quiet and not error):
            return
        if not self._cleared:
            self._clear_progress(parent)
        self.session.send(
            self.fe_iopub,
            "stream",
            {"name": "stderr" if error else "stdout", "text": text.rstrip("\n") + "\n"},
            parent=parent,
            ident=b"stream",
            metadata={"forkreload": "notice"},
        )

    def _status(self, parent: dict[str, Any], state: str) -> None:
        self.session.send(self.fe_iopub, "status", {"execution_state": state}, parent=parent, ident=b"status")

    def _report(self, mode: str, changed: dict[str, str | None], reason: str, **fields: Any) -> dict[str, Any]:
        """A reload report (sent to clients in the execute reply's metadata)."""
        report: dict[str, Any] = {
            "mode": mode,
            "ok": False,
            "modules": self.watch.modules_of([f for f in changed if f in self.watch.files]),
            "files": sorted(changed),
            "reason": reason,
            "migrated": [],
            "lost": {},
            "patched": [],
            "added": [],
            "seconds": 0.0,
            "error": None,
        }
        report.update(fields)
        return report

    def swap(self, parent: dict[str, Any] | None, changed: dict[str, str | None], reason: str) -> dict[str, Any]:
        """Replace the current worker by a fresh one holding the same values.

        On any failure the old worker stays current, untouched.
        """
        t0 = time.perf_counter()
        old = self.worker
        assert old is not None
        files = sorted(changed)
        report = self._report("fresh", changed, reason)
        phases: dict[str, float] = {}
        report["phases"] = phases
        path = os.path.join(self.privdir, f"ns-{old.wid}-{uuid.uuid4().hex[:6]}")
        new: WorkerHandle | None = None
        try:
            new = self.pool.take_spare()
            phases["spare"] = time.perf_counter() - t0
            exported = self.call_agent(old, "export", path)
            phases["export"] = time.perf_counter() - t0
            if exported.get("ok") is False:
                raise WorkerDied(f"could not export the namespace: {exported.get('error')}")
            report["lost"] = dict(exported.get("lost", {}))
            prepared = self.call_agent(new, "prepare", path, [f for f in files if changed[f] is not None])
            if not prepared.get("ok"):
                report["error"] = prepared.get("error")
                report["failed_module"] = prepared.get("module")
                raise _SwapFailed()
            phases["prepare"] = time.perf_counter() - t0
            loaded = self.call_agent(new, "load", path)
            phases["load"] = time.perf_counter() - t0
            if not loaded.get("ok"):
                if loaded.get("failed"):
                    report["error"] = "; ".join(f"{k}: {v}" for k, v in loaded["failed"].items())
                    report["failed_variables"] = sorted(loaded["failed"])
                else:
                    report["error"] = loaded.get("error")
                raise _SwapFailed()
            report["migrated"] = loaded.get("loaded", [])
        except (_SwapFailed, WorkerDied, ControllerError) as exc:
            if not isinstance(exc, _SwapFailed) and report["error"] is None:
                report["error"] = str(exc)
            if new is not None:
                self.pool.retire(new)
            self._remove_dump(path)
            self.pool.refill_spare()
            report["seconds"] = round(time.perf_counter() - t0, 4)
            self.failed_signature = frozenset(changed.items())
            self._notice(parent, notices.failure_text(report), error=True)
            self.last_report = report
            return report
        self._remove_dump(path)
        self._drain(old)
        self.worker = new
        self.pool.retire(old)
        self._close_comms(parent)
        self.watch.clear()
        for m in self.call_agent(new, "modules"):
            self.watch.add(m["name"], m["file"], m["sha"])
        phases["switch"] = time.perf_counter() - t0
        self.failed_signature = None
        self.want_spare = True  # forked after the cell is on its way, not before
        for k in phases:
            phases[k] = round(phases[k], 4)
        report["ok"] = True
        report["seconds"] = round(time.perf_counter() - t0, 4)
        self._notice(parent, notices.fresh_text(report), error=False)
        self.last_report = report
        return report

    def _remove_dump(self, path: str) -> None:
        for suffix in ("", ".buf", ".meta"):
            try:
                os.unlink(path + suffix)
            except OSError:
                pass

    def apply_edit(self, parent: dict[str, Any] | None, changed: dict[str, str | None], reason: str, forced: bool = False) -> dict[str, Any]:
        """Handle an edit before the next cell: in place when safe, else a fresh worker."""
        mode = self.settings.mode
        preloaded = sorted(p for p in changed if p in self.pool.watch.files)
        if preloaded:
            names = ", ".join(self.pool.watch.modules_of(preloaded))
            return self._with_progress(parent, self.rebuild_snapshot, changed, f"preloaded {names} changed: new snapshot")
        if forced or mode == "fresh":
            return self._with_progress(parent, self.swap, changed, reason)
        assert self.worker is not None
        t0 = time.perf_counter()
        try:
            res = self.call_agent(self.worker, "reload", sorted(changed), mode)
        except WorkerDied as exc:
            return self._report("none", changed, str(exc), error=str(exc))
        kind = res.get("kind")
        reasons = list(res.get("reasons") or [])
        if kind in ("inplace", "partial"):
            for path, sha in res.get("files", {}).items():
                self.watch.accept(path, sha)
            report = self._report(
                "inplace", changed, reason, ok=True, reasons=reasons,
                patched=res.get("patched", []), added=res.get("added", []),
                seconds=round(time.perf_counter() - t0, 5), patch_seconds=res.get("seconds"),
            )
            if report["patched"] or report["added"]:
                self._notice(parent, notices.inplace_text(report))
            if kind == "partial":
                self.failed_signature = frozenset(self.watch.changed().items())
                self._notice(parent, f"forkreload: not reloaded (mode inplace): {'; '.join(reasons)} · run %forkreload fresh to apply", error=True)
            self.last_report = report
            return report
        if kind == "fresh" and mode != "inplace":
            report = self._with_progress(parent, self.swap, changed, reasons[0] if reasons else reason)
            report["reasons"] = reasons
            return report
        # A parse error, a fresh-only edit in mode 'inplace', or the agent failed.
        why = reasons[0] if reasons else str(res.get("error", "the in-place check failed"))
        self.failed_signature = frozenset(changed.items())
        report = self._report("none", changed, why, reasons=reasons, error=why, seconds=round(time.perf_counter() - t0, 5))
        if kind == "fresh":
            self._notice(parent, f"forkreload: not reloaded (mode inplace): {why} · run %forkreload fresh to apply", error=True)
        else:
            self._notice(parent, f"forkreload: kept the old code: {why}", error=True)
        self.last_report = report
        return report

    def rebuild_snapshot(self, parent: dict[str, Any] | None, changed: dict[str, str | None], reason: str) -> dict[str, Any]:
        """A preloaded module of the user's changed: a new snapshot, then a swap from it.

        The old snapshot is the parent of the current worker (which dies
        with it), so it is ended only once the swap succeeded.
        """
        old = self.pool
        assert old is not None
        try:
            self.pool = self._new_pool()
        except ControllerError as exc:
            self.pool = old
            report = self._report("fresh", changed, reason, error=str(exc))
            self.failed_signature = frozenset(changed.items())
            self._notice(parent, f"forkreload: kept the old worker: the new snapshot failed: {exc}", error=True)
            return report
        report = self.swap(parent, changed, reason)
        if report["ok"]:
            old.close()
        else:
            self.pool.close()
            self.pool = old
        return report

    def _with_progress(self, parent: dict[str, Any] | None, step: Any, changed: dict[str, str | None], reason: str) -> dict[str, Any]:
        """Run a swap with a status line in the cell while it waits.

        The line is cleared (clear_output: the cell has no other output yet)
        before the final notice, so a notebook keeps only the notice.
        """
        shown = parent is not None and not self.settings.quiet
        if shown:
            self.session.send(
                self.fe_iopub, "stream", {"name": "stdout", "text": f"forkreload: preparing a fresh worker: {reason}…\n"},
                parent=parent, ident=b"stream", metadata={"forkreload": "progress"},
            )
            self._cleared = False
        report = step(parent, changed, reason)
        if shown and not self._cleared:
            self._clear_progress(parent)
        return report

    def _clear_progress(self, parent: dict[str, Any] | None) -> None:
        self.session.send(self.fe_iopub, "clear_output", {"wait": False}, parent=parent, ident=b"clear_output", metadata={"forkreload": "progress"})
        self._cleared = True

    def _on_command(self, parent: dict[str, Any], content: dict[str, Any]) -> None:
        """`%forkreload ...` typed in a cell: answered into that cell's output."""
        cmd, args = content.get("cmd"), list(content.get("args", []))
        if cmd == "fresh":
            if parent.get("msg_id") in self.fresh_done:
                self.fresh_done.discard(parent.get("msg_id"))
                return
            self.force_fresh = True
            text = "forkreload: a fresh worker (variables migrated) takes over before the next cell"
        elif cmd == "mode":
            if len(args) != 1 or args[0] not in MODES:
                text = f"forkreload: mode is {self.settings.mode}; choose one of {', '.join(MODES)}"
            else:
                self.settings.mode = args[0]
                self.failed_signature = None
                text = f"forkreload: mode is now {args[0]}"
        elif cmd == "quiet":
            self.settings.quiet = not args or args[0] in ("on", "yes", "true", "1")
            text = f"forkreload: quiet is {'on' if self.settings.quiet else 'off'}"
        else:
            text = notices.status_text(self.status())
        self.session.send(self.fe_iopub, "stream", {"name": "stdout", "text": text + "\n"}, parent=parent, ident=b"stream", metadata={"forkreload": "command"})

    def _pending_change(self) -> tuple[dict[str, str | None], str] | None:
        """The edit that must be handled before the next cell, if any."""
        if self.force_fresh:
            return self.watch.changed(), "restart requested"
        if self.settings.mode == "off":
            return None
        changed = self.watch.changed()
        changed.update(self.pool.watch.changed())
        if not changed:
            return None
        if self.failed_signature == frozenset(changed.items()):
            return None  # same broken content as last try: wait for the next save
        names = ", ".join(os.path.basename(p) for p in sorted(changed))
        return changed, f"{names} changed"

    # -- crashes -------------------------------------------------------------

    def _on_worker_exit(self, w: WorkerHandle) -> None:
        w.dead = True
        if w is not self.worker:
            self.pool.retire(w)  # the spare
            return
        status = self.pool.exit_status(w.pid)
        why = f"the worker {status}; its variables were lost"
        for msg_id, (idents, header) in list(w.inflight.items()):
            self._reply_dead(idents, header, why)
        w.inflight.clear()
        self.pool.retire(w)
        self._close_comms(None)
        self.worker = None
        self.watch.clear()
        self.failed_signature = None
        self.pending_report = self._report("fresh", {}, why, ok=True, lost={"*": why})
        try:
            self.worker = self.pool.take_spare()
        except (WorkerDied, ControllerError) as exc:
            log.error("could not start a fresh worker: %s", exc)
        self.pool.refill_spare()

    def _reply_dead(self, idents: list[bytes], header: dict[str, Any], why: str) -> None:
        msg_type = header.get("msg_type", "")
        reply_type = msg_type.replace("_request", "_reply")
        content = {"status": "error", "ename": "WorkerDied", "evalue": why, "traceback": [f"forkreload: {why}"]}
        if msg_type == "execute_request":
            content["execution_count"] = None
            self.session.send(self.fe_iopub, "error", {k: content[k] for k in ("ename", "evalue", "traceback")}, parent=header, ident=b"error")
        self.session.send(self.fe_shell, reply_type, content, parent=header, ident=idents)
        self._status(header, "idle")

    # -- message routing -----------------------------------------------------

    def _on_worker_iopub(self, w: WorkerHandle, frames: list[bytes]) -> None:
        _idents, parts = _split(frames)
        header = _json(parts[1])
        msg_type = header.get("msg_type")
        if msg_type == "iopub_welcome":
            w.ready = True
            return
        if msg_type == "forkreload_command":
            if w is self.worker:
                self._on_command(_json(parts[2]), _json(parts[4]))
            return
        if msg_type == "forkreload_modules":
            if w is self.worker:
                content = _json(parts[4])
                for m in content.get("modules", []):
                    self.watch.add(m["name"], m["file"], m["sha"])
                if self.learned is not None and content.get("third_party"):
                    self.learned.add(content["third_party"])
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
            if state == "busy":
                w.busy_for.add(parent.get("msg_id"))
            elif state == "idle":
                w.busy_for.discard(parent.get("msg_id"))
        self.fe_iopub.send_multipart(frames)

    def _drain(self, w: WorkerHandle, timeout: float = 2.0) -> None:
        """Forward what the worker still owes the front end (the last idle,
        output published after a reply) before it is retired."""
        deadline = time.monotonic() + timeout
        while w.busy_for and time.monotonic() < deadline:
            if w.iopub.poll(50):
                self._on_worker_iopub(w, w.iopub.recv_multipart())

    def _on_worker_shell(self, w: WorkerHandle, frames: list[bytes]) -> None:
        idents, parts = _split(frames)
        if idents[:1] == [INTERNAL]:
            return  # a late reply to an agent call that gave up
        parent = _json(parts[2])
        msg_id = parent.get("msg_id")
        w.inflight.pop(msg_id, None)
        if msg_id in self.stop_on_error and _json(parts[1]).get("msg_type") == "execute_reply":
            self.stop_on_error.discard(msg_id)
            if _json(parts[4]).get("status") == "error":
                self._abort_held()
        report = self.reports.pop(msg_id, None)
        if report is not None:
            msg = self.session.deserialize(parts, content=True)
            msg["metadata"]["forkreload"] = report
            self.session.send(self.fe_shell, msg, ident=idents)
        else:
            self.fe_shell.send_multipart(frames)
        if self.held and not self._executing(w) and not self._in_agent_call:
            held, self.held = self.held, []
            for f in held:
                self._route_shell(f)

    def _verify(self, frames: list[bytes]) -> tuple[list[bytes], dict[str, Any]] | None:
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

    def _on_front_shell(self, frames: list[bytes]) -> None:
        if self._verify(frames) is None:
            return
        if self.held:
            self.held.append(frames)
            return
        self._route_shell(frames)

    def _track_comm(self, msg_type: str, content: bytes) -> None:
        comm_id = _json(content).get("comm_id")
        if msg_type == "comm_open":
            self.comms.add(comm_id)
        else:
            self.comms.discard(comm_id)

    def _close_comms(self, parent: dict[str, Any] | None) -> None:
        """The old worker's comms (widgets) cannot follow it: close them visibly."""
        if not self.comms:
            return
        for comm_id in sorted(self.comms):
            self.session.send(self.fe_iopub, "comm_close", {"comm_id": comm_id, "data": {}}, parent=parent, ident=b"comm_close")
        n = len(self.comms)
        self.comms.clear()
        self._notice(parent, f"forkreload: closed {n} comm{'s' if n > 1 else ''} (widgets) of the old worker; display them again", error=True)

    def _route_shell(self, frames: list[bytes]) -> None:
        idents, parts = _split(frames)
        header = _json(parts[1])
        if header.get("msg_type") == "forkreload_request":
            log.warning("dropped a forkreload_request from a front end: the agent takes them from the controller only")
            return
        if header.get("msg_type") in ("comm_open", "comm_close"):
            self._track_comm(header["msg_type"], parts[4])
        if self.worker is None:
            try:
                self.worker = self.pool.take_spare()
                self.pool.refill_spare()
            except (WorkerDied, ControllerError) as exc:
                self._reply_dead(idents, header, f"no worker could be started: {exc}")
                return
        w = self.worker
        content = _json(parts[4]) if header.get("msg_type") == "execute_request" else {}
        if header.get("msg_type") == "execute_request":
            if self._executing(w):
                # One cell at a time: the check for edits must happen right
                # before each cell runs (a cell may edit a module for the next).
                self.held.append(frames)
                return
            if content.get("code", "").split() == ["%forkreload", "fresh"]:
                # A cell that is just `%forkreload fresh`: swap now, so the
                # notice lands in this cell (the magic itself then does nothing).
                self.force_fresh = True
                self.fresh_done.add(header.get("msg_id", ""))
            t0 = time.perf_counter()
            pending = self._pending_change()
            self.check_times.append(time.perf_counter() - t0)
            if pending is not None:
                if w.inflight:
                    self.held.append(frames)  # swap only when the worker is idle
                    return
                self._status(header, "busy")
                forced, self.force_fresh = self.force_fresh, False
                report = self.apply_edit(header, *pending, forced=forced)
                self.reports[header["msg_id"]] = report
                w = self.worker
            elif self.pending_report is not None:
                report, self.pending_report = self.pending_report, None
                self.reports[header["msg_id"]] = report
                self._notice(header, f"forkreload: fresh worker: {report['reason']}", error=True)
        if header.get("msg_type", "").endswith("_request"):
            # Only requests get replies (comm messages do not): the worker is
            # idle again, and may be swapped, once these are answered.
            w.inflight[header.get("msg_id", "")] = (idents, header)
            if header["msg_type"] == "execute_request":
                if content.get("stop_on_error", True) and not content.get("silent", False):
                    self.stop_on_error.add(header.get("msg_id", ""))
        w.shell.send_multipart(frames)

    def _abort_held(self) -> None:
        """A cell failed: the cells queued behind it are aborted, as ipykernel does."""
        kept = []
        for frames in self.held:
            idents, parts = _split(frames)
            header = _json(parts[1])
            if header.get("msg_type") != "execute_request":
                kept.append(frames)
                continue
            self._status(header, "busy")
            status = {"status": "aborted"}
            self.session.send(self.fe_shell, "execute_reply", status, parent=header, ident=idents, metadata=dict(status))
            self._status(header, "idle")
        self.held = kept

    @staticmethod
    def _executing(w: WorkerHandle) -> bool:
        return any(h.get("msg_type") == "execute_request" for _i, h in w.inflight.values())

    def _on_front_control(self, frames: list[bytes], verified: tuple[list[bytes], dict[str, Any]] | None = None) -> None:
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
                self.clean_restart()
            else:
                self.running = False
            reply = {"status": "ok", "restart": restart}
            self.session.send(self.fe_control, "shutdown_reply", reply, parent=header, ident=idents)
            self.session.send(self.fe_iopub, "shutdown_reply", reply, parent=header, ident=b"shutdown_reply")
        elif msg_type == "forkreload_request":
            reply = self._forkreload_request(_json(content_frame))
            self.session.send(self.fe_control, "forkreload_reply", reply, parent=header, ident=idents)
        elif self.worker is not None:
            self.worker.control.send_multipart(frames)

    def _forkreload_request(self, content: dict[str, Any]) -> dict[str, Any]:
        cmd = content.get("cmd")
        if cmd == "status":
            return {"status": "ok", **self.status()}
        if cmd == "restart":
            if self.worker is None or self.worker.inflight:
                return {"status": "error", "evalue": "the worker is busy"}
            report = self.swap(None, self.watch.changed(), "restart requested")
            return {"status": "ok" if report["ok"] else "error", "report": report}
        return {"status": "error", "evalue": f"unknown command {cmd!r}"}

    def clean_restart(self) -> None:
        """A front end's "Restart kernel": a clean worker, nothing migrated."""
        old = self.worker
        self.worker = None
        self.held = []
        if old is not None:
            self.pool.retire(old)
        self._close_comms(None)
        self.watch.clear()
        self.failed_signature = None
        self.pending_report = None
        self.force_fresh = False
        try:
            self.worker = self.pool.take_spare()
        except (WorkerDied, ControllerError) as exc:
            log.error("could not start a fresh worker: %s", exc)
        self.want_spare = True

    def preload_list(self) -> list[str]:
        """The explicit preloads, then what this project's sessions imported before."""
        names = list(self.settings.preload)
        if self.learned is not None:
            names += [m for m in self.learned.modules if m not in names]
        return names

    def status(self) -> dict[str, Any]:
        """What a user asks `%forkreload status` or `Session.status()` for."""
        snap = self.pool.info if self.pool is not None else {}
        return {
            "mode": self.settings.mode,
            "cwd": self.settings.cwd,
            "settings": self.settings.as_dict(),
            "learned": list(self.learned.modules) if self.learned is not None else None,
            "snapshot": {
                "pid": snap.get("pid"),
                "preload": snap.get("preload", {}),
                "preload_failed": snap.get("preload_failed", {}),
                "seconds": snap.get("seconds"),
                "threads": snap.get("threads", {}),
            },
            "worker_pid": self.worker.pid if self.worker else None,
            "spare_pid": self.pool.spare.pid if self.pool is not None and self.pool.spare else None,
            "watched": dict(self.watch.modules),
            "last_reload": self.last_report,
            "check_us": statistics.median(self.check_times) * 1e6 if self.check_times else None,
        }

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
        assert self.pool is not None
        workers = [w for w in (self.worker, self.pool.spare) if w is not None and w.pidfd >= 0]
        key = (self.pool.fileno(), *((id(w), w.pidfd) for w in workers))
        if key != self._poll_key:
            poller = zmq.Poller()
            for s in (self.fe_shell, self.fe_control, self.fe_stdin, self.fe_iopub):
                poller.register(s, zmq.POLLIN)
            poller.register(sigfd, zmq.POLLIN)
            poller.register(self.pool.fileno(), zmq.POLLIN)
            for w in workers:
                poller.register(w.pidfd, zmq.POLLIN)
                # A spare says nothing until it is taken (and then its
                # welcome is read by WorkerPool.wait_ready).
                if w is self.worker:
                    for sock in w.sockets:
                        poller.register(sock, zmq.POLLIN)
            self._poll_key, self._poll = key, (poller, workers)
        return self._poll

    def _step(self, sigfd: int) -> None:
        poller, workers = self._poller(sigfd)
        assert self.pool is not None
        events = dict(poller.poll(1000))
        if os.getppid() != self._ppid:
            self.running = False  # our parent died: do not outlive it
            return
        if sigfd in events:
            self._on_signals(os.read(sigfd, 64))
        while self.deferred_control and not self._in_agent_call:
            self._on_front_control(*self.deferred_control.pop(0))
        if self.pool.fileno() in events:
            try:
                self.pool.read_message()
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
                    else:
                        self.fe_control.send_multipart(frames)
            if w.pidfd in events:
                self._on_worker_exit(w)
        if self.fe_iopub in events:
            sub = self.fe_iopub.recv()
            if sub[:1] == b"\x01":
                self.session.send(self.fe_iopub, "iopub_welcome", {"subscription": sub[1:].decode(errors="replace")}, ident=b"iopub_welcome")
        if self.fe_control in events:
            self._on_front_control(self.fe_control.recv_multipart())
        if self.fe_stdin in events and self.worker is not None:
            frames = self.fe_stdin.recv_multipart()
            if self._verify(frames) is not None:
                self.worker.stdin.send_multipart(frames)
        if self.fe_shell in events:
            self._on_front_shell(self.fe_shell.recv_multipart())
        if self.want_spare:
            self.pool.refill_spare()

    def close(self) -> None:
        """Stop every process this controller started and free its files."""
        if self.worker is not None:
            self.worker.kill()
            self.worker.close()
            self.worker = None
        if self.pool is not None:
            self.pool.close()
        for s in ("fe_shell", "fe_control", "fe_stdin", "fe_iopub"):
            if hasattr(self, s):
                getattr(self, s).close(linger=200)
        self.ctx.term()
        shutil.rmtree(self.privdir, ignore_errors=True)


class _SwapFailed(Exception):
    """The fresh worker refused the user's code or values; report in hand."""
