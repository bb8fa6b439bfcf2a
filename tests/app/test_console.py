"""/console: the page and its files come from the package, open, under a strict Content-Security-Policy."""

import re

from fastapi.testclient import TestClient

from app.console.router import ASSETS
from tests.app.problems import assert_problem


def test_the_page_and_every_file_it_names_are_served_without_a_key(anonymous_client: TestClient) -> None:
    page = anonymous_client.get("/console")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    named = re.findall(r'(?:src|href)="/console/([^"]+)"', page.text)
    assert "main.js" in named and "console.css" in named
    for name in named:
        response = anonymous_client.get(f"/console/{name}")
        assert response.status_code == 200, name
    # Every module the scripts import is shipped too.
    for name in [n for n in ASSETS if n.endswith(".js")]:
        for imported in re.findall(r'from "\./([^"]+)"', anonymous_client.get(f"/console/{name}").text):
            assert imported in ASSETS, (name, imported)


def test_responses_carry_a_strict_policy_and_the_page_has_no_inline_script(
    anonymous_client: TestClient,
) -> None:
    for path in ("/console", "/console/main.js", "/console/console.css"):
        policy = anonymous_client.get(path).headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy
        assert "unsafe-inline" not in policy and "http" not in policy
    page = anonymous_client.get("/console").text
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page), "inline script"
    assert not re.search(r"\son[a-z]+=", page), "inline event handler"
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page


def test_no_other_file_is_reachable(anonymous_client: TestClient) -> None:
    for name in ("router.py", "__init__.py", "missing.js", ".console.css"):
        assert_problem(anonymous_client.get(f"/console/{name}"), 404, "unknown-console-file")
    assert anonymous_client.get("/console/..%2Frouter.py").status_code == 404
