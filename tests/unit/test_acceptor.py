"""Who accepted a connection (services/daemon/acceptor.py): how a probe of one replica of a
shared port tells its own answer from a sibling's. Real sockets, read back from /proc."""

import asyncio
import os
import socket
import subprocess
import sys

import pytest

from tron.common.processes import holds_socket
from tron.services.daemon import acceptor, sockdiag


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def test_the_address_is_written_as_proc_net_tcp_writes_it():
    assert sockdiag._hex("127.0.0.1", 6165) == "0100007F:1815"


@pytest.fixture(params=["netlink", "proc"])
def lookup(request, monkeypatch):
    """Both ways of asking the kernel: sock_diag's exact lookup, and /proc/net/tcp where
    netlink is not allowed."""
    monkeypatch.setattr(sockdiag, "_netlink_ok", request.param == "netlink")
    return request.param


def test_a_connection_waiting_in_the_queue_has_no_inode_and_the_accepting_process_holds_it(lookup):
    srv = listener()
    port = srv.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port)) as client:
        peer = client.getsockname()
        assert acceptor.server_inode(port, peer) == 0  # queued: nobody accepted it yet
        conn, _ = srv.accept()
        inode = acceptor.server_inode(port, peer)
        assert inode and os.fstat(conn.fileno()).st_ino == inode
        assert holds_socket({os.getpid()}, {str(inode)})
        assert asyncio.run(acceptor.accepted_by(port, peer, lambda: [os.getpid()])) is True
        conn.close()  # accepted and closed: nobody can be told apart any more
        assert acceptor.server_inode(port, peer) is None
    srv.close()
    assert acceptor.server_inode(port, ("127.0.0.1", 1)) is None  # no such connection


def test_a_connection_another_process_accepted_is_not_ours(lookup):
    srv = listener()
    port = srv.getsockname()[1]
    # A sibling that accepts from the same socket (inherited, as replicas take the held one).
    sibling = subprocess.Popen([sys.executable, "-c", "import socket,sys,time\n"
                                f"s=socket.socket(fileno={srv.fileno()})\nc,_=s.accept()\nprint('took',flush=True)\n"
                                "time.sleep(30)"], pass_fds=[srv.fileno()], stdout=subprocess.PIPE, text=True)
    try:
        with socket.create_connection(("127.0.0.1", port)) as client:
            peer = client.getsockname()
            # It waits for the accept (the probe's timeout bounds the wait), then names who.
            assert asyncio.run(acceptor.accepted_by(port, peer, lambda: [os.getpid()])) is False
            assert sibling.stdout.readline().strip() == "took"
            assert asyncio.run(acceptor.accepted_by(port, peer, lambda: [sibling.pid])) is True
    finally:
        sibling.kill()
        sibling.wait()
        srv.close()


def test_the_user_behind_a_loopback_connection_is_the_one_that_made_its_socket(lookup):
    """peer.py names it in audit rows: the peer's socket (at its address, connected to ours)
    belongs to whoever made it, here a child set to another user when it is root."""
    srv = listener()
    port = srv.getsockname()[1]
    uid = 65534 if os.getuid() == 0 else os.getuid()
    told, tell = os.pipe()  # child -> parent: its socket's port
    done, finish = os.pipe()  # parent -> child: looked, you may go
    pid = os.fork()
    if pid == 0:  # the child: a socket made as ``uid``, held until the parent has looked
        try:
            os.setuid(uid)
            client = socket.create_connection(("127.0.0.1", port))
            os.write(tell, f"{client.getsockname()[1]}\n".encode())
            os.read(done, 1)
        finally:
            os._exit(0)
    try:
        conn, peer = srv.accept()
        assert int(os.read(told, 64).decode().split()[0]) == peer[1]
        assert sockdiag.owner(peer, ("127.0.0.1", port)) == uid
        assert sockdiag.owner(("127.0.0.1", 1), ("127.0.0.1", port)) is None  # no such connection
        conn.close()
    finally:
        os.write(finish, b"x")
        os.waitpid(pid, 0)
        for fd in (told, tell, done, finish):
            os.close(fd)
        srv.close()
