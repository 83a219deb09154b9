"""`forkreload console` in a real terminal, and `forkreload doctor`.

The console runs under tmux (a private server per test, killed in teardown)
and is driven as a person would: keys typed, the screen read back. Every
process it starts inherits the test's FORKRELOAD_TEST_TAG (the tmux server
is started with the test's environment), so conftest's leak check covers
the console, the controller, the snapshot and the workers.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from conftest import tagged_processes, wait_no_processes
from transcript import ConsoleTimeout, TmuxConsole

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")

MODULE = '''\
SCALE = 10


def area(w, h):
    return w * h


class Box:
    kind = "small"

    def __init__(self, w, h):
        self.w, self.h = w, h

    def size(self):
        return area(self.w, self.h)
'''


def console_processes() -> list[psutil.Process]:
    """The test's processes other than its tmux server."""
    left = []
    for p in tagged_processes():
        try:
            if not p.name().startswith("tmux"):
                left.append(p)
        except psutil.NoSuchProcess:
            continue
    return left


def wait_gone(timeout: float = 15.0) -> list[psutil.Process]:
    return wait_no_processes(timeout, console_processes)


def describe(procs: list[psutil.Process]) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            out.append((p.pid, " ".join(p.cmdline())[:120]))
        except psutil.NoSuchProcess:
            continue
    return out


def console_pid(con: TmuxConsole) -> int:
    """The `forkreload console` process (tmux may start it under a shell)."""
    pane = psutil.Process(con.pane_pid())
    for p in [pane, *pane.children(recursive=True)]:
        if "console" in p.cmdline():
            return p.pid
    raise AssertionError(f"no console process under the pane: {describe([pane])}")


@pytest.fixture
def console(project) -> Iterator[Callable[..., TmuxConsole]]:
    """Start `forkreload console` in a project under a private tmux server."""
    started: list[TmuxConsole] = []

    def start(cwd: Path | None = None, *args: str, wait: bool = True) -> TmuxConsole:
        con = TmuxConsole(cwd or project.root, args=args)
        started.append(con)
        if wait:
            con.start()
        return con

    yield start
    for con in started:
        con.close()


def after(text: str, marker: str) -> str:
    """The part of `text` from the last occurrence of `marker` on."""
    return text[text.rindex(marker) :]


# -- the command line ------------------------------------------------------------


def _forkreload(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forkreload", *args], capture_output=True, text=True, timeout=50, env=env
    )


def test_console_help_lists_every_flag_on_one_line_each() -> None:
    env = dict(os.environ, COLUMNS="80")
    r = _forkreload("console", "--help", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for flag in ("--cwd DIR", "--preload A,B", "--mode MODE", "--quiet", "--no-learn", "--watch PATH"):
        rows = [line for line in lines if line.startswith(f"  {flag} ")]
        assert len(rows) == 1, (flag, r.stdout)
        assert len(rows[0][len(flag) + 2 :].strip()) > 10, rows[0]  # the help is on that same line
        assert len(rows[0]) <= 80, rows[0]
    assert "auto (default), fresh, inplace, off" in r.stdout
    assert "pyproject.toml" in r.stdout


def test_version() -> None:
    from forkreload import __version__

    r = _forkreload("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"forkreload {__version__}"


def test_console_in_a_missing_directory_says_so(tmp_path) -> None:
    r = _forkreload("console", "--cwd", str(tmp_path / "nowhere"))
    assert r.returncode == 2
    assert "not a directory" in r.stderr


def test_console_whose_controller_cannot_start_says_why_at_once(project, tmp_path) -> None:
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / "python_thread.py").write_text("import threading, time\nthreading.Thread(target=time.sleep, args=(300,), daemon=True).start()\n")
    env = dict(os.environ, PYTHONPATH=str(libs))
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "forkreload", "console", "--cwd", str(project.root), "--preload", "python_thread", "--no-learn"],
        capture_output=True, text=True, timeout=50, env=env, stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "refusing to fork" in r.stderr
    assert "forkreload: the controller exited (status 1) before the session started" in r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 30


# -- a session in a real terminal -------------------------------------------------


