"""Measure the lite explanations (issue 14): localisation on HAM10000 lesion masks and
prompt sensitivity.

    MEDLENS_DATA=../shared/data python scripts/explain_localisation.py [--n 200] \
        [--out docs/results/explain/localisation.json]

Subset: HAM10000 images whose lesion is in the ``split == test`` partition *and* that
are DermaMNIST test images (so no image the lite model was trained on at 28 px), one
image per lesion, ``--n`` drawn with numpy seed 0. Target: the image's true finding
(``dx`` through the pack's ``ham10000`` labels). Masks: ``masks_200x150.zip``,
thresholded at 128.

Per image and method (text saliency, Grad-CAM, a centred Gaussian of the same mass
with sd 0.25 × each side): the fraction of map energy inside the lesion and the
pointing-game hit (map maximum inside the lesion). Means with 95 % bootstrap CIs
(``evaluation.metrics.bootstrap_ci``, 1,000 resamples) and the paired difference to the
Gaussian. Prompt sensitivity: on the first ``--n-sens`` (50; Grad-CAM 20) images, the mean Spearman
correlation between the maps of every pair of the pack's 7-point-checklist concepts
(text saliency) and of the 7 HAM10000 findings (text saliency and Grad-CAM).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from medlens.evaluation.metrics import bootstrap_ci
from medlens.explain import concepts, saliency
from medlens.io import load_image
from medlens.knowledge import load_domain
from medlens.pipeline import MedLens

HAM_FINDINGS = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def subset(root: Path, n: int, seed: int = 0) -> list[dict[str, str]]:
    with open(root / "metadata.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == r["dermamnist_split"] == "test"]
    first: dict[str, dict[str, str]] = {}
    for r in sorted(rows, key=lambda r: r["image_id"]):
        first.setdefault(r["lesion_id"], r)
    pool = sorted(first.values(), key=lambda r: r["image_id"])
    idx = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[i] for i in sorted(idx)]


def mask_of(zf: zipfile.ZipFile, image_id: str) -> np.ndarray:
    with zf.open(f"{image_id}_segmentation.png") as fh:
        return np.asarray(Image.open(io.BytesIO(fh.read())).convert("L")) >= 128


def summarise(values: np.ndarray, base: np.ndarray) -> dict[str, float]:
    diff = values - base
    lo, hi = bootstrap_ci(np.mean, values)
    dlo, dhi = bootstrap_ci(np.mean, diff)
    return {
        "mean": round(float(values.mean()), 4),
        "ci": [round(lo, 4), round(hi, 4)],
        "minus_gaussian": round(float(diff.mean()), 4),
        "minus_gaussian_ci": [round(dlo, 4), round(dhi, 4)],
    }


def mean_pairwise_rho(maps: list[np.ndarray]) -> float:
    return float(
        np.mean([saliency.rank_correlation(a, b) for a, b in itertools.combinations(maps, 2)])
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--n-sens", type=int, default=50)
    ap.add_argument("--n-sens-gradcam", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("docs/results/explain/localisation.json"))
    args = ap.parse_args()
    root = Path(os.environ.get("MEDLENS_DATA", "../shared/data")) / "ham10000"
    t0 = time.perf_counter()
    lens = MedLens(model="lite", retrieval=False)  # the encoder and its card
    enc, cal = lens.encoder, lens.card.calibration
    pack = load_domain("dermatology")
    rows = subset(root, args.n)
    finding_ids = [pack.map_label("ham10000", dx) for dx in HAM_FINDINGS]
    cls, _ = concepts.concept_embeddings(enc, pack)
    finding_targets = [saliency.finding_target(enc, pack, f) for f in finding_ids]
    concept_targets = [
        saliency.Target(c.id, c.name, e) for c, e in zip(pack.domain.concepts, cls, strict=True)
    ]
    names = ("text", "gradcam", "gaussian")
    energy = {m: [] for m in names}
    hits = {m: [] for m in names}
    area, sens_concepts, sens_text, sens_gc = [], [], [], []
    with zipfile.ZipFile(root / "masks_200x150.zip") as zf:
        for i, r in enumerate(rows):
            pixels = load_image(root / "images" / f"{r['image_id']}.jpg").pixels
            mask = mask_of(zf, r["image_id"])
            assert mask.shape == pixels.shape[:2], (r["image_id"], mask.shape, pixels.shape)
            fid = pack.map_label("ham10000", r["dx"])
            maps = {"gradcam": saliency.gradcam(enc, pixels, pack, fid, calibration=cal).map}
            if i < args.n_sens:  # one forward pass for the 7 concepts and the 7 findings
                text = saliency.text_saliencies(enc, pixels, concept_targets + finding_targets)
                sens_concepts.append(mean_pairwise_rho([s.map for s in text[:7]]))
                sens_text.append(mean_pairwise_rho([s.map for s in text[7:]]))
                maps["text"] = text[7 + finding_ids.index(fid)].map
                if i < args.n_sens_gradcam:
                    sens_gc.append(
                        mean_pairwise_rho(
                            [
                                maps["gradcam"]
                                if f == fid
                                else saliency.gradcam(enc, pixels, pack, f, calibration=cal).map
                                for f in finding_ids
                            ]
                        )
                    )
            else:
                maps["text"] = saliency.text_saliency(
                    enc, pixels, finding_targets[finding_ids.index(fid)]
                ).map
            maps["gaussian"] = saliency.centred_gaussian(mask.shape, mass=float(maps["text"].sum()))
            for m in names:
                energy[m].append(saliency.energy_inside(maps[m], mask))
                hits[m].append(float(saliency.pointing_hit(maps[m], mask)))
            area.append(float(mask.mean()))
            print(f"\r{i + 1}/{len(rows)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    e = {m: np.array(v) for m, v in energy.items()}
    h = {m: np.array(v) for m, v in hits.items()}
    result = {
        "protocol": "explain-localisation",
        "model": {"name": "lite", "fingerprint": enc.fingerprint},
        "subset": {
            "dataset": "ham10000",
            "rule": "split == test and dermamnist_split == test, one image per lesion, seed 0",
            "n": len(rows),
            "dx": {dx: sum(r["dx"] == dx for r in rows) for dx in HAM_FINDINGS},
            "lesion_area_fraction": round(float(np.mean(area)), 4),
        },
        "target": "true finding (dx via the pack's ham10000 labels)",
        "energy_in_lesion": {m: summarise(e[m], e["gaussian"]) for m in names},
        "pointing_game": {m: summarise(h[m], h["gaussian"]) for m in names},
        "prompt_sensitivity": {
            "n_images": len(sens_concepts),
            "n_images_gradcam": len(sens_gc),
            "text_7_point_concepts": round(float(np.mean(sens_concepts)), 4),
            "text_7_ham_findings": round(float(np.mean(sens_text)), 4),
            "gradcam_7_ham_findings": round(float(np.mean(sens_gc)), 4),
            "statistic": "mean over images of the mean pairwise Spearman rho between maps",
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
