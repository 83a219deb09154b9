"""The fresh-worker path end to end: real processes, real files, real edits."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time

import psutil
import pytest
import zmq
from jupyter_client.session import Session as JupyterSession

from conftest import tagged_processes, wait_no_processes


def test_function_change_is_seen(project, make_session):
    project.write("ops.py", "def double(x):\n    return 2 * x\n")
    s = make_session(mode="fresh")
    assert s.execute("import ops; y = 21; print(ops.double(y))").stdout == "42\n"
    project.write("ops.py", "def double(x):\n    return 'two times %d' % x\n")
    r = s.execute("print(ops.double(y))")
    assert r.stdout == "two times 21\n"
    assert r.reload is not None and r.reload.mode == "fresh" and r.reload.ok
    assert r.reload.modules == ["ops"]
    assert "y" in r.reload.migrated
    assert "fresh worker" in r.notice


def test_issue_example_class_shape_change_seen_by_old_instance(project, make_session):
    project.write(
        "shapes.py",
        """
        class Greeter:
            def __init__(self, name):
                self.name = name
            def greet(self):
                return f"hello {self.name}"
        """,
    )
    s = make_session(preload=["numpy"])
    r = s.execute("import shapes, numpy as np; g = shapes.Greeter('ann'); data = np.arange(10**6)")
    assert r.status == "ok", r
    project.write(
        "shapes.py",
        """
        from dataclasses import dataclass

        @dataclass
        class Greeter:
            name: str
            punct: str = "!"
            def greet(self):
                return f"HELLO {self.name.upper()}{self.punct}"
        """,
    )
    r = s.execute("print(g.greet(), data.sum(), type(g) is shapes.Greeter)")
    assert r.stdout == "HELLO ANN! 499999500000 True\n"
    assert r.reload.mode == "fresh" and r.reload.ok
    assert set(r.reload.migrated) >= {"g", "data", "np", "shapes"}
    assert r.reload.lost == {}
    assert r.reload.seconds > 0


def test_constant_seen_through_from_import_in_another_module(project, make_session):
    project.write("config.py", "RATE = 2\n")
    project.write("pricing.py", "from config import RATE\n\ndef price(x):\n    return x * RATE\n")
    s = make_session()
    assert s.execute("import pricing; print(pricing.price(10))").stdout == "20\n"
    project.write("config.py", "RATE = 3\n")
    r = s.execute("print(pricing.price(10))")
    assert r.stdout == "30\n"
    assert r.reload.modules == ["config"]


def test_variables_migrated_or_named_lost(project, make_session):
    project.write("m.py", "class Box:\n    def __init__(self, v):\n        self.v = v\n    def get(self):\n        return self.v\n")
    s = make_session()
    r = s.execute(
        """
import m, random, threading
shared = [1, 2]
alias = shared
holder = {"box": m.Box(5)}
box = holder["box"]
sq = lambda v: v * v
def cube(v):
    return v * sq(v)
class Local:
    def twice(self):
        return 2 * cube(2)