@pytest.mark.timeout(120)
def test_edits_in_a_real_terminal_keep_values_and_run_new_code(project, console) -> None:
    mod = project.write("geo.py", MODULE)
    con = console()
    banner = con.screen()
    assert "forkreload" in banner and "console" in banner

    out = con.run("import geo; b = geo.Box(2, 3); n = b.size(); long_named_total = 41")
    assert "Error" not in out, out
    assert "Out[" not in out
    assert "Out[2]: 6" in con.run("n")

    # A function-body edit: in place.
    mod.write_text(MODULE.replace("return w * h", "return w * h * 100"))
    out = con.run("b.size(), n")
    assert "(600, 6)" in out, out
    assert re.search(r"^forkreload: .*in place", out, re.M), out

    # A messy edit (a module constant and a class attribute): a fresh worker.
    mod.write_text(MODULE.replace("return w * h", "return w * h * 100").replace("SCALE = 10", "SCALE = 7").replace('kind = "small"', 'kind = "large"'))
    out = con.run("geo.SCALE, b.kind, b.size(), type(b) is geo.Box, long_named_total + 1")
    assert "(7, 'large', 600, True, 42)" in out, out
    assert re.search(r"^forkreload: fresh worker.*migrated \d+", out, re.M), out

    # Completion of names defined before the swap, served by the new worker.
    at = con.wait_prompt()
    con.type("long_na")
    con.keys("Tab")
    con.wait_for(lambda t: "long_named_total" in t.splitlines()[0], start=at, timeout=10)
    con.keys("Enter")
    assert "41" in con.wait_for("Out[", start=at)
    at = con.wait_prompt(after=at)
    con.type("b.si")
    con.keys("Tab")
    con.wait_for(lambda t: "b.size" in t.splitlines()[0], start=at, timeout=10)
    con.type("()")
    con.keys("Enter")
    assert ": 600" in con.wait_for("Out[", start=at)
    con.wait_prompt(after=at)

    # `obj?` help comes from the worker too.
    out = con.run("geo.area?")
    assert "Signature: geo.area(w, h)" in out, out


@pytest.mark.timeout(120)
def test_ctrl_c_interrupts_a_cell_and_keeps_the_session(project, console) -> None:
    project.write("geo.py", MODULE)
    con = console()
    con.run("import geo; b = geo.Box(4, 5); x = 1234")

    # Ctrl-C at an empty prompt (and with text typed): nothing happens.
    at = con.wait_prompt()
    con.keys("C-c")
    con.type("half typed")
    con.keys("C-c")
    time.sleep(0.5)
    assert con.wait_prompt() >= at
    assert "Out[" not in "\n".join(con.screen().splitlines()[at:])

    at = con.wait_prompt()
    con.type("while True: pass")
    con.keys("Enter")
    con.wait_for("while True: pass", start=at)
    time.sleep(0.3)
    con.keys("Enter")  # a compound statement waits for an empty line
    time.sleep(1.5)
    with pytest.raises(ConsoleTimeout):
        con.wait_prompt(after=at, timeout=0.5)  # still running
    con.keys("C-c")
    nxt = con.wait_prompt(after=at, timeout=20)
    assert "KeyboardInterrupt" in "\n".join(con.screen().splitlines()[at:nxt])

    out = con.run("x, b.size()")
    assert "(1234, 20)" in out, out
    assert not re.search(r"^forkreload: ", out, re.M), out  # same worker, nothing reloaded


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["exit", "ctrl-d"])
def test_exit_ends_every_process(project, console, how: str) -> None:
    con = console()
    con.run("import os; os.getpid()")
    assert len(console_processes()) >= 4  # console, controller, snapshot, worker (and a spare)
    at = con.wait_prompt()
    if how == "exit":
        con.type("exit")
        con.keys("Enter")
    else:
        con.keys("C-d")
    deadline = time.monotonic() + 20
    while not con.dead() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert con.dead(), con.screen()
    assert "Traceback" not in "\n".join(con.screen().splitlines()[at:])
    left = wait_gone()
    assert not left, describe(left)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["kill-session", "sighup", "sigterm"])
def test_closing_the_terminal_ends_every_process(project, console, how: str) -> None:
    con = console()
    con.run("x = 1")
    pid = console_pid(con)
    workers = console_processes()
    assert len(workers) >= 4, describe(workers)
    if how == "kill-session":
        con._tmux("kill-session")  # the terminal goes away: SIGHUP
    elif how == "sighup":
        os.kill(pid, signal.SIGHUP)
    else:
        os.kill(pid, signal.SIGTERM)
    left = wait_gone()
    assert not left, describe(left)
    if how != "kill-session":
        # The console's own handler ran (it stops the controller, then exits
        # with 128 + the signal), rather than the signal's default action.
        signum = signal.SIGHUP if how == "sighup" else signal.SIGTERM
        con.wait_for(lambda t: any(con.exit_status()), timeout=10)  # tmux reaps it after EOF
        assert con.exit_status() == (str(128 + signum), ""), con.exit_status()


