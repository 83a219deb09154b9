"""Install, remove and list forkreload's Jupyter kernelspec.

The kernelspec starts the controller with the interpreter that installed it
and names forkreload's kernel provisioner, which turns a front end's
"Restart kernel" into a clean worker from the running snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from .command import python_command

__all__ = ["install", "uninstall", "list_specs", "make_spec", "PROVISIONER"]

PROVISIONER = "forkreload-provisioner"


def make_spec(display_name: str = "Python 3 (forkreload)", preload: list[str] | None = None) -> dict[str, Any]:
    """The kernel.json contents."""
    argv = python_command("forkreload", ["kernel", "-f", "{connection_file}"])
    if preload:
        argv += ["--preload", ",".join(preload)]
    return {
        "argv": argv,
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {
            "forkreload": {"kernel": True},
            "debugger": False,
            "kernel_provisioner": {"provisioner_name": PROVISIONER},
        },
    }


def install(
    name: str = "forkreload",
    display_name: str = "Python 3 (forkreload)",
    user: bool = False,
    prefix: str | None = None,
    preload: list[str] | None = None,
) -> str:
    """Write the kernelspec where Jupyter finds it; return its directory."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        with open(os.path.join(tmp, "kernel.json"), "w") as f:
            json.dump(make_spec(display_name, preload), f, indent=1)
        # The same logos as ipykernel's spec, so front ends show Python's.
        try:
            import ipykernel

            resources = os.path.join(os.path.dirname(ipykernel.__file__), "resources")
            for logo in os.listdir(resources):
                if logo.startswith("logo-"):
                    shutil.copy(os.path.join(resources, logo), tmp)
        except (ImportError, OSError):
            pass
        return KernelSpecManager().install_kernel_spec(tmp, name, user=user, prefix=prefix)


def uninstall(name: str = "forkreload") -> str:
    """Remove the kernelspec `name`; return where it was."""
    try:
        return KernelSpecManager().remove_kernel_spec(name)
    except (KeyError, NoSuchKernel):
        raise FileNotFoundError(2, f"no kernelspec named {name!r}", name) from None


def list_specs() -> dict[str, str]:
    """The installed kernelspecs that run forkreload: name -> directory."""
    ksm = KernelSpecManager()
    found = {}
    for name, info in ksm.get_all_specs().items():
        spec = info.get("spec", {})
        # Marked in its metadata; older specs ran `python -m forkreload`.
        if "forkreload" in spec.get("metadata", {}) or "forkreload" in spec.get("argv", []):
            found[name] = info["resource_dir"]
    return found
