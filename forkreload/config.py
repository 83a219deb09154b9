"""Settings of one session, and where they come from.

In increasing precedence: built-in defaults, `[tool.forkreload]` in the
`pyproject.toml` found from the project directory upward, `FORKRELOAD_*`
environment variables, command-line flags. Also the per-project memory of
which third-party modules the last sessions imported (preloaded next time),
kept in the user's cache directory, never in the project.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Settings", "MODES", "load_settings", "find_pyproject", "LearnedModules", "ConfigError", "project_cache_file"]

MODES = ("auto", "fresh", "inplace", "off")
_MAX_LEARNED = 64


class ConfigError(ValueError):
    """A setting has a value forkreload cannot use."""


@dataclass
class Settings:
    """What the user chose for this session."""

    cwd: str = "."
    preload: list[str] = field(default_factory=list)
    mode: str = "auto"
    quiet: bool = False
    watch: list[str] = field(default_factory=list)
    learn: bool = True
    # Bytes the checkpoints may use (None: a quarter of the available memory; 0: none).
    checkpoints: int | None = None
    # One snapshot server per user and key shared by kernels (server.py); off:
    # each kernel starts its own snapshot. The server's idle time after its
    # last client, in seconds.
    server: bool = True
    server_idle: float = 600.0
    project_root: str = "."
    sources: dict[str, str] = field(default_factory=dict)  # setting -> where it came from

    def as_dict(self) -> dict[str, Any]:
        return {
            "cwd": self.cwd,
            "preload": self.preload,
            "mode": self.mode,
            "quiet": self.quiet,
            "watch": self.watch,
            "learn": self.learn,
            "checkpoints": "auto" if self.checkpoints is None else self.checkpoints,
            "server": self.server,
            "server_idle": self.server_idle,
            "project_root": self.project_root,
            "sources": self.sources,
        }


def find_pyproject(start: str | os.PathLike[str]) -> Path | None:
    """The nearest pyproject.toml at or above `start`."""
    here = Path(start).resolve()
    for d in (here, *here.parents):
        candidate = d / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _as_list(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.replace(os.pathsep, ",").split(",") if v.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{what} must be a list of strings")


def _as_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        return value.lower() in ("1", "true", "yes", "on")
    raise ConfigError(f"{what} must be true or false")


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: Any, what: str) -> int | None:
    """A `checkpoints` budget: "auto" (None), "off"/false/0, bytes, or "500M", "2G"."""
    if isinstance(value, bool):
        return None if value else 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "auto", "on", "yes", "true"):
            return None
        if text in ("off", "no", "false", "none"):
            return 0
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", text)
        if m is not None:
            return int(float(m.group(1)) * _UNITS[m.group(2)])
    raise ConfigError(f"{what} must be auto, off, or a size like 2G, not {value!r}")


def _as_seconds(value: Any, what: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if isinstance(value, bool) or not seconds >= 0:
        raise ConfigError(f"{what} must be a number of seconds")
    return seconds


def _apply(s: Settings, values: dict[str, Any], origin: str) -> None:
    for key, value in values.items():
        if value is None:
            continue
        what = f"{origin}: {key}"
        if key == "preload":
            s.preload = _as_list(value, what)
        elif key == "watch":
            s.watch = _as_list(value, what)
        elif key == "mode":
            if value not in MODES:
                raise ConfigError(f"{what} must be one of {', '.join(MODES)}, not {value!r}")
            s.mode = value
        elif key == "quiet":
            s.quiet = _as_bool(value, what)
        elif key == "learn":
            s.learn = _as_bool(value, what)
        elif key == "checkpoints":
            s.checkpoints = parse_size(value, what)
        elif key == "server":
            s.server = _as_bool(value, what)
        elif key == "server_idle":
            s.server_idle = _as_seconds(value, what)
        else:
            raise ConfigError(f"{what}: unknown setting")
        s.sources[key] = origin


def load_settings(cwd: str | os.PathLike[str] = ".", cli: dict[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Resolve the settings for a session whose project directory is `cwd`."""
    if environ is None:
        environ = os.environ
    s = Settings(cwd=os.path.realpath(os.fspath(cwd)))
    s.project_root = s.cwd
    pyproject = find_pyproject(s.cwd)
    if pyproject is not None:
        # Imported here: a kernel's start reads settings first thing (its
        # snapshot server is started right after), most without a pyproject.
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - exercised on 3.10 only
            import tomli as tomllib
        try:
            with open(pyproject, "rb") as f:
                table = tomllib.load(f).get("tool", {}).get("forkreload", {})
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{pyproject}: {exc}") from None
        if table:
            s.project_root = str(pyproject.parent)
            _apply(s, table, str(pyproject))
    env_values = {
        key: environ.get(f"FORKRELOAD_{key.upper()}")
        for key in ("preload", "mode", "quiet", "watch", "learn", "checkpoints", "server", "server_idle")
    }
    _apply(s, env_values, "environment")
    _apply(s, dict(cli or {}), "command line")
    base = Path(s.project_root)
    s.watch = [str((base / w).resolve()) for w in s.watch]
    return s


def _cache_dir() -> Path:
    override = os.environ.get("FORKRELOAD_CACHE_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_cache_dir("forkreload"))


def project_cache_file(project_root: str | os.PathLike[str], suffix: str) -> Path:
    """A file of one project's in the user's cache (never in the project)."""
    digest = hashlib.sha256(os.path.realpath(os.fspath(project_root)).encode()).hexdigest()[:16]
    return _cache_dir() / "projects" / f"{digest}{suffix}"


class LearnedModules:
    """The third-party modules a project's sessions imported, on disk."""

    def __init__(self, project_root: str) -> None:
        self.path = project_cache_file(project_root, ".json")
        self.project_root = project_root
        self.modules: list[str] = []
        try:
            data = json.loads(self.path.read_text())
            if data.get("project") == os.path.realpath(project_root):
                self.modules = [m for m in data.get("modules", []) if isinstance(m, str)][:_MAX_LEARNED]
        except (OSError, ValueError, AttributeError):
            pass

    def add(self, names: list[str]) -> bool:
        """Remember more names; True when the file changed."""
        new = [n for n in names if n not in self.modules]
        if not new or len(self.modules) >= _MAX_LEARNED:
            return False
        self.modules.extend(new[: _MAX_LEARNED - len(self.modules)])
        self._save()
        return True

    def forget(self, names: list[str]) -> None:
        if any(n in self.modules for n in names):
            self.modules = [m for m in self.modules if m not in names]
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"project": os.path.realpath(self.project_root), "modules": self.modules}))
        os.replace(tmp, self.path)
