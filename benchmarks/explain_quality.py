"""Measured quality of the explanations (issue 14): faithfulness, prompt sensitivity,
concept detection and localisation, for the default encoder.

Full run (the default sizes below; ~1-2 h on the 2-core box):

    MEDLENS_DATA=../shared/data python benchmarks/explain_quality.py

Smaller runs cap every set: ``--limit 150`` (what docs/explain_quality.md reports until
the full run replaces it), ``--limit 3`` for a smoke run (tests/test_explain.py).
Writes ``--out`` (docs/explain_quality.md, with the command in it) and ``--json``
(docs/results/explain/quality.json).

Sets and default sizes (``DEFAULT_N``; drawn with numpy seed 0, sorted by id):

- **faithfulness** on ``isic2018`` (ISIC 2018 Task 3 test, 1,512), ``pneumoniamnist``
  test (468 chest X-rays, 28 px upsampled) and ``covid_chestxray`` test (86 chest
  X-rays at their own resolution): up to 300 each (``--faith-split dev``: HAM10000,
  PneumoniaMNIST and covid-chestxray ``val`` instead, to check the protocol without
  touching a test split). For the finding the model ranks first (calibrated
  probabilities of the scoring rule from the whole-frame input the maps are computed
  on, no test-time flips), pixels of the model input are deleted or inserted (into a
  blurred copy) in the order of the map, in ``--steps`` equal steps; the curve is that
  finding's probability, its AUC the mean over the steps (trapezoid on [0, 1]).
  Deletion *imputes* the deleted pixels from the pixels still present
  (``deletion_impute``, **the primary curve**: ``push_pull``, a masked image pyramid,
  a cheap cousin of ROAD's noisy linear imputation, Rong et al. 2022, "A Consistent
  and Efficient Evaluation Strategy for Attribution Methods", ICML) or sets them to the
  normalisation mean (``deletion``, the protocol of the first runs, kept for
  comparison). The imputation was chosen on the dev sets, before the test run: a grey
  (mean) or blurred fill leaves a lesion-shaped blob in a dermoscopy image and adds an
  opacity to a chest X-ray, both evidence of their own, so deleting the lesion first did
  not remove what the model sees there (dev: Grad-CAM above the random map with either
  fill). Orders: text saliency, Grad-CAM, and two random orders (seeded per image):
  ``random_map``, a uniform random map on the saliency grid (the Grad-CAM grid's shape)
  upsampled exactly as the maps are, **the primary baseline** (fixed before any run):
  both orders then delete blobs of the same size and smoothness and differ only in
  *where*; and ``random``, a random pixel order, which scatters single deleted pixels
  over the whole frame, a shape no map has (the shape confound of removal-based
  metrics, Rong et al. 2022), reported as a second row. Lower deletion AUC and higher
  insertion AUC than random = the map ranks pixels the score depends on.
- **prompt sensitivity** on the first ``N_SENS`` (50) images of each faithfulness set:
  the mean pairwise Spearman rho between text-saliency maps of (a) the image's 7
  top-scored findings,
  (b) the pack's concepts, (c) unrelated concepts: each dermoscopic concept paired with
  each chest X-ray concept on the same image; Grad-CAM over those 7 findings on the first
  ``N_SENS_GRADCAM`` (20). The issue's bar: above 0.9 for unrelated concepts fails.
- **concept detection** on ``derm7pt`` test, dermoscopic images (395): AUROC of each
  7-point criterion's concept logit (the pack's ``concepts`` prompts, scored as
  ``explain.concepts`` scores them) for criterion present vs absent (``CRITERIA``).
- **localisation** on HAM10000 test-lesion images (the subset rule of
  ``scripts/explain_localisation.py``: 300): energy inside the lesion mask and the
  pointing game for the true finding, text saliency and Grad-CAM against a centred
  Gaussian of the same mass.

Means come with 95 % bootstrap CIs (``evaluation.metrics.bootstrap_ci``, 1,000
resamples of images) and paired differences to the baseline.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_N = {"faithfulness": 300, "derm7pt": 395, "ham10000": 300}  # faithfulness: per set
N_SENS, N_SENS_GRADCAM = 50, 20
N_TOP_FINDINGS = 7  # prompt sensitivity over each image's 7 top-scored findings
# --faith-split -> {dataset: (domain, split)}; "dev" checks the protocol off the test splits.
FAITHFULNESS = {
    "test": {
        "isic2018": ("dermatology", "test"),
        "pneumoniamnist": ("chest_xray", "test"),
        "covid_chestxray": ("chest_xray", "test"),
    },
    "dev": {
        "ham10000": ("dermatology", "val"),
        "pneumoniamnist": ("chest_xray", "val"),
        "covid_chestxray": ("chest_xray", "val"),
    },
}
FAITHFULNESS_SETS = FAITHFULNESS["test"]
CURVES = ("deletion_impute", "deletion", "insertion")
PRIMARY_CURVE = "deletion_impute"
MAPS = ("text", "gradcam")
BASELINES = ("random_map", "random")  # the first is the primary baseline
# 7-point checklist (Argenziano 1998) criteria in Derm7pt's columns (Kawahara et al. 2019):
# concept id -> (meta column, values that count as "present").
CRITERIA = {
    "atypical_pigment_network": ("pigment_network", {"atypical"}),
    "blue_whitish_veil": ("blue_whitish_veil", {"present"}),
    "atypical_vascular_pattern": ("vascular_structures", {"dotted", "linear irregular"}),
    "irregular_streaks": ("streaks", {"irregular"}),
    "irregular_pigmentation": ("pigmentation", {"diffuse irregular", "localized irregular"}),
    "irregular_dots_globules": ("dots_and_globules", {"irregular"}),
    "regression_structures": (
        "regression_structures",
        {"blue areas", "white areas", "combinations"},
    ),
}


def _pick(records: list[Any], n: int, seed: int = 0) -> list[Any]:
    records = sorted(records, key=lambda r: r.id)
    if n >= len(records):
        return records
    idx = np.random.default_rng(seed).choice(len(records), size=n, replace=False)
    return [records[i] for i in sorted(idx)]


def _ci(values: np.ndarray) -> dict[str, Any]:
    from medlens.evaluation.metrics import bootstrap_ci

    values = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(np.mean, values)
    return {"mean": round(float(values.mean()), 4), "ci": [round(lo, 4), round(hi, 4)]}


def _paired(values: np.ndarray, base: np.ndarray) -> dict[str, Any]:
    out = _ci(values)
    d = _ci(np.asarray(values) - np.asarray(base))
    return {**out, "minus_baseline": d["mean"], "minus_baseline_ci": d["ci"]}


def mean_pairwise_rho(maps: list[np.ndarray], pairs: list[tuple[int, int]] | None = None) -> float:
    from medlens.explain.saliency import rank_correlation

    pairs = pairs or list(itertools.combinations(range(len(maps)), 2))
    return float(np.mean([rank_correlation(maps[i], maps[j]) for i, j in pairs]))


# -- faithfulness -------------------------------------------------------------------------
def curve_auc(p: np.ndarray) -> float:
    """AUC of a curve sampled at equal steps on [0, 1] (trapezoid)."""
    p = np.asarray(p, dtype=np.float64)
    return float((p[:-1] + p[1:]).sum() / (2 * (len(p) - 1)))


def perturbation_batch(
    x: torch.Tensor, order: np.ndarray, steps: int, start: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    """(steps + 1, C, H, W): ``start`` with the first k/steps of ``order`` (flat pixel
    indices, most salient first) taken from ``fill``, k = 0..steps."""
    _, c, h, w = x.shape
    n = h * w
    out = start.expand(steps + 1, c, h, w).clone().reshape(steps + 1, c, n)
    src = fill.reshape(1, c, n)
    for k in range(1, steps + 1):
        idx = torch.as_tensor(order[: round(n * k / steps)])
        out[k][:, idx] = src[0][:, idx]
    return out.reshape(steps + 1, c, h, w)


def push_pull(x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) with the pixels where ``known`` (N, 1, H, W; 1 = kept, 0 =
    deleted) is 0 filled from the kept ones: masked averages down an image pyramid,
    then bilinear back up, each level filling only what the finer one lacks (push-pull,
    Gortler et al. 1996). A deleted blob takes the smooth shading of its surroundings,
    so deletion removes evidence instead of painting a new shape; nothing kept → zeros
    (the normalisation mean)."""
    h, w = x.shape[2:]
    if min(h, w) <= 1:
        tot = known.sum(dim=(2, 3), keepdim=True)
        mean = (x * known).sum(dim=(2, 3), keepdim=True) / tot.clamp_min(1e-8)
        return known * x + (1 - known) * mean.expand_as(x)
    wsum = torch.nn.functional.avg_pool2d(known, 2, ceil_mode=True)
    xs = torch.nn.functional.avg_pool2d(x * known, 2, ceil_mode=True) / wsum.clamp_min(1e-8)
    coarse = push_pull(xs, (wsum > 0).to(x.dtype))
    up = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return known * x + (1 - known) * up