loc = Local()
fh = open("m.py")
gen = (i for i in range(3))
lock = threading.Lock()
_private = 7
"""
    )
    assert r.status == "ok", r
    project.write("m.py", "class Box:\n    scale = 100\n    def __init__(self, v):\n        self.v = v\n    def get(self):\n        return self.v * self.scale\n")
    r = s.execute(
        "print(alias is shared, holder['box'] is box, box.get(), cube(3), loc.twice(), _private)"
    )
    assert r.stdout == "True True 500 27 16 7\n", r
    assert set(r.reload.lost) == {"fh", "gen", "lock"}
    assert "TextIOWrapper" in r.reload.lost["fh"]
    assert "generator" in r.reload.lost["gen"]
    assert "lost: fh" in r.notice and "gen" in r.notice and "lock" in r.notice
    # IPython's own names never travel; the user's functions see the new namespace.
    assert not {"In", "Out", "_", "_i1", "get_ipython", "exit", "quit"} & set(r.reload.migrated)
    r = s.execute("def sq(v):\n    return -v\nprint(cube(3))")
    assert r.stdout == "-9\n"
    r = s.execute("fh")
    assert r.error[0] == "NameError"


def test_execution_count_history_and_random_state_continue(project, make_session):
    project.write("m.py", "X = 1\n")
    s = make_session(preload=["numpy"])
    s.execute("import m, random, numpy as np; random.seed(7); np.random.seed(7); a = random.random(); b = np.random.rand()")
    expected = s.execute("st = random.getstate(); nst = np.random.get_state(); print(random.random(), np.random.rand()); random.setstate(st); np.random.set_state(nst)")
    assert expected.execution_count == 2
    project.write("m.py", "X = 2\n")
    r = s.execute("print(random.random(), np.random.rand())")
    assert r.reload.ok
    assert r.stdout == expected.stdout
    assert r.execution_count == 3
    r = s.execute("print(m.X, In[1].startswith('import m'), len(In))")
    assert r.stdout == "2 True 5\n"


@pytest.mark.parametrize(
    "mode, says",
    [("auto", "SyntaxError: invalid syntax (ops.py, line 1)"), ("fresh", "ops.py, line 1")],
)
def test_syntax_error_keeps_old_code_then_fix_reloads(project, make_session, mode, says):
    project.write("ops.py", "def f():\n    return 'v1'\n")
    s = make_session(mode=mode)
    s.execute("import ops; keep = [1, 2, 3]")
    project.write("ops.py", "def f(:\n    return 'v2'\n")
    r = s.execute("print(ops.f(), keep)")
    assert r.stdout == "v1 [1, 2, 3]\n"  # old code keeps running
    assert r.reload.ok is False
    assert says in r.notice and "kept the old" in r.notice
    assert len(r.notice.strip().splitlines()) <= 2
    # Same broken file: no second attempt, but every cell says it runs old code.
    r = s.execute("print(ops.f())")
    assert r.reload is None
    assert r.notice.startswith("forkreload: still running the old code of ops.py (") and len(r.notice.splitlines()) == 1
    project.write("ops.py", "def f():\n    return 'v2'\n")
    r = s.execute("print(ops.f(), keep)")
    assert r.stdout == "v2 [1, 2, 3]\n"
    assert r.reload.ok and r.reload.mode == ("inplace" if mode == "auto" else "fresh")


def test_import_time_exception_shows_users_traceback(project, make_session):
    project.write("ops.py", "def f():\n    return 'v1'\n")
    s = make_session()
    s.execute("import ops; keep = 5")
    project.write("ops.py", "def f():\n    return 'v2'\n\nraise ValueError('bad config')\n")
    r = s.execute("print(ops.f(), keep)")
    assert r.stdout == "v1 5\n"
    assert r.reload.ok is False
    assert "ValueError: bad config" in r.notice
    assert "ops.py" in r.notice
    assert "forkreload" not in r.notice.split("\n", 1)[1]  # no internals in the traceback
    project.write("ops.py", "def f():\n    return 'v2'\n")
    assert s.execute("print(ops.f(), keep)").stdout == "v2 5\n"


def test_worker_killed_between_cells(project, make_session):
    s = make_session()
    s.execute("x = 1")
    pid = s.status()["worker_pid"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    r = s.execute("print('alive'); x")
    assert r.stdout == "alive\n"
    assert r.error[0] == "NameError"
    assert r.reload.lost == {"*": "the worker was killed by SIGKILL; its variables were lost"}
    assert "killed by SIGKILL" in r.notice
    assert s.status()["worker_pid"] != pid


def test_worker_dies_during_a_cell(project, make_session):
    s = make_session()
    r = s.execute("import os; os._exit(3)")
    assert r.status == "error" and r.error[0] == "WorkerDied"
    r = s.execute("print(1 + 1)")
    assert r.stdout == "2\n"
    assert "exited with status 3" in r.reload.lost["*"]


def test_interrupt_stops_the_cell_not_the_session(project, make_session):
    s = make_session()
    s.execute("kept = 'yes'")
    timer = threading.Timer(1.0, s.interrupt)
    timer.start()
    r = s.execute("while True: pass", timeout=30)
    timer.join()
    assert r.error[0] == "KeyboardInterrupt"
    # SIGINT to the controller (as jupyter_client's signal mode does) too.
    timer = threading.Timer(1.0, os.kill, (s.pid, signal.SIGINT))
    timer.start()
    r = s.execute("while True: pass", timeout=30)
    timer.join()
    assert r.error[0] == "KeyboardInterrupt"
    assert s.execute("print(kept)").stdout == "yes\n"


def test_restart_forces_a_fresh_worker_with_values(project, make_session):
    s = make_session()
    s.execute("import os; v = {'a': 1}; pid0 = os.getpid()")
    rep = s.restart()
    assert rep.ok and rep.mode == "fresh" and "v" in rep.migrated
    assert s.execute("print(v, os.getpid() != pid0)").stdout == "{'a': 1} True\n"


def test_status_reports_preloads_and_watched_modules(project, make_session):
    project.write("ops.py", "X = 1\n")
    s = make_session(preload=["numpy", "no_such_module_xyz"])
    s.execute("import ops")
    st = s.status()
    assert "numpy" in st["snapshot"]["preload"]
    assert "no_such_module_xyz" in st["snapshot"]["preload_failed"]
    assert st["snapshot"]["threads"]["python_threads"] == 1
    assert st["watched"] == {"ops": str(project.root / "ops.py")}
    # Modules outside the project (stdlib, site-packages) are never watched.
    s.execute("import json, numpy")
    assert list(s.status()["watched"]) == ["ops"]


def all_started() -> list[psutil.Process]:
    """The session's processes once the spare is there too (forked after
    the first cell's reply, not at start)."""
    deadline = time.monotonic() + 5
    while len(procs := tagged_processes()) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    return procs


