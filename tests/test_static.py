"""The package's types and lint, checked with the tests (mypy --strict and
ruff, configured in pyproject.toml), so a change that breaks either fails
the same command that runs the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_mypy_strict() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout(120)
def test_ruff() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "forkreload", "tests", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
