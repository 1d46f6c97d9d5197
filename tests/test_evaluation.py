"""Evaluation harness: calibration fitting, every protocol through the real ``medlens eval``
command on the real lite model (smoke sizes), the results-document generator, and
smoke runs of the benchmark scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from medlens.analysis.calibration import (
    fit_temperature,
    fit_temperature_multilabel,
    sigmoid_nll,
    softmax_nll,
)
from medlens.cli.evaluate import register
from medlens.errors import ConfigError
from medlens.evaluation.protocols import protocols, run_protocol, select_records

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 12
MODEL = os.environ.get("MEDLENS_MODEL", "lite")  # the default model unless told otherwise


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # a group, so "eval" stays a sub-command as in `medlens eval`
        pass

    register(app)
    return app


# -- calibration -----------------------------------------------------------------------------
def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 5))
    p = np.exp(logits / 2.5)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in p])
    t = fit_temperature(logits, y)
    assert t == pytest.approx(2.5, rel=0.1)
    assert softmax_nll(logits, y, t) < softmax_nll(logits, y, 1.0)


def test_fit_temperature_multilabel_recovers_and_respects_the_mask():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 4, (3000, 3))
    targets = (rng.random(z.shape) < 1 / (1 + np.exp(-z / 0.5))).astype(int)
    assert fit_temperature_multilabel(z, targets) == pytest.approx(0.5, rel=0.1)
    # Entries outside the mask are ignored, even when they are nonsense.
    mask = np.ones_like(targets, dtype=bool)
    mask[:, 2] = False
    garbage = targets.copy()
    garbage[:, 2] = 1 - garbage[:, 2]
    t = fit_temperature_multilabel(z, garbage, mask)
    assert t == pytest.approx(0.5, rel=0.15)
    assert sigmoid_nll(z, garbage, t, mask) < sigmoid_nll(z, garbage, 3.0, mask)


def test_fit_temperature_with_nothing_to_fit_is_identity():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0
    assert fit_temperature_multilabel(np.zeros((0, 2)), np.zeros((0, 2))) == 1.0


# -- protocol plumbing that needs no model ---------------------------------------------------
def test_protocols_are_data_with_versions_and_splits():
    specs = protocols()
    assert {
        "derm7-dermamnist",
        "derm7-isic2018",
        "pad-ufes-20",
        "dermnet",
        "pneumonia",
        "covid-notes",
        "domain",
    } <= set(specs)
    for name, spec in specs.items():
        if spec["kind"] != "domain":
            assert len(spec["version"]) == 16, name
            assert "split" in spec, name
    eczema = specs["dermnet"]["binary_groups"]["eczema"]["findings"]
    assert eczema == ["atopic_dermatitis", "nummular_eczema", "hand_dermatitis"]


def test_selection_filters_on_record_meta(data_dir):
    """``where`` keeps only matching records: Derm7pt's dermoscopic view, and the HAM10000
    test images that are DermaMNIST's test images (2,005 of the split's 2,951)."""
    from medlens.datasets import load_dataset

    derm = select_records(load_dataset("derm7pt"), "test", None, {"view": "derm"})
    assert len(derm) == 395 and {r.meta["view"] for r in derm} == {"derm"}
    ham = load_dataset("ham10000")
    assert len(select_records(ham, "test", None)) == 2951
    assert len(select_records(ham, "test", None, {"dermamnist_split": "test"})) == 2005


def test_limited_selection_is_deterministic_and_spans_the_split(data_dir):
    from medlens.datasets import load_dataset

    m = load_dataset("pneumoniamnist")
    recs = select_records(m, "test", 10)
    assert [r.id for r in recs] == [r.id for r in select_records(m, "test", 10)]
    assert len({r.labels[0] for r in recs}) == 2  # not 10 records of one sorted class
    assert len(select_records(m, "test", None)) == 468


def test_unknown_protocol_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown protocol"):
        run_protocol("no-such-protocol", encoder=None)


def test_cli_unknown_protocol_is_one_line_exit_2(data_dir, tmp_path):
    r = CliRunner().invoke(_app(), ["eval", "nope", "--out", str(tmp_path)])
    assert r.exit_code == 2
    assert "unknown protocol 'nope'" in r.output
    assert "Traceback" not in r.output


def test_cached_embeddings_equal_the_encoders_own_embeddings(data_dir):
    from medlens.datasets import load_dataset
    from medlens.evaluation.protocols import embed_records
    from medlens.models import load_encoder

    enc = load_encoder(MODEL)
    m = load_dataset("isic2018")
    recs = select_records(m, "test", 4)
    first = embed_records(enc, m, recs)  # computes and caches
    again = embed_records(enc, m, recs)  # from the cache
    direct = enc.embed_images([m.image(r) for r in recs])
    np.testing.assert_allclose(first, direct, atol=1e-5)
    np.testing.assert_array_equal(first, again)


# -- every protocol through the real CLI on the real lite model ------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval")
    home = tmp_path_factory.getbasetemp() / "medlens_home"
    env = {"MEDLENS_HOME": str(home), "MEDLENS_DATA": str(data_dir)}
    r = CliRunner().invoke(
        _app(), ["eval", "all", "--limit", str(LIMIT), "--out", str(out), "--json"], env=env
    )
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout.strip().splitlines()[-1])


def _in01(*values: float | None) -> None:
    for v in values:
        assert v is not None and 0.0 <= v <= 1.0, v


def _ci_ok(value: float, ci: list[float | None]) -> None:
    lo, hi = ci
    assert lo is not None and hi is not None and lo <= hi
    assert lo - 1e-9 <= value <= hi + 1e-9 or hi - lo < 1e-9


@pytest.mark.slow
def test_eval_all_writes_json_markdown_and_plots(smoke_run):
    out, results = smoke_run
    assert set(results) == set(protocols())
    for name, res in results.items():
        on_disk = json.loads((out / f"{name}.json").read_text())
        assert on_disk["protocol"] == name and on_disk["limit"] == LIMIT
        md = (out / f"{name}.md").read_text()
        assert md.startswith(f"# {name}") and "smoke run" in md
        assert res["plots"], name
        for p in res["plots"]:
            png = out / "plots" / p
            assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 150_000
        assert res["model"]["name"] == MODEL and len(res["model"]["fingerprint"]) >= 8
        assert res["machine"]["cpu_count"] >= 1
        if name != "domain":
            assert res["dataset"]["version_matches"], name


@pytest.mark.slow
def test_classification_protocols_have_sane_metrics(smoke_run):
    _, results = smoke_run
    for name in ("derm7-dermamnist", "derm7-isic2018", "dermnet"):
        r = results[name]
        assert r["dataset"]["n"] == LIMIT
        _in01(r["accuracy"], r["balanced_accuracy"], r["macro_auroc"])
        _ci_ok(r["accuracy"], r["accuracy_ci"])
        _ci_ok(r["macro_auroc"], r["macro_auroc_ci"])
        assert sum(c["support"] for c in r["per_class"].values()) == LIMIT
        cal = r["calibration"]
        _in01(cal["uncalibrated"]["ece"])
        assert cal["uncalibrated"]["nll"] > 0 and 0 <= cal["uncalibrated"]["brier"] <= 2
    assert len(results["derm7-dermamnist"]["dataset"]["classes"]) == 7
    assert results["derm7-dermamnist"]["calibration"]["fitted_temperature"]["temperature"] > 0
    assert results["derm7-isic2018"]["calibration"]["fitted_temperature"] is None  # no val split
    op = results["derm7-isic2018"]["operating_point"]
    assert op["finding"] == "melanoma" and 0 < op["threshold"] < 1
    assert "all 49 dermatology findings" in op["probability"]
    _in01(op["specificity"])
    assert "colour" in results["derm7-isic2018"]["caveat"]
    for name in ("derm7pt-derm", "derm7pt-clinic"):
        g = results[name]["groups"]  # Derm7pt's 5 diagnosis groups, from meta["group5"]
        assert list(g["findings"]) == ["BCC", "NEV", "MEL", "MISC", "SK"]
        assert 0 < g["n"] <= LIMIT and results[name]["dataset"]["n"] <= g["n"]
        _in01(g["balanced_accuracy"], g["macro_auroc"])
        _ci_ok(g["balanced_accuracy"], g["balanced_accuracy_ci"])
    dermamnist_test = results["ham10000-dermamnist-test"]["dataset"]
    assert dermamnist_test["n"] == LIMIT and dermamnist_test["version_matches"]
    dn = results["dermnet"]
    assert len(dn["dataset"]["classes"]) == 46  # 47 DermNet conditions map to 46 findings
    assert dn["top1_accuracy"] <= dn["top3_accuracy"]
    _in01(dn["eczema"]["sensitivity"], dn["eczema"]["specificity"])


@pytest.mark.slow
def test_pad_ufes_reports_folds_and_modalities(smoke_run):
    _, results = smoke_run
    r = results["pad-ufes-20"]
    assert set(r["modalities"]) == {"image", "symptoms", "fusion"}
    folds = r["folds"]["per_fold"]
    assert [f["fold"] for f in folds] == [0, 1, 2, 3, 4]
    assert sum(f["n"] for f in folds) == LIMIT
    for m in r["modalities"].values():
        _in01(m["balanced_accuracy"], m["folds"]["balanced_accuracy_mean_sd"]["mean"])
    assert "learned fusion head" in r["modality_notes"]["fusion"]
    assert "cross-fitted" in r["calibration"]["fitted_temperature"]["fitted_on"]


@pytest.mark.slow
def test_binary_retrieval_and_domain_protocols_have_sane_metrics(smoke_run):
    _, results = smoke_run
    pn = results["pneumonia"]
    _in01(pn["auroc"], pn["accuracy"], pn["sensitivity"], pn["specificity"])
    assert 0 < pn["dataset"]["positives"] < LIMIT
    cov = results["covid-notes"]
    for d in ("image_to_text", "text_to_image"):
        b = cov[d]
        _in01(b["recall_at_1"], b["recall_at_5"], b["recall_at_10"])
        assert b["recall_at_1"] <= b["recall_at_5"] <= b["recall_at_10"]
        assert 1 <= b["median_rank"] <= b["candidates"]
    _in01(cov["classification"]["accuracy"])
    dom = results["domain"]
    _in01(dom["accuracy"])
    assert dom["n"] == sum(d["n"] for d in dom["per_dataset"].values())


def _make_results(*args: str) -> int:
    """Run scripts/make_results.py in this process (its ``main``), returning the exit code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_results", ROOT / "scripts" / "make_results.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = sys.argv
    sys.argv = ["make_results.py", *args]
    try:
        mod.main()
    except SystemExit as exc:
        return 0 if exc.code in (None, 0) else 1
    finally:
        sys.argv = argv
    return 0


