"""Peers that take effect without a restart, and discovery: announcements, suggestions, the token rule.
(The same on a real network of four hosts: tests/test_network.py.)"""

import threading

import pytest

import clare
from conftest import wait_for

TOKEN = "shared-token-" + "x" * 20


def _db(tmp_path, name: str) -> clare.Db:
    return clare.open_db(str(tmp_path / f"{name}.db"), machine_id=f"{name}-000000")


def _copy_log(src: clare.Db, dst: clare.Db) -> None:
    with clare.write_txn(dst) as cur:
        clare.receive_events(dst, cur, list(clare.iter_events(src)), now_ms=clare.now_ms())


def test_a_running_sync_loop_follows_clare_toml_and_a_typo_keeps_the_last_good_list(tmp_path, monkeypatch):
    monkeypatch.setattr(clare, "PEERS_RELOAD_S", 0.05)
    config = tmp_path / "clare.toml"
    config.write_text("")
    db = _db(tmp_path, "here")
    lines: list[str] = []
    stop = threading.Event()
    book = clare.PeerBook(str(config), {}, [])
    thread = clare.start_background_sync(db.path, book, stop=stop, log=lines.append, interval_s=30)
    try:
        clare.add_peer(str(config), "http://127.0.0.1:9", name="fig")
        wait_for(lambda: any("sync with fig (http://127.0.0.1:9): started" in ln for ln in lines), timeout=5,
                 what="the new peer's loop to start")
        assert [p.name for p in book] == ["fig"]  # the dashboard's list too
        wait_for(lambda: any(s.name == "fig" and s.last_error for s in clare.list_peer_status(db)), timeout=10,
                 what="a round with fig")
        text = config.read_text()
        config.write_text(text + "[[peers]\nurl = 'x'\n")  # a typo
        wait_for(lambda: any("still syncing with the peers read before (fig)" in ln for ln in lines), timeout=5,
                 what="the typo to be reported")
        assert [p.name for p in book] == ["fig"]
        config.write_text(text)
        clare.remove_peer(str(config), "fig")
        wait_for(lambda: any("sync with fig: stopped" in ln for ln in lines), timeout=5, what="the loop to stop")
        assert list(book) == []
    finally:
        stop.set()
        thread.join(timeout=10)
        db.close()
    assert not thread.is_alive()


def test_hosts_announce_themselves_once_and_only_for_themselves(tmp_path):
    db = _db(tmp_path, "apricot")
    try:
        ev = clare.announce_host(db, "http://10.9.0.2:8765/", token=TOKEN, now_ms=clare.now_ms())
        assert ev is not None and ev.payload["url"] == "http://10.9.0.2:8765"
        assert clare.announce_host(db, "http://10.9.0.2:8765", token=TOKEN, now_ms=clare.now_ms()) is None
        n_events = clare.count_events(db)
        forged = {"uuid": "f0000000-0000-4000-8000-000000000001", "hlc": f"{clare.now_ms():013d}.000000.mallory",
                  "machine_id": "mallory", "event_type": "host.announced", "created_at": "2026-12-03T08:00:00.000Z",
                  "payload": {"host": "apricot-000000", "name": "apricot", "url": "http://evil:1", "token_fp": None}}
        with clare.write_txn(db) as cur:
            clare.receive_events(db, cur, [clare.check_received(forged)], now_ms=clare.now_ms())
        assert clare.count_events(db) == n_events + 1  # stored and relayed ...
        [host] = clare.list_announced_hosts(db)
        assert host.url == "http://10.9.0.2:8765"  # ... but no host speaks for another
        clare.replay(db)
        assert clare.list_announced_hosts(db) == [host]
    finally:
        db.close()


