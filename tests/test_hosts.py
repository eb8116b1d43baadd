"""Hosts: machine ids unique by construction, a copied database refused, the Python version check,
`clare setup` against temporary HOMEs with stand-in systemctl and loginctl, and `clare doctor`."""

import ast
import json
import os
import re
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import clare
from conftest import CLARE_PY, ROOT, Ran, require_program, wait_for
from readme import commands

# A stand-in for systemctl / loginctl: records its arguments, answers like the real one, fails on demand.
# FAIL_<NAME>="WORD" makes a call whose arguments contain WORD fail as a missing user bus does.
STAND_IN = r"""#!/bin/sh
echo "$*" >> "$STAND_IN_LOG/{name}.log"
if [ -n "$FAIL_{upper}" ]; then
  case " $* " in *" $FAIL_{upper} "*) echo "Failed to connect to bus: No medium found" >&2; exit 1;; esac
fi
case "$*" in
  *is-active*) echo "${{IS_ACTIVE:-active}}";;
  *Linger*) echo "${{LINGER:-no}}";;
esac
exit 0
"""


class Host:
    """One host on this machine: its own HOME, CLARE_HOME and PATH with stand-in systemctl and loginctl."""

    def __init__(self, root: Path, *, tools: tuple[str, ...] = ("systemctl", "loginctl"), has_home: bool = True):
        self.root = root
        self.user = root / "user"
        self.home = root / "clare"
        self.bin = root / "bin"
        self.log = root / "log"
        for d in (self.user, self.bin, self.log):
            d.mkdir(parents=True, exist_ok=True)
        for name in tools:
            path = self.bin / name
            path.write_text(STAND_IN.format(name=name, upper=name.upper()))
            path.chmod(0o755)
        # python3 is this interpreter (never a shim from PATH); tmux stays reachable for doctor.
        (self.bin / "python3").symlink_to(sys.executable)
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("CLARE_TOKEN", "CLARE_URL", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "CLAUDE_CONFIG_DIR",
                                 "TMUX", "TMUX_PANE")}
        self.env.update(HOME=str(self.user), CLARE_HOME=str(self.home), STAND_IN_LOG=str(self.log),
                        PATH=f"{self.bin}:{os.environ['PATH']}", TMUX_TMPDIR=str(root / "no-tmux"))
        if not has_home:  # Clare's default places under HOME, as on a real host
            del self.env["CLARE_HOME"]
            self.home = self.user / ".config" / "clare"

    def run(self, *argv: str, env: dict | None = None, timeout: float = 60) -> Ran:
        p = subprocess.run([sys.executable, str(CLARE_PY), *map(str, argv)], capture_output=True, text=True,
                           env={**self.env, **(env or {})}, timeout=timeout, stdin=subprocess.DEVNULL)
        return Ran(p.returncode, p.stdout, p.stderr)

    def calls(self, name: str) -> list[str]:
        path = self.log / f"{name}.log"
        return path.read_text().splitlines() if path.exists() else []

    @property
    def unit(self) -> Path:
        return self.user / ".config" / "systemd" / "user" / "clare.service"

    @property
    def config(self) -> Path:
        return self.home / "clare.toml"

    def token(self) -> str:
        import tomllib
        return tomllib.loads(self.config.read_text())["token"]


@pytest.fixture
def host(tmp_path) -> Host:
    return Host(tmp_path / "a")


def _meta(db_path) -> dict:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT key, value FROM meta"))
    finally:
        conn.close()


def _n_events(db_path) -> int:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- machine ids and the database's fingerprint ---------------------------------------------------

def test_two_homes_on_one_machine_get_different_machine_ids(tmp_path):
    a, b = Host(tmp_path / "a"), Host(tmp_path / "b")
    ids = [h.run("init", "--json").json()["machine_id"] for h in (a, b)]
    assert ids[0] != ids[1]
    for machine_id in ids:
        clare.check_machine_id(machine_id)
        assert re.fullmatch(rf"{re.escape(clare.host_label())}-[0-9a-f]{{6}}", machine_id)
        assert clare.machine_host_name(machine_id) == clare.host_label()  # the host name stays the display name


