"""forkreload's kernelspec seen from a Jupyter installed somewhere else.

The usual setup: JupyterLab runs from pipx, conda's base or the system,
and forkreload lives in the project's virtualenv. The jupyter_client there
cannot import forkreload. This test builds such an environment (a venv with
jupyter_client and nothing of forkreload, built once per test session) and
drives the installed kernelspec from it: start, a cell, an edit patched in
place, an edit that needs a fresh worker, "Restart kernel". It also checks
what `forkreload doctor` says of that Jupyter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

KERNELS = Path("share") / "jupyter" / "kernels"


_BUILT: dict[str, Path | str] = {}  # requirement -> the venv's python, or why not


def _venv_with(requirement: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with `requirement` from the package index, without forkreload
    (built once per test session; skips the test when pip cannot)."""
    if requirement not in _BUILT:
        _BUILT[requirement] = _build(requirement, tmp_path_factory.mktemp("other-jupyter") / "venv")
    built = _BUILT[requirement]
    if isinstance(built, str):
        pytest.skip(built)
    return built


def _build(requirement: str, venv: Path) -> Path | str:
    t0 = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True, timeout=120)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"cannot build a second venv: {exc}"
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        r = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return f"pip install {requirement!r} into a second venv took over 240 s (no package index?)"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return f"pip cannot install {requirement!r} into a second venv (no package index reachable?): {last}"
    print(f"\nsecond venv with {requirement} built in {time.perf_counter() - t0:.1f} s")
    return python


