"""`forkreload console`: a terminal session in the IPython look and feel.

The front end is jupyter_console's terminal shell (prompt_toolkit: execution
counts, highlighting, completion and `obj?` from the worker, multi-line
editing); forkreload starts its own controller for it and ends it, with every
process it started, when the console exits or the terminal goes away.

Input history (up-arrow, Ctrl-R) is the front end's own and kept per
project: jupyter_console would ask the kernel for it (`history_request`), and
the kernel's IPython history is one file for every project, so this console
reads and writes `<cache>/projects/<hash of project root>-history.sqlite`
instead (IPython's schema, so `ipython --HistoryManager.hist_file=...` reads
it too).
"""

from __future__ import annotations

import datetime
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_console.app import ZMQTerminalIPythonApp
from jupyter_console.ptshell import ZMQTerminalInteractiveShell

from . import __version__
from .launcher import LaunchSettings, launch_controller
from .protocol import REPLY_METADATA_KEY, TAG_PROGRESS

__all__ = ["run_console", "history_path", "ProjectHistory", "StatusLine"]

# What a transient status line is erased with (carriage return, erase line).
_ERASE_LINE = "\r\x1b[2K"


def history_path(project_root: str | os.PathLike[str]) -> Path:
    """Where the console keeps the input history of one project."""
    from .config import project_cache_file

    return project_cache_file(project_root, "-history.sqlite")


