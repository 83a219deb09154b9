"""The controller's routing, queueing and worker switching, with fake workers.

A real controller process (`Controller(..., pool_factory=FakePool)`, started
by fake_pool.py) serves a real `jupyter_client.BlockingKernelClient`; its
workers are fake_worker.py processes (tiny kernels, no snapshot, no fork).
One controller serves all the tests, a front end's clean restart between two,
so the module takes about 15 s on a busy 2-core machine. Each fake worker
marks what it sends with its worker id and pid (message metadata
`fake_worker`), so a test sees which worker ran a cell.

Six of these tests found bugs of the controller (input() in a new worker's
first cell, aborting behind a dead worker, blaming the fresh worker for the
old one's death, requests never answered, SIGTERM during an agent call, a
doubled reminder); they were fixed and the tests now guard them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
from forkreload import notices
from forkreload.protocol import (
    AGENT_REPLY,
    AGENT_REQUEST,
    CONTROL_REPLY,
    CONTROL_REQUEST,
    REPLY_METADATA_KEY,
    TAG_COMMAND,
    TAG_NOTICE,
)
from jupyter_client import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from jupyter_client.session import Session

from conftest import wait_no_processes

# One controller serves the module's tests (a clean restart between two);
# each test checks that it has only its current and spare workers, the
# module that nothing is left once it stops.
pytestmark = pytest.mark.shared_kernel

HERE = Path(__file__).resolve().parent
TIMEOUT = 15.0


def still_running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `procs` still running (not gone, not a zombie)."""
    found = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


