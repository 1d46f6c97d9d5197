"""Do the dermatology pack's test-time flips pay? Accuracy with and without them on the
*validation* splits the model was early-stopped and calibrated on (never a test split:
this decides a setting), and their latency cost.

Usage: python benchmarks/flips.py [--model lite] [--limit N] [--out docs/flips.md]
           [--json benchmarks/results/flips.json]

For each validation source the differential is scored exactly as ``analyze`` scores it
(the one scoring rule, the model's stored calibration, softmax over the dataset's
candidate findings for balanced accuracy; over all findings for the melanoma AUROC),
once on the plain embedding and once on the re-normalised mean over the image and the
pack's ``test_time_flips``. The cost is measured as the bare image-tower forward of one
image against the same image with its flips (one batch, as ``analyze`` runs them).
Decision rule (stated before the run): keep the flips when they raise the mean balanced
accuracy over the sources by at least 0.5 points without lowering any source's
melanoma AUROC by more than 0.01.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SOURCES = (  # (dataset, meta filter): the dermatology validation sources
    ("ham10000", {}),
    ("derm7pt", {"view": "derm"}),
    ("derm7pt", {"view": "clinic"}),
    ("pad_ufes_20", {}),
    ("dermnet", {}),
)
GAIN_TO_KEEP = 0.005
AUROC_LOSS_ALLOWED = 0.01


def _score(ml, manifest, recs, flips) -> dict:
    from medlens.analysis import scoring
    from medlens.evaluation import metrics as M
    from medlens.evaluation.protocols import embed_records
    from medlens.knowledge import load_domain

    pack = load_domain("dermatology")
    classes = pack.candidates(manifest.vocab, manifest.label_set())
    order = [pack.finding_ids.index(c) for c in classes]
    keep = [(r, pack.map_label(manifest.vocab, r.labels[0])) for r in recs if r.labels]
    keep = [(r, f) for r, f in keep if f in classes]
    emb = embed_records(ml.encoder, manifest, [r for r, _ in keep], None, flips)
    logits = scoring.finding_logits(ml.encoder, pack, emb, ml.settings.cache_dir)
    y = np.array([classes.index(f) for _, f in keep])
    probs = scoring.calibrated(logits, pack, ml.card.calibration, columns=order)
    full = scoring.calibrated(logits, pack, ml.card.calibration)
    mel = (np.array([f for _, f in keep]) == "melanoma").astype(int)
    auroc = (
        M.binary_auroc(mel, full[:, pack.finding_ids.index("melanoma")])
        if 0 < mel.sum() < len(mel)
        else None
    )
    return {
        "n": len(keep),
        "balanced_accuracy": round(float(M.balanced_accuracy(y, probs.argmax(1))), 4),
        "melanoma_auroc": None if auroc is None else round(float(auroc), 4),
    }


def _latency(ml, pixels: np.ndarray, flips: tuple[str, ...], runs: int) -> dict:
    import torch

    from medlens.models.base import flipped

    views = [pixels, *(flipped(pixels, f) for f in flips)]
    out = {}
    for label, batch in (("plain", views[:1]), ("with_flips", views)):
        times = []
        with torch.inference_mode():
            ml.encoder.embed_images(batch)
            for _ in range(runs):
                t = time.perf_counter()
                ml.encoder.embed_images(batch)
                times.append((time.perf_counter() - t) * 1000)
        out[f"{label}_ms_p50"] = round(statistics.median(times), 2)
    out["ratio"] = round(out["with_flips_ms_p50"] / out["plain_ms_p50"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lite")
    ap.add_argument("--limit", type=int, default=None, help="records per source (smoke)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/flips.json"))
    args = ap.parse_args(argv)

    from medlens import MedLens
    from medlens.datasets import load_dataset
    from medlens.evaluation.protocols import select_records
    from medlens.knowledge import load_domain

    ml = MedLens(model=args.model, retrieval=False)
    flips = tuple(load_domain("dermatology").domain.test_time_flips)
    if not flips:
        sys.exit("the dermatology pack declares no test_time_flips: nothing to compare")
    rows = []
    for name, where in SOURCES:
        m = load_dataset(name)
        recs = select_records(m, "val", args.limit, where)
        label = name + "".join(f" ({v})" for v in where.values())
        plain, flipped_ = _score(ml, m, recs, ()), _score(ml, m, recs, flips)
        rows.append({"source": label, "plain": plain, "flips": flipped_})
        print(label, plain, flipped_, flush=True)
    pixels = load_dataset("ham10000").image(select_records(load_dataset("ham10000"), "val", 1)[0])
    cost = _latency(ml, pixels, flips, 3 if args.limit else args.runs)
    gain = statistics.mean(
        r["flips"]["balanced_accuracy"] - r["plain"]["balanced_accuracy"] for r in rows
    )
    worst = min(
        (r["flips"]["melanoma_auroc"] - r["plain"]["melanoma_auroc"])
        for r in rows
        if r["plain"]["melanoma_auroc"] is not None
    )
    keep = gain >= GAIN_TO_KEEP and worst >= -AUROC_LOSS_ALLOWED
    result = {
        "model": ml.encoder.name,
        "fingerprint": ml.encoder.fingerprint,
        "flips": list(flips),
        "rows": rows,
        "mean_balanced_accuracy_gain": round(gain, 4),
        "worst_melanoma_auroc_change": round(worst, 4),
        "latency": cost,
        "keep": keep,
        "smoke": bool(args.limit),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(render(result, argv))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def render(r: dict, argv: list[str] | None) -> str:
    cmd = "python benchmarks/flips.py " + " ".join(argv or sys.argv[1:])
    lines = [
        "# Test-time flips: do they pay?",
        "",
        f"Written by `{cmd.strip()}` for `{r['model']}` (fingerprint `{r['fingerprint']}`), "
        "on **validation** splits only. Flips: " + ", ".join(r["flips"]) + ".",
        "",
        "| validation source | n | balanced accuracy plain | with flips | "
        "melanoma AUROC plain | with flips |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        p, f = row["plain"], row["flips"]
        lines.append(
            f"| {row['source']} | {p['n']} | {p['balanced_accuracy']:.3f} | "
            f"{f['balanced_accuracy']:.3f} | {_num(p['melanoma_auroc'])} | "
            f"{_num(f['melanoma_auroc'])} |"
        )
    c = r["latency"]
    lines += [
        "",
        f"Mean balanced-accuracy gain: {r['mean_balanced_accuracy_gain']:+.4f}; worst melanoma "
        f"AUROC change: {r['worst_melanoma_auroc_change']:+.4f}.",
        f"Cost: image-tower forward {c['plain_ms_p50']} ms plain vs {c['with_flips_ms_p50']} ms "
        f"with flips (p50, one batch; ratio {c['ratio']}).",
        "",
        f"Rule (fixed before the run): keep when the mean gain is at least "
        f"{GAIN_TO_KEEP * 100:.1f} points and no melanoma AUROC drops by more than "
        f"{AUROC_LOSS_ALLOWED}. **Decision: {'keep' if r['keep'] else 'drop'} the flips** "
        "(`test_time_flips` in `knowledge/dermatology.yaml`).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