def imputed_deletion_batch(x: torch.Tensor, order: np.ndarray, steps: int) -> torch.Tensor:
    """(steps + 1, C, H, W): ``x`` with the first k/steps of ``order`` deleted and
    imputed by ``push_pull``, k = 0..steps."""
    _, c, h, w = x.shape
    n = h * w
    known = torch.ones(steps + 1, 1, n, dtype=x.dtype)
    for k in range(1, steps + 1):
        known[k, 0, torch.as_tensor(order[: round(n * k / steps)])] = 0
    return push_pull(x.expand(steps + 1, c, h, w), known.reshape(steps + 1, 1, h, w))


def faithfulness_one(
    enc: Any, pack: Any, card: Any, pixels: np.ndarray, steps: int, seed: int
) -> dict[str, Any]:
    from torchvision.transforms.v2 import functional as TF

    from medlens.analysis import scoring, zeroshot
    from medlens.explain import saliency

    cls = zeroshot.finding_embeddings(enc, pack)
    ref = zeroshot.reference_embedding(enc, pack) if pack.task == "multi_label" else None
    model = saliency.FindingLogits(enc, cls, ref).eval()
    x = saliency.frame_tensor(enc, pixels).float()
    h, w = x.shape[2:]

    def probs(batch: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            z = model(batch).numpy()
        return scoring.calibrated(z, pack, card.calibration)

    p0 = probs(x)[0]
    k = int(np.argmax(p0))
    fid = pack.finding_ids[k]
    grids = {
        "text": saliency.text_saliency(enc, pixels, saliency.finding_target(enc, pack, fid)).grid,
        "gradcam": saliency.gradcam(enc, pixels, pack, fid, calibration=card.calibration).grid,
    }
    rng = np.random.default_rng(seed)

    def order_of(grid: np.ndarray) -> np.ndarray:
        up = saliency.upsample(grid, (h, w)).ravel()
        tie = rng.random(up.size) * 1e-6  # random tie-break (a flat map is a random order)
        return np.argsort(-(up + tie), kind="stable")

    orders = {m: order_of(g) for m, g in grids.items()}
    orders["random_map"] = order_of(rng.random(grids["gradcam"].shape))
    orders["random"] = rng.permutation(h * w)
    blurred = TF.gaussian_blur(x, kernel_size=[51, 51], sigma=[16.0, 16.0])
    mean = torch.zeros_like(x)  # the normalisation mean: "no information" in the input
    out: dict[str, Any] = {"finding": fid, "p0": float(p0[k])}
    for m, order in orders.items():
        out[m] = {
            "deletion": curve_auc(probs(perturbation_batch(x, order, steps, x, mean))[:, k]),
            "deletion_impute": curve_auc(probs(imputed_deletion_batch(x, order, steps))[:, k]),
            "insertion": curve_auc(probs(perturbation_batch(x, order, steps, blurred, x))[:, k]),
        }
    return out


def run_faithfulness(enc, card, name: str, n: int, steps: int, split: str = "test") -> dict:
    from medlens.datasets import load_dataset
    from medlens.knowledge import load_domain

    domain, rec_split = FAITHFULNESS[split][name]
    man = load_dataset(name)
    pack = load_domain(domain)
    recs = _pick([r for r in man.records if r.split == rec_split], n)
    rows = []
    for i, r in enumerate(recs):
        rows.append(faithfulness_one(enc, pack, card, man.image(r), steps, seed=i))
        print(f"\r{name} faithfulness {i + 1}/{len(recs)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    res: dict[str, Any] = {
        "dataset": name,
        "split": rec_split,
        "domain": pack.id,
        "n": len(rows),
        "steps": steps,
        "top_findings": {f: sum(r["finding"] == f for r in rows) for f in pack.finding_ids},
        "mean_p0": round(float(np.mean([r["p0"] for r in rows])), 4),
    }
    for curve in CURVES:
        vals = {m: np.array([r[m][curve] for r in rows]) for m in MAPS + BASELINES}
        res[curve] = {b: _ci(vals[b]) for b in BASELINES}
        for m in MAPS:
            # minus_baseline: against the primary baseline; vs: against each one
            res[curve][m] = _paired(vals[m], vals[BASELINES[0]])
            res[curve][m]["vs"] = {
                b: _paired(vals[m], vals[b])["minus_baseline_ci"] for b in BASELINES
            }
            res[curve][m]["vs_mean"] = {
                b: round(float((vals[m] - vals[b]).mean()), 4) for b in BASELINES
            }
    return res


def run_sensitivity(enc, card, name: str, n: int, n_gradcam: int) -> dict[str, Any]:
    from medlens.datasets import load_dataset
    from medlens.explain import concepts, saliency
    from medlens.knowledge import load_domain

    man = load_dataset(name)
    pack = load_domain(FAITHFULNESS_SETS[name][0])
    derm, chest = load_domain("dermatology"), load_domain("chest_xray")

    def concept_targets(p):
        emb, _ = concepts.concept_embeddings(enc, p)
        return [
            saliency.Target(c.id, c.name, e) for c, e in zip(p.domain.concepts, emb, strict=True)
        ]

    from medlens.analysis import scoring

    all_ft = {f: saliency.finding_target(enc, pack, f) for f in pack.finding_ids}
    dt, ct = concept_targets(derm), concept_targets(chest)
    nf = N_TOP_FINDINGS
    own = dt if pack.id == "dermatology" else ct
    nd = len(dt)
    cross = [(nf + i, nf + nd + j) for i in range(nd) for j in range(len(ct))]
    own_off = nf if pack.id == "dermatology" else nf + nd
    own_pairs = [(own_off + i, own_off + j) for i, j in itertools.combinations(range(len(own)), 2)]
    recs = _pick([r for r in man.records if r.split == "test"], n)
    fin, con, unrel, gc = [], [], [], []
    for i, r in enumerate(recs):
        px = man.image(r)
        z = scoring.finding_logits(enc, pack, enc.embed_images([px]))[0]
        top = [pack.finding_ids[j] for j in np.argsort(-z)[:nf]]  # the image's top findings
        ft = [all_ft[f] for f in top]
        maps = [s.map for s in saliency.text_saliencies(enc, px, ft + dt + ct)]
        fin.append(mean_pairwise_rho(maps[:nf]))
        con.append(mean_pairwise_rho(maps, own_pairs))
        unrel.append(mean_pairwise_rho(maps, cross))
        if i < n_gradcam:
            gc.append(
                mean_pairwise_rho(
                    [
                        saliency.gradcam(enc, px, pack, f, calibration=card.calibration).map
                        for f in top
                    ]
                )
            )
        print(f"\r{name} sensitivity {i + 1}/{len(recs)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {
        "dataset": name,
        "n_images": len(recs),
        "n_images_gradcam": len(gc),
        "text_findings": _ci(np.array(fin)),
        "text_own_concepts": _ci(np.array(con)),
        "text_unrelated_concepts": _ci(np.array(unrel)),
        "gradcam_findings": _ci(np.array(gc)) if gc else None,
        "statistic": "mean over images of the mean pairwise Spearman rho between maps",
        "unrelated_pairs": "each dermoscopic 7-point concept x each chest X-ray concept",
    }


# -- concept detection --------------------------------------------------------------------
def run_concepts(enc, n: int) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    from medlens.analysis import scoring
    from medlens.datasets import load_dataset
    from medlens.evaluation.metrics import bootstrap_ci
    from medlens.explain import concepts
    from medlens.knowledge import load_domain

    man = load_dataset("derm7pt", view="derm")
    pack = load_domain("dermatology")
    recs = _pick([r for r in man.records if r.split == "test"], n)
    embs = []
    for i in range(0, len(recs), 16):
        embs.append(enc.embed_images([man.image(r) for r in recs[i : i + 16]]))
        print(f"\rderm7pt {min(i + 16, len(recs))}/{len(recs)}", end="", file=sys.stderr)
    print(file=sys.stderr)
    emb = np.vstack(embs)
    cls, ref = concepts.concept_embeddings(enc, pack)
    z = scoring.logits_from(emb, cls, float(enc.logit_scale), ref)
    ids = [c.id for c in pack.domain.concepts]
    out = {}
    for cid, (col, present) in CRITERIA.items():
        if cid not in ids:
            out[cid] = {"error": "no concept with this id in the dermatology pack"}
            continue
        y = np.array([str(r.meta.get(col, "")).strip() in present for r in recs], dtype=int)
        s = z[:, ids.index(cid)]
        row: dict[str, Any] = {"column": col, "present": sorted(present), "n_pos": int(y.sum())}
        if 0 < y.sum() < len(y):
            lo, hi = bootstrap_ci(roc_auc_score, y, s)
            row |= {
                "auroc": round(float(roc_auc_score(y, s)), 4),
                "ci": [round(lo, 4), round(hi, 4)],
            }
        out[cid] = row
    return {"dataset": "derm7pt", "split": "test", "view": "derm", "n": len(recs), "criteria": out}


# -- localisation -------------------------------------------------------------------------
def _localisation_helpers():
    path = ROOT / "scripts" / "explain_localisation.py"
    spec = importlib.util.spec_from_file_location("explain_localisation", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_localisation(enc, card, n: int) -> dict[str, Any]:
    from medlens.explain import saliency
    from medlens.io import load_image
    from medlens.knowledge import load_domain

    loc = _localisation_helpers()
    root = Path(os.environ.get("MEDLENS_DATA", "../shared/data")) / "ham10000"
    pack = load_domain("dermatology")
    rows = loc.subset(root, n)
    names = ("text", "gradcam", "gaussian")
    energy: dict[str, list[float]] = {m: [] for m in names}
    hits: dict[str, list[float]] = {m: [] for m in names}
    with zipfile.ZipFile(root / "masks_200x150.zip") as zf:
        for i, r in enumerate(rows):
            px = load_image(root / "images" / f"{r['image_id']}.jpg").pixels
            mask = loc.mask_of(zf, r["image_id"])
            fid = pack.map_label("ham10000", r["dx"])
            maps = {
                "text": saliency.explain(enc, px, pack, finding=fid).map,
                "gradcam": saliency.explain(
                    enc, px, pack, finding=fid, method="gradcam", calibration=card.calibration
                ).map,
            }
            maps["gaussian"] = saliency.centred_gaussian(mask.shape, mass=float(maps["text"].sum()))
            for m in names:
                energy[m].append(saliency.energy_inside(maps[m], mask))
                hits[m].append(float(saliency.pointing_hit(maps[m], mask)))
            print(f"\rham10000 localisation {i + 1}/{len(rows)}", end="", file=sys.stderr)
    print(file=sys.stderr)
    e = {m: np.array(v) for m, v in energy.items()}
    h = {m: np.array(v) for m, v in hits.items()}
    return {
        "dataset": "ham10000",
        "rule": "split == test and dermamnist_split == test, one image per lesion, seed 0",
        "n": len(rows),
        "energy_in_lesion": {m: _paired(e[m], e["gaussian"]) for m in names},
        "pointing_game": {m: _paired(h[m], h["gaussian"]) for m in names},
    }


# -- the report ---------------------------------------------------------------------------
def _fmt(d: dict[str, Any], key: str = "mean") -> str:
    return f"{d[key]:.3f} ({d['ci'][0]:.3f}–{d['ci'][1]:.3f})"


def _diff(d: dict[str, Any]) -> str:
    lo, hi = d["minus_baseline_ci"]
    return f"{d['minus_baseline']:+.3f} ({lo:+.3f} to {hi:+.3f})"


def _vs(d: dict[str, Any], base: str) -> str:
    lo, hi = d["vs"][base]
    return f"{d['vs_mean'][base]:+.3f} ({lo:+.3f} to {hi:+.3f})"


CURVE_TEXT = {
    "deletion": "deletion, pixels set to the normalisation mean (first protocol; lower is better)",
    "deletion_impute": "deletion, pixels imputed from the rest (primary; lower is better)",
    "insertion": "insertion into a blurred copy (higher is better)",
}


def faithfulness_markdown(faith: list[dict[str, Any]]) -> list[str]:
    """One table per curve: each map against both random orders, then the verdicts."""
    lines = [
        "## Faithfulness: deletion and insertion for the top finding",
        "",
        "The finding the model ranks first; its calibrated probability as input pixels are "
        "deleted or inserted in the map's order or a random order. AUC = mean probability "
        "over the curve. Δ = paired difference (map − random order), 95 % bootstrap CI. "
        "*Random map* (the primary baseline) = a uniform random map on the saliency grid, "
        "upsampled as the maps are, so it deletes blobs of the same shape; *random pixels* "
        "= a random pixel order (scattered single pixels). Splits: "
        + ", ".join(f"{f['dataset']} `{f.get('split', 'test')}`" for f in faith)
        + ".",
        "",
    ]
    for curve in CURVES:
        if curve not in faith[0]:
            continue
        lines += [
            f"**{CURVE_TEXT[curve]}**",
            "",
            "| set | n | order | AUC | Δ vs random map | Δ vs random pixels |",
            "|---|---|---|---|---|---|",
        ]
        for f in faith:
            c = f[curve]
            for b, label in (("random_map", "random map"), ("random", "random pixels")):
                if b in c:
                    lines.append(f"| {f['dataset']} | {f['n']} | {label} | {_fmt(c[b])} | — | — |")
            for meth, label in (("text", "text saliency"), ("gradcam", "Grad-CAM")):
                d = c[meth]
                vs_pix = _vs(d, "random") if "vs" in d else "—"
                lines.append(
                    f"| {f['dataset']} | {f['n']} | {label} | {_fmt(d)} | {_diff(d)} | {vs_pix} |"
                )
        lines.append("")
    for f in faith:
        verdict = []
        for meth in ("text", "gradcam"):
            hi = f[PRIMARY_CURVE][meth]["minus_baseline_ci"][1]
            verdict.append(
                f"{meth}: deletion AUC {'below' if hi < 0 else 'NOT below'} the random map"
                f"{'' if hi < 0 else ' (CI reaches 0 or above)'}"
            )
        tops = ", ".join(f"{k} {v}" for k, v in f["top_findings"].items() if v)
        lines.append(
            f"- {f['dataset']}: {'; '.join(verdict)}. Top findings: {tops}; mean "
            f"starting probability {f['mean_p0']:.3f}; {f['steps']} steps."
        )
    lines.append("")
    return lines


def markdown(res: dict[str, Any], command: str) -> str:
    m = res["model"]
    lines = [
        "# Explanation quality (issue 14)",
        "",
        "Generated by `benchmarks/explain_quality.py`; do not edit by hand. Command:",
        "",
        f"    {command}",
        "",
        f"Model `{m['name']}` fingerprint `{m['fingerprint']}`; {res['date']}; "
        f"{res['seconds']:.0f} s on {res['machine']}. Sizes: {json.dumps(res['sizes'])} "
        f"(full-run defaults: {json.dumps(DEFAULT_N)}, prompt sensitivity {N_SENS} images, "
        f"Grad-CAM {N_SENS_GRADCAM}). 95 % bootstrap CIs over images (1,000 resamples).",
        "",
        "Text = text-conditioned saliency (the projection head at each position of the last "
        "feature map against the finding's prompt ensemble); Grad-CAM = pytorch-grad-cam on "
        "the last convolutional block, target the finding's calibrated score by the scoring "
        "rule (log-probability for a single-label pack, logit for a multi-label one). See "
        "the script's docstring for every protocol detail.",
        "",
    ]
    if res.get("faithfulness"):
        lines += faithfulness_markdown(res["faithfulness"])
    if res.get("sensitivity"):
        lines += [
            "## Prompt sensitivity",
            "",
            "Mean over images of the mean pairwise Spearman ρ between maps (1 = identical "
            "rankings). The issue's bar: above 0.9 for unrelated concepts fails. Unrelated = "
            "each dermoscopic 7-point concept × each chest X-ray concept on the same image.",
            "",
            "| set | n | text: top-7 findings | text: the pack's concepts "
            "| text: unrelated concepts | Grad-CAM: top-7 findings |",
            "|---|---|---|---|---|---|",
        ]
        for s in res["sensitivity"]:
            gc = s["gradcam_findings"]
            gcs = f"{_fmt(gc)} (n = {s['n_images_gradcam']})" if gc else "—"
            lines.append(
                f"| {s['dataset']} | {s['n_images']} | {_fmt(s['text_findings'])} "
                f"| {_fmt(s['text_own_concepts'])} | {_fmt(s['text_unrelated_concepts'])} "
                f"| {gcs} |"
            )
        lines.append("")
        for s in res["sensitivity"]:
            u = s["text_unrelated_concepts"]["mean"]
            lines.append(
                f"- {s['dataset']}: unrelated concepts ρ = {u:.3f}: "
                f"{'passes' if u <= 0.9 else 'FAILS'} the 0.9 bar."
            )
        lines.append("")
    if res.get("concepts"):
        c = res["concepts"]
        lines += [
            "## Concept detection: 7-point criteria on Derm7pt test (dermoscopic images)",
            "",
            f"n = {c['n']} cases. Score: the concept's zero-shot logit (its prompts against "
            "the pack's domain prompts, as `medlens explain` scores concepts; uncalibrated). "
            "Present = the values listed (Derm7pt `meta.csv` columns).",
            "",
            "| criterion | column = present | positives | AUROC (95 % CI) |",
            "|---|---|---|---|",
        ]
        for cid, row in c["criteria"].items():
            if "auroc" in row:
                auc = _fmt(row, "auroc")
            else:
                auc = row.get("error", "undefined (one class)")
            lines.append(
                f"| {cid} | {row.get('column', '')} ∈ {{{', '.join(row.get('present', []))}}} "
                f"| {row.get('n_pos', '—')} | {auc} |"
            )
        lines += [
            "",
            "Literature: MONET (Kim et al. 2024, Nat Med) and other concept models report "
            "concept AUROCs on their own concept sets and splits; no figure is copied here "
            "unchecked. Compare only with the same criteria, split and image size.",
            "",
        ]
    if res.get("localisation"):
        loc = res["localisation"]
        lines += [
            "## Localisation: HAM10000 test lesions",
            "",
            f"n = {loc['n']} ({loc['rule']}); masks thresholded at 128; target = the true "
            "finding. Δ = paired difference to a centred Gaussian (sd 0.25 × each side) of "
            "the same mass.",
            "",
            "| map | energy in lesion | Δ vs Gaussian | pointing game | Δ vs Gaussian |",
            "|---|---|---|---|---|",
        ]
        for meth in ("text", "gradcam", "gaussian"):
            e, p = loc["energy_in_lesion"][meth], loc["pointing_game"][meth]
            de = "—" if meth == "gaussian" else _diff(e)
            dp = "—" if meth == "gaussian" else _diff(p)
            lines.append(f"| {meth} | {_fmt(e)} | {de} | {_fmt(p)} | {dp} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=0, help="cap every set at N images (0: none)")
    ap.add_argument(
        "--faith-limit", type=int, default=0, help="cap the faithfulness sets (0: --limit)"
    )
    ap.add_argument("--steps", type=int, default=16, help="deletion/insertion steps")
    ap.add_argument(
        "--faith-split",
        choices=sorted(FAITHFULNESS),
        default="test",
        help="faithfulness sets: the test splits, or dev (validation splits) to check the protocol",
    )
    ap.add_argument(
        "--parts",
        default="faithfulness,sensitivity,concepts,localisation",
        help="comma-separated subset of faithfulness,sensitivity,concepts,localisation",
    )
    ap.add_argument("--model", default=None, help="encoder name (default: MEDLENS_MODEL / lite)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "explain_quality.md")
    ap.add_argument(
        "--json", type=Path, default=ROOT / "docs" / "results" / "explain" / "quality.json"
    )
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    torch.set_grad_enabled(False)
    from medlens.evaluation.protocols import machine_info
    from medlens.pipeline import MedLens

    def size(name: str, default: int) -> int:
        return min(default, args.limit) if args.limit > 0 else default

    t0 = time.perf_counter()
    lens = MedLens(model=args.model, retrieval=False)
    enc, card = lens.torch_encoder, lens.card
    sizes = {k: size(k, v) for k, v in DEFAULT_N.items()}
    if args.faith_limit > 0:
        sizes["faithfulness"] = min(DEFAULT_N["faithfulness"], args.faith_limit)
    n_sens, n_sens_gc = size("sens", N_SENS), size("sens_gc", N_SENS_GRADCAM)
    res: dict[str, Any] = {
        "protocol": "explain-quality",
        "model": {"name": lens.model_name, "fingerprint": enc.fingerprint},
        "sizes": sizes | {"sensitivity": n_sens, "sensitivity_gradcam": n_sens_gc},
    }
    mi = machine_info()
    res["machine"] = f"{mi.get('cpu_count', '?')} CPU cores, torch {mi.get('torch', '?')}"
    cmd = "MEDLENS_DATA=../shared/data python benchmarks/explain_quality.py"
    extra = " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    command = f"{cmd} {extra}".strip()

    def write() -> None:  # after every part: a long run that is stopped still reports
        res["date"] = datetime.now(UTC).strftime("%Y-%m-%d")
        res["seconds"] = round(time.perf_counter() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(res, command))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")

    # cheapest first
    if "concepts" in parts:
        res["concepts"] = run_concepts(enc, sizes["derm7pt"])
        write()
    if "localisation" in parts:
        res["localisation"] = run_localisation(enc, card, sizes["ham10000"])
        write()
    if "sensitivity" in parts:
        res["sensitivity"] = []
        for name in FAITHFULNESS_SETS:
            res["sensitivity"].append(run_sensitivity(enc, card, name, n_sens, n_sens_gc))
            write()
    if "faithfulness" in parts:
        res["faithfulness"] = []
        for name in FAITHFULNESS[args.faith_split]:
            res["faithfulness"].append(
                run_faithfulness(
                    enc, card, name, sizes["faithfulness"], args.steps, args.faith_split
                )
            )
            write()
    print(json.dumps(res, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