def test_a_group_by_host_name_matches_the_sessions_of_a_unique_machine_id(tmp_path):
    import uuid

    from conftest import observe

    db = clare.open_db(str(tmp_path / "clare.db"), machine_id="apricot-3f9a2c")
    try:
        observe(db, [str(uuid.uuid4())], now_ms=clare.now_ms())
        clare.create_group(db, "here", host="apricot", now_ms=clare.now_ms())
        clare.create_group(db, "there", host="banana", now_ms=clare.now_ms())
        assert [s.host for s in clare.list_group_sessions(db, "here")] == ["apricot-3f9a2c"]
        assert clare.list_group_sessions(db, "there") == []
    finally:
        db.close()


def test_the_release_database_keeps_its_machine_id(tmp_path, host):
    fixture = ROOT / "tests" / "data" / "release-0.1.0.db"
    before = _meta(fixture)
    # Opened in place once, it would name tests/data as its home, and every copy of it would be refused.
    assert "home_path" not in before, "tests/data/release-0.1.0.db was opened in place; git checkout it"
    copy = tmp_path / "release.db"
    shutil.copyfile(fixture, copy)
    ran = host.run("--db", copy, "project", "new", "after-upgrade")
    assert ran.code == 0, ran.err
    after = _meta(copy)
    assert after["machine_id"] == before["machine_id"] and after["db_id"] == before["db_id"]
    assert after["home_path"] == os.path.realpath(copy)  # where it runs is recorded from now on
    assert _meta(fixture) == before  # the committed file itself is untouched


def test_a_copied_database_refuses_writes_and_init_new_id_recovers_it(tmp_path):
    a = Host(tmp_path / "a")
    first = a.run("init", "--json").json()
    assert a.run("project", "new", "alpha").code == 0
    b = Host(tmp_path / "b")
    shutil.copytree(a.home, b.home)  # a copied home: the original is still in use
    n_before = _n_events(b.home / "clare.db")

    refused = b.run("project", "new", "beta")
    assert refused.code == 1
    assert refused.err.count("\n") == 1 and "is a copy of" in refused.err and "clare init --new-id" in refused.err
    assert _n_events(b.home / "clare.db") == n_before  # nothing half-written
    assert "alpha" in b.run("project", "list").out  # reads still work
    assert b.run("init").code == 1  # init names the fix too
    serve = b.run("serve", "--port", "0")  # serve writes in the background: it refuses to start
    assert serve.code == 1 and "clare init --new-id" in serve.err
    assert a.run("project", "new", "gamma").code == 0  # the original is not affected

    renewed = b.run("init", "--new-id", "--json").json()
    assert renewed["renewed"] and renewed["machine_id"] != first["machine_id"]
    assert renewed["db_id"] != first["db_id"]
    assert _n_events(b.home / "clare.db") == n_before  # the log is kept
    assert b.run("project", "new", "beta").code == 0
    events = [json.loads(line) for line in b.run("export").out.splitlines()]
    assert {e["machine_id"] for e in events} == {first["machine_id"], renewed["machine_id"]}


def test_a_moved_database_keeps_writing_under_its_id(tmp_path):
    a = Host(tmp_path / "a")
    machine_id = a.run("init", "--json").json()["machine_id"]
    moved = tmp_path / "moved"
    shutil.move(a.home, moved)
    ran = a.run("--home", moved, "project", "new", "alpha")
    assert ran.code == 0, ran.err
    assert _meta(moved / "clare.db")["machine_id"] == machine_id


def test_a_database_from_another_machine_refuses_writes(tmp_path):
    """A cloned VM: same path, but /etc/machine-id differs from the one the database was set up on."""
    a = Host(tmp_path / "a")
    a.run("init")
    conn = sqlite3.connect(a.home / "clare.db")
    conn.execute("UPDATE meta SET value = 'f00dfeedf00dfeedf00dfeedf00dfeed' WHERE key = 'home_machine'")
    conn.commit()
    conn.close()
    refused = a.run("project", "new", "alpha")
    assert refused.code == 1 and "another machine" in refused.err and "clare init --new-id" in refused.err
    assert a.run("init", "--new-id").code == 0
    assert a.run("project", "new", "alpha").code == 0


