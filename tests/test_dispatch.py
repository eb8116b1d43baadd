"""Starting, resuming and stopping Claude sessions for tasks: the fake Claude in a real private tmux server."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

import clare
from conftest import FAKE_CLAUDE, TmuxServer, projection_digest, require_program, wait_for


def _require(program: str) -> None:
    require_program(program, f"apt-get install {program} (.ci/run does it)")


def write_claude(folder: Path, *extra: str) -> Path:
    """Write a `claude` program that runs the fake Claude as `claude` (argv[0]), with extra flags first."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "claude"
    path.write_text("#!/bin/bash\n" f"exec -a claude {shlex.quote(sys.executable)} {shlex.quote(str(FAKE_CLAUDE))} "
                    f"{shlex.join(extra)} \"$@\"\n")
    path.chmod(0o755)
    return path


def set_config(home: Path, claude: Path | str, extra: str = "") -> None:
    (home / "clare.toml").write_text(f'[fleet]\nclaude_command = "{claude}"\npull_every_s = 0\n{extra}')


@pytest.fixture
def fleet(home, db, tmp_path, monkeypatch):
    """The user's default tmux server in a private TMUX_TMPDIR (Clare starts it), and a fake `claude`."""
    _require("tmux")
    tmpdir = Path(tempfile.mkdtemp(prefix="clare-disp-"))  # a socket path must fit in 108 bytes
    monkeypatch.setenv("TMUX_TMPDIR", str(tmpdir))
    claude_dir = Path(os.environ["HOME"]) / ".claude"
    claude_dir.mkdir(parents=True, exist_ok=True)
    server = TmuxServer(tmpdir, "default", claude_dir)
    server.bin = tmp_path / "bin"
    set_config(home, write_claude(server.bin))
    yield server
    server.run("kill-server", check=False)
    shutil.rmtree(tmpdir, ignore_errors=True)


def git_repo(path: Path) -> Path:
    _require("git")
    path.mkdir(parents=True)
    for args in (["init", "-q", "-b", "main"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                                                "--allow-empty", "-m", "first"]):
        subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True)
    return path


def received(server: TmuxServer, session_id: str, key: str) -> list:
    """Return what the fake Claude of one session recorded: its argv and cwd at start, its prompts."""
    started = server.claude_dir / "fake-started.jsonl"
    lines = [json.loads(x) for x in started.read_text().splitlines()] if started.exists() else []
    return [r[key] for r in [*lines, *server.received()] if r.get("session_id") == session_id and key in r]


def project_with_task(cli, folder: Path, *, title="write the parser", desc="tokens first") -> str:
    assert cli("project", "new", "alpha.v2", "--dir", str(folder)).code == 0
    return cli("task", "add", "alpha.v2", title, "--desc", desc, "--json").json()["id"]


# --- projects know where their code lives --------------------------------------------

