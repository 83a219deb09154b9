"""`forkreload console`: a terminal session in the IPython look and feel.

The front end is jupyter_console's terminal shell (prompt_toolkit: execution
counts, highlighting, completion and `obj?` from the worker, multi-line
editing); forkreload starts its own controller for it and ends it, with every
process it started, when the console exits or the terminal goes away.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from jupyter_console.app import ZMQTerminalIPythonApp

from .launcher import LaunchSettings, launch_controller

__all__ = ["run_console"]


class ForkreloadConsoleApp(ZMQTerminalIPythonApp):
    """jupyter_console attached to a controller this process started."""

    name = "forkreload-console"
    controller_pid = 0

    def handle_sigint(self, *args: Any) -> None:
        if self.shell._executing:
            # The controller runs in its own session (the terminal's Ctrl-C
            # does not reach it); it forwards the interrupt to the worker.
            os.kill(self.controller_pid, signal.SIGINT)
        else:
            raise KeyboardInterrupt


def run_console(settings: LaunchSettings, extra_argv: list[str] | None = None) -> int:
    """Start a controller and a terminal front end on it; return at exit."""
    launched = launch_controller(settings, new_session=True)

    def on_hangup(*_: Any) -> None:
        launched.stop()
        os._exit(1)

    signal.signal(signal.SIGHUP, on_hangup)
    signal.signal(signal.SIGTERM, on_hangup)
    try:
        app = ForkreloadConsoleApp.instance()
        app.controller_pid = launched.proc.pid
        app.initialize(["--existing", launched.connection_file, "--no-confirm-exit", *(extra_argv or [])])
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
    return 0
