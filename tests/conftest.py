"""Shared fixtures. Tests that read the sample datasets fail (never skip) when the folder
is missing; pure unit tests on arrays run without it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest


def _data_path() -> Path:
    raw = os.environ.get("MEDLENS_DATA") or str(
        Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    return Path(raw)


def _data_dir() -> Path:
    path = _data_path()
    if not path.is_dir():
        pytest.fail(
            f"sample data folder {path} not found: set MEDLENS_DATA to ../shared/data",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _data_dir()


@pytest.fixture(scope="session", autouse=True)
def _session_home(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The same throwaway MEDLENS_HOME for session- and module-scoped fixtures, which are
    set up before any function-scoped one: without it a module's app fixture would read
    the user's ~/.medlens (e.g. the case library ``make demo`` builds there)."""
    home = tmp_path_factory.getbasetemp() / "medlens_home"
    home.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDLENS_HOME", str(home))
        yield


@pytest.fixture(autouse=True)
def _isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test writes MedLens state into a throwaway MEDLENS_HOME."""
    home = tmp_path_factory.getbasetemp() / "medlens_home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("MEDLENS_HOME", str(home))
    # Pure unit tests run without the data; a test that reads it fails (the loaders
    # raise on a missing MEDLENS_DATA folder, and the ``data_dir`` fixture fails).
    monkeypatch.setenv("MEDLENS_DATA", str(_data_path()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
