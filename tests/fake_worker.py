"""A tiny purpose-built kernel standing in for a forkreload worker in tests.

Run as `python fake_worker.py PRIVDIR WID KEY PARENT_PID` (by `FakePool`, in
fake_pool.py). It binds the ipc sockets of `forkreload.worker.worker_connection`
(shell, control and stdin ROUTERs, an iopub XPUB that sends an
`iopub_welcome` on subscription; no heartbeat: the controller beats its own),
signs and checks every message with jupyter_client's `Session` under the
session key (a badly signed one is dropped with a `stream` on stderr that
has no parent; replays are not checked here, so one the controller let
through would run twice), and answers like ipykernel with the forkreload
agent installed, in one thread:

- `kernel_info_request`, `comm_info_request`, `complete_request` and the
  like (an empty ok reply), no reply to a request type it does not know (as
  ipykernel), `interrupt_request` and `shutdown_request` on control;
- `execute_request`: busy, `execute_input`, the cell run with plain `exec`
  in a namespace kept across cells (stdout captured and published as one
  `stream`; an exception published as `error`), `execute_reply` (ok or
  error, an execution count that carries over a swap), idle. A cell that is
  exactly `%forkreload CMD ARGS` publishes `COMMAND_EVENT` as the agent does;
- the controller's agent calls (`protocol.AGENT_REQUEST`): `modules` (the
  announced modules), `export` (a JSON dump of the JSON-able variables, the
  execution count and the modules), `load` (restores that dump, re-hashes
  the modules' files), `inplace` (`fresh` unless told otherwise), answered
  with `protocol.AGENT_REPLY`.

A cell sees these helpers: `sleep(s)`, `WID`, `PID`, `announce(name, path)`
(publishes `MODULES_EVENT` for the file as it is now, so the controller
watches it), `command(cmd, *args)` (publishes `COMMAND_EVENT`),
`reload_answer(kind, **fields)` (what this worker's `inplace` answers next:
`inplace`, `partial`, `fresh` or `error`), `on_call(method, sleep=0,
exit=None, **answer)` (this worker's agent call `method` sleeps, then exits
with that status or gives that answer), `next_load(sleep=0, exit=None,
**answer)` (the same for the `load` of the worker a swap moves into: it
travels in the dump), `comm_open(id)`, `comm_close(id)`, `ask(prompt, wait=2.0)` (an
`input_request`; the stdin socket is ROUTER_MANDATORY, so one the
controller's socket is not connected for fails after `wait` s instead of
being dropped), `crash(status)` (`os._exit`).

A `fake-worker-<wid>.json` in the workers' directory sets options of worker
`wid`: `{"stdin_bind_delay": s}` binds its stdin socket that long after the
others (after its iopub welcome).

The controller interrupts a worker with SIGINT: it raises KeyboardInterrupt
in a running cell or agent call (an interrupted cell answers an error
`KeyboardInterrupt`, an interrupted call `{"ok": False, "error":
"KeyboardInterrupt: "}` as the agent does) and is ignored while idle.

Every message it sends carries `{"fake_worker": {"wid": .., "pid": ..}}` in
its metadata, and every execute reply also says whether another request was
already waiting on the shell socket when the cell ended
(`"shell_queued"`): the controller must hold a cell until the one before
it is answered.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import sys
import time
import traceback
from typing import Any

import zmq


def _without_package_init(*names: str) -> None:
    """Import submodules of `names` without running the packages' __init__:
    jupyter_client's and forkreload's import every client and manager they
    have, a third of a fake worker's start, paid at every swap of a test."""
    import importlib.util
    import types

    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None or name in sys.modules:
            continue
        pkg = types.ModuleType(name)
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules[name] = pkg


if __name__ == "__main__":
    _without_package_init("jupyter_client", "forkreload")

from forkreload import protocol  # noqa: E402
from forkreload.channel import set_parent_death_signal  # noqa: E402
from forkreload.worker import worker_connection  # noqa: E402
from jupyter_client.session import Session  # noqa: E402

