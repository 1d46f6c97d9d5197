"""Model load time, single-image analyze latency (warm, repeated) and peak memory.

Usage: python benchmarks/analyze_latency.py [--model lite] [--runs 30] [--out benchmarks/results/analyze_latency.json]

Reports the pipeline's warm latency next to the bare encoder forward on the same
pre-decoded image, so the ratio shows what decoding, prompts and triage add.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="lite")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/analyze_latency.json"))
    args = ap.parse_args()
    data = Path(os.environ.get("MEDLENS_DATA", "../shared/data"))
    images = {
        "skin (ISIC 224 px JPEG)": data / "isic2018-task3-test/images/ISIC_0034524.jpg",
        "chest X-ray (NIH 1024 px PNG)": data / "cxr-samples/00000001_000.png",
    }

    t0 = time.perf_counter()
    from medlens import MedLens

    lens = MedLens(model=args.model)
    enc = lens.encoder
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    lens.analyze(images["skin (ISIC 224 px JPEG)"])  # prompt embeddings computed once here
    first_s = time.perf_counter() - t1

    rows = {}
    for label, path in images.items():
        lens.analyze(path)  # warm-up
        pipe = []
        for _ in range(args.runs):
            t = time.perf_counter()
            lens.analyze(path)
            pipe.append((time.perf_counter() - t) * 1000)
        pixels = lens.decode(path).pixels
        bare = []
        for _ in range(args.runs):
            t = time.perf_counter()
            enc.embed_images([pixels])
            bare.append((time.perf_counter() - t) * 1000)
        p50, b50 = statistics.median(pipe), statistics.median(bare)
        rows[label] = {
            "analyze_p50_ms": round(p50, 1),
            "analyze_p95_ms": round(sorted(pipe)[int(0.95 * (len(pipe) - 1))], 1),
            "encoder_forward_p50_ms": round(b50, 1),
            "ratio_analyze_to_forward": round(p50 / b50, 2),
        }
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "model": {"name": args.model, "fingerprint": enc.fingerprint},
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "gpu": torch.cuda.is_available(),
        },
        "import_and_model_load_s": round(load_s, 2),
        "first_analyze_s": round(first_s, 2),
        "cold_start_to_first_result_s": round(load_s + first_s, 2),
        "runs": args.runs,
        "latency": rows,
        "peak_rss_mb": round(peak_mb, 0),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"model {args.model} ({enc.fingerprint}): load {load_s:.2f} s, first result {first_s:.2f} s, "
        f"peak RSS {peak_mb:.0f} MB"
    )
    print("| image | analyze p50 ms | p95 ms | bare forward p50 ms | ratio |")
    print("|---|---|---|---|---|")
    for label, r in rows.items():
        print(
            f"| {label} | {r['analyze_p50_ms']} | {r['analyze_p95_ms']} | "
            f"{r['encoder_forward_p50_ms']} | {r['ratio_analyze_to_forward']} |"
        )


if __name__ == "__main__":
    main()
