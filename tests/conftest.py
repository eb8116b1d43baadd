"""Fixtures shared by the test suite: a private Clare home, the CLI in-process and as a process."""

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

import clare

# A loaded 2-core CI machine makes per-example deadlines flaky; a failure prints its reproduction blob.
settings.register_profile("clare", deadline=None, print_blob=True)
settings.load_profile("clare")
# Clare fsyncs every write (synchronous=FULL, +7 ms each); the suite's thousands of small transactions
# run under NORMAL. test_damage.py checks that FULL is the default.
os.environ.setdefault("CLARE_SYNCHRONOUS", "NORMAL")

ROOT = Path(__file__).resolve().parent.parent
CLARE_PY = ROOT / "clare.py"
IS_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")  # CI=true: .ci/run's machine


def require(is_present: bool, what: str, reason: str) -> None:
    """Skip a test whose tool is missing here; under CI=true fail it instead, with the reason.

    A CI run that skips the tests of a missing program would be green without testing anything.
    """
    if not is_present:
        message = f"{what} is missing: {reason}"
        if IS_CI:
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)


def require_program(name: str, reason: str) -> str:
    """Return the path of a program (a name on PATH or an absolute path), or skip/fail as `require` does."""
    path = name if os.path.isabs(name) and os.access(name, os.X_OK) else shutil.which(name)
    require(path is not None, name, reason)
    return str(path)


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh CLARE_HOME; nothing of the real user's ~/.claude, XDG or tmux leaks in."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("CLARE_HOME", str(h))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("TMUX_TMPDIR", str(tmp_path / "no-tmux"))  # no tmux server unless a test starts one
    for var in ("CLARE_TOKEN", "CLARE_URL", "TMUX", "TMUX_PANE", "CLAUDE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    return h


@pytest.fixture
def db(home):
    """An open database in the private home."""
    d = clare.open_db(str(home / "clare.db"), machine_id="testhost")
    yield d
    d.close()


@pytest.fixture
def cli(home, capsys):
    """Run `clare ARGS...` in-process through main(); return code, stdout, stderr."""
    def run(*argv: str) -> Ran:
        capsys.readouterr()
        code = clare.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)
    return run


