"""Start a controller process for a client that runs in this process.

Used by `Session` and `forkreload console`: both write a private connection
file (ipc sockets in a 0700 directory, a fresh key) and start
`python -m forkreload kernel` on it, exactly as Jupyter would.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass

from jupyter_client.connect import write_connection_file

from .channel import make_private_dir
from .command import python_command

__all__ = ["LaunchSettings", "Launched", "launch_controller"]


@dataclass
class LaunchSettings:
    """The user's explicit choices, passed on as `forkreload kernel` flags.

    None leaves a setting to the project's pyproject.toml, the environment,
    or the default.
    """

    cwd: str = "."
    preload: list[str] | None = None
    mode: str | None = None
    quiet: bool | None = None
    watch: list[str] | None = None
    learn: bool | None = None

    def argv(self) -> list[str]:
        args = ["--cwd", os.path.realpath(self.cwd)]
        if self.mode is not None:
            args += ["--mode", self.mode]
        if self.preload is not None:
            args += ["--preload", ",".join(self.preload)]
        for w in self.watch or []:
            args += ["--watch", os.fspath(w)]
        if self.quiet:
            args.append("--quiet")
        if self.learn is False:
            args.append("--no-learn")
        return args


@dataclass
class Launched:
    proc: subprocess.Popen[bytes]
    connection_file: str
    directory: str

    def stop(self, timeout: float = 5.0) -> None:
        """Make sure the controller is gone (it takes its processes along)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def launch_controller(settings: LaunchSettings, env: dict[str, str] | None = None, new_session: bool = False) -> Launched:
    """Write a private connection file and start a controller on it."""
    directory = make_private_dir("forkreload-client-")
    cf = os.path.join(directory, "kernel.json")
    write_connection_file(cf, transport="ipc", ip=os.path.join(directory, "k"), key=uuid.uuid4().hex.encode())
    cmd = python_command("forkreload", ["kernel", "-f", cf, *settings.argv()])
    proc = subprocess.Popen(cmd, env=env, start_new_session=new_session)
    return Launched(proc, cf, directory)
