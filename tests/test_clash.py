"""Two projects of one name, made on two hosts while apart (issue #19): said, shown, resolved."""

import threading

import pytest

import clare
from test_sync import Node

TOKEN = "token-of-the-other-host-" + "t" * 16


@pytest.fixture
def serve_file(tmp_path):
    """Serve another host's database file on 127.0.0.1 with this home's token (a fleet shares one); return its URL."""
    started = []

    def start(db_path) -> str:
        paths = clare.Paths(db=str(db_path), config=str(tmp_path / "other.toml"))
        server = clare.make_server(clare.web_config(paths, host="127.0.0.1", port=0, env={"CLARE_TOKEN": TOKEN}))
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread))
        return f"http://127.0.0.1:{server.config.port}"
    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_name_made_on_two_hosts_is_reported_by_project_list_and_the_dashboard_and_rename_resolves_it(
        home, cli, tmp_path, server):
    a = Node(tmp_path, "a")
    a.db.close()
    a.db = clare.open_db(str(home / "clare.db"), machine_id="a")  # the database the CLI and server use
    b = Node(tmp_path, "b")
    p1 = clare.create_project(a.db, "alpha", now_ms=a.now())
    p2 = clare.create_project(b.db, "alpha", now_ms=b.now())
    a.sync(b)
    r = cli("project", "list")
    assert r.code == 0 and "2 projects are named 'alpha'" in r.err
    assert p1.id[:8] in r.err and p2.id[:8] in r.err and "clare project rename" in r.err
    html = server.request("GET", "/frag/projects").text
    assert "2 projects are named &#x27;alpha&#x27;" in html and 'role="alert"' in html
    r = cli("project", "rename", p2.id[:8], "alpha-b")
    assert r.code == 0 and "is now named alpha-b" in r.out
    r = cli("project", "list")
    assert "named" not in r.err and "alpha-b" in r.out
    assert 'role="alert"' not in server.request("GET", "/frag/projects").text
    b.t = a.t = clare.now_ms()
    a.sync(b)
    assert sorted(p.name for p in clare.list_projects(b.db)) == ["alpha", "alpha-b"]  # the rename travels
    assert clare.name_clashes(clare.list_projects(b.db)) == {}
    b.db.close()
    a.db.close()


def test_sync_says_so_when_a_round_brings_a_second_project_of_one_name(home, cli, tmp_path, serve_file, monkeypatch):
    monkeypatch.setenv("CLARE_TOKEN", TOKEN)  # the other host's token, which this CLI sends
    assert cli("project", "new", "alpha").code == 0
    b = clare.open_db(str(tmp_path / "b.db"), machine_id="b")
    clare.create_project(b, "alpha", now_ms=clare.now_ms())
    b.close()
    r = cli("sync", serve_file(tmp_path / "b.db"))
    assert r.code == 0 and "clare: warning: 2 projects are named 'alpha'" in r.err
