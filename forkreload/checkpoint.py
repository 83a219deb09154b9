"""Checkpoints, on the worker's side: a forked copy of the worker that waits.

After a cell that changed the user's state, the controller asks the worker
for a checkpoint: the worker forks, and the child (the checkpoint) does
nothing but wait on a private channel to the controller. Copy-on-write
keeps it cheap: it costs the pages the live worker writes afterwards, not
the size of the state, and no value is pickled.

When the controller restores a checkpoint (an undo, or a crash of the
worker), the checkpoint forks once more and that child becomes a worker:
fresh kernel machinery (zmq sockets, IOPub and heartbeat threads, event
loop) around the *old* interpreter: the same shell, user namespace,
modules, history and execution count. The checkpoint itself stays as it
was, so it can be restored again, and it reports how its worker ended (it
is that worker's parent, as the snapshot is of the others).

Forking a process with threads leaves in the child only the thread that
forked: any lock another thread held at that moment stays held for ever.
The fork happens in the main thread between cells, with the locks the
restored worker needs (IPython's history caches) taken around it, and the
child never touches the old kernel's sockets, streams or threads.
"""

from __future__ import annotations

import ast
import asyncio
import collections
import errno
import os
import posix
import random
import select
import signal
import socket
import sys
import time
from typing import Any

from .channel import Channel, ForgedMessage, set_parent_death_signal
from .snapshot import describe_status

__all__ = ["assigned_names", "take", "trivial_cell"]

# Calls a cell may make and still change nothing the user could undo.
_HARMLESS_CALLS = frozenset(
    {"print", "len", "repr", "str", "type", "id", "dir", "help", "display", "isinstance", "issubclass", "hash", "vars",
     "sorted", "sum", "min", "max", "abs", "round", "callable", "format", "bool", "int", "float", "list", "tuple", "set", "dict"}
)
# Methods that read and do not write, in numpy, pandas and the builtins: a
# cell that only calls these (to look at a value) is not a change to undo.
_READING_METHODS = frozenset(
    {"sum", "mean", "median", "std", "var", "min", "max", "argmin", "argmax", "any", "all", "prod", "cumsum", "count",
     "tolist", "to_list", "to_numpy", "to_dict", "to_string", "item", "items", "keys", "values", "get", "index",
     "head", "tail", "describe", "info", "unique", "nunique", "value_counts", "isna", "isnull", "notna", "memory_usage",
     "round", "copy", "astype", "reshape", "ravel", "flatten", "nbytes", "dot", "startswith", "endswith", "format",
     "upper", "lower", "strip", "split", "join", "shape", "dtype", "equals", "isclose", "allclose"}
)
# `%forkreload ...` and the like become get_ipython().run_line_magic(name, ...).
# (Not %time or %timeit: they run the code they are given.)
_HARMLESS_MAGICS = frozenset({"forkreload", "who", "whos", "pwd", "lsmagic", "history", "pinfo", "pinfo2", "psearch"})


def _harmless(node: ast.AST) -> bool:
    if isinstance(node, (ast.Name, ast.Constant)):
        return True
    if isinstance(node, ast.Attribute):
        return _harmless(node.value)
    if isinstance(node, ast.Subscript):
        return _harmless(node.value) and _harmless(node.slice)
    if isinstance(node, (ast.Tuple, ast.List)):
        return all(_harmless(e) for e in node.elts)
    if isinstance(node, ast.JoinedStr):
        return all(_harmless(v.value) if isinstance(v, ast.FormattedValue) else True for v in node.values)
    if isinstance(node, (ast.BinOp, ast.Compare, ast.UnaryOp, ast.BoolOp)):
        return all(_harmless(c) for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr))
    if isinstance(node, ast.Call):
        args = [*node.args, *(k.value for k in node.keywords)]
        if isinstance(node.func, ast.Name) and node.func.id in _HARMLESS_CALLS:
            return all(_harmless(a) for a in args)
        if isinstance(node.func, ast.Attribute) and node.func.attr in _READING_METHODS:
            return _harmless(node.func.value) and all(_harmless(a) for a in args)
        if (isinstance(node.func, ast.Attribute) and node.func.attr == "run_line_magic"
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in _HARMLESS_MAGICS):
            return True
    return False


def trivial_cell(code: str) -> bool:
    """Whether a cell (as IPython transformed it) cannot have changed the
    user's state: only names, constants and calls like print or len.

    A rule that is not exact, on the safe side: a method call (lst.append,
    df.drop(inplace=True)) or any statement counts as a change.
    """
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return all(isinstance(s, ast.Expr) and _harmless(s.value) for s in tree.body)