def test_no_process_left_after_close(project, make_session):
    s = make_session()
    s.execute("x = 1")
    assert len(all_started()) >= 4  # controller, snapshot, worker, spare
    s.close()
    assert wait_no_processes() == []


def test_no_process_left_after_sigkill_of_controller(project, make_session):
    s = make_session()
    s.execute("x = 1")
    procs = all_started()
    assert len(procs) >= 4
    os.kill(s.pid, signal.SIGKILL)
    s.proc.wait()
    gone, alive = psutil.wait_procs(procs, timeout=10)
    assert alive == []


def test_forged_message_is_dropped(project, make_session, capfd):
    s = make_session()
    s.execute("secret = 42")
    info = s.client.get_connection_info()
    forger = JupyterSession(key=b"not-the-key")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"ipc://{info['ip']}-{info['shell_port']}")
    try:
        forger.send(sock, "execute_request", {"code": "secret = 'stolen'", "silent": False})
        assert sock.poll(1000) == 0  # no reply to a forged request
    finally:
        sock.close(linger=0)
        ctx.term()
    assert s.execute("print(secret)").stdout == "42\n"
    assert "failed authentication" in capfd.readouterr().err


def test_no_fork_gives_a_clear_error(monkeypatch):
    import forkreload

    monkeypatch.delattr(os, "fork")
    with pytest.raises(forkreload.ForkUnavailable, match="os.fork"):
        forkreload.Session()


def test_comms_of_the_old_worker_are_closed_with_a_notice(project, make_session):
    project.write("m.py", "K = 1\n")
    s = make_session()
    r = s.execute("import m\nfrom ipykernel.comm import Comm\nc = Comm(target_name='t', data={})")
    assert r.status == "ok", r
    project.write("m.py", "K = 2\n")
    r = s.execute("print(m.K)")
    assert r.stdout == "2\n" and r.reload.mode == "fresh"
    assert "closed 1 comm (widgets) of the old worker" in r.notice
    assert "c" in r.reload.lost  # a Comm is tied to its kernel


