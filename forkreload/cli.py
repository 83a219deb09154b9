"""The `forkreload` command line: kernel, console, doctor, version."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__

__all__ = ["main"]


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _add_settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cwd", default=".", help="the project directory (the worker's cwd, on sys.path)")
    p.add_argument("--preload", type=_list, default=[], help="modules the snapshot imports ahead, comma-separated")
    p.add_argument("--mode", choices=["auto", "fresh", "inplace", "off"], default="auto", help="how edits are applied")
    p.add_argument("--quiet", action="store_true", help="no notice after a successful reload")
    p.add_argument("--watch", action="append", default=[], help="extra path whose modules count as the user's")


def _kernel(args: argparse.Namespace) -> int:
    from .controller import Controller, ControllerError, Settings

    logging.basicConfig(level=logging.WARNING, format="forkreload: %(message)s")
    with open(args.connection_file) as f:
        conn = json.load(f)
    settings = Settings(cwd=args.cwd, preload=args.preload, mode=args.mode, quiet=args.quiet, watch=args.watch)
    controller = Controller(conn, settings)
    try:
        controller.start()
    except ControllerError as exc:
        print(f"forkreload: {exc}", file=sys.stderr)
        controller.close()
        return 1
    controller.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkreload", description="Keep an interactive Python session alive across source edits.")
    parser.add_argument("--version", action="version", version=f"forkreload {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernel", help="run the Jupyter kernel (the controller) for a connection file")
    k.add_argument("-f", "--connection-file", required=True, help="the Jupyter connection file")
    _add_settings(k)
    c = sub.add_parser("console", help="a terminal session (IPython look and feel) that survives edits")
    _add_settings(c)
    args = parser.parse_args(argv)
    if args.command == "kernel":
        return _kernel(args)
    if args.command == "console":
        from .console import run_console
        from .launcher import LaunchSettings

        return run_console(LaunchSettings(cwd=args.cwd, preload=args.preload, mode=args.mode, quiet=args.quiet, watch=args.watch))
    return 2