@pytest.fixture
def run_clare(home):
    """Run clare.py as a real process with this interpreter (not a version-manager shim)."""
    def run(*argv: str, input: str | None = None, env: dict | None = None, timeout: float = 60) -> Ran:
        p = subprocess.run([sys.executable, str(CLARE_PY), *map(str, argv)], input=input,
                           capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
        return Ran(p.returncode, p.stdout, p.stderr)
    return run


def pytest_report_header(config):
    return f"CLARE_SEED={os.environ.get('CLARE_SEED', '(unset: each randomized test runs its fixed seeds)')}"


def projection_digest(db) -> dict[str, list[tuple]]:
    """Return every projection table's rows, sorted: what 'the same state' means in these tests."""
    return {t: sorted(tuple(r) for r in db.conn.execute(f"SELECT * FROM {t}")) for t in clare.PROJECTION_TABLES}


def seeds(n: int, salt: str) -> list[int]:
    """Return the seeds of a randomized test: CLARE_SEED alone when set, else n fixed ones."""
    if os.environ.get("CLARE_SEED"):
        return [int(os.environ["CLARE_SEED"])]
    rng = random.Random(salt)
    return [rng.randrange(2**32) for _ in range(n)]


@dataclass
class Reply:
    status: int
    headers: dict  # names lowercased
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


class Served:
    """A live Clare server on 127.0.0.1 and a small HTTP client for it."""

    def __init__(self, server, token):
        self.server = server
        self.config = server.config
        self.port = server.config.port
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token

    def request(self, method: str, path: str, *, json_body=None, body: bytes | None = None,
                headers: dict | None = None, auth: bool = True, timeout: float = 10) -> Reply:
        """Send one request on a fresh connection; the token goes along unless auth=False."""
        import http.client

        hdrs = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        if auth and self.token:
            hdrs.setdefault("Authorization", f"Bearer {self.token}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def form(self, path: str, fields: dict, *, csrf: bool = True, headers: dict | None = None) -> Reply:
        """Post an urlencoded form as the dashboard's htmx would."""
        from urllib.parse import urlencode

        hdrs = {"Content-Type": "application/x-www-form-urlencoded", "HX-Request": "true", **(headers or {})}
        if csrf:
            hdrs["X-CSRF-Token"] = self.config.csrf_token
        return self.request("POST", path, body=urlencode(fields).encode(), headers=hdrs)


@pytest.fixture
def serve(home, db):
    """Start Clare servers on 127.0.0.1 port 0 (serve_forever in a daemon thread); stop them at teardown."""
    import threading

    started = []

    def start(*, token: str | None = None, timeout_s: float = clare.REQUEST_TIMEOUT_S,
              deadline_s: float = clare.REQUEST_DEADLINE_S, max_threads: int = clare.MAX_HANDLER_THREADS,
              allowed_hosts: tuple = ()) -> Served:
        if allowed_hosts:
            (home / "clare.toml").write_text(f"allowed_hosts = {json.dumps(list(allowed_hosts))}\n")
        config = clare.web_config(clare.resolve_paths(), host="127.0.0.1", port=0,
                                  env={"CLARE_TOKEN": token} if token else {})
        server = clare.make_server(clare.record_replace(config, timeout_s=timeout_s, deadline_s=deadline_s,
                                                        max_threads=max_threads))
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread))
        start.served.append(Served(server, server.config.token))  # every bind has a token: made unless given
        return start.served[-1]

    start.served = []  # what the test started, newest last: the browser fixtures log in to them
    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def server(serve) -> Served:
    """A live Clare server on 127.0.0.1 with the token it made; requests send it unless auth=False."""
    return serve()


FAKE_CLAUDE = ROOT / "tests" / "fake_claude.py"


@pytest.fixture
def nodes(tmp_path):
    """Make simulated hosts on demand (test_sync's Node: a real SQLite file, a clock of its own); close them after."""
    from test_sync import Node

    made = []

    def make(name: str, **kw) -> Node:
        made.append(Node(tmp_path, name, **kw))
        return made[-1]
    yield make
    for n in made:
        n.db.close()


def wait_for(predicate, *, timeout: float = 10.0, what: str = "a condition", explain=None):
    """Poll `predicate` until it returns a truthy value (returned) or the deadline passes (fail; with
    `explain()`'s text, what the test can show of why, such as the screens)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}" + (f"; {explain()}" if explain else ""))
        time.sleep(0.05)


def serving_url(proc: subprocess.Popen, name: str, *, timeout: float = 20) -> str:
    """Read a starting `clare serve`'s stdout until it says where it serves; return that URL."""
    import selectors
    import time

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=deadline - time.monotonic()):
            line = proc.stdout.readline()
            assert line, f"clare serve of {name} exited: {proc.stderr.read()}"
            if line.startswith("clare: serving "):
                return line.split()[2].rstrip("/")
    pytest.fail(f"clare serve of {name} did not start in time")


