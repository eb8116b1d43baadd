"""What a demanding new user found trying issue #16 (task waits, `clare next`, dispatch) and the faster CLI."""

import html
import json

import clare


def test_help_lists_its_commands_without_a_stray_none_line(run_clare):
    for argv in (("--help",), ("task", "--help"), ("project", "--help")):
        r = run_clare(*argv)
        assert r.code == 0, r.err
        lines = [line.strip() for line in r.out.splitlines()]
        assert "None" not in lines, (argv, r.out)
        assert "commands:" in lines


def test_dispatch_on_a_project_without_a_directory_says_it_cannot_start_sessions(cli, server):
    assert cli("project", "new", "nodir").code == 0
    r = cli("project", "set", "nodir", "--dispatch", "on")
    assert r.code == 0, r.err
    says = "cannot start sessions until the project says where its code lives: clare project set nodir --dir /PATH"
    assert says in r.out
    assert says in cli("project", "show", "nodir").out
    page = server.request("GET", "/projects/nodir")
    assert page.status == 200
    assert "cannot start sessions until the project says where its code lives" in page.body.decode()
    assert cli("project", "set", "nodir", "--dir", "/tmp").code == 0
    assert "cannot start sessions" not in cli("project", "show", "nodir").out


def test_a_max_sessions_that_is_not_a_number_is_named_so_by_the_json_api(cli, server):
    assert cli("project", "new", "api").code == 0
    for value in ("abc", True, 2.5):
        r = server.request("PATCH", "/api/v1/projects/api", json_body={"max_sessions": value})
        assert r.status == 422, r.body
        message = json.loads(r.body)["error"]["message"]
        assert "max_sessions must be a whole number from 1 to 50" in message, message
        assert "outside" not in message


def test_the_dispatch_card_names_its_own_field_when_the_number_is_not_one(cli, server, db):
    assert cli("project", "new", "api", "--dir", "/tmp").code == 0
    project = cli("project", "show", "api", "--json").json()["id"]
    before = clare.count_events(db)
    for typed in ("abc", ""):
        r = server.form(f"/projects/{project}/dispatch", {"dispatch": "on", "max_sessions": typed})
        assert r.status == 422, r.body
        said = html.unescape(r.body.decode())
        assert f"Sessions, at most {typed!r} is not a whole number; type one in digits, e.g. 3" in said, said
    assert clare.count_events(db) == before
