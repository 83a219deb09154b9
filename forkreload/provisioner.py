"""A jupyter_client kernel provisioner for forkreload.

Through a plain kernelspec, a front end's "Restart kernel" kills the
controller and the snapshot and starts them again (over a second with heavy
preloads). With this provisioner (named in a kernelspec installed with
`forkreload kernel install --provisioner`) the controller instead swaps in a
clean worker from the snapshot it already has, and the provisioner tells
jupyter_client that the "old kernel" is gone at once and the "new one" is
the same process.

jupyter_client finds it through an entry point of the forkreload package,
so only a jupyter_client that can import forkreload can load it; any other
drops a kernelspec that names it. That is why the default kernelspec does
not (`forkreload doctor` says which Jupyter sees which kernelspec).
"""

from __future__ import annotations

from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner

__all__ = ["ForkreloadProvisioner"]


class ForkreloadProvisioner(LocalProvisioner):
    """LocalProvisioner whose restarts keep the controller process."""

    _soft_restart = False

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        kwargs = await super().pre_launch(**kwargs)
        # The controller restarts in place only when it knows that the one
        # launching it will not wait for it to exit.
        kwargs.setdefault("env", {})["FORKRELOAD_PROVISIONED"] = "1"
        return kwargs

    async def shutdown_requested(self, restart: bool = False) -> None:
        await super().shutdown_requested(restart=restart)
        self._soft_restart = bool(restart and self.process is not None and self.process.poll() is None)

    async def poll(self) -> int | None:
        if self._soft_restart:
            return 0  # the "old kernel" is gone: jupyter_client need not wait
        return await super().poll()

    async def wait(self) -> int | None:
        if self._soft_restart:
            return 0
        return await super().wait()

    async def kill(self, restart: bool = False) -> None:
        self._soft_restart = False
        await super().kill(restart=restart)

    async def cleanup(self, restart: bool = False) -> None:
        if self._soft_restart and restart:
            return  # same process, same ports
        await super().cleanup(restart=restart)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        if self._soft_restart and self.process is not None and self.process.poll() is None:
            self._soft_restart = False
            return self.connection_info
        self._soft_restart = False
        return await super().launch_kernel(cmd, **kwargs)