class TmuxServer:
    """A private tmux server (own TMUX_TMPDIR, own -L name, no config) for one test."""

    def __init__(self, tmpdir: Path, name: str, claude_dir: Path):
        self.tmpdir, self.name, self.claude_dir = tmpdir, name, claude_dir
        self.socket = str(tmpdir / f"tmux-{os.getuid()}" / name)

    def run(self, *args: str, input: str | None = None, check: bool = True) -> str:
        p = subprocess.run(["tmux", "-L", self.name, "-f", "/dev/null", *args], input=input,
                           capture_output=True, text=True, timeout=10)
        if check and p.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def spawn(self, *command: str, cwd: Path, name: str, env: dict | None = None) -> str:
        """Start `command` (argv) in a new tmux session; return its pane id."""
        cwd.mkdir(parents=True, exist_ok=True)
        flags = [f for k, v in (env or {}).items() for f in ("-e", f"{k}={v}")]
        return self.run("new-session", "-d", "-s", name, "-x", "120", "-y", "40", "-c", str(cwd), *flags,
                        "-P", "-F", "#{pane_id}", *command).strip()

    def spawn_claude(self, *args: str, cwd: Path, name: str, env: dict | None = None) -> str:
        """Start the fake Claude as `claude` in a new tmux session; wait until it draws; return its pane."""
        import shlex
        line = f"exec -a claude {shlex.quote(sys.executable)} {shlex.quote(str(FAKE_CLAUDE))} " + shlex.join(args)
        pane = self.spawn("bash", "-c", line, cwd=cwd, name=name, env=env)
        wait_for(lambda: "fake claude" in self.capture(pane), what=f"fake claude to start in {pane}")
        return pane

    def capture(self, pane: str) -> str:
        return self.run("capture-pane", "-p", "-J", "-t", pane, check=False)

    def type_prompt(self, pane: str, text: str) -> None:
        """Type a prompt and Enter, as a user would."""
        self.run("send-keys", "-t", pane, "-l", text)
        wait_for(lambda: text in self.capture(pane), what=f"{text!r} to show in {pane}")
        self.run("send-keys", "-t", pane, "Enter")

    def wait_settled(self, n: int) -> None:
        """Wait until the fake Claudes have fully handled n submits in all (transcript, registry, hooks)."""
        path = self.claude_dir / "fake-settled.txt"
        wait_for(lambda: path.exists() and len(path.read_text().splitlines()) >= n, what=f"{n} submits handled")

    def received(self) -> list[dict]:
        path = self.claude_dir / "fake-received.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def tmux(home, monkeypatch):
    """A private tmux server; Clare finds it through TMUX_TMPDIR as tmux itself would."""
    import tempfile
    import uuid
    require_program("tmux", "apt-get install tmux (.ci/run does it)")
    # A socket path must fit in 108 bytes: pytest's tmp_path can be longer.
    tmpdir = Path(tempfile.mkdtemp(prefix="clare-tmux-"))
    monkeypatch.setenv("TMUX_TMPDIR", str(tmpdir))
    claude_dir = Path(os.environ["HOME"]) / ".claude"
    claude_dir.mkdir(parents=True, exist_ok=True)
    server = TmuxServer(tmpdir, f"t{uuid.uuid4().hex[:8]}", claude_dir)
    yield server
    server.run("kill-server", check=False)
    shutil.rmtree(tmpdir, ignore_errors=True)


def observe(db, session_ids, *, now_ms: int, cwd: str = "/srv/app", state: str = "waiting"):
    """Record that these Claude sessions (and no others) run on the db's host, as `pull` would.

    An item is a session id, or a dict of Observation fields (session_id, state, label, cwd...) for that one.
    """
    seen = []
    for i, item in enumerate(session_ids):
        fields = {"session_id": item} if isinstance(item, str) else dict(item)
        seen.append(clare.Observation(**{
            "cwd": cwd, "tmux_socket": None, "tmux_target": f"main:{i}.0", "pane_id": f"%{i}", "pid": None,
            "command": "claude", "state": state, "last_activity_ms": now_ms, "label": "", "tokens": {}, **fields}))
    return clare.observe_sessions(db, seen, now_ms=now_ms)



@pytest.fixture
def fake_server():
    """Start raw servers on 127.0.0.1 port 0 that answer every request with fixed bytes, then close."""
    import socket
    import threading

    started = []

    def start(answer: bytes) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.1)
        stop = threading.Event()

        def loop():
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except (TimeoutError, OSError):
                    continue
                with conn:
                    conn.settimeout(5)
                    head = b""
                    while b"\r\n\r\n" not in head and len(head) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                    conn.sendall(answer)
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        started.append((listener, stop, thread))
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for listener, stop, thread in started:
        stop.set()
        thread.join(5)
        listener.close()
