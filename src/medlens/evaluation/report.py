"""Markdown from a protocol's metrics object: one report per run, and the rows that
docs/RESULTS.md tabulates (``scripts/make_results.py`` uses the same functions, so the
document and the per-run reports can never disagree)."""

from __future__ import annotations

from typing import Any

Row = tuple[str, Any, Any]  # (label, value, CI [lo, hi] or "± sd" text or None)


def fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def fmt_ci(ci: Any) -> str:
    if ci is None:
        return ""
    if isinstance(ci, str):
        return ci
    lo, hi = ci
    return "" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"


def _mean_sd(d: dict | None, n: int) -> str | None:
    if not d or d.get("mean") is None:
        return None
    return f"± {d['sd']:.3f} (sd over {n} folds)"


def _classification_rows(r: dict[str, Any], prefix: str = "") -> list[Row]:
    rows: list[Row] = []
    folds = r.get("folds")
    if folds:
        held = folds.get("held_out_folds") or []
        n_all = len(folds["per_fold"])
        if len(held) < n_all:  # some folds were seen in training: lead with the others
            which = ", ".join(str(f) for f in held) or "none"
            for key, label in (
                ("balanced_accuracy", "balanced accuracy"),
                ("macro_auroc", "macro AUROC"),
            ):
                rows.append(
                    (
                        f"{prefix}{label}, held-out fold(s) {which}",
                        folds.get(f"{key}_held_out"),
                        folds.get(f"{key}_held_out_ci"),
                    )
                )
        note = "" if len(held) == n_all else ", incl. folds seen in training"
        for key, label in (
            ("balanced_accuracy", "balanced accuracy"),
            ("macro_auroc", "macro AUROC"),
        ):
            rows.append(
                (
                    f"{prefix}{label} ({n_all}-fold mean{note})",
                    folds[f"{key}_mean_sd"]["mean"],
                    _mean_sd(folds[f"{key}_mean_sd"], n_all),
                )
            )
    majority = r.get("majority_class_accuracy")
    rows += [
        (
            f"{prefix}accuracy" + (f" (majority class: {fmt(majority)})" if majority else ""),
            r.get("accuracy"),
            r.get("accuracy_ci"),
        ),
        (f"{prefix}balanced accuracy", r.get("balanced_accuracy"), r.get("balanced_accuracy_ci")),
        (f"{prefix}macro AUROC", r.get("macro_auroc"), r.get("macro_auroc_ci")),
    ]
    for k in (1, 3, 5):
        if f"top{k}_accuracy" in r:
            rows.append(
                (f"{prefix}top-{k} accuracy", r[f"top{k}_accuracy"], r[f"top{k}_accuracy_ci"])
            )
    for key, g in r.items():
        if isinstance(g, dict) and "findings" in g and "f1" in g:
            rows += [
                (f"{prefix}{key} vs rest AUROC", g["auroc"], g["auroc_ci"]),
                (f"{prefix}{key} F1 @ {g['threshold']}", g["f1"], g["f1_ci"]),
                (f"{prefix}{key} sensitivity", g["sensitivity"], g["sensitivity_ci"]),
                (f"{prefix}{key} specificity", g["specificity"], g["specificity_ci"]),
            ]
    if g := r.get("groups"):  # a coarser evaluation vocabulary (Derm7pt's 5 groups)
        names = ", ".join(g["findings"])
        rows += [
            (
                f"{prefix}groups: balanced accuracy ({names}; n={g['n']})",
                g["balanced_accuracy"],
                g["balanced_accuracy_ci"],
            ),
            (f"{prefix}groups: macro AUROC", g["macro_auroc"], g["macro_auroc_ci"]),
        ]
        rows += [
            (f"{prefix}groups: {k.removesuffix('_auroc')} AUROC", v, g.get(f"{k}_ci"))
            for k, v in g.items()
            if k.endswith("_auroc") and k != "macro_auroc"
        ]
    op = r.get("operating_point")
    if op and op.get("threshold") is not None:
        f, t = op["finding"], op["threshold"]
        rows += [
            (f"{prefix}{f} AUROC", op["auroc"], op["auroc_ci"]),
            (f"{prefix}{f} sensitivity @ {t}", op["sensitivity"], op["sensitivity_ci"]),
            (f"{prefix}{f} specificity @ {t}", op["specificity"], op["specificity_ci"]),
        ]
    return rows


def _calibration_rows(cal: dict[str, Any] | None, prefix: str = "") -> list[Row]:
    if not cal:
        return []
    rows: list[Row] = [(f"{prefix}ECE (T = 1)", cal["uncalibrated"]["ece"], None)]
    if cal.get("model_temperature"):
        m = cal["model_temperature"]
        how = " + stored offsets" if m.get("bias") else ""
        rows.append((f"{prefix}ECE (model T = {m['temperature']}{how})", m["ece"], None))
    if cal.get("fitted_temperature"):
        f = cal["fitted_temperature"]
        t = f["temperature"]
        label = "cross-fitted T" if isinstance(t, dict) else f"val-fitted T = {t}"
        rows.append((f"{prefix}ECE ({label})", f["ece"], None))
    return rows


