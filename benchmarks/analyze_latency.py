"""Model load time, single-image analyze latency (warm, repeated) and peak memory.

Usage: python benchmarks/analyze_latency.py [--model lite] [--runs 30] [--cold-runs 3]
           [--out benchmarks/results/analyze_latency.json]
       python benchmarks/analyze_latency.py --smoke     # 3 runs, 1 cold start: checks it runs

Reports the pipeline's warm latency (p50/p95) next to the bare encoder forward on the same
pre-decoded image and the views the analysis scores (for skin, the image and its three
test-time flips, which ``analyze`` batches into its one forward pass), so the ratio shows
what decoding, the gate, prompts, triage and retrieval add; issue 17's goal is analyze
p50 ≤ 1.2 × that forward + 10 ms. The single-view forward is reported beside it, and the
time of any second forward pass (a wrong guess of the views; 0 when the guess held); and the
cold start to the first result twice: in this process (import + load + first analyze) and
in fresh Python processes (``python -c`` from interpreter start to the printed result,
with the prompt-embedding cache warm on disk as on a used install).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

GOAL_RATIO, GOAL_PLUS_MS = 1.2, 10.0  # issue 17: analyze p50 ≤ 1.2 × bare forward + 10 ms

# Peak RSS from /proc's VmHWM where there is one: Linux carries ru_maxrss over fork and
# exec, so a child's getrusage can report its (large) parent's high-water mark.
COLD_SCRIPT = """
import json, resource, sys, time
t0 = float(sys.argv[1])
from medlens import MedLens
r = MedLens(model=sys.argv[2]).analyze(sys.argv[3])
wall = time.time() - t0
try:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    peak = int(hwm.split()[1]) / 1024
except (OSError, IndexError):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "top": r.findings[0]["id"], "peak_rss_mb": round(peak)}))
"""


def _machine_info() -> dict:
    from medlens.evaluation.protocols import machine_info  # after the timings: not in load_s

    return machine_info()


def _cold_start(model: str, image: Path) -> dict:
    """Seconds from launching a fresh interpreter to its first analysis result."""
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-c", COLD_SCRIPT, repr(t0), model, str(image)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="lite")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--cold-runs", type=int, default=3, help="fresh-process cold starts")
    ap.add_argument("--smoke", action="store_true", help="tiny run: 3 runs, 1 cold start")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/analyze_latency.json"))
    args = ap.parse_args()
    if args.smoke:
        args.runs, args.cold_runs = 3, 1
    data = Path(os.environ.get("MEDLENS_DATA", "../shared/data"))
    images = {
        "skin (ISIC 224 px JPEG)": data / "isic2018-task3-test/images/ISIC_0034524.jpg",
        "chest X-ray (NIH 1024 px PNG)": data / "cxr-samples/00000001_000.png",
    }

    t0 = time.perf_counter()
    from medlens import MedLens
    from medlens.knowledge import load_domain
    from medlens.models.base import flipped

    lens = MedLens(model=args.model)
    enc = lens.encoder
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    lens.analyze(images["skin (ISIC 224 px JPEG)"])  # prompt embeddings computed once here
    first_s = time.perf_counter() - t1

    rows = {}
    for label, path in images.items():
        r0 = lens.analyze(path)  # warm-up; tells which views the analysis scores
        pixels = lens.decode(path).pixels
        flips = load_domain(r0.domain).domain.test_time_flips
        views = [pixels, *(flipped(pixels, f) for f in flips)]
        pipe, bare, single, second = [], [], [], []
        for _ in range(args.runs):  # interleaved: other load on the machine hits all alike
            t = time.perf_counter()
            r = lens.analyze(path)
            pipe.append((time.perf_counter() - t) * 1000)
            second.append(r.timings_ms.get("encode_flips", 0.0))
            t = time.perf_counter()
            enc.embed_images(views, batch_size=len(views))
            bare.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            enc.embed_images(views[:1])
            single.append((time.perf_counter() - t) * 1000)
        p50, b50 = statistics.median(pipe), statistics.median(bare)
        goal = GOAL_RATIO * b50 + GOAL_PLUS_MS
        rows[label] = {
            "views": ["image", *flips],
            "analyze_p50_ms": round(p50, 1),
            "analyze_p95_ms": round(sorted(pipe)[int(0.95 * (len(pipe) - 1))], 1),
            "encoder_forward_p50_ms": round(b50, 1),
            "ratio_analyze_to_forward": round(p50 / b50, 2),
            "overhead_p50_ms": round(p50 - b50, 1),
            "goal_ms": round(goal, 1),
            "meets_goal": p50 <= goal,
            "single_view_forward_p50_ms": round(statistics.median(single), 1),
            "second_forward_p50_ms": round(statistics.median(second), 1),
        }
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cold = [
        _cold_start(args.model, images["skin (ISIC 224 px JPEG)"]) for _ in range(args.cold_runs)
    ]
    result = {
        "model": {"name": args.model, "fingerprint": enc.fingerprint},
        "machine": _machine_info(),
        "import_and_model_load_s": round(load_s, 2),
        "first_analyze_s": round(first_s, 2),
        "cold_start_to_first_result_s": round(load_s + first_s, 2),
        "cold_start_fresh_process_s": {
            "runs": [round(c["wall_s"], 2) for c in cold],
            "median": round(statistics.median(c["wall_s"] for c in cold), 2) if cold else None,
            "peak_rss_mb": max((c["peak_rss_mb"] for c in cold), default=None),
        },
        "runs": args.runs,
        "latency": rows,
        "peak_rss_mb": round(peak_mb, 0),
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
        "command": "python benchmarks/analyze_latency.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"model {args.model} ({enc.fingerprint}): load {load_s:.2f} s, "
        f"first result {first_s:.2f} s, peak RSS {peak_mb:.0f} MB"
    )
    if cold:
        c = result["cold_start_fresh_process_s"]
        print(
            f"cold start in a fresh process (interpreter start to first result): "
            f"median {c['median']} s over {len(cold)}, peak RSS {c['peak_rss_mb']} MB"
        )
    print(
        "| image | views | analyze p50 ms | p95 ms | bare forward p50 ms | ratio | overhead ms "
        "| goal ms | single-view forward ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(
            f"| {label} | {len(r['views'])} | {r['analyze_p50_ms']} | {r['analyze_p95_ms']} | "
            f"{r['encoder_forward_p50_ms']} | {r['ratio_analyze_to_forward']} | "
            f"{r['overhead_p50_ms']} | {r['goal_ms']} | {r['single_view_forward_p50_ms']} |"
        )


if __name__ == "__main__":
    main()
