"""The snapshot server shared by kernels (forkreload/server.py), with real
processes: controllers started through `Session`, the server they spawn,
workers it forks. Each test has its own server directory (tmp_path), so no
test touches a real user's server, and stops every server it started."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from forkreload import server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def srv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The server turned on, in a directory of this test's; stopped after it."""
    d = tmp_path / "server"
    monkeypatch.setenv("FORKRELOAD_SERVER", "1")
    monkeypatch.setenv("FORKRELOAD_SERVER_DIR", str(d))
    monkeypatch.setenv("FORKRELOAD_SERVER_IDLE", "60")
    yield d
    if d.is_dir():
        for info in server.list_servers(str(d)):
            server.ask(str(d), info["kid"], {"op": "stop"})
            server.wait_gone(str(d), info["kid"])
            _gone(info["pid"])


def _gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether process `pid` ended (a zombie counts: its parent reaps it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _servers(d: Path) -> list[dict[str, Any]]:
    return server.list_servers(str(d)) if d.is_dir() else []


def _ppid(s: Any) -> int:
    return int(s.execute("import os; print(os.getppid())").stdout)


def _wait_built(s: Any, timeout: float = 60.0) -> dict[str, Any]:
    """The session's status once no snapshot is being built in the background."""
    deadline = time.monotonic() + timeout
    while True:
        st = s.status()
        if st["learning"] is None or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def _cli(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "forkreload", "server", *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_two_kernels_share_one_server(srv, make_session):
    s1 = make_session(preload=["json"], env={**os.environ, "ONLY_IN_ONE": "1"})
    # Its first worker did not wait for the preloads: a kernel-only server
    # served it while the one holding json was built beside it.
    st1 = _wait_built(s1)
    assert st1["learning"] is None and "json" in st1["snapshot"]["preload"]
    s2 = make_session(preload=["json"])
    st2 = s2.status()
    assert st2["snapshot"]["pid"] == st1["snapshot"]["pid"]
    assert _ppid(s2) == st2["snapshot"]["pid"]  # forked by the shared server
    # Each worker has its own kernel's environment, not the server's.
    assert s1.execute("import os; print(os.environ.get('ONLY_IN_ONE'))").stdout == "1\n"
    assert s2.execute("import os; print(os.environ.get('ONLY_IN_ONE'))").stdout == "None\n"
    mask = os.umask(0o027)
    os.umask(mask)
    assert s2.execute("import os; m = os.umask(0); print(oct(m))").stdout == f"{oct(mask)}\n"  # the kernel's
    out = _cli("status")
    assert f"pid {st1['snapshot']['pid']}" in out and "preloads: json" in out
    full = next(i for i in _servers(srv) if i["preload"] == ["json"])
    status = server.ask(str(srv), full["kid"], {"op": "status"})
    assert status is not None and sorted(status["clients"]) == sorted([s1.pid, s2.pid])


def test_first_server_is_a_detached_fork_of_the_starting_kernel(srv, make_session):
    # `prestart` forks the controller first thing: no interpreter start and
    # import of forkreload before the server's own imports, and the key
    # worked out in the server, beside the controller's imports.
    s = make_session()
    info = _servers(srv)
    assert [i["preload"] for i in info] == [[]]
    pid = info[0]["pid"]
    proc = psutil.Process(pid)
    controller = psutil.Process(s.pid)
    assert proc.cmdline() == controller.cmdline()  # a fork: the controller's command line, not exec'd
    assert proc.ppid() != s.pid  # double-forked: nobody's child, so no zombie of the controller's
    # Its own session (a kernel's process group signals don't reach it), not its leader (no terminal).
    assert os.getsid(pid) not in (os.getsid(s.pid), pid) and os.getpgid(pid) != os.getpgid(s.pid)
    assert s.status()["snapshot"]["pid"] == pid and _ppid(s) == pid
    # Nothing the kernel had open stays open in it (its output pipes: a
    # front end reading them to their end would wait for the server's).
    def fds(p: int) -> dict[int, str]:
        return {int(fd): os.readlink(f"/proc/{p}/fd/{fd}") for fd in os.listdir(f"/proc/{p}/fd")}

    kernel_out = {fds(s.pid)[1], fds(s.pid)[2]}
    # (A fork request carries them to the worker for a moment: the spare's, after a cell.)
    deadline = time.monotonic() + 5
    while kernel_out & set((held := fds(pid)).values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not kernel_out & set(held.values()), ({k: v for k, v in held.items() if v in kernel_out}, kernel_out)
    assert held[0] == "/dev/null" and held[1] == held[2] and held[1].endswith(".log")
    assert proc.cwd() == os.path.realpath(s.status()["cwd"])  # as a spawned one: in the project
    assert s.execute("print(2 + 2)").stdout == "4\n"
    # It outlives the kernel (idle timeout), and `server stop` ends it.
    s.close()
    assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    assert "stopped" in _cli("stop")
    assert _gone(pid)


def _rollup(pid: int) -> dict[str, int]:
    """A process's memory by kind (/proc/PID/smaps_rollup), in MiB."""
    found = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                found[parts[0][:-1]] = int(parts[1]) >> 10
    return found


def _server_status(d: Path, kid: str, until: Any = None, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = server.ask(str(d), kid, {"op": "status"})
        assert status is not None
        if until is None or until(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def test_a_cold_starts_first_worker_does_its_own_imports(srv, make_session, monkeypatch):
    # Forked after the server's imports, the first worker would copy each
    # page of them it writes (a fault each: a kernel's start and first
    # `import numpy, pandas` took ~40 ms longer than they do now). It
    # imports for itself, and the server imports after handing it out.
    monkeypatch.setenv("FORKRELOAD_CHECKPOINTS", "off")  # a checkpoint would share the worker's pages
    s = make_session()
    [info] = _servers(srv)
    first = s.status()["worker_pid"]
    assert psutil.Process(first).ppid() == info["pid"]  # the server's child all the same (it reaps it)
    own = _rollup(first)
    assert own["Shared_Dirty"] < 8, own  # only what the server held before its imports
    status = _server_status(srv, info["kid"], until=lambda st: st["prepared"])
    assert status["prepared"] and first in status["workers"]
    s2 = make_session()
    second = s2.status()["worker_pid"]
    assert psutil.Process(second).ppid() == info["pid"]
    forked = _rollup(second)
    assert forked["Shared_Dirty"] >= 10, forked  # a fork shares the server's imports
    assert s.execute("print(1 + 1)").stdout == s2.execute("print(2)").stdout == "2\n"


def test_a_restart_before_the_server_imported_waits_for_its_imports(srv, make_session):
    s = make_session()
    [info] = _servers(srv)
    first = s.status()["worker_pid"]
    # (The server imports a second after handing its first worker out, or
    # now: this restart's fork is likely to come first.)
    s.execute("x = 41")
    report = s.restart()  # a fork from the server now: it imports at once
    assert report.ok, report
    assert s.execute("print(x + 1)").stdout == "42\n"
    worker = s.status()["worker_pid"]
    assert worker != first and psutil.Process(worker).ppid() == info["pid"]
    assert _server_status(srv, info["kid"])["prepared"]


def test_the_spare_waits_for_the_servers_imports(srv, make_session):
    # Asked for before the server imported, a fork would hold the kernel's
    # loop for those imports: the spare comes once the server says it did.
    s = make_session()
    [info] = _servers(srv)
    assert s.execute("print(1)").stdout == "1\n"
    deadline = time.monotonic() + 30
    while (spare := s.status()["spare_pid"]) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert spare is not None and psutil.Process(spare).ppid() == info["pid"]
    assert _server_status(srv, info["kid"])["prepared"]


def test_a_first_worker_gone_before_its_kernel_asked(srv, tmp_path):
    # The server forks its first worker before it imports; if that worker is
    # gone when the fork request comes, the server imports and forks one.
    from forkreload.channel import Channel

    d = str(srv)
    server.server_dir()  # made as a kernel makes it (0700)
    kid, desc = server.server_key([], [], str(tmp_path))
    r, w = os.pipe()
    proc = subprocess.Popen(server.command(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=tmp_path, env=server.snapshot_env(), start_new_session=True, pass_fds=[w])
    os.close(w)
    cfg = {"dir": d, "kid": kid, "desc": desc, "preload": [], "watch": [], "cwd": str(tmp_path), "idle": 60,
           "ready_fd": w, "first_worker": True}
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(cfg).encode() + b"\n")
    proc.stdin.close()
    worker = None
    try:
        with os.fdopen(r, "rb") as ready:
            assert ready.readline() == b"ready\n"
        [first] = psutil.Process(proc.pid).children()
        first.kill()
        assert _gone(first.pid)
        assert not _server_status(srv, kid)["prepared"]
        conn = server.connect(d, kid)
        assert conn is not None
        chan = Channel(*conn)
        chan.send({"op": "hello", "watch": [], "pid": os.getpid()})
        hello, _ = chan.recv()
        assert hello is not None and hello["op"] == "hello" and hello["pid"] == proc.pid and hello["prepared"] is False
        privdir = tmp_path / "priv"
        privdir.mkdir(mode=0o700)
        chan.send({"op": "fork", "wid": 1, "cwd": str(tmp_path), "privdir": str(privdir), "key": "k", "watch": [],
                   "env": server.snapshot_env(), "umask": 0o022})
        said = []
        while not said or said[-1]["op"] != "fork":
            answer, fds = chan.recv()
            for fd in fds:
                os.close(fd)
            assert answer is not None
            said.append(answer)
        assert [m["op"] for m in said] == ["prepared", "fork"], said  # its clients hear that it imported
        assert not answer.get("error"), answer
        worker = answer["pid"]
        assert worker != first.pid and psutil.Process(worker).ppid() == proc.pid
        assert _server_status(srv, kid)["prepared"]
        chan.close()  # the client gone: its worker ends with it
        assert _gone(worker)
    finally:
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
        server.ask(d, kid, {"op": "stop"})
        proc.wait(timeout=20)


def test_killed_server_is_respawned(srv, make_session):
    s1 = make_session()
    first = s1.status()["snapshot"]["pid"]
    os.kill(first, signal.SIGKILL)
    assert _gone(first)
    # The kernel goes on: its worker died with the server, a new server
    # serves the next one, and the cell says what was lost.
    r = s1.execute("print('alive')")
    deadline = time.monotonic() + 30
    while r.stdout != "alive\n" and time.monotonic() < deadline:
        time.sleep(0.2)
        r = s1.execute("print('alive')")
    assert r.stdout == "alive\n", r
    second = s1.status()["snapshot"]["pid"]
    assert second != first and _ppid(s1) == second
    s2 = make_session()
    assert s2.status()["snapshot"]["pid"] == second


def test_server_is_respawned_on_next_start(srv, make_session):
    s1 = make_session()
    first = s1.status()["snapshot"]["pid"]
    s1.close()
    os.kill(first, signal.SIGKILL)
    assert _gone(first)
    s2 = make_session()
    second = s2.status()["snapshot"]["pid"]
    assert second != first and _ppid(s2) == second
    assert [i["pid"] for i in _servers(srv)] == [second]  # the dead one's files replaced


def test_changed_preload_set_gets_its_own_server(srv, make_session):
    s1 = make_session()
    s2 = make_session(preload=["json"])
    st2 = _wait_built(s2)
    assert st2["snapshot"]["pid"] != s1.status()["snapshot"]["pid"]
    assert sorted(tuple(i["preload"]) for i in _servers(srv)) == [(), ("json",)]


def test_peer_uid_check():
    # Only the user's own uid may connect: this is the check the server
    # applies to each connection's SO_PEERCRED (tested end to end below
    # where a second uid can be used).
    assert server.peer_allowed(os.getuid())
    assert not server.peer_allowed(os.getuid() + 1)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        assert server.peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_another_uid_is_refused(srv, make_session):
    make_session()
    info = _servers(srv)[0]
    sock_path = srv / f"{info['kid']}.sock"
    # The 0700 directory and the 0600 socket already keep other users out;
    # opened up here so that the uid check itself is what refuses.
    os.chmod(srv, 0o711)
    os.chmod(sock_path, 0o666)
    # A forked child (no exec: the interpreter may not be readable by
    # nobody) turns into uid 65534 inside the directory and connects.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.chdir(srv)
            os.setgid(65534)
            os.setuid(65534)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            c.connect(sock_path.name)
            c.settimeout(10)
            os.write(w, repr(c.recv(100)).encode())
        except BaseException as exc:
            os.write(w, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        os.waitpid(pid, 0)
        with os.fdopen(r) as f:
            said = f.read()
    finally:
        os.chmod(srv, 0o700)
    assert said == "b''", said  # closed at once, nothing said
    log = (srv / f"{info['kid']}.log").read_text()
    assert "refused a connection from uid 65534" in log


def test_unsafe_directory_falls_back_to_own_snapshot(srv, make_session, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    log = tmp_path / "controller.log"
    monkeypatch.setenv("FORKRELOAD_SERVER_DIR", str(shared))
    monkeypatch.setenv("FORKRELOAD_LOG", str(log))
    s = make_session()
    snap = s.status()["snapshot"]["pid"]
    assert psutil.Process(snap).ppid() == s.pid  # a per-kernel snapshot
    assert "the snapshot server cannot be used" in log.read_text()
    assert list(shared.iterdir()) == []


def test_server_setting_off_means_own_snapshot(srv, make_session, monkeypatch):
    monkeypatch.setenv("FORKRELOAD_SERVER", "0")
    s = make_session()
    assert psutil.Process(s.status()["snapshot"]["pid"]).ppid() == s.pid
    assert _servers(srv) == []


def test_nothing_left_after_server_stop(srv, make_session):
    s = make_session()
    snap = s.status()["snapshot"]["pid"]
    worker = s.execute("import os; print(os.getpid())").stdout
    s.close()
    assert not _gone(snap, timeout=0.5)  # it outlives its kernel
    assert f"pid {snap}" in _cli("status")
    assert "stopped" in _cli("stop")
    assert _gone(snap) and _gone(int(worker))
    assert not srv.exists()  # its directory too, once empty
    assert _cli("status").strip() == "no snapshot server is running"


def test_sigkill_of_controller_ends_its_workers_not_the_server(srv, make_session):
    s1 = make_session()
    s2 = make_session()
    snap = s1.status()["snapshot"]["pid"]
    workers = [psutil.Process(int(s1.execute("import os; print(os.getpid())").stdout))]
    spare = s1.status()["spare_pid"]
    if spare:
        workers.append(psutil.Process(spare))
    os.kill(s1.pid, signal.SIGKILL)
    s1.proc.wait()
    _gone_now, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []
    assert not _gone(snap, timeout=0.5)
    assert s2.execute("print(1)").stdout == "1\n"
    status = server.ask(str(srv), _servers(srv)[0]["kid"], {"op": "status"})
    assert status is not None and status["clients"] == [s2.pid]


def test_sigkill_of_worker_is_reported_by_the_server(srv, make_session, monkeypatch):
    monkeypatch.setenv("FORKRELOAD_CHECKPOINTS", "0")  # a crash is then a fresh worker, not a restore
    s = make_session()
    s.execute("x = 1")
    pid = int(s.execute("import os; print(os.getpid())").stdout)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)  # noticed through its pidfd; the server, its parent, says how
    r = s.execute("print('x' in globals())")
    assert r.stdout == "False\n", r
    assert r.reload.lost == {"*": "the worker was killed by SIGKILL; its variables were lost"}


def test_sigkill_of_server_ends_its_workers(srv, make_session):
    s = make_session()
    snap = s.status()["snapshot"]["pid"]
    worker = int(s.execute("import os; print(os.getpid())").stdout)
    s.close()
    os.kill(snap, signal.SIGKILL)
    assert _gone(snap) and _gone(worker)
    # Its files stay behind; `server stop` removes them.
    assert "files removed" in _cli("stop")
    assert not srv.exists()


def test_idle_timeout_ends_the_server(srv, make_session, monkeypatch):
    monkeypatch.setenv("FORKRELOAD_SERVER_IDLE", "1")
    s = make_session()
    snap = s.status()["snapshot"]["pid"]
    s.execute("x = 1")
    time.sleep(1.5)
    assert not _gone(snap, timeout=0.2)  # a client keeps it up
    s.close()
    # Asking for its status now and then does not keep it up.
    deadline = time.monotonic() + 10
    while not _gone(snap, timeout=0.3) and time.monotonic() < deadline:
        _cli("status")
    assert _gone(snap, timeout=0.1)
    assert list(srv.iterdir()) == []


def test_server_key(tmp_path):
    kid, desc = server.server_key(["json"], [], str(tmp_path), environ={"PYTHONPATH": "lib", "OMP_NUM_THREADS": "2", "HOME": "/x"})
    assert desc["pythonpath"] == [str((tmp_path / "lib").resolve())]
    assert desc["env"] == {"OMP_NUM_THREADS": "2"}
    assert desc["preload"] == ["json"] and "json" in desc["packages"]
    assert server.server_key(["json"], [], str(tmp_path), environ={"PYTHONPATH": "lib", "OMP_NUM_THREADS": "2"})[0] == kid
    assert server.server_key(["json"], [], str(tmp_path), environ={"OMP_NUM_THREADS": "4"})[0] != kid
    assert server.server_key(["json", "csv"], [], str(tmp_path), environ={})[0] != server.server_key(["json"], [], str(tmp_path), environ={})[0]
    json.dumps(desc)  # written into the server's K.json


def test_edit_of_a_preloaded_package_replaces_its_server(srv, make_session, tmp_path):
    lib = tmp_path / "lib"  # an editable install's source tree, outside the project
    (lib / "mylib").mkdir(parents=True)
    (lib / "mylib" / "__init__.py").write_text("from .core import f\n")
    (lib / "mylib" / "core.py").write_text("def f():\n    return 'v1'\n")
    env = dict(os.environ, PYTHONPATH=str(lib))
    s = make_session(preload=["mylib"], env=env)
    st = _wait_built(s)
    assert "mylib" in st["snapshot"]["preload"]
    old = st["snapshot"]["pid"]
    s.execute("import mylib; kept = mylib.f()")
    # Same key (the package's own files and directory did not change), but
    # the server imported the old core.py: it is retired, a new one serves.
    (lib / "mylib" / "core.py").write_text("def f():\n    return 'v2'\n")
    r = s.execute("print(kept, mylib.f())")
    assert r.stdout == "v1 v2\n", r
    assert r.reload.mode == "fresh" and "new snapshot" in r.reload.reason
    new = s.status()["snapshot"]["pid"]
    assert new != old
    assert _gone(old)  # retired, and its last client (this kernel's old pool) left
    s2 = make_session(preload=["mylib"], env=env)
    assert s2.status()["snapshot"]["pid"] == new
    assert s2.execute("import mylib; print(mylib.f())").stdout == "v2\n"


def test_kernels_started_together_start_one_server_per_key(srv, kernelspec_prefix, project, monkeypatch):
    from jupyter_client import KernelManager

    monkeypatch.setenv("FORKRELOAD_PRELOAD", "json")
    kms = [KernelManager(kernel_name="forkreload") for _ in range(2)]
    clients = []
    try:
        for km in kms:  # both launched before either is up
            km.start_kernel(cwd=str(project.root))
        for km in kms:
            kc = km.client()
            kc.start_channels()
            clients.append(kc)
            kc.wait_for_ready(timeout=60)
        deadline = time.monotonic() + 30
        while len(_servers(srv)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # the full one is built a moment after the first workers are up
        servers = _servers(srv)
        assert sorted(tuple(i["preload"]) for i in servers) == [(), ("json",)]
        full = next(i for i in servers if i["preload"] == ["json"])
        while True:  # each kernel connects to it once it is built
            status = server.ask(str(srv), full["kid"], {"op": "status"})
            assert status is not None
            if len(status["clients"]) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert sorted(status["clients"]) == sorted(km.provisioner.pid for km in kms)  # type: ignore[attr-defined]
    finally:
        for kc in clients:
            kc.stop_channels()
        for km in kms:
            km.shutdown_kernel(now=True)


def test_server_stop_while_a_kernel_runs(srv, make_session, monkeypatch):
    monkeypatch.setenv("FORKRELOAD_CHECKPOINTS", "0")
    s = make_session()
    s.execute("x = 1")
    first = s.status()["snapshot"]["pid"]
    assert "stopped" in _cli("stop")
    assert _gone(first)
    time.sleep(0.3)
    r = s.execute("print('x' in globals())")
    assert r.stdout == "False\n", r
    assert "its snapshot server ended" in r.notice
    assert s.status()["snapshot"]["pid"] not in (None, first)


def test_upgraded_preload_gets_a_new_server_that_replaces_the_old(srv, make_session, tmp_path):
    lib = tmp_path / "site"
    (lib / "mylib").mkdir(parents=True)
    init = lib / "mylib" / "__init__.py"
    init.write_text("VERSION = 1\n")
    env = dict(os.environ, PYTHONPATH=str(lib))
    s1 = make_session(preload=["mylib"], env=env)
    old = _wait_built(s1)["snapshot"]["pid"]
    s1.close()
    assert not _gone(old, timeout=0.3)  # idle, waiting for the next kernel
    init.write_text("VERSION = 2\n")  # "pip install -U mylib": another mtime, another key
    os.utime(init, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    s2 = make_session(preload=["mylib"], env=env)
    new = _wait_built(s2)["snapshot"]["pid"]
    assert new != old
    assert s2.execute("import mylib; print(mylib.VERSION)").stdout == "2\n"
    assert _gone(old)  # retired by the new one: it had no client left
    assert [i["pid"] for i in _servers(srv) if i["preload"] == ["mylib"]] == [new]


def test_first_server_keeps_nothing_the_kernel_was_given(srv, tmp_path, project):
    # A launcher may leave a descriptor open in the kernel (a pipe it reads
    # to its end): the server forked from the kernel must not hold it, or
    # the launcher would wait for the server's idle timeout.
    from jupyter_client.connect import write_connection_file

    cf, _ = write_connection_file(str(tmp_path / "kernel.json"))
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "forkreload", "kernel", "-f", cf], cwd=project.root, pass_fds=(w,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    try:
        deadline = time.monotonic() + 30
        while not _servers(srv) and time.monotonic() < deadline:
            time.sleep(0.05)
        [info] = _servers(srv)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    ready, _, _ = select.select([r], [], [], 10)
    assert ready and os.read(r, 1) == b""  # EOF: nobody else holds its write end
    os.close(r)
    assert not _gone(info["pid"], timeout=0.2)  # the server lives on (idle timeout)


def test_libraries_a_preload_brings_are_not_learned_apart(srv, make_session, project):
    # The first worker of a start comes from the kernel-only server, so
    # importing pandas there reports pandas and what pandas imports (numpy,
    # dateutil, pytz). Once the pandas server serves forks, none of those
    # is remembered apart: the next kernel has the same preload set, so the
    # same server, and no second server holding pandas is built.
    from forkreload.config import LearnedModules

    s1 = make_session(preload=["pandas"], learn=True)
    assert s1.execute("import pandas, numpy; print('ok')").stdout == "ok\n"
    deadline = time.monotonic() + 60
    while "pandas" not in (st1 := _wait_built(s1))["snapshot"]["preload"]:
        assert time.monotonic() < deadline, st1
        time.sleep(0.1)
    time.sleep(0.5)  # a learning build would have been started by now
    st1 = _wait_built(s1)
    assert st1["learning"] is None
    learned = LearnedModules(str(project.root)).modules
    assert not {"numpy", "dateutil", "pytz"} & set(learned), learned
    s2 = make_session(preload=["pandas"], learn=True)
    assert s2.status()["snapshot"]["pid"] == st1["snapshot"]["pid"]
    assert sorted(i["preload"] for i in _servers(srv)) == [[], ["pandas"]]


@pytest.mark.parametrize("preload", [["numpy"], ["numpy.random"]])
def test_workers_of_one_server_draw_different_random_numbers(srv, make_session, preload):
    # Forks of one snapshot share its generators' state unless reseeded; a
    # snapshot whose numpy has not imported numpy.random leaves that import
    # (and its seeding from the OS) to each worker.
    _wait_built(make_session(preload=preload))  # starts the server
    s2, s3 = make_session(preload=preload), make_session(preload=preload)
    pid = s2.status()["snapshot"]["pid"]
    assert _ppid(s2) == pid and _ppid(s3) == pid  # both forked from it
    cell = "import random, numpy as np; print(random.random(), np.random.rand())"
    a, b = s2.execute(cell).stdout, s3.execute(cell).stdout
    assert a.split()[0] != b.split()[0] and a.split()[1] != b.split()[1], (a, b)


def test_a_workers_kernel_lists_the_snapshots_modules_without_walking_them(srv, make_session):
    # ipykernel lists every module's file at a kernel's start (for its
    # debugger); a worker gets the list the snapshot made, the same list.
    _wait_built(make_session(preload=["json"]))
    s = make_session(preload=["json"])
    out = s.execute(
        "import sys, forkreload.worker as w, ipykernel.ipkernel as ik\n"
        "files = get_ipython().kernel._kernel_modules\n"
        "print(w._lean_start, ik.sys is sys, all(type(f) is str for f in files), ik.__file__ in files,"
        " w.__file__ in files, len(files) > 300,"
        # imported by the kernel's start before it lists them (its event loop):
        " sys.modules['tornado.platform.asyncio'].__file__ in files)"
    ).stdout
    assert out == "True True True True True True True\n", out


def test_a_second_learned_snapshot_without_a_swap_between(srv, project, make_session, tmp_path):
    # The snapshot learned first is replaced before any worker was forked
    # from it: it is closed in the step that takes the new one, whose
    # events must not be read from it.
    log = tmp_path / "controller.log"
    project.write("m.py", "K = 1\n")
    s = make_session(learn=True, env={**os.environ, "FORKRELOAD_LOG": str(log)})
    for lib in ("psutil", "pexpect"):
        s.execute(f"import m, {lib}")
        deadline = time.monotonic() + 60
        while lib not in s.status()["snapshot"]["preload"] or s.status()["learning"]:
            assert time.monotonic() < deadline, s.status()
            time.sleep(0.1)
    assert s.execute("print(m.K)").stdout == "1\n"
    project.write("m.py", "K = 2\n")
    r = s.execute("print(m.K, 'pexpect' in dir())")
    assert r.stdout == "2 True\n" and r.reload.mode == "fresh"
    assert "internal error" not in log.read_text()
