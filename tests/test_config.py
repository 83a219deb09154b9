"""Settings precedence (pyproject < environment < flags) and learned preloads."""

from __future__ import annotations

import os

import pytest
from forkreload.config import ConfigError, LearnedModules, load_settings


def test_precedence_pyproject_environment_flags(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.forkreload]\npreload = ["numpy"]\nmode = "fresh"\nquiet = true\nwatch = ["lib"]\n'
    )
    sub = tmp_path / "notebooks"
    sub.mkdir()
    s = load_settings(sub, environ={})
    assert (s.preload, s.mode, s.quiet, s.learn) == (["numpy"], "fresh", True, True)
    assert s.watch == [str(tmp_path / "lib")]  # relative to the pyproject's directory
    assert s.project_root == str(tmp_path)
    assert s.sources["mode"].endswith("pyproject.toml")
    s = load_settings(sub, environ={"FORKRELOAD_MODE": "inplace", "FORKRELOAD_PRELOAD": "pandas,scipy", "FORKRELOAD_LEARN": "0"})
    assert (s.mode, s.preload, s.learn) == ("inplace", ["pandas", "scipy"], False)
    assert s.sources["mode"] == "environment"
    s = load_settings(sub, {"mode": "off", "preload": None}, environ={"FORKRELOAD_MODE": "inplace"})
    assert s.mode == "off" and s.sources["mode"] == "command line" and s.preload == ["numpy"]


def test_bad_values_say_where(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.forkreload]\nmode = "sometimes"\n')
    with pytest.raises(ConfigError, match="pyproject.toml: mode must be one of auto, fresh, inplace, off"):
        load_settings(tmp_path, environ={})
    (tmp_path / "pyproject.toml").write_text("[tool.forkreload]\npreloads = []\n")
    with pytest.raises(ConfigError, match="preloads: unknown setting"):
        load_settings(tmp_path, environ={})
    with pytest.raises(ConfigError, match="environment: quiet must be true or false"):
        load_settings(tmp_path / "..", environ={"FORKRELOAD_QUIET": "maybe"})


def test_learned_modules_are_per_project_and_outside_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FORKRELOAD_CACHE_DIR", str(tmp_path / "cache"))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    la = LearnedModules(str(a))
    assert la.add(["pandas", "scipy"]) and not la.add(["pandas"])
    assert LearnedModules(str(a)).modules == ["pandas", "scipy"]
    assert LearnedModules(str(b)).modules == []
    assert not any(a.iterdir())  # nothing written into the project
    la.forget(["scipy"])
    assert LearnedModules(str(a)).modules == ["pandas"]


def test_cli_reports_config_errors_in_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "pyproject.toml").write_text('[tool.forkreload]\nmode = "never"\n')
    p = subprocess.run(
        [sys.executable, "-m", "forkreload", "kernel", "-f", "/nonexistent.json", "--cwd", str(tmp_path)],
        capture_output=True, text=True, env=dict(os.environ),
    )
    assert p.returncode != 0
    assert p.stderr.strip().count("\n") == 0 and "forkreload:" in p.stderr, p.stderr
