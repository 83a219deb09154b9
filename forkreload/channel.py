"""Private channels between forkreload's own processes.

The controller and the snapshot talk over a unix SOCK_SEQPACKET socket that
lives in a directory only the user can open. Each message is JSON, prefixed
with an HMAC-SHA256 of its bytes under the per-session key; a message whose
MAC does not verify is dropped and reported, never acted upon. Open file
descriptors (the pidfd of a fresh worker) ride along as SCM_RIGHTS.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from typing import Any

__all__ = ["ForgedMessage", "Channel", "lock_held", "make_private_dir", "remove_dead_private_dirs", "set_parent_death_signal"]

log = logging.getLogger("forkreload.channel")

_MAC_LEN = hashlib.sha256().digest_size
_MAX_MSG = 1 << 20


class ForgedMessage(Exception):
    """A message on a private channel failed authentication."""


# The directory lock of each private dir made with `hold=True`, held for the
# life of this process: a directory whose lock can be taken has no owner.
_held: dict[str, int] = {}


def make_private_dir(prefix: str = "forkreload-", hold: bool | None = None) -> str:
    """Create a directory only this user can open, on tmpfs when there is one.

    tmpfs matters for the ipc sockets and the small signed migration index
    (the migrated data itself travels in anonymous memory, see `migrate`).
    Its name carries this process's pid; with `hold` (the default for the
    controller's prefix, one directory per process) this process also holds
    a lock on it.  Directories of the same prefix left by processes that
    died without cleaning up (SIGKILL) are removed first.
    """
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    remove_dead_private_dirs(prefix, base)
    path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base)
    os.chmod(path, 0o700)
    if hold if hold is not None else prefix == "forkreload-":
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _held[path] = fd
    return path


def lock_held(fd: int) -> bool:
    """Whether another process holds the flock of `fd` (which is closed):
    a lock dies with its holder, whatever pid namespace it lives in."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _owned(path: str, pid: int) -> bool:
    """Whether the process that made `path` may still be using it: its lock
    is held (by a process of any pid namespace), or, for a directory made
    without one, its pid is alive here."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return True
    if lock_held(fd):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_private_dirs(prefix: str = "forkreload-", base: str | None = None) -> list[str]:
    """Remove this user's `make_private_dir` directories whose process is gone."""
    base = base or tempfile.gettempdir()
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[^-]+$")
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m is None:
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != os.getuid() or not os.path.isdir(path) or os.path.islink(path) or _owned(path, int(m.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def set_parent_death_signal(sig: int) -> None:
    """Ask Linux to send `sig` to this process when its parent dies.

    Only used in processes forked or spawned from a single-threaded parent
    (the signal fires when the parent *thread* exits).
    """
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    PR_SET_PDEATHSIG = 1
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


class Channel:
    """One end of an authenticated SEQPACKET connection."""

    def __init__(self, sock: socket.socket, key: bytes) -> None:
        self.sock = sock
        self._key = key

    def fileno(self) -> int:
        return self.sock.fileno()

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def send(self, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        data = json.dumps(msg).encode()
        packet = self._mac(data) + data
        if fds:
            socket.send_fds(self.sock, [packet], list(fds))
        else:
            self.sock.send(packet)

    def recv(self) -> tuple[dict[str, Any] | None, list[int]]:
        """Return (message, fds); (None, []) when the peer closed.

        Raises ForgedMessage (after closing any fds that came with it) when
        the MAC does not verify.
        """
        packet, fds, _flags, _addr = socket.recv_fds(self.sock, _MAX_MSG, 4)
        if not packet:
            for fd in fds:
                os.close(fd)
            return None, []
        mac, data = packet[:_MAC_LEN], packet[_MAC_LEN:]
        if not hmac.compare_digest(mac, self._mac(data)):
            for fd in fds:
                os.close(fd)
            raise ForgedMessage("private channel message with a bad signature")
        return json.loads(data), list(fds)

    def close(self) -> None:
        self.sock.close()