DEFAULT_RELOAD: dict[str, Any] = {"kind": "fresh", "reasons": ["fake worker: fresh by default"]}


def sha_of(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


class FakeWorker:
    def __init__(self, privdir: str, wid: int, key: str) -> None:
        self.wid = wid
        self.pid = os.getpid()
        self.privdir = privdir
        self.session = Session(key=key.encode(), signature_scheme="hmac-sha256", username="fake-worker")
        # Replays are the controller's to drop: one that got through must run
        # twice where a test sees it, not be hidden by this session's own check.
        self.session.digest_history_size = 0
        conn = worker_connection(privdir, wid, key)
        base = f"ipc://{conn['ip']}-"
        self.ctx = zmq.Context()
        self.shell = self.ctx.socket(zmq.ROUTER)
        self.control = self.ctx.socket(zmq.ROUTER)
        self.stdin = self.ctx.socket(zmq.ROUTER)
        self.iopub = self.ctx.socket(zmq.XPUB)
        self.iopub.setsockopt(zmq.SNDHWM, 0)
        # An input_request to a controller socket not connected (yet) fails
        # loudly here; ipykernel's ROUTER drops it and input() hangs.
        self.stdin.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.options = worker_options(wid)
        self.stdin_url: str | None = base + str(conn["stdin_port"])
        for sock, port in ((self.shell, "shell_port"), (self.control, "control_port"),
                           (self.stdin, "stdin_port"), (self.iopub, "iopub_port")):
            sock.setsockopt(zmq.LINGER, 1000)
            if sock is self.stdin and self.options.get("stdin_bind_delay"):
                continue  # bound in serve(), after the iopub welcome
            sock.bind(base + str(conn[port]))
            if sock is self.stdin:
                self.stdin_url = None
        self.execution_count = 0
        self.ns: dict[str, Any] = {}
        self.modules: dict[str, dict[str, str]] = {}  # name -> ModuleInfo
        self.reload_next: dict[str, Any] = dict(DEFAULT_RELOAD)
        self.load_next: dict[str, Any] = {}  # travels in the dump to the next worker
        self.behaviour: dict[str, dict[str, Any]] = {}  # agent call -> sleep, exit, answer
        self.parent: dict[str, Any] = {}
        self.parent_idents: list[bytes] = []
        self.running = True

    # -- sending -------------------------------------------------------------

    @property
    def me(self) -> dict[str, Any]:
        return {"fake_worker": {"wid": self.wid, "pid": self.pid}}

    def send(self, sock: zmq.Socket, msg_type: str, content: dict[str, Any], parent: dict[str, Any] | None,
             ident: Any = None, metadata: dict[str, Any] | None = None) -> None:
        self.session.send(sock, msg_type, content, parent=parent, ident=ident, metadata={**self.me, **(metadata or {})})

    def publish(self, msg_type: str, content: dict[str, Any], parent: dict[str, Any] | None = None) -> None:
        self.send(self.iopub, msg_type, content, self.parent if parent is None else parent, ident=msg_type.encode())

    def status(self, state: str, parent: dict[str, Any]) -> None:
        self.publish("status", {"execution_state": state}, parent)

    # -- the loop ------------------------------------------------------------

    def serve(self) -> None:
        poller = zmq.Poller()
        for s in (self.iopub, self.control, self.shell, self.stdin):
            poller.register(s, zmq.POLLIN)
        bind_stdin_at = time.monotonic() + float(self.options.get("stdin_bind_delay", 0))
        while self.running:
            try:
                if self.stdin_url is not None and time.monotonic() >= bind_stdin_at:
                    self.stdin.bind(self.stdin_url)
                    self.stdin_url = None
                events = dict(poller.poll(1000 if self.stdin_url is None else 20))
                if self.iopub in events:
                    sub = self.iopub.recv()
                    if sub[:1] == b"\x01":
                        self.publish("iopub_welcome", {"subscription": sub[1:].decode(errors="replace")}, {})
                if self.control in events:
                    self.dispatch(self.control, self.control.recv_multipart())
                if self.shell in events:
                    drop_interrupts()  # one that came while idle: ignored, as in ipykernel
                    self.dispatch(self.shell, self.shell.recv_multipart())
                if self.stdin in events:
                    self.stdin.recv_multipart()  # an input_reply nobody waits for
            except KeyboardInterrupt:
                continue  # an interrupt while idle does nothing, as in ipykernel

    def dispatch(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        try:
            idents, parts = self.session.feed_identities(frames)
            msg = self.session.deserialize(parts, content=True)
        except Exception as exc:  # a bad signature: dropped, as ipykernel does, and said where a test sees it
            self.publish("stream", {"name": "stderr", "text": f"fake worker {self.wid}: dropped a message: {exc}\n"}, {})
            return
        msg_type = msg["header"]["msg_type"]
        if sock is self.control:
            self.on_control(idents, msg, msg_type)
            return
        self.status("busy", msg)
        try:
            if msg_type == "execute_request":
                self.execute(idents, msg)
            elif msg_type == protocol.AGENT_REQUEST:
                content = msg["content"]
                answer = self.agent_call(content.get("method", ""), list(content.get("args", [])))
                self.send(self.shell, protocol.AGENT_REPLY, answer, msg, ident=idents)
            elif msg_type == "kernel_info_request":
                self.send(self.shell, "kernel_info_reply", self.kernel_info(), msg, ident=idents)
            elif msg_type == "comm_info_request":
                self.send(self.shell, "comm_info_reply", {"status": "ok", "comms": {}}, msg, ident=idents)
            elif msg_type in ("complete_request", "inspect_request", "history_request", "is_complete_request"):
                self.send(self.shell, msg_type.replace("_request", "_reply"), {"status": "ok"}, msg, ident=idents)
            # comm_msg, comm_open, comm_close: no reply; an unknown request:
            # none either, as ipykernel ("Unknown message type")
        finally:
            drop_interrupts()  # one that came after the answer: ignored, as in ipykernel
            self.status("idle", msg)

    def on_control(self, idents: list[bytes], msg: dict[str, Any], msg_type: str) -> None:
        if msg_type == "kernel_info_request":
            self.send(self.control, "kernel_info_reply", self.kernel_info(), msg, ident=idents)
        elif msg_type == "shutdown_request":
            self.send(self.control, "shutdown_reply", {"status": "ok", "restart": False}, msg, ident=idents)
            self.running = False
        elif msg_type.endswith("_request"):
            self.send(self.control, msg_type.replace("_request", "_reply"), {"status": "ok"}, msg, ident=idents)

    def kernel_info(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "protocol_version": "5.3",
            "implementation": "fake-worker",
            "implementation_version": "0",
            "language_info": {"name": "python", "version": sys.version.split()[0], "mimetype": "text/x-python", "file_extension": ".py"},
            "banner": f"fake worker {self.wid} (pid {self.pid})",
            "help_links": [],
        }

    # -- cells -----------------------------------------------------------------

    def execute(self, idents: list[bytes], msg: dict[str, Any]) -> None:
        content = msg["content"]
        code = content.get("code", "")
        silent = bool(content.get("silent", False))
        if not silent and content.get("store_history", True):
            self.execution_count += 1
        count = self.execution_count
        self.parent, self.parent_idents = msg, idents
        started = time.time()
        out = io.StringIO()
        error: tuple[str, str, list[str]] | None = None
        words = code.split()
        try:
            with interruptible():
                self.publish("execute_input", {"code": code, "execution_count": count})
                with contextlib.redirect_stdout(out):
                    if words[:1] == ["%forkreload"]:
                        self.command(*(words[1:] or ["status"]))
                    else:
                        exec(compile(code, f"<cell {count}>", "exec"), self.namespace())
        except BaseException as exc:  # KeyboardInterrupt included: the cell was interrupted
            if isinstance(exc, SystemExit):
                raise
            error = (type(exc).__name__, str(exc), traceback.format_exception_only(type(exc), exc))
        if out.getvalue():
            self.publish("stream", {"name": "stdout", "text": out.getvalue()})
        reply: dict[str, Any]
        if error is None:
            reply = {"status": "ok", "execution_count": count, "user_expressions": {}, "payload": []}
        else:
            ename, evalue, tb = error
            self.publish("error", {"ename": ename, "evalue": evalue, "traceback": tb})
            reply = {"status": "error", "execution_count": count, "ename": ename, "evalue": evalue, "traceback": tb}
        queued = bool(self.shell.poll(0))
        meta = {"started": started, "ended": time.time(), "shell_queued": queued}
        self.send(self.shell, "execute_reply", reply, msg, ident=idents, metadata=meta)

    def namespace(self) -> dict[str, Any]:
        ns = self.ns
        ns.update(
            sleep=time.sleep, WID=self.wid, PID=self.pid, announce=self.announce, command=self.command,
            reload_answer=self.reload_answer, next_load=self.next_load, on_call=self.on_call, comm_open=self.comm_open,
            comm_close=self.comm_close, ask=self.ask, crash=os._exit,
        )
        return ns

    def announce(self, name: str, path: str) -> None:
        path = os.path.realpath(path)
        info = {"name": name, "file": path, "sha": sha_of(path) or ""}
        self.modules[name] = info
        self.publish(protocol.MODULES_EVENT, {"modules": [info], "third_party": []})

    def command(self, cmd: str, *args: str) -> None:
        self.publish(protocol.COMMAND_EVENT, {"cmd": cmd, "args": list(args)})

    def reload_answer(self, kind: str, **fields: Any) -> None:
        self.reload_next = {"kind": kind, "reasons": [f"fake worker: {kind}"], **fields}

    def next_load(self, sleep: float = 0.0, exit: int | None = None, **answer: Any) -> None:
        self.load_next = {"sleep": sleep, "exit": exit, "answer": answer}

    def on_call(self, method: str, sleep: float = 0.0, exit: int | None = None, **answer: Any) -> None:
        self.behaviour[method] = {"sleep": sleep, "exit": exit, "answer": answer}

    def comm_open(self, comm_id: str, target: str = "fake") -> None:
        self.publish("comm_open", {"comm_id": comm_id, "target_name": target, "data": {}})

    def comm_close(self, comm_id: str) -> None:
        self.publish("comm_close", {"comm_id": comm_id, "data": {}})

    def ask(self, prompt: str = "", wait: float = 2.0) -> str:
        """input(): waits up to `wait` s for the controller's stdin socket to be connected."""
        deadline = time.monotonic() + wait
        while True:
            try:
                self.send(self.stdin, "input_request", {"prompt": prompt, "password": False}, self.parent, ident=self.parent_idents)
                break
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH or time.monotonic() > deadline:
                    raise RuntimeError(f"input_request not sent: the controller's stdin socket is not connected ({exc})") from None
                time.sleep(0.01)
        while True:
            frames = self.stdin.recv_multipart()
            _idents, parts = self.session.feed_identities(frames)
            reply = self.session.deserialize(parts, content=True)
            if reply["header"]["msg_type"] == "input_reply":
                return str(reply["content"].get("value", ""))

    # -- the agent -------------------------------------------------------------

    def agent_call(self, method: str, args: list[Any]) -> dict[str, Any]:
        try:
            with interruptible():
                return self._agent_call(method, args)
        except BaseException as exc:  # as the real agent: never raises, KeyboardInterrupt included
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "internal": True}

    def _agent_call(self, method: str, args: list[Any]) -> dict[str, Any]:
        if method not in protocol.AGENT_CALLS:
            raise ValueError(f"unknown agent call {method!r}")
        how = self.behaviour.get(method, {})
        if how.get("sleep"):
            time.sleep(how["sleep"])
        if how.get("exit") is not None:
            os._exit(how["exit"])
        if how.get("answer"):
            return dict(how["answer"])
        answer: dict[str, Any] = getattr(self, "call_" + method)(*args)
        return answer

    def call_modules(self) -> dict[str, Any]:
        return {"modules": list(self.modules.values())}

    def call_export(self, path: str) -> dict[str, Any]:
        saved, lost = {}, {}
        for name, value in self.ns.items():
            if name.startswith("_") or callable(value) or name in ("WID", "PID"):
                continue
            try:
                json.dumps(value)
                saved[name] = value
            except (TypeError, ValueError):
                lost[name] = f"cannot be pickled ({type(value).__name__})"
        dump = {"execution_count": self.execution_count, "ns": saved, "modules": list(self.modules.values()),
                "load": self.load_next, "from": self.me["fake_worker"]}
        with open(path, "w") as f:
            json.dump(dump, f)
        return {"ok": True, "saved": sorted(saved), "lost": lost, "reset": []}

    def call_load(self, path: str, changed_files: list[str]) -> dict[str, Any]:
        with open(path) as f:
            dump = json.load(f)
        how = dump.get("load") or {}
        if how.get("sleep"):
            # Tests wait for this file before they interrupt the load.
            with open(os.path.join(os.getcwd(), f"load-started-{self.wid}"), "w"):
                pass
            time.sleep(how["sleep"])
        if how.get("exit") is not None:
            os._exit(how["exit"])
        if how.get("answer"):
            return dict(how["answer"])
        self.execution_count = dump["execution_count"]
        self.ns.update(dump["ns"])
        modules, gone = [], []
        for m in dump["modules"]:
            sha = sha_of(m["file"])
            if sha is None:
                gone.append(m["name"])
            else:
                self.modules[m["name"]] = info = {**m, "sha": sha}
                modules.append(info)
        return {"ok": True, "loaded": sorted(dump["ns"]), "failed": {}, "gone": gone, "modules": modules, "seconds": 0.0}

    def call_inplace(self, files: list[str], mode: str) -> dict[str, Any]:
        answer = dict(self.reload_next)
        if answer["kind"] in ("inplace", "partial"):
            # Patched: this worker now runs these files as they are.
            answer.setdefault("files", {f: sha_of(f) for f in files if sha_of(f) is not None})
            for m in self.modules.values():
                if m["file"] in answer["files"]:
                    m["sha"] = answer["files"][m["file"]]
        answer.setdefault("seconds", 0.0)
        return answer


@contextlib.contextmanager
def interruptible() -> Any:
    """SIGINT (pending or to come) raises KeyboardInterrupt in this block only."""
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def drop_interrupts() -> None:
    while signal.SIGINT in signal.sigpending():
        signal.sigwait({signal.SIGINT})


def worker_options(wid: int) -> dict[str, Any]:
    """Options a test left for worker `wid` in the workers' directory
    (`fake-worker-<wid>.json`): `stdin_bind_delay` (s)."""
    try:
        with open(os.path.join(os.getcwd(), f"fake-worker-{wid}.json")) as f:
            options: dict[str, Any] = json.load(f)
    except OSError:
        return {}
    return options


def main() -> None:
    privdir, wid, key, parent = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    # As a forked worker: never outlive the controller.
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)
    # The controller interrupts with SIGINT: blocked but while a cell or an
    # agent call runs, so that one sent once the request's busy was seen
    # always interrupts that request, and none reaches the protocol code.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    w = FakeWorker(privdir, wid, key)
    try:
        w.serve()
    finally:
        for s in (w.shell, w.control, w.stdin, w.iopub):
            s.close(linger=200)
        w.ctx.term()


if __name__ == "__main__":
    main()
