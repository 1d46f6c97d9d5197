"""The audit trail: what it stores (and never stores), append-only, hash chain, CLI."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import typer
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from typer.testing import CliRunner

from medlens.audit import AuditLog
from medlens.knowledge import load_domain
from medlens.pipeline import MedLens

ISIC = "isic2018-task3-test/images/ISIC_0034524.jpg"
DICOM = "cxr-samples/Fake_MONOHR1.dcm"


@pytest.fixture(scope="module")
def lens() -> MedLens:
    return MedLens()


@pytest.fixture(scope="module")
def analysis(lens: MedLens, data_dir: Path) -> dict:
    return lens.analyze(
        data_dir / ISIC, symptoms="itchy and growing", domain="dermatology"
    ).to_dict()


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    audit = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}")
    yield audit
    audit.close()


def _append(log: AuditLog, analysis: dict, rid: str, **kw) -> object:
    return log.append(
        analysis,
        request_id=rid,
        api_key_id=kw.pop("api_key_id", "local"),
        knowledge_version=load_domain(analysis["domain"]).source_hash,
        **kw,
    )


def test_record_carries_provenance(log: AuditLog, analysis: dict, data_dir: Path) -> None:
    import hashlib

    rec = _append(log, analysis, "req-1", api_key_id="ab12cd34", case_library_version="lib-7")
    got = log.get("req-1")
    assert got == log.get(str(rec.seq)) == rec
    assert got.api_key_id == "ab12cd34"
    assert got.model_name == analysis["model"]["name"] == MedLens().model_name
    assert got.model_fingerprint == analysis["model"]["fingerprint"]
    assert got.input_sha256 == hashlib.sha256((data_dir / ISIC).read_bytes()).hexdigest()
    assert got.knowledge_version == load_domain("dermatology").source_hash
    assert got.case_library_version == "lib-7"
    assert got.output == analysis
    assert (got.domain, got.triage_level) == (analysis["domain"], analysis["triage"]["level"])
    assert got.top_finding == analysis["findings"][0]["id"]
    assert not got.has_input_bytes and got.identifiers is None
    assert log.get("missing") is None


def test_no_pixels_or_identities_by_default(
    log: AuditLog, lens: MedLens, data_dir: Path, tmp_path: Path
) -> None:
    decoded = lens.decode(data_dir / DICOM)
    assert decoded.identifiers  # the sample really carries a name and an id
    # A phrase no knowledge-pack passage contains (passages attached to the analysis
    # are stored; the user's own words must not be).
    symptoms = "cough for weeks since the quokkafest trip"
    result = lens.analyze(decoded, symptoms=symptoms).to_dict()
    _append(log, result, "req-dicom")
    log.close()
    blob = (tmp_path / "audit.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("audit.db-*")
    )
    for value in decoded.identifiers.values.values():
        assert value.encode() not in blob, "an identifier reached the audit database"
    assert b"quokkafest" not in blob  # symptom text is never stored, only its hash
    assert decoded.pixels.tobytes()[:4096] not in blob


def test_site_can_store_inputs_and_identifiers(
    log: AuditLog, lens: MedLens, data_dir: Path
) -> None:
    raw = (data_dir / DICOM).read_bytes()
    decoded = lens.decode(raw, "x.dcm")
    result = lens.analyze(decoded).to_dict()
    ids = dict(decoded.identifiers.values)
    _append(log, result, "req-store", input_bytes=raw, identifiers=ids)
    rec = log.get("req-store")
    assert rec.has_input_bytes and rec.identifiers == ids
    row = next(r for r in log.iter_all() if r["id"] == "req-store")
    assert bytes(row["input_bytes"]) == raw


def test_append_only_and_tamper_evident(log: AuditLog, analysis: dict) -> None:
    for i in range(3):
        _append(log, analysis, f"req-{i}")
    assert log.verify() == (True, 3, None)
    for stmt in (
        "UPDATE medlens_audit SET triage_level='routine' WHERE id='req-1'",
        "DELETE FROM medlens_audit WHERE id='req-1'",
    ):
        with pytest.raises(SQLAlchemyError, match="append-only"), log.engine.begin() as c:
            c.execute(text(stmt))
    assert log.count() == 3
    # Someone with file access drops the triggers and edits a row: the chain shows it.
    with log.engine.begin() as c:
        c.execute(text("DROP TRIGGER medlens_audit_no_update"))
        c.execute(text("UPDATE medlens_audit SET api_key_id='someone' WHERE id='req-1'"))
    assert log.verify() == (False, 2, "req-1")


def test_concurrent_appends_keep_the_chain(log: AuditLog, analysis: dict) -> None:
    threads = [threading.Thread(target=_append, args=(log, analysis, f"t-{i}")) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.count() == 16
    assert log.verify() == (True, 16, None)
    assert [r.seq for r in log.list(100)] == list(range(16, 0, -1))


def test_second_process_view_and_reopen(tmp_path: Path, analysis: dict) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    a, b = AuditLog(url), AuditLog(url)
    _append(a, analysis, "one")
    _append(b, analysis, "two")
    assert AuditLog(url).verify() == (True, 2, None)


def _cli() -> typer.Typer:
    from medlens.cli.service import register

    app = typer.Typer()
    register(app)
    return app


def test_audit_cli(analysis: dict, tmp_path: Path) -> None:
    log = AuditLog.from_settings()  # MEDLENS_HOME is the test session's
    before = log.count()
    _append(log, analysis, "cli-1")
    runner = CliRunner()
    app = _cli()
    res = runner.invoke(app, ["audit", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert rows[0]["id"] == "cli-1" and "output" not in rows[0]
    res = runner.invoke(app, ["audit", "show", "cli-1"])
    assert res.exit_code == 0 and json.loads(res.stdout)["output"] == analysis
    out = tmp_path / "export.jsonl"
    res = runner.invoke(app, ["audit", "export", "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == before + 1 and lines[-1]["id"] == "cli-1"
    assert runner.invoke(app, ["audit", "verify"]).exit_code == 0
    res = runner.invoke(app, ["audit", "show", "no-such-record"])
    assert res.exit_code == 2 and "no audit record" in res.output


@pytest.fixture
def pg_log() -> AuditLog:
    """A PostgreSQL audit log when MEDLENS_TEST_POSTGRES_URL names a throwaway database
    (.ci/run starts one when Debian's PostgreSQL is installed)."""
    import os

    url = os.environ.get("MEDLENS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("MEDLENS_TEST_POSTGRES_URL not set: no PostgreSQL server to test against")
    audit = AuditLog(url)
    with audit.engine.begin() as c:  # a clean table per test run
        c.execute(text("DROP TABLE IF EXISTS medlens_audit CASCADE"))
    audit.close()
    audit = AuditLog(url)
    yield audit
    audit.close()


def test_postgres_append_only_chain_and_concurrency(pg_log: AuditLog, analysis: dict) -> None:
    threads = [
        threading.Thread(target=_append, args=(pg_log, analysis, f"pg-{i}")) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pg_log.count() == 8
    assert pg_log.verify() == (True, 8, None)
    for stmt in (
        "UPDATE medlens_audit SET triage_level='routine' WHERE id='pg-1'",
        "DELETE FROM medlens_audit WHERE id='pg-1'",
    ):
        with pytest.raises(SQLAlchemyError, match="append-only"), pg_log.engine.begin() as c:
            c.execute(text(stmt))
    assert pg_log.count() == 8
