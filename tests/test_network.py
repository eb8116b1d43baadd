"""Hosts on a real network: four hosts in their own network namespaces (veth pairs into a bridge
in a fifth, addresses 10.77.0.0/24 inside them only, each with its own host name), set up with
`clare setup`, one on the previous release; peers added while serve runs, discovery, a partition,
kill -9, heal, convergence, and the upgrade by copying clare.py over the old one.

Needs root (network namespaces). Under CI=true a failure to create them fails the run with the reason.
"""

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import clare
from conftest import CLARE_PY, ROOT, Ran, require, wait_for

pytestmark = pytest.mark.slow

RELEASE_COMMIT = "c474a23"  # the release before today's work: tests/data/release-0.1.0.db is its database
PORT = 8765


def _ip(*argv: str) -> None:
    p = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=20)
    if p.returncode != 0:
        raise OSError(f"ip {' '.join(argv)}: {p.stderr.strip()}")


class Net:
    """Network namespaces: a switch (a bridge) and one namespace per host, joined by veth pairs."""

    def __init__(self, tag: str, subnet: str = "10.77.0"):
        self.tag, self.subnet = tag, subnet
        self.switch = f"{tag}sw"
        self.spaces: list[str] = []

    def create(self, n_hosts: int) -> None:
        _ip("netns", "add", self.switch)
        self.spaces.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i in range(1, n_hosts + 1):
            space = f"{self.tag}h{i}"
            _ip("netns", "add", space)
            self.spaces.append(space)
            _ip("-n", self.switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", space)
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"p{i}", "up")
            _ip("-n", space, "addr", "add", f"{self.subnet}.{i}/24", "dev", "eth0")
            _ip("-n", space, "link", "set", "eth0", "up")
            _ip("-n", space, "link", "set", "lo", "up")

    def link(self, i: int, *, up: bool) -> None:
        """Cut host i off the bridge (a partition), or put it back."""
        _ip("-n", self.switch, "link", "set", f"p{i}", "up" if up else "down")

    def destroy(self) -> None:
        for space in reversed(self.spaces):  # deleting a namespace deletes its ends of the veth pairs
            subprocess.run(["ip", "netns", "del", space], capture_output=True, timeout=20)


@contextlib.contextmanager
def namespaces(tag: str, n_hosts: int, subnet: str = "10.77.0"):
    """A Net of n_hosts hosts, removed afterwards; skipped where namespaces cannot be made (failed under CI)."""
    network = Net(tag, subnet)
    try:
        if os.geteuid() != 0:
            raise OSError("not root")
        if shutil.which("unshare") is None:
            raise OSError("no unshare (util-linux) for the hosts' own host names")
        network.create(n_hosts)
    except (OSError, subprocess.SubprocessError) as err:
        network.destroy()
        require(False, "network namespaces", f"they cannot be made here ({err}); run as root with iproute2")
    try:
        yield network
    finally:
        network.destroy()
    assert not [s for s in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if s.startswith(tag)]


@pytest.fixture
def net():
    with namespaces(f"cl{os.getpid() % 100000}", 4) as network:
        yield network


