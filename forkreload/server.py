"""The snapshot server: one pre-imported zygote shared by the user's kernels.

A per-kernel snapshot costs every kernel start the import of the kernel
machinery and of the preloads, and every kernel its own copy of them. The
server is the same zygote (`snapshot.prepare`), started once per *key* and
kept: the first kernel of a key spawns it, detached (its own session, no
parent-death signal), and every later start or restart of a kernel of that
key only asks it for a fork. Workers forked from it share its pages.

The key is what decides which modules a fork would hold: the interpreter
and its version, forkreload's version (and source mtimes, so a changed
checkout is a new key), the preload set with each preloaded top-level
package's location, version and mtime (an upgrade is a new key), the
import-relevant environment (PYTHONPATH, thread and library variables). A
changed key is another server; the old one ends after its idle timeout.

Only the user may talk to it: its socket lies in a 0700 directory of the
user's, each connection's peer uid is checked (SO_PEERCRED), and every
message is signed with a key kept in a 0600 file beside the socket.

It never runs user code: a fork request carries what the worker needs from
its client (the Jupyter key, the client's private directory, cwd, the
environment, the client's stdout and stderr as descriptors), and only the
child, once forked, applies them. Each client's workers are killed when
its connection ends (its controller died or closed), and each worker's
exit status goes to the client that asked for it. With no client left, the
server waits `server_idle` seconds for one, then exits.

The files of a server of key K in the server directory: K.sock (the socket),
K.key (the channel key), K.json (who it is: pid, key, preloads, start time),
K.lock (held by the live server for its life: a second one of the key
waits for it, then leaves), K.log (its
stderr). A clean exit removes them all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

from . import __version__
from .channel import Channel, ForgedMessage, lock_held

if TYPE_CHECKING:
    from .config import Settings

__all__ = [
    "ServerUnavailable",
    "server_dir",
    "server_key",
    "peer_credentials",
    "peer_allowed",
    "connect",
    "list_servers",
    "ask",
    "command",
    "spawn",
    "preload_set",
    "spawn_first",
    "serve_first",
    "snapshot_env",
    "server_starting",
    "main",
    "serve",
    "DEFAULT_IDLE",
]

DEFAULT_IDLE = 600.0
_FIRST_CLIENT_WAIT = 10.0
_FIRST_WORKER_TIMEOUT = 300.0  # its imports, on a machine as slow as a snapshot's may be
_FIRST_PREPARE_DELAY = 1.0  # as the full server of a cold start (`ServerPool.launch_later`)
_SERVER_DIR_ENV = "FORKRELOAD_SERVER_DIR"

# Environment variables that change what an import does (thread pools read
# at import, library switches). Others (HOME, TERM...) reach the worker
# through its fork request and do not make another server.
_ENV_PREFIXES = (
    "PYTHON", "OMP_", "OPENBLAS_", "MKL_", "NUMEXPR_", "VECLIB_", "BLIS_", "CUDA_", "NVIDIA_",
    "LD_", "VIRTUAL_ENV", "CONDA_PREFIX", "MPL", "KMP_", "TF_", "XLA_", "JAX_", "PYTORCH_",
)
_KERNEL_PACKAGES = ("ipykernel", "IPython", "zmq", "jupyter_client", "tornado", "traitlets", "cloudpickle", "debugpy")


class ServerUnavailable(OSError):
    """The snapshot server cannot be used (directory unsafe, spawn failed)."""


# -- where servers live, and who they are ----------------------------------------


def server_dir(create: bool = True) -> str:
    """The user's server directory: FORKRELOAD_SERVER_DIR, else in
    XDG_RUNTIME_DIR, else in /dev/shm (or the temp dir). It must be a real
    directory of this user that no one else can open."""
    path = os.environ.get(_SERVER_DIR_ENV)
    if not path:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime and os.path.isdir(runtime):
            path = os.path.join(runtime, "forkreload-server")
        else:
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
            path = os.path.join(base, f"forkreload-server-{os.getuid()}")
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ServerUnavailable(f"{path} is not a private directory of this user")
    return path


def _package_state(name: str) -> list[Any]:
    """Where a top-level package is and the mtimes of its file and folder:
    an install or upgrade writes new files into a new folder. (Cheaper than
    asking importlib.metadata for versions, which a start would pay for.)"""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return [None]
    if spec is None:
        return [None]
    origin = spec.origin if spec.origin not in (None, "built-in", "frozen") else None
    where: list[str | None] = list(spec.submodule_search_locations or []) or [origin]
    mtimes = []
    for p in [origin, *where]:
        try:
            mtimes.append(os.stat(p).st_mtime_ns if p else None)
        except OSError:
            mtimes.append(None)
    return [origin, where, mtimes]


def _forkreload_state() -> list[Any]:
    here = os.path.dirname(os.path.abspath(__file__))
    newest = 0
    for name in os.listdir(here):
        if name.endswith(".py"):
            with contextlib.suppress(OSError):
                newest = max(newest, os.stat(os.path.join(here, name)).st_mtime_ns)
    return [__version__, here, newest]


def server_key(preload: list[str], watch: list[str], cwd: str, environ: dict[str, str] | None = None,
               python: str = sys.executable) -> tuple[str, dict[str, Any]]:
    """The key of the server that can serve these preloads here: (short id, what it is made of)."""
    env = dict(os.environ if environ is None else environ)
    pythonpath = [os.path.realpath(os.path.join(cwd, p)) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    relevant = {k: v for k, v in sorted(env.items()) if k.startswith(_ENV_PREFIXES) and k != "PYTHONPATH"}
    tops = sorted({p.split(".")[0] for p in preload})
    prefixes = tuple(t.upper() + "_" for t in tops)
    relevant.update({k: v for k, v in sorted(env.items()) if prefixes and k.startswith(prefixes)})
    kernel = {dist: _package_state(dist) for dist in _KERNEL_PACKAGES}
    # What stays the same across an upgrade: a new server of the same
    # family replaces the older ones (they take no new client, and end
    # with their last).
    family = [os.path.realpath(python), list(preload), pythonpath, relevant, sorted(watch)]
    desc: dict[str, Any] = {
        "family": hashlib.sha256(json.dumps(family, sort_keys=True).encode()).hexdigest()[:16],
        "python": [os.path.realpath(python), sys.version],
        "forkreload": _forkreload_state(),
        "kernel": kernel,
        "preload": list(preload),
        "packages": {t: _package_state(t) for t in tops},
        "pythonpath": pythonpath,
        "env": relevant,
        "watch": sorted(watch),
    }
    kid = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
    return kid, desc


# -- who is on the other end ---------------------------------------------------


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected `sock`'s other end."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid


def peer_allowed(uid: int) -> bool:
    """Only this user's own processes may use (or pretend to be) the server."""
    return uid == os.getuid()


