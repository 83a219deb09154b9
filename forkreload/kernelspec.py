"""Install, remove and list forkreload's Jupyter kernelspec.

The kernelspec starts the controller with the interpreter that installed it.
By default it names no kernel provisioner, so every jupyter_client (7 and
later, in any environment) starts it: "Restart kernel" then relaunches the
controller. With `provisioner=True` it names forkreload's provisioner, which
turns "Restart kernel" into a clean worker from the running snapshot, but a
jupyter_client that cannot import forkreload (a front end run from another
environment) drops such a kernelspec altogether.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from .command import python_command

__all__ = ["install", "uninstall", "list_specs", "read_specs", "make_spec", "has_debugger", "has_provisioner", "is_forkreload_spec", "PROVISIONER", "PLAIN_NOTE", "TRADE_OFF"]

PROVISIONER = "forkreload-provisioner"

# What `kernel install` says of each kind: what --provisioner buys and costs.
PLAIN_NOTE = (
    'Any Jupyter, in any environment, starts it; "Restart kernel" relaunches the controller '
    "(--provisioner: a fast restart, for a Jupyter run from this environment only)."
)
TRADE_OFF = (
    '"Restart kernel" is fast (a clean worker from the running snapshot), but only a Jupyter '
    "whose Python imports forkreload shows this kernel; the others drop it."
)


def has_debugger() -> bool:
    """Whether the kernel's Python (this one) can run ipykernel's debugger:
    front ends show their debugger only for a kernelspec that says so."""
    return importlib.util.find_spec("debugpy") is not None


def make_spec(display_name: str = "Python 3 (forkreload)", preload: list[str] | None = None, provisioner: bool = False) -> dict[str, Any]:
    """The kernel.json contents; `provisioner` names forkreload's provisioner."""
    argv = python_command("forkreload", ["kernel", "-f", "{connection_file}"])
    if preload:
        argv += ["--preload", ",".join(preload)]
    # The workers are ipykernel kernels: debug requests reach them through
    # the controller, and their debug session follows a swap (debugger.py).
    metadata: dict[str, Any] = {"forkreload": {"kernel": True}, "debugger": has_debugger()}
    if provisioner:
        metadata["kernel_provisioner"] = {"provisioner_name": PROVISIONER}
    return {
        "argv": argv,
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": metadata,
    }


def has_provisioner(spec: dict[str, Any]) -> bool:
    """Whether a kernel.json names forkreload's provisioner."""
    stanza = spec.get("metadata", {}).get("kernel_provisioner") or {}
    return bool(stanza.get("provisioner_name") == PROVISIONER)


def install(
    name: str = "forkreload",
    display_name: str = "Python 3 (forkreload)",
    user: bool = False,
    prefix: str | None = None,
    preload: list[str] | None = None,
    provisioner: bool = False,
) -> str:
    """Write the kernelspec where Jupyter finds it; return its directory."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        with open(os.path.join(tmp, "kernel.json"), "w") as f:
            json.dump(make_spec(display_name, preload, provisioner), f, indent=1)
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
    return {name: d for name, (d, _spec) in read_specs().items()}


def is_forkreload_spec(spec: dict[str, Any]) -> bool:
    # Marked in its metadata; older specs ran `python -m forkreload`.
    return "forkreload" in spec.get("metadata", {}) or "forkreload" in spec.get("argv", [])


def read_specs() -> dict[str, tuple[str, dict[str, Any]]]:
    """The installed forkreload kernelspecs: name -> (directory, kernel.json).

    Read from the files, not through jupyter_client's `get_all_specs`, which
    leaves out a kernelspec whose provisioner it cannot load: such a spec is
    listed here all the same (`forkreload doctor` says who drops it).
    """
    found = {}
    for name, directory in KernelSpecManager().find_kernel_specs().items():
        try:
            with open(os.path.join(directory, "kernel.json")) as f:
                spec = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(spec, dict) and is_forkreload_spec(spec):
            found[name] = (directory, spec)
    return found
