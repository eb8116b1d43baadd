"""A running `clare serve` reads clare.toml where a request needs it: one view of the file, and an edit
needs no restart (the way into another host's session follows `[hosts.NAME] ssh` at once)."""

import clare

S2 = "bbbb0002-0000-4000-8000-000000000002"
TOKEN = "settings-token-" + "x" * 20


def test_an_edit_of_hosts_ssh_shows_on_the_session_page_without_a_restart(db, home, serve):
    with clare.write_txn(db) as cur:
        clare.record(db, cur, "session.appeared", {"session_id": S2, "host": "far", "cwd": "/x", "state": "waiting",
                                                   "tmux_socket": "/tmp/s", "tmux_target": "w:0.0", "pane_id": "%1"},
                     now_ms=1000)
    server = serve(token=TOKEN)
    assert "ssh far -t tmux -S /tmp/s attach -t w:0.0" in server.request("GET", f"/sessions/{S2}").text
    (home / "clare.toml").write_text('[hosts.far]\nssh = "ana@far.lan"\n')
    assert "ssh ana@far.lan -t tmux -S /tmp/s attach -t w:0.0" in server.request("GET", f"/sessions/{S2}").text
    assert server.request("GET", f"/api/v1/sessions/{S2}").json()["attach"][:2] == ["ssh", "ana@far.lan"]
