"""The console in a real browser (Debian's headless Chromium, driven by Playwright).

Against one `magtune up` for the module (the embedded default) with the shared CMU faces: a reviewer labels
pairs with the keyboard and undoes one, the feedback rows follow; the faces grid shows each face embedded,
with its quality, and its nearest faces; a key without jobs:write sees no job controls; the dashboard draws
what /v1/metrics and the feedback series hold. On PostgreSQL + Redis: a fine-tune started from the Jobs page
is followed to its end by its event stream, and the Models page draws its ROC against its parent's,
activates it and rolls back, while a key without models:activate sees no button. No page asks anything of
another host. Screenshots of each page are saved under a folder the test prints.

The module starts its stacks once and keeps the fine-tune small (pairs within one split each, so that none
is placed elsewhere), so the whole file stays within a few minutes on two cores.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require
from tests.e2e.conftest import SERVICES, Launcher, quick_timing, start_api, start_up
from tests.e2e.flow import (
    activate,
    ok,
    read_pairs,
    register_model,
    upload_faces,
    wait_embedded,
    wait_for_success,
)
from tests.e2e.services import RunningApi, client_with_key
from tests.keys import issue_test_key

# One xdist worker takes the whole module: its stacks and browser are started once, for every test in it.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("console-browser")]

PEOPLE = 8
IMAGES_PER_PERSON = 4
LABELS = 10
REVIEWER_SCOPES = ["review", "feedback:write", "faces:read"]
TRAIN_PAIRS = {1: 16, 0: 32}  # three steps of 16: the fine-tune is real, and short
STOP_TIMEOUT_S = 2.0  # stopping politely is tested elsewhere (tests/e2e/test_loop_embedded.py)


@dataclass
class Embedded:
    """The module's `magtune up`, with the base model in service and the CMU faces embedded."""

    api: RunningApi
    admin_key: str
    faces: dict[str, dict[str, Any]]
    launched_at: float  # time.monotonic() when `magtune up` was started
    listening_s: float  # how long it took to print that its api listens


@pytest.fixture(scope="module")
def module_launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path_factory.mktemp("services"), stop_timeout_s=STOP_TIMEOUT_S)
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture(autouse=True)
def _service_logs_on_failure(request: pytest.FixtureRequest, module_launch: Launcher) -> None:
    request.node.stash[SERVICES] = module_launch.started


@pytest.fixture
def quick_launch(
    service_settings: dict[str, str], request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Launcher]:
    """This test's processes on `service_settings` (PostgreSQL + Redis), stopped before its database goes."""
    launcher = Launcher(tmp_path / "services", stop_timeout_s=STOP_TIMEOUT_S)
    request.node.stash[SERVICES] = launcher.started
    try:
        yield launcher
    finally:
        launcher.stop_all()


def _start_embedded(launcher: Launcher, data_dir: Path, shared_dir: Path, checkpoint: Path) -> Embedded:
    launched_at = time.monotonic()
    up = start_up(launcher, quick_timing(), data_dir)
    listening_s = time.monotonic() - launched_at
    assert up.admin_key is not None
    with client_with_key(up.url, up.admin_key) as http:
        faces = _upload_cmu(http, shared_dir)  # first: the activation's reindex embeds them in one job
        model = register_model(http, checkpoint, "mobilefacenet")
        wait_for_success(http, activate(http, model["id"], "base")["reindex_job_id"])
        wait_embedded(http, list(faces))
    return Embedded(up, up.admin_key, faces, launched_at, listening_s)


@pytest.fixture(scope="module", autouse=True)
def embedded_setup(
    browser: Any,  # first: without a browser the module is skipped before anything starts
    module_launch: Launcher,
    tmp_path_factory: pytest.TempPathFactory,
    shared_dir: Path,
    mobilefacenet_checkpoint: Path,
) -> Iterator[Future[Embedded]]:
    """The module's `magtune up`, started and seeded in a thread from the module's first test on, so that
    its minute of setup (mostly waiting on its workers) runs beside the PostgreSQL test."""
    data_dir = tmp_path_factory.mktemp("up") / "data"
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(_start_embedded, module_launch, data_dir, shared_dir, mobilefacenet_checkpoint)


