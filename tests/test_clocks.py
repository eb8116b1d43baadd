"""Clocks (issue #19): a bad clock's damage is bounded by MAX_OFFSET, visible, and loses nothing.

Events stamped beyond the receiver's now + MAX_OFFSET are deferred, not stored, and fetched by
uuid once within the bound; a host that two reachable peers find off refuses user writes.
"""



import clare
from test_sync import Y2286_MS, Link, Node

HOUR_MS = 3_600_000


def _title(node: Node, task_id: str) -> str:
    return clare.get_task(node.db, task_id).title


def test_a_task_edited_in_2286_is_held_back_and_a_later_edit_elsewhere_still_wins(nodes):
    a, b = nodes("a"), nodes("b")
    clare.create_project(a.db, "alpha", now_ms=a.now())
    task = clare.create_task(a.db, "alpha", "first", now_ms=a.now())
    b.sync(a)
    clare.edit_task(b.db, task.id, title="from 2286", now_ms=Y2286_MS)
    report = a.sync(b)
    assert _title(a, task.id) == "first"  # not stored: it cannot freeze the title
    assert [d["uuid"] for d in report.deferred] and "ahead of this host's clock" in report.deferred[0]["reason"]
    [held] = clare.list_deferred(a.db)
    assert (held.peer_url, held.direction) == ("sim://b", "pull") and "2286" in held.reason
    clare.edit_task(a.db, task.id, title="later", now_ms=a.now())
    assert _title(a, task.id) == "later"  # a later local edit changes the title (it did not before)
    a.sync(b)  # the cursor moved past it: a second round neither stores it nor stores it twice
    assert len(clare.list_deferred(a.db)) == 1 and _title(a, task.id) == "later"
    [row] = clare.list_peers(a.db, [])
    assert row["n_deferred"] == 1 and "2286" in row["deferred_reason"]


def test_a_push_from_2286_is_answered_as_deferred_and_kept_by_the_sender(nodes):
    a, b = nodes("a"), nodes("b")
    clare.create_project(b.db, "alpha", now_ms=b.now())
    clare.create_project(b.db, "omega", now_ms=Y2286_MS)
    answer = clare.sync_accept(a.db, {"events": [e.to_json() for e in clare.iter_events(b.db)]}, now_ms=a.now())
    assert answer["accepted"] == 1 and len(answer["deferred"]) == 1
    assert "held back" in answer["deferred"][0]["reason"]
    assert [p.name for p in clare.list_projects(a.db)] == ["alpha"]
    report = b.sync(a)  # b pushes: a holds the 2286 one back, b keeps it to send again
    assert [(d.peer_url, d.direction) for d in clare.list_deferred(b.db)] == [("sim://a", "push")]
    assert report.deferred and clare.list_peers(b.db, [])[0]["n_deferred"] == 1


def test_a_host_2h_ahead_then_fixed_is_held_back_until_real_time_catches_up_and_nothing_is_lost(nodes):
    a, b = nodes("a"), nodes("b", skew_ms=2 * HOUR_MS)
    clare.create_project(b.db, "alpha", now_ms=b.now())
    b.t = a.t  # b's clock is fixed; its stored HLC stays 2 h ahead
    check = clare.check_clock(b.db.conn, machine_id="b", now_ms=b.now())
    assert check.hlc_ahead_ms > HOUR_MS and "ahead of its wall clock" in check.hlc_message
    clare.create_project(b.db, "beta", now_ms=b.now())  # stamped 2 h ahead: the HLC never goes back
    a.sync(b)
    assert clare.list_projects(a.db) == [] and len(clare.list_deferred(a.db)) == 2
    a.t += 2 * HOUR_MS - 60_000  # real time passes: the stamps come within MAX_OFFSET
    report = a.sync(b)
    assert sorted(p.name for p in clare.list_projects(a.db)) == ["alpha", "beta"]
    assert report.n_deferred_stored == 2 and clare.list_deferred(a.db) == []
    assert {e.uuid for e in clare.iter_events(a.db)} == {e.uuid for e in clare.iter_events(b.db)}


def test_pushed_events_held_back_are_sent_again_once_within_the_bound(nodes):
    a, b = nodes("a"), nodes("b", skew_ms=2 * HOUR_MS)
    clare.create_project(b.db, "alpha", now_ms=b.now())
    b.t = a.t
    b.sync(a)  # b pulls nothing, pushes alpha: a holds it back
    assert clare.list_projects(a.db) == [] and len(clare.list_deferred(b.db, direction="push")) == 1
    a.t += 2 * HOUR_MS
    b.t += 2 * HOUR_MS
    b.sync(a)
    assert [p.name for p in clare.list_projects(a.db)] == ["alpha"] and clare.list_deferred(b.db) == []


