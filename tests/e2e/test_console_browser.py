"""The console in a real browser (Debian's headless Chromium, driven by Playwright) against `magtune up`, the
embedded default, with the shared CMU faces: a reviewer labels pairs with the keyboard and undoes one, the
feedback rows follow; a key without jobs:write sees no job controls; the page asks nothing of another host.
On PostgreSQL + Redis: a fine-tune started from the Jobs page is followed to its end by its event stream,
and the Models page activates its model and rolls back, while a key without models:activate sees no button.
Screenshots of each page are saved under a folder the test prints."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require
from tests.e2e.conftest import start_api
from tests.e2e.flow import (
    activate,
    ok,
    register_model,
    seed_and_activate,
    seed_over_http,
    wait_embedded,
    wait_for_success,
)
from tests.e2e.services import RunningApi, client_with_key
from tests.keys import issue_test_key

pytestmark = pytest.mark.slow

PEOPLE = 8
IMAGES_PER_PERSON = 4
LABELS = 10
REVIEWER_SCOPES = ["review", "feedback:write", "faces:read"]


@pytest.fixture
def browser() -> Iterator[Any]:
    executable = shutil.which("chromium")
    require(executable is not None, "no chromium executable (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright package is not installed (pip install -e '.[test]')")
        raise
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = tmp_path / "console-screenshots"
    folder.mkdir()
    print(f"console screenshots: {folder}")
    return folder


def _upload_cmu(http: httpx.Client, shared_dir: Path) -> dict[str, dict[str, Any]]:
    root = shared_dir / "data" / "faces" / "cmu" / "aligned_112"
    require(root.is_dir(), f"no CMU faces under {root}")
    faces: dict[str, dict[str, Any]] = {}
    for person in sorted(path.name for path in root.iterdir() if path.is_dir())[:PEOPLE]:
        for image in sorted((root / person).glob("*.png"))[:IMAGES_PER_PERSON]:
            files = {"file": ("face.png", image.read_bytes(), "image/png")}
            face = ok(http.post("/v1/faces", files=files, data={"subject": person}), 200, 201)
            faces[face["id"]] = face
    return faces


def _issue(http: httpx.Client, name: str, scopes: list[str]) -> str:
    return ok(http.post("/v1/keys", json={"name": name, "scopes": scopes}), 201)["key"]


def _open_console(browser: Any, url: str, key: str, requests: list[str]) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.on("request", lambda request: requests.append(request.url))
    page.goto(f"{url}/console")
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#nav:not([hidden])")
    return page


def _feedback(http: httpx.Client) -> dict[str, dict[str, Any]]:
    return {item["id"]: item for item in ok(http.get("/v1/feedback", params={"limit": 200}), 200)["items"]}


def test_review_with_the_keyboard_and_scoped_controls(
    start_up: Callable[[Path], RunningApi],
    tmp_path: Path,
    shared_dir: Path,
    mobilefacenet_checkpoint: Path,
    browser: Any,
    screenshots: Path,
) -> None:
    up = start_up(tmp_path / "data")
    assert up.admin_key is not None
    requests: list[str] = []
    with client_with_key(up.url, up.admin_key) as http:
        model = register_model(http, mobilefacenet_checkpoint, "mobilefacenet")
        wait_for_success(http, activate(http, model["id"], "base")["reindex_job_id"])
        faces = _upload_cmu(http, shared_dir)
        wait_embedded(http, list(faces))

        reviewer_key = _issue(http, "reviewer", REVIEWER_SCOPES)
        page = _open_console(browser, up.url, reviewer_key, requests)
        assert page.is_visible("nav button[data-page=review]")
        assert not page.is_visible("nav button[data-page=jobs]"), "the key cannot read jobs"
        page.wait_for_selector("#review-pair:not([hidden])")
        page.screenshot(path=str(screenshots / "review.png"))

        for given in range(1, LABELS + 1):
            face_a, face_b = page.get_attribute("#review-pair", "data-pair").split()
            same = faces[face_a]["subject"] == faces[face_b]["subject"]
            page.keyboard.press("s" if same else "d")
            page.wait_for_function(
                "n => document.getElementById('review-count').textContent === String(n)", arg=given
            )
            page.wait_for_selector("body[data-busy=false]")
        stored = _feedback(http)
        assert len(stored) == LABELS
        assert {item["source"] for item in stored.values()} == {"review"}
        for item in stored.values():
            same = faces[item["face_a"]]["subject"] == faces[item["face_b"]]["subject"]
            assert item["label"] == int(same)

        shown_before_undo = page.get_attribute("#review-pair", "data-pair")
        page.keyboard.press("u")
        page.wait_for_function(
            "n => document.getElementById('review-count').textContent === String(n)", arg=LABELS - 1
        )
        page.wait_for_selector("body[data-busy=false]")
        after_undo = _feedback(http)
        assert len(after_undo) == LABELS - 1 and set(after_undo) < set(stored)
        (retracted,) = set(stored) - set(after_undo)
        undone = {stored[retracted]["face_a"], stored[retracted]["face_b"]}
        assert set(page.get_attribute("#review-pair", "data-pair").split()) == undone, "offered again"
        assert page.get_attribute("#review-pair", "data-pair") != shown_before_undo

        page.keyboard.press("k")  # skip the re-offered pair: nothing is stored
        page.wait_for_selector("body[data-busy=false]")
        assert set(page.get_attribute("#review-pair", "data-pair").split()) != undone
        assert len(_feedback(http)) == LABELS - 1

        # The lease of the pair on screen ends meanwhile (as an expired one would; only its holder, the
        # reviewer's key, may release it): the answer is kept, posted without the lease.
        lease = page.get_attribute("#review-pair", "data-lease")
        face_a, face_b = page.get_attribute("#review-pair", "data-pair").split()
        with client_with_key(up.url, reviewer_key) as reviewer:
            assert reviewer.delete(f"/v1/review/leases/{lease}").status_code == 204
        page.keyboard.press("d")
        page.wait_for_function(
            "n => document.getElementById('review-count').textContent === String(n)", arg=LABELS
        )
        kept = [
            item for item in _feedback(http).values() if {item["face_a"], item["face_b"]} == {face_a, face_b}
        ]
        assert [(item["label"], item["source"]) for item in kept] == [(0, "console")]
        assert "kept" in page.inner_text("#review-status")

        # Faces: the grid of one subject, all embedded; a click shows the nearest faces with scores.
        page.click("nav button[data-page=faces]")
        subject = next(iter(faces.values()))["subject"]
        page.fill("#faces-form input[name=subject]", subject)
        page.click("#faces-form button[type=submit]")
        page.wait_for_function(
            "n => document.querySelectorAll('#faces-grid .tile').length === n", arg=IMAGES_PER_PERSON
        )
        tiles = page.query_selector_all("#faces-grid .tile")
        assert {faces[t.get_attribute("data-face")]["subject"] for t in tiles} == {subject}
        assert {t.get_attribute("data-embedded") for t in tiles} == {"true"}
        clicked = tiles[0].get_attribute("data-face")
        tiles[0].click()
        page.wait_for_selector("#faces-nearest .tile")
        near = page.query_selector_all("#faces-nearest .tile")
        assert clicked not in {t.get_attribute("data-face") for t in near}
        assert all(t.get_attribute("data-face") in faces for t in near)
        assert "·" in near[0].inner_text()
        page.screenshot(path=str(screenshots / "faces.png"))

        # A key that reads jobs but may not write them: the list, without start or cancel controls.
        ok(http.post("/v1/jobs", json={"kind": "evaluate", "params": {"split": "val"}}), 202)
        reader = _open_console(
            browser, up.url, _issue(http, "watcher", ["jobs:read", "metrics:read"]), requests
        )
        reader.click("nav button[data-page=jobs]")
        reader.wait_for_selector("#jobs-table tbody tr")
        assert not reader.is_visible("#finetune-form")
        assert reader.locator("button.cancel").count() == 0
        reader.screenshot(path=str(screenshots / "jobs.png"))
        reader.click("nav button[data-page=dashboard]")
        reader.wait_for_selector("#dashboard .card")
        reader.screenshot(path=str(screenshots / "dashboard.png"))

        operator = _open_console(
            browser, up.url, _issue(http, "operator", ["jobs:read", "jobs:write"]), requests
        )
        operator.wait_for_selector("#jobs-table tbody tr")
        assert operator.is_visible("#finetune-form")

    assert requests, "the browser's network log is empty"
    # Face images are shown as object URLs of this origin (blob:<origin>/...); anything else is elsewhere.
    elsewhere = [url for url in requests if not url.removeprefix("blob:").startswith(f"{up.url}/")]
    assert elsewhere == [], "requests to another host"
    assert any(url.startswith(f"{up.url}/v1/faces/") for url in requests), "images came through the api"


def test_a_finetune_started_from_the_jobs_page_is_followed_through_its_event_stream(
    service_settings: dict[str, str],
    launch: Callable[..., Any],
    start_worker: Callable[[], Any],
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
    browser: Any,
    screenshots: Path,
) -> None:
    """On PostgreSQL + Redis: the operator starts a 1-epoch fine-tune; its row moves to succeeded with its
    per-epoch figures, fed by the event stream alone (no request re-reads the job)."""
    api = start_api(launch, service_settings)
    start_worker()
    admin_key = issue_test_key(service_settings["MAGTUNE_DATABASE_URL"])
    requests: list[str] = []
    with client_with_key(api.url, admin_key) as http:
        seed_and_activate(http, seed_over_http(http, johns_dir), mobilefacenet_checkpoint)
        page = _open_console(
            browser, api.url, _issue(http, "operator", ["jobs:read", "jobs:write"]), requests
        )
    page.wait_for_selector("#finetune-form:not([hidden])")
    page.fill("#finetune-form input[name=epochs]", "1")
    page.uncheck("#finetune-form input[name=auto_promote]")
    page.click("#finetune-form button[type=submit]")
    row = page.wait_for_selector("#jobs-table tr[data-kind=finetune]")
    job_id = row.get_attribute("data-job")
    done = page.wait_for_selector(
        f"#jobs-table tr[data-job='{job_id}']:is([data-status=succeeded], [data-status=failed])",
        timeout=600_000,
    )
    page.screenshot(path=str(screenshots / "jobs-finetune.png"))
    assert done.get_attribute("data-status") == "succeeded", page.inner_text("#jobs-table")
    assert "running" in done.get_attribute("data-seen").split()
    phases = set(done.get_attribute("data-phases").split())
    assert "train" in phases and len(phases) >= 3, phases  # the steps, then saving, evaluating, ...
    assert done.query_selector("svg.chart polyline.val") is not None, "the val loss per epoch is charted"
    assert done.query_selector("svg.chart polyline.loss") is not None
    assert done.query_selector("button.cancel") is None

    api_calls = [url.removeprefix(api.url) for url in requests if url.startswith(f"{api.url}/v1/")]
    assert f"/v1/jobs/{job_id}/events" in api_calls
    assert not [call for call in api_calls if call.startswith(f"/v1/jobs/{job_id}") and "events" not in call]
    assert api_calls.count("/v1/jobs?limit=25") == 1, "the list is read once, not polled"

    # Models: activate the fine-tuned child, then roll back to its parent, each after a confirmation naming
    # the model in service; the activation log shows both.
    with client_with_key(api.url, admin_key) as http:
        child = ok(http.get(f"/v1/jobs/{job_id}"), 200)["result"]["model_id"]
        base = ok(http.get("/v1/models/active"), 200)["id"]
        modeller_key = _issue(http, "modeller", ["models:read", "models:activate", "jobs:read"])
        viewer_key = _issue(http, "viewer", ["models:read"])
    models = _open_console(browser, api.url, modeller_key, requests)
    dialogs: list[str] = []
    models.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    models.click("nav button[data-page=models]")
    models.wait_for_selector(f"li[data-model='{base}'][data-active=true]")
    gate = models.wait_for_selector(f"li[data-model='{child}'] > .gate > div")
    assert gate.inner_text().startswith("gate: "), "the child's gate decision is shown"
    models.click(f"li[data-model='{child}'] > .model button.activate")
    models.wait_for_selector(f"li[data-model='{child}'][data-active=true]")
    models.wait_for_selector(f"#activations-table tbody tr[data-model='{child}']")
    models.click(f"li[data-model='{base}'] > .model button.activate")
    models.wait_for_selector(f"li[data-model='{base}'][data-active=true]")
    log = [
        row.get_attribute("data-model") for row in models.query_selector_all("#activations-table tbody tr")
    ]
    assert log[:3] == [base, child, base], log
    assert len(dialogs) == 2 and "replaces" in dialogs[0] and "replaces" in dialogs[1]
    with client_with_key(api.url, admin_key) as http:
        names = {m["id"]: m["name"] or m["id"][:8] for m in ok(http.get("/v1/models"), 200)["items"]}
        assert names[base] in dialogs[0] and names[child] in dialogs[1], dialogs
        assert ok(http.get("/v1/models/active"), 200)["id"] == base
    models.screenshot(path=str(screenshots / "models.png"))

    viewer = _open_console(browser, api.url, viewer_key, requests)
    viewer.wait_for_selector(f"li[data-model='{child}']")
    assert viewer.locator("button.activate").count() == 0
    with client_with_key(api.url, viewer_key) as forced:
        refused = forced.post(f"/v1/models/{child}/activate", json={"reason": "forced"})
    assert (refused.status_code, refused.json()["type"].rsplit("/", 1)[-1]) == (403, "insufficient-scope")
    assert not [url for url in requests if not url.removeprefix("blob:").startswith(f"{api.url}/")]
