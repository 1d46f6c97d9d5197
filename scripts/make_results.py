"""Regenerate the tables of docs/RESULTS.md from the measured JSON, so the document never
drifts from the measurements.

    python scripts/make_results.py --results results     # copy a full run in, rewrite tables
    python scripts/make_results.py                       # rewrite tables from docs/results/
    python scripts/make_results.py --check               # exit 1 if RESULTS.md is stale

``--results DIR`` (what ``medlens eval all --out DIR`` and ``benchmarks/run_all.sh`` write)
is copied first: ``DIR/<protocol>.json`` → ``docs/results/``, ``DIR/plots/*.png`` →
``docs/plots/``, ``DIR/benchmarks/*.json`` → ``docs/results/benchmarks/``. Smoke results
(``--limit``/``--smoke``) are refused unless ``--allow-smoke``: they are not results.

Only the text between ``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``
markers is rewritten; prose around them is kept.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from medlens.evaluation.protocols import protocols
from medlens.evaluation.report import (
    anchors_table,
    fmt,
    fmt_ci,
    headline_rows,
    provenance,
    table,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"  # --docs DIR points elsewhere (tests, drafts)
SUMMARY_ROWS = 4  # headline rows per protocol in the summary table

MARK = re.compile(
    r"(<!-- BEGIN GENERATED: (?P<name>[\w-]+) -->\n)(?P<body>.*?)"
    r"(<!-- END GENERATED: (?P=name) -->)",
    re.S,
)


def copy_in(src: Path, allow_smoke: bool) -> list[str]:
    """Copy a run's JSON, plots and benchmark JSON into docs/; returns what was copied."""
    copied = []
    res_dir, plot_dir = DOCS / "results", DOCS / "plots"
    for js in sorted(src.glob("*.json")):
        data = json.loads(js.read_text())
        if "protocol" not in data:
            continue
        if data.get("limit") and not allow_smoke:
            sys.exit(f"{js} is a smoke run (--limit {data['limit']}); rerun without --limit")
        res_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(js, res_dir / js.name)
        copied.append(js.name)
        for p in data.get("plots") or []:
            if (src / "plots" / p).is_file():
                plot_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / "plots" / p, plot_dir / p)
                copied.append(f"plots/{p}")
    for js in sorted((src / "benchmarks").glob("*.json")):
        data = json.loads(js.read_text())
        if data.get("smoke") and not allow_smoke:
            sys.exit(f"{js} is a smoke benchmark; rerun without --smoke")
        (res_dir / "benchmarks").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(js, res_dir / "benchmarks" / js.name)
        copied.append(f"benchmarks/{js.name}")
    return copied


def load_results() -> dict[str, dict[str, Any]]:
    """docs/results/<protocol>.json in protocol order."""
    out = {}
    for name in protocols():
        p = DOCS / "results" / f"{name}.json"
        if p.is_file():
            out[name] = json.loads(p.read_text())
    return out


def _lookup(r: dict[str, Any], anchor: dict[str, Any]) -> tuple[Any, str]:
    """Our value of an anchor's metric (in the anchor's ``modality`` where it names one)
    and a note. Cross-validated results whose model saw some folds in training give the
    held-out folds' value: an in-sample number must not stand beside a published one."""
    res = r
    where = []
    if anchor.get("modality"):
        res = (r.get("modalities") or {}).get(anchor["modality"], {})
        where.append(anchor["modality"])
    folds = res.get("folds") or {}
    held = folds.get("held_out_folds")
    if held is not None and len(held) < len(folds.get("per_fold", [])):
        value = folds.get(f"{anchor['metric']}_held_out")
        where.append(f"held-out fold(s) {', '.join(map(str, held)) or 'none'}")
    else:
        value = res.get(anchor["metric"])
    return value, f" ({'; '.join(where)})" if where else ""


