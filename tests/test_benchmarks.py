"""Smoke runs of the service and retrieval benchmarks at tiny sizes: they must run end to
end and write their JSON (their numbers are for docs/RESULTS.md, never asserted on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path, timeout: int = 300) -> dict:
    out = tmp_path / "result.json"
    env = {**os.environ, "MEDLENS_HOME": str(tmp_path / "home")}
    res = subprocess.run(
        [sys.executable, *args, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_vector_search_benchmark_smoke(tmp_path: Path) -> None:
    r = _run(
        [
            "benchmarks/vector_search.py",
            "--sizes",
            "2000",
            "--queries",
            "20",
            "--workdir",
            str(tmp_path / "vs"),
        ],
        tmp_path,
    )
    (row,) = r
    assert row["n"] == 2000
    # at this size HNSW must match exact search
    assert row["filtered"]["recall_at_10"] >= 0.95 and row["unfiltered"]["recall_at_10"] >= 0.95


@pytest.mark.slow
def test_ingest_benchmark_smoke(tmp_path: Path) -> None:
    r = _run(
        [
            "benchmarks/ingest.py",
            "--dataset",
            "isic2018",
            "--limit",
            "24",
            "--workdir",
            str(tmp_path / "ing"),
        ],
        tmp_path,
    )
    assert "ratio" in json.dumps(r) or "speedup" in json.dumps(r)


@pytest.mark.slow
def test_api_load_benchmark_smoke(tmp_path: Path) -> None:
    r = _run(
        ["benchmarks/api_load.py", "--clients", "2", "--requests", "6", "--bare", "3"],
        tmp_path,
        timeout=600,
    )
    assert r["load"]["ok"] == 6 and not r["load"]["errors"]


@pytest.mark.slow
def test_flips_benchmark_smoke(tmp_path: Path) -> None:
    """The test-time-flip decision runs on validation splits only and states its rule."""
    js, md = tmp_path / "flips.json", tmp_path / "flips.md"
    res = subprocess.run(
        [
            sys.executable,
            "benchmarks/flips.py",
            "--limit",
            "6",
            "--json",
            str(js),
            "--out",
            str(md),
        ],
        cwd=ROOT,
        env={**os.environ, "MEDLENS_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(js.read_text())
    assert len(r["rows"]) == 5 and r["smoke"] is True
    assert isinstance(r["keep"], bool) and r["latency"]["ratio"] > 1.0
    assert "validation" in md.read_text() and "Decision" in md.read_text()


@pytest.mark.slow
def test_cold_start_benchmark_smoke(tmp_path: Path, data_dir: Path) -> None:
    r = _run(["benchmarks/cold_start.py", "--runs", "1"], tmp_path, timeout=900)
    assert r["first_result_s"] > 0 and r["readyz_s"] > 0 and len(r["first_result_runs_s"]) == 1
    assert r["transformers_imported"] is False  # warm home, image only: no text tower
    assert r["importtime_top"] and all(m["cumulative_ms"] >= 0 for m in r["importtime_top"])
    md = subprocess.run(
        [
            sys.executable,
            "benchmarks/cold_start.py",
            "--table",
            *[str(tmp_path / "result.json")] * 2,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "service start → /readyz" in md and md.count("\n|") >= 8


@pytest.mark.slow
def test_allocator_benchmark_smoke(tmp_path: Path) -> None:
    r = _run(["benchmarks/allocator.py", "--smoke"], tmp_path)
    assert [row["batch_size"] for row in r["rows"]] == [1, 2] and r["smoke"] is True
    assert set(r["process"]) == {"on", "off"}
