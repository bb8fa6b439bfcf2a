"""/docs and /redoc work without internet: every script, style and icon they name is served by the api."""

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture
def offline_client(tmp_path: Path) -> Iterator[TestClient]:
    """No database or broker is touched by these pages."""
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'unused.db'}")
    with TestClient(create_app(settings, run_sweeper=False)) as client:
        yield client


def _asset_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_name_no_other_host(offline_client: TestClient, page: str) -> None:
    response = offline_client.get(page)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "http://" not in response.text and "https://" not in response.text
    urls = _asset_urls(response.text)
    assert urls, "the page loads its scripts from somewhere"
    assert all(url.startswith("/") and not url.startswith("//") for url in urls), urls


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_every_asset_a_docs_page_names_is_served_with_its_type(offline_client: TestClient, page: str) -> None:
    urls = _asset_urls(offline_client.get(page).text)

    assert any(url.endswith(".js") for url in urls)
    for url in urls:
        asset = offline_client.get(url)
        assert asset.status_code == 200, url
        assert asset.headers["content-type"].startswith(CONTENT_TYPES[Path(url).suffix]), url
        assert len(asset.content) > 1000, url


def test_swagger_ui_reads_the_services_own_openapi_document(offline_client: TestClient) -> None:
    html = offline_client.get("/docs").text
    spec = offline_client.get("/openapi.json").json()

    assert "url: '/openapi.json'" in html
    assert spec["openapi"].startswith("3.1")
    assert not any(path.startswith(("/docs", "/redoc")) for path in spec["paths"])
