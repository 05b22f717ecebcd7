"""A unix --listen socket: owner-only by default, widened only as asked, never stolen."""

from __future__ import annotations

import grp
import os
import socket
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from api.conftest import start_server

from manatee_grpc import ManateeServer, ServerConfig
from manatee_grpc.server import _listen
from manatee_grpc.server._listen import ListenError

from .conftest import list_vms, other_group


def _mode(path: Path) -> int:
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode), f"{path} is not a socket"
    return stat.S_IMODE(st.st_mode)


def _serves(path: Path) -> bool:
    """A fresh connection to ``path`` gets a real answer."""
    with grpc.insecure_channel(f"unix://{path}") as channel:
        return list_vms(channel).session != ""


def test_socket_is_owner_only_by_default_and_umask_is_restored(sock_dir: Path) -> None:
    path = sock_dir / "manatee.sock"
    umask_before = os.umask(0o022)
    os.umask(umask_before)
    server = start_server(listen=f"unix://{path}")
    try:
        # The process umask would have given 0755 (or 0775): the server chose 0600 itself.
        assert _mode(path) == 0o600
        assert os.umask(umask_before) == umask_before, "the bind umask leaked"
        assert _serves(path)
    finally:
        server.stop(grace_s=1.0)


def test_socket_mode_and_group_are_honoured(sock_dir: Path) -> None:
    path = sock_dir / "manatee.sock"
    gid = other_group()
    server = start_server(
        listen=f"unix://{path}", socket_mode=0o660, socket_group=grp.getgrgid(gid).gr_name
    )
    try:
        assert _mode(path) == 0o660
        assert os.lstat(path).st_gid == gid
        assert _serves(path)
    finally:
        server.stop(grace_s=1.0)


def test_socket_group_by_number(sock_dir: Path) -> None:
    path = sock_dir / "manatee.sock"
    gid = other_group()
    server = start_server(listen=f"unix://{path}", socket_group=str(gid))
    try:
        assert (os.lstat(path).st_gid, _mode(path)) == (gid, 0o600)
    finally:
        server.stop(grace_s=1.0)


def test_a_file_in_the_way_is_refused_and_left_untouched(sock_dir: Path) -> None:
    path = sock_dir / "manatee.sock"
    path.write_text("precious\n")
    os.chmod(path, 0o640)
    before = os.lstat(path)
    with pytest.raises(ListenError, match="exists and is not a socket"):
        ManateeServer(ServerConfig(listen=f"unix://{path}")).start()
    after = os.lstat(path)
    assert path.read_text() == "precious\n"
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
        before.st_ino,
        before.st_mode,
        before.st_mtime_ns,
    )


def test_a_stale_socket_is_removed_and_the_server_starts(sock_dir: Path) -> None:
    path = sock_dir / "manatee.sock"
    # A server that died leaves its socket file behind with nobody listening.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    stale_inode = os.lstat(path).st_ino
    # A second name keeps the stale inode allocated: once unlinked, the filesystem could give
    # its number to the very next file, the new socket.
    os.link(path, sock_dir / "stale-link")
    os.chmod(path, 0o666)  # a wide mode the new socket must not inherit
    server = start_server(listen=f"unix://{path}")
    try:
        assert os.lstat(path).st_ino != stale_inode
        assert _mode(path) == 0o600
        assert _serves(path)
    finally:
        server.stop(grace_s=1.0)


def test_a_live_servers_socket_is_refused_and_keeps_serving(sock_dir: Path) -> None:
    path = sock_dir / "manatee.sock"
    first = start_server(listen=f"unix://{path}")
    try:
        inode = os.lstat(path).st_ino
        # gRPC alone would unlink the live socket and bind over it, silently.
        with pytest.raises(ListenError, match="already listening"):
            ManateeServer(ServerConfig(listen=f"unix://{path}")).start()
        assert os.lstat(path).st_ino == inode
        assert _serves(path)
    finally:
        first.stop(grace_s=1.0)


def test_the_socket_is_owner_only_from_the_instant_it_is_bound(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before it is widened to --socket-mode, nobody but the owner could have connected."""
    path = sock_dir / "manatee.sock"
    modes_before_chmod: list[int] = []
    real_chmod = os.chmod

    def watching_chmod(target: str, mode: int) -> None:
        modes_before_chmod.append(_mode(Path(target)))
        real_chmod(target, mode)

    listener = _listen.Listener(
        _listen.parse_listen(f"unix://{path}"), credentials=None, socket_mode=0o666
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    umask_before = os.umask(0)  # a plain bind would now create the socket 0777
    try:
        monkeypatch.setattr(os, "chmod", watching_chmod)
        listener.bind(server)
    finally:
        os.umask(umask_before)
        server.stop(None)
    assert modes_before_chmod == [0o600]
