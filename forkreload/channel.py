"""Private channels between forkreload's own processes.

The controller and the snapshot talk over a unix SOCK_SEQPACKET socket that
lives in a directory only the user can open. Each message is JSON, prefixed
with an HMAC-SHA256 of its bytes under the per-session key; a message whose
MAC does not verify is dropped and reported, never acted upon. Open file
descriptors (the pidfd of a fresh worker) ride along as SCM_RIGHTS.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
import tempfile
from typing import Any

__all__ = ["ForgedMessage", "Channel", "make_private_dir", "set_parent_death_signal"]

log = logging.getLogger("forkreload.channel")

_MAC_LEN = hashlib.sha256().digest_size
_MAX_MSG = 1 << 20


class ForgedMessage(Exception):
    """A message on a private channel failed authentication."""


def make_private_dir(prefix: str = "forkreload-") -> str:
    """Create a directory only this user can open, on tmpfs when there is one.

    tmpfs matters twice: ipc sockets, and migration buffers that should cost
    one copy in memory, not a round trip through a disk.
    """
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = tempfile.mkdtemp(prefix=prefix, dir=base)
    os.chmod(path, 0o700)
    return path


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
