"""Dispatch (issue #16, part B): a project's waiting sessions fed the next ready task, decided by one host.

With the fake Claude in a real private tmux server (the `fleet` fixture of test_dispatch), the
seeded multi-host simulation of test_sync's links, and the project page in Chromium.
"""

import contextlib
import json
import os
import random
import subprocess
import uuid

import pytest

import clare
from conftest import seeds, wait_for
from test_dispatch import fleet, received, set_config, write_claude  # noqa: F401  (fixtures and helpers)
from test_sync import Sim, _crashing, assert_converged


def dispatching_project(cli, folder, *titles: str, max_sessions: int = 1) -> list[str]:
    """Make project api with its code in `folder`, dispatch on, and one task per title (P1, P2, ...)."""
    folder.mkdir(exist_ok=True)
    assert cli("project", "new", "api", "--dir", str(folder)).code == 0
    ids = [cli("task", "add", "api", title, "--prio", str(min(n, 4)), "--desc", f"about {title}",
               "--json").json()["id"] for n, title in enumerate(titles, 1)]
    r = cli("project", "set", "api", "--dispatch", "on", "--max-sessions", str(max_sessions))
    assert r.code == 0, r.err
    return ids


def pane_env(fleet, pane_id: str) -> dict:  # noqa: F811
    """The environment Claude's Bash tool gives the launcher in a pane."""
    return {**os.environ, "TMUX": f"{fleet.socket},1,0", "TMUX_PANE": pane_id, "CLARE_URL": "http://127.0.0.1:9"}


