"""Drive a real `forkreload console` under tmux, as a person would.

`TmuxConsole` types into a console running in a detached tmux session of
its own (a private tmux server: `tmux -S <private socket>`) and reads the
screen back; tests/test_console.py uses it. Run as a script, this file plays
the README's console session in a throw-away project and prints the
transcript (what was typed, what the screen showed):

    python tests/transcript.py > transcript.txt
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

PROMPT = re.compile(r"^In \[(\d+)\]: ?")
# Variables a console started under tmux must see (tmux's server otherwise
# hands its sessions the environment it was started with, which is the same
# here, but naming them makes it explicit).
_PASSED_ENV = ("FORKRELOAD_TEST_TAG", "FORKRELOAD_CACHE_DIR", "IPYTHONDIR", "PATH", "HOME", "LANG", "LC_ALL")


class ConsoleTimeout(AssertionError):
    """The screen did not show what was expected in time."""


class TmuxConsole:
    """One `forkreload console` in a detached tmux session, read off its screen."""

    def __init__(
        self,
        cwd: str | os.PathLike[str],
        args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        width: int = 110,
        height: int = 40,
        command: list[str] | None = None,
    ) -> None:
        if shutil.which("tmux") is None:
            raise RuntimeError("tmux is not installed")
        # A private server on a socket in a private directory (removed on
        # close, with the socket tmux leaves behind).
        self._confdir = tempfile.mkdtemp(prefix="forkreload-tmux-")
        self.socket = os.path.join(self._confdir, f"s-{uuid.uuid4().hex[:8]}")
        conf = Path(self._confdir) / "tmux.conf"
        # Keep the pane (and what it shows) after the console exits, and
        # keep enough scrollback to read a whole session.
        conf.write_text("set -g remain-on-exit on\nset -g history-limit 20000\nset -g status off\n")
        self.env = dict(os.environ if env is None else env)
        self.env.pop("TMUX", None)
        self.env.pop("TMUX_PANE", None)
        self.env.setdefault("TERM", "xterm-256color")
        cmd = command or [sys.executable, "-m", "forkreload", "console", "--cwd", os.fspath(cwd), *args]
        env_args: list[str] = []
        for key in _PASSED_ENV:
            if key in self.env:
                env_args += ["-e", f"{key}={self.env[key]}"]
        self._tmux(
            "-f", str(conf), "new-session", "-d", "-x", str(width), "-y", str(height), *env_args,
            "-c", os.fspath(cwd), shlex.join(cmd),
        )
        self.closed = False

    # -- tmux ----------------------------------------------------------------

    def _tmux(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["tmux", "-S", self.socket, *args], env=self.env, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args[:2])}: {proc.stderr.strip()}")
        return proc.stdout

    def close(self) -> None:
        """Kill the tmux server and whatever still runs in it."""
        if not self.closed:
            self.closed = True
            self._tmux("kill-server", check=False)
            shutil.rmtree(self._confdir, ignore_errors=True)

    def __enter__(self) -> TmuxConsole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading the screen --------------------------------------------------

    def screen(self) -> str:
        """Everything the pane showed, scrollback included, as plain text."""
        text = self._tmux("capture-pane", "-p", "-J", "-S", "-", "-E", "-")
        return "\n".join(line.rstrip() for line in text.splitlines()).rstrip("\n")

    def visible(self) -> str:
        """The lines on screen now."""
        return "\n".join(line.rstrip() for line in self._tmux("capture-pane", "-p", "-J").splitlines())

    def pane_pid(self) -> int:
        return int(self._tmux("display-message", "-p", "#{pane_pid}").strip())

    def dead(self) -> bool:
        """True once the console's process has exited."""
        out = self._tmux("display-message", "-p", "#{pane_dead}", check=False).strip()
        return out in ("1", "")

    def exit_status(self) -> tuple[str, str]:
        """(status, signal) of the console's exit, as tmux saw it; empty
        while it runs."""
        out = self._tmux("display-message", "-p", "#{pane_dead} #{pid} #{pane_dead_status} #{pane_dead_signal}")
        dead, server, status, sig = (out.strip("\n").split(" ") + ["", "", "", ""])[:4]
        if dead == "1" and not status and not sig and server.isdigit():
            # tmux can miss the SIGCHLD of a pane's process (tmux/tmux#311,
            # #2679) and leave it a zombie without an exit status; another
            # SIGCHLD makes it reap.
            os.kill(int(server), signal.SIGCHLD)
        return status, sig

    def wait_for(self, what: str | re.Pattern[str] | Callable[[str], bool], timeout: float = 20.0, start: int = 0) -> str:
        """Poll the screen until `what` appears in it (after line `start`)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.screen().splitlines()[start:]
            text = "\n".join(lines)
            if callable(what) and not isinstance(what, re.Pattern):
                ok = what(text)
            elif isinstance(what, re.Pattern):
                ok = what.search(text) is not None
            else:
                ok = what in text
            if ok:
                return text
            if time.monotonic() > deadline:
                raise ConsoleTimeout(f"did not see {what!r} within {timeout} s; the screen:\n{self.screen()}")
            time.sleep(0.1)

    def prompts(self) -> list[tuple[int, int]]:
        """(line index, number) of each `In [n]:` prompt on the screen."""
        return [(i, int(m.group(1))) for i, line in enumerate(self.screen().splitlines()) if (m := PROMPT.match(line))]

    def wait_prompt(self, after: int = -1, timeout: float = 30.0) -> int:
        """Wait for an empty input prompt below line `after`; its line index."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.screen().splitlines()
            found = [i for i, line in enumerate(lines) if PROMPT.match(line) and i > after]
            if found:
                i = found[-1]
                if PROMPT.sub("", lines[i]).strip() == "" and all(not line.strip() for line in lines[i + 1 :]):
                    return i
            if time.monotonic() > deadline:
                raise ConsoleTimeout(f"no new prompt within {timeout} s; the screen:\n{self.screen()}")
            time.sleep(0.1)

    # -- typing --------------------------------------------------------------

    def type(self, text: str) -> None:
        """Type text literally (no Enter)."""
        self._tmux("send-keys", "-l", text)

    def keys(self, *keys: str) -> None:
        """Press keys by tmux name: Enter, Tab, Up, C-c, C-d, C-r, ..."""
        self._tmux("send-keys", *keys)

    def start(self, timeout: float = 60.0) -> None:
        """Wait for the first prompt."""
        self.wait_prompt(timeout=timeout)

    def run(self, code: str, timeout: float = 30.0) -> str:
        """Type one single-line cell, press Enter, wait for the next prompt;
        return what the screen showed from the cell's prompt on."""
        at = self.wait_prompt(timeout=timeout)
        self.type(code)
        self.wait_for(lambda text: code in text, timeout=5, start=at)
        self.keys("Enter")
        nxt = self.wait_prompt(after=at, timeout=timeout)
        return "\n".join(self.screen().splitlines()[at:nxt]).rstrip("\n")


