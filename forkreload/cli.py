"""The `forkreload` command line: kernel, console, doctor, version."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from . import __version__
from .config import MODES, ConfigError, load_settings

__all__ = ["main"]


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _add_settings(p: argparse.ArgumentParser) -> None:
    # Defaults are None so that pyproject.toml and FORKRELOAD_* still apply
    # where a flag was not given.
    p.add_argument("--cwd", default=".", help="the project directory (the worker's cwd, on sys.path)")
    p.add_argument("--preload", type=_list, default=None, help="modules the snapshot imports ahead, comma-separated")
    p.add_argument("--mode", choices=MODES, default=None, help="how edits are applied (default: auto)")
    p.add_argument("--quiet", action="store_true", default=None, help="no notice after a successful reload")
    p.add_argument("--watch", action="append", default=None, help="extra path whose modules count as the user's")
    p.add_argument("--no-learn", dest="learn", action="store_false", default=None, help="do not remember and preload the libraries this project imports")


def _settings(args: argparse.Namespace) -> Any:
    cli = {k: getattr(args, k) for k in ("preload", "mode", "quiet", "watch", "learn")}
    return load_settings(args.cwd, cli)


def _kernel(args: argparse.Namespace) -> int:
    from .controller import Controller, ControllerError

    logging.basicConfig(level=logging.WARNING, format="forkreload: %(message)s")
    with open(args.connection_file) as f:
        conn = json.load(f)
    controller = Controller(conn, _settings(args))
    try:
        controller.start()
    except ControllerError as exc:
        print(f"forkreload: {exc}", file=sys.stderr)
        controller.close()
        return 1
    controller.run()
    return 0


def _console(args: argparse.Namespace) -> int:
    from .console import run_console
    from .launcher import LaunchSettings

    s = _settings(args)
    return run_console(LaunchSettings(cwd=s.cwd, preload=s.preload, mode=s.mode, quiet=s.quiet, watch=s.watch, learn=s.learn))


def _kernelspec(args: argparse.Namespace) -> int:
    from . import kernelspec

    if args.action == "install":
        path = kernelspec.install(
            name=args.name,
            display_name=args.display_name,
            user=args.user,
            prefix=sys.prefix if args.sys_prefix else args.prefix,
            preload=args.preload or [],
        )
        print(f"Installed kernelspec {args.name} in {path}")
    elif args.action == "uninstall":
        print(f"Removed {kernelspec.uninstall(args.name)}")
    else:
        for name, path in kernelspec.list_specs().items():
            print(f"  {name:<24} {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkreload", description="Keep an interactive Python session alive across source edits.")
    parser.add_argument("--version", action="version", version=f"forkreload {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    k = sub.add_parser("kernel", help="the Jupyter kernel; `kernel install|uninstall|list` manage its kernelspec")
    k.add_argument("action", nargs="?", choices=["run", "install", "uninstall", "list"], default="run")
    k.add_argument("-f", "--connection-file", help="the Jupyter connection file (to run the kernel)")
    k.add_argument("--user", action="store_true", help="install for this user only")
    k.add_argument("--sys-prefix", action="store_true", help="install into this Python's prefix (virtualenv/conda)")
    k.add_argument("--prefix", help="install under this prefix")
    k.add_argument("--name", default="forkreload", help="the kernelspec's name")
    k.add_argument("--display-name", default="Python 3 (forkreload)", help="the name front ends show")
    _add_settings(k)

    c = sub.add_parser("console", help="a terminal session (IPython look and feel) that survives edits")
    _add_settings(c)

    args = parser.parse_args(argv)
    try:
        if args.command == "kernel":
            if args.action == "run":
                if not args.connection_file:
                    parser.error("kernel: -f CONNECTION_FILE is required to run the kernel")
                return _kernel(args)
            return _kernelspec(args)
        if args.command == "console":
            return _console(args)
    except ConfigError as exc:
        print(f"forkreload: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"forkreload: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    return 2