@pytest.mark.timeout(90)
def test_sigkill_of_the_console_still_ends_every_process(project, console) -> None:
    """Not even a clean-up: the controller sees its parent die and stops."""
    con = console()
    con.run("x = 1")
    os.kill(console_pid(con), signal.SIGKILL)
    left = wait_gone()
    assert not left, describe(left)


@pytest.mark.timeout(90)
def test_a_dead_controller_ends_the_console_with_a_reason(project, console) -> None:
    con = console()
    con.run("x = 1")
    controller = [p for p in console_processes() if "kernel" in p.cmdline() and "forkreload" in " ".join(p.cmdline())]
    assert len(controller) == 1, describe(controller)
    controller[0].kill()
    at = con.wait_prompt()
    con.type("x")
    con.keys("Enter")
    con.wait_for("the session is over", start=at, timeout=20)
    con.wait_for(lambda t: con.dead(), timeout=20)
    left = wait_gone()
    assert not left, describe(left)


@pytest.mark.timeout(150)
def test_input_history_is_kept_per_project(project, console, tmp_path) -> None:
    from forkreload.console import history_path

    other = tmp_path / "other"
    other.mkdir()

    con = console(project.root)
    con.run("marker_of_project_a = 1")
    con.run("1 + 1")
    con.type("exit")
    con.keys("Enter")
    con.wait_for(lambda t: con.dead(), timeout=20)

    path = history_path(project.root)
    assert path.exists()
    with sqlite3.connect(path) as db:
        cells = [row[0] for row in db.execute("SELECT source_raw FROM history ORDER BY session, line")]
    assert cells == ["marker_of_project_a = 1", "1 + 1", "exit"]

    # Same project: up-arrow walks back through the last session's cells,
    # and Ctrl-R finds them.
    con = console(project.root)
    at = con.wait_prompt()
    con.keys("Up")
    con.wait_for(lambda t: t.splitlines()[0].endswith("exit"), start=at, timeout=10)
    con.keys("Up", "Up")
    con.wait_for(lambda t: t.splitlines()[0].endswith("marker_of_project_a = 1"), start=at, timeout=10)
    con.keys("Enter")
    at = con.wait_prompt(after=at)
    con.keys("C-r")
    con.type("marker_of")
    con.wait_for("marker_of_project_a = 1", start=at, timeout=10)
    con.keys("C-c")
    con.keys("C-c")
    con.type("exit")
    con.keys("Enter")
    con.wait_for(lambda t: con.dead(), timeout=20)

    # Another project: none of it.
    con = console(other)
    at = con.wait_prompt()
    con.keys("Up")
    time.sleep(1.0)
    line = con.screen().splitlines()[at]
    assert line.strip() == "In [1]:", line
    assert "marker_of_project_a" not in con.screen()


# -- forkreload doctor ---------------------------------------------------------------


THREAD_MODULE = """\
import _thread, time
_thread.start_new_thread(time.sleep, (300,))
"""