def test_project_dirs_per_host_are_set_shown_and_removed(cli, db, tmp_path):
    db.conn.execute("INSERT INTO sync_peers (url, name, machine_id) VALUES ('http://a:1', 'apricot', 'm-apricot'), "
                    "('http://b:1', 'twin', 'm-one'), ('http://c:1', 'twin', 'm-two')")
    r = cli("project", "new", "api", "--dir", str(tmp_path), "--dir", "apricot:/srv/api", "--json")
    assert r.code == 0, r.err
    assert r.json()["dirs"] == {"m-apricot": "/srv/api", "testhost": str(tmp_path)}
    shown = cli("project", "show", "api").out
    assert "code:  /srv/api on m-apricot" in shown and f"code:  {tmp_path} on testhost" in shown
    r = cli("project", "set", "api", "--dir", "m-apricot:", "--dir", "m-one:/opt/api", "--json")
    assert r.json()["dirs"] == {"m-one": "/opt/api", "testhost": str(tmp_path)}  # m-apricot's entry forgotten
    r = cli("project", "set", "api", "--dir", "twin:/x")
    assert r.code == 1 and "host name 'twin' is ambiguous: machine ids m-one, m-two" in r.err
    db.conn.execute("INSERT INTO sync_peers (url, name, machine_id) VALUES ('http://d:1', 'd', 'fig-3f9a2c'), "
                    "('http://e:1', 'e', 'pear-3f9a2c'), ('http://f:1', 'f', 'pear-77aa00')")
    assert cli("project", "set", "api", "--dir", "fig:/srv/fig", "--json").json()["dirs"]["fig-3f9a2c"] == "/srv/fig"
    r = cli("project", "set", "api", "--dir", "pear:/x")
    assert r.code == 1 and "host name 'pear' is ambiguous: machine ids pear-3f9a2c, pear-77aa00" in r.err
    r = cli("project", "set", "api", "--dir", "nowhere:/x")
    assert r.code == 1 and "no host 'nowhere' is known here" in r.err and "clare sync" in r.err
    r = cli("project", "set", "api", "--dir", "relative/path")
    assert r.code == 2 and "not an absolute path" in r.err
    before = clare.count_events(db)
    assert cli("project", "set", "api", "--dir", "m-one:/opt/api").code == 0
    assert clare.count_events(db) == before  # the same value is not recorded again


def test_dirs_orders_and_receipts_in_any_order_give_the_tables_of_a_replay(db, tmp_path):
    """Dirs set concurrently, an order and its receipts (one stamped before the order by a slow clock):
    applied one by one in any order, they give the tables a replay gives, and pending never wins."""
    import random

    p = clare.create_project(db, "api", dirs=[str(tmp_path)], now_ms=1000)
    t = clare.create_task(db, "api", "parse", now_ms=1001)
    with clare.write_txn(db) as cur:
        for i, host in enumerate(["testhost", "other", "other", "testhost"]):
            clare.record(db, cur, "project.dir_set", {"project_id": p.id, "host": host,
                                                      "dir": f"/d{i}" if i != 3 else None}, now_ms=2000 + i)
    order = clare.place_start(db, t.id, host="other", now_ms=3000)
    for result, at in (("claimed", 2400), ("started", 2500)):  # stamped by a host whose clock is behind
        ev = clare.check_received({"uuid": clare.new_uuid(), "hlc": f"{at:013d}.000000.other", "machine_id": "other",
                                   "event_type": "order.carried_out", "created_at": clare.iso_ms(at), "payload": {
                                       "order_id": order.id, "result": result, "reason": "",
                                       "outcome": {"pane_id": "%1"}}})
        with clare.write_txn(db) as cur:
            clare.receive_events(db, cur, [ev], now_ms=at)
    clare.replay(db)
    want = projection_digest(db)
    assert clare.get_project(db, "api").dirs == {"other": "/d2"}
    assert [(o.result, o.by_host) for o in clare.list_orders(db)] == [("started", "other")]
    for seed in range(8):
        rng = random.Random(seed)
        other = clare.open_db(str(tmp_path / f"o{seed}.db"), machine_id="o")
        shuffled = clare.list_events(db, limit=100)
        rng.shuffle(shuffled)
        for ev in shuffled:
            with clare.write_txn(other) as cur:
                clare.receive_events(other, cur, [ev], now_ms=5000)
        got = projection_digest(other)
        assert {k: got[k] for k in ("project_dirs", "orders", "tasks")} == \
               {k: want[k] for k in ("project_dirs", "orders", "tasks")}, seed
        other.close()


# --- start ------------------------------------------------------------------------------