@pytest.fixture(scope="module")
def embedded(embedded_setup: Future[Embedded]) -> Embedded:
    return embedded_setup.result(timeout=600)


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("console-screenshots")
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


def _only_the_api(requests: list[str], url: str) -> None:
    """Nothing went elsewhere: face images are shown as object URLs of this origin (blob:<origin>/...)."""
    assert requests, "the browser's network log is empty"
    elsewhere = [request for request in requests if not request.removeprefix("blob:").startswith(f"{url}/")]
    assert elsewhere == [], "requests to another host"


def _seed_within_splits(http: httpx.Client, johns_dir: Path) -> None:
    """The johns faces, and of their pairs every val and test pair but only `TRAIN_PAIRS` of the train ones,
    each pair within its faces' split: no face is moved, so every pair lands where it is counted."""
    stored = upload_faces(http, johns_dir)
    wanted = dict(TRAIN_PAIRS)
    items, splits = [], []
    for pair in read_pairs(johns_dir):
        a, b = stored[pair.image1], stored[pair.image2]
        if a["split"] != b["split"] or a["id"] == b["id"]:
            continue
        if a["split"] == "train":
            if not wanted[pair.label]:
                continue
            wanted[pair.label] -= 1
        items.append({"face_a": a["id"], "face_b": b["id"], "label": pair.label})
        splits.append(a["split"])
    reply = ok(http.post("/v1/feedback/batch", json={"items": items}), 200)
    assert reply["failed"] == 0, reply
    assert [result["split"] for result in reply["results"]] == splits


