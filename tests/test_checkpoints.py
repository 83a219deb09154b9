"""Checkpoints: undo a cell, and a crash that costs one cell, not the session.

Real sessions, real forks: each checkpoint is a forked copy of the worker;
undo and crash recovery turn one back into the worker. The reference for
what a restore must give is the state right after the checkpointed cell.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from forkreload.checkpoint import assigned_names, trivial_cell
from forkreload.session import SessionError

from conftest import tagged_processes, wait_no_processes


def cell(s, code: str):
    """Run a cell, then pause as a user does: the checkpoint comes once the
    worker has been idle for a moment."""
    r = s.execute(code)
    assert r.status == "ok", r
    time.sleep(0.15)
    return r


def _checkpoints(s) -> list[dict]:
    return s.status()["checkpoints"]


def _wait_checkpoints(s, n: int, timeout: float = 10.0) -> list[dict]:
    """Checkpoints are forked after the cell's idle: wait until `n` connected."""
    deadline = time.monotonic() + timeout
    while True:
        cps = _checkpoints(s)
        if len(cps) >= n or time.monotonic() > deadline:
            return cps
        time.sleep(0.05)


# -- the rules that decide what a checkpoint is taken for ----------------------------


@pytest.mark.parametrize(
    "code, trivial",
    [
        ("print(x)", True),
        ("x", True),
        ("len(a), a.shape, a[0]", True),
        ("print(a.sum(), df['b'].tolist(), df.head())", True),
        ("get_ipython().run_line_magic('forkreload', 'checkpoints')", True),
        ("x = 1", False),
        ("a.append(1)", False),
        ("df.drop(columns=['a'], inplace=True)", False),
        ("print(f())", False),
        ("import os", False),
        ("del x", False),
        ("for i in range(3): pass", False),
        ("not valid python (", False),
    ],
)
def test_trivial_cells_take_no_checkpoint(code, trivial):
    assert trivial_cell(code) is trivial


def test_names_a_cell_binds():
    code = "x = 1\na[:] = 0\nobj.attr = 2\ny, (z, *w) = f()\nimport numpy as np, os.path\nfrom m import k as q\ndef g(): pass\nfor i in r: j = i\nwith open(p) as fh: pass\n"
    assert assigned_names(code) == ["x", "a", "obj", "y", "z", "w", "np", "os", "q", "g", "i", "fh"]


# -- undo ----------------------------------------------------------------------------


def test_undo_after_rebinding_and_three_levels(make_session):
    s = make_session()
    for n in range(1, 6):
        cell(s, f"x = {n}")
    _wait_checkpoints(s, 5)
    s.execute("print(x)")  # trivial: no checkpoint
    assert len(_checkpoints(s)) == 5
    text = s.undo()
    assert "undone: the state after cell 4" in text and "x" in text
    assert s.execute("print(x)").stdout == "4\n"
    s.undo(3)
    r = s.execute("print(x)")
    assert r.stdout == "1\n"
    # The cell numbers and the input history go on (the values do not).
    assert r.execution_count == 8, r
    assert s.execute("print(In[5], '|', In[7])").stdout == "x = 5 | print(x)\n"
    with pytest.raises(SessionError, match="nothing to undo"):
        s.undo(5)
    assert s.execute("print(x)").stdout == "1\n"


def test_cells_sent_back_to_back_take_one_checkpoint_at_the_end(make_session):
    # A script or "Run all": no fork between cells, one once the worker rests.
    s = make_session()
    for n in range(1, 6):
        assert s.execute(f"x = {n}").status == "ok"
    cps = _wait_checkpoints(s, 1)
    time.sleep(0.3)
    cps = _checkpoints(s)
    assert [c["cell"] for c in cps] == [5], cps
    with pytest.raises(SessionError, match="nothing to undo"):
        s.undo()
    s.execute("x = 6")  # undone at once: the state after cell 5, before this one
    assert "after cell 5" in s.undo()
    assert s.execute("print(x)").stdout == "5\n"


def test_undo_in_place_mutation_of_array_and_dataframe(make_session):
    s = make_session(preload=["numpy", "pandas"])
    cell(s, "import numpy as np, pandas as pd\na = np.arange(1_000_000, dtype=float)\ndf = pd.DataFrame({'a': [1, 2, 3], 'b': [4, 5, 6]})")
    cell(s, "a *= 0; df.pop('a'); df['b'] += 10")
    _wait_checkpoints(s, 2)
    assert s.execute("print(a.sum(), list(df.columns), df['b'].tolist())").stdout == "0.0 ['b'] [14, 15, 16]\n"
    s.undo()
    r = s.execute("print(a.sum(), list(df.columns), df['b'].tolist())")
    assert r.stdout == "499999500000.0 ['a', 'b'] [4, 5, 6]\n", r


