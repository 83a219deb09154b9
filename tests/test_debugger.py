"""JupyterLab's visual debugger against `forkreload kernel`, as the front end
drives it: `debug_request` on control, `debug_reply` back, `debug_event` on
iopub, with a real jupyter_client and real workers (ipykernel + debugpy).

The debug session the front end built follows each new worker (a swap,
`%forkreload fresh`, `back`, a crash): the controller replays the requests
that built it, so breakpoints in a cell and in a user module still stop the
new worker. When the replay fails, the front end gets a `terminated` event
and the cell a notice.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from forkreload import kernelspec
from jupyter_client import KernelManager

pytestmark = pytest.mark.timeout(240)

INITIALIZE = {
    "clientID": "test-client", "clientName": "testClient", "adapterID": "", "pathFormat": "path",
    "linesStartAt1": True, "columnsStartAt1": True, "supportsVariableType": True,
    "supportsVariablePaging": True, "supportsRunInTerminalRequest": True, "locale": "en",
}

CELL = """def f(a, b):
    c = a + b
    return c

import os, mod
v = mod.work(f(2, 3))
os.getpid()"""

# The class last: adding a field to it moves no line of work().
MODULE = """def work(n):
    total = n * 2
    return total


class Point:
    x = 1
"""


class Front:
    """A front end: a blocking client, its debug requests, and every iopub
    message it read, in order (a test looks back at what a cell got)."""

    def __init__(self, kc: Any) -> None:
        self.kc = kc
        self.seq = itertools.count(1)
        self.iopub: list[dict[str, Any]] = []
        self.stacks: list[list[tuple[str, str, int]]] = []  # each stop's call stack: name, file, line
        self.km: Any = None

    def debug(self, command: str, timeout: float = 60, **arguments: Any) -> dict[str, Any]:
        msg = self.kc.session.msg("debug_request", {"type": "request", "seq": next(self.seq), "command": command, "arguments": arguments})
        self.kc.control_channel.send(msg)
        deadline = time.monotonic() + timeout
        while True:
            reply = self.kc.get_control_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                assert reply["msg_type"] == "debug_reply"
                content: dict[str, Any] = reply["content"]
                return content

    def ok(self, command: str, **arguments: Any) -> dict[str, Any]:
        reply = self.debug(command, **arguments)
        assert reply.get("success"), reply
        return reply

    def wait(self, pred: Callable[[dict[str, Any]], bool], since: int, timeout: float = 60) -> int:
        """The index of the first iopub message from `since` on that `pred` accepts."""
        deadline = time.monotonic() + timeout
        i = since
        while True:
            while i < len(self.iopub):
                if pred(self.iopub[i]):
                    return i
                i += 1
            left = deadline - time.monotonic()
            assert left > 0, f"not seen; got {[(m['msg_type'], m['content'].get('event')) for m in self.iopub[since:]]}"
            try:
                self.iopub.append(self.kc.get_iopub_msg(timeout=min(left, 1.0)))
            except Exception:  # queue.Empty
                pass

    def stopped(self, since: int) -> tuple[int, dict[str, Any]]:
        i = self.wait(lambda m: m["msg_type"] == "debug_event" and m["content"].get("event") == "stopped", since)
        return i + 1, self.iopub[i]["content"]

    def execute(self, code: str) -> tuple[str, int]:
        return self.kc.execute(code, stop_on_error=False), len(self.iopub)

    def finish(self, msg_id: str, since: int) -> dict[str, Any]:
        """The cell's reply, once its idle came; its output is in self.iopub."""
        reply = None
        while reply is None:
            m = self.kc.get_shell_msg(timeout=60)
            if m["parent_header"].get("msg_id") == msg_id:
                reply = m["content"]
        self.wait(lambda m: m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status" and m["content"]["execution_state"] == "idle", since)
        return reply

    def text(self, msg_id: str) -> str:
        return "".join(m["content"]["text"] for m in self.iopub if m["msg_type"] == "stream" and m["parent_header"].get("msg_id") == msg_id)

    def result(self, msg_id: str) -> str:
        found = [m["content"]["data"]["text/plain"] for m in self.iopub if m["msg_type"] == "execute_result" and m["parent_header"].get("msg_id") == msg_id]
        assert found, self.text(msg_id)
        return found[-1]

    def run(self, code: str) -> tuple[str, dict[str, Any]]:
        msg_id, since = self.execute(code)
        reply = self.finish(msg_id, since)
        assert reply["status"] == "ok", (reply, self.text(msg_id))
        return msg_id, reply

    def top(self, stop: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Where a stopped thread is, and its frame's local variables (as the variables panel asks)."""
        frames = self.ok("stackTrace", threadId=stop["body"]["threadId"])["body"]["stackFrames"]
        self.stacks.append([(f["name"], f["source"].get("path"), f["line"]) for f in frames])
        scopes = self.ok("scopes", frameId=frames[0]["id"])["body"]["scopes"]
        local = next(s for s in scopes if s["name"] == "Locals")
        variables = self.ok("variables", variablesReference=local["variablesReference"])["body"]["variables"]
        return frames[0], {v["name"]: v["value"] for v in variables}

    def start_debugger(self, module: Path, module_line: int) -> str:
        """Turn the debugger on as JupyterLab does; breakpoints on the cell's
        line 2 and on `module_line` of the user's module. The cell's file."""
        self.ok("initialize", **INITIALIZE)
        self.ok("attach")
        source = self.ok("dumpCell", code=CELL)["body"]["sourcePath"]
        reply = self.ok("setBreakpoints", breakpoints=[{"line": 2}], source={"path": source}, sourceModified=False)
        assert reply["body"]["breakpoints"][0]["verified"]
        self.ok("setBreakpoints", breakpoints=[{"line": module_line}], source={"path": str(module)}, sourceModified=False)
        self.ok("configurationDone")
        return str(source)

    def spare_pid(self) -> int:
        """The spare worker's pid, from `%forkreload status`."""
        deadline = time.monotonic() + 30
        while True:
            msg_id, _ = self.run("%forkreload status")
            line = next(ln for ln in self.text(msg_id).splitlines() if ln.strip().startswith("worker"))
            spare = line.split("spare ")[1].split()[0].rstrip(",")
            if spare.isdigit():
                return int(spare)
            assert time.monotonic() < deadline, line
            time.sleep(0.2)

    def variables(self) -> set[str]:
        """What the variables panel shows while nothing is stopped."""
        return {v["name"] for v in self.ok("inspectVariables")["body"]["variables"]}


@contextmanager
def front(cwd: Path, env: dict[str, str] | None = None, name: str = "forkreload") -> Iterator[Front]:
    """A forkreload kernel from the installed kernelspec and its front end;
    shut down as a front end does (the controller removes its files)."""
    km = KernelManager(kernel_name=name)
    km.start_kernel(cwd=str(cwd), env={**os.environ, **(env or {})})
    kc = km.client()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        fe = Front(kc)
        fe.km = km
        yield fe
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def run_to_stops(fe: Front, code: str, stops: int, continued: bool = True) -> tuple[str, list[tuple[dict[str, Any], dict[str, str]]]]:
    """Run `code`, continuing at each of `stops` breakpoints; where each was.
    With `continued`, each continue is followed by debugpy's event."""
    msg_id, start = fe.execute(code)
    since = start
    seen = []
    for _ in range(stops):
        since, stop = fe.stopped(since)
        seen.append(fe.top(stop))
        fe.ok("continue", threadId=stop["body"]["threadId"])
        # ipykernel forgets the stopped threads when debugpy says so, a moment later.
        if continued:
            since = fe.wait(lambda m: m["msg_type"] == "debug_event" and m["content"].get("event") == "continued", since) + 1
    reply = fe.finish(msg_id, start)
    assert reply["status"] == "ok", (reply, fe.text(msg_id))
    return msg_id, seen


def run_through(fe: Front, code: str) -> tuple[dict[str, Any], list[str]]:
    """Run `code`, continuing at every stop; its reply and the stops' reasons."""
    msg_id, start = fe.execute(code)
    reasons = []
    since = start
    while True:
        i = fe.wait(lambda m: (m["msg_type"] == "debug_event" and m["content"].get("event") == "stopped")
                    or (m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"), since)
        since = i + 1
        if fe.iopub[i]["msg_type"] == "status":
            return fe.finish(msg_id, start), reasons
        stop = fe.iopub[i]["content"]["body"]
        reasons.append(stop["reason"])
        fe.ok("continue", threadId=stop["threadId"])


def assert_gone(cells_prefix: str) -> None:
    """The cells' directory went with the controller's private directory."""
    private = os.path.dirname(cells_prefix.rstrip(os.sep))
    assert not os.path.exists(private), os.listdir(private)


# -- the kernelspec ------------------------------------------------------------------


def test_kernelspec_shows_the_debugger(kernelspec_prefix: Path) -> None:
    spec = json.loads((kernelspec_prefix / "share/jupyter/kernels/forkreload/kernel.json").read_text())
    # debugpy is importable here, as in ipykernel's own kernelspec.
    assert kernelspec.has_debugger()
    assert spec["metadata"]["debugger"] is True
    assert kernelspec.make_spec(provisioner=True)["metadata"]["debugger"] is True


# -- a session, a swap ---------------------------------------------------------------


def test_breakpoints_in_a_cell_and_a_module_survive_a_swap(project: Any, kernelspec_prefix: Path) -> None:
    mod = project.write("mod.py", MODULE)
    with front(project.root) as fe:
        info = fe.kc.kernel_info(reply=True, timeout=30)["content"]
        # ipykernel 7 says it in supported_features (6 said "debugger": true): forwarded as it is.
        assert "debugger" in info.get("supported_features", []) or info.get("debugger") is True, info
        source = fe.start_debugger(mod, 2)
        debug_info = fe.ok("debugInfo")["body"]
        assert debug_info["isStarted"] and source.startswith(debug_info["tmpFilePrefix"])

        # The cell stops in f, then in the module's work(); locals shown.
        msg_id, seen = run_to_stops(fe, CELL, 2)
        (frame, local), (frame2, local2) = seen
        assert (frame["name"], frame["line"], frame["source"]["path"]) == ("f", 2, source)
        assert local["a"] == "2" and local["b"] == "3"
        assert (frame2["name"], frame2["line"], frame2["source"]["path"]) == ("work", 2, str(mod))
        assert local2["n"] == "5"
        # Only the user's frames, as with ipykernel (the kernel's, forkreload's
        # and the snapshot's `python -c` frame are hidden).
        assert fe.stacks[-2:] == [[("f", source, 2), ("<module>", source, 6)], [("work", str(mod), 2), ("<module>", source, 6)]]
        old_pid = int(fe.result(msg_id))
        assert {"v", "mod", "os"} <= fe.variables()
        # The spare was given the session ahead: its debugpy is connected to
        # its adapter before the swap (a kernel's only tcp socket otherwise
        # is the one its debugger listens on), and the replay then only sets
        # the breakpoints.
        spare = psutil.Process(fe.spare_pid())
        deadline = time.monotonic() + 30
        while not any(c.status == psutil.CONN_ESTABLISHED for c in spare.net_connections(kind="tcp")):
            assert time.monotonic() < deadline, "the spare's debugger did not start ahead"
            time.sleep(0.1)

        # A changed class field needs a fresh worker: the session follows it.
        project.write("mod.py", MODULE + "    y = 2\n")
        msg_id, seen = run_to_stops(fe, "w = mod.work(v)\nimport os\nos.getpid()", 1)
        assert "fresh worker" in fe.text(msg_id), fe.text(msg_id)
        assert int(fe.result(msg_id)) != old_pid
        (frame, local), = seen
        assert (frame["name"], frame["line"], frame["source"]["path"]) == ("work", 2, str(mod))
        assert local["n"] == "10"

        # The cell's breakpoint too: the same code is the same file in every worker.
        _msg_id, seen = run_to_stops(fe, CELL, 2)
        assert [(f["source"]["path"], f["line"]) for f, _ in seen] == [(source, 2), (str(mod), 2)]

        # The variables panel: the migrated values, from the new worker.
        assert {"v", "w", "mod", "os"} <= fe.variables()
        rich = fe.ok("richInspectVariables", variableName="w")["body"]
        assert rich["data"]["text/plain"] == "20"
        after = fe.ok("debugInfo")["body"]
        assert after["isStarted"] and after["tmpFilePrefix"] == debug_info["tmpFilePrefix"]
        assert {b["source"] for b in after["breakpoints"]} == {source, str(mod)}
        assert all(path != "<string>" for stack in fe.stacks for _name, path, _line in stack), fe.stacks
        fe.ok("disconnect", restart=False, terminateDebuggee=True)
    assert_gone(debug_info["tmpFilePrefix"])


def test_session_follows_fresh_back_and_a_crash(project: Any, kernelspec_prefix: Path) -> None:
    mod = project.write("mod.py", MODULE)
    # No checkpoints: the crash below gives a fresh worker (a restored one is
    # tested in test_a_crash_restores_a_checkpoint_from_before_the_debugger).
    with front(project.root, env={"FORKRELOAD_CHECKPOINTS": "off"}) as fe:
        fe.run("import mod")
        fe.start_debugger(mod, 2)
        call = "r = mod.work(4)\nimport os\nos.getpid()"
        msg_id, seen = run_to_stops(fe, call, 1)
        first = int(fe.result(msg_id))

        # %forkreload fresh: a new worker before the cell runs.
        msg_id, _ = fe.run("%forkreload fresh")
        assert "fresh worker" in fe.text(msg_id), fe.text(msg_id)
        msg_id, seen = run_to_stops(fe, call, 1)
        second = int(fe.result(msg_id))
        assert second != first and seen[0][1]["n"] == "4"

        # Back to the first worker: it left the session at the swap and is
        # given it again (a breakpoint set meanwhile included).
        fe.ok("setBreakpoints", breakpoints=[{"line": 2}, {"line": 3}], source={"path": str(mod)}, sourceModified=False)
        msg_id, _ = fe.run("%forkreload back")
        assert "back to the previous worker" in fe.text(msg_id)
        msg_id, seen = run_to_stops(fe, call, 2)
        assert int(fe.result(msg_id)) == first
        assert [f["line"] for f, _ in seen] == [2, 3] and seen[1][1]["total"] == "8"

        # The worker dies: the fresh one takes the session too.
        msg_id, since = fe.execute("import os\nos.kill(os.getpid(), 9)")
        fe.finish(msg_id, since)
        msg_id, seen = run_to_stops(fe, "import mod\n" + call, 2)
        assert int(fe.result(msg_id)) not in (first, second)
        assert "fresh worker" in fe.text(msg_id), fe.text(msg_id)
        info = fe.ok("debugInfo")["body"]
        assert info["isStarted"]

        # Pausing on exceptions follows too.
        fe.ok("setExceptionBreakpoints", filters=["raised"])
        reply, reasons = run_through(fe, "raise ValueError('first')")
        assert reply["status"] == "error" and reasons and set(reasons) == {"exception"}
        fe.run("%forkreload fresh")
        reply, reasons = run_through(fe, "raise ValueError('second')")
        assert reply["status"] == "error" and reasons and set(reasons) == {"exception"}
    assert_gone(info["tmpFilePrefix"])


def test_a_crash_restores_a_checkpoint_from_before_the_debugger(project: Any, kernelspec_prefix: Path) -> None:
    # A worker whose debugpy is on takes no checkpoint (a copy of it could not
    # be debugged again); the one taken before is restored after a crash, its
    # values go on to a fresh worker, and the debug session is replayed there.
    mod = project.write("mod.py", MODULE)
    with front(project.root) as fe:
        fe.run("import mod\nkept = 'yes'")
        time.sleep(0.5)  # the checkpoint after that cell
        fe.start_debugger(mod, 2)
        fe.run("later = 1")
        time.sleep(0.5)
        msg_id, since = fe.execute("import os\nos.kill(os.getpid(), 9)")
        fe.finish(msg_id, since)
        msg_id, seen = run_to_stops(fe, "r = mod.work(4)\nprint(kept, 'later' in dir())", 1)
        # Restored, then (debugpy cannot serve a restored copy) a fresh worker.
        assert "restored the state after cell 1" in fe.text(msg_id), fe.text(msg_id)
        assert "the debugger needs a fresh worker" in fe.text(msg_id), fe.text(msg_id)
        assert "yes False" in fe.text(msg_id), fe.text(msg_id)
        assert seen[0][1]["n"] == "4"


def test_turning_the_debugger_on_in_a_restored_worker(project: Any, kernelspec_prefix: Path) -> None:
    # After an undo, the worker is a checkpoint's copy: turning the debugger
    # on makes the next cell take a fresh worker, where it stops.
    mod = project.write("mod.py", MODULE)
    with front(project.root) as fe:
        fe.run("import mod\nkept = 'yes'")
        time.sleep(0.5)
        fe.run("kept = 'no'")
        time.sleep(0.5)
        msg_id, _ = fe.run("%forkreload undo")
        assert "undone" in fe.text(msg_id), fe.text(msg_id)
        fe.start_debugger(mod, 2)
        msg_id, seen = run_to_stops(fe, "r = mod.work(4)\nprint(kept)", 1)
        assert "the debugger needs a fresh worker" in fe.text(msg_id) and "yes" in fe.text(msg_id), fe.text(msg_id)
        assert seen[0][1]["n"] == "4"


def test_a_session_that_cannot_follow_ends_with_a_notice(project: Any, kernelspec_prefix: Path) -> None:
    # A module that starts debugpy itself (to attach an editor): imported in
    # the new worker before the session is replayed, it makes the new
    # worker's `initialize` fail, as it would in a fresh ipykernel.
    mod = project.write("mod.py", MODULE)
    project.write("remote.py", """\
        import debugpy

        try:
            debugpy.listen(("127.0.0.1", 0))
        except RuntimeError:  # already listening: the kernel's debugger
            pass
        """)
    with front(project.root) as fe:
        fe.start_debugger(mod, 2)
        fe.run("import mod, remote\nx = 1")
        # The spare was given the session ahead (its debugpy started before
        # it imports anything of the user's): the swap must fork another.
        spare = fe.spare_pid()
        os.kill(spare, signal.SIGKILL)
        psutil.Process(spare).wait(10) if psutil.pid_exists(spare) else None
        since = len(fe.iopub)
        msg_id, _ = fe.run("%forkreload fresh")
        i = fe.wait(lambda m: m["msg_type"] == "debug_event" and m["content"].get("event") == "terminated", since)
        assert fe.iopub[i]["parent_header"].get("msg_id") == msg_id
        lines = [line for line in fe.text(msg_id).splitlines() if "debugger" in line]
        assert len(lines) == 1 and "initialize failed" in lines[0] and "turn the debugger on again" in lines[0], fe.text(msg_id)
        # The session is over, the values are there.
        assert not fe.ok("debugInfo")["body"]["isStarted"]
        msg_id, _ = fe.run("x + mod.work(1)")
        assert fe.result(msg_id) == "3"
        assert not [m for m in fe.iopub[since:] if m["msg_type"] == "debug_event" and m["content"].get("event") == "stopped"]
        prefix = fe.ok("debugInfo")["body"]["tmpFilePrefix"]
    assert_gone(prefix)


def test_a_breakpoint_in_code_the_swap_runs(project: Any, kernelspec_prefix: Path) -> None:
    # The swap pickles the user's values: a breakpoint in a __getstate__
    # stops the old worker while the controller waits for it; the front end
    # steps through it, and the swap goes on.
    mod = project.write("box.py", """\
        class Box:
            def __init__(self, v):
                self.v = v

            def __getstate__(self):
                state = dict(self.__dict__)
                return state
        """)
    with front(project.root) as fe:
        fe.run("import box\nb = box.Box(3)")
        fe.ok("initialize", **INITIALIZE)
        fe.ok("attach")
        fe.ok("setBreakpoints", breakpoints=[{"line": 7}], source={"path": str(mod)}, sourceModified=False)
        fe.ok("configurationDone")
        # (debugpy's `continued` may come once the old worker is no longer current: not forwarded)
        msg_id, seen = run_to_stops(fe, "%forkreload fresh", 1, continued=False)
        (frame, local), = seen
        assert (frame["name"], frame["line"], frame["source"]["path"]) == ("__getstate__", 7, str(mod))
        assert local["state"] == "{'v': 3}"
        assert "fresh worker" in fe.text(msg_id), fe.text(msg_id)
        msg_id, _ = fe.run("b.v")
        assert fe.result(msg_id) == "3"
        prefix = fe.ok("debugInfo")["body"]["tmpFilePrefix"]
    assert_gone(prefix)


def test_a_front_end_restart_ends_the_session(project: Any, kernelspec_prefix: Path) -> None:
    # With forkreload's provisioner, "Restart kernel" is a clean worker: as a
    # restarted ipykernel, it has no debug session, and the front end starts one.
    kernels = kernelspec_prefix / "share/jupyter/kernels"
    spec = json.loads((kernels / "forkreload" / "kernel.json").read_text())
    spec["metadata"] = kernelspec.make_spec(provisioner=True)["metadata"]
    (kernels / "forkreload-debug-provisioned").mkdir(exist_ok=True)
    (kernels / "forkreload-debug-provisioned" / "kernel.json").write_text(json.dumps(spec))
    mod = project.write("mod.py", MODULE)
    with front(project.root, name="forkreload-debug-provisioned") as fe:
        source = fe.start_debugger(mod, 2)
        fe.km.restart_kernel()
        assert not fe.ok("debugInfo")["body"]["isStarted"]
        assert fe.start_debugger(mod, 2) == source
        _msg_id, seen = run_to_stops(fe, CELL, 2)
        assert [(f["source"]["path"], f["line"]) for f, _ in seen] == [(source, 2), (str(mod), 2)]
        prefix = fe.ok("debugInfo")["body"]["tmpFilePrefix"]
    assert_gone(prefix)