def test_a_finetune_started_from_the_jobs_page_is_followed_through_its_event_stream(
    service_settings: dict[str, str],
    quick_launch: Launcher,
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
    browser: Any,
    screenshots: Path,
) -> None:
    """On PostgreSQL + Redis: the operator starts a 1-epoch fine-tune; its row moves to succeeded with its
    per-epoch figures, fed by the event stream alone (no request re-reads the job)."""
    # Two jobs at once: the base's reindex and calibration, then the fine-tune beside whichever is left.
    # The worker boots while the api starts; jobs wait for it in the queue.
    quick_launch("worker", ["worker", "--concurrency", "2"], service_settings)
    api = start_api(quick_launch, service_settings)
    admin_key = issue_test_key(service_settings["MAGTUNE_DATABASE_URL"])
    requests: list[str] = []
    with client_with_key(api.url, admin_key) as http:
        _seed_within_splits(http, johns_dir)
        base_model = register_model(http, mobilefacenet_checkpoint, "mobilefacenet")
        assert activate(http, base_model["id"], "the pretrained base")["reindex_job_id"]
        operator_key = _issue(http, "operator", ["jobs:read", "jobs:write"])
        page = _open_console(browser, api.url, operator_key, requests)
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
    page.close()

    api_calls = [url.removeprefix(api.url) for url in requests if url.startswith(f"{api.url}/v1/")]
    assert f"/v1/jobs/{job_id}/events" in api_calls
    assert not [call for call in api_calls if call.startswith(f"/v1/jobs/{job_id}") and "events" not in call]
    assert api_calls.count("/v1/jobs?limit=25") == 1, "the list is read once, not polled"

    # Models: the child's ROC against its parent's on the same test pairs; activate the child, then roll back
    # to its parent, each after a confirmation naming the model in service; the activation log shows both.
    with client_with_key(api.url, admin_key) as http:
        child = ok(http.get(f"/v1/jobs/{job_id}"), 200)["result"]["model_id"]
        base = ok(http.get("/v1/models/active"), 200)["id"]
        (judged,) = [
            e for e in ok(http.get(f"/v1/models/{child}"), 200)["evaluations"] if e["job_id"] == job_id
        ]
        (parent_judged,) = [
            e
            for e in ok(http.get(f"/v1/models/{base}"), 200)["evaluations"]
            if e["job_id"] == job_id and e["split"] == "test"
        ]
        modeller_key = _issue(http, "modeller", ["models:read", "models:activate", "jobs:read"])
        viewer_key = _issue(http, "viewer", ["models:read"])
    models = _open_console(browser, api.url, modeller_key, requests)
    dialogs: list[str] = []
    models.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    models.click("nav button[data-page=models]")
    models.wait_for_selector(f"li[data-model='{base}'][data-active=true]")
    gate = models.wait_for_selector(f"li[data-model='{child}'] > .gate > div")
    assert gate.inner_text().startswith("gate: "), "the child's gate decision is shown"
    roc = models.wait_for_selector(f"li[data-model='{child}'] > .roc svg.roc[data-split=test]")
    assert judged["split"] == "test" and roc.get_attribute("data-pairs") == judged["pairs_sha256"]
    assert parent_judged["pairs_sha256"] == judged["pairs_sha256"], "both curves are on the same pairs"
    for role, evaluation in (("candidate", judged), ("parent", parent_judged)):
        line = roc.query_selector(f"polyline.{role}")
        curve = evaluation["metrics"]["roc"]
        assert int(line.get_attribute("data-points")) == len(curve["far"]) >= 2, role
        assert f"{role} AUC {evaluation['metrics']['roc_auc']:.4f}" in (roc.text_content() or "")
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
    models.close()

    viewer = _open_console(browser, api.url, viewer_key, requests)
    viewer.wait_for_selector(f"li[data-model='{child}']")
    assert viewer.locator("button.activate").count() == 0
    viewer.close()
    with client_with_key(api.url, viewer_key) as forced:
        refused = forced.post(f"/v1/models/{child}/activate", json={"reason": "forced"})
    assert (refused.status_code, refused.json()["type"].rsplit("/", 1)[-1]) == (403, "insufficient-scope")
    _only_the_api(requests, api.url)


def test_review_with_the_keyboard(embedded: Embedded, browser: Any, screenshots: Path) -> None:
    url, faces = embedded.api.url, embedded.faces
    requests: list[str] = []
    with client_with_key(url, embedded.admin_key) as http:
        reviewer_key = _issue(http, "reviewer", REVIEWER_SCOPES)
        page = _open_console(browser, url, reviewer_key, requests)
        assert page.is_visible("nav button[data-page=review]")
        assert not page.is_visible("nav button[data-page=jobs]"), "the key cannot read jobs"
        page.wait_for_selector("#review-pair:not([hidden])")
        first_pair_s = time.monotonic() - embedded.launched_at
        print(
            f"first pair on screen {first_pair_s:.1f} s after `magtune up` started (its api listened after "
            f"{embedded.listening_s:.1f} s; then {len(faces)} faces were uploaded, the base model registered "
            "and activated, and the faces embedded; run this test alone for a figure that shares no CPU "
            "with the PostgreSQL test)"
        )
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
        with client_with_key(url, reviewer_key) as reviewer:
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
    page.close()
    _only_the_api(requests, url)
    assert any(request.startswith(f"{url}/v1/faces/") for request in requests), "images came through the api"