def headline_rows(r: dict[str, Any]) -> list[Row]:
    """The figures a reader looks for first, with their CIs, for any protocol kind."""
    kind = r.get("kind")
    if kind == "classification":
        if "modalities" in r:
            rows: list[Row] = []
            for m, res in r["modalities"].items():
                rows += _classification_rows(res, f"{m}: ")
            return rows + _calibration_rows(r.get("calibration"), "image: ")
        return _classification_rows(r) + _calibration_rows(r.get("calibration"))
    if kind == "binary":
        rows = [
            ("AUROC", r["auroc"], r["auroc_ci"]),
            (f"accuracy @ {r['threshold']}", r["accuracy"], r["accuracy_ci"]),
            (f"sensitivity @ {r['threshold']}", r["sensitivity"], None),
            (f"specificity @ {r['threshold']}", r["specificity"], None),
        ]
        op = r.get("operating_point")
        if op and op.get("threshold") is not None:
            t = op["threshold"]
            rows += [
                (f"sensitivity @ triage {t}", op["sensitivity"], op["sensitivity_ci"]),
                (f"specificity @ triage {t}", op["specificity"], op["specificity_ci"]),
            ]
        return rows + _calibration_rows(r.get("calibration"))
    if kind == "retrieval":
        rows = []
        for d, label in (("image_to_text", "image→notes"), ("text_to_image", "notes→image")):
            b = r[d]
            ks = sorted(
                int(k.rsplit("_", 1)[1])
                for k in b
                if k.startswith("recall_at_") and not k.endswith("_ci")
            )
            for k in ks:
                key = f"recall_at_{k}"
                chance = b.get(f"chance_recall_at_{k}")
                rows.append((f"{label} R@{k} (chance {fmt(chance)})", b[key], b.get(f"{key}_ci")))
            rows.append(
                (
                    f"{label} median rank (of {b['candidates']})",
                    b["median_rank"],
                    b.get("median_rank_ci"),
                )
            )
        c = r.get("classification") or {}
        if c.get("n"):
            rows += [
                (
                    f"finding top-1 accuracy (n={c['n']}; majority class: "
                    f"{fmt(c.get('majority_class_accuracy'))})",
                    c["accuracy"],
                    c["accuracy_ci"],
                ),
                ("finding macro AUROC", c["macro_auroc"], None),
            ]
            rows += _calibration_rows(c.get("calibration"), "findings: ")
        return rows
    if kind == "domain":
        rows = [("accuracy", r["accuracy"], r["accuracy_ci"])]
        rows += [(f"{n} (n={d['n']})", d["accuracy"], None) for n, d in r["per_dataset"].items()]
        return rows
    return []


def table(rows: list[Row]) -> str:
    out = ["| metric | value | 95% CI |", "|---|---|---|"]
    out += [f"| {label} | {fmt(v)} | {fmt_ci(ci)} |" for label, v, ci in rows]
    return "\n".join(out)


def anchors_table(r: dict[str, Any]) -> str:
    if not r.get("anchors"):
        return ""
    out = ["| published anchor | metric | value | note |", "|---|---|---|---|"]
    for a in r["anchors"]:
        out.append(f"| {a['source']} | {a['metric']} | {fmt(a['value'])} | {a.get('note', '')} |")
    return "\n".join(out)


def provenance(r: dict[str, Any]) -> str:
    m, ds, mach = r["model"], r["dataset"], r["machine"]
    gpu = mach.get("gpu") or "no GPU"
    version = ds.get("version") or ", ".join(f"{k} {v}" for k, v in ds.get("versions", {}).items())
    lines = [
        f"- command: `{r.get('command', 'medlens eval ' + r['protocol'])}`",
        f"- date: {r['date']}; took {r['seconds']} s",
        f"- machine: {mach['cpu_count']} CPU cores, {mach['ram_gib']} GiB RAM, {gpu}, "
        f"torch {mach['torch']}",
        f"- model: `{m['name']}` fingerprint `{m['fingerprint']}`"
        + (
            f", trained {m['trained_at']} on {', '.join(m['trained_on'])}"
            if m["trained_on"]
            else ""
        ),
        f"- dataset: `{ds['name']}` version `{version}`"
        + (f", split `{ds['split']}`" if ds.get("split") else "")
        + f", n = {ds['n']}"
        + ("" if ds.get("version_matches", True) else " (**not the protocol's reference copy**)"),
    ]
    if r.get("limit"):
        lines.append(f"- **smoke run**: limited to {r['limit']} records; not a result")
    seen = r.get("seen_in_training")
    if seen:
        lines.append(f"- held-out status: {seen['note']}")
    return "\n".join(lines)


def render_markdown(r: dict[str, Any], plots_dir: str = "plots") -> str:
    """The per-run report written beside the metrics JSON."""
    parts = [f"# {r['protocol']}: {r.get('title', '')}", "", provenance(r), ""]
    if r.get("caveat"):
        parts += [f"> **Caveat:** {r['caveat']}", ""]
    parts += [table(headline_rows(r)), ""]
    if r.get("per_class"):
        parts += [
            "## Per class",
            "",
            "| class | recall | specificity | support |",
            "|---|---|---|---|",
        ]
        parts += [
            f"| {c} | {fmt(v['recall'])} | {fmt(v['specificity'])} | {v['support']} |"
            for c, v in r["per_class"].items()
        ]
        parts.append("")
    folds = r.get("folds")
    if folds:
        head = "| fold | split | seen by model | n | balanced acc. | macro AUROC |"
        parts += ["## Folds (image)", "", head, "|---|---|---|---|---|---|"]
        parts += [
            f"| {f['fold']} | {f['split']} | {'yes' if f['seen_by_model'] else 'no'} | {f['n']} | "
            f"{fmt(f['balanced_accuracy'])} | {fmt(f['macro_auroc'])} |"
            for f in folds["per_fold"]
        ]
        parts.append("")
    if r.get("modality_notes"):
        parts += ["## Modalities", ""]
        parts += [f"- **{k}**: {v or 'not available yet'}" for k, v in r["modality_notes"].items()]
        parts.append("")
    if r.get("anchors"):
        parts += ["## Published anchors", "", anchors_table(r), ""]
    if r.get("plots"):
        parts += ["## Plots", ""]
        parts += [f"![{p}]({plots_dir}/{p})" for p in r["plots"]]
        parts.append("")
    return "\n".join(parts)
