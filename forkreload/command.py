"""Command lines that start forkreload's own processes (controller, snapshot).

`python -m MODULE` puts the current directory first on `sys.path`, and a
kernel starts in the notebook's directory: a project file named like a
standard module (`csv.py`) would then run inside forkreload's own process
as soon as forkreload imports that module. These command lines take the
project directory off `sys.path` before anything is imported, then run the
module as `-m` would.
"""

from __future__ import annotations

import os
import sys

__all__ = ["python_command", "project_modules"]

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_command(module: str, args: list[str] | None = None, python: str = sys.executable) -> list[str]:
    """`python -m module args...`, without the current directory on sys.path."""
    code = (
        "import os, sys; here = {os.getcwd(), os.path.realpath(os.getcwd())}; "
        "sys.path[:] = [p for p in sys.path if p not in ('', '.') and os.path.realpath(p) not in here]; "
        # forkreload run from its own checkout: keep it importable, behind the standard library.
        f"sys.path.append({_PACKAGE_ROOT!r}) if {_PACKAGE_ROOT!r} in here else None; "
        f"import runpy; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    return [python, "-c", code, *(args or [])]


def project_modules() -> list[str]:
    """Modules imported from the current (project) directory in this process.

    `python -m forkreload.snapshot` puts the current directory (the project)
    first on sys.path, and importing the forkreload package imports much of
    the standard library: a project file named like one of those modules
    (csv.py) would be executed here and break the preloads.
    """
    here = {os.getcwd(), os.path.realpath(os.getcwd())}
    found = []
    for name, mod in list(sys.modules.items()):
        file = getattr(mod, "__file__", None)
        if "." in name or not isinstance(file, str) or name == "forkreload":
            continue
        folder = os.path.dirname(file)
        if os.path.basename(file).startswith("__init__."):
            folder = os.path.dirname(folder)
        if folder in here:
            found.append(name)
    return found