def _file_offsets() -> dict[int, int]:
    """The offset of each open regular file: the child shares them with the
    worker, which keeps reading and writing after the checkpoint."""
    offsets: dict[int, int] = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
            if not target.startswith("/") or target.startswith(("/dev/", "/proc/")):
                continue
            offsets[fd] = os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:
            continue
    return offsets


_OPENMP_NAMES = ("libgomp", "libiomp", "libomp")
_openmp: tuple[int, list[Any]] = (-1, [])


def _openmp_runtimes() -> list[Any]:
    """The OpenMP runtimes loaded in this process (torch's libgomp, MKL's
    libiomp5), looked up again only when modules were imported since."""
    global _openmp
    if _openmp[0] == len(sys.modules):
        return _openmp[1]
    import ctypes

    found: list[Any] = []
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if ".so" in line}
    except OSError:
        paths = set()
    for path in sorted(p for p in paths if os.path.basename(p).startswith(_OPENMP_NAMES)):
        try:
            lib = ctypes.CDLL(path)
            pause = lib.omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes = [ctypes.c_int]
        found.append(pause)
    _openmp = (len(sys.modules), found)
    return found


def _pause_openmp() -> None:
    """An OpenMP runtime whose thread pool ran in this process hangs in a
    forked child at its next parallel region (the pool's threads are not
    there): the pool is released before the fork (OpenMP 5's
    omp_pause_resource_all); parent and child each start a new one when
    they next need it."""
    for pause in _openmp_runtimes():
        pause(1)  # omp_pause_soft


_PAGE = os.sysconf("SC_PAGE_SIZE")
_HOT_CAP = (16 << 20) // _PAGE  # pages pre-faulted after a fork, at most
_SMALL_MAPPING = 64 << 20  # bigger ones hold data a cell writes or not
_MADV_POPULATE_WRITE = 23  # Linux 5.14
_RECENT: collections.deque[list[tuple[int, int]]] = collections.deque(maxlen=4)  # hot ranges of the last checkpoints


