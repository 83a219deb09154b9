"""The `forkreload` command line: demo, kernel, console, doctor, server, version."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from . import __version__
from .config import MODES, ConfigError, load_settings

__all__ = ["main"]


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _add_settings(p: argparse.ArgumentParser) -> None:
    # Defaults are None so that pyproject.toml and FORKRELOAD_* still apply
    # where a flag was not given. Help texts fit one line of 80 columns.
    p.add_argument("--cwd", default=".", metavar="DIR", help="the project directory (default: the current one)")
    p.add_argument("--preload", type=_list, default=None, metavar="A,B", help="modules the snapshot imports ahead of time")
    p.add_argument("--mode", choices=MODES, default=None, metavar="MODE", help="after an edit: auto (default), fresh, inplace, off")
    p.add_argument("--quiet", action="store_true", default=None, help="no notice after a successful reload")
    p.add_argument("--no-learn", dest="learn", action="store_false", default=None, help="don't preload the libraries past sessions imported")
    p.add_argument("--watch", action="append", default=None, metavar="PATH", help="modules under PATH count as yours (repeatable)")


_SETTINGS_EPILOG = (
    "Flags not given come from FORKRELOAD_* environment variables, then from "
    "[tool.forkreload] in the project's pyproject.toml; `forkreload doctor` "
    "shows the settings in force."
)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, max_help_position=24, width=min(100, max(80, _columns())))


def _columns() -> int:
    import shutil

    return shutil.get_terminal_size((80, 24)).columns


def _cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("preload", "mode", "quiet", "watch", "learn")}


def _settings(args: argparse.Namespace) -> Any:
    return load_settings(args.cwd, _cli_settings(args))


def _kernel(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings.server:
        from .prestart import prestart

        prestart(settings)  # starts while the controller's modules import
    import logging

    from .controller import Controller, ControllerError

    # FORKRELOAD_LOG=path sends the controller's log to a file (kernels'
    # stderr often goes nowhere a user sees), every decision and swap phase
    # with its timing included (FORKRELOAD_LOG_LEVEL=info or warning for less).
    path = os.environ.get("FORKRELOAD_LOG")
    if path:
        level = os.environ.get("FORKRELOAD_LOG_LEVEL", "debug").upper()
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", filename=path)
    else:
        logging.basicConfig(level=logging.WARNING, format="forkreload: %(message)s")
    with open(args.connection_file) as f:
        conn = json.load(f)
    controller = Controller(conn, settings)
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
    if not os.path.isdir(s.cwd):
        print(f"forkreload: not a directory: {args.cwd}", file=sys.stderr)
        return 2
    # Resolved here only to fail early on a bad setting; the controller
    # resolves them itself, so each keeps the origin it came from.
    launch = LaunchSettings(cwd=s.cwd, **_cli_settings(args))
    return run_console(launch, project_root=s.project_root)


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    return run_doctor(args.cwd, _cli_settings(args))


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoError, run_auto, run_demo

    try:
        return run_auto(args.dir) if args.auto else run_demo(args.dir)
    except DemoError as exc:
        print(f"forkreload: {exc}", file=sys.stderr)
        return 2


def _kernelspec(args: argparse.Namespace) -> int:
    from . import kernelspec

    name = args.spec_name or args.name
    if args.action == "install":
        path = kernelspec.install(
            name=name,
            display_name=args.display_name,
            user=args.user,
            prefix=sys.prefix if args.sys_prefix else args.prefix,
            preload=args.preload or [],
            provisioner=args.provisioner,
        )
        print(f"Installed kernelspec {name} in {path}")
        if not args.provisioner:
            print(kernelspec.PLAIN_NOTE)
            return 0
        print(kernelspec.TRADE_OFF)
        from .doctor import front_ends

        for fe in front_ends():
            problem, verdict = fe.verdict(name, kernelspec.make_spec(provisioner=True))
            if fe.error or problem or name not in fe.found:
                print(f"  {fe.command}: {fe.error or verdict}")
    elif args.action == "uninstall":
        print(f"Removed {kernelspec.uninstall(name)}")
    else:
        for name, (path, spec) in kernelspec.read_specs().items():
            restart = "provisioner (fast restart; only where forkreload imports)" if kernelspec.has_provisioner(spec) else "plain"
            print(f"  {name:<24} {path}  {restart}")
    return 0


def _server(args: argparse.Namespace) -> int:
    """`forkreload server status|stop`: the user's snapshot servers."""
    import time

    from . import server

    try:
        d = server.server_dir(create=False)
    except FileNotFoundError:
        d = None
    found = server.list_servers(d) if d is not None else []
    if not found:
        print("no snapshot server is running")
        return 0
    for info in found:
        kid = info.get("kid", "?")
        answer = server.ask(d or "", kid, {"op": "stop" if args.action == "stop" else "status"})
        if answer is None:
            if args.action == "stop" and server.remove_stale(d or "", kid):
                print(f"{kid}  pid {info.get('pid')}: was not running; its files removed")
            else:
                print(f"{kid}  pid {info.get('pid')}: not answering")
            continue
        if args.action == "stop":
            gone = server.wait_gone(d or "", kid)
            print(f"{kid}  pid {answer.get('pid')}: {'stopped' if gone else 'asked to stop'}")
            continue
        preload = ", ".join(answer.get("preload") or {}) or "(kernel only)"
        since = time.strftime("%H:%M:%S", time.localtime(info.get("started", 0)))
        print(f"{kid}  pid {answer['pid']}  up {answer['uptime']:.0f} s (since {since})  "
              f"clients {len(answer['clients'])}  workers {len(answer['workers'])}"
              f"{'  retired' if answer.get('retired') else ''}"
              # (a cold start's first worker imported for itself; the server imports a second later)
              f"{'  importing later' if answer.get('prepared') is False else ''}")
        print(f"    preloads: {preload}")
        if answer.get("preload_failed"):
            print(f"    failed: {', '.join(answer['preload_failed'])}")
        key = info.get("key") or {}
        py = (key.get("python") or ["?"])[0]
        print(f"    python: {py}  forkreload {(key.get('forkreload') or ['?'])[0]}  idle timeout {answer.get('idle', 0):.0f} s")
    if args.action == "stop" and d is not None:
        try:
            os.rmdir(d)  # only when empty: nothing of forkreload's left
        except OSError:
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkreload", description="Keep an interactive Python session alive across source edits.")
    parser.add_argument("--version", action="version", version=f"forkreload {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    dm = sub.add_parser(
        "demo",
        help="try forkreload on a small example project, in a minute",
        description="Copy a small example project (shapes.py) into DIR (default: a temporary directory, "
        "removed at the end), print the cells to type and the edits to make, and start the console in it.",
        formatter_class=_formatter,
    )
    dm.add_argument("dir", nargs="?", metavar="DIR", help="where to put the example project (kept)")
    dm.add_argument("--auto", action="store_true", help="play the cells and edits by itself and print the transcript")

    k = sub.add_parser("kernel", help="the Jupyter kernel; `kernel install|uninstall|list` manage its kernelspec")
    k.add_argument("action", nargs="?", choices=["run", "install", "uninstall", "list"], default="run")
    k.add_argument("spec_name", nargs="?", metavar="NAME", help="the kernelspec to install or uninstall (as --name)")
    k.add_argument("-f", "--connection-file", help="the Jupyter connection file (to run the kernel)")
    k.add_argument("--user", action="store_true", help="install for this user only")
    k.add_argument("--sys-prefix", action="store_true", help="install into this Python's prefix (virtualenv/conda)")
    k.add_argument("--prefix", help="install under this prefix")
    k.add_argument("--name", default="forkreload", help="the kernelspec's name")
    k.add_argument("--display-name", default="Python 3 (forkreload)", help="the name front ends show")
    k.add_argument(
        "--provisioner",
        action="store_true",
        help='name forkreload\'s provisioner: a fast "Restart kernel", but a Jupyter run from another environment drops the kernel',
    )
    _add_settings(k)

    c = sub.add_parser(
        "console",
        help="a terminal IPython session that survives edits",
        description="A terminal IPython session that survives edits of your modules: after an edit "
        "the next cell runs the new code with your variables kept. Ctrl-C interrupts a cell; "
        "exit or Ctrl-D ends the session and every process it started.",
        epilog=_SETTINGS_EPILOG,
        formatter_class=_formatter,
    )
    _add_settings(c)

    d = sub.add_parser(
        "doctor",
        help="check versions, fork support, settings and preloads",
        description="Check this machine and a project: Python and package versions, fork support, "
        "the settings in force and where each came from, and the snapshot's preloads "
        "(import times, threads they started). Exit status 1 when something is wrong.",
        epilog=_SETTINGS_EPILOG,
        formatter_class=_formatter,
    )
    _add_settings(d)

    sv = sub.add_parser(
        "server",
        help="the snapshot server shared by your kernels: status or stop",
        description="The snapshot server (one per Python, forkreload version and preload set) serves "
        "every forkreload kernel of this user: `status` lists each (key, pid, clients, workers, "
        "uptime, preloads); `stop` ends them and the workers they forked (a kernel still running "
        "then gets a fresh worker from a new server).",
        formatter_class=_formatter,
    )
    sv.add_argument("action", nargs="?", choices=["status", "stop"], default="status")

    args = parser.parse_args(argv)
    try:
        if args.command == "server":
            return _server(args)
        if args.command == "kernel":
            if args.action == "run":
                if not args.connection_file:
                    parser.error("kernel: -f CONNECTION_FILE is required to run the kernel")
                return _kernel(args)
            return _kernelspec(args)
        if args.command == "console":
            return _console(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "doctor":
            return _doctor(args)
    except ConfigError as exc:
        print(f"forkreload: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"forkreload: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    return 2
