"""`forkreload demo`: the point of forkreload in a minute.

Copies a small example project shipped with the package (`demo-project/`:
`shapes.py`, with a function, a constant and a class) into a directory,
prints what to type and which two edits to make, and starts the console
in it: an edit of a function's body is patched in place, an edit of a
constant takes a fresh worker, and the values computed before are kept
both times, with this machine's timings in the notices.

`--auto` plays the same cells and edits by itself through `Session` and
prints the transcript, with the real notices and timings.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["STEPS", "Step", "prepare", "guide", "run_auto", "run_demo", "DemoError"]

DEMO_FILE = "shapes.py"
_SOURCE = Path(__file__).with_name("demo-project") / DEMO_FILE


class DemoError(Exception):
    """The demo cannot start (its directory holds someone else's shapes.py)."""


@dataclass(frozen=True)
class Step:
    """A cell to run, or an edit of shapes.py (`old` replaced by `new`)."""

    code: str = ""
    edit: str = ""  # what the edit changes, in words
    old: str = ""
    new: str = ""
    expect: str = ""  # what it shows, in words
    notice: str = ""  # the start of forkreload's line for it

    def describe_edit(self) -> str:
        return f"{self.edit}:  {self.old.strip()}  →  {self.new.strip()}"


# Seconds between two cells of --auto, as a person types: the checkpoint
# that undo returns to is taken once the worker rests after a cell.
PACE = 0.2

STEPS = (
    Step("import shapes; c = shapes.Circle(2)"),
    Step("%time total = shapes.slow_sum(10**7)", expect="slow on purpose: the work a restart would redo"),
    Step("c.describe(), total"),
    Step(
        edit="area()'s body",
        old="    return math.pi * r * r\n",
        new="    return round(math.pi * r * r, 1)\n",
    ),
    Step("c.describe(), total", notice="patched shapes.area in place", expect="the new code ran; c and total were kept"),
    Step(edit="the module constant UNIT", old='UNIT = "cm"', new='UNIT = "mm"'),
    Step(
        "c.describe(), total",
        notice="fresh worker: shapes.py: module constant UNIT changed",
        expect="a new process imported shapes.py afresh; c (a Circle of the new code now) and total came along, not recomputed",
    ),
    Step("c.r = -1; total = 0", expect="a mistake: both values overwritten"),
    Step("%forkreload undo", notice="undone: the state after cell", expect="the session as it was before that cell (a checkpoint, no recomputing)"),
    Step("c.describe(), total"),
)


def prepare(directory: str | os.PathLike[str] | None = None) -> Path:
    """Write the demo project into `directory` (a new temporary one if None)."""
    root = Path(tempfile.mkdtemp(prefix="forkreload-demo-")) if directory is None else Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    target = root / DEMO_FILE
    shipped = _SOURCE.read_text()
    if target.exists():
        first = shipped.splitlines()[0]
        current = target.read_text(errors="replace")
        if not current.startswith(first):
            raise DemoError(f"{target} exists and is not forkreload's demo file; pick another directory")
    target.write_text(shipped)  # a fresh start: the demo's own file, edited or not
    return root


def preloads() -> list[str]:
    """numpy when it is installed: the snapshot imports it once, not each worker."""
    return ["numpy"] if importlib.util.find_spec("numpy") is not None else []


def guide(root: Path, preload: list[str]) -> str:
    """What to type and which edits to make, for the interactive demo."""
    path = root / DEMO_FILE
    lines = [f"forkreload demo · a small project in {root}" + (f" · {', '.join(preload)} preloaded" if preload else "")]
    lines.append(f"Type the cells below in the console; make the edits in an editor, in {path}, and save.")
    lines.append("")
    for step in STEPS:
        if step.code:
            lines.append(f"  In:    {step.code}")
        else:
            lines.append(f"  edit:  {step.describe_edit()}")
        if step.notice:
            lines.append(f"         → forkreload: {step.notice} …")
        if step.expect:
            lines.append(f"         → {step.expect}")
    lines.append("")
    lines.append("exit or Ctrl-D ends the demo · `forkreload demo --auto` plays it by itself")
    return "\n".join(lines)


def run_demo(directory: str | None = None, out: Callable[[str], None] = print) -> int:
    """Write the project, print the guide, run the console in it."""
    from .console import ForkreloadShell, run_console
    from .launcher import LaunchSettings

    if not sys.stdin.isatty():
        raise DemoError("the demo's console needs a terminal; `forkreload demo --auto` plays it without one")
    root = prepare(directory)
    preload = preloads()
    out(guide(root, preload))
    out("")
    if directory is None:
        # A throw-away project: its console history goes with it.
        ForkreloadShell.history_file = root / ".history.sqlite"
    try:
        return run_console(LaunchSettings(cwd=str(root), preload=preload, learn=False), project_root=str(root))
    finally:
        if directory is None:
            shutil.rmtree(root, ignore_errors=True)


def run_auto(directory: str | None = None, out: Callable[[str], None] = print) -> int:
    """Play the demo's cells and edits through `Session`; print the transcript."""
    from . import Session

    root = prepare(directory)
    path = root / DEMO_FILE
    preload = preloads()
    try:
        t0 = time.perf_counter()
        with Session(cwd=root, preload=preload, learn=False) as s:
            ready = time.perf_counter() - t0
            out(f"forkreload demo --auto · project {root} · session ready in {ready:.2f} s" + (f" ({', '.join(preload)} preloaded)" if preload else ""))
            for step in STEPS:
                out("")
                if not step.code:
                    source = path.read_text()
                    if step.old not in source:
                        out(f"# {path.name} does not hold {step.old.strip()!r}: the demo cannot make its edit")
                        return 1
                    path.write_text(source.replace(step.old, step.new, 1))
                    out(f"# edit {path.name}, {step.describe_edit()}")
                    continue
                time.sleep(PACE)
                r = s.execute(step.code)
                out(f"In [{r.execution_count}]: {step.code}")
                for text in (r.notice, r.stdout, r.stderr):
                    if text.strip():
                        out(text.rstrip("\n"))
                if r.status != "ok":
                    out(f"{r.error[0]}: {r.error[1]}" if r.error else "the cell failed")
                    return 1
                if r.result is not None:
                    out(f"Out[{r.execution_count}]: {r.result}")
                if step.expect:
                    out(f"# → {step.expect}")
        out("")
        out(f"Now by hand: forkreload demo   (edits in your editor, the console in {'a new temporary directory' if directory is None else root})")
        return 0
    finally:
        if directory is None:
            shutil.rmtree(root, ignore_errors=True)