def test_the_home_rule():
    kw = {"machine": "m1", "path": "/new/clare.db", "db_id": "D"}
    assert clare.check_home(None, **kw, db_id_at=lambda p: "D") is None  # older database: adopted
    assert clare.check_home(("m1", "/new/clare.db"), **kw, db_id_at=lambda p: "D") is None
    assert "another machine" in clare.check_home(("m0", "/new/clare.db"), **kw, db_id_at=lambda p: None)
    assert "copy of /old" in clare.check_home(("m1", "/old/clare.db"), **kw, db_id_at=lambda p: "D")
    assert clare.check_home(("m1", "/old/clare.db"), **kw, db_id_at=lambda p: None) is None  # moved
    assert clare.check_home(("m1", "/old/clare.db"), **kw, db_id_at=lambda p: "other") is None  # replaced


def test_a_peer_with_this_hosts_machine_id_is_refused_both_ways(home, serve, tmp_path):
    """Two databases given one machine id by hand (or a clone from before fingerprints): sync refuses them."""
    served = serve(token="t" * 20)
    twin = clare.open_db(str(tmp_path / "twin.db"), machine_id="testhost")  # the served db's id
    try:
        peer = clare.HttpPeer(served.url, token="t" * 20)
        with pytest.raises(clare.Conflict, match="this host's own machine id testhost.*clare init --new-id"):
            clare.sync_with(twin, peer, name="twin")
        body = {"machine_id": "testhost", "db_id": twin.db_id, "now_ms": clare.now_ms(), "events": []}
        reply = served.request("POST", "/api/v1/sync/events", json_body=body)
        assert reply.status == 409 and "clare init --new-id" in reply.json()["error"]["message"]
    finally:
        twin.close()


# --- the Python version check ---------------------------------------------------------------------

def test_clare_py_parses_under_python_3_8_grammar():
    ast.parse(CLARE_PY.read_text(), feature_version=(3, 8))


def test_the_version_check_is_the_first_statement_after_the_imports():
    body = ast.parse(CLARE_PY.read_text()).body
    rest = [n for n in body[1:] if not isinstance(n, (ast.Import, ast.ImportFrom))]
    first = rest[0]
    assert isinstance(first, ast.If) and "sys.version_info < (3, 11)" in ast.unparse(first.test)
    assert body.index(first) == 1 + sum(isinstance(n, (ast.Import, ast.ImportFrom)) for n in body)