def test_start_opens_a_window_binds_the_task_at_once_and_types_it_in(cli, fleet, home, tmp_path):
    folder = tmp_path / "code"
    folder.mkdir()
    task_id = project_with_task(cli, folder)
    r = cli("session", "start", task_id[:8], "--model", "sonnet", "--json")
    assert r.code == 0, r.err
    order = r.json()
    assert order["result"] == "started", order
    sid = order["session_id"]
    task = cli("task", "show", task_id, "--json").json()
    assert task["session_id"] == sid and task["status"] == "in_progress"
    r = cli("session", "start", task_id)
    assert r.code == 1 and f"has session {sid[:8]}, which is waiting on testhost; stop it first" in r.err
    # a tmux session named after the project (the '.' a tmux target cannot hold replaced)
    assert order["outcome"]["tmux_target"].startswith("alpha_v2:")
    assert "alpha_v2" in fleet.run("list-sessions", "-F", "#{session_name}")
    launcher = str(home / "clare")
    argv = received(fleet, sid, "argv")[0]
    assert argv[argv.index("--session-id") + 1] == sid and argv[argv.index("--model") + 1] == "sonnet"
    assert argv[argv.index("--allowedTools") + 1] == f"Bash({launcher} update:*)"
    assert received(fleet, sid, "cwd") == [str(folder)]
    prompt = received(fleet, sid, "prompt")[0]
    assert prompt.startswith("write the parser\n\ntokens first\n\n")
    assert f'{launcher} update --done "one-line summary"' in prompt
    # the session is seen at once, in its pane, bound to the task
    s = cli("sessions", "--json").json()
    assert [(x["id"], x["pane_id"], x["task_id"]) for x in s] == [(sid, order["outcome"]["pane_id"], task_id)]