def done_from_pane(home, fleet, pane_id: str, summary: str) -> None:  # noqa: F811
    p = subprocess.run([str(home / "clare"), "update", "--done", summary], env=pane_env(fleet, pane_id),
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr


# --- the settings: project set --dispatch / --max-sessions / --dispatcher -------------------------------

def test_dispatch_is_off_by_default_and_set_shown_and_undone_per_field(cli, db):
    assert cli("project", "new", "api").code == 0
    shown = cli("project", "show", "api", "--json").json()
    assert (shown["is_dispatching"], shown["max_sessions"], shown["dispatcher"]) == (False, 1, None)
    assert "dispatch: off (turn it on with: clare project set api --dispatch on)" in cli("project", "show", "api").out
    r = cli("project", "set", "api", "--dispatch", "on", "--max-sessions", "3")
    assert r.code == 0, r.err
    assert "dispatch: on, up to 3 sessions, decided by testhost" in r.out
    p = clare.get_project(db, "api")
    assert (p.is_dispatching, p.max_sessions, p.dispatcher) == (True, 3, "testhost")
    before = clare.count_events(db)
    assert cli("project", "set", "api", "--dispatch", "on").code == 0
    assert clare.count_events(db) == before  # the same values are not recorded again
    for args, code, says in ((("--max-sessions", "0"), 2, "--max-sessions 0 is outside 1-50"),
                             (("--dispatcher", "nowhere"), 1, "no host 'nowhere' is known here")):
        r = cli("project", "set", "api", *args)
        assert r.code == code and says in r.err, (args, r.err)
    assert clare.count_events(db) == before  # a refusal leaves no trace
    db.conn.execute("INSERT INTO sync_peers (url, name, machine_id) VALUES ('http://a:1', 'apricot', 'm-apricot')")
    r = cli("project", "set", "api", "--dispatcher", "apricot", "--json")
    assert r.json()["dispatcher"] == "m-apricot"
    assert cli("project", "set", "api", "--dispatch", "off", "--json").json()["is_dispatching"] is False
    assert cli("undo").code == 0
    assert clare.get_project(db, "api").is_dispatching is True
    history = cli("project", "show", "api", "--history").out
    assert "changed project: dispatch=True, dispatcher='testhost', max_sessions=3" in history
    assert "changed project: dispatcher='m-apricot'" in history


def test_the_dispatch_settings_go_through_the_json_api_and_its_openapi_document(server, db, cli):
    assert cli("project", "new", "api").code == 0
    r = server.request("PATCH", "/api/v1/projects/api", json_body={"dispatch": True, "max_sessions": 4})
    assert r.status == 200, r.body
    got = json.loads(r.body)
    assert (got["is_dispatching"], got["max_sessions"], got["dispatcher"]) == (True, 4, "testhost")
    r = server.request("PATCH", "/api/v1/projects/api", json_body={"max_sessions": 99})
    assert r.status == 422 and b"outside 1-50" in r.body
    r = server.request("PATCH", "/api/v1/projects/api", json_body={"dispatch": "yes"})
    assert r.status in (400, 422) and b"dispatch" in r.body
    assert clare.get_project(db, "api").max_sessions == 4
    spec = json.loads(server.request("GET", "/api/v1/openapi.json").body)
    body = json.dumps(spec["paths"]["/api/v1/projects/{project}"]["patch"])
    assert all(name in body for name in ("dispatch", "max_sessions", "dispatcher"))


def test_a_bad_dispatch_template_is_refused_with_the_names_it_may_use():
    with pytest.raises(clare.ClareError, match=r"uses \$name; it may use \$title, \$description"):
        clare.dispatch_settings({"dispatch": {"template": "do $name"}})
    with pytest.raises(clare.ClareError, match="clear_between = 'yes' is not true or false"):
        clare.dispatch_settings({"dispatch": {"clear_between": "yes"}})
    template, is_clear = clare.dispatch_settings({"dispatch": {"template": "$title ($priority) costs $$5"}})
    task = clare.Task("ab" * 16, "p", "api", "Fix it", "", "todo", 1, "", None, None)
    assert clare.first_prompt(task, launcher="/x/clare", template=template) == "Fix it (P1) costs $5"
    assert not is_clear


# --- feeding waiting sessions, with the fake Claude in tmux ------------------------------------------------

def test_finishing_a_task_types_the_next_ready_one_into_the_same_session(cli, fleet, home, db, tmp_path,  # noqa: F811
                                                                         server):
    first, second = dispatching_project(cli, tmp_path / "code", "write the parser", "write the printer")
    assert cli("pull").code == 0  # no session on the project and 0 of 1 run: one is started for the first task
    [order] = clare.list_orders(db)
    assert (order.action, order.result, order.task_id) == ("start", "started", first)
    assert "no session of api waits and 0 of at most 1 run" in order.request["reason"]
    sid, pane = order.session_id, order.outcome["pane_id"]
    assert received(fleet, sid, "prompt")[0].startswith("write the parser\n\nabout write the parser\n\n")
    assert cli("pull").code == 0  # working on it: nothing more (1 of 1 runs, none waits)
    assert len(clare.list_orders(db)) == 1
    done_from_pane(home, fleet, pane, "parser written")
    assert cli("pull").code == 0  # it waits with no open task: the next ready one is typed in
    wait_for(lambda: len(received(fleet, sid, "prompt")) == 2, what="the second task typed in")
    assert received(fleet, sid, "prompt")[1].startswith("write the printer\n\nabout write the printer\n\n")
    assert f'{home / "clare"} update --done "one-line summary"' in received(fleet, sid, "prompt")[1]
    dispatch = next(o for o in clare.list_orders(db) if o.action == "dispatch")
    assert (dispatch.result, dispatch.session_id, dispatch.task_id) == ("typed", sid, second)
    task = cli("task", "show", second, "--json").json()
    assert (task["session_id"], task["status"]) == (sid, "in_progress")
    said = f"dispatch task {second[:8]} to session {sid[:8]} on testhost: session {sid[:8]} finished its task"
    assert said in cli("task", "show", second).out
    assert said in cli("log").out
    assert f"dispatch task {second[:8]}" in cli("sessions", "show", sid).out
    for path in (f"/sessions/{sid}", f"/tasks/{second}"):  # the session's and the task's pages say it too
        assert said in server.request("GET", path).body.decode(), path
    done_from_pane(home, fleet, pane, "printer written")
    assert cli("pull").code == 0  # nothing ready any more: nothing happens
    assert len(clare.list_orders(db)) == 2


def test_a_draft_in_the_composer_fails_the_dispatch_and_leaves_the_task_ready(cli, fleet, home, db, tmp_path):  # noqa: F811
    first, second = dispatching_project(cli, tmp_path / "code", "write the parser", "write the printer")
    cli("pull")
    [order] = clare.list_orders(db)
    done_from_pane(home, fleet, order.outcome["pane_id"], "parser written")
    fleet.run("send-keys", "-t", order.outcome["pane_id"], "-l", "half a thought")  # the user's draft
    wait_for(lambda: "half a thought" in fleet.capture(order.outcome["pane_id"]), what="the draft on screen")
    cli("pull")
    dispatch = next(o for o in clare.list_orders(db) if o.action == "dispatch")
    assert dispatch.result == "refused" and "draft" in dispatch.reason
    task = cli("task", "show", second, "--json").json()
    assert (task["session_id"], task["status"]) == (None, "todo")  # ready again
    assert len(received(fleet, order.session_id, "prompt")) == 1  # nothing typed, the draft kept
    assert "draft" in cli("task", "show", second).out
    cli("pull")  # no retry storm: the same session and task are left alone for a while
    assert len(clare.list_orders(db)) == 2


@pytest.mark.parametrize("hooks", ["without hooks", "with hooks"])
def test_with_clear_between_the_task_goes_to_the_new_session_id_after_clear(cli, fleet, home, db, tmp_path,  # noqa: F811
                                                                            hooks):
    set_config(home, write_claude(fleet.bin), "[dispatch]\nclear_between = true\n")
    if hooks == "with hooks":  # then the SessionStart hook of /clear hands the task over too: once in all
        assert cli("hooks", "install").code == 0
    first, second = dispatching_project(cli, tmp_path / "code", "write the parser", "write the printer")
    cli("pull")
    [order] = clare.list_orders(db)
    fleet.wait_settled(1)  # the fake redraws its composer after its hooks ran (the real one at once)
    done_from_pane(home, fleet, order.outcome["pane_id"], "parser written")
    cli("pull")
    dispatch = next(o for o in clare.list_orders(db) if o.action == "dispatch")
    assert dispatch.result == "typed", dispatch.reason
    new_id = dispatch.outcome["session_id"]
    assert new_id != order.session_id
    assert received(fleet, new_id, "prompt")[0].startswith("write the printer")
    assert cli("task", "show", second, "--json").json()["session_id"] == new_id
    assert cli("task", "show", first, "--json").json()["session_id"] == order.session_id  # done: it stays
    cli("pull")
    gone = [e for e in clare.list_history(db, [order.session_id]) if e.event_type == "session.gone"]
    assert [e.payload.get("successor_id") for e in gone] == [new_id]
    handed = [e for e in clare.list_history(db, [second]) if e.event_type == "task.assigned"]
    assert [e.payload["session_id"] for e in handed] == [order.session_id, new_id]


def test_a_new_session_is_started_when_none_waits_up_to_the_maximum(cli, fleet, home, db, tmp_path):  # noqa: F811
    ids = dispatching_project(cli, tmp_path / "code", "one", "two", "three", max_sessions=2)
    cli("pull")
    starts = [o for o in clare.list_orders(db) if o.action == "start"]
    assert sorted(o.task_id for o in starts) == sorted(ids[:2]) and {o.result for o in starts} == {"started"}
    cli("pull")
    assert len(clare.list_orders(db)) == 2  # two run: the third waits
    assert cli("task", "show", ids[2], "--json").json()["session_id"] is None
    assert len(fleet.run("list-panes", "-a").splitlines()) == 2


def test_only_the_dispatcher_host_dispatches(cli, fleet, home, db, tmp_path):  # noqa: F811
    dispatching_project(cli, tmp_path / "code", "one")
    db.conn.execute("INSERT INTO sync_peers (url, name, machine_id) VALUES ('http://a:1', 'apricot', 'm-apricot')")
    assert cli("project", "set", "api", "--dispatcher", "apricot").code == 0
    cli("pull")
    assert clare.list_orders(db) == []
    assert not (fleet.claude_dir / "fake-started.jsonl").exists()


# --- decided once: the seeded multi-host simulation -----------------------------------------------------

class DispatchSim(Sim):
    """Hosts that add tasks, run the dispatch round, carry out their orders and finish tasks, over lossy links.

    Each host's Claude sessions are simulated at the process boundary Clare observes (observe_sessions);
    carrying out an order records what carry_out would (claimed, then typed / started / refused).
    """

    def __init__(self, seed: int, tmp, *, changes_dispatcher: bool):
        super().__init__(seed, tmp)
        self.random_skews = False  # clocks are test_sync's subject; here: loss, duplication, delay, crashes
        self.restores = False  # a dispatcher restored from an old backup forgets its dispatches (README: a limit)
        self.changes_dispatcher = changes_dispatcher
        self.n_changes = 0
        self.live: dict[str, dict[str, str]] = {h.name: {} for h in self.hosts}  # host -> session id -> state
        first, code_host = self.hosts[0], self.hosts[-1]
        project = clare.create_project(first.db, "api", now_ms=first.now())
        with clare.write_txn(first.db) as cur:
            clare.record(first.db, cur, "project.dir_set", {"project_id": project.id, "host": code_host.name,
                                                            "dir": "/srv/api"}, now_ms=first.now())
        clare.edit_project(first.db, project.id, dispatch=True, max_sessions=self.rng.randint(1, 3),
                           now_ms=first.now())
        self.project_id = project.id
        self.heal()
        self.faults_on = True

    def local_op(self, host) -> None:
        rng, now = self.rng, host.now()
        op = rng.choice(["task", "task", "dispatch", "dispatch", "carry", "carry", "finish", "finish", "finish"]
                        + (["dispatcher"] if self.changes_dispatcher else []))
        try:
            if op == "task":
                clare.create_task(host.db, self.project_id, f"t{rng.randrange(1000)}", priority=rng.randrange(5),
                                  now_ms=now)
            elif op == "dispatch":
                clare.dispatch_round(host.db, config={}, now_ms=now)
            elif op == "carry":
                self.carry_out(host, now)
            elif op == "finish":
                self.finish(host, now)
            elif op == "dispatcher":
                with clare.write_txn(host.db) as cur:
                    clare.record(host.db, cur, "project.updated", {
                        "project_id": self.project_id, "dispatcher": rng.choice(self.hosts).name}, now_ms=now)
                self.n_changes += 1
        except clare.ClareError:
            pass  # a refusal (a task no longer ready, say) is a normal outcome and leaves no trace

    def observe(self, host, now: int) -> None:
        clare.observe_sessions(host.db, [clare.Observation(
            sid, "/srv/api", None, f"api:{k}", f"%{k}", None, "claude", state, now, "", {})
            for k, (sid, state) in enumerate(sorted(self.live[host.name].items()))], now_ms=now)

    def carry_out(self, host, now: int) -> None:
        live = self.live[host.name]
        for order in clare.list_orders(host.db, pending_on=host.name):
            clare.record_order_result(host.db, order.id, result="claimed", now_ms=now)
            if order.action == "start":
                live[order.session_id] = "working"
                result, reason = "started", ""
            elif live.get(order.session_id) == "waiting" and self.rng.random() < 0.8:
                live[order.session_id] = "working"
                result, reason = "typed", ""
            else:
                result, reason = "refused", "composer holds a draft; not typed"
            clare.record_order_result(host.db, order.id, result=result, reason=reason, now_ms=now)
        self.observe(host, now)

    def finish(self, host, now: int) -> None:
        live = self.live[host.name]
        for sid in [s for s, state in sorted(live.items()) if state == "working"][:1]:
            for task in clare.list_tasks(host.db, session_id=sid, is_open=True):
                clare.post_update(host.db, "done", task_ref=task.id, is_done=True, now_ms=now)
            live[sid] = "waiting"
        self.observe(host, now)

    def step(self) -> None:
        rng = self.rng
        self.t += rng.randrange(0, 4000)
        r = rng.random()
        if r < 0.45:
            self.local_op(rng.choice(self.hosts))
        elif r < 0.95:
            self.sync(*rng.choice(sorted(self.links)))
        elif self.delayed:
            link, handle, text = self.delayed.pop(rng.randrange(len(self.delayed)))
            with contextlib.suppress(clare.ClareError):
                link.serve(handle, json.loads(text))


def carried_out_dispatches(db) -> dict[str, list[tuple[str, str]]]:
    """Return task id -> (placing host, order id) of each dispatch or dispatched start that was carried out."""
    placed_by = {e.payload["order_id"]: e.machine_id for e in clare.iter_events(db) if e.event_type == "order.placed"}
    out: dict[str, list[tuple[str, str]]] = {}
    for o in clare.list_orders(db):
        if o.request.get("is_dispatch") and o.result in ("typed", "started"):
            out.setdefault(o.task_id, []).append((placed_by[o.id], o.id))
    return out


def run_dispatch_sim(seed: int, tmp, monkeypatch, *, changes_dispatcher: bool) -> DispatchSim:
    ids = random.Random(f"ids-{seed}")  # ids from the seed too, so CLARE_SEED replays a run exactly
    monkeypatch.setattr(clare, "new_uuid", lambda: str(uuid.UUID(int=ids.getrandbits(128), version=4)))
    sim = DispatchSim(seed, tmp, changes_dispatcher=changes_dispatcher)
    sim.crash_rate = 0.05  # deaths in the middle of storing a batch
    monkeypatch.setattr(clare, "receive_events", _crashing(sim, clare.receive_events, when=lambda kw: True))
    for _ in range(160):
        sim.step()
    for _ in range(3):  # after heal every host runs its round and carries out what is left, then heal again
        sim.heal()
        for host in sim.hosts:
            clare.dispatch_round(host.db, config={}, now_ms=host.now())
        sim.heal()
        for host in sim.hosts:
            sim.carry_out(host, host.now())
    sim.heal()
    assert_converged(sim)
    return sim


@pytest.mark.parametrize("seed", seeds(30, "dispatch-sim"), ids=lambda s: f"seed={s}")
def test_at_most_one_carried_out_dispatch_per_task_after_heal_under_loss_and_duplication(seed, tmp_path, monkeypatch):
    sim = run_dispatch_sim(seed, tmp_path, monkeypatch, changes_dispatcher=False)
    for host in sim.hosts:
        twice = {t: d for t, d in carried_out_dispatches(host.db).items() if len(d) > 1}
        assert not twice, f"{host.name}: tasks dispatched twice: {twice}"
    assert sum(map(len, carried_out_dispatches(sim.hosts[0].db).values())), "the run dispatched nothing"
    sim.close()


@pytest.mark.parametrize("seed", seeds(30, "dispatch-sim-changes"), ids=lambda s: f"seed={s}")
def test_a_task_dispatched_twice_only_by_two_hosts_while_the_dispatcher_changed(seed, tmp_path, monkeypatch):
    sim = run_dispatch_sim(seed, tmp_path, monkeypatch, changes_dispatcher=True)
    for task_id, done in carried_out_dispatches(sim.hosts[0].db).items():
        if len(done) > 1:  # the stated exception: each was placed by a host that was the dispatcher it knew of
            assert sim.n_changes and len({host for host, _ in done}) == len(done), (task_id, done)
    sim.close()


# --- one end-to-end run with the real Claude Code ------------------------------------------------------

@pytest.mark.slow
def test_real_claude_reports_a_task_done_from_its_pane_and_gets_the_next_one_typed_in():
    """The real Claude Code 2.1.197 against the mock Messages API: started for the first ready task by
    dispatch, it runs the `update --done` its description asks for (no dialog: the launcher is allowed),
    waits, and the next ready task is typed into the same session."""
    import time

    from test_dispatch_real import RealHost

    host = RealHost(is_trusted=True)
    try:
        launcher = host.clare_home / "clare"
        first, second = (host.clare("task", "add", "real", title, "--prio", prio, "--desc",
                                    f'BASH:{launcher} update --done "{title}: done"', "--json").json()["id"]
                         for title, prio in (("make the parser", "1"), ("make the printer", "2")))
        assert host.clare("project", "set", "real", "--dispatch", "on").code == 0
        r = host.clare("pull")
        assert r.code == 0, r.err
        [start] = json.loads(host.clare("session", "orders", "--json").out)
        assert (start["action"], start["result"], start["task_id"]) == ("start", "started", first), start
        sid = start["session_id"]
        deadline = time.monotonic() + 120
        while len(host.api.prompts()) < 2 or host.clare("task", "show", second, "--json").json()["status"] != "done":
            assert time.monotonic() < deadline, "prompts so far: " + repr(host.api.prompts())
            host.clare("pull")  # serve's loop does this every second
            time.sleep(0.5)
        prompts = host.api.prompts()
        assert prompts[0].startswith("make the parser\n\nBASH:")
        assert prompts[1].startswith("make the printer\n\nBASH:")  # typed in after the first was done
        orders = json.loads(host.clare("session", "orders", "--json").out)
        dispatch = next(o for o in orders if o["action"] == "dispatch")
        assert (dispatch["result"], dispatch["session_id"], dispatch["task_id"]) == ("typed", sid, second), dispatch
        for task_id, title in ((first, "make the parser"), (second, "make the printer")):
            shown = host.clare("task", "show", task_id, "--json").json()
            assert (shown["status"], shown["session_id"]) == ("done", sid)
            assert [u["text"] for u in shown["updates"]] == [f"{title}: done"]
        assert "needs permission" not in host.clare("sessions", "show", sid).out
    finally:
        host.close()


# --- the upgrade: schema 10 from the release database ----------------------------------------------

def test_the_release_database_upgrades_to_dispatch_settings_off_and_replays_them(tmp_path):
    import shutil

    from conftest import ROOT, projection_digest

    path = tmp_path / "clare.db"
    shutil.copyfile(ROOT / "tests" / "data" / "release-0.1.0.db", path)
    db = clare.open_db(str(path))
    try:
        version = db.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        assert version == str(clare.SCHEMA_VERSION)  # 10 (dispatch) or later
        assert {(p.name, p.is_dispatching, p.max_sessions, p.dispatcher) for p in clare.list_projects(db)} == {
            ("alpha", False, 1, None), ("beta", False, 1, None)}
        assert clare.dispatch_round(db, config={}, now_ms=clare.now_ms()) == []  # off: nothing happens
        p = clare.edit_project(db, "alpha", dispatch=True, max_sessions=2, now_ms=clare.now_ms())
        assert (p.is_dispatching, p.max_sessions, p.dispatcher) == (True, 2, "release-0-1-0")
        before = projection_digest(db)
        clare.replay(db)
        assert projection_digest(db) == before
    finally:
        db.close()


# --- the README's dispatch section, run as written ----------------------------------------------------

def test_the_readme_dispatch_section_runs_as_written(tmux, monkeypatch):
    """On a host named apricot whose claude_command is the fake Claude, in a private tmux server."""
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    from conftest import CLARE_PY
    from test_readme import run_page

    short = Path(tempfile.mkdtemp(prefix="u"))
    home = short / "home"
    (home / "src" / "api").mkdir(parents=True)
    (home / "bin").mkdir()
    (home / "bin" / "clare").write_text(f"#!/bin/bash\nexec {sys.executable} {CLARE_PY} \"$@\"\n")
    (home / "bin" / "clare").chmod(0o755)
    env = {**os.environ, "HOME": str(home), "CLARE_HOME": str(short / "clare"), "TMUX_TMPDIR": str(tmux.tmpdir),
           "PATH": f"{home / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("TMUX", None)
    subprocess.run(["clare", "init", "--machine-id", "apricot"], env=env, check=True, capture_output=True)
    (short / "clare" / "clare.toml").write_text(
        f'[fleet]\nclaude_command = "{write_claude(short / "claude-bin")}"\npull_every_s = 0\n')
    try:
        run_page("Dispatch: waiting sessions fed the next ready task", env, home)
        orders = json.loads(subprocess.run(["clare", "session", "orders", "--json"], env=env, capture_output=True,
                                           text=True, check=True).stdout)
        assert [(o["action"], o["result"]) for o in orders] == [("start", "started"), ("dispatch", "typed")]
    finally:
        subprocess.run(["tmux", "-S", str(tmux.tmpdir / f"tmux-{os.getuid()}" / "default"), "kill-server"],
                       capture_output=True, timeout=10)
        shutil.rmtree(short, ignore_errors=True)


# --- two real `clare serve` processes: the dispatcher decides, the host of the code carries out ------------

@pytest.mark.slow
def test_serve_on_the_dispatcher_host_starts_and_feeds_a_session_on_the_host_of_the_code(tmp_path, home):
    """a decides (its serve's pull loop), b runs the sessions: a start and a dispatch travel as orders,
    each carried out once by b; no `clare pull` is typed by anyone."""
    import time

    from test_dispatch import Host

    claude = write_claude(tmp_path / "bin")
    a, b = Host(tmp_path, "a", claude), Host(tmp_path, "b", claude)
    try:
        for h in (a, b):
            (h.home / "clare.toml").write_text(f'[fleet]\nclaude_command = "{claude}"\npull_every_s = 1\n'
                                               "[sync]\ninterval_s = 1\n")
        b.serve()
        env = {"B_TOKEN": b.token}
        a.env["B_TOKEN"] = b.token
        assert a.cli("peer", "add", b.url, "--name", "bee", "--token-env", "B_TOKEN").code == 0
        assert a.cli("sync").code == 0  # a learns b's machine id
        folder = tmp_path / "b-code"
        folder.mkdir()
        assert a.cli("project", "new", "api", "--dir", f"bee:{folder}").code == 0
        one, two = (a.cli("task", "add", "api", title, "--prio", prio, "--json").json()["id"]
                    for title, prio in (("one", "1"), ("two", "2")))
        assert a.cli("project", "set", "api", "--dispatch", "on").code == 0
        a.serve()

        def prompts() -> list[tuple[str, str]]:
            return [(x["session_id"], x["prompt"].split("\n")[0]) for x in b.received() if "prompt" in x]
        deadline = time.monotonic() + 60
        while not prompts():
            assert time.monotonic() < deadline, a.cli("session", "orders").out
            time.sleep(0.3)
        [(sid, first)] = prompts()
        assert first == "one"
        pane = b.cli("sessions", "--json").json()[0]["pane_id"]
        p = subprocess.run([str(b.home / "clare"), "update", "--done", "one is done"], capture_output=True,
                           text=True, timeout=30, env={**b.env, "TMUX": f"{b.tmux_dir},1,0", "TMUX_PANE": pane})
        assert p.returncode == 0, p.stderr
        while len(prompts()) < 2:
            assert time.monotonic() < deadline + 30, a.cli("session", "orders").out
            time.sleep(0.3)
        assert prompts() == [(sid, "one"), (sid, "two")]  # the same session, fed by a, typed in by b
        orders = {o["action"]: o for o in a.cli("session", "orders", "--json", env=env).json()}
        assert set(orders) == {"start", "dispatch"}
        assert all(o["host"] == "b" for o in orders.values())
        deadline = time.monotonic() + 30
        while a.cli("task", "show", two, "--json").json()["session_id"] != sid:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert len(b.received("fake-started.jsonl")) == 1  # one session, started once
        placed = [ln for ln in a.cli("log").out.splitlines() if "dispatch task" in ln or "start session" in ln]
        assert len(placed) == 2 and all(" a " in f" {ln} " for ln in placed), placed  # both decided by a
    finally:
        a.close()
        b.close()


def test_a_dialog_opened_after_the_decision_refuses_the_dispatch_and_frees_the_task(cli, fleet, home, db,  # noqa: F811
                                                                                     tmp_path):
    """The dispatcher decided on a look where the session waited (on another host, say); a permission dialog
    opened since: the host does not type (Enter would approve it), records why, and the task is ready again."""
    first, second = dispatching_project(cli, tmp_path / "code", "write the parser", "write the printer")
    cli("project", "set", "api", "--dispatch", "off")
    cli("session", "start", first)
    [order] = clare.list_orders(db)
    fleet.wait_settled(1)
    done_from_pane(home, fleet, order.outcome["pane_id"], "parser written")
    cli("pull")
    waiting = clare.get_session(db, order.session_id)
    assert waiting.state == "waiting"
    fleet.type_prompt(order.outcome["pane_id"], "perm")  # the user asks for something that opens a dialog
    wait_for(lambda: "Do you want to proceed?" in fleet.capture(order.outcome["pane_id"]), what="the dialog")
    placed = clare.place_dispatch(db, second, waiting, template=clare.DISPATCH_TEMPLATE, reason="a test: stale view",
                                  now_ms=clare.now_ms())
    assert clare.get_task(db, second).session_id == waiting.id
    cli("pull")  # carries the order out before it looks again
    [done] = clare.list_orders(db, order_id=placed.id)
    assert done.result == "refused" and "needs permission" in done.reason, done
    task = clare.get_task(db, second)
    assert (task.session_id, task.status) == (None, "todo")
    assert [t.id for t in clare.list_ready_tasks(db)] == [second]
    assert not any(r.get("approved") for r in fleet.received())  # no Enter reached the dialog
