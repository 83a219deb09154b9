"""JupyterLab's visual debugger on forkreload's kernel, driven in a headless
chromium (tests/browser_debugger.py). Needs what CI does not install:
Debian's `chromium` and `chromium-driver`, and a Python with JupyterLab and
selenium named by FORKRELOAD_LAB_PYTHON (another environment than
forkreload's, as a user's Lab usually is). Skipped without them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LAB_PYTHON = os.environ.get("FORKRELOAD_LAB_PYTHON")


@pytest.mark.timeout(300)
@pytest.mark.skipif(not (LAB_PYTHON and shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs FORKRELOAD_LAB_PYTHON (JupyterLab and selenium), chromium and chromedriver")
def test_jupyterlab_debugger_breakpoints_variables_and_a_swap(tmp_path):
    assert LAB_PYTHON is not None
    script = Path(__file__).with_name("browser_debugger.py")
    p = subprocess.run([LAB_PYTHON, str(script), sys.executable, str(tmp_path / "screenshots")],
                       capture_output=True, text=True, timeout=280)
    assert p.returncode == 0 and "BROWSER CHECK PASSED" in p.stdout, p.stdout + p.stderr[-3000:]
