"""The private controller-snapshot channel: authenticated, fds passed along."""

from __future__ import annotations

import os
import socket
import stat

import pytest
from forkreload.channel import Channel, ForgedMessage, make_private_dir


def test_round_trip_with_a_file_descriptor():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    left, right = Channel(a, b"k"), Channel(b, b"k")
    r, w = os.pipe()
    try:
        left.send({"op": "fork", "pid": 7}, fds=[r])
        msg, fds = right.recv()
        assert msg == {"op": "fork", "pid": 7} and len(fds) == 1
        os.write(w, b"x")
        assert os.read(fds[0], 1) == b"x"
        os.close(fds[0])
    finally:
        for fd in (r, w):
            os.close(fd)
        left.close()
        right.close()


def test_forged_message_is_refused_and_its_fds_closed():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    forger, snapshot = Channel(a, b"wrong-key"), Channel(b, b"session-key")
    r, w = os.pipe()
    try:
        forger.send({"op": "fork"}, fds=[r])
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(ForgedMessage):
            snapshot.recv()
        assert set(os.listdir("/proc/self/fd")) <= before  # the passed fd did not leak
        forger.send({"op": "exit"})
        with pytest.raises(ForgedMessage):
            snapshot.recv()
    finally:
        os.close(r)
        os.close(w)
        forger.close()
        snapshot.close()


def test_peer_closing_reads_as_none():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    right = Channel(b, b"k")
    a.close()
    assert right.recv() == (None, [])
    right.close()


def test_private_dir_is_for_this_user_only():
    d = make_private_dir()
    try:
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    finally:
        os.rmdir(d)


def test_private_dirs_of_dead_processes_are_removed_held_ones_kept(tmp_path):
    import fcntl

    from forkreload.channel import remove_dead_private_dirs

    dead = tmp_path / "forkreload-999999999-deadbeef"  # no such pid
    held = tmp_path / "forkreload-999999998-cafebabe"  # ... but locked: a live owner elsewhere
    alive = tmp_path / f"forkreload-{os.getpid()}-a1b2c3d4"
    other = tmp_path / "forkreload-client-999999999-deadbeef"
    for d in (dead, held, alive, other):
        d.mkdir()
        (d / "sock").write_text("")
    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert remove_dead_private_dirs("forkreload-", str(tmp_path)) == [str(dead)]
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (held, alive, other))
    assert remove_dead_private_dirs("forkreload-client-", str(tmp_path)) == [str(other)]
