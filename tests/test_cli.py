"""The CLI as a user drives it: main(argv) in-process, and a few real processes."""

import json

import pytest

import clare
from conftest import projection_digest


def test_the_readme_tour_works_end_to_end(cli):
    assert cli("project", "new", "alpha", "--goal", "ship v1", "--owner", "ana").code == 0
    added = cli("task", "add", "alpha", "write the parser", "--prio", "1", "--desc", "tokens first", "--json")
    task = added.json()
    assert {k: task[k] for k in ("title", "description", "status", "priority")} == {
        "title": "write the parser", "description": "tokens first", "status": "todo", "priority": 1}
    listed = cli("task", "list", "--project", "alpha")
    assert task["id"][:8] in listed.out and "write the parser" in listed.out
    assert "started" in cli("task", "start", task["id"][:4]).out
    assert "done" in cli("task", "done", task["id"][:4]).out
    shown = cli("project", "show", "alpha", "--history")
    assert "created project 'alpha'" in shown.out
    assert "status='in_progress'" in shown.out and "status='done'" in shown.out
    assert "0 todo, 0 in progress, 0 blocked, 1 done" in shown.out


def test_json_field_names_are_the_contract(cli):
    project = cli("project", "new", "alpha", "--json").json()
    assert {"id", "name", "goal", "owner", "status"} <= project.keys()
    cli("task", "add", "alpha", "x")
    task = cli("task", "list", "--json").json()[0]
    assert {"id", "project_id", "title", "description", "status", "priority"} <= task.keys()
    event = cli("log", "--json").json()[0]
    assert set(event) == {"uuid", "hlc", "machine_id", "event_type", "payload", "created_at"}
    assert isinstance(event["payload"], dict)
    assert cli("--json", "project", "list").json()[0]["name"] == "alpha"


@pytest.mark.parametrize("argv, message", [
    (["task", "add", "nope", "x"], "no project 'nope'; list them with: clare project list"),
    (["task", "add", "alpha", "x", "--prio", "5"], "priority 5 is outside 0-4"),
    (["task", "add", "alpha", "   "], "title is empty"),
    (["project", "new", "alpha"], "a project named 'alpha' exists already"),
    (["task", "start", "zz"], "is not a hex id or prefix"),
    (["task", "start", "0000"], "no task '0000'"),
    (["project", "set", "alpha", "--name", "deadbeef"], "looks like an id"),
    (["task", "edit", "0"], "nothing to change"),
    (["log", "--limit", "0"], "--limit 0 must be from 1 to 1000"),
])
def test_bad_input_is_one_line_naming_the_fix_and_writes_nothing(cli, argv, message):
    cli("project", "new", "alpha")
    before = clare.count_events(clare.open_db(clare.resolve_paths().db))
    r = cli(*argv)
    assert r.code != 0
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clare: error: ") and message in lines[0], r.err
    assert clare.count_events(clare.open_db(clare.resolve_paths().db)) == before


def test_an_ambiguous_prefix_lists_the_candidates(cli):
    cli("project", "new", "alpha")
    ids = [cli("task", "add", "alpha", f"t{i}", "--json").json()["id"] for i in range(40)]
    first = max("0123456789abcdef", key=lambda c: sum(i[0] == c for i in ids))
    same = sorted(i for i in ids if i[0] == first)
    assert len(same) >= 2
    r = cli("task", "start", first)
    assert r.code == 1 and "is ambiguous" in r.err and same[0][:8] in r.err


def test_editing_to_the_same_value_records_nothing(cli):
    cli("project", "new", "alpha")
    t = cli("task", "add", "alpha", "x", "--json").json()
    n = len(cli("log", "--json").json())
    assert cli("task", "edit", t["id"], "--title", "x").code == 0
    assert len(cli("log", "--json").json()) == n


def test_init_is_idempotent_and_keeps_its_machine_id(cli):
    first = cli("init", "--machine-id", "apricot", "--json").json()
    again = cli("init", "--json").json()
    assert first["created"] and not again["created"] and again["machine_id"] == "apricot"
    assert cli("init", "--machine-id", "banana").code == 1
    assert cli("init", "--machine-id", "Bad.Name").code == 2


def test_replay_rebuilds_the_same_tables(cli):
    cli("project", "new", "alpha")
    cli("task", "add", "alpha", "x")
    db = clare.open_db(clare.resolve_paths().db)
    before = projection_digest(db)
    r = cli("replay")
    assert r.code == 0 and r.out.startswith("replayed 2 events")
    assert projection_digest(db) == before


