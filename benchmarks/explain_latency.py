"""Latency of an analysis with explanations, as a ratio to plain ``analyze`` (issue 14:
goal <= 3x).

    MEDLENS_DATA=../shared/data python benchmarks/explain_latency.py [--runs 20]
        [--out benchmarks/results/explain_latency.json]
    python benchmarks/explain_latency.py --smoke      # 2 runs: checks it runs

Per image (an ISIC 2018 dermoscopy image and an NIH chest X-ray), warm, runs
interleaved so machine load hits every variant alike:

- ``analyze``: ``MedLens.analyze`` (retrieval off, as ``medlens explain`` runs it);
- ``analyze + maps``: the same plus ``explain.explanation.attach_maps`` (text-saliency
  maps for the top 3 findings from one more forward pass): what ``analyze --explain``
  attaches;
- ``analyze + Grad-CAM``: the same plus one Grad-CAM map for the top finding (one forward
  and one backward pass).

Maps are computed afresh every run (the explanation cache is not used). p50/p95 in ms
and the p50 ratios to ``analyze``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = {
    "skin": "isic2018-task3-test/images/ISIC_0034524.jpg",
    "chest": "cxr-samples/00000001_000.png",
}
GOAL = 3.0


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--model", default=None)
    ap.add_argument("--smoke", action="store_true", help="2 runs: checks the script runs")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "explain_latency.json"
    )
    args = ap.parse_args(argv)
    runs = 2 if args.smoke else args.runs
    from medlens.evaluation.protocols import machine_info
    from medlens.explain import saliency
    from medlens.explain.explanation import attach_maps
    from medlens.knowledge import load_domain
    from medlens.pipeline import MedLens

    data = Path(os.environ.get("MEDLENS_DATA", "../shared/data"))
    lens = MedLens(model=args.model, retrieval=False)
    lens.warm()
    out: dict = {
        "benchmark": "explain-latency",
        "model": {"name": lens.model_name, "fingerprint": lens.encoder.fingerprint},
        "runs": runs,
        "goal_ratio": GOAL,
        "images": {},
    }
    for kind, rel in IMAGES.items():
        decoded = lens.decode(data / rel)

        def plain(decoded=decoded):
            return lens.analyze(decoded)

        def with_maps(decoded=decoded):
            a = lens.analyze(decoded)
            attach_maps(lens, a, decoded, top=3)

        def with_gradcam(decoded=decoded):
            a = lens.analyze(decoded)
            pack = load_domain(a.domain)
            saliency.gradcam(
                lens.torch_encoder,
                decoded.pixels,
                pack,
                a.findings[0].id,
                lens.cache_dir,
                lens.card.calibration,
            )

        variants = {
            "analyze": plain,
            "analyze + maps": with_maps,
            "analyze + Grad-CAM": with_gradcam,
        }
        for fn in variants.values():  # warm every path once
            fn()
        times: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(runs):
            for name, fn in variants.items():
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1000)
            print(f"\r{kind} {i + 1}/{runs}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        p50 = {k: statistics.median(v) for k, v in times.items()}
        out["images"][kind] = {
            "file": rel,
            "shape": list(decoded.pixels.shape[:2]),
            "p50_ms": {k: round(v, 1) for k, v in p50.items()},
            "p95_ms": {k: round(_pct(v, 0.95), 1) for k, v in times.items()},
            "ratio_p50": {
                k: round(v / p50["analyze"], 2) for k, v in p50.items() if k != "analyze"
            },
        }
    out["machine"] = machine_info()
    out["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
