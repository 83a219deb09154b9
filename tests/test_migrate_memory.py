"""Migration memory through a real Session: views stay views, writes to a
migrated array cost no second copy and never reach the previous worker, a
small /dev/shm is no limit, and a process killed in the middle of a swap
leaves nothing named behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
from forkreload.channel import remove_dead_private_dirs

from conftest import tagged_processes

pytestmark = pytest.mark.timeout(120)

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


def private_dirs(pid: int) -> list[str]:
    """The directories controller `pid` made (ipc sockets, dump indexes)."""
    found = []
    for base in filter(None, {SHM, "/tmp", os.environ.get("TMPDIR")}):
        found += [os.path.join(base, n) for n in os.listdir(base) if n.startswith(f"forkreload-{pid}-")]
    return found


def memfds(pid: int) -> list[str]:
    """The memfds process `pid` holds open."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return [link for link in links if link.startswith("/memfd:forkreload")]


STATUS = """
def _status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024
"""


@pytest.mark.parametrize("via", ["process", "memfd"])
def test_views_writes_and_the_previous_worker(project, make_session, monkeypatch, via):
    monkeypatch.setenv("FORKRELOAD_MIGRATE_VIA", via)
    s = make_session(preload=["numpy", "pandas"])
    r = s.execute(
        "import numpy as np, pandas as pd, os, json\n"
        "a = np.arange(12_500_000.0)\n"  # 100 MB
        "v = a[::2]\n"
        "df = pd.DataFrame({c: np.arange(1_000_000.0) for c in 'abcd'})\n"
        "ser = df['b']\n"
        "pid0 = os.getpid()\n" + STATUS
    )
    assert r.status == "ok", r
    rep = s.restart()
    assert rep.ok and rep.previous, rep
    r = s.execute(
        textwrap.dedent(
            """
            out = {"moved": os.getpid() != pid0,
                   "views": [bool(np.shares_memory(a, v)), bool(np.shares_memory(df["b"].values, ser.values))],
                   "strides": v.strides[0]}
            v[1] = -1.0
            out["through"] = float(a[2])
            anon = _status("RssAnon")
            a[:] = 3.0  # every byte of the migrated array
            out["anon_mb"] = (_status("RssAnon") - anon) / 2**20
            out["memfd"] = any("memfd:forkreload-buffers" in m for m in open("/proc/self/maps"))
            print(json.dumps(out))
            """
        )
    )
    assert r.status == "ok", r
    out = json.loads(r.stdout)
    assert out["moved"] and out["views"] == [True, True] and out["strides"] == 16
    assert out["through"] == -1.0
    # The pages written are the memory the array was migrated into (private
    # memory, or a memfd mapped shared), not copies of it.
    assert out["anon_mb"] < 20, out
    assert out["memfd"] is (via == "memfd")
    new_pid = s.status()["worker_pid"]

    # The previous worker never saw those writes, and once it runs a cell it
    # holds no memory of the export.
    r = s.execute("%forkreload back")
    r = s.execute("import os\nprint(os.getpid() == pid0, a[0], a[2], v[1], a.sum() == 12_500_000 * 12_499_999 / 2)")
    assert r.stdout == "True 0.0 2.0 2.0 True\n", r
    assert memfds(s.status()["worker_pid"]) == []
    assert s.status()["previous_pid"] == new_pid

    # From a worker whose arrays were migrated themselves: the next swap
    # carries what was written there, and the worker left behind keeps its
    # values while the new one writes.
    s.execute("%forkreload back")  # to the worker that wrote 3.0
    assert s.status()["worker_pid"] == new_pid
    rep = s.restart()
    assert rep.ok, rep
    r = s.execute(
        "print(a[0], a[2], v[1], bool(np.shares_memory(a, v)), bool(np.shares_memory(df['b'].values, ser.values)))\n"
        "a[:] = 4.0\n"
        "stale = [m for m in open('/proc/self/maps') if '(deleted)' in m and 'memfd:' not in m]\n"
        "print(stale)"
    )
    assert r.stdout == "3.0 3.0 3.0 True True\n[]\n", r
    r = s.execute("%forkreload back")
    assert s.status()["worker_pid"] == new_pid
    assert s.execute("print(a[0], a[-1], v[1])").stdout == "3.0 3.0 3.0\n"