def test_undo_with_the_magic_in_a_cell(make_session):
    s = make_session()
    cell(s, "x = 'before'")
    cell(s, "x = 'after'")
    _wait_checkpoints(s, 2)
    r = s.execute("%forkreload undo")
    assert "undone: the state after cell 1" in r.notice, r
    assert s.execute("print(x)").stdout == "before\n"
    r = s.execute("%forkreload checkpoints")
    assert "after cell 1" in r.stdout and "MiB" in r.stdout, r


def test_undo_brings_back_an_open_file_at_its_position(make_session, project):
    project.write("data.txt", "".join(f"line {i}\n" for i in range(10)))
    s = make_session()
    cell(s, "f = open('data.txt'); first = f.readline()")
    cell(s, "rest = f.readlines()")
    _wait_checkpoints(s, 2)
    s.undo()
    r = s.execute("print(repr(first), repr(f.readline()), 'rest' in dir())")
    assert r.stdout == "'line 0\\n' 'line 1\\n' False\n", r


def test_undo_then_the_edit_made_since_is_applied(make_session, project):
    project.write("ops.py", "def f(x):\n    return x + 1\n")
    s = make_session()
    cell(s, "import ops\ny = ops.f(1)")
    cell(s, "y = 100")
    _wait_checkpoints(s, 2)
    project.write("ops.py", "def f(x):\n    return x * 10\n")
    s.undo()
    r = s.execute("print(y, ops.f(y))")
    assert r.stdout == "2 20\n", r


def test_checkpoints_off(make_session):
    s = make_session(checkpoints="off")
    cell(s, "x = 1")
    cell(s, "x = 2")
    with pytest.raises(SessionError, match="checkpoints are off"):
        s.undo()
    assert _checkpoints(s) == []


def test_budget_drops_the_oldest(make_session):
    # Each cell rewrites 40 MB of an array the older checkpoints share: they
    # become private there, and a 100 MB budget keeps only the newest ones.
    s = make_session(preload=["numpy"], checkpoints="100M")
    cell(s, "import numpy as np\na = np.zeros(5_000_000)")
    for n in range(1, 6):
        cell(s, f"a[:] = {n}")
        time.sleep(0.2)
    cell(s, "b = 1")
    time.sleep(0.5)
    cps = _checkpoints(s)
    held = s.status()["checkpoint_memory"]
    assert 1 <= len(cps) < 7 and cps[0]["cell"] > 1, cps
    assert 0 < held <= 100 * 2**20, (held, cps)


# -- crash recovery ------------------------------------------------------------------------

CRASHES = {
    "segfault": "import ctypes; ctypes.string_at(0)",
    "os._exit": "import os; os._exit(3)",
    "sigkill": None,  # from outside, as the OOM killer does
}


@pytest.mark.parametrize("how", list(CRASHES))
def test_crash_restores_the_last_good_state(make_session, how):
    s = make_session(preload=["numpy"])
    cell(s, "import numpy as np\na = np.arange(10)\nx = 'kept'")
    cell(s, "a += 1")
    _wait_checkpoints(s, 2)
    worker = s.status()["worker_pid"]
    if CRASHES[how] is None:
        r_holder = {}

        def kill_soon():
            time.sleep(0.5)
            os.kill(worker, signal.SIGKILL)

        import threading

        t = threading.Thread(target=kill_soon)
        t.start()
        r = s.execute("doomed = 1\nimport time; time.sleep(30)")
        t.join()
        r_holder["r"] = r
    else:
        r = s.execute("doomed = 1\n" + CRASHES[how])
    assert r.status == "error" and r.error is not None
    assert "restored" in r.error[1], r.error
    r = s.execute("print(x, a.tolist(), 'doomed' in dir())")
    assert r.stdout == "kept [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] False\n", r
    assert "restored the state after cell 2" in r.notice and "doomed" in r.notice, r.notice
    assert s.status()["worker_pid"] != worker


@pytest.fixture
def memory_cgroup():
    """A memory cgroup this test may put a process in (v2 or v1), 256 MB."""
    name = f"forkreload-test-{os.getpid()}"
    v2 = "/sys/fs/cgroup"
    v1 = "/sys/fs/cgroup/memory"
    if os.path.exists(os.path.join(v2, "cgroup.controllers")) and os.access(v2, os.W_OK):
        path, limit = os.path.join(v2, name), "memory.max"
    elif os.path.isdir(v1) and os.access(v1, os.W_OK):
        path, limit = os.path.join(v1, name), "memory.limit_in_bytes"
    else:
        pytest.skip("no memory cgroup this user may create")
    try:
        os.mkdir(path)
        with open(os.path.join(path, limit), "w") as f:
            f.write(str(256 << 20))
    except OSError as exc:
        pytest.skip(f"cannot set up a memory cgroup: {exc}")
    yield path
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.1)