def test_suggested_peers_get_this_hosts_token_only_when_they_announced_it(tmp_path, monkeypatch):
    here, fig, kiwi = _db(tmp_path, "here"), _db(tmp_path, "fig"), _db(tmp_path, "kiwi")
    config = tmp_path / "clare.toml"
    try:
        clare.announce_host(fig, "http://10.9.0.3:8765", token=TOKEN, now_ms=clare.now_ms())
        clare.announce_host(kiwi, "http://10.9.0.4:8765", token="kiwi-own-token-" + "y" * 20, now_ms=clare.now_ms())
        clare.announce_host(here, "http://10.9.0.1:8765", token=TOKEN, now_ms=clare.now_ms())
        _copy_log(fig, here)
        _copy_log(kiwi, here)
        rows = clare.list_suggested_peers(here, [], token=TOKEN)
        assert [(r["name"], r["url"], r["announced_by"], r["is_token_shared"]) for r in rows] == [
            ("fig", "http://10.9.0.3:8765", "fig-000000", True), ("kiwi", "http://10.9.0.4:8765", "kiwi-000000", False)]
        with pytest.raises(clare.Forbidden, match="announced a token other than this host's.*--token-env KIWI_TOKEN"):
            clare.add_suggested_peers(str(config), rows, "kiwi")
        assert not config.exists()  # nothing half-written
        added, skipped = clare.add_suggested_peers(str(config), rows, None)
        assert [p.name for p in added] == ["fig"] and [s["name"] for s in skipped] == ["kiwi"]
        peers = clare.load_peers(clare.load_config(str(config)))
        assert [(p.name, p.url, p.token_env) for p in peers] == [("fig", "http://10.9.0.3:8765", None)]
        assert [r["name"] for r in clare.list_suggested_peers(here, peers, token=TOKEN)] == ["kiwi"]
        added, _ = clare.add_suggested_peers(str(config), rows, "kiwi", token_env="KIWI_TOKEN")  # its own token
        assert added[0].token_env == "KIWI_TOKEN"
        assert clare.list_suggested_peers(here, clare.load_peers(clare.load_config(str(config))), token=TOKEN) == []
        assert clare.list_suggested_peers(here, [], token=None)[0]["is_token_shared"] is None  # no token: unknown
    finally:
        for db in (here, fig, kiwi):
            db.close()


def test_a_loopback_or_wildcard_bind_is_not_announced_unless_clare_toml_names_the_url():
    assert clare.announce_url("127.0.0.1", "http://127.0.0.1:8765", {}) is None
    assert clare.announce_url("0.0.0.0", "http://127.0.0.1:8765", {}) is None
    assert clare.announce_url("10.9.0.2", "http://10.9.0.2:8765", {}) == "http://10.9.0.2:8765"
    assert clare.announce_url("0.0.0.0", "http://127.0.0.1:8765", {"announce_url": "http://fig.lan:8765/"}) == \
        "http://fig.lan:8765"
    assert clare.announce_url("10.9.0.2", "http://10.9.0.2:8765", {"announce_url": ""}) is None
    with pytest.raises(clare.UsageError, match="announce_url"):
        clare.announce_url("10.9.0.2", "http://10.9.0.2:8765", {"announce_url": "fig:8765"})


def test_peer_list_counts_what_is_left_to_pull_and_to_push(tmp_path):
    here = _db(tmp_path, "here")
    try:
        with clare.write_txn(here) as cur:
            cur.execute("""INSERT INTO sync_peers (url, name, machine_id, db_id, last_ok_ms, peer_head)
                           VALUES ('http://10.9.0.3:8765', 'fig', 'fig-000000', 'd1', 1, 40)""")
            clare.save_cursor(cur, "fig-000000", "d1", pulled_rseq=30)
        project = clare.create_project(here, "alpha", now_ms=clare.now_ms())
        [row] = clare.list_peers(here, [clare.check_peer("http://10.9.0.3:8765", name="fig")])
        assert (row["n_behind"], row["n_to_push"], row["host_name"]) == (10, clare.count_events(here), "fig")
        assert project.name == "alpha"
    finally:
        here.close()


def test_an_upgrade_rebuilds_the_projections_and_a_crash_before_that_does_it_at_the_next_open(tmp_path):
    import shutil
    import sqlite3

    from conftest import ROOT

    path = tmp_path / "clare.db"
    shutil.copyfile(ROOT / "tests" / "data" / "release-0.1.0.db", path)
    db = clare.open_db(str(path))  # schema 1 -> today's, then the replay
    tasks = clare.list_tasks(db)
    db.close()
    conn = sqlite3.connect(path)  # as if the process died after the migration's commit, before the replay
    conn.executescript("DELETE FROM tasks; INSERT INTO meta (key, value) VALUES ('needs_replay', '1');")
    conn.close()
    db = clare.open_db(str(path))
    try:
        assert clare.list_tasks(db) == tasks and len(tasks) == 3
        assert db.conn.execute("SELECT count(*) FROM meta WHERE key = 'needs_replay'").fetchone()[0] == 0
    finally:
        db.close()

