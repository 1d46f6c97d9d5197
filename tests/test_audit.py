"""The audit trail: what it stores (and never stores), append-only, HMAC chain with signed
heads (the attack matrix of issue 13), CLI."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
import typer
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from typer.testing import CliRunner

from medlens.audit import AuditLog, Verification
from medlens.audit.store import GENESIS, _legacy_hash
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
    assert log.verify() == Verification(True, 3)
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
    result = log.verify()
    assert (result.ok, result.checked, result.bad_id) == (False, 2, "req-1")
    assert "does not match its HMAC" in result.reason


def test_concurrent_appends_keep_the_chain(log: AuditLog, analysis: dict) -> None:
    threads = [threading.Thread(target=_append, args=(log, analysis, f"t-{i}")) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.count() == 16
    assert log.verify() == Verification(True, 16)
    assert [r.seq for r in log.list(100)] == list(range(16, 0, -1))


def test_second_process_view_and_reopen(tmp_path: Path, analysis: dict) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    a, b = AuditLog(url), AuditLog(url)
    _append(a, analysis, "one")
    _append(b, analysis, "two")
    assert AuditLog(url).verify() == Verification(True, 2)


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
        c.execute(text("DROP TABLE IF EXISTS medlens_audit_head"))
    audit.head_file.unlink(missing_ok=True)
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
    assert pg_log.verify() == Verification(True, 8)
    for stmt in (
        "UPDATE medlens_audit SET triage_level='routine' WHERE id='pg-1'",
        "DELETE FROM medlens_audit WHERE id='pg-1'",
    ):
        with pytest.raises(SQLAlchemyError, match="append-only"), pg_log.engine.begin() as c:
            c.execute(text(stmt))
    assert pg_log.count() == 8
    # The signed head lives in PostgreSQL too: a tail cut by someone who can drop the
    # trigger is reported.
    with pg_log.engine.begin() as c:
        c.execute(text("DROP TRIGGER medlens_audit_no_change ON medlens_audit"))
        c.execute(
            text("DELETE FROM medlens_audit WHERE seq = (SELECT max(seq) FROM medlens_audit)")
        )
    result = pg_log.verify()
    assert not result.ok and "holds 7 records but its signed head says 8" in result.reason


# ------------------------------------------------ tamper evidence: the attack matrix


def _drop_triggers(log: AuditLog) -> None:
    """What someone with write access to the database file can do."""
    with log.engine.begin() as c:
        c.execute(text("DROP TRIGGER medlens_audit_no_update"))
        c.execute(text("DROP TRIGGER medlens_audit_no_delete"))


def _edit_and_rehash(log: AuditLog) -> None:
    """Edit a record and re-hash it and every later one with plain SHA-256 (no key)."""
    _drop_triggers(log)
    rows = list(log.iter_all())
    rows[1]["triage_level"] = "routine"
    prev = GENESIS
    with log.engine.begin() as c:
        for row in rows:
            row["prev_hash"] = prev
            row["record_hash"] = prev = _legacy_hash(row)
            c.execute(
                text("UPDATE medlens_audit SET triage_level=:t, prev_hash=:p, record_hash=:h "
                     "WHERE seq=:s"),
                {"t": row["triage_level"], "p": row["prev_hash"], "h": row["record_hash"],
                 "s": row["seq"]},
            )  # fmt: skip


def _tail_cut(log: AuditLog) -> None:
    _drop_triggers(log)
    with log.engine.begin() as c:
        last = c.execute(text("SELECT max(seq) FROM medlens_audit")).scalar()
        c.execute(text("DELETE FROM medlens_audit WHERE seq = :s"), {"s": last})


def _tail_cut_and_head_row(log: AuditLog) -> None:
    _tail_cut(log)
    with log.engine.begin() as c:
        c.execute(text("DELETE FROM medlens_audit_head"))


def _middle_delete(log: AuditLog) -> None:
    _drop_triggers(log)
    with log.engine.begin() as c:
        c.execute(text("DELETE FROM medlens_audit WHERE id='a-1'"))


def _wipe(log: AuditLog) -> None:
    _drop_triggers(log)
    with log.engine.begin() as c:
        c.execute(text("DELETE FROM medlens_audit"))
        c.execute(text("DELETE FROM medlens_audit_head"))


def _delete_file(log: AuditLog) -> None:
    log.close()
    path = Path(log.url.split(":///", 1)[1])
    for p in (path, *path.parent.glob(path.name + "-*")):
        p.unlink()


ATTACKS = {
    "edit_rehash_sha256": (_edit_and_rehash, "record a-0 does not match its HMAC"),
    "tail_cut": (_tail_cut, "holds 3 records but its signed head says 4"),
    "tail_cut_and_head_row": (_tail_cut_and_head_row, "signed head record is missing"),
    "middle_delete": (_middle_delete, "record a-2 does not follow the record before it"),
    "wipe_all_rows": (_wipe, "empty (wiped, or deleted and re-created) but the head file says 4"),
    "delete_db_file": (_delete_file, "head file says 4 records"),
}


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A MedLens home of its own (key file, head file, audit.db) for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("MEDLENS_HOME", str(home))
    monkeypatch.delenv("MEDLENS_AUDIT_KEY", raising=False)
    monkeypatch.delenv("MEDLENS_DB_URL", raising=False)
    return home


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_every_attack_is_detected(site: Path, analysis: dict, attack: str) -> None:
    tamper, reason = ATTACKS[attack]
    log = AuditLog.from_settings()
    for i in range(4):
        _append(log, analysis, f"a-{i}")
    assert log.verify() == Verification(True, 4)
    tamper(log)
    log.close()
    result = AuditLog.from_settings().verify()
    assert not result.ok
    assert reason in result.reason, result.reason
    if attack == "delete_db_file":  # the first open after the deletion knows it
        assert result.reason.startswith("the audit database was missing")
    res = CliRunner().invoke(_cli(), ["audit", "verify"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], res.output


def test_wrong_key_is_detected(site: Path, analysis: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog.from_settings()
    _append(log, analysis, "k-0")
    monkeypatch.setenv("MEDLENS_AUDIT_KEY", "not-the-key-this-trail-was-written-with")
    result = AuditLog.from_settings().verify()
    assert not result.ok and "audit key is not the one" in result.reason
    assert CliRunner().invoke(_cli(), ["audit", "verify"]).exit_code == 1


def test_untouched_log_verifies_and_the_key_stays_out_of_the_database(
    site: Path, analysis: dict, tmp_path: Path
) -> None:
    log = AuditLog.from_settings()
    assert log.verify() == Verification(True, 0)  # a new installation: nothing to check
    for i in range(3):
        _append(log, analysis, f"u-{i}")
    log.close()
    key_file = site / "audit.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.head_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip().encode()
    blob = b"".join(p.read_bytes() for p in site.glob("audit.db*"))
    assert key not in blob
    anchor = tmp_path / "anchor.jsonl"
    for _ in range(2):
        res = CliRunner().invoke(_cli(), ["audit", "verify", "--export-head", str(anchor)])
        assert res.exit_code == 0 and "intact: 3 records" in res.output, res.output
    heads = [json.loads(x) for x in anchor.read_text().splitlines()]
    assert len(heads) == 2 and heads[0]["count"] == 3 and heads[0]["mac"] == heads[1]["mac"]
    assert heads[0]["last_hash"] == AuditLog.from_settings().list(1)[0].record_hash


def test_environment_key_is_used_and_never_written(
    site: Path, analysis: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDLENS_AUDIT_KEY", "a-site-secret-from-the-vault-0123456789")
    log = AuditLog.from_settings()
    _append(log, analysis, "e-0")
    assert log.verify() == Verification(True, 1)
    assert not (site / "audit.key").exists()
    monkeypatch.delenv("MEDLENS_AUDIT_KEY")
    assert not AuditLog.from_settings().verify().ok  # the generated key is another key


def test_legacy_unkeyed_chain_is_named_not_a_crash(site: Path, analysis: dict) -> None:
    """A database from before the keyed chain: plain SHA-256 rows, no signed head."""
    log = AuditLog.from_settings()
    rec = _append(log, analysis, "old-0")
    row = next(log.iter_all())
    _drop_triggers(log)
    row["record_hash"] = _legacy_hash(row)
    with log.engine.begin() as c:
        c.execute(text("UPDATE medlens_audit SET record_hash=:h"), {"h": row["record_hash"]})
        c.execute(text("DELETE FROM medlens_audit_head"))
    log.head_file.unlink()
    result = log.verify()
    assert (result.ok, result.bad_id) == (False, rec.id)
    assert result.reason.startswith("unkeyed legacy chain")
    res = CliRunner().invoke(_cli(), ["audit", "verify"])
    assert res.exit_code == 1 and "unkeyed legacy chain" in res.output


def test_key_file_that_is_cut_is_a_config_error(site: Path) -> None:
    from medlens.errors import ConfigError

    site.mkdir(parents=True)
    (site / "audit.key").write_text("abc\n")
    os.chmod(site / "audit.key", 0o600)
    with pytest.raises(ConfigError, match="too short; restore it from backup"):
        AuditLog.from_settings()


# -- issue 13: a private home, keyed pseudonyms, identifiers kept out -----------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_home_is_0700_and_audit_files_0600(site: Path, analysis: dict) -> None:
    from medlens.analysis.symptoms import text_hash

    log = AuditLog.from_settings()
    for i in range(2):
        _append(log, analysis, f"p-{i}")
    text_hash("makes the installation secret")
    assert _mode(site) == 0o700
    written = [p for p in site.iterdir() if p.is_file()]
    assert {"audit.db", "audit.key", "secret.key", log.head_file.name} <= {p.name for p in written}
    for p in written:  # the -wal/-shm files too: SQLite copies the database's mode
        assert _mode(p) == 0o600, p.name
    log.close()


def test_an_existing_lax_home_and_database_are_tightened(site: Path, analysis: dict) -> None:
    """An installation from before: MEDLENS_HOME 0755 and audit.db 0644 (as issue 13
    found them) become 0700 / 0600 on the next open."""
    log = AuditLog.from_settings()
    _append(log, analysis, "old-0")
    log.close()
    os.chmod(site, 0o755)
    os.chmod(site / "audit.db", 0o644)
    reopened = AuditLog.from_settings()
    assert reopened.verify().ok
    assert _mode(site) == 0o700 and _mode(site / "audit.db") == 0o600
    reopened.close()


def test_symptom_hash_is_keyed_per_installation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same text hashes alike twice in one installation and differently in another;
    never to its plain sha256 ("bleeding mole, HIV positive" was recovered by guessing)."""
    import hashlib
    import hmac

    from medlens.analysis.symptoms import text_hash
    from medlens.config import get_settings

    text_ = "bleeding mole, HIV positive"
    monkeypatch.delenv("MEDLENS_INSTALL_SECRET", raising=False)
    got = []
    for name in ("site_a", "site_b"):
        monkeypatch.setenv("MEDLENS_HOME", str(tmp_path / name))
        first = text_hash(text_)
        assert text_hash(text_) == first == text_hash(text_, get_settings())
        secret_file = tmp_path / name / "secret.key"
        assert _mode(secret_file) == 0o600 and _mode(tmp_path / name) == 0o700
        got.append(first)
    assert got[0] != got[1]
    assert hashlib.sha256(text_.encode()).hexdigest() not in got
    # A secret from the environment (a vault) is used as given and never written.
    monkeypatch.setenv("MEDLENS_HOME", str(tmp_path / "site_c"))
    monkeypatch.setenv("MEDLENS_INSTALL_SECRET", "s" * 40)
    want = hmac.new(b"s" * 40, text_.encode(), hashlib.sha256).hexdigest()
    assert text_hash(text_) == want and not (tmp_path / "site_c" / "secret.key").exists()


