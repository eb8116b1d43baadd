"""A lost -wal, a full disk, a damaged file (issue #19): said plainly, nothing acknowledged lost."""

import os
import signal
import subprocess
import sys

import clare
from conftest import CLARE_PY
from test_sync import Node, fleet  # noqa: F401  (real `clare serve` processes)


def _uuids(db: clare.Db) -> set[str]:
    return {e.uuid for e in clare.iter_events(db)}


def test_a_lost_wal_after_kill_9_gives_the_log_a_new_db_id_so_peers_skip_nothing(fleet, tmp_path):  # noqa: F811
    [h] = fleet("h")
    h.serve("--no-sync")
    assert h.cli("project", "new", "alpha").code == 0
    for i in range(6):
        assert h.cli("task", "add", "alpha", f"first {i}").code == 0
    peer = Node(tmp_path, "p")
    link = clare.HttpPeer(h.url, token=h.token)
    clare.sync_with(peer.db, link, name="h")
    assert len(_uuids(peer.db)) == 7  # the peer's cursor on h's log is at 7
    db_path = str(h.home / "clare.db")
    old_db_id = clare.read_served(db_path)[0]
    assert clare.read_served(db_path) == (old_db_id, 7)
    # kill -9 while the serving process holds the -wal, then the -wal is lost.
    h.proc.send_signal(signal.SIGKILL)
    h.proc.wait(10)
    assert os.path.getsize(db_path + "-wal") > 0, "the events were still in the -wal"
    for suffix in ("-wal", "-shm"):
        os.remove(db_path + suffix)
    assert h.cli("project", "new", "beta").code == 0
    for i in range(12):  # new events would take receipt numbers 1.. again
        assert h.cli("task", "add", "beta", f"after {i}").code == 0
    h.proc = h.url = None
    h.serve("--no-sync")
    db = clare.open_db(db_path)
    assert db.db_id != old_db_id, "a log below the served mark keeps its db_id"
    clare.sync_with(peer.db, clare.HttpPeer(h.url, token=h.token), name="h")
    assert _uuids(db) <= _uuids(peer.db), "the peer skipped events whose receipt numbers were reused"
    db.close()
    h.stop()


def test_the_served_mark_is_written_when_a_page_is_served_not_on_every_commit(db):
    clare.create_project(db, "alpha", now_ms=clare.now_ms())
    assert clare.read_served(db.path) is None
    clare.sync_page(db, after=0, now_ms=clare.now_ms())
    assert clare.read_served(db.path) == (db.db_id, 1)
    clare.create_task(db, "alpha", "one", now_ms=clare.now_ms())
    assert clare.read_served(db.path) == (db.db_id, 1)
    db2 = clare.open_db(db.path)  # a log at or above the mark keeps its id
    assert db2.db_id == db.db_id
    db2.close()