def test_update_done_from_inside_the_pane_marks_the_task_done(cli, fleet, home, tmp_path):
    folder = tmp_path / "code"
    folder.mkdir()
    task_id = project_with_task(cli, folder)
    order = cli("session", "start", task_id, "--json").json()
    launcher = home / "clare"
    # as Claude's Bash tool runs it: the pane's TMUX and TMUX_PANE, and whatever CLARE_URL the user had
    env = {**os.environ, "TMUX": f"{fleet.socket},1,0", "TMUX_PANE": order["outcome"]["pane_id"],
           "CLARE_URL": "http://127.0.0.1:9", "CLARE_HOME": "/nonexistent"}
    p = subprocess.run([str(launcher), "update", "--done", "parser written, tests green"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    task = cli("task", "show", task_id, "--json").json()
    assert task["status"] == "done"
    assert [u["text"] for u in task["updates"]] == ["parser written, tests green"]


def test_start_in_a_new_worktree_of_a_git_repository(cli, fleet, tmp_path):
    repo = git_repo(tmp_path / "repo")
    task_id = project_with_task(cli, repo, title="Fix the Login bug!")
    order = cli("session", "start", task_id, "--worktree", "--json").json()
    assert order["result"] == "started", order
    branch = f"clare/{task_id[:8]}-fix-the-login-bug"
    worktree = tmp_path / f"repo-{task_id[:8]}-fix-the-login-bug"
    assert order["outcome"]["branch"] == branch and order["outcome"]["cwd"] == str(worktree)
    assert received(fleet, order["session_id"], "cwd") == [str(worktree)]
    head = subprocess.run(["git", "-C", str(worktree), "branch", "--show-current"], capture_output=True, text=True)
    assert head.stdout.strip() == branch
    # the same branch again is refused with the reason, and nothing is started
    r = cli("session", "start", task_id, "--worktree")
    assert r.code == 1 and f"branch {branch} exists in {repo}" in r.err and "git -C" in r.err


def test_refusals_name_the_problem_and_the_fix_and_leave_no_trace(cli, fleet, db, home, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    task_id = project_with_task(cli, plain)
    before = clare.count_events(db)
    r = cli("session", "start", task_id, "--worktree")
    assert r.code == 1 and f"error: {plain} is not a git repository" in r.err and "git init" in r.err
    cli("project", "set", "alpha.v2", "--dir", str(tmp_path / "missing"))
    before = clare.count_events(db)
    r = cli("session", "start", task_id)
    assert r.code == 1 and f"directory {tmp_path / 'missing'} does not exist on host testhost" in r.err
    assert "clare project set" in r.err
    cli("project", "set", "alpha.v2", "--dir", str(plain))
    set_config(home, "no-such-claude")
    before = clare.count_events(db)
    r = cli("session", "start", task_id)
    assert r.code == 1 and "the claude command 'no-such-claude' is not found on this host" in r.err
    assert "claude_command" in r.err
    assert clare.count_events(db) == before  # nothing recorded: no order, no binding
    assert fleet.run("list-panes", "-a", check=False) == ""  # no refusal left a window behind
    assert not (fleet.claude_dir / "fake-started.jsonl").exists()
    assert cli("session", "orders", "--json").json() == []
    assert cli("task", "show", task_id, "--json").json()["session_id"] is None


def test_a_refusal_on_the_host_frees_the_task_again(cli, fleet, db, tmp_path):
    """An order the host refuses (checked there, later than at placing) leaves the task unbound."""
    folder = tmp_path / "code"
    folder.mkdir()
    task_id = project_with_task(cli, folder)
    order = clare.place_start(db, task_id, now_ms=clare.now_ms())
    assert clare.get_task(db, task_id).session_id == order.session_id
    folder.rmdir()
    cli("pull")  # the host's look carries out what is pending for it
    [done] = clare.list_orders(db)
    assert done.result == "refused" and "does not exist on host testhost" in done.reason
    assert clare.get_task(db, task_id).session_id is None


def test_a_trust_screen_is_never_answered(cli, fleet, home, tmp_path):
    folder = tmp_path / "new-folder"
    folder.mkdir()
    set_config(home, write_claude(tmp_path / "bin2", "--trust"))
    task_id = project_with_task(cli, folder)
    r = cli("session", "start", task_id, "--json")
    order = r.json()
    assert r.code == 1 and order["result"] == "needs trust"
    assert f"Claude asks whether to trust {folder}" in order["reason"] and "never answers" in order["reason"]
    assert "tmux attach -t alpha_v2" in order["reason"]
    assert [x for x in fleet.received() if x.get("trusted") or "prompt" in x] == []


def test_resume_after_the_pane_was_killed_keeps_the_binding(cli, fleet, tmp_path):
    folder = tmp_path / "code"
    folder.mkdir()
    task_id = project_with_task(cli, folder)
    first = cli("session", "start", task_id, "--json").json()
    sid = first["session_id"]
    fleet.run("kill-pane", "-t", first["outcome"]["pane_id"])
    cli("pull")
    assert cli("sessions", "--all", "--json").json()[0]["state"] == "gone"
    r = cli("session", "resume", sid[:8], "--json")
    assert r.code == 0, r.err
    again = r.json()
    assert again["result"] == "started" and again["outcome"]["cwd"] == str(folder)
    argv = received(fleet, sid, "argv")[-1]
    assert argv[argv.index("--resume") + 1] == sid and "--allowedTools" in argv
    s = cli("sessions", "--json").json()
    assert [(x["id"], x["state"], x["task_id"]) for x in s] == [(sid, "waiting", task_id)]
    r = cli("session", "resume", sid[:8])
    assert r.code == 1 and "only a gone session is resumed" in r.err


def test_stop_types_exit_while_it_waits_and_closes_the_pane_clare_made(cli, fleet, tmp_path):
    folder = tmp_path / "code"
    folder.mkdir()
    task_id = project_with_task(cli, folder)
    order = cli("session", "start", task_id, "--json").json()
    r = cli("session", "stop", order["session_id"][:8], "--json")
    assert r.code == 0, r.err
    stop = r.json()
    assert stop["result"] == "stopped" and "ended by /exit" in stop["reason"] and "pane was closed" in stop["reason"]
    assert received(fleet, order["session_id"], "prompt")[-1] == "/exit"
    assert order["outcome"]["pane_id"] not in fleet.run("list-panes", "-a", "-F", "#{pane_id}", check=False)
    assert cli("sessions", "--all", "--json").json()[0]["state"] == "gone"


def test_stop_is_refused_while_it_works_unless_forced_and_spares_a_pane_it_did_not_make(cli, fleet, db, tmp_path):
    folder = tmp_path / "code"
    folder.mkdir()
    task_id = project_with_task(cli, folder)
    sid = str(uuid.uuid4())
    # a session someone started by hand, in a shell: Clare did not make this pane
    pane = fleet.spawn("bash", "-c", f"{fleet.bin / 'claude'} --session-id {sid}; exec sleep 600", cwd=folder,
                       name="mine")
    wait_for(lambda: "fake claude" in fleet.capture(pane), what="the fake Claude")
    cli("pull")
    cli("assign", task_id, sid[:8])
    fleet.type_prompt(pane, "work")
    wait_for(lambda: cli("pull") and cli("sessions", "--json").json()[0]["state"] == "working", what="working")
    r = cli("session", "stop", sid[:8])
    assert r.code == 1 and "is working; stop it once it waits, or now with --force" in r.err
    r = cli("session", "stop", sid[:8], "--force", "--json")
    assert r.code == 0, r.err
    assert r.json()["result"] == "stopped" and "ended by SIGTERM; the pane is left as it was" in r.json()["reason"]
    assert pane in fleet.run("list-panes", "-a", "-F", "#{pane_id}")  # the user's shell lives on
    assert cli("sessions", "--all", "--json").json()[0]["state"] == "gone"
    orders = cli("session", "orders", "--session", sid, "--json").json()
    assert [(o["action"], o["result"]) for o in orders] == [("stop", "stopped")]


# --- real `clare serve` processes ----------------------------------------------------------

class Host:
    """One Clare host: its own home, user folder and tmux folder, a `clare serve` process and its CLI."""

    def __init__(self, tmp: Path, name: str, claude: Path):
        self.name, self.home = name, tmp / name
        self.tmux_dir = Path(tempfile.mkdtemp(prefix=f"clare-{name}-"))
        self.token = f"token-of-{name}-" + "x" * 16
        drop = ("CLARE_TOKEN", "CLARE_URL", "TMUX", "TMUX_PANE")
        self.env = {**{k: v for k, v in os.environ.items() if k not in drop},
                    "CLARE_HOME": str(self.home), "HOME": str(tmp / f"{name}-user"), "TMUX_TMPDIR": str(self.tmux_dir)}
        self.claude_dir = tmp / f"{name}-user" / ".claude"
        self.proc, self.url = None, None
        assert self.cli("init", "--machine-id", name).code == 0
        set_config(self.home, claude, "[sync]\ninterval_s = 3600\n")

    def cli(self, *argv: str, env: dict | None = None):
        from conftest import CLARE_PY, Ran

        p = subprocess.run([sys.executable, str(CLARE_PY), *argv], capture_output=True, text=True, timeout=90,
                           env={**self.env, **(env or {})})
        return Ran(p.returncode, p.stdout, p.stderr)

    def serve(self) -> None:
        from conftest import CLARE_PY, serving_url

        # its own process group: stopping it the way systemd stops a unit reaches every process it made
        self.proc = subprocess.Popen([sys.executable, str(CLARE_PY), "serve", "--port", "0"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True,
                                     env={**self.env, "CLARE_TOKEN": self.token})
        self.url = serving_url(self.proc, self.name)

    def stop_group(self) -> None:
        """SIGTERM to serve's whole process group, and wait for serve to end."""
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.communicate(timeout=20)

    def tmux(self, *args: str) -> str:
        p = subprocess.run(["tmux", "-S", str(self.tmux_dir / f"tmux-{os.getuid()}" / "default"), *args],
                           capture_output=True, text=True, timeout=10)
        return p.stdout

    def received(self, name: str = "fake-received.jsonl") -> list[dict]:
        path = self.claude_dir / name
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def close(self) -> None:
        self.stop_group()
        self.tmux("kill-server")
        shutil.rmtree(self.tmux_dir, ignore_errors=True)


@pytest.fixture
def hosts(tmp_path, home):
    _require("tmux")
    made: list[Host] = []
    claude = write_claude(tmp_path / "bin")

    def make(name: str) -> Host:
        made.append(Host(tmp_path, name, claude))
        return made[-1]
    yield make
    for h in made:
        h.close()


def test_sessions_clare_started_survive_a_restart_of_serve(hosts, tmp_path):
    solo = hosts("solo")
    folder = tmp_path / "code"
    folder.mkdir()
    assert solo.cli("project", "new", "api", "--dir", str(folder)).code == 0
    task_id = solo.cli("task", "add", "api", "parse", "--json").json()["id"]
    solo.serve()
    # through serve, so the tmux server is started by serve's process
    r = solo.cli("--remote", solo.url, "session", "start", task_id, "--json", env={"CLARE_TOKEN": solo.token})
    assert r.code == 0, r.err
    order = r.json()
    assert order["result"] == "started", order
    solo.stop_group()
    assert order["outcome"]["pane_id"] in solo.tmux("list-panes", "-a", "-F", "#{pane_id}")
    solo.serve()
    solo.cli("pull")
    s = solo.cli("sessions", "--json").json()
    assert [(x["id"], x["state"], x["task_id"]) for x in s] == [(order["session_id"], "waiting", task_id)]


def a_task_for_b(hosts, folder: Path, *, where: str, desc: str = "") -> tuple[Host, Host, dict[str, str], str]:
    """Hosts a and b, b serving and a's peer `bee`; on a, project api whose code is in `folder` on b (the host
    named `where`: its machine id or its peer name), and a task of it. Return a, b, the env with its token, the task."""
    a, b = hosts("a"), hosts("b")
    b.serve()
    folder.mkdir(exist_ok=True)
    env = {"B_TOKEN": b.token}
    assert a.cli("peer", "add", b.url, "--name", "bee", "--token-env", "B_TOKEN").code == 0
    assert a.cli("sync", env=env).code == 0  # a learns b's machine id
    assert a.cli("project", "new", "api", "--dir", f"{where}:{folder}").code == 0
    task_id = a.cli("task", "add", "api", "parse", *(["--desc", desc] if desc else []), "--json").json()["id"]
    return a, b, env, task_id


def test_a_start_placed_on_one_host_is_carried_out_once_by_the_other(hosts, tmp_path):
    a, b, env, task_id = a_task_for_b(hosts, tmp_path / "b-code", where="bee", desc="on b")
    r = a.cli("session", "start", task_id, "--json", env=env)
    assert r.code == 0, r.err
    order = r.json()
    # pushed to b at once, carried out there at once (b's own pull and sync are off), its receipt followed back
    assert (order["host"], order["result"], order["by_host"]) == ("b", "started", "b"), order
    assert a.cli("task", "show", task_id, "--json").json()["session_id"] == order["session_id"]
    [done] = b.cli("session", "orders", "--json").json()
    assert (done["id"], done["result"]) == (order["id"], "started")
    assert [x["prompt"].split("\n")[0] for x in b.received() if "prompt" in x] == ["parse"]
    # later syncs and pulls on both sides never start it again
    for host in (b, a, b):
        host.cli("pull")
        host.cli("sync", env=env)
    assert len(b.received("fake-started.jsonl")) == 1
    assert len(b.tmux("list-panes", "-a", "-F", "#{pane_id}").split()) == 1
    assert a.tmux("list-panes", "-a") == ""
    mine = a.cli("session", "orders", "--json").json()
    assert [(o["id"], o["result"], o["by_host"]) for o in mine] == [(order["id"], "started", "b")]


@pytest.mark.parametrize("bus", ["up", "down"])
def test_under_systemd_the_tmux_server_is_started_in_its_own_scope(cli, fleet, tmp_path, monkeypatch, bus):
    """Inside a unit (INVOCATION_ID set) the server starts through systemd-run --user --scope, so stopping
    the unit never reaches it; without a user bus the start still works (KillMode=process covers it)."""
    log = tmp_path / "systemd-run.log"
    fake = tmp_path / "sbin" / "systemd-run"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/bash\necho "$@" >> {log}\n'
                    + ('while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n' if bus == "up"
                       else 'echo "Failed to connect to bus: No medium found" >&2\nexit 1\n'))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    folder = tmp_path / "code"
    folder.mkdir()
    task_id = project_with_task(cli, folder)
    r = cli("session", "start", task_id, "--json")
    assert r.code == 0 and r.json()["result"] == "started", r.out + r.err
    [line] = log.read_text().splitlines()
    assert line.startswith("--user --scope --quiet --collect ") and " new-session -d -s alpha_v2 " in line


def test_a_start_for_a_host_out_of_reach_waits_pending_in_the_log(hosts, tmp_path):
    a, b, env, task_id = a_task_for_b(hosts, tmp_path, where="b")
    b.stop_group()
    r = a.cli("session", "start", task_id, env=env)
    assert r.code == 0 and "pending: b has not taken it yet" in r.out and "clare session orders" in r.out
    b.serve()  # back: its next sync with a brings the order
    assert a.cli("peer", "rm", "bee").code == 0
    assert a.cli("peer", "add", b.url, "--name", "bee", "--token-env", "B_TOKEN").code == 0
    assert a.cli("sync", env=env).code == 0
    wait_for(lambda: [o for o in b.cli("session", "orders", "--json").json() if o["result"] == "started"],
             timeout=30, what="b to start the session once it got the order")


def test_a_stop_placed_on_one_host_is_carried_out_by_the_sessions_host(hosts, tmp_path):
    a, b, env, task_id = a_task_for_b(hosts, tmp_path / "b-code", where="b")
    sid = a.cli("session", "start", task_id, "--json", env=env).json()["session_id"]
    wait_for(lambda: a.cli("sync", env=env) and [s for s in a.cli("sessions", "--json").json() if s["id"] == sid],
             timeout=30, what="a to see the session b started")
    r = a.cli("session", "stop", sid[:8], "--json", env=env)
    assert r.code == 0 and r.json()["result"] == "stopped", r.out + r.err
    assert [x["prompt"] for x in b.received() if "prompt" in x][-1] == "/exit"
    assert b.tmux("list-panes", "-a") == ""


def test_an_order_from_a_peer_is_checked_again_by_the_host(cli, fleet, db, tmp_path):
    """A peer's order.placed passes the door on its form; the host still refuses a model that is a flag
    and never lets a tmux session name reach another session's window."""
    folder = tmp_path / "code"
    folder.mkdir()
    task_id = project_with_task(cli, folder)

    def peer_order(**fields) -> None:
        payload = {"order_id": uuid.uuid4().hex, "action": "start", "host": "testhost", "session_id": str(uuid.uuid4()),
                   "task_id": task_id, "cwd": str(folder), "tmux_session": "alpha", "is_worktree": False,
                   "model": None, "is_force": False, "expires_at": clare.iso_ms(clare.now_ms() + 60_000), **fields}
        ev = clare.check_received({"uuid": str(uuid.uuid4()), "hlc": f"{clare.now_ms():013d}.000000.peer",
                                   "machine_id": "peer", "event_type": "order.placed", "payload": payload,
                                   "created_at": clare.iso_ms(clare.now_ms())})
        with clare.write_txn(db) as cur:
            clare.receive_events(db, cur, [ev], now_ms=clare.now_ms())

    peer_order(model="--dangerously-skip-permissions")
    cli("pull")
    [refused] = clare.list_orders(db)
    assert refused.result == "refused" and "is not a model name" in refused.reason
    assert not (fleet.claude_dir / "fake-started.jsonl").exists()
    peer_order(tmux_session="alpha:1.0")
    cli("pull")
    started = clare.list_orders(db)[-1]
    assert started.result == "started" and started.outcome["tmux_target"].startswith("alpha_1_0:")
