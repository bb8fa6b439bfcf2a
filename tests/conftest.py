"""Fixtures every test package shares: where the real faces and models live."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("MAGTUNE_SHARED_DIR", REPO_ROOT.parent / "shared"))
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(condition: bool, reason: str) -> None:
    """Skip locally when a prerequisite is missing, but fail under CI, where it must be there."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    require(SHARED_DIR.is_dir(), f"shared material not found at {SHARED_DIR}")
    return SHARED_DIR


@pytest.fixture(scope="session")
def johns_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "faces" / "johns"


@pytest.fixture(scope="session")
def mobilefacenet_checkpoint(shared_dir: Path) -> Path:
    return shared_dir / "models" / "mobilefacenet" / "mobilefacenet.pt"