def test_the_faces_grid_shows_embedding_and_quality_and_the_nearest_faces(
    embedded: Embedded, browser: Any, screenshots: Path
) -> None:
    url, faces = embedded.api.url, embedded.faces
    requests: list[str] = []
    with client_with_key(url, embedded.admin_key) as http:
        page = _open_console(browser, url, _issue(http, "browser", ["faces:read"]), requests)
        subject = next(iter(faces.values()))["subject"]
        listed = ok(http.get("/v1/faces", params={"subject": subject}), 200)["items"]
    page.wait_for_selector("#faces-form")
    page.fill("#faces-form input[name=subject]", subject)
    page.click("#faces-form button[type=submit]")
    page.wait_for_function(
        "n => document.querySelectorAll('#faces-grid .tile').length === n", arg=IMAGES_PER_PERSON
    )
    tiles = page.query_selector_all("#faces-grid .tile")
    assert {faces[t.get_attribute("data-face")]["subject"] for t in tiles} == {subject}
    assert {t.get_attribute("data-embedded") for t in tiles} == {"true"}
    quality = {face["id"]: face["quality"] for face in listed}
    for tile in tiles:
        shown = float(tile.get_attribute("data-quality"))
        assert shown == quality[tile.get_attribute("data-face")] and shown > 0, "the serving model's norm"
        assert f"quality {shown:.1f}" in tile.inner_text()
        assert tile.query_selector("meter") is not None
    clicked = tiles[0].get_attribute("data-face")
    tiles[0].click()
    page.wait_for_selector("#faces-nearest .tile")
    near = page.query_selector_all("#faces-nearest .tile")
    assert clicked not in {t.get_attribute("data-face") for t in near}
    assert all(t.get_attribute("data-face") in faces for t in near)
    assert "·" in near[0].inner_text()
    page.screenshot(path=str(screenshots / "faces.png"))
    page.close()
    _only_the_api(requests, url)


def test_a_job_reader_sees_no_controls_and_the_dashboard_draws_the_metrics(
    embedded: Embedded, browser: Any, screenshots: Path
) -> None:
    url = embedded.api.url
    requests: list[str] = []
    with client_with_key(url, embedded.admin_key) as http:
        # A key that reads jobs but may not write them: the list, without start or cancel controls.
        ok(http.post("/v1/jobs", json={"kind": "evaluate", "params": {"split": "val"}}), 202)
        reader = _open_console(browser, url, _issue(http, "watcher", ["jobs:read", "metrics:read"]), requests)
        reader.click("nav button[data-page=jobs]")
        reader.wait_for_selector("#jobs-table tbody tr")
        assert not reader.is_visible("#finetune-form")
        assert reader.locator("button.cancel").count() == 0
        reader.screenshot(path=str(screenshots / "jobs.png"))

        reader.click("nav button[data-page=dashboard]")
        reader.wait_for_selector("#dashboard [data-chart=jobs] svg")
        metrics = ok(http.get("/v1/metrics"), 200)

        def drawn(chart: str) -> dict[str, int]:
            marks = reader.query_selector_all(f"#dashboard [data-chart={chart}] rect[data-value]")
            totals: dict[str, int] = {}
            for mark in marks:
                key = mark.get_attribute("data-key")
                totals[key] = totals.get(key, 0) + int(mark.get_attribute("data-value"))
            return totals

        feedback = metrics["feedback"]
        assert drawn("feedback-by-split") == {k: n for k, n in feedback["by_split"].items() if n}
        assert drawn("feedback-by-label") == {k: n for k, n in feedback["by_label"].items() if n}
        assert drawn("wasted") == {"cross": feedback["by_split"]["cross"]}
        faces = metrics["faces"]
        assert drawn("coverage") == {
            "serving": faces["embedded_by_serving_model"],
            "active": faces["embedded_by_active_model"],
        }
        assert faces["embedded_by_serving_model"] == faces["total"] == len(embedded.faces)
        assert drawn("jobs") == metrics["jobs"]["by_status"]
        reader.screenshot(path=str(screenshots / "dashboard.png"))

        operator_key = _issue(http, "operator", ["jobs:read", "jobs:write"])
        operator = _open_console(browser, url, operator_key, requests)
        operator.wait_for_selector("#jobs-table tbody tr")
        assert operator.is_visible("#finetune-form")
    reader.close()
    operator.close()
    _only_the_api(requests, url)