def test_the_out_of_memory_killer_costs_one_cell(make_session, memory_cgroup):
    # The worker alone is put in a 256 MB cgroup (its checkpoints, forked
    # before, are not): an allocation past it is killed by the kernel.
    s = make_session(preload=["numpy"])
    cell(s, "import numpy as np\na = np.arange(1000)\nx = 'kept'")
    _wait_checkpoints(s, 1)
    with open(os.path.join(memory_cgroup, "cgroup.procs"), "w") as f:
        f.write(str(s.status()["worker_pid"]))
    r = s.execute("big = np.ones(2**28)\nbig += 1")  # 2 GB
    assert r.status == "error" and "SIGKILL" in r.error[1] and "restored" in r.error[1], r.error
    r = s.execute("print(x, a.sum(), 'big' in dir())")
    assert r.stdout == "kept 499500 False\n", r
    assert "restored the state after cell 1" in r.notice and "big" in r.notice, r.notice


def test_a_memory_limit_that_fails_an_allocation_keeps_the_session(make_session):
    # RLIMIT_AS makes the allocation fail inside the worker (MemoryError), it
    # does not kill it: the values stay, no restore is needed.
    s = make_session(preload=["numpy"])
    cell(s, "import numpy as np, resource\na = np.ones(1000)")
    r = s.execute("resource.setrlimit(resource.RLIMIT_AS, (2**31, resource.RLIM_INFINITY))\nb = np.ones(2**31)")
    assert r.error is not None and r.error[0] == "MemoryError"
    assert s.execute("print(a.sum())").stdout == "1000.0\n"


def test_crash_then_edit_applies_the_edit_to_the_restored_state(make_session, project):
    project.write("ops.py", "def f(x):\n    return x + 1\n")
    s = make_session()
    cell(s, "import ops\ny = ops.f(1)")
    _wait_checkpoints(s, 1)
    project.write("ops.py", "def f(x):\n    return x * 10\n")
    r = s.execute("import os; os._exit(1)")
    assert r.status == "error"
    r = s.execute("print(y, ops.f(y))")
    assert r.stdout == "2 20\n", r


def test_blas_works_in_a_restored_worker(make_session):
    s = make_session(preload=["numpy"])
    cell(s, "import numpy as np\nm = np.random.default_rng(0).random((400, 400))\np = m @ m")
    _wait_checkpoints(s, 1)
    cell(s, "m = None")
    s.undo()
    r = s.execute("q = m @ m\nprint(bool(np.allclose(p, q)), (m @ m.T).shape)", timeout=60)
    assert r.stdout == "True (400, 400)\n", r


# -- processes -------------------------------------------------------------------------------


def _session_pids(s) -> set[int]:
    return {p.pid for p in psutil.Process(s.pid).children(recursive=True)} | {c["pid"] for c in _checkpoints(s)}


def test_checkpoints_end_with_the_session(make_session):
    s = make_session()
    cell(s, "x = 1")
    cell(s, "x = 2")
    cps = _wait_checkpoints(s, 2)
    s.undo()
    pids = {c["pid"] for c in cps}
    assert all(psutil.pid_exists(p) for p in pids)
    s.close()
    assert wait_no_processes() == []


def test_checkpoints_end_when_the_controller_is_killed(make_session):
    s = make_session()
    cell(s, "x = 1")
    cell(s, "x = 2")
    _wait_checkpoints(s, 2)
    s.undo()
    assert len(tagged_processes()) >= 4  # controller, snapshot, worker(s), checkpoints
    os.kill(s.pid, signal.SIGKILL)
    assert wait_no_processes() == []
    s.close()


def test_torch_works_in_a_restored_worker(make_session):
    # torch's intra-op pool ran in the worker before the checkpoint's fork.
    pytest.importorskip("torch")
    s = make_session(preload=["torch"])
    r = s.execute("import torch\nm = torch.rand(512, 512)\np = m @ m\nn = torch.get_num_threads()", timeout=120)
    assert r.status == "ok", r
    _wait_checkpoints(s, 1)
    cell(s, "m = None")
    s.undo()
    r = s.execute("q = m @ m\nprint(bool(torch.allclose(p, q)), torch.get_num_threads() == n)", timeout=60)
    assert r.stdout == "True True\n", r