def test_a_small_dev_shm_is_no_limit(tmp_path):
    # Docker's default /dev/shm (64 MiB), in a private mount namespace.
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root for a private tmpfs")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64m tmpfs /dev/shm"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private /dev/shm: {probe.stderr.decode().strip()}")
    (tmp_path / "m.py").write_text("V = 1\n")
    script = textwrap.dedent(
        f"""
        import os, pathlib, time, json
        from forkreload import Session
        root = pathlib.Path({str(tmp_path)!r})
        with Session(cwd=root, preload=["numpy"], quiet=True) as s:
            s.execute("import numpy as np, m\\nbig = np.ones(200 * 2**20 // 8)\\nbig[-1] = 5")
            time.sleep(1.1)
            (root / "m.py").write_text("V = 2\\n")
            r = s.execute("print(m.V, big.sum())")
            shm = os.statvfs("/dev/shm")
            print(json.dumps({{"stdout": r.stdout, "ok": r.reload.ok, "mode": r.reload.mode,
                              "lost": r.reload.lost, "shm_mb": shm.f_blocks * shm.f_frsize / 2**20}}))
        """
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$0" -c "$1"', sys.executable, script],
        capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["shm_mb"] == 64
    assert (out["ok"], out["mode"], out["lost"]) == (True, "fresh", {})
    assert out["stdout"] == f"2 {200 * 2**20 // 8 + 4:.1f}\n"


@pytest.mark.parametrize(
    "target, delay",
    [("controller", 0.03), ("old", 0.0), ("old", 0.04), ("new", 0.02), ("new", 0.08)],
)
def test_sigkill_during_a_swap_leaves_nothing(project, make_session, target, delay):
    s = make_session(preload=["numpy"])
    r = s.execute("import numpy as np\nbig = np.ones(150 * 2**20 // 8)\nkept = 'yes'")
    assert r.status == "ok", r
    st = s.status()
    controller = s.pid
    victim = {"controller": controller, "old": st["worker_pid"], "new": st["spare_pid"]}[target]
    assert victim

    answers: list[object] = []

    def restart() -> None:
        try:
            answers.append(s.restart(timeout=60))
        except Exception as exc:
            answers.append(exc)

    t = threading.Thread(target=restart)
    t.start()
    time.sleep(delay)
    os.kill(victim, signal.SIGKILL)
    if target == "controller":
        procs = tagged_processes()
        s.proc.wait()
        t.join(timeout=70)
        gone, alive = psutil.wait_procs(procs, timeout=10)
        assert alive == []
        # The next controller to start removes what the dead one left.
        remove_dead_private_dirs("forkreload-", SHM)
        remove_dead_private_dirs("forkreload-")
        assert private_dirs(controller) == []
        return
    t.join(timeout=70)
    assert answers, "the restart did not come back"
    # The session goes on, in whichever worker survived: the variables die
    # with the worker that held them (the old one before the swap ended, the
    # new one after; the kill may even land under this cell) ...
    r = s.execute("print(kept)")
    if r.error and r.error[0] == "WorkerDied":
        r = s.execute("print(kept)")
    assert r.stdout == "yes\n" or r.error[0] == "NameError", r
    # ... no dump index is left in the controller's private dir ...
    for d in private_dirs(controller):
        assert [n for n in os.listdir(d) if n.startswith("ns-")] == []
    # ... and the worker that ran that cell holds no export's memory.
    assert memfds(s.status()["worker_pid"]) == []
    s.close()
    assert private_dirs(controller) == []
