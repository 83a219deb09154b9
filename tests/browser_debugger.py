"""JupyterLab's visual debugger on a forkreload kernel, in a real browser.

Run by tests/test_browser.py (or by hand) with a Python that has JupyterLab
and selenium, in another environment than forkreload's (the usual case:
Lab from pipx or conda base), and Debian's `chromium` and `chromium-driver`,
headless:

    LAB_PYTHON tests/browser_debugger.py FORKRELOAD_PYTHON SCREENSHOT_DIR

A notebook cell gets a breakpoint from the editor's gutter; run, it stops
there with the values in the variables panel, and continuing gives the
cell's output. After a messy edit of the user's module (a fresh worker) the
same breakpoint stops the next run in the new worker, with the migrated
values; stepping in reaches the user's module and its locals. Prints
"BROWSER CHECK PASSED" and exits 0; on a failure, a screenshot `fail.png`
and the end of JupyterLab's log.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

T = TypeVar("T")

MODULE = "SCALE = {}\n\ndef f(x):\n    y = x * SCALE\n    return y\n"
CELLS = ["import mymod\na = 5", "b = mymod.f(a)\nc = b + 1\nprint('c is', c)"]
NOTEBOOK = "window.jupyterapp.shell.currentWidget"


class Lab:
    """A JupyterLab server on a project, and a headless browser on its notebook."""

    def __init__(self, forkreload_python: str, shots: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="forkreload-lab-"))
        self.project = self.root / "project"
        self.project.mkdir()
        self.shots = shots
        (self.project / "mymod.py").write_text(MODULE.format(2))
        cells = [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "source": src, "outputs": [], "execution_count": None}
                 for i, src in enumerate(CELLS)]
        spec = {"name": "forkreload", "display_name": "forkreload", "language": "python"}
        (self.project / "nb.ipynb").write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": spec}, "nbformat": 4, "nbformat_minor": 5}))
        prefix = self.root / "prefix"
        subprocess.run([forkreload_python, "-m", "forkreload", "kernel", "install", "--prefix", str(prefix)], check=True, capture_output=True)
        self.forkreload_python = forkreload_python
        self.env = dict(
            os.environ, JUPYTER_PATH=str(prefix / "share" / "jupyter"), FORKRELOAD_SERVER_DIR=str(self.root / "server"),
            FORKRELOAD_CACHE_DIR=str(self.root / "cache"), JUPYTER_CONFIG_DIR=str(self.root / "config"),
            JUPYTER_RUNTIME_DIR=str(self.root / "runtime"), JUPYTER_DATA_DIR=str(self.root / "data"),
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = open(self.root / "lab.log", "w")  # noqa: SIM115 - closed in close()
        self.server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={self.port}", "--ServerApp.ip=127.0.0.1",
             "--IdentityProvider.token=tok", f"--ServerApp.root_dir={self.project}",
             "--LabApp.expose_app_in_browser=True", "--allow-root"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.driver: webdriver.Chrome | None = None

    def open(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                time.sleep(0.2)
        opts = Options()
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-dev-shm-usage", "--window-size=1400,1000"):
            opts.add_argument(arg)
        opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        self.driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
        self.driver.get(f"http://127.0.0.1:{self.port}/lab/tree/nb.ipynb?token=tok")

    def js(self, code: str) -> Any:
        assert self.driver is not None
        return self.driver.execute_script(code)

    def command(self, name: str) -> None:
        """A JupyterLab command, not awaited (a cell stopped at a breakpoint never resolves it)."""
        self.js(f"window.jupyterapp.commands.execute({name!r})")

    def find(self, css: str) -> list[WebElement]:
        assert self.driver is not None
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait(self, cond: Callable[[], T | None], what: str, timeout: float = 60) -> T:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = cond()
            except Exception:  # the page is still building what cond reads
                value = None
            if value:
                return value
            time.sleep(0.2)
        self.shot("fail")
        raise TimeoutError(f"waited in vain for: {what}")

    def shot(self, name: str) -> None:
        if self.driver is not None:
            self.driver.save_screenshot(str(self.shots / f"{name}.png"))

    def gutter(self, cell: int, line: int) -> WebElement:
        """The breakpoint gutter of `line` (from 1) in notebook cell `cell` (from 1)."""
        where = f".jp-Notebook .jp-Cell:nth-child({cell})"
        number = next(e for e in self.find(f"{where} .cm-lineNumbers .cm-gutterElement") if e.text.strip() == str(line))
        return next(e for e in self.find(f"{where} .cm-breakpoint-gutter .cm-gutterElement")
                    if e.size["height"] > 0 and abs(e.location["y"] - number.location["y"]) < 3)

    def frames(self) -> list[str]:
        return [f.text.replace("\n", " ") for f in self.find(".jp-DebuggerCallstackFrame")]

    def variables(self) -> str:
        return " ".join(self.find(".jp-DebuggerVariables")[0].text.split())

    def outputs(self) -> str:
        return str(self.js("return Array.from(document.querySelectorAll('.jp-OutputArea-output')).map(e => e.innerText).join('|')"))

    def close(self) -> None:
        if self.driver is not None:
            self.driver.quit()
        self.server.terminate()
        self.server.wait(20)
        self.log.close()
        subprocess.run([self.forkreload_python, "-m", "forkreload", "server", "stop"], env=self.env, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def check(lab: Lab) -> None:
    lab.open()
    kernel = f"{NOTEBOOK}.sessionContext.session.kernel"
    lab.wait(lambda: lab.js(f"return !!(window.jupyterapp && {NOTEBOOK} && {NOTEBOOK}.sessionContext.session && {kernel})"), "the notebook's kernel")
    lab.wait(lambda: lab.js(f"return {kernel}.status") == "idle", "the kernel idle")
    print("kernel:", lab.js(f"return {kernel}.name"))
    lab.wait(lambda: lab.find(".jp-DebuggerBugButton"), "the debugger's switch")[0].click()
    lab.wait(lambda: lab.find(".jp-DebuggerVariables") and lab.find(".jp-DebuggerVariables")[0].is_displayed(), "the debugger on")
    lab.wait(lambda: lab.gutter(2, 2), "the breakpoint gutter").click()
    lab.wait(lambda: lab.find(".jp-DebuggerBreakpoint"), "the breakpoint listed")
    print("breakpoint set on line 2 of cell 2")

    def stops_and_continues(b: int) -> None:
        t0 = time.monotonic()
        lab.wait(lambda: lab.frames() and lab.frames()[0].endswith(":2"), "stopped at the breakpoint")
        print(f"stopped at line 2 after {time.monotonic() - t0:.2f} s: {lab.frames()[0]}")
        lab.wait(lambda: f"b {b}" in lab.variables(), f"b = {b} in the variables panel")
        print("variables panel:", lab.variables())
        lab.command("debugger:continue")
        lab.wait(lambda: f"c is {b + 1}" in lab.outputs(), f"the output 'c is {b + 1}'")

    lab.command("notebook:run-all-cells")
    stops_and_continues(10)
    # A messy edit (a module constant): the next cell runs in a fresh worker,
    # and the debug session follows it there.
    (lab.project / "mymod.py").write_text(MODULE.format(3))
    time.sleep(0.3)
    lab.js(f"{NOTEBOOK}.content.activeCellIndex = 1")
    lab.command("notebook:run-cell")
    stops_and_continues(15)
    notice = [o for o in lab.outputs().split("|") if "forkreload:" in o]
    print("notice:", notice)
    assert notice and "fresh worker" in notice[0], notice
    # Into the user's module: a breakpoint on line 1 too, then step in.
    lab.gutter(2, 1).click()
    lab.wait(lambda: len(lab.find(".jp-DebuggerBreakpoint")) >= 2, "the second breakpoint listed")
    lab.command("notebook:run-cell")
    lab.wait(lambda: lab.frames() and lab.frames()[0].endswith(":1"), "stopped at line 1")
    lab.command("debugger:stepIn")
    lab.wait(lambda: lab.frames() and "mymod.py" in lab.frames()[0], "stepped into mymod.f")
    print("stepped in:", lab.frames()[:2])
    lab.wait(lambda: "x 5" in lab.variables(), "f's argument in the variables panel")
    print("variables panel:", lab.variables())
    lab.command("debugger:continue")
    lab.wait(lambda: lab.frames() and lab.frames()[0].endswith(":2"), "stopped at line 2")
    lab.command("debugger:continue")
    lab.wait(lambda: not lab.frames() and "c is 16" in lab.outputs() and "fresh worker" not in lab.outputs(), "the re-run's output")


def main() -> int:
    shots = Path(sys.argv[2])
    shots.mkdir(parents=True, exist_ok=True)
    lab = Lab(sys.argv[1], shots)
    try:
        check(lab)
    except Exception as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}")
        lab.log.flush()
        print((lab.root / "lab.log").read_text()[-3000:])
        return 1
    finally:
        lab.close()
    print("BROWSER CHECK PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