def test_variable_that_cannot_be_rebuilt_is_named_and_the_code_is_new(project, make_session):
    # Code new wins over one value: the swap goes on, the value is named as
    # lost with its reason, and the previous worker is kept for `back`.
    project.write("m.py", "class Box:\n    def __init__(self):\n        self.v = 1\n")
    s = make_session()
    s.execute("import m, os; b = m.Box(); other = 'kept'; pid = os.getpid()")
    project.write(
        "m.py",
        "class Box:\n    size = 2\n    def __init__(self):\n        self.v = 1\n"
        "    def __setstate__(self, state):\n        raise TypeError('Box v2 cannot load v1 state')\n",
    )
    r = s.execute("print(os.getpid() == pid, other, m.Box.size, 'b' in dir())")
    assert r.stdout == "False kept 2 False\n"
    assert r.reload.ok and r.reload.mode == "fresh" and r.reload.previous
    assert "Box v2 cannot load v1 state" in r.reload.lost["b"]
    assert "lost: b (cannot be rebuilt with the new code (TypeError: Box v2 cannot load v1 state))" in r.notice
    assert "%forkreload back" in r.notice and len(r.notice.strip().splitlines()) == 1
    # Back to the previous worker: all its values, and it says it runs old code.
    r = s.execute("%forkreload back")
    assert "back to the previous worker (pid " in r.notice and "old code of m.py" in r.notice
    r = s.execute("print(os.getpid() == pid, other, hasattr(b, 'size'), b.v)")
    assert r.stdout == "True kept False 1\n"
    assert r.notice.startswith("forkreload: still running the old code of m.py (went back")
    # The next save is applied again.
    project.write("m.py", "class Box:\n    size = 3\n    def __init__(self):\n        self.v = 1\n")
    r = s.execute("print(os.getpid() == pid, other, b.size)")
    assert r.stdout == "False kept 3\n" and r.reload.mode == "fresh" and r.reload.lost == {}


def test_edit_of_a_preloaded_module_rebuilds_the_snapshot(project, make_session, tmp_path):
    lib = tmp_path / "lib"  # an editable install's source tree, outside the project
    lib.mkdir()
    (lib / "mylib.py").write_text("def f():\n    return 'v1'\n")
    env = dict(os.environ, PYTHONPATH=str(lib))
    s = make_session(preload=["mylib"], env=env)
    st = s.status()
    assert "mylib" in st["snapshot"]["preload"]
    snap_pid = st["snapshot"]["pid"]
    s.execute("import mylib; kept = mylib.f()")
    (lib / "mylib.py").write_text("def f():\n    return 'v2'\n")
    r = s.execute("print(kept, mylib.f())")
    assert r.stdout == "v1 v2\n"
    assert r.reload.mode == "fresh" and "new snapshot" in r.reload.reason
    st = s.status()
    assert st["snapshot"]["pid"] != snap_pid
    assert not psutil.pid_exists(snap_pid) or psutil.Process(snap_pid).status() == psutil.STATUS_ZOMBIE


def test_torch_in_the_snapshot_works_in_forked_workers(project, make_session):
    pytest.importorskip("torch")
    project.write("net.py", "import torch\n\nSCALE = 1\n\ndef model():\n    return torch.nn.Linear(4, 2)\n")
    s = make_session(preload=["torch"])
    st = s.status()["snapshot"]
    assert "torch" in st["preload"] and st["threads"]["risky"] == {}
    r = s.execute("import net, torch; m = net.model(); x = torch.randn(256, 256); y = (x @ x).sum().item()")
    assert r.status == "ok", r
    project.write("net.py", "import torch\n\nSCALE = 2\n\ndef model():\n    return torch.nn.Linear(4, 2)\n")
    r = s.execute("print(net.SCALE, tuple(m(torch.ones(4)).shape), (x @ x).sum().item() == y, torch.cuda.is_initialized())")
    assert r.stdout == "2 (2,) True False\n" and r.reload.mode == "fresh"


def test_cells_sent_at_once_each_see_the_edits_before_them(project, make_session):
    """As "Run all" does: every request is sent before the first one ran."""
    project.write("m.py", "K = 1\n\ndef f():\n    return 'f1'\n")
    s = make_session()
    kc = s.client
    ids = [
        kc.execute("import m; print(m.f(), m.K)"),
        kc.execute("open('m.py', 'w').write('K = 1\\n\\ndef f():\\n    return \"f2\"\\n')"),
        kc.execute("print(m.f(), m.K)"),
        kc.execute("open('m.py', 'w').write('K = 3\\n\\ndef f():\\n    return \"f2\"\\n')"),
        kc.execute("print(m.f(), m.K)"),
    ]
    out = {i: "" for i in ids}
    idles = {i: 0 for i in ids}
    replies = []
    while len(replies) < len(ids) or sum(idles.values()) < len(ids):
        if len(replies) < len(ids):
            try:
                replies.append(kc.get_shell_msg(timeout=0.05)["parent_header"]["msg_id"])
            except queue.Empty:
                pass
        try:
            msg = kc.get_iopub_msg(timeout=0.05)
        except queue.Empty:
            continue
        pid = msg["parent_header"].get("msg_id")
        if pid not in out:
            continue
        if msg["msg_type"] == "stream" and not msg["metadata"].get("forkreload"):
            out[pid] += msg["content"]["text"]
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idles[pid] += 1
    assert replies == ids
    assert list(idles.values()) == [1] * len(ids)
    assert [out[i] for i in ids] == ["f1 1\n", "", "f2 1\n", "", "f2 3\n"]