def test_the_same_state_can_be_restored_twice(make_session):
    s = make_session()
    cell(s, "x = 1")
    cell(s, "x = 2")
    _wait_checkpoints(s, 2)
    s.undo()
    assert s.execute("print(x)").stdout == "1\n"
    cell(s, "x = 3")
    time.sleep(0.3)
    s.undo()  # back to the same checkpoint, while the worker made from it still runs
    assert s.execute("print(x)").stdout == "1\n"
    cell(s, "x = 4")
    time.sleep(0.3)
    s.undo()
    assert s.execute("print(x)").stdout == "1\n"


def test_the_list_shows_the_previous_worker_after_a_swap(make_session, project):
    project.write("m.py", "K = 1\n")
    s = make_session()
    cell(s, "import m\nx = m.K")
    project.write("m.py", "K = 2\n")
    r = s.execute("y = m.K")
    assert r.reload is not None and r.reload.mode == "fresh", r
    out = s.execute("%forkreload checkpoints").stdout
    assert "after cell 1" in out and "previous worker" in out, out
    # Undo across the swap: the state after cell 1 (old code), then the edit again.
    time.sleep(0.3)
    s.undo()
    r = s.execute("print(x, m.K, 'y' in dir())")
    assert r.stdout == "1 2 False\n", r


def test_memory_only_checkpoints_share_is_counted(make_session):
    # Two checkpoints share the array's old pages once the worker rewrote
    # it: private to neither, held by both, counted once.
    s = make_session(preload=["numpy"])
    cell(s, "import numpy as np\na = np.ones(5_000_000)")  # 40 MB
    cell(s, "b = 1")
    cell(s, "c = 1")
    _wait_checkpoints(s, 3)
    cell(s, "a[:] = 2")
    time.sleep(0.3)
    held = s.status()["checkpoint_memory"]
    assert 35 * 2**20 < held < 80 * 2**20, held


def test_the_threads_a_restore_cannot_bring_back_are_named(make_session):
    s = make_session()
    cell(s, "import threading, time\nstop = threading.Event()\nt = threading.Thread(target=stop.wait, name='poller', daemon=True)\nt.start()")
    cell(s, "x = 1")
    _wait_checkpoints(s, 2)
    text = s.undo()
    assert "not restored: thread 'poller'" in text, text
    assert s.execute("print(t.is_alive())").stdout == "False\n"


def test_a_forged_checkpoint_is_refused(make_session):
    # Someone (same user) connects to the controller's checkpoint socket
    # without the session key, or with it but not as a fork of the worker.
    import glob
    import socket

    from forkreload.channel import Channel

    s = make_session()
    cell(s, "x = 1")
    _wait_checkpoints(s, 1)
    [path] = glob.glob(f"/dev/shm/forkreload-{s.pid}-*/checkpoints.sock") or glob.glob(f"/tmp/forkreload-{s.pid}-*/checkpoints.sock")
    import json

    with open(s.connection_file) as f:
        right_key = json.load(f)["key"].encode()
    for key in (right_key, b"not the key"):  # the right key but not a fork of the worker; a wrong key
        worker = s.status()["worker_pid"]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        # The controller goes on serving while a connection says nothing.
        assert s.status()["worker_pid"] == worker
        Channel(sock, key).send({"op": "checkpoint", "pid": os.getpid(), "worker": worker, "cell": 99, "time": time.time()})
        sock.settimeout(5)
        assert sock.recv(100) == b""  # the controller closed it
        sock.close()
    assert [c["cell"] for c in _checkpoints(s)] == [1]
    cell(s, "x = 2")
    assert "after cell 1" in s.undo()
    assert s.execute("print(x)").stdout == "1\n"


def test_a_restore_from_before_a_preloaded_module_changed_takes_a_fresh_worker(make_session, tmp_path):
    # A package of the user's is preloaded (an editable install, outside the
    # project): its edit rebuilds the snapshot. A checkpoint from before runs
    # the old package: after an undo to it, the next cell runs the new one.
    lib = tmp_path / "lib"
    (lib / "mylib").mkdir(parents=True)
    (lib / "mylib" / "__init__.py").write_text("from .core import f\n")
    (lib / "mylib" / "core.py").write_text("def f():\n    return 'v1'\n")
    s = make_session(preload=["mylib"], env=dict(os.environ, PYTHONPATH=str(lib)))
    cell(s, "import mylib\nkept = mylib.f()")
    _wait_checkpoints(s, 1)
    (lib / "mylib" / "core.py").write_text("def f():\n    return 'v2'\n")
    r = s.execute("later = mylib.f()")
    assert r.reload is not None and "new snapshot" in r.reload.reason, r
    time.sleep(0.3)
    assert "after cell 1" in s.undo()
    r = s.execute("print(kept, mylib.f(), 'later' in dir())")
    assert r.stdout == "v1 v2 False\n", r
    assert "core.py from before its last edit" in r.notice, r.notice