def _paths(d: str, kid: str) -> dict[str, str]:
    return {ext: os.path.join(d, f"{kid}.{ext}") for ext in ("sock", "key", "json", "lock", "log")}


def connect(d: str, kid: str) -> tuple[socket.socket, bytes] | None:
    """A connection to the live server of key `kid` and its channel key, or
    None when none listens (never started, exited, killed)."""
    paths = _paths(d, kid)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(paths["sock"])
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return None
        raise
    try:
        _pid, uid, _gid = peer_credentials(sock)
        if not peer_allowed(uid):
            raise ServerUnavailable(f"the process listening on {paths['sock']} is not this user's")
        with open(paths["key"], "rb") as f:
            key = f.read().strip()
    except FileNotFoundError:
        sock.close()
        return None  # a server on its way out removed its files: as if none listened
    except BaseException:
        sock.close()
        raise
    return sock, key


def list_servers(d: str) -> list[dict[str, Any]]:
    """What each server in `d` wrote about itself (K.json)."""
    found = []
    for name in sorted(os.listdir(d)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(d, name)) as f:
                found.append(json.load(f))
        except (OSError, ValueError):
            continue
    return found


def ask(d: str, kid: str, msg: dict[str, Any], timeout: float = 5.0) -> dict[str, Any] | None:
    """One request to the server of key `kid`, its answer (None: no server)."""
    conn = connect(d, kid)
    if conn is None:
        return None
    sock, key = conn
    sock.settimeout(timeout)
    chan = Channel(sock, key)
    try:
        chan.send(msg)
        answer, fds = chan.recv()
        for fd in fds:
            os.close(fd)
        return answer
    except (OSError, ForgedMessage):
        return None
    finally:
        chan.close()


