"""Shared fixtures: throw-away user projects, sessions that always close, and
a check after every test that no forkreload process was left behind."""

from __future__ import annotations

import os
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

# Every process a test starts inherits this tag, so leaks are found even
# when a leaked process was re-parented away from the test runner.
TAG = f"forkreload-test-{uuid.uuid4().hex[:8]}"
os.environ["FORKRELOAD_TEST_TAG"] = TAG
# Learned preloads and IPython's history go to throw-away places, not ~.
_SCRATCH = tempfile.mkdtemp(prefix="forkreload-tests-")
os.environ["FORKRELOAD_CACHE_DIR"] = os.path.join(_SCRATCH, "cache")
os.environ["IPYTHONDIR"] = os.path.join(_SCRATCH, "ipython")
# A snapshot server outlives its kernels (its idle timeout), which the check
# that no process is left after a test would count as a leak: kernels start
# their own snapshot unless a test (test_server.py) turns the server on, and
# never reach a real user's server directory. FORKRELOAD_TEST_SERVER=1 runs
# them all through a server instead, one that ends with its last kernel.
os.environ["FORKRELOAD_SERVER"] = os.environ.get("FORKRELOAD_TEST_SERVER", "0")
os.environ["FORKRELOAD_SERVER_IDLE"] = "0"
os.environ["FORKRELOAD_SERVER_DIR"] = os.path.join(_SCRATCH, "server")


def tagged_processes() -> list[psutil.Process]:
    found = []
    me = os.getpid()
    for p in psutil.process_iter(["pid"]):
        if p.pid == me:
            continue
        try:
            if p.environ().get("FORKRELOAD_TEST_TAG") == TAG and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_no_processes(timeout: float = 10.0, which: Callable[[], list[psutil.Process]] = tagged_processes) -> list[psutil.Process]:
    """Wait until `which()` finds no process; return those still there."""
    deadline = time.monotonic() + timeout
    left = which()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = which()
    return left


@pytest.fixture(autouse=True)
def no_leftover_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("shared_kernel"):
        # The kernel lives across the class's tests; its module checks after.
        yield
        return
    yield
    left = wait_no_processes()
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"


class Project:
    """A user's project directory whose files the test edits."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, name: str, source: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        return path


@pytest.fixture
def project(tmp_path: Path) -> Project:
    root = tmp_path / "proj"
    root.mkdir()
    return Project(root)


@pytest.fixture
def ipython_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "ipython"
    monkeypatch.setenv("IPYTHONDIR", str(d))
    return d


@pytest.fixture
def make_session(project: Project, ipython_dir: Path) -> Iterator[Callable[..., object]]:
    from forkreload import Session

    sessions: list[Session] = []

    def make(**kw: object) -> Session:
        kw.setdefault("cwd", project.root)
        s = Session(**kw)  # type: ignore[arg-type]
        sessions.append(s)
        return s

    yield make
    for s in sessions:
        s.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "shared_kernel: one kernel serves a whole test class (leaks checked per module)")


@pytest.fixture(scope="session")
def kernelspec_prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """forkreload's kernelspec installed by its own CLI into a private prefix."""
    import subprocess
    import sys

    prefix = tmp_path_factory.mktemp("jupyter-prefix")
    subprocess.run([sys.executable, "-m", "forkreload", "kernel", "install", "--prefix", str(prefix)], check=True, capture_output=True)
    data = prefix / "share" / "jupyter"
    os.environ["JUPYTER_PATH"] = str(data) + os.pathsep + os.environ.get("JUPYTER_PATH", "")
    return prefix