def test_every_command_has_help_with_an_example(capsys):
    for cmd in clare.COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            clare.main([*cmd.path, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0
        assert f"example:\n  {cmd.example.splitlines()[0]}" in out, cmd.path
        assert "--json" in out, f"{cmd.path} lacks --json"
        assert cmd.handler.__doc__, f"{cmd.path} handler lacks a docstring"


def test_help_shows_the_example(capsys):
    with pytest.raises(SystemExit):
        clare.main(["task", "add", "--help"])
    out = capsys.readouterr().out
    assert "example:\n  clare task add alpha" in out


def test_default_paths_follow_xdg(tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path / "d"), "XDG_CONFIG_HOME": str(tmp_path / "c")}
    p = clare.resolve_paths(env=env)
    assert p.db == str(tmp_path / "d" / "clare" / "clare.db")
    assert p.config == str(tmp_path / "c" / "clare" / "clare.toml")
    assert clare.resolve_paths(env={"CLARE_HOME": str(tmp_path)}).db == str(tmp_path / "clare.db")


def test_a_real_process_creates_its_database_on_first_use(run_clare, home):
    r = run_clare("project", "new", "alpha", "--goal", "ship v1")
    assert r.code == 0 and r.out.startswith("created project alpha"), r.err
    assert (home / "clare.db").exists()
    r = run_clare("task", "add", "alpha", "quote ' and \" and $(rm -rf /) stay text")
    assert r.code == 0
    listed = json.loads(run_clare("task", "list", "--json").out)
    assert listed[0]["title"] == "quote ' and \" and $(rm -rf /) stay text"


def test_a_real_process_reports_errors_without_a_traceback(run_clare):
    r = run_clare("task", "done", "abcd")
    assert r.code == 1 and r.err == "clare: error: no task 'abcd'; list them with: clare task list\n"
    r = run_clare("task", "add")
    assert r.code == 2 and "Traceback" not in r.err and "the following arguments are required" in r.err


def test_install_writes_a_launcher_that_runs_clare_as_a_module(run_clare, tmp_path, home):
    bin_dir = tmp_path / "bin"
    r = run_clare("install", "--bin", bin_dir, "--json")
    assert r.code == 0, r.err
    launcher = bin_dir / "clare"
    assert r.json()["launcher"] == str(launcher) and launcher.stat().st_mode & 0o111
    assert run_clare("project", "new", "alpha").code == 0
    import subprocess
    p = subprocess.run([str(launcher), "project", "list", "--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert [x["name"] for x in json.loads(p.stdout)] == ["alpha"]
    p = subprocess.run([str(launcher), "task", "start", "zz"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("clare: error: task id 'zz'")


def test_io_and_input_errors_are_one_line_not_tracebacks(cli, tmp_path):
    cli("project", "new", "alpha")
    r = cli("export", tmp_path / "missing" / "x.jsonl")
    assert r.code == 1 and r.err.startswith("clare: error: cannot write") and "Traceback" not in r.err
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe{}\n" + b"[" * 100_000 + b"\n")
    r = cli("import", bad)
    assert r.code == 1 and "line 1: not UTF-8 text" in r.err and "line 2:" in r.err
    afile = tmp_path / "a-file"
    afile.write_text("")
    r = cli("--home", afile, "init")
    assert r.code == 1 and r.err.startswith("clare: error: cannot create the folder")
    r = cli("project", "set", "alpha")
    assert r.code == 2 and "nothing to change" in r.err


def test_group_commands_show_examples_in_their_help(capsys):
    with pytest.raises(SystemExit):
        clare.main(["task", "--help"])
    assert "examples:\n  clare task add alpha" in capsys.readouterr().out


def test_sync_turns_a_foreign_error_into_one_line_for_cli_and_loop(cli, db, monkeypatch):
    import sqlite3
    import threading

    def broken(*args, **kwargs):
        raise sqlite3.DatabaseError("database disk image is malformed")
    monkeypatch.setattr(clare, "sync_with", broken)
    r = cli("sync", "http://127.0.0.1:9")
    assert r.code == 1 and r.err.startswith("clare: error: 127.0.0.1-9: internal error (DatabaseError(")
    assert r.err.count("\n") == 1
    assert "internal error: DatabaseError(" in clare.list_peer_status(db)[0].last_error
    stop, lines = threading.Event(), []

    def log(line):
        lines.append(line)
        stop.set()
    clare._sync_loop(db.path, clare.check_peer("http://127.0.0.1:9"), {}, stop=stop, log=log, interval_s=0.1)
    assert len(lines) == 1 and "failed (1 in a row): internal error (DatabaseError(" in lines[0]


def test_export_pages_through_a_log_longer_than_one_page_in_receipt_order(cli, db, tmp_path, server):
    with clare.write_txn(db) as cur:
        for i in range(2 * clare.MAX_EVENTS_PAGE + 5):
            clare.record(db, cur, "note.kept", {"n": i}, now_ms=clare.now_ms())
    assert cli("export", tmp_path / "log.jsonl").code == 0
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["payload"]["n"] for e in lines] == list(range(2 * clare.MAX_EVENTS_PAGE + 5))
    last3 = clare.list_events(db, limit=3)
    page = server.request("GET", f"/api/v1/events?after={last3[0].rseq}&limit=2").json()
    assert [e["payload"]["n"] for e in page["events"]] == [2 * clare.MAX_EVENTS_PAGE + 3, 2 * clare.MAX_EVENTS_PAGE + 4]
    assert page["has_more"] is False and page["next_after"] == last3[-1].rseq


def test_broadcast_without_live_recipients_fails_at_once_saying_why(cli, db):
    cli("project", "new", "alpha")
    n_events = clare.count_events(db)
    for argv in (("broadcast", "alpha", "--", "hi"), ("broadcast", "alpha", "--yes", "--", "hi")):
        r = cli(*argv)
        assert r.code == 1 and r.out == ""
        assert r.err.startswith("clare: error: broadcast target 'alpha' reaches no live session; run 'clare pull'")
        assert "recipients" not in r.err and len(r.err.strip().splitlines()) == 1
    assert clare.count_events(db) == n_events


@pytest.mark.parametrize("target, kind", [("group:", "group"), ("session:", "session"), ("group: ", "group")])
def test_broadcast_to_a_group_or_session_without_its_name_says_the_name_is_missing(cli, target, kind):
    r = cli("broadcast", target, "--yes", "--", "x")
    assert r.code == 2 and f"lacks the {kind} after '{kind}:'" in r.err and "no project" not in r.err


def test_broadcast_to_one_recipient_asks_in_the_singular(cli, db):
    from conftest import observe
    sid = "5e551011-0000-4000-8000-000000000001"
    observe(db, [sid], now_ms=clare.now_ms())
    r = cli("broadcast", f"session:{sid[:8]}", "--", "hi")
    assert r.code == 2 and r.err.startswith("1 recipient:\n")
    assert "add --yes to send to this session" in r.err


@pytest.mark.parametrize("argv", [["init"], ["pull"], ["sync"], ["peer", "list"], ["export"], ["install"]])
def test_local_only_verbs_refuse_remote_in_one_line(cli, argv):
    r = cli("--remote", "http://127.0.0.1:9", *argv)
    assert r.code == 2 and r.err.startswith(f"clare: error: clare {' '.join(argv)} works on this host's own")


def test_terminal_escapes_in_titles_are_shown_not_obeyed(cli):
    cli("project", "new", "alpha")
    r = cli("task", "add", "alpha", "e\x1b]0;pwn\x07x")
    assert "\x1b" not in r.out and "e\\x1b]0;pwn\\x07x" in r.out
    assert cli("task", "list", "--json").json()[0]["title"] == "e\x1b]0;pwn\x07x"


def test_log_limit_is_bounded_in_one_line(cli):
    r = cli("log", "--limit", "99999999999999999999")
    assert r.code == 2 and r.err.startswith("clare: error: --limit") and "clare export" in r.err


@pytest.mark.parametrize("url", ["http://[::1", "http://h:99999", "ftp://h"])
def test_peer_add_refuses_a_url_sync_could_not_use(cli, url):
    r = cli("peer", "add", url)
    assert r.code == 2 and "is not an http:// or https:// address" in r.err


def test_argument_errors_are_one_line_pointing_at_the_help(run_clare):
    r = run_clare("log", "--limit", "abc")
    assert r.code == 2 and r.err == ("clare: error: argument --limit: invalid int value: 'abc'; "
                                     "see: clare log --help\n")
