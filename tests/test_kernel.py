"""The installed `forkreload` kernelspec driven by jupyter_client, as a
notebook front end drives it: a fresh-worker swap seen from the protocol
(execution count, status sequence, notice, stdin), interrupts in both
interrupt modes, front-end restarts with and without the provisioner,
per-project settings, learned preloads, comms and rich output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from forkreload import kernelspec
from forkreload.protocol import CONTROL_REQUEST
from jupyter_client import KernelManager

KERNELS = "share/jupyter/kernels"


# -- helpers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def specs(kernelspec_prefix: Path) -> Path:
    """Variants of the installed (plain) kernelspec, written next to it:
    interrupt by message, forkreload's provisioner (as `kernel install
    --provisioner` writes it), --no-learn."""
    base = kernelspec_prefix / KERNELS
    spec = json.loads((base / "forkreload" / "kernel.json").read_text())

    def variant(name: str, **changes: Any) -> None:
        s = json.loads(json.dumps(spec))
        s.update(changes)
        (base / name).mkdir(exist_ok=True)
        (base / name / "kernel.json").write_text(json.dumps(s, indent=1))

    variant("forkreload-message", interrupt_mode="message", display_name="forkreload (message interrupts)")
    provisioned = kernelspec.make_spec(provisioner=True)["metadata"]
    assert "kernel_provisioner" not in spec["metadata"]
    variant("forkreload-provisioned", metadata=provisioned, display_name="forkreload (provisioner)")
    variant("forkreload-nolearn", argv=spec["argv"] + ["--no-learn"], display_name="forkreload (no learning)")
    return base


@contextmanager
def kernel(cwd: Path, name: str = "forkreload", env: dict[str, str] | None = None) -> Iterator[tuple[KernelManager, Any]]:
    """A running kernel with a connected blocking client; always shut down."""
    km = KernelManager(kernel_name=name)
    kw: dict[str, Any] = {"cwd": str(cwd)}
    if env is not None:
        kw["env"] = {**os.environ, **env}
    km.start_kernel(**kw)
    kc = km.client()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@dataclass
class Cell:
    """One execute_request: its reply and every iopub message it parented."""

    msg_id: str
    reply: dict[str, Any]
    iopub: list[dict[str, Any]] = field(default_factory=list)

    @property
    def content(self) -> dict[str, Any]:
        return self.reply["content"]

    def of(self, msg_type: str) -> list[dict[str, Any]]:
        return [m["content"] for m in self.iopub if m["msg_type"] == msg_type]

    def stream(self, name: str = "stdout", notices: bool = False) -> str:
        return "".join(
            m["content"]["text"]
            for m in self.iopub
            if m["msg_type"] == "stream"
            and m["content"]["name"] == name
            and m["metadata"].get("forkreload") != "progress"
            and notices == (m["metadata"].get("forkreload") == "notice")
        )

    @property
    def notice(self) -> str:
        return self.stream("stdout", notices=True) + self.stream("stderr", notices=True)

    @property
    def result(self) -> str | None:
        res = self.of("execute_result")
        return res[-1]["data"]["text/plain"] if res else None

    @property
    def statuses(self) -> list[str]:
        return [c["execution_state"] for c in self.of("status")]


def send(kc: Any, code: str, allow_stdin: bool = False) -> str:
    return kc.execute(code, allow_stdin=allow_stdin, stop_on_error=False)


def collect(kc: Any, msg_id: str, timeout: float = 30, settle: float = 0.0) -> Cell:
    """Wait for the reply and the idle of `msg_id`; with `settle`, keep
    listening that long after the idle for stray messages of that cell."""
    deadline = time.monotonic() + timeout
    reply = None
    while reply is None:
        m = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if m["parent_header"].get("msg_id") == msg_id:
            reply = m
    cell = Cell(msg_id, reply)
    idle = False
    until = deadline
    while True:
        left = until - time.monotonic()
        if left <= 0:
            break
        try:
            m = kc.get_iopub_msg(timeout=left)
        except Exception:  # queue.Empty
            if not idle:
                raise AssertionError(f"no idle for {msg_id}; got {[x['msg_type'] for x in cell.iopub]}") from None
            break
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        cell.iopub.append(m)
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle" and not idle:
            idle = True
            until = time.monotonic() + settle
            if settle == 0:
                break
    return cell


def run(kc: Any, code: str, timeout: float = 30, settle: float = 0.0) -> Cell:
    cell = collect(kc, send(kc, code), timeout=timeout, settle=settle)
    return cell


def ok(kc: Any, code: str, **kw: Any) -> Cell:
    cell = run(kc, code, **kw)
    assert cell.content["status"] == "ok", (cell.content.get("ename"), cell.content.get("evalue"), cell.iopub)
    return cell


def control_request(kc: Any, msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
    msg = kc.session.msg(msg_type, content)
    kc.control_channel.send(msg)
    deadline = time.monotonic() + 10
    while True:
        reply = kc.get_control_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
            return reply["content"]


# -- 1. the kernelspec's command line -------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forkreload", "kernel", *args], env=env, capture_output=True, text=True, timeout=60)


def test_kernelspec_install_list_uninstall(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    env = {**os.environ, "JUPYTER_PATH": str(prefix / "share" / "jupyter")}
    r = _cli("install", "--prefix", str(prefix), "--name", "fr-test", "--display-name", "FR Test", "--preload", "json", env=env)
    assert r.returncode == 0, r.stderr
    spec_dir = prefix / KERNELS / "fr-test"
    assert str(spec_dir) in r.stdout
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    # `python -c CODE`: the project directory off sys.path, then forkreload's main
    assert spec["argv"][1] == "-c" and "runpy.run_module('forkreload'" in spec["argv"][2]
    assert spec["argv"][3:6] == ["kernel", "-f", "{connection_file}"]
    assert spec["argv"][6:] == ["--preload", "json"]
    assert spec["metadata"]["forkreload"] == {"kernel": True}
    assert spec["display_name"] == "FR Test"
    assert spec["language"] == "python"
    assert spec["interrupt_mode"] == "signal"
    # No provisioner: every jupyter_client starts it, forkreload importable there or not.
    assert "kernel_provisioner" not in spec["metadata"]
    assert "relaunches the controller" in r.stdout and "--provisioner" in r.stdout

    r = _cli("list", env=env)
    assert r.returncode == 0, r.stderr
    listed = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines() if line.strip()}
    assert listed.get("fr-test") == str(spec_dir), r.stdout

    r = _cli("uninstall", "--name", "fr-test", env=env)
    assert r.returncode == 0, r.stderr
    assert not spec_dir.exists()
    assert "fr-test" not in _cli("list", env=env).stdout

    r = _cli("uninstall", "--name", "fr-test", env=env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "fr-test" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""


def test_kernelspec_with_provisioner_is_an_explicit_choice(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    env = {**os.environ, "JUPYTER_PATH": str(prefix / "share" / "jupyter"), "PATH": os.path.dirname(sys.executable)}
    r = _cli("install", "--prefix", str(prefix), "--name", "fr-fast", "--provisioner", env=env)
    assert r.returncode == 0, r.stderr
    spec = json.loads((prefix / KERNELS / "fr-fast" / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"] == {"provisioner_name": "forkreload-provisioner"}
    assert spec["metadata"]["forkreload"] == {"kernel": True}
    # The trade-off, in one line; this environment's Jupyter can load it: no warning.
    assert '"Restart kernel" is fast' in r.stdout and "drop it" in r.stdout, r.stdout
    assert "NOT SHOWN" not in r.stdout, r.stdout
    listed = {line.split()[0]: line for line in _cli("list", env=env).stdout.splitlines() if line.strip()}
    assert "provisioner" in listed["fr-fast"], listed


def test_kernelspec_uninstall_takes_the_name_as_argument(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    env = {**os.environ, "JUPYTER_PATH": str(prefix / "share" / "jupyter")}
    assert _cli("install", "--prefix", str(prefix), "--name", "fr-pos", env=env).returncode == 0
    r = _cli("uninstall", "fr-pos", env=env)  # as `jupyter kernelspec uninstall NAME`
    assert r.returncode == 0, r.stderr
    assert not (prefix / KERNELS / "fr-pos").exists()


# -- 2. a fresh-worker swap as the front end sees it ----------------------------------


def test_swap_keeps_count_values_and_one_idle(project, specs) -> None:
    project.write("m.py", "SCALE = 2\n\ndef scale(v):\n    return v * SCALE\n")
    with kernel(project.root) as (km, kc):
        c1 = ok(kc, "import os, m\nxs = [1, 2, 3]\nys = [m.scale(v) for v in xs]\nos.getpid()")
        c2 = ok(kc, "sum(ys)")
        assert c2.result == "12"
        old_pid = int(c1.result)
        assert [c1.content["execution_count"], c2.content["execution_count"]] == [1, 2]

        project.write("m.py", "SCALE = 10\n\ndef scale(v):\n    return v * SCALE\n")
        c3 = run(kc, "print(ys, [m.scale(v) for v in xs])\nos.getpid()", settle=0.5)
        assert c3.content["status"] == "ok", c3.content
        # values kept, code new, a new process
        assert c3.stream() == "[2, 4, 6] [10, 20, 30]\n"
        assert int(c3.result) != old_pid
        # the count continues, in the reply and on iopub
        assert c3.content["execution_count"] == 3
        assert [c["execution_count"] for c in c3.of("execute_input")] == [3]
        assert c3.of("execute_result")[0]["execution_count"] == 3
        # busy ... idle: busy first, exactly one idle, and it is the last message
        states = c3.statuses
        assert states[0] == "busy" and states.count("idle") == 1, states
        assert c3.iopub[0]["msg_type"] == "status" and c3.iopub[0]["content"]["execution_state"] == "busy"
        assert c3.iopub[-1]["msg_type"] == "status" and c3.iopub[-1]["content"]["execution_state"] == "idle"
        # the notice went to this cell (collect() keeps only this parent's
        # messages), before its idle and before the cell's own output
        kinds = [m["metadata"].get("forkreload") or m["msg_type"] for m in c3.iopub]
        assert kinds.count("notice") == 1, kinds
        assert kinds.index("notice") < kinds.index("execute_input")
        # while the worker was prepared: a status line, cleared before the notice
        assert kinds[:3] == ["status", "progress", "progress"], kinds
        assert [m["msg_type"] for m in c3.iopub[1:3]] == ["stream", "clear_output"]
        assert "preparing a fresh worker: m.py: module constant SCALE changed" in c3.iopub[1]["content"]["text"]
        assert c3.notice.startswith("forkreload: fresh worker") and "m.py" in c3.notice and "migrated 4" in c3.notice
        # the reply says what was done
        report = c3.reply["metadata"].get("forkreload")
        assert report and report["ok"] and report["modules"] == ["m"] and {"xs", "ys", "m", "os"} <= set(report["migrated"])

        # the next cell, no edit: no notice, no swap, the count goes on
        c4 = ok(kc, "os.getpid()")
        assert c4.result == c3.result and c4.notice == "" and c4.content["execution_count"] == 4
        assert kc.hb_channel.is_beating()
        history = kc.history(hist_access_type="tail", n=10, output=False, raw=True, reply=True, timeout=10)
        inputs = [h[2] for h in history["content"]["history"]]
        assert inputs[-4:] == [
            "import os, m\nxs = [1, 2, 3]\nys = [m.scale(v) for v in xs]\nos.getpid()",
            "sum(ys)",
            "print(ys, [m.scale(v) for v in xs])\nos.getpid()",
            "os.getpid()",
        ]


# -- 3. input() after a swap ----------------------------------------------------


def test_input_over_stdin_after_swap(project, specs) -> None:
    project.write("m.py", "GREETING = 'hello'\n")
    with kernel(project.root) as (km, kc):
        ok(kc, "import m; n = 3")
        project.write("m.py", "GREETING = 'bonjour'\n")
        msg_id = send(kc, "name = input('who? ')\nprint(m.GREETING, name * n)", allow_stdin=True)
        req = kc.get_stdin_msg(timeout=30)
        assert req["msg_type"] == "input_request"
        assert req["content"]["prompt"] == "who? "
        assert req["parent_header"]["msg_id"] == msg_id
        kc.input("ann")
        cell = collect(kc, msg_id)
        assert cell.content["status"] == "ok", cell.content
        assert "fresh worker" in cell.notice
        assert cell.stream() == "bonjour annannann\n"
        # and a second input() in the same worker, no edit in between
        msg_id = send(kc, "input('again? ')", allow_stdin=True)
        assert kc.get_stdin_msg(timeout=30)["content"]["prompt"] == "again? "
        kc.input("yes")
        assert collect(kc, msg_id).result == "'yes'"


# -- 4. interrupts, by signal and by message ------------------------------------------


@pytest.mark.parametrize("spec_name, mode", [("forkreload", "signal"), ("forkreload-message", "message")])
def test_interrupt_keeps_state(project, specs, spec_name: str, mode: str) -> None:
    project.write("m.py", "K = 1\n")
    with kernel(project.root, spec_name) as (km, kc):
        assert km.kernel_spec.interrupt_mode == mode
        ok(kc, "import m, os; kept = {'a': [1, 2]}")
        for round_ in range(2):
            if round_ == 1:
                # once more in a worker that replaced the first one
                project.write("m.py", "K = 2\n")
                assert "fresh worker" in ok(kc, "m.K").notice
            msg_id = send(kc, "while True: pass")
            # wait until the worker is in the loop
            while True:
                m = kc.get_iopub_msg(timeout=30)
                if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "execute_input":
                    break
            time.sleep(0.3)
            km.interrupt_kernel()
            cell = collect(kc, msg_id, timeout=20)
            assert cell.content["status"] == "error" and cell.content["ename"] == "KeyboardInterrupt", cell.content
            assert cell.statuses.count("idle") == 1
            after = ok(kc, "kept['a'], m.K")
            assert after.result == f"([1, 2], {round_ + 1})"


def _one_busy_one_idle(cell: Cell) -> None:
    states = cell.statuses
    assert states == ["busy", "idle"], states
    assert cell.iopub[0]["msg_type"] == "status" and cell.iopub[0]["content"]["execution_state"] == "busy"
    assert cell.iopub[-1]["msg_type"] == "status" and cell.iopub[-1]["content"]["execution_state"] == "idle"


def test_one_busy_and_one_idle_whatever_happens_before_the_cell(project, specs) -> None:
    # Protocol exactness: a cell that swaps, fails to swap, is reminded of
    # stale code, goes back, or crashes publishes one busy first and one idle last.
    project.write("m.py", "K = 1\n")
    with kernel(project.root) as (km, kc):
        _one_busy_one_idle(ok(kc, "import m, os; v = [1]"))
        time.sleep(0.3)  # a user's pause: the checkpoint after cell 1 is taken
        project.write("m.py", "K = 2\n")
        swapped = run(kc, "m.K", settle=0.3)
        assert "fresh worker" in swapped.notice and swapped.result == "2"
        _one_busy_one_idle(swapped)
        project.write("m.py", "K = (\n")
        failed = run(kc, "m.K", settle=0.3)
        assert "kept the old code" in failed.notice and failed.result == "2"
        _one_busy_one_idle(failed)
        reminded = run(kc, "m.K", settle=0.3)
        assert "still running the old code" in reminded.notice
        _one_busy_one_idle(reminded)
        project.write("m.py", "K = 3\n")
        _one_busy_one_idle(run(kc, "m.K", settle=0.3))
        back = run(kc, "%forkreload back", settle=0.3)
        assert "back to the previous worker" in back.notice
        _one_busy_one_idle(back)
        crashed = run(kc, "os.kill(os.getpid(), 9)", settle=0.3)
        assert crashed.content["status"] == "error" and crashed.content["ename"] == "WorkerDied"
        _one_busy_one_idle(crashed)
        after = run(kc, "1 + 1", settle=0.3)
        # The checkpoint after cell 1 comes back, then the edit since is applied.
        assert "restored the state after cell 1" in after.notice and "fresh worker" in after.notice
        _one_busy_one_idle(after)


# -- 5. front-end restarts --------------------------------------------------------


def test_front_end_restart_through_provisioner(project, specs) -> None:
    project.write("m.py", "K = 1\n")
    with kernel(project.root, "forkreload-provisioned") as (km, kc):
        assert km.provisioner.__class__.__name__ == "ForkreloadProvisioner"
        ok(kc, "import m, os; x = 42")
        ok(kc, "wpid = os.getpid()")
        old_worker = int(ok(kc, "wpid").result)
        controller = km.provisioner.process.pid
        times = []
        for _ in range(2):
            time.sleep(0.5)  # the spare is forked after each cell
            t0 = time.perf_counter()
            km.restart_kernel()
            t_restart = time.perf_counter() - t0
            cell = run(kc, "import os; ('x' in globals(), 'm' in globals(), os.getpid())")
            t_reply = time.perf_counter() - t0
            times.append((t_restart, t_reply))
            assert cell.content["status"] == "ok", cell.content
            assert cell.content["execution_count"] == 1
            gone_x, gone_m, pid = eval(cell.result)  # noqa: S307 - a tuple literal
            assert (gone_x, gone_m) == (False, False)
            assert pid != old_worker
            assert cell.notice == ""  # a clean restart is not a reload
            assert km.provisioner.process.pid == controller
            assert km.is_alive()
            old_worker = pid
            ok(kc, "x = 1")
        for t_restart, t_reply in times:
            print(f"\nfront-end restart (provisioner): restart_kernel() {t_restart * 1000:.0f} ms, first reply after {t_reply * 1000:.0f} ms")
        # An edit after the restart is still picked up: the watch starts over.
        ok(kc, "import m; y = m.K")
        project.write("m.py", "K = 5\n")
        cell = ok(kc, "(x, y, m.K)")
        assert cell.result == "(1, 1, 5)" and "fresh worker" in cell.notice


def test_front_end_restart_without_provisioner(project, specs) -> None:
    with kernel(project.root) as (km, kc):  # the default kernelspec
        assert km.provisioner.__class__.__name__ == "LocalProvisioner"
        ok(kc, "x = 42")
        controller = km.provisioner.process.pid
        t0 = time.perf_counter()
        km.restart_kernel()
        kc.wait_for_ready(timeout=60)
        cell = ok(kc, "'x' in globals()")
        print(f"\nfront-end restart (plain kernelspec): first reply after {(time.perf_counter() - t0) * 1000:.0f} ms")
        assert cell.result == "False"
        assert cell.content["execution_count"] == 1
        assert km.provisioner.process.pid != controller
        assert km.is_alive()


# -- 6. settings, learned preloads ------------------------------------------------------


def test_pyproject_quiet_and_preload(project, specs) -> None:
    project.write("pyproject.toml", '[tool.forkreload]\npreload = ["json"]\nquiet = true\n')
    project.write("m.py", "K = 1\n")
    with kernel(project.root) as (km, kc):
        status = control_request(kc, CONTROL_REQUEST, {"cmd": "status"})
        assert status["settings"]["preload"] == ["json"] and status["settings"]["quiet"] is True
        assert "json" in status["snapshot"]["preload"]
        pid = ok(kc, "import m, os; v = [m.K]; os.getpid()").result
        project.write("m.py", "K = 2\n")
        cell = ok(kc, "v.append(m.K); v, os.getpid()", settle=0.3)
        assert cell.result.startswith("([1, 2], ") and not cell.result.endswith(f" {pid})")
        assert cell.notice == "" and cell.stream() == "" and cell.stream("stderr") == ""
        assert cell.reply["metadata"]["forkreload"]["ok"]
        # failures are shown even when quiet
        project.write("m.py", "K = (\n")
        cell = ok(kc, "v, m.K")
        assert cell.result == "([1, 2], 2)"
        assert "kept the old code" in cell.stream("stderr", notices=True)


def test_pyproject_mode_off(project, specs) -> None:
    project.write("pyproject.toml", '[tool.forkreload]\nmode = "off"\n')
    project.write("m.py", "K = 1\n")
    with kernel(project.root) as (km, kc):
        pid = ok(kc, "import m, os; os.getpid()").result
        project.write("m.py", "K = 2\n")
        cell = ok(kc, "m.K, os.getpid()", settle=0.3)
        assert cell.result == f"(1, {pid})"
        assert cell.notice == ""


def test_learned_preloads(project, specs) -> None:
    first = "import sys; 'psutil' in sys.modules"
    with kernel(project.root) as (km, kc):
        assert ok(kc, first).result == "False"
        ok(kc, "import csv, psutil")
    with kernel(project.root) as (km, kc):
        assert ok(kc, first).result == "True"
        status = control_request(kc, CONTROL_REQUEST, {"cmd": "status"})
        assert "psutil" in status["learned"] and "csv" not in status["learned"]
        assert "psutil" in status["snapshot"]["preload"]
    with kernel(project.root, env={"FORKRELOAD_LEARN": "0"}) as (km, kc):
        assert ok(kc, first).result == "False"
    with kernel(project.root, "forkreload-nolearn") as (km, kc):
        assert ok(kc, first).result == "False"


# -- 7. comms -----------------------------------------------------------------------------


ECHO_TARGET = """
def _echo_target(comm, open_msg):
    @comm.on_msg
    def _(msg):
        comm.send({'echo': msg['content']['data'], 'pid': __import__('os').getpid()})
get_ipython().kernel.comm_manager.register_target('echo', _echo_target)
"""


def _comm_send(kc: Any, msg_type: str, content: dict[str, Any]) -> None:
    kc.shell_channel.send(kc.session.msg(msg_type, content))


def _iopub_until(kc: Any, pred: Any, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"not seen; got {[(m['msg_type'], m['content']) for m in seen]}")
        try:
            m = kc.get_iopub_msg(timeout=left)
        except Exception:
            continue
        seen.append(m)
        if pred(m):
            return m


def test_comm_messages_while_worker_lives(project, specs) -> None:
    with kernel(project.root) as (km, kc):
        ok(kc, ECHO_TARGET)
        comm_id = uuid.uuid4().hex
        _comm_send(kc, "comm_open", {"comm_id": comm_id, "target_name": "echo", "data": {}})
        _comm_send(kc, "comm_msg", {"comm_id": comm_id, "data": {"n": 1}})
        m = _iopub_until(kc, lambda m: m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm_id)
        assert m["content"]["data"]["echo"] == {"n": 1}
        info = kc.comm_info(target_name="echo", reply=True, timeout=10)
        assert comm_id in info["content"]["comms"]
        # kernel-side comm, opened from a cell
        cell = ok(kc, "from comm import create_comm\nc = create_comm(target_name='t', data={'hi': 1})\nc.comm_id")
        opened = cell.of("comm_open")
        assert opened and opened[0]["target_name"] == "t" and opened[0]["data"] == {"hi": 1}
        assert repr(opened[0]["comm_id"]) == cell.result


def test_edit_after_front_end_comm_is_picked_up(project, specs) -> None:
    project.write("m.py", "K = 1\n")
    with kernel(project.root) as (km, kc):
        ok(kc, "import m\n" + ECHO_TARGET)
        comm_id = uuid.uuid4().hex
        _comm_send(kc, "comm_open", {"comm_id": comm_id, "target_name": "echo", "data": {}})
        _comm_send(kc, "comm_msg", {"comm_id": comm_id, "data": {"n": 1}})
        _iopub_until(kc, lambda m: m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm_id)
        assert ok(kc, "m.K").result == "1"  # no edit: fine
        project.write("m.py", "K = 2\n")
        cell = run(kc, "m.K", timeout=5)  # never answered: the cell waits behind the comm messages
        assert cell.result == "2" and "fresh worker" in cell.notice
        assert comm_id in {c["comm_id"] for c in cell.of("comm_close")}


def test_comms_of_old_worker_closed_with_notice_on_swap(project, specs) -> None:
    project.write("m.py", "K = 1\n")
    with kernel(project.root) as (km, kc):
        cell = ok(kc, "import m\nfrom comm import create_comm\nc = create_comm(target_name='t')\nc.comm_id")
        comm_id = eval(cell.result)  # noqa: S307 - a str literal
        assert [o["comm_id"] for o in cell.of("comm_open")] == [comm_id]
        project.write("m.py", "K = 2\n")
        cell = run(kc, "m.K", settle=0.5)
        assert cell.result == "2" and "fresh worker" in cell.notice
        # the comm died with the old worker: the front end is told, in this cell
        assert [c["comm_id"] for c in cell.of("comm_close")] == [comm_id], [m["msg_type"] for m in cell.iopub]
        notice = cell.stream("stderr", notices=True)
        assert "1 comm" in notice and "widgets" in notice, cell.notice
        kinds = [m["msg_type"] for m in cell.iopub]
        assert kinds.index("comm_close") < kinds.index("execute_input")
        # a later swap has nothing left to close
        project.write("m.py", "K = 3\n")
        cell = ok(kc, "m.K")
        assert cell.result == "3" and cell.of("comm_close") == [] and "comm" not in cell.notice


# -- 8. rich output through the proxy -------------------------------------------------------


def test_rich_output_through_proxy(project, specs) -> None:
    project.write("m.py", "K = 1\n")
    with kernel(project.root) as (km, kc):
        ok(kc, "import m")
        project.write("m.py", "K = 2\n")
        assert "fresh worker" in ok(kc, "m.K").notice  # all of it in a swapped-in worker
        cell = ok(kc, "from IPython.display import HTML, display\ndisplay(HTML('<b>bold</b>'))")
        [d] = cell.of("display_data")
        assert d["data"]["text/html"] == "<b>bold</b>" and "text/plain" in d["data"]

        cell = ok(kc, "h = display(HTML('<i>one</i>'), display_id=True)\nh.display_id")
        [d] = cell.of("display_data")
        display_id = d["transient"]["display_id"]
        assert repr(display_id) == cell.result
        cell = ok(kc, "h.update(HTML('<i>two</i>'))")
        [u] = cell.of("update_display_data")
        assert u["transient"]["display_id"] == display_id and u["data"]["text/html"] == "<i>two</i>"

        cell = ok(kc, "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
        [r] = cell.of("execute_result")
        assert "<table" in r["data"]["text/html"] and "<td>x</td>" in r["data"]["text/html"]
        assert r["execution_count"] == cell.content["execution_count"] == 6

        cell = run(kc, "1/0")
        [e] = cell.of("error")
        assert cell.content["status"] == "error" and e["ename"] == "ZeroDivisionError"
        assert any("1/0" in re.sub(r"\x1b\[[0-9;]*m", "", line) for line in e["traceback"]), e["traceback"]


def test_front_end_restart_of_a_busy_kernel(project, specs) -> None:
    with kernel(project.root, "forkreload-provisioned") as (km, kc):
        ok(kc, "x = 1")
        controller = km.provisioner.process.pid
        msg_id = send(kc, "import time\nwhile True: time.sleep(0.01)")
        while True:
            m = kc.get_iopub_msg(timeout=30)
            if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "execute_input":
                break
        t0 = time.perf_counter()
        km.restart_kernel()
        cell = run(kc, "'x' in globals()")
        print(f"\nfront-end restart of a busy kernel (provisioner): first reply after {(time.perf_counter() - t0) * 1000:.0f} ms")
        assert cell.result == "False" and cell.content["execution_count"] == 1
        assert km.provisioner.process.pid == controller
