"""`forkreload demo`: the example project, its guide, and `--auto`, which
plays the cells and edits through a real session and prints the transcript."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from forkreload import demo


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forkreload", "demo", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(60)
def test_demo_auto_shows_in_place_then_fresh_with_values_kept() -> None:
    t0 = time.perf_counter()
    r = _demo("--auto")
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    print(f"\nforkreload demo --auto: {elapsed:.1f} s\n{out}")
    root = re.search(r"project (\S+)", out)
    assert root is not None, out
    assert not os.path.exists(root.group(1)), "the temporary demo project is removed"
    # Every cell of the guide ran, in order, and the edits came between.
    for step in demo.STEPS:
        assert (step.code or step.describe_edit()) in out, (step, out)
    assert re.search(r"^forkreload: patched shapes\.area in place \([\d.]+ m?s\)$", out, re.M), out
    assert re.search(r"^forkreload: fresh worker: shapes\.py: module constant UNIT changed · migrated \d+ · [\d.]+ m?s$", out, re.M), out
    assert "Wall time:" in out, out  # %time's own line: what computing total cost
    outs = re.findall(r"^Out\[(\d)\]: \('(.*)', ([\d.e+]+)\)$", out, re.M)
    assert re.search(r"^forkreload: undone: the state after cell 2 \(\d+ s old\) is back; c, total as they were then$", out, re.M), out
    assert [(n, d) for n, d, _ in outs] == [
        ("3", "radius 2 cm, area 12.566370614359172 cm²"),
        ("4", "radius 2 cm, area 12.6 cm²"),  # new code, in place
        ("5", "radius 2 mm, area 12.6 mm²"),  # fresh worker: the new constant
        ("8", "radius 2 mm, area 12.6 mm²"),  # undone (to the state after cell 2), then the edits applied again
    ], out
    assert len({total for _, _, total in outs}) == 1, "total is kept, never recomputed, and comes back after the undo"
    assert elapsed < 30, f"--auto took {elapsed:.1f} s"


def test_demo_auto_in_a_given_directory_keeps_it(tmp_path: Path) -> None:
    where = tmp_path / "try"
    r = _demo(str(where), "--auto")
    assert r.returncode == 0, r.stdout + r.stderr
    shapes = (where / "shapes.py").read_text()
    assert 'UNIT = "mm"' in shapes and "round(math.pi * r * r, 1)" in shapes  # the edits, as made
    # Again in the same place: the demo's own file is put back as shipped.
    assert _demo(str(where), "--auto").returncode == 0


def test_demo_does_not_overwrite_someone_elses_shapes(tmp_path: Path) -> None:
    (tmp_path / "shapes.py").write_text("MINE = 1\n")
    r = _demo(str(tmp_path), "--auto")
    assert r.returncode == 2
    assert "not forkreload's demo file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "shapes.py").read_text() == "MINE = 1\n"


def test_demo_guide_names_the_file_and_every_step(tmp_path: Path) -> None:
    root = demo.prepare(tmp_path / "d")
    text = demo.guide(root, ["numpy"])
    assert str(root / "shapes.py") in text and "numpy preloaded" in text
    for step in demo.STEPS:
        assert (step.code or step.describe_edit()) in text
    # The edits the guide asks for apply to the shipped file.
    source = (root / "shapes.py").read_text()
    for step in demo.STEPS:
        if step.edit:
            assert step.old in source
            source = source.replace(step.old, step.new)


def test_demo_project_is_package_data() -> None:
    """Every file of the example project matches pyproject's package-data."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    root = Path(demo.__file__).parent
    config = tomllib.loads((root.parent / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["forkreload"]
    files = [p.relative_to(root).as_posix() for p in (root / "demo-project").iterdir() if p.is_file()]
    assert "demo-project/shapes.py" in files
    for f in files:
        assert any(fnmatch.fnmatch(f, pat) for pat in patterns), (f, patterns)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
@pytest.mark.timeout(90)
def test_demo_in_the_console_follows_its_own_guide(tmp_path: Path) -> None:
    """`forkreload demo` in a real terminal: the guide, then the console in
    the temporary project; its cells typed and its edits made as printed."""
    from transcript import TmuxConsole

    con = TmuxConsole(tmp_path, command=[sys.executable, "-m", "forkreload", "demo"])
    try:
        con.start()
        screen = con.screen()
        m = re.search(r"in an editor, in (\S+shapes\.py)", screen)
        assert m is not None, screen
        path = Path(m.group(1))
        assert "In:    import shapes" in screen and "forkreload 0.1.0 console" in screen, screen
        shown = ""
        for step in demo.STEPS:
            if step.code:
                shown = con.run(step.code)
            else:
                path.write_text(path.read_text().replace(step.old, step.new))
            if step.notice:
                assert f"forkreload: {step.notice}" in shown, shown
        assert "radius 2 mm, area 12.6 mm²" in shown, shown
        con.type("exit")
        con.keys("Enter")
        deadline = time.monotonic() + 15
        while not con.dead() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert con.dead(), con.screen()
        assert con.exit_status()[0] in ("0", ""), con.screen()
        assert not path.parent.exists(), "the temporary demo project is removed at exit"
    finally:
        con.close()


def test_demo_without_a_terminal_points_to_auto() -> None:
    r = subprocess.run([sys.executable, "-m", "forkreload", "demo"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "--auto" in r.stderr and "Traceback" not in r.stderr, r.stderr