# -- the README session --------------------------------------------------------

SHAPES = '''\
GREETING = "hello"


def shout(text):
    return text.upper() + "!"


class Greeter:
    def __init__(self, name):
        self.name = name

    def greet(self):
        return f"{GREETING} {self.name}"
'''


def _edit(path: Path, old: str, new: str) -> None:
    source = path.read_text()
    assert old in source, (old, source)
    path.write_text(source.replace(old, new, 1))


def transcript(project: Path | None = None) -> str:
    """Play the README session; return its transcript."""
    tmp = None
    if project is None:
        tmp = tempfile.mkdtemp(prefix="forkreload-transcript-")
        project = Path(tmp) / "proj"
        project.mkdir()
    env = dict(os.environ)
    scratch = tempfile.mkdtemp(prefix="forkreload-transcript-cache-")
    env["FORKRELOAD_CACHE_DIR"] = os.path.join(scratch, "cache")
    env["IPYTHONDIR"] = os.path.join(scratch, "ipython")
    shapes = project / "shapes.py"
    shapes.write_text(SHAPES)
    out: list[str] = [
        '# ~/proj/shapes.py: GREETING = "hello", shout(text), and class Greeter(name)',
        '# whose greet() returns f"{GREETING} {self.name}"',
        "$ forkreload console",
    ]
    con = TmuxConsole(project, env=env, width=100, height=60)
    try:
        con.start()
        first = con.prompts()[0][0]
        out += con.screen().splitlines()[:first]

        def block(lines: list[str]) -> None:
            while lines and not lines[-1].strip():
                lines = lines[:-1]
            out.extend(lines)
            out.append("")

        def cell(code: str) -> None:
            block(con.run(code).splitlines())

        def note(text: str) -> None:
            out.append(f"# {text}")
            out.append("")

        cell('import shapes; g = shapes.Greeter("ann"); total = sum(range(10**6))')
        cell("g.greet()")
        _edit(shapes, 'return f"{GREETING} {self.name}"', 'return shout(f"{GREETING} {self.name}")')
        note('in the editor, shapes.py: greet() now returns shout(f"{GREETING} {self.name}")')
        cell("g.greet()")
        _edit(shapes, 'GREETING = "hello"', 'GREETING = "hi"')
        note('in the editor, shapes.py: GREETING = "hi" (a module constant: messy)')
        cell("g.greet(), total")

        at = con.wait_prompt()
        con.type("while True: pass")
        con.keys("Enter")
        con.wait_for("while True: pass", start=at)
        # IPython waits for a second Enter after a compound statement.
        time.sleep(0.3)
        con.keys("Enter")
        time.sleep(1.0)
        con.keys("C-c")
        nxt = con.wait_prompt(after=at)
        lines = con.screen().splitlines()[at:nxt]
        block([lines[0] + "      # Ctrl-C after a second", *lines[1:]])
        cell("total")

        at = con.wait_prompt()
        con.type("g.gr")
        con.keys("Tab")
        con.wait_for(lambda t: "g.greet" in t, start=at, timeout=10)
        time.sleep(0.3)
        con.type("()")
        con.keys("Enter")
        nxt = con.wait_prompt(after=at)
        lines = con.screen().splitlines()[at:nxt]
        block([lines[0] + "      # typed g.gr, Tab, ()", *lines[1:]])

        at = con.wait_prompt()
        con.type("exit")
        con.keys("Enter")
        deadline = time.monotonic() + 20
        while not con.dead() and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = [ln for ln in con.screen().splitlines()[at:] if ln.strip() and not ln.startswith("Pane is dead")]
        out.extend(lines)
        out.append("$")
    finally:
        con.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    # Collapse runs of blank lines, and make the temporary path readable.
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n")
    return text.replace(str(project.resolve()), "~/proj").replace(str(project), "~/proj")


def main() -> int:
    print(textwrap.dedent(transcript()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
