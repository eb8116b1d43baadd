"""A lost -wal, a full disk, a damaged file (issue #19): said plainly, nothing acknowledged lost."""

import os
import re
import signal
import sqlite3

import pytest

import clare
from conftest import projection_digest
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


# --- a full disk: a real SQLITE_FULL from PRAGMA max_page_count --------------------------------

TOKEN = "token-of-the-other-host-" + "t" * 16
BIG = "x" * 12_000  # a description that needs new pages: at the page limit it cannot be stored
FULL_LINE = re.compile(r"\Aclare: error: the disk is full \(\d+ bytes free at [^)]+\); free space and retry — "
                       r"nothing was lost\n\Z")


@pytest.fixture
def full_disk(monkeypatch):
    """Every connection Clare opens from now on cannot grow its database file by a single page."""
    real = clare.open_db

    def opening(*args, **kw):
        db = real(*args, **kw)
        n_pages = db.conn.execute("PRAGMA page_count").fetchone()[0]
        db.conn.execute(f"PRAGMA max_page_count = {n_pages}")
        return db
    monkeypatch.setattr(clare, "open_db", opening)
    return real  # for the databases of other hosts, whose disks have room


def _state(db: clare.Db) -> tuple:
    return clare.count_events(db), projection_digest(db), db.conn.execute(
        "SELECT * FROM sync_cursors ORDER BY 1, 2").fetchall()


def test_a_full_disk_refuses_a_write_in_one_plain_line_and_reads_still_work(db, cli, full_disk):
    assert cli("project", "new", "alpha").code == 0
    before = _state(db)
    r = cli("task", "add", "alpha", "big", "--desc", BIG)
    assert r.code == 1 and r.out == "" and FULL_LINE.match(r.err), r.err
    assert "damaged" not in r.err and "Traceback" not in r.err
    assert _state(db) == before  # nothing half-applied
    for argv in (("task", "list"), ("project", "list"), ("status",), ("log",), ("peer", "list")):
        assert cli(*argv).code == 0, argv
    assert cli("replay").code == 0 and _state(db) == before


def test_a_full_disk_during_sync_says_so_and_stores_no_part_of_the_page(db, cli, tmp_path, full_disk, monkeypatch):
    monkeypatch.setenv("CLARE_TOKEN", TOKEN)  # the other host's token, which this CLI sends
    other = full_disk(str(tmp_path / "b.db"), machine_id="b")
    clare.create_project(other, "alpha", goal=BIG, now_ms=clare.now_ms())
    other.close()
    before = _state(db)
    url = _serve(tmp_path / "b.db", tmp_path)
    try:
        r = cli("sync", url)
    finally:
        url.stop()
    assert r.code == 1 and "the disk is full (" in r.err and "nothing was lost" in r.err
    assert "internal error" not in r.err and "Traceback" not in r.err
    assert _state(db) == before


def test_a_full_disk_answers_the_api_with_507_and_a_message_not_500(db, server, full_disk):
    clare.create_project(db, "alpha", now_ms=clare.now_ms())
    r = server.request("POST", "/api/v1/tasks", json_body={"project": "alpha", "title": "big", "description": BIG})
    assert r.status == 507, r.body
    assert "the disk is full (" in r.json()["error"]["message"]
    assert server.request("GET", "/api/v1/tasks").status == 200


class _Served(str):
    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _serve(db_path, tmp_path) -> _Served:
    import threading
    paths = clare.Paths(db=str(db_path), config=str(tmp_path / "other.toml"))
    server = clare.make_server(clare.web_config(paths, host="127.0.0.1", port=0, env={"CLARE_TOKEN": TOKEN}))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = _Served(f"http://127.0.0.1:{server.config.port}")
    url.server = server
    return url


# --- restore when it is needed most --------------------------------------------------------------

def test_restore_works_when_the_current_file_is_unreadable_and_keeps_it_aside(home, cli, tmp_path):
    assert cli("project", "new", "alpha").code == 0
    backup = tmp_path / "backup.db"
    db = clare.open_db(str(home / "clare.db"))
    db.conn.execute("VACUUM INTO ?", (str(backup),))
    old_db_id = db.db_id
    db.close()
    assert cli("project", "new", "beta").code == 0
    garbage = b"this is not a database, it was damaged " * 200
    (home / "clare.db").write_bytes(garbage)
    for suffix in ("-wal", "-shm"):
        if (home / f"clare.db{suffix}").exists():
            (home / f"clare.db{suffix}").unlink()
    broken = cli("project", "list")
    assert broken.code == 1 and "cannot open database" in broken.err
    r = cli("restore", str(backup), "--yes")
    assert r.code == 0, r.err
    assert "the unreadable file is kept as" in r.out
    [aside] = [p for p in home.iterdir() if ".damaged-" in p.name]
    assert aside.read_bytes() == garbage
    assert [p["name"] for p in cli("project", "list", "--json").json()] == ["alpha"]
    db = clare.open_db(str(home / "clare.db"))
    assert db.db_id != old_db_id  # peers read the restored log again from 0
    db.close()


def test_a_refused_restore_writes_nothing_not_even_an_empty_database(home, cli, tmp_path):
    not_clare = tmp_path / "notes.db"
    con = sqlite3.connect(not_clare)
    con.execute("CREATE TABLE notes (x)")
    con.commit()
    con.close()
    for argv in (("restore", str(not_clare), "--yes"), ("restore", str(not_clare)),
                 ("restore", str(tmp_path / "missing.db"), "--yes")):
        r = cli(*argv)
        assert r.code in (1, 2) and len(r.err.strip().splitlines()) == 1, (argv, r.err)
        assert sorted(p.name for p in home.iterdir()) == [], argv
    assert "is not a Clare database" in cli("restore", str(not_clare), "--yes").err


def test_an_acknowledged_write_is_synced_to_disk_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("CLARE_SYNCHRONOUS")
    db = clare.open_db(str(tmp_path / "c.db"), machine_id="c")
    assert db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: survives a power cut
    db.close()
    monkeypatch.setenv("CLARE_SYNCHRONOUS", "sometimes")
    with pytest.raises(clare.UsageError, match="CLARE_SYNCHRONOUS='SOMETIMES' is not FULL or NORMAL"):
        clare.open_db(str(tmp_path / "c.db"))