def workers_of(controller: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The controller's running children: its fake workers."""
    try:
        return still_running(psutil.Process(controller.pid).children())
    except psutil.Error:
        return []


@dataclass
class Cell:
    """One request as the front end saw it: its reply and the iopub messages it parented."""

    msg_id: str
    reply: dict[str, Any]
    iopub: list[dict[str, Any]] = field(default_factory=list)

    @property
    def content(self) -> dict[str, Any]:
        return self.reply["content"]

    @property
    def status(self) -> str:
        return self.content["status"]

    @property
    def worker(self) -> dict[str, Any] | None:
        """The fake worker that answered ({wid, pid}), None if the controller did."""
        return self.reply["metadata"].get("fake_worker")

    @property
    def wid(self) -> int | None:
        return self.worker["wid"] if self.worker else None

    @property
    def report(self) -> dict[str, Any] | None:
        return self.reply["metadata"].get(REPLY_METADATA_KEY)

    def streams(self, tag: str | None = None) -> list[str]:
        return [m["content"]["text"] for m in self.iopub
                if m["msg_type"] == "stream" and m["metadata"].get(REPLY_METADATA_KEY) == tag]

    @property
    def stdout(self) -> str:
        return "".join(self.streams())

    @property
    def notices(self) -> list[str]:
        return self.streams(TAG_NOTICE)

    def types(self) -> list[str]:
        return [m["msg_type"] for m in self.iopub]


class Front:
    """A front end: a BlockingKernelClient whose messages are sorted by parent."""

    def __init__(self, kc: BlockingKernelClient, project: Path, proc: subprocess.Popen[bytes], cwd: Path,
                 connection_file: str) -> None:
        self.kc = kc
        self.connection_file = connection_file
        self.project = project  # this test's files
        self.cwd = cwd  # the workers' directory
        self.proc = proc  # the controller
        self.replies: dict[str, dict[str, Any]] = {}
        self.all_replies: list[dict[str, Any]] = []
        self.iopub: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.idle: set[str] = set()
        self.stdin: list[dict[str, Any]] = []
        self.control: dict[str, dict[str, Any]] = {}
        self.channels = {
            kc.shell_channel.socket: kc.shell_channel,
            kc.iopub_channel.socket: kc.iopub_channel,
            kc.stdin_channel.socket: kc.stdin_channel,
            kc.control_channel.socket: kc.control_channel,
        }
        self.poller = zmq.Poller()
        for s in self.channels:
            self.poller.register(s, zmq.POLLIN)

    def pump(self, timeout: float) -> None:
        for sock, _ in self.poller.poll(int(timeout * 1000)):
            chan = self.channels[sock]
            while chan.msg_ready():
                msg = chan.get_msg(timeout=0)
                parent = msg["parent_header"].get("msg_id", "")
                if chan is self.kc.shell_channel:
                    self.replies[parent] = msg
                    self.all_replies.append(msg)
                elif chan is self.kc.iopub_channel:
                    self.iopub[parent].append(msg)
                    if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                        self.idle.add(parent)
                elif chan is self.kc.stdin_channel:
                    self.stdin.append(msg)
                else:
                    self.control[parent] = msg

    def wait(self, done: Callable[[], Any], timeout: float = TIMEOUT, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = done()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or done}")
            self.pump(0.05)

    # -- requests --------------------------------------------------------------

    def execute(self, code: str, **kw: Any) -> str:
        msg_id: str = self.kc.execute(code, **kw)
        return msg_id

    def cell(self, msg_id: str, timeout: float = TIMEOUT) -> Cell:
        self.wait(lambda: msg_id in self.replies and msg_id in self.idle, timeout, f"the reply to {msg_id}")
        return Cell(msg_id, self.replies[msg_id], self.iopub[msg_id])

    def run(self, code: str, **kw: Any) -> Cell:
        return self.cell(self.execute(code, **kw))

    def started(self, msg_id: str) -> dict[str, Any]:
        """Wait until a worker said busy for `msg_id`; the fake worker ({wid, pid})."""
        def busy() -> dict[str, Any] | None:
            for m in self.iopub[msg_id]:
                if m["msg_type"] == "status" and m["content"]["execution_state"] == "busy" and "fake_worker" in m["metadata"]:
                    found: dict[str, Any] = m["metadata"]["fake_worker"]
                    return found
            return None
        found: dict[str, Any] = self.wait(busy, what=f"{msg_id} to start")
        return found

    def next_wid(self) -> int:
        """The worker id the controller gives the next worker it starts."""
        wids = [int(p.cmdline()[-3]) for p in workers_of(self.proc)]
        return max(wids) + 1

    def send_raw(self, frames: list[bytes]) -> None:
        self.kc.shell_channel.socket.send_multipart(frames)

    def execute_msg(self, code: str, session: Session | None = None) -> dict[str, Any]:
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": True}
        msg: dict[str, Any] = (session or self.kc.session).msg("execute_request", content)
        return msg

    def interrupt(self) -> str:
        msg = self.kc.session.msg("interrupt_request", {})
        self.kc.control_channel.send(msg)
        msg_id: str = msg["header"]["msg_id"]
        return msg_id

    def unparented_text(self) -> str:
        return "".join(m["content"].get("text", "") for m in self.iopub[""] if m["msg_type"] == "stream")


class Controller:
    """A controller process of fake workers and a client connected to it."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.cwd = root / "cwd"  # the workers' directory
        self.cwd.mkdir()
        self.connection_file = cf = str(root / "kernel.json")
        write_connection_file(cf, transport="ipc", ip=str(root / "k"), key=uuid.uuid4().hex.encode())
        settings = root / "settings.json"
        settings.write_text(json.dumps({"cwd": str(self.cwd), "project_root": str(self.cwd), "mode": "auto",
                                        "quiet": False, "learn": False}))
        self.log = root / "controller.log"
        # Provisioned: a front end's restart is a clean worker, which is how
        # one controller serves test after test.
        env = {**os.environ, "FORKRELOAD_LOG": str(self.log), "FORKRELOAD_PROVISIONED": "1"}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "fake_pool.py"), cf, str(settings)], env=env)
        self.kc = BlockingKernelClient(connection_file=cf)
        self.kc.load_connection_file()
        self.kc.start_channels(hb=False)
        self.fresh = True
        self.privdir: str | None = None
        try:
            self.kc.wait_for_ready(timeout=TIMEOUT)
            # The controller's private directory (its workers' first argument),
            # removed by stop() if the controller could not (a test killed it).
            self.privdir = workers_of(self.proc)[0].cmdline()[-4]
        except BaseException:
            self.stop()
            raise

    def front(self, project: Path, clean: bool = True) -> Front:
        """A front end for one test: a clean worker (no previous one: a front
        end's restart), or the worker as the last test left it (`clean`
        False); a spare, nothing queued, only the controller's own workers alive."""
        for chan in (self.kc.shell_channel, self.kc.iopub_channel, self.kc.stdin_channel, self.kc.control_channel):
            while chan.msg_ready():
                chan.get_msg(timeout=0)
        for marker in [*self.cwd.glob("load-started-*"), *self.cwd.glob("fake-worker-*.json")]:
            marker.unlink()
        front = Front(self.kc, project, self.proc, self.cwd, self.connection_file)
        if clean and not self.fresh:
            msg = self.kc.session.msg("shutdown_request", {"restart": True})
            self.kc.control_channel.send(msg)
            front.wait(lambda: msg["header"]["msg_id"] in front.control, what="a clean restart")
        # A cell, after which the spare is forked (not at start: it would
        # compete with the first worker's start and first cell).
        front.run("pass")
        self.fresh = False
        def workers() -> list[psutil.Process]:
            return workers_of(self.proc)

        # The current worker and the spare (and the previous one), nothing else.
        expected = (2,) if clean else (2, 3)
        left = wait_no_processes(5.0, lambda: workers() if len(workers()) not in expected else [])
        assert not left, f"the controller's workers should be a current, a spare (and a previous) one: {[p.pid for p in workers()]}"
        return Front(self.kc, project, self.proc, self.cwd, self.connection_file)

    def stop(self) -> None:
        self.kc.stop_channels()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.privdir is not None:
            shutil.rmtree(self.privdir, ignore_errors=True)


class Shared:
    """The module's controller, started again when a test broke or ended it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.controller: Controller | None = None
        self.started = 0

    def get(self) -> Controller:
        if self.controller is not None and self.controller.proc.poll() is not None:
            self.drop()  # a test ended it
        if self.controller is None:
            self.started += 1
            self.controller = Controller(self.root / f"controller-{self.started}")
        return self.controller

    def drop(self, show_log: bool = False) -> None:
        c, self.controller = self.controller, None
        if c is not None:
            c.stop()
            if show_log and c.log.exists():
                print("controller log:\n" + c.log.read_text())


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One controller for the module's tests; nothing may be left running once it stops."""
    held = Shared(tmp_path_factory.mktemp("controllers"))
    yield held
    held.drop()
    assert wait_no_processes() == [], "a process of a fake controller was left running"


def _front(shared: Shared, tmp_path: Path, request: pytest.FixtureRequest, clean: bool) -> Iterator[Front]:
    try:
        f = shared.get().front(tmp_path, clean)
    except AssertionError:
        shared.drop(show_log=True)  # stuck: the next test starts another
        raise
    failed = request.session.testsfailed
    yield f
    if request.session.testsfailed != failed:
        shared.drop(show_log=True)


@pytest.fixture
def front(shared: Shared, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Front]:
    """The shared controller with a clean worker, and a front end on it; a
    test that fails takes the controller down with it (its log is shown)."""
    yield from _front(shared, tmp_path, request, clean=True)


@pytest.fixture
def any_front(shared: Shared, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Front]:
    """The same, with the worker as the last test left it (no restart, so no
    wait for a new spare): for tests that do not depend on its state."""
    yield from _front(shared, tmp_path, request, clean=False)


def watched(front: Front, name: str = "shapes", source: str = "X = 1\n") -> Path:
    """A user module the current worker announces (MODULES_EVENT): the controller watches it."""
    path = front.project / f"{name}.py"
    path.write_text(source)
    cell = front.run(f"announce({name!r}, {str(path)!r})")
    assert cell.status == "ok", cell.content
    return path


# -- one cell at a time ----------------------------------------------------------------


def test_cells_sent_together_run_one_at_a_time_in_order(any_front: Front) -> None:
    front = any_front
    ids = [front.execute("sleep(0.3); print('a')"), front.execute("print('b')"), front.execute("print('c')")]
    cells = [front.cell(i) for i in ids]
    assert [c.status for c in cells] == ["ok"] * 3
    assert [c.stdout for c in cells] == ["a\n", "b\n", "c\n"]
    first = cells[0].content["execution_count"]
    assert [c.content["execution_count"] for c in cells] == [first, first + 1, first + 2]
    assert len({c.wid for c in cells}) == 1
    # The controller held b and c until the cell before was answered: none
    # was waiting at the worker when the cell before it ended.
    assert [c.reply["metadata"]["shell_queued"] for c in cells] == [False] * 3
    for before, after in zip(cells, cells[1:], strict=False):
        assert after.reply["metadata"]["started"] >= before.reply["metadata"]["ended"]
    for c in cells:
        states = [m["content"]["execution_state"] for m in c.iopub if m["msg_type"] == "status"]
        assert states == ["busy", "idle"] and "execute_input" in c.types()


def test_a_failing_cell_aborts_the_cells_queued_behind_it(any_front: Front) -> None:
    front = any_front
    ids = [front.execute("sleep(0.3); raise ValueError('boom')"), front.execute("print('b')"), front.execute("print('c')")]
    failed, *aborted = [front.cell(i) for i in ids]
    assert failed.status == "error" and failed.content["ename"] == "ValueError"
    assert [c.status for c in aborted] == ["aborted", "aborted"]
    assert [c.stdout for c in aborted] == ["", ""]
    after = front.run("print('d')")
    assert (after.status, after.stdout) == ("ok", "d\n")
    assert after.content["execution_count"] == failed.content["execution_count"] + 1


def test_stop_on_error_false_does_not_abort(any_front: Front) -> None:
    front = any_front
    ids = [front.execute("sleep(0.3); raise ValueError('boom')", stop_on_error=False), front.execute("print('b')")]
    failed, behind = [front.cell(i) for i in ids]
    assert failed.status == "error"
    assert (behind.status, behind.stdout) == ("ok", "b\n")


def test_input_request_reaches_the_front_end_and_its_answer_the_worker(front: Front) -> None:
    # ask() waits (up to 2 s) for the controller's stdin socket to be
    # connected: that it may not be yet is the next test's bug.
    msg_id = front.execute("print('got', ask('name? '))", allow_stdin=True)
    req = front.wait(lambda: front.stdin, what="input_request")[0]
    assert req["msg_type"] == "input_request" and req["content"]["prompt"] == "name? "
    front.kc.input("ann")
    cell = front.cell(msg_id)
    assert (cell.status, cell.stdout) == ("ok", "got ann\n")


def test_input_in_the_first_cell_of_a_new_worker(front: Front) -> None:
    # The next worker to start binds its stdin socket 1.5 s after its iopub welcome.
    (front.cwd / f"fake-worker-{front.next_wid()}.json").write_text(json.dumps({"stdin_bind_delay": 1.5}))
    front.run("%forkreload fresh")  # takes the spare; the new spare is the late one
    front.run("command('fresh')")  # the next cell runs in it, as soon as it is ready
    msg_id = front.execute("print('got', ask('name? ', wait=0))", allow_stdin=True)
    front.wait(lambda: front.stdin or msg_id in front.replies, what="input_request")
    if front.stdin:
        front.kc.input("ann")
    cell = front.cell(msg_id)
    assert (cell.status, cell.stdout) == ("ok", "got ann\n"), cell.content


# -- edits and swaps -------------------------------------------------------------------


def test_an_edit_before_a_held_cell_swaps_to_a_fresh_worker(front: Front) -> None:
    mod = watched(front)
    first = front.run("kept = 41")
    running = front.execute("sleep(0.4)")
    held = front.execute("print(WID, kept + 1)")
    front.started(running)
    mod.write_text("X = 2\n")  # while the held cell waits
    ran, swapped = front.cell(running), front.cell(held)
    assert ran.wid == first.wid
    assert swapped.status == "ok"
    assert swapped.wid != first.wid
    assert swapped.stdout == f"{swapped.wid} 42\n"  # the value migrated
    assert swapped.content["execution_count"] == ran.content["execution_count"] + 1
    [notice] = swapped.notices
    assert notice.startswith("forkreload: fresh worker: fake worker: fresh") and "migrated 1" in notice
    report = swapped.report
    assert report is not None
    assert (report["mode"], report["ok"], report["modules"], report["migrated"]) == ("fresh", True, ["shapes"], ["kept"])
    assert report["reasons"] == ["fake worker: fresh by default"] and report["previous"] is True
    assert report["files"] == [str(mod)]
    # The new worker watches the file as it is now: no second swap.
    again = front.run("print(WID)")
    assert again.wid == swapped.wid and again.notices == [] and again.report is None


def test_an_edit_patched_in_place_keeps_the_worker(front: Front) -> None:
    mod = watched(front)
    first = front.run("reload_answer('inplace', patched=['shapes.area'])")
    mod.write_text("X = 1\ndef area(): pass\n")
    cell = front.run("print(WID)")
    assert cell.wid == first.wid
    [notice] = cell.notices
    assert notice.startswith("forkreload: patched shapes.area in place")
    assert cell.report is not None and (cell.report["mode"], cell.report["ok"], cell.report["patched"]) == ("inplace", True, ["shapes.area"])
    again = front.run("print(WID)")
    assert again.notices == [] and again.report is None


def test_an_edit_that_cannot_be_applied_keeps_the_old_code_and_says_so_each_cell(front: Front) -> None:
    mod = watched(front)
    first = front.run("reload_answer('error', reasons=['shapes.py, line 1: invalid syntax'])")
    mod.write_text("X = (\n")
    cell = front.run("print(WID)")
    assert cell.wid == first.wid and cell.status == "ok"
    assert cell.notices == [notices.kept_old_code(["shapes.py, line 1: invalid syntax"]) + "\n"]
    assert cell.report is not None and (cell.report["mode"], cell.report["ok"]) == ("none", False)
    later = front.run("print(WID)")
    assert later.wid == first.wid
    [reminder] = later.notices
    assert reminder.startswith("forkreload: still running the old code of shapes.py")


def test_a_failed_swap_leaves_the_old_worker_current(front: Front) -> None:
    mod = watched(front)
    first = front.run("next_load(ok=False, module='shapes', error='ImportError: boom')")
    mod.write_text("X = 2\n")
    cell = front.run("print(WID)")
    assert cell.wid == first.wid and cell.stdout == f"{first.wid}\n"
    assert any(n.startswith("forkreload: kept the old code: shapes failed to import") for n in cell.notices)
    assert cell.report is not None
    assert (cell.report["ok"], cell.report["failed_module"], cell.report["error"]) == (False, "shapes", "ImportError: boom")


@pytest.mark.parametrize("how", ["command event", "upfront magic"])
def test_back_returns_to_the_previous_worker(front: Front, how: str) -> None:
    mod = watched(front)
    first = front.run("x = 'old'")
    mod.write_text("X = 2\n")
    swapped = front.run("x = 'new'")
    assert swapped.wid != first.wid
    if how == "command event":
        asked = front.run("command('back')")  # what the agent publishes for %forkreload back
        assert asked.wid == swapped.wid
        assert asked.streams(TAG_COMMAND) == [notices.command_text("back", "") + "\n"]
        back = front.run("print(WID, x)")
    else:
        back = front.run("%forkreload back")  # acted on before the cell runs
    assert back.wid == first.wid
    assert back.notices[0] == notices.back_text(first.worker["pid"], ["shapes.py"]) + "\n"  # type: ignore[index]
    if how == "command event":
        assert back.stdout == f"{first.wid} old\n"
    later = front.run("print(WID, x)")
    assert later.stdout == f"{first.wid} old\n"
    [reminder] = later.notices
    assert reminder.startswith("forkreload: still running the old code of shapes.py (went back with %forkreload back)")


def test_the_cell_that_goes_back_says_once_that_it_runs_old_code(front: Front) -> None:
    mod = watched(front)
    first = front.run("x = 'old'")
    mod.write_text("X = 2\n")
    front.run("x = 'new'")
    back = front.run("%forkreload back")
    assert back.wid == first.wid
    assert back.notices == [notices.back_text(first.worker["pid"], ["shapes.py"]) + "\n"]  # type: ignore[index]


def test_comms_are_closed_on_a_switch_with_a_notice(front: Front) -> None:
    first = front.run("comm_open('w1'); comm_open('w2'); comm_close('w2')")
    # A comm the front end opens is tracked too.
    front.kc.session.send(front.kc.shell_channel.socket, "comm_open", {"comm_id": "fe1", "target_name": "t", "data": {}})
    cell = front.run("%forkreload fresh")
    assert cell.wid != first.wid
    closed = sorted(m["content"]["comm_id"] for m in cell.iopub if m["msg_type"] == "comm_close")
    assert closed == ["fe1", "w1"]
    assert notices.comms_closed(2) + "\n" in cell.notices
    assert any(n.startswith("forkreload: fresh worker: restart requested") for n in cell.notices)


# -- crashes and interrupts ---------------------------------------------------------------


def test_a_killed_worker_answers_its_cell_and_the_next_cell_runs_in_a_new_one(front: Front) -> None:
    front.run("x = 1")
    running = front.execute("sleep(30)")
    victim = front.started(running)
    os.kill(victim["pid"], signal.SIGKILL)
    died = front.cell(running)
    assert died.status == "error" and died.content["ename"] == "WorkerDied"
    why = notices.crash_reason("was killed by SIGKILL")
    assert died.content["evalue"] == why
    assert [m["content"]["ename"] for m in died.iopub if m["msg_type"] == "error"] == ["WorkerDied"]
    after = front.run("print(WID)")
    assert after.status == "ok" and after.worker is not None and after.worker["pid"] != victim["pid"]
    assert after.notices == [notices.crash_text(why) + "\n"]
    assert after.report is not None and (after.report["mode"], after.report["lost"]) == ("fresh", {"*": why})


@pytest.mark.parametrize("how", ["interrupt_request", "SIGINT"])
def test_an_interrupt_reaches_the_running_cell(any_front: Front, how: str) -> None:
    front = any_front
    running = front.execute("sleep(30)")
    worker = front.started(running)
    if how == "SIGINT":
        os.kill(front.proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the controller
    else:
        interrupt = front.interrupt()
    cell = front.cell(running, timeout=5)
    assert cell.status == "error" and cell.content["ename"] == "KeyboardInterrupt"
    if how != "SIGINT":
        assert front.wait(lambda: front.control.get(interrupt))["content"]["status"] == "ok"
    after = front.run("print(PID)")
    assert after.stdout == f"{worker['pid']}\n"


@pytest.mark.parametrize("how", ["interrupt_request", "SIGINT"])
def test_an_interrupt_reaches_the_worker_during_an_agent_call(front: Front, how: str) -> None:
    mod = watched(front)
    first = front.run("next_load(sleep=30)")  # the fresh worker's load will hang
    mod.write_text("X = 2\n")
    t0 = time.monotonic()
    msg_id = front.execute("print(WID)")
    front.wait(lambda: list(front.cwd.glob("load-started-*")), what="the fresh worker's load to start")
    if how == "SIGINT":
        os.kill(front.proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the controller
    else:
        front.interrupt()
    cell = front.cell(msg_id, timeout=10)
    assert time.monotonic() - t0 < 10
    # The load was interrupted: the swap failed, the old worker ran the cell.
    assert cell.wid == first.wid and cell.status == "ok"
    assert cell.report is not None and cell.report["ok"] is False
    assert "KeyboardInterrupt" in (cell.report["error"] or "")
    assert any(n.startswith("forkreload: kept the old worker: the fresh worker failed") for n in cell.notices)


# -- what the controller refuses ------------------------------------------------------------
# The controller reads a front end's shell messages in order and holds cells in
# order: had it let a refused message through, its reply would come before the
# reply of the cell sent after it.


def test_a_forged_message_is_dropped(any_front: Front) -> None:
    front = any_front
    forged = front.execute_msg("print('forged')", Session(key=b"not-the-key"))
    Session(key=b"not-the-key").send(front.kc.shell_channel.socket, forged)
    after = front.run("print('after')")
    assert after.stdout == "after\n"
    assert forged["header"]["msg_id"] not in front.replies
    assert not front.iopub[forged["header"]["msg_id"]]
    assert "dropped" not in front.unparented_text()  # it never reached the worker either


def test_a_replayed_message_is_dropped(any_front: Front) -> None:
    front = any_front
    msg = front.execute_msg("print('once')")
    frames = front.kc.session.serialize(msg)
    front.send_raw(frames)
    front.send_raw(frames)
    after = front.run("print('after')")
    assert after.stdout == "after\n"
    assert [r["content"]["status"] for r in front.all_replies if r["parent_header"]["msg_id"] == msg["header"]["msg_id"]] == ["ok"]
    assert front.cell(msg["header"]["msg_id"]).stdout == "once\n"


def test_a_front_ends_agent_request_is_dropped(any_front: Front) -> None:
    front = any_front
    stolen = front.project / "stolen.json"
    front.kc.session.send(front.kc.shell_channel.socket, AGENT_REQUEST, {"method": "export", "args": [str(stolen)]})
    after = front.run("print('after')")
    assert after.stdout == "after\n"
    assert not stolen.exists()
    assert not [r for r in front.all_replies if r["msg_type"] == AGENT_REPLY]


def test_agent_traffic_never_reaches_the_front_end(front: Front) -> None:
    mod = watched(front)
    mod.write_text("X = 2\n")
    cell = front.run("print(WID)")  # a reload, an export and a load ran before it
    assert cell.report is not None and cell.report["mode"] == "fresh"
    seen = [m["msg_type"] for msgs in front.iopub.values() for m in msgs] + [r["msg_type"] for r in front.all_replies]
    assert not [t for t in seen if t.startswith("forkreload_")]
    assert set(front.replies) <= set(front.iopub)  # every reply's parent is a request of ours


# -- workers dying during a swap ------------------------------------------------------------


def test_the_fresh_worker_dying_during_its_load_keeps_the_old_worker(front: Front) -> None:
    mod = watched(front)
    first = front.run("kept = 1; next_load(exit=3)")
    mod.write_text("X = 2\n")
    cell = front.run("print(WID, kept)")
    assert cell.stdout == f"{first.wid} 1\n"
    assert cell.report is not None and cell.report["ok"] is False and cell.report["mode"] == "fresh"
    assert any(n.startswith("forkreload: kept the old worker: the fresh worker failed") for n in cell.notices)
    later = front.run("print(WID)")
    assert later.wid == first.wid
    assert [n for n in later.notices if "still running the old code of shapes.py" in n]


def test_the_old_worker_dying_during_export_is_not_blamed_on_the_fresh_worker(front: Front) -> None:
    mod = watched(front)
    first = front.run("on_call('export', exit=3)")
    mod.write_text("X = 2\n")
    cell = front.run("print(WID)")
    said = " ".join([*cell.notices, str(cell.content.get("evalue", ""))])
    assert "exited with status 3" in said
    later = front.run("print(WID)")
    assert later.status == "ok" and later.wid != first.wid
    assert not [n for n in cell.notices if "the fresh worker failed" in n], cell.notices


def test_a_worker_dying_aborts_the_cells_queued_behind_its_cell(front: Front) -> None:
    front.run("x = 1")
    running = front.execute("sleep(30)")
    behind = front.execute("print(x)")
    victim = front.started(running)
    os.kill(victim["pid"], signal.SIGKILL)
    died, queued = front.cell(running), front.cell(behind)
    assert died.content["ename"] == "WorkerDied"
    assert queued.status == "aborted", (queued.content, queued.stdout)


def test_a_dead_spare_is_replaced_when_a_swap_needs_it(front: Front) -> None:
    mod = watched(front)
    first = front.run("pass")
    spare = next(p for p in workers_of(front.proc) if p.pid != first.worker["pid"])  # type: ignore[index]
    spare.kill()
    spare.wait(5)
    mod.write_text("X = 2\n")
    cell = front.run("print(WID)")
    assert cell.report is not None and cell.report["ok"] is True
    assert cell.wid != first.wid and cell.worker["pid"] != spare.pid  # type: ignore[index]


def test_back_after_the_previous_worker_died_says_there_is_none(front: Front) -> None:
    mod = watched(front)
    first = front.run("pass")
    mod.write_text("X = 2\n")
    swapped = front.run("pass")
    assert swapped.wid != first.wid
    os.kill(first.worker["pid"], signal.SIGKILL)  # type: ignore[index]
    front.wait(lambda: first.worker["pid"] not in [p.pid for p in workers_of(front.proc)],  # type: ignore[index]
               what="the previous worker to die")
    cell = front.run("%forkreload back")
    assert cell.wid == swapped.wid
    assert cell.notices == [notices.back_text(None, []) + "\n"]


# -- what the controller answers itself -------------------------------------------------------


def test_control_requests_status_and_restart(front: Front) -> None:
    first = front.run("kept = 'v'")

    def control(cmd: str) -> dict[str, Any]:
        msg = front.kc.session.msg(CONTROL_REQUEST, {"cmd": cmd})
        front.kc.control_channel.send(msg)
        reply: dict[str, Any] = front.wait(lambda: front.control.get(msg["header"]["msg_id"]), what=cmd)
        assert reply["msg_type"] == CONTROL_REPLY
        return dict(reply["content"])

    status = control("status")
    assert status["status"] == "ok" and status["worker_pid"] == first.worker["pid"]  # type: ignore[index]
    assert status["spare_pid"] and status["previous_pid"] is None
    restarted = control("restart")
    assert restarted["status"] == "ok" and restarted["report"]["migrated"] == ["kept"]
    after = front.run("print(WID, kept)")
    assert after.wid != first.wid and after.stdout == f"{after.wid} v\n"
    assert control("status")["previous_pid"] == first.worker["pid"]  # type: ignore[index]
    assert control("bogus")["status"] == "error"


def test_a_control_request_during_an_agent_call_is_answered_after_it(front: Front) -> None:
    mod = watched(front)
    front.run("next_load(sleep=0.3)")
    mod.write_text("X = 2\n")
    msg_id = front.execute("print(WID)")
    front.wait(lambda: list(front.cwd.glob("load-started-*")), what="the fresh worker's load to start")
    status = front.kc.session.msg(CONTROL_REQUEST, {"cmd": "status"})
    front.kc.control_channel.send(status)
    cell = front.cell(msg_id)
    assert cell.report is not None and cell.report["ok"] is True
    reply = front.wait(lambda: front.control.get(status["header"]["msg_id"]), what="the status reply")
    # Answered once the swap was done: the new worker is current.
    assert reply["content"]["worker_pid"] == cell.worker["pid"]  # type: ignore[index]


def test_two_front_ends_get_their_own_replies_and_everyones_output(any_front: Front) -> None:
    front = any_front
    other_kc = BlockingKernelClient(connection_file=front.connection_file)
    other_kc.load_connection_file()
    other_kc.start_channels(hb=False)
    try:
        other_kc.wait_for_ready(timeout=TIMEOUT)
        while other_kc.iopub_channel.msg_ready():
            other_kc.iopub_channel.get_msg(timeout=0)
        mine = front.execute("sleep(0.2); print('mine')")
        theirs = other_kc.execute("print('theirs')")  # held behind mine
        reply = other_kc.get_shell_msg(timeout=TIMEOUT)
        while reply["parent_header"].get("msg_id") != theirs:  # its kernel_info replies come first
            reply = other_kc.get_shell_msg(timeout=TIMEOUT)
        assert reply["content"]["status"] == "ok"
        cell = front.cell(mine)
        assert cell.stdout == "mine\n"
        front.wait(lambda: theirs in front.idle, what="the other front end's cell on iopub")
        assert theirs not in front.replies  # its reply went to the other front end only
        assert Cell(theirs, reply, front.iopub[theirs]).stdout == "theirs\n"
    finally:
        other_kc.stop_channels()


def test_a_request_the_worker_never_answers_does_not_hold_cells_after_an_edit(front: Front) -> None:
    mod = watched(front)
    front.kc.session.send(front.kc.shell_channel.socket, "bogus_request", {})
    assert front.run("print(1)").stdout == "1\n"  # no edit pending: it runs
    mod.write_text("X = 2\n")
    cell = front.cell(front.execute("print(WID)"), timeout=1)
    assert cell.status == "ok"


def test_sigterm_during_an_agent_call_ends_the_controller(front: Front) -> None:
    mod = watched(front)
    front.run("next_load(sleep=30)")  # the fresh worker's load hangs
    mod.write_text("X = 2\n")
    front.execute("print(WID)")
    front.wait(lambda: list(front.cwd.glob("load-started-*")), what="the fresh worker's load to start")
    front.proc.send_signal(signal.SIGTERM)
    try:
        front.proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        front.proc.kill()  # its workers follow it (parent-death signal)
        front.proc.wait()
        raise AssertionError("the controller did not stop within 1 s of SIGTERM") from None


# -- cleanup ----------------------------------------------------------------------------------


def test_a_killed_controller_takes_its_workers_along(front: Front) -> None:
    mod = watched(front)
    mod.write_text("X = 2\n")
    front.run("print(WID)")  # a current, a previous and a spare worker now
    workers = workers_of(front.proc)
    assert len(workers) == 3
    front.proc.kill()
    front.proc.wait()
    assert wait_no_processes(5.0, lambda: still_running(workers)) == []


def test_a_front_ends_shutdown_ends_every_process(front: Front) -> None:
    mod = watched(front)
    mod.write_text("X = 2\n")
    front.run("print(WID)")  # a current, a previous and a spare worker now
    workers = workers_of(front.proc)
    msg = front.kc.session.msg("shutdown_request", {"restart": False})
    front.kc.control_channel.send(msg)
    assert front.wait(lambda: front.control.get(msg["header"]["msg_id"]))["content"]["status"] == "ok"
    assert front.proc.wait(timeout=10) == 0
    assert wait_no_processes(5.0, lambda: still_running(workers)) == []
