"""The stylesheet: served from memory as /static/clare.css, so no page needs inline CSS and the
Content-Security-Policy allows styles from 'self' only."""

import hashlib
import re

import clare
from conftest import observe

STYLE_ATTR = re.compile(r"<[^>]*\sstyle\s*=", re.I)


def _seed(db):
    clare.create_project(db, "alpha", goal="ship v1", now_ms=1)
    t = clare.create_task(db, "alpha", "write the parser", priority=1, now_ms=2)
    observe(db, ["7c1e9b22-0000-4000-8000-000000000001"], now_ms=3)
    clare.assign_task(db, t.id, session_id="7c1e9b22", now_ms=4)
    clare.post_update(db, "tokens done", task_ref=t.id, now_ms=5)
    return t


def _filled(pattern: str, values: dict) -> str:
    return re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: values[m[1]], pattern).replace("\\", "")


def test_no_response_carries_inline_css_and_the_policy_has_no_unsafe_inline(server, db):
    t = _seed(db)
    values = {"project": "alpha", "task": t.id[:8], "broadcast": "0" * 32, "name": "clare.css", "day": "2026-01-01",
              "group": "no-such-group", "session": "7c1e9b22"}
    paths = [_filled(rx.pattern, values) for method, rx, _ in clare.ROUTES if method == "GET"]
    paths += ["/no/such/page", "/api/v1/no-such-thing", "/broadcast?target=alpha", "/login?token=wrong"]
    assert len(paths) > 30
    for path in paths:
        r = server.request("GET", path)
        policy = r.headers["content-security-policy"]
        assert "'unsafe-inline'" not in policy and "style-src 'self';" in policy, path
        assert not STYLE_ATTR.search(r.text), (path, STYLE_ATTR.search(r.text))
        assert "<style" not in r.text.lower() or path.startswith("/static/"), path


def test_the_stylesheet_is_served_from_memory_under_its_hash_for_a_year(server, db):
    page = server.request("GET", "/").text
    [href] = re.findall(r'<link rel="stylesheet" href="([^"]+)">', page)
    css = server.request("GET", href)
    assert css.status == 200 and css.headers["content-type"] == "text/css; charset=utf-8"
    assert css.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert css.body == clare.STYLESHEET.encode()
    assert href == f"/static/clare.css?v={hashlib.sha256(css.body).hexdigest()[:12]}"
    error_page = server.request("GET", "/no/such/page")
    assert error_page.status == 404 and f'href="{href}"' in error_page.text