def test_analysis_symptom_hash_is_the_keyed_one(lens: MedLens, data_dir: Path) -> None:
    import hashlib

    from medlens.analysis.symptoms import text_hash

    said = "itchy and growing"
    got = lens.analyze(data_dir / ISIC, symptoms=said, domain="dermatology").to_dict()
    assert got["symptoms"]["sha256"] == text_hash(said, lens.settings)
    assert got["symptoms"]["sha256"] != hashlib.sha256(said.encode()).hexdigest()


def test_dicom_uids_stay_out_of_results_and_the_trail(
    log: AuditLog, lens: MedLens, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Study/Series/SOP Instance UIDs are identifiers: not in the analysis JSON, not in the
    audit database unless the site stores identifiers (MEDLENS_AUDIT_STORE_IDENTIFIERS)."""
    import pydicom

    ds = pydicom.dcmread(data_dir / DICOM)
    uids = [str(ds[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID") if k in ds]
    assert uids  # the sample carries them
    decoded = lens.decode(data_dir / DICOM)
    assert decoded.identifiers.study_uid == str(ds.StudyInstanceUID)
    result = lens.analyze(decoded).to_dict()
    out = json.dumps(result)
    assert not any(uid in out for uid in uids)
    assert "study_uid" not in result["input"]["context"]
    _append(log, result, "uid-0")
    log.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.glob("audit.db*"))
    assert not any(uid.encode() in blob for uid in uids)


def test_a_damaged_or_weak_installation_secret_is_a_config_error(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medlens.analysis.symptoms import text_hash
    from medlens.errors import ConfigError

    monkeypatch.delenv("MEDLENS_INSTALL_SECRET", raising=False)
    site.mkdir(parents=True)
    (site / "secret.key").write_text("abc\n")
    with pytest.raises(ConfigError, match="shorter than 32 bytes"):
        text_hash("anything")
    monkeypatch.setenv("MEDLENS_INSTALL_SECRET", "short")
    with pytest.raises(ConfigError, match="shorter than 16 characters"):
        text_hash("anything")
