"""Shared fixtures: where the real test data lives, and whether OpenCL must run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def testdata_dir() -> Path:
    """``$AZFILTER_TESTDATA``, default ``../shared/testdata`` next to the repository."""
    return Path(os.environ.get("AZFILTER_TESTDATA", REPO.parent / "shared" / "testdata"))


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The real-data directory; skips (fails in CI) when it is absent."""
    path = testdata_dir()
    if not path.is_dir():
        reason = f"real test data not found at {path} (set AZFILTER_TESTDATA)"
        if IN_CI:
            pytest.fail(reason + "; CI must have it")
        pytest.skip(reason)
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Each test session uses its own lookup-table cache, never the user's."""
    if "AZFILTER_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("AZFILTER_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lut-cache"))