def test_anti_entropy_ignores_days_beyond_the_bound(nodes):
    a, b = nodes("a"), nodes("b")
    clare.create_project(b.db, "alpha", now_ms=b.now())
    clare.create_project(b.db, "omega", now_ms=Y2286_MS)
    report = a.sync(b, verify=True)
    assert all(d < "2100" for d in report.verify["days_differ"])
    assert [p.name for p in clare.list_projects(a.db)] == ["alpha"]


def _peer_round(home_db, name: str, *, skew_ms: int, tmp_path) -> None:
    """Sync the home database (real clock) with a peer whose clock is off by skew_ms."""
    peer = Node(tmp_path, name)
    peer.t = clare.now_ms() + skew_ms
    clare.sync_with(home_db, Link(peer), name=name)
    peer.db.close()


def test_two_reachable_peers_that_find_the_clock_2h_ahead_refuse_user_writes_in_one_line(home, cli, tmp_path):
    db = clare.open_db(str(home / "clare.db"), machine_id="laptop")
    assert cli("project", "new", "alpha").code == 0
    for name in ("b", "c"):  # their clocks are 2 h behind ours: ours is 2 h ahead
        _peer_round(db, name, skew_ms=-2 * HOUR_MS, tmp_path=tmp_path)
    n_events = clare.count_events(db)
    r = cli("task", "add", "alpha", "refused")
    assert r.code == 1 and r.out == "" and len(r.err.strip().splitlines()) == 1
    assert "2.0 h ahead of 2 of its 2 reachable peers (b, c)" in r.err and "timedatectl" in r.err
    assert clare.count_events(db) == n_events  # nothing written
    # What the host observes is never refused.
    clare.observe_sessions(db, [clare.Observation("5" * 32, "/srv", None, "main:0", "%0", None, "claude",
                                                  "working", clare.now_ms(), "", {})], now_ms=clare.now_ms())
    assert clare.count_events(db) == n_events + 1
    status = cli("status", "--json").json()
    assert status["clock"]["is_refused"] and status["clock"]["offset_ms"] > HOUR_MS
    assert "user writes are refused" in cli("status").out
    db.close()


def test_one_peer_that_finds_the_clock_off_only_makes_writes_warn(home, cli, tmp_path):
    db = clare.open_db(str(home / "clare.db"), machine_id="laptop")
    _peer_round(db, "b", skew_ms=-2 * HOUR_MS, tmp_path=tmp_path)
    _peer_round(db, "c", skew_ms=0, tmp_path=tmp_path)
    r = cli("project", "new", "alpha")
    assert r.code == 0 and "clare: warning: this host's clock is 2.0 h ahead of 1 of its 2 reachable peers" in r.err
    assert [p.name for p in clare.list_projects(db)] == ["alpha"]
    db.close()


def test_a_vote_measured_before_the_clock_was_set_back_does_not_count(db, tmp_path):
    _peer_round(db, "b", skew_ms=-2 * HOUR_MS, tmp_path=tmp_path)
    _peer_round(db, "c", skew_ms=-2 * HOUR_MS, tmp_path=tmp_path)
    assert clare.check_clock(db.conn, machine_id=db.machine_id, now_ms=clare.now_ms()).is_refused
    fixed = clare.now_ms() - 2 * HOUR_MS  # the clock is set back by 2 h: those rounds lie in its future
    assert not clare.check_clock(db.conn, machine_id=db.machine_id, now_ms=fixed).is_refused
    clare.create_project(db, "alpha", now_ms=fixed)


def test_peer_list_status_and_dashboard_show_deferred_counts_and_why(db, cli, server, tmp_path):
    peer = Node(tmp_path, "far")
    clare.create_project(peer.db, "omega", now_ms=Y2286_MS)
    clare.sync_with(db, Link(peer), name="far")
    peer.db.close()
    r = cli("peer", "list")
    assert "DEFERRED" in r.out and "1: stamped 2286" in r.out
    assert cli("peer", "list", "--json").json()[0]["n_deferred"] == 1
    assert "1 events held back (1 from peers, 0 by peers)" in cli("status").out
    html = server.request("GET", "/frag/peers").text
    assert "events held back" in html and "stamped 2286" in html


def test_doctor_says_when_the_stored_clock_runs_ahead_of_the_fixed_wall_clock(home, cli):
    db = clare.open_db(str(home / "clare.db"), machine_id="laptop")
    clare.create_project(db, "alpha", now_ms=clare.now_ms() + 2 * HOUR_MS)  # made while the clock ran 2 h ahead
    db.close()
    r = cli("doctor", "--json")
    [clock] = [c for c in r.json()["checks"] if c["name"] == "clock"]
    assert clock["state"] == "failed" and "2.0 h ahead of its wall clock" in clock["detail"]
    assert "2.0 h ahead of its wall clock" in cli("status").out
