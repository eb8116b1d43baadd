"""Each service is declared once (a Services method with its @api or @here): the remote client, the
JSON handlers and the OpenAPI entries are derived from it, with the same signature everywhere."""

import inspect
import re
import subprocess
import sys

import pytest

import clare
from conftest import ROOT, require

NAMES = list(clare.SERVICE_APIS)


def _params(fn, *, skip=()) -> list[tuple]:
    return [(p.name, p.kind, p.default, p.annotation) for p in inspect.signature(fn).parameters.values()
            if p.name not in skip]


@pytest.mark.parametrize("name", NAMES)
def test_a_service_its_remote_twin_and_its_function_have_one_signature(name):
    local, remote = getattr(clare.Services, name), getattr(clare.RemoteServices, name)
    assert inspect.signature(local) == inspect.signature(remote)
    assert inspect.signature(local).return_annotation == inspect.signature(getattr(clare, name)).return_annotation
    assert _params(local, skip=("self",)) == _params(getattr(clare, name), skip=("db", "now_ms")), \
        f"Services.{name} drifted from {name}()"


@pytest.mark.parametrize("name", NAMES)
def test_every_argument_of_a_service_has_a_place_on_the_wire_or_says_why_not(name):
    wires = clare.wire_args(name)
    assert [w.arg for w in sorted(wires, key=lambda w: w.arg)] == \
        sorted(p.name for p in list(inspect.signature(getattr(clare.Services, name)).parameters.values())[1:])
    fn, spec = clare.SERVICE_APIS[name]
    if spec is not None:
        assert sorted(w.name for w in wires if w.where == "path") == sorted(re.findall(r"\{(\w+)\}", spec.path))


def test_services_are_plain_methods_a_reader_and_a_type_checker_can_follow():
    assert "__getattr__" not in vars(clare.Services) and "__getattr__" not in vars(clare.RemoteServices)
    assert {n for n, v in vars(clare.Services).items() if callable(v) and not n.startswith("_")} == set(NAMES)


@pytest.mark.parametrize("name", [n for n, (_, spec) in clare.SERVICE_APIS.items() if spec is None])
def test_a_service_of_this_host_only_is_refused_remotely_in_one_line(name):
    remote = clare.RemoteServices("http://127.0.0.1:9")
    params = list(inspect.signature(getattr(clare.Services, name)).parameters.values())[1:]
    args = {p.name: None for p in params if p.default is p.empty}
    with pytest.raises(clare.UsageError, match=f"^{name} works on this host only .* without --remote"):
        getattr(remote, name)(**args)


def test_a_routed_service_answers_over_http_exactly_what_it_returns_locally(serve, db):
    server = serve()
    remote = clare.RemoteServices(server.url, token=server.token)
    local = clare.Services(db)
    project = remote.create_project("alpha", goal="ship")
    task = remote.create_task("alpha", "parse", priority=1, tags=["lexer"])
    assert local.get_task(task.id) == task == remote.get_task(task.id[:8])
    assert remote.edit_task(task.id, title="parse v2", untags=["lexer"]) == local.get_task(task.id)
    assert remote.list_tasks(project_id=project.id, is_open=True, priorities=(0, 1)) == local.list_tasks(
        project_id=project.id, is_open=True, priorities=(0, 1))
    assert remote.list_updates(task_ids=[]) == []
    assert [e.uuid for e in remote.project_history(project)] == [e.uuid for e in local.project_history(project)]
    assert remote.count_events() == local.count_events() == len(remote.list_events(limit=5000))
    assert remote.get_status() == local.get_status()


def test_the_type_checker_resolves_a_service_call_to_its_result(tmp_path):
    try:
        import mypy
    except ImportError:
        mypy = None
    require(mypy is not None, "mypy", "pip install -r requirements-dev.txt")
    probe = tmp_path / "probe.py"
    probe.write_text("import clare\n\n\ndef f(ctx: clare.Context, req: clare.Request) -> None:\n"
                     "    reveal_type(ctx.svc.create_task('alpha', 'parse'))\n"
                     "    reveal_type(req.svc.list_tasks(status='todo'))\n"
                     "    reveal_type(clare.RemoteServices('http://x').get_status())\n")
    p = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--python-version", "3.11",
                        "--follow-imports", "silent", str(probe)], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={"MYPYPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert 'Revealed type is "clare.Task"' in p.stdout, p.stdout + p.stderr
    assert 'Revealed type is "list[clare.Task]"' in p.stdout
    assert 'Revealed type is "clare.StatusReport"' in p.stdout