def wait_gone(d: str, kid: str, timeout: float = 5.0) -> bool:
    """Wait until the server of key `kid` removed its files (it exited)."""
    paths = _paths(d, kid)
    deadline = time.monotonic() + timeout
    while os.path.exists(paths["json"]) or os.path.exists(paths["sock"]):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def remove_stale(d: str, kid: str) -> bool:
    """Remove the files of a server of key `kid` that died without cleaning
    up (SIGKILL); False when one is alive (or starting)."""
    paths = _paths(d, kid)
    lock_fd = _take_lock(paths["lock"])
    if lock_fd is None:
        return False
    try:
        for ext in ("sock", "key", "json", "log", "lock"):
            with contextlib.suppress(OSError):
                os.unlink(paths[ext])
    finally:
        os.close(lock_fd)
    return True


def server_starting(d: str, kid: str) -> bool:
    """Whether a server of key `kid` holds its lock (it is up, or importing)."""
    try:
        fd = os.open(_paths(d, kid)["lock"], os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    return lock_held(fd)


def spawn(d: str, kid: str, desc: dict[str, Any], preload: list[str], watch: list[str], cwd: str, idle: float,
          env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """Start the server of key `kid`, detached: its own session, no
    parent-death signal, output into K.log. Returns the process and a pipe
    that says `ready` once it (or another server of the key, which holds
    the key's lock) listens, or `failed ...`."""
    r, w = os.pipe2(os.O_CLOEXEC)
    logfd = os.open(_paths(d, kid)["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen(command(), stdin=subprocess.PIPE, stdout=logfd, stderr=logfd, cwd=cwd, env=env,
                                start_new_session=True, pass_fds=[w])
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
        os.close(logfd)
    cfg = {"dir": d, "kid": kid, "desc": desc, "preload": preload, "watch": watch, "cwd": cwd, "idle": idle, "ready_fd": w}
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(cfg).encode() + b"\n")
    proc.stdin.close()
    return proc, r


def snapshot_env() -> dict[str, str]:
    """The environment of a snapshot, and of the workers forked from it."""
    env = dict(os.environ)
    env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    # debugpy (pre-imported for fast worker start) warns about frozen modules.
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return env


def preload_set(settings: Settings) -> list[str]:
    """The preloads of a kernel of these settings: explicit, then learned."""
    preload = list(settings.preload)
    if settings.learn:
        from .config import LearnedModules

        preload += [m for m in LearnedModules(settings.project_root).modules if m not in preload]
    return preload


def _up(d: str, preload: list[str], settings: Settings) -> tuple[bool, str, dict[str, Any]]:
    """Whether a server that can start this kernel listens (full preload
    set, or kernel only), and the kernel-only server's key."""
    for names in ([preload] if preload else []) + [[]]:
        kid, desc = server_key(names, settings.watch, settings.cwd)
        conn = connect(d, kid)
        if conn is not None:
            conn[0].close()
            return True, kid, desc
    return False, kid, desc


def spawn_first(settings: Settings) -> tuple[subprocess.Popen[bytes] | None, int | None]:
    """Spawn the kernel-only server unless a server that can start this
    kernel is up or starting: (the process, its ready pipe)."""
    d = server_dir()
    up, kid, desc = _up(d, preload_set(settings), settings)
    if up or server_starting(d, kid):
        return None, None
    return spawn(d, kid, desc, [], settings.watch, settings.cwd, settings.server_idle, snapshot_env())


def serve_first(settings: Settings, ready_fd: int) -> None:
    """In a fork of a starting kernel (`prestart`): be its kernel-only
    server, unless a server that can start it is up (then say `up`, and
    exit). Never returns."""
    env = snapshot_env()
    d = server_dir()
    up, kid, desc = _up(d, preload_set(settings), settings)  # before os.environ becomes the snapshot's: the key reads it
    if up:
        _tell(ready_fd, "up")
        os._exit(0)
    logfd = os.open(_paths(d, kid)["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    os.close(logfd)
    # A spawned server has nothing else open (an exec closes the rest); a
    # fork has whatever the front end left open in the kernel, which a
    # server that outlives the kernel must not hold (a pipe read to its end).
    os.closerange(3, ready_fd)
    os.closerange(ready_fd + 1, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1024)
    os.chdir(settings.cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv[:] = [os.path.abspath(__file__)]
    serve({"dir": d, "kid": kid, "desc": desc, "preload": [], "watch": settings.watch, "cwd": settings.cwd,
           "idle": settings.server_idle, "ready_fd": ready_fd, "first_worker": True})


def command(python: str = sys.executable) -> list[str]:
    """The command line that starts a server (project directory off sys.path)."""
    from .command import python_command

    return python_command("forkreload.server", python=python)


# -- the server process ---------------------------------------------------------------


class _Client:
    def __init__(self, sock: socket.socket, chan: Channel, pid: int) -> None:
        self.sock = sock
        self.chan = chan
        self.pid = pid
        self.workers: set[int] = set()
        self.kernel = False  # said hello or asked for a fork (not `forkreload server status`)


class _Server:
    def __init__(self, cfg: dict[str, Any], lock_fd: int) -> None:
        self.cfg = cfg
        self.kid: str = cfg["kid"]
        self.paths = _paths(cfg["dir"], self.kid)
        self.idle: float = float(cfg.get("idle", DEFAULT_IDLE))
        self.lock_fd: int | None = lock_fd
        self.listener: socket.socket | None = None
        self.sock_ino: int | None = None
        self.clients: dict[int, _Client] = {}
        self.owner: dict[int, _Client] = {}  # worker pid -> the client it was forked for
        self.hello: dict[str, Any] = {}
        self.file_stats: dict[str, tuple[int, int]] = {}
        self.user_files: dict[tuple[str, ...], list[dict[str, str]]] = {}
        self.started = time.time()
        self.idle_since = time.monotonic()
        self.stopping = False
        self.served = False  # a client came
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.prepared = False
        self.first: tuple[int, Channel] | None = None  # the first worker, waiting for its fork request
        self.prepare_at: float | None = None  # when to import, once the first worker is handed out

    # -- start --

    def prepare(self) -> None:
        from .snapshot import prepare

        self.prepared = True
        self.prepare_at = None
        self.hello = prepare(self.cfg)
        self.hello["server"] = self.kid
        self.user_files[tuple(self.cfg.get("watch", []))] = self.hello.get("preload_files", [])
        preloads = {p.split(".")[0] for p in self.cfg["preload"]}
        # The state of each preloaded module's file as imported: a client
        # whose own (editable, watched) module changed since must not fork here.
        for name, mod in list(sys.modules.items()):
            file = getattr(mod, "__file__", None)
            if name.split(".")[0] in preloads and isinstance(file, str):
                with contextlib.suppress(OSError):
                    st = os.stat(file)
                    self.file_stats[os.path.realpath(file)] = (st.st_mtime_ns, st.st_size)

    def start_first_worker(self) -> None:
        """A cold start's first worker, forked before anything is imported.

        A worker forked after the imports writes to pages it shares with
        the server: each first write is a copy-on-write fault (~8 us on the
        development VM; ~2,100 of them for an `import numpy, pandas` alone),
        and a kernel's start and first import cell took ~40 ms longer.
        This one imports the kernel machinery itself, as a plain kernel
        does, and its hello is the server's (it holds what the server will
        hold). The server imports once it has handed it out
        (`_FIRST_PREPARE_DELAY` later, or at the next fork request), so
        that the two do not share the CPUs during the kernel's first cells.
        If it fails, the server imports and forks as usual.
        """
        from .snapshot import fork_child

        key = secrets.token_bytes(32)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

        def child() -> None:
            try:
                ours.close()
                self._first_worker(Channel(theirs, key))
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    sys.stderr.write(f"forkreload server: the first worker failed: {type(exc).__name__}: {exc}\n")

        pid = fork_child(child)
        theirs.close()
        chan = Channel(ours, key)
        msg: dict[str, Any] | None = None
        if isinstance(pid, int):
            try:
                ready, _, _ = select.select([chan.fileno()], [], [], _FIRST_WORKER_TIMEOUT)
                msg, fds = chan.recv() if ready else (None, [])
                for fd in fds:
                    os.close(fd)
            except (OSError, ForgedMessage):
                msg = None
        if not isinstance(pid, int) or msg is None or msg.get("op") != "hello":
            chan.close()
            if isinstance(pid, int):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.prepare()
            return
        self.hello = {**msg, "pid": os.getpid(), "server": self.kid}
        self.user_files[tuple(self.cfg.get("watch", []))] = msg.get("preload_files", [])
        self.first = (pid, chan)

    def _first_worker(self, chan: Channel) -> None:
        """In the first worker: import, say hello, wait for the fork request
        of the kernel that started this server, and become its worker."""
        from .channel import set_parent_death_signal
        from .snapshot import prepare

        server_pid = os.getppid()
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != server_pid:
            os._exit(0)
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # the server's: held by this process, it would outlive the server
            self.lock_fd = None
        with contextlib.suppress(KeyError, ValueError, OSError):
            os.close(int(self.cfg["ready_fd"]))  # the starting kernel's: only the server answers there
        chan.send(prepare(self.cfg))
        msg, fds = chan.recv()
        chan.close()
        if msg is None or msg.get("op") != "fork":
            os._exit(0)
        self._become_worker(msg, fds)

    def _hand_first(self, msg: dict[str, Any], fds: list[int]) -> int | None:
        """Give a fork request to the first worker: its pid, or None if it
        is gone (the server forks one itself)."""
        assert self.first is not None
        pid, chan = self.first
        self.first = None
        try:
            chan.send(msg, fds=fds)
        except OSError:
            return None
        finally:
            chan.close()
        self.prepare_at = time.monotonic() + _FIRST_PREPARE_DELAY
        return pid

    def _prepare_late(self) -> str | None:
        """The imports a first worker put off; why they failed, if they did
        (the server then takes no new client: a new one is spawned)."""
        try:
            self.prepare()
        except Exception as exc:
            self.prepare_at = None
            why = f"the snapshot server could not import the kernel machinery: {type(exc).__name__}: {exc}"
            sys.stderr.write(f"forkreload server: {why}\n")
            self.retire()
            return why
        for client in list(self.clients.values()):
            if client.kernel:
                try:
                    client.chan.send({"op": "prepared"})  # its spare may come now
                except OSError:
                    self._drop(client)
        return None

    def listen(self) -> None:
        key = secrets.token_hex(32).encode()
        tmp = self.paths["key"] + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        os.replace(tmp, self.paths["key"])
        self.key = key
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths["sock"])  # a dead server's: we hold the lock
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            listener.bind(self.paths["sock"])
        finally:
            os.umask(old_umask)
        listener.listen(64)
        self.listener = listener
        self.sock_ino = os.stat(self.paths["sock"]).st_ino
        self._write_info()
        self.idle_since = time.monotonic()

    def retire_older(self) -> None:
        """Servers of this family with another key (an older forkreload, an
        upgraded library) serve no new kernel: they end with their last."""
        family = self.cfg.get("desc", {}).get("family")
        if family is None:
            return
        for info in list_servers(self.cfg["dir"]):
            if info.get("kid") != self.kid and (info.get("key") or {}).get("family") == family:
                ask(self.cfg["dir"], info["kid"], {"op": "retire"}, timeout=2.0)

    def _write_info(self) -> None:
        info = {
            "kid": self.kid,
            "pid": os.getpid(),
            "started": self.started,
            "preload": self.cfg["preload"],
            "key": self.cfg.get("desc", {}),
            "idle": self.idle,
        }
        tmp = self.paths["json"] + ".tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w") as f:
            json.dump(info, f)
        os.replace(tmp, self.paths["json"])

    # -- the loop --

    def run(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_term)
        while True:
            if self.stopping:
                break
            # Before its first client, the one that spawned it is connecting.
            idle = self.idle if self.served else max(self.idle, _FIRST_CLIENT_WAIT)
            if not self.clients and (self.listener is None or time.monotonic() - self.idle_since >= idle):
                break  # idle too long, or retired and its last client gone
            fds = [self.wake_r, *self.clients]
            if self.listener is not None:
                fds.append(self.listener.fileno())
            timeout = None if self.clients else max(0.0, self.idle_since + idle - time.monotonic())
            if self.prepare_at is not None:
                until = max(0.0, self.prepare_at - time.monotonic())
                timeout = until if timeout is None else min(timeout, until)
            polled = dict(self.clients)
            readable, _, _ = select.select(fds, [], [], timeout)
            if self.prepare_at is not None and time.monotonic() >= self.prepare_at:
                self._prepare_late()
            if self.wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_r, 256)
                self._reap()
            if self.listener is not None and self.listener.fileno() in readable:
                self._accept()
            for fd in readable:
                # Only a client polled and still connected: a descriptor
                # dropped and reused by a new client this round has no data.
                client = polled.get(fd)
                if client is not None and self.clients.get(fd) is client:
                    self._on_client(client)
        self.shutdown()

    def _on_term(self, *_: Any) -> None:
        self.stopping = True

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        pid, uid, _gid = peer_credentials(sock)
        if not peer_allowed(uid):
            sys.stderr.write(f"forkreload server: refused a connection from uid {uid} (pid {pid})\n")
            sock.close()
            return
        self.clients[sock.fileno()] = _Client(sock, Channel(sock, self.key), pid)
        self.served = True

    def _drop(self, client: _Client) -> None:
        """A client left (closed, or its controller died): its workers end with it."""
        for pid in client.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.clients.pop(client.sock.fileno(), None)
        client.chan.close()
        if not self.clients and client.kernel:
            # Idle from when the last kernel left: a `server status` or
            # `doctor` asking now and then must not keep it up for ever.
            self.idle_since = time.monotonic()

    def _on_client(self, client: _Client) -> None:
        try:
            msg, fds = client.chan.recv()
        except ForgedMessage:
            sys.stderr.write(f"forkreload server: dropped a message with a bad signature from pid {client.pid}\n")
            return
        except OSError:
            msg, fds = None, []
        if msg is None or msg.get("op") == "exit":
            for fd in fds:
                os.close(fd)
            self._drop(client)
            return
        op = msg.get("op")
        try:
            if op in ("fork", "hello"):
                client.kernel = True
            if op == "fork":
                self._fork(client, msg, fds)
                fds = []
            elif op == "hello":
                client.chan.send(self._hello_for(msg))
            elif op == "status":
                client.chan.send(self.status(asking=client))
            elif op == "retire":
                self.retire()
                client.chan.send({"op": "retired", "pid": os.getpid()})
            elif op == "stop":
                client.chan.send({"op": "stopping", "pid": os.getpid()})
                self.stopping = True
        except OSError:
            self._drop(client)
        finally:
            for fd in fds:
                os.close(fd)

    def _hello_for(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The hello, with the preloaded files that are this client's code
        (its watch paths), and those changed since they were imported."""
        from .snapshot import _user_files
        from .watch import file_sha

        watch = list(msg.get("watch", []))
        # Which modules are the user's depends on the client's watch paths
        # only: the server's modules never change. Finding them walks every
        # module (0.2 s with pandas), so once per watch list; hashes each time.
        found = self.user_files.get(tuple(watch)) if self.cfg["preload"] else []
        if found is None:
            found = _user_files({p.split(".")[0] for p in self.cfg["preload"]}, watch)
            self.user_files[tuple(watch)] = found
        files = []
        for f in found:
            sha = file_sha(f["file"])
            if sha is not None:
                files.append({**f, "sha": sha})
        stale = []
        for f in files:
            try:
                st = os.stat(f["file"])
                now: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
            except OSError:
                now = None
            if now != self.file_stats.get(f["file"]):
                stale.append(f["file"])
        return {**self.hello, "preload_files": files, "stale_files": stale, "prepared": self.prepared}

    def _become_worker(self, msg: dict[str, Any], fds: list[int]) -> None:
        """In a child: drop everything of the server's, take the fork
        request's stdio, environment and umask, and run the worker."""
        # Nothing of the server's may stay open in a worker: its lock
        # (the server would look alive), the listener, other clients.
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        if isinstance(msg.get("umask"), int):
            os.umask(msg["umask"])
        for c in self.clients.values():
            c.sock.close()
        if self.listener is not None:
            self.listener.close()
        if self.first is not None:
            self.first[1].close()
        for fd in (self.wake_r, self.wake_w, self.lock_fd):
            if fd is not None:
                os.close(fd)
        # The worker writes where its kernel's output goes, not into the server's log.
        for target, fd in zip((1, 2), fds, strict=False):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        env = msg.get("env")
        if isinstance(env, dict):
            os.environ.clear()
            os.environ.update(env)
        from .worker import run_worker

        cfg = {"privdir": msg["privdir"], "key": msg["key"], "cwd": msg["cwd"], "watch": msg.get("watch", [])}
        run_worker(cfg, msg)

    def _fork(self, client: _Client, msg: dict[str, Any], fds: list[int]) -> None:
        from .snapshot import fork_child, send_forked

        pid: int | str | None = None
        if self.first is not None:
            pid = self._hand_first(msg, fds)
        if pid is None:
            why = None if self.prepared else self._prepare_late()
            pid = why or fork_child(lambda: self._become_worker(msg, fds))
        for fd in fds:
            os.close(fd)
        if send_forked(client.chan, pid, msg["wid"]) and isinstance(pid, int):
            client.workers.add(pid)
            self.owner[pid] = client
        elif isinstance(pid, int):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _reap(self) -> None:
        from .snapshot import reaped

        for pid, how in reaped():
            client = self.owner.pop(pid, None)
            if client is None:
                continue
            client.workers.discard(pid)
            if client.sock.fileno() in self.clients:
                try:
                    client.chan.send({"op": "exited", "pid": pid, "status": how})
                except OSError:
                    self._drop(client)

    def status(self, asking: _Client | None = None) -> dict[str, Any]:
        return {
            "op": "status",
            "kid": self.kid,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 1),
            "clients": sorted(c.pid for c in self.clients.values() if c is not asking),
            "workers": sorted(self.owner),
            "preload": self.hello.get("preload", {}),
            "preload_failed": self.hello.get("preload_failed", {}),
            "seconds": self.hello.get("seconds"),
            "idle": self.idle,
            "retired": self.listener is None,
            # False while a cold start's first worker holds the only imports
            # (`start_first_worker`): the server imports before its next fork.
            "prepared": self.prepared,
        }

    # -- the end --

    def retire(self) -> None:
        """Take no new client (a newer server of this key takes over); end
        when the last one leaves."""
        if self.listener is not None:
            self.listener.close()  # a connection still in its backlog reads EOF and tries again
            self.listener = None
        self._remove_files()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def _remove_files(self) -> None:
        """Remove this server's files, only those still its own."""
        try:
            mine = self.sock_ino is not None and os.stat(self.paths["sock"]).st_ino == self.sock_ino
        except OSError:
            mine = False
        if mine:
            for ext in ("sock", "key", "json"):
                with contextlib.suppress(OSError):
                    os.unlink(self.paths[ext])
        if self.lock_fd is not None:
            # Still ours while we hold the lock; a waiting spawner retries.
            for ext in ("log", "lock"):
                with contextlib.suppress(OSError):
                    os.unlink(self.paths[ext])

    def shutdown(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)
        self.retire()
        os._exit(0)


def _take_lock(path: str) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _lock_or_other(d: str, kid: str, timeout: float = 300.0) -> int | None:
    """The lock of key `kid` (this process is to be its server), or None
    once another server of the key listens. A server holding the lock while
    it exits (idle, retired) releases it, and this one takes over."""
    deadline = time.monotonic() + timeout
    while True:
        fd = _take_lock(_paths(d, kid)["lock"])
        if fd is not None:
            return fd
        try:
            conn = connect(d, kid)
        except OSError:
            conn = None
        if conn is not None:
            conn[0].close()
            return None
        if time.monotonic() > deadline:
            raise ServerUnavailable(f"the server of key {kid} neither listens nor ends")
        time.sleep(0.02)


def _tell(fd: int, word: str) -> None:
    """Write to the spawner's pipe; one that spawned and stopped waiting closed it."""
    try:
        os.write(fd, word.encode() + b"\n")
    except OSError:
        pass


def main() -> None:
    """The server process: stdin carries its configuration, `ready_fd` is
    written to once it listens (or once the server of the same key that
    another controller started listens)."""
    from .snapshot import restart_if_project_imported

    restart_if_project_imported()
    serve(json.loads(sys.stdin.readline()))


def serve(cfg: dict[str, Any]) -> None:
    """Be the server of `cfg` (never returns): take the key's lock, import,
    listen, say `ready` on `cfg["ready_fd"]`, serve until idle."""
    ready_fd = int(cfg["ready_fd"])
    os.set_inheritable(ready_fd, False)
    try:
        lock_fd = _lock_or_other(cfg["dir"], cfg["kid"])
    except ServerUnavailable as exc:
        _tell(ready_fd, f"failed: {exc}")
        os._exit(1)
    if lock_fd is None:
        # Another server of this key listens: 'ready' (said only once it
        # does, so a spawner polling this pipe, a background build, never
        # waits on another one's imports).
        _tell(ready_fd, "ready")
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    server = _Server(cfg, lock_fd)
    try:
        if cfg.get("first_worker"):
            server.start_first_worker()
        else:
            server.prepare()
        server.listen()
    except BaseException as exc:
        sys.stderr.write(f"forkreload server: could not start: {type(exc).__name__}: {exc}\n")
        _tell(ready_fd, f"failed {type(exc).__name__}: {exc}")
        os._exit(1)
    _tell(ready_fd, "ready")
    os.close(ready_fd)
    try:
        server.retire_older()
    except OSError as exc:
        sys.stderr.write(f"forkreload server: could not retire older servers: {exc}\n")
    server.run()


if __name__ == "__main__":
    main()