@pytest.fixture(scope="session")
def other_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the latest jupyter_client, without forkreload."""
    return _venv_with("jupyter_client", tmp_path_factory)


def _install(prefix: Path, *args: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "forkreload", "kernel", "install", "--prefix", str(prefix), *args], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr


DRIVER = r'''
import json, os, sys, time
from pathlib import Path

try:
    import forkreload  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("forkreload is importable from this interpreter: the test would prove nothing")
import jupyter_client
from jupyter_client import KernelManager

proj = Path(sys.argv[1])
shapes = proj / "shapes.py"
report = {"jupyter_client": jupyter_client.__version__, "python": sys.executable, "times": {}}


def run(kc, code):
    out = {"notice": "", "stdout": "", "result": None}

    def hook(msg):
        kind, content = msg["msg_type"], msg["content"]
        tag = (msg.get("metadata") or {}).get("forkreload")
        if kind == "stream" and tag != "progress":
            out["notice" if tag == "notice" else "stdout"] += content["text"]
        elif kind == "execute_result":
            out["result"] = content["data"]["text/plain"]
        elif kind == "error":
            out["error"] = content["ename"] + ": " + content["evalue"]

    t0 = time.perf_counter()
    reply = kc.execute_interactive(code, timeout=60, output_hook=hook)
    out["seconds"] = time.perf_counter() - t0
    out["status"] = reply["content"]["status"]
    out["count"] = reply["content"].get("execution_count")
    return out


t0 = time.perf_counter()
km = KernelManager(kernel_name="forkreload")
km.start_kernel(cwd=str(proj))
kc = km.client()
kc.start_channels()
try:
    kc.wait_for_ready(timeout=60)
    report["times"]["start"] = time.perf_counter() - t0
    report["provisioner"] = type(km.provisioner).__name__
    report["first"] = run(kc, "import os, shapes; x = shapes.area(2); pid = os.getpid(); x")
    shapes.write_text(shapes.read_text().replace("return 3 * r * r", "return 4 * r * r"))
    report["body"] = run(kc, "shapes.area(2), x")
    shapes.write_text(shapes.read_text().replace("K = 1", "K = 2"))
    report["constant"] = run(kc, "shapes.K, shapes.area(2), x, os.getpid() != pid")
    controller = km.provisioner.process.pid
    t0 = time.perf_counter()
    km.restart_kernel()
    kc.wait_for_ready(timeout=60)
    report["restart"] = run(kc, "'x' in globals(), shapes.K if 'shapes' in globals() else None")
    report["times"]["restart"] = time.perf_counter() - t0
    report["relaunched"] = km.provisioner.process.pid != controller
    report["after_restart"] = run(kc, "import shapes; shapes.K, shapes.area(2)")
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=False)
print(json.dumps(report))
'''


@pytest.mark.timeout(400)
@pytest.mark.parametrize("requirement", ["jupyter_client", "jupyter_client>=7,<8"], ids=["latest", "7.x"])
def test_kernel_driven_by_a_jupyter_client_without_forkreload(requirement: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    other_python = _venv_with(requirement, tmp_path_factory)
    prefix = tmp_path / "prefix"
    _install(prefix)  # the default kernelspec
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "shapes.py").write_text("K = 1\n\n\ndef area(r):\n    return 3 * r * r\n")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JUPYTER_PATH")}
    env["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
    t0 = time.perf_counter()
    r = subprocess.run([str(other_python), str(driver), str(proj)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["python"] == str(other_python)
    assert rep["provisioner"] == "LocalProvisioner"
    first, body, constant, restart, after = rep["first"], rep["body"], rep["constant"], rep["restart"], rep["after_restart"]
    assert first["status"] == "ok" and first["result"] == "12", first
    assert body["status"] == "ok" and body["result"] == "(16, 12)", body
    assert "patched shapes.area in place" in body["notice"], body
    assert constant["status"] == "ok" and constant["result"] == "(2, 16, 12, True)", constant
    assert "fresh worker" in constant["notice"] and "module constant K changed" in constant["notice"], constant
    # "Restart kernel" through a plain kernelspec: a new controller, variables gone.
    assert rep["relaunched"] is True
    assert restart["status"] == "ok" and restart["result"] == "(False, None)" and restart["count"] == 1, restart
    assert after["result"] == "(2, 16)", after
    print(
        f"\njupyter_client {rep['jupyter_client']} in a venv without forkreload: start {rep['times']['start']:.2f} s, "
        f"in place {body['seconds'] * 1000:.0f} ms, fresh worker {constant['seconds'] * 1000:.0f} ms, "
        f"restart {rep['times']['restart']:.2f} s; whole script {wall:.1f} s"
    )


@pytest.mark.timeout(400)
def test_doctor_says_which_jupyter_shows_which_kernelspec(other_python: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from forkreload.doctor import THIS_ENVIRONMENT, report_front_ends

    prefix = tmp_path / "prefix"
    _install(prefix)
    _install(prefix, "--name", "fr-fast", "--provisioner")
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    monkeypatch.setenv("PATH", str(other_python.parent))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    lines: list[str] = []
    assert report_front_ends(lines.append) is False  # one Jupyter drops fr-fast
    text = "\n".join(lines)
    other = text.index(str(other_python.parent / "jupyter"))
    here = text.index(THIS_ENVIRONMENT)
    assert other < here, text
    other_part, here_part = text[other:here], text[here:]
    assert "jupyter_client" in other_part, text
    assert_line(other_part, "forkreload", "shown", "relaunches the controller")
    assert_line(other_part, "fr-fast", "NOT SHOWN", "without --provisioner")
    assert_line(here_part, "forkreload", "shown", "relaunches the controller")
    assert_line(here_part, "fr-fast", "shown", "is fast")


def assert_line(text: str, name: str, *words: str) -> None:
    [line] = [ln for ln in text.splitlines() if ln.split()[:1] == [name]]
    for w in words:
        assert w in line, (w, line)


def test_interpreter_of_console_scripts(tmp_path: Path) -> None:
    from forkreload.doctor import interpreter_of

    cases = {
        "#!/opt/env/bin/python3.11\nimport sys\n": "/opt/env/bin/python3.11",
        # pip's form for a path too long, or with spaces, for a shebang
        "#!/bin/sh\n'''exec' \"/a b/bin/python\" \"$0\" \"$@\"\n' '''\n": "/a b/bin/python",
        "#!/usr/bin/env bash\nexec pyenv ...\n": None,
        "not a script": None,
    }
    for i, (head, python) in enumerate(cases.items()):
        script = tmp_path / f"jupyter{i}"
        script.write_text(textwrap.dedent(head))
        assert interpreter_of(str(script)) == python, head


def test_install_with_provisioner_warns_of_the_jupyter_that_drops_it(other_python: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=str(other_python.parent), JUPYTER_PATH=str(prefix / "share" / "jupyter"))
    r = subprocess.run(
        [sys.executable, "-m", "forkreload", "kernel", "install", "--prefix", str(prefix), "--provisioner"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    [warning] = [line for line in r.stdout.splitlines() if "NOT SHOWN" in line]
    assert warning.strip().startswith(str(other_python.parent / "jupyter")), r.stdout
