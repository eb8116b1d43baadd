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