def test_an_error_aborts_the_cells_queued_behind_it_as_ipykernel_does(project, make_session):
    s = make_session()
    kc = s.client
    ids = [kc.execute("raise ValueError('first')"), kc.execute("x = 1"), kc.execute("print(x)")]
    statuses = {}
    while len(statuses) < 3:
        msg = kc.get_shell_msg(timeout=30)
        statuses[msg["parent_header"]["msg_id"]] = msg["content"]["status"]
    assert [statuses[i] for i in ids] == ["error", "aborted", "aborted"]
    r = s.execute("print('x' in dir())")
    assert r.stdout == "False\n"


@pytest.mark.parametrize("how", ["message", "signal"])
def test_interrupt_a_fresh_import_that_never_ends(project, make_session, how):
    project.write("m.py", "K = 1\n")
    s = make_session()
    s.execute("import m, os; pid = os.getpid()")
    project.write("m.py", "K = 2\nwhile True:\n    pass\n")
    interrupt = s.interrupt if how == "message" else (lambda: os.kill(s.pid, signal.SIGINT))
    timer = threading.Timer(1.5, interrupt)
    timer.start()
    r = s.execute("print(m.K, os.getpid() == pid)", timeout=30)
    timer.join()
    assert r.stdout == "1 True\n"  # the old worker, untouched, ran the cell
    assert r.reload.ok is False and "KeyboardInterrupt" in r.notice
    project.write("m.py", "K = 3\n")
    assert s.execute("print(m.K, os.getpid() == pid)").stdout == "3 False\n"


def test_a_deleted_module_does_not_block_the_session(project, make_session):
    helpers = project.write("helpers.py", "def f():\n    return 41\n")
    s = make_session()
    s.execute("import helpers; x = helpers.f() + 1; h = helpers.f")
    helpers.unlink()
    r = s.execute("print(x)")
    assert r.stdout == "42\n" and r.reload.ok and r.reload.mode == "fresh"
    assert r.reload.lost == {
        "h": "needs module helpers, which no longer exists",
        "helpers": "needs module helpers, which no longer exists",
    }
    assert "lost: h (needs module helpers, which no longer exists)" in r.notice
    assert s.execute("print(x); import helpers").error[0] == "ModuleNotFoundError"


def test_forkreload_log_traces_each_decision_and_swap_phase(project, make_session, tmp_path):
    log = tmp_path / "controller.log"
    project.write("m.py", "K = 1\n\ndef f():\n    return 1\n")
    s = make_session(env={**os.environ, "FORKRELOAD_LOG": str(log)})
    s.execute("import m")
    project.write("m.py", "K = 1\n\ndef f():\n    return 2\n")
    assert s.execute("print(m.f())").stdout == "2\n"
    project.write("m.py", "K = 2\n\ndef f():\n    return 2\n")
    assert s.execute("print(m.K)").stdout == "2\n"
    s.close()
    text = log.read_text()
    assert "in-place check of" in text and "inplace" in text
    for phase in ("spare", "export", "load", "switch"):
        assert f": {phase} at " in text, text
    assert "agent call load in worker" in text


def test_importlib_reload_in_a_cell_is_what_the_worker_runs(project, make_session):
    # A cell that rewrites a module and reloads it itself: the worker runs
    # the new content, so the next cell has nothing to reload.
    project.write("m.py", "K = 1\n")
    s = make_session()
    s.execute("import importlib, m")
    r = s.execute("open('m.py', 'w').write('K = 2\\n'); importlib.reload(m); print(m.K)")
    assert r.stdout == "2\n", r
    r = s.execute("print(m.K)")
    assert r.stdout == "2\n" and r.reload is None and r.notice == ""


