"""The shape of clare.py that STYLE.md fixes: sections, registries, imports, SQL placement."""

import ast
import re
import subprocess
import sys

import clare
from conftest import CLARE_PY

SOURCE = CLARE_PY.read_text()
BANNER = re.compile(r"^# (\d+)\. ([^:]+):", re.M)
SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE FROM|CREATE TABLE|CREATE INDEX|PRAGMA)\b")


def _sections():
    """Return (number, title, first line, last line) for each section banner."""
    found = [(int(m[1]), m[2], SOURCE[:m.start()].count("\n") + 1) for m in BANNER.finditer(SOURCE)]
    total = SOURCE.count("\n") + 1
    return [(n, title, line, found[i + 1][2] - 1 if i + 1 < len(found) else total)
            for i, (n, title, line) in enumerate(found)]


def test_section_banners_match_the_docstring_map():
    banners = [(n, title) for n, title, _, _ in _sections()]
    listed = [(int(n), t.strip()) for n, t in re.findall(r"^    (\d+)\. (.+)$", clare.__doc__, re.M)]
    assert banners == listed
    assert [n for n, _ in banners] == list(range(1, 11))


def test_sql_lives_only_in_the_store_and_projections():
    lines = SOURCE.splitlines()
    for n, title, first, last in _sections():
        if n in (3, 4):
            continue
        for i in range(first - 1, min(last, len(lines))):
            line = lines[i]
            if SQL.search(line) and not line.lstrip().startswith("#"):
                raise AssertionError(f"SQL in section {n} ({title}), line {i + 1}: {line.strip()}")


def test_runtime_imports_are_standard_library_only():
    tree = ast.parse(SOURCE)
    names = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
             for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in (n.names if isinstance(n, ast.Import) else [n])}
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


def test_importing_clare_has_no_side_effects(tmp_path):
    code = "import clare, threading, logging; assert threading.active_count() == 1; " \
           "assert not logging.getLogger().handlers"
    env = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "d"), "PYTHONPATH": str(CLARE_PY.parent)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, timeout=30)
    assert list(tmp_path.iterdir()) == []


def test_cli_startup_does_not_import_the_web_stack(tmp_path):
    code = ("import sys, clare; clare.main(['--home', sys.argv[1], 'task', 'list']); "
            "heavy = {'http.server', 'urllib.request', 'email', 'socketserver'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=30,
                   env={"PYTHONPATH": str(CLARE_PY.parent), "HOME": str(tmp_path)})


def test_every_public_function_has_a_one_line_docstring():
    tree = ast.parse(SOURCE)
    top = [*tree.body, *(m for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body)]
    missing = [f.name for f in top if isinstance(f, ast.FunctionDef)
               and not f.name.startswith("_") and not ast.get_docstring(f)]
    assert not missing, missing


def test_every_event_type_made_has_an_applier_and_a_description():
    made = set(re.findall(r'record\(db, cur, "([a-z_.]+)"', SOURCE))
    assert made <= set(clare.APPLIERS), made - set(clare.APPLIERS)
    assert made <= set(clare.DESCRIBE), made - set(clare.DESCRIBE)


def test_file_ends_with_the_main_guard():
    assert SOURCE.rstrip().endswith('if __name__ == "__main__":\n    raise SystemExit(main())')
    assert SOURCE.startswith("#!/usr/bin/env python3\n")


# --- layering: a name used in section N is defined in a section <= N ------------------------------

_NEW_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef,
               ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _module_level_loads(node):
    """Yield (name, line) of the names a module-level statement reads in the module's own scope.

    The bodies of functions, lambdas, classes and comprehensions are their own scopes (symtable
    resolves those); what they evaluate at definition time (decorators, defaults, annotations,
    bases, a comprehension's first iterable) is read here.
    """
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = node.args
        parts = [*a.defaults, *(d for d in a.kw_defaults if d is not None)]
        if not isinstance(node, ast.Lambda):
            parts += [*node.decorator_list, node.returns,
                      *(x.annotation for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x)]
        for part in parts:
            if part is not None:
                yield from _module_level_loads(part)
    elif isinstance(node, ast.ClassDef):
        for part in (*node.decorator_list, *node.bases, *(k.value for k in node.keywords)):
            yield from _module_level_loads(part)
    elif isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
        yield from _module_level_loads(node.generators[0].iter)
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
        yield node.id, node.lineno
    else:
        for child in ast.iter_child_nodes(node):
            yield from _module_level_loads(child)


def upward_references(source: str) -> list[tuple[str, int, int, int]]:
    """Return (name, line of use, section of use, section of definition) for each name used above its section.

    Globals are told from locals, parameters and closures by symtable: a local that happens to
    share a later global's name is not a reference to it.
    """
    import symtable

    starts = [(source[:m.start()].count("\n") + 1, int(m[1])) for m in BANNER.finditer(source)]

    def section(line: int) -> int:
        return max((n for start, n in starts if start <= line), default=0)

    tree = ast.parse(source)
    defined: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [(a.asname or a.name).split(".")[0] for a in node.names]
        else:
            names = []
        for name in names:
            defined.setdefault(name, node.lineno)
    uses = [use for stmt in tree.body for use in _module_level_loads(stmt)]

    def scope_uses(table):
        for child in table.get_children():
            uses.extend((s.get_name(), child.get_lineno()) for s in child.get_symbols()
                        if s.is_referenced() and s.is_global())
            scope_uses(child)
    scope_uses(symtable.symtable(source, "clare.py", "exec"))
    return sorted({(name, line, section(line), section(defined[name])) for name, line in uses
                   if name in defined and section(defined[name]) > section(line)})


def test_each_section_uses_only_names_of_the_sections_above_it_or_its_own():
    assert upward_references(SOURCE) == []


def test_the_layering_check_finds_upward_uses_and_ignores_locals():
    source = "\n".join([
        "# 1. Low: the bottom.", "def low(x):", "    total = 0", "    HIGH = 1", "    return HIGH + total",
        "class Rec:", "    kind: 'str' = 'x'", "    size = HIGH_SIZE", "TABLE = [high() for _ in range(2)]",
        "SQUARES = [HIGH for HIGH in range(3)]",
        "def uses_later(): return high()",
        "# 2. High: the top.", "HIGH = 2", "HIGH_SIZE = 3", "def high(): return low(HIGH)", ""])
    found = {(name, used, defined) for name, _, used, defined in upward_references(source)}
    assert found == {("HIGH_SIZE", 1, 2), ("high", 1, 2)}, found


def test_only_local_commands_open_the_database_directly():
    """LOCAL_COMMANDS is the one statement of what refuses --remote: a handler outside it never uses ctx.db."""
    tree = ast.parse(SOURCE)
    uses_db = {f.name for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("cmd_")
               and any(isinstance(n, ast.Attribute) and n.attr == "db" and isinstance(n.value, ast.Name)
                       and n.value.id == "ctx" for n in ast.walk(f))}
    local = {c.handler.__name__ for c in clare.COMMANDS if c.path in clare.LOCAL_COMMANDS}
    assert uses_db and uses_db <= local, uses_db - local