def _summary_rows(name: str, r: dict[str, Any]) -> list:
    """The protocol's ``summary`` rows (label prefixes, in order), else its first rows."""
    rows = headline_rows(r)
    wanted = (protocols().get(name) or {}).get("summary")
    if not wanted:
        return rows[:SUMMARY_ROWS]
    return [row for w in wanted for row in rows if row[0].startswith(w)][: len(wanted) + 2]


def summary_section(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| protocol | dataset (split, n) | metric | value | 95% CI |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ds = r["dataset"]
        where = f"{ds['name']} ({ds.get('split') or 'all'}, {ds['n']})"
        for i, (label, v, ci) in enumerate(_summary_rows(name, r)):
            first = i == 0
            lines.append(
                f"| {f'[{name}](#{name})' if first else ''} | {where if first else ''} | "
                f"{label} | {fmt(v)} | {fmt_ci(ci)} |"
            )
    return "\n".join(lines)


def anchors_section(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| protocol | published anchor | metric | anchor | MedLens (this run) | note |",
        "|---|---|---|---|---|---|",
    ]
    for name, spec in protocols().items():
        r = results.get(name, {})
        for a in spec.get("anchors") or []:
            ours, where = _lookup(r, a) if r else (None, "")
            lines.append(
                f"| {name} | {a['source']} | {a['metric']} | {fmt(a['value'])} | "
                f"{fmt(ours)}{where} | {a.get('note', '')} |"
            )
    return "\n".join(lines)


def details_section(results: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, r in results.items():
        parts += [f"### {name}", "", f"{r.get('title', '')}", "", provenance(r), ""]
        if r.get("caveat"):
            parts += [f"> **Caveat:** {r['caveat']}", ""]
        parts += [table(headline_rows(r)), ""]
        if r.get("per_class"):
            cells = ", ".join(
                f"{c} {fmt(v['recall'])} (n={v['support']})" for c, v in r["per_class"].items()
            )
            parts += [f"Per-class recall: {cells}.", ""]
        if folds := r.get("folds"):
            seen = {True: ", seen in training", False: ""}
            cells = "; ".join(
                f"fold {f['fold']} ({f['split']}{seen[f['seen_by_model']]}) "
                f"{fmt(f['balanced_accuracy'])}"
                for f in folds["per_fold"]
            )
            parts += [f"Image balanced accuracy per fold: {cells}.", ""]
        if r.get("anchors"):
            parts += [anchors_table(r), ""]
        if r.get("plots"):
            parts += [" ".join(f"![{p}](plots/{p})" for p in r["plots"]), ""]
    return "\n".join(parts).rstrip()


def _bench(name: str) -> dict[str, Any] | None:
    p = DOCS / "results" / "benchmarks" / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def benchmarks_section() -> str:
    parts = []
    if t := _bench("throughput"):
        m = t["machine"]
        parts += [
            f"**Batch embedding throughput** — `{t['command']}`, {t['date']}, model "
            f"`{t['model']['name']}` `{t['model']['fingerprint']}`, {m['cpu_count']} cores, "
            f"{m['ram_gib']} GiB RAM, {m.get('gpu') or 'no GPU'}; {t['images']['n']} ISIC "
            f"images; peak RSS {t['peak_rss_mb']} MB.",
            "",
            "| batch | from files (img/s) | from files, decoded ahead (img/s) | from pixels "
            "(img/s) | bare forward (img/s) | files ÷ bare | decoded ahead ÷ bare "
            "| pixels ÷ bare |",
            "|---|---|---|---|---|---|---|---|",
        ]
        parts += [
            f"| {r['batch_size']} | {r['pipeline_files_img_s']} | "
            f"{r.get('pipeline_files_ahead_img_s', '–')} | {r['pipeline_pixels_img_s']} | "
            f"{r['bare_forward_img_s']} | {r.get('ratio_files_to_bare', '–')} | "
            f"{r.get('ratio_files_ahead_to_bare', '–')} | {r.get('ratio_pixels_to_bare', '–')} |"
            for r in t["rows"]
        ]
        parts.append("")
    if a := _bench("analyze_latency"):
        m = a["machine"]
        cold = a.get("cold_start_fresh_process_s") or {}
        parts += [
            f"**Single-image analyze latency** — `{a.get('command', 'analyze_latency.py')}`, "
            f"{a['date']}, model `{a['model']['name']}` `{a['model']['fingerprint']}`, "
            f"{m['cpu_count']} cores, {'GPU' if m.get('gpu') else 'no GPU'}; "
            f"{a['runs']} warm runs. "
            f"Cold start to first result: {a['cold_start_to_first_result_s']} s in-process "
            f"(import + model load + first analyze), {cold.get('median', '–')} s from a fresh "
            f"interpreter (median of {len(cold.get('runs', []))}); peak RSS {a['peak_rss_mb']} MB.",
            "",
            "| image | views in the forward | analyze p50 (ms) | analyze p95 (ms) "
            "| bare forward p50 (ms) | ratio | goal: 1.2 × forward + 10 ms | met "
            "| single-view forward p50 (ms) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        parts += [
            f"| {label} | {len(r.get('views', [1]))} | {r['analyze_p50_ms']} | "
            f"{r['analyze_p95_ms']} | {r['encoder_forward_p50_ms']} | "
            f"{r['ratio_analyze_to_forward']} | {r.get('goal_ms', '–')} | "
            f"{'yes' if r.get('meets_goal') else 'no'} | "
            f"{r.get('single_view_forward_p50_ms', '–')} |"
            for label, r in a["latency"].items()
        ]
        parts.append("")
    others = sorted(
        p.name
        for p in (DOCS / "results" / "benchmarks").glob("*.json")
        if p.stem not in ("throughput", "analyze_latency")
    )
    if others:
        parts.append(
            "Other benchmarks (vector search, API load, ingest; their own tables are in their "
            "docs): " + ", ".join(f"[{n}](results/benchmarks/{n})" for n in others) + "."
        )
    return "\n".join(parts).rstrip() or "_No benchmark results yet: run `benchmarks/run_all.sh`._"


# The figures a model change is judged by (issue 4), as (protocol, label, path into the
# result JSON); the baseline is the result JSON of the model before, in results/baseline/.
CHANGE_ROWS = (
    ("derm7-dermamnist", "accuracy (bar: AutoML Vision 0.768)", ("accuracy",)),
    ("derm7-dermamnist", "macro AUROC", ("macro_auroc",)),
    ("derm7-isic2018", "balanced accuracy", ("balanced_accuracy",)),
    (
        "derm7-isic2018",
        "melanoma sensitivity at the stored threshold",
        ("operating_point", "sensitivity"),
    ),
    (
        "derm7-isic2018",
        "melanoma specificity at the stored threshold",
        ("operating_point", "specificity"),
    ),
    ("derm7-isic2018", "stored melanoma threshold", ("operating_point", "threshold")),
    (
        "pad-ufes-20",
        "image-only balanced accuracy, held-out fold 4",
        ("modalities", "image", "folds", "balanced_accuracy_held_out"),
    ),
    ("dermnet", "top-1 accuracy", ("accuracy",)),
    ("pneumonia", "AUROC", ("auroc",)),
    ("covid-notes", "image→notes Recall@10", ("image_to_text_recall_at_10",)),
)
CALIBRATION_PATHS = {  # where each protocol keeps its calibration block
    "pad-ufes-20": ("modalities", "image", "calibration"),
    "covid-notes": ("classification", "calibration"),
}


def _get(r: dict[str, Any] | None, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(r, dict):
            return None
        r = r.get(key)
    return r


def _model_id(results: dict[str, dict[str, Any]]) -> str:
    models = {
        (r["model"]["name"], r["model"]["fingerprint"]) for r in results.values() if "model" in r
    }
    return ", ".join(f"`{n}` `{f}`" for n, f in sorted(models)) or "–"


def change_section(results: dict[str, dict[str, Any]]) -> str:
    """Before (results/baseline/) and after (this run) for the headline figures and the
    ECE of every protocol before and after calibration."""
    base: dict[str, dict[str, Any]] = {}
    for name in protocols():
        f = DOCS / "results" / "baseline" / f"{name}.json"
        if f.is_file():
            base[name] = json.loads(f.read_text())
    if not base:
        return "_No baseline in docs/results/baseline/._"
    lines = [
        f"Before: {_model_id(base)}. After: {_model_id(results)}.",
        "",
        "| protocol | metric | before | after |",
        "|---|---|---|---|",
    ]
    for name, label, path in CHANGE_ROWS:
        b, a = _get(base.get(name), path), _get(results.get(name), path)
        lines.append(f"| {name} | {label} | {fmt(b)} | {fmt(a)} |")
    lines += [
        "",
        "ECE (15 bins) on each protocol's evaluated split: uncalibrated (T = 1), with the "
        "model's stored calibration (temperature, plus per-finding offsets where the model "
        "stores them), and at a temperature fitted on that dataset's own validation data.",
        "",
        "| protocol | before: T = 1 / stored | after: T = 1 / stored / val-fitted T |",
        "|---|---|---|",
    ]
    for name in protocols():
        path = CALIBRATION_PATHS.get(name, ("calibration",))
        cb, ca = _get(base.get(name), path), _get(results.get(name), path)
        if not ca:
            continue

        def ece(c: Any, key: str) -> str:
            return fmt(_get(c, (key, "ece")))

        lines.append(
            f"| {name} | {ece(cb, 'uncalibrated')} / {ece(cb, 'model_temperature')} | "
            f"{ece(ca, 'uncalibrated')} / **{ece(ca, 'model_temperature')}** / "
            f"{ece(ca, 'fitted_temperature')} |"
        )
    return "\n".join(lines)


SECTIONS = {
    "summary": summary_section,
    "change": change_section,
    "anchors": anchors_section,
    "details": details_section,
}  # "benchmarks" reads its own JSON

TEMPLATE = """# MedLens results

<!-- BEGIN GENERATED: summary -->
<!-- END GENERATED: summary -->

<!-- BEGIN GENERATED: change -->
<!-- END GENERATED: change -->

<!-- BEGIN GENERATED: anchors -->
<!-- END GENERATED: anchors -->

<!-- BEGIN GENERATED: benchmarks -->
<!-- END GENERATED: benchmarks -->

<!-- BEGIN GENERATED: details -->
<!-- END GENERATED: details -->
"""


def render(text: str, results: dict[str, dict[str, Any]]) -> str:
    def body(name: str) -> str:
        if name == "benchmarks":
            return benchmarks_section()
        if not results:
            return "_No protocol results yet: run `medlens eval all --out results`._"
        return SECTIONS[name](results)

    return MARK.sub(lambda m: f"{m.group(1)}{body(m.group('name'))}\n{m.group(4)}", text)


def main() -> None:
    global DOCS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--results", type=Path, help="a run's output folder to copy in first")
    ap.add_argument("--allow-smoke", action="store_true", help="accept --limit/--smoke runs")
    ap.add_argument("--check", action="store_true", help="exit 1 if RESULTS.md is out of date")
    ap.add_argument("--docs", type=Path, default=DOCS, help="docs folder (default: docs/)")
    args = ap.parse_args()
    DOCS = args.docs
    results_md = DOCS / "RESULTS.md"
    if args.results:
        copied = copy_in(args.results, args.allow_smoke)
        print(f"copied {len(copied)} files from {args.results} into docs/")
    text = results_md.read_text() if results_md.is_file() else TEMPLATE
    new = render(text, load_results())
    if args.check:
        if new != text:
            sys.exit("docs/RESULTS.md is out of date: run python scripts/make_results.py")
        print("docs/RESULTS.md is up to date")
        return
    results_md.parent.mkdir(parents=True, exist_ok=True)
    results_md.write_text(new)
    print(f"wrote {results_md}")


if __name__ == "__main__":
    main()