@pytest.mark.slow
def test_make_results_builds_the_document_from_the_json(smoke_run, tmp_path):
    out, _ = smoke_run
    docs = tmp_path / "docs"
    assert _make_results("--results", str(out), "--docs", str(docs)) == 1  # smoke: refused
    assert not (docs / "RESULTS.md").exists()
    assert _make_results("--results", str(out), "--docs", str(docs), "--allow-smoke") == 0
    text = (docs / "RESULTS.md").read_text()
    assert "| [derm7-isic2018](#derm7-isic2018) |" in text
    assert "ISIC 2018 Task 3 leaderboard best" in text and "0.885" in text
    assert (docs / "results" / "pneumonia.json").is_file()
    assert any((docs / "plots").glob("pneumonia-*.png"))
    assert _make_results("--docs", str(docs), "--check") == 0
    # A changed measurement makes the document stale until it is regenerated.
    js = docs / "results" / "pneumonia.json"
    js.write_text(json.dumps({**json.loads(js.read_text()), "auroc": 0.123}))
    assert _make_results("--docs", str(docs), "--check") == 1
    assert _make_results("--docs", str(docs)) == 0
    assert "0.123" in (docs / "RESULTS.md").read_text()


# -- benchmark scripts, smoke sizes ----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("script", ["throughput.py", "analyze_latency.py"])
def test_benchmark_smoke(script, tmp_path, data_dir):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--model", MODEL]
    r = subprocess.run(
        [*cmd, "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert "|" in r.stdout  # printed a table
    if script == "throughput.py":
        row = res["rows"][0]
        assert row["pipeline_files_img_s"] > 0 and row["bare_forward_img_s"] > 0
        assert 0 < row["ratio_files_to_bare"] < 5
    else:
        lat = next(iter(res["latency"].values()))
        assert 0 < lat["analyze_p50_ms"] <= lat["analyze_p95_ms"]
        assert res["cold_start_fresh_process_s"]["median"] > 0
    assert res["peak_rss_mb"] > 0 and res["smoke"] is True
