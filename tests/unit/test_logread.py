"""services/daemon/logread.py: a log read in bounded chunks from a cursor (the daemon's
``GET /services/{name}/log`` and the node agent's ``read_log``), through rotations,
truncations, half-written lines and a reader that fell behind."""

from __future__ import annotations

from tron.services.daemon.logread import read_log


def follow(path, answer, **kw) -> dict:
    return read_log(path, inode=answer["inode"], offset=answer["offset"], **kw)


def test_a_missing_log_is_empty_and_its_first_lines_come_whole(tmp_path):
    path = tmp_path / "svc.log"
    first = read_log(path, lines=5)
    assert (first["data"], first["inode"], first["offset"]) == ("", None, 0)
    path.write_bytes(b"one\ntwo\n")
    assert read_log(path, lines=5)["data"] == "one\ntwo\n"


def test_the_first_read_gives_the_last_lines_and_a_half_written_line_comes_later_whole(tmp_path):
    path = tmp_path / "svc.log"
    path.write_bytes(b"a\nb\nc\nhalf")
    first = read_log(path, lines=2)
    assert first["data"] == "b\nc\n" and first["offset"] == 6 and not first["more"]
    assert follow(path, first)["data"] == ""  # the line is not finished
    with open(path, "ab") as f:
        f.write(b"-written\nd\n")
    nxt = follow(path, first)
    assert nxt["data"] == "half-written\nd\n" and nxt["offset"] == path.stat().st_size


def test_chunks_are_bounded_and_say_there_is_more(tmp_path):
    path = tmp_path / "svc.log"
    path.write_bytes(b"".join(b"line %04d\n" % i for i in range(1000)))  # 10 bytes a line
    cursor = read_log(path, lines=0)
    cursor["offset"] = 0
    got, reads = [], 0
    while True:
        answer = follow(path, cursor, max_bytes=1024)
        reads += 1
        assert len(answer["data"].encode()) <= 1024
        got += answer["data"].splitlines()
        cursor = answer
        if not answer["more"]:
            break
    assert got == [f"line {i:04d}" for i in range(1000)] and reads > 9


def test_a_rotated_log_is_read_to_its_end_then_the_new_file_from_its_start(tmp_path):
    path = tmp_path / "svc.log"
    path.write_bytes(b"old 1\n")
    cursor = read_log(path, lines=0)
    with open(path, "ab") as f:
        f.write(b"old 2\n")
    path.rename(tmp_path / "svc.log.1")  # what the log pump does
    path.write_bytes(b"new 1\n")
    tail = follow(path, cursor)
    assert tail["data"] == "old 2\n" and tail["more"]
    fresh = follow(path, tail)
    assert fresh["data"] == "new 1\n" and fresh["inode"] == path.stat().st_ino and fresh["note"] is None


def test_a_truncated_or_replaced_log_is_read_again_from_its_start_and_said(tmp_path):
    path = tmp_path / "svc.log"
    path.write_bytes(b"a long first line\n")
    cursor = read_log(path, lines=0)
    path.write_bytes(b"x\n")  # truncated in place: the same inode, shorter
    again = follow(path, cursor)
    assert again["data"] == "x\n" and "truncated" in again["note"]
    path.rename(tmp_path / "kept.log")  # kept: a new file cannot reuse its inode number
    path.write_bytes(b"y\n")
    replaced = follow(path, again)
    assert replaced["data"] == "y\n" and "replaced" in replaced["note"]


def test_a_reader_that_fell_behind_skips_to_the_newest_lines_from_a_line_start(tmp_path):
    path = tmp_path / "svc.log"
    path.write_bytes(b"")
    cursor = read_log(path, lines=0)
    path.write_bytes(b"".join(b"burst %05d\n" % i for i in range(5000)))
    answer = follow(path, cursor, max_bytes=2048, skip_over=4096)
    lines = answer["data"].splitlines()
    assert "bytes skipped" in answer["note"] and lines[-1] == "burst 04999"
    assert all(line.startswith("burst ") and len(line) == 11 for line in lines)


def test_a_cursor_from_another_nodes_disk_starts_from_the_last_lines_here(tmp_path):
    path = tmp_path / "svc.log"
    path.write_bytes(b"1\n2\n3\n")
    moved = read_log(path, inode=path.stat().st_ino + 1, offset=999, lines=2, moved=True)
    assert moved["data"] == "2\n3\n" and "on this node" in moved["note"] and moved["offset"] == 6


# -- the web UI's log pane on a cluster: NodeLogTail over a node agent's reads ------------------


class NodeAgentReads:
    """The daemon's ClusterControl as far as logs go: what RaySpawner.read_log does, with the
    node agent's own read of a file on its node; ``gone`` makes it fail as a lost node's does."""

    def __init__(self) -> None:
        self.gone = False
        self.calls = 0

    async def read_log(self, node_id: str, daemon_path: str, cursor: dict) -> dict:
        from pathlib import Path

        from tron.services.daemon.spawner import SpawnError

        self.calls += 1
        if self.gone:
            raise SpawnError(f"node {node_id[:8]} has no node agent (lost, or not started yet)")
        return read_log(Path(daemon_path), **cursor)


def cluster_daemon(tmp_path, reads: NodeAgentReads):
    from types import SimpleNamespace

    from tron.common.paths import Home

    home = Home(tmp_path)
    home.logs.mkdir(parents=True, exist_ok=True)
    worker = SimpleNamespace(child=SimpleNamespace(node="ab12cd34ef"))
    return SimpleNamespace(home=home, sup=SimpleNamespace(services={"worker": worker}), cluster=reads)


async def polled(tail) -> list[list[str]]:
    published: list[list[str]] = []
    tail.poll(published.append)
    await tail._reading
    return published


async def test_the_ui_follows_a_nodes_log_from_the_end_through_a_lost_node_and_back(tmp_path):
    from tron.services.daemon.ui.logtail import NodeLogTail

    reads = NodeAgentReads()
    daemon = cluster_daemon(tmp_path, reads)
    path = daemon.home.log_file("worker")
    path.write_text('{"msg": "old"}\n')
    tail = NodeLogTail(daemon, "worker")
    assert await tail.backlog() == ['{"msg": "old"}']
    assert await polled(tail) == []  # the first read only places the cursor at the end
    assert tail.cursor["node"] == "ab12cd34ef"
    with open(path, "a") as f:
        f.write('{"msg": "new"}\n')
    assert await polled(tail) == [['{"msg": "new"}']]
    reads.gone = True  # said once, however long the node is away
    first, second = await polled(tail), await polled(tail)
    assert len(first) == 1 and "not reachable" in first[0][0] and second == []
    reads.gone = False
    with open(path, "a") as f:
        f.write('{"msg": "back"}\n')
    assert await polled(tail) == [['{"msg": "back"}']]