_OLD_PYTHON = """
import runpy, sys
sys.version_info = (3, 10, 12, "final", 0)
sys.argv = [{script!r}, *{argv!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("argv", [["--help"], ["init"], ["serve"], ["task", "list"], ["setup", "--dry-run"]])
def test_an_older_python_gets_one_line_from_every_command(argv, home):
    p = subprocess.run([sys.executable, "-c", _OLD_PYTHON.format(script=str(CLARE_PY), argv=argv)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "Python 3.11 or newer, this is Python 3.10" in p.stderr
    assert "python3.11" in p.stderr  # how to get it
    assert not (home / "clare.db").exists()


def test_an_older_python_gets_the_line_through_the_launcher_too(tmp_path):
    code = (f"import sys; sys.version_info = (3, 9, 2, 'final', 0); sys.path.insert(0, {str(ROOT)!r}); "
            "import clare")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.strip().endswith("run: python3.11 clare.py ...")


# --- clare setup ----------------------------------------------------------------------------------

def test_setup_sets_a_host_up_and_a_second_run_changes_nothing(host):
    ran = host.run("setup", "--bind", "10.9.0.2", "--peer", "http://10.9.0.3:8765")
    assert ran.code == 0, ran.err
    lines = ran.out.splitlines()
    for name in ("database", "token", "launcher", "unit", "systemd", "linger", "hooks", "peer", "join"):
        assert any(re.match(rf"\S+\s+{name}\b", line) for line in lines), name  # each step printed

    unit = host.unit.read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start == (f"ExecStart={sys.executable} {CLARE_PY} --home {host.home} serve --host 10.9.0.2 "
                          "--port 8765")
    assert "Restart=on-failure" in unit and "PrivateTmp" not in unit.replace("no PrivateTmp", "")
    assert "ProtectHome" not in unit.replace("no ProtectHome", "") and "network-online" not in unit
    assert host.calls("systemctl") == ["--user daemon-reload", "--user enable clare", "--user restart clare"]

    assert stat.S_IMODE(host.config.stat().st_mode) == 0o600 and len(host.token()) >= 32
    assert (host.user / ".local" / "bin" / "clare").exists()
    settings = json.loads((host.user / ".claude" / "settings.json").read_text())
    assert "Stop" in settings["hooks"]
    assert 'url = "http://10.9.0.3:8765"' in host.config.read_text()
    assert "linger is off" in ran.out and "sudo loginctl enable-linger" in ran.out

    # No terminal: the command for the other side goes to a private file, never to the output.
    join = host.home / clare.JOIN_FILE
    assert stat.S_IMODE(join.stat().st_mode) == 0o600 and str(join) in ran.out
    assert join.read_text() == (f"CLARE_TOKEN={host.token()} python3 clare.py setup --bind 10.9.0.3 "
                                "--peer http://10.9.0.2:8765\n")
    assert host.token() not in ran.out + ran.err

    snapshot = {p: p.read_bytes() for p in (host.unit, host.config, host.home / "clare.db")}
    again = host.run("setup", "--bind", "10.9.0.2", "--peer", "http://10.9.0.3:8765", "--json")
    assert again.code == 0, again.err
    states = {s["name"]: s["state"] for s in again.json()["steps"]}
    assert {k: v for k, v in states.items() if v not in ("ok", "todo")} == {}
    assert {p: p.read_bytes() for p in snapshot if p.suffix != ".db"} == \
        {p: b for p, b in snapshot.items() if p.suffix != ".db"}
    assert host.calls("systemctl")[3:] == ["--user daemon-reload", "--user enable --now clare"]


def test_the_unit_serves_the_database_setup_was_given(host, tmp_path):
    assert host.run("--db", tmp_path / "elsewhere.db", "setup").code == 0
    assert f"--home {host.home} --db {tmp_path / 'elsewhere.db'} serve" in host.unit.read_text()
    assert (tmp_path / "elsewhere.db").exists()


def test_setup_dry_run_prints_every_step_and_changes_nothing(host):
    ran = host.run("setup", "--bind", "10.9.0.2", "--peer", "http://10.9.0.3:8765", "--dry-run")
    assert ran.code == 0, ran.err
    assert "would create" in ran.out and "would write" in ran.out and "nothing was changed" in ran.out
    assert not host.home.exists() and not host.unit.exists() and not (host.user / ".claude").exists()
    assert host.calls("systemctl") == []


def test_setup_without_a_user_systemd_says_what_to_run(host):
    ran = host.run("setup", "--bind", "127.0.0.1", env={"FAIL_SYSTEMCTL": "daemon-reload"})
    assert ran.code == 0, ran.err
    line = next(line for line in ran.out.splitlines() if re.match(r"\S+\s+systemd\s", line))
    assert "no user systemd answers here (Failed to connect to bus: No medium found)" in line
    assert f"{sys.executable} {CLARE_PY} --home {host.home} serve --host 127.0.0.1 --port 8765" in ran.out
    assert host.calls("systemctl") == ["--user daemon-reload"]
    assert "linger does not apply" in ran.out


def test_setup_without_systemctl_at_all_says_what_to_run(tmp_path):
    bare = Host(tmp_path / "bare", tools=())
    bare.env["PATH"] = str(bare.bin)  # no systemctl, no loginctl anywhere
    ran = bare.run("setup")
    assert ran.code == 0, ran.err
    assert "no systemctl here" in ran.out and "start Clare yourself" in ran.out


def test_setup_reports_a_failing_enable_in_one_line_and_exits_1(host):
    ran = host.run("setup", env={"FAIL_SYSTEMCTL": "restart"})
    assert ran.code == 1
    assert "systemctl --user restart clare failed: Failed to connect to bus" in ran.out
    assert "journalctl --user -u clare" in ran.out and "setup failed at systemd" in ran.out


def test_setup_with_linger_on_has_nothing_to_do_by_hand(host):
    ran = host.run("setup", env={"LINGER": "yes"})
    assert ran.code == 0 and "linger is on" in ran.out
    assert host.calls("loginctl")[0].startswith("show-user ")


def test_setup_takes_the_fleet_token_from_clare_token_and_refuses_another(host):
    token = "shared-fleet-token-0123456789"
    assert host.run("setup", env={"CLARE_TOKEN": token}).code == 0
    assert host.token() == token
    ran = host.run("setup", env={"CLARE_TOKEN": "another-token-0123456789"})
    assert ran.code == 1 and ran.err.count("\n") == 1 and "another token than CLARE_TOKEN" in ran.err


def _verify(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    analyze = require_program("systemd-analyze", "install systemd (.ci/run does) to verify the unit setup writes")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run([analyze, "--user", "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})


def test_the_written_unit_passes_systemd_analyze_verify(host, tmp_path):
    assert host.run("setup", "--bind", "10.9.0.2").code == 0
    checked = _verify(host.unit, tmp_path)
    assert checked.stderr == "" and checked.returncode == 0


def test_the_repository_unit_is_the_template_setup_writes(tmp_path):
    defaults = clare.UNIT_TEMPLATE.substitute(
        exec_start="/usr/bin/python3 %h/clare.py serve --host 127.0.0.1 --port 8765",
        environment="Environment=PATH=/usr/local/bin:/usr/bin:/bin")
    assert (ROOT / "clare.service").read_text() == defaults
    copy = tmp_path / "clare.service"
    copy.write_text(defaults.replace("/usr/bin/python3", sys.executable))  # verify checks the interpreter exists
    checked = _verify(copy, tmp_path)
    assert checked.stderr == "" and checked.returncode == 0


def test_unit_words_are_quoted_for_systemd():
    assert clare._unit_word("/srv/my clare/clare.py") == '"/srv/my clare/clare.py"'
    assert clare._unit_word("/home/a%b/$x") == '"/home/a%%b/$$x"'
    assert clare._unit_argv('ExecStart="/home/a%%b/$$x" serve') == ["/home/a%b/$x", "serve"]


# --- clare doctor -----------------------------------------------------------------------------------

def _serve_as_the_unit_would(host: Host) -> subprocess.Popen:
    """Start the command the written unit runs, as systemd would, and wait until it answers."""
    line = next(ln for ln in host.unit.read_text().splitlines() if ln.startswith("ExecStart="))
    argv = clare._unit_argv(line)
    proc = subprocess.Popen(argv, env=host.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    port = int(argv[argv.index("--port") + 1])

    def answers():
        if proc.poll() is not None:
            pytest.fail(f"serve exited: {proc.stderr.read()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    wait_for(answers, timeout=30, what="serve to listen")
    return proc


def test_doctor_checks_a_set_up_host_and_names_the_fix_of_each_failure(tmp_path):
    a, b = Host(tmp_path / "a"), Host(tmp_path / "b")
    (a.bin / "claude").write_text("#!/bin/sh\necho 2.1.197\n")
    (a.bin / "claude").chmod(0o755)
    port_a, port_b = _free_port(), _free_port()
    assert b.run("setup", "--port", port_b).code == 0
    token = b.token()
    ran = a.run("setup", "--port", port_a, "--peer", f"http://127.0.0.1:{port_b}", env={"CLARE_TOKEN": token})
    assert ran.code == 0, ran.out + ran.err
    servers = [_serve_as_the_unit_would(h) for h in (a, b)]
    try:
        doctor = a.run("doctor", "--json")
        checks = {c["name"]: c for c in doctor.json()["checks"]}
        assert doctor.code == 0, checks
        assert set(checks) == {"unit", "bind", "token", f"peer 127.0.0.1-{port_b}", "hooks", "tmux", "claude",
                               "schema", "fingerprint", "disk", "clock"}
        assert checks["claude"]["detail"] == str(a.bin / "claude")
        assert re.search(r"answers, clock [+-]\d", checks[f"peer 127.0.0.1-{port_b}"]["detail"])
        text = a.run("doctor")
        assert text.code == 0 and len(text.out.splitlines()) == 12 and "all 11 checks passed" in text.out

        servers.pop().terminate()  # b stops: its peer check fails, with what to do
        a.config.chmod(0o644)
        broken = a.run("doctor", env={"IS_ACTIVE": "failed"})
        assert broken.code == 1
        fails = [line for line in broken.out.splitlines() if line.startswith("FAIL")]
        assert [f.split()[1] for f in fails] == ["unit", "token", "peer"]
        out = broken.out
        assert "clare.service is failed" in out and "systemctl --user enable --now clare" in out
        assert f"chmod 600 {a.config}" in out and f"check that clare serve runs on http://127.0.0.1:{port_b}" in out
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(10)


def test_doctor_on_a_copied_database_names_init_new_id(tmp_path):
    a = Host(tmp_path / "a")
    a.run("setup")
    b = Host(tmp_path / "b")
    shutil.copytree(a.home, b.home)
    ran = b.run("doctor", "--json")
    checks = {c["name"]: c for c in ran.json()["checks"]}
    assert ran.code == 1 and checks["fingerprint"]["state"] == "failed"
    assert checks["fingerprint"]["fix"].startswith("clare init --new-id")


def test_doctor_where_no_user_systemd_runs_leaves_the_unit_to_the_bind_check(host):
    host.run("setup")
    ran = host.run("doctor", "--json", env={"FAIL_SYSTEMCTL": "is-active"})
    checks = {c["name"]: c for c in ran.json()["checks"]}
    assert checks["unit"]["state"] == "ok" and "no user systemd answers here" in checks["unit"]["detail"]
    assert checks["bind"]["state"] == "failed" and "clare serve" in checks["bind"]["fix"]


def test_doctor_without_a_database_says_to_run_setup(host):
    ran = host.run("doctor")
    assert ran.code == 1 and "no database at" in ran.out and "fix: clare setup" in ran.out
    assert not (host.home / "clare.db").exists()


# --- the README's setup lines, run as written -----------------------------------------------------

README_LINE = re.compile(r"\Ascp -r clare.py static (\w+): && ssh -t (\w+) (.+)\Z")


def _readme_setup_lines() -> list[tuple[str, str]]:
    lines = [README_LINE.match(line) for line in commands("Three hosts in ten minutes")]
    assert all(lines) and len(lines) == 3, lines
    assert all(m[1] == m[2] for m in lines)
    return [(m[1], m[3]) for m in lines]


def test_the_readme_sets_up_three_hosts_with_setup_alone(tmp_path):
    """Each line: scp copies clare.py and static/ into the host's HOME; ssh -t runs the rest there."""
    hosts = {}
    token = join_line = None
    for name, command in _readme_setup_lines():
        h = hosts[name] = Host(tmp_path / name, has_home=False)
        shutil.copyfile(CLARE_PY, h.user / "clare.py")
        shutil.copytree(ROOT / "static", h.user / "static")
        if "TOKEN" in command:
            address = re.search(r"--bind (\S+)", command)[1]
            # The line the first host gave (in a private file, as there is no terminal in a test).
            command = command.replace("CLARE_TOKEN=TOKEN", f"CLARE_TOKEN={token}")
            assert command.replace(address, "THEIR_ADDRESS") == join_line
        p = subprocess.run(["bash", "-c", command], cwd=h.user, env=h.env, capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stdout + p.stderr
        if token is None:
            token = h.token()
            join_line = (h.home / clare.JOIN_FILE).read_text().strip()
    ids = {name: _meta(h.user / ".local" / "share" / "clare" / "clare.db")["machine_id"] for name, h in hosts.items()}
    assert len(set(ids.values())) == 3
    assert {h.token() for h in hosts.values()} == {token}
    for name, address in (("apricot", "10.9.0.2"), ("banana", "10.9.0.3"), ("cherry", "10.9.0.4")):
        h = hosts[name]
        assert f"clare.py serve --host {address} --port 8765" in h.unit.read_text()
        assert h.calls("systemctl")[:2] == ["--user daemon-reload", "--user enable clare"]
        assert ('url = "http://10.9.0.2:8765"' in h.config.read_text()) == (name != "apricot")


@pytest.mark.parametrize("argv", [["--bind", "10.9.0.2:8765"], ["--port", "70000"], ["--peer", "10.9.0.3"]])
def test_setup_refuses_a_bad_argument_in_one_line_and_writes_nothing(host, argv):
    ran = host.run("setup", *argv)
    assert ran.code == 2 and ran.err.count("\n") == 1 and ran.err.startswith("clare: error: ")
    assert not host.home.exists() and not host.unit.exists() and host.calls("systemctl") == []