def test_outputs_and_dunder_variables_cross_a_swap(project, make_session):
    project.write("m.py", "K = 1\n")
    s = make_session()
    s.execute("import m, threading")
    s.execute("[1, 2]")  # Out[2]
    s.execute("threading.Lock()")  # Out[3]: cannot be pickled
    s.execute("'text'")  # Out[4]
    s.execute("x = Out[2]; __version__ = '1.0'")
    project.write("m.py", "K = 2\n")
    r = s.execute("print(m.K, Out[2], _2, Out[4], repr(_), x is Out[2] is _2, __version__, 3 in Out)")
    assert r.reload.mode == "fresh" and r.reload.ok
    assert r.stdout == "2 [1, 2] [1, 2] text 'text' True 1.0 False\n", r.stdout
    assert r.reload.lost == {"Out": "1 of 3 results cannot be pickled and were dropped"}, r.reload
    assert "Out (1 of 3 results cannot be pickled and were dropped)" in r.notice
    assert r.execution_count == 6
    # The display hook goes on from there: the next result rotates them.
    assert s.execute("7").result == "7"
    assert s.execute("print(_, __)").stdout == "7 text\n"


def test_process_wide_settings_cross_a_swap_and_what_cannot_is_named(project, make_session):
    project.write("m.py", "K = 1\n")
    s = make_session(preload=["numpy", "pandas"])
    r = s.execute(
        "import m, textwrap, logging, sys, warnings, decimal, threading, time, numpy as np, pandas as pd\n"
        "np.set_printoptions(precision=2); np.seterr(divide='raise'); pd.set_option('display.max_rows', 7)\n"
        "warnings.filterwarnings('ignore', message='quiet please'); logging.getLogger('app').setLevel(logging.DEBUG)\n"
        "sys.setrecursionlimit(4321); decimal.getcontext().prec = 7\n"
        "def my_shorten(*a, **k):\n    return 'patched'\n"
        "textwrap.shorten = my_shorten\n"
        "t = threading.Thread(target=time.sleep, args=(30,), name='poller', daemon=True); t.start()"
    )
    assert r.status == "ok", r
    project.write("m.py", "K = 2\n")
    r = s.execute(
        "print(m.K, np.array([1/3]), np.geterr()['divide'], pd.get_option('display.max_rows'),"
        " logging.getLogger('app').level, sys.getrecursionlimit(), decimal.getcontext().prec,"
        " any(f[0] == 'ignore' and f[1] is not None and f[1].pattern == 'quiet please' for f in warnings.filters),"
        " textwrap.shorten('hello world', 20))"
    )
    assert r.reload.mode == "fresh" and r.reload.ok, r.reload
    assert r.stdout == "2 [0.33] raise 7 10 4321 7 True hello world\n", r.stdout
    notes = " ".join(r.reload.notes)
    assert "not carried: textwrap.shorten" in notes and "not carried: thread 'poller'" in notes, r.reload.notes
    assert "not carried: textwrap.shorten" in r.notice


@pytest.mark.timeout(120)
def test_the_snapshot_learns_within_the_session(project, make_session):
    # A new project, nothing preloaded: once a cell imports a library, a
    # snapshot holding it is built in the background; the swap after that
    # imports nothing, and the one before it says what it had to import.
    project.write("m.py", "K = 1\n")
    s = make_session(learn=True)
    assert "pandas" not in s.status()["snapshot"]["preload"]
    s.execute("import m, psutil, pandas as pd\ndf = pd.DataFrame({'a': [1, 2]})")
    assert "building    a snapshot with" in s.execute("%forkreload status").stdout
    project.write("m.py", "K = 2\n")
    early = s.execute("print(m.K, 'psutil' in dir(), int(df.a.sum()))")
    assert early.stdout == "2 True 3\n" and early.reload.mode == "fresh"
    deadline = time.monotonic() + 60
    while not {"psutil", "pandas"} <= set(s.status()["snapshot"]["preload"]) or s.status()["learning"]:
        assert time.monotonic() < deadline, s.status()
        time.sleep(0.2)
    # (a snapshot starts in well over the few ms between these two cells)
    notes = " ".join(early.reload.notes)
    assert "the new worker imported" in notes and "pandas" in notes and "psutil" in notes, early.reload
    assert "(a snapshot holding them is being built)" in notes, early.reload
    project.write("m.py", "K = 3\n")
    r = s.execute("import sys; print(m.K, 'psutil' in sys.modules, int(df.a.sum()))")
    assert r.stdout == "3 True 3\n" and r.reload.mode == "fresh"
    assert not any("imported" in n for n in r.reload.notes), r.reload.notes
    assert s.status()["learning"] is None