def test_doctor_reports_versions_settings_and_preloads(project, tmp_path) -> None:
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / "spawns_thread.py").write_text(THREAD_MODULE)
    project.write("pyproject.toml", '[tool.forkreload]\nmode = "fresh"\n')
    env = dict(os.environ, PYTHONPATH=str(libs), FORKRELOAD_QUIET="1")
    r = _forkreload("doctor", "--cwd", str(project.root), "--preload", "decimal,spawns_thread,no_such_module_x", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for name in ("forkreload", "ipykernel", "jupyter_client", "pyzmq", "cloudpickle", "IPython", "jupyter_console"):
        assert re.search(rf"^  {name} +\d", out, re.M), (name, out)
    assert re.search(r"^  os\.fork +available", out, re.M), out
    assert re.search(r"^  python +3\.\d+", out, re.M), out
    # Settings in force, with where each came from.
    assert re.search(r"^  mode +fresh +\S*pyproject\.toml", out, re.M), out
    assert re.search(r"^  quiet +on +environment", out, re.M), out
    assert re.search(r"^  preload +decimal, spawns_thread, no_such_module_x +command line", out, re.M), out
    assert re.search(r"^  learn +on +default", out, re.M), out
    # The snapshot: import times, failures, and the thread warning.
    assert re.search(r"^snapshot +ready in", out, re.M), out
    assert re.search(r"^  preload +decimal +[\d.]+ m?s", out, re.M), out
    assert re.search(r"^ +spawns_thread +[\d.]+ m?s", out, re.M), out
    assert re.search(r"^  FAILED +no_such_module_x +ModuleNotFoundError", out, re.M), out
    assert re.search(r"^  WARNING +spawns_thread started 1 thread .*fork-safety", out, re.M), out
    # The controller's own log lines do not repeat the report.
    assert "forkreload:" not in r.stderr, r.stderr


def test_doctor_fails_when_the_snapshot_cannot_start(project, tmp_path) -> None:
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / "python_thread.py").write_text("import threading, time\nthreading.Thread(target=time.sleep, args=(300,), daemon=True).start()\n")
    env = dict(os.environ, PYTHONPATH=str(libs))
    r = _forkreload("doctor", "--cwd", str(project.root), "--preload", "python_thread", "--no-learn", env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"^snapshot +COULD NOT START", r.stdout, re.M), r.stdout
    assert "refusing to fork" in r.stdout, r.stdout
    assert re.search(r"^  learn +off +command line", r.stdout, re.M), r.stdout


def test_doctor_without_fork(project, monkeypatch, capsys) -> None:
    from forkreload.doctor import run_doctor

    monkeypatch.delattr(os, "fork")
    assert run_doctor(str(project.root)) == 1
    out = capsys.readouterr().out
    assert re.search(r"^  os\.fork +NOT AVAILABLE", out, re.M), out
    assert "not started: no os.fork" in out


# -- pieces of the console, without a terminal -------------------------------------


class _Tty:
    def __init__(self, tty: bool) -> None:
        self.text = ""
        self.tty = tty

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty


def _stream(text: str, kind: str | None = None) -> dict:
    return {"msg_type": "stream", "content": {"name": "stdout", "text": text}, "metadata": {"forkreload": kind} if kind else {}}


def test_status_line_is_shown_while_waiting_and_erased_by_the_next_output() -> None:
    from forkreload.console import StatusLine

    tty = _Tty(True)
    line = StatusLine(tty)
    shown = line.filter(_stream("forkreload: preparing a fresh worker: geo.py changed\n", "progress"))
    assert shown["content"]["text"] == ""  # jupyter_console prints nothing for it
    assert "preparing a fresh worker" in tty.text and "\n" not in tty.text
    line.filter({"msg_type": "status", "content": {"execution_state": "busy"}, "metadata": {}})
    assert line.shown
    notice = _stream("forkreload: fresh worker: geo.py changed · migrated 2 · 40 ms\n", "notice")
    assert line.filter(notice) is notice
    assert not line.shown and tty.text.endswith("\r\x1b[2K")

    plain = _Tty(False)
    StatusLine(plain).filter(_stream("forkreload: preparing a fresh worker\n", "progress"))
    assert plain.text == "forkreload: preparing a fresh worker\n"


def test_project_history_store_and_tail(tmp_path) -> None:
    from forkreload.console import ProjectHistory

    path = tmp_path / "h" / "history.sqlite"
    h = ProjectHistory(path)
    for cell in ("a = 1", "   ", "for i in range(3):\n    print(i)\n", "b = 2"):
        h.store(cell)
    h.end_session()
    h2 = ProjectHistory(path)
    h2.store("c = 3")
    assert [c for _, _, c in h2.get_tail(10)] == ["a = 1", "for i in range(3):\n    print(i)", "b = 2", "c = 3"]
    assert [c for _, _, c in h2.get_tail(2)] == ["b = 2", "c = 3"]
    h2.end_session()
    # IPython reads the same file.
    from IPython.core.history import HistoryAccessor

    acc = HistoryAccessor(hist_file=path)
    assert [c for _, _, c in acc.get_tail(2, include_latest=True)] == ["b = 2", "c = 3"]
    acc.db.close()

    broken = tmp_path / "broken.sqlite"
    broken.write_text("not a database")
    hb = ProjectHistory(broken)  # no history, no exception
    hb.store("x = 1")
    assert hb.get_tail(5) == []