def _hot_ranges() -> list[tuple[int, int]]:
    """Where the next cell will write: the interpreter's pages that only this
    process maps, in small private mappings (present and exclusive in
    /proc/self/pagemap: written since the last checkpoint's fork, or new).
    (start, length) ranges; none when they are more than the cap (the first
    checkpoint of a worker: everything it allocated is exclusive then)."""
    np = sys.modules.get("numpy")
    ranges: list[tuple[int, int]] = []
    pages = 0
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return []
    try:
        for line in lines:
            parts = line.split()
            if parts[1][1] != "w" or parts[1][3] != "p" or (len(parts) > 5 and parts[5].startswith("[") and parts[5] not in ("[heap]", "[stack]")):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if end - start > _SMALL_MAPPING:
                continue
            data = os.pread(fd, (end - start) // _PAGE * 8, start // _PAGE * 8)
            if np is not None:
                e = np.frombuffer(data, dtype=np.uint64)
                hot = ((e >> np.uint64(63)) & (e >> np.uint64(56)) & np.uint64(1)).astype(bool)
                idx = np.flatnonzero(hot)
                if not len(idx):
                    continue
                breaks = np.flatnonzero(np.diff(idx) != 1)
                firsts = np.concatenate(([idx[0]], idx[breaks + 1]))
                lasts = np.concatenate((idx[breaks], [idx[-1]]))
                found = [(start + int(a) * _PAGE, (int(b) - int(a) + 1) * _PAGE) for a, b in zip(firsts, lasts, strict=True)]
            else:
                found = []
                for i, entry in enumerate(memoryview(data).cast("Q")):
                    if (entry >> 63) & (entry >> 56) & 1:
                        addr = start + i * _PAGE
                        if found and found[-1][0] + found[-1][1] == addr:
                            found[-1] = (found[-1][0], found[-1][1] + _PAGE)
                        else:
                            found.append((addr, _PAGE))
            pages += sum(n for _, n in found) // _PAGE
            if pages > _HOT_CAP:
                return []
            ranges += found
    except (OSError, ValueError, IndexError):
        return []
    finally:
        os.close(fd)
    return ranges


def _prefault(ranges: list[tuple[int, int]]) -> None:
    """Take the copy-on-write faults of the hot pages now, between cells,
    instead of in the next cell (the data is not changed)."""
    if not ranges:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for start, length in ranges:
        if madvise(start, length, _MADV_POPULATE_WRITE) != 0 and ctypes.get_errno() == errno.EINVAL:
            return  # an old kernel; a range no longer mapped (ENOMEM) is skipped: nothing lost


def take(shell: Any, sock_path: str, key: bytes, cell: int, threads: list[str] | None = None) -> int:
    """Fork a checkpoint of this worker; its pid (in the worker).

    Called in the worker's main thread between cells. The child connects to
    the controller at `sock_path` and waits there; it never returns.
    """
    hm = shell.history_manager
    # IPython 9 stops its history thread before any fork (and starts it again
    # when next needed): taking the cache locks here would deadlock with that
    # hook, which joins a thread that waits for them. Before, the locks are
    # taken so the child never inherits one held by that thread.
    own_hook = hasattr(type(hm), "_stop_thread")
    locks = [] if own_hook else [lock for lock in (getattr(hm, "db_input_cache_lock", None), getattr(hm, "db_output_cache_lock", None)) if lock is not None]
    rng = random.getstate()  # `random` reseeds itself in a forked child
    _pause_openmp()
    hot = _hot_ranges()
    # The pages written in each of the last few intervals: a page written two
    # cells ago is shared with that cell's checkpoint, not exclusive, yet the
    # same kernel machinery writes it again (~200 faults of ~8 us per cell
    # on a VM otherwise). Capped as one interval's pages are.
    earlier = [r for past in _RECENT for r in past]
    _RECENT.append(hot)
    if sum(n for _, n in earlier) // _PAGE <= _HOT_CAP:
        hot = hot + earlier
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    for lock in locks:
        lock.acquire()
    try:
        # posix.fork, not os.fork: a debugger (debugpy) replaces os.fork to
        # follow children, and would try to attach the checkpoint.
        pid = posix.fork()
    finally:
        for lock in locks:
            lock.release()
    if pid:
        # IPython 9's fork hook stopped the history thread: started again
        # now, between cells, not by the next cell (a thread and a sqlite
        # connection, ~0.7 ms of that cell's latency).
        restart = getattr(hm, "_restart_thread_if_stopped", None)
        if own_hook and callable(restart):
            try:
                restart()
            except Exception:
                pass  # the next cell starts it, as IPython would
        _prefault(hot)
        return pid
    try:
        _stop_tracing()
        random.setstate(rng)
        _checkpoint_main(shell, sock_path, key, cell, os.getppid(), threads or [])
    finally:
        os._exit(1)
    return 0  # not reached


def _stop_tracing() -> None:
    """A debugger's trace hooks came along with the fork; its threads did
    not (they would wait for them for ever). The agent's own hooks are only
    set while an import runs, which is not now."""
    sys.settrace(None)
    sys.setprofile(None)
    monitoring = getattr(sys, "monitoring", None)
    if monitoring is not None and monitoring.get_tool(monitoring.DEBUGGER_ID) is not None:
        monitoring.set_events(monitoring.DEBUGGER_ID, 0)
        monitoring.free_tool_id(monitoring.DEBUGGER_ID)


def _checkpoint_main(shell: Any, sock_path: str, key: bytes, cell: int, worker_pid: int, threads: list[str]) -> None:
    """The checkpoint's life: wait for the controller's word."""
    # Not the worker's process group member for Ctrl-C, and not tied to the
    # worker's life: a checkpoint exists to outlive a crash of the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    offsets = _file_offsets()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(sock_path)
    except OSError:
        os._exit(0)  # the controller is gone, or takes no checkpoints now
    chan = Channel(sock, key)
    # The user's threads ran in the worker: the copy has only the thread that forked.
    chan.send({"op": "checkpoint", "pid": os.getpid(), "worker": worker_pid, "cell": cell, "time": time.time(), "threads": threads})
    children: dict[int, int] = {}  # pidfd -> pid of the workers made from this checkpoint
    while True:
        ready, _, _ = select.select([chan.fileno(), *children], [], [])
        for fd in [fd for fd in ready if fd in children]:
            pid = children.pop(fd)
            _, status = os.waitpid(pid, 0)
            os.close(fd)
            chan.send({"op": "exited", "pid": pid, "status": describe_status(status)})
        if chan.fileno() not in ready:
            continue
        try:
            msg, fds = chan.recv()
        except ForgedMessage:
            continue
        except OSError:
            msg, fds = None, []
        for fd in fds:
            os.close(fd)
        if msg is None or msg.get("op") == "discard":
            os._exit(0)  # a worker of ours dies with us (its parent-death signal)
        if msg.get("op") == "restore":
            # Restored again while the last one still ends: both are ours for a moment.
            child = posix.fork()
            if child == 0:
                try:
                    chan.close()
                    _become_worker(shell, msg, offsets)
                finally:
                    os._exit(1)
            child_fd = os.pidfd_open(child)
            children[child_fd] = child
            chan.send({"op": "restored", "pid": child}, fds=[child_fd])


def _new_history_session(shell: Any) -> None:
    """This worker's cells would reuse line numbers the worker it copies has
    written to IPython's history database: it writes a session of its own,
    through a connection of its own (one crossing a fork is not safe)."""
    hm = shell.history_manager
    if not getattr(hm, "enabled", False) or str(getattr(hm, "hist_file", ":memory:")) == ":memory:":
        return
    try:
        import sqlite3

        conn = sqlite3.connect(str(hm.hist_file), **getattr(hm, "connection_options", {}))
        hm.new_session(conn)
        hm.db = conn
    except Exception:
        pass  # history of this session is then kept in memory only


def _continue_count(shell: Any, count: int, inputs: dict[str, str]) -> None:
    """The cell numbers go on from the session's, not from the copy's: the
    cells run since the checkpoint stay in the input history (`In`, `_ih`,
    their text where the controller knew it), their values are gone."""
    if count <= shell.execution_count:
        return
    hm = shell.history_manager
    for n in range(shell.execution_count, count):
        text = str(inputs.get(str(n), ""))
        for hist in (hm.input_hist_parsed, hm.input_hist_raw):
            while len(hist) <= n:
                hist.append("")
            hist[n] = text
    shell.execution_count = count


def _become_worker(shell: Any, msg: dict[str, Any], offsets: dict[int, int]) -> None:
    """Turn this copy of a worker into a running worker again; never returns."""
    import atexit
    import json

    parent = os.getppid()
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    atexit._clear()
    for fd, offset in offsets.items():
        try:
            os.lseek(fd, offset, os.SEEK_SET)
        except OSError:
            pass
    # The old kernel's output streams hold a pipe read by a thread that is
    # gone; fds 1 and 2 go back to what the worker was started with, and the
    # new kernel captures them afresh.
    for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
        original = getattr(stream, "_original_stdstream_copy", None)
        if isinstance(original, int):
            try:
                os.dup2(original, fd)
            except OSError:
                pass
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    _new_history_session(shell)
    _continue_count(shell, int(msg.get("count") or 0), msg.get("inputs") or {})

    import ipykernel.ipkernel
    from ipykernel.ipkernel import IPythonKernel
    from ipykernel.kernelapp import IPKernelApp

    from . import agent as agent_mod
    from .worker import worker_connection

    # This process was forked inside the old event loop's callback: that
    # loop (its epoll set is shared with the worker) is left alone for good.
    asyncio.events._set_running_loop(None)
    asyncio.set_event_loop(asyncio.new_event_loop())
    IPKernelApp.clear_instance()
    IPythonKernel.clear_instance()
    ipykernel.ipkernel._comm_manager = None

    privdir, wid, key = msg["privdir"], msg["wid"], msg["key"]
    conn = worker_connection(privdir, wid, key)
    cf = os.path.join(privdir, f"w{wid}.json")
    with open(os.open(cf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(conn, f)
    app = IPKernelApp.instance(connection_file=cf, parent_handle=parent)
    # The shell is the old one (IPythonKernel finds the existing instance):
    # its extensions, startup files and GUI set-up ran already.
    app.init_gui_pylab = app.init_extensions = app.init_code = lambda: None  # type: ignore[method-assign]
    app.initialize([])  # type: ignore[no-untyped-call]
    kernel = app.kernel
    shell.kernel = kernel
    from .debugger import prepare_worker

    prepare_worker(kernel, privdir)  # a new kernel, a new debugger: the session's cell files again
    agent = agent_mod.current()
    if agent is not None:
        agent.rehome(kernel)
    app.start()  # type: ignore[no-untyped-call]
    os._exit(0)


def assigned_names(code: str) -> list[str]:
    """Top-level names a cell binds (assignments, imports, defs, for targets),
    in order: what a crash in it, or in a later cell, loses."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    names: list[str] = []

    def add(target: ast.AST) -> None:
        for node in ast.walk(target):
            if isinstance(node, ast.Name) and node.id not in names:
                names.append(node.id)

    for stmt in tree.body:
        if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            for t in stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]:
                while isinstance(t, (ast.Subscript, ast.Attribute)):
                    t = t.value  # a[:] = 0 and obj.x = 1 change a and obj
                if isinstance(t, (ast.Name, ast.Tuple, ast.List, ast.Starred)):
                    add(t)
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and stmt.name not in names:
            names.append(stmt.name)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            for alias in stmt.names:
                name = alias.asname or alias.name.partition(".")[0]
                if name != "*" and name not in names:
                    names.append(name)
        elif isinstance(stmt, (ast.For, ast.AsyncFor, ast.With, ast.AsyncWith)):
            targets = [stmt.target] if isinstance(stmt, (ast.For, ast.AsyncFor)) else [i.optional_vars for i in stmt.items if i.optional_vars]
            for t in targets:
                add(t)
    return names