@pytest.mark.timeout(120)
def test_the_snapshot_learns_the_library_submodules_the_code_names(project, make_session):
    # `import numpy` does not import numpy.polynomial: a snapshot learned as
    # just "numpy" would leave the swap to import it while unpickling p.
    project.write("m.py", "K = 1\nfrom numpy.lib import recfunctions\n")
    s = make_session(learn=True)
    s.execute("import m\nfrom numpy.polynomial import Polynomial\np = Polynomial([1, 2])")
    deadline = time.monotonic() + 60
    while not {"numpy", "numpy.polynomial", "numpy.lib.recfunctions"} <= set(s.status()["snapshot"]["preload"]):
        assert time.monotonic() < deadline, s.status()
        time.sleep(0.2)
    project.write("m.py", "K = 2\n")
    r = s.execute("import sys; print(m.K, p(1), 'numpy.polynomial' in sys.modules)")
    assert r.stdout == "2 3.0 True\n" and r.reload.mode == "fresh"
    assert not any("imported" in n for n in r.reload.notes), r.reload.notes


def test_a_package_of_the_users_is_never_learned_as_a_library(project, make_session):
    project.write("mypkg/__init__.py", "")
    project.write("mypkg/sub.py", "X = 1\n")
    s = make_session(learn=True)
    assert s.execute("import mypkg.sub, psutil; print(mypkg.sub.X)").stdout == "1\n"
    deadline = time.monotonic() + 60
    while "psutil" not in s.status()["snapshot"]["preload"] or s.status()["learning"]:
        assert time.monotonic() < deadline, s.status()
        time.sleep(0.1)
    snap = s.status()["snapshot"]
    assert not any(n.startswith("mypkg") for n in [*snap["preload"], *snap["preload_failed"]]), snap
    from forkreload.config import LearnedModules

    assert not any(n.startswith("mypkg") for n in LearnedModules(str(project.root)).modules)
    project.write("mypkg/sub.py", "X = 2\n")
    assert s.execute("print(mypkg.sub.X)").stdout == "2\n"


def test_library_submodules_named_by_import_statements():
    import numpy.polynomial  # noqa: F401
    from forkreload.agent import _library_submodules

    code = "import numpy.polynomial\nfrom numpy import polynomial, sum\nfrom os import path\nimport json.decoder\nfrom . import x\nimport (\n"
    new = {"numpy.polynomial", "json.decoder", "os.path"}
    assert _library_submodules([code, b"from numpy.polynomial import Polynomial"], new) == ["numpy.polynomial"]
    assert _library_submodules([code], set()) == []  # imported before: nothing new


def test_a_session_too_large_to_keep_twice_does_not_keep_the_previous_worker(project, make_session):
    project.write("m.py", "K = 1\n")
    s = make_session(env={**os.environ, "FORKRELOAD_PREVIOUS_BUDGET": str(4 * 2**20)})
    s.execute("import m, numpy as np; small = 1")
    project.write("m.py", "K = 2\n")
    r = s.execute("print(m.K)")
    assert r.reload.previous and s.status()["previous_pid"] is not None  # under the budget: kept
    s.execute("big = np.ones(2**20)")  # 8 MiB, over the 4 MiB budget
    project.write("m.py", "K = 3\n")
    r = s.execute("print(m.K, big.sum())")
    assert r.stdout == "3 1048576.0\n" and r.reload.mode == "fresh"
    assert not r.reload.previous and s.status()["previous_pid"] is None
    assert "previous worker not kept (8 MiB of data, more than a quarter of the free memory)" in r.notice
    assert "back" in s.execute("%forkreload back").notice and "no previous worker" in s.execute("%forkreload back").notice