class NetHost:
    """One host: a namespace, a host name (its own UTS namespace), a HOME, a clare.py of some version."""

    def __init__(self, root: Path, net: Net, i: int, name: str, *, script: Path = CLARE_PY):
        self.i, self.name, self.space, self.script = i, name, f"{net.tag}h{i}", script
        self.addr, self.url = f"{net.subnet}.{i}", f"http://{net.subnet}.{i}:{PORT}"
        self.user = root / name
        self.home = self.user / ".config" / "clare"
        self.user.mkdir(parents=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("CLARE_", "XDG_", "TMUX", "CLAUDE_"))}
        self.env.update(HOME=str(self.user), CLARE_SYNCHRONOUS="NORMAL", TMUX_TMPDIR=str(self.user / "tmux"),
                        PATH=f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin")
        self.proc: subprocess.Popen | None = None
        self.served: list[str] = []  # what each serve wrote on stderr

    def argv(self, *argv: str) -> list[str]:
        """The command inside this host's namespace, under its own host name."""
        return ["ip", "netns", "exec", self.space, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.name, *argv]

    def run(self, *argv: str, input: str | None = None, env: dict | None = None) -> Ran:
        p = subprocess.run(self.argv(sys.executable, str(self.script), *argv), capture_output=True, text=True,
                           input=input, env={**self.env, **(env or {})}, timeout=60)
        return Ran(p.returncode, p.stdout, p.stderr)

    def ok(self, *argv: str, **kw) -> Ran:
        ran = self.run(*argv, **kw)
        assert ran.code == 0, f"{self.name}: clare {' '.join(argv)}: {ran.err}"
        return ran

    def serve(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(self.argv(*argv), env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        probe = ["ip", "netns", "exec", self.space, sys.executable, "-c",
                 f"import socket; socket.create_connection(('{self.addr}', {PORT}), timeout=1)"]

        def answers() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name}: serve exited: {self.proc.stderr.read()}")
            return subprocess.run(probe, capture_output=True).returncode == 0
        wait_for(answers, timeout=30, what=f"{self.name}'s serve to listen")

    def stop(self, sig: int = signal.SIGTERM) -> str:
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)  # ip netns exec and unshare exec: the pid is python's
        err = self.proc.communicate(timeout=20)[1]
        self.served.append(err)
        self.proc = None
        return err

    @property
    def db(self) -> Path:
        return self.user / ".local" / "share" / "clare" / "clare.db"

    def events(self) -> dict[str, tuple]:
        """Every stored event by uuid (read straight from the file, as any SQLite reader would)."""
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return {r[0]: r[1:] for r in conn.execute(
                "SELECT uuid, hlc, machine_id, event_type, payload, created_at, hash FROM events")}
        finally:
            conn.close()

    def machine_id(self) -> str:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute("SELECT value FROM meta WHERE key = 'machine_id'").fetchone()[0]
        finally:
            conn.close()


def _unit_serve_argv(host: NetHost) -> list[str]:
    unit = host.user / ".config" / "systemd" / "user" / "clare.service"
    line = next(ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart="))
    return clare._unit_argv(line)


def _hook(host: NetHost, session_id: str) -> None:
    report = json.dumps({"session_id": session_id, "cwd": f"/srv/{host.name}", "hook_event_name": "SessionStart",
                         "transcript_path": f"{host.user}/.claude/projects/x/{session_id}.jsonl", "source": "startup"})
    host.ok("hook", input=report)


def _peers(host: NetHost, *extra: str) -> list[dict]:
    return host.ok("peer", "list", "--json", *extra).json()


def test_four_hosts_on_a_network_one_on_the_previous_release(net, tmp_path):
    old_py = tmp_path / "release" / "clare.py"
    old_py.parent.mkdir()
    old_py.write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{RELEASE_COMMIT}:clare.py"],
                                      capture_output=True, check=True).stdout)
    alpha, beta, gamma = (NetHost(tmp_path, net, i, n) for i, n in ((1, "alpha"), (2, "beta"), (3, "gamma")))
    old = NetHost(tmp_path, net, 4, "oldie", script=old_py)
    hosts = (alpha, beta, gamma, old)
    try:
        # --- setup: alpha alone; beta joins alpha with the token alpha made; gamma talks to the old host only
        alpha.ok("setup", "--bind", alpha.addr, "--port", str(PORT))
        token = _token(alpha)
        beta.ok("setup", "--bind", beta.addr, "--port", str(PORT), "--peer", alpha.url, env={"CLARE_TOKEN": token})
        beta.ok("peer", "add", old.url)
        gamma.ok("setup", "--bind", gamma.addr, "--port", str(PORT), "--peer", old.url, env={"CLARE_TOKEN": token})
        # The previous release: its database is the release fixture; it has no setup.
        old.db.parent.mkdir(parents=True)
        shutil.copyfile(ROOT / "tests" / "data" / "release-0.1.0.db", old.db)
        old.ok("peer", "add", gamma.url, "--name", "gamma")
        for host in hosts:
            with open(host.home / "clare.toml", "a") as f:
                f.write("\n[sync]\ninterval_s = 1\n")
        old.env["CLARE_TOKEN"] = token
        ids = {h.name: h.machine_id() for h in (alpha, beta, gamma)} | {"oldie": "release-0-1-0"}
        assert len(set(ids.values())) == 4 and all(ids[n].startswith(n + "-") for n in ("alpha", "beta", "gamma"))
        release = set(old.events())

        for host in (alpha, beta, gamma):
            host.serve(_unit_serve_argv(host))
        old.serve([sys.executable, str(old_py), "serve", "--host", old.addr, "--port", str(PORT)])

        # --- work on all four, each with a Claude session of its own (reported by a hook)
        sessions = {h.name: str(uuid.uuid4()) for h in hosts}
        for host in hosts:
            _hook(host, sessions[host.name])
            host.ok("project", "new", f"p-{host.name}", *(["--dir", "/srv/alpha"] if host is alpha else []))
            host.ok("task", "add", f"p-{host.name}", f"first task of {host.name}")
        # Today's event types, unknown to the previous release: tags, a removal, a project's folder (above).
        alpha.ok("task", "add", "p-alpha", "tagged", "--tag", "net")
        removed = alpha.ok("task", "add", "p-alpha", "to remove", "--json").json()["id"]
        alpha.ok("task", "rm", removed)

        # --- alpha had no peer: one added while its serve runs is used without a restart
        alpha.ok("peer", "add", beta.url)
        wait_for(lambda: any(r["name"] == "beta" and r["last_ok_ms"] for r in _peers(alpha)), timeout=20,
                 what="alpha's running serve to sync with the peer added after it started")

        # --- relay through the previous release: gamma gets alpha's events only by way of oldie
        new_types = {"host.announced", "task.removed", "project.dir_set"}

        def relayed() -> bool:
            here = gamma.events()
            return all(u in here for u, ev in alpha.events().items() if ev[1] == ids["alpha"])
        wait_for(relayed, timeout=60, what="alpha's events to reach gamma through beta and the old release")
        kept = old.events()
        of_alpha = {u: ev for u, ev in alpha.events().items() if ev[1] == ids["alpha"]}
        assert {ev[2] for ev in of_alpha.values()} >= new_types
        assert all(kept[u] == ev for u, ev in of_alpha.items())  # stored whole by the old release: same hash

        # --- discovery: alpha learns gamma (announced, relayed by beta and oldie) and offers it
        def offered() -> list[dict]:
            return [r for r in _peers(alpha, "--suggested") if r["host"] == ids["gamma"]]
        [offer] = wait_for(offered, timeout=30, what="alpha to offer gamma")
        assert (offer["name"], offer["url"], offer["announced_by"], offer["is_token_shared"]) == \
               ("gamma", gamma.url, ids["gamma"], True)
        assert not [r for r in _peers(alpha, "--suggested") if r["host"] in (ids["beta"], ids["alpha"])]
        added = alpha.ok("peer", "add", "--all-suggested", "--json").json()
        assert [p["name"] for p in added["added"]] == ["gamma"]
        wait_for(lambda: any(r["name"] == "gamma" and r["last_ok_ms"] for r in _peers(alpha)), timeout=20,
                 what="alpha to sync with gamma directly")
        [b_row] = [r for r in _peers(alpha) if r["name"] == "beta"]
        assert b_row["host_name"] == "beta"  # the announced display name, not 10.77.0.2-8765

        # --- partition gamma, work on both sides, kill -9 beta's serve; heal; all converge
        net.link(3, up=False)
        gamma.ok("task", "add", "p-gamma", "written while cut off")
        alpha.ok("task", "add", "p-alpha", "written while gamma was away")
        beta.stop(signal.SIGKILL)
        beta.ok("task", "add", "p-beta", "written while beta's serve was dead")
        time.sleep(2)
        net.link(3, up=True)
        beta.serve(_unit_serve_argv(beta))

        def converged() -> bool:
            sets = [set(h.events()) for h in hosts]
            return all(s == sets[0] for s in sets)
        wait_for(converged, timeout=90, what="all four hosts to hold the same events")
        assert release <= set(alpha.events())  # the release database's events reached everyone
        def nothing_to_move(host: NetHost) -> bool:
            rows = [r for r in _peers(host) if r["is_configured"]]
            return all((r["n_to_push"], r["n_behind"], r["last_error"]) == (0, 0, None) for r in rows)
        for host in hosts[:3]:
            wait_for(lambda h=host: nothing_to_move(h), timeout=30,
                     what=f"{host.name}'s peer list to show nothing left to pull or push")

        # --- each host's fleet events never mark another host's sessions
        for host in (alpha, beta, gamma):
            listed = {s["id"]: s for s in host.ok("sessions", "--all", "--json").json()}
            for other in hosts:
                s = listed[sessions[other.name]]
                assert s["host"] == ids[other.name] and s["state"] != "gone", (host.name, s)
        marks = [ev for ev in alpha.events().values() if ev[2].startswith("session.")]
        assert all(json.loads(ev[3]).get("host", ev[1]) == ev[1] for ev in marks)

        # --- the upgrade: copy the new clare.py over the old one and restart; nothing is lost
        old.stop()
        before = old.events()
        shutil.copyfile(CLARE_PY, old_py)
        old.serve([sys.executable, str(old_py), "serve", "--host", old.addr, "--port", str(PORT)])
        assert old.events().items() >= before.items()
        assert old.ok("task", "show", removed, "--json").json()["removed_at"]  # applied now it knows the type
        assert old.ok("--json", "project", "show", "p-alpha").json()["dirs"][ids["alpha"]] == "/srv/alpha"
        alpha.ok("task", "add", "p-alpha", "after the upgrade")
        wait_for(converged, timeout=60, what="the upgraded host to sync again")
    finally:
        for host in hosts:
            if host.proc is not None:
                host.proc.kill()
                host.stop()


def _token(host: NetHost) -> str:
    import tomllib
    return tomllib.loads((host.home / "clare.toml").read_text())["token"]