class ProjectHistory:
    """A project's console input history, in an IPython-style SQLite file.

    Stands in for jupyter_console's ZMQHistoryManager (which asks the
    kernel). A broken or unwritable file costs the history, never the
    console: every error degrades to "no history".
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.session: int | None = None
        self.line = 0
        self.db: sqlite3.Connection | None = None
        db = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(self.path), timeout=2, check_same_thread=False)
            with db:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS sessions (session integer primary key autoincrement,"
                    " start timestamp, end timestamp, num_cmds integer, remark text)"
                )
                db.execute(
                    "CREATE TABLE IF NOT EXISTS history (session integer, line integer,"
                    " source text, source_raw text, PRIMARY KEY (session, line))"
                )
                db.execute(
                    "CREATE TABLE IF NOT EXISTS output_history (session integer, line integer,"
                    " output text, PRIMARY KEY (session, line))"
                )
            self.db = db
        except (OSError, sqlite3.Error):
            if db is not None:
                db.close()

    @staticmethod
    def _now() -> str:
        return datetime.datetime.now().isoformat(" ")

    def _ensure_session(self) -> int | None:
        if self.db is None:
            return None
        if self.session is None:
            with self.db:
                cur = self.db.execute(
                    "INSERT INTO sessions VALUES (NULL, ?, NULL, NULL, ?)", (self._now(), "forkreload console")
                )
            self.session = cur.lastrowid
        return self.session

    def store(self, cell: str) -> None:
        """Remember one cell the user ran."""
        cell = cell.rstrip()
        if not cell or self.db is None:
            return
        try:
            session = self._ensure_session()
            self.line += 1
            with self.db:
                self.db.execute("INSERT OR REPLACE INTO history VALUES (?, ?, ?, ?)", (session, self.line, cell, cell))
        except sqlite3.Error:
            pass

    def get_tail(self, n: int = 10, raw: bool = True, output: bool = False, include_latest: bool = False) -> list[tuple[int, int, str]]:
        """The last `n` cells of this project, oldest first (ZMQHistoryManager's API)."""
        if self.db is None:
            return []
        try:
            rows = self.db.execute(
                "SELECT session, line, source_raw FROM history ORDER BY session DESC, line DESC LIMIT ?", (int(n),)
            ).fetchall()
        except sqlite3.Error:
            return []
        return [(int(s), int(line), str(c)) for s, line, c in reversed(rows)]

    def end_session(self) -> None:
        if self.db is None:
            return
        try:
            if self.session is not None:
                with self.db:
                    self.db.execute(
                        "UPDATE sessions SET end=?, num_cmds=? WHERE session=?", (self._now(), self.line, self.session)
                    )
            self.db.close()
        except sqlite3.Error:
            pass
        self.db = None

    def reset(self, new_session: bool = True) -> None:
        """ZMQHistoryManager's API; nothing to do."""


class ControllerGone(RuntimeError):
    """The controller ended (or never answered) before the first prompt."""


class StatusLine:
    """A one-line status the controller sends while a cell waits (a fresh
    worker being prepared): iopub `stream` messages with metadata
    ``{"forkreload": "progress"}``. Shown dimmed on one line, replaced by the
    next status and erased by the next output, so the transcript keeps only
    the final notice. Without a terminal the line is printed as is."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self.shown = False

    @property
    def out(self) -> Any:
        return self.stream or sys.stdout

    def filter(self, msg: dict[str, Any], from_here: Callable[[dict[str, Any]], bool] = lambda m: True) -> dict[str, Any]:
        """Show or erase as `msg` requires; what jupyter_console should see."""
        kind = (msg.get("metadata") or {}).get(REPLY_METADATA_KEY)
        if msg.get("msg_type") == "stream" and kind == TAG_PROGRESS:
            if from_here(msg):
                self.show(msg.get("content", {}).get("text", ""))
            return dict(msg, content={"name": "stdout", "text": ""})
        if self.shown and msg.get("msg_type") not in ("status", "execute_input"):
            self.erase()
        return msg

    def show(self, text: str) -> None:
        lines = text.strip().splitlines()
        if not lines:
            return
        out = self.out
        if not out.isatty():
            out.write(lines[0] + "\n")
            out.flush()
            return
        out.write((_ERASE_LINE if self.shown else "") + f"\x1b[2m{lines[0]}\x1b[0m")
        out.flush()
        self.shown = True

    def erase(self) -> None:
        if self.shown:
            self.out.write(_ERASE_LINE)
            self.out.flush()
            self.shown = False


class ForkreloadShell(ZMQTerminalInteractiveShell):
    """jupyter_console's shell with per-project history and forkreload's lines."""

    history_file: Path | None = None
    project_root = ""
    controller: Any = None  # the controller's Popen, to notice it die at start

    def init_kernel_info(self) -> None:
        """Wait for the worker's kernel_info_reply, or the controller's death."""
        from queue import Empty

        deadline = time.monotonic() + max(self.kernel_timeout, 120)
        self.client.hb_channel.unpause()
        msg_id = self.client.kernel_info()
        while True:
            try:
                reply = self.client.get_shell_msg(timeout=0.2)
            except Empty:
                if self.controller is not None and self.controller.poll() is not None:
                    raise ControllerGone(f"the controller exited (status {self.controller.returncode}) before the session started") from None
                if time.monotonic() > deadline:
                    raise ControllerGone("the controller did not answer in time") from None
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                self.kernel_info = reply["content"]
                return

    def init_history(self) -> None:
        # Called by ZMQTerminalInteractiveShell.__init__ before the prompt
        # session is built from `history_manager.get_tail(...)`.
        path = self.history_file or history_path(self.project_root or os.getcwd())
        self.history_manager = ProjectHistory(path)
        self._wrap_iopub()

    def _wrap_iopub(self) -> None:
        """Route the controller's transient status lines to `self.status_line`."""
        channel = self.client.iopub_channel
        get_msg: Callable[..., dict[str, Any]] = channel.get_msg
        self.status_line = StatusLine()

        def get_msg_filtered(*args: Any, **kwargs: Any) -> dict[str, Any]:
            return self.status_line.filter(get_msg(*args, **kwargs), self.from_here)

        channel.get_msg = get_msg_filtered

    def run_cell(self, cell: str, store_history: bool = True) -> None:
        if store_history and cell and not cell.isspace():
            self.history_manager.store(cell)
        if self._controller_gone():
            return
        super().run_cell(cell, store_history)
        self.status_line.erase()
        self._controller_gone()

    def _controller_gone(self) -> bool:
        """End the console, saying why, once its controller has exited."""
        if self.controller is None or self.controller.poll() is None:
            return False
        print(f"forkreload: the controller exited (status {self.controller.returncode}); the session is over", file=sys.stderr, flush=True)
        self.keep_running = False
        return True

    def show_banner(self) -> None:
        info = self.kernel_info.get("language_info", {})
        python = info.get("version", sys.version.split()[0])
        ipython = self.kernel_info.get("implementation_version", "")
        head = f"forkreload {__version__} console · Python {python}" + (f" · IPython {ipython}" if ipython else "")
        print(head)
        print(f"project {self.project_root} · edit your modules: the next cell runs the new code, values kept")
        print("Ctrl-C interrupts a cell · exit or Ctrl-D ends the session", flush=True)

    def mainloop(self) -> None:
        # jupyter_console's loop, minus "keeping kernel alive": this console
        # owns its controller, which always ends with it.
        import asyncio

        while True:
            try:
                asyncio.run(self._main_task())
                break
            except KeyboardInterrupt:
                print("\nKeyboardInterrupt escaped interact()\n")
        self.history_manager.end_session()


class ForkreloadConsoleApp(ZMQTerminalIPythonApp):
    """jupyter_console attached to a controller this process started."""

    name = "forkreload-console"
    controller_pid = 0
    controller: Any = None
    project_root = ""

    def init_shell(self) -> None:
        # ZMQTerminalIPythonApp.init_shell with forkreload's shell class.
        from jupyter_client.consoleapp import JupyterConsoleApp

        JupyterConsoleApp.initialize(self)
        signal.signal(signal.SIGINT, self.handle_sigint)
        ForkreloadShell.project_root = self.project_root
        ForkreloadShell.controller = self.controller
        self.shell = ForkreloadShell.instance(
            parent=self,
            manager=self.kernel_manager,
            client=self.kernel_client,
            confirm_exit=self.confirm_exit,
        )
        self.shell.own_kernel = True

    def handle_sigint(self, *args: Any) -> None:
        if self.shell._executing:
            # The controller runs in its own session (the terminal's Ctrl-C
            # does not reach it); it forwards the interrupt to the worker.
            try:
                os.kill(self.controller_pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        else:
            raise KeyboardInterrupt


def _project_root(cwd: str) -> str:
    from .config import ConfigError, load_settings

    try:
        return load_settings(cwd).project_root
    except ConfigError:
        return os.path.realpath(cwd)


def run_console(settings: LaunchSettings, extra_argv: list[str] | None = None, project_root: str | None = None) -> int:
    """Start a controller and a terminal front end on it; return at exit.

    Every way out ends the controller, which takes the snapshot and the
    workers with it: `exit`, Ctrl-D, an error, SIGTERM, and SIGHUP (the
    terminal closed). Should this process die without cleaning up (SIGKILL),
    the controller notices that its parent is gone and stops by itself.
    """
    project_root = project_root or _project_root(settings.cwd)
    launched = launch_controller(settings, new_session=True)
    tty_state = _save_tty()

    def on_signal(signum: int, _frame: Any) -> None:
        # Terminal gone (SIGHUP) or asked to stop (SIGTERM): stop the
        # controller (it takes its processes along), put the terminal back
        # as we found it if there still is one, and leave at once.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        launched.stop(timeout=3)
        if signum != signal.SIGHUP:
            _restore_tty(tty_state)
        os._exit(128 + signum)

    signal.signal(signal.SIGHUP, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    status = 0
    try:
        app = ForkreloadConsoleApp.instance()
        app.controller_pid = launched.proc.pid
        app.controller = launched.proc
        app.project_root = project_root
        try:
            app.initialize(["--existing", launched.connection_file, "--no-confirm-exit", *(extra_argv or [])])
        except ControllerGone as exc:
            print(f"forkreload: {exc}", file=sys.stderr)
            status = 1
        else:
            app.start()
    finally:
        try:
            client = ForkreloadConsoleApp.instance().kernel_client
            if client is not None and launched.proc.poll() is None:
                client.shutdown()
                launched.proc.wait(timeout=5)
        except Exception:
            pass
        launched.stop()
    sys.stdout.flush()
    return status


def _save_tty() -> Any:
    try:
        import termios

        if sys.stdin.isatty():
            return termios.tcgetattr(sys.stdin.fileno())
    except (ImportError, OSError):
        pass
    return None


def _restore_tty(state: Any) -> None:
    if state is None:
        return
    try:
        import termios

        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, state)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except (ImportError, OSError, ValueError):
        pass

